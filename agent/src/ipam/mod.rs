//! IP address management: a warm pool of secondary private IPs over the node's VNICs,
//! checkpointed allocations, and the contract the local API serves from.
//!
//! - `types`: the contract ([`Allocator`], [`PodRef`], [`Allocation`], [`AllocError`]).
//! - `cloud`: the OCI operations IPAM uses, as a trait ([`Cloud`], [`OciCloud`]).
//! - `pool`: VNICs, addresses and the pure policy deciding what to create or release.
//! - `checkpoint`: the durable record of which pod holds which address.
//! - `gc`: releases allocations whose host side is gone (a DEL that never came).
//! - `holders`: addresses the node shows in use that the checkpoint does not hold.
//! - `trouble`: the OCI calls that keep failing, for status and the "try again" answer.
//! - `state`: the pool and allocations under one lock, and the checkpoint write.
//! - `release`: the release path a DEL and the GC share (tombstone, cooldown, checkpoint).
//! - `service`: [`Ipam`], answering from the pool; `grow` and `reconcile` are its background work.

pub mod checkpoint;
pub mod cloud;
pub mod config;
pub mod error;
pub mod gc;
mod grow;
pub mod holders;
pub mod pool;
mod reconcile;
mod release;
pub mod service;
mod state;
pub mod trouble;
pub mod types;

pub use cloud::{Cloud, OciCloud};
pub use config::{IpamConfig, NODE_TAG};
pub use error::IpamError;
pub use holders::HostHolder;
pub use pool::{PoolConfig, max_pods};
pub use service::{Ipam, IpamStatus, LinkState, VnicStatus};
pub use state::Quarantined;
pub use trouble::OciTrouble;
pub use types::{AllocError, Allocation, Allocator, BoxFuture, PodRef};
