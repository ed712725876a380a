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
    node_agent::{IPS_PER_VNIC, NodeAgent},
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
