//! The running agent's parts: configuration, the CNI configuration it installs, the one-agent-per-node lock, the node (VNIC interfaces, datapath state,
//! the allocator the CNI plugin reaches), and introspection over HTTP.

pub mod config;
pub mod conflist;
pub mod health;
pub mod http;
pub mod node;
pub mod repair;
pub mod state_lock;

pub use config::{AgentConfig, AuthMode, ConfigError, PodImds};
pub use node::{BareMetal, ImdsPolicy, Node, NodeSettings};
pub use state_lock::{StateLock, StateLockError};
