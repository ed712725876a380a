//! Reconcile: read what OCI has (the node's attachments, VNICs and their private IPs), compare
//! with the pool and the checkpoint, and repair. Runs at start (it builds the pool) and
//! periodically. Only addresses and VNICs tagged for this node are ever adopted or deleted, and
//! an address a checkpointed pod holds is never deleted: if OCI lost it, it is recreated.
use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::oci::models::{AttachmentState, PrivateIp, Subnet, Tags, Vnic, VnicAttachment};
use crate::oci::new_retry_token;

use super::checkpoint::Key;
use super::config::NODE_TAG;
use super::error::IpamError;
use super::pool::{Slot, SlotState, VnicInfo};
use super::state::{Inner, State};

pub(super) async fn periodic(inner: Arc<Inner>) {
    loop {
        tokio::time::sleep(inner.cfg.reconcile_interval).await;
        if let Err(e) = run(&inner).await {
            tracing::warn!(error = %e, "reconcile failed; retrying at the next interval");
        }
    }
}

pub(super) async fn run(inner: &Inner) -> Result<(), IpamError> {
    async {
        let _ops = inner.ops.lock().await;
        let observed = observe(inner).await?;
        let repairs = {
            let mut state = inner.state.lock().await;
            apply(inner, &mut state, observed)
        };
        repair(inner, repairs).await;
        inner.wake.notify_one();
        Ok(())
    }
    .instrument(tracing::info_span!("reconcile"))
    .await
}

struct Observed {
    vnics: Vec<(VnicInfo, Vec<PrivateIp>)>,
    other_attachments: usize,
}

#[derive(Default)]
struct Repairs {
    /// Tagged for this node, held by no pod, with no room in the pool: (VNIC, IP, OCID).
    delete: Vec<(String, Ipv4Addr, String)>,
    /// Checkpointed pods whose address OCI no longer has.
    recreate: Vec<(Key, String, Ipv4Addr)>,
}

fn tagged_for(tags: &Tags, instance_id: &str) -> bool {
    tags.get(NODE_TAG).is_some_and(|v| v == instance_id)
}

async fn observe(inner: &Inner) -> Result<Observed, IpamError> {
    let cloud = &inner.cloud;
    let attachments = cloud
        .list_vnic_attachments()
        .await
        .map_err(IpamError::cloud("list the node's VNIC attachments", None))?;
    let mut subnets = HashMap::new();
    let mut observed = Observed {
        vnics: Vec::new(),
        other_attachments: 0,
    };
    for attachment in attachments {
        match (attachment.lifecycle_state, &attachment.vnic_id) {
            (AttachmentState::Detached, _) => {}
            (AttachmentState::Attached, Some(vnic_id)) => {
                let vnic = cloud
                    .get_vnic(vnic_id)
                    .await
                    .map_err(IpamError::cloud("read a VNIC", Some(vnic_id)))?;
                let managed = if vnic.is_primary {
                    inner.cfg.pool.use_primary_vnic
                } else {
                    tagged_for(&vnic.freeform_tags, &inner.cfg.instance_id)
                };
                if !managed {
                    observed.other_attachments += 1;
                    continue;
                }
                let subnet = if let Some(s) = subnets.get(&vnic.subnet_id) {
                    s
                } else {
                    let s = cloud
                        .get_subnet(&vnic.subnet_id)
                        .await
                        .map_err(IpamError::cloud("read the subnet of VNIC", Some(vnic_id)))?;
                    subnets.entry(vnic.subnet_id.clone()).or_insert(s)
                };
                let info = info_from(&attachment, &vnic, subnet)?;
                let ips = cloud
                    .list_private_ips(vnic_id)
                    .await
                    .map_err(IpamError::cloud(
                        "list the private IPs of VNIC",
                        Some(vnic_id),
                    ))?;
                observed.vnics.push((info, ips));
            }
            // Attaching or detaching: it holds a slot of the shape's limit; adopted once settled.
            _ => observed.other_attachments += 1,
        }
    }
    Ok(observed)
}

/// The pool's view of a freshly attached VNIC.
pub(super) async fn vnic_info(
    inner: &Inner,
    attachment: &VnicAttachment,
) -> Result<VnicInfo, IpamError> {
    let vnic_id = attachment.vnic_id.as_deref().ok_or(IpamError::Invalid {
        what: "VNIC id",
        id: attachment.id.clone(),
        value: String::new(),
    })?;
    let vnic = inner
        .cloud
        .get_vnic(vnic_id)
        .await
        .map_err(IpamError::cloud("read a VNIC", Some(vnic_id)))?;
    let subnet = inner
        .cloud
        .get_subnet(&vnic.subnet_id)
        .await
        .map_err(IpamError::cloud("read the subnet of VNIC", Some(vnic_id)))?;
    info_from(attachment, &vnic, &subnet)
}

fn info_from(
    attachment: &VnicAttachment,
    vnic: &Vnic,
    subnet: &Subnet,
) -> Result<VnicInfo, IpamError> {
    let invalid = |what, value: &str| IpamError::Invalid {
        what,
        id: vnic.id.clone(),
        value: value.to_owned(),
    };
    let primary = vnic.private_ip.as_deref().unwrap_or_default();
    Ok(VnicInfo {
        id: vnic.id.clone(),
        attachment_id: attachment.id.clone(),
        nic_index: attachment.nic_index.unwrap_or_default(),
        attached_at: attachment.time_created.clone().unwrap_or_default(),
        mac: vnic.mac_address.clone().unwrap_or_default(),
        interface: None,
        subnet_id: subnet.id.clone(),
        subnet: subnet
            .cidr_block
            .parse::<Ipv4Net>()
            .map_err(|_| invalid("subnet CIDR", &subnet.cidr_block))?
            .trunc(),
        router_ip: subnet
            .virtual_router_ip
            .parse()
            .map_err(|_| invalid("virtual router IP", &subnet.virtual_router_ip))?,
        primary_ip: primary
            .parse()
            .map_err(|_| invalid("primary private IP", primary))?,
        is_primary: vnic.is_primary,
    })
}

/// Brings pool and checkpoint in line with what OCI has; returns the cloud calls still needed.
fn apply(inner: &Inner, state: &mut State, observed: Observed) -> Repairs {
    let now = Instant::now();
    let cfg = &inner.cfg;
    let mut repairs = Repairs::default();
    state.pool.other_attachments = observed.other_attachments;
    let gone: Vec<String> = state
        .pool
        .vnics()
        .iter()
        .map(|v| v.info.id.clone())
        .filter(|id| !observed.vnics.iter().any(|(info, _)| info.id == *id))
        .collect();
    for id in gone {
        tracing::warn!(vnic = %id, "VNIC is no longer attached to this node; dropping it from the pool");
        state.pool.remove_vnic(&id);
    }
    let held: HashMap<(String, Ipv4Addr), Key> = state
        .allocations
        .iter()
        .map(|(k, e)| ((e.allocation.vnic_id.clone(), e.allocation.ip), k.clone()))
        .collect();
    for (info, ips) in observed.vnics {
        let vnic_id = info.id.clone();
        state.pool.upsert_vnic(info);
        let in_cloud: BTreeMap<Ipv4Addr, PrivateIp> = ips
            .into_iter()
            .filter(|p| !p.is_primary && tagged_for(&p.freeform_tags, &cfg.instance_id))
            .filter_map(|p| Some((p.ip_address.parse().ok()?, p)))
            .collect();
        let v = state.pool.vnic_mut(&vnic_id).expect("just upserted");
        // Addresses OCI no longer has leave the pool; a pod's is recreated below.
        v.ips.retain(|ip, _| in_cloud.contains_key(ip));
        for (ip, p) in in_cloud {
            if let Some(slot) = v.ips.get_mut(&ip) {
                slot.ocid = p.id;
                continue;
            }
            let state_of_ip = match held.get(&(vnic_id.clone(), ip)) {
                Some(key) => {
                    let entry = &state.allocations[key];
                    SlotState::Assigned(entry.pod.clone())
                }
                None if v.ips.len() < cfg.pool.ips_per_vnic => {
                    tracing::info!(%ip, vnic = %vnic_id, "adopting a free address tagged for this node");
                    SlotState::Free { since: now }
                }
                None => {
                    repairs.delete.push((vnic_id.clone(), ip, p.id));
                    continue;
                }
            };
            v.ips.insert(
                ip,
                Slot {
                    ocid: p.id,
                    state: state_of_ip,
                },
            );
        }
    }
    for (key, entry) in &mut state.allocations {
        let a = &entry.allocation;
        match state.pool.vnic(&a.vnic_id).and_then(|v| v.ips.get(&a.ip)) {
            Some(slot) => entry.ip_id.clone_from(&slot.ocid),
            None if state.pool.vnic(&a.vnic_id).is_some() => {
                repairs
                    .recreate
                    .push((key.clone(), a.vnic_id.clone(), a.ip));
            }
            None => {
                tracing::error!(ip = %a.ip, vnic = %a.vnic_id, container_id = %key.0, "the VNIC of a checkpointed pod is gone; its address cannot be restored");
            }
        }
    }
    repairs
}

async fn repair(inner: &Inner, repairs: Repairs) {
    for (vnic, ip, ocid) in repairs.delete {
        match inner.cloud.delete_private_ip(&ocid).await {
            Ok(()) => tracing::info!(%ip, %vnic, "deleted an untracked address of this node"),
            Err(e) => tracing::warn!(%ip, %vnic, error = %e, "cannot delete an untracked address"),
        }
    }
    for (key, vnic, ip) in repairs.recreate {
        let token = new_retry_token();
        let created = inner
            .cloud
            .create_private_ip(&vnic, Some(ip), &inner.tags, &token)
            .await;
        let mut state = inner.state.lock().await;
        let Some(entry) = state.allocations.get_mut(&key) else {
            continue; // released meanwhile
        };
        match created {
            Ok(p) => {
                entry.ip_id.clone_from(&p.id);
                let pod = entry.pod.clone();
                let slot = Slot {
                    ocid: p.id,
                    state: SlotState::Assigned(pod),
                };
                state.pool.add_slot(&vnic, ip, slot);
                tracing::warn!(%ip, %vnic, container_id = %key.0, "restored a checkpointed pod's address that OCI had lost");
            }
            Err(e) => {
                tracing::error!(%ip, %vnic, container_id = %key.0, error = %e, "a checkpointed pod's address is missing in OCI and cannot be restored");
            }
        }
    }
    let state = inner.state.lock().await;
    if let Err(e) = inner.save(&state).await {
        tracing::error!(error = %e, "cannot checkpoint after reconcile");
    }
}
