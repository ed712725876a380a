//! NAT garbage collection: the expiry rules. The programs stamp each entry with the time
//! it was last used and the TCP flags seen; the agent expires flows by protocol and TCP
//! state and always removes both directions of a flow together. Everything here is pure
//! (decisions on entries and a clock reading); [`super::collect`] streams the live tables
//! through it and deletes what it decides.

use std::{
    collections::{HashMap, hash_map::Entry},
    convert::Infallible,
    time::Duration,
};

use vcnpath_common::{
    NAT_DIR_EGRESS, NAT_DIR_INGRESS, NAT_F_ANSWERED, NAT_F_HOST, NAT_F_INBOUND, NatEntry, NatKey,
    TCP_SEEN_ACK, inbound_seen, tcp_closing,
    wire::{IPPROTO_ICMP, IPPROTO_TCP},
};

/// How long an idle flow lives, by protocol and TCP state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct NatTimeouts {
    /// TCP after both sides exchanged data.
    #[serde(with = "secs")]
    pub tcp_established: Duration,
    /// TCP before the handshake completed.
    #[serde(with = "secs")]
    pub tcp_opening: Duration,
    /// TCP after a RST or a FIN from both sides.
    #[serde(with = "secs")]
    pub tcp_closing: Duration,
    /// UDP.
    #[serde(with = "secs")]
    pub udp: Duration,
    /// ICMP echo.
    #[serde(with = "secs")]
    pub icmp: Duration,
    /// A flow opened from outside towards a pod that the pod has not answered yet (a
    /// spoofed flood's records, a probe of a closed port): gone after this, so such
    /// records make way quickly.
    #[serde(with = "secs")]
    pub inbound_unanswered: Duration,
}

impl Default for NatTimeouts {
    fn default() -> Self {
        Self {
            tcp_established: Duration::from_hours(6),
            tcp_opening: Duration::from_mins(1),
            tcp_closing: Duration::from_secs(10),
            udp: Duration::from_mins(1),
            icmp: Duration::from_secs(30),
            inbound_unanswered: Duration::from_secs(10),
        }
    }
}

mod secs {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        <u64 as serde::Deserialize>::deserialize(d).map(Duration::from_secs)
    }
}

/// Result of one collection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Entries read from the map.
    pub scanned: usize,
    /// Entries removed (not counting any another writer removed first).
    pub removed: usize,
}

/// The ingress key that pairs with an egress entry.
pub fn reply_key(egress: &NatKey, entry: &NatEntry) -> NatKey {
    NatKey {
        src: egress.dst,
        dst: entry.addr,
        sport: if egress.proto == IPPROTO_ICMP {
            0
        } else {
            egress.dport
        },
        dport: entry.port,
        proto: egress.proto,
        dir: NAT_DIR_INGRESS,
        pad: [0; 2],
    }
}

impl NatTimeouts {
    /// The idle timeout of a flow given the TCP flags seen each way. Closing is the
    /// datapath's own rule ([`tcp_closing`]): a flow it would reopen on a SYN is the
    /// flow collected after the closing timeout, and a half-close is not a close.
    pub fn for_flow(&self, proto: u8, out_seen: u8, back_seen: u8) -> Duration {
        match proto {
            IPPROTO_TCP => {
                if tcp_closing(out_seen, back_seen) {
                    self.tcp_closing
                } else if out_seen & back_seen & TCP_SEEN_ACK != 0 {
                    self.tcp_established
                } else {
                    self.tcp_opening
                }
            }
            IPPROTO_ICMP => self.icmp,
            _ => self.udp,
        }
    }

    /// The idle timeout of a flow opened from outside, whose one record holds each end's
    /// TCP flags apart ([`inbound_seen`]): closing as any flow is, established once either
    /// end sent a packet without SYN (records from before the split hold both ends in the
    /// outside's bits, and keep the timeouts they had). A record of `inbound` the pod has
    /// not answered yet lives no longer than `inbound_unanswered`.
    pub fn for_inbound(&self, proto: u8, tcp_seen: u8, unanswered: bool) -> Duration {
        let t = self.for_answered_inbound(proto, tcp_seen);
        if unanswered {
            t.min(self.inbound_unanswered)
        } else {
            t
        }
    }

    fn for_answered_inbound(&self, proto: u8, tcp_seen: u8) -> Duration {
        let (outside, pod) = inbound_seen(tcp_seen);
        if proto != IPPROTO_TCP || tcp_closing(outside, pod) {
            return self.for_flow(proto, outside, pod);
        }
        if (outside | pod) & TCP_SEEN_ACK != 0 {
            self.tcp_established
        } else {
            self.tcp_opening
        }
    }
}

/// Decides which keys of a whole table to delete. Pure, so it is unit-tested without a
/// kernel; [`DatapathMaps::collect_nat`] applies the same [`Collector`] to the live map.
pub fn expired<S: std::hash::BuildHasher>(
    entries: &HashMap<NatKey, NatEntry, S>,
    now_ns: u64,
    timeouts: &NatTimeouts,
) -> Vec<NatKey> {
    let mut collector = Collector::new(now_ns, timeouts);
    for (key, entry) in entries {
        collector.add(*key, *entry);
    }
    let Ok(doomed) = collector.finish(|key| Ok::<_, Infallible>(entries.get(key).copied()));
    doomed
}

/// Decides which records of the `inbound` table to delete: each record is its flow, so
/// no pairing is needed. Pure, as [`expired`]; [`DatapathMaps::collect_nat`] applies it to
/// the live map.
pub fn expired_inbound<'a>(
    records: impl IntoIterator<Item = (&'a NatKey, &'a NatEntry)>,
    now_ns: u64,
    timeouts: &NatTimeouts,
) -> Vec<NatKey> {
    let rules = Rules { now_ns, timeouts };
    records
        .into_iter()
        .filter(|(key, entry)| rules.inbound_expired(key, entry, true))
        .map(|(key, _)| *key)
        .collect()
}

/// What the expiry rules read of one entry of a translated flow. Both halves of a flow
/// are filed under the flow's reply key, which carries the rest.
#[derive(Clone, Copy)]
struct Half {
    last_seen_ns: u64,
    /// The pod end the entry names: an egress entry's source, an ingress entry's
    /// translation target. The two halves of one flow name the same.
    pod_addr: [u8; 4],
    pod_port: u16,
    tcp_seen: u8,
}

impl Half {
    fn egress(key: &NatKey, entry: &NatEntry) -> Self {
        Self {
            last_seen_ns: entry.last_seen_ns,
            pod_addr: key.src,
            pod_port: key.sport,
            tcp_seen: entry.tcp_seen,
        }
    }

    fn ingress(entry: &NatEntry) -> Self {
        Self {
            last_seen_ns: entry.last_seen_ns,
            pod_addr: entry.addr,
            pod_port: entry.port,
            tcp_seen: entry.tcp_seen,
        }
    }

    /// The reply entry `self` belongs to the egress entry `out` (it translates back to
    /// `out`'s source), so it is judged with `out` and never on its own.
    fn belongs_to(&self, out: &Half) -> bool {
        (self.pod_addr, self.pod_port) == (out.pod_addr, out.pod_port)
    }
}

/// The half of a translated flow met first, kept until the other half comes by.
enum Pending {
    /// An egress entry waiting for its reply entry, with what of its key the reply key
    /// does not hold (see [`egress_key`]).
    Egress {
        half: Half,
        dport: u16,
        pad: [u8; 2],
    },
    /// An ingress entry no egress entry has claimed yet.
    Ingress(Half),
}

/// The key of the egress entry filed as `half` under `reply`: the reply key holds its
/// destination address and protocol, but not its destination port for ICMP echo.
fn egress_key(reply: &NatKey, half: &Half, dport: u16, pad: [u8; 2]) -> NatKey {
    NatKey {
        src: half.pod_addr,
        dst: reply.src,
        sport: half.pod_port,
        dport,
        proto: reply.proto,
        dir: NAT_DIR_EGRESS,
        pad,
    }
}

/// The expiry rules at one instant.
struct Rules<'t> {
    now_ns: u64,
    timeouts: &'t NatTimeouts,
}

impl Rules<'_> {
    fn idle(&self, last_seen_ns: u64) -> Duration {
        Duration::from_nanos(self.now_ns.saturating_sub(last_seen_ns))
    }

    /// A flow opened from outside: one egress entry records both directions. `fresh`:
    /// a record of `inbound`, which says whether the pod answered (`NAT_F_ANSWERED`);
    /// records earlier releases kept in `nat` never said.
    fn inbound_expired(&self, key: &NatKey, entry: &NatEntry, fresh: bool) -> bool {
        let unanswered = fresh && entry.flags & NAT_F_ANSWERED == 0;
        let t = self
            .timeouts
            .for_inbound(key.proto, entry.tcp_seen, unanswered);
        self.idle(entry.last_seen_ns) > t
    }

    /// A translated flow, judged by its egress entry and the entry at its reply key (if
    /// any): the flow lives while either direction is used.
    fn flow_expired(&self, proto: u8, out: &Half, back: Option<&Half>) -> bool {
        let (back_seen, back_last) = back.map_or((0, 0), |b| (b.tcp_seen, b.last_seen_ns));
        let t = self.timeouts.for_flow(proto, out.tcp_seen, back_seen);
        self.idle(out.last_seen_ns.max(back_last)) > t
    }

    /// An ingress entry whose egress half is gone (LRU eviction, lost race) expires on its
    /// own, with the short timeout of its protocol.
    fn orphan_expired(&self, key: &NatKey, entry: &Half) -> bool {
        self.idle(entry.last_seen_ns) > self.timeouts.for_flow(key.proto, 0, 0)
    }
}

/// Applies the expiry rules to the NAT table streamed entry by entry, in any order, and
/// decides exactly what [`expired`] decides on the whole table at once.
///
/// The rules pair entries: a flow's egress entry and its reply entry expire together,
/// judged by both, and an ingress entry is judged alone only if no egress entry claims
/// it. So the collector files the half of each flow it meets first under the reply key
/// both halves name, and settles the flow when the other half comes by. It holds the
/// flows the stream position cuts in two (on the kernel's hash-ordered stream, at worst
/// about half of them, 40 bytes each), not the table; [`Collector::finish`] settles the
/// entries left without their other half.
pub struct Collector<'t> {
    rules: Rules<'t>,
    /// By reply (ingress) key.
    pending: HashMap<NatKey, Pending>,
    /// Egress entries naming a reply key another egress entry already waits on: the
    /// stale egress half of a flow whose reply entry was evicted and its port reused.
    crowded: Vec<(NatKey, NatEntry)>,
    doomed: Vec<NatKey>,
    scanned: usize,
}

impl<'t> Collector<'t> {
    pub fn new(now_ns: u64, timeouts: &'t NatTimeouts) -> Self {
        Self {
            rules: Rules { now_ns, timeouts },
            pending: HashMap::new(),
            crowded: Vec::new(),
            doomed: Vec::new(),
            scanned: 0,
        }
    }

    /// Entries streamed so far.
    pub fn scanned(&self) -> usize {
        self.scanned
    }

    /// Takes the next entry of the table.
    pub fn add(&mut self, key: NatKey, entry: NatEntry) {
        self.scanned += 1;
        match key.dir {
            NAT_DIR_EGRESS if entry.flags & NAT_F_INBOUND != 0 => self.add_inbound(key, entry),
            NAT_DIR_EGRESS => self.add_egress(key, entry),
            NAT_DIR_INGRESS if entry.flags & NAT_F_HOST != 0 => self.add_host(key, entry),
            NAT_DIR_INGRESS => self.add_ingress(key, entry),
            _ => {}
        }
    }

    /// A flow opened from outside has no second half to wait for.
    fn add_inbound(&mut self, key: NatKey, entry: NatEntry) {
        if self.rules.inbound_expired(&key, &entry, false) {
            self.doomed.push(key);
        }
    }

    /// The host's own flow is one ingress-keyed record with both ends' flags, as a flow
    /// opened from outside: nothing to pair it with.
    fn add_host(&mut self, key: NatKey, entry: NatEntry) {
        if self.rules.inbound_expired(&key, &entry, false) {
            self.doomed.push(key);
        }
    }

    fn add_egress(&mut self, key: NatKey, entry: NatEntry) {
        let out = Half::egress(&key, &entry);
        match self.pending.entry(reply_key(&key, &entry)) {
            Entry::Vacant(slot) => {
                slot.insert(Pending::Egress {
                    half: out,
                    dport: key.dport,
                    pad: key.pad,
                });
            }
            Entry::Occupied(slot) => match *slot.get() {
                Pending::Ingress(back) => {
                    let (rules, doomed) = (&self.rules, &mut self.doomed);
                    if settle(rules, doomed, slot.key(), &key, &out, Some(&back)) {
                        slot.remove();
                    }
                }
                Pending::Egress { .. } => self.crowded.push((key, entry)),
            },
        }
    }

    fn add_ingress(&mut self, key: NatKey, entry: NatEntry) {
        let back = Half::ingress(&entry);
        if let Some(Pending::Egress { half, dport, pad }) = self.pending.remove(&key) {
            let out_key = egress_key(&key, &half, dport, pad);
            if settle(
                &self.rules,
                &mut self.doomed,
                &key,
                &out_key,
                &half,
                Some(&back),
            ) {
                return;
            }
        }
        self.pending.insert(key, Pending::Ingress(back));
    }

    /// Settles what the stream left open and returns the keys to delete (a key may appear
    /// twice). `lookup` reads one entry of the table: the reply entry of an egress entry
    /// whose reply never came by (usually gone; read rather than assumed absent because
    /// another egress entry may have claimed it earlier in the stream).
    pub fn finish<E>(
        self,
        mut lookup: impl FnMut(&NatKey) -> Result<Option<NatEntry>, E>,
    ) -> Result<Vec<NatKey>, E> {
        let Self {
            rules,
            mut pending,
            crowded,
            mut doomed,
            ..
        } = self;
        for (key, entry) in crowded {
            let reply = reply_key(&key, &entry);
            let back = match pending.get(&reply) {
                Some(Pending::Ingress(back)) => Some(*back),
                Some(Pending::Egress { .. }) | None => lookup(&reply)?.as_ref().map(Half::ingress),
            };
            let out = Half::egress(&key, &entry);
            if settle(&rules, &mut doomed, &reply, &key, &out, back.as_ref())
                && matches!(pending.get(&reply), Some(Pending::Ingress(_)))
            {
                // Claimed: no orphan after all.
                pending.remove(&reply);
            }
        }
        for (reply, half) in pending {
            match half {
                Pending::Egress { half, dport, pad } => {
                    let back = lookup(&reply)?.as_ref().map(Half::ingress);
                    let out_key = egress_key(&reply, &half, dport, pad);
                    settle(&rules, &mut doomed, &reply, &out_key, &half, back.as_ref());
                }
                Pending::Ingress(back) => {
                    if rules.orphan_expired(&reply, &back) {
                        doomed.push(reply);
                    }
                }
            }
        }
        Ok(doomed)
    }
}

/// Judges the flow of the egress entry `out` (at `out_key`) with `back`, the entry at its
/// reply key `reply` if there is one and it translates back to `out`; dooms both if the
/// flow expired. A reply entry of another flow (the stale egress half of an evicted flow
/// whose port was reused) is neither read nor removed: it is that flow's. Returns whether
/// `out` claims `back`.
fn settle(
    rules: &Rules<'_>,
    doomed: &mut Vec<NatKey>,
    reply: &NatKey,
    out_key: &NatKey,
    out: &Half,
    back: Option<&Half>,
) -> bool {
    let back = back.filter(|back| back.belongs_to(out));
    if rules.flow_expired(reply.proto, out, back) {
        doomed.push(*out_key);
        if back.is_some() {
            doomed.push(*reply);
        }
    }
    back.is_some()
}

#[cfg(test)]
mod tests {
    use rand::Rng;
    use vcnpath_common::{NAT_DIR_EGRESS, TCP_SEEN_FIN, TCP_SEEN_RST, TCP_SEEN_SYN};

    use super::*;

    const S: u64 = 1_000_000_000;

    fn flow(proto: u8, last: u64, out_seen: u8, back_seen: u8) -> HashMap<NatKey, NatEntry> {
        let out = NatKey {
            src: [10, 0, 1, 20],
            dst: [203, 0, 113, 10],
            sport: 40000,
            dport: 443,
            proto,
            dir: NAT_DIR_EGRESS,
            pad: [0; 2],
        };
        let out_e = NatEntry {
            last_seen_ns: last,
            addr: [10, 0, 0, 10],
            port: 40000,
            tcp_seen: out_seen,
            ..Default::default()
        };
        let back = reply_key(&out, &out_e);
        let back_e = NatEntry {
            last_seen_ns: last,
            addr: out.src,
            port: out.sport,
            tcp_seen: back_seen,
            ..Default::default()
        };
        HashMap::from([(out, out_e), (back, back_e)])
    }

    /// A record of the host's own flow (`NAT_F_HOST`) is ingress-keyed with no egress half:
    /// it lives by its own TCP flags (the host's shifted, the remote's as they are), not as
    /// an orphan reply entry, which would go after the opening timeout.
    #[test]
    fn a_host_flow_lives_by_its_own_flags() {
        use vcnpath_common::{TCP_SEEN_ACK, TCP_SEEN_POD_SHIFT};
        let t = NatTimeouts::default();
        let key = NatKey {
            src: [203, 0, 113, 10],
            dst: [10, 0, 0, 10],
            sport: 443,
            dport: 61_500,
            proto: IPPROTO_TCP,
            dir: NAT_DIR_INGRESS,
            pad: [0; 2],
        };
        let host = |tcp_seen: u8| NatEntry {
            last_seen_ns: 0,
            addr: key.dst,
            port: key.dport,
            flags: NAT_F_HOST,
            tcp_seen,
        };
        let established = TCP_SEEN_ACK | (TCP_SEEN_ACK << TCP_SEEN_POD_SHIFT);
        let opening = TCP_SEEN_SYN << TCP_SEEN_POD_SHIFT;
        let hour = 3600 * S;
        let table = HashMap::from([(key, host(established))]);
        assert!(
            expired(&table, hour, &t).is_empty(),
            "an established host flow idle for an hour stays"
        );
        let table = HashMap::from([(key, host(opening))]);
        assert_eq!(
            expired(&table, 2 * 60 * S, &t),
            vec![key],
            "an unanswered SYN goes"
        );
    }

    #[test]
    fn established_tcp_survives_an_hour_idle_and_both_halves_go_together() {
        let t = NatTimeouts::default();
        let est = TCP_SEEN_SYN | TCP_SEEN_ACK;
        let entries = flow(IPPROTO_TCP, 0, est, est);
        assert!(
            expired(&entries, 3600 * S, &t).is_empty(),
            "an established flow idle 1 h must stay"
        );
        let doomed = expired(&entries, 7 * 3600 * S, &t);
        assert_eq!(
            doomed.len(),
            2,
            "after 7 h both directions go, got {doomed:?}"
        );
    }

    #[test]
    fn unanswered_syn_and_reset_flows_expire_quickly() {
        let t = NatTimeouts::default();
        assert_eq!(
            expired(&flow(IPPROTO_TCP, 0, TCP_SEEN_SYN, 0), 61 * S, &t).len(),
            2
        );
        let rst = flow(IPPROTO_TCP, 0, TCP_SEEN_ACK | TCP_SEEN_RST, TCP_SEEN_ACK);
        assert_eq!(expired(&rst, 11 * S, &t).len(), 2);
    }

    #[test]
    fn a_half_close_is_not_a_close_and_a_fin_both_ways_is() {
        let t = NatTimeouts::default();
        let est = TCP_SEEN_SYN | TCP_SEEN_ACK;
        let half = flow(IPPROTO_TCP, 0, est | TCP_SEEN_FIN, est);
        assert!(
            expired(&half, 11 * S, &t).is_empty(),
            "a FIN one way leaves the other sending: established, not closing"
        );
        let closed = flow(IPPROTO_TCP, 0, est | TCP_SEEN_FIN, est | TCP_SEEN_FIN);
        assert_eq!(expired(&closed, 11 * S, &t).len(), 2);
    }

    #[test]
    fn an_inbound_half_close_is_not_a_close() {
        let t = NatTimeouts::default();
        let est = TCP_SEEN_SYN | TCP_SEEN_ACK;
        let pod = |bits: u8| bits << vcnpath_common::TCP_SEEN_POD_SHIFT;
        let inbound = |tcp_seen| {
            let key = NatKey {
                src: [10, 0, 1, 20],
                dst: [203, 0, 113, 10],
                sport: 8080,
                dport: 50000,
                proto: IPPROTO_TCP,
                dir: NAT_DIR_EGRESS,
                pad: [0; 2],
            };
            let entry = NatEntry {
                addr: key.src,
                port: key.sport,
                flags: NAT_F_INBOUND,
                tcp_seen,
                ..Default::default()
            };
            HashMap::from([(key, entry)])
        };
        for (seen, what) in [
            (est | TCP_SEEN_FIN | pod(est), "the outside's FIN"),
            (est | pod(est | TCP_SEEN_FIN), "the pod's FIN"),
            (
                est | TCP_SEEN_FIN,
                "a FIN in a record from before the split",
            ),
        ] {
            assert!(
                expired(&inbound(seen), 3600 * S, &t).is_empty(),
                "{what} alone is a half-close: the flow stays established"
            );
        }
        let both = est | TCP_SEEN_FIN | pod(est | TCP_SEEN_FIN);
        assert_eq!(expired(&inbound(both), 11 * S, &t).len(), 1);
        let rst = est | pod(TCP_SEEN_RST);
        assert_eq!(expired(&inbound(rst), 11 * S, &t).len(), 1);
    }

    /// Issue 11 (3): a record the pod never answered (a spoofed SYN, a probe of a closed
    /// port) goes after `inbound_unanswered`; once the pod answered it lives by its
    /// protocol's timeout. Records earlier releases kept in `nat` never said whether the
    /// pod answered, and keep the timeouts they had.
    #[test]
    fn an_unanswered_inbound_record_goes_after_the_short_timeout_and_an_answered_one_stays() {
        let t = NatTimeouts::default();
        let record = |proto, tcp_seen, flags| {
            let key = NatKey {
                src: [10, 0, 1, 20],
                dst: [198, 51, 100, 7],
                sport: 53,
                dport: 40000,
                proto,
                dir: NAT_DIR_EGRESS,
                pad: [0; 2],
            };
            let entry = NatEntry {
                addr: key.src,
                port: key.sport,
                flags,
                tcp_seen,
                ..Default::default()
            };
            (key, entry)
        };
        let pod = |bits: u8| bits << vcnpath_common::TCP_SEEN_POD_SHIFT;
        let unanswered = [
            record(IPPROTO_TCP, TCP_SEEN_SYN, NAT_F_INBOUND),
            record(17, 0, NAT_F_INBOUND),
        ];
        let answered = [
            record(
                IPPROTO_TCP,
                TCP_SEEN_SYN | pod(TCP_SEEN_SYN | TCP_SEEN_ACK),
                NAT_F_INBOUND | NAT_F_ANSWERED,
            ),
            record(17, 0, NAT_F_INBOUND | NAT_F_ANSWERED),
        ];
        let at = |secs: u64, records: &[(NatKey, NatEntry)]| {
            expired_inbound(records.iter().map(|(k, e)| (k, e)), secs * S, &t).len()
        };
        assert_eq!(at(9, &unanswered), 0, "within the short timeout");
        assert_eq!(at(11, &unanswered), 2, "unanswered records go after 10 s");
        assert_eq!(
            at(11, &answered),
            0,
            "answered records live by their protocol"
        );
        assert_eq!(
            at(61, &answered),
            1,
            "UDP after its minute, TCP opening after its"
        );
        let legacy: HashMap<_, _> = unanswered.into_iter().collect();
        assert!(
            expired(&legacy, 11 * S, &t).is_empty(),
            "a record in `nat` from an earlier release keeps its timeout"
        );
    }

    #[test]
    fn udp_lives_by_its_own_timeout_and_recent_replies_keep_it() {
        let t = NatTimeouts::default();
        assert!(expired(&flow(17, 0, 0, 0), 59 * S, &t).is_empty());
        assert_eq!(expired(&flow(17, 0, 0, 0), 61 * S, &t).len(), 2);
    }

    #[test]
    fn orphaned_reply_entries_expire() {
        let t = NatTimeouts::default();
        let mut entries = flow(17, 0, 0, 0);
        entries.retain(|k, _| k.dir == NAT_DIR_INGRESS);
        assert_eq!(expired(&entries, 61 * S, &t).len(), 1);
    }

    #[test]
    fn a_stale_egress_entry_never_takes_the_reply_entry_of_the_flow_that_reused_its_port() {
        let t = NatTimeouts::default();
        let est = TCP_SEEN_SYN | TCP_SEEN_ACK;
        // A live established flow, last used 30 s ago.
        let mut entries = flow(IPPROTO_TCP, 100 * S, est, est);
        // A reset flow of another pod whose reply entry was evicted, and whose port the
        // live flow then claimed: its egress entry names the live flow's reply key.
        let stale = NatKey {
            src: [10, 0, 1, 21],
            dst: [203, 0, 113, 10],
            sport: 50000,
            dport: 443,
            proto: IPPROTO_TCP,
            dir: NAT_DIR_EGRESS,
            pad: [0; 2],
        };
        let stale_e = NatEntry {
            last_seen_ns: 0,
            addr: [10, 0, 0, 10],
            port: 40000,
            tcp_seen: TCP_SEEN_ACK | TCP_SEEN_RST,
            ..Default::default()
        };
        assert!(entries.contains_key(&reply_key(&stale, &stale_e)));
        entries.insert(stale, stale_e);
        let doomed = expired(&entries, 130 * S, &t);
        assert_eq!(
            doomed,
            vec![stale],
            "only the stale egress entry goes; the live flow keeps its reply entry"
        );
    }

    /// The rules as written before the collector streamed: a whole-table pass that marks
    /// claimed reply entries, then a pass over the unclaimed ones.
    fn whole_table_reference(
        entries: &HashMap<NatKey, NatEntry>,
        now_ns: u64,
        timeouts: &NatTimeouts,
    ) -> std::collections::HashSet<NatKey> {
        let idle = |last: u64| Duration::from_nanos(now_ns.saturating_sub(last));
        let mut doomed = std::collections::HashSet::new();
        let mut paired = std::collections::HashSet::new();
        for (key, entry) in entries.iter().filter(|(k, _)| k.dir == NAT_DIR_EGRESS) {
            if entry.flags & NAT_F_INBOUND != 0 {
                let t = timeouts.for_inbound(key.proto, entry.tcp_seen, false);
                if idle(entry.last_seen_ns) > t {
                    doomed.insert(*key);
                }
                continue;
            }
            let reply = reply_key(key, entry);
            let back = entries
                .get(&reply)
                .filter(|b| b.addr == key.src && b.port == key.sport);
            if back.is_some() {
                paired.insert(reply);
            }
            let (back_seen, back_last) = back.map_or((0, 0), |b| (b.tcp_seen, b.last_seen_ns));
            let t = timeouts.for_flow(key.proto, entry.tcp_seen, back_seen);
            if idle(entry.last_seen_ns.max(back_last)) > t {
                doomed.insert(*key);
                if back.is_some() {
                    doomed.insert(reply);
                }
            }
        }
        for (key, entry) in entries.iter().filter(|(k, _)| k.dir == NAT_DIR_INGRESS) {
            if !paired.contains(key)
                && idle(entry.last_seen_ns) > timeouts.for_flow(key.proto, 0, 0)
            {
                doomed.insert(*key);
            }
        }
        doomed
    }

    /// A table with every shape the rules distinguish, drawn from few addresses and ports
    /// so reply keys collide: whole flows, flows missing their reply entry, reply entries
    /// pointing at another flow, orphaned reply entries, flows opened from outside.
    fn messy_table(rng: &mut impl Rng, flows: usize) -> HashMap<NatKey, NatEntry> {
        const PROTOS: [u8; 3] = [IPPROTO_TCP, 17, IPPROTO_ICMP];
        let mut table = HashMap::new();
        for _ in 0..flows {
            let proto = PROTOS[rng.gen_range(0..3)];
            let out = NatKey {
                src: [10, 0, 1, rng.gen_range(20..23)],
                dst: [203, 0, 113, rng.gen_range(10..12)],
                sport: rng.gen_range(40000..40004),
                dport: if proto == IPPROTO_ICMP {
                    rng.gen_range(0..2)
                } else {
                    443
                },
                proto,
                dir: NAT_DIR_EGRESS,
                pad: [0; 2],
            };
            let out_e = NatEntry {
                last_seen_ns: rng.gen_range(0..100) * S,
                addr: [10, 0, 0, 10],
                port: rng.gen_range(1024..1028),
                flags: u8::from(rng.gen_bool(0.1)) * NAT_F_INBOUND,
                tcp_seen: rng.gen_range(0..16),
            };
            table.insert(out, out_e);
            let back = reply_key(&out, &out_e);
            let (addr, port) = if rng.gen_bool(0.8) {
                (out.src, out.sport)
            } else {
                ([10, 0, 1, 99], 7)
            };
            if rng.gen_bool(0.85) {
                let back_e = NatEntry {
                    last_seen_ns: rng.gen_range(0..100) * S,
                    addr,
                    port,
                    tcp_seen: rng.gen_range(0..16),
                    ..Default::default()
                };
                table.insert(back, back_e);
            }
        }
        table
    }

    #[test]
    fn a_pending_half_flow_takes_40_bytes_with_its_key() {
        // The figure the collector's documentation gives for its memory.
        assert_eq!(size_of::<(NatKey, Pending)>(), 40);
    }

    #[test]
    fn streaming_in_any_order_decides_exactly_what_the_whole_table_rules_decide() {
        use rand::{SeedableRng as _, seq::SliceRandom as _};

        let t = NatTimeouts {
            tcp_established: Duration::from_secs(80),
            tcp_opening: Duration::from_secs(40),
            tcp_closing: Duration::from_secs(10),
            udp: Duration::from_secs(30),
            icmp: Duration::from_secs(20),
            inbound_unanswered: Duration::from_secs(5),
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for round in 0..200 {
            let flows = rng.gen_range(1..60);
            let table = messy_table(&mut rng, flows);
            let want = whole_table_reference(&table, 100 * S, &t);
            let mut stream: Vec<_> = table.iter().map(|(k, e)| (*k, *e)).collect();
            for _ in 0..5 {
                stream.shuffle(&mut rng);
                let mut collector = Collector::new(100 * S, &t);
                for (key, entry) in &stream {
                    collector.add(*key, *entry);
                }
                let Ok(doomed) =
                    collector.finish(|key| Ok::<_, Infallible>(table.get(key).copied()));
                let got: std::collections::HashSet<NatKey> = doomed.into_iter().collect();
                assert_eq!(
                    got, want,
                    "round {round}: streaming {stream:?} must doom what the whole-table rules doom"
                );
            }
        }
    }
}
