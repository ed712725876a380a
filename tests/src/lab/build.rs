//! Building the fixed part of the lab: namespaces, links, addresses, routes, sysctls.

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, Result};

use super::LabOptions;
use super::netns::{NETNS_DIR, Netns};
use super::router;
use super::topology::{
    INET_IP, INET_PREFIX, INET_ROUTER_IP, LINK_MTU, PEER_IP, PEER_PREFIX, PEER_ROUTER_IP,
    PhysicalNic, Vnic,
};

pub(super) struct Parts {
    pub node: Netns,
    pub router: Netns,
    pub peer: Netns,
    pub inet: Netns,
}

/// Creates a namespace for the lab, with IPv6 off: lab links would otherwise send router
/// solicitations and MLD reports that add noise to the counters tests read.
pub(super) fn namespace(name: &str) -> Result<Netns> {
    let ns = Netns::create(name)?;
    ns.sysctl("net/ipv6/conf/all/disable_ipv6", "1")?;
    ns.sysctl("net/ipv6/conf/default/disable_ipv6", "1")?;
    Ok(ns)
}

/// Builds the lab with `vnics` wired to the node from the start (the first one is the
/// primary VNIC); any other VNIC is the simulator's to attach.
pub(super) fn build(id: &str, options: &LabOptions, vnics: &[Vnic]) -> Result<Parts> {
    // Each guard exists before anything is configured in it, so an error part-way drops
    // (and deletes) whatever was already built.
    let parts = Parts {
        node: namespace(&format!("{id}-node"))?,
        router: namespace(&format!("{id}-router"))?,
        peer: namespace(&format!("{id}-peer"))?,
        inet: namespace(&format!("{id}-inet"))?,
    };
    configure_router_sysctls(&parts.router)?;
    wire_node(&parts, vnics)?;
    wire_host(
        &parts.router,
        "rpeer",
        LINK_MTU,
        PEER_ROUTER_IP,
        &parts.peer,
        PEER_IP,
        PEER_PREFIX,
    )?;
    wire_host(
        &parts.router,
        "rinet",
        options.inet_mtu.unwrap_or(LINK_MTU),
        INET_ROUTER_IP,
        &parts.inet,
        INET_IP,
        INET_PREFIX,
    )?;
    router::install(&parts.router, vnics)?;
    Ok(parts)
}

/// Set before the router's links exist, so they inherit the `default` values.
fn configure_router_sysctls(router: &Netns) -> Result<()> {
    router.sysctl("net/ipv4/ip_forward", "1")?;
    // OCI's check is the nftables one; the kernel's reverse-path filter must not drop
    // (uncounted) what the check would have let through, or hide what it drops.
    for scope in ["all", "default"] {
        router.sysctl(&format!("net/ipv4/conf/{scope}/rp_filter"), "0")?;
        // OCI's virtual router never sends redirects.
        router.sysctl(&format!("net/ipv4/conf/{scope}/send_redirects"), "0")?;
    }
    Ok(())
}

/// The node's VNICs and their router ends, and the node's routes and sysctls.
fn wire_node(parts: &Parts, vnics: &[Vnic]) -> Result<()> {
    let (node, router) = (&parts.node, &parts.router);
    let primary = vnics
        .first()
        .context("the lab needs at least the primary VNIC")?;
    for vnic in vnics {
        // Created from inside the node namespace with the peer placed straight into the
        // router's, so neither end ever exists in the root namespace.
        node.add_veth_into(
            vnic.ifname,
            &vnic.mac.to_string(),
            LINK_MTU,
            vnic.router_ifname,
            router,
        )
        .with_context(|| format!("creating VNIC {} link", vnic.index))?;
        let cidr = |ip: Ipv4Addr| format!("{ip}/{}", vnic.prefix);
        node.ip_batch(&[
            &["addr", "add", &cidr(vnic.ip), "dev", vnic.ifname],
            &["link", "set", vnic.ifname, "up"],
        ])?;
        router.ip_batch(&[
            &[
                "addr",
                "add",
                &cidr(vnic.router_ip),
                "dev",
                vnic.router_ifname,
            ],
            &["link", "set", vnic.router_ifname, "up"],
        ])?;
    }
    node.ip(&[
        "route",
        "add",
        "default",
        "via",
        &primary.router_ip.to_string(),
        "dev",
        primary.ifname,
    ])?;
    node.sysctl("net/ipv4/ip_forward", "1")?;
    // Loose mode, as the agent keeps it: replies to pods on a VNIC the default route
    // does not point at must not be dropped.
    node.sysctl("net/ipv4/conf/all/rp_filter", "2")?;
    for vnic in vnics {
        node.sysctl(&format!("net/ipv4/conf/{}/rp_filter", vnic.ifname), "2")?;
    }
    Ok(())
}

/// A bare-metal node's second physical NIC: up at the jumbo MTU, no address (no VNIC is
/// untagged on it); the router's end is up without an address too, each VNIC tagged on it
/// gets its own VLAN interface there.
pub(super) fn wire_second_nic(node: &Netns, router: &Netns, nic: &PhysicalNic) -> Result<()> {
    node.add_veth_into(
        nic.ifname,
        &nic.mac.to_string(),
        LINK_MTU,
        nic.router_ifname,
        router,
    )
    .with_context(|| format!("creating physical NIC {} ({})", nic.nic_index, nic.ifname))?;
    node.ip(&["link", "set", nic.ifname, "up"])?;
    node.sysctl(&format!("net/ipv4/conf/{}/rp_filter", nic.ifname), "2")?;
    router.ip(&["link", "set", nic.router_ifname, "up"])?;
    Ok(())
}

/// A host namespace (`eth0`) on its own subnet behind the router's interface `link`.
fn wire_host(
    router: &Netns,
    link: &str,
    router_mtu: u32,
    gateway: Ipv4Addr,
    host: &Netns,
    host_ip: Ipv4Addr,
    prefix: u8,
) -> Result<()> {
    router
        .ip(&[
            "link",
            "add",
            link,
            "mtu",
            &router_mtu.to_string(),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "mtu",
            &LINK_MTU.to_string(),
            "netns",
            host.name(),
        ])
        .with_context(|| format!("creating link {link} to {}", host.name()))?;
    router.ip_batch(&[
        &["addr", "add", &format!("{gateway}/{prefix}"), "dev", link],
        &["link", "set", link, "up"],
    ])?;
    host.ip_batch(&[
        &["addr", "add", &format!("{host_ip}/{prefix}"), "dev", "eth0"],
        &["link", "set", "eth0", "up"],
        &["route", "add", "default", "via", &gateway.to_string()],
    ])?;
    Ok(())
}

/// Deletes namespaces named `PREFIX<pid>x…` whose creating process no longer exists, so a
/// lab killed with SIGKILL (no destructors) does not leak into the next run.
pub(super) fn sweep_stale(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.split_once('x'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!("lab: deleting namespace {name} left by dead process {pid}");
        if let Err(error) =
            super::process::run(std::process::Command::new("ip").args(["netns", "delete", &name]))
        {
            eprintln!("lab cleanup: {error:#}");
        }
    }
}
