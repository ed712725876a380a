//! What CHECK compares: the pod's interface, address, routes and gateway neighbour, and
//! the host veth with its route to the pod. Differences are collected, not fatal, so one
//! CHECK tells an operator everything that drifted.

use std::net::Ipv4Addr;

use super::{
    netlink::{Netlink, NetlinkError},
    result::{GATEWAY, format_mac},
};
use crate::ipam::Allocation;

/// Appends to `problems` every way the current state differs from what ADD sets up.
pub async fn inspect(
    node: &Netlink,
    pod_side: &Netlink,
    ifname: &str,
    host_veth: &str,
    allocation: &Allocation,
    mtu: u32,
    problems: &mut Vec<String>,
) -> Result<(), NetlinkError> {
    let ip = allocation.ip;
    let host = node.link(host_veth).await?;
    match &host {
        None => problems.push(format!("host veth {host_veth} is missing")),
        Some(link) => {
            if !link.up {
                problems.push(format!("host veth {host_veth} is down"));
            }
            let routes = node.routes().await?;
            if !routes
                .iter()
                .any(|r| r.dst == ip && r.prefix == 32 && r.oif == Some(link.index))
            {
                problems.push(format!("the node has no route {ip}/32 via {host_veth}"));
            }
        }
    }
    let Some(pod) = pod_side.link(ifname).await? else {
        problems.push(format!("{ifname} is missing in the pod's netns"));
        return Ok(());
    };
    if !pod.up {
        problems.push(format!("{ifname} is down"));
    }
    if pod.mtu != Some(mtu) {
        problems.push(format!("{ifname} has MTU {:?}, expected {mtu}", pod.mtu));
    }
    if !pod_side.addresses(pod.index).await?.contains(&(ip, 32)) {
        problems.push(format!("{ifname} does not have {ip}/32"));
    }
    let routes = pod_side.routes().await?;
    let on_pod = |dst: Ipv4Addr, prefix: u8| {
        routes
            .iter()
            .find(|r| r.dst == dst && r.prefix == prefix && r.oif == Some(pod.index))
    };
    match on_pod(GATEWAY, 32) {
        Some(route) if route.scope_link && route.gateway.is_none() => {}
        _ => problems.push(format!("no route {GATEWAY} scope link dev {ifname}")),
    }
    match on_pod(Ipv4Addr::UNSPECIFIED, 0) {
        Some(route) if route.gateway == Some(GATEWAY) => {}
        _ => problems.push(format!("no default route via {GATEWAY} dev {ifname}")),
    }
    let neighbours = pod_side.permanent_neighbours(pod.index).await?;
    let expected_mac = host.as_ref().and_then(|h| h.mac);
    match neighbours.iter().find(|(addr, _)| *addr == GATEWAY) {
        None => problems.push(format!("no permanent neighbour {GATEWAY} on {ifname}")),
        Some((_, mac)) => {
            if let Some(expected) = expected_mac
                && mac.as_slice() != expected
            {
                {
                    problems.push(format!(
                        "neighbour {GATEWAY} points at {}, not {host_veth}'s {}",
                        mac.iter()
                            .map(|b| format!("{b:02x}"))
                            .collect::<Vec<_>>()
                            .join(":"),
                        format_mac(expected)
                    ));
                }
            }
        }
    }
    Ok(())
}
