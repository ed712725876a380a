//! The agent's configuration file (`vcnpath run --config FILE`, TOML). Every key is
//! optional; flags and environment variables override the file.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use ipnet::Ipv4Net;
use serde::Deserialize;
use vcnpath_common::{DEFAULT_NAT_PORT_MAX, DEFAULT_NAT_PORT_MIN, DEFAULT_PIN_DIR};

use crate::{datapath::NatTimeouts, ipam::PoolConfig};

/// How the agent authenticates to OCI.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// The instance's certificate from IMDS, federated to a session token (default on OCI).
    #[default]
    InstancePrincipal,
    /// An API key from an OCI config file profile.
    ConfigFile,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[derive(Default)]
pub struct AgentConfig {
    pub oci: OciSection,
    pub ipam: IpamSection,
    pub datapath: DatapathSection,
    pub node: NodeSection,
    pub cni: CniSection,
}

/// The CNI network configuration the agent installs once it can serve pods.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CniSection {
    /// The runtime's CNI configuration directory (the `DaemonSet` mounts the node's
    /// `/etc/cni/net.d` at `/host/etc/cni/net.d`); unset: the agent writes no conflist.
    pub conf_dir: Option<PathBuf>,
    /// Remove the conflist when the agent stops (uninstalling vcnpath from the node). Off by
    /// default: during a rolling update the node would report `NetworkNotReady`.
    pub uninstall: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OciSection {
    pub auth: AuthMode,
    /// OCI config file for `auth = "config_file"` (default `~/.oci/config`).
    pub config_file: Option<PathBuf>,
    pub profile: String,
    /// IMDS v2 base URL.
    pub imds_url: String,
    /// One base URL for the Core API and federation (the simulator); by default both are
    /// derived from the region and realm in IMDS.
    pub endpoint: Option<String>,
    /// PEM certificates to trust besides the public web roots built in: a private realm's
    /// CA, or the node's store (`/etc/ssl/certs/ca-certificates.crt`).
    pub ca_bundle: Option<PathBuf>,
    /// The node's own limit on OCI calls per second. OCI's limits are per tenancy, shared by
    /// every node; after a 429 the node halves its rate and earns it back.
    pub requests_per_second: u32,
    /// Calls the node may make at once after being idle, at its full rate.
    pub burst: u32,
    /// Before its first reconcile with OCI the agent waits a random time up to this long, so
    /// a node pool that starts at once does not call OCI at once. Pods restored from the
    /// checkpoint are served meanwhile.
    pub start_jitter_ms: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IpamSection {
    /// Subnet OCIDs for new VNICs, in order; empty means `subnet_tag`, else the primary
    /// VNIC's subnet.
    pub subnets: Vec<String>,
    /// Select the subnets for new VNICs by freeform tag, `key` or `key=value` (used when
    /// `subnets` is empty): every matching subnet of the VCN, in display-name order.
    pub subnet_tag: Option<String>,
    /// The compartment `subnet_tag` searches; default the VCN's (from `GetVcn`), which is
    /// usually not the instance's.
    pub subnet_compartment_id: Option<String>,
    /// What the pool asks OCI for: single private IPs, IP CIDR blocks, or blocks where the
    /// subnet can give them and single IPs where it cannot.
    pub mode: IpamMode,
    /// The prefix length of the blocks (`/28`: 16 addresses).
    pub block_prefix: u8,
    /// Addresses one VNIC may hold in blocks, whatever its object limit allows.
    pub block_addresses_per_vnic: usize,
    pub ips_per_vnic: usize,
    pub warm_ips: usize,
    pub min_ips: usize,
    pub warm_vnics: usize,
    /// Give pods addresses on the primary VNIC too.
    pub use_primary_vnic: bool,
    pub release_delay_secs: u64,
    pub cooldown_secs: u64,
    /// How long a pod's host veth may be missing before its allocation is released (a DEL
    /// that never came).
    pub allocation_gc_grace_secs: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatapathSection {
    pub pin_dir: PathBuf,
    /// Destinations never masqueraded besides the VCN's own CIDR blocks.
    pub nonmasq_cidrs: Vec<Ipv4Net>,
    /// MTU of secondary VNICs and pod interfaces.
    pub mtu: u32,
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    pub nat_max_entries: Option<u32>,
    pub gc_interval_secs: u64,
    /// Seconds between datapath syncs and repair passes: a VNIC's interface, a filter
    /// deleted by hand, a deleted pin or a pod veth without the anti-spoofing check are
    /// set up or put back within this period.
    pub sync_interval_secs: u64,
    pub nat_timeouts: NatTimeouts,
    /// Whether pods may reach the instance metadata service (169.254.169.254, TCP 80), which
    /// hands out the node's instance-principal credentials. DNS and NTP at that address
    /// stay reachable either way.
    pub pod_imds: PodImds,
    /// Namespaces whose pods may reach it although `pod_imds = "deny"`.
    pub pod_imds_allow_namespaces: Vec<String>,
}

/// `ipam.mode`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum IpamMode {
    /// One private IP per address (default).
    #[default]
    Ip,
    /// IP CIDR blocks of `block_prefix` only.
    Cidr,
    /// Blocks, and single addresses on a VNIC whose subnet has no free aligned block.
    Auto,
}

/// `datapath.pod_imds`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PodImds {
    /// Only pods of `pod_imds_allow_namespaces` (default).
    #[default]
    Deny,
    /// Every pod.
    Allow,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    /// Checkpoint directory (default `/run/vcnpath`: a tmpfs on nodes, which survives agent
    /// restarts and, like the pods, not a reboot).
    pub state_dir: PathBuf,
    /// The local API socket the CNI plugin uses.
    pub socket: PathBuf,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub listen: SocketAddr,
    /// Bare-metal shapes only: the interfaces of the physical NICs, in `nicIndex` order
    /// (e.g. `["ens2f0", "ens2f1"]`). New VNICs are spread over them. Empty: NIC 0 only,
    /// the interface carrying the primary VNIC (OCI does not say which interface is NIC 1).
    pub physical_nics: Vec<String>,
}

impl Default for OciSection {
    fn default() -> Self {
        Self {
            auth: AuthMode::InstancePrincipal,
            config_file: None,
            profile: "DEFAULT".into(),
            imds_url: "http://169.254.169.254/opc/v2/".into(),
            endpoint: None,
            ca_bundle: None,
            requests_per_second: DEFAULT_REQUESTS_PER_SECOND,
            burst: DEFAULT_BURST,
            start_jitter_ms: DEFAULT_START_JITTER_MS,
        }
    }
}

/// The node's own OCI call rate: Oracle's controllers budget about 20 calls/s for a whole
/// tenancy (docs/oci.md), so a node alone may use half of it.
const DEFAULT_REQUESTS_PER_SECOND: u32 = 10;
const DEFAULT_BURST: u32 = 10;
/// Spreads a node pool's first calls over a second; a node with no pod yet waits on average
/// half of it longer for its first address.
const DEFAULT_START_JITTER_MS: u64 = 1000;

impl OciSection {
    /// The `[oci]` part of [`AgentConfig::validate`].
    fn validate(&self) -> Result<(), ConfigError> {
        within(
            "oci.requests_per_second",
            u64::from(self.requests_per_second),
            1..=1000,
            "0 would never call OCI, and more than OCI serves a tenancy only earns 429s",
        )?;
        within(
            "oci.burst",
            u64::from(self.burst),
            1..=1000,
            "a burst of 0 would never call OCI",
        )?;
        within(
            "oci.start_jitter_ms",
            self.start_jitter_ms,
            0..=60_000,
            "a start delayed by more than a minute delays every new node's first pod as long",
        )
    }

    /// The client's rate limit.
    pub fn rate_limit(&self) -> crate::oci::RateLimit {
        crate::oci::RateLimit {
            per_second: f64::from(self.requests_per_second),
            burst: self.burst,
        }
    }
}

impl Default for IpamSection {
    fn default() -> Self {
        let pool = PoolConfig::default();
        Self {
            subnets: Vec::new(),
            subnet_tag: None,
            subnet_compartment_id: None,
            mode: IpamMode::default(),
            block_prefix: DEFAULT_BLOCK_PREFIX,
            block_addresses_per_vnic: pool.block_addresses_per_vnic,
            ips_per_vnic: pool.ips_per_vnic,
            warm_ips: pool.warm_ips,
            min_ips: pool.min_ips,
            warm_vnics: pool.warm_vnics,
            use_primary_vnic: pool.use_primary_vnic,
            release_delay_secs: pool.release_delay.as_secs(),
            cooldown_secs: pool.cooldown.as_secs(),
            allocation_gc_grace_secs: DEFAULT_ALLOCATION_GC_GRACE_SECS,
        }
    }
}

impl IpamSection {
    /// The `[ipam]` part of [`AgentConfig::validate`].
    fn validate(&self) -> Result<(), ConfigError> {
        let ipam = self;
        within(
            "ipam.ips_per_vnic",
            ipam.ips_per_vnic as u64,
            1..=MAX_IPS_PER_VNIC,
            "OCI allows at most 64 secondary private IPs per VNIC (docs/oci.md)",
        )?;
        within(
            "ipam.block_prefix",
            u64::from(ipam.block_prefix),
            BLOCK_PREFIXES,
            "OCI's IP CIDR blocks on a VNIC are /18 (16,384 addresses) to /30 (docs/oci.md)",
        )?;
        within(
            "ipam.block_addresses_per_vnic",
            ipam.block_addresses_per_vnic as u64,
            1..=MAX_BLOCK_ADDRESSES_PER_VNIC,
            "no VNIC holds more than a /18, OCI's largest block (docs/oci.md)",
        )?;
        for (field, value) in [
            ("ipam.warm_ips", ipam.warm_ips),
            ("ipam.min_ips", ipam.min_ips),
        ] {
            within(
                field,
                value as u64,
                0..=MAX_NODE_ADDRESSES,
                "no node holds more addresses (VNIC limit × 64)",
            )?;
        }
        within(
            "ipam.warm_vnics",
            ipam.warm_vnics as u64,
            0..=MAX_VNICS,
            "no shape attaches more VNICs",
        )?;
        within(
            "ipam.release_delay_secs",
            ipam.release_delay_secs,
            0..=MAX_RELEASE_DELAY_SECS,
            "longer than a week would keep excess addresses from the subnet for good",
        )?;
        within(
            "ipam.cooldown_secs",
            ipam.cooldown_secs,
            0..=MAX_COOLDOWN_SECS,
            "longer than a day would keep every freed address from new pods for good",
        )?;
        within(
            "ipam.allocation_gc_grace_secs",
            ipam.allocation_gc_grace_secs,
            ALLOCATION_GC_GRACE_SECS,
            "a shorter grace could take the address of a pod whose plugin is still creating its veth, a longer one holds a leaked address for good",
        )?;
        Ok(())
    }
}

impl Default for DatapathSection {
    fn default() -> Self {
        Self {
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            nonmasq_cidrs: Vec::new(),
            mtu: 9000,
            nat_port_min: DEFAULT_NAT_PORT_MIN,
            nat_port_max: DEFAULT_NAT_PORT_MAX,
            nat_max_entries: None,
            gc_interval_secs: 10,
            sync_interval_secs: 1,
            nat_timeouts: NatTimeouts::default(),
            pod_imds: PodImds::Deny,
            pod_imds_allow_namespaces: Vec::new(),
        }
    }
}

impl Default for NodeSection {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/run/vcnpath"),
            socket: PathBuf::from("/run/vcnpath/vcnpath.sock"),
            listen: SocketAddr::from(([127, 0, 0, 1], 9965)),
            physical_nics: Vec::new(),
        }
    }
}

/// A TOML file that cannot be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
}

/// Reads and parses a TOML configuration file.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| FileError::Parse {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// OCI's largest per-VNIC secondary IP limit (docs/oci.md).
const MAX_IPS_PER_VNIC: u64 = 64;
/// More VNIC attachments than any OCI shape allows.
const MAX_VNICS: u64 = 256;
/// More addresses than any node can hold.
const MAX_NODE_ADDRESSES: u64 = MAX_VNICS * MAX_IPS_PER_VNIC;
/// OKE's native CNI puts up to 256 pods on a secondary VNIC with blocks (docs/oci.md).
const DEFAULT_BLOCK_PREFIX: u8 = 28;
/// OCI's IP CIDR block sizes on a VNIC: /18 at most; the smallest is not documented (/30
/// is the smallest block that is more than a pair, docs/oci.md).
const BLOCK_PREFIXES: std::ops::RangeInclusive<u64> = 18..=30;
/// A /18, OCI's largest block.
const MAX_BLOCK_ADDRESSES_PER_VNIC: u64 = 16_384;
const MAX_RELEASE_DELAY_SECS: u64 = 7 * 24 * 3600;
const MAX_COOLDOWN_SECS: u64 = 24 * 3600;
const DEFAULT_ALLOCATION_GC_GRACE_SECS: u64 = 300;
const ALLOCATION_GC_GRACE_SECS: std::ops::RangeInclusive<u64> = 30..=24 * 3600;
const MAX_GC_INTERVAL_SECS: u64 = 3600;
const MAX_SYNC_INTERVAL_SECS: u64 = 300;
const MAX_NAT_TIMEOUT_SECS: u64 = 30 * 24 * 3600;
const MAX_NAT_ENTRIES: u64 = 1 << 24;

/// `value` of `field` must lie in `range`; the error says the range, the value and why.
fn within(
    field: &'static str,
    value: u64,
    range: std::ops::RangeInclusive<u64>,
    why: &str,
) -> Result<(), ConfigError> {
    if range.contains(&value) {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        field,
        reason: format!(
            "{value} is outside {}..={}: {why}",
            range.start(),
            range.end()
        ),
    })
}

impl AgentConfig {
    /// Reads a file, or the defaults when `path` is `None`.
    pub fn load(path: Option<&std::path::Path>) -> Result<Self, ConfigError> {
        let config: Self = match path {
            None => Self::default(),
            Some(path) => read_toml(path)?,
        };
        config.validate()?;
        Ok(config)
    }

    /// Every value is range-checked here, with the reason in the error: a value the agent
    /// cannot use is refused at start, never found later as an overflow in a handler.
    fn validate(&self) -> Result<(), ConfigError> {
        self.oci.validate()?;
        self.ipam.validate()?;
        let dp = &self.datapath;
        within(
            "datapath.mtu",
            u64::from(dp.mtu),
            576..=9000,
            "IPv4 needs 576, and 9000 is the VCN's MTU",
        )?;
        within(
            "datapath.nat_port_min",
            u64::from(dp.nat_port_min),
            1..=u64::from(dp.nat_port_max),
            "port 0 is not a port, and the range must not be empty (nat_port_max is the top)",
        )?;
        if let Some(entries) = dp.nat_max_entries {
            within(
                "datapath.nat_max_entries",
                u64::from(entries),
                1..=MAX_NAT_ENTRIES,
                "the NAT table needs room for a flow, and the kernel cannot allocate more",
            )?;
        }
        within(
            "datapath.gc_interval_secs",
            dp.gc_interval_secs,
            1..=MAX_GC_INTERVAL_SECS,
            "0 would spin, and expired NAT entries would hold ports for over an hour",
        )?;
        within(
            "datapath.sync_interval_secs",
            dp.sync_interval_secs,
            1..=MAX_SYNC_INTERVAL_SECS,
            "0 would spin, and a filter deleted by hand is an outage until the next pass",
        )?;
        let t = &dp.nat_timeouts;
        for (field, value) in [
            ("datapath.nat_timeouts.tcp_established", t.tcp_established),
            ("datapath.nat_timeouts.tcp_opening", t.tcp_opening),
            ("datapath.nat_timeouts.tcp_closing", t.tcp_closing),
            ("datapath.nat_timeouts.udp", t.udp),
            ("datapath.nat_timeouts.icmp", t.icmp),
            (
                "datapath.nat_timeouts.inbound_unanswered",
                t.inbound_unanswered,
            ),
        ] {
            within(
                field,
                value.as_secs(),
                1..=MAX_NAT_TIMEOUT_SECS,
                "0 expires every flow at once, and past 30 days a NAT entry never frees its port",
            )?;
        }
        if self.oci.auth == AuthMode::ConfigFile
            && self.oci.config_file.is_none()
            && std::env::var_os("HOME").is_none()
        {
            return Err(ConfigError::Invalid {
                field: "oci.config_file",
                reason: "needed for auth = \"config_file\" when HOME is unset".into(),
            });
        }
        Ok(())
    }

    /// The pods this node can hold with this configuration on a shape with `max_vnics`
    /// (`vcnpath max-pods`): the same number the running agent's pool reports as capacity.
    pub fn max_pods(&self, max_vnics: usize) -> usize {
        self.pool(max_vnics, Vec::new()).capacity()
    }

    /// The pool settings, given the shape's VNIC limit and the subnets for new VNICs
    /// (see [`select_subnets`]).
    pub fn pool(&self, max_vnics: usize, subnets: Vec<String>) -> PoolConfig {
        PoolConfig {
            warm_ips: self.ipam.warm_ips,
            min_ips: self.ipam.min_ips,
            warm_vnics: self.ipam.warm_vnics,
            ips_per_vnic: self.ipam.ips_per_vnic,
            block_prefix: (self.ipam.mode != IpamMode::Ip).then_some(self.ipam.block_prefix),
            single_fallback: self.ipam.mode == IpamMode::Auto,
            block_addresses_per_vnic: self.ipam.block_addresses_per_vnic,
            max_vnics,
            use_primary_vnic: self.ipam.use_primary_vnic,
            subnets,
            release_delay: Duration::from_secs(self.ipam.release_delay_secs),
            cooldown: Duration::from_secs(self.ipam.cooldown_secs),
            ..PoolConfig::default()
        }
    }
}

/// The subnets for new VNICs: the configured list; else the VCN's subnets carrying the
/// freeform tag (`key` or `key=value`), in display-name order; else the primary's subnet.
pub fn select_subnets(
    ipam: &IpamSection,
    vcn_subnets: &[crate::oci::models::Subnet],
    primary_subnet: &str,
) -> Result<Vec<String>, ConfigError> {
    if !ipam.subnets.is_empty() {
        return Ok(ipam.subnets.clone());
    }
    let Some(tag) = &ipam.subnet_tag else {
        return Ok(vec![primary_subnet.to_owned()]);
    };
    let (key, value) = tag
        .split_once('=')
        .map_or((tag.as_str(), None), |(k, v)| (k, Some(v)));
    let mut matching: Vec<&crate::oci::models::Subnet> = vcn_subnets
        .iter()
        .filter(|s| {
            s.freeform_tags
                .get(key)
                .is_some_and(|v| value.is_none_or(|want| v == want))
        })
        .collect();
    matching.sort_by(|a, b| (&a.display_name, &a.id).cmp(&(&b.display_name, &b.id)));
    if matching.is_empty() {
        return Err(ConfigError::Invalid {
            field: "ipam.subnet_tag",
            reason: format!(
                "no subnet of the VCN carries the freeform tag {tag:?}; tag one or list `subnets`"
            ),
        });
    }
    Ok(matching.into_iter().map(|s| s.id.clone()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet(id: &str, name: &str, tags: &[(&str, &str)]) -> crate::oci::models::Subnet {
        serde_json::from_value(serde_json::json!({
            "id": id, "cidrBlock": "10.0.1.0/24", "compartmentId": "c", "displayName": name, "vcnId": "v",
            "virtualRouterIp": "10.0.1.1", "virtualRouterMac": "00:00:17:00:00:01", "lifecycleState": "AVAILABLE",
            "freeformTags": tags.iter().map(|(k, v)| ((*k).to_owned(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
        }))
        .expect("subnet JSON")
    }

    #[test]
    fn subnets_are_chosen_by_list_then_tag_then_primary() {
        let vcn = [
            subnet("s-c", "pods-c", &[("vcnpath", "pods")]),
            subnet("s-a", "pods-a", &[("vcnpath", "pods")]),
            subnet("s-x", "other", &[("vcnpath", "lb")]),
            subnet("s-n", "nodes", &[]),
        ];
        let mut ipam = IpamSection {
            subnet_tag: Some("vcnpath=pods".into()),
            ..IpamSection::default()
        };
        assert_eq!(
            select_subnets(&ipam, &vcn, "s-n").unwrap(),
            ["s-a", "s-c"],
            "tagged, in name order"
        );
        ipam.subnet_tag = Some("vcnpath".into());
        assert_eq!(
            select_subnets(&ipam, &vcn, "s-n").unwrap(),
            ["s-x", "s-a", "s-c"],
            "any value of the key, in name order"
        );
        ipam.subnets = vec!["s-x".into()];
        assert_eq!(
            select_subnets(&ipam, &vcn, "s-n").unwrap(),
            ["s-x"],
            "an explicit list wins"
        );
        let none = IpamSection {
            subnet_tag: Some("missing".into()),
            ..IpamSection::default()
        };
        assert!(
            select_subnets(&none, &vcn, "s-n")
                .unwrap_err()
                .to_string()
                .contains("missing")
        );
        assert_eq!(
            select_subnets(&IpamSection::default(), &vcn, "s-n").unwrap(),
            ["s-n"],
            "default: the primary's subnet"
        );
    }

    #[test]
    fn the_shipped_configmap_parses() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/configmap.yaml"
        ))
        .unwrap();
        let body: String = text
            .split_once("config.toml: |\n")
            .expect("config.toml key")
            .1
            .lines()
            .map(|l| l.strip_prefix("    ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let config: AgentConfig =
            toml::from_str(&body).expect("the ConfigMap's config.toml is valid");
        config.validate().expect("and passes validation");
        assert_eq!(config.node.listen.port(), 9965);
    }

    #[test]
    fn pods_are_kept_from_the_metadata_service_unless_allowed() {
        let config: AgentConfig = toml::from_str("").expect("valid config");
        assert_eq!(config.datapath.pod_imds, PodImds::Deny, "denied by default");
        let config: AgentConfig = toml::from_str(
            "[datapath]\npod_imds = \"deny\"\npod_imds_allow_namespaces = [\"kube-system\"]",
        )
        .expect("valid config");
        assert_eq!(config.datapath.pod_imds_allow_namespaces, ["kube-system"]);
        let config: AgentConfig =
            toml::from_str("[datapath]\npod_imds = \"allow\"").expect("valid config");
        assert_eq!(config.datapath.pod_imds, PodImds::Allow);
        let err = toml::from_str::<AgentConfig>("[datapath]\npod_imds = \"maybe\"")
            .expect_err("an unknown policy is refused")
            .to_string();
        assert!(err.contains("pod_imds") && err.contains("allow"), "{err}");
    }

    #[test]
    fn max_pods_follows_the_ipam_section() {
        let config: AgentConfig = toml::from_str("[ipam]\nips_per_vnic = 8").expect("valid config");
        assert_eq!(
            config.max_pods(3),
            16,
            "two secondary VNICs of 8 addresses, the primary left out"
        );
        let config: AgentConfig =
            toml::from_str("[ipam]\nips_per_vnic = 8\nuse_primary_vnic = true")
                .expect("valid config");
        assert_eq!(config.max_pods(3), 24, "the primary VNIC serves pods too");
        let config: AgentConfig = toml::from_str("[ipam]\nmode = \"cidr\"").expect("valid config");
        assert_eq!(
            config.max_pods(3),
            2 * 256,
            "two secondary VNICs of 31 /28 blocks, each capped at 256 addresses"
        );
        let config: AgentConfig =
            toml::from_str("[ipam]\nmode = \"auto\"\nblock_prefix = 30\nips_per_vnic = 8")
                .expect("valid config");
        assert_eq!(config.max_pods(3), 2 * 8 * 4, "eight /30s per VNIC");
        assert_eq!(
            config.max_pods(3),
            config.pool(3, Vec::new()).capacity(),
            "the number kubelet is told is the pool's capacity"
        );
    }

    #[test]
    fn every_value_is_range_checked_with_the_reason() {
        for (toml, field) in [
            (
                "[ipam]\ncooldown_secs = 9223372036854775807",
                "ipam.cooldown_secs",
            ),
            (
                "[ipam]\nallocation_gc_grace_secs = 5",
                "ipam.allocation_gc_grace_secs",
            ),
            (
                "[ipam]\nallocation_gc_grace_secs = 9223372036854775807",
                "ipam.allocation_gc_grace_secs",
            ),
            (
                "[ipam]\nrelease_delay_secs = 9223372036854775807",
                "ipam.release_delay_secs",
            ),
            (
                "[ipam]\nips_per_vnic = 9223372036854775807",
                "ipam.ips_per_vnic",
            ),
            ("[ipam]\nips_per_vnic = 0", "ipam.ips_per_vnic"),
            ("[oci]\nrequests_per_second = 0", "oci.requests_per_second"),
            ("[oci]\nburst = 0", "oci.burst"),
            ("[oci]\nstart_jitter_ms = 600000", "oci.start_jitter_ms"),
            ("[ipam]\nblock_prefix = 17", "ipam.block_prefix"),
            ("[ipam]\nblock_prefix = 31", "ipam.block_prefix"),
            (
                "[ipam]\nblock_addresses_per_vnic = 0",
                "ipam.block_addresses_per_vnic",
            ),
            ("[ipam]\nwarm_ips = 9223372036854775807", "ipam.warm_ips"),
            ("[ipam]\nmin_ips = 9223372036854775807", "ipam.min_ips"),
            (
                "[ipam]\nwarm_vnics = 9223372036854775807",
                "ipam.warm_vnics",
            ),
            (
                "[datapath]\ngc_interval_secs = 0",
                "datapath.gc_interval_secs",
            ),
            (
                "[datapath]\ngc_interval_secs = 9223372036854775807",
                "datapath.gc_interval_secs",
            ),
            (
                "[datapath]\nsync_interval_secs = 0",
                "datapath.sync_interval_secs",
            ),
            (
                "[datapath]\nsync_interval_secs = 301",
                "datapath.sync_interval_secs",
            ),
            ("[datapath]\nnat_port_min = 0", "datapath.nat_port_min"),
            (
                "[datapath]\nnat_port_min = 2000\nnat_port_max = 1999",
                "datapath.nat_port_min",
            ),
            (
                "[datapath]\nnat_max_entries = 0",
                "datapath.nat_max_entries",
            ),
            ("[datapath]\nmtu = 65535", "datapath.mtu"),
            (
                "[datapath.nat_timeouts]\nudp = 0",
                "datapath.nat_timeouts.udp",
            ),
            (
                "[datapath.nat_timeouts]\ntcp_established = 9223372036854775807",
                "datapath.nat_timeouts.tcp_established",
            ),
        ] {
            let config: AgentConfig =
                toml::from_str(toml).unwrap_or_else(|e| panic!("{toml}: {e}"));
            let err = config
                .validate()
                .map_or_else(|e| e.to_string(), |()| "accepted".to_owned());
            assert!(
                err.starts_with(field) && err.contains("outside") && err.contains(": "),
                "{toml:?} must be refused naming {field}, its range and why; got {err:?}"
            );
        }
        AgentConfig::default()
            .validate()
            .expect("the defaults are valid");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(
            toml::from_str::<AgentConfig>("[ipam]\nwarm_ip = 3").is_err(),
            "a typo is an error"
        );
        let config: AgentConfig = toml::from_str("[datapath]\nmtu = 100").unwrap();
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("datapath.mtu")
        );
    }
}
