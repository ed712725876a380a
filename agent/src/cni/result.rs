//! The CNI result ADD prints: interfaces, IPs (pointing at their interface by index) and
//! routes, in the configuration's version.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// The pod's link-local gateway: every pod routes through it, and a permanent neighbour
/// entry maps it to the host veth's MAC, so no address of the node is spent on it and
/// the pod never ARPs for it. (169.254.1.1 is the convention Calico made familiar.)
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    pub cni_version: String,
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    /// The netns path, for interfaces inside the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// `"4"`; present only in results before 1.0.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub address: Ipv4Net,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: Ipv4Net,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<Ipv4Addr>,
}

/// DNS is kubelet's business (it writes resolv.conf); the result carries an empty object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {}

/// What ADD set up, as the result reports it.
pub struct Attachment<'a> {
    pub host_veth: &'a str,
    pub host_mac: [u8; 6],
    pub ifname: &'a str,
    pub pod_mac: [u8; 6],
    pub netns: &'a str,
    pub ip: Ipv4Addr,
}

impl CniResult {
    /// The result for `attachment` in `cni_version` (`legacy` for versions before 1.0.0).
    pub fn for_attachment(cni_version: &str, legacy: bool, attachment: &Attachment<'_>) -> Self {
        Self {
            cni_version: cni_version.to_owned(),
            interfaces: vec![
                Interface {
                    name: attachment.host_veth.to_owned(),
                    mac: format_mac(attachment.host_mac),
                    sandbox: None,
                },
                Interface {
                    name: attachment.ifname.to_owned(),
                    mac: format_mac(attachment.pod_mac),
                    sandbox: Some(attachment.netns.to_owned()),
                },
            ],
            ips: vec![IpConfig {
                version: legacy.then(|| "4".to_owned()),
                address: Ipv4Net::from(attachment.ip),
                gateway: Some(GATEWAY),
                interface: Some(1),
            }],
            routes: vec![Route {
                dst: Ipv4Net::default(),
                gw: Some(GATEWAY),
            }],
            dns: Dns::default(),
        }
    }
}

/// `aa:bb:cc:dd:ee:ff`, as CNI results and `ip link` write MACs.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
