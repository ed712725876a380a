//! The background task that moves the pool towards its targets: plan (pure, under the state
//! lock), execute the plan's cloud calls in parallel (bounded), feed the results back, repeat.
use std::net::Ipv4Addr;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::oci::models::AttachmentState;
use crate::oci::new_retry_token;

use super::pool::{Plan, Slot, SlotState, later};
use super::reconcile::vnic_info;
use super::state::Inner;

pub(super) async fn run(inner: Arc<Inner>) {
    loop {
        if !step(&inner).await {
            tokio::select! {
                () = inner.wake.notified() => {}
                () = tokio::time::sleep(inner.cfg.tick) => {}
            }
        }
    }
}

/// One plan, executed. True when something succeeded, so the next plan follows at once; after
/// a step where everything failed the loop waits for the tick (a simple backoff on top of the
/// client's own retries).
async fn step(inner: &Arc<Inner>) -> bool {
    let _ops = inner.ops.lock().await;
    let plan = {
        let mut state = inner.state.lock().await;
        let now = Instant::now();
        state.pool.tick(now);
        let pods_on = state.pods_on();
        let plan = state.pool.plan(&inner.cfg.pool, now, &pods_on);
        // The demand is in this plan; pods still waiting ask again and renew it.
        state.pool.waiting.clear();
        // Addresses and VNICs being deleted leave the pool first, so nobody is handed one.
        for (vnic, ip, _) in &plan.release {
            if let Some(v) = state.pool.vnic_mut(vnic) {
                v.ips.remove(ip);
                v.full = false;
            }
        }
        for (vnic, _) in &plan.detach {
            state.pool.remove_vnic(vnic);
        }
        plan
    };
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
    execute(inner, plan).instrument(span).await
}

async fn execute(inner: &Arc<Inner>, plan: Plan) -> bool {
    let limit = Arc::new(Semaphore::new(inner.cfg.parallel_calls));
    let mut tasks = JoinSet::new();
    let Plan {
        create,
        attach,
        release,
        detach,
    } = plan;
    let attach = allowed_attaches(inner, attach).await;
    for vnic in create {
        let (inner, limit) = (inner.clone(), limit.clone());
        tasks.spawn(async move {
            let _permit = limit.acquire().await;
            create_ip(&inner, &vnic).await
        });
    }
    for subnet in attach {
        let (inner, limit) = (inner.clone(), limit.clone());
        tasks.spawn(async move {
            let _permit = limit.acquire().await;
            attach_vnic(&inner, &subnet).await
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
    while let Some(done) = tasks.join_next().await {
        progressed |= done.unwrap_or(false);
    }
    progressed
}

/// Recounts the instance's attachments before attaching: VNICs still detaching, or attached by
/// someone else since the last reconcile, hold slots of the shape's limit. Without this a
/// shape-limit `LimitExceeded` would be taken for an exhausted subnet.
async fn allowed_attaches(inner: &Inner, mut attach: Vec<String>) -> Vec<String> {
    if attach.is_empty() {
        return attach;
    }
    let attachments = match inner.cloud.list_vnic_attachments().await {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "cannot count the node's VNIC attachments; not attaching now");
            return Vec::new();
        }
    };
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
    attach
}

async fn create_ip(inner: &Inner, vnic: &str) -> bool {
    let token = new_retry_token();
    match inner
        .cloud
        .create_private_ip(vnic, None, &inner.tags, &token)
        .await
    {
        Ok(created) => {
            let Ok(ip) = created.ip_address.parse::<Ipv4Addr>() else {
                tracing::error!(address = %created.ip_address, id = %created.id, "OCI returned a private IP that is not IPv4; leaving it to the reconcile");
                return false;
            };
            let slot = Slot {
                ocid: created.id,
                state: SlotState::Free {
                    since: Instant::now(),
                },
            };
            // The VNIC cannot have left the pool: detaches happen under the same ops lock.
            inner.state.lock().await.pool.add_slot(vnic, ip, slot);
            tracing::debug!(%ip, vnic, "private IP created");
            true
        }
        Err(e) if e.is_limit_exceeded() => {
            tracing::info!(vnic, error = %e, "VNIC is full");
            inner.state.lock().await.pool.mark_full(vnic);
            false
        }
        Err(e) => {
            tracing::warn!(vnic, error = %e, "cannot create a private IP; will retry");
            false
        }
    }
}

async fn attach_vnic(inner: &Inner, subnet: &str) -> bool {
    let token = new_retry_token();
    let attachment = match inner.cloud.attach_vnic(subnet, &inner.tags, &token).await {
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
            return false;
        }
        Err(e) => {
            tracing::warn!(subnet, error = %e, "cannot attach a VNIC; will retry");
            return false;
        }
    };
    match vnic_info(inner, &attachment).await {
        Ok(info) => {
            tracing::info!(vnic = %info.id, attached_at = %info.attached_at, subnet, "VNIC attached");
            inner.state.lock().await.pool.upsert_vnic(info);
            inner.vnic_added.notify_one();
            true
        }
        Err(e) => {
            tracing::warn!(attachment = %attachment.id, error = %e, "VNIC attached but not readable yet; the reconcile adopts it");
            false
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
