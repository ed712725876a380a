//! The runtime tier: containerd's CRI plugin (Debian's containerd 1.6) in the lab's node
//! namespace runs pods through the shipped conflist and the real `vcnpath-cni`, against the
//! real agent and the OCI simulator, driven the way kubelet drives it.

use std::{
    collections::BTreeSet,
    io::Read as _,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use serde_json::Value;
use vcnpath_tests::{
    containerd::{Containerd, available},
    lab::{
        LabOptions, SimLab, lab_sim_config,
        traffic::{TcpServer, tcp_connect},
    },
    node_agent::{AgentOptions, IPS_PER_VNIC, NodeAgent},
};

const T: Duration = Duration::from_mins(1);

fn simlab() -> SimLab {
    let config = vcnpath_tests::ocisim::SimConfig {
        ips_per_vnic: IPS_PER_VNIC,
        ..lab_sim_config()
    };
    SimLab::new(LabOptions::default(), config).expect("simulator-driven lab")
}

/// The pod addresses `vcnpath status` lists.
fn status_ips(agent: &NodeAgent) -> BTreeSet<Ipv4Addr> {
    agent.status().expect("status")["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .filter_map(|p| p["ip"].as_str()?.parse().ok())
        .collect()
}

/// `RunPodSandbox`, retried while the pool grows (kubelet retries the same way).
fn run_pod(ctrd: &Containerd, name: &str) -> Value {
    run_pod_with(ctrd, &["run", name])
}

/// `cri.py` `args` (a `run`), retried while the pool grows.
fn run_pod_with(ctrd: &Containerd, args: &[&str]) -> Value {
    let name = args[1];
    let deadline = std::time::Instant::now() + T;
    loop {
        match ctrd.cri(args) {
            Ok(pod) => return pod,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("{name}: {e:#}; retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("{name}: {e:#}\ncontainerd log:\n{}", ctrd.latest_log()),
        }
    }
}

/// A TCP connection from inside the container to `to` (the test server's echo mode).
fn connect_from(ctrd: &Containerd, container: &str, to: SocketAddr) -> Value {
    let script = format!(
        "echo Ehello | /bin/busybox nc -w 3 {} {}",
        to.ip(),
        to.port()
    );
    ctrd.cri(&["exec", container, "/bin/sh", "-c", &script])
        .expect("exec")
}

#[test]
fn sandboxes_get_vcn_addresses_reach_the_peer_and_release_them() {
    if !available("sandboxes_get_vcn_addresses_reach_the_peer_and_release_them") {
        return;
    }
    let lab = simlab();
    let agent = NodeAgent::start(&lab, "rt-basic").expect("agent");
    let ctrd = Containerd::start(lab.lab().node(), &agent.socket()).expect("containerd");
    let server = TcpServer::start(
        lab.lab().peer(),
        SocketAddr::from((lab.lab().peer_ip(), 8080)),
    )
    .expect("server");

    let pods: Vec<Value> = (0..3).map(|i| run_pod(&ctrd, &format!("pod{i}"))).collect();
    let ips: BTreeSet<Ipv4Addr> = pods
        .iter()
        .map(|p| {
            p["ip"]
                .as_str()
                .expect("ip")
                .parse()
                .expect("an IPv4 address")
        })
        .collect();
    assert_eq!(
        ips.len(),
        pods.len(),
        "sandboxes share an address: {pods:?}"
    );
    assert_eq!(status_ips(&agent), ips, "CRI's addresses vs vcnpath status");

    for (n, pod) in pods.iter().enumerate() {
        let out = connect_from(&ctrd, pod["container"].as_str().unwrap(), server.addr());
        assert_eq!(out["exit"], 0, "nc from {pod}: {out}");
        let seen = server.wait_connections(n + 1, T).expect("connections");
        let ip: Ipv4Addr = pod["ip"].as_str().unwrap().parse().unwrap();
        assert!(
            seen.iter().any(|c| c.peer.ip() == ip),
            "the peer never saw {ip}: {seen:?}"
        );
    }

    for pod in &pods {
        let id = pod["sandbox"].as_str().unwrap();
        ctrd.cri(&["stop", id]).expect("stop");
        ctrd.cri(&["stop", id]).expect("stop again");
        ctrd.cri(&["remove", id]).expect("remove");
    }
    assert_eq!(ctrd.cri(&["list"]).expect("list"), serde_json::json!([]));
    assert_eq!(status_ips(&agent), BTreeSet::new(), "addresses still held");
}

#[test]
fn host_port_from_the_vcn_peer_reaches_the_pod() {
    if !available("host_port_from_the_vcn_peer_reaches_the_pod") {
        return;
    }
    let lab = simlab();
    let agent = NodeAgent::start(&lab, "rt-hostport").expect("agent");
    let ctrd = Containerd::start(lab.lab().node(), &agent.socket()).expect("containerd");
    let pod = run_pod_with(&ctrd, &["run", "web", "30080"]);
    let to = SocketAddr::from((lab.lab().node_ip(), 30080));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let answer = loop {
        let answer =
            tcp_connect(lab.lab().peer(), None, to, Duration::from_secs(3)).and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(3)))?;
                let mut text = String::new();
                s.read_to_string(&mut text)?;
                Ok(text)
            });
        match answer {
            Ok(text) if !text.is_empty() => break text,
            _ if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(300));
            }
            other => panic!(
                "hostPort {to} of {pod} never answered from the peer: {other:?}\ncontainerd log:\n{}",
                ctrd.latest_log()
            ),
        }
    };
    assert_eq!(answer.trim(), "hello");
}

/// The host-side pod veths in the lab's node namespace.
fn host_veths(lab: &SimLab) -> BTreeSet<String> {
    let json: Value = serde_json::from_str(
        &lab.lab()
            .node()
            .ip(&["-j", "link", "show"])
            .expect("ip link"),
    )
    .expect("ip -j link");
    json.as_array()
        .expect("links")
        .iter()
        .filter_map(|l| l["ifname"].as_str())
        .filter(|name| name.starts_with("vcn"))
        .map(str::to_owned)
        .collect()
}

/// The sandboxes containerd lists (in no particular order).
fn sandboxes(ctrd: &Containerd) -> BTreeSet<String> {
    ctrd.cri(&["list"])
        .expect("list")
        .as_array()
        .expect("sandbox ids")
        .iter()
        .filter_map(|id| Some(id.as_str()?.to_owned()))
        .collect()
}

/// The peer addresses `server` has seen after `n` connections.
fn seen_by(server: &TcpServer, n: usize) -> BTreeSet<Ipv4Addr> {
    server
        .wait_connections(n, T)
        .expect("connections")
        .iter()
        .filter_map(|c| match c.peer.ip() {
            std::net::IpAddr::V4(ip) => Some(ip),
            std::net::IpAddr::V6(_) => None,
        })
        .collect()
}

/// Pods reach the internet as the node's address; containerd killed and started again with
/// them running changes nothing: the same sandboxes, addresses and traffic.
#[test]
fn containerd_restarted_with_pods_running_changes_nothing() {
    if !available("containerd_restarted_with_pods_running_changes_nothing") {
        return;
    }
    let lab = simlab();
    let agent = NodeAgent::start(&lab, "rt-restart").expect("agent");
    let mut ctrd = Containerd::start(lab.lab().node(), &agent.socket()).expect("containerd");
    let inet = TcpServer::start(
        lab.lab().inet(),
        SocketAddr::from((lab.lab().inet_ip(), 8080)),
    )
    .expect("server");
    let pods: Vec<Value> = (0..2)
        .map(|i| run_pod(&ctrd, &format!("keep{i}")))
        .collect();
    for pod in &pods {
        let out = connect_from(&ctrd, pod["container"].as_str().unwrap(), inet.addr());
        assert_eq!(out["exit"], 0, "nc from {pod} to the internet: {out}");
    }
    assert_eq!(
        seen_by(&inet, 2),
        BTreeSet::from([lab.lab().node_ip()]),
        "the internet sees only the node's address"
    );
    let (running, ips, veths) = (sandboxes(&ctrd), status_ips(&agent), host_veths(&lab));

    ctrd.restart(lab.lab().node()).expect("containerd restarts");
    assert_eq!(sandboxes(&ctrd), running);
    assert_eq!(
        status_ips(&agent),
        ips,
        "addresses changed over the restart"
    );
    assert_eq!(
        host_veths(&lab),
        veths,
        "host veths changed over the restart"
    );
    for pod in &pods {
        let out = connect_from(&ctrd, pod["container"].as_str().unwrap(), inet.addr());
        assert_eq!(out["exit"], 0, "nc from {pod} after the restart: {out}");
    }
    assert_eq!(seen_by(&inet, 4), BTreeSet::from([lab.lab().node_ip()]));
}

/// kill -9 of the agent: running pods keep their traffic (the datapath stays pinned); a
/// sandbox asked for meanwhile fails with the plugin's retryable error and leaves no
/// sandbox, veth or address behind; once the agent is back new sandboxes work.
#[test]
fn an_agent_kill_keeps_pods_and_a_sandbox_while_it_is_down_fails_cleanly() {
    if !available("an_agent_kill_keeps_pods_and_a_sandbox_while_it_is_down_fails_cleanly") {
        return;
    }
    let lab = simlab();
    let mut agent = NodeAgent::start(&lab, "rt-kill").expect("agent");
    let ctrd = Containerd::start(lab.lab().node(), &agent.socket()).expect("containerd");
    let peer = TcpServer::start(
        lab.lab().peer(),
        SocketAddr::from((lab.lab().peer_ip(), 8080)),
    )
    .expect("server");
    let pod = run_pod(&ctrd, "before");
    let ip: Ipv4Addr = pod["ip"].as_str().unwrap().parse().unwrap();
    let container = pod["container"].as_str().unwrap();
    let (running, veths) = (sandboxes(&ctrd), host_veths(&lab));

    agent.kill9().expect("kill -9");
    let out = connect_from(&ctrd, container, peer.addr());
    assert_eq!(out["exit"], 0, "nc from {pod} with the agent down: {out}");
    assert_eq!(seen_by(&peer, 1), BTreeSet::from([ip]));
    let refused = ctrd
        .cri(&["run", "during"])
        .expect_err("a sandbox cannot get an address while the agent is down");
    assert!(
        format!("{refused:#}").contains("is the vcnpath DaemonSet running on this node?"),
        "the runtime should show the plugin's retryable error: {refused:#}"
    );
    assert_eq!(sandboxes(&ctrd), running, "a failed sandbox is left");
    assert_eq!(host_veths(&lab), veths, "a failed sandbox left a veth");

    agent.restart(&lab).expect("agent restarts");
    let after = run_pod(&ctrd, "after");
    let after_ip: Ipv4Addr = after["ip"].as_str().unwrap().parse().unwrap();
    assert_ne!(after_ip, ip, "a new sandbox got the running pod's address");
    assert_eq!(status_ips(&agent), BTreeSet::from([ip, after_ip]));
    let out = connect_from(&ctrd, after["container"].as_str().unwrap(), peer.addr());
    assert_eq!(out["exit"], 0, "nc from {after}: {out}");
    assert_eq!(seen_by(&peer, 2), BTreeSet::from([ip, after_ip]));
}

/// The agent installs the conflist once it serves: until then containerd reports the
/// network not ready (kubelet starts no pod on it); then it is ready and pods start.
#[test]
fn the_network_is_ready_only_once_the_agent_serves() {
    if !available("the_network_is_ready_only_once_the_agent_serves") {
        return;
    }
    let lab = simlab();
    let ctrd = Containerd::start_with(lab.lab().node(), None).expect("containerd");
    assert!(
        !ctrd.network_ready().expect("CRI status"),
        "NetworkReady before any agent ran"
    );
    let options = AgentOptions {
        cni_conf_dir: Some(ctrd.cni_conf_dir()),
        ..AgentOptions::default()
    };
    let agent = NodeAgent::start_with(&lab, "rt-ready", options).expect("agent");
    let deadline = std::time::Instant::now() + T;
    while !ctrd.network_ready().expect("CRI status") {
        assert!(
            std::time::Instant::now() < deadline,
            "NetworkReady never came once the agent served; agent log:\n{}",
            agent.latest_log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let pod = run_pod(&ctrd, "ready");
    let ip: Ipv4Addr = pod["ip"].as_str().expect("ip").parse().expect("IPv4");
    assert_eq!(status_ips(&agent), BTreeSet::from([ip]));
}
