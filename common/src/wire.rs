//! The wire layout of the headers the datapath reads and rewrites: field offsets, each
//! relative to the start of its own header, header sizes, protocol numbers and flag bits
//! of Ethernet, IPv4, TCP, UDP and ICMP. The eBPF programs act on these fields, and the
//! agent and the tests name protocols and build packets with the same definitions.

/// Length of an Ethernet header (no VLAN tag).
pub const ETH_HLEN: usize = 14;
/// Length of an Ethernet (MAC) address.
pub const ETH_ALEN: usize = 6;
/// Offset of the destination MAC address in the Ethernet header.
pub const ETH_DST: usize = 0;
/// Offset of the source MAC address in the Ethernet header.
pub const ETH_SRC: usize = ETH_DST + ETH_ALEN;
/// Offset of the ethertype in the Ethernet header.
pub const ETH_TYPE: usize = ETH_SRC + ETH_ALEN;
/// Ethertype of IPv4.
pub const ETH_P_IP: u16 = 0x0800;

/// The version field of an IPv4 header.
pub const IPV4_VERSION: u8 = 4;
/// Length of an IPv4 header without options.
pub const IPV4_HLEN: usize = 20;
/// Smallest valid IPv4 header length, in 32-bit words (the IHL field).
pub const IPV4_MIN_IHL: usize = IPV4_HLEN / 4;
/// The IHL bits of the IPv4 version/IHL byte (the version is the high nibble).
pub const IPV4_IHL_MASK: u8 = 0x0f;
/// Offset of the IPv4 total length.
pub const IPV4_TOT_LEN: usize = 2;
/// Offset of the IPv4 identification (followed by the flags and fragment offset).
pub const IPV4_ID: usize = 4;
/// Offset of the IPv4 flags and fragment offset.
pub const IPV4_FRAG_OFF: usize = 6;
/// The fragment offset bits (in 8-byte units) of the flags and fragment offset field.
pub const IPV4_OFFSET_MASK: u16 = 0x1fff;
/// "More fragments", in the first byte of the flags and fragment offset field.
pub const IPV4_MF: u8 = 0x20;
/// Offset of the IPv4 header checksum.
pub const IPV4_CSUM: usize = 10;
/// Offset of the IPv4 source address.
pub const IPV4_SRC: usize = 12;
/// Offset of the IPv4 destination address.
pub const IPV4_DST: usize = 16;

/// IP protocol number of ICMP.
pub const IPPROTO_ICMP: u8 = 1;
/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;

/// Offset of the source port in a TCP or UDP header.
pub const L4_SPORT: usize = 0;
/// Offset of the destination port in a TCP or UDP header.
pub const L4_DPORT: usize = 2;
/// Offset of the UDP checksum.
pub const UDP_CSUM: usize = 6;

/// Length of a TCP header without options.
pub const TCP_HLEN: usize = 20;
/// Offset of the TCP data offset (high nibble, in 32-bit words); the flags byte follows.
pub const TCP_DOFF: usize = 12;
/// Offset of the TCP checksum.
pub const TCP_CSUM: usize = 16;
/// TCP flag FIN.
pub const TCP_FIN: u8 = 0x01;
/// TCP flag SYN.
pub const TCP_SYN: u8 = 0x02;
/// TCP flag RST.
pub const TCP_RST: u8 = 0x04;
/// TCP flag ACK.
pub const TCP_ACK: u8 = 0x10;

/// Length of the ICMP header (an error's quoted packet follows it).
pub const ICMP_HLEN: usize = 8;
/// Offset of the ICMP type.
pub const ICMP_TYPE: usize = 0;
/// Offset of the ICMP checksum.
pub const ICMP_CSUM: usize = 2;
/// Offset of the ICMP echo identifier.
pub const ICMP_ID: usize = 4;
/// ICMP type: echo reply.
pub const ICMP_ECHO_REPLY: u8 = 0;
/// ICMP type: destination unreachable (including fragmentation needed).
pub const ICMP_DEST_UNREACH: u8 = 3;
/// ICMP type: echo request.
pub const ICMP_ECHO_REQUEST: u8 = 8;
/// ICMP type: time exceeded.
pub const ICMP_TIME_EXCEEDED: u8 = 11;
