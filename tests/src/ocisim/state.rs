//! The simulated cloud: the instance's VNIC attachments, VNICs, private IPs and the subnets
//! they draw addresses from, with OCI's limits and rules.
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::Serialize;
use serde_json::{Value, json};

use super::cidr::Want;
use super::config::{LimitCount, SimConfig};

/// An OCI error answer: HTTP status, `code` and `message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: std::borrow::Cow<'static, str>,
    pub message: String,
}

impl ApiError {
    pub fn new(
        status: u16,
        code: impl Into<std::borrow::Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            code: code.into(),
            message: message.into(),
        }
    }
    pub fn not_found(what: &str, id: &str) -> Self {
        Self::new(
            404,
            "NotAuthorizedOrNotFound",
            format!("{what} {id} not found or not authorized"),
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AttachmentState {
    Attaching,
    Attached,
    Detaching,
    Detached,
}

#[derive(Debug, Clone)]
pub struct Subnet {
    pub id: String,
    pub display_name: String,
    pub cidr: Ipv4Net,
    pub router_mac: String,
    pub used: BTreeSet<Ipv4Addr>,
    pub freeform_tags: std::collections::BTreeMap<String, String>,
}

impl Subnet {
    pub fn router_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.cidr.network()) + 1)
    }

    /// The lowest free address; OCI reserves the first two (network, router) and the last.
    fn allocate(&mut self) -> Option<Ipv4Addr> {
        let single = Want {
            at: None,
            prefix: 32,
        };
        let none = ApiError::new(400, "LimitExceeded", "");
        self.take(single, &none).ok().map(|block| block.network())
    }

    fn claim(&mut self, ip: Ipv4Addr) -> Result<(), ApiError> {
        let single = Want {
            at: Some(ip),
            prefix: 32,
        };
        let none = ApiError::new(400, "LimitExceeded", "");
        self.take(single, &none).map(|_| ())
    }
}

impl PrivateIp {
    /// The addresses the object holds: its block, or its one address as a /32.
    pub fn block(&self) -> Ipv4Net {
        Ipv4Net::new(self.ip, self.prefix.unwrap_or(32)).expect("prefix at most 32")
    }
}

/// What `create_vnic` is asked for: whose VNIC, where, and whether it is a primary.
#[derive(Debug, Clone)]
pub struct NewVnic<'a> {
    pub instance_id: &'a str,
    pub subnet_id: &'a str,
    pub nic_index: Option<u32>,
    pub display_name: Option<String>,
    pub is_primary: bool,
}

#[derive(Debug, Clone)]
pub struct Attachment {
    pub id: String,
    pub instance_id: String,
    pub display_name: Option<String>,
    pub subnet_id: String,
    pub nic_index: u32,
    pub state: AttachmentState,
    pub vnic_id: String,
    pub vlan_tag: u32,
    pub time_created: String,
}

#[derive(Debug, Clone)]
pub struct Vnic {
    pub id: String,
    pub display_name: Option<String>,
    pub subnet_id: String,
    pub mac: String,
    pub is_primary: bool,
    pub skip_source_dest_check: bool,
    pub freeform_tags: Value,
    pub time_created: String,
}

#[derive(Debug, Clone)]
pub struct PrivateIp {
    pub id: String,
    pub vnic_id: String,
    pub subnet_id: String,
    /// The address, or the first address of a block.
    pub ip: Ipv4Addr,
    /// `Some` for an IP CIDR block (`cidrPrefixLength`), `None` for one address.
    pub prefix: Option<u8>,
    /// `ipv4SubnetCidrAtCreation` as the create named it.
    pub subnet_cidr_at_creation: Option<String>,
    pub is_primary: bool,
    pub display_name: Option<String>,
    pub freeform_tags: Value,
    pub time_created: String,
}

/// Everything the simulator holds. Ids are allocated from one counter, so ordering by id is
/// ordering by creation (what list calls return). Cloned for the stale-read history.
#[derive(Debug, Clone)]
pub struct Cloud {
    pub cfg: SimConfig,
    pub subnets: Vec<Subnet>,
    pub attachments: BTreeMap<String, Attachment>,
    pub vnics: BTreeMap<String, Vnic>,
    pub private_ips: BTreeMap<String, PrivateIp>,
    next: u64,
}

pub fn timestamp() -> String {
    httpdate::fmt_http_date(std::time::SystemTime::now())
}

impl Cloud {
    pub fn new(cfg: SimConfig) -> Result<Self, String> {
        let mut subnets = Vec::new();
        for (i, s) in cfg.subnets.iter().enumerate() {
            let cidr: Ipv4Net = s
                .cidr_block
                .parse()
                .map_err(|e| format!("subnet {}: {e}", s.id))?;
            subnets.push(Subnet {
                id: s.id.clone(),
                display_name: s.display_name.clone(),
                cidr: cidr.trunc(),
                router_mac: format!("00:00:17:00:{:02X}:01", i + 1),
                used: BTreeSet::new(),
                freeform_tags: s.freeform_tags.clone(),
            });
        }
        if subnets.is_empty() {
            return Err("at least one subnet is needed for the primary VNIC".into());
        }
        let mut cloud = Self {
            cfg,
            subnets,
            attachments: BTreeMap::new(),
            vnics: BTreeMap::new(),
            private_ips: BTreeMap::new(),
            next: 0,
        };
        let primary_subnet = cloud.subnets[0].id.clone();
        for (n, instance) in cloud.cfg.instance_ids().into_iter().enumerate() {
            let new = NewVnic {
                instance_id: &instance,
                subnet_id: &primary_subnet,
                nic_index: Some(0),
                display_name: None,
                is_primary: true,
            };
            let (attachment, vnic_id) = cloud
                .create_vnic(&new, json!({}))
                .map_err(|e| format!("primary VNIC of instance {instance}: {}", e.message))?;
            if n == 0 {
                cloud.configure_primary(&vnic_id)?;
            }
            cloud
                .attachments
                .get_mut(&attachment)
                .expect("just created")
                .state = AttachmentState::Attached;
        }
        Ok(cloud)
    }

    /// Applies the configured primary MAC and IP to the primary VNIC just created, so the
    /// simulator can describe a node that already exists (the namespace lab's `ens3`).
    fn configure_primary(&mut self, vnic_id: &str) -> Result<(), String> {
        if let Some(mac) = self.cfg.primary_mac.clone() {
            self.vnics.get_mut(vnic_id).expect("just created").mac = mac;
        }
        let Some(text) = self.cfg.primary_ip.clone() else {
            return Ok(());
        };
        let ip: Ipv4Addr = text
            .parse()
            .map_err(|e| format!("primary_ip {text}: {e}"))?;
        let primary = self
            .private_ips
            .values_mut()
            .find(|p| p.vnic_id == vnic_id && p.is_primary)
            .expect("a new VNIC has a primary IP");
        let allocated = std::mem::replace(&mut primary.ip, ip);
        let subnet = &mut self.subnets[0];
        subnet.used.remove(&allocated);
        subnet
            .claim(ip)
            .map_err(|e| format!("primary_ip {text}: {}", e.message))
    }

    pub fn id(&mut self, kind: &str) -> String {
        self.next += 1;
        format!("ocid1.{kind}.oc1.iad.sim{:06}", self.next)
    }

    pub fn subnet(&self, id: &str) -> Result<&Subnet, ApiError> {
        self.subnets
            .iter()
            .find(|s| s.id == id)
            .ok_or_else(|| ApiError::not_found("subnet", id))
    }

    /// The instance's attachments that are not yet detached.
    fn live_attachments<'a>(&'a self, instance: &'a str) -> impl Iterator<Item = &'a Attachment> {
        self.attachments
            .values()
            .filter(move |a| a.instance_id == instance && a.state != AttachmentState::Detached)
    }

    /// Whether `id` names one of the simulated instances.
    pub fn has_instance(&self, id: &str) -> bool {
        id == self.cfg.instance_id
            || id
                .strip_prefix(&self.cfg.instance_id)
                .and_then(|n| n.strip_prefix('-'))
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|n| n > 0 && n < self.cfg.instance_count)
    }

    /// `AttachVnic`: a new VNIC with a primary IP, ATTACHING until the caller settles it.
    /// Returns the attachment and VNIC ids.
    pub fn create_vnic(
        &mut self,
        new: &NewVnic<'_>,
        freeform_tags: Value,
    ) -> Result<(String, String), ApiError> {
        let NewVnic {
            instance_id,
            subnet_id,
            nic_index,
            is_primary,
            ..
        } = *new;
        let display_name = new.display_name.clone();
        self.subnet(subnet_id)?;
        let live = self.live_attachments(instance_id).count() as u32;
        if live >= self.cfg.max_vnic_attachments {
            return Err(ApiError::new(
                400,
                "LimitExceeded",
                format!(
                    "shape {} allows {} VNIC attachments",
                    self.cfg.shape, self.cfg.max_vnic_attachments
                ),
            ));
        }
        // `nicIndex` names a physical NIC, not the VNIC: every VNIC of a VM shares NIC 0,
        // and on bare metal several VNICs share each NIC.
        let nics = self.cfg.physical_nics();
        let nic_index = nic_index.unwrap_or(0);
        if nic_index >= nics {
            return Err(ApiError::new(
                400,
                "InvalidParameter",
                format!(
                    "nicIndex {nic_index} is out of range: shape {} has {nics} physical NIC(s)",
                    self.cfg.shape
                ),
            ));
        }
        let vlan_tag = self.vlan_tag(instance_id, is_primary);
        let subnet = self
            .subnets
            .iter_mut()
            .find(|s| s.id == subnet_id)
            .expect("checked above");
        let ip = subnet.allocate().ok_or_else(|| {
            ApiError::new(
                400,
                "LimitExceeded",
                format!("subnet {subnet_id} has no free private IP addresses"),
            )
        })?;
        let attachment_id = self.id("vnicattachment");
        let vnic_id = self.id("vnic");
        let ip_id = self.id("privateip");
        let mac = format!(
            "02:00:17:{:02X}:{:02X}:{:02X}",
            (self.next >> 16) & 0xff,
            (self.next >> 8) & 0xff,
            self.next & 0xff
        );
        let now = timestamp();
        self.vnics.insert(
            vnic_id.clone(),
            Vnic {
                id: vnic_id.clone(),
                display_name: display_name.clone(),
                subnet_id: subnet_id.into(),
                mac,
                is_primary,
                skip_source_dest_check: false,
                freeform_tags: freeform_tags.clone(),
                time_created: now.clone(),
            },
        );
        self.private_ips.insert(
            ip_id.clone(),
            PrivateIp {
                id: ip_id,
                vnic_id: vnic_id.clone(),
                subnet_id: subnet_id.into(),
                ip,
                prefix: None,
                subnet_cidr_at_creation: None,
                is_primary: true,
                display_name: None,
                freeform_tags,
                time_created: now.clone(),
            },
        );
        self.attachments.insert(
            attachment_id.clone(),
            Attachment {
                id: attachment_id.clone(),
                instance_id: instance_id.into(),
                display_name,
                subnet_id: subnet_id.into(),
                nic_index,
                state: AttachmentState::Attaching,
                vnic_id: vnic_id.clone(),
                vlan_tag,
                time_created: now,
            },
        );
        Ok((attachment_id, vnic_id))
    }

    /// The VLAN tag OCI assigns a new attachment. On a VM it is internal to OCI's virtual
    /// network and never seen by the guest (cloud-init's VM fixture shows 1039 and 1041);
    /// on bare metal the primary is untagged (0) and each secondary VNIC arrives tagged on
    /// its physical NIC (1, 2, … in cloud-init's and OCI's examples).
    fn vlan_tag(&self, instance: &str, is_primary: bool) -> u32 {
        let used: BTreeSet<u32> = self
            .live_attachments(instance)
            .map(|a| a.vlan_tag)
            .collect();
        let first = match (self.cfg.is_bare_metal(), is_primary) {
            (true, true) => return 0,
            (true, false) => 1,
            (false, _) => 1024,
        };
        (first..=4094)
            .find(|t| !used.contains(t))
            .expect("fewer live attachments than VLAN tags")
    }

    /// `DetachVnic`: the primary VNIC cannot be detached.
    pub fn start_detach(&mut self, id: &str) -> Result<bool, ApiError> {
        let attachment = self
            .attachments
            .get(id)
            .ok_or_else(|| ApiError::not_found("VNIC attachment", id))?;
        if self
            .vnics
            .get(&attachment.vnic_id)
            .is_some_and(|v| v.is_primary)
        {
            return Err(ApiError::new(
                409,
                "Conflict",
                "The primary VNIC of an instance cannot be detached",
            ));
        }
        let attachment = self.attachments.get_mut(id).expect("found above");
        match attachment.state {
            // A resource in transition answers 409 IncorrectState (docs/oci.md, API Errors).
            AttachmentState::Attaching => Err(ApiError::new(
                409,
                "IncorrectState",
                format!("VNIC attachment {id} is ATTACHING; detach it once it is ATTACHED"),
            )),
            AttachmentState::Attached => {
                attachment.state = AttachmentState::Detaching;
                Ok(true)
            }
            // Detaching twice is not an error: the second call asks for what is already happening.
            AttachmentState::Detaching | AttachmentState::Detached => Ok(false),
        }
    }

    /// The end of a detach: the VNIC and its addresses are gone.
    pub fn finish_detach(&mut self, id: &str) {
        let Some(attachment) = self.attachments.get_mut(id) else {
            return;
        };
        attachment.state = AttachmentState::Detached;
        let vnic_id = attachment.vnic_id.clone();
        self.vnics.remove(&vnic_id);
        let ips: Vec<PrivateIp> = self
            .private_ips
            .values()
            .filter(|p| p.vnic_id == vnic_id)
            .cloned()
            .collect();
        for ip in ips {
            self.release_ip(&ip);
        }
    }

    fn release_ip(&mut self, ip: &PrivateIp) {
        self.private_ips.remove(&ip.id);
        if let Some(subnet) = self.subnets.iter_mut().find(|s| s.id == ip.subnet_id) {
            subnet.give_back(ip.block());
        }
    }

    /// What `ip` weighs against the VNIC's limit ([`super::config::CidrConfig::limit_counts`]).
    fn weight(&self, prefix: Option<u8>) -> u64 {
        match (prefix, self.cfg.cidr.limit_counts) {
            (Some(p), LimitCount::Addresses) => 1 << (32 - u32::from(p)),
            _ => 1,
        }
    }

    pub fn create_private_ip(&mut self, body: &Value) -> Result<String, ApiError> {
        let vnic_id = body["vnicId"]
            .as_str()
            .ok_or_else(|| ApiError::new(400, "InvalidParameter", "vnicId is required"))?;
        let vnic = self
            .vnics
            .get(vnic_id)
            .ok_or_else(|| ApiError::not_found("VNIC", vnic_id))?
            .clone();
        if self
            .attachments
            .values()
            .any(|a| a.vnic_id == vnic_id && a.state == AttachmentState::Detaching)
        {
            return Err(ApiError::new(
                409,
                "IncorrectState",
                format!("VNIC {vnic_id} is being detached"),
            ));
        }
        let want = Want::parse(body, &self.cfg.cidr)?;
        let held: u64 = self
            .private_ips
            .values()
            .filter(|p| p.vnic_id == vnic_id && !p.is_primary)
            .map(|p| self.weight(p.prefix))
            .sum();
        let prefix = want.is_block().then_some(want.prefix);
        let limit = u64::from(self.cfg.ips_per_vnic);
        if held + self.weight(prefix) > limit {
            return Err(ApiError::new(
                400,
                "LimitExceeded",
                format!(
                    "VNIC {vnic_id} already has the maximum of {} secondary private IPs",
                    self.cfg.ips_per_vnic
                ),
            ));
        }
        let at_creation = body["ipv4SubnetCidrAtCreation"].as_str().map(str::to_owned);
        let fragmented = ApiError::new(
            self.cfg.cidr.fragmented.status,
            self.cfg.cidr.fragmented.code.clone(),
            format!(
                "subnet {} has free addresses but no free aligned /{} block",
                vnic.subnet_id, want.prefix
            ),
        );
        let subnet = self
            .subnets
            .iter_mut()
            .find(|s| s.id == vnic.subnet_id)
            .expect("a VNIC's subnet exists");
        if let Some(cidr) = &at_creation
            && cidr.parse::<Ipv4Net>().ok() != Some(subnet.cidr)
        {
            return Err(ApiError::new(
                400,
                "InvalidParameter",
                format!(
                    "ipv4SubnetCidrAtCreation {cidr} is not an IPv4 CIDR of subnet {}",
                    subnet.id
                ),
            ));
        }
        let ip = subnet.take(want, &fragmented)?.network();
        let id = self.id("privateip");
        self.private_ips.insert(
            id.clone(),
            PrivateIp {
                id: id.clone(),
                vnic_id: vnic_id.into(),
                subnet_id: vnic.subnet_id.clone(),
                ip,
                prefix,
                subnet_cidr_at_creation: at_creation,
                is_primary: false,
                display_name: body["displayName"].as_str().map(str::to_owned),
                freeform_tags: body
                    .get("freeformTags")
                    .cloned()
                    .unwrap_or_else(|| json!({})),
                time_created: timestamp(),
            },
        );
        Ok(id)
    }

    /// `UpdatePrivateIp`: new tags or display name, or `vnicId` to move a secondary address
    /// to another VNIC, which must be in the same subnet (`UpdatePrivateIpDetails.vnicId`).
    pub fn update_private_ip(&mut self, id: &str, body: &Value) -> Result<(), ApiError> {
        let ip = self
            .private_ips
            .get(id)
            .ok_or_else(|| ApiError::not_found("private IP", id))?
            .clone();
        if let Some(target) = body["vnicId"].as_str() {
            let vnic = self
                .vnics
                .get(target)
                .ok_or_else(|| ApiError::not_found("VNIC", target))?;
            if ip.is_primary {
                return Err(ApiError::new(
                    400,
                    "InvalidParameter",
                    "The primary private IP of a VNIC cannot be moved",
                ));
            }
            if vnic.subnet_id != ip.subnet_id {
                return Err(ApiError::new(
                    400,
                    "InvalidParameter",
                    format!("VNIC {target} is not in subnet {}", ip.subnet_id),
                ));
            }
        }
        let p = self.private_ips.get_mut(id).expect("found above");
        if let Some(target) = body["vnicId"].as_str() {
            target.clone_into(&mut p.vnic_id);
        }
        if let Some(tags) = body.get("freeformTags") {
            p.freeform_tags = tags.clone();
        }
        if let Some(name) = body["displayName"].as_str() {
            p.display_name = Some(name.to_owned());
        }
        Ok(())
    }

    /// `UpdateVnic`: new freeform tags (another actor editing or stripping them).
    pub fn update_vnic(&mut self, id: &str, body: &Value) -> Result<(), ApiError> {
        let vnic = self
            .vnics
            .get_mut(id)
            .ok_or_else(|| ApiError::not_found("VNIC", id))?;
        if let Some(tags) = body.get("freeformTags") {
            vnic.freeform_tags = tags.clone();
        }
        Ok(())
    }

    pub fn delete_private_ip(&mut self, id: &str) -> Result<(), ApiError> {
        let ip = self
            .private_ips
            .get(id)
            .ok_or_else(|| ApiError::not_found("private IP", id))?
            .clone();
        if ip.is_primary {
            return Err(ApiError::new(
                400,
                "InvalidParameter",
                "The primary private IP of a VNIC cannot be deleted",
            ));
        }
        self.release_ip(&ip);
        Ok(())
    }

    pub fn attachment_json(&self, a: &Attachment) -> Value {
        let attached = matches!(
            a.state,
            AttachmentState::Attached | AttachmentState::Detaching
        );
        let mut v = json!({
            "id": a.id, "availabilityDomain": self.cfg.availability_domain, "compartmentId": self.cfg.compartment_id,
            "displayName": a.display_name, "instanceId": a.instance_id, "lifecycleState": a.state,
            "nicIndex": a.nic_index, "subnetId": a.subnet_id, "timeCreated": rfc3339(&a.time_created),
        });
        // OCI reports the VNIC and VLAN tag only once the attachment is made.
        if attached {
            v["vnicId"] = json!(a.vnic_id);
            v["vlanTag"] = json!(a.vlan_tag);
        }
        v
    }

    pub fn vnic_json(&self, v: &Vnic) -> Value {
        let primary = self
            .private_ips
            .values()
            .find(|p| p.vnic_id == v.id && p.is_primary);
        json!({
            "id": v.id, "availabilityDomain": self.cfg.availability_domain, "compartmentId": self.cfg.compartment_id,
            "displayName": v.display_name, "isPrimary": v.is_primary, "lifecycleState": "AVAILABLE",
            "macAddress": v.mac, "privateIp": primary.map(|p| p.ip.to_string()), "publicIp": null,
            "subnetId": v.subnet_id, "skipSourceDestCheck": v.skip_source_dest_check, "freeformTags": v.freeform_tags,
            "definedTags": {}, "nsgIds": [], "timeCreated": rfc3339(&v.time_created),
        })
    }

    pub fn private_ip_json(&self, p: &PrivateIp) -> Value {
        let prefix = p.prefix.or(self.cfg.cidr.single_ip_prefix);
        json!({
            "id": p.id, "availabilityDomain": self.cfg.availability_domain, "compartmentId": self.cfg.compartment_id,
            "displayName": p.display_name, "hostnameLabel": null, "ipAddress": p.ip.to_string(), "isPrimary": p.is_primary,
            "cidrPrefixLength": prefix, "ipv4SubnetCidrAtCreation": p.subnet_cidr_at_creation,
            "ipState": "ASSIGNED", "lifetime": "EPHEMERAL",
            "subnetId": p.subnet_id, "vnicId": p.vnic_id, "freeformTags": p.freeform_tags, "definedTags": {},
            "timeCreated": rfc3339(&p.time_created),
        })
    }

    pub fn subnet_json(&self, s: &Subnet) -> Value {
        json!({
            "id": s.id, "cidrBlock": s.cidr.to_string(), "compartmentId": self.cfg.network_compartment_id,
            "displayName": s.display_name, "vcnId": self.cfg.vcn.id, "virtualRouterIp": s.router_ip().to_string(),
            "virtualRouterMac": s.router_mac, "prohibitPublicIpOnVnic": true, "lifecycleState": "AVAILABLE",
            "availabilityDomain": null, "freeformTags": s.freeform_tags, "definedTags": {}, "timeCreated": "2024-01-01T00:00:00.000Z",
        })
    }

    pub fn vcn_json(&self) -> Value {
        let v = &self.cfg.vcn;
        json!({
            "id": v.id, "cidrBlock": v.cidr_blocks.first(), "cidrBlocks": v.cidr_blocks,
            "compartmentId": self.cfg.network_compartment_id, "displayName": v.display_name, "lifecycleState": "AVAILABLE",
            "freeformTags": {}, "definedTags": {}, "timeCreated": "2024-01-01T00:00:00.000Z",
        })
    }
}

/// OCI's `timeCreated` is RFC 3339; the SDKs parse it, so keep it well-formed.
pub fn rfc3339(http_date: &str) -> String {
    let t = httpdate::parse_http_date(http_date).unwrap_or(std::time::UNIX_EPOCH);
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86400, secs % 86400);
    let (y, m, d) = civil_from_days(days.cast_signed());
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.000Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
#[expect(
    clippy::cast_sign_loss,
    reason = "month and day are positive by construction"
)]
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}
