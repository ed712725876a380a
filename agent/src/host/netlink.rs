//! The node's links, addresses and neighbours over rtnetlink (no shelling out to `ip`).
//! A [`Netlink`] handle works in the network namespace of the thread that opened it.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt as _;
use rtnetlink::{
    Handle, LinkUnspec,
    packet_route::{
        link::{AfSpecInet, AfSpecUnspec, InetDevConf, LinkAttribute, LinkFlags, LinkMessage},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState},
        tc::{TcAttribute, TcFilterBpfOption, TcMessage, TcOption},
    },
};

/// What failed, on which interface.
/// How long [`Netlink::resolved_neighbour`] callers wait for the ARP answer they asked for
/// before reading the neighbour table again (a later answer is read at their next pass).
pub const ROUTER_ARP_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot open a netlink socket: {0}")]
    Connect(#[source] std::io::Error),
    #[error("netlink {operation} on {interface}: {source}")]
    Netlink {
        operation: &'static str,
        interface: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("the kernel reports no IPv4 settings for {interface} (is IPv4 disabled on it?)")]
    NoIpv4Conf { interface: String },
    #[error(
        "no interface has MAC {mac}; the VNIC may still be attaching (OCI reported it, the kernel has not shown it yet)"
    )]
    NoSuchMac { mac: String },
    #[error("no interface is named {interface}")]
    NoSuchLink { interface: String },
}

/// A link as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    pub up: bool,
}

#[cfg(test)]
impl Link {
    /// An up link with no MAC, for tests of what is derived from links.
    pub fn for_test(index: u32, name: &str) -> Self {
        Self {
            index,
            name: name.into(),
            mac: [0; 6],
            mtu: 9000,
            up: true,
        }
    }
}

/// Notifications of link changes in this network namespace (an interface appearing,
/// going, being renamed or changing state): the kernel's `RTNLGRP_LINK` multicast group.
pub struct LinkEvents {
    messages: futures::channel::mpsc::UnboundedReceiver<(
        rtnetlink::packet_core::NetlinkMessage<rtnetlink::packet_route::RouteNetlinkMessage>,
        rtnetlink::sys::SocketAddr,
    )>,
}

impl LinkEvents {
    /// Subscribes. Needs a Tokio runtime; the socket lives as long as the value.
    pub fn subscribe() -> Result<Self, HostError> {
        let (connection, _handle, messages) =
            rtnetlink::new_multicast_connection(&[rtnetlink::MulticastGroup::Link])
                .map_err(HostError::Connect)?;
        tokio::spawn(connection);
        Ok(Self { messages })
    }

    /// Waits for the next change, and takes the burst of notifications that came with it
    /// (a VNIC's arrival is several). `None` once the socket has closed.
    pub async fn changed(&mut self) -> Option<()> {
        use futures::{FutureExt as _, StreamExt as _};
        self.messages.next().await?;
        while let Some(Some(_)) = self.messages.next().now_or_never() {}
        Some(())
    }
}

/// An rtnetlink connection.
#[derive(Clone)]
pub struct Netlink {
    pub(super) handle: Handle,
}

/// Formats a MAC the way OCI and `ip` do.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff` (any case).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split([':', '-']);
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

pub(super) fn link_of(message: &LinkMessage) -> Option<Link> {
    let mut link = Link {
        index: message.header.index,
        name: String::new(),
        mac: [0; 6],
        mtu: 0,
        up: message.header.flags.contains(LinkFlags::Up),
    };
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => link.name.clone_from(name),
            LinkAttribute::Address(bytes) if bytes.len() == 6 => link.mac.copy_from_slice(bytes),
            LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
            _ => {}
        }
    }
    (!link.name.is_empty()).then_some(link)
}

impl Netlink {
    /// Opens a connection in the current thread's network namespace (must be called
    /// inside a tokio runtime).
    pub fn connect() -> Result<Self, HostError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(HostError::Connect)?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    pub(super) fn error(
        operation: &'static str,
        interface: &str,
    ) -> impl FnOnce(rtnetlink::Error) -> HostError {
        let interface = interface.to_owned();
        move |source| HostError::Netlink {
            operation,
            interface,
            source: Box::new(source),
        }
    }

    /// Every link.
    pub async fn links(&self) -> Result<Vec<Link>, HostError> {
        let messages: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(Self::error("link dump", "*"))?;
        Ok(messages.iter().filter_map(link_of).collect())
    }

    /// The link whose MAC is `mac` (how OCI identifies a VNIC's interface).
    pub async fn link_by_mac(&self, mac: [u8; 6]) -> Result<Link, HostError> {
        self.links()
            .await?
            .into_iter()
            .find(|l| l.mac == mac)
            .ok_or_else(|| HostError::NoSuchMac {
                mac: format_mac(&mac),
            })
    }

    /// Brings `link` up with `mtu` and makes sure it holds `addr/prefix_len`. Secondary
    /// VNICs are not configured by the OS image: whoever attaches one must do this.
    pub async fn configure_vnic(
        &self,
        link: &Link,
        mtu: u32,
        addr: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), HostError> {
        let message = LinkUnspec::new_with_index(link.index).mtu(mtu).up().build();
        self.handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(Self::error("link set up/mtu", &link.name))?;
        self.handle
            .address()
            .add(link.index, IpAddr::V4(addr), prefix_len)
            .replace()
            .execute()
            .await
            .map_err(Self::error("address add", &link.name))
    }

    /// `link`'s IPv4 settings (its `net.ipv4.conf.<name>.*`), read from `RTM_GETLINK`'s
    /// `IFLA_AF_SPEC` → `AF_INET` → `IFLA_INET_CONF`, so /proc/sys need not be mounted.
    pub async fn ipv4_conf(&self, link: &Link) -> Result<InetDevConf, HostError> {
        let messages: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .match_index(link.index)
            .execute()
            .try_collect()
            .await
            .map_err(Self::error("link get", &link.name))?;
        messages
            .iter()
            .flat_map(|m| &m.attributes)
            .filter_map(|a| match a {
                LinkAttribute::AfSpecUnspec(families) => Some(families),
                _ => None,
            })
            .flatten()
            .filter_map(|f| match f {
                AfSpecUnspec::Inet(inet) => Some(inet),
                _ => None,
            })
            .flatten()
            .find_map(|a| match a {
                AfSpecInet::DevConf(conf) => Some(*conf),
                _ => None,
            })
            .ok_or_else(|| HostError::NoIpv4Conf {
                interface: link.name.clone(),
            })
    }

    /// Sets the non-zero fields of `changes` in `link`'s IPv4 settings with `RTM_SETLINK`
    /// (needs `CAP_NET_ADMIN` only, unlike writing a read-only /proc/sys). Zero fields are
    /// left as they are: the kernel message carries only the fields being set.
    pub async fn set_ipv4_conf(&self, link: &Link, changes: InetDevConf) -> Result<(), HostError> {
        let mut message = LinkUnspec::new_with_index(link.index).build();
        message
            .attributes
            .push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet(vec![
                AfSpecInet::DevConfRequest(changes),
            ])]));
        self.handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(Self::error("link set IPv4 settings", &link.name))
    }

    /// The MAC of `ip` in `link`'s neighbour table, when resolved.
    pub async fn neighbour(&self, link: &Link, ip: Ipv4Addr) -> Result<Option<[u8; 6]>, HostError> {
        let mut entries = self.handle.neighbours().get().execute();
        while let Some(entry) = entries
            .try_next()
            .await
            .map_err(Self::error("neighbour dump", &link.name))?
        {
            let usable = matches!(
                entry.header.state,
                NeighbourState::Reachable
                    | NeighbourState::Stale
                    | NeighbourState::Permanent
                    | NeighbourState::Delay
                    | NeighbourState::Probe
            );
            if entry.header.ifindex != link.index || !usable {
                continue;
            }
            let mut dst = None;
            let mut lladdr = None;
            for attribute in &entry.attributes {
                match attribute {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => dst = Some(*a),
                    NeighbourAttribute::LinkLayerAddress(bytes) if bytes.len() == 6 => {
                        let mut mac = [0; 6];
                        mac.copy_from_slice(bytes);
                        lladdr = Some(mac);
                    }
                    _ => {}
                }
            }
            if dst == Some(ip) {
                return Ok(lladdr);
            }
        }
        Ok(None)
    }

    /// The MAC of `ip` on `link`; when the kernel has not resolved it, asks it to
    /// ([`Self::resolve_neighbour`]) and looks again after `wait`. `None` while unresolved.
    pub async fn resolved_neighbour(
        &self,
        link: &Link,
        ip: Ipv4Addr,
        wait: std::time::Duration,
    ) -> Result<Option<[u8; 6]>, HostError> {
        if let Some(mac) = self.neighbour(link, ip).await? {
            return Ok(Some(mac));
        }
        self.resolve_neighbour(link, ip).await?;
        tokio::time::sleep(wait).await;
        self.neighbour(link, ip).await
    }

    /// Asks the kernel to resolve `ip` on `link` now (ARP), as a packet sent there would
    /// (`NTF_USE`); an entry that is already resolved is left as it is. The answer lands in
    /// the neighbour table, where [`Self::neighbour`] reads it.
    pub async fn resolve_neighbour(&self, link: &Link, ip: Ipv4Addr) -> Result<(), HostError> {
        self.handle
            .neighbours()
            .add(link.index, IpAddr::V4(ip))
            // With `NTF_USE` the state only decides whether a new entry is exempt from the
            // neighbour GC: a learned entry is not.
            .state(NeighbourState::None)
            .flags(NeighbourFlags::Use)
            .replace()
            .execute()
            .await
            .map_err(Self::error("neighbour resolve", &link.name))
    }

    /// The id of the BPF program the TC filter at `priority`/`handle` on the clsact
    /// `hook` of `ifindex` runs; `None` when there is no such filter (or no clsact qdisc,
    /// or no such interface any more).
    pub async fn tc_bpf_program(
        &self,
        ifindex: u32,
        hook: TcHook,
        priority: u16,
        handle: u32,
    ) -> Result<Option<u32>, HostError> {
        let index = i32::try_from(ifindex).unwrap_or(i32::MAX);
        let request = self.handle.clone().traffic_filter(index).get();
        let request = match hook {
            TcHook::Ingress => request.ingress(),
            TcHook::Egress => request.egress(),
        };
        let messages: Vec<TcMessage> = match request.execute().try_collect().await {
            Ok(messages) => messages,
            // No clsact qdisc (EINVAL) or the interface went (ENODEV): no filter.
            Err(rtnetlink::Error::NetlinkError(e))
                if matches!(
                    e.raw_code().abs(),
                    libc::EINVAL | libc::ENODEV | libc::ENOENT
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(Self::error("tc filter dump", &ifindex.to_string())(e)),
        };
        for message in &messages {
            // tcm_info carries the priority in its upper 16 bits.
            if (message.header.info >> 16) as u16 != priority
                || u32::from(message.header.handle) != handle
            {
                continue;
            }
            for attribute in &message.attributes {
                if let TcAttribute::Options(options) = attribute {
                    for option in options {
                        if let TcOption::Bpf(TcFilterBpfOption::ProgId(id)) = option {
                            return Ok(Some(*id));
                        }
                    }
                }
            }
        }
        Ok(None)
    }
}

/// A clsact hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcHook {
    Ingress,
    Egress,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_format_round_trip() {
        let mac = parse_mac("02:00:17:0A:bc:01").expect("valid");
        assert_eq!(format_mac(&mac), "02:00:17:0a:bc:01");
        for bad in [
            "",
            "02:00:17:0a:bc",
            "02:00:17:0a:bc:01:02",
            "zz:00:17:0a:bc:01",
        ] {
            assert!(parse_mac(bad).is_none(), "{bad:?} must be rejected");
        }
    }
}
