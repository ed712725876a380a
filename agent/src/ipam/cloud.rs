//! The OCI operations IPAM needs, behind a small trait so the pool logic runs against a fake in
//! unit tests and against the simulator in integration tests, exactly as against OCI.
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use crate::oci::models::{
    AttachVnicDetails, AttachmentState, CreatePrivateIpDetails, CreateVnicDetails, PrivateIp,
    PrivateIpFilter, Subnet, Tags, Vnic, VnicAttachment,
};
use crate::oci::{CoreClient, OciError};

use super::types::BoxFuture;

/// What IPAM asks of OCI. Every create carries the caller's `opc-retry-token`, so a create
/// retried after a lost answer returns the first result instead of leaking a second resource.
pub trait Cloud: Send + Sync + 'static {
    /// The VNIC attachments of this node's instance, in every lifecycle state.
    fn list_vnic_attachments(&self) -> BoxFuture<'_, Result<Vec<VnicAttachment>, OciError>>;
    fn get_vnic<'a>(&'a self, vnic_id: &'a str) -> BoxFuture<'a, Result<Vnic, OciError>>;
    /// Every private IP of the VNIC, the primary included.
    fn list_private_ips<'a>(
        &'a self,
        vnic_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<PrivateIp>, OciError>>;
    /// A secondary IP on the VNIC, or with `block` an IP CIDR block of that prefix length;
    /// `ip` asks for a specific address (to restore a lost one).
    fn create_private_ip<'a>(
        &'a self,
        vnic_id: &'a str,
        ip: Option<Ipv4Addr>,
        block: Option<u8>,
        tags: &'a Tags,
        retry_token: &'a str,
    ) -> BoxFuture<'a, Result<PrivateIp, OciError>>;
    /// One private IP as OCI has it now (a list may lag; a get answers from the present).
    fn get_private_ip<'a>(&'a self, ip_id: &'a str) -> BoxFuture<'a, Result<PrivateIp, OciError>>;
    fn delete_private_ip<'a>(&'a self, ip_id: &'a str) -> BoxFuture<'a, Result<(), OciError>>;
    /// Attaches a new VNIC in `subnet_id` (on physical NIC `nic_index`, or OCI's default 0)
    /// and returns once it is ATTACHED.
    fn attach_vnic<'a>(
        &'a self,
        subnet_id: &'a str,
        nic_index: Option<u32>,
        tags: &'a Tags,
        retry_token: &'a str,
    ) -> BoxFuture<'a, Result<VnicAttachment, OciError>>;
    /// Detaching also deletes the VNIC and its secondary IPs.
    fn detach_vnic<'a>(&'a self, attachment_id: &'a str) -> BoxFuture<'a, Result<(), OciError>>;
    fn get_subnet<'a>(&'a self, subnet_id: &'a str) -> BoxFuture<'a, Result<Subnet, OciError>>;
}

/// [`Cloud`] over the real OCI client, scoped to one instance.
#[derive(Debug, Clone)]
pub struct OciCloud {
    client: Arc<CoreClient>,
    compartment_id: String,
    instance_id: String,
    /// How long an attachment may stay ATTACHING (OCI usually needs 10–30 s).
    attach_timeout: Duration,
}

impl OciCloud {
    pub fn new(
        client: Arc<CoreClient>,
        compartment_id: impl Into<String>,
        instance_id: impl Into<String>,
        attach_timeout: Duration,
    ) -> Self {
        Self {
            client,
            compartment_id: compartment_id.into(),
            instance_id: instance_id.into(),
            attach_timeout,
        }
    }
}

impl Cloud for OciCloud {
    fn list_vnic_attachments(&self) -> BoxFuture<'_, Result<Vec<VnicAttachment>, OciError>> {
        Box::pin(async move {
            let all = self
                .client
                .list_vnic_attachments(&self.compartment_id, Some(&self.instance_id))
                .await?;
            Ok(all
                .into_iter()
                .filter(|a| a.instance_id == self.instance_id)
                .collect())
        })
    }

    fn get_vnic<'a>(&'a self, vnic_id: &'a str) -> BoxFuture<'a, Result<Vnic, OciError>> {
        Box::pin(self.client.get_vnic(vnic_id))
    }

    fn list_private_ips<'a>(
        &'a self,
        vnic_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<PrivateIp>, OciError>> {
        Box::pin(async move {
            self.client
                .list_private_ips(&PrivateIpFilter::Vnic(vnic_id.to_owned()))
                .await
        })
    }

    fn create_private_ip<'a>(
        &'a self,
        vnic_id: &'a str,
        ip: Option<Ipv4Addr>,
        block: Option<u8>,
        tags: &'a Tags,
        retry_token: &'a str,
    ) -> BoxFuture<'a, Result<PrivateIp, OciError>> {
        Box::pin(async move {
            let details = CreatePrivateIpDetails {
                vnic_id: vnic_id.to_owned(),
                ip_address: ip.map(|ip| ip.to_string()),
                cidr_prefix_length: block,
                freeform_tags: tags.clone(),
                ..CreatePrivateIpDetails::default()
            };
            self.client.create_private_ip(&details, retry_token).await
        })
    }

    fn get_private_ip<'a>(&'a self, ip_id: &'a str) -> BoxFuture<'a, Result<PrivateIp, OciError>> {
        Box::pin(self.client.get_private_ip(ip_id))
    }

    fn delete_private_ip<'a>(&'a self, ip_id: &'a str) -> BoxFuture<'a, Result<(), OciError>> {
        Box::pin(self.client.delete_private_ip(ip_id))
    }

    fn attach_vnic<'a>(
        &'a self,
        subnet_id: &'a str,
        nic_index: Option<u32>,
        tags: &'a Tags,
        retry_token: &'a str,
    ) -> BoxFuture<'a, Result<VnicAttachment, OciError>> {
        Box::pin(async move {
            let details = AttachVnicDetails {
                instance_id: self.instance_id.clone(),
                create_vnic_details: CreateVnicDetails {
                    subnet_id: subnet_id.to_owned(),
                    assign_public_ip: Some(false),
                    display_name: Some("vcnpath-pods".into()),
                    freeform_tags: tags.clone(),
                    ..CreateVnicDetails::default()
                },
                display_name: Some("vcnpath-pods".into()),
                nic_index,
            };
            let attachment = self.client.attach_vnic(&details, retry_token).await?;
            if attachment.lifecycle_state == AttachmentState::Attached {
                return Ok(attachment);
            }
            // A wait that runs out leaves the attachment alone: OCI takes tens of seconds, and
            // the grower asks again with the same retry token, which answers this attachment,
            // so it is adopted once attached rather than torn down and made again.
            self.client
                .wait_attached(&attachment.id, self.attach_timeout)
                .await
        })
    }

    fn detach_vnic<'a>(&'a self, attachment_id: &'a str) -> BoxFuture<'a, Result<(), OciError>> {
        Box::pin(self.client.detach_vnic(attachment_id))
    }

    fn get_subnet<'a>(&'a self, subnet_id: &'a str) -> BoxFuture<'a, Result<Subnet, OciError>> {
        Box::pin(self.client.get_subnet(subnet_id))
    }
}
