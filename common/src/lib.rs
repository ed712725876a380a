//! Everything the vcnpath eBPF programs and the agent must agree on: map and program
//! names, pin locations, the `#[repr(C)]` layout of every map key and value, and the
//! reason codes counted in the `stats` map.
//!
//! IPv4 addresses are stored as `[u8; 4]` in network order so `bpftool map dump`
//! prints them readably; ports are stored in host order for the same reason.
#![no_std]

pub mod maps;
pub mod reason;
pub mod wire;

pub use maps::*;
pub use reason::{DIRECTION_COUNT, Direction, REASON_COUNT, Reason, STATS_ENTRIES, stats_index};

/// Name of the TC egress classifier, as it appears in `bpftool prog` and `bpftool net`.
pub const PROG_EGRESS: &str = "vcnpath_egress";
/// Name of the TC ingress classifier.
pub const PROG_INGRESS: &str = "vcnpath_ingress";
/// Name of the TC ingress classifier on each pod's host-side veth (anti-spoofing).
pub const PROG_POD: &str = "vcnpath_pod";

/// Read-only global (`.rodata`, frozen at load) the agent sets to 1 when the kernel has
/// `bpf_ktime_get_coarse_ns` (Linux 5.11+). The verifier knows its value and drops the
/// branch the kernel cannot take, so one object loads on 5.10 and is cheaper on newer kernels.
pub const GLOBAL_COARSE_CLOCK: &str = "VCNPATH_COARSE_CLOCK";

/// Bit of the packet mark (`skb->mark`) set on a packet vcnpath redirects from one VNIC's
/// egress to another's, whose egress program then sees it a second time: that pass
/// takes the bit off again and does not count the packet, which was counted where it was
/// redirected. It lives only between the two programs (the TC egress hook runs before the
/// qdisc); a bit set by someone else costs one uncounted packet, nothing more, since the
/// second pass still judges the packet in full.
pub const MARK_REDIRECTED: u32 = 0x0000_0200;

/// Default bpffs directory holding every pinned map and program.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/vcnpath";

/// Version of the datapath ABI: the layout and meaning of every map's keys and values.
///
/// Bump it whenever an existing key or value changes layout or meaning (a field moved,
/// resized or reinterpreted, a reason renumbered); appending a reason or resizing a map
/// needs no bump, the agent's size checks see those. The agent records the version in the
/// pinned [`MAP_ABI`] map and, on a mismatch, rebuilds the maps it can fill again and
/// refuses to adopt the NAT table unless a conversion from the pinned version exists.
/// Pins without the record come from releases before it existed, whose layout is version 1.
///
/// - 1: the first recorded version.
/// - 2: `stats` counts per direction and reason ([`stats_index`]); `nat` and `inbound` are
///   as in version 1, so their pins are adopted as they are.
/// - 3: [`NatEntry`] (in `nat` and `inbound`) lost its creation time, which nothing read:
///   16 bytes instead of 24. The agent converts the flow tables of versions 1 and 2.
pub const DATAPATH_ABI: u32 = 3;

/// Single-entry array (key `u32` 0, value `u32`) created by the agent, not the programs:
/// the [`DATAPATH_ABI`] the pins beside it were created with. A pinned map has the same
/// lifetime as the pins it describes (a reboot or `rm` of the directory removes both),
/// which a file on disk would not.
pub const MAP_ABI: &str = "abi";

/// Every map name, in the order the agent pins them.
pub const MAP_NAMES: [&str; 9] = [
    MAP_VNICS,
    MAP_ENDPOINTS,
    MAP_VCN_CIDRS,
    MAP_NONMASQ_CIDRS,
    MAP_CONFIG,
    MAP_NAT,
    MAP_STATS,
    MAP_FRAGS,
    MAP_INBOUND,
];

/// Per managed interface (key: ifindex): its addresses and next hop.
pub const MAP_VNICS: &str = "vnics";
/// Every address owned by a VNIC (its primary IP and each pod IP) → owning interface.
pub const MAP_ENDPOINTS: &str = "endpoints";
/// LPM trie of every CIDR block of the VCN.
pub const MAP_VCN_CIDRS: &str = "vcn_cidrs";
/// LPM trie of destinations that are never masqueraded (on-premises, peered VCNs, …).
pub const MAP_NONMASQ_CIDRS: &str = "nonmasq_cidrs";
/// Single-entry array with the masquerade address, its interface and the NAT port range.
pub const MAP_CONFIG: &str = "config";
/// LRU hash of NAT entries, both directions of every translated flow.
pub const MAP_NAT: &str = "nat";
/// LRU hash of flows opened from outside the VCN towards a pod address (rule 4), keyed
/// like the pod's answers (`NatKey` of direction egress), apart from `nat` so they never
/// take a translated flow's place.
pub const MAP_INBOUND: &str = "inbound";
/// Per-CPU array of counters, indexed by [`Reason`].
pub const MAP_STATS: &str = "stats";
/// LRU hash of fragmented datagrams in flight: how their later fragments, which carry no
/// L4 header, are translated as their first was.
pub const MAP_FRAGS: &str = "frags";
