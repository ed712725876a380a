//! The vcnpath node agent as a library: the binaries (`vcnpath`, `vcnpath-cni`) are thin
//! shells over these modules so tests reach every piece of logic.
pub mod cli;
pub mod datapath;
pub mod host;
pub mod ipam;
pub mod oci;
