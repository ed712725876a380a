//! GC (CNI 1.1.0): the runtime lists the attachments still valid on this network
//! (`cni.dev/valid-attachments`); the agent releases every other allocation, except one
//! whose ADD is running or recent, through its release path (cooldown, checkpoint), and
//! the plugin removes the host veth of each released one (the pod's /32 route goes with
//! it). The cooldown keeps a released address from being handed out again before its
//! veth is gone.
//!
//! A GC without the key says nothing about which attachments are valid, so nothing is
//! released: reading its absence as "none are valid" would take every pod's address.

use std::fmt::Write as _;

use super::{
    config::NetConf,
    error::{CniError, ErrorCode},
    names,
    netlink::Netlink,
    plugin::from_client,
    serialize::lock_attachment,
};
use crate::{api::Client, ipam::PodRef};

pub async fn gc(conf: &NetConf) -> Result<(), CniError> {
    let Some(valid) = &conf.valid_attachments else {
        return Ok(());
    };
    let valid = valid
        .iter()
        .map(|a| PodRef {
            container_id: a.container_id.clone(),
            ifname: a.ifname.clone(),
            namespace: None,
            name: None,
        })
        .collect();
    let client = Client::new(conf.socket(), conf.timeout());
    let released = client.gc(valid).await.map_err(|e| from_client(&e))?;
    let node = Netlink::current().map_err(|e| {
        CniError::new(
            ErrorCode::Internal,
            "opening a netlink socket failed",
            e.to_string(),
        )
    })?;
    let mut failed = String::new();
    for pod in released {
        let host_veth = names::host_veth(&pod.container_id, &pod.ifname);
        // A DEL of the same attachment may be running; wait for it as ADD and DEL do.
        let _serialized = lock_attachment(&conf.socket(), &host_veth, conf.timeout()).await?;
        if let Err(e) = node.delete_link(&host_veth).await {
            let _ = write!(
                failed,
                "{}{host_veth} (container {}): {e}",
                if failed.is_empty() { "" } else { "; " },
                pod.container_id
            );
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::InterfaceSetup,
            "CNI GC released the stale addresses but could not remove some host veths",
            failed,
        ))
    }
}
