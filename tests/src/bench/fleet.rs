//! A fleet scaling at once: N nodes, each a real [`Ipam`] with its own OCI client signed as
//! its own instance (instance principal through its own IMDS), against one simulator of N
//! instances behind one tenancy-wide request budget ([`TENANCY_PER_SECOND`], about what
//! Oracle's controllers budget for a tenancy). Every node starts empty and asks for its pods'
//! addresses at the same moment, retrying as the CNI plugin does while its pool is empty.
//!
//! The nodes run in this one process, not as N agent processes: what is measured is the
//! pool, the client's rate limiting and its answer to 429s, which are the agent's own code;
//! the host side (veths, routes, maps) costs the same whatever the pool does. The agent's
//! defaults apply throughout: its `[ipam]` pool for the mode, `oci.requests_per_second`,
//! `oci.burst`, `oci.start_jitter_ms`, the default retry policy.
//!
//! Each node authenticates (IMDS certificate, federation, session key) before the clock
//! starts: 500 RSA session keys take this machine's two cores half a minute, a real node
//! makes its own on its own CPU.

pub mod report;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use tokio::time::Instant;
use vcnpath::daemon::AgentConfig;
use vcnpath::ipam::{AllocError, Allocation, Ipam, IpamConfig, OciCloud, PodRef};
use vcnpath::oci::{CoreClient, Endpoints, ImdsClient, InstancePrincipalAuth, RetryPolicy};

use super::control::{Latency, metrics};
use crate::ocisim::{Faults, RateLimit, SimConfig, Simulator, SubnetConfig, VcnConfig};

/// Requests per second the whole tenancy is served before 429 (and the burst above it).
pub const TENANCY_PER_SECOND: f64 = 20.0;
pub const TENANCY_BURST: u32 = 20;
/// The subnet every node's pod VNIC is attached in: a /16 holds 500 nodes' blocks.
const PODS_SUBNET: &str = "ocid1.subnet.oc1.iad.simfleetpods";
/// How long the agent waits for an attachment to be ATTACHED (the agent's own figure).
const ATTACH_TIMEOUT: Duration = Duration::from_mins(2);
/// Nodes authenticating at once before the clock starts.
const AUTH_PARALLEL: usize = 8;
const PROGRESS_EVERY: Duration = Duration::from_secs(15);

/// What one fleet run is made of.
#[derive(Clone, Debug, Serialize)]
pub struct Options {
    pub nodes: u32,
    pub pods: usize,
    /// `ipam.mode` values, each run on a fresh simulator.
    pub modes: Vec<&'static str>,
    /// Every Core API call's latency, `CreatePrivateIp`'s on top, attach → ATTACHED.
    pub api_ms: u64,
    pub create_ip_ms: u64,
    pub attach_ms: u64,
    /// The tenancy-wide budget: requests per second, and the burst above it.
    pub tenancy_per_second: f64,
    pub tenancy_burst: u32,
    /// A mode's run gives up this long after its start; the nodes not ready then are
    /// reported as not converged.
    pub deadline: Duration,
    /// Print progress to stderr every [`PROGRESS_EVERY`].
    pub progress: bool,
}

impl Options {
    /// OCI's latencies ([`super::control`]'s), the agent's two modes, 200 nodes of 30 pods.
    pub fn realistic() -> Self {
        Self {
            nodes: 200,
            pods: 30,
            modes: vec!["ip", "cidr"],
            api_ms: super::control::API_MS,
            create_ip_ms: super::control::CREATE_IP_MS,
            attach_ms: super::control::ATTACH_MS,
            tenancy_per_second: TENANCY_PER_SECOND,
            tenancy_burst: TENANCY_BURST,
            deadline: Duration::from_mins(15),
            progress: true,
        }
    }
}

/// One mode's run.
#[derive(Clone, Debug, Serialize)]
pub struct FleetRun {
    pub mode: &'static str,
    pub nodes: u32,
    pub pods_per_node: usize,
    /// Nodes whose every pod got an address before the deadline.
    pub converged: u32,
    /// From the start to the last pod of the fleet holding an address (`None`: some node
    /// did not converge before the deadline).
    pub all_ready_secs: Option<f64>,
    /// Each converged node's wait for its last pod.
    pub node_ready: Latency,
    /// Each pod's wait for its address.
    pub pod_wait: Latency,
    /// Core API attempts of every node until the fleet was ready (or the deadline), by
    /// operation, 429s and retries included (the clients' own metrics).
    pub calls: Vec<(String, u64)>,
    pub calls_total: u64,
    /// Attempts answered 429 `TooManyRequests`, as the clients counted them.
    pub throttled: u64,
    /// The same as the simulator counted them.
    pub throttled_by_simulator: u64,
    /// `throttled / calls_total`.
    pub throttled_fraction: f64,
    /// Nodes authenticating before the clock started (not in any figure above).
    pub auth_secs: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Fleet {
    pub options: Options,
    /// The agent's per-node `oci.requests_per_second` and `oci.start_jitter_ms`.
    pub node_per_second: u32,
    pub start_jitter_ms: u64,
    pub runs: Vec<FleetRun>,
}

/// Runs every mode of `options` in turn.
pub fn run(options: &Options) -> Result<Fleet> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime for the fleet")?;
    let defaults = AgentConfig::default();
    let mut runs = Vec::new();
    for &mode in &options.modes {
        crate::interrupt::check()?;
        let run = runtime.block_on(run_mode(options, mode))?;
        if options.progress {
            eprintln!("{}", report::run_line(&run));
        }
        runs.push(run);
    }
    Ok(Fleet {
        options: options.clone(),
        node_per_second: defaults.oci.requests_per_second,
        start_jitter_ms: defaults.oci.start_jitter_ms,
        runs,
    })
}

fn sim_config(options: &Options) -> SimConfig {
    let base = SimConfig::default();
    let subnet = |id: &str, name: &str, cidr: &str| SubnetConfig {
        id: id.into(),
        display_name: name.into(),
        cidr_block: cidr.into(),
        freeform_tags: BTreeMap::new(),
    };
    SimConfig {
        instance_count: options.nodes,
        attach_delay_ms: options.attach_ms,
        tenancy_rate_limit: Some(RateLimit {
            per_second: options.tenancy_per_second,
            burst: options.tenancy_burst,
            ..RateLimit::default()
        }),
        faults: Faults {
            latency_ms: options.api_ms,
            create_private_ip_ms: options.create_ip_ms,
            ..Faults::default()
        },
        vcn: VcnConfig {
            cidr_blocks: vec!["10.0.0.0/16".into(), "10.64.0.0/16".into()],
            ..base.vcn.clone()
        },
        // The primary VNICs of 500 nodes, and a pod subnet for all of their pods.
        subnets: vec![
            subnet(&base.subnets[0].id, "nodes", "10.0.0.0/20"),
            subnet(PODS_SUBNET, "pods", "10.64.0.0/16"),
        ],
        ..base
    }
}

/// The agent's configuration for `mode`, everything else at its defaults.
fn agent_config(mode: &str) -> Result<AgentConfig> {
    toml::from_str(&format!("[ipam]\nmode = {mode:?}\n"))
        .with_context(|| format!("agent configuration with ipam.mode = {mode:?}"))
}

/// A node as the agent builds it at start: its instance from its IMDS, a client signed
/// with a session token federated from its instance certificate.
struct Node {
    instance_id: String,
    compartment_id: String,
    max_vnics: usize,
    client: Arc<CoreClient>,
}

async fn authenticate(sim: &Simulator, n: u32, config: &AgentConfig) -> Result<Node> {
    let http = reqwest::Client::new();
    let imds = ImdsClient::new(&sim.imds_url_of(n), http.clone()).context("IMDS URL")?;
    let instance = imds
        .instance()
        .await
        .with_context(|| format!("IMDS of instance {n}"))?;
    let endpoints = Endpoints::single(&sim.base_url()).context("simulator endpoints")?;
    let auth = Arc::new(InstancePrincipalAuth::new(
        imds,
        &endpoints.auth,
        http.clone(),
    ));
    auth.tenancy()
        .await
        .with_context(|| format!("instance {n} federating its session token"))?;
    Ok(Node {
        instance_id: instance.id,
        compartment_id: instance.compartment_id,
        max_vnics: instance.shape_config.max_vnic_attachments as usize,
        client: Arc::new(CoreClient::new(
            http,
            &endpoints,
            auth,
            RetryPolicy::default(),
            config.oci.rate_limit(),
        )),
    })
}

fn start_ipam(node: &Node, config: &AgentConfig, dir: &Path, n: u32) -> Result<Ipam> {
    let pool = config.pool(node.max_vnics, vec![PODS_SUBNET.to_owned()]);
    let mut cfg = IpamConfig::new(node.instance_id.clone(), pool);
    cfg.checkpoint_path = dir.join(format!("node{n:03}.json"));
    // No host here: the interface of a new VNIC is taken as set up at once.
    cfg.require_interface = false;
    cfg.start_jitter = Duration::from_millis(config.oci.start_jitter_ms);
    let cloud = OciCloud::new(
        node.client.clone(),
        node.compartment_id.clone(),
        node.instance_id.clone(),
        ATTACH_TIMEOUT,
    );
    Ipam::start(Arc::new(cloud), cfg).with_context(|| format!("IPAM of node {n}"))
}

fn pod(node: u32, n: usize) -> PodRef {
    PodRef {
        container_id: format!("fleet-{node:03}-{n:03}"),
        ifname: "eth0".into(),
        namespace: Some("default".into()),
        name: Some(format!("pod-{n}")),
    }
}

/// Allocates as the CNI plugin does: while the pool is empty (or the agent not ready) it
/// waits the time the agent suggests and asks again. `None` past `deadline`.
async fn allocate(ipam: &Ipam, pod: &PodRef, deadline: Instant) -> Result<Option<Allocation>> {
    loop {
        match ipam.allocate(pod).await {
            Ok(allocation) => return Ok(Some(allocation)),
            Err(e) => {
                let Some(wait) = e.retry_after() else {
                    bail!("allocation for {} failed: {e}", pod.container_id);
                };
                if matches!(e, AllocError::Exhausted { .. }) || Instant::now() + wait > deadline {
                    return Ok(None);
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Each node's pods' waits from `start`, in pod order (`None`: not allocated in time).
type NodeWaits = Vec<Option<Duration>>;

async fn run_mode(options: &Options, mode: &'static str) -> Result<FleetRun> {
    let config = agent_config(mode)?;
    let sim = Simulator::start(sim_config(options), "127.0.0.1:0")
        .await
        .context("simulator for the fleet")?;
    let auth_started = Instant::now();
    let nodes = authenticate_all(&sim, options.nodes, &config).await?;
    let auth_secs = auth_started.elapsed().as_secs_f64();
    if options.progress {
        eprintln!(
            "fleet: ipam.mode = {mode:?}: {} nodes authenticated in {auth_secs:.1} s; scaling each to {} pods",
            nodes.len(),
            options.pods
        );
    }
    // Checkpoints on a tmpfs, as the agent's /run/vcnpath is.
    let dir = tempfile::Builder::new()
        .prefix("vcnpath-fleet")
        .tempdir_in(shm_or_tmp())
        .context("checkpoint directory")?;
    sim.reset_calls();
    let start = Instant::now();
    let deadline = start + options.deadline;
    let ipams: Vec<Arc<Ipam>> = nodes
        .iter()
        .zip(0..)
        .map(|(node, n)| start_ipam(node, &config, dir.path(), n).map(Arc::new))
        .collect::<Result<_>>()?;
    let mut tasks = tokio::task::JoinSet::new();
    for (n, ipam) in (0..).zip(&ipams) {
        for p in 0..options.pods {
            let ipam = ipam.clone();
            tasks.spawn(async move {
                let got = allocate(&ipam, &pod(n, p), deadline).await?;
                Ok::<_, anyhow::Error>((n, p, got.map(|a| (start.elapsed(), a.ip))))
            });
        }
    }
    let mut waits: Vec<NodeWaits> = vec![vec![None; options.pods]; nodes.len()];
    let total = nodes.len() * options.pods;
    let mut done = 0;
    let mut held = std::collections::BTreeSet::new();
    let mut next_progress = start + PROGRESS_EVERY;
    loop {
        let joined = tokio::time::timeout_at(next_progress, tasks.join_next()).await;
        match joined {
            Err(_) => {
                if options.progress {
                    let ready = waits.iter().flatten().flatten().count();
                    let (calls, throttled) = calls_of(&nodes);
                    eprintln!(
                        "fleet: ipam.mode = {mode:?}: {:.0} s: {ready}/{total} pods have addresses, {} calls, {throttled} answered 429",
                        start.elapsed().as_secs_f64(),
                        calls.values().sum::<u64>()
                    );
                }
                next_progress += PROGRESS_EVERY;
            }
            Ok(None) => break,
            Ok(Some(result)) => {
                let (n, p, got) = result.context("allocation task")??;
                if let Some((wait, ip)) = got {
                    if !held.insert(ip) {
                        bail!("{ip} was handed to two pods of the fleet (node {n}, pod {p})");
                    }
                    waits[n as usize][p] = Some(wait);
                }
                done += 1;
                crate::interrupt::check()?;
            }
        }
    }
    debug_assert_eq!(done, total);
    let (calls, throttled) = calls_of(&nodes);
    let throttled_by_simulator = sim.throttled().values().sum();
    drop(ipams);
    Ok(summarize(
        mode,
        options,
        &waits,
        &calls,
        (throttled, throttled_by_simulator),
        auth_secs,
    ))
}

fn summarize(
    mode: &'static str,
    options: &Options,
    waits: &[NodeWaits],
    calls: &BTreeMap<String, u64>,
    (throttled, throttled_by_simulator): (u64, u64),
    auth_secs: f64,
) -> FleetRun {
    let node_ready: Vec<Duration> = waits
        .iter()
        .filter_map(|pods| pods.iter().copied().collect::<Option<Vec<_>>>())
        .map(|pods| pods.into_iter().max().unwrap_or_default())
        .collect();
    let pod_wait: Vec<Duration> = waits.iter().flatten().flatten().copied().collect();
    let converged = u32::try_from(node_ready.len()).unwrap_or(u32::MAX);
    let calls_total: u64 = calls.values().sum();
    FleetRun {
        mode,
        nodes: options.nodes,
        pods_per_node: options.pods,
        converged,
        all_ready_secs: (converged == options.nodes).then(|| {
            node_ready
                .iter()
                .max()
                .copied()
                .unwrap_or_default()
                .as_secs_f64()
        }),
        node_ready: Latency::of(&node_ready),
        pod_wait: Latency::of(&pod_wait),
        calls: calls.iter().map(|(op, n)| (op.clone(), *n)).collect(),
        calls_total,
        throttled,
        throttled_by_simulator,
        throttled_fraction: ratio(throttled, calls_total),
        auth_secs,
    }
}

/// `part / whole` of two call counts (0 when there were none).
pub fn ratio(part: u64, whole: u64) -> f64 {
    #[expect(
        clippy::cast_precision_loss,
        reason = "call counts stay far below 2^52"
    )]
    let (part, whole) = (part as f64, whole as f64);
    if whole == 0.0 { 0.0 } else { part / whole }
}

async fn authenticate_all(sim: &Simulator, n: u32, config: &AgentConfig) -> Result<Vec<Node>> {
    use futures::StreamExt as _;
    futures::stream::iter(0..n)
        .map(|i| authenticate(sim, i, config))
        .buffered(AUTH_PARALLEL)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// Every node's Core API attempts by operation, and how many were answered 429.
fn calls_of(nodes: &[Node]) -> (BTreeMap<String, u64>, u64) {
    let mut calls = BTreeMap::new();
    let mut throttled = 0;
    for node in nodes {
        let mut text = String::new();
        node.client.metrics().render(&mut text);
        for ((operation, outcome), n) in metrics::oci_outcomes(&text) {
            if outcome == "TooManyRequests" {
                throttled += n;
            }
            *calls.entry(operation).or_insert(0) += n;
        }
    }
    (calls, throttled)
}

fn shm_or_tmp() -> std::path::PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    }
}
