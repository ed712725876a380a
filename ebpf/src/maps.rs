//! The maps (names and layouts from `vcnpath-common`) and small typed accessors.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    macros::btf_map,
};
use vcnpath_common::{
    CIDRS_MAX, CONFIG_F_ENABLED, CidrValue, Config, Direction, ENDPOINTS_MAX, Endpoint,
    EndpointKey, FRAGS_MAX, FragEntry, FragKey, INBOUND_MAX, NAT_MAX, NatEntry, NatKey, Reason,
    STATS_ENTRIES, VNICS_MAX, Vnic, inbound_port_bit, stats_index,
};

use crate::helpers;

#[btf_map(name = "vnics")]
static VNICS: HashMap<u32, Vnic, { VNICS_MAX as usize }> = HashMap::new();

#[btf_map(name = "endpoints")]
static ENDPOINTS: HashMap<EndpointKey, Endpoint, { ENDPOINTS_MAX as usize }> = HashMap::new();

#[btf_map(name = "vcn_cidrs")]
static VCN_CIDRS: LpmTrie<[u8; 4], CidrValue, { CIDRS_MAX as usize }> = LpmTrie::new();

#[btf_map(name = "nonmasq_cidrs")]
static NONMASQ_CIDRS: LpmTrie<[u8; 4], CidrValue, { CIDRS_MAX as usize }> = LpmTrie::new();

#[btf_map(name = "config")]
static CONFIG: Array<Config, 1> = Array::new();

#[btf_map(name = "nat")]
pub static NAT: LruHashMap<NatKey, NatEntry, { NAT_MAX as usize }> = LruHashMap::new();

#[btf_map(name = "inbound")]
pub static INBOUND: LruHashMap<NatKey, NatEntry, { INBOUND_MAX as usize }> = LruHashMap::new();

#[btf_map(name = "frags")]
pub static FRAGS: LruHashMap<FragKey, FragEntry, { FRAGS_MAX as usize }> = LruHashMap::new();

#[btf_map(name = "stats")]
static STATS: PerCpuArray<u64, { STATS_ENTRIES as usize }> = PerCpuArray::new();

/// Adds one to the counter of `reason` in `direction` (per CPU, so no atomics).
#[inline(always)]
pub fn count(direction: Direction, reason: Reason) {
    if let Some(mut counter) = helpers::per_cpu_value(&STATS, stats_index(direction, reason)) {
        *counter.get_mut() += 1;
    }
}

/// The datapath configuration, when the agent has enabled it.
#[inline(always)]
pub fn config() -> Option<Config> {
    let config = *CONFIG.get(0)?;
    (config.flags & CONFIG_F_ENABLED != 0).then_some(config)
}

/// The owner of an address on this node, if it is one of ours.
#[inline(always)]
pub fn endpoint(addr: [u8; 4]) -> Option<Endpoint> {
    helpers::hash_copied(&ENDPOINTS, &EndpointKey { addr })
}

/// The owner of an address on this node, in place: for [`note_inbound`].
#[inline(always)]
pub fn endpoint_value(addr: [u8; 4]) -> Option<helpers::MapValue<Endpoint>> {
    helpers::hash_value(&ENDPOINTS, &EndpointKey { addr })
}

/// Marks the class of `port` as reached from outside the VCN on a pod
/// ([`Endpoint::inbound_ports`]), once: the entry is written only while the bit is missing.
#[inline(always)]
pub fn note_inbound(pod: &mut helpers::MapValue<Endpoint>, port: u16) {
    let bit = inbound_port_bit(port);
    if pod.get().inbound_ports & bit == 0 {
        pod.get_mut().inbound_ports |= bit;
    }
}

/// The managed interface with this index.
#[inline(always)]
pub fn vnic(ifindex: u32) -> Option<Vnic> {
    helpers::hash_copied(&VNICS, &ifindex)
}

/// The prefix length of a single address: a trie lookup finds the longest prefix holding it.
const HOST_PREFIX_LEN: u32 = 32;

/// Whether traffic to `addr` stays untranslated: inside the VCN or excluded by the user.
#[inline(always)]
pub fn is_nonmasq(addr: [u8; 4]) -> bool {
    let key = Key::new(HOST_PREFIX_LEN, addr);
    VCN_CIDRS.get(&key).is_some() || NONMASQ_CIDRS.get(&key).is_some()
}
