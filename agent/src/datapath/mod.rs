//! The datapath: loads (or adopts) vcnpath's TC programs and their pinned maps, attaches
//! them to VNIC interfaces, and keeps the maps equal to a desired state. One task owns
//! every map write ([`task`]); everyone else sends it intents.

mod batch;
mod collect;
pub mod compat;
mod convert;
mod counters;
mod error;
pub mod gc;
mod hostflows;
mod loader;
mod maps;
mod object;
mod pins;
pub mod probe;
pub mod repair;
mod state;
pub mod task;

pub use collect::monotonic_now_ns;
pub use counters::Counters;
pub use error::DatapathError;
pub use gc::{GcReport, NatTimeouts};
pub use hostflows::HostFlow;
pub use loader::{
    Datapath, LoadOptions, TC_HANDLE_RAW, TC_PRIORITY, attach_pinned_pod, detach_interface,
    remove_pins,
};
pub use maps::{DatapathMaps, FlowTables};
pub use repair::{Observed, RepairReport, Role};
pub use state::{DatapathState, SyncReport, vnic_entry};
