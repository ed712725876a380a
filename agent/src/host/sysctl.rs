//! The per-interface IPv4 settings the datapath depends on (`net.ipv4.conf.<if>.*`).
//!
//! - Reverse-path filtering must not be strict on managed interfaces: replies to a pod on
//!   VNIC 1 arrive on eth1 while the route back to their source points at eth0. Off (0) or
//!   loose (2) both work; an interface found strict (1) is made loose.
//! - Forwarding must be on: a reply to a pod arrives on a VNIC and is routed to the pod's veth,
//!   and the kernel checks the receiving interface's `forwarding`.
//!
//! Both are read and set over rtnetlink (`RTM_GETLINK` / `RTM_SETLINK` with `IFLA_AF_SPEC` →
//! `AF_INET` → `IFLA_INET_CONF`), never through /proc/sys: a container that is not privileged
//! gets /proc/sys read-only (runc mounts it so), while `RTM_SETLINK` needs only `CAP_NET_ADMIN`.
//!
//! The node-wide `net.ipv4.ip_forward` (`conf/all`, and `conf/default` that new veths copy) has
//! no netlink setter: rtnetlink has `RTM_GETNETCONF` and notifications, no `RTM_SETNETCONF`, and
//! a `RTM_NEWNETCONF` request is refused with `EOPNOTSUPP` (seen on Linux 6.18). So
//! [`ensure_ip_forward_all`] can only try /proc/sys and report when it cannot.

use std::{fs, io, path::Path};

use rtnetlink::packet_route::link::InetDevConf;

use super::netlink::{HostError, Link, Netlink};

/// Loose reverse-path filtering.
pub const RP_FILTER_LOOSE: i32 = 2;

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// A setting that did not hold, on which interface.
#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(
        "net.ipv4.conf.{interface}.{setting} is still {seen} after setting it to {wanted}; something on the node resets it"
    )]
    NotApplied {
        interface: String,
        setting: &'static str,
        wanted: i32,
        seen: i32,
    },
}

/// What [`ensure_interface`] had to change, with the values it found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changed {
    /// `rp_filter` was this (strict) and is loose now.
    pub rp_filter: Option<i32>,
    /// `forwarding` was this and is on now.
    pub forwarding: Option<i32>,
}

impl Changed {
    pub fn any(&self) -> bool {
        self.rp_filter.is_some() || self.forwarding.is_some()
    }
}

/// The settings to write so that `current` suits the datapath, or `None` when it already does.
/// Only the fields to change are non-zero (the request carries no others).
pub fn changes_needed(current: &InetDevConf) -> Option<InetDevConf> {
    let mut changes = InetDevConf::default();
    let mut any = false;
    if !matches!(current.rp_filter, 0 | RP_FILTER_LOOSE) {
        changes.rp_filter = RP_FILTER_LOOSE;
        any = true;
    }
    if current.forwarding != 1 {
        changes.forwarding = 1;
        any = true;
    }
    any.then_some(changes)
}

/// Makes `link`'s reverse-path filter permissive and its forwarding on, and reads the result
/// back. Returns what it changed (nothing when the interface was already suitable).
pub async fn ensure_interface(netlink: &Netlink, link: &Link) -> Result<Changed, SysctlError> {
    let current = netlink.ipv4_conf(link).await?;
    let Some(changes) = changes_needed(&current) else {
        return Ok(Changed::default());
    };
    netlink.set_ipv4_conf(link, changes).await?;
    let now = netlink.ipv4_conf(link).await?;
    let not_applied = |setting, wanted, seen| SysctlError::NotApplied {
        interface: link.name.clone(),
        setting,
        wanted,
        seen,
    };
    if changes.rp_filter != 0 && now.rp_filter != changes.rp_filter {
        return Err(not_applied("rp_filter", changes.rp_filter, now.rp_filter));
    }
    if changes.forwarding != 0 && now.forwarding != changes.forwarding {
        return Err(not_applied(
            "forwarding",
            changes.forwarding,
            now.forwarding,
        ));
    }
    Ok(Changed {
        rp_filter: (changes.rp_filter != 0).then_some(current.rp_filter),
        forwarding: (changes.forwarding != 0).then_some(current.forwarding),
    })
}

/// Turns on `net.ipv4.ip_forward` when it is off. Returns whether it had to; an error when it
/// was off and /proc/sys is not writable (the per-interface settings still cover the VNICs,
/// but new pod veths copy `conf/default`, so the node must enable forwarding itself).
pub fn ensure_ip_forward_all() -> io::Result<bool> {
    ensure_flag(Path::new(IP_FORWARD))
}

fn ensure_flag(path: &Path) -> io::Result<bool> {
    if fs::read_to_string(path)?.trim() == "1" {
        return Ok(false);
    }
    fs::write(path, "1")?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(rp_filter: i32, forwarding: i32) -> InetDevConf {
        let mut c = InetDevConf::default();
        c.rp_filter = rp_filter;
        c.forwarding = forwarding;
        c
    }

    #[test]
    fn a_permissive_interface_is_left_alone() {
        for rp_filter in [0, RP_FILTER_LOOSE] {
            assert_eq!(
                changes_needed(&conf(rp_filter, 1)),
                None,
                "rp_filter {rp_filter} with forwarding on must need no change"
            );
        }
    }

    #[test]
    fn strict_filtering_is_made_loose_and_forwarding_turned_on() {
        let changes = changes_needed(&conf(1, 0)).expect("strict and not forwarding");
        assert_eq!((changes.rp_filter, changes.forwarding), (2, 1));
        let only_forwarding = changes_needed(&conf(0, 0)).expect("not forwarding");
        assert_eq!(
            (only_forwarding.rp_filter, only_forwarding.forwarding),
            (0, 1),
            "rp_filter 0 is permissive and must not be written"
        );
    }
}
