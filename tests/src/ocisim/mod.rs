//! An OCI simulator for tests and the demo: IMDS v2, the instance-principal federation
//! endpoint and the Core API subset the agent uses, on loopback, with signature checks,
//! realistic state, fault injection and attachment events for the namespace lab.
//!
//! ```no_run
//! # async fn demo() {
//! use vcnpath_tests::ocisim::{SimConfig, Simulator};
//! let sim = Simulator::start(SimConfig::default(), "127.0.0.1:0").await.expect("simulator starts");
//! let mut events = sim.subscribe(); // VNIC attached / detached, with MAC, IP, subnet, router
//! println!("IMDS at {}, Core API at {}", sim.imds_url(), sim.core_url());
//! # }
//! ```
mod cidr;
mod config;
mod core;
mod federation;
mod iam;
mod pki;
mod server;
mod state;
mod throttle;
mod verify;
mod workreq;

pub use config::{
    ApiKeyConfig, BulkConfig, CidrConfig, ErrorAnswer, FaultKind, FaultRule, Faults, LimitCount,
    RateLimit, SimConfig, SubnetConfig, VcnConfig,
};
pub use iam::Policy;
pub use server::{EventKind, SimError, Simulator, VnicEvent};
pub use state::ApiError;
