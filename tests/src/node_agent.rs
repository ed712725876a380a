//! The real node agent (`vcnpath run`) and CNI plugin (`vcnpath-cni`) against the OCI
//! simulator in a [`SimLab`]: what the end-to-end tests and the demo drive.

use std::fmt::Write as _;
use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;
use vcnpath::ipam::Allocation;

use crate::{
    agent::binary,
    lab::{ChildGuard, Netns, SimLab, enter_before_exec, spawn_in},
    ocikit::{private_ip_range, range_addresses},
    privileged::PinDir,
};

/// Addresses per VNIC in the end-to-end lab: small enough that 40 pods need two VNICs.
pub const IPS_PER_VNIC: u32 = 24;

/// The agent's pool settings; the default is the end-to-end tests' fast pool growth and
/// short cooldown, the control-plane benchmark sizes the pool for 110 pods.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub ips_per_vnic: u32,
    pub warm_ips: u32,
    pub cooldown_secs: u64,
    /// Keep the state directory on a tmpfs, as the default `/run/vcnpath` is on a node
    /// (the tests keep it on disk, where every checkpoint write is a real fsync).
    pub state_on_tmpfs: bool,
    /// The runtime's CNI configuration directory the agent installs its conflist in.
    pub cni_conf_dir: Option<PathBuf>,
    /// `datapath.pod_imds_allow_namespaces`.
    pub pod_imds_allow_namespaces: Vec<String>,
    /// `ipam.subnet_tag`.
    pub subnet_tag: Option<String>,
    /// `ipam.allocation_gc_grace_secs` (`None`: the agent's default).
    pub allocation_gc_grace_secs: Option<u64>,
    /// `ipam.mode`: `"ip"`, `"cidr"` or `"auto"` (`None`: the agent's default).
    pub ipam_mode: Option<&'static str>,
    /// `ipam.block_prefix` (`None`: the agent's default).
    pub block_prefix: Option<u8>,
    /// `ipam.block_addresses_per_vnic` (`None`: the agent's default).
    pub block_addresses_per_vnic: Option<usize>,
    /// `ipam.release_delay_secs`: how long an address beyond the warm target stays before
    /// it is released.
    pub release_delay_secs: u64,
    /// `ipam.use_primary_vnic`: pods also get addresses on the node's primary VNIC.
    pub use_primary_vnic: bool,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            ips_per_vnic: IPS_PER_VNIC,
            warm_ips: 6,
            cooldown_secs: 3,
            state_on_tmpfs: false,
            cni_conf_dir: None,
            pod_imds_allow_namespaces: Vec::new(),
            subnet_tag: None,
            allocation_gc_grace_secs: None,
            ipam_mode: None,
            block_prefix: None,
            block_addresses_per_vnic: None,
            release_delay_secs: 600,
            use_primary_vnic: false,
        }
    }
}

/// A tmpfs mounted for the life of the value (lazily unmounted on drop).
pub struct TmpfsMount(PathBuf);

impl TmpfsMount {
    /// Creates `path` if needed and mounts a 16 MiB tmpfs on it.
    pub fn new(path: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&path)?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs"])
            .arg(&path)
            .status()?;
        if !status.success() {
            bail!("mounting a tmpfs on {} failed ({status})", path.display());
        }
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A running `vcnpath run` in the lab's node namespace, killed on drop.
pub struct NodeAgent {
    child: Option<ChildGuard>,
    /// Declared before `dir`, so it is unmounted before the directory is removed.
    _state_mount: Option<TmpfsMount>,
    pub dir: tempfile::TempDir,
    pub pins: PinDir,
    starts: u32,
    options: AgentOptions,
    /// From spawning the latest process to its "serving" log line.
    started_in: Duration,
}

impl NodeAgent {
    /// The agent's configuration file. On a bare-metal lab it names the node's physical
    /// NICs in `nicIndex` order, as a deployer who knows the shape's interfaces does.
    fn config(&self, lab: &SimLab) -> String {
        let nics = if lab.is_bare_metal() {
            let names: Vec<String> = crate::lab::BM_NICS
                .iter()
                .map(|n| format!("{:?}", n.ifname))
                .collect();
            format!("physical_nics = [{}]\n", names.join(", "))
        } else {
            String::new()
        };
        let AgentOptions {
            ips_per_vnic,
            warm_ips,
            cooldown_secs,
            ref pod_imds_allow_namespaces,
            ref subnet_tag,
            allocation_gc_grace_secs,
            ipam_mode,
            block_prefix,
            block_addresses_per_vnic,
            release_delay_secs,
            use_primary_vnic,
            ..
        } = self.options;
        let optional = [
            (
                "subnet_tag",
                subnet_tag.as_ref().map(|tag| format!("{tag:?}")),
            ),
            (
                "allocation_gc_grace_secs",
                allocation_gc_grace_secs.map(|s| s.to_string()),
            ),
            ("mode", ipam_mode.map(|m| format!("{m:?}"))),
            ("block_prefix", block_prefix.map(|p| p.to_string())),
            (
                "block_addresses_per_vnic",
                block_addresses_per_vnic.map(|n| n.to_string()),
            ),
            (
                "use_primary_vnic",
                use_primary_vnic.then(|| "true".to_owned()),
            ),
        ];
        let optional_keys: String = optional
            .iter()
            .filter_map(|(key, value)| Some(format!("{key} = {}\n", value.as_ref()?)))
            .collect();
        let cni = self
            .options
            .cni_conf_dir
            .as_ref()
            .map(|dir| format!("[cni]\nconf_dir = {:?}\n", dir.display().to_string()))
            .unwrap_or_default();
        let config = format!(
            "[ipam]\nips_per_vnic = {ips_per_vnic}\nwarm_ips = {warm_ips}\ncooldown_secs = {cooldown_secs}\nrelease_delay_secs = {release_delay_secs}\n{optional_keys}\
             [datapath]\npin_dir = {:?}\ngc_interval_secs = 2\npod_imds_allow_namespaces = {pod_imds_allow_namespaces:?}\n\
             [node]\nstate_dir = {:?}\nsocket = {:?}\nlisten = \"127.0.0.1:19965\"\n{nics}",
            self.pins.path.display().to_string(),
            self.state_dir().display().to_string(),
            self.socket().display().to_string(),
        );
        config + &cni
    }

    /// Starts the agent and waits until it serves the CNI socket.
    pub fn start(lab: &SimLab, tag: &str) -> Result<Self> {
        Self::start_with(lab, tag, AgentOptions::default())
    }

    /// [`Self::start`] with other pool settings.
    pub fn start_with(lab: &SimLab, tag: &str, options: AgentOptions) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let state_mount = if options.state_on_tmpfs {
            Some(TmpfsMount::new(dir.path().join("state"))?)
        } else {
            None
        };
        let mut agent = Self {
            child: None,
            _state_mount: state_mount,
            dir,
            pins: PinDir::new(tag),
            starts: 0,
            options,
            started_in: Duration::ZERO,
        };
        agent.spawn(lab)?;
        Ok(agent)
    }

    /// The latest agent process's pid (for its /proc figures).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// How long the latest process took from spawn to serving the CNI socket (to the
    /// 10 ms the log is polled at).
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The CNI socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("vcnpath.sock")
    }

    /// The state directory (`node.state_dir`).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The IPAM checkpoint.
    pub fn checkpoint(&self) -> PathBuf {
        self.state_dir().join("ipam.json")
    }

    fn log(&self, n: u32) -> PathBuf {
        self.dir.path().join(format!("agent-{n}.log"))
    }

    /// Everything the latest agent process logged.
    pub fn latest_log(&self) -> String {
        std::fs::read_to_string(self.log(self.starts)).unwrap_or_default()
    }

    /// Every agent process's log, oldest first, each headed by its start number.
    pub fn all_logs(&self) -> String {
        let mut all = String::new();
        for n in 1..=self.starts {
            let log = std::fs::read_to_string(self.log(n)).unwrap_or_default();
            // Writing into a String cannot fail.
            let _ = write!(all, "==== agent start {n} ====\n{log}");
        }
        all
    }

    fn spawn(&mut self, lab: &SimLab) -> Result<()> {
        self.starts += 1;
        let config = self.dir.path().join("config.toml");
        std::fs::write(&config, self.config(lab))?;
        let endpoints = lab.agent_endpoints();
        let mut cmd = Command::new(binary());
        cmd.args(["run", "--config"])
            .arg(&config)
            .args([
                "--imds-url",
                &endpoints.imds_url,
                "--oci-endpoint",
                &endpoints.oci_endpoint,
            ])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.log(self.starts))?);
        let spawned = Instant::now();
        self.child = Some(spawn_in(lab.lab().node(), cmd)?);
        self.wait_ready(crate::scaled(Duration::from_mins(1)))?;
        self.started_in = spawned.elapsed();
        Ok(())
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.latest_log().contains("serving") {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().expect("running").try_wait()? {
                bail!(
                    "vcnpath run exited ({status}) before serving; its log:\n{}",
                    self.latest_log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "vcnpath run not serving after {timeout:?}; its log:\n{}",
                    self.latest_log()
                );
            }
            // Short enough for the start-up benchmark's resolution.
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs a second `vcnpath run` with this agent's configuration and state while this one
    /// serves, waits (at most `within`) for it to exit and returns its exit status and log.
    pub fn run_second(
        &self,
        lab: &SimLab,
        within: Duration,
    ) -> Result<(std::process::ExitStatus, String)> {
        let config = self.dir.path().join("config.toml");
        let log = self.dir.path().join("second.log");
        let endpoints = lab.agent_endpoints();
        let mut cmd = Command::new(binary());
        cmd.args(["run", "--config"])
            .arg(&config)
            .args([
                "--imds-url",
                &endpoints.imds_url,
                "--oci-endpoint",
                &endpoints.oci_endpoint,
            ])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        let mut child = spawn_in(lab.lab().node(), cmd)?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok((status, std::fs::read_to_string(&log).unwrap_or_default()));
            }
            if Instant::now() > deadline {
                bail!(
                    "the second vcnpath run still runs after {within:?}; its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `vcnpath <args> --config <this agent's configuration>` in the node's namespace, as an
    /// operator on the node would run it; its output.
    pub fn run_cli(&self, lab: &SimLab, args: &[&str]) -> Result<std::process::Output> {
        let mut cmd = crate::lab::cmd_in(lab.lab().node(), &binary().to_string_lossy());
        cmd.args(args)
            .arg("--config")
            .arg(self.dir.path().join("config.toml"));
        cmd.output()
            .with_context(|| format!("vcnpath {}", args.join(" ")))
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) -> Result<()> {
        self.child.as_mut().expect("running").kill9().map(|_| ())
    }

    /// Starts a new agent process on the same state after [`Self::kill9`].
    pub fn restart(&mut self, lab: &SimLab) -> Result<()> {
        self.spawn(lab)
    }

    /// `vcnpath status --json` from the running agent.
    pub fn status(&self) -> Result<Value> {
        let out = Command::new(binary())
            .args(["status", "--json", "--socket"])
            .arg(self.socket())
            .output()?;
        if !out.status.success() {
            bail!(
                "vcnpath status failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        drop(self.child.take());
    }
}

/// What `vcnpath-cni` answered.
#[derive(Debug)]
pub struct CniOutput {
    pub ok: bool,
    pub json: Value,
}

impl CniOutput {
    /// The CNI error code, if it failed.
    pub fn code(&self) -> Option<u64> {
        (!self.ok).then(|| self.json["code"].as_u64().unwrap_or(0))
    }

    /// The pod's address from an ADD result.
    pub fn ip(&self) -> Option<std::net::Ipv4Addr> {
        self.json["ips"][0]["address"]
            .as_str()?
            .split('/')
            .next()?
            .parse()
            .ok()
    }
}

fn cni_binary() -> PathBuf {
    binary().with_file_name("vcnpath-cni")
}

/// The configuration the lab's runtime hands `vcnpath-cni` (CNI 1.1.0).
/// Points the plugin at the agent's socket and pin directory, as the conflist the agent
/// installs does; the pin directory is read from the agent's configuration beside the socket.
fn cni_config(socket: &Path) -> Value {
    let mut config = serde_json::json!({"cniVersion": "1.1.0", "name": "vcnpath", "type": "vcnpath-cni", "socketPath": socket, "mtu": 9000});
    let agent = vcnpath::daemon::AgentConfig::load(Some(&socket.with_file_name("config.toml")));
    if let Ok(agent) = agent {
        config["pinDir"] = Value::from(agent.datapath.pin_dir.display().to_string());
    }
    config
}

/// Runs `vcnpath-cni` in the node namespace like a container runtime does: one process,
/// exec'd with the CNI environment and the configuration on stdin.
pub fn cni(
    node: &Netns,
    socket: &Path,
    command: &str,
    container: &str,
    netns: Option<&Path>,
) -> Result<CniOutput> {
    cni_in(node, socket, command, container, netns, POD_NAMESPACE)
}

/// The Kubernetes namespace the lab's pods are in, unless a test names another.
pub const POD_NAMESPACE: &str = "e2e";

/// [`cni`] for a pod of Kubernetes namespace `namespace` (`K8S_POD_NAMESPACE`).
pub fn cni_in(
    node: &Netns,
    socket: &Path,
    command: &str,
    container: &str,
    netns: Option<&Path>,
    namespace: &str,
) -> Result<CniOutput> {
    let mut attachment = vec![
        ("CNI_CONTAINERID", container.into()),
        ("CNI_IFNAME", "eth0".into()),
        (
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={container}")
                .into(),
        ),
    ];
    if let Some(netns) = netns {
        attachment.push(("CNI_NETNS", netns.into()));
    }
    exec_cni(node, command, &attachment, &cni_config(socket))
}

/// CNI GC as the runtime runs it: the attachments (container ids, `eth0`) it still holds.
pub fn cni_gc(node: &Netns, socket: &Path, valid: &[&str]) -> Result<CniOutput> {
    let mut config = cni_config(socket);
    config["cni.dev/valid-attachments"] = valid
        .iter()
        .map(|id| serde_json::json!({"containerID": id, "ifname": "eth0"}))
        .collect();
    exec_cni(node, "GC", &[], &config)
}

/// CNI STATUS as the runtime runs it.
pub fn cni_status(node: &Netns, socket: &Path) -> Result<CniOutput> {
    exec_cni(node, "STATUS", &[], &cni_config(socket))
}

/// The plugin run in `node` with `command`, the attachment's variables (none for GC and
/// STATUS) and `config` on stdin.
fn exec_cni(
    node: &Netns,
    command: &str,
    attachment: &[(&str, std::ffi::OsString)],
    config: &Value,
) -> Result<CniOutput> {
    let mut cmd = Command::new(cni_binary());
    enter_before_exec(&mut cmd, node);
    cmd.env_clear()
        .envs(attachment.iter().map(|(k, v)| (k, v)))
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command)
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("spawning vcnpath-cni")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(config.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    Ok(CniOutput {
        ok: out.status.success(),
        json,
    })
}

/// ADD, retrying while the plugin says "try again later" (code 11: the pool is growing).
pub fn cni_add(
    node: &Netns,
    socket: &Path,
    container: &str,
    netns: &Path,
    timeout: Duration,
) -> Result<CniOutput> {
    cni_add_in(node, socket, container, netns, POD_NAMESPACE, timeout)
}

/// [`cni_add`] for a pod of Kubernetes namespace `namespace`.
pub fn cni_add_in(
    node: &Netns,
    socket: &Path,
    container: &str,
    netns: &Path,
    namespace: &str,
    timeout: Duration,
) -> Result<CniOutput> {
    let deadline = Instant::now() + timeout;
    loop {
        let out = cni_in(node, socket, "ADD", container, Some(netns), namespace)?;
        if out.code() != Some(11) || Instant::now() > deadline {
            return Ok(out);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The simulator's secondary private IPs, by address → VNIC: every address of an IP CIDR
/// block is its VNIC's, as a single secondary IP is.
pub fn cloud_ips(lab: &SimLab) -> std::collections::BTreeMap<std::net::Ipv4Addr, String> {
    let snapshot = lab.sim().snapshot();
    snapshot["privateIps"]
        .as_array()
        .expect("privateIps")
        .iter()
        .filter(|p| p["isPrimary"] != true)
        .flat_map(|p| {
            let range = private_ip_range(p).unwrap_or_else(|e| panic!("simulator snapshot: {e:#}"));
            let vnic = p["vnicId"].as_str().unwrap_or_default().to_owned();
            range_addresses(range).map(move |ip| (ip, vnic.clone()))
        })
        .collect()
}

/// The checkpointed allocations (what a restart restores).
pub fn checkpointed(path: &Path) -> Result<Vec<Allocation>> {
    let value: Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    value["allocations"]
        .as_array()
        .context("checkpoint has no allocations list")?
        .iter()
        .map(|e| serde_json::from_value(e["allocation"].clone()).context("checkpoint entry"))
        .collect()
}

/// A pod the tests added through the real plugin: its container id, namespace, address and
/// the node interface (VNIC) `vcnpath status` puts it on.
pub struct CniPod {
    pub id: String,
    pub ns: Netns,
    pub ip: std::net::Ipv4Addr,
    pub interface: String,
}

/// Adds `n` pods named `<prefix>000`… with the real plugin (each retried while the pool
/// grows, for at most `timeout`); panics, with the agent's log, when one fails.
pub fn add_pods(
    lab: &SimLab,
    agent: &NodeAgent,
    prefix: &str,
    n: usize,
    timeout: Duration,
) -> Vec<CniPod> {
    add_pods_in(lab, agent, prefix, n, POD_NAMESPACE, timeout)
}

/// [`add_pods`] in Kubernetes namespace `namespace`.
pub fn add_pods_in(
    lab: &SimLab,
    agent: &NodeAgent,
    prefix: &str,
    n: usize,
    namespace: &str,
    timeout: Duration,
) -> Vec<CniPod> {
    (0..n)
        .map(|i| {
            let id = format!("{prefix}{i:03}");
            let ns = lab.lab().add_pod_netns(&id).expect("pod netns");
            let node = lab.lab().node();
            let out = cni_add_in(node, &agent.socket(), &id, ns.path(), namespace, timeout)
                .expect("vcnpath-cni runs");
            assert!(
                out.ok,
                "ADD {id} failed: {}\nagent log:\n{}",
                out.json,
                agent.latest_log()
            );
            let ip = out.ip().expect("result has an address");
            let status = agent.status().expect("status");
            let interface = status["pods"]
                .as_array()
                .expect("status lists pods")
                .iter()
                .find(|p| p["container_id"] == id.as_str())
                .expect("pod in status")["interface"]
                .as_str()
                .expect("pod has an interface")
                .to_owned();
            CniPod {
                id,
                ns,
                ip,
                interface,
            }
        })
        .collect()
}
