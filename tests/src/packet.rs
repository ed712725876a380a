//! Crafting IPv4 packets and checking them independently of the datapath: the builder
//! computes every checksum from scratch, and the checkers recompute them over the
//! packet the program returned.

use std::net::Ipv4Addr;

pub use vcnpath_common::wire::{ETH_HLEN, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

/// One's-complement sum folded to 16 bits (RFC 1071), over `data` plus `initial`.
pub fn ones_sum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn pseudo(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> u32 {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    u32::from(ones_sum(&p, 0))
}

/// L4 payload description for [`build`].
#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        payload: Vec<u8>,
    },
    Udp {
        sport: u16,
        dport: u16,
        payload: Vec<u8>,
        zero_csum: bool,
    },
    /// ICMP with type, code, the 4 "rest of header" bytes and a body.
    Icmp {
        icmp_type: u8,
        code: u8,
        rest: [u8; 4],
        body: Vec<u8>,
    },
}

/// An IPv4 packet to build.
#[derive(Clone, Debug)]
pub struct Spec {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// IP options (padded to a multiple of 4 bytes by the caller).
    pub options: Vec<u8>,
    pub frag_off: u16,
    pub l4: L4,
}

impl Spec {
    pub fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self {
            src,
            dst,
            options: vec![],
            frag_off: 0x4000,
            l4: L4::Tcp {
                sport,
                dport,
                flags: 0x10,
                payload: b"hello".to_vec(),
            },
        }
    }
    /// The same packet with other TCP flags (`0x02` SYN, `0x12` SYN-ACK, …).
    #[must_use]
    pub fn with_tcp_flags(mut self, new: u8) -> Self {
        if let L4::Tcp { flags, .. } = &mut self.l4 {
            *flags = new;
        }
        self
    }
    pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self {
            src,
            dst,
            options: vec![],
            frag_off: 0,
            l4: L4::Udp {
                sport,
                dport,
                payload: b"ping!".to_vec(),
                zero_csum: false,
            },
        }
    }
    pub fn echo(src: Ipv4Addr, dst: Ipv4Addr, icmp_type: u8, id: u16) -> Self {
        let mut rest = [0; 4];
        rest[..2].copy_from_slice(&id.to_be_bytes());
        rest[2..].copy_from_slice(&1u16.to_be_bytes());
        Self {
            src,
            dst,
            options: vec![],
            frag_off: 0,
            l4: L4::Icmp {
                icmp_type,
                code: 0,
                rest,
                body: b"abcdefgh".to_vec(),
            },
        }
    }
}

/// The L4 bytes (header + payload) with a valid checksum.
pub fn l4_bytes(spec: &Spec) -> (u8, Vec<u8>) {
    let (src, dst) = (spec.src.octets(), spec.dst.octets());
    match &spec.l4 {
        L4::Tcp {
            sport,
            dport,
            flags,
            payload,
        } => {
            let mut h = Vec::new();
            h.extend_from_slice(&sport.to_be_bytes());
            h.extend_from_slice(&dport.to_be_bytes());
            h.extend_from_slice(&1000u32.to_be_bytes());
            h.extend_from_slice(&2000u32.to_be_bytes());
            h.extend_from_slice(&[0x50, *flags]);
            h.extend_from_slice(&65535u16.to_be_bytes());
            h.extend_from_slice(&[0, 0, 0, 0]);
            h.extend_from_slice(payload);
            let c = !ones_sum(&h, pseudo(src, dst, IPPROTO_TCP, h.len()));
            h[16..18].copy_from_slice(&c.to_be_bytes());
            (IPPROTO_TCP, h)
        }
        L4::Udp {
            sport,
            dport,
            payload,
            zero_csum,
        } => {
            let mut h = Vec::new();
            h.extend_from_slice(&sport.to_be_bytes());
            h.extend_from_slice(&dport.to_be_bytes());
            h.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            h.extend_from_slice(&[0, 0]);
            h.extend_from_slice(payload);
            if !zero_csum {
                let mut c = !ones_sum(&h, pseudo(src, dst, IPPROTO_UDP, h.len()));
                if c == 0 {
                    c = 0xffff;
                }
                h[6..8].copy_from_slice(&c.to_be_bytes());
            }
            (IPPROTO_UDP, h)
        }
        L4::Icmp {
            icmp_type,
            code,
            rest,
            body,
        } => {
            let mut h = vec![*icmp_type, *code, 0, 0];
            h.extend_from_slice(rest);
            h.extend_from_slice(body);
            let c = !ones_sum(&h, 0);
            h[2..4].copy_from_slice(&c.to_be_bytes());
            (IPPROTO_ICMP, h)
        }
    }
}

/// The IPv4 packet (no Ethernet header) with valid checksums.
pub fn ipv4_bytes(spec: &Spec) -> Vec<u8> {
    let (proto, l4) = l4_bytes(spec);
    let ihl = 5 + spec.options.len() / 4;
    let total = ihl * 4 + l4.len();
    let mut ip = vec![(4 << 4) | ihl as u8, 0];
    ip.extend_from_slice(&(total as u16).to_be_bytes());
    ip.extend_from_slice(&0x1234u16.to_be_bytes());
    ip.extend_from_slice(&spec.frag_off.to_be_bytes());
    ip.extend_from_slice(&[64, proto, 0, 0]);
    ip.extend_from_slice(&spec.src.octets());
    ip.extend_from_slice(&spec.dst.octets());
    ip.extend_from_slice(&spec.options);
    let c = !ones_sum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&l4);
    ip
}

/// Source MAC used by crafted frames.
pub const SRC_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 1];
/// Destination MAC used by crafted frames.
pub const DST_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 1];

/// An Ethernet frame around `ip`.
pub fn frame(ip: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HLEN + ip.len());
    f.extend_from_slice(&DST_MAC);
    f.extend_from_slice(&SRC_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(ip);
    f
}

/// Builds a full frame.
pub fn build(spec: &Spec) -> Vec<u8> {
    frame(&ipv4_bytes(spec))
}

/// An ICMP error (type/code, e.g. 3/4 fragmentation-needed with `mtu`) from `src` to
/// `dst` quoting `quoted` (an IPv4 packet), truncated to `quote_len` bytes.
pub fn icmp_error(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    icmp_type: u8,
    code: u8,
    mtu: u16,
    quoted: &[u8],
    quote_len: usize,
) -> Vec<u8> {
    let mut rest = [0; 4];
    rest[2..].copy_from_slice(&mtu.to_be_bytes());
    let body = quoted[..quote_len.min(quoted.len())].to_vec();
    build(&Spec {
        src,
        dst,
        options: vec![],
        frag_off: 0,
        l4: L4::Icmp {
            icmp_type,
            code,
            rest,
            body,
        },
    })
}

/// A parsed view of a frame, for assertions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub ihl: usize,
    /// TCP/UDP ports, or (ICMP id, 0) for echo.
    pub sport: u16,
    pub dport: u16,
}

/// Parses a frame built like the above.
pub fn view(f: &[u8]) -> View {
    let ip = &f[ETH_HLEN..];
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let l4 = &ip[ihl..];
    let proto = ip[9];
    let (sport, dport) = if proto == IPPROTO_ICMP {
        (u16::from_be_bytes([l4[4], l4[5]]), 0)
    } else {
        (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        )
    };
    View {
        dst_mac: f[..6].try_into().unwrap(),
        src_mac: f[6..12].try_into().unwrap(),
        src: Ipv4Addr::from(<[u8; 4]>::try_from(&ip[12..16]).unwrap()),
        dst: Ipv4Addr::from(<[u8; 4]>::try_from(&ip[16..20]).unwrap()),
        proto,
        ihl,
        sport,
        dport,
    }
}

/// Verifies the IPv4 header checksum and the full L4 checksum of an (untruncated) IPv4
/// packet; for ICMP errors, also the quoted IP header's checksum. Panics with what is wrong.
pub fn assert_checksums(ip: &[u8]) {
    let ihl = usize::from(ip[0] & 0xf) * 4;
    assert_eq!(
        ones_sum(&ip[..ihl], 0),
        0xffff,
        "IPv4 header checksum invalid: {:02x?}",
        &ip[..ihl]
    );
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let l4 = &ip[ihl..total];
    let (src, dst): ([u8; 4], [u8; 4]) = (
        ip[12..16].try_into().unwrap(),
        ip[16..20].try_into().unwrap(),
    );
    match ip[9] {
        IPPROTO_TCP => assert_eq!(
            ones_sum(l4, pseudo(src, dst, IPPROTO_TCP, l4.len())),
            0xffff,
            "TCP checksum invalid"
        ),
        IPPROTO_UDP => {
            if l4[6..8] != [0, 0] {
                assert_eq!(
                    ones_sum(l4, pseudo(src, dst, IPPROTO_UDP, l4.len())),
                    0xffff,
                    "UDP checksum invalid"
                );
            }
        }
        IPPROTO_ICMP => {
            assert_eq!(ones_sum(l4, 0), 0xffff, "ICMP checksum invalid");
            if matches!(l4[0], 3 | 11) {
                let inner = &l4[8..];
                let inner_ihl = usize::from(inner[0] & 0xf) * 4;
                assert_eq!(
                    ones_sum(&inner[..inner_ihl], 0),
                    0xffff,
                    "quoted IPv4 header checksum invalid"
                );
            }
        }
        other => panic!("unexpected protocol {other}"),
    }
}

/// Rewrites the IPv4 header checksum of `ip` after a header field changed.
fn fix_ip_checksum(ip: &mut [u8]) {
    let ihl = usize::from(ip[0] & 0xf) * 4;
    ip[10..12].copy_from_slice(&[0, 0]);
    let c = !ones_sum(&ip[..ihl], 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

/// Cuts an IPv4 packet into fragments of at most `per_fragment` payload bytes (rounded
/// down to a multiple of 8), as a sender's stack does, with identification `id`.
pub fn fragment(ip: &[u8], per_fragment: usize, id: u16) -> Vec<Vec<u8>> {
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let payload = &ip[ihl..usize::from(u16::from_be_bytes([ip[2], ip[3]]))];
    let step = per_fragment / 8 * 8;
    assert!(step > 0, "a fragment carries at least 8 bytes");
    payload
        .chunks(step)
        .enumerate()
        .map(|(n, chunk)| {
            let mut f = ip[..ihl].to_vec();
            let more = (n + 1) * step < payload.len();
            let field =
                u16::try_from(n * step / 8).expect("offset fits") | if more { 0x2000 } else { 0 };
            f[2..4].copy_from_slice(
                &u16::try_from(ihl + chunk.len())
                    .expect("fits")
                    .to_be_bytes(),
            );
            f[4..6].copy_from_slice(&id.to_be_bytes());
            f[6..8].copy_from_slice(&field.to_be_bytes());
            fix_ip_checksum(&mut f);
            f.extend_from_slice(chunk);
            f
        })
        .collect()
}

/// Reassembles fragments (IPv4 packets, in any order) of one datagram as a receiver does.
/// Panics when they do not belong together or leave a hole.
pub fn reassemble(fragments: &[Vec<u8>]) -> Vec<u8> {
    let mut parts: Vec<(usize, bool, &[u8], &[u8])> = fragments
        .iter()
        .map(|f| {
            let ihl = usize::from(f[0] & 0xf) * 4;
            let field = u16::from_be_bytes([f[6], f[7]]);
            let total = usize::from(u16::from_be_bytes([f[2], f[3]]));
            (
                usize::from(field & 0x1fff) * 8,
                field & 0x2000 != 0,
                &f[..ihl],
                &f[ihl..total],
            )
        })
        .collect();
    parts.sort_by_key(|p| p.0);
    let identity = |h: &[u8]| (h[4..6].to_vec(), h[9], h[12..20].to_vec());
    let mut payload = Vec::new();
    for (offset, _, header, data) in &parts {
        assert_eq!(
            identity(header),
            identity(parts[0].2),
            "fragments of other datagrams"
        );
        assert_eq!(
            *offset,
            payload.len(),
            "a hole or overlap at offset {offset}"
        );
        payload.extend_from_slice(data);
    }
    assert!(
        !parts.last().expect("fragments").1,
        "the last fragment is missing"
    );
    let mut ip = parts[0].2.to_vec();
    let total = u16::try_from(ip.len() + payload.len()).expect("fits");
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6..8].copy_from_slice(&[0, 0]);
    fix_ip_checksum(&mut ip);
    ip.extend_from_slice(&payload);
    ip
}
