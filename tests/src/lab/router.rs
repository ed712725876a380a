//! The VCN's virtual router: OCI's source/destination check, in nftables.
//!
//! OCI drops a packet leaving a VNIC unless its source is one of that VNIC's private IPs,
//! and drops a packet towards a VNIC unless its destination is one of them; an IP CIDR
//! block (a private-IP object with `cidrPrefixLength`) makes every address inside it one
//! of them. Here each VNIC has a set of prefixes (`vnicN_addrs`, an interval set: a single
//! IP is its /32, a block its prefix, so a /18 is one element) and two named counters
//! (`vnicN_src_drops`, `vnicN_dst_drops`) so tests can tell which check dropped what.
//!
//! The source check hooks prerouting, so it also covers packets addressed to the router
//! itself; the destination check hooks postrouting, so it also covers ICMP errors the router
//! generates. Both run before/after routing, so the router's own `rp_filter` (which is off)
//! never hides a drop from the counters.
//!
//! Each VNIC is a "port": its set, its counters and its two chains, hooked in through the
//! `source_ports` / `destination_ports` verdict maps keyed by interface, so VNICs the
//! simulator attaches later are added and removed as a unit ([`add_port`], [`remove_port`]).
//!
//! OCI's router also knows which VNIC owns each address without ARP; the lab mirrors that
//! with a permanent neighbour entry and a /32 route for every single address in a set, and
//! for a block one route through its first address (which has the neighbour entry), so
//! the node never has to answer ARP for pod addresses and a block costs two entries
//! whatever its size.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use ipnet::Ipv4Net;

use super::netns::{Netns, cmd_in};
use super::process::run_stdin;
use super::topology::{Mac, Vnic};

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

/// The router's end of one VNIC's link: where the check applies, and the MAC it reaches
/// the VNIC's addresses at. Static VNICs convert from [`Vnic`]; VNICs the simulator
/// attaches are built from its state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    /// The VNIC's slot in the lab (0 is the primary, then in order of appearance; never
    /// OCI's `nicIndex`, which is 0 for every VNIC of a VM); names the set and counters.
    pub index: usize,
    /// The router's interface for this VNIC (`rN`).
    pub ifname: String,
    /// The VNIC's MAC, for the router's permanent neighbour entries.
    pub mac: Mac,
}

impl From<&Vnic> for Port {
    fn from(vnic: &Vnic) -> Self {
        Self {
            index: vnic.index,
            ifname: vnic.router_ifname.to_owned(),
            mac: vnic.mac,
        }
    }
}

fn set_name(index: usize) -> String {
    format!("vnic{index}_addrs")
}

fn counter_name(index: usize, check: &str) -> String {
    format!("vnic{index}_{check}_drops")
}

fn chain_name(index: usize, check: &str) -> String {
    format!("vnic{index}_{check}")
}

/// The table and its two hooks. Each hook dispatches on the interface through a verdict map
/// to the VNIC's own chain, so a VNIC is added or removed as a unit (its map elements,
/// chains, set and counters) without looking up rule handles.
fn base_ruleset() -> String {
    format!(
        "table ip {TABLE} {{\n\
         \x20 map source_ports {{ type ifname : verdict; }}\n\
         \x20 map destination_ports {{ type ifname : verdict; }}\n\
         \x20 chain source_check {{\n    type filter hook prerouting priority filter; policy accept;\n    iifname vmap @source_ports\n  }}\n\
         \x20 chain destination_check {{\n    type filter hook postrouting priority filter; policy accept;\n    oifname vmap @destination_ports\n  }}\n}}\n"
    )
}

/// A set element as nft writes it: a single address bare, a block as its prefix.
fn element(range: Ipv4Net) -> String {
    if range.prefix_len() == 32 {
        range.addr().to_string()
    } else {
        range.to_string()
    }
}

/// `nft -f` commands adding `port` with `ranges` in its set.
fn add_port_commands(port: &Port, ranges: &[Ipv4Net]) -> String {
    let i = port.index;
    let (set, ifname) = (set_name(i), &port.ifname);
    let mut text = format!("add set ip {TABLE} {set} {{ type ipv4_addr; flags interval; }}\n");
    if !ranges.is_empty() {
        let list: Vec<String> = ranges.iter().copied().map(element).collect();
        let _ = writeln!(
            text,
            "add element ip {TABLE} {set} {{ {} }}",
            list.join(", ")
        );
    }
    for (check, field, map) in [
        ("src", "saddr", "source_ports"),
        ("dst", "daddr", "destination_ports"),
    ] {
        let (counter, chain) = (counter_name(i, check), chain_name(i, check));
        // Writing to a String cannot fail.
        let _ = write!(
            text,
            "add counter ip {TABLE} {counter}\n\
             add chain ip {TABLE} {chain}\n\
             add rule ip {TABLE} {chain} ip {field} != @{set} counter name \"{counter}\" drop\n\
             add element ip {TABLE} {map} {{ \"{ifname}\" : jump {chain} }}\n"
        );
    }
    text
}

/// `nft -f` commands removing everything [`add_port_commands`] added.
fn remove_port_commands(port: &Port) -> String {
    let i = port.index;
    let mut text = String::new();
    for (check, map) in [("src", "source_ports"), ("dst", "destination_ports")] {
        let chain = chain_name(i, check);
        // A chain must be empty and unreferenced before it can be deleted.
        let _ = write!(
            text,
            "delete element ip {TABLE} {map} {{ \"{}\" }}\n\
             flush chain ip {TABLE} {chain}\n\
             delete chain ip {TABLE} {chain}\n\
             delete counter ip {TABLE} {}\n",
            port.ifname,
            counter_name(i, check)
        );
    }
    let _ = writeln!(text, "delete set ip {TABLE} {}", set_name(i));
    text
}

/// Installs the check in the router namespace with `vnics` as ports, each with its primary
/// IP (and a neighbour entry for it).
pub fn install(router: &Netns, vnics: &[Vnic]) -> Result<()> {
    let mut text = base_ruleset();
    for vnic in vnics {
        text.push_str(&add_port_commands(&Port::from(vnic), &[vnic.ip.into()]));
    }
    run_stdin(cmd_in(router, "nft").args(["-f", "-"]), &text)
        .context("installing the source/destination check in the router")?;
    for vnic in vnics {
        set_neighbour(router, &Port::from(vnic), vnic.ip.into())?;
    }
    Ok(())
}

/// Adds a VNIC to the check (as attaching it does in OCI), its set holding `ranges` (its
/// single IPs as /32s and its IP CIDR blocks). The link `port.ifname` must exist already.
pub fn add_port(router: &Netns, port: &Port, ranges: &[Ipv4Net]) -> Result<()> {
    run_stdin(
        cmd_in(router, "nft").args(["-f", "-"]),
        &add_port_commands(port, ranges),
    )
    .with_context(|| {
        format!(
            "adding VNIC {} ({}) to the router's check",
            port.index, port.ifname
        )
    })?;
    for range in ranges {
        set_neighbour(router, port, *range)?;
    }
    Ok(())
}

/// Removes a VNIC from the check, with its set and counters. Its neighbour entries go
/// with its link.
pub fn remove_port(router: &Netns, port: &Port) -> Result<()> {
    run_stdin(
        cmd_in(router, "nft").args(["-f", "-"]),
        &remove_port_commands(port),
    )
    .with_context(|| {
        format!(
            "removing VNIC {} ({}) from the router's check",
            port.index, port.ifname
        )
    })?;
    Ok(())
}

/// Points the router at `range` through its port, without ARP. A single address gets a
/// permanent neighbour entry and a /32 route (so it reaches its own VNIC even when two
/// VNICs share a subnet). A block gets the neighbour entry for its first address and one
/// route for the whole prefix through that address (`onlink`: the gateway lies inside the
/// route being added), so every address of it is sent to the VNIC's MAC.
fn set_neighbour(router: &Netns, port: &Port, range: Ipv4Net) -> Result<()> {
    let first = range.network().to_string();
    let prefix = range.to_string();
    let route: &[&str] = if range.prefix_len() == 32 {
        &["route", "replace", &prefix, "dev", &port.ifname]
    } else {
        &[
            "route",
            "replace",
            &prefix,
            "via",
            &first,
            "dev",
            &port.ifname,
            "onlink",
        ]
    };
    let neighbour: &[&str] = &[
        "neigh",
        "replace",
        &first,
        "lladdr",
        &port.mac.to_string(),
        "dev",
        &port.ifname,
        "nud",
        "permanent",
    ];
    // The neighbour first: a block's route resolves through it.
    router.ip_batch(&[neighbour, route])?;
    Ok(())
}

/// Makes `ip` one of the port's addresses (as assigning a secondary private IP does in OCI).
pub fn add_address(router: &Netns, port: &Port, ip: Ipv4Addr) -> Result<()> {
    add_range(router, port, ip.into())
}

/// Removes `ip` from the port's addresses.
pub fn remove_address(router: &Netns, port: &Port, ip: Ipv4Addr) -> Result<()> {
    remove_range(router, port, ip.into())
}

/// Makes every address of `range` the port's: a /32 is one secondary private IP, a shorter
/// prefix an IP CIDR block assigned as one object.
pub fn add_range(router: &Netns, port: &Port, range: Ipv4Net) -> Result<()> {
    router.nft(&[
        "add",
        "element",
        "ip",
        TABLE,
        &set_name(port.index),
        &format!("{{ {} }}", element(range)),
    ])?;
    set_neighbour(router, port, range)
}

/// Takes `range` (exactly as [`add_range`] gave it) from the port.
pub fn remove_range(router: &Netns, port: &Port, range: Ipv4Net) -> Result<()> {
    router.nft(&[
        "delete",
        "element",
        "ip",
        TABLE,
        &set_name(port.index),
        &format!("{{ {} }}", element(range)),
    ])?;
    router.ip_batch(&[
        &["route", "del", &range.to_string(), "dev", &port.ifname],
        &[
            "neigh",
            "del",
            &range.network().to_string(),
            "dev",
            &port.ifname,
        ],
    ])?;
    Ok(())
}

/// Reads the drop counters of VNIC `index`.
pub fn drops(router: &Netns, index: usize) -> Result<RouterDrops> {
    Ok(RouterDrops {
        source: counter_packets(router, &counter_name(index, "src"))?,
        destination: counter_packets(router, &counter_name(index, "dst"))?,
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

    fn port1() -> Port {
        Port {
            index: 1,
            ifname: "r1".into(),
            mac: Mac([2, 0, 0, 0, 1, 10]),
        }
    }

    #[test]
    fn a_port_checks_both_ways_through_its_own_chains() {
        let text = add_port_commands(
            &port1(),
            &[
                Ipv4Addr::new(10, 0, 1, 10).into(),
                "10.0.1.32/28".parse().unwrap(),
            ],
        );
        for expected in [
            "add set ip vcnlab vnic1_addrs { type ipv4_addr; flags interval; }",
            "add element ip vcnlab vnic1_addrs { 10.0.1.10, 10.0.1.32/28 }",
            "add rule ip vcnlab vnic1_src ip saddr != @vnic1_addrs counter name \"vnic1_src_drops\" drop",
            "add rule ip vcnlab vnic1_dst ip daddr != @vnic1_addrs counter name \"vnic1_dst_drops\" drop",
            "add element ip vcnlab source_ports { \"r1\" : jump vnic1_src }",
            "add element ip vcnlab destination_ports { \"r1\" : jump vnic1_dst }",
        ] {
            assert!(text.contains(expected), "expected {expected:?} in:\n{text}");
        }
    }

    #[test]
    fn removing_a_port_unhooks_it_before_deleting_its_objects() {
        let text = remove_port_commands(&port1());
        let unhook = text.find("delete element ip vcnlab source_ports").unwrap();
        let chain = text.find("delete chain ip vcnlab vnic1_src").unwrap();
        let set = text.find("delete set ip vcnlab vnic1_addrs").unwrap();
        assert!(unhook < chain && chain < set, "wrong order:\n{text}");
    }
}
