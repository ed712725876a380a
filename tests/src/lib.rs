//! Test support for vcnpath: packet crafting and checking, privilege guards, the
//! network-namespace lab, the mounts tests make, the OCI simulator with its test kit, and the benchmarks.
pub mod agent;
pub mod bench;
pub mod containerd;
pub mod datapath_fixture;
pub mod e2e;
pub mod interrupt;
pub mod lab;
pub mod mounts;
pub mod node_agent;
pub mod ocikit;
pub mod ocisim;
pub mod packet;
pub mod privileged;

/// The environment variable the VM tier sets under emulation: how many times slower than a
/// real machine the tests run there.
pub const TIME_SCALE_ENV: &str = "VCNPATH_TEST_TIME_SCALE";

/// `budget` stretched by [`TIME_SCALE_ENV`] (1 where it is unset). Time budgets that stand
/// for a promise to users (restored pods served within 5 s) hold at their real value on
/// the host tiers; in an emulated VM the same assertion proves the behaviour on that kernel.
pub fn scaled(budget: std::time::Duration) -> std::time::Duration {
    let scale = std::env::var(TIME_SCALE_ENV)
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .filter(|s| *s >= 1)
        .unwrap_or(1);
    budget * scale
}
