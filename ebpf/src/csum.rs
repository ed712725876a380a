//! Field rewrites that keep every checksum valid. The kernel helpers are used for the
//! outer headers because they know the skb's checksum state: with `CHECKSUM_PARTIAL`
//! (offload, GSO) only the pseudo-header part of the L4 checksum is adjusted, with
//! `CHECKSUM_COMPLETE` `skb->csum` follows. Quoted headers inside ICMP errors are plain
//! data and are adjusted with the plain (L3) replace.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};

use crate::{
    decision::Step,
    packet::{self, REWRITE_FAILED, store},
    parse::{IP_CSUM_OFF, IPPROTO_ICMP, IPPROTO_UDP, csum_field},
};

/// The size of a rewritten field, in the low bits of the checksum helpers' flags
/// (`BPF_F_HDR_FIELD_MASK`) and as their `size` argument.
const ADDR_FIELD: u64 = 4;
/// See [`ADDR_FIELD`].
const PORT_FIELD: u64 = 2;

#[inline(always)]
fn raw4(addr: [u8; 4]) -> u64 {
    u64::from(u32::from_ne_bytes(addr))
}

#[inline(always)]
fn raw2(port: [u8; 2]) -> u64 {
    u64::from(u16::from_ne_bytes(port))
}

/// L4 checksum flags for `proto`: UDP's zero checksum means "none" and must stay zero.
#[inline(always)]
fn l4_flags(proto: u8) -> u64 {
    if proto == IPPROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    }
}

/// Rewrites the outer IPv4 address at `addr_off` and fixes the IP checksum and, for
/// TCP/UDP, the pseudo-header part of the L4 checksum at `l4_off`.
#[inline(always)]
pub fn set_addr(
    ctx: &TcContext,
    addr_off: usize,
    old: [u8; 4],
    new: [u8; 4],
    proto: u8,
    l4_off: usize,
) -> Step<()> {
    set_ip_addr(ctx, addr_off, old, new)?;
    if proto != IPPROTO_ICMP {
        let flags = u64::from(BPF_F_PSEUDO_HDR) | l4_flags(proto) | ADDR_FIELD;
        ctx.l4_csum_replace(l4_off + csum_field(proto), raw4(old), raw4(new), flags)
            .map_err(|_| REWRITE_FAILED)?;
    }
    Ok(())
}

/// Rewrites the outer IPv4 address at `addr_off` and fixes the IP checksum only: for a
/// fragment after the first, which carries no L4 header (the first fragment's L4
/// checksum, over the whole datagram, was adjusted with it).
#[inline(always)]
pub fn set_ip_addr(ctx: &TcContext, addr_off: usize, old: [u8; 4], new: [u8; 4]) -> Step<()> {
    store(ctx, addr_off, &new)?;
    ip_csum_update(ctx, old, new)
}

/// RFC 1624 incremental update of the IPv4 header checksum for a 4-byte field change,
/// computed here and written directly: the IP header checksum is never offloaded, so no
/// helper (and its call) is needed.
#[inline(always)]
fn ip_csum_update(ctx: &TcContext, old: [u8; 4], new: [u8; 4]) -> Step<()> {
    let Some(current) = packet::load::<[u8; 2]>(ctx, IP_CSUM_OFF) else {
        return Err(REWRITE_FAILED);
    };
    let word = |b: [u8; 4], i: usize| u32::from(u16::from_be_bytes([b[i], b[i + 1]]));
    let mut sum = u32::from(!u16::from_be_bytes(current));
    sum += (0xffff - word(old, 0)) + (0xffff - word(old, 2)) + word(new, 0) + word(new, 2);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let updated = !(sum as u16);
    store(ctx, IP_CSUM_OFF, &updated.to_be_bytes())
}

/// Rewrites a TCP/UDP port or ICMP echo identifier of the outer L4 header.
#[inline(always)]
pub fn set_port(
    ctx: &TcContext,
    port_off: usize,
    old: [u8; 2],
    new: [u8; 2],
    proto: u8,
    l4_off: usize,
) -> Step<()> {
    if old == new {
        return Ok(());
    }
    store(ctx, port_off, &new)?;
    ctx.l4_csum_replace(
        l4_off + csum_field(proto),
        raw2(old),
        raw2(new),
        l4_flags(proto) | PORT_FIELD,
    )
    .map_err(|_| REWRITE_FAILED)
}

/// Plain one's-complement update of the 16-bit checksum at `csum_off` for a 4-byte field
/// change (no skb checksum-state handling: for checksums inside a payload).
#[inline(always)]
pub fn fix4(ctx: &TcContext, csum_off: usize, old: [u8; 4], new: [u8; 4]) -> Step<()> {
    ctx.l3_csum_replace(csum_off, raw4(old), raw4(new), ADDR_FIELD)
        .map_err(|_| REWRITE_FAILED)
}

/// Same as [`fix4`] for a 2-byte field.
#[inline(always)]
pub fn fix2(ctx: &TcContext, csum_off: usize, old: [u8; 2], new: [u8; 2]) -> Step<()> {
    ctx.l3_csum_replace(csum_off, raw2(old), raw2(new), PORT_FIELD)
        .map_err(|_| REWRITE_FAILED)
}
