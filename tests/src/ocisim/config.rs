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
    /// The first instance; with `instance_count` > 1 the others are `<instance_id>-<n>`
    /// (n = 1, 2, …), each with its own primary VNIC in the first subnet.
    pub instance_id: String,
    /// Instances in the one simulated tenancy (1). Each has its own VNICs and its IMDS at
    /// `/instances/<n>/opc/v2/` (the first also at `/opc/v2/`); they share the subnets, the
    /// API keys, the faults and the tenancy-wide rate limit. See [`SimConfig::instance_ids`].
    pub instance_count: u32,
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
    /// How IP CIDR blocks (`CreatePrivateIp` with `cidrPrefixLength`) behave.
    pub cidr: CidrConfig,
    /// `BulkCreatePrivateIps` / `BulkDeletePrivateIps` and their work requests.
    pub bulk: BulkConfig,
    /// The tenancy-wide request budget of the Core API across every instance (`None`: no
    /// limit). OCI throttles with 429 `TooManyRequests` and publishes no figure (docs/oci.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenancy_rate_limit: Option<RateLimit>,
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

/// IP CIDR blocks: one private-IP object for an aligned power-of-two block of the subnet.
/// Where OCI's sources are silent the behaviour is a knob (docs/oci.md, "IP CIDR blocks").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CidrConfig {
    /// The largest block, as the shortest prefix length: /18 (16,384 addresses) in OCI's
    /// announcement of IP CIDR addresses.
    pub largest_prefix: u8,
    /// The smallest block, as the longest prefix length. No source read confirms one; /30.
    pub smallest_prefix: u8,
    /// How a block counts against [`SimConfig::ips_per_vnic`]. No source says.
    pub limit_counts: LimitCount,
    /// Whether a create with `cidrPrefixLength` but no `ipAddress` gets a block OCI picks
    /// (`true`) or 400 `MissingParameter`. The SDK documents the prefix only "combined with
    /// the ipAddress field".
    pub pick_block_without_address: bool,
    /// `cidrPrefixLength` of a single address in answers: `None` (null, the field absent
    /// as in answers from before blocks existed) or `Some(32)`. No source shows either.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub single_ip_prefix: Option<u8>,
    /// The answer when the subnet holds enough free addresses but no free aligned block of
    /// the size asked (fragmentation). No source gives OCI's code.
    pub fragmented: ErrorAnswer,
}

/// How a block weighs against the per-VNIC private-IP limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitCount {
    /// One private-IP object, whatever its size (a /18, which OCI allows, could never fit
    /// a limit of 31–64 addresses otherwise).
    #[default]
    Objects,
    /// Each address of the block counts.
    Addresses,
}

/// An OCI error answer chosen by configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorAnswer {
    pub status: u16,
    pub code: String,
}

impl Default for CidrConfig {
    fn default() -> Self {
        Self {
            largest_prefix: 18,
            smallest_prefix: 30,
            limit_counts: LimitCount::Objects,
            pick_block_without_address: true,
            single_ip_prefix: None,
            fragmented: ErrorAnswer {
                status: 400,
                code: "LimitExceeded".into(),
            },
        }
    }
}

/// The bulk private-IP calls, asynchronous work requests in OCI's SDKs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BulkConfig {
    /// Most items one bulk call takes (`None`: no limit); beyond it 400 `InvalidParameter`.
    /// No source gives OCI's limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_items: Option<usize>,
    /// HTTP status of an accepted bulk call (the SDK reads only headers: 200 or 202).
    pub status: u16,
    /// How long the work request stays ACCEPTED before it runs (0: done when answered).
    pub work_request_ms: u64,
}

impl Default for BulkConfig {
    fn default() -> Self {
        Self {
            max_items: None,
            status: 200,
            work_request_ms: 0,
        }
    }
}

/// A token bucket over every Core API request of the tenancy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained requests per second.
    pub per_second: f64,
    /// Requests admitted at once above the sustained rate.
    pub burst: u32,
    /// The 429's `message` (observed answers name the user or the tenant).
    pub message: String,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            per_second: 20.0,
            burst: 5,
            message: "Too many requests for the tenant".into(),
        }
    }
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

    /// Every instance's OCID, the first being [`SimConfig::instance_id`].
    pub fn instance_ids(&self) -> Vec<String> {
        (0..self.instance_count.max(1))
            .map(|n| {
                if n == 0 {
                    self.instance_id.clone()
                } else {
                    format!("{}-{n}", self.instance_id)
                }
            })
            .collect()
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
            instance_count: 1,
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
            cidr: CidrConfig::default(),
            bulk: BulkConfig::default(),
            tenancy_rate_limit: None,
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
