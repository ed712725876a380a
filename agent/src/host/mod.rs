//! The node's network configuration as the agent sees it: interfaces and sysctls, always
//! in the network namespace the agent runs in; and files it replaces atomically.

pub mod boot;
pub mod conntrack;
pub mod file;
pub mod link;
pub mod netlink;
pub mod pods;
pub mod ports;
pub mod sysctl;
pub mod tc;
pub mod vlan;
