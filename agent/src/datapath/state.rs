//! The desired content of the maps and the diff-based sync that applies it: read what is
//! there, compute the difference, write only that. The same path runs at start-up (after
//! adopting pinned maps), on every change and in the periodic reconcile.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use aya::{
    Pod,
    maps::{
        HashMap, MapData,
        lpm_trie::{Key, LpmTrie},
    },
};
use ipnet::Ipv4Net;
use vcnpath_common::{
    CidrValue, Config, ENDPOINT_KIND_POD, Endpoint, EndpointKey, MAP_CONFIG, MAP_ENDPOINTS,
    MAP_INBOUND, MAP_NAT, MAP_NONMASQ_CIDRS, MAP_VCN_CIDRS, MAP_VNICS, NAT_DIR_EGRESS,
    NAT_F_INBOUND, NatEntry, NatKey, VNIC_F_ROUTER_MAC, Vnic, inbound_port_bit,
};

use super::{DatapathError, DatapathMaps, batch::BatchMap, collect::BATCH_CHUNK, gc::reply_key};

/// What the maps should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatapathState {
    /// Managed interfaces by ifindex.
    pub vnics: BTreeMap<u32, Vnic>,
    /// Every address owned by a VNIC.
    pub endpoints: BTreeMap<Ipv4Addr, Endpoint>,
    /// Every CIDR block of the VCN.
    pub vcn_cidrs: BTreeSet<Ipv4Net>,
    /// Destinations never masqueraded.
    pub nonmasq_cidrs: BTreeSet<Ipv4Net>,
    /// Masquerade settings; `None` leaves the datapath disabled (everything passes).
    pub config: Option<Config>,
}

/// The `vnics` map entry of an interface: its addresses and its subnet's next hop (the
/// router's MAC when resolved lets redirects skip the neighbour table).
pub fn vnic_entry(
    ifindex: u32,
    mac: [u8; 6],
    primary_ip: Ipv4Addr,
    subnet: Ipv4Net,
    router_ip: Ipv4Addr,
    router_mac: Option<[u8; 6]>,
) -> Vnic {
    Vnic {
        ifindex,
        primary_ip: primary_ip.octets(),
        subnet_ip: subnet.network().octets(),
        router_ip: router_ip.octets(),
        mac,
        router_mac: router_mac.unwrap_or_default(),
        subnet_prefix_len: subnet.prefix_len(),
        flags: if router_mac.is_some() {
            VNIC_F_ROUTER_MAC
        } else {
            0
        },
        pad: [0; 2],
    }
}

/// What one sync changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub written: usize,
    pub removed: usize,
    /// NAT entries purged because their pod address went away.
    pub nat_purged: usize,
}

impl SyncReport {
    /// Whether the maps already matched.
    pub fn unchanged(&self) -> bool {
        self.written == 0 && self.removed == 0 && self.nat_purged == 0
    }
}

/// Keys to write (new or different) and keys to remove, to turn `actual` into `desired`.
pub fn diff<K: Ord + Clone, V: PartialEq + Clone>(
    desired: &BTreeMap<K, V>,
    actual: &BTreeMap<K, V>,
) -> (Vec<(K, V)>, Vec<K>) {
    let write = desired
        .iter()
        .filter(|(k, v)| actual.get(k) != Some(v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let remove = actual
        .keys()
        .filter(|k| !desired.contains_key(k))
        .cloned()
        .collect();
    (write, remove)
}

impl DatapathMaps {
    /// The pod addresses in the `endpoints` map and their entries (the ifindex each is
    /// steered out of, its flags): what the datapath knows of running pods, whatever the
    /// checkpoint says.
    pub fn pod_endpoints(&self) -> Result<BTreeMap<Ipv4Addr, Endpoint>, DatapathError> {
        Ok(read_all(&self.endpoints, MAP_ENDPOINTS)?
            .into_iter()
            .filter(|(_, v): &(EndpointKey, Endpoint)| v.kind == ENDPOINT_KIND_POD)
            .map(|(k, v)| (Ipv4Addr::from(k.addr), v))
            .collect())
    }

    /// Makes the maps equal to `desired`, touching only what differs. Removed pod
    /// addresses also lose their NAT entries.
    pub fn sync(&mut self, desired: &DatapathState) -> Result<SyncReport, DatapathError> {
        let mut report = SyncReport::default();

        // Endpoints, VNICs and CIDRs first, config (which enables the datapath) last, so
        // a freshly created datapath never runs enabled against half-filled maps.
        let actual: BTreeMap<u32, Vnic> = read_all(&self.vnics, MAP_VNICS)?;
        let (write, remove) = diff(&desired.vnics, &actual);
        for (k, v) in &write {
            self.vnics
                .insert(k, v, 0)
                .map_err(DatapathError::map(MAP_VNICS))?;
        }
        for k in &remove {
            self.vnics
                .remove(k)
                .map_err(DatapathError::map(MAP_VNICS))?;
        }
        report.written += write.len();
        report.removed += remove.len();

        // The programs' marks are not the agent's to compare or to drop (see
        // `Endpoint::inbound_ports`): an entry rewritten gets them all, since the programs
        // may set one between this read and the write, which replaces the entry whole.
        let actual: BTreeMap<Ipv4Addr, Endpoint> = read_all(&self.endpoints, MAP_ENDPOINTS)?
            .into_iter()
            .map(|(k, v): (EndpointKey, Endpoint)| (Ipv4Addr::from(k.addr), without_inbound(v)))
            .collect();
        let desired_endpoints: BTreeMap<Ipv4Addr, Endpoint> = desired
            .endpoints
            .iter()
            .map(|(addr, v)| (*addr, without_inbound(*v)))
            .collect();
        let (write, remove) = diff(&desired_endpoints, &actual);
        for (addr, v) in &write {
            let key = EndpointKey {
                addr: addr.octets(),
            };
            let mut v = *v;
            if actual.contains_key(addr) && v.kind == ENDPOINT_KIND_POD {
                v.inbound_ports = u16::MAX;
            }
            self.endpoints
                .insert(key, v, 0)
                .map_err(DatapathError::map(MAP_ENDPOINTS))?;
        }
        for addr in &remove {
            let key = EndpointKey {
                addr: addr.octets(),
            };
            self.endpoints
                .remove(&key)
                .map_err(DatapathError::map(MAP_ENDPOINTS))?;
        }
        report.written += write.len();
        report.removed += remove.len();
        if !remove.is_empty() {
            let gone: BTreeSet<[u8; 4]> = remove.iter().map(Ipv4Addr::octets).collect();
            report.nat_purged += self.purge_nat(|key, entry| {
                gone.contains(&if key.dir == NAT_DIR_EGRESS {
                    key.src
                } else {
                    entry.addr
                })
            })?;
        }

        let mut cidrs_changed = false;
        for (trie, desired, name) in [
            (&mut self.vcn_cidrs, &desired.vcn_cidrs, MAP_VCN_CIDRS),
            (
                &mut self.nonmasq_cidrs,
                &desired.nonmasq_cidrs,
                MAP_NONMASQ_CIDRS,
            ),
        ] {
            let (w, r) = sync_trie(trie, desired, name)?;
            report.written += w;
            report.removed += r;
            cidrs_changed |= w + r > 0;
        }
        if cidrs_changed {
            // The programs look translated flows up before classifying the destination,
            // so flows towards destinations now inside the VCN (or excluded) must go, or
            // they would keep being masqueraded.
            let nonmasq: Vec<Ipv4Net> = desired
                .vcn_cidrs
                .iter()
                .chain(&desired.nonmasq_cidrs)
                .copied()
                .collect();
            report.nat_purged += self.purge_nat(|key, entry| {
                key.dir == NAT_DIR_EGRESS
                    && entry.flags & NAT_F_INBOUND == 0
                    && nonmasq
                        .iter()
                        .any(|net| net.contains(&Ipv4Addr::from(key.dst)))
            })?;
        }

        let current = self
            .config
            .get(&0, 0)
            .map_err(DatapathError::map(MAP_CONFIG))?;
        let wanted = desired.config.unwrap_or_default();
        if current != wanted {
            self.config
                .set(0, wanted, 0)
                .map_err(DatapathError::map(MAP_CONFIG))?;
            report.written += 1;
        }
        Ok(report)
    }

    /// Marks on each pod the classes of the ports that `inbound` records name
    /// ([`Endpoint::inbound_ports`]), so its answers find the records: for records an
    /// earlier release wrote, which never marked them, or that the programs attached before
    /// this agent's wrote meanwhile. The loader runs it before attaching and again once the
    /// first sync has attached everything. Returns how many pods it marked.
    pub fn mark_inbound_pods(&mut self) -> Result<usize, DatapathError> {
        let mut named: BTreeMap<[u8; 4], u16> = BTreeMap::new();
        BatchMap::new(&self.inbound)
            .and_then(|map| {
                map.for_each(BATCH_CHUNK, |key, _| {
                    *named.entry(key.src).or_default() |= inbound_port_bit(key.sport);
                })
            })
            .map_err(DatapathError::map(MAP_INBOUND))?;
        let mut marked = 0;
        for (addr, bits) in named {
            let key = EndpointKey { addr };
            let mut pod = match self.endpoints.get(&key, 0) {
                Ok(pod) => pod,
                // A record of a pod gone: the collector expires it.
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(DatapathError::map(MAP_ENDPOINTS)(e)),
            };
            if pod.kind != ENDPOINT_KIND_POD || pod.inbound_ports & bits == bits {
                continue;
            }
            pod.inbound_ports |= bits;
            self.endpoints
                .insert(key, pod, 0)
                .map_err(DatapathError::map(MAP_ENDPOINTS))?;
            marked += 1;
        }
        Ok(marked)
    }

    /// Deletes the NAT entries matching `doomed`, and the reply entry of every egress
    /// entry deleted when it translates back to that entry, so no half of a flow is left
    /// behind and no other flow's reply entry is taken.
    fn purge_nat(
        &mut self,
        doomed: impl Fn(&NatKey, &NatEntry) -> bool,
    ) -> Result<usize, DatapathError> {
        let mut keys = Vec::new();
        let mut replies = Vec::new();
        BatchMap::new(&self.nat)
            .and_then(|map| {
                map.for_each(BATCH_CHUNK, |key, entry| {
                    if doomed(key, entry) {
                        keys.push(*key);
                        if key.dir == NAT_DIR_EGRESS && entry.flags & NAT_F_INBOUND == 0 {
                            replies.push((reply_key(key, entry), key.src, key.sport));
                        }
                    }
                })
            })
            .map_err(DatapathError::map(MAP_NAT))?;
        for (reply, pod_addr, pod_port) in replies {
            match self.nat.get(&reply, 0) {
                Ok(back) if back.addr == pod_addr && back.port == pod_port => keys.push(reply),
                Ok(_) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(DatapathError::map(MAP_NAT)(e)),
            }
        }
        keys.sort_unstable_by_key(|k| (k.dir, k.src, k.dst, k.sport, k.dport, k.proto));
        keys.dedup();
        let mut removed = 0;
        for key in &keys {
            // Already gone (LRU eviction, or listed twice) is fine.
            if self.nat.remove(key).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// An entry as the agent writes it: without the programs' marks.
fn without_inbound(mut endpoint: Endpoint) -> Endpoint {
    endpoint.inbound_ports = 0;
    endpoint
}

/// Every entry of a hash map, read in batches (two syscalls per entry otherwise: a no-op
/// sync of 4096 endpoints took ~10 ms that way).
fn read_all<K: Ord + Pod + Default, V: Pod + Default>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<BTreeMap<K, V>, DatapathError> {
    let mut all = BTreeMap::new();
    BatchMap::new(map)
        .and_then(|map| {
            map.for_each(BATCH_CHUNK, |k, v| {
                all.insert(*k, *v);
            })
        })
        .map_err(DatapathError::map(name))?;
    Ok(all)
}

fn sync_trie(
    trie: &mut LpmTrie<MapData, [u8; 4], CidrValue>,
    desired: &BTreeSet<Ipv4Net>,
    name: &'static str,
) -> Result<(usize, usize), DatapathError> {
    let actual: BTreeSet<Ipv4Net> = trie
        .keys()
        .map(|k| {
            let k = k.map_err(DatapathError::map(name))?;
            Ok(Ipv4Net::new(Ipv4Addr::from(k.data()), k.prefix_len() as u8)
                .expect("the kernel only stores prefix lengths the trie accepted (<= 32)"))
        })
        .collect::<Result<_, DatapathError>>()?;
    let key = |net: &Ipv4Net| Key::new(u32::from(net.prefix_len()), net.network().octets());
    let mut written = 0;
    for net in desired.difference(&actual) {
        trie.insert(&key(net), 1, 0)
            .map_err(DatapathError::map(name))?;
        written += 1;
    }
    let mut removed = 0;
    for net in actual.difference(desired) {
        trie.remove(&key(net)).map_err(DatapathError::map(name))?;
        removed += 1;
    }
    Ok((written, removed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_writes_only_changes_and_removes_extras() {
        let desired = BTreeMap::from([(1, "a"), (2, "b"), (3, "c")]);
        let actual = BTreeMap::from([(1, "a"), (2, "x"), (4, "d")]);
        let (write, remove) = diff(&desired, &actual);
        assert_eq!(
            write,
            vec![(2, "b"), (3, "c")],
            "changed and new keys are written"
        );
        assert_eq!(remove, vec![4], "keys not desired are removed");
    }

    #[test]
    fn diff_of_equal_maps_is_empty() {
        let m = BTreeMap::from([(1, 1), (2, 2)]);
        assert_eq!(diff(&m, &m), (vec![], vec![]));
    }
}
