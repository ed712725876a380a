//! Allocation GC: an allocation whose host side (the pod's `vcn…` veth) has been gone for
//! the grace period is released through the normal release path (tombstone, cooldown,
//! checkpoint). That is a DEL that never came: a sandbox force-removed while the agent was
//! down, or a DEL that raced ahead of a slow ADD. An attachment whose ADD is running, or
//! began within the grace period, is never taken: its plugin may still be creating the veth.
//!
//! The runtime's CNI GC (spec 1.1.0) takes the same path with another test: an allocation
//! whose attachment is not in the runtime's valid attachments is released, under the same
//! rule for ADDs running or recent (the runtime's list was taken before such an ADD).
use std::collections::BTreeSet;

use tokio::time::Instant;

use super::checkpoint::{self, Key};
use super::release::release_locked;
use super::state::Inner;
use super::types::{Allocation, PodRef};

/// What the host shows of a pod attachment.
pub trait HostView: Send + Sync {
    /// `Some(true)` the attachment's host side exists, `Some(false)` it is gone, `None` the
    /// host cannot tell (then nothing is collected for it).
    fn attached(&self, pod: &PodRef) -> Option<bool>;
}

/// Marks an ADD of `key` as running while it lives.
pub(super) struct AddInProgress<'a> {
    inner: &'a Inner,
    key: Key,
}

impl<'a> AddInProgress<'a> {
    pub fn start(inner: &'a Inner, key: &Key) -> Self {
        let mut adds = lock(&inner.adds);
        let entry = adds.entry(key.clone()).or_insert((0, Instant::now()));
        entry.0 += 1;
        entry.1 = Instant::now();
        Self {
            inner,
            key: key.clone(),
        }
    }
}

impl Drop for AddInProgress<'_> {
    fn drop(&mut self) {
        let mut adds = lock(&self.inner.adds);
        if let Some(entry) = adds.get_mut(&self.key) {
            entry.0 = entry.0.saturating_sub(1);
        }
    }
}

/// Whether an ADD of `key` is running or began within the grace period (its plugin may
/// still be creating the veth; a runtime's list may predate it).
fn add_running_or_recent(inner: &Inner, key: &Key, now: Instant) -> bool {
    let grace = inner.cfg.allocation_gc_grace;
    lock(&inner.adds).get(key).is_some_and(|(running, began)| {
        *running > 0 || now.saturating_duration_since(*began) < grace
    })
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One pass: looks at every allocation's host side, releases those gone for the grace.
pub(super) async fn collect(inner: &Inner, host: &dyn HostView) -> Vec<PodRef> {
    let grace = inner.cfg.allocation_gc_grace;
    let pods: Vec<PodRef> = {
        let state = inner.state.lock().await;
        state.allocations.values().map(|e| e.pod.clone()).collect()
    };
    let seen: Vec<(PodRef, Option<bool>)> = pods
        .into_iter()
        .map(|pod| {
            let attached = host.attached(&pod);
            (pod, attached)
        })
        .collect();
    let now = Instant::now();
    let mut due = Vec::new();
    {
        let mut missing = lock(&inner.missing);
        missing.retain(|key, _| seen.iter().any(|(p, _)| checkpoint::key(p) == *key));
        for (pod, attached) in seen {
            let key = checkpoint::key(&pod);
            match attached {
                Some(true) => {
                    missing.remove(&key);
                }
                Some(false) => {
                    let since = *missing.entry(key).or_insert(now);
                    if now.saturating_duration_since(since) >= grace {
                        due.push(pod);
                    }
                }
                None => {}
            }
        }
    }
    let mut released = Vec::new();
    let mut state = inner.state.lock().await;
    for pod in due {
        let key = checkpoint::key(&pod);
        // Under the state lock, so no ADD of this attachment can slip in between the check
        // and the release (an ADD registers itself before it takes the lock).
        if add_running_or_recent(inner, &key, now) {
            continue;
        }
        match release_locked(inner, &mut state, &pod).await {
            Ok(Some(a)) => {
                lock(&inner.missing).remove(&key);
                inner
                    .gc_released
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(ip = %a.ip, vnic = %a.vnic_id, container_id = %pod.container_id, ifname = %pod.ifname, grace_secs = grace.as_secs(), "the pod's host veth is gone beyond the grace period; its address is released (a DEL that never came)");
                released.push(pod);
            }
            Ok(None) => {
                lock(&inner.missing).remove(&key);
            }
            Err(error) => {
                tracing::error!(container_id = %pod.container_id, %error, "cannot release an allocation whose host side is gone; the next pass retries");
            }
        }
    }
    lock(&inner.adds).retain(|_, (running, began)| {
        *running > 0 || now.saturating_duration_since(*began) < grace
    });
    released
}

/// A runtime's CNI GC: releases every allocation whose (container id, interface) is not in
/// `valid`, except one whose ADD is running or began within the grace period.
pub(super) async fn collect_not_listed(
    inner: &Inner,
    valid: &BTreeSet<Key>,
) -> Vec<(PodRef, Allocation)> {
    let grace = inner.cfg.allocation_gc_grace;
    let now = Instant::now();
    let mut state = inner.state.lock().await;
    let unlisted: Vec<PodRef> = state
        .allocations
        .values()
        .map(|e| e.pod.clone())
        // A recovered allocation's attachment is unknown, so no list can name it: only its
        // veth's absence releases it (`collect`).
        .filter(|pod| !valid.contains(&checkpoint::key(pod)) && !super::holders::is_recovered(pod))
        .collect();
    let mut released = Vec::new();
    for pod in unlisted {
        let key = checkpoint::key(&pod);
        // Under the state lock, as in `collect`: an ADD registers itself before it takes it.
        if add_running_or_recent(inner, &key, now) {
            tracing::info!(container_id = %pod.container_id, ifname = %pod.ifname, grace_secs = grace.as_secs(), "CNI GC keeps an allocation the runtime did not list: its ADD is running or recent");
            continue;
        }
        match release_locked(inner, &mut state, &pod).await {
            Ok(Some(a)) => {
                lock(&inner.missing).remove(&key);
                inner
                    .cni_gc_released
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(ip = %a.ip, vnic = %a.vnic_id, container_id = %pod.container_id, ifname = %pod.ifname, "the runtime's CNI GC does not list this attachment; its address is released");
                released.push((pod, a));
            }
            Ok(None) => {}
            Err(error) => {
                tracing::error!(container_id = %pod.container_id, %error, "CNI GC cannot release an allocation the runtime did not list; the next GC retries");
            }
        }
    }
    released
}
