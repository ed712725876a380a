//! The background task that moves the pool towards its targets: plan (pure, under the state
//! lock), execute the plan's cloud calls in parallel (bounded), feed the results back, repeat.
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::oci::models::AttachmentState;
use crate::oci::{ErrorClass, OciError, new_retry_token};

use super::pool::{Create, Plan, Pool, later};
use super::reconcile::vnic_info;
use super::state::Inner;

pub(super) async fn run(inner: Arc<Inner>) {
    let mut memory = Memory::default();
    loop {
        if !step(&inner, &mut memory).await {
            tokio::select! {
                () = inner.wake.notified() => {}
                () = tokio::time::sleep(inner.cfg.tick) => {}
            }
        }
    }
}

/// What one kind of call is about: the unit that backs off on its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Target {
    /// `CreatePrivateIp` on a VNIC (an address or a block).
    CreateIp(String),
    /// `AttachVnic` in a subnet.
    Attach(String),
    /// `ListVnicAttachments` before attaching.
    CountAttachments,
}

impl Target {
    /// The kind of work and what it is about, as [`Troubles`] files it.
    fn key(&self) -> (&'static str, &str) {
        match self {
            Target::CreateIp(vnic) => ("create private IP", vnic),
            Target::Attach(subnet) => ("attach VNIC", subnet),
            Target::CountAttachments => ("count attachments", "instance"),
        }
    }
}

/// Errors retrying soon will not fix: IAM, authentication, a request OCI finds wrong, a tenancy
/// limit or quota. The work waits `denied_backoff` and status says what to change.
fn needs_operator(class: ErrorClass) -> bool {
    matches!(
        class,
        ErrorClass::Permission
            | ErrorClass::Authentication
            | ErrorClass::Request
            | ErrorClass::ServiceLimit
    )
}

#[derive(Debug)]
struct Backoff {
    failures: u32,
    until: Instant,
    /// The last failure holds for every VNIC alike: a tenancy limit or quota, IAM, credentials
    /// (not a request OCI found wrong, which may be about this VNIC or its subnet).
    tenancy_wide: bool,
}

/// What the grower keeps between steps: per-target backoff, and the retry tokens of creates
/// whose answer was lost, so the next try returns the resource the first one made.
#[derive(Debug, Default)]
struct Memory {
    backoff: HashMap<Target, Backoff>,
    tokens: HashMap<Target, Vec<String>>,
    /// The physical NIC each attach token asked for: a retry with the token asks the same, or
    /// OCI would refuse the token for a different body (409 `InvalidatedRetryToken`).
    nics: HashMap<String, Option<u32>>,
}

impl Memory {
    fn waiting(&self, target: &Target, now: Instant) -> bool {
        self.backoff.get(target).is_some_and(|b| b.until > now)
    }

    /// Whether the last create on some VNIC met something only an operator can change (a
    /// tenancy's `private-ip-count` limit, a quota, IAM): a new VNIC's creates would meet it
    /// too, and its own primary address counts against the same limit. Until a create
    /// succeeds again (the probe after the backoff), no VNIC is attached for addresses.
    fn creates_refused_tenancy_wide(&self) -> bool {
        self.backoff
            .iter()
            .any(|(t, b)| matches!(t, Target::CreateIp(_)) && b.tenancy_wide)
    }

    /// The token for the next create of `target`: one whose answer was lost, else a new one.
    fn token(&mut self, target: &Target) -> Token {
        match self.tokens.get_mut(target).and_then(Vec::pop) {
            Some(value) => Token {
                value,
                inherited: true,
            },
            None => Token {
                value: new_retry_token(),
                inherited: false,
            },
        }
    }

    /// Keeps the token of a create whose earlier answer was lost when the try with it did not
    /// reach OCI or was refused before it could take effect (held back, throttled): the
    /// earlier call may still have made the resource, and only that token returns it.
    fn keep_inherited(&mut self, target: &Target, token: Token, outcome: &Outcome) {
        if token.inherited
            && let Outcome::Failed { token: None, error } = outcome
            && error.class().is_transient()
        {
            self.tokens
                .entry(target.clone())
                .or_default()
                .push(token.value);
        }
    }

    /// The NIC an attach with `token` asks for: the one its first try asked, else `fresh`.
    fn nic(&mut self, token: &str, fresh: Option<u32>) -> Option<u32> {
        *self.nics.entry(token.to_owned()).or_insert(fresh)
    }

    /// Forgets the backoff and the trouble of creates on VNICs that left the pool (detached,
    /// by the agent or behind its back): nothing retries them, and status must not show them.
    fn forget_gone_vnics(&mut self, inner: &Inner, in_pool: impl Fn(&str) -> bool) {
        let gone: Vec<Target> = self
            .backoff
            .keys()
            .filter(|t| matches!(t, Target::CreateIp(vnic) if !in_pool(vnic)))
            .cloned()
            .collect();
        for target in gone {
            let (work, about) = target.key();
            inner.troubles.cleared(work, about);
            self.backoff.remove(&target);
            self.tokens.remove(&target);
        }
    }

    /// Forgets the NICs of tokens that will not be used again.
    fn forget_spent(&mut self) {
        let live: std::collections::HashSet<&String> = self.tokens.values().flatten().collect();
        self.nics.retain(|token, _| live.contains(token));
    }

    /// Books how a call ended: its backoff, its token, its entry in `vcnpath status`, its log.
    fn record(&mut self, inner: &Inner, target: Target, outcome: &Outcome) {
        let (work, about) = target.key();
        let cfg = &inner.cfg;
        if matches!(outcome, Outcome::Done) {
            self.backoff.remove(&target);
            inner.troubles.cleared(work, about);
            return;
        }
        let failures = self.backoff.get(&target).map_or(0, |b| b.failures) + 1;
        let transient = jittered(cfg.tick, failures, cfg.error_backoff_max);
        let wait = match outcome {
            Outcome::Done => unreachable!("handled above"),
            // A lost answer is asked again at once with the same token; if OCI keeps
            // failing, as any other transient failure.
            Outcome::Failed {
                token: Some(token),
                error,
            } => {
                tracing::warn!(work, about, error = %error, "the answer was lost; asking again with the same retry token");
                self.tokens
                    .entry(target.clone())
                    .or_default()
                    .push(token.clone());
                if failures == 1 {
                    Duration::ZERO
                } else {
                    transient
                }
            }
            Outcome::Failed { token: None, error } if needs_operator(error.class()) => {
                report_needs_operator(error, cfg.denied_backoff);
                cfg.denied_backoff
            }
            Outcome::Failed { token: None, error } => {
                tracing::warn!(work, about, error = %error, class = ?error.class(), retry_in = ?transient, "OCI call failed; will retry");
                transient
            }
            Outcome::Again { token, why } => {
                tracing::warn!(
                    work,
                    about,
                    why,
                    "not usable yet; asking again with the same retry token"
                );
                self.tokens
                    .entry(target.clone())
                    .or_default()
                    .push(token.clone());
                transient
            }
            Outcome::Unusable => cfg.denied_backoff,
        };
        let until = Instant::now() + wait;
        let tenancy_wide = matches!(
            outcome,
            Outcome::Failed { token: None, error } if matches!(
                error.class(),
                ErrorClass::ServiceLimit | ErrorClass::Permission | ErrorClass::Authentication
            )
        );
        if let Outcome::Failed { error, .. } = outcome {
            inner.troubles.failed(work, about, error, failures, until);
        }
        self.backoff.insert(
            target,
            Backoff {
                failures,
                until,
                tenancy_wide,
            },
        );
    }
}

/// `base · 2^(failures-1)`, capped, with equal jitter (half fixed, half random) so nodes that
/// failed together do not retry together.
fn jittered(base: Duration, failures: u32, cap: Duration) -> Duration {
    use rand::Rng as _;
    let exp = base
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(cap);
    let half = exp / 2;
    half + half.mul_f64(rand::thread_rng().r#gen::<f64>())
}

/// An `opc-retry-token`, and whether an earlier try whose answer was lost used it.
#[derive(Debug, Clone)]
struct Token {
    value: String,
    inherited: bool,
}

/// How one call ended, for [`Memory::record`].
#[derive(Debug)]
enum Outcome {
    Done,
    /// The call failed; `token` is kept when the call may have taken effect (its answer was
    /// lost), so the next try is answered with what the first one made.
    Failed {
        error: OciError,
        token: Option<String>,
    },
    /// The call went through but its result cannot be used yet (an attached VNIC not readable);
    /// the same token answers the same resource next time.
    Again {
        token: String,
        why: String,
    },
    /// OCI answered something the agent cannot use; left to the reconcile, not retried soon.
    Unusable,
}

impl Outcome {
    fn failed(error: OciError, token: String) -> Self {
        let token = error.may_have_committed().then_some(token);
        Self::Failed { error, token }
    }
}

/// Logs, once per backoff, a failure only an operator can fix, with what to change; for an
/// IAM denial, what the node's policy must grant.
fn report_needs_operator(error: &OciError, retry_in: Duration) {
    let operation = error.operation();
    let class = error.class();
    let needs = if class == ErrorClass::Permission {
        crate::oci::iam::needs(operation).join(", ")
    } else {
        String::new()
    };
    tracing::error!(
        operation,
        ?class,
        needs = %needs,
        code = error.code().unwrap_or("-"),
        ?retry_in,
        error = %error,
        "OCI refused the call and retrying soon will not help: {}; not retrying before the backoff",
        class.remedy()
    );
}

/// One plan, executed. True when something succeeded, so the next plan follows at once; after
/// a step where everything failed the loop waits for the tick or a wake-up. Targets in
/// backoff are left out of the plan, so wake-ups (a pod's repeated ADD) add no OCI calls.
async fn step(inner: &Arc<Inner>, memory: &mut Memory) -> bool {
    let _ops = inner.ops.lock().await;
    let now = Instant::now();
    let plan = {
        let mut state = inner.state.lock().await;
        state.pool.tick(now);
        let pods_on = state.pods_on();
        let plan = state.pool.plan(&inner.cfg.pool, now, &pods_on);
        // The demand is in this plan; pods still waiting ask again and renew it.
        state.pool.waiting.clear();
        // Addresses (every one of a block) and VNICs being deleted leave the pool first, so
        // nobody is handed one.
        for (vnic, _, ocid) in &plan.release {
            if let Some(v) = state.pool.vnic_mut(vnic) {
                v.ips.retain(|_, slot| slot.ocid != *ocid);
                v.full = false;
            }
        }
        for (vnic, _) in &plan.detach {
            state.pool.remove_vnic(vnic);
        }
        memory.forget_gone_vnics(inner, |vnic| state.pool.vnic(vnic).is_some());
        plan
    };
    let mut plan = plan;
    plan.create
        .retain(|c| !memory.waiting(&Target::CreateIp(c.vnic.clone()), now));
    // A VNIC whose last create failed gets one probe, not a full batch.
    let mut probed = std::collections::HashSet::new();
    plan.create.retain(|c| {
        !memory
            .backoff
            .contains_key(&Target::CreateIp(c.vnic.clone()))
            || probed.insert(c.vnic.clone())
    });
    plan.attach
        .retain(|subnet| !memory.waiting(&Target::Attach(subnet.clone()), now));
    if !plan.attach.is_empty()
        && (memory.waiting(&Target::CountAttachments, now) || memory.creates_refused_tenancy_wide())
    {
        plan.attach.clear();
    }
    if plan.is_empty() {
        return false;
    }
    let span = tracing::info_span!(
        "grow",
        create = plan.create.len(),
        attach = plan.attach.len(),
        release = plan.release.len(),
        detach = plan.detach.len()
    );
    execute(inner, plan, memory).instrument(span).await
}

async fn execute(inner: &Arc<Inner>, plan: Plan, memory: &mut Memory) -> bool {
    let limit = Arc::new(Semaphore::new(inner.cfg.parallel_calls));
    let mut tasks = JoinSet::new();
    let Plan {
        create,
        attach,
        release,
        detach,
    } = plan;
    let attach = match allowed_attaches(inner, attach).await {
        Ok(attach) => {
            memory.record(inner, Target::CountAttachments, &Outcome::Done);
            attach
        }
        Err(error) => {
            let outcome = Outcome::Failed { error, token: None };
            memory.record(inner, Target::CountAttachments, &outcome);
            Vec::new()
        }
    };
    let mut calls = JoinSet::new();
    for Create { vnic, block } in create {
        let (inner, limit) = (inner.clone(), limit.clone());
        let target = Target::CreateIp(vnic.clone());
        let token = memory.token(&target);
        calls.spawn(async move {
            let _permit = limit.acquire().await;
            let outcome = create_ip(&inner, &vnic, block, token.value.clone()).await;
            (target, token, outcome)
        });
    }
    let fresh_nic = if attach.is_empty() {
        None
    } else {
        nic_for_new_vnic(&inner.state.lock().await.pool, inner.cfg.pool.physical_nics)
    };
    for subnet in attach {
        let (inner, limit) = (inner.clone(), limit.clone());
        let target = Target::Attach(subnet.clone());
        let token = memory.token(&target);
        let nic_index = memory.nic(&token.value, fresh_nic);
        calls.spawn(async move {
            let _permit = limit.acquire().await;
            let outcome = attach_vnic(&inner, &subnet, nic_index, token.value.clone()).await;
            (target, token, outcome)
        });
    }
    for (vnic, ip, ocid) in release {
        let (inner, limit) = (inner.clone(), limit.clone());
        tasks.spawn(async move {
            let _permit = limit.acquire().await;
            delete_ip(&inner, &vnic, ip, &ocid).await
        });
    }
    for (vnic, attachment) in detach {
        let (inner, limit) = (inner.clone(), limit.clone());
        tasks.spawn(async move {
            let _permit = limit.acquire().await;
            detach_vnic(&inner, &vnic, &attachment).await
        });
    }
    let mut progressed = false;
    while let Some(done) = calls.join_next().await {
        let Ok((target, token, outcome)) = done else {
            continue;
        };
        progressed |= matches!(outcome, Outcome::Done);
        memory.keep_inherited(&target, token, &outcome);
        memory.record(inner, target, &outcome);
    }
    memory.forget_spent();
    while let Some(done) = tasks.join_next().await {
        progressed |= done.unwrap_or(false);
    }
    progressed
}

/// Recounts the instance's attachments before attaching: VNICs still detaching, or attached by
/// someone else since the last reconcile, hold slots of the shape's limit. Without this a
/// shape-limit `LimitExceeded` would be taken for an exhausted subnet.
async fn allowed_attaches(inner: &Inner, mut attach: Vec<String>) -> Result<Vec<String>, OciError> {
    if attach.is_empty() {
        return Ok(attach);
    }
    let attachments = inner.cloud.list_vnic_attachments().await.inspect_err(|e| {
        tracing::warn!(error = %e, "cannot count the node's VNIC attachments; not attaching now");
    })?;
    let state = inner.state.lock().await;
    let pool = &state.pool;
    // Not stored in the pool: a detaching VNIC is gone a moment later, and the pool's count
    // (kept by the reconcile) must not stay inflated by it.
    let others = attachments
        .iter()
        .filter(|a| a.lifecycle_state != AttachmentState::Detached)
        .filter(|a| {
            a.vnic_id
                .as_deref()
                .is_none_or(|id| pool.vnic(id).is_none())
        })
        .count();
    let room = inner
        .cfg
        .pool
        .max_vnics
        .saturating_sub(pool.vnics().len() + others);
    attach.truncate(room);
    Ok(attach)
}

/// Creates one address, or with `block` one IP CIDR block, on `vnic` with `token`: a token
/// whose earlier answer was lost returns what that call made, so a lost answer never leaves
/// an orphan behind.
async fn create_ip(inner: &Inner, vnic: &str, block: Option<u8>, token: String) -> Outcome {
    match inner
        .cloud
        .create_private_ip(vnic, None, block, &inner.tags, &token)
        .await
    {
        Ok(created) => {
            // What OCI made decides, whatever was asked.
            let addresses = created.addresses();
            if addresses.is_empty() {
                tracing::error!(address = %created.ip_address, id = %created.id, "OCI returned a private IP that is not IPv4; leaving it to the reconcile");
                return Outcome::Unusable;
            }
            let made = created.block();
            // The VNIC cannot have left the pool: detaches happen under the same ops lock.
            let mut state = inner.state.lock().await;
            for ip in &addresses {
                if state.add_created(vnic, *ip, created.id.clone(), made) {
                    inner.moved.notify_one();
                }
            }
            tracing::debug!(address = %created.ip_address, block = ?made, vnic, "private IP created");
            Outcome::Done
        }
        Err(e) if block.is_some() && blocks_refused(&e) => {
            // No aligned block free in the subnet (it is fragmented), or blocks not allowed
            // there. With `single_fallback` the VNIC grows by single addresses for a while;
            // without, new VNICs go to the next subnet, and status shows why.
            let cfg = &inner.cfg.pool;
            let until = later(Instant::now(), cfg.subnet_retry);
            let mut state = inner.state.lock().await;
            let subnet = state.pool.vnic_mut(vnic).map(|v| {
                v.no_blocks_until = Some(until);
                v.info.subnet_id.clone()
            });
            if cfg.single_fallback {
                tracing::info!(vnic, error = %e, "OCI gives this VNIC no IP CIDR block now; single addresses meanwhile");
                return Outcome::Done;
            }
            tracing::warn!(vnic, error = %e, "OCI gives this VNIC no IP CIDR block now (ipam.mode = \"auto\" would use single addresses)");
            if let Some(subnet) = subnet {
                state.pool.mark_subnet_exhausted(&subnet, until);
            }
            Outcome::failed(e, token)
        }
        Err(e) if e.is_limit_exceeded() => {
            // Limits are not retried: the VNIC holds as many addresses as it may (or its
            // subnet is out of them); the plan moves on to another VNIC.
            tracing::info!(vnic, error = %e, "VNIC is full");
            inner.state.lock().await.pool.mark_full(vnic);
            Outcome::Done
        }
        Err(e) if e.is_not_found() => {
            // The VNIC may have been detached behind the agent's back (or IAM denies the
            // call): hand out none of its addresses until the reconcile has looked.
            tracing::warn!(vnic, error = %e, "OCI does not know the VNIC (404); its addresses are handed out no more until the reconcile has looked");
            inner.state.lock().await.pool.mark_suspect(vnic);
            inner.reconcile_now.notify_one();
            Outcome::failed(e, token)
        }
        Err(e) => Outcome::failed(e, token),
    }
}

/// Whether a block create failed because OCI cannot or will not give a block here (a
/// fragmented subnet answers 400 `LimitExceeded` or `InvalidParameter`, the sources do not
/// say which; a full VNIC answers `LimitExceeded` too, and the single address tried next then
/// finds that out).
fn blocks_refused(e: &OciError) -> bool {
    e.is_limit_exceeded() || matches!(e.class(), ErrorClass::Request)
}

/// Attaches a VNIC in `subnet` on physical NIC `nic_index` (`None` on a VM) with `token`.
async fn attach_vnic(
    inner: &Inner,
    subnet: &str,
    nic_index: Option<u32>,
    token: String,
) -> Outcome {
    let attachment = match inner
        .cloud
        .attach_vnic(subnet, nic_index, &inner.tags, &token)
        .await
    {
        Ok(a) => a,
        Err(e) if e.is_limit_exceeded() => {
            // The attachments were just counted, so this is the subnet running out of
            // addresses: skip it for a while, the next plan spills to the next subnet.
            tracing::warn!(subnet, error = %e, "cannot attach a VNIC in this subnet; trying the next");
            let until = later(Instant::now(), inner.cfg.pool.subnet_retry);
            inner
                .state
                .lock()
                .await
                .pool
                .mark_subnet_exhausted(subnet, until);
            return Outcome::Done;
        }
        Err(e) => return Outcome::failed(e, token),
    };
    match vnic_info(inner, &attachment).await {
        Ok(info) => {
            tracing::info!(vnic = %info.id, attached_at = %info.attached_at, subnet, "VNIC attached");
            inner.state.lock().await.pool.upsert_vnic(info);
            inner.vnic_added.notify_one();
            Outcome::Done
        }
        Err(e) => {
            // The same token answers this attachment again, so the next try adopts it.
            Outcome::Again {
                token,
                why: format!("VNIC attachment {} not readable yet: {e}", attachment.id),
            }
        }
    }
}

async fn delete_ip(inner: &Inner, vnic: &str, ip: Ipv4Addr, ocid: &str) -> bool {
    match inner.cloud.delete_private_ip(ocid).await {
        Ok(()) => {
            tracing::info!(%ip, vnic, "excess private IP released");
            true
        }
        Err(e) if e.is_not_found() => true,
        Err(e) => {
            tracing::warn!(%ip, vnic, error = %e, "cannot delete a private IP; the reconcile re-adopts it");
            false
        }
    }
}

async fn detach_vnic(inner: &Inner, vnic: &str, attachment: &str) -> bool {
    match inner.cloud.detach_vnic(attachment).await {
        Ok(()) => {
            tracing::info!(vnic, attachment, "empty VNIC detached");
            true
        }
        Err(e) if e.is_not_found() => true,
        Err(e) => {
            tracing::warn!(vnic, attachment, error = %e, "cannot detach a VNIC; the reconcile re-adopts it");
            false
        }
    }
}

/// The physical NIC a new VNIC is attached to, counting every VNIC of the instance on
/// each: the pool's own and the attachments it does not use (the primary unless it serves
/// pods, VNICs other actors attached, attachments in flux), each on the NIC its attachment names.
fn nic_for_new_vnic(pool: &Pool, physical_nics: u32) -> Option<u32> {
    let own = pool.vnics().iter().map(|v| v.info.nic_index);
    least_used_nic(
        physical_nics,
        own.chain(pool.other_attachments.iter().copied()),
    )
}

/// The physical NIC for a new VNIC: the one carrying the fewest of the node's VNICs (the
/// primary included), the lowest on a tie. `None` with one NIC: the attachment names none,
/// as on every VM. A retry of a lost answer asks for the NIC its first try asked for
/// ([`Memory::nic`]).
fn least_used_nic(physical_nics: u32, in_use: impl Iterator<Item = u32>) -> Option<u32> {
    if physical_nics <= 1 {
        return None;
    }
    let mut counts = vec![0_usize; physical_nics as usize];
    for nic in in_use {
        if let Some(count) = counts.get_mut(nic as usize) {
            *count += 1;
        }
    }
    (0..physical_nics).min_by_key(|&nic| counts[nic as usize])
}

#[cfg(test)]
mod nic_tests {
    use super::super::pool::{Pool, VnicInfo};
    use super::{least_used_nic, nic_for_new_vnic};

    fn vnic_on(nic_index: u32) -> VnicInfo {
        VnicInfo {
            id: format!("vnic-on-{nic_index}"),
            attachment_id: format!("att-on-{nic_index}"),
            nic_index,
            vlan_tag: 100 + nic_index,
            attached_at: String::new(),
            mac: "02:00:00:00:00:01".into(),
            interface: None,
            subnet_id: "subnet-a".into(),
            subnet: "10.0.16.0/20".parse().unwrap(),
            router_ip: std::net::Ipv4Addr::new(10, 0, 16, 1),
            primary_ip: std::net::Ipv4Addr::new(10, 0, 16, 2),
            is_primary: false,
        }
    }

    /// On bare metal the VNICs other actors attached (and the primary) load their NIC as
    /// the pool's own do: `ListVnicAttachments` names the NIC of each.
    #[test]
    fn vnics_other_actors_attached_count_on_their_nic() {
        let mut pool = Pool::default();
        // The primary on NIC 0; three VNICs someone else put on NIC 1.
        pool.other_attachments = vec![0, 1, 1, 1];
        pool.upsert_vnic(vnic_on(0));
        assert_eq!(
            nic_for_new_vnic(&pool, 2),
            Some(0),
            "NIC 0 carries 2 VNICs, NIC 1 carries 3"
        );
        assert_eq!(nic_for_new_vnic(&pool, 1), None, "a VM names no NIC");
    }

    #[test]
    fn new_vnics_go_to_the_least_used_physical_nic() {
        assert_eq!(
            least_used_nic(1, [0, 0].into_iter()),
            None,
            "a VM names no NIC"
        );
        assert_eq!(
            least_used_nic(2, [0].into_iter()),
            Some(1),
            "the primary is on NIC 0"
        );
        assert_eq!(
            least_used_nic(2, [0, 1].into_iter()),
            Some(0),
            "a tie: the lowest"
        );
        assert_eq!(least_used_nic(2, [0, 0, 1].into_iter()), Some(1));
        assert_eq!(
            least_used_nic(2, [0, 5].into_iter()),
            Some(1),
            "an unknown NIC is ignored"
        );
    }
}

#[cfg(test)]
mod memory_tests {
    use std::time::Duration;

    use super::{Memory, Outcome, Target};
    use crate::oci::OciError;

    fn lost(memory: &mut Memory, target: &Target) -> String {
        let token = memory.token(target);
        assert!(!token.inherited, "a first try has a token of its own");
        memory
            .tokens
            .entry(target.clone())
            .or_default()
            .push(token.value.clone());
        token.value
    }

    /// A create whose answer was lost is tried again with its token; if that try is held back
    /// by the node's own rate limit or throttled (nothing taken effect), the token stays for
    /// the next try, because only it returns what the first call may have made.
    #[test]
    fn a_lost_answers_token_outlives_a_try_that_never_reached_oci() {
        let mut memory = Memory::default();
        let target = Target::CreateIp("vnic-a".into());
        let first = lost(&mut memory, &target);
        let token = memory.token(&target);
        assert!(token.inherited);
        assert_eq!(token.value, first);
        let held = Outcome::Failed {
            error: OciError::HeldBack {
                operation: "CreatePrivateIp",
                ready_in: Duration::from_secs(5),
            },
            token: None,
        };
        memory.keep_inherited(&target, token, &held);
        assert_eq!(memory.token(&target).value, first, "asked again with it");

        // A fresh token of a try that did not take effect is not kept.
        let fresh = memory.token(&target);
        assert!(!fresh.inherited);
        memory.keep_inherited(&target, fresh, &held);
        assert!(memory.tokens.get(&target).is_none_or(Vec::is_empty));
    }
}
