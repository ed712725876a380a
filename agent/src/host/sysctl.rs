//! Per-interface sysctls the datapath depends on.
//!
//! Reverse-path filtering must be loose (2) on managed interfaces: replies to a pod on
//! VNIC 1 arrive on eth1 while the route back to their source points at eth0.

use std::{fs, io, path::PathBuf};

/// Loose reverse-path filtering.
pub const RP_FILTER_LOOSE: &str = "2";

fn rp_filter_path(interface: &str) -> PathBuf {
    PathBuf::from(format!("/proc/sys/net/ipv4/conf/{interface}/rp_filter"))
}

/// Sets `rp_filter` of `interface` to loose. Returns whether it had to be changed
/// (something reset it) so the caller can log it.
pub fn ensure_rp_filter_loose(interface: &str) -> io::Result<bool> {
    let path = rp_filter_path(interface);
    let current = fs::read_to_string(&path)?;
    if current.trim() == RP_FILTER_LOOSE {
        return Ok(false);
    }
    fs::write(&path, RP_FILTER_LOOSE)?;
    Ok(true)
}
