//! What the IPAM service and its background work (grower, reconcile) share: the pool and the
//! allocations under one lock, and the checkpoint write that makes them durable. Kept apart
//! from `service` so the background modules depend on this, not on the public API.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{Mutex, Notify, watch};

use crate::oci::models::Tags;

use super::checkpoint::{Checkpoint, Cooling, Entry, Key};
use super::cloud::Cloud;
use super::config::IpamConfig;
use super::pool::{Pool, SlotState};
use super::types::AllocError;

pub(super) struct State {
    pub pool: Pool,
    pub allocations: BTreeMap<Key, Entry>,
}

impl State {
    /// The VNICs some pod's address lives on: never empty, whatever their slots say.
    pub fn pods_on(&self) -> BTreeSet<String> {
        self.allocations
            .values()
            .map(|e| e.allocation.vnic_id.clone())
            .collect()
    }

    /// The addresses cooling down, with the wall-clock time each was released.
    fn cooling(&self) -> Vec<Cooling> {
        self.pool
            .vnics()
            .iter()
            .flat_map(|v| {
                v.ips.iter().filter_map(|(ip, slot)| match slot.state {
                    SlotState::Cooldown { released_at, .. } => Some(Cooling {
                        ip: *ip,
                        vnic_id: v.info.id.clone(),
                        ip_id: slot.ocid.clone(),
                        released_at_ms: Cooling::millis_since_epoch(released_at),
                    }),
                    _ => None,
                })
            })
            .collect()
    }
}

pub(super) struct Inner {
    pub cloud: Arc<dyn Cloud>,
    pub cfg: IpamConfig,
    pub checkpoint: Checkpoint,
    pub state: Mutex<State>,
    /// Held by whoever talks to the cloud about the pool (grower, reconcile), so a plan is never
    /// made while another one is half applied.
    pub ops: Mutex<()>,
    pub wake: Notify,
    pub tags: Tags,
    /// Turns true once the first reconcile with OCI has built the pool.
    pub reconciled: watch::Sender<bool>,
    /// Raised when a VNIC joins the pool, for host setup to look for its interface.
    pub vnic_added: Notify,
    /// Containers whose DEL was just served, and when: a late ADD for one is refused.
    pub deleted: std::sync::Mutex<BTreeMap<Key, tokio::time::Instant>>,
}

impl Inner {
    /// Writes the checkpoint off the async workers; the caller holds the state lock, so writes
    /// are ordered and each one contains every allocation made before it.
    pub async fn save(&self, state: &State) -> Result<(), AllocError> {
        let entries: Vec<Entry> = state.allocations.values().cloned().collect();
        let vnics: Vec<_> = state.pool.vnics().iter().map(|v| v.info.clone()).collect();
        let cooling = state.cooling();
        let checkpoint = self.checkpoint.clone();
        let result = tokio::task::spawn_blocking(move || {
            checkpoint.save_with_cooling(entries.iter(), vnics.iter(), cooling.iter())
        })
        .await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "checkpoint write failed");
                Err(AllocError::Checkpoint {
                    reason: e.to_string(),
                })
            }
            Err(join) => Err(AllocError::Checkpoint {
                reason: format!("the checkpoint writer failed: {join}"),
            }),
        }
    }
}

/// The wall clock, for cooldowns that must outlive the process.
pub(super) fn wall_clock() -> SystemTime {
    SystemTime::now()
}
