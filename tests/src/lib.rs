//! Test support: the namespace lab and (later) the OCI simulator.
