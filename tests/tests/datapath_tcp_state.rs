//! TCP state through `BPF_PROG_TEST_RUN`: SYN/FIN/RST sequences drive the flags the
//! programs record, and the agent's expiry rules (`gc::expired`) judge the table the
//! programs left — the decision a user feels as "my connection was cut after 10 s idle".

use std::{collections::HashMap, net::Ipv4Addr, time::Duration};

use vcnpath::datapath::{NatTimeouts, gc};
use vcnpath_common::{
    NAT_DIR_EGRESS, NAT_DIR_INGRESS, NatEntry, NatKey, Reason, TCP_SEEN_ACK, TCP_SEEN_FIN,
    TCP_SEEN_POD_SHIFT, TCP_SEEN_SYN,
};
use vcnpath_tests::{
    datapath_fixture::*,
    packet::{L4, Spec, build, view},
    privileged::have_root,
};

macro_rules! root_or_skip {
    ($name:literal) => {
        if !have_root($name) {
            return;
        }
    };
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN_ACK: u8 = 0x11;
const RST: u8 = 0x04;
const SYN_ACK: u8 = 0x12;

fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    let mut spec = Spec::tcp(src, sport, dst, dport);
    spec.l4 = L4::Tcp {
        sport,
        dport,
        flags,
        payload: vec![],
    };
    build(&spec)
}

/// Both flow tables: translated flows (`nat`) and flows opened from outside (`inbound`).
fn table(fx: &Fixture) -> HashMap<NatKey, NatEntry> {
    fx.datapath
        .maps
        .flows()
        .map(|r| r.expect("reading the flow tables"))
        .collect()
}

/// What the agent's collector would remove if it ran `idle` after the last packet.
fn doomed_after(fx: &Fixture, idle: Duration) -> Vec<NatKey> {
    let entries = table(fx);
    let last = entries.values().map(|e| e.last_seen_ns).max().unwrap_or(0);
    let now = last + u64::try_from(idle.as_nanos()).unwrap();
    gc::expired(&entries, now, &NatTimeouts::default())
}

/// The `tcp_seen` of the single entry in direction `dir`.
fn seen(fx: &Fixture, dir: u8) -> u8 {
    let entries: Vec<_> = table(fx)
        .into_iter()
        .filter(|(k, _)| k.dir == dir)
        .collect();
    assert_eq!(
        entries.len(),
        1,
        "one entry in direction {dir}: {entries:?}"
    );
    entries[0].1.tcp_seen
}

const CLOSING_PLUS: Duration = Duration::from_secs(11);

/// A masqueraded connection POD0:40000 → REMOTE:443 through its handshake.
fn handshake(fx: &Fixture) {
    let (verdict, out) = fx.egress(&tcp(POD0, 40000, REMOTE, 443, SYN));
    assert_eq!((verdict, view(&out).src), (TC_ACT_OK, MASQ));
    fx.ingress(&tcp(REMOTE, 443, MASQ, 40000, SYN_ACK));
    fx.egress(&tcp(POD0, 40000, REMOTE, 443, ACK));
    fx.ingress(&tcp(REMOTE, 443, MASQ, 40000, ACK));
}

fn assert_reopened(fx: &Fixture, what: &str) {
    let reopened = fx.count(Reason::SnatReopened);
    let (verdict, out) = fx.egress(&tcp(POD0, 40000, REMOTE, 443, SYN));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        (view(&out).src, view(&out).sport),
        (MASQ, 40000),
        "the new connection on the tuple keeps the flow's mapping ({what})"
    );
    assert_eq!(
        fx.count(Reason::SnatReopened),
        reopened + 1,
        "counted as reopened ({what})"
    );
    let doomed = doomed_after(fx, CLOSING_PLUS);
    assert!(
        doomed.is_empty(),
        "a reopened connection ({what}) must not be collected as closing after 11 s idle: {doomed:?}"
    );
    assert_eq!(
        (seen(fx, NAT_DIR_EGRESS), seen(fx, NAT_DIR_INGRESS)),
        (TCP_SEEN_SYN, 0),
        "a SYN on a closing flow ({what}) starts its state over"
    );
    // The new handshake completes: established again, it survives an hour idle.
    fx.ingress(&tcp(REMOTE, 443, MASQ, 40000, SYN_ACK));
    fx.egress(&tcp(POD0, 40000, REMOTE, 443, ACK));
    let (_, back) = fx.ingress(&tcp(REMOTE, 443, MASQ, 40000, ACK));
    assert_eq!((view(&back).dst, view(&back).dport), (POD0, 40000));
    let doomed = doomed_after(fx, Duration::from_hours(1));
    assert!(
        doomed.is_empty(),
        "the reopened connection ({what}) is established: {doomed:?}"
    );
}

#[test]
fn a_syn_after_a_reset_reopens_the_flow() {
    root_or_skip!("tcp_reopen_rst");
    let fx = Fixture::new("tcprst", 1024, 65535);
    handshake(&fx);
    assert!(
        doomed_after(&fx, Duration::from_hours(1)).is_empty(),
        "established"
    );
    let (_, out) = fx.ingress(&tcp(REMOTE, 443, MASQ, 40000, RST));
    assert_eq!(view(&out).dst, POD0, "the RST reaches the pod");
    assert_eq!(
        doomed_after(&fx, CLOSING_PLUS).len(),
        2,
        "a reset flow goes after the closing timeout"
    );
    assert_reopened(&fx, "reset by the remote");
    assert_eq!(fx.count(Reason::SnatNew), 1, "one mapping all along");
}

#[test]
fn a_syn_after_a_fin_both_ways_reopens_the_flow() {
    root_or_skip!("tcp_reopen_fin");
    let fx = Fixture::new("tcpfin", 1024, 65535);
    handshake(&fx);
    fx.egress(&tcp(POD0, 40000, REMOTE, 443, FIN_ACK));
    fx.ingress(&tcp(REMOTE, 443, MASQ, 40000, FIN_ACK));
    fx.egress(&tcp(POD0, 40000, REMOTE, 443, ACK));
    assert_eq!(
        doomed_after(&fx, CLOSING_PLUS).len(),
        2,
        "a flow closed both ways goes after the closing timeout"
    );
    assert_reopened(&fx, "closed both ways");
}

#[test]
fn a_half_closed_flow_is_neither_closing_nor_reset_by_a_syn() {
    root_or_skip!("tcp_half_close");
    let fx = Fixture::new("tcphalf", 1024, 65535);
    handshake(&fx);
    // The pod is done sending; the remote keeps sending (a download after the request).
    fx.egress(&tcp(POD0, 40000, REMOTE, 443, FIN_ACK));
    fx.ingress(&tcp(REMOTE, 443, MASQ, 40000, ACK));
    assert!(
        doomed_after(&fx, CLOSING_PLUS).is_empty(),
        "a half-closed flow is still established"
    );
    // A stray SYN on a flow that is not closing changes nothing.
    let before = seen(&fx, NAT_DIR_EGRESS);
    fx.egress(&tcp(POD0, 40000, REMOTE, 443, SYN));
    assert_eq!(seen(&fx, NAT_DIR_EGRESS), before);
    assert!(doomed_after(&fx, Duration::from_hours(1)).is_empty());
}

#[test]
fn an_inbound_half_close_is_not_a_close_and_an_inbound_syn_reopens() {
    root_or_skip!("tcp_inbound_state");
    let fx = Fixture::new("tcpin", 1024, 65535);
    let pod = |bits: u8| bits << TCP_SEEN_POD_SHIFT;
    // A flow opened from outside towards POD1:8080 (rule 4).
    fx.ingress(&tcp(REMOTE, 50000, POD1, 8080, SYN));
    let (verdict, out) = fx.egress(&tcp(POD1, 8080, REMOTE, 50000, SYN_ACK));
    assert_eq!(
        (verdict, view(&out).src),
        (TC_ACT_REDIRECT, POD1),
        "answered from the pod address"
    );
    fx.ingress(&tcp(REMOTE, 50000, POD1, 8080, ACK));
    fx.egress(&tcp(POD1, 8080, REMOTE, 50000, ACK));
    // The client is done sending; the pod still answers.
    fx.ingress(&tcp(REMOTE, 50000, POD1, 8080, FIN_ACK));
    let doomed = doomed_after(&fx, CLOSING_PLUS);
    assert!(
        doomed.is_empty(),
        "an inbound half-close must not be collected as closing: {doomed:?}"
    );
    assert_eq!(
        seen(&fx, NAT_DIR_EGRESS),
        TCP_SEEN_SYN | TCP_SEEN_ACK | TCP_SEEN_FIN | pod(TCP_SEEN_SYN | TCP_SEEN_ACK),
        "each end's flags apart"
    );
    fx.egress(&tcp(POD1, 8080, REMOTE, 50000, FIN_ACK));
    assert_eq!(
        doomed_after(&fx, CLOSING_PLUS).len(),
        1,
        "FIN both ways: closing"
    );
    // The client connects again from the same port.
    fx.ingress(&tcp(REMOTE, 50000, POD1, 8080, SYN));
    assert_eq!(seen(&fx, NAT_DIR_EGRESS), TCP_SEEN_SYN);
    assert!(
        doomed_after(&fx, CLOSING_PLUS).is_empty(),
        "the reopened inbound flow is opening, not closing"
    );
}
