//! The VCN's virtual router: OCI's source/destination check, in nftables.
//!
//! OCI drops a packet leaving a VNIC unless its source is one of that VNIC's private IPs,
//! and drops a packet towards a VNIC unless its destination is one of them. Here each VNIC
//! has a set of addresses (`vnicN_addrs`) and two named counters (`vnicN_src_drops`,
//! `vnicN_dst_drops`) so tests can tell which check dropped what.
//!
//! The source check hooks prerouting, so it also covers packets addressed to the router
//! itself; the destination check hooks postrouting, so it also covers ICMP errors the router
//! generates. Both run before/after routing, so the router's own `rp_filter` (which is off)
//! never hides a drop from the counters.
//!
//! OCI's router also knows which VNIC owns each address without ARP; the lab mirrors that
//! with a permanent neighbour entry for every address in a set, so the node never has to
//! answer ARP for pod addresses.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use anyhow::{Context, Result};

use super::netns::{Netns, cmd_in};
use super::process::run_stdin;
use super::topology::{VNICS, Vnic};

/// The nftables table holding the check, inside the router namespace.
pub const TABLE: &str = "vcnlab";

/// Packets dropped by the source/destination check of one VNIC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouterDrops {
    /// Packets from the VNIC whose source is not one of its addresses.
    pub source: u64,
    /// Packets towards the VNIC whose destination is not one of its addresses.
    pub destination: u64,
}

impl RouterDrops {
    pub fn total(&self) -> u64 {
        self.source + self.destination
    }
}

fn set_name(vnic: &Vnic) -> String {
    format!("vnic{}_addrs", vnic.index)
}

fn counter_name(vnic: &Vnic, check: &str) -> String {
    format!("vnic{}_{check}_drops", vnic.index)
}

/// The ruleset, with each VNIC's primary IP already in its set.
fn ruleset() -> String {
    let mut sets = String::new();
    let mut source_rules = String::new();
    let mut destination_rules = String::new();
    for vnic in &VNICS {
        let set = set_name(vnic);
        let (src, dst) = (counter_name(vnic, "src"), counter_name(vnic, "dst"));
        let (ifname, ip) = (vnic.router_ifname, vnic.ip);
        // Writing to a String cannot fail.
        let _ = write!(
            sets,
            "  set {set} {{ type ipv4_addr; elements = {{ {ip} }}; }}\n  counter {src} {{}}\n  counter {dst} {{}}\n"
        );
        let _ = writeln!(
            source_rules,
            "    iifname \"{ifname}\" ip saddr != @{set} counter name \"{src}\" drop"
        );
        let _ = writeln!(
            destination_rules,
            "    oifname \"{ifname}\" ip daddr != @{set} counter name \"{dst}\" drop"
        );
    }
    format!(
        "table ip {TABLE} {{\n{sets}\
         \x20 chain source_check {{\n    type filter hook prerouting priority filter; policy accept;\n{source_rules}  }}\n\
         \x20 chain destination_check {{\n    type filter hook postrouting priority filter; policy accept;\n{destination_rules}  }}\n}}\n"
    )
}

/// Installs the check in the router namespace, and the neighbour entries for each VNIC's
/// primary IP.
pub fn install(router: &Netns) -> Result<()> {
    run_stdin(cmd_in(router, "nft").args(["-f", "-"]), &ruleset())
        .context("installing the source/destination check in the router")?;
    for vnic in &VNICS {
        set_neighbour(router, vnic, vnic.ip)?;
    }
    Ok(())
}

fn set_neighbour(router: &Netns, vnic: &Vnic, ip: Ipv4Addr) -> Result<()> {
    router.ip(&[
        "neigh",
        "replace",
        &ip.to_string(),
        "lladdr",
        &vnic.mac.to_string(),
        "dev",
        vnic.router_ifname,
        "nud",
        "permanent",
    ])?;
    Ok(())
}

/// Makes `ip` one of `vnic`'s addresses (as assigning a secondary private IP does in OCI).
pub fn add_address(router: &Netns, vnic: &Vnic, ip: Ipv4Addr) -> Result<()> {
    router.nft(&[
        "add",
        "element",
        "ip",
        TABLE,
        &set_name(vnic),
        &format!("{{ {ip} }}"),
    ])?;
    set_neighbour(router, vnic, ip)
}

/// Removes `ip` from `vnic`'s addresses.
pub fn remove_address(router: &Netns, vnic: &Vnic, ip: Ipv4Addr) -> Result<()> {
    router.nft(&[
        "delete",
        "element",
        "ip",
        TABLE,
        &set_name(vnic),
        &format!("{{ {ip} }}"),
    ])?;
    router.ip(&["neigh", "del", &ip.to_string(), "dev", vnic.router_ifname])?;
    Ok(())
}

/// Reads `vnic`'s drop counters.
pub fn drops(router: &Netns, vnic: &Vnic) -> Result<RouterDrops> {
    Ok(RouterDrops {
        source: counter_packets(router, &counter_name(vnic, "src"))?,
        destination: counter_packets(router, &counter_name(vnic, "dst"))?,
    })
}

/// `nft list counter` prints `packets N bytes M` inside the counter block.
fn counter_packets(router: &Netns, name: &str) -> Result<u64> {
    let text = router.nft(&["list", "counter", "ip", TABLE, name])?;
    let mut words = text.split_whitespace();
    while let Some(word) = words.next() {
        if word == "packets" {
            let value = words.next().unwrap_or_default();
            return value
                .parse()
                .with_context(|| format!("counter {name}: bad packet count {value:?} in {text}"));
        }
    }
    anyhow::bail!("counter {name}: no packet count in {text:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_checks_each_vnic_both_ways() {
        let rules = ruleset();
        assert!(rules.contains("elements = { 10.0.0.10 }"), "{rules}");
        assert!(
            rules.contains(
                "iifname \"r1\" ip saddr != @vnic1_addrs counter name \"vnic1_src_drops\" drop"
            ),
            "{rules}"
        );
        assert!(
            rules.contains(
                "oifname \"r0\" ip daddr != @vnic0_addrs counter name \"vnic0_dst_drops\" drop"
            ),
            "{rules}"
        );
    }
}
