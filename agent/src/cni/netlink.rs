//! The kernel side of the plugin, over rtnetlink: one [`Netlink`] per network namespace
//! (the socket belongs to the namespace it was opened in), with the few operations ADD,
//! DEL and CHECK need. Nothing here shells out to `ip`.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsFd, AsRawFd},
};

use futures::TryStreamExt as _;
use rtnetlink::{
    Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
    packet_route::{
        address::AddressAttribute,
        link::{InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkMessage},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteScope},
    },
};

/// A failed netlink request: which step, on which object, and the kernel's answer.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {source}")]
pub struct NetlinkError {
    pub step: String,
    #[source]
    pub source: rtnetlink::Error,
}

impl NetlinkError {
    /// The kernel's errno, when the kernel refused the request.
    pub fn errno(&self) -> Option<i32> {
        match &self.source {
            rtnetlink::Error::NetlinkError(message) => message.code.map(|c| c.get().abs()),
            _ => None,
        }
    }
}

fn step(step: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let step = step.into();
    move |source| NetlinkError { step, source }
}

/// An interface as the checks need to see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub up: bool,
    pub mtu: Option<u32>,
    pub mac: Option<[u8; 6]>,
}

impl Link {
    fn from_message(message: &LinkMessage) -> Self {
        let mut link = Link {
            index: message.header.index,
            up: message.header.flags.contains(LinkFlags::Up),
            mtu: None,
            mac: None,
        };
        for attribute in &message.attributes {
            match attribute {
                LinkAttribute::Mtu(mtu) => link.mtu = Some(*mtu),
                LinkAttribute::Address(bytes) => link.mac = bytes.as_slice().try_into().ok(),
                _ => {}
            }
        }
        link
    }
}

/// An IPv4 route, reduced to what the plugin sets and checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub scope_link: bool,
}

/// A rtnetlink connection bound to one network namespace.
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// A connection in the namespace this process runs in (the node's). Needs a Tokio
    /// runtime; the connection task runs on it until the handle is dropped.
    pub fn current() -> std::io::Result<Self> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// A connection inside the namespace `ns` (an open `/var/run/netns/…` or
    /// `/proc/PID/ns/net`). The socket is opened by a short-lived thread that entered
    /// `ns`, so this process never leaves its own namespace; a netlink socket keeps the
    /// namespace it was created in for its whole life.
    pub fn in_netns(ns: &File) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Handle::current();
        let fd = ns.as_fd();
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns only reads the descriptor, which `ns` keeps open for
                    // the call, and changes the namespace of this thread alone, which
                    // ends right after opening the socket.
                    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let _entered = runtime.enter();
                    let (connection, handle, _) = rtnetlink::new_connection()?;
                    runtime.spawn(connection);
                    Ok(Self { handle })
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// The interface `name`, or `None` if there is none.
    pub async fn link(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(found) => Ok(found.as_ref().map(Link::from_message)),
            Err(error) => {
                let error = step(format!("looking up interface {name}"))(error);
                if error.errno() == Some(libc::ENODEV) {
                    Ok(None)
                } else {
                    Err(error)
                }
            }
        }
    }

    /// Creates the veth pair `host` (here) ↔ `peer` directly inside the namespace `ns`,
    /// so the pod's end never exists under a temporary name in the node namespace.
    pub async fn create_veth(&self, host: &str, peer: &str, ns: &File) -> Result<(), NetlinkError> {
        let peer_message = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer.to_owned())
            .setns_by_fd(ns.as_raw_fd())
            .build();
        let message = LinkVeth::new(host, peer)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_message)))
            .build();
        self.handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(step(format!(
                "creating veth {host} with peer {peer} in the pod's netns"
            )))
    }

    /// Deletes interface `name`; `Ok(false)` if it did not exist.
    pub async fn delete_link(&self, name: &str) -> Result<bool, NetlinkError> {
        let Some(link) = self.link(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(link.index).execute().await {
            Ok(()) => Ok(true),
            Err(error) => {
                let error = step(format!("deleting interface {name}"))(error);
                // Gone in between (e.g. its netns was deleted): the goal is reached.
                if error.errno() == Some(libc::ENODEV) {
                    Ok(false)
                } else {
                    Err(error)
                }
            }
        }
    }

    /// Sets the MTU of interface `index` and brings it up.
    pub async fn set_mtu_up(&self, index: u32, name: &str, mtu: u32) -> Result<(), NetlinkError> {
        let message = LinkUnspec::new_with_index(index).mtu(mtu).up().build();
        self.handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(step(format!(
                "setting MTU {mtu} on {name} and bringing it up"
            )))
    }

    /// Adds `ip`/`prefix` to interface `index`.
    pub async fn add_address(
        &self,
        index: u32,
        name: &str,
        ip: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetlinkError> {
        self.handle
            .address()
            .add(index, IpAddr::V4(ip), prefix)
            .execute()
            .await
            .map_err(step(format!("adding {ip}/{prefix} to {name}")))
    }

    /// The IPv4 addresses (with prefix) of interface `index`.
    pub async fn addresses(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetlinkError> {
        let messages: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(step("listing addresses"))?;
        Ok(messages
            .iter()
            .flat_map(|m| {
                m.attributes.iter().filter_map(move |a| match a {
                    AddressAttribute::Address(IpAddr::V4(ip)) => Some((*ip, m.header.prefix_len)),
                    _ => None,
                })
            })
            .collect())
    }

    /// Adds (or replaces) the route `dst`/`prefix` through interface `index`, via
    /// `gateway` or, without one, directly on the link (scope link).
    pub async fn replace_route(
        &self,
        index: u32,
        dst: Ipv4Addr,
        prefix: u8,
        gateway: Option<Ipv4Addr>,
    ) -> Result<(), NetlinkError> {
        let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, prefix)
            .output_interface(index);
        builder = match gateway {
            Some(gw) => builder.gateway(gw),
            None => builder.scope(RouteScope::Link),
        };
        let via = gateway.map_or_else(|| "on link".to_owned(), |gw| format!("via {gw}"));
        self.handle
            .route()
            .add(builder.build())
            .replace()
            .execute()
            .await
            .map_err(step(format!(
                "adding route {dst}/{prefix} {via} (ifindex {index})"
            )))
    }

    /// Every IPv4 route of the main table.
    pub async fn routes(&self) -> Result<Vec<Route>, NetlinkError> {
        let messages: Vec<_> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(step("listing routes"))?;
        Ok(messages
            .iter()
            .filter(|m| m.header.table == 254)
            .map(|m| {
                let mut route = Route {
                    dst: Ipv4Addr::UNSPECIFIED,
                    prefix: m.header.destination_prefix_length,
                    gateway: None,
                    oif: None,
                    scope_link: m.header.scope == RouteScope::Link,
                };
                for attribute in &m.attributes {
                    match attribute {
                        RouteAttribute::Destination(RouteAddress::Inet(ip)) => route.dst = *ip,
                        RouteAttribute::Gateway(RouteAddress::Inet(ip)) => {
                            route.gateway = Some(*ip);
                        }
                        RouteAttribute::Oif(index) => route.oif = Some(*index),
                        _ => {}
                    }
                }
                route
            })
            .collect())
    }

    /// Adds (or replaces) a permanent neighbour entry `ip` → `mac` on interface `index`.
    pub async fn permanent_neighbour(
        &self,
        index: u32,
        ip: Ipv4Addr,
        mac: [u8; 6],
    ) -> Result<(), NetlinkError> {
        self.handle
            .neighbours()
            .add(index, IpAddr::V4(ip))
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(step(format!(
                "adding permanent neighbour {ip} (ifindex {index})"
            )))
    }

    /// The permanent IPv4 neighbour entries of interface `index`: (address, MAC).
    pub async fn permanent_neighbours(
        &self,
        index: u32,
    ) -> Result<Vec<(Ipv4Addr, Vec<u8>)>, NetlinkError> {
        let messages: Vec<_> = self
            .handle
            .neighbours()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(step("listing neighbours"))?;
        Ok(messages
            .iter()
            .filter(|m| m.header.ifindex == index && m.header.state == NeighbourState::Permanent)
            .filter_map(|m| {
                let mut ip = None;
                let mut mac = Vec::new();
                for attribute in &m.attributes {
                    match attribute {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => ip = Some(*a),
                        NeighbourAttribute::LinkLayerAddress(l) => mac.clone_from(l),
                        _ => {}
                    }
                }
                ip.map(|ip| (ip, mac))
            })
            .collect())
    }
}
