//! Test support for vcnpath: packet crafting and checking, privilege guards, the
//! network-namespace lab, and (later) the OCI simulator.
pub mod agent;
pub mod datapath_fixture;
pub mod lab;
pub mod packet;
pub mod privileged;
