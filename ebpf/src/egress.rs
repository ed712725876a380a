//! Egress on a VNIC: for packets from pod addresses, keep VCN traffic on the owning VNIC
//! (rule 1) and masquerade everything leaving the VCN (rule 2). The host's own packets
//! pass untouched (rule 5).

use aya_ebpf::programs::TcContext;
use vcnpath_common::{
    ENDPOINT_KIND_POD, FRAG_F_INBOUND, NAT_DIR_EGRESS, NatKey, Reason, inbound_port_bit,
};

use crate::{
    csum,
    decision::{Decision, Step},
    frag, hostflow, icmp, maps, nat,
    nat::{NatSlot, Reply, Side},
    packet,
    parse::{
        self, Header, IP_SRC_OFF, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Ipv4, L4Head, Malformed,
    },
    redirect,
};

/// `again`: the packet was redirected here by this program on another VNIC, so it is a
/// pod's packet in its final form (translated ones carry the masquerade address, and
/// must not be taken for the host's own).
#[inline(always)]
pub fn run(ctx: &TcContext, again: bool) -> Step<Decision> {
    let Some(config) = maps::config() else {
        return Ok(Decision::pass(Reason::PassUnconfigured));
    };
    let hdr = parse::ipv4(ctx)?;
    let Some(owner) = maps::endpoint(hdr.src).filter(|o| o.kind == ENDPOINT_KIND_POD) else {
        if hdr.src == config.masq_ip && !again {
            return Ok(hostflow::egress(ctx, &config, &hdr));
        }
        return Ok(parse::pass_untouched(ctx, &hdr, Reason::PassNotEndpoint));
    };
    // The L4 fields are read from the frame here and judged against the total length
    // only on the paths that rewrite the packet (`sound`): traffic inside the VCN, which
    // is never translated, does not pay for that.
    let l4 = if hdr.later_fragment {
        L4::Fragment
    } else {
        classify(ctx, &hdr)
    };

    // Fast path: a packet of a flow already in the NAT table skips the CIDR lookups.
    // Egress entries only exist for destinations classified as outside the VCN (the
    // agent purges them when the CIDRs change) or, written by earlier releases, for flows
    // opened from outside.
    if let L4::Flow {
        key,
        sport,
        seen,
        opens,
        ..
    } = &l4
        && let Some(mut entry) = nat::lookup(key)
    {
        // A malformed packet neither rides nor changes the flow its ports name.
        let Some(ip) = hdr.bounded(ctx) else {
            return Ok(Decision::drop(Reason::DropBadLength));
        };
        sound(&ip, &l4)?;
        let (addr, port) = (entry.addr(), entry.port());
        if entry.is_inbound() {
            // A record an earlier release kept in `nat`: honoured until it expires.
            return answer_inbound(ctx, &ip, &mut entry, (*seen, *opens), owner.ifindex);
        }
        // A new connection on the tuple of a closed one starts with a clean state.
        let reopened = *opens && nat::reopen_if_closing(key, &mut entry, addr, port);
        let due = entry.touch(*seen);
        // About once a second, not per packet: the flow's reply entry must still be its
        // own (a full table's LRU may have evicted it and another flow taken the port).
        let reply = due.map_or(Reply::Ours, |now| nat::reply_of(key, addr, port, now));
        if reply != Reply::Taken {
            let reason = match (reopened, reply) {
                (true, _) => Reason::SnatReopened,
                (false, Reply::Repaired) => Reason::SnatRepaired,
                (false, _) => Reason::SnatEstablished,
            };
            // The entry's own address is used (not the current config) so a flow keeps
            // the identity its ingress entry was keyed by.
            translate(ctx, &ip, addr, *sport, port)?;
            frag::note_first(ctx, &ip, NAT_DIR_EGRESS, addr, 0);
            return redirect::via_masquerade(ctx, &config, ip.dst, reason);
        }
        nat::forget(key);
    }

    if maps::is_nonmasq(hdr.dst) {
        // Never translated: only the length is judged (a pod packet whose length lies is
        // dropped on every path); the L4 header of a packet that stays inside the VCN is
        // not read, and a redirect rewrites only the Ethernet header.
        if hdr.bounded(ctx).is_none() {
            return Ok(Decision::drop(Reason::DropBadLength));
        }
        return redirect::via_owner(ctx, owner.ifindex, hdr.dst, Reason::PassVcn);
    }
    let Some(ip) = hdr.bounded(ctx) else {
        // Whether it needs translation cannot be told from headers that lie.
        return Ok(Decision::drop(Reason::DropBadLength));
    };
    sound(&ip, &l4)?;
    let (key, sport, seen, opens) = match l4 {
        L4::Flow {
            key,
            sport,
            seen,
            opens,
            ..
        } => (key, sport, seen, opens),
        // Without the L4 header the flow is found by the datagram's first fragment;
        // without that, passing would leak the pod address outside the VCN.
        L4::Fragment => return frag::egress_later(ctx, &config, &ip, owner.ifindex),
        L4::Malformed(bad) => return Ok(bad.drop()),
        L4::Unsupported => return Ok(Decision::drop(Reason::DropProtocol)),
        L4::IcmpError => return icmp::egress_error(ctx, &config, &ip, owner.ifindex),
    };
    // Looked up only for a flow not in `nat`: records exist only for sources outside the
    // VCN, so traffic that stays inside it never pays for this lookup. Nor does a TCP SYN:
    // it opens a connection of the pod's own and cannot answer one opened from outside.
    // Nor does a flow from a port whose class no host outside the VCN has reached on the
    // pod: ingress marks the class before the first packet of such a flow reaches the pod
    // (`Endpoint::inbound_ports`).
    if !opens
        && owner.inbound_ports & inbound_port_bit(key.sport) != 0
        && let Some(mut record) = nat::inbound(&key)
    {
        return answer_inbound(ctx, &ip, &mut record, (seen, opens), owner.ifindex);
    }
    let (addr, port, reason) = (
        config.masq_ip,
        nat::create(ctx, &config, &key, seen)?,
        Reason::SnatNew,
    );
    translate(ctx, &ip, addr, sport, port)?;
    frag::note_first(ctx, &ip, NAT_DIR_EGRESS, addr, 0);
    redirect::via_masquerade(ctx, &config, ip.dst, reason)
}

/// A pod's packet on a flow opened from outside towards it (rule 4): it leaves
/// untranslated through the pod's VNIC, as do the fragments after it.
#[inline(always)]
fn answer_inbound(
    ctx: &TcContext,
    ip: &Ipv4,
    record: &mut NatSlot,
    (seen, opens): (u8, bool),
    owner: u32,
) -> Step<Decision> {
    let _ = nat::touch_inbound(record, seen, opens, Side::Pod);
    frag::note_first(ctx, ip, NAT_DIR_EGRESS, ip.src, FRAG_F_INBOUND);
    redirect::via_owner(ctx, owner, ip.dst, Reason::PassInbound)
}

/// What the L4 header says about a pod packet, read from the frame before the packet is
/// judged: only [`sound`] makes these fields safe to act on.
enum L4 {
    /// A TCP, UDP or ICMP echo flow: its NAT key, source port (or id), TCP flags seen,
    /// whether it is a TCP SYN opening a connection, and the TCP data offset in bytes
    /// (0 for the others).
    Flow {
        key: NatKey,
        sport: u16,
        seen: u8,
        opens: bool,
        tcp_doff: usize,
    },
    /// An ICMP error, translated according to the packet it quotes.
    IcmpError,
    /// A fragment other than the first (no L4 header).
    Fragment,
    /// The L4 header is not in the frame.
    Malformed(Malformed),
    /// A protocol that cannot be masqueraded.
    Unsupported,
}

#[inline(always)]
fn classify(ctx: &TcContext, hdr: &Header) -> L4 {
    let Some(l4) = packet::load::<L4Head>(ctx, hdr.l4_off) else {
        return L4::Malformed(Malformed::Truncated);
    };
    let (seen, opens, tcp_doff) = match hdr.proto {
        IPPROTO_TCP => match parse::tcp_head(ctx, hdr.l4_off) {
            Some(tcp) => (nat::tcp_seen(tcp.flags), nat::opens(tcp.flags), tcp.doff),
            None => return L4::Malformed(Malformed::Truncated),
        },
        IPPROTO_UDP => (0, false, 0),
        IPPROTO_ICMP if parse::is_icmp_echo(l4.icmp_type()) => (0, false, 0),
        IPPROTO_ICMP if parse::is_icmp_error(l4.icmp_type()) => return L4::IcmpError,
        _ => return L4::Unsupported,
    };
    let sport = u16::from_be_bytes(l4.port_or_id(hdr.proto));
    let dport = if hdr.proto == IPPROTO_ICMP {
        0
    } else {
        u16::from_be_bytes(l4.dport())
    };
    L4::Flow {
        key: nat::egress_key(hdr.proto, hdr.src, hdr.dst, sport, dport),
        sport,
        seen,
        opens,
        tcp_doff,
    }
}

/// Rule 6 for a pod packet about to be translated or to change NAT state, once its
/// total length is known to agree with the frame ([`Header::bounded`]): the L4 header it
/// was classified by must lie inside the total length. Otherwise it is dropped, counted
/// by its class, and never rewritten.
///
/// verifier: takes the packet rather than returning it: an `Ipv4` moved through a
/// `Result` is stored with its L4 offset narrowed to a byte and reloaded as a word, which
/// reaches the verifier unbounded.
#[inline(always)]
fn sound(ip: &Ipv4, l4: &L4) -> Step<()> {
    let sound = match *l4 {
        L4::Flow { tcp_doff, .. } if ip.proto == IPPROTO_TCP => {
            parse::head_within(ip).and_then(|()| parse::tcp_within(ip, tcp_doff))
        }
        L4::Flow { .. } | L4::IcmpError | L4::Unsupported => parse::head_within(ip),
        L4::Malformed(bad) => Err(bad),
        L4::Fragment => Ok(()),
    };
    sound.map_err(Malformed::drop)
}

/// Source-NATs the packet to `new_addr` and `new_port`.
#[inline(always)]
fn translate(
    ctx: &TcContext,
    ip: &Ipv4,
    new_addr: [u8; 4],
    old_port: u16,
    new_port: u16,
) -> Step<()> {
    csum::set_port(
        ctx,
        ip.l4_off + parse::port_field(ip.proto, true),
        old_port.to_be_bytes(),
        new_port.to_be_bytes(),
        ip.proto,
        ip.l4_off,
    )?;
    csum::set_addr(ctx, IP_SRC_OFF, ip.src, new_addr, ip.proto, ip.l4_off)
}
