//! NAT garbage collection. The programs stamp each entry with the time it was last used
//! and the TCP flags seen; the agent expires flows by protocol and TCP state and always
//! removes both directions of a flow together.

use std::{collections::HashMap, time::Duration};

use vcnpath_common::{
    MAP_NAT, NAT_DIR_EGRESS, NAT_DIR_INGRESS, NAT_F_INBOUND, NatEntry, NatKey, TCP_SEEN_ACK,
    TCP_SEEN_FIN, TCP_SEEN_RST,
};

use super::{DatapathError, DatapathMaps};

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;

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
}

impl Default for NatTimeouts {
    fn default() -> Self {
        Self {
            tcp_established: Duration::from_hours(6),
            tcp_opening: Duration::from_mins(1),
            tcp_closing: Duration::from_secs(10),
            udp: Duration::from_mins(1),
            icmp: Duration::from_secs(30),
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
    /// Entries in the map before collecting.
    pub scanned: usize,
    /// Entries removed.
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
    /// The idle timeout of a flow given the TCP flags seen each way.
    pub fn for_flow(&self, proto: u8, out_seen: u8, back_seen: u8) -> Duration {
        match proto {
            IPPROTO_TCP => {
                let both = out_seen | back_seen;
                if both & TCP_SEEN_RST != 0 || (out_seen & back_seen & TCP_SEEN_FIN != 0) {
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
}

/// Decides which keys to delete. Pure, so it is unit-tested without a kernel.
pub fn expired<S: std::hash::BuildHasher>(
    entries: &HashMap<NatKey, NatEntry, S>,
    now_ns: u64,
    timeouts: &NatTimeouts,
) -> Vec<NatKey> {
    let idle = |last: u64| Duration::from_nanos(now_ns.saturating_sub(last));
    let mut doomed = Vec::new();
    let mut paired = std::collections::HashSet::new();
    for (key, entry) in entries.iter().filter(|(k, _)| k.dir == NAT_DIR_EGRESS) {
        if entry.flags & NAT_F_INBOUND != 0 {
            // One entry records both directions of a flow opened from outside.
            let t = timeouts.for_flow(key.proto, entry.tcp_seen, entry.tcp_seen);
            if idle(entry.last_seen_ns) > t {
                doomed.push(*key);
            }
            continue;
        }
        let reply = reply_key(key, entry);
        let back = entries.get(&reply);
        if back.is_some_and(|b| b.addr == key.src && b.port == key.sport) {
            paired.insert(reply);
        }
        let (back_seen, back_last) = back.map_or((0, 0), |b| (b.tcp_seen, b.last_seen_ns));
        let t = timeouts.for_flow(key.proto, entry.tcp_seen, back_seen);
        if idle(entry.last_seen_ns.max(back_last)) > t {
            doomed.push(*key);
            if back.is_some() {
                doomed.push(reply);
            }
        }
    }
    // Ingress entries whose egress half is gone (LRU eviction, lost race) expire on
    // their own, with the short timeout of their protocol.
    for (key, entry) in entries.iter().filter(|(k, _)| k.dir == NAT_DIR_INGRESS) {
        if !paired.contains(key) {
            let t = timeouts.for_flow(key.proto, 0, 0);
            if idle(entry.last_seen_ns) > t {
                doomed.push(*key);
            }
        }
    }
    doomed
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    // CLOCK_MONOTONIC is never negative.
    ts.tv_sec.unsigned_abs() * 1_000_000_000 + ts.tv_nsec.unsigned_abs()
}

impl DatapathMaps {
    /// Removes expired NAT entries.
    pub fn collect_nat(&mut self, timeouts: &NatTimeouts) -> Result<GcReport, DatapathError> {
        let entries: HashMap<NatKey, NatEntry> = self
            .nat
            .iter()
            .collect::<Result<_, _>>()
            .map_err(DatapathError::map(MAP_NAT))?;
        let doomed = expired(&entries, monotonic_now_ns(), timeouts);
        for key in &doomed {
            // Gone already (evicted, or a program raced us) is fine.
            let _ = self.nat.remove(key);
        }
        Ok(GcReport {
            scanned: entries.len(),
            removed: doomed.len(),
        })
    }

    /// Number of entries in the NAT table.
    pub fn nat_len(&self) -> usize {
        self.nat.keys().count()
    }
}

#[cfg(test)]
mod tests {
    use vcnpath_common::{NAT_DIR_EGRESS, TCP_SEEN_SYN};

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
}
