//! Fragmented datagrams: only the first fragment carries the L4 header a flow is found
//! by, so the decision taken for it is kept in `frags` under the datagram's identity and
//! the fragments after it are translated, or passed, as it was.
//!
//! Fragments are not reordered here: one that arrives before its datagram's first
//! fragment is dropped on egress (passing it would leak the pod address) and passed to
//! the host untranslated on ingress, as before the first fragment is known. A node's own
//! stack sends a datagram's fragments in order; the internet may not, which loses such a
//! datagram as any stateless translator does.

use aya_ebpf::programs::TcContext;
use vcnpath_common::{
    Config, FRAG_F_INBOUND, FRAG_TIMEOUT_NS, FragEntry, FragKey, NAT_DIR_EGRESS, NAT_DIR_INGRESS,
    Reason, wire::IPV4_MF,
};

use crate::{
    csum,
    decision::{Decision, Step},
    helpers,
    maps::FRAGS,
    packet,
    parse::{IP_DST_OFF, IP_ID_OFF, IP_SRC_OFF, Ipv4},
    redirect,
};

/// After the first fragment of a datagram was handled (translated to or for `addr`, or
/// passed as part of an inbound flow when `flags` has [`FRAG_F_INBOUND`]), keeps that for
/// the fragments that follow. A packet that is not fragmented is not recorded.
#[inline(always)]
pub fn note_first(ctx: &TcContext, ip: &Ipv4, dir: u8, addr: [u8; 4], flags: u8) {
    let Some([id0, id1, frag_hi, _]) = packet::load::<[u8; 4]>(ctx, IP_ID_OFF) else {
        return;
    };
    if frag_hi & IPV4_MF == 0 {
        return;
    }
    let key = key(ip, [id0, id1], dir);
    let entry = FragEntry {
        created_ns: helpers::now_ns(),
        addr,
        flags,
        pad: [0; 3],
    };
    // An LRU insert fails only without memory; the rest of the datagram is then handled
    // as if its first fragment had not been seen, and counted so.
    let _ = FRAGS.insert(key, entry, 0);
}

/// A later fragment of a pod's datagram: leaves as its first fragment did, or is dropped
/// when that is unknown.
#[inline(always)]
pub fn egress_later(ctx: &TcContext, config: &Config, ip: &Ipv4, owner: u32) -> Step<Decision> {
    let Some(first) = first_of(ctx, ip, NAT_DIR_EGRESS) else {
        return Ok(Decision::drop(Reason::DropFragment));
    };
    if first.flags & FRAG_F_INBOUND != 0 {
        return redirect::via_owner(ctx, owner, ip.dst, Reason::PassInboundFragment);
    }
    csum::set_ip_addr(ctx, IP_SRC_OFF, ip.src, first.addr)?;
    redirect::via_masquerade(ctx, config, ip.dst, Reason::SnatFragment)
}

/// A later fragment for the masquerade address: delivered to the pod its first fragment
/// went to, or passed to the host when there was none.
#[inline(always)]
pub fn ingress_later(ctx: &TcContext, ip: &Ipv4) -> Step<Decision> {
    let Some(first) = first_of(ctx, ip, NAT_DIR_INGRESS) else {
        return Ok(Decision::pass(Reason::PassFragment));
    };
    csum::set_ip_addr(ctx, IP_DST_OFF, ip.dst, first.addr)?;
    Ok(Decision::pass(Reason::ReverseNatFragment))
}

/// What the first fragment of the datagram `ip` belongs to decided, while it holds.
#[inline(always)]
fn first_of(ctx: &TcContext, ip: &Ipv4, dir: u8) -> Option<FragEntry> {
    let id = packet::load::<[u8; 2]>(ctx, IP_ID_OFF)?;
    let first = helpers::lru_copied(&FRAGS, &key(ip, id, dir))?;
    let now = helpers::now_ns();
    (now.saturating_sub(first.created_ns) < FRAG_TIMEOUT_NS).then_some(first)
}

#[inline(always)]
fn key(ip: &Ipv4, id: [u8; 2], dir: u8) -> FragKey {
    FragKey {
        src: ip.src,
        dst: ip.dst,
        id,
        proto: ip.proto,
        dir,
    }
}
