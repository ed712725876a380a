//! The product end to end: the real `vcnpath run` against the OCI simulator in the
//! namespace lab, pods created with the real `vcnpath-cni`, real traffic through the VCN
//! router (which enforces OCI's source/destination check from the simulator's state).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use vcnpath_tests::{
    e2e::{
        MASQ, assert_consistent, assert_own_addresses_and_masquerade, delete_then_reuse,
        reach_peer_and_internet,
    },
    lab::{
        LabOptions, Netns, SimLab, lab_sim_config,
        traffic::{TcpConn, TcpServer, tcp_connect},
    },
    node_agent::{
        AgentOptions, CniPod, IPS_PER_VNIC, NodeAgent, add_pods, add_pods_in, checkpointed,
        cloud_ips, cni, cni_add, cni_gc, cni_status,
    },
    ocisim::{Faults, RateLimit as TenancyBudget},
    privileged::have_root,
};

const T: Duration = Duration::from_mins(1);

fn simlab() -> SimLab {
    let config = vcnpath_tests::ocisim::SimConfig {
        ips_per_vnic: IPS_PER_VNIC,
        attach_delay_ms: 300,
        ..lab_sim_config()
    };
    SimLab::new(LabOptions::default(), config).expect("simulator-driven lab")
}

/// What an operator scrapes: pool per VNIC, allocations, OCI calls, datapath counters.
fn assert_metrics_and_readiness(lab: &SimLab) {
    let metrics = vcnpath_tests::lab::process::run(
        vcnpath_tests::lab::cmd_in(lab.lab().node(), "curl")
            .args(["-sf", "http://127.0.0.1:19965/metrics"]),
    )
    .expect("/metrics answers");
    for expected in [
        "vcnpath_pool_addresses{",
        "vcnpath_allocations_total{result=\"ok\"} 40",
        "vcnpath_oci_requests_total{operation=\"CreatePrivateIp\",outcome=\"ok\"}",
        "vcnpath_oci_request_duration_seconds_bucket{operation=\"AttachVnic\"",
        "vcnpath_datapath_packets_total{direction=\"egress\",reason=\"redirected-to-owner\"}",
        "vcnpath_nat_entries",
    ] {
        assert!(
            metrics.contains(expected),
            "/metrics lacks {expected}:\n{metrics}"
        );
    }
    let ready = vcnpath_tests::lab::process::run(
        vcnpath_tests::lab::cmd_in(lab.lab().node(), "curl")
            .args(["-sf", "http://127.0.0.1:19965/readyz"]),
    );
    assert!(
        ready.is_ok(),
        "/readyz is 200 once the datapath is attached and the pool serves"
    );
}

#[test]
fn lab_forty_pods_across_two_vnics_reach_the_vcn_and_the_internet_and_addresses_come_back() {
    if !have_root("lab_agent_scale") {
        return;
    }
    let lab = simlab();
    let agent = NodeAgent::start(&lab, "e2e").expect("vcnpath run");
    let pods = add_pods(&lab, &agent, "pod", 40, T);

    let addresses: BTreeSet<Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
    assert_eq!(addresses.len(), 40, "40 distinct addresses");
    let mode = |path: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
    };
    let checkpoint = agent.checkpoint();
    assert_eq!(
        (mode(checkpoint.parent().unwrap()), mode(&checkpoint)),
        (0o700, 0o600),
        "the checkpoint, which names every pod, is root's only"
    );
    let vnics: BTreeSet<&str> = pods.iter().map(|p| p.interface.as_str()).collect();
    assert!(
        vnics.len() >= 2,
        "40 pods at {IPS_PER_VNIC} per VNIC need two VNICs, got {vnics:?}"
    );

    let seen = reach_peer_and_internet(&lab, &pods, T);
    assert_own_addresses_and_masquerade(&pods, &seen);
    let reserved = lab
        .lab()
        .node()
        .read_sysctl("net/ipv4/ip_local_reserved_ports")
        .expect("read the node's reserved ports");
    assert!(
        reserved.split(',').any(|r| r.trim() == "61000-65535"),
        "the agent reserves the NAT range from host sockets in its namespace: {reserved:?}"
    );
    for nic in 0..3 {
        assert_eq!(
            lab.router_drops(nic).unwrap_or(0),
            0,
            "the VCN router's source check dropped packets on VNIC {nic}"
        );
    }
    assert_consistent(&lab, &agent);

    assert_metrics_and_readiness(&lab);
    let status = cni_status(lab.lab().node(), &agent.socket()).expect("cni runs");
    assert!(status.ok, "CNI STATUS of a ready agent: {}", status.json);

    // Deleting pods frees their addresses; after the cooldown new pods reuse them.
    let again = delete_then_reuse(&lab, &agent, &pods[..10], "new", Duration::from_secs(4), T);
    assert_consistent(&lab, &agent);

    let listed: Vec<&CniPod> = pods[10..].iter().chain(&again[5..]).collect();
    let inet = TcpServer::start(
        lab.lab().inet(),
        SocketAddr::from((lab.lab().inet_ip(), 8080)),
    )
    .unwrap();
    assert_gc_keeps_recent_adds(&lab, &agent, &listed, &again[..5], inet.addr());
    assert_consistent(&lab, &agent);
}

/// A CNI GC listing `listed` and omitting `recent`, pods added moments ago, keeps them: the
/// runtime may have taken its list before their ADD (releasing unlisted pods is shown in
/// `ipam_sim` and `cni_plugin`, where the grace can be short).
fn assert_gc_keeps_recent_adds(
    lab: &SimLab,
    agent: &NodeAgent,
    listed: &[&CniPod],
    recent: &[CniPod],
    inet: SocketAddr,
) {
    let valid: Vec<&str> = listed.iter().map(|p| p.id.as_str()).collect();
    let gc = cni_gc(lab.lab().node(), &agent.socket(), &valid).expect("cni runs");
    assert!(gc.ok, "CNI GC: {}", gc.json);
    let held = checkpointed(&agent.checkpoint()).unwrap();
    assert_eq!(
        held.len(),
        listed.len() + recent.len(),
        "GC must not take the address of a recent ADD"
    );
    for pod in recent {
        tcp_connect(&pod.ns, None, inet, T)
            .expect("a pod the GC did not list but had just added keeps its networking");
    }
}

/// A VM-shape node (every VNIC attachment on `nicIndex` 0, interfaces named `ens3`,
/// `ens4`, `ens5` as a guest names them) grows to a second and a third VNIC: the agent
/// must bring each secondary interface up with its address and MTU, and the pods on it
/// must reach the VCN with their own address. Telling secondaries apart by `nicIndex`
/// leaves them down and unaddressed while pods get addresses on them.
/// Addresses per VNIC in the VM growth test: a handful of pods need two secondaries.
const PER_VNIC: u32 = 6;

/// A secondary VNIC as the agent must leave it: its interface up at MTU 9000 with the
/// VNIC's primary IP; returns the interface's name.
fn assert_configured(
    lab: &SimLab,
    agent: &NodeAgent,
    vnic_id: &str,
    ip: &str,
    subnet: &str,
) -> String {
    let node = lab.lab().node();
    let link = lab.wait_for_vnic(vnic_id, T).expect("the VNIC's interface");
    let shown = node
        .ip(&["-o", "link", "show", "dev", &link.ifname])
        .expect("ip link");
    assert!(
        shown.contains(",UP") && shown.contains("mtu 9000"),
        "the agent must bring {} (VNIC {vnic_id}) up at MTU 9000, saw: {shown}\nagent log:\n{}",
        link.ifname,
        agent.latest_log()
    );
    let prefix = subnet.rsplit('/').next().expect("prefix length");
    let addrs = node
        .ip(&["-o", "-4", "addr", "show", "dev", &link.ifname])
        .expect("ip addr");
    assert!(
        addrs.contains(&format!("inet {ip}/{prefix}")),
        "{} (VNIC {vnic_id}) must carry its primary IP {ip}/{prefix}, saw: {addrs}",
        link.ifname
    );
    link.ifname
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one growth story, read top to bottom"
)]
fn lab_a_vm_node_grows_to_three_vnics_and_the_pods_on_each_reach_the_vcn() {
    if !have_root("lab_agent_vm_growth") {
        return;
    }
    let lab = SimLab::new(
        LabOptions::default(),
        vcnpath_tests::ocisim::SimConfig {
            ips_per_vnic: PER_VNIC,
            max_vnic_attachments: 3,
            attach_delay_ms: 300,
            ..lab_sim_config()
        },
    )
    .expect("simulator-driven lab");
    let agent = NodeAgent::start_with(
        &lab,
        "vmgrow",
        AgentOptions {
            ips_per_vnic: PER_VNIC,
            warm_ips: 1,
            ..AgentOptions::default()
        },
    )
    .expect("vcnpath run");
    // More pods than one secondary VNIC holds: the pool attaches a second and a third VNIC.
    let pods = add_pods(&lab, &agent, "vm", PER_VNIC as usize + 2, T);

    let snapshot = lab.sim().snapshot();
    let attachments = snapshot["attachments"].as_array().expect("attachments");
    let live: Vec<&serde_json::Value> = attachments
        .iter()
        .filter(|a| a["lifecycleState"] == "ATTACHED")
        .collect();
    assert_eq!(
        live.len(),
        3,
        "the primary and two secondary VNICs: {live:?}"
    );
    assert!(
        live.iter().all(|a| a["nicIndex"] == 0),
        "a VM shape puts every VNIC on physical NIC 0: {live:?}"
    );

    let status = agent.status().expect("status");
    let secondaries: Vec<(String, String, String)> = status["vnics"]
        .as_array()
        .expect("vnics")
        .iter()
        .filter(|v| v["is_primary"] != true)
        .map(|v| {
            (
                v["vnic_id"].as_str().expect("vnic_id").to_owned(),
                v["primary_ip"].as_str().expect("primary_ip").to_owned(),
                v["subnet"].as_str().expect("subnet").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        secondaries.len(),
        2,
        "two secondary VNICs in the pool: {}",
        status["vnics"]
    );
    let interfaces: BTreeSet<String> = secondaries
        .iter()
        .map(|(vnic_id, ip, subnet)| assert_configured(&lab, &agent, vnic_id, ip, subnet))
        .collect();
    assert_eq!(
        interfaces,
        BTreeSet::from(["ens4".to_owned(), "ens5".to_owned()]),
        "the secondaries appear as ens4 and ens5"
    );
    let used: BTreeSet<&str> = pods.iter().map(|p| p.interface.as_str()).collect();
    assert_eq!(
        used,
        interfaces.iter().map(String::as_str).collect(),
        "pods live on both secondary VNICs"
    );
    assert_routers_resolved(&agent);

    let peer = TcpServer::start(
        lab.lab().peer(),
        SocketAddr::from((lab.lab().peer_ip(), 8080)),
    )
    .unwrap();
    for pod in &pods {
        let mut c = TcpConn::connect(&pod.ns, None, peer.addr(), Duration::from_secs(5))
            .unwrap_or_else(|e| {
                panic!(
                    "pod {} ({} on {}) → VCN peer: {e:#}\nagent log:\n{}",
                    pod.id,
                    pod.ip,
                    pod.interface,
                    agent.latest_log()
                )
            });
        c.roundtrip(b"vcn", T).expect("peer echo");
    }
    let seen_by_peer: BTreeSet<IpAddr> = peer
        .wait_connections(pods.len(), T)
        .unwrap()
        .iter()
        .map(|r| r.peer.ip())
        .collect();
    assert_eq!(
        seen_by_peer,
        pods.iter().map(|p| IpAddr::V4(p.ip)).collect(),
        "the VCN peer sees each pod's own address"
    );
    for (vnic_id, ..) in &secondaries {
        assert_eq!(
            lab.router_drop_counts_of(vnic_id)
                .expect("router counters")
                .total(),
            0,
            "the VCN router's source/destination check dropped packets of VNIC {vnic_id}"
        );
    }
    assert_consistent(&lab, &agent);
}

/// Every managed VNIC's router MAC is known within a few setup passes, before anything
/// has left through the VNIC: the agent asks the kernel to resolve it, so no redirect to
/// the VNIC depends on the neighbour table (see `lab_datapath`'s first-datagram test).
fn assert_routers_resolved(agent: &NodeAgent) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let status = agent.status().expect("status");
        let vnics = status["vnics"].as_array().expect("vnics");
        let unresolved: Vec<&serde_json::Value> = vnics
            .iter()
            .filter(|v| !v["interface"].is_null() && v["router_mac_resolved"] != true)
            .collect();
        if unresolved.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the routers of these VNICs are still unresolved: {unresolved:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn lab_kill_9_during_a_burst_and_a_fault_storm_loses_nothing() {
    if !have_root("lab_agent_crash") {
        return;
    }
    let lab = simlab();
    let mut agent = NodeAgent::start(&lab, "crash").expect("vcnpath run");
    let first = add_pods(&lab, &agent, "a", 4, T);
    let inet = TcpServer::start(
        lab.lab().inet(),
        SocketAddr::from((lab.lab().inet_ip(), 8080)),
    )
    .unwrap();
    let mut established =
        TcpConn::connect(&first[0].ns, None, inet.addr(), T).expect("a pod connection");
    established.roundtrip(b"before", T).unwrap();

    // A storm while the pool grows: 5xx, latency, and 429s from a tenancy budget of half the
    // agent's default rate (OCI throttles with a budget, not a fixed share of every call:
    // docs/oci.md); and a burst of ADDs that the agent is killed in the middle of.
    lab.sim().set_rate_limit(Some(TenancyBudget {
        per_second: 5.0,
        burst: 5,
        ..TenancyBudget::default()
    }));
    lab.sim().set_faults(Faults {
        latency_ms: 30,
        rate_5xx: 0.2,
        rate_hang: 0.0,
        ..Faults::default()
    });
    let burst: Vec<(String, Netns)> = (0..12)
        .map(|i| {
            (
                format!("b{i:03}"),
                lab.lab().add_pod_netns(&format!("b{i:03}")).unwrap(),
            )
        })
        .collect();
    let socket = agent.socket();
    let node = lab.lab().node();
    std::thread::scope(|scope| {
        let handles: Vec<_> = burst
            .iter()
            .map(|(id, ns)| scope.spawn(|| cni(node, &socket, "ADD", id, Some(ns.path()))))
            .collect();
        std::thread::sleep(Duration::from_millis(150));
        agent.kill9().expect("kill -9");
        for h in handles {
            let _ = h.join();
        }
    });
    established
        .roundtrip(b"agent dead", T)
        .expect("the datapath keeps the connection while the agent is down");
    agent.restart(&lab).expect("restart");
    assert!(
        agent.latest_log().contains("adopted=true"),
        "the restarted agent adopts the pinned datapath:\n{}",
        agent.latest_log()
    );
    let counters = || {
        vcnpath::datapath::Counters::read(
            &vcnpath::datapath::DatapathMaps::from_pins(&agent.pins.path).expect("pins"),
        )
        .expect("counters")
    };
    let before = counters();
    established
        .roundtrip(b"after", T)
        .expect("an established pod connection survives kill -9 and restart");
    let delta = before.delta(&counters());
    assert_eq!(
        delta.get(vcnpath_common::Reason::SnatNew),
        0,
        "the restart must keep the flow's NAT mapping (no new translation):\n{delta}"
    );
    assert!(
        delta.get(vcnpath_common::Reason::SnatEstablished) > 0,
        "{delta}"
    );

    // Finish the burst: every pod ends up with exactly one address.
    for (id, ns) in &burst {
        let out = cni_add(node, &agent.socket(), id, ns.path(), T).unwrap();
        assert!(out.ok, "ADD {id} after restart: {}", out.json);
    }
    lab.sim().set_faults(Faults::default());
    let throttled: u64 = lab.sim().throttled().values().sum();
    assert!(throttled > 0, "the tenancy's budget throttled the agent");
    lab.sim().set_rate_limit(None);
    assert_consistent(&lab, &agent);
    let held = checkpointed(&agent.checkpoint()).unwrap();
    assert_eq!(
        held.len(),
        4 + burst.len(),
        "every pod that asked has exactly one address"
    );
    // The maps agree with the checkpoint: every pod reaches the internet.
    for (_, ns) in &burst {
        tcp_connect(ns, None, inet.addr(), T)
            .expect("a pod added around the crash has working networking");
    }
}

/// A second `vcnpath run` on a node whose agent serves pods (someone debugging, a
/// `DaemonSet` surge): it exits at once naming the first, the checkpoint is untouched, and
/// the first agent goes on serving.
#[test]
fn lab_a_second_agent_on_the_node_exits_and_the_first_serves_on() {
    if !have_root("lab_a_second_agent_on_the_node_exits_and_the_first_serves_on") {
        return;
    }
    let lab = simlab();
    let agent = NodeAgent::start(&lab, "second").expect("vcnpath run");
    let pods = add_pods(&lab, &agent, "first", 3, T);
    let before = std::fs::read(agent.checkpoint()).expect("checkpoint");
    // "At once" is bounded generously: in an emulated VM starting the debug binary alone
    // takes seconds. What matters is that it exits, failing, with the checkpoint untouched.
    let (status, log) = agent
        .run_second(&lab, vcnpath_tests::scaled(Duration::from_mins(1)))
        .expect("the second agent exits");
    assert!(!status.success(), "the second agent must fail: {log}");
    assert!(
        log.contains("another vcnpath agent") && log.contains(&format!("pid {}", agent.pid())),
        "the second agent must name the first one: {log}"
    );
    assert_eq!(
        std::fs::read(agent.checkpoint()).unwrap(),
        before,
        "the checkpoint is untouched"
    );
    let more = add_pods(&lab, &agent, "after", 1, T);
    let held: BTreeSet<Ipv4Addr> = pods.iter().chain(&more).map(|p| p.ip).collect();
    assert_eq!(
        held.len(),
        4,
        "the first agent still serves, each pod its own address"
    );
    assert_consistent(&lab, &agent);
}

/// Every OCI operation the agent makes, the federation's `/v1/x509` included; IMDS (the
/// link-local metadata service) keeps answering.
const OCI_OPERATIONS: [&str; 11] = [
    "X509",
    "GetVnic",
    "GetSubnet",
    "GetVcn",
    "ListSubnets",
    "ListVnicAttachments",
    "GetVnicAttachment",
    "ListPrivateIps",
    "CreatePrivateIp",
    "DeletePrivateIp",
    "AttachVnic",
];

fn oci_fails(kind: vcnpath_tests::ocisim::FaultKind) -> Faults {
    Faults {
        rules: OCI_OPERATIONS
            .iter()
            .map(|op| vcnpath_tests::ocisim::FaultRule {
                op: (*op).into(),
                kind,
                status: 503,
                code: "ServiceUnavailable".into(),
                ..vcnpath_tests::ocisim::FaultRule::default()
            })
            .collect(),
        ..Faults::default()
    }
}

/// Start-up never depends on OCI: restarted while OCI answers only 5xx, garbage, nothing,
/// or refuses a node clock 10 minutes off, the agent serves its restored pods within 5 s,
/// `/healthz` is 200, a new pod is asked to try again later, and once OCI recovers the node
/// converges (new pods get addresses that exist in OCI).
#[test]
fn lab_a_restart_while_oci_fails_serves_restored_pods_and_converges() {
    use vcnpath_tests::ocisim::FaultKind;
    if !have_root("lab_a_restart_while_oci_fails_serves_restored_pods_and_converges") {
        return;
    }
    let lab = simlab();
    let mut agent = NodeAgent::start(&lab, "nooci").expect("vcnpath run");
    let pods = add_pods(&lab, &agent, "r", 2, T);
    let node = lab.lab().node();
    let outages = [
        ("answering 503", oci_fails(FaultKind::Status)),
        ("answering garbage", oci_fails(FaultKind::Truncate)),
        ("hanging", oci_fails(FaultKind::Hang)),
        (
            "10 minutes off the node's clock",
            Faults {
                clock_skew_s: 600,
                ..Faults::default()
            },
        ),
    ];
    for (n, (what, faults)) in outages.into_iter().enumerate() {
        lab.sim().set_faults(faults);
        agent.kill9().expect("kill -9");
        agent
            .restart(&lab)
            .unwrap_or_else(|e| panic!("with OCI {what}, vcnpath run must start: {e:#}"));
        let serving = std::time::Instant::now();
        for p in &pods {
            let out = cni_add(node, &agent.socket(), &p.id, p.ns.path(), T).expect("cni runs");
            assert!(
                out.ok && out.ip() == Some(p.ip),
                "with OCI {what}, restored pod {} must get its address {} back: {}",
                p.id,
                p.ip,
                out.json
            );
        }
        assert!(
            serving.elapsed() < vcnpath_tests::scaled(Duration::from_secs(5)),
            "with OCI {what}, restored pods must be served within 5 s of start (took {:?}, start {:?})",
            serving.elapsed(),
            agent.started_in()
        );
        let health = vcnpath_tests::lab::process::run(
            vcnpath_tests::lab::cmd_in(node, "curl")
                .args(["-sf", "http://127.0.0.1:19965/healthz"]),
        );
        assert!(health.is_ok(), "with OCI {what}, /healthz must be 200");
        let id = format!("new{n}");
        let ns = lab.lab().add_pod_netns(&id).expect("pod netns");
        // One ADD, as the kubelet makes it (cni_add would retry "try again" for a minute).
        let out = cni(node, &agent.socket(), "ADD", &id, Some(ns.path())).expect("cni runs");
        assert!(
            !out.ok && out.code() == Some(11),
            "with OCI {what}, a new pod must be told to try again later (CNI code 11): {}",
            out.json
        );
        assert!(
            out.json.to_string().contains("try again")
                && out.json.to_string().contains("held back: "),
            "the answer says why: {}",
            out.json
        );
        // The agent still runs: it waits OCI out.
        agent.status().expect("status answers while OCI fails");
    }
    lab.sim().set_faults(Faults::default());
    let ns = lab.lab().add_pod_netns("recovered").expect("pod netns");
    let deadline = std::time::Instant::now() + T;
    loop {
        let out = cni_add(node, &agent.socket(), "recovered", ns.path(), T).expect("cni runs");
        if out.ok {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "once OCI recovers a new pod gets an address: {}\n{}",
            out.json,
            agent.latest_log()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    assert_consistent(&lab, &agent);
}

/// Issue 10, item 1: a lost checkpoint must not turn the running pods' addresses free. Their
/// veths, /32 routes and `endpoints` entries are still on the node, and OCI still lists the
/// addresses tagged for it; an agent started without the file holds those addresses for
/// the running pods (which keep their traffic), hands none of them to a new pod, and lets one
/// go when its pod's DEL comes.
#[test]
fn lab_a_lost_checkpoint_never_hands_a_running_pods_address_to_a_new_pod() {
    if !have_root("lab_a_lost_checkpoint_never_hands_a_running_pods_address_to_a_new_pod") {
        return;
    }
    let lab = simlab();
    let mut agent = NodeAgent::start(&lab, "lostckpt").expect("vcnpath run");
    let running = add_pods(&lab, &agent, "old", 3, T);
    let held: BTreeMap<Ipv4Addr, String> = running.iter().map(|p| (p.ip, p.id.clone())).collect();
    agent.kill9().expect("kill -9");
    std::fs::remove_file(agent.checkpoint()).expect("delete the checkpoint");
    agent
        .restart(&lab)
        .unwrap_or_else(|e| panic!("vcnpath run must start without a checkpoint: {e:#}"));
    let status = agent.status().expect("status");
    assert_eq!(
        status["pool"]["recovered"], 3,
        "the running pods' addresses are held for them: {status}"
    );
    // More new pods than the pool held free, so a free-looking running address is reached.
    let new = add_pods(&lab, &agent, "new", 6, T);
    let reused: Vec<String> = new
        .iter()
        .filter_map(|p| {
            held.get(&p.ip)
                .map(|old| format!("{} got {}, which running pod {old} holds", p.id, p.ip))
        })
        .collect();
    assert!(
        reused.is_empty(),
        "with the checkpoint deleted, no new pod may get a running pod's address (its veth, /32 route and endpoints entry are still there): {reused:?}\n{}",
        agent.latest_log()
    );
    let peer = TcpServer::start(
        lab.lab().peer(),
        SocketAddr::from((lab.lab().peer_ip(), 8080)),
    )
    .expect("server");
    for pod in &running {
        let mut c = TcpConn::connect(&pod.ns, None, peer.addr(), T)
            .unwrap_or_else(|e| panic!("running pod {} ({}) → VCN peer: {e:#}", pod.id, pod.ip));
        c.roundtrip(b"vcn", T).expect("peer echo");
    }
    let seen: BTreeSet<IpAddr> = peer
        .wait_connections(running.len(), T)
        .expect("connections")
        .iter()
        .map(|r| r.peer.ip())
        .collect();
    assert_eq!(
        seen,
        running.iter().map(|p| IpAddr::V4(p.ip)).collect(),
        "the running pods keep their own addresses on the wire"
    );

    // The runtime's ADD again for a running pod (as after a failed CHECK) gives it back
    // its own address.
    let again = &running[1];
    let out = cni_add(
        lab.lab().node(),
        &agent.socket(),
        &again.id,
        again.ns.path(),
        T,
    )
    .expect("vcnpath-cni runs");
    assert_eq!(
        out.ip(),
        Some(again.ip),
        "ADD again of {}: {}",
        again.id,
        out.json
    );
    let status = agent.status().expect("status");
    assert_eq!(status["pool"]["recovered"], 2, "{status}");

    // The runtime's DEL of a running pod lets its address go (to cooldown), not leak.
    let gone = &running[0];
    let out = cni(
        lab.lab().node(),
        &agent.socket(),
        "DEL",
        &gone.id,
        Some(gone.ns.path()),
    )
    .expect("vcnpath-cni runs");
    assert!(out.ok, "DEL {}: {}", gone.id, out.json);
    let status = agent.status().expect("status");
    assert_eq!(status["pool"]["recovered"], 1, "{status}");
    let listed: BTreeSet<&str> = status["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .filter_map(|p| p["ip"].as_str())
        .collect();
    assert!(
        !listed.contains(gone.ip.to_string().as_str()),
        "the deleted pod's address is still held: {status}"
    );
}

/// Issue 10, item 3: the node itself notices a VNIC's interface vanish (the link deleted on
/// the host, as a hot-unplug does) and the agent stops handing out that VNIC's addresses,
/// although OCI still lists the VNIC as attached.
#[test]
fn lab_a_vnic_interface_deleted_on_the_host_serves_no_new_pod() {
    if !have_root("lab_a_vnic_interface_deleted_on_the_host_serves_no_new_pod") {
        return;
    }
    let lab = simlab();
    let agent = NodeAgent::start(&lab, "linkgone").expect("vcnpath run");
    let first = add_pods(&lab, &agent, "before", 1, T);
    let vnic = cloud_ips(&lab)
        .get(&first[0].ip)
        .cloned()
        .expect("the pod's address is a private IP in OCI");
    let status = agent.status().expect("status");
    let interface = status["vnics"]
        .as_array()
        .expect("vnics")
        .iter()
        .find(|v| v["vnic_id"] == vnic.as_str())
        .and_then(|v| v["interface"].as_str())
        .unwrap_or_else(|| panic!("the pod's VNIC {vnic} has an interface: {status}"))
        .to_owned();
    let node = lab.lab().node();
    vcnpath_tests::lab::process::run(
        vcnpath_tests::lab::cmd_in(node, "ip").args(["link", "del", &interface]),
    )
    .expect("delete the VNIC's interface");
    let deadline = std::time::Instant::now() + T;
    loop {
        let status = agent.status().expect("status");
        let still = status["vnics"]
            .as_array()
            .expect("vnics")
            .iter()
            .any(|v| v["vnic_id"] == vnic.as_str() && v["interface"] == interface.as_str());
        if !still {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent must notice {interface} of VNIC {vnic} is gone: {}\n{}",
            status["vnics"],
            agent.latest_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = agent.status().expect("status");
    assert!(
        status["vnics"]
            .as_array()
            .expect("vnics")
            .iter()
            .any(|v| v["vnic_id"] == vnic.as_str() && v["link"] == "lost"),
        "status shows VNIC {vnic}'s interface as lost: {}",
        status["vnics"]
    );
    // Each pod's ADD is retried as the kubelet retries it: the pool must grow past the VNIC
    // whose interface is gone (its free addresses serve nobody) and give every pod an address
    // elsewhere, never one of the vanished VNIC.
    let mut got = Vec::new();
    let grow = vcnpath_tests::scaled(Duration::from_secs(30));
    let deadline = std::time::Instant::now() + grow;
    for i in 0..3 {
        let id = format!("after{i}");
        let ns = lab.lab().add_pod_netns(&id).expect("pod netns");
        loop {
            let out = cni(node, &agent.socket(), "ADD", &id, Some(ns.path())).expect("cni runs");
            if let Some(ip) = out.ip().filter(|_| out.ok) {
                got.push((id, ip));
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "pod {id} got no address within {grow:?} after the interface {interface} of VNIC {vnic} was deleted (the pool must grow past it): {}\n{}",
                out.json,
                agent.latest_log()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let cloud = cloud_ips(&lab);
    let wrong: Vec<String> = got
        .iter()
        .filter(|(_, ip)| cloud.get(ip) == Some(&vnic))
        .map(|(id, ip)| format!("{id} got {ip}"))
        .collect();
    assert!(
        wrong.is_empty(),
        "no new pod may get an address of VNIC {vnic}, whose interface {interface} was deleted: {wrong:?}"
    );
}

/// Issue 11, item 9: IMDS hands the node's instance-principal key to any caller, so a pod
/// reaches it only when its Kubernetes namespace is allowed (`pod_imds_allow_namespaces`);
/// DNS at the same address (OCI's VCN resolver) stays open to every pod. A stand-in for IMDS
/// listens on the internet host, routed there as OCI routes the link-local address.
#[test]
fn lab_pods_reach_the_metadata_service_only_from_an_allowed_namespace() {
    if !have_root("lab_pods_reach_the_metadata_service_only_from_an_allowed_namespace") {
        return;
    }
    let lab = simlab();
    let imds = Ipv4Addr::from(vcnpath_common::IMDS_ADDR);
    lab.lab()
        .inet()
        .ip(&["addr", "add", &format!("{imds}/32"), "dev", "eth0"])
        .expect("IMDS stand-in address");
    lab.lab()
        .router()
        .ip(&[
            "route",
            "add",
            &format!("{imds}/32"),
            "via",
            &lab.lab().inet_ip().to_string(),
        ])
        .expect("route to the stand-in");
    let mut agent = NodeAgent::start_with(
        &lab,
        "imds",
        AgentOptions {
            pod_imds_allow_namespaces: vec!["kube-system".into()],
            ..AgentOptions::default()
        },
    )
    .expect("vcnpath run");
    let app = add_pods(&lab, &agent, "app", 1, T).remove(0);
    let system = add_pods_in(&lab, &agent, "sys", 1, "kube-system", T).remove(0);
    let metadata = TcpServer::start(lab.lab().inet(), SocketAddr::from((imds, 80))).unwrap();
    let dns = TcpServer::start(lab.lab().inet(), SocketAddr::from((imds, 53))).unwrap();

    assert!(
        TcpConn::connect(&app.ns, None, metadata.addr(), Duration::from_secs(3)).is_err(),
        "a pod of namespace e2e must not reach the metadata service"
    );
    TcpConn::connect(&app.ns, None, dns.addr(), Duration::from_secs(5))
        .expect("every pod reaches DNS at the same address")
        .roundtrip(b"dns", T)
        .expect("DNS echo");
    TcpConn::connect(&system.ns, None, metadata.addr(), Duration::from_secs(5))
        .unwrap_or_else(|e| {
            panic!(
                "a kube-system pod reaches the metadata service: {e:#}\n{}",
                agent.latest_log()
            )
        })
        .roundtrip(b"imds", T)
        .expect("IMDS echo");
    let seen: Vec<IpAddr> = metadata
        .wait_connections(1, T)
        .expect("the allowed connection")
        .iter()
        .map(|r| r.peer.ip())
        .collect();
    assert_eq!(
        seen,
        [IpAddr::V4(MASQ)],
        "only the allowed pod got through, masqueraded as the node"
    );
    let status = agent.status().expect("status");
    let dropped = status["datapath"]["counters"]["dropped-pod-imds"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        dropped >= 1,
        "the refusal is counted: {}",
        status["datapath"]["counters"]
    );

    // Issue 10: with the checkpoint lost, both pods are held as recovered (their namespaces
    // unknown): each keeps the access its pinned endpoint had, no more and no less.
    agent.kill9().expect("kill -9");
    std::fs::remove_file(agent.checkpoint()).expect("delete the checkpoint");
    agent
        .restart(&lab)
        .expect("vcnpath run without a checkpoint");
    let status = agent.status().expect("status");
    assert_eq!(status["pool"]["recovered"], 2, "{status}");
    // After the first datapath sync of the new agent.
    std::thread::sleep(Duration::from_secs(3));
    TcpConn::connect(&system.ns, None, metadata.addr(), Duration::from_secs(5))
        .unwrap_or_else(|e| {
            panic!(
                "the recovered kube-system pod keeps its access to the metadata service: {e:#}\n{}",
                agent.latest_log()
            )
        })
        .roundtrip(b"imds", T)
        .expect("IMDS echo");
    assert!(
        TcpConn::connect(&app.ns, None, metadata.addr(), Duration::from_secs(3)).is_err(),
        "the recovered pod of namespace e2e still must not reach the metadata service"
    );
}

/// Issue 9: `ipam.subnet_tag` finds the pod subnet where OCI keeps it, in the VCN's
/// compartment (the simulator's network compartment, not the instance's), and the pool's
/// VNICs are attached there.
#[test]
fn lab_subnet_tag_finds_the_pod_subnet_in_the_vcns_compartment() {
    if !have_root("lab_subnet_tag_finds_the_pod_subnet_in_the_vcns_compartment") {
        return;
    }
    let mut config = vcnpath_tests::ocisim::SimConfig {
        ips_per_vnic: IPS_PER_VNIC,
        attach_delay_ms: 300,
        ..lab_sim_config()
    };
    let tagged = config
        .subnets
        .iter_mut()
        .find(|s| s.cidr_block == "10.0.3.0/24")
        .expect("the lab's subnet C");
    tagged.freeform_tags.insert("vcnpath".into(), "pods".into());
    assert_ne!(
        config.network_compartment_id, config.compartment_id,
        "the lab's VCN is in a compartment of its own"
    );
    let lab = SimLab::new(LabOptions::default(), config).expect("simulator-driven lab");
    let agent = NodeAgent::start_with(
        &lab,
        "subnettag",
        AgentOptions {
            subnet_tag: Some("vcnpath=pods".into()),
            ..AgentOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("vcnpath run with ipam.subnet_tag: {e:#}"));
    let pods = add_pods(&lab, &agent, "tag", 2, T);
    let subnet_c: ipnet::Ipv4Net = "10.0.3.0/24".parse().unwrap();
    for pod in &pods {
        assert!(
            subnet_c.contains(&pod.ip),
            "pod {} got {}, not an address of the tagged subnet {subnet_c}\n{}",
            pod.id,
            pod.ip,
            agent.latest_log()
        );
    }
}

/// Issue 10: the node's routes are read again periodically, not only at start: a pod veth
/// with a /32 route to an address the pool has free (made behind the agent's back) gets
/// that address held within a GC pass, so no new pod is handed it.
#[test]
fn lab_an_address_routed_to_a_veth_behind_the_agents_back_is_held() {
    if !have_root("lab_an_address_routed_to_a_veth_behind_the_agents_back_is_held") {
        return;
    }
    let lab = simlab();
    let agent = NodeAgent::start(&lab, "byhand").expect("vcnpath run");
    let pods = add_pods(&lab, &agent, "p", 1, T);
    let free = *cloud_ips(&lab)
        .keys()
        .find(|ip| **ip != pods[0].ip)
        .expect("a free address in the pool");
    let node = lab.lab().node();
    for args in [
        vec![
            "link",
            "add",
            "vcnbyhand0",
            "type",
            "veth",
            "peer",
            "name",
            "byhand0p",
        ],
        vec!["link", "set", "vcnbyhand0", "up"],
        vec!["route", "add", &format!("{free}/32"), "dev", "vcnbyhand0"],
    ] {
        node.ip(&args).expect("ip");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let status = agent.status().expect("status");
        if status["pool"]["recovered"] == 1 {
            let held = status["pods"]
                .as_array()
                .expect("pods")
                .iter()
                .any(|p| p["ip"] == free.to_string().as_str() && p["ifname"] == "vcnbyhand0");
            assert!(held, "{free} is held for the veth: {status}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{free}, routed to a veth, is not held: {status}\n{}",
            agent.latest_log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `ipam.use_primary_vnic = true`: pods get addresses on the node's primary VNIC, with no
/// VNIC attached for them, and reach the VCN with their own addresses and the internet
/// masqueraded. The primary is set up at start, before the pool has it: until IPAM was told
/// its interface once the reconcile added it, every ADD was told to try again.
#[test]
fn lab_pods_on_the_primary_vnic_reach_the_vcn_with_their_own_addresses() {
    if !have_root("lab_primary_vnic") {
        return;
    }
    let lab = simlab();
    let agent = NodeAgent::start_with(
        &lab,
        "primvnic",
        AgentOptions {
            use_primary_vnic: true,
            ..AgentOptions::default()
        },
    )
    .expect("vcnpath run");
    let pods = add_pods(&lab, &agent, "pv", 3, T);
    let status = agent.status().expect("status");
    let primary = status["vnics"]
        .as_array()
        .expect("vnics")
        .iter()
        .find(|v| v["is_primary"] == true)
        .and_then(|v| v["vnic_id"].as_str())
        .expect("the primary VNIC serves pods")
        .to_owned();
    let cloud = cloud_ips(&lab);
    for pod in &pods {
        assert_eq!(
            cloud.get(&pod.ip),
            Some(&primary),
            "{} ({}) has an address of the primary VNIC",
            pod.id,
            pod.ip
        );
    }
    assert_eq!(
        status["vnics"].as_array().map(Vec::len),
        Some(1),
        "no VNIC was attached for them"
    );
    let seen = reach_peer_and_internet(&lab, &pods, T);
    assert_own_addresses_and_masquerade(&pods, &seen);
}
