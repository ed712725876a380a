//! Smoke test of the benchmark topology (`cargo xtask bench compare`): both setups carry
//! traffic from a secondary-VNIC pod to the VCN peer and the internet with 64 pod
//! addresses on the node, the VCN router drops nothing, and the baseline really is the
//! iptables + conntrack + per-pod rule datapath. Timings are printed, never asserted.

use std::net::SocketAddr;
use std::time::Duration;

use vcnpath_tests::bench::{
    Setup, baseline,
    load::{Timing, tcp_rr, udp_rate},
    node::{BenchNode, POD_IP},
};
use vcnpath_tests::privileged::have_root;

const PODS: usize = 64;
const QUICK: Timing = Timing {
    warmup: Duration::from_millis(50),
    measure: Duration::from_millis(200),
};

fn exercise(node: &BenchNode) {
    node.verify()
        .unwrap_or_else(|e| panic!("{node} must pass traffic: {e:#}\n{}", node.agent_log()));
    let lab = node.lab();
    for (ns, ip) in [(lab.peer(), lab.peer_ip()), (lab.inet(), lab.inet_ip())] {
        let rate = udp_rate(node.pod_ns(), ns, SocketAddr::from((ip, 9000)), QUICK)
            .unwrap_or_else(|e| panic!("{node}: UDP load to {ip} failed: {e:#}"));
        let rr = tcp_rr(node.pod_ns(), ns, SocketAddr::from((ip, 9001)), QUICK)
            .unwrap_or_else(|e| panic!("{node}: TCP ping-pong to {ip} failed: {e:#}"));
        eprintln!(
            "{node} → {ip}: {:.0} pps received of {:.0} sent; RR p50 {:.1} µs over {} samples",
            rate.received_pps, rate.sent_pps, rr.p50_us, rr.samples
        );
    }
    node.check_router_drops()
        .unwrap_or_else(|e| panic!("{node}: {e:#}"));
}

#[test]
fn lab_bench_baseline_routes_by_pod_rule_and_masquerades_through_conntrack() {
    if !have_root("lab_bench_baseline") {
        return;
    }
    let node = BenchNode::new(Setup::Baseline, PODS).expect("baseline bench node");
    exercise(&node);
    let ns = node.lab().node();
    assert_eq!(
        baseline::pod_rules(ns).unwrap(),
        PODS,
        "one policy rule per pod address"
    );
    let last = baseline::last_pod_rule(ns).unwrap();
    assert!(
        last.contains(&format!("from {POD_IP}")),
        "the measured pod's rule must be walked last, found {last:?}"
    );
    assert!(
        baseline::conntrack_count(ns).unwrap() > 0,
        "the baseline's SNAT must track connections"
    );
}

#[test]
fn lab_bench_vcnpath_node_carries_the_same_traffic() {
    if !have_root("lab_bench_vcnpath") {
        return;
    }
    let node = BenchNode::new(Setup::Vcnpath, PODS).expect("vcnpath bench node");
    exercise(&node);
    let counters = node.counters().unwrap().expect("vcnpath counters");
    assert!(
        counters.get(vcnpath_common::Reason::SnatEstablished) > 0
            && counters.get(vcnpath_common::Reason::RedirectOwner) > 0,
        "the programs must have translated and redirected the pod's traffic:\n{counters}"
    );
}
