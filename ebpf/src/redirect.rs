//! Sending a packet out of the VNIC that owns its source (OCI's source/destination check
//! drops it anywhere else).

use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, bpf_redir_neigh},
    programs::TcContext,
};
use vcnpath_common::{Config, MARK_REDIRECTED, Reason, VNIC_F_ROUTER_MAC, Vnic};

use crate::{
    decision::{Decision, Step},
    helpers, maps, packet,
    parse::in_subnet,
};

const AF_INET: u32 = 2;

/// Leaves through `owner` if the kernel routed the packet elsewhere; otherwise passes it
/// counted as `reason`.
#[inline(always)]
pub fn via_owner(ctx: &TcContext, owner: u32, dst: [u8; 4], reason: Reason) -> Step<Decision> {
    if packet::ifindex(ctx) == owner {
        return Ok(Decision::pass(reason));
    }
    let Some(vnic) = maps::vnic(owner) else {
        return Ok(Decision::pass(Reason::PassNoVnic));
    };
    to_vnic(ctx, &vnic, dst, Reason::RedirectOwner)
}

/// Masqueraded packets must leave through the interface owning the masquerade address.
#[inline(always)]
pub fn via_masquerade(
    ctx: &TcContext,
    config: &Config,
    dst: [u8; 4],
    reason: Reason,
) -> Step<Decision> {
    if packet::ifindex(ctx) == config.masq_ifindex {
        return Ok(Decision::pass(reason));
    }
    let Some(vnic) = maps::vnic(config.masq_ifindex) else {
        return Ok(Decision::pass(Reason::PassNoVnic));
    };
    to_vnic(ctx, &vnic, dst, reason)
}

/// Redirects to `vnic` with correct L2 addresses: next hop is the destination itself
/// when it is in the VNIC's subnet, else the subnet's virtual router.
#[inline(always)]
pub fn to_vnic(ctx: &TcContext, vnic: &Vnic, dst: [u8; 4], reason: Reason) -> Step<Decision> {
    let on_link = in_subnet(dst, vnic.subnet_ip, vnic.subnet_prefix_len);
    // The target's egress program sees the packet again; it must not count it again.
    packet::set_mark(ctx, packet::mark(ctx) | MARK_REDIRECTED);
    if !on_link && vnic.flags & VNIC_F_ROUTER_MAC != 0 {
        // Fast path: the router's MAC is known, so rewrite L2 here and skip the
        // neighbour table.
        packet::store_macs(ctx, &vnic.router_mac, &vnic.mac)?;
        let ret = helpers::redirect(vnic.ifindex);
        return Ok(verdict(ret, reason));
    }
    let next_hop = if on_link { dst } else { vnic.router_ip };
    let mut params = bpf_redir_neigh {
        nh_family: AF_INET,
        __bindgen_anon_1: aya_ebpf::bindings::bpf_redir_neigh__bindgen_ty_1 {
            ipv4_nh: u32::from_ne_bytes(next_hop),
        },
    };
    let ret = helpers::redirect_neigh(vnic.ifindex, &mut params);
    Ok(verdict(ret, reason))
}

/// Whether the packet was redirected here by [`to_vnic`] (counted where it was), taking the
/// mark bit off so nothing after this program sees it.
#[inline(always)]
pub fn take_redirect_mark(ctx: &TcContext) -> bool {
    let mark = packet::mark(ctx);
    if mark & MARK_REDIRECTED == 0 {
        return false;
    }
    packet::set_mark(ctx, mark & !MARK_REDIRECTED);
    true
}

#[inline(always)]
fn verdict(ret: i64, reason: Reason) -> Decision {
    if ret == i64::from(TC_ACT_REDIRECT) {
        Decision::redirect(reason)
    } else {
        Decision::drop(Reason::DropRewrite)
    }
}
