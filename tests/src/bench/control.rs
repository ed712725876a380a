//! Control plane: the real `vcnpath run` and `vcnpath-cni` against the OCI simulator with
//! OCI's latencies (every Core API call [`API_MS`], `CreatePrivateIp` [`CREATE_IP_MS`] more,
//! a VNIC attachment [`ATTACH_MS`] until it is attached).
//!
//! First 0 → 110 pods [`RAMP_PARALLEL`] at a time from an empty pool (the kubelet's retry on
//! "try again later" counts in an ADD's time) with `ipam.mode = "cidr"`, on a lab and
//! simulator of its own, for [`Ramp`]'s comparison with the single-IP pool. Then one ip-mode
//! agent lives through the rest, in this order: start (idle memory), the same 0 → 110,
//! memory with 110 pods, SIGKILL and restart with the simulator's latency off (start-up
//! restoring 110 pods), delete them, ADDs one at a time from the warm pool, churn, memory
//! after churn. Map sync is timed apart in [`map_sync`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::lab::{LabOptions, Netns, SimLab, cmd_in, enter_before_exec, lab_sim_config, process};
use crate::node_agent::{AgentOptions, NodeAgent, cni};
use crate::ocisim::{Faults, SimConfig};

pub mod checkpoint;
pub mod map_sync;
pub mod metrics;
pub mod report;

/// Every Core API call (a round trip to the regional endpoint).
pub const API_MS: u64 = 50;
/// `CreatePrivateIp` on top of [`API_MS`].
pub const CREATE_IP_MS: u64 = 450;
/// From `AttachVnic` to the attachment's `ATTACHED` state.
pub const ATTACH_MS: u64 = 5000;
/// Pods per node at OCI's usual density (what the targets speak of).
pub const PODS: usize = 110;
pub const RAMP_PARALLEL: usize = 10;
pub const CHURN_PARALLEL: usize = 20;
/// Sequential ADDs from the warm pool.
const WARM_ADDS: usize = 100;
/// Two secondary VNICs of this many addresses hold 110 pods (the lab has three VNICs).
const IPS_PER_VNIC: u32 = 64;
/// The end-to-end tests' cooldown: with the production 30 s, churn would be bounded by
/// the pool size / 30 s, not by the agent.
const COOLDOWN_SECS: u64 = 3;
const T: Duration = Duration::from_mins(2);

#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn of(samples: &[Duration]) -> Self {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        // Nearest rank, in integers: the sample `percent`% of the way up the sorted list.
        let at = |percent: usize| {
            ms.get((ms.len().saturating_sub(1) * percent + 50) / 100)
                .copied()
                .unwrap_or(f64::NAN)
        };
        Self {
            count: ms.len(),
            p50_ms: at(50),
            p99_ms: at(99),
            max_ms: at(100),
        }
    }
}

/// 0 → [`PODS`] from an empty pool on a fresh agent in one `ipam.mode`.
#[derive(Clone, Debug, Serialize)]
pub struct Ramp {
    /// `ip` (one `CreatePrivateIp` per address) or `cidr` (one per IP CIDR block).
    pub mode: &'static str,
    /// `ipam.use_primary_vnic`: pods got addresses on the primary VNIC too, so the first
    /// ones wait for no attachment.
    pub primary_vnic: bool,
    /// The very first ADD (no secondary VNIC yet), retries included.
    pub first_add_ms: f64,
    /// Every ADD of the ramp, retries included.
    pub add: Latency,
    /// From the first ADD to the last pod's address.
    pub secs: f64,
    /// OCI calls from the agent's start to the 110th pod, by operation (its `/metrics`,
    /// every attempt counted).
    pub oci_calls: Vec<(String, u64)>,
    pub oci_calls_total: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Churn {
    pub pods: usize,
    pub parallel: usize,
    pub secs: f64,
    pub addresses_per_sec: f64,
    /// OCI calls during the churn, by operation (from the agent's `/metrics`).
    pub oci_calls: Vec<(String, u64)>,
    /// ADDs told to try again later at least once (the pool was empty).
    pub try_again: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Control {
    pub api_ms: u64,
    pub create_ip_ms: u64,
    pub attach_ms: u64,
    pub add_warm: Latency,
    /// `true` spawned into the node namespace the way the plugin is: the process-spawn
    /// floor inside every ADD above.
    pub spawn_floor: Latency,
    /// 0 → 110 with single private IPs (the agent the rest of the figures come from).
    pub ramp: Ramp,
    /// 0 → 110 with IP CIDR blocks of [`Control::block_prefix`], same latencies.
    pub ramp_cidr: Ramp,
    /// Both again with `ipam.use_primary_vnic = true`: [ip, cidr].
    pub ramps_primary: [Ramp; 2],
    pub block_prefix: u8,
    pub ramp_parallel: usize,
    pub churn: Churn,
    pub startup_110_ms: f64,
    pub rss_idle_kib: u32,
    pub rss_110_kib: u32,
    pub rss_after_restart_kib: u32,
    pub rss_after_churn_kib: u32,
    pub map_sync: map_sync::MapSync,
    pub checkpoint_writes: checkpoint::CheckpointWrites,
}

fn realistic() -> Faults {
    Faults {
        latency_ms: API_MS,
        create_private_ip_ms: CREATE_IP_MS,
        ..Faults::default()
    }
}

/// `VmRSS` of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS in /proc/<pid>/status")
}

struct Pod {
    id: String,
    ns: Netns,
}

/// Runs `f(i)` for i in 0..n on `parallel` threads; the results in index order.
fn parallel<T: Send>(
    n: usize,
    parallel: usize,
    f: impl Fn(usize) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let next = AtomicUsize::new(0);
    let out: Mutex<Vec<Option<T>>> = Mutex::new((0..n).map(|_| None).collect());
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..parallel)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return Ok(());
                        }
                        crate::interrupt::check()?;
                        let value = f(i)?;
                        out.lock().unwrap_or_else(PoisonError::into_inner)[i] = Some(value);
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("bench worker panicked"))
    })?;
    Ok(out
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
        .into_iter()
        .map(|v| v.expect("every index ran"))
        .collect())
}

/// One ADD as the kubelet does it: "try again later" (CNI code 11, the pool is growing)
/// retried every 250 ms like [`crate::node_agent::cni_add`]. Its time to success and how
/// many times it was told to try again.
fn add(lab: &SimLab, agent: &NodeAgent, id: &str, ns: &Netns) -> Result<(Duration, usize)> {
    let started = Instant::now();
    let mut retries = 0;
    loop {
        crate::interrupt::check()?;
        let out = cni(
            lab.lab().node(),
            &agent.socket(),
            "ADD",
            id,
            Some(ns.path()),
        )?;
        if out.ok {
            return Ok((started.elapsed(), retries));
        }
        if out.code() != Some(11) || started.elapsed() > T {
            bail!("ADD {id} failed: {}", out.json);
        }
        retries += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn del(lab: &SimLab, agent: &NodeAgent, id: &str, ns: &Netns) -> Result<()> {
    let out = cni(
        lab.lab().node(),
        &agent.socket(),
        "DEL",
        id,
        Some(ns.path()),
    )?;
    if !out.ok {
        bail!("DEL {id} failed: {}", out.json);
    }
    Ok(())
}

fn scrape(lab: &SimLab) -> Result<String> {
    process::run(cmd_in(lab.lab().node(), "curl").args(["-sf", "http://127.0.0.1:19965/metrics"]))
}

fn lab() -> Result<SimLab> {
    let config = SimConfig {
        ips_per_vnic: IPS_PER_VNIC,
        attach_delay_ms: ATTACH_MS,
        faults: realistic(),
        ..lab_sim_config()
    };
    SimLab::new(LabOptions::default(), config).context("simulator lab")
}

fn options(ipam_mode: &'static str) -> AgentOptions {
    options_on(ipam_mode, false)
}

fn options_on(ipam_mode: &'static str, use_primary_vnic: bool) -> AgentOptions {
    AgentOptions {
        use_primary_vnic,
        ips_per_vnic: IPS_PER_VNIC,
        warm_ips: 10,
        cooldown_secs: COOLDOWN_SECS,
        state_on_tmpfs: true,
        ipam_mode: Some(ipam_mode),
        block_prefix: Some(BLOCK_PREFIX),
        ..AgentOptions::default()
    }
}

/// The agent's default block (`ipam.block_prefix`): 16 addresses.
const BLOCK_PREFIX: u8 = 28;

fn pods(lab: &SimLab, prefix: &str) -> Result<Vec<Pod>> {
    (0..PODS)
        .map(|i| {
            let id = format!("{prefix}{i:03}");
            Ok(Pod {
                ns: lab.lab().add_pod_netns(&id)?,
                id,
            })
        })
        .collect()
}

/// 0 → [`PODS`] on `agent`, started on an empty pool a moment ago.
fn ramp(
    lab: &SimLab,
    agent: &NodeAgent,
    pods: &[Pod],
    (mode, primary_vnic): (&'static str, bool),
) -> Result<Ramp> {
    let started = Instant::now();
    let first = add(lab, agent, &pods[0].id, &pods[0].ns)?.0;
    let mut adds = vec![first];
    adds.extend(
        parallel(PODS - 1, RAMP_PARALLEL, |i| {
            add(lab, agent, &pods[i + 1].id, &pods[i + 1].ns)
        })?
        .into_iter()
        .map(|(d, _)| d),
    );
    let secs = started.elapsed().as_secs_f64();
    let oci_calls = metrics::difference(
        &std::collections::BTreeMap::default(),
        &metrics::oci_requests(&scrape(lab)?),
    );
    eprintln!(
        "control: ipam.mode = {mode:?}, use_primary_vnic = {primary_vnic}: {PODS} pods in {secs:.1} s, {} OCI calls",
        oci_calls.iter().map(|(_, n)| n).sum::<u64>()
    );
    Ok(Ramp {
        mode,
        primary_vnic,
        first_add_ms: first.as_secs_f64() * 1e3,
        add: Latency::of(&adds),
        secs,
        oci_calls_total: oci_calls.iter().map(|(_, n)| n).sum(),
        oci_calls,
    })
}

/// [`ramp`] in `mode` (and on the primary VNIC too with `primary`), on a lab, simulator and
/// agent of its own, torn down after.
fn ramp_alone(mode: &'static str, primary: bool) -> Result<Ramp> {
    let lab = lab()?;
    let tag = format!("benchr{}{}", &mode[..1], u8::from(primary));
    let agent = NodeAgent::start_with(&lab, &tag, options_on(mode, primary))?;
    std::thread::sleep(Duration::from_secs(1));
    let pods = pods(&lab, &format!("r{}{}", &mode[..1], u8::from(primary)))?;
    let ramp = ramp(&lab, &agent, &pods, (mode, primary))?;
    parallel(PODS, RAMP_PARALLEL, |i| {
        del(&lab, &agent, &pods[i].id, &pods[i].ns)
    })?;
    Ok(ramp)
}

pub fn run(churn_pods: usize) -> Result<Control> {
    let ramp_cidr = ramp_alone("cidr", false)?;
    let ramps_primary = [ramp_alone("ip", true)?, ramp_alone("cidr", true)?];
    let lab = lab()?;
    let mut agent = NodeAgent::start_with(&lab, "benchcp", options("ip"))?;
    std::thread::sleep(Duration::from_secs(1));
    let rss_idle_kib = rss_kib(agent.pid())?;

    // 0 → 110 from an empty pool.
    let pods = pods(&lab, "cp")?;
    let ramp = ramp(&lab, &agent, &pods, ("ip", false))?;
    let rss_110_kib = rss_kib(agent.pid())?;

    // Start-up restoring 110 pods, the simulator's latency excluded.
    lab.sim().set_faults(Faults::default());
    agent.kill9()?;
    agent.restart(&lab)?;
    let startup = agent.started_in();
    // Its log's timestamps say where the start-up time goes.
    let log = super::output_dir().join("control-startup.log");
    std::fs::create_dir_all(super::output_dir())?;
    std::fs::write(&log, agent.latest_log())?;
    std::thread::sleep(Duration::from_secs(1));
    let rss_after_restart_kib = rss_kib(agent.pid())?;
    lab.sim().set_faults(realistic());

    // Warm pool: free the 110, let their cooldown pass, then ADD one at a time.
    parallel(PODS, RAMP_PARALLEL, |i| {
        del(&lab, &agent, &pods[i].id, &pods[i].ns)
    })?;
    std::thread::sleep(Duration::from_secs(COOLDOWN_SECS + 2));
    let (warm, spawn_floor) = warm_adds(&lab, &agent, &pods)?;
    parallel(WARM_ADDS, RAMP_PARALLEL, |i| {
        del(&lab, &agent, &format!("warm{i:03}"), &pods[i].ns)
    })?;
    std::thread::sleep(Duration::from_secs(COOLDOWN_SECS + 2));

    let churn = churn(&lab, &agent, &pods, churn_pods)?;
    let rss_after_churn_kib = rss_kib(agent.pid())?;

    Ok(Control {
        api_ms: API_MS,
        create_ip_ms: API_MS + CREATE_IP_MS,
        attach_ms: ATTACH_MS,
        add_warm: Latency::of(&warm),
        spawn_floor: Latency::of(&spawn_floor),
        ramp,
        ramp_cidr,
        ramps_primary,
        block_prefix: BLOCK_PREFIX,
        ramp_parallel: RAMP_PARALLEL,
        churn,
        startup_110_ms: startup.as_secs_f64() * 1e3,
        rss_idle_kib,
        rss_110_kib,
        rss_after_restart_kib,
        rss_after_churn_kib,
        map_sync: map_sync::run()?,
        checkpoint_writes: checkpoint::run()?,
    })
}

/// [`WARM_ADDS`] ADDs one at a time from the warm pool, each timed over the whole plugin
/// process, and as many spawns of `true` into the node namespace beside them.
fn warm_adds(
    lab: &SimLab,
    agent: &NodeAgent,
    pods: &[Pod],
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let mut warm = Vec::with_capacity(WARM_ADDS);
    for (i, pod) in pods.iter().take(WARM_ADDS).enumerate() {
        crate::interrupt::check()?;
        let id = format!("warm{i:03}");
        let started = Instant::now();
        let out = cni(
            lab.lab().node(),
            &agent.socket(),
            "ADD",
            &id,
            Some(pod.ns.path()),
        )?;
        warm.push(started.elapsed());
        if !out.ok {
            bail!("warm ADD {id} failed (pool not warm?): {}", out.json);
        }
    }
    let spawn_floor = (0..WARM_ADDS)
        .map(|_| {
            let mut cmd = std::process::Command::new("true");
            let started = Instant::now();
            enter_before_exec(&mut cmd, lab.lab().node());
            process::run(&mut cmd)?;
            Ok(started.elapsed())
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((warm, spawn_floor))
}

/// `n` pods created and deleted by [`CHURN_PARALLEL`] workers, each creating and deleting
/// its pods one after the other in its own pod namespace (a DEL leaves it empty).
fn churn(lab: &SimLab, agent: &NodeAgent, pods: &[Pod], n: usize) -> Result<Churn> {
    let per_worker = n.div_ceil(CHURN_PARALLEL);
    let before = metrics::oci_requests(&scrape(lab)?);
    let try_again = AtomicUsize::new(0);
    let started = Instant::now();
    parallel(CHURN_PARALLEL, CHURN_PARALLEL, |w| {
        let ns = &pods[w].ns;
        for k in 0..per_worker {
            let id = format!("churn{w:02}-{k:03}");
            let (_, retries) = add(lab, agent, &id, ns)?;
            if retries > 0 {
                try_again.fetch_add(1, Ordering::Relaxed);
            }
            del(lab, agent, &id, ns)?;
        }
        Ok(())
    })?;
    let secs = started.elapsed().as_secs_f64();
    let after = metrics::oci_requests(&scrape(lab)?);
    let pods = per_worker * CHURN_PARALLEL;
    Ok(Churn {
        pods,
        parallel: CHURN_PARALLEL,
        secs,
        addresses_per_sec: f64::from(u32::try_from(pods)?) / secs,
        oci_calls: metrics::difference(&before, &after),
        try_again: try_again.into_inner(),
    })
}
