//! Core Services API (20160918) resources, as far as the agent reads them. Unknown fields are
//! ignored and optional ones defaulted, so additions on OCI's side do not break decoding.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub type Tags = BTreeMap<String, String>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AttachmentState {
    Attaching,
    Attached,
    Detaching,
    Detached,
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VnicAttachment {
    pub id: String,
    #[serde(default)]
    pub availability_domain: String,
    pub compartment_id: String,
    pub display_name: Option<String>,
    pub instance_id: String,
    pub lifecycle_state: AttachmentState,
    /// The physical NIC the VNIC uses: 0 for every VNIC on a VM shape, 0 or 1 on bare metal.
    /// It does not identify the VNIC and says nothing about which one is the primary.
    pub nic_index: Option<u32>,
    pub subnet_id: Option<String>,
    /// RFC 3339 (`2016-08-25T21:10:29.600Z`): the order VNICs were attached in.
    #[serde(default)]
    pub time_created: Option<String>,
    /// Only once ATTACHED.
    pub vlan_tag: Option<u32>,
    /// Only once ATTACHED.
    pub vnic_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Vnic {
    pub id: String,
    pub compartment_id: String,
    pub display_name: Option<String>,
    #[serde(default)]
    pub is_primary: bool,
    pub lifecycle_state: String,
    pub mac_address: Option<String>,
    pub private_ip: Option<String>,
    pub public_ip: Option<String>,
    pub subnet_id: String,
    #[serde(default)]
    pub skip_source_dest_check: bool,
    #[serde(default)]
    pub freeform_tags: Tags,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PrivateIp {
    pub id: String,
    pub compartment_id: Option<String>,
    pub display_name: Option<String>,
    pub ip_address: String,
    /// Set when the object is an IP CIDR block (`ipAddress` is then its first address); absent
    /// for a single address (`PrivateIp.cidrPrefixLength`, oci-go-sdk `core/private_ip.go`).
    #[serde(default)]
    pub cidr_prefix_length: Option<u8>,
    /// The subnet CIDR the object was drawn from, for subnets with several IPv4 CIDRs.
    #[serde(default)]
    pub ipv4_subnet_cidr_at_creation: Option<String>,
    #[serde(default)]
    pub is_primary: bool,
    pub subnet_id: String,
    pub vnic_id: Option<String>,
    #[serde(default)]
    pub freeform_tags: Tags,
}

impl PrivateIp {
    /// The IP CIDR block this object is, if it is one (a prefix below 32).
    pub fn block(&self) -> Option<ipnet::Ipv4Net> {
        let prefix = self.cidr_prefix_length.filter(|p| *p < 32)?;
        let ip: std::net::Ipv4Addr = self.ip_address.parse().ok()?;
        ipnet::Ipv4Net::new(ip, prefix).ok().map(|n| n.trunc())
    }

    /// Every address the object gives its VNIC: one, or each of its block's (every address of
    /// a block is the VNIC's; a block is not a subnet, so none is reserved). Empty if OCI
    /// sent something that is not IPv4.
    pub fn addresses(&self) -> Vec<std::net::Ipv4Addr> {
        match self.block() {
            Some(block) => block_addresses(block).collect(),
            None => self.ip_address.parse().into_iter().collect(),
        }
    }
}

/// Every address of `block`, its first and last included.
pub fn block_addresses(block: ipnet::Ipv4Net) -> ipnet::Ipv4AddrRange {
    ipnet::Ipv4AddrRange::new(block.network(), block.broadcast())
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subnet {
    pub id: String,
    pub cidr_block: String,
    pub compartment_id: String,
    pub display_name: Option<String>,
    pub vcn_id: String,
    pub virtual_router_ip: String,
    pub virtual_router_mac: String,
    #[serde(default)]
    pub prohibit_public_ip_on_vnic: bool,
    pub lifecycle_state: String,
    #[serde(default)]
    pub freeform_tags: Tags,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Vcn {
    pub id: String,
    /// Every CIDR of the VCN: traffic to any of them stays inside and is not masqueraded.
    pub cidr_blocks: Vec<String>,
    pub compartment_id: String,
    pub display_name: Option<String>,
    pub lifecycle_state: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachVnicDetails {
    pub instance_id: String,
    pub create_vnic_details: CreateVnicDetails,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nic_index: Option<u32>,
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateVnicDetails {
    pub subnet_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub assign_public_ip: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip_source_dest_check: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nsg_ids: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Tags::is_empty")]
    pub freeform_tags: Tags,
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreatePrivateIpDetails {
    pub vnic_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
    /// Asks for a block of `2^(32 - n)` addresses as one private-IP object instead of one
    /// address (`CreatePrivateIpDetails.cidrPrefixLength`); with `ip_address` it names the block.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cidr_prefix_length: Option<u8>,
    /// One of the subnet's IPv4 CIDRs to draw from (`ipv4SubnetCidrAtCreation`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv4_subnet_cidr_at_creation: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(skip_serializing_if = "Tags::is_empty")]
    pub freeform_tags: Tags,
}

/// `BulkCreatePrivateIps` (`POST /privateIps/actions/bulkCreatePrivateIps`): several secondary
/// addresses or blocks for one VNIC in one call. OCI answers with headers only (an
/// `opc-work-request-id`), not the created objects; read them back with `ListPrivateIps`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkCreatePrivateIpsDetails {
    pub vnic_id: String,
    pub bulk_create_private_ip_item: Vec<BulkCreatePrivateIpItem>,
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkCreatePrivateIpItem {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cidr_prefix_length: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv4_subnet_cidr_at_creation: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(skip_serializing_if = "Tags::is_empty")]
    pub freeform_tags: Tags,
}

/// `BulkDeletePrivateIps` (`POST /privateIps/actions/bulkDeletePrivateIps`).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkDeletePrivateIpsDetails {
    pub vnic_id: String,
    pub bulk_delete_private_ip_item: Vec<BulkDeletePrivateIpItem>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkDeletePrivateIpItem {
    pub private_ip_id: String,
}

/// `ListPrivateIps` takes either a VNIC, or a subnet (optionally with one address).
#[derive(Debug, Clone)]
pub enum PrivateIpFilter {
    Vnic(String),
    Subnet {
        subnet_id: String,
        ip_address: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire names are OCI's (oci-go-sdk `core/private_ip.go`, `core/bulk_*` details).
    #[test]
    fn block_fields_use_ocis_names() {
        let block: PrivateIp = serde_json::from_str(
            r#"{"id":"ocid1.privateip.x","ipAddress":"10.0.16.16","cidrPrefixLength":28,
                "ipv4SubnetCidrAtCreation":"10.0.16.0/20","subnetId":"s","vnicId":"v"}"#,
        )
        .expect("a block decodes");
        assert_eq!(block.cidr_prefix_length, Some(28));
        assert_eq!(
            block.ipv4_subnet_cidr_at_creation.as_deref(),
            Some("10.0.16.0/20")
        );
        let single: PrivateIp =
            serde_json::from_str(r#"{"id":"i","ipAddress":"10.0.16.2","subnetId":"s"}"#)
                .expect("a single address decodes");
        assert_eq!(
            single.cidr_prefix_length, None,
            "a single address has no prefix"
        );

        let create = CreatePrivateIpDetails {
            vnic_id: "v".into(),
            cidr_prefix_length: Some(28),
            ..CreatePrivateIpDetails::default()
        };
        assert_eq!(
            serde_json::to_value(&create).expect("serialises"),
            serde_json::json!({"vnicId": "v", "cidrPrefixLength": 28})
        );
        let bulk = BulkDeletePrivateIpsDetails {
            vnic_id: "v".into(),
            bulk_delete_private_ip_item: vec![BulkDeletePrivateIpItem {
                private_ip_id: "p".into(),
            }],
        };
        assert_eq!(
            serde_json::to_value(&bulk).expect("serialises"),
            serde_json::json!({"vnicId": "v", "bulkDeletePrivateIpItem": [{"privateIpId": "p"}]})
        );
    }
}
