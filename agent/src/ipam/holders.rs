//! Addresses the node shows in use that the checkpoint does not hold: a pod's `vcn…` veth
//! with its /32 route, or its entry in the pinned `endpoints` map, outlive a lost, deleted
//! or stale checkpoint. Each such address is held at start by a *recovered* allocation — its
//! pod's identity is unknown, so it is named after the address — and so is never handed to
//! another pod. The reconcile moves it to the VNIC OCI shows it on, like any allocation; it
//! is checkpointed like any other, and released only by evidence that the pod is gone: its
//! veth gone for the GC's grace period (see [`gc`](super::gc)), or a DEL of the attachment
//! whose veth it is. An ADD of that attachment (the runtime asking again) adopts it: the pod
//! gets its own address back, as it would from the checkpoint.
use std::net::Ipv4Addr;

use super::checkpoint::{self, Entry};
use super::pool::SlotState;
use super::state::State;
use super::types::{Allocation, PodRef};

/// The container id of a recovered allocation starts with this: CNI container ids are
/// alphanumeric with `_`, `.` and `-`, so no runtime's id can take the form.
pub const RECOVERED_PREFIX: &str = "recovered:";

/// What the node shows of one pod address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostHolder {
    pub ip: Ipv4Addr,
    /// The host veth the node routes the address through (`None`: only the pinned
    /// `endpoints` map shows it).
    pub veth: Option<String>,
    /// The VNIC interface the pinned `endpoints` entry steers the address out of.
    pub interface: Option<String>,
    /// The pinned `endpoints` entry lets the pod reach IMDS: a recovered pod, whose
    /// namespace is unknown, keeps what it had (see `NodeSettings::recovered_imds`).
    pub imds: bool,
}

/// The pod a recovered allocation stands for: its interface is the host veth (empty when
/// none is known).
pub fn recovered_pod(holder: &HostHolder) -> PodRef {
    PodRef {
        container_id: format!("{RECOVERED_PREFIX}{}", holder.ip),
        ifname: holder.veth.clone().unwrap_or_default(),
        namespace: None,
        name: None,
    }
}

/// Whether `pod` is a recovered allocation's.
pub fn is_recovered(pod: &PodRef) -> bool {
    pod.container_id.starts_with(RECOVERED_PREFIX)
}

/// The host veth a recovered allocation's pod is routed through, if known.
pub fn recovered_veth(pod: &PodRef) -> Option<&str> {
    (is_recovered(pod) && !pod.ifname.is_empty()).then_some(pod.ifname.as_str())
}

/// Holds every address of `holders` no allocation holds with a recovered allocation (on
/// the VNIC whose interface the `endpoints` entry names, if the pool knows it; else on no
/// VNIC until the reconcile finds the address in OCI). Returns the addresses now held.
pub(super) fn hold(state: &mut State, holders: &[HostHolder], mtu: u32) -> Vec<Ipv4Addr> {
    let mut held = Vec::new();
    for holder in holders {
        let ip = holder.ip;
        if state.allocations.values().any(|e| e.allocation.ip == ip) {
            continue;
        }
        let pod = recovered_pod(holder);
        let vnic =
            state
                .pool
                .vnics()
                .iter()
                .find(|v| v.ips.contains_key(&ip))
                .or_else(|| {
                    state.pool.vnics().iter().find(|v| {
                        v.info.interface.is_some() && v.info.interface == holder.interface
                    })
                })
                .map(|v| {
                    (
                        v.info.clone(),
                        v.ips.get(&ip).map(|s| (s.ocid.clone(), s.block)),
                    )
                });
        let allocation = Allocation {
            ip,
            vnic_id: vnic.as_ref().map(|(v, _)| v.id.clone()).unwrap_or_default(),
            interface: holder.interface.clone().unwrap_or_default(),
            subnet: vnic
                .as_ref()
                .map_or_else(|| ipnet::Ipv4Net::from(ip), |(v, _)| v.subnet),
            router_ip: vnic
                .as_ref()
                .map_or(Ipv4Addr::UNSPECIFIED, |(v, _)| v.router_ip),
            mtu,
        };
        let (ip_id, block) = vnic
            .as_ref()
            .and_then(|(_, o)| o.clone())
            .unwrap_or_default();
        if !allocation.vnic_id.is_empty() {
            state
                .pool
                .set_state(&allocation.vnic_id, ip, SlotState::Assigned(pod.clone()));
        }
        tracing::warn!(%ip, veth = holder.veth.as_deref().unwrap_or("-"), interface = holder.interface.as_deref().unwrap_or("-"),
            "the node shows this address in use but the checkpoint does not: it is held for the unknown pod until its veth is gone");
        state.allocations.insert(
            checkpoint::key(&pod),
            Entry {
                pod,
                allocation,
                ip_id,
                block,
            },
        );
        held.push(ip);
    }
    held
}

/// Hands the recovered allocation routed through `veth` to `pod`, whose veth it is (the
/// name is derived from the attachment): the address is the pod's again. Nothing changes
/// when `pod` already has an allocation or no recovered one has that veth. Returns whether
/// it was adopted.
pub(super) fn adopt(state: &mut State, veth: &str, pod: &PodRef) -> bool {
    let key = checkpoint::key(pod);
    if state.allocations.contains_key(&key) {
        return false;
    }
    let Some(recovered) = state
        .allocations
        .iter()
        .find(|(_, e)| recovered_veth(&e.pod) == Some(veth))
        .map(|(k, _)| k.clone())
    else {
        return false;
    };
    let mut entry = state.allocations.remove(&recovered).expect("just found");
    entry.pod = pod.clone();
    let (vnic_id, ip) = (entry.allocation.vnic_id.clone(), entry.allocation.ip);
    state
        .pool
        .set_state(&vnic_id, ip, SlotState::Assigned(pod.clone()));
    tracing::info!(%ip, veth, container_id = %pod.container_id, "the pod the node routes this held address to asked for it: it is the pod's again");
    state.allocations.insert(key, entry);
    true
}
