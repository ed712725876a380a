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
use super::pool::{Pool, Slot, SlotState, VnicInfo};
use super::types::{AllocError, Allocation};

pub(super) struct State {
    pub pool: Pool,
    pub allocations: BTreeMap<Key, Entry>,
    /// VNICs detached behind the agent's back while pods were on them: still checkpointed,
    /// so the record of those pods stays readable, until the last of them is deleted.
    pub gone: BTreeMap<String, VnicInfo>,
    /// Set when the checkpoint, the record of cooldowns, was lost: until then a free address
    /// the reconcile finds cools down as if released at the start (it may have been, a moment
    /// before the crash), with this wall-clock time of release.
    pub unrecorded_release: Option<(tokio::time::Instant, SystemTime)>,
}

/// A pod whose address is on no VNIC of the pool (its VNIC was detached, or the address moved
/// off the node): the address is handed to nobody else while the pod lives.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Quarantined {
    pub ip: std::net::Ipv4Addr,
    pub vnic_id: String,
    pub container_id: String,
    pub ifname: String,
}

impl State {
    /// The VNICs some pod's address lives on: never empty, whatever their slots say.
    pub fn pods_on(&self) -> BTreeSet<String> {
        self.allocations
            .values()
            .map(|e| e.allocation.vnic_id.clone())
            .collect()
    }

    /// The pods whose address lives on `vnic_id`.
    pub fn pods_of(&self, vnic_id: &str) -> Vec<String> {
        self.allocations
            .values()
            .filter(|e| e.allocation.vnic_id == vnic_id)
            .map(|e| e.pod.container_id.clone())
            .collect()
    }

    pub fn remember_gone(&mut self, info: VnicInfo) {
        self.gone.insert(info.id.clone(), info);
    }

    /// Drops gone VNICs no pod names any more (and any the pool knows again).
    pub fn forget_gone(&mut self) {
        let named = self.pods_on();
        let pool = &self.pool;
        self.gone
            .retain(|id, _| named.contains(id) && pool.vnic(id).is_none());
    }

    /// Pods whose address the pool has on no VNIC.
    pub fn quarantined(&self) -> Vec<Quarantined> {
        self.allocations
            .values()
            .filter(|e| self.pool.find(e.allocation.ip).is_none())
            .map(|e| Quarantined {
                ip: e.allocation.ip,
                vnic_id: e.allocation.vnic_id.clone(),
                container_id: e.pod.container_id.clone(),
                ifname: e.pod.ifname.clone(),
            })
            .collect()
    }

    /// The state of a free address of this node that no record names: cooling till the end
    /// of [`State::unrecorded_release`], else free.
    pub fn unrecorded(&self, now: tokio::time::Instant) -> SlotState {
        match self.unrecorded_release {
            Some((until, released_at)) if until > now => SlotState::Cooldown { until, released_at },
            _ => SlotState::Free { since: now },
        }
    }

    /// An address of a private IP (or block, `block`) the grower just created joins the pool:
    /// free, unless a pod holds that address already (its VNIC was detached and OCI handed the
    /// address out again), in which case it is the pod's and the pod follows it to this VNIC.
    /// Returns whether a pod followed it.
    pub fn add_created(
        &mut self,
        vnic_id: &str,
        ip: std::net::Ipv4Addr,
        ocid: String,
        block: Option<ipnet::Ipv4Net>,
    ) -> bool {
        let now = tokio::time::Instant::now();
        let holder = self
            .allocations
            .iter_mut()
            .find(|(_, e)| e.allocation.ip == ip);
        let state = match (holder, self.pool.vnic(vnic_id)) {
            (Some((key, entry)), Some(v)) => {
                tracing::warn!(%ip, vnic = vnic_id, container_id = %key.0, "a new private IP has the address of a quarantined pod; it stays the pod's");
                move_to(&mut entry.allocation, &v.info);
                entry.ip_id.clone_from(&ocid);
                entry.block = block;
                SlotState::Assigned(entry.pod.clone())
            }
            // An address that was cooling on a VNIC detached behind the agent's back rests
            // out its cooldown here.
            _ => self
                .pool
                .take_cooling(ip)
                .unwrap_or(SlotState::Free { since: now }),
        };
        let followed = matches!(state, SlotState::Assigned(_));
        self.pool.add_slot(vnic_id, ip, Slot { ocid, state, block });
        followed
    }

    /// The addresses cooling down (on a VNIC of the pool or not), with the wall-clock time
    /// each was released.
    fn cooling(&self) -> Vec<Cooling> {
        let pooled = self.pool.vnics().iter().flat_map(|v| {
            v.ips
                .iter()
                .map(|(ip, slot)| (*ip, v.info.id.as_str(), slot))
        });
        pooled
            .chain(self.pool.cooling_elsewhere())
            .filter_map(|(ip, vnic_id, slot)| match slot.state {
                SlotState::Cooldown { released_at, .. } => Some(Cooling {
                    block: slot.block,
                    ip,
                    vnic_id: vnic_id.to_owned(),
                    ip_id: slot.ocid.clone(),
                    released_at_ms: Cooling::millis_since_epoch(released_at),
                }),
                _ => None,
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
    /// Asks for a reconcile now rather than at the next interval (a VNIC's interface
    /// vanished, or OCI answered 404 for it).
    pub reconcile_now: Notify,
    pub tags: Tags,
    /// Turns true once the first reconcile with OCI has built the pool.
    pub reconciled: watch::Sender<bool>,
    /// Raised when a VNIC joins the pool, for host setup to look for its interface.
    pub vnic_added: Notify,
    /// Raised when a pod's address moved to another VNIC outside an ADD or a DEL (the
    /// reconcile found it there, or a new private IP got a quarantined pod's address): the
    /// datapath must steer it through its new VNIC now, not at the next periodic sync.
    pub moved: Notify,
    /// Containers whose DEL was just served, and when: a late ADD for one is refused.
    pub deleted: std::sync::Mutex<BTreeMap<Key, tokio::time::Instant>>,
    /// Per attachment: ADDs running now, and when the latest began (for the allocation GC).
    pub adds: std::sync::Mutex<BTreeMap<Key, (usize, tokio::time::Instant)>>,
    /// Allocations whose host side the GC found missing, and since when.
    pub missing: std::sync::Mutex<BTreeMap<Key, tokio::time::Instant>>,
    /// Allocations the GC released.
    pub gc_released: std::sync::atomic::AtomicU64,
    /// Allocations a runtime's CNI GC released (not in its valid attachments).
    pub cni_gc_released: std::sync::atomic::AtomicU64,
    /// The OCI calls the grower and the reconcile cannot get through now.
    pub troubles: super::trouble::Troubles,
    /// Why the latest checkpoint write failed; none once one succeeds. While set, an ADD the
    /// pool cannot serve at once tries a write, and if that fails too is refused with its
    /// reason: the pool may grow, but no new pod can be given an address until the state
    /// directory takes writes again.
    pub checkpoint_failing: std::sync::Mutex<Option<String>>,
}

impl Inner {
    /// Writes the checkpoint off the async workers; the caller holds the state lock, so writes
    /// are ordered and each one contains every allocation made before it.
    pub async fn save(&self, state: &State) -> Result<(), AllocError> {
        let entries: Vec<Entry> = state.allocations.values().cloned().collect();
        let pooled = state.pool.vnics().iter().map(|v| v.info.clone());
        let vnics: Vec<_> = pooled.chain(state.gone.values().cloned()).collect();
        let cooling = state.cooling();
        let checkpoint = self.checkpoint.clone();
        let result = tokio::task::spawn_blocking(move || {
            checkpoint.save_with_cooling(entries.iter(), vnics.iter(), cooling.iter())
        })
        .await;
        let result = match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "checkpoint write failed");
                Err(e.to_string())
            }
            Err(join) => Err(format!("the checkpoint writer failed: {join}")),
        };
        let mut failing = self
            .checkpoint_failing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        failing.clone_from(&result.as_ref().err().cloned());
        result.map_err(|reason| AllocError::Checkpoint { reason })
    }

    /// Why checkpoint writes fail now, if they do.
    pub fn checkpoint_failing(&self) -> Option<String> {
        self.checkpoint_failing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// A pod's allocation now lives on the VNIC `to` (OCI moved its address there).
pub(super) fn move_to(a: &mut Allocation, to: &VnicInfo) {
    a.vnic_id.clone_from(&to.id);
    a.interface = to.interface.clone().unwrap_or_default();
    a.subnet = to.subnet;
    a.router_ip = to.router_ip;
}

/// The wall clock, for cooldowns that must outlive the process.
pub(super) fn wall_clock() -> SystemTime {
    SystemTime::now()
}
