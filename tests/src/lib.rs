//! Test support: the namespace lab and (later) the OCI simulator.
pub mod ocisim;
