//! ICMP errors (destination unreachable, including fragmentation-needed, and time
//! exceeded) quote the packet that caused them. When that packet belongs to a
//! translated flow, the error is translated too — outer address, quoted address and
//! port, and every checksum — so PMTU discovery and error reporting work for pods.

use aya_ebpf::programs::TcContext;
use vcnpath_common::{
    Config, Reason,
    wire::{ICMP_CSUM, ICMP_HLEN, IPV4_CSUM, IPV4_DST, IPV4_SRC},
};

use crate::{
    csum,
    decision::{Decision, Step},
    nat, packet,
    parse::{
        self, IP_DST_OFF, IP_SRC_OFF, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Ipv4, Ipv4Hdr, L4Head,
    },
    redirect,
};

/// The packet quoted after the ICMP header.
struct Quoted {
    ip_off: usize,
    l4_off: usize,
    proto: u8,
    src: [u8; 4],
    dst: [u8; 4],
    /// Source port, or the echo identifier for a quoted ICMP echo (host order).
    sport: u16,
    /// Destination port (0 for ICMP).
    dport: u16,
}

#[inline(always)]
fn quoted(ctx: &TcContext, outer: &Ipv4) -> Option<Quoted> {
    let ip_off = outer.l4_off + ICMP_HLEN;
    if ip_off + core::mem::size_of::<Ipv4Hdr>() > outer.end {
        return None;
    }
    let hdr = packet::load::<Ipv4Hdr>(ctx, ip_off)?;
    if !hdr.ihl_valid() {
        return None;
    }
    let l4_off = ip_off + hdr.len();
    if l4_off + core::mem::size_of::<L4Head>() > outer.end {
        return None;
    }
    // RFC 792 guarantees 8 bytes of the quoted L4 header: enough for ports and ids.
    let head = packet::load::<L4Head>(ctx, l4_off)?;
    let (sport, dport) = match hdr.proto {
        IPPROTO_TCP | IPPROTO_UDP => (
            u16::from_be_bytes(head.port_or_id(hdr.proto)),
            u16::from_be_bytes(head.dport()),
        ),
        IPPROTO_ICMP if parse::is_icmp_echo(head.icmp_type()) => {
            (u16::from_be_bytes(head.port_or_id(hdr.proto)), 0)
        }
        _ => return None,
    };
    Some(Quoted {
        ip_off,
        l4_off,
        proto: hdr.proto,
        src: hdr.src,
        dst: hdr.dst,
        sport,
        dport,
    })
}

/// An error addressed to the masquerade address about a packet we translated: send it
/// to the pod, quoting the packet as the pod sent it.
#[inline(always)]
pub fn ingress_error(ctx: &TcContext, config: &Config, ip: &Ipv4) -> Step<Decision> {
    let Some(q) = quoted(ctx, ip) else {
        return Ok(Decision::pass(Reason::PassMalformed));
    };
    if q.src != config.masq_ip {
        return Ok(Decision::pass(Reason::PassHost));
    }
    // The reply direction of the quoted packet is what the ingress entry is keyed by.
    let key = if q.proto == IPPROTO_ICMP {
        nat::ingress_key(q.proto, q.dst, q.src, 0, q.sport)
    } else {
        nat::ingress_key(q.proto, q.dst, q.src, q.dport, q.sport)
    };
    let Some(entry) = nat::lookup(&key).filter(|e| !e.is_host()) else {
        return Ok(Decision::pass(Reason::PassHost));
    };
    let (pod_addr, pod_port) = (entry.addr(), entry.port());
    rewrite(
        ctx,
        ip,
        &q,
        Side::Source,
        IP_DST_OFF,
        ip.dst,
        pod_addr,
        q.sport,
        pod_port,
    )?;
    Ok(Decision::pass(Reason::IcmpErrorReverse))
}

/// An error sent by a pod about a packet that reached it through reverse translation:
/// send it from the masquerade address, quoting the packet as the remote sent it.
#[inline(always)]
pub fn egress_error(ctx: &TcContext, config: &Config, ip: &Ipv4, owner: u32) -> Step<Decision> {
    let Some(q) = quoted(ctx, ip) else {
        return Ok(Decision::drop(Reason::DropMalformed));
    };
    // The pod's own packets of the quoted flow carry this egress key.
    let (pod_port, remote_port) = if q.proto == IPPROTO_ICMP {
        (q.sport, 0)
    } else {
        (q.dport, q.sport)
    };
    let key = nat::egress_key(q.proto, q.dst, q.src, pod_port, remote_port);
    let translated = nat::lookup(&key).map(|e| (e.is_inbound(), e.port()));
    match translated {
        Some((false, nat_port)) => {
            rewrite(
                ctx,
                ip,
                &q,
                Side::Destination,
                IP_SRC_OFF,
                ip.src,
                config.masq_ip,
                pod_port,
                nat_port,
            )?;
            redirect::via_masquerade(ctx, config, ip.dst, Reason::IcmpErrorSnat)
        }
        // About a flow opened from outside (or unknown): answered from the pod address.
        _ => redirect::via_owner(ctx, owner, ip.dst, Reason::PassInbound),
    }
}

/// Which address/port of the quoted packet is rewritten.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "one rewrite, every field it touches"
)]
fn rewrite(
    ctx: &TcContext,
    ip: &Ipv4,
    q: &Quoted,
    side: Side,
    outer_addr_off: usize,
    old_addr: [u8; 4],
    new_addr: [u8; 4],
    old_port: u16,
    new_port: u16,
) -> Step<()> {
    let icmp_csum = ip.l4_off + ICMP_CSUM;
    let (old_port, new_port) = (old_port.to_be_bytes(), new_port.to_be_bytes());

    // Outer address: only the IP checksum covers it (ICMP has no pseudo-header).
    csum::set_addr(
        ctx,
        outer_addr_off,
        old_addr,
        new_addr,
        IPPROTO_ICMP,
        ip.l4_off,
    )?;

    // Quoted address and quoted IP checksum change together, so their sum — and with it
    // the ICMP checksum — is unchanged.
    let inner_addr_off = q.ip_off
        + if side == Side::Source {
            IPV4_SRC
        } else {
            IPV4_DST
        };
    packet::store(ctx, inner_addr_off, &new_addr)?;
    csum::fix4(ctx, q.ip_off + IPV4_CSUM, old_addr, new_addr)?;

    // Quoted L4 checksum, when the quote is long enough to contain it (TCP's may not be).
    let inner_csum = q.l4_off + parse::csum_field(q.proto);
    if let Some(old_csum) = packet::load::<[u8; 2]>(ctx, inner_csum)
        && !(q.proto == IPPROTO_UDP && old_csum == [0, 0])
    {
        if q.proto != IPPROTO_ICMP {
            csum::fix4(ctx, inner_csum, old_addr, new_addr)?;
        }
        csum::fix2(ctx, inner_csum, old_port, new_port)?;
        let Some(new_csum) = packet::load::<[u8; 2]>(ctx, inner_csum) else {
            return Err(Decision::drop(Reason::DropRewrite));
        };
        csum::fix2(ctx, icmp_csum, old_csum, new_csum)?;
    }

    // Quoted port (or echo identifier).
    let inner_port_off = q.l4_off + parse::port_field(q.proto, side == Side::Source);
    packet::store(ctx, inner_port_off, &new_port)?;
    csum::fix2(ctx, icmp_csum, old_port, new_port)
}
