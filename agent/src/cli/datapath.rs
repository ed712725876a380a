//! `vcnpath datapath`: runs the datapath from a static configuration file, until stopped.
//! It is the datapath half of the agent, usable on its own (and by the lab tests) before
//! the OCI-driven control plane fills the same maps.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::Ipv4Net;
use serde::Deserialize;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};
use vcnpath_common::{
    CONFIG_F_ENABLED, Config, DEFAULT_PIN_DIR, ENDPOINT_KIND_POD, ENDPOINT_KIND_PRIMARY, Endpoint,
};

use crate::{
    daemon::{
        config::{FileError, read_toml},
        repair::{self, RepairCounters},
    },
    datapath::{self, Datapath, DatapathState, LoadOptions, NatTimeouts, vnic_entry},
    host,
};

/// The static datapath configuration (TOML).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticConfig {
    /// bpffs directory for the pins.
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// Every CIDR block of the VCN.
    pub vcn_cidrs: Vec<Ipv4Net>,
    /// Destinations never masqueraded (on-premises via DRG, peered VCNs, …).
    #[serde(default)]
    pub nonmasq_cidrs: Vec<Ipv4Net>,
    /// Interface whose primary IP is the masquerade address (the primary VNIC).
    pub masquerade_interface: String,
    /// NAT port range used when a flow's own port is taken.
    #[serde(default = "default_port_min")]
    pub nat_port_min: u16,
    #[serde(default = "default_port_max")]
    pub nat_port_max: u16,
    /// Capacity of the NAT table (entries; two per flow).
    #[serde(default)]
    pub nat_max_entries: Option<u32>,
    /// Seconds between NAT garbage collections (and `rp_filter` checks).
    #[serde(default = "default_gc_interval")]
    pub gc_interval_secs: u64,
    /// Seconds between repair passes: a filter deleted by hand, a deleted pin, a pod veth
    /// without the anti-spoofing check are put back within this period (1–300).
    #[serde(default = "default_sync_interval")]
    pub sync_interval_secs: u64,
    #[serde(default)]
    pub nat_timeouts: NatTimeouts,
    /// The managed VNICs.
    #[serde(rename = "vnic")]
    pub vnics: Vec<VnicConfig>,
}

/// One managed VNIC.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VnicConfig {
    pub interface: String,
    pub primary_ip: Ipv4Addr,
    pub subnet: Ipv4Net,
    pub router_ip: Ipv4Addr,
    /// The virtual router's MAC, if known (skips the neighbour lookup on redirects).
    #[serde(default)]
    pub router_mac: Option<String>,
    /// Pod addresses (secondary private IPs) owned by this VNIC.
    #[serde(default)]
    pub pods: Vec<Ipv4Addr>,
}

fn default_pin_dir() -> PathBuf {
    PathBuf::from(DEFAULT_PIN_DIR)
}
const fn default_port_min() -> u16 {
    vcnpath_common::DEFAULT_NAT_PORT_MIN
}
const fn default_port_max() -> u16 {
    vcnpath_common::DEFAULT_NAT_PORT_MAX
}
const fn default_gc_interval() -> u64 {
    10
}
const fn default_sync_interval() -> u64 {
    1
}
/// The longest `sync_interval_secs`: a deleted filter is an outage until the next pass.
const MAX_SYNC_INTERVAL_SECS: u64 = 300;

/// A configuration that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("masquerade_interface {0:?} is not one of the [[vnic]] interfaces")]
    MasqueradeInterface(String),
    #[error(
        "sync_interval_secs ({0}) must be between 1 and 300: 0 would spin, and a filter deleted by hand is an outage until the next pass"
    )]
    SyncInterval(u64),
    #[error("nat_port_min ({min}) must be between 1 and nat_port_max ({max})")]
    PortRange { min: u16, max: u16 },
    #[error("vnic {interface}: pod address {pod} is outside its subnet {subnet}")]
    PodOutsideSubnet {
        interface: String,
        pod: Ipv4Addr,
        subnet: Ipv4Net,
    },
    #[error("address {addr} is listed on both {first} and {second}")]
    DuplicateAddress {
        addr: Ipv4Addr,
        first: String,
        second: String,
    },
    #[error("vnic {interface}: router_mac {value:?} is not a MAC address (aa:bb:cc:dd:ee:ff)")]
    RouterMac { interface: String, value: String },
    #[error("vnic {interface}: {source} (does the interface exist in this network namespace?)")]
    Interface {
        interface: String,
        source: std::io::Error,
    },
}

impl StaticConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let config: Self = read_toml(path)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=MAX_SYNC_INTERVAL_SECS).contains(&self.sync_interval_secs) {
            return Err(ConfigError::SyncInterval(self.sync_interval_secs));
        }
        if self.nat_port_min == 0 || self.nat_port_min > self.nat_port_max {
            return Err(ConfigError::PortRange {
                min: self.nat_port_min,
                max: self.nat_port_max,
            });
        }
        if !self
            .vnics
            .iter()
            .any(|v| v.interface == self.masquerade_interface)
        {
            return Err(ConfigError::MasqueradeInterface(
                self.masquerade_interface.clone(),
            ));
        }
        let mut owners: BTreeMap<Ipv4Addr, &str> = BTreeMap::new();
        for vnic in &self.vnics {
            parse_mac(vnic)?;
            for addr in std::iter::once(&vnic.primary_ip).chain(&vnic.pods) {
                if !vnic.subnet.contains(addr) {
                    return Err(ConfigError::PodOutsideSubnet {
                        interface: vnic.interface.clone(),
                        pod: *addr,
                        subnet: vnic.subnet,
                    });
                }
                if let Some(first) = owners.insert(*addr, &vnic.interface) {
                    return Err(ConfigError::DuplicateAddress {
                        addr: *addr,
                        first: first.to_owned(),
                        second: vnic.interface.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The desired map contents, resolving interfaces in the current network namespace.
    /// A router MAC the file does not give is taken from `learned` (by interface), what
    /// [`learn_router_macs`] found in the neighbour table.
    pub fn desired_state(
        &self,
        learned: &BTreeMap<String, [u8; 6]>,
    ) -> Result<DatapathState, ConfigError> {
        let mut state = DatapathState {
            vcn_cidrs: self.vcn_cidrs.iter().map(Ipv4Net::trunc).collect(),
            nonmasq_cidrs: self
                .nonmasq_cidrs
                .iter()
                .map(Ipv4Net::trunc)
                .collect::<BTreeSet<_>>(),
            ..DatapathState::default()
        };
        for vnic in &self.vnics {
            let interface_error = |source| ConfigError::Interface {
                interface: vnic.interface.clone(),
                source,
            };
            let ifindex = host::link::index(&vnic.interface).map_err(interface_error)?;
            let mac = host::link::mac(&vnic.interface).map_err(interface_error)?;
            let router_mac = parse_mac(vnic)?.or_else(|| learned.get(&vnic.interface).copied());
            state.vnics.insert(
                ifindex,
                vnic_entry(
                    ifindex,
                    mac,
                    vnic.primary_ip,
                    vnic.subnet,
                    vnic.router_ip,
                    router_mac,
                ),
            );
            let endpoint = |kind| Endpoint {
                ifindex,
                kind,
                flags: 0,
                inbound_ports: 0,
            };
            state
                .endpoints
                .insert(vnic.primary_ip, endpoint(ENDPOINT_KIND_PRIMARY));
            for pod in &vnic.pods {
                state.endpoints.insert(*pod, endpoint(ENDPOINT_KIND_POD));
            }
            if vnic.interface == self.masquerade_interface {
                state.config = Some(Config {
                    masq_ip: vnic.primary_ip.octets(),
                    masq_ifindex: ifindex,
                    port_min: self.nat_port_min,
                    port_max: self.nat_port_max,
                    flags: CONFIG_F_ENABLED,
                });
            }
        }
        Ok(state)
    }
}

fn parse_mac(vnic: &VnicConfig) -> Result<Option<[u8; 6]>, ConfigError> {
    let Some(text) = &vnic.router_mac else {
        return Ok(None);
    };
    let error = || ConfigError::RouterMac {
        interface: vnic.interface.clone(),
        value: text.clone(),
    };
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        return Err(error());
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        *byte = u8::from_str_radix(part, 16).map_err(|_| error())?;
    }
    Ok(Some(mac))
}

/// Runs the datapath until SIGTERM/SIGINT; SIGHUP re-reads the file and syncs the
/// difference. On exit the programs stay attached and the maps pinned, so traffic keeps
/// flowing and the next start adopts them.
pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    let mut config = StaticConfig::load(config_path)?;
    let mut datapath = Datapath::load(&LoadOptions {
        pin_dir: config.pin_dir.clone(),
        nat_max_entries: config.nat_max_entries,
    })?;
    for vnic in &config.vnics {
        datapath.attach(&vnic.interface)?;
    }
    let adopted = datapath.adopted;
    let (handle, task) = datapath::task::spawn(datapath, config.nat_timeouts);
    let netlink = host::netlink::Netlink::connect()?;
    let mut learned = BTreeMap::new();
    learn_router_macs(&netlink, &config, &mut learned).await;
    let report = handle.sync(config.desired_state(&learned)?).await?;
    if let Some(masq) = config
        .vnics
        .iter()
        .find(|v| v.interface == config.masquerade_interface)
    {
        super::record_nf_nat_flows(
            &handle,
            masq.primary_ip,
            config.nat_port_min..=config.nat_port_max,
        )
        .await;
    }
    ensure_rp_filter(&config).await;
    // The VNICs by ifindex, which a rename does not change.
    let mut vnics = vnic_indices(&config)?;
    let repairs = RepairCounters::default();
    // Pod veths made before this start are covered before "ready".
    if let Err(error) = repair::pass(&handle, &netlink, &vnics, &repairs).await {
        warn!(%error, "the first repair pass failed; the periodic pass retries");
    }
    info!(
        adopted,
        ?report,
        interfaces = config.vnics.len(),
        "datapath ready"
    );

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_secs(config.gc_interval_secs.max(1)));
    let mut repair_tick = tokio::time::interval(Duration::from_secs(config.sync_interval_secs));
    loop {
        tokio::select! {
            _ = hup.recv() => {
                match reload(config_path, &handle, &learned).await {
                    Ok(new) => {
                        config = new;
                        vnics = vnic_indices(&config)?;
                    }
                    Err(error) => warn!(%error, "reload failed; keeping the previous configuration"),
                }
            }
            _ = repair_tick.tick() => {
                if let Err(error) = repair::pass(&handle, &netlink, &vnics, &repairs).await {
                    warn!(%error, "datapath repair failed");
                }
                if learn_router_macs(&netlink, &config, &mut learned).await {
                    match config.desired_state(&learned) {
                        Ok(state) => {
                            if let Err(error) = handle.sync(state).await {
                                warn!(%error, "datapath sync after router MAC resolution failed");
                            }
                        }
                        Err(error) => warn!(%error, "the configuration no longer applies"),
                    }
                }
            }
            _ = tick.tick() => {
                let gc = handle.collect_nat().await?;
                if gc.removed > 0 {
                    info!(scanned = gc.scanned, removed = gc.removed, "NAT entries expired");
                }
                ensure_rp_filter(&config).await;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    info!("stopping; programs stay attached and maps pinned for the next start");
    drop(handle);
    task.await?;
    Ok(())
}

fn vnic_indices(config: &StaticConfig) -> Result<Vec<u32>, ConfigError> {
    config
        .vnics
        .iter()
        .map(|vnic| {
            host::link::index(&vnic.interface).map_err(|source| ConfigError::Interface {
                interface: vnic.interface.clone(),
                source,
            })
        })
        .collect()
}

/// Reads from the neighbour table the router MACs the configuration does not give and
/// `learned` lacks, asking the kernel to resolve those it has not (see
/// `daemon::node`'s `refresh_router_macs`, which does the same for the node agent).
/// Returns whether it learned one.
async fn learn_router_macs(
    netlink: &host::netlink::Netlink,
    config: &StaticConfig,
    learned: &mut BTreeMap<String, [u8; 6]>,
) -> bool {
    let missing: Vec<&VnicConfig> = config
        .vnics
        .iter()
        .filter(|v| v.router_mac.is_none() && !learned.contains_key(&v.interface))
        .collect();
    if missing.is_empty() {
        return false;
    }
    let links = match netlink.links().await {
        Ok(links) => links,
        Err(error) => {
            warn!(%error, "cannot read the interfaces to resolve their routers");
            return false;
        }
    };
    let mut changed = false;
    for vnic in missing {
        let Some(link) = links.iter().find(|l| l.name == vnic.interface) else {
            continue;
        };
        match netlink
            .resolved_neighbour(link, vnic.router_ip, host::netlink::ROUTER_ARP_WAIT)
            .await
        {
            Ok(Some(mac)) => {
                learned.insert(vnic.interface.clone(), mac);
                changed = true;
            }
            Ok(None) => {}
            Err(error) => {
                warn!(interface = %vnic.interface, router = %vnic.router_ip, %error, "cannot resolve the subnet's router; redirects to this interface leave it to the kernel meanwhile");
            }
        }
    }
    changed
}

async fn reload(
    path: &Path,
    handle: &datapath::task::DatapathHandle,
    learned: &BTreeMap<String, [u8; 6]>,
) -> anyhow::Result<StaticConfig> {
    let config = StaticConfig::load(path)?;
    for vnic in &config.vnics {
        handle.attach(&vnic.interface).await?;
    }
    let report = handle.sync(config.desired_state(learned)?).await?;
    info!(?report, "configuration reloaded");
    Ok(config)
}

async fn ensure_rp_filter(config: &StaticConfig) {
    let result = async {
        let netlink = host::netlink::Netlink::connect()?;
        let links = netlink.links().await?;
        Ok::<_, host::netlink::HostError>((netlink, links))
    };
    let (netlink, links) = match result.await {
        Ok(found) => found,
        Err(error) => {
            warn!(%error, "cannot read the interfaces to set rp_filter");
            return;
        }
    };
    for vnic in &config.vnics {
        let Some(link) = links.iter().find(|l| l.name == vnic.interface) else {
            warn!(interface = %vnic.interface, "no such interface; cannot set rp_filter");
            continue;
        };
        match host::sysctl::ensure_interface(&netlink, link).await {
            Ok(changed) if changed.any() => {
                warn!(interface = %vnic.interface, ?changed, "rp_filter or forwarding was not suitable; re-applied");
            }
            Ok(_) => {}
            Err(error) => warn!(interface = %vnic.interface, %error, "cannot set rp_filter"),
        }
    }
}

/// Detaches the programs from every configured interface and removes the pins.
pub fn detach(config_path: &Path) -> Result<(), anyhow::Error> {
    let config = StaticConfig::load(config_path)?;
    for vnic in &config.vnics {
        datapath::detach_interface(&vnic.interface)?;
    }
    datapath::remove_pins(&config.pin_dir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<StaticConfig, ConfigError> {
        let config: StaticConfig = toml::from_str(text).map_err(|source| FileError::Parse {
            path: "t".into(),
            source: Box::new(source),
        })?;
        config.validate()?;
        Ok(config)
    }

    const GOOD: &str = r#"
        vcn_cidrs = ["10.0.0.0/16"]
        masquerade_interface = "eth0"
        [[vnic]]
        interface = "eth0"
        primary_ip = "10.0.0.10"
        subnet = "10.0.0.0/24"
        router_ip = "10.0.0.1"
        router_mac = "02:00:0a:00:00:01"
        pods = ["10.0.0.20"]
    "#;

    #[test]
    fn a_valid_file_parses_with_defaults() {
        let config = parse(GOOD).expect("valid config");
        assert_eq!((config.nat_port_min, config.nat_port_max), (61000, 65535));
        assert_eq!(config.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
    }

    #[test]
    fn bad_files_are_rejected_with_the_reason() {
        let cases = [
            (
                GOOD.replace(
                    "masquerade_interface = \"eth0\"",
                    "masquerade_interface = \"eth9\"",
                ),
                "eth9",
            ),
            (GOOD.replace("10.0.0.20", "10.0.5.20"), "outside its subnet"),
            (GOOD.replace("02:00:0a:00:00:01", "nope"), "not a MAC"),
            (GOOD.replace("vcn_cidrs", "vcn_cidr"), "unknown field"),
            (
                format!("nat_port_min = 9\nnat_port_max = 8\n{GOOD}"),
                "nat_port_min",
            ),
            (
                GOOD.replace("\"10.0.0.20\"", "\"10.0.0.20\", \"10.0.0.10\""),
                "listed on both",
            ),
        ];
        for (text, expected) in cases {
            let error = parse(&text).expect_err("must be rejected").to_string();
            assert!(
                error.contains(expected),
                "expected an error mentioning {expected:?}, got {error:?}"
            );
        }
    }
}
