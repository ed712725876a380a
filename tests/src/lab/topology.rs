//! The lab's fixed addressing plan. The datapath tests' configuration uses the same
//! values, so they are constants rather than options.

use std::fmt;
use std::net::Ipv4Addr;

/// The VCN's first CIDR block (the simulator's lab configuration adds `10.1.0.0/16`).
pub const VCN_CIDR: &str = "10.0.0.0/16";

/// MTU of every lab link except, optionally, the router's side of the internet link.
pub const LINK_MTU: u32 = 9000;

/// The link-local gateway pods route through, answered by a static neighbour entry.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// A host in the peer subnet (10.0.2.0/24), inside the VCN but not on the node.
pub const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 50);
/// The virtual router's address in the peer subnet.
pub const PEER_ROUTER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
/// Prefix length of the peer subnet.
pub const PEER_PREFIX: u8 = 24;

/// The "internet" host, outside the VCN and reachable only through the router.
pub const INET_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The router's address on the internet link.
pub const INET_ROUTER_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// Prefix length of the internet link.
pub const INET_PREFIX: u8 = 24;

/// A MAC address (shown as `02:00:0a:00:00:0a`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, byte) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Mac {
    type Err = anyhow::Error;

    /// Six `:`-separated hex bytes, either case (the simulator reports upper case).
    fn from_str(text: &str) -> anyhow::Result<Self> {
        let mut mac = [0_u8; 6];
        let mut parts = text.split(':');
        for byte in &mut mac {
            let part = parts
                .next()
                .ok_or_else(|| anyhow::anyhow!("MAC {text:?}: fewer than 6 bytes"))?;
            *byte = u8::from_str_radix(part, 16)
                .map_err(|e| anyhow::anyhow!("MAC {text:?}: byte {part:?}: {e}"))?;
        }
        if parts.next().is_some() {
            anyhow::bail!("MAC {text:?}: more than 6 bytes");
        }
        Ok(Self(mac))
    }
}

/// One VNIC of the node: its interface in the node namespace, the router's end of the
/// same link, and the subnet it lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vnic {
    /// Position in the node's VNIC list (0 is the primary VNIC).
    pub index: usize,
    /// Interface name in the node namespace.
    pub ifname: &'static str,
    /// The router's end of the link, where the source/destination check applies.
    pub router_ifname: &'static str,
    pub mac: Mac,
    /// The VNIC's primary private IP.
    pub ip: Ipv4Addr,
    /// The subnet's network address and prefix length.
    pub subnet: Ipv4Addr,
    pub prefix: u8,
    /// The subnet's virtual router (the first host address, as in OCI).
    pub router_ip: Ipv4Addr,
}

impl Vnic {
    /// `10.0.0.0/24` style.
    pub fn subnet_cidr(&self) -> String {
        format!("{}/{}", self.subnet, self.prefix)
    }
}

/// The node's VNICs: 0 in subnet A, 1 in subnet B.
pub const VNICS: [Vnic; 2] = [
    Vnic {
        index: 0,
        ifname: "eth0",
        router_ifname: "r0",
        mac: Mac([0x02, 0x00, 0x0a, 0x00, 0x00, 0x0a]),
        ip: Ipv4Addr::new(10, 0, 0, 10),
        subnet: Ipv4Addr::new(10, 0, 0, 0),
        prefix: 24,
        router_ip: Ipv4Addr::new(10, 0, 0, 1),
    },
    Vnic {
        index: 1,
        ifname: "eth1",
        router_ifname: "r1",
        mac: Mac([0x02, 0x00, 0x0a, 0x00, 0x01, 0x0a]),
        ip: Ipv4Addr::new(10, 0, 1, 10),
        subnet: Ipv4Addr::new(10, 0, 1, 0),
        prefix: 24,
        router_ip: Ipv4Addr::new(10, 0, 1, 1),
    },
];

/// The primary VNIC as a VM guest with predictable interface names sees it (`ens3`, the
/// name Oracle's VM images give the first NIC): the simulator-driven lab's node starts
/// with this and nothing else.
pub static GUEST_PRIMARY: [Vnic; 1] = [Vnic {
    ifname: "ens3",
    ..VNICS[0]
}];

/// The primary VNIC of a bare-metal node: untagged on physical NIC 0, whose MAC it has (in
/// cloud-init's BM fixture the primary's MAC is the NIC's own, `90:e2:ba:…`). The names
/// `ens2f0`/`ens2f1` (two ports of one PCI card) are the lab's model, not a documented rule.
pub static BM_PRIMARY: [Vnic; 1] = [Vnic {
    ifname: "ens2f0",
    ..VNICS[0]
}];

/// One physical NIC of a bare-metal node: its interface in the node, the router's end of
/// its cable, and its own MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhysicalNic {
    /// OCI's `nicIndex`.
    pub nic_index: u32,
    pub ifname: &'static str,
    pub router_ifname: &'static str,
    pub mac: Mac,
}

/// The two physical NICs of a bare-metal node (`BM.*` shapes with two active NICs). NIC 0
/// also carries the primary VNIC untagged, so its router end is the primary's port `r0`;
/// NIC 1 carries only VLAN-tagged secondary VNICs.
pub const BM_NICS: [PhysicalNic; 2] = [
    PhysicalNic {
        nic_index: 0,
        ifname: "ens2f0",
        router_ifname: "r0",
        mac: VNICS[0].mac,
    },
    PhysicalNic {
        nic_index: 1,
        ifname: "ens2f1",
        router_ifname: "rnic1",
        mac: Mac([0x02, 0x00, 0x0a, 0x00, 0xff, 0x01]),
    },
];

/// The VNIC at `index`, or an error naming the valid range.
pub fn vnic(index: usize) -> anyhow::Result<&'static Vnic> {
    VNICS
        .get(index)
        .ok_or_else(|| anyhow::anyhow!("no VNIC {index}: the lab has {}", VNICS.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parses_what_it_prints_and_the_simulators_upper_case() {
        let mac: Mac = "02:00:17:0A:ff:01".parse().unwrap();
        assert_eq!(mac, Mac([2, 0, 0x17, 0x0a, 0xff, 1]));
        assert_eq!(mac.to_string().parse::<Mac>().unwrap(), mac);
        for bad in [
            "",
            "02:00:17:0a:ff",
            "02:00:17:0a:ff:01:02",
            "02:00:17:0a:ff:zz",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad:?} should not parse");
        }
    }
}
