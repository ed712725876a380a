//! Test support: the namespace lab and (later) the OCI simulator.
pub mod ocikit;
pub mod ocisim;
