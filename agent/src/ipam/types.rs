//! The allocation contract between the CNI-facing API and whatever hands out addresses.
//! The daemon implements [`Allocator`] with the IPAM pool plus the datapath sync (an
//! address is in the `endpoints` map before ADD returns); tests use fakes.

use std::{future::Future, net::Ipv4Addr, pin::Pin, time::Duration};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// A boxed future, so [`Allocator`] can be used as a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Who an address belongs to: CNI identifies an attachment by container id and
/// interface name; the rest is for people reading `vcnpath status`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PodRef {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME` (usually `eth0`).
    pub ifname: String,
    /// Kubernetes namespace (from `CNI_ARGS` `K8S_POD_NAMESPACE`), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Kubernetes pod name (from `CNI_ARGS` `K8S_POD_NAME`), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// An address handed to a pod, and what the pod's network setup needs to know about it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// The pod's address (a secondary private IP of `vnic_id`).
    pub ip: Ipv4Addr,
    /// OCID of the VNIC that owns the address.
    pub vnic_id: String,
    /// The VNIC's interface in the node namespace (`eth0`, `eth1`, …).
    pub interface: String,
    /// The VNIC's subnet.
    pub subnet: Ipv4Net,
    /// The subnet's virtual router.
    pub router_ip: Ipv4Addr,
    /// MTU to configure on the pod's interface.
    pub mtu: u32,
}

/// Why an allocation or release failed. The CNI plugin maps these to CNI error codes.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AllocError {
    /// No free address right now; the pool is growing in the background. `cause` says what
    /// holds it back when OCI does (the operation, its answer, the next try).
    #[error(
        "no free address on this node right now; the pool is growing, try again in {retry_after_ms} ms{}",
        .cause.as_deref().map(|c| format!("; held back: {c}")).unwrap_or_default()
    )]
    PoolEmpty {
        retry_after_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cause: Option<String>,
    },
    /// No free address and no room to grow: the only addresses left are resting after their
    /// pods left (so stale flows cannot reach a new pod); the first is free in `retry_after_ms`.
    #[error(
        "no free address on this node right now; {addresses} addresses are cooling down after their pods left and the pool cannot grow, the first is free in {retry_after_ms} ms"
    )]
    CoolingDown {
        retry_after_ms: u64,
        addresses: usize,
    },
    /// The node is at its capacity (VNIC limit × IPs per VNIC).
    #[error("this node has no capacity left ({capacity} addresses in use)")]
    Exhausted { capacity: usize },
    /// The agent is starting and has not restored its state yet.
    #[error("the agent is not ready yet (restoring state); try again")]
    NotReady,
    /// The allocation could not be made durable, so it was rolled back.
    #[error("the allocation could not be checkpointed and was rolled back: {reason}")]
    Checkpoint { reason: String },
    /// The datapath could not be updated, so the allocation was rolled back.
    #[error("the datapath could not be updated and the allocation was rolled back: {reason}")]
    Datapath { reason: String },
    /// The request itself is invalid.
    #[error("invalid request: {reason}")]
    Invalid { reason: String },
}

impl AllocError {
    /// Suggested wait before retrying, for errors that are temporary.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            AllocError::PoolEmpty { retry_after_ms, .. }
            | AllocError::CoolingDown { retry_after_ms, .. } => {
                Some(Duration::from_millis(*retry_after_ms))
            }
            AllocError::NotReady => Some(Duration::from_secs(1)),
            _ => None,
        }
    }
}

/// Hands out and takes back pod addresses. Implementations must be idempotent: a second
/// `allocate` for the same [`PodRef`] returns the same address, a `release` of an
/// unknown pod is `Ok(None)`.
pub trait Allocator: Send + Sync + 'static {
    /// An address for `pod`, durable (checkpointed) before this returns.
    fn allocate<'a>(&'a self, pod: &'a PodRef) -> BoxFuture<'a, Result<Allocation, AllocError>>;
    /// Frees the address of `pod`, returning what it had.
    fn release<'a>(
        &'a self,
        pod: &'a PodRef,
    ) -> BoxFuture<'a, Result<Option<Allocation>, AllocError>>;
    /// The current allocation of `pod`, if any (for CNI CHECK).
    fn lookup<'a>(&'a self, pod: &'a PodRef) -> BoxFuture<'a, Option<Allocation>>;
    /// CNI GC: releases every allocation whose (container id, interface) is not in `valid`,
    /// except those whose ADD is running or recent; returns what it released. An allocator
    /// that keeps nothing worth collecting releases nothing.
    fn collect_not_listed<'a>(
        &'a self,
        valid: &'a std::collections::BTreeSet<(String, String)>,
    ) -> BoxFuture<'a, Vec<(PodRef, Allocation)>> {
        let _ = valid;
        Box::pin(async { Vec::new() })
    }
}
