//! NAT garbage collection on a loaded NAT table: the agent's collector, run against the
//! kernel map, removes exactly the expired flows and nothing else, on a table larger than
//! one batch of the collector's reads and deletes.

use std::{collections::HashMap, net::Ipv4Addr, time::Duration};

use aya::maps::MapError;
use vcnpath::datapath::{NatTimeouts, monotonic_now_ns};
use vcnpath_common::{
    NAT_DIR_EGRESS, NAT_DIR_INGRESS, NAT_F_INBOUND, NAT_MAX, NatEntry, NatKey, TCP_SEEN_ACK,
    TCP_SEEN_RST, TCP_SEEN_SYN,
};
use vcnpath_tests::{
    datapath_fixture::{Fixture, MASQ},
    privileged::have_root,
};

const S: u64 = 1_000_000_000;
/// The time unit of the shapes and timeouts below. Three seconds, so a live entry outlives
/// its timeout by at least 9 s: inserting 10,500 entries took over 6 s in an emulated VM on
/// a loaded host.
const UNIT: u64 = 3 * S;
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const EST: u8 = TCP_SEEN_SYN | TCP_SEEN_ACK;

/// Short, distinct timeouts, so a flow's state decides its fate within seconds of idling.
fn timeouts() -> NatTimeouts {
    let units = |n: u64| Duration::from_nanos(n * UNIT);
    NatTimeouts {
        tcp_established: units(20),
        tcp_opening: units(10),
        tcp_closing: units(4),
        udp: units(8),
        icmp: units(6),
        inbound_unanswered: units(3),
    }
}

/// What the table holds of one flow, and how long each half has been idle (in [`UNIT`]s).
#[derive(Clone, Copy)]
enum Shape {
    /// Egress and reply entries.
    Both {
        proto: u8,
        out_idle: u64,
        back_idle: u64,
        out_seen: u8,
        back_seen: u8,
    },
    /// A flow opened from outside: one egress entry for both directions.
    Inbound { proto: u8, idle: u64, seen: u8 },
    /// Only the egress entry (its reply entry was evicted).
    EgressOnly { proto: u8, idle: u64 },
    /// Only the reply entry (its egress entry was evicted).
    ReplyOnly { proto: u8, idle: u64 },
}

/// Every shape with the fate the expiry rules give it (true: expired).
const SHAPES: [(Shape, bool); 13] = [
    (udp(0, 0), false),
    // A recent reply keeps the whole flow.
    (udp(60, 2), false),
    (udp(12, 12), true),
    // Established TCP idle 15 units lives (20); the same idle kills an opening flow (10).
    (tcp(15, EST, EST), false),
    (tcp(15, TCP_SEEN_SYN, 0), true),
    (tcp(6, EST | TCP_SEEN_RST, EST), true),
    (
        Shape::Both {
            proto: ICMP,
            out_idle: 7,
            back_idle: 7,
            out_seen: 0,
            back_seen: 0,
        },
        true,
    ),
    (
        Shape::Both {
            proto: ICMP,
            out_idle: 3,
            back_idle: 3,
            out_seen: 0,
            back_seen: 0,
        },
        false,
    ),
    (
        Shape::Inbound {
            proto: TCP,
            idle: 15,
            seen: EST,
        },
        false,
    ),
    (
        Shape::Inbound {
            proto: UDP,
            idle: 12,
            seen: 0,
        },
        true,
    ),
    (
        Shape::ReplyOnly {
            proto: UDP,
            idle: 12,
        },
        true,
    ),
    (
        Shape::ReplyOnly {
            proto: UDP,
            idle: 2,
        },
        false,
    ),
    (
        Shape::EgressOnly {
            proto: UDP,
            idle: 12,
        },
        true,
    ),
];

const fn udp(out_idle: u64, back_idle: u64) -> Shape {
    Shape::Both {
        proto: UDP,
        out_idle,
        back_idle,
        out_seen: 0,
        back_seen: 0,
    }
}

const fn tcp(idle: u64, out_seen: u8, back_seen: u8) -> Shape {
    Shape::Both {
        proto: TCP,
        out_idle: idle,
        back_idle: idle,
        out_seen,
        back_seen,
    }
}

/// The entries of flow number `n` in `shape`, as the datapath writes them: pod port `p`
/// to a remote, translated to the masquerade address keeping `p`.
fn entries(n: u32, shape: Shape, now_ns: u64) -> Vec<(NatKey, NatEntry)> {
    let pod = Ipv4Addr::new(10, 0, 1, 30).octets();
    let remote = Ipv4Addr::from(u32::from_be_bytes([198, 18, 0, 0]) + n / 60_000).octets();
    let port = 1024 + u16::try_from(n % 60_000).expect("port");
    let proto = match shape {
        Shape::Both { proto, .. }
        | Shape::Inbound { proto, .. }
        | Shape::EgressOnly { proto, .. }
        | Shape::ReplyOnly { proto, .. } => proto,
    };
    let out = NatKey {
        src: pod,
        dst: remote,
        sport: port,
        dport: if proto == ICMP { 0 } else { 443 },
        proto,
        dir: NAT_DIR_EGRESS,
        pad: [0; 2],
    };
    let back = NatKey {
        src: remote,
        dst: MASQ.octets(),
        sport: if proto == ICMP { 0 } else { 443 },
        dport: port,
        proto,
        dir: NAT_DIR_INGRESS,
        pad: [0; 2],
    };
    let stamp = |idle: u64, addr: [u8; 4], seen: u8| NatEntry {
        last_seen_ns: now_ns - idle * UNIT,
        addr,
        port,
        flags: 0,
        tcp_seen: seen,
    };
    match shape {
        Shape::Both {
            out_idle,
            back_idle,
            out_seen,
            back_seen,
            ..
        } => vec![
            (out, stamp(out_idle, MASQ.octets(), out_seen)),
            (back, stamp(back_idle, pod, back_seen)),
        ],
        Shape::Inbound { idle, seen, .. } => vec![(
            out,
            NatEntry {
                flags: NAT_F_INBOUND,
                ..stamp(idle, pod, seen)
            },
        )],
        Shape::EgressOnly { idle, .. } => vec![(out, stamp(idle, MASQ.octets(), 0))],
        Shape::ReplyOnly { idle, .. } => vec![(back, stamp(idle, pod, 0))],
    }
}

#[test]
fn collection_removes_exactly_the_expired_flows_of_a_table_larger_than_a_batch() {
    if !have_root("nat_gc_batches") {
        return;
    }
    // Entries are stamped up to 190 s in the past and CLOCK_MONOTONIC starts at boot: on a
    // machine booted moments ago (the VM tier) wait until the past exists.
    let wanted = 200 * S;
    let since_boot = monotonic_now_ns();
    if since_boot < wanted {
        let wait = Duration::from_nanos(wanted - since_boot);
        eprintln!(
            "nat_gc_batches: the machine booted {} s ago; waiting {} s so entries can be stamped 190 s in the past",
            since_boot / S,
            wait.as_secs()
        );
        std::thread::sleep(wait);
    }
    let now_ns = monotonic_now_ns();
    let mut fx = Fixture::with_nat_capacity("natgc", 1024, 65535, NAT_MAX);
    let nat = fx.datapath.maps.flow_tables().nat;

    // 10,500 entries: more than two of the collector's 4,096-entry batches, both
    // directions of every flow scattered over the hash buckets.
    let mut live = HashMap::new();
    let mut expired = HashMap::new();
    for n in 0..500 * SHAPES.len() as u32 {
        let (shape, dies) = SHAPES[n as usize % SHAPES.len()];
        for (key, entry) in entries(n, shape, now_ns) {
            nat.insert(key, entry, 0)
                .unwrap_or_else(|e| panic!("inserting {key:?}: {e}"));
            if dies {
                expired.insert(key, entry);
            } else {
                live.insert(key, entry);
            }
        }
    }
    let total = live.len() + expired.len();
    assert!(total >= 10_000, "only {total} entries");
    assert_eq!(
        fx.datapath.maps.nat_len(),
        total,
        "the table must hold every entry inserted (none evicted) before collecting"
    );

    let report = fx
        .datapath
        .maps
        .collect_nat(&timeouts())
        .unwrap_or_else(|e| panic!("collecting: {e}"));
    assert_eq!(
        (report.scanned, report.removed),
        (total, expired.len()),
        "expected to read all {total} entries and remove the {} expired ones",
        expired.len()
    );
    let nat = fx.datapath.maps.flow_tables().nat;
    for (key, entry) in &live {
        match nat.get(key, 0) {
            Ok(got) => assert_eq!(got, *entry, "live entry {key:?} changed"),
            Err(e) => panic!("live entry {key:?} must stay, lookup says {e}"),
        }
    }
    for key in expired.keys() {
        assert!(
            matches!(nat.get(key, 0), Err(MapError::KeyNotFound)),
            "expired entry {key:?} must be gone"
        );
    }
    assert_eq!(fx.datapath.maps.nat_len(), live.len());

    let again = fx
        .datapath
        .maps
        .collect_nat(&timeouts())
        .unwrap_or_else(|e| panic!("collecting again: {e}"));
    assert_eq!(
        (again.scanned, again.removed),
        (live.len(), 0),
        "a second collection must find only the live entries and remove nothing"
    );
}

/// A pod's removal purges its flows' entries, but never a reply entry that translates to
/// another pod: after an LRU eviction and a port reuse, the removed pod's stale egress
/// entry names the reply key of the flow that now owns the port.
#[test]
fn removing_a_pod_keeps_the_reply_entry_another_pods_flow_reused() {
    use vcnpath_tests::datapath_fixture::{POD1, POD1B, REMOTE, state};
    if !have_root("removing_a_pod_keeps_the_reply_entry_another_pods_flow_reused") {
        return;
    }
    let mut fx = Fixture::new("gc-purge", 1024, 65535);
    let now = monotonic_now_ns();
    let key = |src: Ipv4Addr, sport, dir| NatKey {
        src: src.octets(),
        dst: REMOTE.octets(),
        sport,
        dport: 443,
        proto: TCP,
        dir,
        pad: [0; 2],
    };
    let entry = |addr: Ipv4Addr, port| NatEntry {
        last_seen_ns: now,
        addr: addr.octets(),
        port,
        flags: 0,
        tcp_seen: EST,
    };
    let live_out = key(POD1, 40000, NAT_DIR_EGRESS);
    let stale_out = key(POD1B, 50000, NAT_DIR_EGRESS);
    let reply = NatKey {
        src: REMOTE.octets(),
        dst: MASQ.octets(),
        sport: 443,
        dport: 40000,
        proto: TCP,
        dir: NAT_DIR_INGRESS,
        pad: [0; 2],
    };
    let nat = fx.datapath.maps.flow_tables().nat;
    nat.insert(live_out, entry(MASQ, 40000), 0).unwrap();
    nat.insert(reply, entry(POD1, 40000), 0).unwrap();
    nat.insert(stale_out, entry(MASQ, 40000), 0).unwrap();

    let mut st = state(1024, 65535);
    assert!(st.endpoints.remove(&POD1B).is_some());
    let report = fx.datapath.maps.sync(&st).unwrap();
    assert_eq!(report.nat_purged, 1, "only the stale egress entry goes");
    let nat = fx.datapath.maps.flow_tables().nat;
    assert!(matches!(nat.get(&stale_out, 0), Err(MapError::KeyNotFound)));
    assert!(
        nat.get(&live_out, 0).is_ok(),
        "the live flow keeps its egress entry"
    );
    assert!(
        nat.get(&reply, 0).is_ok(),
        "the live flow keeps its reply entry"
    );

    assert!(st.endpoints.remove(&POD1).is_some());
    let report = fx.datapath.maps.sync(&st).unwrap();
    assert_eq!(report.nat_purged, 2, "the removed pod's flow goes whole");
    assert_eq!(fx.datapath.maps.nat_len(), 0);
}
