//! The release path shared by a DEL and the allocation GC: the tombstone that refuses a late
//! ADD, the cooldown, the checkpoint write, and the rollback when that write fails.
use tokio::time::Instant;

use super::checkpoint;
use super::pool::{Slot, SlotState, later};
use super::state::{Inner, State, wall_clock};
use super::types::{AllocError, Allocation, PodRef};

/// The release path (tombstone, cooldown, checkpoint, rollback on a failed write) for a
/// caller that holds the state lock: a DEL, or the allocation GC.
pub(super) async fn release_locked(
    inner: &Inner,
    state: &mut State,
    pod: &PodRef,
) -> Result<Option<Allocation>, AllocError> {
    let key = checkpoint::key(pod);
    tombstone(inner, &key);
    let Some(entry) = state.allocations.remove(&key) else {
        return Ok(None);
    };
    let (vnic_id, ip) = (&entry.allocation.vnic_id, entry.allocation.ip);
    let until = later(Instant::now(), inner.cfg.pool.cooldown);
    let previous = state
        .pool
        .vnic(vnic_id)
        .and_then(|v| v.ips.get(&ip))
        .map(|s| s.state.clone());
    let cooling = SlotState::Cooldown {
        until,
        released_at: wall_clock(),
    };
    if !state.pool.set_state(vnic_id, ip, cooling.clone()) {
        // The reconcile dropped the slot (OCI did not list it), or the VNIC itself is gone
        // (a quarantined pod): keep the address cooling either way.
        let slot = Slot {
            ocid: entry.ip_id.clone(),
            state: cooling,
            block: entry.block,
        };
        if !state.pool.add_slot(vnic_id, ip, slot.clone()) {
            state.pool.keep_cooling(vnic_id, ip, slot);
        }
    }
    if let Err(error) = inner.save(state).await {
        if let Some(previous) = previous {
            state.pool.set_state(vnic_id, ip, previous);
        }
        state.allocations.insert(key, entry);
        return Err(error);
    }
    tracing::info!(%ip, vnic = %vnic_id, "address released to cooldown");
    Ok(Some(entry.allocation))
}

fn tombstone(inner: &Inner, key: &checkpoint::Key) {
    let mut deleted = inner
        .deleted
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let grace = inner.cfg.tombstone_grace;
    deleted.retain(|_, at| at.elapsed() < grace);
    deleted.insert(key.clone(), Instant::now());
}
