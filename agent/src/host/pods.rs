//! The pods the node itself shows, whatever the checkpoint says: each `vcn…` host veth and
//! the /32 route to a pod address through it, and the pinned `endpoints` map's pod entries.
//! Read at start, so a lost or stale checkpoint never frees a running pod's address (see
//! [`crate::ipam::holders`]).
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use vcnpath_common::maps::{ENDPOINT_F_IMDS, Endpoint};

use crate::cni::names::HOST_VETH_PREFIX;
use crate::ipam::HostHolder;

use super::netlink::{Link, Netlink};

/// Every pod address the node shows: from the /32 routes through `vcn…` veths (`routes`:
/// destination, prefix, output ifindex) and the pod entries of the `endpoints` map
/// (address → the VNIC ifindex it leaves by, and whether it may reach IMDS), with `links`
/// naming the interfaces.
pub fn holders(
    links: &[Link],
    routes: &[(Ipv4Addr, u8, Option<u32>)],
    endpoints: &BTreeMap<Ipv4Addr, Endpoint>,
) -> Vec<HostHolder> {
    let name = |index: u32| {
        links
            .iter()
            .find(|l| l.index == index)
            .map(|l| l.name.clone())
    };
    let mut found: BTreeMap<Ipv4Addr, HostHolder> = BTreeMap::new();
    for &(ip, prefix, oif) in routes {
        let Some(veth) = oif.and_then(name) else {
            continue;
        };
        if prefix == 32 && veth.starts_with(HOST_VETH_PREFIX) {
            found.insert(
                ip,
                HostHolder {
                    ip,
                    veth: Some(veth),
                    interface: None,
                    imds: false,
                },
            );
        }
    }
    for (&ip, endpoint) in endpoints {
        let holder = found.entry(ip).or_insert(HostHolder {
            ip,
            veth: None,
            interface: None,
            imds: false,
        });
        holder.interface = name(endpoint.ifindex);
        holder.imds = endpoint.flags & ENDPOINT_F_IMDS != 0;
    }
    found.into_values().collect()
}

/// [`holders`] from the node's links and main routing table, read over rtnetlink.
pub async fn scan(
    netlink: &Netlink,
    endpoints: &BTreeMap<Ipv4Addr, Endpoint>,
) -> anyhow::Result<Vec<HostHolder>> {
    let links = netlink.links().await?;
    let routes: Vec<_> = crate::cni::netlink::Netlink::current()?
        .routes()
        .await?
        .into_iter()
        .map(|r| (r.dst, r.prefix, r.oif))
        .collect();
    Ok(holders(&links, &routes, endpoints))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str) -> Link {
        Link::for_test(index, name)
    }

    #[test]
    fn routes_through_pod_veths_and_pod_endpoints_are_holders() {
        let links = [
            link(2, "ens3"),
            link(7, "vcn0123456789ab"),
            link(8, "docker0"),
        ];
        let pod: Ipv4Addr = "10.0.0.20".parse().unwrap();
        let routes = [
            (pod, 32, Some(7)),
            // Not a pod veth, not a /32, or no interface: not a pod.
            ("172.17.0.2".parse().unwrap(), 32, Some(8)),
            ("10.0.0.0".parse().unwrap(), 24, Some(2)),
            ("10.0.0.30".parse().unwrap(), 32, None),
        ];
        let only_mapped: Ipv4Addr = "10.0.0.21".parse().unwrap();
        let endpoint = |flags| Endpoint {
            ifindex: 2,
            kind: vcnpath_common::maps::ENDPOINT_KIND_POD,
            flags,
            inbound_ports: 0,
        };
        let endpoints =
            BTreeMap::from([(pod, endpoint(ENDPOINT_F_IMDS)), (only_mapped, endpoint(0))]);
        assert_eq!(
            holders(&links, &routes, &endpoints),
            vec![
                HostHolder {
                    ip: pod,
                    veth: Some("vcn0123456789ab".into()),
                    interface: Some("ens3".into()),
                    imds: true,
                },
                HostHolder {
                    ip: only_mapped,
                    veth: None,
                    interface: Some("ens3".into()),
                    imds: false,
                },
            ]
        );
    }
}
