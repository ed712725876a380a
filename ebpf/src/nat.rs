//! NAT entries: lookup, refresh and creation with collision-free port choice.
//!
//! A translated flow has two entries in `nat`: the egress entry keyed by the pod's
//! packet (pod → remote) holding the masquerade address and port, and the ingress entry
//! keyed by the reply (remote → masquerade address) holding the pod's address and port.
//! The ingress entry is claimed first with `BPF_NOEXIST`, so two flows can never share
//! one translated 5-tuple, even when two CPUs race.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
};
use vcnpath_common::{
    Config, NAT_DIR_EGRESS, NAT_DIR_INGRESS, NAT_F_ANSWERED, NAT_PORT_TRIES, NAT_TOUCH_INTERVAL_NS,
    NatEntry, NatKey, Reason, TCP_SEEN_ACK, TCP_SEEN_FIN, TCP_SEEN_POD_SHIFT, TCP_SEEN_RST,
    TCP_SEEN_SYN, inbound_seen, tcp_closing,
};

use aya_ebpf::programs::TcContext;

use crate::{
    decision::{Decision, Step},
    hostsock,
    maps::{INBOUND, NAT},
    parse::IPPROTO_ICMP,
};

/// Key of a packet leaving a pod. For ICMP echo, `sport` is the identifier and `dport` 0.
#[inline(always)]
pub fn egress_key(proto: u8, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> NatKey {
    NatKey {
        src,
        dst,
        sport,
        dport,
        proto,
        dir: NAT_DIR_EGRESS,
        pad: [0; 2],
    }
}

/// Key of a reply to the masquerade address. For ICMP echo, `dport` is the identifier.
#[inline(always)]
pub fn ingress_key(proto: u8, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> NatKey {
    NatKey {
        src,
        dst,
        sport,
        dport,
        proto,
        dir: NAT_DIR_INGRESS,
        pad: [0; 2],
    }
}

/// A live pointer into the map; valid for this program run.
#[inline(always)]
pub fn lookup(key: &NatKey) -> Option<*mut NatEntry> {
    NAT.get_ptr_mut(key)
}

/// The `TCP_SEEN_*` bits for a TCP flags byte (0 for other protocols).
#[inline(always)]
pub fn tcp_seen(tcp_flags: u8) -> u8 {
    let mut seen = 0;
    if tcp_flags & 0x02 != 0 {
        seen |= TCP_SEEN_SYN;
    } else {
        seen |= TCP_SEEN_ACK;
    }
    if tcp_flags & 0x01 != 0 {
        seen |= TCP_SEEN_FIN;
    }
    if tcp_flags & 0x04 != 0 {
        seen |= TCP_SEEN_RST;
    }
    seen
}

/// Whether a TCP flags byte opens a connection: SYN without ACK (nor FIN or RST).
#[inline(always)]
pub fn opens(tcp_flags: u8) -> bool {
    tcp_flags & 0x17 == 0x02
}

/// Which end of an inbound record (rule 4) a packet comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The host outside the VCN that opened the flow.
    Outside,
    /// The pod.
    Pod,
}

/// The inbound record (rule 4) of a pod's packet, keyed as the pod's answers are.
#[inline(always)]
pub fn inbound(key: &NatKey) -> Option<*mut NatEntry> {
    INBOUND.get_ptr_mut(key)
}

/// Records activity on an inbound record, each end's TCP flags apart (see
/// `TCP_SEEN_POD_SHIFT`) so a half-close is not taken for a close, and whether the pod
/// answered (`NAT_F_ANSWERED`). A SYN from outside on a closing record starts the flow
/// over, as on a translated flow; returns whether it did.
#[inline(always)]
pub fn touch_inbound(entry: *mut NatEntry, seen: u8, opens: bool, side: Side) -> bool {
    if side == Side::Pod {
        // SAFETY: `entry` comes from a map lookup in this program run.
        unsafe {
            if (*entry).flags & NAT_F_ANSWERED == 0 {
                (*entry).flags |= NAT_F_ANSWERED;
            }
        }
    }
    let mut restarted = false;
    if opens && side == Side::Outside {
        // SAFETY: `entry` comes from a map lookup in this program run.
        let (outside, pod) = inbound_seen(unsafe { (*entry).tcp_seen });
        if tcp_closing(outside, pod) {
            restart(entry);
            restarted = true;
        }
    }
    let bits = match side {
        Side::Outside => seen,
        Side::Pod => seen << TCP_SEEN_POD_SHIFT,
    };
    touch(entry, bits);
    restarted
}

/// A SYN on the tuple of a translated flow that is closing (a RST seen, or a FIN both
/// ways) opens a new connection: both halves forget the old one's flags, so the flow
/// lives by the opening and established timeouts again instead of being collected as
/// closing (Cilium's `ct_reset_closing`). The SYN's own flag is merged by the `touch`
/// that follows. Returns whether the flow was closing.
#[inline(always)]
pub fn reopen_if_closing(fwd: &NatKey, entry: *mut NatEntry, addr: [u8; 4], port: u16) -> bool {
    let key = ingress_key(fwd.proto, fwd.dst, addr, reply_sport(fwd), port);
    let back = lookup(&key).filter(|back| points_back(*back, fwd));
    // SAFETY: pointers from lookups in this program run.
    unsafe {
        let back_seen = back.map_or(0, |b| (*b).tcp_seen);
        if !tcp_closing((*entry).tcp_seen, back_seen) {
            return false;
        }
        restart(entry);
        if let Some(back) = back {
            (*back).tcp_seen = 0;
        }
    }
    true
}

/// Clears an entry's TCP flags for a connection that starts over on its tuple.
#[inline(always)]
fn restart(entry: *mut NatEntry) {
    let now = coarse_now_ns();
    // SAFETY: `entry` comes from a map lookup in this program run.
    unsafe {
        (*entry).tcp_seen = 0;
        (*entry).created_ns = now;
        (*entry).last_seen_ns = now;
    }
}

/// 1 when the kernel has `bpf_ktime_get_coarse_ns` (set by the agent, see
/// `vcnpath_common::GLOBAL_COARSE_CLOCK`); 0 falls back to the precise clock.
#[unsafe(no_mangle)]
static VCNPATH_COARSE_CLOCK: u8 = 0;

/// Now, for expiry: the coarse clock (jiffies) is plenty for second-granularity expiry and
/// cheaper; both clocks read `CLOCK_MONOTONIC`, so entries stamped by either compare.
#[inline(always)]
fn coarse_now_ns() -> u64 {
    // verifier: a frozen read-only global; on a kernel without the coarse helper the
    // verifier sees the constant 0 and never checks the call it guards.
    // SAFETY: a plain read of a static; the helpers have no preconditions.
    unsafe {
        if core::ptr::read_volatile(&raw const VCNPATH_COARSE_CLOCK) != 0 {
            bpf_ktime_get_coarse_ns()
        } else {
            bpf_ktime_get_ns()
        }
    }
}

/// Records activity on an entry, writing only when something changed or the timestamp
/// is older than `NAT_TOUCH_INTERVAL_NS`. Returns the time when that interval had passed
/// (about once a second per active flow), for the checks that need not run per packet.
#[inline(always)]
pub fn touch(entry: *mut NatEntry, seen: u8) -> Option<u64> {
    // SAFETY: `entry` comes from a map lookup in this program run.
    unsafe {
        let now = coarse_now_ns();
        let due = now.wrapping_sub((*entry).last_seen_ns) > NAT_TOUCH_INTERVAL_NS;
        let merged = (*entry).tcp_seen | seen;
        if merged != (*entry).tcp_seen {
            (*entry).tcp_seen = merged;
            (*entry).last_seen_ns = now;
        } else if due {
            (*entry).last_seen_ns = now;
        }
        due.then_some(now)
    }
}

/// What became of a translated flow's reply entry.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// It still translates back to the flow.
    Ours,
    /// The LRU had evicted it; it was created again.
    Repaired,
    /// Another flow has claimed the port since: the flow must start over with a port of
    /// its own (its replies would reach the other flow).
    Taken,
}

/// Checks the reply entry of the translated flow `fwd` (masqueraded to `addr:port`),
/// putting it back when the LRU evicted it.
#[inline(always)]
pub fn reply_of(fwd: &NatKey, addr: [u8; 4], port: u16, now: u64) -> Reply {
    let key = ingress_key(fwd.proto, fwd.dst, addr, reply_sport(fwd), port);
    let ours = |back| {
        if points_back(back, fwd) {
            Reply::Ours
        } else {
            Reply::Taken
        }
    };
    if let Some(back) = lookup(&key) {
        return ours(back);
    }
    if NAT
        .insert(key, reply_entry(fwd, now), u64::from(BPF_NOEXIST))
        .is_ok()
    {
        return Reply::Repaired;
    }
    // Another CPU created it meanwhile: then it decides.
    lookup(&key).map_or(Reply::Taken, ours)
}

/// The reply entry of the flow `fwd`: it translates back to the pod's address and port.
#[inline(always)]
fn reply_entry(fwd: &NatKey, now: u64) -> NatEntry {
    NatEntry {
        last_seen_ns: now,
        addr: fwd.src,
        port: fwd.sport,
        flags: 0,
        tcp_seen: 0,
        created_ns: now,
    }
}

/// Whether the reply entry `back` translates back to the flow `fwd`.
#[inline(always)]
fn points_back(back: *mut NatEntry, fwd: &NatKey) -> bool {
    // SAFETY: `back` comes from a map lookup in this program run.
    unsafe { (*back).addr == fwd.src && (*back).port == fwd.sport }
}

/// Removes the egress entry of a flow that must start over.
#[inline(always)]
pub fn forget(fwd: &NatKey) {
    let _ = NAT.remove(fwd);
}

/// The source port of a reply to `fwd`: its destination port, or 0 for ICMP echo (whose
/// replies carry the identifier as the destination "port").
#[inline(always)]
fn reply_sport(fwd: &NatKey) -> u16 {
    if fwd.proto == IPPROTO_ICMP {
        0
    } else {
        fwd.dport
    }
}

/// Creates the mapping for a new flow `fwd` and returns the translated port (host
/// order). The original port is kept when the translated 5-tuple is free (of NAT entries
/// and of host sockets); otherwise
/// ports of the configured range are tried from a random start.
#[inline(always)]
pub fn create(ctx: &TcContext, config: &Config, fwd: &NatKey, seen: u8) -> Step<u16> {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let reply = reply_entry(fwd, now);
    // The reply swaps the addresses and ports; ICMP echo replies carry the id as dport.
    let reply_sport = reply_sport(fwd);
    let claim = |port: u16| {
        if hostsock::in_use(ctx, fwd.proto, fwd.dst, reply_sport, config.masq_ip, port) {
            return false;
        }
        let key = ingress_key(fwd.proto, fwd.dst, config.masq_ip, reply_sport, port);
        NAT.insert(key, reply, u64::from(BPF_NOEXIST)).is_ok()
    };

    // An ingress entry for the original port that already points back at this very
    // flow is a leftover of it (its egress half was evicted): take it over.
    let adopt = |port: u16| {
        let key = ingress_key(fwd.proto, fwd.dst, config.masq_ip, reply_sport, port);
        lookup(&key).is_some_and(|e| points_back(e, fwd))
    };

    let (port, claimed) = if claim(fwd.sport) {
        (fwd.sport, true)
    } else if adopt(fwd.sport) {
        (fwd.sport, false)
    } else {
        (choose_port(config, claim)?, true)
    };

    let entry = NatEntry {
        last_seen_ns: now,
        addr: config.masq_ip,
        port,
        flags: 0,
        tcp_seen: seen,
        created_ns: now,
    };
    if NAT.insert(fwd, entry, u64::from(BPF_NOEXIST)).is_err() {
        // Another CPU created this flow first (or the map refused): use theirs, so the
        // flow keeps one identity, and give back our claim unless it is theirs too — the
        // winner may have adopted the reply entry we claimed for the original port, and
        // removing it would leave the flow without its replies.
        let existing = lookup(fwd);
        // SAFETY: pointer from a lookup in this run.
        let theirs = existing.map(|e| unsafe { ((*e).addr, (*e).port) });
        if claimed && theirs != Some((config.masq_ip, port)) {
            let key = ingress_key(fwd.proto, fwd.dst, config.masq_ip, reply_sport, port);
            let _ = NAT.remove(key);
        }
        return match theirs {
            Some((_, port)) => Ok(port),
            None => Err(Decision::drop(Reason::DropNatFull)),
        };
    }
    Ok(port)
}

#[inline(always)]
fn choose_port(config: &Config, claim: impl Fn(u16) -> bool) -> Step<u16> {
    if config.port_max < config.port_min {
        return Err(Decision::drop(Reason::DropNoPort));
    }
    let span = u32::from(config.port_max - config.port_min) + 1;
    // SAFETY: plain helper call.
    let start = unsafe { bpf_get_prandom_u32() } % span;
    let mut i = 0;
    // verifier: a bounded loop; span may be small, so candidates wrap around.
    while i < NAT_PORT_TRIES {
        let port = config.port_min + ((start + i) % span) as u16;
        if claim(port) {
            return Ok(port);
        }
        i += 1;
    }
    Err(Decision::drop(Reason::DropNoPort))
}
