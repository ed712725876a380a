//! A pod's host-side veth, on ingress (packets the pod sends): a packet passes only when
//! the node's route back to its source address leaves through this very interface — the
//! strict reverse-path check `rp_filter = 1` would make, enforced whatever the node's
//! sysctls say. The CNI plugin routes each pod address (`/32`) through the pod's veth
//! alone, so a pod can send only with its own address: it can neither ride another pod's
//! NAT flows nor speak as the node.
//!
//! A pod may reach the instance metadata service only when its endpoint carries
//! [`ENDPOINT_F_IMDS`]: IMDS serves the node's instance-principal credentials to whoever asks.

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS},
    programs::TcContext,
};
use vcnpath_common::{ENDPOINT_F_IMDS, IMDS_ADDR, IMDS_PORT, Reason};

use crate::{
    decision::{Decision, Step},
    helpers, maps, packet, parse,
};

const AF_INET: u8 = 2;

#[inline(always)]
pub fn run(ctx: &TcContext) -> Step<Decision> {
    // Not IPv4 (ARP to the gateway, IPv6) passes: vcnpath routes and translates IPv4 only.
    let ip = parse::ipv4(ctx)?;
    let ifindex = packet::ifindex(ctx);
    if route_leaves_via(ctx, ip.src) != Some(ifindex) {
        return Ok(Decision::drop(Reason::DropSpoofed));
    }
    if ip.dst == IMDS_ADDR && ip.proto == parse::IPPROTO_TCP && !may_reach_imds(ctx, &ip, ip.src) {
        return Ok(Decision::drop(Reason::DropPodImds));
    }
    Ok(Decision::pass(Reason::PassPodSource))
}

/// Whether a TCP packet to the metadata address may pass: to another port (the address also
/// serves DNS and NTP), or from a pod whose endpoint is allowed. A header too short to name
/// the port is refused, as is a later fragment of a pod not allowed (it has no port).
#[inline(always)]
fn may_reach_imds(ctx: &TcContext, header: &parse::Header, src: [u8; 4]) -> bool {
    let allowed = || maps::endpoint(src).is_some_and(|e| e.flags & ENDPOINT_F_IMDS != 0);
    let Some(ip) = header.bounded(ctx) else {
        return false;
    };
    if ip.later_fragment {
        return allowed();
    }
    match parse::l4_head(ctx, &ip) {
        Ok(l4) if u16::from_be_bytes(l4.dport()) != IMDS_PORT => true,
        Ok(_) => allowed(),
        Err(_) => false,
    }
}

/// The interface the node's route to `addr` leaves through, if it has a unicast route.
#[inline(always)]
fn route_leaves_via(ctx: &TcContext, addr: [u8; 4]) -> Option<u32> {
    let mut params = helpers::fib_params();
    params.family = AF_INET;
    params.ifindex = packet::ifindex(ctx);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(addr);
    let rc = helpers::fib_lookup(ctx, &mut params);
    // The route is resolved (and `ifindex` set to its device) before the neighbour and
    // MTU checks; a missing neighbour or a large packet says nothing about the source.
    let found = u32::try_from(rc).is_ok_and(|rc| {
        rc == BPF_FIB_LKUP_RET_SUCCESS
            || rc == BPF_FIB_LKUP_RET_NO_NEIGH
            || rc == BPF_FIB_LKUP_RET_FRAG_NEEDED
    });
    found.then_some(params.ifindex)
}
