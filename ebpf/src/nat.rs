//! NAT entries: lookup, refresh and creation with collision-free port choice.
//!
//! A translated flow has two entries in `nat`: the egress entry keyed by the pod's
//! packet (pod → remote) holding the masquerade address and port, and the ingress entry
//! keyed by the reply (remote → masquerade address) holding the pod's address and port.
//! The ingress entry is claimed first with `BPF_NOEXIST`, so two flows can never share
//! one translated 5-tuple, even when two CPUs race.

use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use vcnpath_common::{
    Config, NAT_DIR_EGRESS, NAT_DIR_INGRESS, NAT_F_ANSWERED, NAT_F_HOST, NAT_F_INBOUND,
    NAT_PORT_TRIES, NAT_TOUCH_INTERVAL_NS, NatEntry, NatKey, Reason, TCP_SEEN_ACK, TCP_SEEN_FIN,
    TCP_SEEN_POD_SHIFT, TCP_SEEN_RST, TCP_SEEN_SYN, inbound_seen, tcp_closing,
    wire::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

use aya_ebpf::programs::TcContext;

use crate::{
    decision::{Decision, Step},
    helpers::{self, MapValue, coarse_now_ns},
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

/// An entry of `nat` or `inbound`, found by a lookup in this program run: what the
/// programs read of it and the updates they make, without touching the pointer.
pub struct NatSlot(MapValue<NatEntry>);

impl NatSlot {
    /// `NAT_F_*` bits.
    #[inline(always)]
    pub fn flags(&self) -> u8 {
        self.0.get().flags
    }

    /// Whether it is a record of a flow opened from outside (`NAT_F_INBOUND`).
    #[inline(always)]
    pub fn is_inbound(&self) -> bool {
        self.flags() & NAT_F_INBOUND != 0
    }

    /// Whether it is a record of the host's own flow (`NAT_F_HOST`): not translated.
    #[inline(always)]
    pub fn is_host(&self) -> bool {
        self.flags() & NAT_F_HOST != 0
    }

    /// The address translated to (masquerade address, or the pod's for a reply entry).
    #[inline(always)]
    pub fn addr(&self) -> [u8; 4] {
        self.0.get().addr
    }

    /// The port translated to (host order).
    #[inline(always)]
    pub fn port(&self) -> u16 {
        self.0.get().port
    }

    /// The `TCP_SEEN_*` bits recorded.
    #[inline(always)]
    fn tcp_seen(&self) -> u8 {
        self.0.get().tcp_seen
    }

    /// Marks the record as answered by the pod, writing only when it was not yet.
    #[inline(always)]
    fn mark_answered(&mut self) {
        if self.flags() & NAT_F_ANSWERED == 0 {
            self.0.get_mut().flags |= NAT_F_ANSWERED;
        }
    }

    /// Forgets the TCP flags seen (the other half of a flow that starts over).
    #[inline(always)]
    fn clear_tcp_seen(&mut self) {
        self.0.get_mut().tcp_seen = 0;
    }

    /// Clears the TCP flags for a connection that starts over on the tuple.
    #[inline(always)]
    fn restart(&mut self) {
        let now = coarse_now_ns();
        let entry = self.0.get_mut();
        entry.tcp_seen = 0;
        entry.last_seen_ns = now;
    }

    /// Records activity, writing only when something changed or the timestamp is older
    /// than `NAT_TOUCH_INTERVAL_NS`. Returns the time when that interval had passed
    /// (about once a second per active flow), for the checks that need not run per packet.
    #[inline(always)]
    pub fn touch(&mut self, seen: u8) -> Option<u64> {
        let now = coarse_now_ns();
        let entry = self.0.get_mut();
        let due = now.wrapping_sub(entry.last_seen_ns) > NAT_TOUCH_INTERVAL_NS;
        let merged = entry.tcp_seen | seen;
        if merged != entry.tcp_seen {
            entry.tcp_seen = merged;
            entry.last_seen_ns = now;
        } else if due {
            entry.last_seen_ns = now;
        }
        due.then_some(now)
    }

    /// Whether this reply entry translates back to the flow `fwd`.
    #[inline(always)]
    fn points_back(&self, fwd: &NatKey) -> bool {
        self.addr() == fwd.src && self.port() == fwd.sport
    }
}

/// The entry of `key` in `nat`.
#[inline(always)]
pub fn lookup(key: &NatKey) -> Option<NatSlot> {
    helpers::lru_value(&NAT, key).map(NatSlot)
}

/// The `TCP_SEEN_*` bits for a TCP flags byte (0 for other protocols).
#[inline(always)]
pub fn tcp_seen(tcp_flags: u8) -> u8 {
    let mut seen = 0;
    if tcp_flags & TCP_SYN != 0 {
        seen |= TCP_SEEN_SYN;
    } else {
        seen |= TCP_SEEN_ACK;
    }
    if tcp_flags & TCP_FIN != 0 {
        seen |= TCP_SEEN_FIN;
    }
    if tcp_flags & TCP_RST != 0 {
        seen |= TCP_SEEN_RST;
    }
    seen
}

/// Whether a TCP flags byte opens a connection: SYN without ACK (nor FIN or RST).
#[inline(always)]
pub fn opens(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_SYN | TCP_ACK | TCP_FIN | TCP_RST) == TCP_SYN
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
pub fn inbound(key: &NatKey) -> Option<NatSlot> {
    helpers::lru_value(&INBOUND, key).map(NatSlot)
}

/// Records activity on an inbound record, each end's TCP flags apart (see
/// `TCP_SEEN_POD_SHIFT`) so a half-close is not taken for a close, and whether the pod
/// answered (`NAT_F_ANSWERED`). A SYN from outside on a closing record starts the flow
/// over, as on a translated flow; returns whether it did.
#[inline(always)]
pub fn touch_inbound(entry: &mut NatSlot, seen: u8, opens: bool, side: Side) -> bool {
    if side == Side::Pod {
        entry.mark_answered();
    }
    let mut restarted = false;
    if opens && side == Side::Outside {
        let (outside, pod) = inbound_seen(entry.tcp_seen());
        if tcp_closing(outside, pod) {
            entry.restart();
            restarted = true;
        }
    }
    let bits = match side {
        Side::Outside => seen,
        Side::Pod => seen << TCP_SEEN_POD_SHIFT,
    };
    entry.touch(bits);
    restarted
}

/// A SYN on the tuple of a translated flow that is closing (a RST seen, or a FIN both
/// ways) opens a new connection: both halves forget the old one's flags, so the flow
/// lives by the opening and established timeouts again instead of being collected as
/// closing (Cilium's `ct_reset_closing`). The SYN's own flag is merged by the `touch`
/// that follows. Returns whether the flow was closing.
#[inline(always)]
pub fn reopen_if_closing(fwd: &NatKey, entry: &mut NatSlot, addr: [u8; 4], port: u16) -> bool {
    let key = ingress_key(fwd.proto, fwd.dst, addr, reply_sport(fwd), port);
    let mut back = lookup(&key).filter(|back| back.points_back(fwd));
    let back_seen = back.as_ref().map_or(0, NatSlot::tcp_seen);
    if !tcp_closing(entry.tcp_seen(), back_seen) {
        return false;
    }
    entry.restart();
    if let Some(back) = &mut back {
        back.clear_tcp_seen();
    }
    true
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
    let ours = |back: NatSlot| {
        if back.points_back(fwd) {
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
    }
}

/// Records the host's packet whose reply key is `reply` (see `hostflow`), with the TCP
/// flags it carries. A pod flow holding the tuple gives it up: the host's socket cannot
/// be moved, the pod's flow can (its egress entry goes, so its next packet starts it over
/// on a port of its own). Returns the reason to count.
#[inline(always)]
pub fn claim_for_host(reply: &NatKey, seen: u8) -> Reason {
    let host_seen = seen << TCP_SEEN_POD_SHIFT;
    if let Some(mut entry) = lookup(reply) {
        if entry.is_host() {
            entry.touch(host_seen);
            return Reason::PassHostFlow;
        }
        if !entry.is_inbound() {
            // The reply entry of a pod's flow: its egress key names the pod and the remote.
            forget(&egress_key(
                reply.proto,
                entry.addr(),
                reply.src,
                entry.port(),
                reply.sport,
            ));
        }
        let _ = NAT.insert(reply, host_entry(reply, host_seen), u64::from(BPF_ANY));
        return Reason::HostFlowCollision;
    }
    // A failure only means another CPU recorded it (or a pod flow claimed it) first.
    let _ = NAT.insert(reply, host_entry(reply, host_seen), u64::from(BPF_NOEXIST));
    Reason::PassHostFlow
}

/// The record of the host's flow with the reply key `reply`: "translated" to itself.
#[inline(always)]
fn host_entry(reply: &NatKey, tcp_seen: u8) -> NatEntry {
    let now = coarse_now_ns();
    NatEntry {
        last_seen_ns: now,
        addr: reply.dst,
        port: reply.dport,
        flags: NAT_F_HOST,
        tcp_seen,
    }
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
/// order). The original port is kept when it lies in the NAT range and the translated
/// 5-tuple is free (of NAT entries, host flows and host sockets); otherwise ports of the
/// range are tried from a random start. A port outside the range is never kept: the host
/// owns those (its ephemeral ports among them), and could take the tuple after us.
#[inline(always)]
pub fn create(ctx: &TcContext, config: &Config, fwd: &NatKey, seen: u8) -> Step<u16> {
    let now = helpers::now_ns();
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
        lookup(&key).is_some_and(|e| e.points_back(fwd))
    };

    let own = in_range(config, fwd.sport);
    let (port, claimed) = if own && claim(fwd.sport) {
        (fwd.sport, true)
    } else if own && adopt(fwd.sport) {
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
    };
    if NAT.insert(fwd, entry, u64::from(BPF_NOEXIST)).is_err() {
        // Another CPU created this flow first (or the map refused): use theirs, so the
        // flow keeps one identity, and give back our claim unless it is theirs too — the
        // winner may have adopted the reply entry we claimed for the original port, and
        // removing it would leave the flow without its replies.
        let theirs = lookup(fwd).map(|e| (e.addr(), e.port()));
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

/// Whether `port` (or ICMP echo identifier) is one the NAT hands out.
#[inline(always)]
pub fn in_range(config: &Config, port: u16) -> bool {
    config.port_min <= port && port <= config.port_max
}

#[inline(always)]
fn choose_port(config: &Config, claim: impl Fn(u16) -> bool) -> Step<u16> {
    if config.port_max < config.port_min {
        return Err(Decision::drop(Reason::DropNoPort));
    }
    let span = u32::from(config.port_max - config.port_min) + 1;
    let start = helpers::prandom_u32() % span;
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
