//! Guards for tests that need root: they skip with a printed reason instead of failing
//! when run unprivileged (plain `cargo test`).

/// True when the process can load BPF programs and manage namespaces. Prints why a test
/// is skipped otherwise.
pub fn have_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipping {test}: needs root (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON)");
    }
    root
}

/// True when the kernel can make 802.1Q VLAN interfaces (bare-metal labs need them). Prints
/// why a test is skipped otherwise: the host kernel of some development machines is built
/// without `CONFIG_VLAN_8021Q`; `cargo xtask vmtest` runs these tests on Debian's kernels.
pub fn have_vlan(test: &str) -> bool {
    match crate::lab::kernel_has_vlan() {
        Ok(true) => true,
        Ok(false) => {
            eprintln!(
                "skipping {test}: this kernel has no 802.1Q VLAN support (CONFIG_VLAN_8021Q); run it in the VM tier (cargo xtask vmtest)"
            );
            false
        }
        Err(error) => panic!("probing for VLAN support: {error:#}"),
    }
}

/// A unique bpffs pin directory for one test, removed (with its pins) on drop.
pub struct PinDir {
    pub path: std::path::PathBuf,
}

impl PinDir {
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::path::PathBuf::from(format!(
            "/sys/fs/bpf/vcnpath-test-{}-{tag}-{n}",
            std::process::id()
        ));
        Self { path }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(error) = vcnpath::datapath::remove_pins(&self.path) {
            eprintln!(
                "cleanup: cannot remove pins in {}: {error}",
                self.path.display()
            );
        }
    }
}
