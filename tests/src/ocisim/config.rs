//! What the simulator serves at start: one instance, one VCN with subnets, limits and faults.
//! Every field has a default, so a state file (TOML or JSON) names only what it changes.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    pub tenancy_id: String,
    /// The instance's compartment: its VNIC attachments, VNICs and private IPs.
    pub compartment_id: String,
    /// The VCN's and its subnets' compartment. Usually not the instance's (a network team
    /// owns the VCN), so the default differs; `ListSubnets` answers only for it.
    pub network_compartment_id: String,
    pub instance_id: String,
    /// Canonical region name, e.g. `us-ashburn-1`.
    pub region: String,
    /// IMDS `region` (OCI answers a short code such as `iad` in older regions).
    pub region_short: String,
    pub realm_domain: String,
    pub availability_domain: String,
    /// `VM.*` shapes carry every VNIC on one virtual NIC (`nicIndex` 0); `BM.*` shapes have
    /// two physical NICs (see [`SimConfig::physical_nics`]).
    pub shape: String,
    pub ocpus: f64,
    /// The shape's VNIC limit (IMDS `shapeConfig.maxVnicAttachments`), primary VNIC included.
    pub max_vnic_attachments: u32,
    /// Secondary private IPs one VNIC may hold (the primary IP does not count). OCI's
    /// documentation has said 31, 32 and 64 over the years (docs/oci.md), so it is a knob.
    pub ips_per_vnic: u32,
    /// Whether IMDS `/opc/v2/vnics/` entries carry `nicIndex`. OCI's current documentation
    /// shows it on every entry; the VM answer in cloud-init's test fixtures has none (and
    /// cloud-init takes its presence for bare metal). Clients must cope with both.
    pub imds_nic_index: bool,
    /// Time an attachment stays ATTACHING (and DETACHING) before it settles.
    pub attach_delay_ms: u64,
    /// Largest page a list call returns (a smaller `limit` wins).
    pub page_size: usize,
    /// Lifetime of the session tokens issued by `/v1/x509`.
    pub token_lifetime_s: u64,
    /// Whether `/v1/x509` accepts an instance certificate IMDS no longer serves (after
    /// `rotate_leaf`). OCI accepts the old one until its own expiry, which no source puts a
    /// figure on; `false` models that expiry, to show a client reads IMDS anew.
    pub superseded_leaf_valid: bool,
    pub vcn: VcnConfig,
    /// The first subnet holds the primary VNIC.
    pub subnets: Vec<SubnetConfig>,
    /// The primary VNIC's MAC (`02:00:0a:00:00:0a`), for a lab whose node already has its
    /// `ens3`; `None` derives one as for any other VNIC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary_mac: Option<String>,
    /// The primary VNIC's private IP, in the first subnet; `None` takes the lowest free one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary_ip: Option<String>,
    /// API keys accepted for signed requests (the instance's session keys need none).
    pub api_keys: Vec<ApiKeyConfig>,
    pub faults: Faults,
    /// The IAM policy granted to the instance, as OCI permission statements (`manage instances`,
    /// `use subnets`, or whole `Allow dynamic-group … to use vnics in compartment …` lines).
    /// `None` grants everything; an operation the policy does not cover answers 404
    /// `NotAuthorizedOrNotFound`, as OCI does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcnConfig {
    pub id: String,
    pub display_name: String,
    pub cidr_blocks: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubnetConfig {
    pub id: String,
    pub display_name: String,
    pub cidr_block: String,
    /// The subnet's freeform tags (what `ipam.subnet_tag` selects by).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub freeform_tags: std::collections::BTreeMap<String, String>,
}

/// An API key: `key_id` is `<tenancy>/<user>/<fingerprint>`, the key a PEM public key
/// (SPKI or PKCS#1) given inline or as a file path.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    pub key_id: String,
    #[serde(default)]
    pub public_key_pem: Option<String>,
    #[serde(default)]
    pub public_key_file: Option<String>,
}

/// Faults injected into requests. The flat fields fault every Core API request alike (kept for
/// the state files and benches that set them); `rules` fault one operation (IMDS and `/v1/x509`
/// included) before or after it takes effect.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Added to every request before it is handled.
    pub latency_ms: u64,
    /// Added to `CreatePrivateIp` on top of `latency_ms` (OCI takes ~500 ms to create one).
    pub create_private_ip_ms: u64,
    /// Fraction (0–1) of requests answered 429 `TooManyRequests`.
    pub rate_429: f64,
    /// Fraction (0–1) of requests answered 500 `InternalServerError`.
    pub rate_5xx: f64,
    /// Fraction (0–1) of requests that never get an answer.
    pub rate_hang: f64,
    /// Per-operation faults; the first rule that matches and fires decides.
    pub rules: Vec<FaultRule>,
    /// List calls (`ListVnicAttachments`, `ListPrivateIps`, `ListSubnets`) answer from the
    /// state as it was this long ago: reads that lag writes.
    pub stale_read_ms: u64,
    /// How far the simulator's clock is ahead of the caller's (negative: behind), in seconds:
    /// a node whose clock is off. Beyond 5 minutes every signed request is refused 401
    /// (docs/oci.md, "Clock skew").
    pub clock_skew_s: i64,
}

/// One injected fault: which operation, how often, and whether before the operation (nothing
/// happened) or after it committed (the resource exists, the answer is lost or broken).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultRule {
    /// An operation name as the API reference spells it (`CreatePrivateIp`, `AttachVnic`,
    /// `ListVnicAttachments`, …), `Imds` for any `/opc/v2/` path, `X509` for the federation
    /// endpoint, or `*` for all of them.
    pub op: String,
    pub kind: FaultKind,
    /// HTTP status of a `status` fault (default 500).
    pub status: u16,
    /// OCI error code of a `status` fault (default `InternalServerError`).
    pub code: String,
    /// The `message` of a `status` fault's body (`None`: "injected fault"). OCI tells some
    /// causes that share a code apart only by the message (a tenancy's `LimitExceeded`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Fraction (0–1) of matching requests that get the fault.
    pub rate: f64,
    /// Apply after the operation took effect instead of before.
    pub after_commit: bool,
    /// Fire at most this many times (`None`: no limit). Counts down as it fires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub times: Option<u32>,
    /// Only requests naming this OCID, as a path segment (`GetVnic` of that VNIC) or a query
    /// value (`ListPrivateIps?vnicId=`), get the fault (`None`: every request of `op`). A test
    /// device to fault one resource; OCI has no such selector (docs/oci.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// Answer `status` and `code` instead of the real answer.
    #[default]
    Status,
    /// Never answer.
    Hang,
    /// Answer 200 with the first half of the real body (a connection cut mid-answer).
    Truncate,
}

impl Default for FaultRule {
    fn default() -> Self {
        Self {
            op: "*".into(),
            kind: FaultKind::Status,
            status: 500,
            code: "InternalServerError".into(),
            message: None,
            rate: 1.0,
            after_commit: false,
            times: None,
            resource: None,
        }
    }
}

impl SimConfig {
    /// Whether the shape is bare metal (`BM.*`), as oci-utils decides it.
    pub fn is_bare_metal(&self) -> bool {
        self.shape.starts_with("BM.")
    }

    /// Physical NICs a VNIC attachment's `nicIndex` can name: one on a VM, two on the
    /// bare-metal shapes that have two active NICs (the API reference's wording).
    pub fn physical_nics(&self) -> u32 {
        if self.is_bare_metal() { 2 } else { 1 }
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        let subnet = |n: &str, name: &str, cidr: &str| SubnetConfig {
            id: format!("ocid1.subnet.oc1.iad.sim{n}"),
            display_name: name.into(),
            cidr_block: cidr.into(),
            freeform_tags: std::collections::BTreeMap::new(),
        };
        Self {
            tenancy_id: "ocid1.tenancy.oc1..simtenancy".into(),
            compartment_id: "ocid1.compartment.oc1..simcompartment".into(),
            network_compartment_id: "ocid1.compartment.oc1..simnetwork".into(),
            instance_id: "ocid1.instance.oc1.iad.siminstance".into(),
            region: "us-ashburn-1".into(),
            region_short: "iad".into(),
            realm_domain: "oraclecloud.com".into(),
            availability_domain: "Uocm:US-ASHBURN-AD-1".into(),
            shape: "VM.Standard.E4.Flex".into(),
            ocpus: 2.0,
            max_vnic_attachments: 2,
            ips_per_vnic: 31,
            imds_nic_index: true,
            attach_delay_ms: 300,
            page_size: 10,
            token_lifetime_s: 3600,
            superseded_leaf_valid: true,
            vcn: VcnConfig {
                id: "ocid1.vcn.oc1.iad.simvcn".into(),
                display_name: "vcnpath-sim".into(),
                cidr_blocks: vec!["10.0.0.0/16".into(), "10.1.0.0/16".into()],
            },
            subnets: vec![
                subnet("nodes", "nodes", "10.0.0.0/24"),
                subnet("pods", "pods", "10.0.16.0/20"),
                subnet("tiny", "tiny", "10.1.0.0/29"),
            ],
            primary_mac: None,
            primary_ip: None,
            api_keys: Vec::new(),
            faults: Faults::default(),
            policy: None,
        }
    }
}
