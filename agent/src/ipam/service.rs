//! `Ipam`: answers allocations from the pool at once, checkpoints them before handing them out,
//! and leaves every cloud call to background tasks (the grower and the reconcile). It starts
//! from its checkpoint alone: the restored pods are served (and steered) at once, while the
//! first reconcile with OCI runs in the background, retried until OCI answers.
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use serde::Serialize;
use tokio::sync::{Mutex, Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::oci::models::Tags;

use super::checkpoint::{self, Checkpoint, Entry, Restored};
use super::cloud::Cloud;
use super::config::{IpamConfig, NODE_TAG};
use super::error::IpamError;
use super::holders::{self, HostHolder};
use super::pool::{Pool, PoolConfig, Slot, SlotState, later};
use super::release::release_locked;
use super::state::{Inner, Quarantined, State, wall_clock};
use super::trouble::OciTrouble;
use super::types::{AllocError, Allocation, Allocator, BoxFuture, PodRef};
use super::{gc, grow, reconcile};

/// Per-VNIC numbers for `vcnpath status` and the metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VnicStatus {
    pub vnic_id: String,
    /// OCI's `isPrimary`: the VNIC the OS image configures; every other one is set up by
    /// the agent.
    pub is_primary: bool,
    /// The physical NIC (0 for every VNIC of a VM).
    pub nic_index: u32,
    /// The attachment's VLAN tag (on bare metal, the VLAN carrying the VNIC on its NIC).
    pub vlan_tag: u32,
    pub mac: String,
    pub interface: Option<String>,
    pub subnet: Ipv4Net,
    pub primary_ip: Ipv4Addr,
    pub free: usize,
    pub assigned: usize,
    pub cooldown: usize,
    /// The IP CIDR blocks the VNIC holds (each one private-IP object in OCI).
    pub blocks: Vec<Ipv4Net>,
    /// Private-IP objects OCI counts against the VNIC's limit: each block once, each single
    /// address once.
    pub objects: usize,
    pub full: bool,
    /// OCI answered 404 for the VNIC at the last reconcile (detached, or not visible to the
    /// node's policy), or its interface has just vanished: its pods keep their addresses,
    /// but it serves no new pod until a reconcile reads it again.
    pub suspect: bool,
    /// Where the VNIC's interface stands on the host.
    pub link: LinkState,
}

/// A VNIC's interface on the host, as the pool sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    /// Set up; the VNIC serves pods.
    Up,
    /// Not found yet (a VNIC just attached): host setup is looking for it.
    Awaited,
    /// The host had it and lost it: the VNIC serves no new pod, and its free addresses do
    /// not count towards the pool's targets, until the interface is found again.
    Lost,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IpamStatus {
    /// Whether the pool has been reconciled with OCI since the agent started (until then
    /// only the checkpointed pods are served).
    pub reconciled: bool,
    pub capacity: usize,
    pub allocations: usize,
    pub vnics: Vec<VnicStatus>,
    /// Pods whose address is on no VNIC of the node (detached or moved away behind the
    /// agent's back): their addresses go to nobody else while they live.
    pub quarantined: Vec<Quarantined>,
    /// Allocations the GC released since the start because their host side was gone.
    pub gc_released: u64,
    /// Allocations released since the start by a runtime's CNI GC (not in its valid
    /// attachments).
    pub cni_gc_released: u64,
    /// The OCI calls that keep failing now, those an operator must act on first.
    pub oci: Vec<OciTrouble>,
    /// Addresses held for pods the node runs but the checkpoint did not list (recovered
    /// from their veths and the pinned `endpoints` map at start; named `recovered:<ip>`
    /// among the pods).
    pub recovered: usize,
}

/// The node's address manager. Dropping it stops its background tasks.
pub struct Ipam {
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Ipam {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Ipam {
    /// Restores the checkpoint (its pods and their VNICs) and returns at once; a background task
    /// reconciles with OCI — retried with capped backoff while OCI fails — and then runs the
    /// grower and the periodic reconcile. A corrupt checkpoint stops the start: it is the only
    /// record of which pod holds which address.
    pub fn start(cloud: Arc<dyn Cloud>, cfg: IpamConfig) -> Result<Self, IpamError> {
        Self::start_with_host(cloud, cfg, &[])
    }

    /// [`Self::start`], holding first every address `host` shows in use that the checkpoint
    /// does not (a lost or stale checkpoint): see [`holders`](super::holders).
    pub fn start_with_host(
        cloud: Arc<dyn Cloud>,
        cfg: IpamConfig,
        host: &[HostHolder],
    ) -> Result<Self, IpamError> {
        if cfg.pool.ips_per_vnic == 0 || cfg.parallel_calls == 0 {
            return Err(IpamError::Config {
                reason: "ips_per_vnic and parallel_calls must be at least 1".into(),
            });
        }
        let checkpoint = Checkpoint::new(&cfg.checkpoint_path);
        let restored = checkpoint.load()?;
        if restored.dropped_by_reboot > 0 {
            tracing::warn!(
                pods = restored.dropped_by_reboot,
                checkpoint = %cfg.checkpoint_path.display(),
                "the node rebooted since the checkpoint was written: its pods are gone, their addresses return to the pool"
            );
        }
        let lost = !restored.found && cfg.earlier_agent_this_boot;
        let mut state = restore(restored, &cfg);
        if lost {
            tracing::warn!(
                checkpoint = %cfg.checkpoint_path.display(),
                cooldown_secs = cfg.pool.cooldown.as_secs(),
                "the checkpoint is missing although an agent ran on this node since boot (deleted or lost): the record of cooling addresses is gone, so every free address rests a whole cooldown before a new pod gets it"
            );
            state.unrecorded_release =
                Some((later(Instant::now(), cfg.pool.cooldown), wall_clock()));
        }
        let recovered = holders::hold(&mut state, host, cfg.mtu);
        if !recovered.is_empty() {
            tracing::warn!(
                addresses = recovered.len(),
                checkpoint = %cfg.checkpoint_path.display(),
                "the checkpoint lacks pods the node runs (lost, deleted or stale): their addresses are held for them until their veths are gone"
            );
        }
        let tags = Tags::from([(NODE_TAG.to_owned(), cfg.instance_id.clone())]);
        let inner = Arc::new(Inner {
            cloud,
            checkpoint,
            state: Mutex::new(state),
            ops: Mutex::new(()),
            wake: Notify::new(),
            reconcile_now: Notify::new(),
            tags,
            reconciled: watch::Sender::new(false),
            vnic_added: Notify::new(),
            moved: Notify::new(),
            deleted: std::sync::Mutex::default(),
            adds: std::sync::Mutex::default(),
            missing: std::sync::Mutex::default(),
            gc_released: std::sync::atomic::AtomicU64::new(0),
            cni_gc_released: std::sync::atomic::AtomicU64::new(0),
            troubles: super::trouble::Troubles::default(),
            checkpoint_failing: std::sync::Mutex::new(None),
            cfg,
        });
        let background = tokio::spawn(background(inner.clone()));
        Ok(Self {
            inner,
            tasks: vec![background],
        })
    }

    /// Whether the background task (first reconcile, then the grower and the periodic
    /// reconcile) is still running: it ends only by a panic.
    pub fn background_running(&self) -> bool {
        self.tasks.iter().all(|task| !task.is_finished())
    }

    /// Waits until a VNIC joins the pool (attached by the grower) or the reconcile
    /// finished, whichever comes first since the last call: its interface can be set up.
    pub async fn vnic_added(&self) {
        self.inner.vnic_added.notified().await;
    }

    /// Waits until a pod's address moved to another VNIC outside an ADD or a DEL (see
    /// `Inner::moved`): the datapath must be synced.
    pub async fn pods_moved(&self) {
        self.inner.moved.notified().await;
    }

    /// Waits until the first reconcile with OCI has built the pool.
    pub async fn reconciled(&self) {
        let mut rx = self.inner.reconciled.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    /// Whether the pool knows the VNIC of every allocation (a version 1 checkpoint lists none).
    pub async fn knows_every_pods_vnic(&self) -> bool {
        let state = self.inner.state.lock().await;
        state
            .allocations
            .values()
            .all(|e| state.pool.vnic(&e.allocation.vnic_id).is_some())
    }

    /// Sets the subnets for new VNICs when they are learned after the start (the default,
    /// the primary VNIC's subnet, and `subnet_tag` need OCI); until then no VNIC is attached.
    pub async fn set_subnets(&self, subnets: Vec<String>) {
        let mut state = self.inner.state.lock().await;
        if state.pool.subnets.as_ref() != Some(&subnets) {
            tracing::info!(?subnets, "subnets for new VNICs");
            state.pool.subnets = Some(subnets);
            self.inner.wake.notify_one();
        }
    }

    /// Compares the checkpoint and the pool with OCI and repairs the difference.
    pub async fn reconcile(&self) -> Result<(), IpamError> {
        reconcile::run(&self.inner).await
    }

    /// Waits for the cloud work in flight (a growth step, a reconcile) to finish and holds off
    /// the next while the guard lives: for shutdown, and for checks that need a still pool.
    pub async fn quiesce(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.inner.ops.lock().await
    }

    /// Host setup found the VNIC with this MAC as `interface`; its addresses become usable.
    /// Its pods' allocations name the interface too (an allocation that followed its
    /// address to this VNIC, or was recovered, may have known none).
    pub async fn set_interface(&self, mac: &str, interface: &str) -> bool {
        let mut state = self.inner.state.lock().await;
        let known = state.pool.set_interface(mac, interface);
        let vnic_id = state
            .pool
            .vnics()
            .iter()
            .find(|v| v.info.mac.eq_ignore_ascii_case(mac))
            .map(|v| v.info.id.clone());
        if let Some(vnic_id) = vnic_id {
            for entry in state.allocations.values_mut() {
                if entry.allocation.vnic_id == vnic_id && entry.allocation.interface != interface {
                    interface.clone_into(&mut entry.allocation.interface);
                }
            }
        }
        drop(state);
        self.inner.wake.notify_one();
        known
    }

    /// One pass of the allocation GC against what `host` shows: an allocation whose host
    /// side has been missing for [`IpamConfig::allocation_gc_grace`] is released (see
    /// [`gc`](super::gc)). Returns the pods released.
    pub async fn collect_unattached(&self, host: &dyn gc::HostView) -> Vec<PodRef> {
        gc::collect(&self.inner, host).await
    }

    /// A runtime's CNI GC: releases every allocation whose attachment (container id,
    /// interface) is not in `valid`, except one whose ADD is running or began within
    /// [`IpamConfig::allocation_gc_grace`] (see [`gc`](super::gc)). Returns what it released.
    pub async fn collect_not_listed(
        &self,
        valid: &std::collections::BTreeSet<checkpoint::Key>,
    ) -> Vec<(PodRef, Allocation)> {
        let span = tracing::info_span!("cni_gc", valid = valid.len());
        let (inner, valid) = (self.inner.clone(), valid.clone());
        // To completion in a task of its own, like a release.
        match tokio::spawn(
            async move { gc::collect_not_listed(&inner, &valid).await }.instrument(span),
        )
        .await
        {
            Ok(released) => released,
            Err(error) => {
                tracing::error!(%error, "the CNI GC task failed");
                Vec::new()
            }
        }
    }

    /// The host saw the VNIC's interface vanish (or something else says it is gone): its
    /// addresses are handed out no more, from now, and a reconcile is run at once to learn
    /// what OCI has (it quarantines the VNIC's pods if it was detached, or takes it back).
    pub async fn vnic_vanished(&self, vnic_id: &str) {
        let known = {
            let mut state = self.inner.state.lock().await;
            // Host setup finds the interface again (and says so) if it comes back.
            if let Some(v) = state.pool.vnic_mut(vnic_id) {
                v.info.interface = None;
                v.interface_lost = true;
            }
            state.pool.mark_suspect(vnic_id)
        };
        if known {
            tracing::warn!(
                vnic = vnic_id,
                "the VNIC's interface vanished; its addresses are handed out no more until the reconcile has looked"
            );
            self.inner.reconcile_now.notify_one();
        }
    }

    /// An address for `pod`, checkpointed before it is returned. The change runs in a task of
    /// its own, to completion (checkpoint written or rolled back) even if the caller goes
    /// away: a plugin that disconnects mid-ADD cannot leave memory and file apart.
    pub async fn allocate(&self, pod: &PodRef) -> Result<Allocation, AllocError> {
        if pod.container_id.is_empty() || pod.ifname.is_empty() {
            return Err(AllocError::Invalid {
                reason: "container id and interface name are required".into(),
            });
        }
        let span = tracing::info_span!("allocate", container_id = %pod.container_id, ifname = %pod.ifname, namespace = pod.namespace.as_deref(), pod = pod.name.as_deref());
        let (inner, pod) = (self.inner.clone(), pod.clone());
        owned(tokio::spawn(
            async move { allocate(&inner, &pod).await }.instrument(span),
        ))
        .await
    }

    /// Frees the address of `pod` into its cooldown; like [`Ipam::allocate`] the change runs
    /// to completion in a task of its own. Every DEL leaves a tombstone: an ADD for the same
    /// attachment arriving within [`IpamConfig::tombstone_grace`] (a DEL that raced ahead of
    /// a slow ADD) is refused rather than allocated and leaked.
    pub async fn release(&self, pod: &PodRef) -> Result<Option<Allocation>, AllocError> {
        let span =
            tracing::info_span!("release", container_id = %pod.container_id, ifname = %pod.ifname);
        let (inner, pod) = (self.inner.clone(), pod.clone());
        owned(tokio::spawn(
            async move { release(&inner, &pod).await }.instrument(span),
        ))
        .await
    }

    /// A DEL for an attachment the checkpoint did not list, whose host veth is `veth`:
    /// releases the recovered allocation routed through that veth, if there is one (the
    /// runtime says that pod is gone).
    pub async fn release_recovered(&self, veth: &str) -> Result<Option<Allocation>, AllocError> {
        let inner = self.inner.clone();
        let veth = veth.to_owned();
        owned(tokio::spawn(async move {
            let mut state = inner.state.lock().await;
            let pod = state
                .allocations
                .values()
                .find(|e| holders::recovered_veth(&e.pod) == Some(veth.as_str()))
                .map(|e| e.pod.clone());
            match pod {
                Some(pod) => release_locked(&inner, &mut state, &pod).await,
                None => Ok(None),
            }
        }))
        .await
    }

    /// Holds, as at start, every address of `host` no allocation holds (see
    /// [`holders`](super::holders)); the checkpoint records them. Returns how many.
    pub async fn hold_host(&self, host: &[HostHolder]) -> Result<usize, AllocError> {
        let inner = self.inner.clone();
        let host = host.to_vec();
        owned(tokio::spawn(async move {
            let mut state = inner.state.lock().await;
            let held = holders::hold(&mut state, &host, inner.cfg.mtu);
            if !held.is_empty() {
                inner.save(&state).await?;
            }
            Ok(held.len())
        }))
        .await
    }

    /// An ADD of the attachment whose host veth is `veth`: a recovered allocation routed
    /// through it becomes `pod`'s (see [`holders`](super::holders)), so the ADD answers with
    /// the address the pod already has.
    pub async fn adopt_recovered(&self, veth: &str, pod: &PodRef) -> Result<(), AllocError> {
        let inner = self.inner.clone();
        let (veth, pod) = (veth.to_owned(), pod.clone());
        owned(tokio::spawn(async move {
            let mut state = inner.state.lock().await;
            if holders::adopt(&mut state, &veth, &pod) {
                inner.save(&state).await?;
            }
            Ok(())
        }))
        .await
    }

    pub async fn lookup(&self, pod: &PodRef) -> Option<Allocation> {
        lookup(&self.inner, pod).await
    }

    /// Every allocation, as checkpointed.
    pub async fn allocations(&self) -> Vec<(PodRef, Allocation)> {
        let state = self.inner.state.lock().await;
        state
            .allocations
            .values()
            .map(|e| (e.pod.clone(), e.allocation.clone()))
            .collect()
    }

    pub async fn status(&self) -> IpamStatus {
        let state = self.inner.state.lock().await;
        let vnics = state
            .pool
            .vnics()
            .iter()
            .map(|v| VnicStatus {
                vnic_id: v.info.id.clone(),
                is_primary: v.info.is_primary,
                nic_index: v.info.nic_index,
                vlan_tag: v.info.vlan_tag,
                mac: v.info.mac.clone(),
                interface: v.info.interface.clone(),
                subnet: v.info.subnet,
                primary_ip: v.info.primary_ip,
                free: v.count(|s| matches!(s, SlotState::Free { .. })),
                assigned: v.count(|s| matches!(s, SlotState::Assigned(_))),
                cooldown: v.count(|s| matches!(s, SlotState::Cooldown { .. })),
                blocks: v.blocks(),
                objects: v.objects(),
                full: v.full,
                suspect: v.suspect,
                link: match (&v.info.interface, v.interface_lost) {
                    (Some(_), _) => LinkState::Up,
                    (None, true) => LinkState::Lost,
                    (None, false) => LinkState::Awaited,
                },
            })
            .collect();
        IpamStatus {
            reconciled: *self.inner.reconciled.borrow(),
            capacity: self.inner.cfg.pool.capacity(),
            allocations: state.allocations.len(),
            vnics,
            quarantined: state.quarantined(),
            gc_released: self
                .inner
                .gc_released
                .load(std::sync::atomic::Ordering::Relaxed),
            cni_gc_released: self
                .inner
                .cni_gc_released
                .load(std::sync::atomic::Ordering::Relaxed),
            oci: self.inner.troubles.list(Instant::now()),
            recovered: state
                .allocations
                .values()
                .filter(|e| holders::is_recovered(&e.pod))
                .count(),
        }
    }
}

/// The result of a change run in its own task.
async fn owned<T>(task: JoinHandle<Result<T, AllocError>>) -> Result<T, AllocError> {
    task.await.unwrap_or_else(|join| {
        Err(AllocError::Checkpoint {
            reason: format!("the allocation task failed: {join}"),
        })
    })
}

async fn lookup(inner: &Inner, pod: &PodRef) -> Option<Allocation> {
    let state = inner.state.lock().await;
    state
        .allocations
        .get(&checkpoint::key(pod))
        .map(|e| e.allocation.clone())
}

/// Whether the attachment's DEL was served within the grace period.
fn just_deleted(inner: &Inner, key: &checkpoint::Key) -> Option<std::time::Duration> {
    let deleted = inner
        .deleted
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let at = deleted.get(key)?;
    let ago = at.elapsed();
    (ago < inner.cfg.tombstone_grace).then_some(ago)
}

async fn allocate(inner: &Inner, pod: &PodRef) -> Result<Allocation, AllocError> {
    let key = checkpoint::key(pod);
    // Registered before anything else, so the allocation GC never takes an attachment whose
    // ADD is running (or just answered: its plugin is still creating the veth).
    let _add = gc::AddInProgress::start(inner, &key);
    if let Some(ago) = just_deleted(inner, &key) {
        tracing::warn!(
            ago_ms = ago.as_millis() as u64,
            "ADD for an attachment deleted a moment ago; refused"
        );
        return Err(AllocError::Invalid {
            reason: format!(
                "container {} interface {} was deleted {} ms ago; a late ADD for it is refused (use a new sandbox)",
                key.0,
                key.1,
                ago.as_millis()
            ),
        });
    }
    if !*inner.reconciled.borrow() {
        // Restored pods are answered from the checkpoint; a new pod needs the pool, which
        // the first reconcile builds: wait for it a while rather than refuse at once.
        if let Some(allocation) = lookup(inner, pod).await {
            return Ok(allocation);
        }
        let mut rx = inner.reconciled.subscribe();
        let waited = tokio::time::timeout(inner.cfg.startup_wait, rx.wait_for(|done| *done));
        if waited.await.is_err() {
            tracing::info!("IPAM has not reconciled with OCI yet; the pod is asked to retry");
            // Until a reconcile attempt has failed (a call retries within its budget first),
            // the reason is that the first one is still running.
            let cause = inner.troubles.summary(Instant::now()).unwrap_or_else(|| {
                "the first reconcile with OCI has not finished yet (`vcnpath status` shows what fails)".to_owned()
            });
            return Err(AllocError::PoolEmpty {
                retry_after_ms: inner.cfg.retry_after.as_millis() as u64,
                cause: Some(cause),
            });
        }
    }
    let mut state = inner.state.lock().await;
    if let Some(entry) = state.allocations.get(&key) {
        return Ok(entry.allocation.clone());
    }
    let picked = state
        .pool
        .pick_free(inner.cfg.require_interface)
        .map(|(vnic, ip)| {
            let info = &vnic.info;
            let entry = Entry {
                pod: pod.clone(),
                allocation: Allocation {
                    ip,
                    vnic_id: info.id.clone(),
                    interface: info.interface.clone().unwrap_or_default(),
                    subnet: info.subnet,
                    router_ip: info.router_ip,
                    mtu: inner.cfg.mtu,
                },
                ip_id: vnic.ips[&ip].ocid.clone(),
                block: vnic.ips[&ip].block,
            };
            (entry, vnic.ips[&ip].state.clone())
        });
    // Whatever happens, the pool may now be below its targets.
    inner.wake.notify_one();
    let Some((entry, previous)) = picked else {
        let exhausted = state.pool.is_exhausted(&inner.cfg.pool, Instant::now());
        if !exhausted {
            state.pool.waiting.insert(key);
        }
        let error = if exhausted {
            AllocError::Exhausted {
                capacity: inner.cfg.pool.capacity(),
            }
        } else if inner.checkpoint_failing().is_some()
            && let Err(error) = inner.save(&state).await
        {
            // The latest write failed and this one too: that, not the pool, is what the
            // runtime must hear (the pool may well grow meanwhile).
            error
        } else if let Some(error) = cooling_only(&state, &inner.cfg.pool) {
            error
        } else {
            AllocError::PoolEmpty {
                retry_after_ms: inner.cfg.retry_after.as_millis() as u64,
                cause: inner.troubles.summary(Instant::now()),
            }
        };
        tracing::info!(%error, "no address for the pod");
        return Err(error);
    };
    let (vnic_id, ip) = (entry.allocation.vnic_id.clone(), entry.allocation.ip);
    state
        .pool
        .set_state(&vnic_id, ip, SlotState::Assigned(pod.clone()));
    state.allocations.insert(key.clone(), entry.clone());
    if let Err(error) = inner.save(&state).await {
        state.allocations.remove(&key);
        state.pool.set_state(&vnic_id, ip, previous);
        return Err(error);
    }
    tracing::info!(%ip, vnic = %vnic_id, "address allocated");
    Ok(entry.allocation)
}

async fn release(inner: &Inner, pod: &PodRef) -> Result<Option<Allocation>, AllocError> {
    let mut state = inner.state.lock().await;
    release_locked(inner, &mut state, pod).await
}

/// The state a restart starts from: the checkpointed VNICs, each holding its pods' addresses
/// and the addresses still cooling down (their rest counted from the wall-clock time of
/// release, so a restart does not shorten it; a clock that went back restarts it). Free
/// addresses are unknown until the first reconcile finds them in OCI.
fn restore(restored: Restored, cfg: &IpamConfig) -> State {
    let mut pool = Pool::default();
    for vnic in restored.vnics {
        pool.upsert_vnic(vnic);
    }
    for entry in restored.allocations.values() {
        let a = &entry.allocation;
        let slot = Slot {
            block: entry.block,
            ocid: entry.ip_id.clone(),
            state: SlotState::Assigned(entry.pod.clone()),
        };
        pool.add_slot(&a.vnic_id, a.ip, slot);
    }
    let (now, wall_now) = (Instant::now(), wall_clock());
    for c in restored.cooling {
        let rested = wall_now.duration_since(c.released_at()).unwrap_or_default();
        let left = cfg.pool.cooldown.saturating_sub(rested);
        if left.is_zero() {
            continue;
        }
        let slot = Slot {
            block: c.block,
            ocid: c.ip_id.clone(),
            state: SlotState::Cooldown {
                until: later(now, left),
                released_at: c.released_at(),
            },
        };
        if !pool.add_slot(&c.vnic_id, c.ip, slot.clone()) {
            pool.keep_cooling(&c.vnic_id, c.ip, slot);
        }
    }
    State {
        pool,
        allocations: restored.allocations,
        gone: std::collections::BTreeMap::new(),
        unrecorded_release: None,
    }
}

/// The first reconcile, retried until OCI answers, then the grower and the periodic reconcile.
async fn background(inner: Arc<Inner>) {
    let started = std::time::Instant::now();
    let jitter = inner.cfg.start_jitter.mul_f64(rand::random::<f64>());
    if !jitter.is_zero() {
        tracing::debug!(?jitter, "the first reconcile waits its start jitter");
        tokio::time::sleep(jitter).await;
    }
    let mut delay = inner
        .cfg
        .retry_after
        .max(std::time::Duration::from_millis(100));
    let mut failures = 0;
    while let Err(error) = reconcile::run(&inner).await {
        failures += 1;
        tracing::warn!(%error, retry_in = ?delay, "the first reconcile with OCI failed; the checkpointed pods are served meanwhile");
        reconcile::book(&inner, &error, failures, delay);
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(FIRST_RECONCILE_MAX_BACKOFF);
    }
    inner.reconciled.send_replace(true);
    inner.vnic_added.notify_one();
    tracing::info!(
        took_ms = started.elapsed().as_millis() as u64,
        "IPAM reconciled with OCI"
    );
    tokio::join!(grow::run(inner.clone()), reconcile::periodic(inner));
}

/// The longest wait between two attempts of the first reconcile.
const FIRST_RECONCILE_MAX_BACKOFF: std::time::Duration = std::time::Duration::from_secs(30);

impl Allocator for Ipam {
    fn allocate<'a>(&'a self, pod: &'a PodRef) -> BoxFuture<'a, Result<Allocation, AllocError>> {
        Box::pin(Ipam::allocate(self, pod))
    }
    fn release<'a>(
        &'a self,
        pod: &'a PodRef,
    ) -> BoxFuture<'a, Result<Option<Allocation>, AllocError>> {
        Box::pin(Ipam::release(self, pod))
    }
    fn lookup<'a>(&'a self, pod: &'a PodRef) -> BoxFuture<'a, Option<Allocation>> {
        Box::pin(Ipam::lookup(self, pod))
    }
}

/// [`AllocError::CoolingDown`] when the pool cannot grow for the waiting pod (its plan adds
/// nothing) and only addresses in cooldown could serve it, with the time until the first
/// is free.
fn cooling_only(state: &State, cfg: &PoolConfig) -> Option<AllocError> {
    let now = Instant::now();
    let pool = &state.pool;
    let plan = pool.plan(cfg, now, &state.pods_on());
    if !plan.create.is_empty() || !plan.attach.is_empty() {
        return None;
    }
    let ends = pool
        .vnics()
        .iter()
        .flat_map(|v| v.ips.values())
        .filter_map(|slot| match slot.state {
            SlotState::Cooldown { until, .. } => Some(until),
            _ => None,
        });
    let (first, addresses) = ends.fold((None, 0), |(first, n), until| {
        (Some(first.map_or(until, |f: Instant| f.min(until))), n + 1)
    });
    let wait = first?.saturating_duration_since(now);
    Some(AllocError::CoolingDown {
        // Rounded up, so a retry at that time finds the address free.
        retry_after_ms: wait.as_micros().div_ceil(1000) as u64,
        addresses,
    })
}
