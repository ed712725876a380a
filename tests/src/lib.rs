//! Test support for vcnpath: packet crafting and checking, privilege guards, and (in
//! later modules) the network-namespace lab and the OCI simulator.
pub mod datapath_fixture;
pub mod packet;
pub mod privileged;
