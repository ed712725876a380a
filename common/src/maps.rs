//! Layouts of the keys and values of every map. All are `#[repr(C)]` with explicit
//! padding so the kernel, the eBPF programs, the agent and bpftool agree byte for byte.

/// Default capacity of the `endpoints` map (addresses on the node).
pub const ENDPOINTS_MAX: u32 = 8192;
/// Default capacity of the `vnics` map (managed interfaces).
pub const VNICS_MAX: u32 = 64;
/// Default capacity of each CIDR trie.
pub const CIDRS_MAX: u32 = 256;
/// Default capacity of the `nat` map (two entries per translated flow).
pub const NAT_MAX: u32 = 262_144;
/// Capacity of `inbound`: flows opened from outside towards pod addresses at once (an
/// LRU of its own, so a flood of them never evicts a translated flow from `nat`).
pub const INBOUND_MAX: u32 = 65_536;
/// Capacity of `frags`: datagrams in flight in fragments at once (an LRU: the oldest give way).
pub const FRAGS_MAX: u32 = 8192;

/// Value of `vnics`, keyed by the interface index (`u32`).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Vnic {
    /// Interface index of the VNIC's link in the node's network namespace.
    pub ifindex: u32,
    /// The VNIC's primary private IP.
    pub primary_ip: [u8; 4],
    /// Network address of the VNIC's subnet.
    pub subnet_ip: [u8; 4],
    /// The subnet's virtual router (next hop for everything leaving the subnet).
    pub router_ip: [u8; 4],
    /// The interface's MAC address (source MAC of redirected frames).
    pub mac: [u8; 6],
    /// The virtual router's MAC, valid when `flags` has [`VNIC_F_ROUTER_MAC`].
    pub router_mac: [u8; 6],
    /// Prefix length of the subnet.
    pub subnet_prefix_len: u8,
    /// `VNIC_F_*` bits.
    pub flags: u8,
    /// Explicit padding; always zero.
    pub pad: [u8; 2],
}

/// `Vnic::router_mac` is resolved; redirects rewrite L2 directly instead of asking the
/// kernel's neighbour table.
pub const VNIC_F_ROUTER_MAC: u8 = 1;

/// Key of `endpoints`.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    /// The address.
    pub addr: [u8; 4],
}

/// Value of `endpoints`.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// Interface index of the VNIC that owns the address in OCI.
    pub ifindex: u32,
    /// [`ENDPOINT_KIND_PRIMARY`] or [`ENDPOINT_KIND_POD`].
    pub kind: u8,
    /// [`ENDPOINT_F_IMDS`]. Was padding (always zero) before it existed, and zero keeps its
    /// meaning (no flag set), so pins from earlier releases need no conversion.
    pub flags: u8,
    /// The classes of the pod's ports ([`inbound_port_bit`]) on which a host outside the
    /// VCN has opened a flow to the pod (an `inbound` record names it). The ingress
    /// program sets a port's bit when it records or meets such a flow, before the packet
    /// reaches the pod, and nothing clears it while the pod lives; a new flow of the pod
    /// looks `inbound` up only when its source port's bit is set, so a pod that only opens
    /// flows of its own, or serves a port or two, rarely pays for that lookup. The agent
    /// never writes a bit away: its sync compares entries without them and sets them all
    /// on an entry it rewrites (the programs may set one between its read and its write);
    /// at start it sets the bits of the records an earlier release wrote. Was padding
    /// (always zero) before.
    pub inbound_ports: u16,
}

/// The pod may reach the instance metadata service ([`IMDS_ADDR`] TCP [`IMDS_PORT`]); without
/// it the pod's veth drops such packets (`dropped-pod-imds`), since IMDS hands out the node's
/// instance-principal credentials.
pub const ENDPOINT_F_IMDS: u8 = 1;

/// The bit of `port`'s class in [`Endpoint::inbound_ports`]: its four nibbles folded
/// together, so neighbouring ports and ports a multiple of 16 apart land in different
/// classes.
#[must_use]
pub const fn inbound_port_bit(port: u16) -> u16 {
    1 << ((port ^ (port >> 4) ^ (port >> 8) ^ (port >> 12)) & 0xf)
}

/// OCI's instance metadata service (`http://169.254.169.254/opc/v2/`). The same address
/// also answers DNS (the VCN resolver) and NTP, which pods keep reaching: only TCP to
/// [`IMDS_PORT`] is the metadata service.
pub const IMDS_ADDR: [u8; 4] = [169, 254, 169, 254];
/// The metadata service's port (HTTP).
pub const IMDS_PORT: u16 = 80;

/// The address is a VNIC's primary IP: the host's own traffic, never touched.
pub const ENDPOINT_KIND_PRIMARY: u8 = 1;
/// The address is a pod's (a secondary private IP of the VNIC).
pub const ENDPOINT_KIND_POD: u8 = 2;

/// Value of the CIDR tries (`vcn_cidrs`, `nonmasq_cidrs`); nonzero means "present".
/// Their keys are the loaders' LPM key type (prefix length in bits, then `[u8; 4]`).
pub type CidrValue = u32;

/// Value of `config` (a one-element array, index 0).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Source address of masqueraded traffic (the primary VNIC's primary IP).
    pub masq_ip: [u8; 4],
    /// Interface that owns `masq_ip`; masqueraded traffic leaves through it.
    pub masq_ifindex: u32,
    /// First port (and ICMP identifier) the NAT may choose when the original is taken.
    pub port_min: u16,
    /// Last port of that range (inclusive).
    pub port_max: u16,
    /// `CONFIG_F_*` bits.
    pub flags: u32,
}

/// The datapath is configured; without it every packet passes untouched.
pub const CONFIG_F_ENABLED: u32 = 1;

/// Key of `nat`. Ports are in host order; for ICMP echo the identifier is the source
/// port of the echo request (`sport` of the egress key, `dport` of the ingress key).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatKey {
    /// Source address of the packet this entry matches.
    pub src: [u8; 4],
    /// Destination address of the packet this entry matches.
    pub dst: [u8; 4],
    /// Source port (host order).
    pub sport: u16,
    /// Destination port (host order).
    pub dport: u16,
    /// IP protocol number.
    pub proto: u8,
    /// [`NAT_DIR_EGRESS`] (pod → world) or [`NAT_DIR_INGRESS`] (world → masquerade address).
    pub dir: u8,
    /// Explicit padding; always zero.
    pub pad: [u8; 2],
}

/// The key is a packet leaving a pod.
pub const NAT_DIR_EGRESS: u8 = 0;
/// The key is a reply arriving for the masquerade address.
pub const NAT_DIR_INGRESS: u8 = 1;

/// Value of `nat`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatEntry {
    /// `bpf_ktime_get_ns()` when a packet last matched (CLOCK_MONOTONIC), refreshed at
    /// most every [`NAT_TOUCH_INTERVAL_NS`].
    pub last_seen_ns: u64,
    /// Egress entry: the masquerade address. Ingress entry: the pod address.
    pub addr: [u8; 4],
    /// Egress entry: the translated port. Ingress entry: the pod's port (host order).
    pub port: u16,
    /// `NAT_F_*` bits.
    pub flags: u8,
    /// TCP flags seen in this direction (`TCP_SEEN_*`), for expiry.
    pub tcp_seen: u8,
}

/// Egress entry that records a flow opened from outside the VCN towards a pod address:
/// its packets leave untranslated through the owning VNIC (rule 4). Every entry of
/// `inbound` has it; entries of `nat` with it were written by releases before `inbound`
/// existed and are honoured until they expire.
pub const NAT_F_INBOUND: u8 = 1;
/// Inbound record the pod has answered on: until then it lives by the short
/// `inbound_unanswered` timeout, so records a spoofed flood creates go quickly.
pub const NAT_F_ANSWERED: u8 = 2;
/// Ingress-keyed record of a flow the host itself opened from the masquerade address on a
/// port of the NAT range (a socket bound there, or `nf_nat`'s MASQUERADE choosing it): its
/// replies pass to the host untranslated, and no pod flow may take its tuple. The host's
/// `TCP_SEEN_*` bits are stored shifted by `TCP_SEEN_POD_SHIFT`, the remote's as they are,
/// as in an inbound record.
pub const NAT_F_HOST: u8 = 4;

/// A SYN was seen in this direction.
pub const TCP_SEEN_SYN: u8 = 1;
/// A packet without SYN (the handshake completed) was seen in this direction.
pub const TCP_SEEN_ACK: u8 = 2;
/// A FIN was seen in this direction.
pub const TCP_SEEN_FIN: u8 = 4;
/// A RST was seen in this direction.
pub const TCP_SEEN_RST: u8 = 8;

/// In an inbound record ([`NAT_F_INBOUND`]) one entry sees both directions: the
/// outside's `TCP_SEEN_*` bits are stored as they are, the pod's shifted left by this
/// much, so a half-close (a FIN one way) is told from a close. Records written before the
/// split hold both directions in the low bits; read as the outside's alone they never
/// expire sooner than they did, so the split needs no ABI bump.
pub const TCP_SEEN_POD_SHIFT: u8 = 4;

/// Whether a TCP flow whose two directions have seen `a` and `b` (`TCP_SEEN_*` bits) is
/// closing: a RST either way, or a FIN both ways. The programs reopen a closing flow on a
/// new SYN and the agent expires it after the short closing timeout; both decide with
/// this one rule.
#[must_use]
pub const fn tcp_closing(a: u8, b: u8) -> bool {
    (a | b) & TCP_SEEN_RST != 0 || a & b & TCP_SEEN_FIN != 0
}

/// The two directions of an inbound record's `tcp_seen`: (outside → pod, pod → outside).
#[must_use]
pub const fn inbound_seen(tcp_seen: u8) -> (u8, u8) {
    (tcp_seen & 0x0f, tcp_seen >> TCP_SEEN_POD_SHIFT)
}

/// Key of `frags`: one fragmented datagram as its fragments arrive, before any rewrite
/// (RFC 791 identifies a datagram by source, destination, protocol and identification).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    /// Source address of the fragments.
    pub src: [u8; 4],
    /// Destination address of the fragments.
    pub dst: [u8; 4],
    /// The IP identification field, as on the wire (network order).
    pub id: [u8; 2],
    /// IP protocol number.
    pub proto: u8,
    /// [`NAT_DIR_EGRESS`] (a pod's datagram) or [`NAT_DIR_INGRESS`] (a reply to the
    /// masquerade address).
    pub dir: u8,
}

/// Value of `frags`: what the first fragment's flow decided, for the fragments after it,
/// which carry no L4 header to find the flow by.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragEntry {
    /// `bpf_ktime_get_ns()` when the first fragment passed: the entry is used for
    /// [`FRAG_TIMEOUT_NS`] after it, as long as the kernel waits for a datagram's fragments.
    pub created_ns: u64,
    /// Egress: the masquerade address the fragments leave with. Ingress: the pod address
    /// they are delivered to.
    pub addr: [u8; 4],
    /// `FRAG_F_*` bits.
    pub flags: u8,
    /// Explicit padding; always zero.
    pub pad: [u8; 3],
}

/// The datagram belongs to a flow opened from outside towards the pod (rule 4): its
/// fragments leave untranslated through the pod's VNIC.
pub const FRAG_F_INBOUND: u8 = 1;

/// How long a first fragment's decision holds for the rest: the kernel's default
/// `ipfrag_time` (30 s), after which a receiver gives up on the datagram anyway.
pub const FRAG_TIMEOUT_NS: u64 = 30_000_000_000;

/// `last_seen_ns` is rewritten only when it is older than this, to keep per-packet
/// writes (and cache-line bouncing between CPUs) off the fast path.
pub const NAT_TOUCH_INTERVAL_NS: u64 = 1_000_000_000;

/// The default NAT port range: above the kernel's default `ip_local_port_range`
/// (32768–60999), so host sockets never pick its ports, and clear of the ports hosts
/// serve on (NodePorts 30000–32767, VXLAN, Geneve, the kubelet's). 4536 ports, so as many
/// flows at once per masquerade address and remote address and port.
pub const DEFAULT_NAT_PORT_MIN: u16 = 61000;
/// See [`DEFAULT_NAT_PORT_MIN`].
pub const DEFAULT_NAT_PORT_MAX: u16 = 65535;

/// Bounded number of ports tried for a new flow before it is dropped as exhausted.
pub const NAT_PORT_TRIES: u32 = 64;

// `align(4)` changes no layout (every size is a multiple of 4) but tells the compiler the
// `[u8; 4]` address fields are word-aligned, so the eBPF side loads, stores and compares
// them as single 32-bit words instead of byte by byte.

// Compile-time layout checks: any change here is a change to the pinned-map ABI; bump
// `DATAPATH_ABI` with it.
const _: () = assert!(core::mem::size_of::<Vnic>() == 32);
const _: () = assert!(core::mem::size_of::<EndpointKey>() == 4);
const _: () = assert!(core::mem::size_of::<Endpoint>() == 8);
const _: () = assert!(core::mem::size_of::<Config>() == 16);
const _: () = assert!(core::mem::size_of::<NatKey>() == 16);
const _: () = assert!(core::mem::size_of::<NatEntry>() == 16);
const _: () = assert!(core::mem::size_of::<FragKey>() == 12);
const _: () = assert!(core::mem::size_of::<FragEntry>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is `#[repr(C)]`, `Copy`, has no padding bytes left implicit and
    // is valid for any bit pattern.
    unsafe impl aya::Pod for super::Vnic {}
    unsafe impl aya::Pod for super::EndpointKey {}
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::NatKey {}
    unsafe impl aya::Pod for super::NatEntry {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragEntry {}
}
