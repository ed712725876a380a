//! The address-safety fault suite: the real agent and plugin against the OCI simulator in
//! the namespace lab, killed (`kill -9`) at a random point of a burst of ADDs and DELs, round
//! after round, with one kind of trouble per case: faults after commit on `CreatePrivateIp`
//! and `AttachVnic`, stale list reads, the node tag stripped from pods' private IPs, the
//! checkpoint deleted, truncated or made inconsistent between restarts, a second agent
//! started, concurrent ADDs of one container, the state directory full or read-only, and
//! IP CIDR blocks created and deleted (CIDR mode) while their answers are lost.
//! After each round the invariants are checked from outside, against every source:
//!
//! - every live pod holds exactly one address, the one its ADD returned, and no address has
//!   two holders (`vcnpath status`);
//! - the node routes exactly the live pods' addresses through `vcn…` veths, and the pinned
//!   `endpoints` map steers exactly the held addresses;
//! - OCI has every held address on the VNIC the agent says (no VNIC with a live pod was
//!   detached, no held address deleted);
//! - nothing is held for a pod that is gone (no leak);
//! - no address freed by a DEL is handed out again before its cooldown;
//! - in CIDR mode, every held address lies in a block OCI has on the pod's VNIC, no two live
//!   pods share an address, and once the node has converged OCI holds the blocks the agent
//!   lists, no more than the live pods and the warm target need (see `check_blocks`).
//!
//! Each case prints its figures (seed, rounds, kill points, pods, violations) and fails on
//! any violation, printing each one in full as it is found and again at the end (the agent's
//! logs go to `target/fault-suite-logs/<case>-agent.log`). `VCNPATH_FAULT_SEED` replays a run's
//! kill points.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use serde_json::Value;
use vcnpath_tests::{
    lab::{LabOptions, Netns, SimLab, lab_sim_config},
    mounts,
    node_agent::{
        AgentOptions, CniOutput, IPS_PER_VNIC, NodeAgent, cloud_ips, cni, cni_add, cni_gc,
    },
    ocikit::private_ip_range,
    ocisim::{FaultRule, Faults},
    privileged::have_root,
};

/// How long the `endpoints` map may lag what IPAM holds: the agent syncs right after an
/// ADD, a DEL or a pod's address moving, and at the latest every second.
const ENDPOINTS_LAG: Duration = Duration::from_secs(2);

/// Rounds per case (but [`Trouble::CidrBlocks`], [`BLOCK_ROUNDS`]): each one kill -9 at a
/// random point of a burst.
const ROUNDS: usize = 20;
/// New pods and DELs of live pods per burst.
const ADDS: usize = 3;
const DELS: usize = 2;
/// Live pods kept at most (the lab's two secondary VNICs hold 48 addresses).
const MAX_LIVE: usize = 18;
/// CIDR mode's pool in [`Trouble::CidrBlocks`]: /30 blocks (4 addresses), four on a VNIC (16
/// addresses), two warm addresses, and excess blocks released 2 s after they empty, so the
/// grow and shrink rounds create and delete blocks and attach a second VNIC.
const BLOCK_PREFIX: u8 = 30;
const BLOCK_SIZE: usize = 1 << (32 - BLOCK_PREFIX);
const BLOCK_ADDRESSES_PER_VNIC: usize = 16;
const BLOCK_WARM: usize = 2;
const BLOCK_RELEASE_DELAY_SECS: u64 = 2;
/// The cooldown in CIDR mode: a block goes back to OCI only once its last address has
/// cooled and then stayed free for the release delay, all within one agent's life.
const BLOCK_COOLDOWN: Duration = Duration::from_secs(1);
/// How long `CreatePrivateIp` takes in [`Trouble::CidrBlocks`] (OCI takes ~500 ms).
const CREATE_LATENCY: Duration = Duration::from_millis(300);
/// How long a growing round's burst waits for a block create to aim its kill at.
const AIM_WINDOW: Duration = Duration::from_millis(600);
/// Rounds of growth (six ADDs, one DEL) then as many of shrinking (one ADD, six DELs):
/// live pods go from 0 to 16 and back to 1, twice in 12 rounds, past one VNIC's 16 addresses
/// with the warm target, so growing attaches a second VNIC and shrinking empties it.
const BLOCK_PHASE: usize = 3;
const BLOCK_BURST: usize = 6;
const BLOCK_ROUNDS: usize = 4 * BLOCK_PHASE;
/// The blocks the live pods need at their peak: the case must see at least as many.
const BLOCK_PEAK: usize =
    (BLOCK_BURST + (BLOCK_PHASE - 1) * (BLOCK_BURST - 1)).div_ceil(BLOCK_SIZE);
/// The agent's cooldown in the lab (`AgentOptions::default`).
const COOLDOWN: Duration = Duration::from_secs(3);
const T: Duration = Duration::from_mins(1);
/// The allocation GC's grace in the suite (the shortest the agent accepts): an address held
/// for a pod that is gone must be free again after it.
const GC_GRACE: Duration = Duration::from_secs(30);

/// The kind of trouble a case adds to the kill -9 of every round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trouble {
    /// Answers lost after the operation took effect, plus 429s and 5xx.
    FaultsAfterCommit,
    /// List calls answer what OCI held a moment ago.
    StaleLists,
    /// The checkpoint is deleted while the agent is down.
    CheckpointDeleted,
    /// The checkpoint is truncated, or two pods are given one address, while the agent is
    /// down: the agent must refuse to start from it and change nothing; the file is then
    /// put back, or every fourth round `vcnpath checkpoint rebuild` keeps it aside and the
    /// agent rebuilds the record from the node.
    CheckpointBroken,
    /// A second agent is started on the node during the burst.
    SecondAgent,
    /// Each burst also sends three concurrent ADDs of one container.
    SameContainerAdds,
    /// The `vcnpath-node` tag is stripped from live pods' private IPs while the agent is
    /// down (Terraform drift, a person).
    TagsStripped,
    /// Every fifth round a secondary VNIC with live pods is detached behind the agent's back
    /// while it is down; the runtime then deletes the pods that lost their network.
    VnicDetached,
    /// The state directory (a tmpfs, as `/run` is on a node) fills up, on odd rounds is
    /// remounted read-only, in the middle of the burst, and stays so across the restart: the
    /// agent must serve, say it is not ready and why, refuse new pods with that reason, and
    /// lose nothing once the directory takes writes again.
    StateDirUnwritable,
    /// CIDR mode with small blocks: live pods grow and shrink so blocks are created and
    /// released round after round, `CreatePrivateIp` takes 300 ms and loses its answer after
    /// the block exists (and `DeletePrivateIp` after it is gone), so the kill lands while a
    /// block is being created.
    CidrBlocks,
}

struct Pod {
    ns: Netns,
    ip: Ipv4Addr,
}

/// One case's lab, agent, the pods the runtime believes in, and what was seen.
struct Suite {
    trouble: Trouble,
    lab: SimLab,
    agent: NodeAgent,
    rng: StdRng,
    live: BTreeMap<String, Pod>,
    /// Addresses DELs freed, and when: none may come back before the cooldown.
    freed: BTreeMap<Ipv4Addr, Instant>,
    next: usize,
    kill_points_ms: Vec<u64>,
    /// Live pods whose VNIC was detached behind the agent's back: the runtime deletes them
    /// in the next round (they have lost their network); until then they are quarantined.
    stranded: Vec<String>,
    /// The most addresses held at once, within the GC's grace, for pods that were gone.
    pending_seen: usize,
    adds: usize,
    dels: usize,
    seed: u64,
    /// When the latest agent process was first seen reconciled with OCI.
    reconciled: Instant,
    /// CIDR mode: the OCIDs of the blocks seen at OCI after some round, and of those gone
    /// again by a later one (the case must create and delete blocks to test anything).
    blocks_seen: BTreeSet<String>,
    blocks_gone: BTreeSet<String>,
    /// Kills that landed while a `CreatePrivateIp` (a `DeletePrivateIp`) was under way: one
    /// had reached OCI within [`CREATE_LATENCY`] before.
    kills_in_create: usize,
    kills_in_delete: usize,
    violations: Vec<String>,
}

impl Suite {
    fn new(trouble: Trouble, tag: &str) -> Self {
        let config = vcnpath_tests::ocisim::SimConfig {
            ips_per_vnic: IPS_PER_VNIC,
            attach_delay_ms: 300,
            ..lab_sim_config()
        };
        let lab = SimLab::new(LabOptions::default(), config).expect("simulator-driven lab");
        let mut options = AgentOptions {
            allocation_gc_grace_secs: Some(GC_GRACE.as_secs()),
            state_on_tmpfs: trouble == Trouble::StateDirUnwritable,
            ..AgentOptions::default()
        };
        if trouble == Trouble::CidrBlocks {
            options = AgentOptions {
                ipam_mode: Some("cidr"),
                block_prefix: Some(BLOCK_PREFIX),
                block_addresses_per_vnic: Some(BLOCK_ADDRESSES_PER_VNIC),
                warm_ips: u32::try_from(BLOCK_WARM).expect("small"),
                release_delay_secs: BLOCK_RELEASE_DELAY_SECS,
                cooldown_secs: BLOCK_COOLDOWN.as_secs(),
                ..options
            };
        }
        let agent = NodeAgent::start_with(&lab, tag, options).expect("vcnpath run");
        let seed = std::env::var("VCNPATH_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        eprintln!("{trouble:?}: seed {seed} (VCNPATH_FAULT_SEED replays it)");
        Self {
            trouble,
            lab,
            agent,
            rng: StdRng::seed_from_u64(seed),
            live: BTreeMap::new(),
            freed: BTreeMap::new(),
            next: 0,
            kill_points_ms: Vec::new(),
            pending_seen: 0,
            stranded: Vec::new(),
            adds: 0,
            dels: 0,
            seed,
            reconciled: Instant::now(),
            blocks_seen: BTreeSet::new(),
            blocks_gone: BTreeSet::new(),
            kills_in_create: 0,
            kills_in_delete: 0,
            violations: Vec::new(),
        }
    }

    /// Records a violation and prints it at once, in full: a run that dies later (a panic,
    /// a timeout) still shows every violation found so far.
    fn violation(&mut self, round: usize, what: &str) {
        let line = format!("round {round}: {what}");
        eprintln!("{:?} (seed {}) VIOLATION {line}", self.trouble, self.seed);
        self.violations.push(line);
    }

    /// The agent's cooldown in this case.
    fn cooldown(&self) -> Duration {
        if self.trouble == Trouble::CidrBlocks {
            BLOCK_COOLDOWN
        } else {
            COOLDOWN
        }
    }

    /// How many rounds the case runs.
    fn rounds(&self) -> usize {
        if self.trouble == Trouble::CidrBlocks {
            BLOCK_ROUNDS
        } else {
            ROUNDS
        }
    }

    /// The round's number of new pods and of DELs of live pods.
    fn burst(&self, round: usize) -> (usize, usize) {
        if self.trouble == Trouble::CidrBlocks {
            return if (round / BLOCK_PHASE).is_multiple_of(2) {
                (BLOCK_BURST, 1)
            } else {
                (1, BLOCK_BURST)
            };
        }
        let adds = if self.live.len() + ADDS <= MAX_LIVE {
            ADDS
        } else {
            0
        };
        (adds, DELS)
    }

    /// An ADD answered `ip` at `answered`: a violation if a DEL sent less than the cooldown
    /// before freed it (the agent released it after the DEL was sent and allocated it before
    /// the ADD answered, so this never blames the agent for the test's own delays). This
    /// holds where the checkpoint, the cooldowns' record, was deleted too.
    fn check_reuse(&mut self, round: usize, id: &str, ip: Ipv4Addr, answered: Instant) {
        if let Some(sent) = self.freed.remove(&ip)
            && answered.saturating_duration_since(sent) < self.cooldown()
        {
            let ms = answered.saturating_duration_since(sent).as_millis();
            self.violation(
                round,
                &format!("{id} got {ip} {ms} ms after its DEL was sent"),
            );
        }
    }

    /// The round's DELs: the pods stranded by a detach (the runtime deletes what lost its
    /// network), then the oldest live pods.
    fn pick_dels(&mut self, n: usize) -> Vec<String> {
        // A stranded pod whose DEL the restart's retry already served is gone.
        let mut dels: Vec<String> = std::mem::take(&mut self.stranded)
            .into_iter()
            .filter(|id| self.live.contains_key(id))
            .collect();
        let oldest: Vec<String> = self
            .live
            .keys()
            .filter(|id| !dels.contains(id))
            .take(n)
            .cloned()
            .collect();
        dels.extend(oldest);
        dels
    }

    /// The case's trouble in the cloud, for this round's burst and restart.
    fn cloud_trouble(&self) {
        if self.trouble == Trouble::FaultsAfterCommit {
            self.lab.sim().set_faults(Faults {
                rate_429: 0.1,
                rate_5xx: 0.1,
                rules: ["CreatePrivateIp", "AttachVnic"]
                    .into_iter()
                    .map(|op| FaultRule {
                        op: op.into(),
                        status: 503,
                        code: "ServiceUnavailable".into(),
                        rate: 0.3,
                        after_commit: true,
                        ..FaultRule::default()
                    })
                    .collect(),
                ..Faults::default()
            });
        }
        if self.trouble == Trouble::CidrBlocks {
            let lost = |op: &str, rate| FaultRule {
                op: op.into(),
                status: 503,
                code: "ServiceUnavailable".into(),
                rate,
                after_commit: true,
                ..FaultRule::default()
            };
            self.lab.sim().set_faults(Faults {
                create_private_ip_ms: u64::try_from(CREATE_LATENCY.as_millis()).expect("small"),
                rules: vec![lost("CreatePrivateIp", 0.3), lost("DeletePrivateIp", 0.2)],
                ..Faults::default()
            });
        }
        if self.trouble == Trouble::StaleLists {
            self.lab.sim().set_faults(Faults {
                stale_read_ms: 1500,
                ..Faults::default()
            });
        }
    }

    fn round(&mut self, round: usize) {
        let socket = self.agent.socket();
        let (add_count, del_count) = self.burst(round);
        if self.trouble == Trouble::CidrBlocks && del_count > add_count {
            self.wait_past_release_delay();
        }
        let adds: Vec<(String, Netns)> = (0..add_count).map(|_| self.new_pod()).collect();
        let dels = self.pick_dels(del_count);
        // Two more ADDs of the first new container, at once with its own.
        let same = self.trouble == Trouble::SameContainerAdds && !adds.is_empty();
        self.cloud_trouble();
        let kill_at = Duration::from_millis(self.rng.gen_range(0..400));
        // A growing round in CIDR mode aims the kill at the first block create of the burst:
        // a random moment while it is under way (or [`AIM_WINDOW`] in, if none comes by then).
        let aim_at_create = (self.trouble == Trouble::CidrBlocks && add_count > del_count)
            .then(|| CREATE_LATENCY.mul_f64(self.rng.gen_range(0.0..0.9)));
        let (lab, agent, live) = (&self.lab, &mut self.agent, &self.live);
        let node = lab.lab().node();
        let second_agent = self.trouble == Trouble::SecondAgent;
        let unwritable = (self.trouble == Trouble::StateDirUnwritable)
            .then(|| StateDirTrouble::for_round(agent.state_dir(), round));
        let sent = Instant::now();
        let mut kills_under_way = (false, false);
        let mut killed_at = kill_at;
        let (added, deleted, second) = std::thread::scope(|scope| {
            let add_threads: Vec<_> = adds
                .iter()
                .map(|(id, ns)| {
                    let socket = &socket;
                    scope.spawn(move || {
                        let out = cni(node, socket, "ADD", id, Some(ns.path()));
                        (id.clone(), out, Instant::now())
                    })
                })
                .collect();
            let same_threads: Vec<_> = adds
                .iter()
                .take(usize::from(same))
                .flat_map(|pod| [pod, pod])
                .map(|(id, ns)| {
                    let socket = &socket;
                    scope.spawn(move || cni(node, socket, "ADD", id, Some(ns.path())))
                })
                .collect();
            let del_threads: Vec<_> = dels
                .iter()
                .map(|id| {
                    let (socket, ns) = (&socket, live[id].ns.path());
                    scope.spawn(move || (id.clone(), cni(node, socket, "DEL", id, Some(ns))))
                })
                .collect();
            let second = second_agent.then(|| agent.run_second(lab, Duration::from_secs(20)));
            match aim_at_create {
                Some(into_create) => {
                    let (at, in_create) = kill_in_first_create(lab, agent, into_create);
                    (killed_at, kills_under_way) = (at, (in_create, false));
                }
                None => kills_under_way = kill_after(lab, agent, kill_at, unwritable.as_ref()),
            }
            let added: Vec<_> = add_threads
                .into_iter()
                .map(|h| h.join().expect("ADD"))
                .collect();
            for h in same_threads {
                let _ = h.join();
            }
            let deleted: Vec<_> = del_threads
                .into_iter()
                .map(|h| h.join().expect("DEL"))
                .collect();
            (added, deleted, second)
        });
        self.kill_points_ms
            .push(u64::try_from(killed_at.as_millis()).unwrap_or(u64::MAX));
        self.kills_in_create += usize::from(kills_under_way.0);
        self.kills_in_delete += usize::from(kills_under_way.1);
        if let Some(second) = second {
            self.second_agent_exited(round, second);
        }
        let pending_adds = self.record_burst(round, sent, adds, added, &deleted);

        self.perturb_and_restart(round);
        if let Some(trouble) = unwritable {
            self.while_unwritable(round, &trouble);
            trouble.end();
            self.wait_writable(round);
        }

        self.retry(round, sent, dels, pending_adds);
        if self.trouble == Trouble::CidrBlocks {
            self.runtime_gc(round);
        }
        self.lab.sim().set_faults(Faults::default());
        self.check(round);
    }

    /// A shrinking round's burst in CIDR mode waits a random time past the release delay, so
    /// blocks are deleted before the burst or the kill meets them being deleted. A restarted
    /// agent counts an address's release delay from its first reconcile, or from the end of
    /// its cooldown.
    fn wait_past_release_delay(&mut self) {
        let delay = Duration::from_secs(BLOCK_RELEASE_DELAY_SECS);
        let extra = BLOCK_COOLDOWN + Duration::from_millis(1500);
        let wait = delay + extra.mul_f64(self.rng.gen_range(0.0..1.0));
        std::thread::sleep(wait.saturating_sub(self.reconciled.elapsed()));
    }

    /// Books the burst's answers: a DEL answered ok frees its pod's address, an ADD answered
    /// with an address makes a live pod; the ADDs that got none are returned for retrying.
    fn record_burst(
        &mut self,
        round: usize,
        sent: Instant,
        adds: Vec<(String, Netns)>,
        added: Vec<(String, anyhow::Result<CniOutput>, Instant)>,
        deleted: &[(String, anyhow::Result<CniOutput>)],
    ) -> Vec<(String, Netns)> {
        for (id, out) in deleted {
            if out.as_ref().is_ok_and(|o| o.ok)
                && let Some(pod) = self.live.remove(id)
            {
                self.freed.insert(pod.ip, sent);
                self.dels += 1;
            }
        }
        let mut pending_adds: Vec<(String, Netns)> = Vec::new();
        for ((id, out, answered), (_, ns)) in added.into_iter().zip(adds) {
            match out.ok().filter(|o| o.ok).and_then(|o| o.ip()) {
                Some(ip) => {
                    self.check_reuse(round, &id, ip, answered);
                    self.live.insert(id, Pod { ns, ip });
                    self.adds += 1;
                }
                None => pending_adds.push((id, ns)),
            }
        }
        pending_adds
    }

    /// The runtime's CNI GC (containerd runs it on its own schedule) listing the live pods:
    /// the addresses of pods whose DEL the plugin completed while the agent was down go now
    /// rather than after the GC grace, so their blocks empty within the rounds.
    fn runtime_gc(&mut self, round: usize) {
        let valid: Vec<&str> = self.live.keys().map(String::as_str).collect();
        match cni_gc(self.lab.lab().node(), &self.agent.socket(), &valid) {
            Ok(out) if out.ok => {}
            other => self.violation(
                round,
                &format!("CNI GC listing the live pods failed: {other:?}"),
            ),
        }
    }

    /// The second agent must have exited, and failed, while the first one served.
    fn second_agent_exited(
        &mut self,
        round: usize,
        second: anyhow::Result<(std::process::ExitStatus, String)>,
    ) {
        match second {
            Ok((status, _)) if !status.success() => {}
            Ok((status, log)) => {
                self.violation(round, &format!("a second agent ran on ({status}): {log}"));
            }
            Err(e) => self.violation(round, &format!("a second agent did not exit: {e:#}")),
        }
    }

    /// `vcnpath checkpoint rebuild` on the refused checkpoint `path` (content `bad`): it must
    /// keep the file aside, unchanged, and leave no checkpoint for the next start.
    fn rebuild(&mut self, round: usize, path: &std::path::Path, bad: &[u8]) {
        let out = self
            .agent
            .run_cli(&self.lab, &["checkpoint", "rebuild"])
            .expect("vcnpath checkpoint rebuild");
        let said = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let kept: Vec<_> = std::fs::read_dir(path.parent().expect("state dir"))
            .expect("state dir")
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("ipam.json.refused-")
            })
            .map(|e| e.path())
            .collect();
        let kept_intact = kept
            .iter()
            .any(|k| std::fs::read(k).ok().as_deref() == Some(bad));
        if !out.status.success() || path.exists() || !kept_intact || !said.contains("kept as") {
            self.violation(
                round,
                &format!(
                    "checkpoint rebuild ({}): checkpoint left {}, kept {kept:?} intact {kept_intact}: {said}",
                    out.status,
                    path.exists()
                ),
            );
        }
        for k in kept {
            let _ = std::fs::remove_file(k);
        }
    }

    /// A new pod's id and network namespace.
    fn new_pod(&mut self) -> (String, Netns) {
        let id = format!("p{:04}", self.next);
        self.next += 1;
        let ns = self.lab.lab().add_pod_netns(&id).expect("pod netns");
        (id, ns)
    }

    /// The runtime retries what failed: DELs of pods still live, then the ADDs. A DEL
    /// retried here was first sent with the burst at `burst_sent`, and the agent may have
    /// released the address then (its answer lost to the kill): the cooldown is counted
    /// from that first send, or a legitimate reuse 3 s after the release would be blamed.
    fn retry(
        &mut self,
        round: usize,
        burst_sent: Instant,
        dels: Vec<String>,
        pending_adds: Vec<(String, Netns)>,
    ) {
        let again: Vec<String> = dels
            .into_iter()
            .filter(|id| self.live.contains_key(id))
            .collect();
        for id in again {
            let ns = self.live[&id].ns.path().to_owned();
            let out = cni(
                self.lab.lab().node(),
                &self.agent.socket(),
                "DEL",
                &id,
                Some(&ns),
            );
            match out {
                Ok(o) if o.ok => {
                    let pod = self.live.remove(&id).expect("live");
                    self.freed.insert(pod.ip, burst_sent);
                    self.dels += 1;
                }
                other => self.violation(round, &format!("DEL {id} again failed: {other:?}")),
            }
        }
        for (id, ns) in pending_adds {
            let out = cni_add(
                self.lab.lab().node(),
                &self.agent.socket(),
                &id,
                ns.path(),
                T,
            );
            let answered = Instant::now();
            match out {
                Ok(o) if o.ok => {
                    let ip = o.ip().expect("an ADD result has an address");
                    self.check_reuse(round, &id, ip, answered);
                    self.live.insert(id, Pod { ns, ip });
                    self.adds += 1;
                }
                other => self.violation(round, &format!("ADD {id} again failed: {other:?}")),
            }
        }
    }

    /// The case's trouble while the agent is down, then the restart.
    fn perturb_and_restart(&mut self, round: usize) {
        let path = self.agent.checkpoint();
        match self.trouble {
            Trouble::CheckpointDeleted => {
                // None yet before the first ADD was served.
                let _ = std::fs::remove_file(&path);
            }
            Trouble::CheckpointBroken if path.exists() => {
                let good = std::fs::read(&path).expect("the checkpoint");
                let bad = if round.is_multiple_of(2) {
                    good[..good.len() / 2].to_vec()
                } else {
                    two_pods_on_one_address(&good)
                        .unwrap_or_else(|| good[..good.len() / 2].to_vec())
                };
                std::fs::write(&path, &bad).expect("break the checkpoint");
                let calls = self.lab.sim().calls();
                match self.agent.restart(&self.lab) {
                    Ok(()) => {
                        self.violation(round, "the agent started from a broken checkpoint");
                        self.agent.kill9().expect("kill -9");
                    }
                    Err(e) if !format!("{e:#}").contains("keep the file") => {
                        self.violation(round, &format!("the refusal gives no advice: {e:#}"));
                    }
                    Err(_) => {}
                }
                if std::fs::read(&path).ok().as_deref() != Some(bad.as_slice()) {
                    self.violation(round, "the refused checkpoint was changed");
                }
                let mutating: Vec<_> = self
                    .lab
                    .sim()
                    .calls()
                    .into_iter()
                    .filter(|(op, n)| mutates(op) && calls.get(op) != Some(n))
                    .collect();
                if !mutating.is_empty() {
                    self.violation(
                        round,
                        &format!("the refusing agent changed OCI: {mutating:?}"),
                    );
                }
                if round % 4 == 3 {
                    // The operator's way out: the refused file kept aside, the record rebuilt
                    // from the node at the next start.
                    self.rebuild(round, &path, &bad);
                } else {
                    std::fs::write(&path, &good).expect("put the checkpoint back");
                }
            }
            Trouble::VnicDetached if round % 5 == 4 => {
                if let Some(vnic) = self.busiest_secondary_vnic() {
                    detach(&self.lab, &vnic);
                    self.stranded = self
                        .live
                        .iter()
                        .filter(|(_, p)| !cloud_ips(&self.lab).contains_key(&p.ip))
                        .map(|(id, _)| id.clone())
                        .collect();
                }
            }
            Trouble::TagsStripped => {
                let ips: Vec<Ipv4Addr> = self.live.values().map(|p| p.ip).collect();
                for _ in 0..2.min(ips.len()) {
                    let ip = ips[self.rng.gen_range(0..ips.len())];
                    strip_tags(&self.lab, ip);
                }
            }
            _ => {}
        }
        if let Err(e) = self.agent.restart(&self.lab) {
            panic!("round {round}: the agent must start again: {e:#}");
        }
    }

    /// The invariants, from outside, allowing addresses still held for pods that are gone
    /// (see `check_holders`): `final_check`, after the GC's grace, allows none.
    fn check(&mut self, round: usize) {
        self.check_holders(round, false);
    }

    /// After the GC's grace: the invariants with no leak allowed.
    fn final_check(&mut self) {
        let deadline = Instant::now() + GC_GRACE + Duration::from_secs(15);
        while Instant::now() < deadline && self.pending() > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        let last = self.rounds();
        self.check_holders(last, true);
        if self.trouble == Trouble::CidrBlocks {
            let within = Duration::from_secs(BLOCK_RELEASE_DELAY_SECS) + Duration::from_secs(20);
            self.check_converged_blocks(last, within);
            // The blocks the last shrinking rounds emptied go while the node converges.
            self.note_blocks();
            if self.blocks_gone.is_empty()
                || self.blocks_seen.len() < BLOCK_PEAK
                || self.kills_in_create == 0
            {
                let what = format!(
                    "the grow and shrink rounds must create and delete blocks, a kill landing during a create: {} seen at OCI (the peak needs {BLOCK_PEAK}), {} of them deleted, {} kills during a create",
                    self.blocks_seen.len(),
                    self.blocks_gone.len(),
                    self.kills_in_create
                );
                self.violation(last, &what);
            }
        }
    }

    /// Addresses held for no live pod: what the GC must release within its grace.
    fn pending(&self) -> usize {
        let status = self.agent.status().expect("status");
        let live: BTreeSet<Ipv4Addr> = self.live.values().map(|p| p.ip).collect();
        status["pods"]
            .as_array()
            .expect("pods")
            .iter()
            .filter_map(|p| p["ip"].as_str()?.parse::<Ipv4Addr>().ok())
            .filter(|ip| !live.contains(ip))
            .count()
    }

    /// `vcnpath status` once the agent has reconciled with OCI since its restart (or after
    /// [`T`]): the invariants are the agent's view from then on; before, it cannot know of a
    /// VNIC detached while it was down.
    fn reconciled_status(&mut self) -> Value {
        let deadline = Instant::now() + T;
        loop {
            let status = self.agent.status().expect("status");
            if status["pool"]["reconciled"] == true || Instant::now() > deadline {
                self.reconciled = Instant::now();
                break status;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn check_holders(&mut self, round: usize, after_grace: bool) {
        let status = self.reconciled_status();
        let (holders, vnic_of) = holders_of(&status);
        let mut found = Vec::new();
        for (ip, who) in &holders {
            if who.len() > 1 {
                found.push(format!("{ip} is held by {who:?}"));
            }
        }
        let live_ips: BTreeMap<Ipv4Addr, &str> = self
            .live
            .iter()
            .map(|(id, p)| (p.ip, id.as_str()))
            .collect();
        for (id, pod) in &self.live {
            let recovered = format!("recovered:{}", pod.ip);
            match holders.get(&pod.ip) {
                Some(who) if who.iter().any(|w| w == id || w.starts_with(&recovered)) => {}
                other => found.push(format!("live pod {id} ({}) is held by {other:?}", pod.ip)),
            }
        }
        // Before the grace has passed, an address may still be held for a pod that is gone:
        // one whose DEL the plugin completed while the agent was down (it removes the host
        // side; the GC releases the address), or one only the `endpoints` map showed at start
        // (an ADD the kill cut off).
        let within_grace = |_: &[String]| !after_grace;
        let mut pending = 0;
        for (ip, who) in &holders {
            if live_ips.contains_key(ip) {
                continue;
            }
            if within_grace(who) {
                pending += 1;
            } else {
                found.push(format!(
                    "{ip} is held by {who:?}, a pod that is gone (a leak)"
                ));
            }
        }
        self.pending_seen = self.pending_seen.max(pending);
        let routed = routed_pod_ips(self.lab.lab().node());
        let live_set: BTreeSet<Ipv4Addr> = live_ips.keys().copied().collect();
        if routed != live_set {
            found.push(format!(
                "the node routes {routed:?} to pods; live are {live_set:?}"
            ));
        }
        // A quarantined pod (its VNIC detached behind the agent's back) has no VNIC to be
        // steered out of, and its address is no longer in OCI: held, but on no VNIC.
        let quarantined = quarantined_of(&status);
        // The datapath follows IPAM asynchronously: a pod the reconcile moved to another VNIC
        // is steered after the sync that follows it, a moment later.
        if let Some((mapped, held)) = self.endpoints_disagree(&status) {
            found.push(format!(
                "the endpoints map has {mapped:?}; held are {held:?} (for {} s)",
                ENDPOINTS_LAG.as_secs()
            ));
        }
        let cloud = cloud_ips(&self.lab);
        for (ip, vnic) in vnic_of.iter().filter(|(ip, _)| !quarantined.contains(ip)) {
            if cloud.get(ip) != Some(vnic) {
                found.push(format!(
                    "{ip} is held on {vnic} but OCI has it on {:?}",
                    cloud.get(ip)
                ));
            }
        }
        if self.trouble == Trouble::CidrBlocks {
            found.extend(self.pods_outside_blocks(&holders, &vnic_of, &quarantined));
            self.note_blocks();
        }
        for what in found {
            self.violation(round, &what);
        }
    }

    /// Books the node's blocks at OCI now: those seen before and gone since were deleted.
    fn note_blocks(&mut self) {
        let now: BTreeSet<String> = node_objects(&self.lab).into_iter().map(|o| o.id).collect();
        self.blocks_gone
            .extend(self.blocks_seen.difference(&now).cloned());
        self.blocks_seen.extend(now);
    }

    /// The pods' addresses in the `endpoints` map and those held (both without the
    /// quarantined ones), while they still differ after [`ENDPOINTS_LAG`] of asking again.
    fn endpoints_disagree(
        &self,
        first: &Value,
    ) -> Option<(BTreeSet<Ipv4Addr>, BTreeSet<Ipv4Addr>)> {
        let deadline = Instant::now() + ENDPOINTS_LAG;
        let mut status = first.clone();
        loop {
            let mapped: BTreeSet<Ipv4Addr> =
                vcnpath::datapath::DatapathMaps::from_pins(&self.agent.pins.path)
                    .and_then(|m| m.pod_endpoints())
                    .map(|e| e.into_keys().collect())
                    .unwrap_or_default();
            let quarantined = quarantined_of(&status);
            let held: BTreeSet<Ipv4Addr> = holders_of(&status)
                .0
                .into_keys()
                .filter(|ip| !quarantined.contains(ip))
                .collect();
            let mapped: BTreeSet<Ipv4Addr> = mapped.difference(&quarantined).copied().collect();
            if mapped == held {
                return None;
            }
            if Instant::now() > deadline {
                return Some((mapped, held));
            }
            std::thread::sleep(Duration::from_millis(100));
            status = self.agent.status().expect("status");
        }
    }

    /// CIDR mode: each held address (`vnic_of`, from `vcnpath status`, holders by address)
    /// must lie in a /[`BLOCK_PREFIX`] block OCI has on the VNIC the agent says, and no two
    /// live pods may have been given one address.
    fn pods_outside_blocks(
        &self,
        holders: &BTreeMap<Ipv4Addr, Vec<String>>,
        vnic_of: &BTreeMap<Ipv4Addr, String>,
        quarantined: &BTreeSet<Ipv4Addr>,
    ) -> Vec<String> {
        let objects = node_objects(&self.lab);
        let mut found = Vec::new();
        for (ip, vnic) in vnic_of.iter().filter(|(ip, _)| !quarantined.contains(ip)) {
            let who = &holders[ip];
            match objects.iter().find(|o| o.range.contains(ip)) {
                None => found.push(format!(
                    "{ip}, held for {who:?} on {vnic}, is in no private IP OCI has tagged for the node"
                )),
                Some(o) if o.range.prefix_len() != BLOCK_PREFIX => found.push(format!(
                    "{ip}, held for {who:?} on {vnic}, is {} at OCI ({} on {}), not inside a /{BLOCK_PREFIX} block",
                    o.range, o.id, o.vnic
                )),
                Some(o) if o.vnic != *vnic => found.push(format!(
                    "{ip}, held for {who:?} on {vnic}, lies in block {} ({}) of {} at OCI",
                    o.range, o.id, o.vnic
                )),
                Some(_) => {}
            }
        }
        let mut by_ip: BTreeMap<Ipv4Addr, Vec<&str>> = BTreeMap::new();
        for (id, pod) in &self.live {
            by_ip.entry(pod.ip).or_default().push(id);
        }
        for (ip, ids) in by_ip.iter().filter(|(_, ids)| ids.len() > 1) {
            let block = objects.iter().find(|o| o.range.contains(ip)).map_or_else(
                || "no block".to_owned(),
                |o| format!("block {} of {}", o.range, o.vnic),
            );
            found.push(format!("live pods {ids:?} were each given {ip} ({block})"));
        }
        found
    }

    /// CIDR mode, once the node has converged (no pod gone still held, cooldowns and the
    /// release delay over): OCI holds exactly the blocks the agent lists, VNIC by VNIC (none
    /// leaked by a create whose answer the kill cut off), and no more of them than
    /// [`block_bound`] allows. Waits up to `within` for both, then books what still differs.
    fn check_converged_blocks(&mut self, round: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let found = self.block_excess();
            if found.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                for what in found {
                    self.violation(round, &format!("after converging for {within:?}: {what}"));
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// What [`Self::check_converged_blocks`] finds wrong now.
    fn block_excess(&self) -> Vec<String> {
        let status = self.agent.status().expect("status");
        let objects = node_objects(&self.lab);
        let mut found = Vec::new();
        let mut at_oci: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for o in &objects {
            at_oci
                .entry(&o.vnic)
                .or_default()
                .insert(o.range.to_string());
        }
        let mut listed: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for v in status["vnics"].as_array().expect("vnics") {
            let blocks = v["blocks"]
                .as_array()
                .expect("blocks")
                .iter()
                .filter_map(|b| b.as_str().map(str::to_owned));
            listed
                .entry(v["vnic_id"].as_str().expect("vnic_id"))
                .or_default()
                .extend(blocks);
        }
        let vnics: BTreeSet<&str> = at_oci.keys().chain(listed.keys()).copied().collect();
        for vnic in vnics {
            let (oci, agent) = (
                at_oci.get(vnic).cloned().unwrap_or_default(),
                listed.get(vnic).cloned().unwrap_or_default(),
            );
            let leaked: Vec<&String> = oci.difference(&agent).collect();
            let missing: Vec<&String> = agent.difference(&oci).collect();
            if !leaked.is_empty() || !missing.is_empty() {
                found.push(format!(
                    "on {vnic} OCI has blocks {oci:?}, the agent lists {agent:?}: at OCI only (leaked) {leaked:?}, listed only {missing:?}"
                ));
            }
        }
        let live: Vec<Ipv4Addr> = self.live.values().map(|p| p.ip).collect();
        let occupancy: Vec<(String, usize)> = objects
            .iter()
            .map(|o| {
                (
                    format!("{} on {}", o.range, o.vnic),
                    live.iter().filter(|ip| o.range.contains(*ip)).count(),
                )
            })
            .collect();
        let with_pods = occupancy.iter().filter(|(_, n)| *n > 0).count();
        let bound = block_bound(live.len(), with_pods);
        if objects.len() > bound {
            found.push(format!(
                "OCI holds {} blocks for {} live pods and a warm target of {BLOCK_WARM} at {BLOCK_SIZE} addresses a block: at most {bound} (the {with_pods} blocks holding a live pod, or {} for pods and warm target together, whichever is more); blocks with their live pods: {occupancy:?}",
                objects.len(),
                live.len(),
                (live.len() + BLOCK_WARM).div_ceil(BLOCK_SIZE)
            ));
        }
        found
    }

    /// Prints the case's figures (the rounds took `rounds`, the final convergence and checks
    /// `converging`) and fails with every violation.
    fn report(&self, rounds: Duration, converging: Duration) {
        let kills = &self.kill_points_ms;
        let line = format!(
            "fault suite {:?} (seed {}): {} rounds, {} kill -9 points ({}..{} ms into the burst), {} ADDs and {} DELs served, {} pods live at the end, at most {} addresses held within the GC grace for pods gone, violations: {}; rounds {:.1} s, convergence {:.1} s",
            self.trouble,
            self.seed,
            self.rounds(),
            kills.len(),
            kills.iter().min().unwrap_or(&0),
            kills.iter().max().unwrap_or(&0),
            self.adds,
            self.dels,
            self.live.len(),
            self.pending_seen,
            self.violations.len(),
            rounds.as_secs_f64(),
            converging.as_secs_f64()
        );
        let line = if self.trouble == Trouble::CidrBlocks {
            format!(
                "{line}; {} blocks seen at OCI after the rounds, {} of them deleted by a later one; {} kills landed while a CreatePrivateIp was under way, {} while a DeletePrivateIp was",
                self.blocks_seen.len(),
                self.blocks_gone.len(),
                self.kills_in_create,
                self.kills_in_delete
            )
        } else {
            line
        };
        eprintln!("{line}");
        for v in &self.violations {
            eprintln!("{:?} (seed {}) violation {v}", self.trouble, self.seed);
        }
        // `cargo xtask test` prints these after the lab tier (a passing test's output is
        // captured); the agent's logs of every start stay beside them.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fault-suite");
        // (not among the figures, which xtask prints whole).
        let logs = dir.with_file_name("fault-suite-logs");
        let log = logs.join(format!("{:?}-agent.log", self.trouble));
        let _ = std::fs::create_dir_all(&dir).and_then(|()| {
            std::fs::write(
                dir.join(format!("{:?}.txt", self.trouble)),
                format!("{line}\n"),
            )
        });
        let _ = std::fs::create_dir_all(&logs)
            .and_then(|()| std::fs::write(&log, self.agent.all_logs()));
        if self.violations.is_empty() {
            return;
        }
        let latest = self.agent.latest_log();
        let tail: Vec<&str> = latest.lines().rev().take(60).collect();
        panic!(
            "{:?} (seed {}, VCNPATH_FAULT_SEED={} replays it): {} violations:\n{}\n\nthe latest agent's last {} log lines (every start's log: {}):\n{}",
            self.trouble,
            self.seed,
            self.seed,
            self.violations.len(),
            self.violations.join("\n"),
            tail.len(),
            log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
}

impl Suite {
    /// With the state directory still unwritable after the restart: the agent serves, says
    /// it is not ready and why, and refuses a new pod with the reason, leaving the pod's
    /// namespace as it was and holding nothing for it.
    fn while_unwritable(&mut self, round: usize, trouble: &StateDirTrouble) {
        let reason = "the state directory is not writable";
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            let status = self.agent.status().expect("status");
            let says = status["not_ready"].as_array().is_some_and(|p| {
                p.iter()
                    .any(|p| p.as_str().is_some_and(|p| p.starts_with(reason)))
            });
            if says || Instant::now() > deadline {
                break status;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        if status["ready"] != false || !status["not_ready"].to_string().contains(reason) {
            self.violation(
                round,
                &format!(
                    "with the state directory {}, status says ready {} / {}",
                    trouble.what(),
                    status["ready"],
                    status["not_ready"]
                ),
            );
        }
        let (id, ns) = self.new_pod();
        let out = cni(
            self.lab.lab().node(),
            &self.agent.socket(),
            "ADD",
            &id,
            Some(ns.path()),
        );
        match out {
            Ok(o) if o.ok => {
                self.violation(
                    round,
                    &format!(
                        "ADD {id} succeeded with the state directory {}: {}",
                        trouble.what(),
                        o.json
                    ),
                );
                if let Some(ip) = o.ip() {
                    self.live.insert(id, Pod { ns, ip });
                }
                return;
            }
            Ok(o) => {
                let msg = o.json.to_string();
                if !msg.contains(trouble.cause()) || !msg.contains("state") {
                    self.violation(round, &format!("the refused ADD does not say why: {msg}"));
                }
            }
            Err(e) => self.violation(round, &format!("ADD {id}: {e:#}")),
        }
        if ns
            .ip(&["-j", "addr", "show"])
            .is_ok_and(|a| a.contains("\"eth0\""))
        {
            self.violation(round, &format!("the refused ADD left eth0 in {id}"));
        }
    }

    /// Once the state directory takes writes again the agent says so within a few seconds.
    fn wait_writable(&mut self, round: usize) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let status = self.agent.status().expect("status");
            if !status["not_ready"].to_string().contains("state directory") {
                return;
            }
            if Instant::now() > deadline {
                self.violation(
                    round,
                    &format!(
                        "still not ready once the state directory is writable: {}",
                        status["not_ready"]
                    ),
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The secondary VNIC (by OCI's view) holding the most live pods' addresses.
    fn busiest_secondary_vnic(&self) -> Option<String> {
        let cloud = cloud_ips(&self.lab);
        let mut count: BTreeMap<&str, usize> = BTreeMap::new();
        for pod in self.live.values() {
            if let Some(vnic) = cloud.get(&pod.ip) {
                *count.entry(vnic.as_str()).or_default() += 1;
            }
        }
        count
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map(|(vnic, _)| vnic.to_owned())
    }
}

/// What happens to the state directory in a round of [`Trouble::StateDirUnwritable`].
enum StateDirTrouble {
    /// A file fills the tmpfs.
    Full(std::path::PathBuf),
    /// A read-only bind mount of the directory over itself (a superblock remount is refused
    /// while the agent holds its lock file open for writing).
    ReadOnly(std::path::PathBuf),
}

impl StateDirTrouble {
    fn for_round(dir: std::path::PathBuf, round: usize) -> Self {
        if round.is_multiple_of(2) {
            Self::Full(dir)
        } else {
            Self::ReadOnly(dir)
        }
    }

    fn what(&self) -> &'static str {
        match self {
            Self::Full(_) => "full",
            Self::ReadOnly(_) => "read-only",
        }
    }

    /// The OS error a write then meets, as the agent must report it.
    fn cause(&self) -> &'static str {
        match self {
            Self::Full(_) => "No space left on device",
            Self::ReadOnly(_) => "Read-only file system",
        }
    }

    fn start(&self) {
        match self {
            Self::Full(dir) => {
                use std::io::Write as _;
                let mut file = std::fs::File::create(dir.join("filler")).expect("filler");
                let chunk = vec![0u8; 64 * 1024];
                while file.write_all(&chunk).is_ok() {}
                // The last partial page too.
                while file.write_all(&[0]).is_ok() {}
            }
            Self::ReadOnly(dir) => {
                mounts::bind_read_only(dir).expect("a read-only state directory");
            }
        }
    }

    fn end(&self) {
        match self {
            Self::Full(dir) => std::fs::remove_file(dir.join("filler")).expect("remove filler"),
            Self::ReadOnly(dir) => {
                // Lazily: the agent holds its lock file open through this mount (the same
                // file, so the lock stays held).
                mounts::detach(dir).expect("the state directory writable again");
            }
        }
    }
}

/// Detaches `vnic_id` behind the agent's back (the simulator's admin API, as the console
/// would) and waits until its addresses are gone from OCI.
fn detach(lab: &SimLab, vnic_id: &str) {
    let snapshot = lab.sim().snapshot();
    let attachment = snapshot["attachments"]
        .as_array()
        .expect("attachments")
        .iter()
        .find(|a| a["vnicId"] == vnic_id)
        .and_then(|a| a["id"].as_str())
        .unwrap_or_else(|| panic!("{vnic_id} is attached"))
        .to_owned();
    admin(
        lab,
        reqwest::Method::DELETE,
        &format!("vnicAttachments/{attachment}"),
        Value::Null,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while cloud_ips(lab).values().any(|v| v == vnic_id) {
        assert!(
            Instant::now() < deadline,
            "{vnic_id} keeps its addresses after the detach"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Removes every freeform tag of the private IP with address `ip`, through the simulator's
/// admin API (what a person or Terraform drift does through the console).
fn strip_tags(lab: &SimLab, ip: Ipv4Addr) {
    let id = lab.sim().snapshot()["privateIps"]
        .as_array()
        .expect("privateIps")
        .iter()
        .find(|p| p["ipAddress"] == ip.to_string().as_str())
        .and_then(|p| p["id"].as_str())
        .unwrap_or_else(|| panic!("{ip} exists in OCI"))
        .to_owned();
    admin(
        lab,
        reqwest::Method::PUT,
        &format!("privateIps/{id}"),
        serde_json::json!({"freeformTags": {}}),
    );
}

/// One call of the simulator's admin API (`/admin/<path>`), from the lab's node namespace;
/// panics unless it succeeds.
fn admin(lab: &SimLab, method: reqwest::Method, path: &str, body: Value) {
    let url = format!("{}/admin/{path}", lab.sim().base_url());
    let status = lab.block_on(async move {
        let request = reqwest::Client::new().request(method, url);
        let request = if body.is_null() {
            request
        } else {
            request.json(&body)
        };
        request.send().await.map(|r| r.status())
    });
    assert!(
        status.as_ref().is_ok_and(reqwest::StatusCode::is_success),
        "admin {path}: {status:?}"
    );
}

/// The most blocks a converged CIDR-mode node may hold for `live` pods whose addresses lie in
/// `with_pods` blocks. A block goes back to OCI only whole, once every address in it has been
/// free for the release delay, and only while the node keeps `live` + [`BLOCK_WARM`]
/// addresses without it; pods are never moved, so each block holding a live pod stays. If
/// any block holds no pod, no more could be released: all blocks minus one hold fewer
/// addresses than pods plus warm target, so there are at most ⌈(live + warm) / size⌉. If
/// every block holds a pod, there are `with_pods`.
fn block_bound(live: usize, with_pods: usize) -> usize {
    with_pods.max((live + BLOCK_WARM).div_ceil(BLOCK_SIZE))
}
/// Kills the agent a moment `into_create` after the burst's first block create reached OCI
/// (or [`AIM_WINDOW`] into the burst if none comes by then): when the kill landed, counted from
/// the burst, and whether a create was under way.
fn kill_in_first_create(
    lab: &SimLab,
    agent: &mut NodeAgent,
    into_create: Duration,
) -> (Duration, bool) {
    let creates = || {
        lab.sim()
            .calls()
            .get("CreatePrivateIp")
            .copied()
            .unwrap_or(0)
    };
    let (before, burst) = (creates(), Instant::now());
    let mut in_create = false;
    while burst.elapsed() < AIM_WINDOW {
        if creates() > before {
            std::thread::sleep(into_create);
            in_create = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let killed_at = burst.elapsed();
    agent.kill9().expect("kill -9");
    (killed_at, in_create)
}

/// Kills the agent `kill_at` into the burst; the state directory's trouble starts halfway
/// there. Whether a block create and a block delete were under way when the kill landed: the
/// operations that reached OCI within one create's latency of it.
fn kill_after(
    lab: &SimLab,
    agent: &mut NodeAgent,
    kill_at: Duration,
    unwritable: Option<&StateDirTrouble>,
) -> (bool, bool) {
    let halfway = kill_at / 2;
    let in_flight_from = kill_at.saturating_sub(CREATE_LATENCY);
    let mut calls_before = None;
    let mut at = Duration::ZERO;
    let mut steps = [(in_flight_from, false), (halfway, true)];
    steps.sort();
    for (when, trouble_starts) in steps {
        std::thread::sleep(when.saturating_sub(at));
        at = at.max(when);
        if trouble_starts {
            if let Some(trouble) = unwritable {
                trouble.start();
            }
        } else {
            calls_before = Some(lab.sim().calls());
        }
    }
    std::thread::sleep(kill_at.saturating_sub(at));
    let calls_before = calls_before.unwrap_or_default();
    let calls_at_kill = lab.sim().calls();
    agent.kill9().expect("kill -9");
    let under_way = |op: &str| {
        calls_at_kill.get(op).copied().unwrap_or(0) > calls_before.get(op).copied().unwrap_or(0)
    };
    (under_way("CreatePrivateIp"), under_way("DeletePrivateIp"))
}
/// The pods `vcnpath status` lists, by address: who holds each (container id, and the
/// interface when it is not eth0) and on which VNIC.
/// The addresses `vcnpath status` lists as quarantined (their pods' VNIC detached).
fn quarantined_of(status: &Value) -> BTreeSet<Ipv4Addr> {
    status["pool"]["quarantined"]
        .as_array()
        .expect("quarantined")
        .iter()
        .filter_map(|q| q["ip"].as_str()?.parse().ok())
        .collect()
}

fn holders_of(status: &Value) -> (BTreeMap<Ipv4Addr, Vec<String>>, BTreeMap<Ipv4Addr, String>) {
    let mut holders: BTreeMap<Ipv4Addr, Vec<String>> = BTreeMap::new();
    let mut vnic_of: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    for p in status["pods"].as_array().expect("pods") {
        let ip: Ipv4Addr = p["ip"].as_str().and_then(|s| s.parse().ok()).expect("ip");
        holders.entry(ip).or_default().push(format!(
            "{}{}",
            p["container_id"].as_str().unwrap_or_default(),
            p["ifname"]
                .as_str()
                .filter(|i| !i.is_empty() && *i != "eth0")
                .map(|i| format!(" via {i}"))
                .unwrap_or_default()
        ));
        vnic_of.insert(ip, p["vnic"].as_str().unwrap_or_default().to_owned());
    }
    (holders, vnic_of)
}

/// One private-IP object tagged for the lab's instance, as the simulator holds it.
struct CloudObject {
    id: String,
    vnic: String,
    /// Its addresses: a /32 for a single private IP.
    range: ipnet::Ipv4Net,
}

/// The secondary private-IP objects tagged for the node (the agent's), from the simulator.
fn node_objects(lab: &SimLab) -> Vec<CloudObject> {
    let instance = lab.sim().config().instance_id;
    lab.sim().snapshot()["privateIps"]
        .as_array()
        .expect("privateIps")
        .iter()
        .filter(|p| {
            p["isPrimary"] != true
                && p["freeformTags"][vcnpath::ipam::NODE_TAG].as_str() == Some(instance.as_str())
        })
        .map(|p| CloudObject {
            id: p["id"].as_str().unwrap_or_default().to_owned(),
            vnic: p["vnicId"].as_str().unwrap_or_default().to_owned(),
            range: private_ip_range(p).unwrap_or_else(|e| panic!("simulator snapshot: {e:#}")),
        })
        .collect()
}

/// Whether a Core API operation changes OCI.
fn mutates(op: &str) -> bool {
    ["Create", "Delete", "Attach", "Detach", "Update", "Bulk"]
        .iter()
        .any(|verb| op.starts_with(verb))
}

/// The pod addresses the node routes through `vcn…` veths (`ip -j route`).
fn routed_pod_ips(node: &Netns) -> BTreeSet<Ipv4Addr> {
    let json: Value =
        serde_json::from_str(&node.ip(&["-j", "route", "show"]).expect("ip route")).expect("json");
    json.as_array()
        .expect("routes")
        .iter()
        .filter(|r| r["dev"].as_str().is_some_and(|d| d.starts_with("vcn")))
        .filter_map(|r| r["dst"].as_str()?.parse().ok())
        .collect()
}

/// The checkpoint with its second pod given the first pod's address, if it has two.
fn two_pods_on_one_address(good: &[u8]) -> Option<Vec<u8>> {
    let mut file: Value = serde_json::from_slice(good).ok()?;
    let allocations = file["allocations"].as_array_mut()?;
    if allocations.len() < 2 {
        return None;
    }
    let first = allocations[0]["allocation"]["ip"].clone();
    allocations[1]["allocation"]["ip"] = first;
    serde_json::to_vec(&file).ok()
}

fn run(trouble: Trouble, tag: &str, test: &str) {
    if !have_root(test) {
        return;
    }
    let mut suite = Suite::new(trouble, tag);
    let start = Instant::now();
    for round in 0..suite.rounds() {
        suite.round(round);
    }
    let rounds = start.elapsed();
    suite.final_check();
    suite.report(rounds, start.elapsed().saturating_sub(rounds));
}

#[test]
fn faults_lab_faults_after_commit_and_kill_9_lose_and_duplicate_nothing() {
    run(
        Trouble::FaultsAfterCommit,
        "flt-commit",
        "faults_lab_faults_after_commit_and_kill_9_lose_and_duplicate_nothing",
    );
}

#[test]
fn faults_lab_stale_lists_and_kill_9_lose_and_duplicate_nothing() {
    run(
        Trouble::StaleLists,
        "flt-stale",
        "faults_lab_stale_lists_and_kill_9_lose_and_duplicate_nothing",
    );
}

#[test]
fn faults_lab_a_deleted_checkpoint_and_kill_9_lose_and_duplicate_nothing() {
    run(
        Trouble::CheckpointDeleted,
        "flt-ckdel",
        "faults_lab_a_deleted_checkpoint_and_kill_9_lose_and_duplicate_nothing",
    );
}

#[test]
fn faults_lab_a_broken_checkpoint_is_refused_and_kill_9_loses_nothing() {
    run(
        Trouble::CheckpointBroken,
        "flt-ckbad",
        "faults_lab_a_broken_checkpoint_is_refused_and_kill_9_loses_nothing",
    );
}

#[test]
fn faults_lab_a_second_agent_and_kill_9_lose_and_duplicate_nothing() {
    run(
        Trouble::SecondAgent,
        "flt-second",
        "faults_lab_a_second_agent_and_kill_9_lose_and_duplicate_nothing",
    );
}

#[test]
fn faults_lab_stripped_tags_and_kill_9_lose_and_duplicate_nothing() {
    run(
        Trouble::TagsStripped,
        "flt-tags",
        "faults_lab_stripped_tags_and_kill_9_lose_and_duplicate_nothing",
    );
}

#[test]
fn faults_lab_a_vnic_detached_behind_the_agents_back_and_kill_9_lose_and_duplicate_nothing() {
    run(
        Trouble::VnicDetached,
        "flt-detach",
        "faults_lab_a_vnic_detached_behind_the_agents_back_and_kill_9_lose_and_duplicate_nothing",
    );
}

#[test]
fn faults_lab_concurrent_adds_of_one_container_and_kill_9_lose_nothing() {
    run(
        Trouble::SameContainerAdds,
        "flt-same",
        "faults_lab_concurrent_adds_of_one_container_and_kill_9_lose_nothing",
    );
}

#[test]
fn faults_lab_a_full_or_read_only_state_dir_and_kill_9_lose_and_duplicate_nothing() {
    run(
        Trouble::StateDirUnwritable,
        "flt-state",
        "faults_lab_a_full_or_read_only_state_dir_and_kill_9_lose_and_duplicate_nothing",
    );
}

#[test]
fn faults_lab_cidr_blocks_created_and_deleted_under_kill_9_lose_and_duplicate_nothing() {
    run(
        Trouble::CidrBlocks,
        "flt-cidr",
        "faults_lab_cidr_blocks_created_and_deleted_under_kill_9_lose_and_duplicate_nothing",
    );
}
