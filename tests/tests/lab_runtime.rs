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
    status_ips_at(&agent.socket())
}

/// The pod addresses `vcnpath status --socket socket` lists.
fn status_ips_at(socket: &std::path::Path) -> BTreeSet<Ipv4Addr> {
    let out = std::process::Command::new(vcnpath_tests::agent::binary())
        .args(["status", "--json", "--socket"])
        .arg(socket)
        .output()
        .expect("vcnpath status");
    let status: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("vcnpath status: {}", String::from_utf8_lossy(&out.stderr)));
    status["pods"]
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

/// Waits (at most [`T`]) for containerd's `NetworkReady`; panics with `agent_log` if it
/// never comes.
fn wait_network_ready(ctrd: &Containerd, agent_log: impl Fn() -> String) {
    let deadline = std::time::Instant::now() + T;
    while !ctrd.network_ready().expect("CRI status") {
        assert!(
            std::time::Instant::now() < deadline,
            "NetworkReady never came once the agent served; agent log:\n{}",
            agent_log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
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
    wait_network_ready(&ctrd, || agent.latest_log());
    let pod = run_pod(&ctrd, "ready");
    let ip: Ipv4Addr = pod["ip"].as_str().expect("ip").parse().expect("IPv4");
    assert_eq!(status_ips(&agent), BTreeSet::from([ip]));
}

/// The capabilities the daemon set adds (it drops all others), by number.
const DAEMONSET_CAPS: [(&str, u32); 4] = [
    ("NET_ADMIN", 12),
    ("SYS_RESOURCE", 24),
    ("PERFMON", 38),
    ("BPF", 39),
];

/// A capability set of `/proc/<pid>/status` (`CapEff:`, `CapBnd:`, …).
fn cap_set(pid: &str, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("its status");
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    u64::from_str_radix(hex.trim(), 16).expect("a hex capability set")
}

/// `GET path` over HTTP/1.0 from the node namespace; the status line.
fn http_status(lab: &SimLab, to: SocketAddr, path: &str) -> anyhow::Result<String> {
    use std::io::Write as _;
    let mut s = tcp_connect(lab.lab().node(), None, to, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {to}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text.lines().next().unwrap_or_default().to_owned())
}

/// The one image the shipped daemon set's containers run.
fn daemonset_image(manifest: &str) -> String {
    let images: BTreeSet<&str> = manifest
        .lines()
        .filter_map(|l| l.trim().strip_prefix("image: "))
        .collect();
    assert_eq!(images.len(), 1, "the daemon set runs one image: {images:?}");
    images.into_iter().next().unwrap().to_owned()
}

/// The shipped daemon set's pod as [`run_shipped_daemonset`] started it.
struct DaemonSetPod {
    /// `cri.py daemonset`'s answer: sandbox, containers by name, probes.
    pod: Value,
    /// The agent container's log.
    log: std::path::PathBuf,
    /// The capabilities the agent should run with: the manifest's, as far as this
    /// machine's root can grant them.
    caps: u64,
}

impl DaemonSetPod {
    fn agent_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn agent_container(&self) -> &str {
        self.pod["containers"]["vcnpath"]
            .as_str()
            .expect("the agent container")
    }
}

/// Runs `deploy/daemonset.yaml` with `deploy/configmap.yaml`, unchanged, through
/// `tests/python/kubelet.py` and CRI on `ctrd`, with the node image; checks that the init
/// step installed the plugins.
fn run_shipped_daemonset(lab: &SimLab, ctrd: &Containerd) -> DaemonSetPod {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let manifest = deploy.join("daemonset.yaml");
    let image = daemonset_image(&std::fs::read_to_string(&manifest).expect("the manifest"));
    ctrd.import_node_image(&image).expect("the node image");

    // A machine whose root lacks a capability in its bounding set (some sandboxes drop
    // CAP_SYS_RESOURCE, which the agent needs only before Linux 5.11) cannot grant it to
    // any container: such capabilities are left out, said here, and expected absent.
    let bounding = cap_set("self", "CapBnd:");
    let lacking: Vec<&str> = DAEMONSET_CAPS
        .iter()
        .filter(|(_, bit)| bounding & 1 << bit == 0)
        .map(|(name, _)| *name)
        .collect();
    if !lacking.is_empty() {
        eprintln!(
            "this machine's root cannot grant {lacking:?}; the agent's container runs without them"
        );
    }
    let caps = DAEMONSET_CAPS
        .iter()
        .fold(0u64, |set, (_, bit)| set | 1 << bit)
        & bounding;
    let endpoints = lab.agent_endpoints();
    let pods_log = ctrd.dir.path().join("pod-logs");
    let lab_json = ctrd.dir.path().join("lab.json");
    let spec = serde_json::json!({
        "host_ip": lab.lab().node_ip().to_string(),
        "node_root": ctrd.node_path("/"),
        "log_directory": pods_log,
        "configmap_dir": ctrd.dir.path().join("configmaps"),
        "caps_not_in_bounding_set": lacking,
        "extra_env": {"vcnpath": {
            "VCNPATH_IMDS_URL": endpoints.imds_url,
            "VCNPATH_OCI_ENDPOINT": endpoints.oci_endpoint,
        }},
    });
    std::fs::write(&lab_json, spec.to_string()).expect("lab.json");
    let pod = ctrd
        .cri(&[
            "daemonset",
            &manifest.display().to_string(),
            &deploy.join("configmap.yaml").display().to_string(),
            &lab_json.display().to_string(),
        ])
        .unwrap_or_else(|e| {
            panic!(
                "the daemon set's pod: {e:#}\ncontainerd log:\n{}",
                ctrd.latest_log()
            )
        });
    for plugin in ["vcnpath-cni", "portmap", "loopback"] {
        let path = ctrd.node_path(&format!("/opt/cni/bin/{plugin}"));
        assert!(
            path.exists(),
            "the init step did not install {plugin}: {pod}"
        );
    }
    DaemonSetPod {
        pod,
        log: pods_log.join("vcnpath/0.log"),
        caps,
    }
}

/// Waits for containerd's `NetworkReady` (the agent's conflist in the node's
/// `/etc/cni/net.d`) and for the readiness probe the manifest declares to answer 200 on
/// the node's address.
fn wait_agent_ready(lab: &SimLab, ctrd: &Containerd, ds: &DaemonSetPod) {
    wait_network_ready(ctrd, || ds.agent_log());
    let conflist = std::fs::read_to_string(ctrd.node_path("/etc/cni/net.d/10-vcnpath.conflist"))
        .expect("the agent installed its conflist in the node's /etc/cni/net.d");
    assert!(conflist.contains("/run/vcnpath/vcnpath.sock"), "{conflist}");
    let probe = &ds.pod["probes"]["vcnpath/readinessProbe"];
    let port = u16::try_from(probe["port"].as_u64().expect("a port")).expect("a port");
    let to = SocketAddr::from((lab.lab().node_ip(), port));
    let path = probe["path"].as_str().expect("a path");
    let deadline = std::time::Instant::now() + T;
    loop {
        match http_status(lab, to, path) {
            Ok(line) if line.contains(" 200 ") => break,
            other if std::time::Instant::now() < deadline => {
                eprintln!("readiness {to}{path}: {other:?}");
                std::thread::sleep(Duration::from_millis(500));
            }
            other => panic!(
                "readiness {to}{path}: {other:?}\nagent log:\n{}",
                ds.agent_log()
            ),
        }
    }
}

/// The agent runs as the manifest says and not with more: exactly its capabilities, no
/// privilege escalation, `/proc/sys` and its root file system read-only.
fn assert_runs_as_the_manifest_says(ctrd: &Containerd, ds: &DaemonSetPod) {
    let cid = ds.agent_container();
    let pid = ctrd.cri(&["pid", cid]).expect("pid")["pid"]
        .as_u64()
        .expect("a pid");
    assert_eq!(
        cap_set(&pid.to_string(), "CapEff:"),
        ds.caps,
        "the agent's effective capabilities"
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("its status");
    assert!(
        status.contains("NoNewPrivs:\t1"),
        "the agent may gain privileges:\n{status}"
    );
    for (what, script) in [
        ("/proc/sys", "echo 1 > /proc/sys/net/ipv4/ip_forward"),
        ("the root file system", "echo x > /written"),
    ] {
        let out = ctrd
            .cri(&["exec", cid, "/bin/sh", "-c", script])
            .expect("exec");
        assert_ne!(
            out["exit"], 0,
            "{what} is writable in the agent's container: {out}"
        );
        assert!(
            out["stderr"]
                .as_str()
                .unwrap_or_default()
                .contains("Read-only"),
            "{what}: {out}"
        );
    }
}

/// The shipped daemon set (`deploy/daemonset.yaml` with `deploy/configmap.yaml`, unchanged)
/// run by containerd the way kubelet runs it — `hostNetwork`, the capabilities it adds and
/// no others, not privileged, a read-only root and `/proc/sys`, its `hostPath` and
/// `ConfigMap` mounts, the node image made from the same binaries — on a node whose CNI
/// directories are empty: the init step installs the plugins, the agent manages the node's
/// VNICs, installs the conflist (containerd turns `NetworkReady`), answers its readiness
/// probe and serves pods whose traffic leaves with their own addresses. Only the OCI
/// endpoints differ from a real node (the lab's simulator).
#[test]
fn the_shipped_daemonset_runs_the_agent_under_cri_and_it_serves_pods() {
    if !available("the_shipped_daemonset_runs_the_agent_under_cri_and_it_serves_pods") {
        return;
    }
    let lab = SimLab::new(LabOptions::default(), lab_sim_config()).expect("lab");
    let ctrd = Containerd::start_as_node(lab.lab().node()).expect("containerd");
    assert!(
        !ctrd.network_ready().expect("CRI status"),
        "NetworkReady before the daemon set ran"
    );
    let ds = run_shipped_daemonset(&lab, &ctrd);
    wait_agent_ready(&lab, &ctrd, &ds);
    assert_runs_as_the_manifest_says(&ctrd, &ds);

    // Pods on the node get VCN addresses from the agent and reach the VCN with them.
    let server = TcpServer::start(
        lab.lab().peer(),
        SocketAddr::from((lab.lab().peer_ip(), 8080)),
    )
    .expect("server");
    let pods: Vec<Value> = (0..2).map(|i| run_pod(&ctrd, &format!("app{i}"))).collect();
    let ips: BTreeSet<Ipv4Addr> = pods
        .iter()
        .map(|p| p["ip"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(ips.len(), 2, "pods share an address: {pods:?}");
    assert_eq!(
        status_ips_at(&ctrd.node_path("/run/vcnpath/vcnpath.sock")),
        ips,
        "CRI's addresses vs vcnpath status"
    );
    for (n, pod) in pods.iter().enumerate() {
        let out = connect_from(&ctrd, pod["container"].as_str().unwrap(), server.addr());
        assert_eq!(
            out["exit"],
            0,
            "nc from {pod}: {out}\nagent log:\n{}",
            ds.agent_log()
        );
        server.wait_connections(n + 1, T).expect("connections");
    }
    assert_eq!(
        seen_by(&server, 2),
        ips,
        "the peer saw the pods' own addresses"
    );
}
