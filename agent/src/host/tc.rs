//! What the kernel has attached where vcnpath attaches: the program behind vcnpath's TC
//! filter on each managed VNIC and on every pod's host-side veth, for the repair pass.

use crate::{
    cni::names::is_host_veth,
    datapath::{Observed, Role, TC_HANDLE_RAW, TC_PRIORITY},
};

use super::netlink::{HostError, Netlink, TcHook};

/// Observes the managed VNICs (by ifindex; one that no longer exists is left out) and
/// every pod veth the CNI plugin made (found by name), with the current name of each.
pub async fn observe(netlink: &Netlink, vnics: &[u32]) -> Result<Vec<Observed>, HostError> {
    let links = netlink.links().await?;
    let mut observed = Vec::new();
    for link in &links {
        let role = if vnics.contains(&link.index) {
            Role::Vnic
        } else if is_host_veth(&link.name) {
            Role::Pod
        } else {
            continue;
        };
        let program = |hook| netlink.tc_bpf_program(link.index, hook, TC_PRIORITY, TC_HANDLE_RAW);
        let egress = match role {
            Role::Vnic => program(TcHook::Egress).await?,
            Role::Pod => None,
        };
        let ingress = program(TcHook::Ingress).await?;
        observed.push(Observed {
            ifindex: link.index,
            name: link.name.clone(),
            role,
            egress,
            ingress,
        });
    }
    Ok(observed)
}
