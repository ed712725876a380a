//! Test support for vcnpath: packet crafting and checking, privilege guards, the
//! network-namespace lab, the OCI simulator with its test kit, and the benchmarks.
pub mod agent;
pub mod bench;
pub mod containerd;
pub mod datapath_fixture;
pub mod interrupt;
pub mod lab;
pub mod node_agent;
pub mod ocikit;
pub mod ocisim;
pub mod packet;
pub mod privileged;
