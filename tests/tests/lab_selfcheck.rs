//! The lab checked against OCI's behaviour, without any eBPF: if these fail, datapath test
//! failures mean nothing. Needs root; each test builds its own lab.

use std::collections::HashSet;
use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use vcnpath_tests::lab::process::run;
use vcnpath_tests::lab::stats::{checksum_errors, nstat, set_all_offloads};
use vcnpath_tests::lab::topology::INET_ROUTER_IP;
use vcnpath_tests::lab::traffic::{
    TcpConn, TcpServer, UdpEchoServer, ping, ping_with, tcp_bulk, udp_request,
};
use vcnpath_tests::lab::{INET_IP, Lab, LabOptions, PEER_IP, cmd_in, run_in, spawn_in};
use vcnpath_tests::privileged::have_root;

const TIMEOUT: Duration = Duration::from_secs(10);
/// Long enough for a SYN and its retransmission after 1 s, short enough to keep tests fast.
const SHORT: Duration = Duration::from_secs(3);

fn new_lab() -> Lab {
    Lab::new(LabOptions::default()).expect("building the lab")
}

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

fn listed_namespaces() -> HashSet<String> {
    run(Command::new("ip").args(["netns", "list"]))
        .expect("ip netns list")
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn root_links() -> HashSet<String> {
    run(Command::new("ip").args(["-o", "link", "show"]))
        .expect("ip link show")
        .lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .collect()
}

#[test]
fn dropping_a_lab_deletes_every_namespace_also_after_a_panic() {
    if !have_root("lab_selfcheck") {
        return;
    }
    let root_before = root_links();
    let lab = new_lab();
    let pod = lab.add_pod("drop", Ipv4Addr::new(10, 0, 0, 20), 0).unwrap();
    let mut names = lab.namespace_names();
    names.push(pod.ns().name().to_owned());
    let listed = listed_namespaces();
    for name in &names {
        assert!(
            listed.contains(name),
            "expected {name} in `ip netns list`, saw {listed:?}"
        );
    }
    let new_root_links: Vec<_> = root_links().difference(&root_before).cloned().collect();
    assert!(
        new_root_links.is_empty(),
        "expected no new link in the root namespace, saw {new_root_links:?}"
    );
    drop(pod);
    drop(lab);
    let listed = listed_namespaces();
    for name in &names {
        assert!(
            !listed.contains(name),
            "expected {name} deleted, still listed"
        );
    }

    let names = Mutex::new(Vec::new());
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let lab = new_lab();
        let pod = lab
            .add_pod("panic", Ipv4Addr::new(10, 0, 0, 21), 0)
            .unwrap();
        let mut seen = names.lock().unwrap();
        seen.extend(lab.namespace_names());
        seen.push(pod.ns().name().to_owned());
        drop(seen);
        panic!("deliberate panic with a lab and a pod alive");
    }));
    assert!(outcome.is_err(), "the test body should have panicked");
    let names = names.into_inner().unwrap();
    assert_eq!(
        names.len(),
        5,
        "expected 4 lab namespaces and a pod, saw {names:?}"
    );
    let listed = listed_namespaces();
    for name in &names {
        assert!(
            !listed.contains(name),
            "expected {name} deleted after the panic, still listed"
        );
    }
}

#[test]
fn pod_on_primary_vnic_reaches_the_peer_with_its_own_address() {
    if !have_root("lab_selfcheck") {
        return;
    }
    let lab = new_lab();
    let pod = lab.add_pod("a", Ipv4Addr::new(10, 0, 0, 20), 0).unwrap();
    let tcp = TcpServer::start(lab.peer(), addr(PEER_IP, 5001)).unwrap();
    let udp = UdpEchoServer::start(lab.peer(), addr(PEER_IP, 5002)).unwrap();

    let report = tcp_bulk(pod.ns(), None, tcp.addr(), 1 << 20, TIMEOUT).unwrap();
    assert_eq!(
        report.peer_seen.ip(),
        pod.ip(),
        "peer should see the pod address"
    );
    let reply = udp_request(pod.ns(), None, udp.addr(), b"hello", TIMEOUT).unwrap();
    assert_eq!(
        reply.peer_seen.ip(),
        pod.ip(),
        "UDP peer should see the pod address"
    );
    assert_eq!(reply.payload, b"hello");
    assert!(
        ping(pod.ns(), PEER_IP, 2, SHORT).unwrap(),
        "pod should ping the peer"
    );
    assert_eq!(lab.router_drops(0).unwrap(), 0, "nothing should be dropped");
}

#[test]
fn router_drops_a_pod_of_vnic1_routed_out_of_vnic0() {
    if !have_root("lab_selfcheck") {
        return;
    }
    let lab = new_lab();
    let pod = lab.add_pod("b", Ipv4Addr::new(10, 0, 1, 20), 1).unwrap();
    let tcp = TcpServer::start(lab.peer(), addr(PEER_IP, 5001)).unwrap();
    let before = lab.router_drop_counts(0).unwrap();

    // The node's default route is via eth0, so without the datapath the packet leaves
    // through VNIC 0, which does not own 10.0.1.20.
    let outcome = tcp_bulk(pod.ns(), None, tcp.addr(), 1024, SHORT);
    assert!(
        outcome.is_err(),
        "expected the transfer to fail, got {outcome:?}"
    );
    let after = lab.router_drop_counts(0).unwrap();
    assert!(
        after.source > before.source,
        "expected VNIC 0's source check to drop packets: before {before:?}, after {after:?}"
    );
    assert!(
        tcp.connections().is_empty(),
        "the peer should have seen nothing"
    );
    assert_eq!(
        lab.router_drops(1).unwrap(),
        0,
        "VNIC 1 saw no traffic to drop"
    );
}

#[test]
fn router_drops_packets_towards_an_address_the_vnic_does_not_own() {
    if !have_root("lab_selfcheck") {
        return;
    }
    let lab = new_lab();
    let unassigned = Ipv4Addr::new(10, 0, 0, 99);
    assert!(!ping(lab.peer(), unassigned, 1, Duration::from_secs(1)).unwrap());
    let drops = lab.router_drop_counts(0).unwrap();
    assert!(
        drops.destination > 0,
        "expected destination drops on VNIC 0, saw {drops:?}"
    );

    // Once the address is assigned (a pod on VNIC 0), the same packets are delivered.
    let pod = lab.add_pod("late", unassigned, 0).unwrap();
    assert!(
        ping(lab.peer(), pod.ip(), 2, SHORT).unwrap(),
        "peer should reach the pod"
    );
}

#[test]
fn node_reaches_the_internet_and_pmtu_discovery_works_over_a_1400_link() {
    if !have_root("lab_selfcheck") {
        return;
    }
    let lab = Lab::new(LabOptions {
        inet_mtu: Some(1400),
    })
    .unwrap();
    let tcp = TcpServer::start(lab.inet(), addr(INET_IP, 5001)).unwrap();
    let before = nstat(lab.node()).unwrap();

    let report = tcp_bulk(lab.node(), None, tcp.addr(), 4 << 20, TIMEOUT).unwrap();
    assert_eq!(
        report.peer_seen.ip(),
        lab.node_ip(),
        "inet should see the node address"
    );

    let after = nstat(lab.node()).unwrap();
    let unreachables = |c: &std::collections::HashMap<String, u64>| c["IcmpInDestUnreachs"];
    assert!(
        unreachables(&after) > unreachables(&before),
        "expected the router's fragmentation-needed to reach the node: before {}, after {}",
        unreachables(&before),
        unreachables(&after)
    );
    let route = lab
        .node()
        .ip(&["route", "get", &INET_IP.to_string()])
        .unwrap();
    assert!(
        route.contains("mtu 1400"),
        "expected a learnt path MTU of 1400, saw {route}"
    );

    // A full-size packet from the inet host (MTU 9000) is dropped by the router's 1400-byte
    // receiving end: veth drops frames larger than the receiver's MTU. Bulk tests therefore
    // only send large segments towards the internet, never from it.
    assert!(ping_with(lab.inet(), INET_ROUTER_IP, 1, SHORT, &["-s", "2000"]).is_ok_and(|ok| !ok));
    assert!(
        ping(lab.inet(), INET_ROUTER_IP, 1, SHORT).unwrap(),
        "small packets pass"
    );
}

#[test]
fn two_pods_can_use_the_same_source_port() {
    if !have_root("lab_selfcheck") {
        return;
    }
    let lab = new_lab();
    let a = lab
        .add_pod("same-a", Ipv4Addr::new(10, 0, 0, 20), 0)
        .unwrap();
    let b = lab
        .add_pod("same-b", Ipv4Addr::new(10, 0, 0, 21), 0)
        .unwrap();
    let tcp = TcpServer::start(lab.peer(), addr(PEER_IP, 5001)).unwrap();

    let mut conn_a = TcpConn::connect(a.ns(), Some(a.addr(40000)), tcp.addr(), TIMEOUT).unwrap();
    let mut conn_b = TcpConn::connect(b.ns(), Some(b.addr(40000)), tcp.addr(), TIMEOUT).unwrap();
    conn_a.roundtrip(b"from a", TIMEOUT).unwrap();
    conn_b.roundtrip(b"from b", TIMEOUT).unwrap();
    let peers: HashSet<_> = tcp
        .wait_connections(2, TIMEOUT)
        .unwrap()
        .iter()
        .map(|c| c.peer)
        .collect();
    let expected = HashSet::from([a.addr(40000), b.addr(40000)]);
    assert_eq!(
        peers, expected,
        "the peer should see both pods on port 40000"
    );
}

#[test]
fn code_and_programs_run_inside_the_namespace() {
    if !have_root("lab_selfcheck") {
        return;
    }
    let lab = new_lab();
    let node_ip = lab.node_ip().to_string();

    let addrs = run(cmd_in(lab.node(), "ip").args(["-o", "-4", "addr"])).unwrap();
    assert!(
        addrs.contains(&node_ip),
        "cmd_in should see the node's addresses: {addrs}"
    );

    let mut cmd = Command::new("ip");
    cmd.args(["-o", "-4", "addr"]).stdout(Stdio::piped());
    let mut child = spawn_in(lab.node(), cmd).unwrap();
    let mut out = String::new();
    child
        .child_mut()
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(child.wait().unwrap().success());
    assert!(
        out.contains(&node_ip),
        "spawn_in should see the node's addresses: {out}"
    );

    let mut sleeper = Command::new("sleep");
    sleeper.arg("30");
    let mut sleeper = spawn_in(lab.node(), sleeper).unwrap();
    let status = sleeper.kill9().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "kill9 should end the child with SIGKILL"
    );

    let forwarding = run_in(lab.node(), || {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
    })
    .unwrap()
    .unwrap();
    assert_eq!(
        forwarding.trim(),
        "1",
        "run_in should see the node's sysctls"
    );
    assert_eq!(
        lab.node()
            .read_sysctl("net/ipv4/conf/eth1/rp_filter")
            .unwrap(),
        "2"
    );

    set_all_offloads(lab.node(), false).unwrap();
    for ifname in ["eth0", "eth1"] {
        let features = run(cmd_in(lab.node(), "ethtool").args(["-k", ifname])).unwrap();
        for feature in [
            "rx-checksumming: off",
            "tx-checksumming: off",
            "generic-segmentation-offload: off",
        ] {
            assert!(
                features.contains(feature),
                "expected {feature} for {ifname} in {features}"
            );
        }
    }
    let counters = nstat(lab.node()).unwrap();
    assert!(
        counters.contains_key("TcpInCsumErrors"),
        "nstat should name TCP counters"
    );
}

#[test]
fn software_checksums_end_to_end_report_no_errors() {
    if !have_root("lab_selfcheck") {
        return;
    }
    let lab = new_lab();
    let pod = lab.add_pod("csum", Ipv4Addr::new(10, 0, 0, 20), 0).unwrap();
    for ns in [lab.node(), lab.router(), lab.peer(), pod.ns()] {
        set_all_offloads(ns, false).unwrap();
    }
    let tcp = TcpServer::start(lab.peer(), addr(PEER_IP, 5001)).unwrap();
    let udp = UdpEchoServer::start(lab.peer(), addr(PEER_IP, 5002)).unwrap();
    let before = nstat(lab.peer()).unwrap();

    tcp_bulk(pod.ns(), None, tcp.addr(), 4 << 20, TIMEOUT).unwrap();
    udp_request(pod.ns(), None, udp.addr(), &[7; 3000], TIMEOUT).unwrap();
    assert!(ping(pod.ns(), PEER_IP, 2, SHORT).unwrap());

    // The counters prove the receivers really checked: with offloads off nothing arrives
    // pre-validated, so a zero below means every checksum was verified and correct.
    let after = nstat(lab.peer()).unwrap();
    assert!(
        after["TcpInSegs"] > before["TcpInSegs"] + 100,
        "the peer should have received the transfer"
    );
    for ns in [lab.peer(), pod.ns()] {
        let errors = checksum_errors(ns).unwrap();
        assert!(
            errors.is_empty(),
            "expected no checksum errors in {}, saw {errors:?}",
            ns.name()
        );
    }
}

#[test]
fn a_new_lab_sweeps_namespaces_left_by_a_killed_lab_process() {
    if !have_root("lab_selfcheck") {
        return;
    }
    // A pid above pid_max can never belong to a live process.
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let stale = format!("vl{}x0-node", pid_max + 1);
    run(Command::new("ip").args(["netns", "add", &stale])).unwrap();
    let _lab = new_lab();
    let listed = listed_namespaces();
    if listed.contains(&stale) {
        let _ = run(Command::new("ip").args(["netns", "delete", &stale]));
        panic!("expected the stale namespace {stale} to be swept, still listed");
    }
}
