//! `vcnpath-cni`, the real binary, run the way a container runtime runs it: inside a
//! "node" network namespace (nsenter), with `CNI_*` variables and the configuration on
//! stdin, against the agent's real local API served from a temp dir by an in-memory
//! allocator. Every namespace is a guard; nothing touches the root namespace.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Output, Stdio},
    sync::{Arc, Mutex},
};

use serde_json::Value;
use vcnpath::api;
use vcnpath::ipam::{AllocError, Allocation, Allocator, BoxFuture, PodRef};
use vcnpath_tests::{
    lab::{Netns, cmd_in},
    privileged::have_root,
};

/// An address on the node namespace's loopback that pods must reach through their veth.
const NODE_IP: &str = "10.99.0.1";

// ---------------------------------------------------------------------------------------
// The agent stand-in

/// Hands out 10.0.1.2–10.0.1.254 first-in first-out (a freed address goes to the back,
/// so handing one out twice would show). Pod names steer failures: `empty` → `PoolEmpty`,
/// `datapath` → Datapath error, `bad-mtu` → an MTU the kernel refuses (fails ADD after
/// the veth exists).
struct FakeAllocator {
    state: Mutex<FakeState>,
}

struct FakeState {
    free: VecDeque<Ipv4Addr>,
    pods: HashMap<(String, String), Allocation>,
}

const POOL_SIZE: usize = 253;

impl FakeAllocator {
    fn new() -> Self {
        Self {
            state: Mutex::new(FakeState {
                free: (2..=254).map(|n| Ipv4Addr::new(10, 0, 1, n)).collect(),
                pods: HashMap::new(),
            }),
        }
    }

    fn held(&self) -> HashMap<(String, String), Allocation> {
        self.state.lock().unwrap().pods.clone()
    }

    fn free_count(&self) -> usize {
        self.state.lock().unwrap().free.len()
    }
}

impl Allocator for FakeAllocator {
    fn allocate<'a>(&'a self, pod: &'a PodRef) -> BoxFuture<'a, Result<Allocation, AllocError>> {
        Box::pin(async move {
            match pod.name.as_deref() {
                Some("empty") => {
                    return Err(AllocError::PoolEmpty {
                        retry_after_ms: 500,
                        cause: None,
                    });
                }
                Some("datapath") => {
                    return Err(AllocError::Datapath {
                        reason: "endpoints map is full".into(),
                    });
                }
                _ => {}
            }
            let mut state = self.state.lock().unwrap();
            let key = (pod.container_id.clone(), pod.ifname.clone());
            if let Some(existing) = state.pods.get(&key) {
                return Ok(existing.clone());
            }
            let ip = state.free.pop_front().ok_or(AllocError::Exhausted {
                capacity: POOL_SIZE,
            })?;
            let allocation = Allocation {
                ip,
                vnic_id: "ocid1.vnic.oc1..fake".into(),
                interface: "eth1".into(),
                subnet: "10.0.1.0/24".parse().unwrap(),
                router_ip: Ipv4Addr::new(10, 0, 1, 1),
                mtu: if pod.name.as_deref() == Some("bad-mtu") {
                    50
                } else {
                    9000
                },
            };
            state.pods.insert(key, allocation.clone());
            Ok(allocation)
        })
    }

    fn release<'a>(
        &'a self,
        pod: &'a PodRef,
    ) -> BoxFuture<'a, Result<Option<Allocation>, AllocError>> {
        Box::pin(async move {
            let mut state = self.state.lock().unwrap();
            let released = state
                .pods
                .remove(&(pod.container_id.clone(), pod.ifname.clone()));
            if let Some(a) = &released {
                state.free.push_back(a.ip);
            }
            Ok(released)
        })
    }

    fn lookup<'a>(&'a self, pod: &'a PodRef) -> BoxFuture<'a, Option<Allocation>> {
        Box::pin(async move {
            let state = self.state.lock().unwrap();
            state
                .pods
                .get(&(pod.container_id.clone(), pod.ifname.clone()))
                .cloned()
        })
    }

    fn collect_not_listed<'a>(
        &'a self,
        valid: &'a std::collections::BTreeSet<(String, String)>,
    ) -> BoxFuture<'a, Vec<(PodRef, Allocation)>> {
        Box::pin(async move {
            let mut state = self.state.lock().unwrap();
            let unlisted: Vec<_> = state
                .pods
                .keys()
                .filter(|key| !valid.contains(*key))
                .cloned()
                .collect();
            let mut released = Vec::new();
            for (container_id, ifname) in unlisted {
                let a = state
                    .pods
                    .remove(&(container_id.clone(), ifname.clone()))
                    .expect("listed above");
                state.free.push_back(a.ip);
                let pod = PodRef {
                    container_id,
                    ifname,
                    namespace: None,
                    name: None,
                };
                released.push((pod, a));
            }
            released
        })
    }
}

/// What the agent answers to STATUS: the reasons it is not ready (none: ready).
#[derive(Default)]
struct FakeReadiness(Mutex<Vec<String>>);

impl api::Readiness for FakeReadiness {
    fn not_ready(&self) -> BoxFuture<'_, Vec<String>> {
        Box::pin(async move { self.0.lock().unwrap().clone() })
    }
}

// ---------------------------------------------------------------------------------------
// The fixture: node netns, API server, plugin runner

struct Fixture {
    tag: String,
    fake: Arc<FakeAllocator>,
    readiness: Arc<FakeReadiness>,
    socket: PathBuf,
    // Field order is drop order: the server stops, then the temp dir and the node go.
    _runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    node: Netns,
}

/// What one plugin run printed and returned.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn from_output(output: &Output) -> Self {
        Self {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "plugin stdout is not JSON ({e}): {:?} (stderr: {})",
                self.stdout, self.stderr
            )
        })
    }

    /// Asserts success and returns stdout.
    fn ok(&self, what: &str) -> &str {
        assert_eq!(
            self.code,
            Some(0),
            "{what}: expected success, got exit {:?} with {} (stderr: {})",
            self.code,
            self.stdout,
            self.stderr
        );
        &self.stdout
    }

    /// Asserts a CNI error with `code` and returns the error JSON.
    fn err(&self, what: &str, code: u64) -> Value {
        assert_ne!(
            self.code,
            Some(0),
            "{what}: expected CNI error {code}, got success: {}",
            self.stdout
        );
        let json = self.json();
        assert_eq!(
            json["code"].as_u64(),
            Some(code),
            "{what}: expected CNI error code {code}, got {json}"
        );
        assert!(
            json["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: no msg in {json}"
        );
        assert!(
            json.get("cniVersion").is_some(),
            "{what}: no cniVersion in {json}"
        );
        json
    }
}

/// One plugin invocation's inputs.
struct Call<'a> {
    command: Option<&'a str>,
    container: &'a str,
    netns: Option<&'a Path>,
    ifname: &'a str,
    pod_name: &'a str,
    config: String,
}

fn plugin_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let mut dir = exe.parent().expect("executable directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target/<profile>");
    }
    let bin = dir.join("vcnpath-cni");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build -p vcnpath-agent --bins` (cargo xtask test does)",
        bin.display()
    );
    bin
}

impl Fixture {
    fn new(tag: &str) -> Self {
        let tag = format!("vcni{}{tag}", std::process::id());
        let node = Netns::create(&format!("{tag}-node")).expect("node netns");
        node.ip(&["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"])
            .expect("node address");
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("run").join("vcnpath.sock");
        let fake = Arc::new(FakeAllocator::new());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(async { api::bind(&socket) })
            .expect("binding the API socket");
        let readiness = Arc::new(FakeReadiness::default());
        let app = api::router(fake.clone()).merge(api::status_router(readiness.clone()));
        runtime.spawn(api::serve(listener, app, std::future::pending()));
        Self {
            tag,
            fake,
            readiness,
            socket,
            _runtime: runtime,
            _dir: dir,
            node,
        }
    }

    fn pod_netns(&self, n: usize) -> Netns {
        Netns::create(&format!("{}-p{n}", self.tag)).expect("pod netns")
    }

    fn config(&self, version: &str) -> String {
        serde_json::json!({
            "cniVersion": version,
            "name": "vcnpath",
            "type": "vcnpath-cni",
            "socketPath": self.socket,
            "mtu": 9000,
        })
        .to_string()
    }

    fn call<'a>(&self, command: &'a str, container: &'a str, netns: Option<&'a Path>) -> Call<'a> {
        Call {
            command: Some(command),
            container,
            netns,
            ifname: "eth0",
            pod_name: "web",
            config: self.config("1.0.0"),
        }
    }

    fn run(&self, call: &Call<'_>) -> Run {
        let mut cmd = cmd_in(&self.node, plugin_binary().to_str().expect("utf-8 path"));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CNI_CONTAINERID", call.container)
            .env("CNI_IFNAME", call.ifname)
            .env("CNI_PATH", "/opt/cni/bin")
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={}",
                    call.pod_name
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(command) = call.command {
            cmd.env("CNI_COMMAND", command);
        }
        if let Some(netns) = call.netns {
            cmd.env("CNI_NETNS", netns);
        }
        let mut child = cmd.spawn().expect("spawning vcnpath-cni");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(call.config.as_bytes())
            .expect("writing the config");
        Run::from_output(&child.wait_with_output().expect("waiting for vcnpath-cni"))
    }

    /// The host-side pod veths in the node namespace.
    fn host_veths(&self) -> Vec<String> {
        links(&self.node)
            .into_iter()
            .filter(|name| name.starts_with("vcn"))
            .collect()
    }

    fn assert_clean(&self, what: &str) {
        assert_eq!(
            self.host_veths(),
            Vec::<String>::new(),
            "{what}: veths left in the node netns"
        );
        assert!(
            self.fake.held().is_empty(),
            "{what}: the agent still holds {:?}",
            self.fake.held()
        );
        assert_eq!(self.fake.free_count(), POOL_SIZE, "{what}: addresses lost");
        let routes = self.node.ip(&["-4", "route", "show"]).expect("node routes");
        assert!(
            !routes.contains("10.0.1."),
            "{what}: pod routes left on the node: {routes}"
        );
    }
}

fn links(ns: &Netns) -> Vec<String> {
    let json: Value = serde_json::from_str(&ns.ip(&["-j", "link", "show"]).expect("ip link"))
        .expect("ip -j link output");
    json.as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Tests

/// The pod and node sides of an attachment, as the kernel sees them.
fn assert_pod_wired(fx: &Fixture, pod_ns: &Netns, pod_ip: &str, host_veth: &str, host_mac: &str) {
    // The pod side, as the kernel sees it.
    let addr = pod_ns
        .ip(&["-4", "-o", "addr", "show", "dev", "eth0"])
        .unwrap();
    assert!(
        addr.contains(&format!("{pod_ip}/32")),
        "pod address: {addr}"
    );
    let mtu = pod_ns.ip(&["-o", "link", "show", "dev", "eth0"]).unwrap();
    assert!(
        mtu.contains("mtu 9000") && mtu.contains("UP"),
        "pod link: {mtu}"
    );
    let routes = pod_ns.ip(&["-4", "route", "show"]).unwrap();
    let has_route = |start: &str, needs: &[&str]| {
        routes
            .lines()
            .any(|l| l.starts_with(start) && needs.iter().all(|n| l.contains(n)))
    };
    assert!(
        has_route("default via 169.254.1.1 dev eth0", &[]),
        "pod routes: {routes}"
    );
    assert!(
        has_route("169.254.1.1 dev eth0", &["scope link"]),
        "pod routes: {routes}"
    );
    let neigh = pod_ns
        .ip(&["neigh", "show", "169.254.1.1", "dev", "eth0"])
        .unwrap();
    assert!(
        neigh.contains(host_mac) && neigh.contains("PERMANENT"),
        "pod gateway neighbour should be {host_mac} PERMANENT: {neigh}"
    );
    // The node side.
    let node_route = fx
        .node
        .ip(&["-4", "route", "show", &format!("{pod_ip}/32")])
        .unwrap();
    assert!(
        node_route.contains(&format!("dev {host_veth}")),
        "node route: {node_route}"
    );
}

#[test]
fn add_check_del_lifecycle() {
    if !have_root("add_check_del_lifecycle") {
        return;
    }
    let fx = Fixture::new("life");
    let mut pod_ns = fx.pod_netns(0);
    let netns = pod_ns.path().to_owned();

    let add = fx.run(&fx.call("ADD", "c0ffee01", Some(&netns)));
    add.ok("ADD");
    let result = add.json();
    // A valid 1.0.0 result: interfaces, ips pointing at the pod interface, routes.
    assert_eq!(result["cniVersion"], "1.0.0", "{result}");
    let interfaces = result["interfaces"].as_array().expect("interfaces");
    assert_eq!(interfaces.len(), 2, "{result}");
    let host_veth = interfaces[0]["name"]
        .as_str()
        .expect("host veth name")
        .to_owned();
    let host_mac = interfaces[0]["mac"].as_str().expect("host mac").to_owned();
    assert!(
        host_veth.starts_with("vcn") && host_veth.len() <= 15,
        "{host_veth}"
    );
    assert_eq!(interfaces[1]["name"], "eth0");
    assert_eq!(interfaces[1]["sandbox"], netns.display().to_string());
    let ip = result["ips"][0]["address"]
        .as_str()
        .expect("ips[0].address");
    assert!(ip.starts_with("10.0.1.") && ip.ends_with("/32"), "{result}");
    let pod_ip = ip.trim_end_matches("/32").to_owned();
    assert_eq!(result["ips"][0]["interface"], 1, "{result}");
    assert!(
        result["ips"][0].get("version").is_none(),
        "1.0.0 IPs carry no version: {result}"
    );
    assert_eq!(result["routes"][0]["dst"], "0.0.0.0/0", "{result}");
    assert_eq!(result["routes"][0]["gw"], "169.254.1.1", "{result}");

    assert_pod_wired(&fx, &pod_ns, &pod_ip, &host_veth, &host_mac);

    // Traffic: the pod reaches the node through its gateway and back to its own address.
    let ping = cmd_in(&pod_ns, "ping")
        .args(["-c", "2", "-W", "2", NODE_IP])
        .output()
        .expect("ping");
    assert!(
        ping.status.success(),
        "pod {pod_ip} could not ping the node at {NODE_IP}: {}",
        String::from_utf8_lossy(&ping.stdout)
    );

    // CHECK passes on a good pod (with the runtime's prevResult), fails once broken.
    let mut check = fx.call("CHECK", "c0ffee01", Some(&netns));
    let mut conf: Value = serde_json::from_str(&check.config).unwrap();
    conf["prevResult"] = result.clone();
    check.config = conf.to_string();
    fx.run(&check).ok("CHECK on a good pod");
    pod_ns.ip(&["route", "del", "default"]).unwrap();
    let broken = fx
        .run(&check)
        .err("CHECK after deleting the default route", 102);
    assert!(
        broken["details"]
            .as_str()
            .unwrap_or_default()
            .contains("default route"),
        "CHECK should name the missing default route: {broken}"
    );

    // DEL removes everything, and is idempotent.
    fx.run(&fx.call("DEL", "c0ffee01", Some(&netns))).ok("DEL");
    assert!(
        !links(&pod_ns).contains(&"eth0".to_owned()),
        "eth0 left in the pod"
    );
    fx.assert_clean("after DEL");
    fx.run(&fx.call("DEL", "c0ffee01", Some(&netns)))
        .ok("second DEL");
    pod_ns.delete().unwrap();
    fx.run(&fx.call("DEL", "c0ffee01", Some(&netns)))
        .ok("DEL after the netns was deleted");
    fx.run(&fx.call("DEL", "c0ffee01", None))
        .ok("DEL without CNI_NETNS");
    fx.run(&fx.call("DEL", "never-added", Some(&netns)))
        .ok("DEL of an unknown container");
    fx.run(&fx.call("CHECK", "never-added", Some(Path::new("/proc/self/ns/net"))))
        .err("CHECK of an unknown container", 3);
    fx.assert_clean("at the end");
}

#[test]
fn del_after_the_netns_is_gone_releases_the_address() {
    if !have_root("del_after_the_netns_is_gone_releases_the_address") {
        return;
    }
    let fx = Fixture::new("gone");
    let mut pod_ns = fx.pod_netns(0);
    let netns = pod_ns.path().to_owned();
    fx.run(&fx.call("ADD", "gone01", Some(&netns))).ok("ADD");
    assert_eq!(fx.fake.held().len(), 1);
    // The runtime deleted the sandbox first: the veth pair dies with the netns.
    pod_ns.delete().unwrap();
    fx.run(&fx.call("DEL", "gone01", Some(&netns)))
        .ok("DEL after the netns was deleted");
    fx.assert_clean("after DEL");
}

/// DEL with the agent not running (crashed, being upgraded) removes the pod's host side and
/// succeeds, so the runtime can remove the sandbox; the address stays held until the
/// agent's allocation GC sees the veth gone (shown in `ipam_sim`).
#[test]
fn del_with_the_agent_down_removes_the_host_side_and_succeeds() {
    if !have_root("del_with_the_agent_down_removes_the_host_side_and_succeeds") {
        return;
    }
    let fx = Fixture::new("down");
    let pod_ns = fx.pod_netns(0);
    fx.run(&fx.call("ADD", "down01", Some(pod_ns.path())))
        .ok("ADD");
    let mut del = fx.call("DEL", "down01", Some(pod_ns.path()));
    let mut conf: Value = serde_json::from_str(&del.config).unwrap();
    conf["socketPath"] = Value::from("/run/vcnpath-test-absent/vcnpath.sock");
    del.config = conf.to_string();
    let run = fx.run(&del);
    run.ok("DEL with the agent not running");
    assert!(
        run.stderr.contains("releases the address"),
        "DEL should say who releases the address: {}",
        run.stderr
    );
    assert_eq!(
        fx.host_veths(),
        Vec::<String>::new(),
        "the host veth is left"
    );
    assert!(
        !links(&pod_ns).contains(&"eth0".to_owned()),
        "eth0 left in the pod"
    );
    assert_eq!(
        fx.fake.held().len(),
        1,
        "only the agent releases an address"
    );
    fx.run(&fx.call("DEL", "down01", Some(pod_ns.path())))
        .ok("DEL once the agent answers");
    fx.assert_clean("at the end");
}

#[test]
fn legacy_040_config_gets_a_040_result() {
    if !have_root("legacy_040_config_gets_a_040_result") {
        return;
    }
    let fx = Fixture::new("v040");
    let pod_ns = fx.pod_netns(0);
    let netns = pod_ns.path().to_owned();
    let mut add = fx.call("ADD", "legacy01", Some(&netns));
    add.config = fx.config("0.4.0");
    let result = fx.run(&add);
    result.ok("ADD with a 0.4.0 config");
    let json = result.json();
    assert_eq!(json["cniVersion"], "0.4.0", "{json}");
    assert_eq!(
        json["ips"][0]["version"], "4",
        "0.4.0 IPs carry version 4: {json}"
    );
    let mut del = fx.call("DEL", "legacy01", Some(&netns));
    del.config = fx.config("0.4.0");
    fx.run(&del).ok("DEL");
    fx.assert_clean("after DEL");

    let version = fx.run(&Call {
        config: String::new(),
        ..fx.call("VERSION", "", None)
    });
    let json: Value = serde_json::from_str(version.ok("VERSION")).unwrap();
    let supported: Vec<&str> = json["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        supported.contains(&"1.0.0") && supported.contains(&"0.4.0"),
        "{json}"
    );
}

#[test]
fn failed_add_rolls_everything_back() {
    if !have_root("failed_add_rolls_everything_back") {
        return;
    }
    let fx = Fixture::new("roll");
    let pod_ns = fx.pod_netns(0);
    let netns = pod_ns.path().to_owned();

    // Fails after the veth exists (the kernel refuses MTU 50): veth and address undone.
    let bad = fx.run(&Call {
        pod_name: "bad-mtu",
        ..fx.call("ADD", "roll01", Some(&netns))
    });
    let error = bad.err("ADD with an MTU the kernel refuses", 101);
    assert!(
        error["details"]
            .as_str()
            .unwrap_or_default()
            .contains("rolled back"),
        "the error should say what was undone: {error}"
    );
    assert!(
        !links(&pod_ns).contains(&"eth0".to_owned()),
        "eth0 left in the pod"
    );
    fx.assert_clean("after a failed interface setup");

    // The agent fails its datapath step: nothing is created.
    fx.run(&Call {
        pod_name: "datapath",
        ..fx.call("ADD", "roll02", Some(&netns))
    })
    .err("ADD when the agent's datapath update fails", 100);
    fx.assert_clean("after an agent-side failure");

    // The pod's netns does not exist: refused before anything is asked or created.
    fx.run(&fx.call(
        "ADD",
        "roll03",
        Some(Path::new("/run/netns/vcnpath-no-such-netns")),
    ))
    .err("ADD into a non-existent netns", 3);
    fx.assert_clean("after ADD into a non-existent netns");

    // An interface with the pod's name already exists there: the address goes back.
    pod_ns
        .ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "clash0",
        ])
        .unwrap();
    fx.run(&fx.call("ADD", "roll04", Some(&netns)))
        .err("ADD when eth0 already exists in the pod", 101);
    fx.assert_clean("after a name clash in the pod");
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one table of cases reads best in one place"
)]
fn bad_input_is_refused_with_the_right_code_and_changes_nothing() {
    if !have_root("bad_input_is_refused_with_the_right_code_and_changes_nothing") {
        return;
    }
    let fx = Fixture::new("bad");
    let pod_ns = fx.pod_netns(0);
    let netns = pod_ns.path().to_owned();
    let add = || fx.call("ADD", "bad01", Some(&netns));
    let cases: Vec<(&str, Call<'_>, u64)> = vec![
        (
            "malformed JSON",
            Call {
                config: "{\"cniVersion\": ".into(),
                ..add()
            },
            6,
        ),
        (
            "missing name and type",
            Call {
                config: r#"{"cniVersion":"1.0.0"}"#.into(),
                ..add()
            },
            7,
        ),
        (
            "missing cniVersion",
            Call {
                config: r#"{"name":"vcnpath","type":"vcnpath-cni"}"#.into(),
                ..add()
            },
            7,
        ),
        (
            "unknown cniVersion",
            Call {
                config: fx.config("9.9.9"),
                ..add()
            },
            1,
        ),
        (
            "missing CNI_COMMAND",
            Call {
                command: None,
                ..add()
            },
            4,
        ),
        (
            "unknown CNI_COMMAND",
            Call {
                command: Some("FROB"),
                ..add()
            },
            4,
        ),
        (
            "missing CNI_CONTAINERID",
            Call {
                container: "",
                ..add()
            },
            4,
        ),
        (
            "missing CNI_NETNS",
            Call {
                netns: None,
                ..add()
            },
            4,
        ),
        (
            "invalid CNI_IFNAME",
            Call {
                ifname: "much-too-long-name0",
                ..add()
            },
            4,
        ),
        (
            "non-existent netns",
            Call {
                netns: Some(Path::new("/run/netns/vcnpath-absent")),
                ..add()
            },
            3,
        ),
        (
            "CNI_NETNS that is not a netns",
            Call {
                netns: Some(Path::new("/etc/hostname")),
                ..add()
            },
            4,
        ),
    ];
    for (what, call, code) in &cases {
        fx.run(call).err(what, *code);
        fx.assert_clean(what);
        assert_eq!(
            links(&pod_ns),
            vec!["lo".to_owned()],
            "{what}: the pod netns changed"
        );
    }
}

#[test]
fn temporary_conditions_are_try_again_later() {
    if !have_root("temporary_conditions_are_try_again_later") {
        return;
    }
    let fx = Fixture::new("retry");
    let pod_ns = fx.pod_netns(0);
    let netns = pod_ns.path().to_owned();

    let mut no_agent = fx.call("ADD", "retry01", Some(&netns));
    let mut conf: Value = serde_json::from_str(&no_agent.config).unwrap();
    conf["socketPath"] = Value::from("/run/vcnpath-test-absent/vcnpath.sock");
    no_agent.config = conf.to_string();
    let error = fx.run(&no_agent).err("ADD with the agent not running", 11);
    assert!(
        error["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("is the vcnpath DaemonSet running on this node?"),
        "the message should point at the DaemonSet: {error}"
    );
    fx.assert_clean("after ADD without an agent");

    fx.run(&Call {
        pod_name: "empty",
        ..fx.call("ADD", "retry02", Some(&netns))
    })
    .err("ADD while the pool is empty", 11);
    fx.assert_clean("after ADD with an empty pool");
}

/// A network-wide command (GC, STATUS) as the runtime runs it: only `CNI_COMMAND` and
/// `CNI_PATH` name it, and the 1.1.0 configuration carries `extra` keys.
fn network_call<'a>(fx: &Fixture, command: &'a str, extra: &[(&str, Value)]) -> Call<'a> {
    let mut conf: Value = serde_json::from_str(&fx.config("1.1.0")).unwrap();
    for (key, value) in extra {
        conf[*key] = value.clone();
    }
    Call {
        container: "",
        ifname: "",
        config: conf.to_string(),
        ..fx.call(command, "", None)
    }
}

/// CNI GC (1.1.0): the attachment the runtime no longer lists loses its address and its
/// host veth (with the node's /32 route); the listed one keeps both and its traffic; a GC
/// without `cni.dev/valid-attachments` releases nothing; GC under a 1.0.0 configuration is
/// refused as a version mismatch.
#[test]
fn gc_releases_what_the_runtime_no_longer_lists() {
    if !have_root("gc_releases_what_the_runtime_no_longer_lists") {
        return;
    }
    let fx = Fixture::new("gc");
    let kept_ns = fx.pod_netns(0);
    let stale_ns = fx.pod_netns(1);
    fx.run(&fx.call("ADD", "kept01", Some(kept_ns.path())))
        .ok("ADD kept01");
    let stale = fx.run(&fx.call("ADD", "stale01", Some(stale_ns.path())));
    let stale_veth = stale.json()["interfaces"][0]["name"]
        .as_str()
        .expect("host veth")
        .to_owned();
    let stale_ip = stale.json()["ips"][0]["address"]
        .as_str()
        .expect("address")
        .trim_end_matches("/32")
        .to_owned();
    assert_eq!(fx.host_veths().len(), 2);

    fx.run(&network_call(&fx, "GC", &[]))
        .ok("GC without valid-attachments");
    assert_eq!(fx.fake.held().len(), 2, "a GC listing nothing said nothing");
    let mut old = network_call(
        &fx,
        "GC",
        &[("cni.dev/valid-attachments", serde_json::json!([]))],
    );
    let mut conf: Value = serde_json::from_str(&old.config).unwrap();
    conf["cniVersion"] = Value::from("1.0.0");
    old.config = conf.to_string();
    fx.run(&old).err("GC under a 1.0.0 configuration", 1);
    assert_eq!(fx.fake.held().len(), 2, "a refused GC released something");

    let valid = serde_json::json!([{"containerID": "kept01", "ifname": "eth0"}]);
    fx.run(&network_call(
        &fx,
        "GC",
        &[("cni.dev/valid-attachments", valid)],
    ))
    .ok("GC listing kept01");
    let held: Vec<String> = fx.fake.held().into_keys().map(|(c, _)| c).collect();
    assert_eq!(
        held,
        vec!["kept01".to_owned()],
        "only the listed pod keeps its address"
    );
    assert!(
        !fx.host_veths().contains(&stale_veth),
        "the unlisted pod's host veth {stale_veth} is left: {:?}",
        fx.host_veths()
    );
    let routes = fx.node.ip(&["-4", "route", "show"]).expect("node routes");
    assert!(
        !routes.contains(&format!("{stale_ip} ")),
        "the unlisted pod's route is left: {routes}"
    );
    let ping = cmd_in(&kept_ns, "ping")
        .args(["-c", "1", "-W", "2", NODE_IP])
        .output()
        .expect("ping");
    assert!(ping.status.success(), "the listed pod lost its traffic");

    fx.run(&fx.call("DEL", "kept01", Some(kept_ns.path())))
        .ok("DEL kept01");
    fx.assert_clean("at the end");
}

/// CNI STATUS (1.1.0): success while the agent is ready; code 50 naming each reason while
/// it is not, and naming the `DaemonSet` when it is not running; refused under 1.0.0.
#[test]
fn status_tells_whether_adds_can_be_served() {
    if !have_root("status_tells_whether_adds_can_be_served") {
        return;
    }
    let fx = Fixture::new("stat");
    fx.run(&network_call(&fx, "STATUS", &[]))
        .ok("STATUS while ready");
    *fx.readiness.0.lock().unwrap() = vec![
        "IPAM has not reconciled with OCI yet".to_owned(),
        "no VNIC that serves pods is set up".to_owned(),
    ];
    let error = fx
        .run(&network_call(&fx, "STATUS", &[]))
        .err("STATUS while not ready", 50);
    let details = error["details"].as_str().unwrap_or_default();
    assert!(
        details.contains("has not reconciled") && details.contains("no VNIC"),
        "STATUS should name every reason: {error}"
    );
    let absent = network_call(
        &fx,
        "STATUS",
        &[(
            "socketPath",
            Value::from("/run/vcnpath-test-absent/vcnpath.sock"),
        )],
    );
    let error = fx.run(&absent).err("STATUS with no agent", 50);
    assert!(
        error["details"]
            .as_str()
            .unwrap_or_default()
            .contains("DaemonSet"),
        "STATUS without an agent should point at the DaemonSet: {error}"
    );
    let mut old = network_call(&fx, "STATUS", &[]);
    old.config = fx.config("1.0.0");
    fx.run(&old).err("STATUS under a 1.0.0 configuration", 1);
}

/// Pods created at once in the burst test (the issue asks for at least 50).
const PODS: usize = 50;

#[test]
fn fifty_concurrent_adds_then_dels() {
    if !have_root("fifty_concurrent_adds_then_dels") {
        return;
    }
    let fx = Fixture::new("burst");
    let pods: Vec<Netns> = (0..PODS).map(|n| fx.pod_netns(n)).collect();
    let ids: Vec<String> = (0..PODS).map(|n| format!("burst{n:03}")).collect();

    let results: Vec<Run> = std::thread::scope(|scope| {
        let handles: Vec<_> = pods
            .iter()
            .zip(&ids)
            .map(|(ns, id)| scope.spawn(|| fx.run(&fx.call("ADD", id, Some(ns.path())))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("ADD thread"))
            .collect()
    });
    let mut seen = HashSet::new();
    for (id, run) in ids.iter().zip(&results) {
        run.ok(&format!("concurrent ADD {id}"));
        let ip = run.json()["ips"][0]["address"]
            .as_str()
            .expect("address")
            .to_owned();
        assert!(
            seen.insert(ip.clone()),
            "{ip} was handed out twice (again to {id})"
        );
    }
    let held = fx.fake.held();
    assert_eq!(
        held.len(),
        PODS,
        "the agent should hold one address per pod"
    );
    let held_ips: HashSet<String> = held.values().map(|a| format!("{}/32", a.ip)).collect();
    assert_eq!(held_ips, seen, "results and the agent's records disagree");
    assert_eq!(fx.host_veths().len(), PODS, "one host veth per pod");
    // Every pod really works, not just exists.
    for (ns, id) in pods.iter().zip(&ids).step_by(10) {
        let ping = cmd_in(ns, "ping")
            .args(["-c", "1", "-W", "2", NODE_IP])
            .output()
            .unwrap();
        assert!(ping.status.success(), "pod {id} cannot reach the node");
    }

    std::thread::scope(|scope| {
        let handles: Vec<_> = pods
            .iter()
            .zip(&ids)
            .map(|(ns, id)| scope.spawn(|| fx.run(&fx.call("DEL", id, Some(ns.path())))))
            .collect();
        for (handle, id) in handles.into_iter().zip(&ids) {
            handle
                .join()
                .expect("DEL thread")
                .ok(&format!("concurrent DEL {id}"));
        }
    });
    fx.assert_clean("after 50 concurrent DELs");
}

/// A misbehaving runtime runs three ADDs of one container at once, round after round: the
/// plugin serialises them per attachment, so every one that succeeds reports the one address
/// the agent holds, and the pod is wired with it.
#[test]
fn three_concurrent_adds_of_one_container_hold_one_address() {
    if !have_root("three_concurrent_adds_of_one_container_hold_one_address") {
        return;
    }
    let fx = Fixture::new("same");
    for round in 0..10 {
        let pod_ns = fx.pod_netns(round);
        let id = format!("same{round:03}");
        let results: Vec<Run> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..3)
                .map(|_| scope.spawn(|| fx.run(&fx.call("ADD", &id, Some(pod_ns.path())))))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("ADD thread"))
                .collect()
        });
        let held = fx.fake.held();
        let reported: HashSet<String> = results
            .iter()
            .filter(|r| r.code == Some(0))
            .map(|r| {
                r.json()["ips"][0]["address"]
                    .as_str()
                    .expect("address")
                    .to_owned()
            })
            .collect();
        assert!(
            !reported.is_empty(),
            "round {round}: at least one of the ADDs succeeds: {:?}",
            results.iter().map(Run::json).collect::<Vec<_>>()
        );
        assert_eq!(
            held.len(),
            1,
            "round {round}: the agent must hold exactly one address for {id}, holds {held:?} while the plugin reported {reported:?}"
        );
        let ip = format!("{}/32", held.values().next().unwrap().ip);
        assert_eq!(
            reported,
            HashSet::from([ip.clone()]),
            "round {round}: what the plugin reported and what the agent holds disagree"
        );
        let veths = fx.host_veths();
        assert_eq!(veths.len(), 1, "round {round}: one host veth: {veths:?}");
        let host_mac = fx
            .node
            .ip(&["-j", "link", "show", "dev", &veths[0]])
            .map(|j| {
                serde_json::from_str::<Value>(&j).expect("ip -j")[0]["address"]
                    .as_str()
                    .expect("mac")
                    .to_owned()
            })
            .expect("host veth");
        assert_pod_wired(
            &fx,
            &pod_ns,
            ip.trim_end_matches("/32"),
            &veths[0],
            &host_mac,
        );
        fx.run(&fx.call("DEL", &id, Some(pod_ns.path())))
            .ok(&format!("round {round}: DEL"));
        fx.assert_clean(&format!("round {round}: after DEL"));
    }
}

/// What the agent's allocation GC sees of a pod's host side, asked from inside `ns` (the
/// lookup follows the calling thread's network namespace).
fn gc_sees(ns: &Netns, pod: &PodRef) -> Option<bool> {
    let path = ns.path().to_owned();
    let pod = pod.clone();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open the node netns");
        // SAFETY: setns on a valid namespace fd, in a thread of our own that ends here.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        vcnpath::ipam::gc::HostView::attached(&vcnpath::daemon::node::PodVeths, &pod)
    })
    .join()
    .expect("netns thread")
}

/// The allocation GC's view of the host follows the plugin's naming: the veth a real ADD
/// made is seen, and once someone deletes it by hand it is seen gone.
#[test]
fn the_allocation_gc_sees_a_plugin_veth_and_its_removal() {
    if !have_root("the_allocation_gc_sees_a_plugin_veth_and_its_removal") {
        return;
    }
    let fx = Fixture::new("gcv");
    let pod_ns = fx.pod_netns(0);
    let netns = pod_ns.path().to_owned();
    let add = fx.run(&fx.call("ADD", "gcveth01", Some(&netns)));
    add.ok("ADD");
    let host_veth = add.json()["interfaces"][0]["name"]
        .as_str()
        .expect("host veth name")
        .to_owned();
    let pod = PodRef {
        container_id: "gcveth01".into(),
        ifname: "eth0".into(),
        namespace: None,
        name: None,
    };
    assert_eq!(
        gc_sees(&fx.node, &pod),
        Some(true),
        "the GC must see {host_veth}, which the ADD made"
    );
    fx.node
        .ip(&["link", "del", &host_veth])
        .expect("deleting the host veth by hand");
    assert_eq!(
        gc_sees(&fx.node, &pod),
        Some(false),
        "the GC must see {host_veth} gone"
    );
    fx.run(&fx.call("DEL", "gcveth01", Some(&netns)))
        .ok("DEL after the veth was deleted");
    fx.assert_clean("after DEL");
}
