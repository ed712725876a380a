//! The Ethernet, IPv4 and L4 header fields the programs use, and what makes a packet
//! sound enough to act on. The bytes are read through `packet`.

use aya_ebpf::programs::TcContext;
use vcnpath_common::{
    Reason,
    wire::{
        ETH_P_IP, ETH_TYPE, ICMP_CSUM, ICMP_ID, ICMP_TYPE, IPV4_CSUM, IPV4_DST, IPV4_ID,
        IPV4_IHL_MASK, IPV4_MIN_IHL, IPV4_OFFSET_MASK, IPV4_SRC, IPV4_TOT_LEN, IPV4_VERSION,
        L4_DPORT, L4_SPORT, TCP_CSUM, TCP_DOFF, TCP_HLEN, UDP_CSUM,
    },
};

use crate::{
    decision::{Decision, Step},
    packet::{self, load},
};

pub use vcnpath_common::wire::{
    ETH_HLEN, ICMP_DEST_UNREACH, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMP_TIME_EXCEEDED,
    IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
};

/// Offset in the frame of the IPv4 header checksum.
pub const IP_CSUM_OFF: usize = ETH_HLEN + IPV4_CSUM;
/// Offset in the frame of the IPv4 total length.
const IP_TOT_LEN_OFF: usize = ETH_HLEN + IPV4_TOT_LEN;
/// Offset in the frame of the IPv4 identification, flags and fragment offset.
pub const IP_ID_OFF: usize = ETH_HLEN + IPV4_ID;
/// Offset in the frame of the IPv4 source address.
pub const IP_SRC_OFF: usize = ETH_HLEN + IPV4_SRC;
/// Offset in the frame of the IPv4 destination address.
pub const IP_DST_OFF: usize = ETH_HLEN + IPV4_DST;
/// Offset in the frame of the ethertype.
const ETH_TYPE_OFF: usize = ETH_TYPE;

/// Bytes in the 32-bit words the IPv4 header length and the TCP data offset count in.
const WORD: usize = 4;

/// The IPv4 header without options. `align(4)` makes the compiler read addresses as
/// words (see `read`).
#[repr(C, align(4))]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub csum: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

// The struct and the named offsets describe one layout.
const _: () = {
    assert!(core::mem::offset_of!(Ipv4Hdr, tot_len) == IPV4_TOT_LEN);
    assert!(core::mem::offset_of!(Ipv4Hdr, id) == IPV4_ID);
    assert!(core::mem::offset_of!(Ipv4Hdr, csum) == IPV4_CSUM);
    assert!(core::mem::offset_of!(Ipv4Hdr, src) == IPV4_SRC);
    assert!(core::mem::offset_of!(Ipv4Hdr, dst) == IPV4_DST);
};

impl Ipv4Hdr {
    /// The IP version (the high nibble of the first byte).
    #[inline(always)]
    pub const fn version(&self) -> u8 {
        self.version_ihl >> 4
    }

    /// The header length in 32-bit words (IHL), options included.
    #[inline(always)]
    pub const fn ihl(&self) -> usize {
        (self.version_ihl & IPV4_IHL_MASK) as usize
    }

    /// Whether the IHL covers at least the fixed header.
    #[inline(always)]
    pub const fn ihl_valid(&self) -> bool {
        self.ihl() >= IPV4_MIN_IHL
    }

    /// The header length in bytes, options included.
    #[inline(always)]
    pub const fn len(&self) -> usize {
        self.ihl() * WORD
    }
}

/// The fixed IPv4 header as found: enough to decide whether a packet is vcnpath's to act
/// on (its addresses, protocol, fragment offset). Its total length is not judged yet:
/// nothing is rewritten or recorded until [`Header::bounded`] has made it an [`Ipv4`],
/// which happens after the lookups that tell what the packet is, on the path it takes.
#[derive(Clone, Copy)]
pub struct Header {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub proto: u8,
    /// Offset of the L4 header (from the IHL, so options are honoured).
    pub l4_off: usize,
    /// A fragment other than the first: carries no L4 header.
    pub later_fragment: bool,
}

/// An IPv4 packet whose total length agrees with its frame: the only kind whose L4
/// header is read or whose bytes are rewritten.
#[derive(Clone, Copy)]
pub struct Ipv4 {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub proto: u8,
    /// Offset of the L4 header (from the IHL, so options are honoured).
    pub l4_off: usize,
    /// A fragment other than the first: carries no L4 header.
    pub later_fragment: bool,
    /// End of the IP packet in the frame (from the total length): anything after it is
    /// link-layer padding, and no header may reach past it.
    pub end: usize,
}

impl Header {
    /// The packet with its total length checked against the frame, or `None` when they
    /// disagree (longer than the frame, or shorter than the header with its options): no
    /// header past the IP header can be trusted then, and nothing is rewritten.
    ///
    /// The total length is read again here rather than carried from [`ipv4`]: a value
    /// kept alive across the map lookups that decide whether a packet is ours takes one
    /// of BPF's few callee-saved registers or a stack slot, on every packet.
    #[inline(always)]
    pub fn bounded(self, ctx: &TcContext) -> Option<Ipv4> {
        let tot_len = load::<[u8; 2]>(ctx, IP_TOT_LEN_OFF)?;
        let frame_ip_len = packet::len(ctx).saturating_sub(ETH_HLEN);
        let mut tot_len = usize::from(u16::from_be_bytes(tot_len));
        if tot_len == 0 && frame_ip_len > usize::from(u16::MAX) {
            // BIG TCP: a GSO packet over 64 KiB carries total length 0 and the skb's
            // length stands for it (the kernel's `skb_ip_totlen`).
            tot_len = frame_ip_len;
        }
        if tot_len > frame_ip_len || ETH_HLEN + tot_len < self.l4_off {
            return None;
        }
        Some(Ipv4 {
            src: self.src,
            dst: self.dst,
            proto: self.proto,
            l4_off: self.l4_off,
            later_fragment: self.later_fragment,
            end: ETH_HLEN + tot_len,
        })
    }
}

/// The decision for a packet vcnpath passes on its addresses alone, untouched: counted as
/// `reason`, or as [`Reason::PassBadLength`] when its total length disagrees with the
/// frame. Judged in the branch that passes it, so the paths that rewrite do not carry it.
#[inline(always)]
pub fn pass_untouched(ctx: &TcContext, hdr: &Header, reason: Reason) -> Decision {
    if hdr.bounded(ctx).is_none() {
        return Decision::pass(Reason::PassBadLength);
    }
    Decision::pass(reason)
}

/// Why the L4 header of a packet cannot be used. Such a packet is never rewritten: a pod
/// packet that would need translation is dropped (passing it would leak the pod address
/// past the VCN), anything else passes unmodified, each counted by its class.
#[derive(Clone, Copy)]
pub enum Malformed {
    /// The L4 header does not fit in the frame or in the IP total length.
    Truncated,
    /// TCP data offset below 5 words (inside the fixed header) or beyond the total length.
    TcpOffset,
}

impl Malformed {
    /// The decision for a pod packet that would need translation.
    #[inline(always)]
    pub const fn drop(self) -> Decision {
        Decision::drop(match self {
            Malformed::Truncated => Reason::DropMalformed,
            Malformed::TcpOffset => Reason::DropBadTcpOffset,
        })
    }

    /// The decision for any other packet.
    #[inline(always)]
    pub const fn pass(self) -> Decision {
        Decision::pass(match self {
            Malformed::Truncated => Reason::PassMalformed,
            Malformed::TcpOffset => Reason::PassBadTcpOffset,
        })
    }
}

/// Parses Ethernet + IPv4. Non-IPv4 frames and truncated or invalid IPv4 headers end
/// the program with a pass: they are not ours to judge and are never rewritten. The total
/// length is judged later, by [`Header::bounded`], and only for packets that need it.
///
/// An 802.1Q-tagged frame counts as not IPv4 here, whether the tag is in the header
/// (ethertype 0x8100) or, offloaded, in the skb: on a bare-metal node's physical NIC it
/// carries a secondary VNIC, whose VLAN interface on top runs its own programs. Judged
/// here too, a pod's packet would be redirected back to that interface, in a loop.
#[inline(always)]
pub fn ipv4(ctx: &TcContext) -> Step<Header> {
    if packet::vlan_tagged(ctx) {
        return Err(Decision::pass(Reason::PassNotIpv4));
    }
    let Some(ethertype) = load::<[u8; 2]>(ctx, ETH_TYPE_OFF) else {
        return Err(Decision::pass(Reason::PassMalformed));
    };
    if u16::from_be_bytes(ethertype) != ETH_P_IP {
        return Err(Decision::pass(Reason::PassNotIpv4));
    }
    let Some(ip) = load::<Ipv4Hdr>(ctx, ETH_HLEN) else {
        return Err(Decision::pass(Reason::PassMalformed));
    };
    if ip.version() != IPV4_VERSION || !ip.ihl_valid() {
        return Err(Decision::pass(Reason::PassMalformed));
    }
    let frag_off = u16::from_be_bytes(ip.frag_off) & IPV4_OFFSET_MASK;
    Ok(Header {
        src: ip.src,
        dst: ip.dst,
        proto: ip.proto,
        l4_off: ETH_HLEN + ip.len(),
        later_fragment: frag_off != 0,
    })
}

/// The first 8 bytes of the L4 header, when they lie inside the IP total length.
#[inline(always)]
pub fn l4_head(ctx: &TcContext, ip: &Ipv4) -> Result<L4Head, Malformed> {
    head_within(ip)?;
    load::<L4Head>(ctx, ip.l4_off).ok_or(Malformed::Truncated)
}

/// Whether the first 8 bytes of the L4 header lie inside the IP total length.
#[inline(always)]
pub fn head_within(ip: &Ipv4) -> Result<(), Malformed> {
    if ip.l4_off + core::mem::size_of::<L4Head>() > ip.end {
        return Err(Malformed::Truncated);
    }
    Ok(())
}

/// The TCP flags byte of the header at `ip.l4_off`, when the 20-byte TCP header is all
/// there and its data offset is sane (at least 5 words, within the total length):
/// nothing is rewritten otherwise.
#[inline(always)]
pub fn tcp_flags(ctx: &TcContext, ip: &Ipv4) -> Result<u8, Malformed> {
    let tcp = tcp_head(ctx, ip.l4_off).ok_or(Malformed::Truncated)?;
    tcp_within(ip, tcp.doff)?;
    Ok(tcp.flags)
}

/// The TCP data offset and flags, as found in the frame: not judged yet.
#[derive(Clone, Copy)]
pub struct TcpHead {
    /// Data offset in bytes.
    pub doff: usize,
    pub flags: u8,
}

/// The data offset and flags of the TCP header at `l4_off`, read from the frame without
/// judging them against the total length ([`tcp_within`] does).
#[inline(always)]
pub fn tcp_head(ctx: &TcContext, l4_off: usize) -> Option<TcpHead> {
    // verifier: reading 8 bytes also avoids a 1-byte read, which compiles to
    // `pkt + 0 < pkt_end`, a comparison the verifier derives no range from.
    let [doff, flags, ..] = load::<[u8; 8]>(ctx, l4_off + TCP_DOFF)?;
    Some(TcpHead {
        doff: usize::from(doff >> 4) * WORD,
        flags,
    })
}

/// Whether a TCP header with data offset `doff` (bytes) is sane in `ip`: the 20-byte
/// header inside the total length, and the data offset at least 5 words and ending
/// inside it too.
#[inline(always)]
pub fn tcp_within(ip: &Ipv4, doff: usize) -> Result<(), Malformed> {
    if ip.l4_off + TCP_HLEN > ip.end {
        return Err(Malformed::Truncated);
    }
    if doff < TCP_HLEN || ip.l4_off + doff > ip.end {
        return Err(Malformed::TcpOffset);
    }
    Ok(())
}

/// The first 8 bytes of an L4 header: ports for TCP/UDP, type/code/csum/id for ICMP.
#[repr(C, align(4))]
#[derive(Clone, Copy)]
pub struct L4Head {
    pub bytes: [u8; 8],
}

impl L4Head {
    /// TCP/UDP source port, or the ICMP echo identifier (network byte order, raw).
    #[inline(always)]
    pub fn port_or_id(self, proto: u8) -> [u8; 2] {
        if proto == IPPROTO_ICMP {
            self.field(ICMP_ID)
        } else {
            self.field(L4_SPORT)
        }
    }

    /// TCP/UDP destination port (raw network order).
    #[inline(always)]
    pub fn dport(self) -> [u8; 2] {
        self.field(L4_DPORT)
    }

    /// The 2-byte field at `off` (raw network order).
    #[inline(always)]
    fn field(self, off: usize) -> [u8; 2] {
        [self.bytes[off], self.bytes[off + 1]]
    }

    /// ICMP type.
    #[inline(always)]
    pub fn icmp_type(self) -> u8 {
        self.bytes[ICMP_TYPE]
    }
}

/// Offset, relative to the L4 header, of the field NAT rewrites as "the port".
#[inline(always)]
pub const fn port_field(proto: u8, source: bool) -> usize {
    match (proto, source) {
        (IPPROTO_ICMP, _) => ICMP_ID,
        (_, true) => L4_SPORT,
        (_, false) => L4_DPORT,
    }
}

/// Offset, relative to the L4 header, of the L4 checksum.
#[inline(always)]
pub const fn csum_field(proto: u8) -> usize {
    match proto {
        IPPROTO_TCP => TCP_CSUM,
        IPPROTO_UDP => UDP_CSUM,
        _ => ICMP_CSUM,
    }
}

/// Whether this ICMP type quotes the packet that caused it.
#[inline(always)]
pub const fn is_icmp_error(icmp_type: u8) -> bool {
    matches!(icmp_type, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED)
}

/// Whether this ICMP type is an echo, whose identifier NAT treats as a port.
#[inline(always)]
pub const fn is_icmp_echo(icmp_type: u8) -> bool {
    matches!(icmp_type, ICMP_ECHO_REQUEST | ICMP_ECHO_REPLY)
}

/// `true` when `addr` is inside `net/prefix_len`.
#[inline(always)]
pub fn in_subnet(addr: [u8; 4], net: [u8; 4], prefix_len: u8) -> bool {
    if prefix_len == 0 {
        return true;
    }
    let mask = u32::MAX << (32 - u32::from(prefix_len.min(32)));
    u32::from_be_bytes(addr) & mask == u32::from_be_bytes(net) & mask
}
