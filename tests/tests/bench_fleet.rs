//! The fleet benchmark's harness on a small fleet: every node converges, every pod's wait
//! and every call is counted, and the 429s the clients saw are those the simulator sent.
use std::time::Duration;

use vcnpath_tests::bench::fleet::{self, Options};

fn small(tenancy_per_second: f64, tenancy_burst: u32) -> Options {
    Options {
        nodes: 5,
        pods: 3,
        modes: vec!["ip", "cidr"],
        api_ms: 0,
        create_ip_ms: 20,
        attach_ms: 100,
        tenancy_per_second,
        tenancy_burst,
        deadline: Duration::from_mins(1),
        progress: false,
    }
}

#[test]
fn a_small_fleet_converges_in_both_modes_and_counts_its_calls() {
    let figures = fleet::run(&small(1000.0, 1000)).expect("the fleet runs");
    eprintln!("{}", fleet::report::table(&figures));
    assert_eq!(figures.runs.len(), 2, "one run per mode");
    for run in &figures.runs {
        assert_eq!(
            (run.converged, run.node_ready.count, run.pod_wait.count),
            (5, 5, 15),
            "ipam.mode = {:?}: every node and pod ready: {run:?}",
            run.mode
        );
        let all = run
            .all_ready_secs
            .expect("a fleet that converged has a time");
        assert!(
            (all * 1e3 - run.node_ready.max_ms).abs() < 1.0,
            "the fleet is ready when its slowest node is: {run:?}"
        );
        let creates = run
            .calls
            .iter()
            .find(|(op, _)| op == "CreatePrivateIp")
            .map_or(0, |(_, n)| *n);
        assert!(
            creates >= 5,
            "ipam.mode = {:?}: every node created addresses: {run:?}",
            run.mode
        );
        assert_eq!(run.throttled, 0, "no budget, no 429: {run:?}");
    }
    let (ip, cidr) = (&figures.runs[0], &figures.runs[1]);
    assert!(
        cidr.calls_total < ip.calls_total,
        "blocks take fewer calls than 15 single addresses and the warm ones: ip {ip:?}, cidr {cidr:?}"
    );
}

#[test]
fn the_429s_the_nodes_saw_are_those_the_tenancy_budget_sent() {
    let options = Options {
        modes: vec!["cidr"],
        ..small(8.0, 4)
    };
    let figures = fleet::run(&options).expect("the fleet runs");
    let run = &figures.runs[0];
    assert_eq!(
        run.converged, 5,
        "a throttled fleet still converges: {run:?}"
    );
    assert!(
        run.throttled > 0,
        "5 nodes starting at once exceed 8 calls/s: {run:?}"
    );
    assert_eq!(
        run.throttled, run.throttled_by_simulator,
        "every 429 the simulator sent is counted by a client: {run:?}"
    );
    assert!(
        run.throttled_fraction > 0.0 && run.throttled_fraction < 1.0,
        "{run:?}"
    );
}
