//! IP address management: a warm pool of secondary private IPs over the node's VNICs,
//! checkpointed allocations, and the contract the local API serves from.

pub mod types;

pub use types::{AllocError, Allocation, Allocator, BoxFuture, PodRef};
