//! End to end in the namespace lab with real traffic and the real `vcnpath` binary: the
//! VCN router drops anything a VNIC sends from an address it does not own, exactly like
//! OCI's source/destination check, so every assertion below is what a pod on a real node
//! would see.

use std::{net::Ipv4Addr, net::SocketAddr, time::Duration};

use aya_obj::generated::bpf_map_type;
use vcnpath::datapath::{Counters, DatapathMaps};
use vcnpath_common::{MAP_STATS, MAP_VNICS, Reason, STATS_ENTRIES};
use vcnpath_tests::{
    agent::{Agent, lab_config},
    datapath_fixture::{leave_abi_1_pins, leave_abi_2_pins, pin_foreign_map},
    lab::{
        Lab, LabOptions, Pod, run_in, stats,
        traffic::{TcpConn, TcpServer, UdpEchoServer, ping, tcp_bulk, udp_request},
    },
    privileged::{PinDir, have_root},
};

const MASQ: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 20); // owned by VNIC 0 (eth0)
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 20); // owned by VNIC 1 (eth1)
const POD_C: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 21); // owned by VNIC 1 (eth1)
const T: Duration = Duration::from_secs(20);
const MB: u64 = 1 << 20;

/// A lab with pods A (eth0), B and C (eth1) and the agent running. Field order is drop
/// order: the agent stops first, then pods and the lab go, then the pins.
struct Setup {
    agent: Agent,
    pods: Vec<Pod>,
    lab: Lab,
    pins: PinDir,
}

fn setup(tag: &str, options: LabOptions) -> Setup {
    let pins = PinDir::new(tag);
    let lab = Lab::new(options).expect("lab");
    let pods = vec![
        lab.add_pod("a", POD_A, 0).expect("pod a"),
        lab.add_pod("b", POD_B, 1).expect("pod b"),
        lab.add_pod("c", POD_C, 1).expect("pod c"),
    ];
    let config = lab_config(&pins.path, &[(POD_A, 0), (POD_B, 1), (POD_C, 1)]);
    let agent = Agent::start(&lab, tag, &config).expect("vcnpath datapath");
    Setup {
        agent,
        pods,
        lab,
        pins,
    }
}

impl Setup {
    fn pod(&self, ip: Ipv4Addr) -> &Pod {
        self.pods.iter().find(|p| p.ip() == ip).expect("pod")
    }

    fn counters(&self) -> Counters {
        Counters::read(&DatapathMaps::from_pins(&self.pins.path).expect("pinned maps"))
            .expect("counters")
    }

    fn assert_no_router_drops(&self) {
        for vnic in 0..2 {
            let drops = self.lab.router_drops(vnic).expect("router counters");
            assert_eq!(
                drops, 0,
                "the VCN router's source/destination check dropped {drops} packets on VNIC {vnic}"
            );
        }
    }
}

#[test]
fn lab_secondary_vnic_pod_reaches_vcn_peer_with_its_own_address_through_its_vnic() {
    if !have_root("lab_vcn_peer") {
        return;
    }
    let s = setup("vcn", LabOptions::default());
    let server = TcpServer::start(s.lab.peer(), SocketAddr::from((s.lab.peer_ip(), 8080))).unwrap();
    for pod in [POD_A, POD_B] {
        let report = tcp_bulk(s.pod(pod).ns(), None, server.addr(), MB, T).unwrap_or_else(|e| {
            panic!(
                "pod {pod} → VCN peer failed: {e:#}\nagent log:\n{}",
                s.agent.log()
            )
        });
        assert_eq!(
            report.peer_seen.ip(),
            std::net::IpAddr::V4(pod),
            "the VCN peer must see the pod's own address"
        );
    }
    let echo =
        UdpEchoServer::start(s.lab.peer(), SocketAddr::from((s.lab.peer_ip(), 5353))).unwrap();
    let reply =
        udp_request(s.pod(POD_B).ns(), None, echo.addr(), b"vcn", T).expect("UDP to the peer");
    assert_eq!(reply.payload, b"vcn");
    assert!(
        ping(s.pod(POD_B).ns(), s.lab.peer_ip(), 3, T).unwrap(),
        "ping from pod B to the peer"
    );
    s.assert_no_router_drops();
    assert!(
        s.counters().get(Reason::RedirectOwner) > 0,
        "pod B's packets were routed out of eth0 and redirected"
    );
}

#[test]
fn lab_pods_on_both_vnics_reach_the_internet_as_the_masquerade_address() {
    if !have_root("lab_internet") {
        return;
    }
    let s = setup("inet", LabOptions::default());
    let server = TcpServer::start(s.lab.inet(), SocketAddr::from((s.lab.inet_ip(), 8080))).unwrap();
    let echo =
        UdpEchoServer::start(s.lab.inet(), SocketAddr::from((s.lab.inet_ip(), 5353))).unwrap();
    for pod in [POD_A, POD_B] {
        let ns = s.pod(pod).ns();
        let report = tcp_bulk(ns, None, server.addr(), 10 * MB, T).unwrap_or_else(|e| {
            panic!(
                "pod {pod}: 10 MB to the internet failed: {e:#}\nagent log:\n{}",
                s.agent.log()
            )
        });
        assert_eq!(report.bytes, 10 * MB);
        assert_eq!(
            report.peer_seen.ip(),
            std::net::IpAddr::V4(MASQ),
            "the internet must see the masquerade address"
        );
        let reply = udp_request(ns, None, echo.addr(), b"hello", T).expect("UDP reply comes back");
        assert_eq!(
            reply.payload, b"hello",
            "the UDP reply comes back to pod {pod}"
        );
        assert_eq!(
            reply.peer_seen.ip(),
            std::net::IpAddr::V4(MASQ),
            "the UDP server saw the masquerade address"
        );
        assert!(
            ping(ns, s.lab.inet_ip(), 3, T).unwrap(),
            "ping replies come back to pod {pod}"
        );
    }
    assert!(
        echo.peers()
            .iter()
            .all(|p| p.ip() == std::net::IpAddr::V4(MASQ)),
        "UDP seen from {:?}",
        echo.peers()
    );
    s.assert_no_router_drops();
    let c = s.counters();
    assert!(
        c.get(Reason::SnatNew) > 0 && c.get(Reason::ReverseNat) > 0,
        "{c}"
    );
}

/// The counters that moved while `traffic` ran, by reason name.
fn counted_during(
    s: &Setup,
    traffic: impl FnOnce(),
) -> std::collections::BTreeMap<&'static str, u64> {
    let before = s.counters();
    traffic();
    let after = s.counters();
    Reason::ALL
        .into_iter()
        .map(|r| (r.name(), after.get(r) - before.get(r)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Issue 11 (10): every packet is counted once. A redirected packet meets vcnpath's egress
/// program twice: where the kernel routed it and on the VNIC it was redirected to. A pod
/// on a secondary VNIC pings the VCN peer; the kernel routes the requests out of eth0 and
/// vcnpath redirects them to the pod's own VNIC: each request must be counted once
/// (`redirected-to-owner`) and each reply once at ingress (`passed-vcn`), the request's
/// second pass not at all (before, it was counted as `passed-vcn` too).
#[test]
fn lab_a_redirected_packet_is_counted_once() {
    if !have_root("lab_count_once") {
        return;
    }
    let s = setup("once", LabOptions::default());
    let vcn = counted_during(&s, || {
        assert!(
            ping(s.pod(POD_B).ns(), s.lab.peer_ip(), 20, T).unwrap(),
            "pings to the peer"
        );
    });
    let get = |r: Reason| vcn.get(r.name()).copied().unwrap_or(0);
    // ping may send a request more than the replies it waits for.
    let (sent, redirected, replies) = (
        get(Reason::PassPodSource),
        get(Reason::RedirectOwner),
        get(Reason::PassVcn),
    );
    assert!(
        sent >= 20 && redirected == sent && (20..=sent).contains(&replies),
        "{sent} requests left the pod: each counted once redirected, each reply once in \
         (a second pass would count requests as passed-vcn too): {vcn:?}"
    );
}

#[test]
fn lab_two_pods_with_the_same_source_port_to_the_same_destination_both_work() {
    // A port of the default NAT range: only those are kept (the others are the host's).
    const PORT: u16 = 61234;
    if !have_root("lab_same_port") {
        return;
    }
    let s = setup("port", LabOptions::default());
    let server = TcpServer::start(s.lab.inet(), SocketAddr::from((s.lab.inet_ip(), 8080))).unwrap();
    let mut b = TcpConn::connect(
        s.pod(POD_B).ns(),
        Some(SocketAddr::from((POD_B, PORT))),
        server.addr(),
        T,
    )
    .unwrap();
    let mut c = TcpConn::connect(
        s.pod(POD_C).ns(),
        Some(SocketAddr::from((POD_C, PORT))),
        server.addr(),
        T,
    )
    .unwrap_or_else(|e| panic!("second pod with the same source port failed: {e:#}"));
    for round in 0..3 {
        b.roundtrip(format!("b{round}").as_bytes(), T)
            .expect("pod B's connection");
        c.roundtrip(format!("c{round}").as_bytes(), T)
            .expect("pod C's connection");
    }
    let peers: Vec<SocketAddr> = server
        .wait_connections(2, T)
        .unwrap()
        .iter()
        .map(|r| r.peer)
        .collect();
    assert!(
        peers.iter().all(|p| p.ip() == std::net::IpAddr::V4(MASQ)),
        "both seen from the masquerade address: {peers:?}"
    );
    assert_ne!(
        peers[0].port(),
        peers[1].port(),
        "two flows must never share one translated tuple: {peers:?}"
    );
    assert!(
        peers.iter().any(|p| p.port() == PORT),
        "the first keeps its port: {peers:?}"
    );
}

/// Sets the MTU of `ifname` in `ns`.
fn set_mtu(ns: &vcnpath_tests::lab::Netns, ifname: &str, mtu: u32) {
    let status = vcnpath_tests::lab::cmd_in(ns, "ip")
        .args(["link", "set", ifname, "mtu", &mtu.to_string()])
        .status()
        .expect("ip link set mtu");
    assert!(status.success(), "setting the MTU of {ifname} to {mtu}");
}

/// Issue 11 (6): a 3000-byte UDP datagram (a large DNS or EDNS answer, a `WireGuard`
/// handshake with cookies) crosses a 1500-byte path in fragments. The pod and the internet
/// host both use MTU 1500, so the request leaves the pod in fragments and the echoed
/// answer arrives at the node in fragments: each must be translated as its first
/// fragment was. Before, the later fragments were dropped on the way out.
#[test]
fn lab_a_3000_byte_udp_datagram_reaches_the_internet_in_fragments_and_its_answer_comes_back() {
    if !have_root("lab_fragments") {
        return;
    }
    let s = setup("frag", LabOptions::default());
    set_mtu(s.pod(POD_B).ns(), "eth0", 1500);
    set_mtu(s.lab.inet(), "eth0", 1500);
    let echo =
        UdpEchoServer::start(s.lab.inet(), SocketAddr::from((s.lab.inet_ip(), 5353))).unwrap();
    let request: Vec<u8> = (0..3000_u32).map(|n| (n % 251) as u8).collect();
    let reply = udp_request(s.pod(POD_B).ns(), None, echo.addr(), &request, T)
        .unwrap_or_else(|e| panic!("3000-byte UDP to the internet: {e:#}\n{}", s.counters()));
    assert_eq!(
        reply.payload, request,
        "the whole answer came back to the pod"
    );
    assert_eq!(
        reply.peer_seen.ip(),
        std::net::IpAddr::V4(MASQ),
        "the internet host saw the masquerade address"
    );
    let c = s.counters();
    assert!(
        c.get(Reason::SnatFragment) > 0 && c.get(Reason::ReverseNatFragment) > 0,
        "both ways went in fragments: {c}"
    );
    assert_eq!(c.get(Reason::DropFragment), 0, "{c}");
    s.assert_no_router_drops();
}

#[test]
fn lab_pmtu_discovery_works_through_the_translation() {
    if !have_root("lab_pmtu") {
        return;
    }
    let s = setup(
        "pmtu",
        LabOptions {
            inet_mtu: Some(1400),
        },
    );
    let server = TcpServer::start(s.lab.inet(), SocketAddr::from((s.lab.inet_ip(), 8080))).unwrap();
    let report = tcp_bulk(s.pod(POD_B).ns(), None, server.addr(), 10 * MB, T).unwrap_or_else(|e| {
        panic!(
            "large transfer over a 1400-byte hop failed: {e:#}\n{}",
            s.counters()
        )
    });
    assert_eq!(report.bytes, 10 * MB);
    let c = s.counters();
    assert!(
        c.get(Reason::IcmpErrorReverse) > 0,
        "fragmentation-needed must have been translated to the pod:\n{c}"
    );
}

/// The first packet a pod sends out of another VNIC than its own arrives: the datapath
/// redirects it with its VNIC's MACs. Before, the agent left the Ethernet header to
/// `bpf_redirect_neigh`, and while the VNIC's router was not yet resolved (nothing had left
/// through it) the kernel held the packet for the ARP answer and then sent it with the
/// header of its first route, the other VNIC's MACs, which the router (as OCI) ignores.
#[test]
fn lab_the_first_datagram_a_pod_sends_through_a_redirect_arrives() {
    if !have_root("lab_first_redirect") {
        return;
    }
    let s = setup("first", LabOptions::default());
    // Pod B (eth1) to the VCN peer: routed out of eth0, redirected to eth1, never
    // masqueraded. The first packet eth1 sends.
    let pair = UdpPair::bind(&s, POD_B, (s.lab.peer(), s.lab.peer_ip()));
    assert_eq!(
        pair.pod_speaks(&s),
        SocketAddr::from((POD_B, POD_UDP_PORT)),
        "the peer sees the pod's first datagram, from the pod's address"
    );
    assert_eq!(s.counters().get(Reason::RedirectOwner), 1);
    s.assert_no_router_drops();
}

/// The ports `nf_nat` maps the container's connection to in
/// [`lab_an_nf_nat_connection_from_before_the_agent_hears_the_remote_first`]: inside the
/// NAT range (61000-65535), as MASQUERADE may pick them.
const CONTAINER_NAT_PORTS: (u16, u16) = (61000, 61010);

/// Issue 11 (2): a node where a container's traffic was masqueraded by `nf_nat` (Docker,
/// kube-proxy) before vcnpath was installed. A TCP connection the container opened then,
/// mapped onto a port of the NAT range, gets the remote's data when the remote speaks
/// first after the agent started: the agent reads the flow from the connection tracking
/// table and records it as the host's. Before, a segment in the NAT range with no record
/// (and no socket of the node's) was dropped, again and again, until the container sent.
#[test]
fn lab_an_nf_nat_connection_from_before_the_agent_hears_the_remote_first() {
    use std::io::{Read as _, Write as _};
    if !have_root("lab_nf_nat_before") {
        return;
    }
    let mut s = setup("nfnat", LabOptions::default());
    // A node vcnpath never ran on: no programs attached, no pins.
    s.agent.kill9().expect("kill -9");
    for interface in ["eth0", "eth1"] {
        run_in(s.lab.node(), || {
            vcnpath::datapath::detach_interface(interface)
        })
        .expect("enter the node")
        .expect("detach the programs");
    }
    vcnpath::datapath::remove_pins(&s.pins.path).expect("remove the pins");
    let container = docker_like_container(&s);

    let listener = run_in(s.lab.inet(), || {
        std::net::TcpListener::bind((s.lab.inet_ip(), 0))
    })
    .expect("enter the internet host")
    .expect("listen");
    let to = listener.local_addr().expect("the server's address");
    let mut inside = run_in(&container, move || {
        std::net::TcpStream::connect_timeout(&to, T)
    })
    .expect("enter the container")
    .expect("the container connects through MASQUERADE");
    inside
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let (mut server_end, translated) = listener.accept().expect("accept");
    assert_eq!(translated.ip(), std::net::IpAddr::V4(MASQ));
    assert!(
        (CONTAINER_NAT_PORTS.0..=CONTAINER_NAT_PORTS.1).contains(&translated.port()),
        "nf_nat mapped it into the NAT range: {translated}"
    );

    s.agent.restart(&s.lab).expect("the agent starts");
    server_end
        .write_all(b"first")
        .expect("the remote speaks first");
    let mut got = [0u8; 5];
    let read = inside.read_exact(&mut got);
    let log = s.agent.log();
    assert!(
        read.is_ok(),
        "the remote's first data after the start did not reach the container ({read:?}):\n{}\nagent log:\n{log}",
        s.counters()
    );
    assert_eq!(&got, b"first");
    assert!(
        log.contains("host flows nf_nat opened in the NAT range before the datapath recorded"),
        "the agent recorded the flow at start:\n{log}"
    );
    drop(inside);
    drop(container);
}

/// A namespace behind a bridge-like veth (`dock0`, 172.17.0.1/24 on the node) whose TCP
/// traffic out of eth0 the node masquerades onto [`CONTAINER_NAT_PORTS`], as Docker does.
/// Dropping it removes the veth; the node's rule goes with the lab.
fn docker_like_container(s: &Setup) -> vcnpath_tests::lab::Netns {
    let node = s.lab.node();
    let container = vcnpath_tests::lab::Netns::create(&format!("vcnnf{}", std::process::id()))
        .expect("the container's namespace");
    node.add_veth_into("dock0", "02:42:ac:11:00:01", 1500, "eth0", &container)
        .expect("the container's veth");
    node.ip_batch(&[
        &["addr", "add", "172.17.0.1/24", "dev", "dock0"],
        &["link", "set", "dock0", "up"],
    ])
    .expect("the bridge end");
    container
        .ip_batch(&[
            &["addr", "add", "172.17.0.2/24", "dev", "eth0"],
            &["link", "set", "eth0", "up"],
            &["route", "add", "default", "via", "172.17.0.1"],
        ])
        .expect("the container's address");
    let (min, max) = CONTAINER_NAT_PORTS;
    let rules = format!(
        "table ip vcnnf {{\n chain post {{\n  type nat hook postrouting priority 100;\n  ip saddr 172.17.0.0/24 oifname \"eth0\" meta l4proto tcp masquerade to :{min}-{max}\n }}\n}}\n"
    );
    vcnpath_tests::lab::process::run_stdin(
        vcnpath_tests::lab::cmd_in(node, "nft").args(["-f", "-"]),
        &rules,
    )
    .expect("the MASQUERADE rule");
    container
}

#[test]
fn lab_connections_from_the_internet_to_a_pod_are_answered_from_the_pod_address() {
    if !have_root("lab_inbound") {
        return;
    }
    let s = setup("inb", LabOptions::default());
    let server = TcpServer::start(s.pod(POD_B).ns(), SocketAddr::from((POD_B, 8080))).unwrap();
    let mut conn = TcpConn::connect(s.lab.inet(), None, server.addr(), T).unwrap_or_else(|e| {
        panic!(
            "internet → pod B failed: {e:#}\nagent log:\n{}",
            s.agent.log()
        )
    });
    conn.roundtrip(b"inbound", T)
        .expect("the pod's answers reach the internet host");
    let seen = server.wait_connections(1, T).unwrap();
    assert_eq!(
        seen[0].peer.ip(),
        std::net::IpAddr::V4(s.lab.inet_ip()),
        "the pod sees the real client"
    );
    s.assert_no_router_drops();
    let c = s.counters();
    assert!(
        c.get(Reason::InboundNew) == 1
            && c.get(Reason::PassInbound) + c.get(Reason::RedirectOwner) > 0,
        "the client's SYN recorded the flow and the pod's answers rode it (redirected to its VNIC): {c}"
    );
    assert_eq!(c.get(Reason::SnatNew), 0, "nothing was masqueraded:\n{c}");
}

#[test]
fn lab_host_traffic_is_untouched_next_to_a_pod_flow_to_the_same_remote() {
    if !have_root("lab_host") {
        return;
    }
    let s = setup("host", LabOptions::default());
    let server = TcpServer::start(s.lab.inet(), SocketAddr::from((s.lab.inet_ip(), 8080))).unwrap();
    let host = SocketAddr::from((MASQ, 45000));
    let mut h =
        TcpConn::connect(s.lab.node(), Some(host), server.addr(), T).expect("host connection");
    let mut p = TcpConn::connect(
        s.pod(POD_A).ns(),
        Some(SocketAddr::from((POD_A, 45000))),
        server.addr(),
        T,
    )
    .expect("pod connection");
    h.roundtrip(b"host", T).unwrap();
    p.roundtrip(b"pod", T).unwrap();
    h.roundtrip(b"host again", T)
        .expect("the host connection still works");
    let peers: Vec<SocketAddr> = server
        .wait_connections(2, T)
        .unwrap()
        .iter()
        .map(|r| r.peer)
        .collect();
    assert!(
        peers.contains(&host),
        "the host's connection arrives exactly as the host sent it: {peers:?}"
    );
    assert!(peers.iter().all(|p| p.ip() == std::net::IpAddr::V4(MASQ)));
    assert!(s.counters().get(Reason::PassNotEndpoint) > 0);
}

#[test]
fn lab_established_connection_survives_agent_kill_and_restart() {
    if !have_root("lab_restart") {
        return;
    }
    let mut s = setup("kill", LabOptions::default());
    let server = TcpServer::start(s.lab.inet(), SocketAddr::from((s.lab.inet_ip(), 8080))).unwrap();
    let mut conn = TcpConn::connect(s.pod(POD_B).ns(), None, server.addr(), T).unwrap();
    conn.roundtrip(b"before", T).unwrap();
    s.agent.kill9().unwrap();
    conn.roundtrip(b"agent dead", T)
        .expect("the datapath keeps working while the agent is down");
    s.agent.restart(&s.lab).expect("restart");
    assert!(
        s.agent.log().contains("adopted=true"),
        "the new agent must adopt the pinned programs, not reload them:\n{}",
        s.agent.log()
    );
    conn.roundtrip(b"after", T)
        .expect("the established connection survives the restart");
    let seen = server.wait_connections(1, T).unwrap();
    assert_eq!(
        seen.len(),
        1,
        "still one connection, never re-established: {seen:?}"
    );
}

/// An upgrade from a release whose `vnics` layout and reason count differ: the new agent
/// replaces those maps (their pins first, the programs, then the attached filters once
/// the first sync has filled them), and the established connection never notices.
#[test]
fn lab_upgrade_that_replaces_maps_keeps_established_connections() {
    if !have_root("lab_upgrade_maps") {
        return;
    }
    // What the older release left pinned (its programs, still attached, hold their own
    // maps): a `Vnic` 4 bytes shorter and one reason fewer.
    upgrade_keeps_connections("upgrade", |pins| {
        for (name, map_type, sizes) in [
            (MAP_VNICS, bpf_map_type::BPF_MAP_TYPE_HASH, (4, 28, 64)),
            (
                MAP_STATS,
                bpf_map_type::BPF_MAP_TYPE_PERCPU_ARRAY,
                (4, 8, STATS_ENTRIES - 1),
            ),
        ] {
            let path = pins.join(name);
            std::fs::remove_file(&path).unwrap();
            pin_foreign_map(&path, name, map_type, sizes);
        }
    });
}

/// The upgrade from datapath ABI 1 (counters per reason only, 36 of them; flow entries
/// with a creation time) to this release: the agent converts the flow tables and replaces
/// the counters, and the established masqueraded connections carry on.
#[test]
fn lab_upgrade_from_abi_1_keeps_established_connections() {
    if !have_root("lab_upgrade_abi") {
        return;
    }
    upgrade_keeps_connections("abi1", leave_abi_1_pins);
}

/// The upgrade from datapath ABI 2, whose `NatEntry` had another layout (24 bytes, with a
/// creation time): the agent converts `nat` and `inbound` into this release's layout
/// while a transfer runs, which neither resets nor loses a segment.
#[test]
fn lab_upgrade_from_abi_2_converts_the_flow_tables_under_a_running_transfer() {
    if !have_root("lab_upgrade_abi2") {
        return;
    }
    upgrade_keeps_connections("abi2", leave_abi_2_pins);
}

/// Echo round trips of 16 KiB on `conn` until `stop`: how many, and the first failure.
fn keep_transferring(
    mut conn: TcpConn,
    stop: &std::sync::atomic::AtomicBool,
) -> (TcpConn, usize, Option<anyhow::Error>) {
    let chunk = vec![0x5a; 16 * 1024];
    let mut rounds = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        if let Err(error) = conn.roundtrip(&chunk, T) {
            return (conn, rounds, Some(error));
        }
        rounds += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    (conn, rounds, None)
}

/// A pod's masqueraded connections, the agent killed, the pins changed by `older` into
/// what an older release leaves, the agent started again: an idle connection and one
/// transferring all along carry on without a reset or a retransmission, the programs now
/// attached count into the pinned maps, and new connections work.
/// The pod's port of a [`UdpPair`].
const POD_UDP_PORT: u16 = 7000;

/// A UDP socket in a pod and one in another namespace of the lab, each datagram sent once
/// (no retry hides a lost one).
struct UdpPair {
    pod: std::net::UdpSocket,
    remote: std::net::UdpSocket,
}

/// A UDP socket bound to `addr` inside `ns`, waiting at most [`T`] for a datagram.
fn bind_udp(ns: &vcnpath_tests::lab::Netns, addr: SocketAddr) -> std::net::UdpSocket {
    let socket = run_in(ns, move || std::net::UdpSocket::bind(addr))
        .and_then(|bound| Ok(bound?))
        .unwrap_or_else(|e| panic!("UDP bind {addr}: {e:#}"));
    socket.set_read_timeout(Some(T)).expect("read timeout");
    socket
}

impl UdpPair {
    fn bind(s: &Setup, pod: Ipv4Addr, remote: (&vcnpath_tests::lab::Netns, Ipv4Addr)) -> Self {
        Self {
            pod: bind_udp(s.pod(pod).ns(), SocketAddr::from((pod, POD_UDP_PORT))),
            remote: bind_udp(remote.0, SocketAddr::from((remote.1, 0))),
        }
    }

    /// A flow the remote end opens to the pod (from outside the VCN: recorded in
    /// `inbound`, the pod marked).
    fn opened_by_remote(s: &Setup, pod: Ipv4Addr) -> Self {
        let pair = Self::bind(s, pod, (s.lab.inet(), s.lab.inet_ip()));
        let to = pair.pod.local_addr().expect("the pod's address");
        pair.remote.send_to(b"open", to).expect("send to the pod");
        let (_, from) = pair
            .pod
            .recv_from(&mut [0; 64])
            .expect("the remote's datagram reaches the pod");
        assert_eq!(
            from,
            pair.remote.local_addr().expect("the remote's address")
        );
        pair
    }

    /// The pod sends one datagram: the source the remote end saw.
    fn pod_speaks(&self, s: &Setup) -> SocketAddr {
        let to = self.remote.local_addr().expect("the remote's address");
        self.pod
            .send_to(b"from the pod", to)
            .expect("send from the pod");
        match self.remote.recv_from(&mut [0; 64]) {
            Ok((_, from)) => from,
            Err(e) => panic!(
                "the pod's datagram did not reach {to} ({e}); router drops {:?}:\n{}\nagent log:\n{}",
                (0..2)
                    .map(|v| s.lab.router_drops(v).ok())
                    .collect::<Vec<_>>(),
                s.counters(),
                s.agent.log()
            ),
        }
    }
}

fn upgrade_keeps_connections(tag: &str, older: impl FnOnce(&std::path::Path)) {
    let mut s = setup(tag, LabOptions::default());
    let server = TcpServer::start(s.lab.inet(), SocketAddr::from((s.lab.inet_ip(), 8080))).unwrap();
    // POD_B is on eth1: its traffic needs `vnics`, `endpoints` and `config` to be steered
    // out of eth0 and masqueraded.
    let mut conn = TcpConn::connect(s.pod(POD_B).ns(), None, server.addr(), T).unwrap();
    conn.roundtrip(b"before", T).unwrap();
    let inbound = UdpPair::opened_by_remote(&s, POD_B);
    assert_eq!(
        inbound.pod_speaks(&s),
        SocketAddr::from((POD_B, POD_UDP_PORT))
    );
    let busy = TcpConn::connect(s.pod(POD_B).ns(), None, server.addr(), T).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    // Whether `older` left flow tables of another layout.
    let mut converts = false;
    let (busy, rounds, failure, log) = std::thread::scope(|scope| {
        let transfer = scope.spawn(|| keep_transferring(busy, &stop));
        s.agent.kill9().unwrap();
        older(&s.pins.path);
        let nat = aya::maps::MapInfo::from_pin(s.pins.path.join(vcnpath_common::MAP_NAT));
        converts = nat.unwrap().value_size() as usize != size_of::<vcnpath_common::NatEntry>();
        conn.roundtrip(b"between", T)
            .expect("the attached programs keep their maps while the pins change");
        let restarted = s.agent.restart(&s.lab);
        // Some round trips under the new programs too.
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (busy, rounds, failure) = transfer.join().expect("the transfer thread");
        restarted.expect("the upgraded agent starts");
        (busy, rounds, failure, s.agent.log())
    });
    assert!(
        failure.is_none(),
        "the transfer running through the upgrade failed after {rounds} round trips: {failure:?}"
    );
    assert!(
        rounds > 10,
        "the transfer ran all along ({rounds} round trips)"
    );
    assert_eq!(
        busy.retransmits().unwrap(),
        0,
        "no segment of the running transfer (nor a reply) was lost over the upgrade"
    );
    assert!(
        log.contains("replacing a pinned map")
            && log.contains("attaching waits for the first sync")
            && log.contains("adopted=false"),
        "the agent must replace the incompatible maps and the programs bound to them:\n{log}"
    );
    assert_eq!(
        log.contains("flow table converted") && log.contains("flow table conversion finished"),
        converts,
        "the agent must convert flow tables of an older layout, and only those:\n{log}"
    );
    let before = s.counters().get(Reason::SnatEstablished);
    conn.roundtrip(b"after", T)
        .expect("the established connection survives the upgrade");
    assert!(
        s.counters().get(Reason::SnatEstablished) > before,
        "the programs now attached must count into the stats map that is pinned"
    );
    assert_eq!(
        inbound.pod_speaks(&s),
        SocketAddr::from((POD_B, POD_UDP_PORT)),
        "the pod speaking first on the flow the internet host opened before the upgrade keeps its address"
    );
    let mut fresh = TcpConn::connect(s.pod(POD_B).ns(), None, server.addr(), T).unwrap();
    fresh
        .roundtrip(b"new", T)
        .expect("a new connection after the upgrade");
    let seen = server.wait_connections(3, T).unwrap();
    assert_eq!(
        seen.len(),
        3,
        "neither connection from before the upgrade was re-established: {seen:?}"
    );
    assert!(
        seen.iter()
            .all(|c| c.peer.ip() == std::net::IpAddr::V4(MASQ)),
        "every connection arrives from the masquerade address: {seen:?}"
    );
    s.assert_no_router_drops();
}

#[test]
fn lab_no_checksum_errors_with_offloads_off() {
    if !have_root("lab_offloads") {
        return;
    }
    let s = setup("csum", LabOptions::default());
    assert_checksums_survive(&s, false);
}

/// The pods keep their offloads, so their TCP and UDP packets reach the node's TC egress
/// as `CHECKSUM_PARTIAL` (only the pseudo-header sum is in the checksum field); the node's
/// interfaces have transmit checksumming off, so the kernel completes the checksum in
/// software after the programs rewrote address and port. A wrong update of the
/// pseudo-header part shows at the receivers, which verify every checksum.
#[test]
fn lab_checksum_partial_from_pods_is_completed_right_by_the_node() {
    if !have_root("lab_csum_partial") {
        return;
    }
    let s = setup("cpart", LabOptions::default());
    assert_checksums_survive(&s, true);
}

/// Offloads off everywhere but in the pods (`pods_offload`: on there), then TCP, UDP and
/// ICMP from each pod to the internet and the VCN peer: every transfer completes and no
/// receiver counts a checksum error.
fn assert_checksums_survive(s: &Setup, pods_offload: bool) {
    for ns in [s.lab.node(), s.lab.router(), s.lab.peer(), s.lab.inet()] {
        stats::set_all_offloads(ns, false).expect("ethtool -K … off");
    }
    for pod in &s.pods {
        stats::set_all_offloads(pod.ns(), pods_offload).expect("ethtool -K … in the pod");
    }
    let server = TcpServer::start(s.lab.inet(), SocketAddr::from((s.lab.inet_ip(), 8080))).unwrap();
    let peer = TcpServer::start(s.lab.peer(), SocketAddr::from((s.lab.peer_ip(), 8080))).unwrap();
    let echo =
        UdpEchoServer::start(s.lab.inet(), SocketAddr::from((s.lab.inet_ip(), 5353))).unwrap();
    for pod in [POD_A, POD_B] {
        let ns = s.pod(pod).ns();
        tcp_bulk(ns, None, server.addr(), 4 * MB, T).expect("TCP to the internet");
        tcp_bulk(ns, None, peer.addr(), MB, T).expect("TCP to the peer");
        udp_request(ns, None, echo.addr(), b"csum", T).expect("UDP to the internet");
        assert!(ping(ns, s.lab.inet_ip(), 2, T).unwrap());
    }
    for ns in [s.lab.inet(), s.lab.peer()]
        .into_iter()
        .chain(s.pods.iter().map(Pod::ns))
    {
        let errors = stats::checksum_errors(ns).unwrap();
        assert!(
            errors.is_empty(),
            "checksum errors in {}: {errors:?}",
            ns.name()
        );
    }
}

/// Sends one UDP datagram from pod A's namespace with source `from` (an address pod A
/// has been given besides its own) to the echo server; tells whether an answer came.
fn spoofed_request(s: &Setup, from: Ipv4Addr, echo: &UdpEchoServer) -> bool {
    let from = SocketAddr::from((from, 40_123));
    udp_request(
        s.pod(POD_A).ns(),
        Some(from),
        echo.addr(),
        b"spoof",
        Duration::from_secs(2),
    )
    .is_ok()
}

#[test]
fn lab_a_pod_cannot_send_as_another_pod_even_with_rp_filter_off() {
    if !have_root("lab_spoof") {
        return;
    }
    let s = setup("spoof", LabOptions::default());
    // The node's reverse-path filter off everywhere a pod packet passes: only vcnpath can
    // stop pod A now.
    let node = s.lab.node();
    let mut scopes = vec!["all".to_owned(), "default".to_owned()];
    scopes.extend((0..2).map(|v| s.lab.vnic(v).expect("vnic").ifname.to_owned()));
    scopes.extend(s.pods.iter().map(|p| p.host_ifname().to_owned()));
    for scope in &scopes {
        node.sysctl(&format!("net/ipv4/conf/{scope}/rp_filter"), "0")
            .expect("rp_filter off");
    }
    // Pod A claims pod B's address: its kernel now sends from it on request.
    s.pod(POD_A)
        .ns()
        .ip(&["addr", "add", &format!("{POD_B}/32"), "dev", "eth0"])
        .expect("second address in pod A");
    let echo =
        UdpEchoServer::start(s.lab.inet(), SocketAddr::from((s.lab.inet_ip(), 5353))).unwrap();

    // What the CNI plugin does for every pod veth it creates.
    for pod in &s.pods {
        let ifname = pod.host_ifname().to_owned();
        vcnpath_tests::lab::netns::run_in(node, || {
            vcnpath::datapath::attach_pinned_pod(&s.pins.path, &ifname)
        })
        .expect("entering the node")
        .unwrap_or_else(|e| panic!("attaching the anti-spoofing check to {ifname}: {e}"));
    }

    let before = s.counters().get(Reason::DropSpoofed);
    spoofed_request(&s, POD_B, &echo);
    assert!(
        echo.peers().is_empty(),
        "a datagram pod A sent as pod B reached the internet (seen from {:?}): it rode pod B's identity",
        echo.peers()
    );
    let dropped = s.counters().get(Reason::DropSpoofed) - before;
    assert!(
        dropped >= 1,
        "the spoofed datagrams must be counted, saw {dropped}\n{}",
        s.counters()
    );

    // Pod A with its own address is untouched.
    assert!(
        spoofed_request(&s, POD_A, &echo),
        "pod A's own datagram must still get its answer\n{}",
        s.counters()
    );
    s.assert_no_router_drops();
}

/// Runs `tc ARGS` in the node namespace; returns its output.
fn tc(s: &Setup, args: &[&str]) -> String {
    let out = vcnpath_tests::lab::cmd_in(s.lab.node(), "tc")
        .args(args)
        .output()
        .expect("running tc");
    assert!(
        out.status.success(),
        "tc {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether vcnpath's `program` is attached on the `hook` of `interface` (node namespace).
fn attached(s: &Setup, interface: &str, hook: &str, program: &str) -> bool {
    tc(s, &["filter", "show", "dev", interface, hook]).contains(program)
}

/// Waits up to `within` for `done`; tells whether it came.
fn eventually(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + within;
    loop {
        if done() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The repair pass's period in the lab configuration (`sync_interval_secs`, default 1 s),
/// with a margin for a loaded machine (stretched under emulation, `vcnpath_tests::scaled`).
fn repair_within() -> Duration {
    vcnpath_tests::scaled(Duration::from_secs(3))
}

/// Filters deleted by hand on both VNICs during a pod flow, and pins deleted, come back
/// within one repair period; the flow recovers and new connections leave with the right
/// source address.
#[test]
fn lab_filters_and_pins_deleted_by_hand_are_repaired_within_a_period() {
    if !have_root("lab_repair") {
        return;
    }
    let s = setup("repair", LabOptions::default());
    let server = TcpServer::start(s.lab.inet(), SocketAddr::from((s.lab.inet_ip(), 8080))).unwrap();
    let peer = TcpServer::start(s.lab.peer(), SocketAddr::from((s.lab.peer_ip(), 8080))).unwrap();
    let mut conn = TcpConn::connect(s.pod(POD_B).ns(), None, server.addr(), T).unwrap();
    conn.roundtrip(b"before", T).unwrap();

    for interface in ["eth0", "eth1"] {
        for hook in ["egress", "ingress"] {
            tc(&s, &["filter", "del", "dev", interface, hook]);
        }
    }
    // No check that they are gone now: with a 1 s period the agent may already have put
    // them back (under emulation each `tc` takes a third of a second). The log lines
    // asserted below prove both the deletion and the repair.
    for pin in [vcnpath_common::PROG_POD, MAP_STATS] {
        std::fs::remove_file(s.pins.path.join(pin)).expect("deleting a pin");
    }

    let repaired = eventually(repair_within(), || {
        ["eth0", "eth1"].iter().all(|i| {
            attached(&s, i, "egress", vcnpath_common::PROG_EGRESS)
                && attached(&s, i, "ingress", vcnpath_common::PROG_INGRESS)
        }) && [vcnpath_common::PROG_POD, MAP_STATS]
            .iter()
            .all(|p| s.pins.path.join(p).exists())
    });
    assert!(
        repaired,
        "within {:?} the filters on eth0 and eth1 and the deleted pins must be back:\n{}\n{}\nagent log:\n{}",
        repair_within(),
        tc(&s, &["filter", "show", "dev", "eth1", "egress"]),
        tc(&s, &["filter", "show", "dev", "eth1", "ingress"]),
        s.agent.log()
    );
    let log = s.agent.log();
    assert!(
        log.contains("interface=eth0")
            && log.contains("interface=eth1")
            && log.contains("attached again"),
        "each repaired interface must be logged by name:\n{log}"
    );

    conn.roundtrip(b"after", T)
        .expect("the pod's flow recovers once the filters are back");
    let before = s.counters().get(Reason::SnatNew);
    let report = tcp_bulk(s.pod(POD_B).ns(), None, server.addr(), MB, T)
        .expect("a new pod connection to the internet");
    assert_eq!(
        report.peer_seen.ip(),
        std::net::IpAddr::V4(MASQ),
        "the internet sees the masquerade address"
    );
    let report = tcp_bulk(s.pod(POD_B).ns(), None, peer.addr(), MB, T)
        .expect("a new pod connection to the VCN peer");
    assert_eq!(
        report.peer_seen.ip(),
        std::net::IpAddr::V4(POD_B),
        "the VCN peer sees the pod's own address"
    );
    assert!(
        s.counters().get(Reason::SnatNew) > before,
        "the re-pinned stats map is the one the attached programs count into"
    );
}

/// Pod veths without the anti-spoofing check — made before the agent started (an
/// upgrade that introduced the program), or whose filter was deleted — are covered by the
/// agent, and what a pod sends as another pod is dropped and counted.
#[test]
fn lab_pod_veths_without_the_antispoofing_check_are_covered_by_the_agent() {
    if !have_root("lab_spoof_repair") {
        return;
    }
    let mut s = setup("spoofrep", LabOptions::default());
    let node = s.lab.node();
    let mut scopes = vec!["all".to_owned(), "default".to_owned()];
    scopes.extend((0..2).map(|v| s.lab.vnic(v).expect("vnic").ifname.to_owned()));
    scopes.extend(s.pods.iter().map(|p| p.host_ifname().to_owned()));
    for scope in &scopes {
        node.sysctl(&format!("net/ipv4/conf/{scope}/rp_filter"), "0")
            .expect("rp_filter off");
    }
    s.pod(POD_A)
        .ns()
        .ip(&["addr", "add", &format!("{POD_B}/32"), "dev", "eth0"])
        .expect("second address in pod A");
    let echo =
        UdpEchoServer::start(s.lab.inet(), SocketAddr::from((s.lab.inet_ip(), 5353))).unwrap();
    let veth = s.pod(POD_A).host_ifname().to_owned();
    let spoof_is_dropped = |s: &Setup, when: &str| {
        let before = s.counters().get(Reason::DropSpoofed);
        let answered = echo.peers().len();
        spoofed_request(s, POD_B, &echo);
        assert_eq!(
            echo.peers().len(),
            answered,
            "{when}: a datagram pod A sent as pod B reached the internet (seen from {:?})\nagent log:\n{}",
            echo.peers(),
            s.agent.log()
        );
        assert!(
            s.counters().get(Reason::DropSpoofed) > before,
            "{when}: the spoofed datagram must be counted as dropped-spoofed-source\n{}",
            s.counters()
        );
        assert!(
            spoofed_request(s, POD_A, &echo),
            "{when}: pod A's own datagram must still get its answer"
        );
    };

    // The pods' veths existed before the agent started; nothing attached the check.
    spoof_is_dropped(&s, "after the agent started");

    tc(&s, &["filter", "del", "dev", &veth, "ingress"]);
    assert!(
        eventually(repair_within(), || attached(
            &s,
            &veth,
            "ingress",
            vcnpath_common::PROG_POD
        )),
        "within {:?} the check must be back on {veth}\nagent log:\n{}",
        repair_within(),
        s.agent.log()
    );
    assert!(
        s.agent.log().contains(&format!("interface={veth}")),
        "the repaired pod veth must be logged by name:\n{}",
        s.agent.log()
    );
    spoof_is_dropped(&s, "after the filter was deleted by hand");

    s.agent.kill9().unwrap();
    tc(&s, &["filter", "del", "dev", &veth, "ingress"]);
    s.agent.restart(&s.lab).expect("restart");
    assert!(
        attached(&s, &veth, "ingress", vcnpath_common::PROG_POD),
        "the restarted agent covers {veth} before it is ready"
    );
    spoof_is_dropped(&s, "after a restart");
    s.assert_no_router_drops();
}
