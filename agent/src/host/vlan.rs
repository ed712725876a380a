//! Bare-metal VNIC interfaces. On a `BM.*` shape a secondary VNIC has no NIC of its own: it
//! arrives as 802.1Q frames tagged with the attachment's `vlanTag` on the physical NIC of
//! its `nicIndex`, and the guest builds a macvlan with the VNIC's MAC on that NIC and a VLAN
//! `vlanTag` on the macvlan, and addresses the VLAN (Oracle's oci-utils,
//! `lib/oci_utils/impl/network_interface.py`, `NetworkInterfaceSetupHelper.setup`). The names
//! are oci-utils' too: macvlan `<nic>.<tag>`, VLAN `<nic>v<tag>`.
//!
//! Everything here is diff-based over rtnetlink: [`Netlink::ensure_vlan_vnic`] adopts a
//! pair that is already right (an agent restart), replaces one that is not, and creates
//! what is missing; [`Netlink::vlan_vnics`] lists the pairs this module made, so the caller
//! can remove those whose VNIC is gone.

use futures::TryStreamExt as _;
use rtnetlink::{
    LinkMacVlan, LinkUnspec, LinkVlan,
    packet_route::link::{
        InfoData, InfoKind, InfoVlan, LinkAttribute, LinkInfo, LinkMessage, MacVlanMode,
    },
};

use super::netlink::{HostError, Link, Netlink, link_of};

/// The kernel's limit on interface names, without the NUL.
const IFNAME_MAX: usize = 15;

/// The interfaces that carry one bare-metal VNIC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VlanVnic {
    /// The VLAN interface: the VNIC's interface (its addresses, the datapath's programs).
    pub vlan: Link,
    /// The macvlan under it, on the physical NIC, with the VNIC's MAC.
    pub macvlan: Link,
    /// The physical NIC's interface index.
    pub nic_index: u32,
    pub tag: u16,
}

/// oci-utils' names for the macvlan and the VLAN of tag `tag` on `nic`; when they would not
/// fit the kernel's 15 characters, `vm<ifindex>.<tag>` / `vm<ifindex>v<tag>`.
pub fn names(nic: &Link, tag: u16) -> (String, String) {
    let (macvlan, vlan) = (format!("{}.{tag}", nic.name), format!("{}v{tag}", nic.name));
    if macvlan.len() <= IFNAME_MAX && vlan.len() <= IFNAME_MAX {
        return (macvlan, vlan);
    }
    (
        format!("vm{}.{tag}", nic.index),
        format!("vm{}v{tag}", nic.index),
    )
}

/// What a link dump says of one link beyond [`Link`].
struct Detail {
    link: Link,
    kind: Option<InfoKind>,
    parent: Option<u32>,
    vlan_id: Option<u16>,
}

fn detail(message: &LinkMessage) -> Option<Detail> {
    let link = link_of(message)?;
    let mut detail = Detail {
        link,
        kind: None,
        parent: None,
        vlan_id: None,
    };
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::Link(parent) => detail.parent = Some(*parent),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(kind) => detail.kind = Some(kind.clone()),
                        LinkInfo::Data(InfoData::Vlan(data)) => {
                            detail.vlan_id = data.iter().find_map(|d| match d {
                                InfoVlan::Id(id) => Some(*id),
                                _ => None,
                            });
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(detail)
}

impl Netlink {
    async fn details(&self) -> Result<Vec<Detail>, HostError> {
        let messages: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(Self::error("link dump", "*"))?;
        Ok(messages.iter().filter_map(detail).collect())
    }

    async fn delete(&self, link: &Link) -> Result<(), HostError> {
        self.handle
            .link()
            .del(link.index)
            .execute()
            .await
            .map_err(Self::error("link delete", &link.name))
    }

    /// Makes sure VLAN `tag` over a macvlan with `mac` on `nic` exists, both up at `mtu`
    /// (at most the NIC's own), and returns it. An existing right pair is adopted as it is;
    /// a link in the way under one of its names is replaced.
    pub async fn ensure_vlan_vnic(
        &self,
        nic: &Link,
        mac: [u8; 6],
        tag: u16,
        mtu: u32,
    ) -> Result<VlanVnic, HostError> {
        let mtu = mtu.min(nic.mtu);
        if !nic.up {
            let message = LinkUnspec::new_with_index(nic.index).up().build();
            self.handle
                .link()
                .set(message)
                .execute()
                .await
                .map_err(Self::error("link set up", &nic.name))?;
        }
        let (macvlan_name, vlan_name) = names(nic, tag);
        let links = self.details().await?;
        let is_our_macvlan = |d: &Detail| {
            d.kind == Some(InfoKind::MacVlan) && d.parent == Some(nic.index) && d.link.mac == mac
        };
        // A macvlan with this MAC on this NIC, whatever its name, is the VNIC's.
        let macvlan = if let Some(found) = links.iter().find(|d| is_our_macvlan(d)) {
            found.link.clone()
        } else {
            if let Some(in_way) = links.iter().find(|d| d.link.name == macvlan_name) {
                self.delete(&in_way.link).await?;
            }
            let message = LinkMacVlan::new(&macvlan_name, nic.index, MacVlanMode::Vepa)
                .address(mac.to_vec())
                .mtu(mtu)
                .up()
                .build();
            self.handle
                .link()
                .add(message)
                .execute()
                .await
                .map_err(Self::error("macvlan add", &macvlan_name))?;
            self.link_named(&macvlan_name).await?
        };
        if !macvlan.up || macvlan.mtu != mtu {
            let message = LinkUnspec::new_with_index(macvlan.index)
                .mtu(mtu)
                .up()
                .build();
            self.handle
                .link()
                .set(message)
                .execute()
                .await
                .map_err(Self::error("link set up/mtu", &macvlan.name))?;
        }
        let links = self.details().await?;
        let vlan = if let Some(found) = links.iter().find(|d| {
            d.kind == Some(InfoKind::Vlan)
                && d.parent == Some(macvlan.index)
                && d.vlan_id == Some(tag)
        }) {
            found.link.clone()
        } else {
            if let Some(in_way) = links.iter().find(|d| d.link.name == vlan_name) {
                self.delete(&in_way.link).await?;
            }
            let message = LinkVlan::new(&vlan_name, macvlan.index, tag)
                .mtu(mtu)
                .build();
            self.handle
                .link()
                .add(message)
                .execute()
                .await
                .map_err(Self::error("vlan add", &vlan_name))?;
            self.link_named(&vlan_name).await?
        };
        Ok(VlanVnic {
            vlan,
            macvlan: self.link_named(&macvlan.name).await?,
            nic_index: nic.index,
            tag,
        })
    }

    async fn link_named(&self, name: &str) -> Result<Link, HostError> {
        self.links()
            .await?
            .into_iter()
            .find(|l| l.name == name)
            .ok_or_else(|| HostError::NoSuchLink {
                interface: name.to_owned(),
            })
    }

    /// The VLAN-over-macvlan pairs on `nics` named as [`names`] names them: the ones this
    /// agent (or oci-utils) made for bare-metal VNICs.
    pub async fn vlan_vnics(&self, nics: &[Link]) -> Result<Vec<VlanVnic>, HostError> {
        let links = self.details().await?;
        let mut found = Vec::new();
        for d in &links {
            let (Some(InfoKind::Vlan), Some(parent), Some(tag)) = (&d.kind, d.parent, d.vlan_id)
            else {
                continue;
            };
            let Some(macvlan) = links
                .iter()
                .find(|m| m.link.index == parent && m.kind == Some(InfoKind::MacVlan))
            else {
                continue;
            };
            let Some(nic) = nics.iter().find(|n| Some(n.index) == macvlan.parent) else {
                continue;
            };
            if names(nic, tag) != (macvlan.link.name.clone(), d.link.name.clone()) {
                continue;
            }
            found.push(VlanVnic {
                vlan: d.link.clone(),
                macvlan: macvlan.link.clone(),
                nic_index: nic.index,
                tag,
            });
        }
        Ok(found)
    }

    /// Removes a bare-metal VNIC's interfaces (the VLAN goes with its macvlan).
    pub async fn remove_vlan_vnic(&self, vnic: &VlanVnic) -> Result<(), HostError> {
        self.delete(&vnic.macvlan).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic(name: &str, index: u32) -> Link {
        Link::for_test(index, name)
    }

    #[test]
    fn names_follow_oci_utils_and_fit_the_kernels_limit() {
        assert_eq!(
            names(&nic("ens2f1", 3), 7),
            ("ens2f1.7".into(), "ens2f1v7".into())
        );
        let (macvlan, vlan) = names(&nic("enp175s0f1np1", 12), 4094);
        assert_eq!(
            (macvlan.as_str(), vlan.as_str()),
            ("vm12.4094", "vm12v4094")
        );
    }
}
