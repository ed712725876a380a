//! Which boot of the node this is: pods, pins and sockets do not outlive a reboot, so state
//! recorded with another boot's id describes nothing that still runs.
use std::fs;

/// The kernel's id of the current boot (`None` where the kernel does not tell).
pub fn id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|id| id.trim().to_owned())
        .filter(|id| !id.is_empty())
}
