//! The vcnpath node agent as a library: the binaries (`vcnpath`, `vcnpath-cni`) are thin
//! shells over these modules so tests reach every piece of logic.
pub mod api;
pub mod cli;
pub mod cni;
pub mod daemon;
pub mod datapath;
pub mod host;
pub mod ipam;
pub mod oci;
