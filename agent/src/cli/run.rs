//! `vcnpath run`: the node agent. Start-up never waits for OCI's Core API: it reads IMDS
//! (VNICs, subnet CIDRs, routers), adopts (or loads) the datapath on the primary VNIC,
//! restores IPAM from its checkpoint and serves the CNI plugin and introspection; the VCN
//! (its CIDR blocks, the subnets for new VNICs) and the reconcile with OCI are learned in
//! the background, retried while OCI fails. Until then the datapath uses the last known
//! VCN CIDR blocks (`vcn.json` in the state directory), or the VNICs' subnets.

use std::{
    collections::BTreeSet,
    fs::Permissions,
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};
use ipnet::Ipv4Net;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{
    api,
    daemon::{
        AgentConfig, AuthMode, BareMetal, ImdsPolicy, Node, NodeSettings, PodImds, StateLock,
        config::select_subnets,
        conflist::Conflist,
        health::{Health, dir_writable},
        http::{self, Introspection},
    },
    datapath::{self, Datapath, LoadOptions},
    host::netlink::{LinkEvents, Netlink, parse_mac},
    ipam::{Ipam, IpamConfig, OciCloud},
    oci::{
        AuthProvider, ConfigFileAuth, CoreClient, Endpoints, ImdsClient, InstancePrincipalAuth,
        RetryPolicy, transport,
    },
};

/// How long an attachment may stay ATTACHING before IPAM gives up on it.
const ATTACH_TIMEOUT: Duration = Duration::from_mins(2);
/// How often the VCN's CIDR blocks are re-read.
const VCN_REFRESH: Duration = Duration::from_mins(5);

/// What start-up learns from IMDS alone; OCI's Core API is asked in the background.
struct Cloud {
    instance: crate::oci::imds::Instance,
    /// The VNICs as IMDS lists them, the primary first.
    imds_vnics: Vec<crate::oci::imds::ImdsVnic>,
    client: Arc<CoreClient>,
}

/// How long start-up waits between IMDS attempts at most: IMDS is link-local, so it
/// failing is rare and short (the instance is booting).
const IMDS_RETRY_MAX: Duration = Duration::from_secs(10);
/// The longest wait between attempts to learn the VCN from OCI while it fails.
const OCI_RETRY_MAX: Duration = Duration::from_secs(30);

/// Reads IMDS (retried while it fails: nothing works without it) and builds the OCI client.
/// No call to OCI's Core API or the federation endpoint is made here.
async fn connect(config: &AgentConfig) -> anyhow::Result<Cloud> {
    let http_client = transport::api_client(config.oci.ca_bundle.as_deref())?;
    let imds_http = transport::imds_client()?;
    let imds = ImdsClient::new(&config.oci.imds_url, imds_http.clone())?;
    let mut delay = Duration::from_millis(500);
    let (instance, imds_vnics) = loop {
        let read = async {
            let instance = imds
                .instance()
                .await
                .context("reading the instance from IMDS")?;
            let vnics = imds.vnics().await.context("reading the VNICs from IMDS")?;
            anyhow::Ok((instance, vnics))
        };
        match read.await {
            Ok((_, vnics)) if vnics.is_empty() => bail!("IMDS lists no VNIC for this instance"),
            Ok(read) => break read,
            Err(error) => {
                warn!(error = format!("{error:#}"), retry_in = ?delay, "IMDS did not answer; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(IMDS_RETRY_MAX);
            }
        }
    };
    info!(instance = %instance.id, shape = %instance.shape, max_vnics = instance.shape_config.max_vnic_attachments, "instance");

    let endpoints = match &config.oci.endpoint {
        Some(base) => Endpoints::single(base)?,
        None => Endpoints::for_region(
            &instance.canonical_region_name,
            &instance.region_info.realm_domain_component,
        )?,
    };
    let auth: Arc<dyn AuthProvider> = match config.oci.auth {
        AuthMode::InstancePrincipal => Arc::new(InstancePrincipalAuth::new(
            ImdsClient::new(&config.oci.imds_url, imds_http)?,
            &endpoints.auth,
            http_client.clone(),
        )),
        AuthMode::ConfigFile => {
            let path = config.oci.config_file.clone().unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".oci/config")
            });
            Arc::new(ConfigFileAuth::from_file(&path, &config.oci.profile)?)
        }
    };
    let client = Arc::new(CoreClient::new(
        http_client,
        &endpoints,
        auth,
        RetryPolicy::default(),
        config.oci.rate_limit(),
    ));
    Ok(Cloud {
        instance,
        imds_vnics,
        client,
    })
}

/// What OCI tells about the node's network beyond IMDS; kept in the state directory so a
/// restart while OCI fails starts from the last known VCN.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct VcnFacts {
    vcn_id: String,
    vcn_cidrs: BTreeSet<Ipv4Net>,
    /// Subnets for new VNICs.
    subnets: Vec<String>,
}

impl VcnFacts {
    fn path(config: &AgentConfig) -> PathBuf {
        config.node.state_dir.join("vcn.json")
    }

    /// The last known facts, if a previous agent wrote them (a missing or unreadable file
    /// only means starting without them).
    fn load(config: &AgentConfig) -> Option<Self> {
        let path = Self::path(config);
        let bytes = std::fs::read(&path).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(facts) => Some(facts),
            Err(error) => {
                warn!(path = %path.display(), %error, "ignoring the unreadable last known VCN facts");
                None
            }
        }
    }

    fn save(&self, config: &AgentConfig) {
        let path = Self::path(config);
        let tmp = path.with_extension("json.tmp");
        let written = serde_json::to_vec(self)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(error) = written {
            warn!(path = %path.display(), %error, "cannot keep the VCN facts for the next start");
        }
    }
}

/// Asks OCI what IMDS cannot tell: the primary VNIC's subnet and VCN, the VCN's CIDR blocks
/// and the subnets for new VNICs.
async fn learn_vcn(
    config: &AgentConfig,
    client: &CoreClient,
    imds_vnics: &[crate::oci::imds::ImdsVnic],
) -> anyhow::Result<VcnFacts> {
    let primary = find_primary(client, imds_vnics).await?;
    let subnet = client
        .get_subnet(&primary.subnet_id)
        .await
        .context("GetSubnet for the primary VNIC")?;
    let vcn = client.get_vcn(&subnet.vcn_id).await.context("GetVcn")?;
    let vcn_cidrs = parse_cidrs(&vcn.cidr_blocks)?;
    // The VCN's subnets live in the VCN's compartment, usually not the instance's.
    let vcn_subnets = if config.ipam.subnets.is_empty() && config.ipam.subnet_tag.is_some() {
        let compartment = config
            .ipam
            .subnet_compartment_id
            .as_deref()
            .unwrap_or(&vcn.compartment_id);
        client
            .list_subnets(compartment, Some(&vcn.id))
            .await
            .context("ListSubnets for ipam.subnet_tag")?
    } else {
        Vec::new()
    };
    let subnets = select_subnets(&config.ipam, &vcn_subnets, &primary.subnet_id)?;
    Ok(VcnFacts {
        vcn_id: vcn.id,
        vcn_cidrs,
        subnets,
    })
}

/// The primary VNIC: IMDS lists it first (cloud-init configures `vnics[0]` as the
/// primary), and `GetVnic`'s `isPrimary` confirms it. `nicIndex` cannot tell: it is the
/// physical NIC, 0 for every VNIC of a VM.
async fn find_primary(
    client: &CoreClient,
    imds_vnics: &[crate::oci::imds::ImdsVnic],
) -> anyhow::Result<crate::oci::models::Vnic> {
    for (i, entry) in imds_vnics.iter().enumerate() {
        let vnic = client
            .get_vnic(&entry.vnic_id)
            .await
            .with_context(|| format!("GetVnic for VNIC {} listed by IMDS", entry.vnic_id))?;
        if vnic.is_primary {
            if i > 0 {
                warn!(vnic = %entry.vnic_id, position = i, "IMDS did not list the primary VNIC first");
            }
            return Ok(vnic);
        }
    }
    bail!(
        "none of the {} VNICs IMDS lists is the primary one according to GetVnic (isPrimary); the instance's metadata and the Core API disagree",
        imds_vnics.len()
    )
}

/// Learns the VCN from OCI in the background, retried with capped backoff while OCI fails,
/// then re-reads the VCN's CIDR blocks every [`VCN_REFRESH`].
async fn keep_vcn_current(
    config: AgentConfig,
    client: Arc<CoreClient>,
    imds_vnics: Vec<crate::oci::imds::ImdsVnic>,
    node: Arc<Node>,
) {
    let mut delay = Duration::from_secs(1);
    loop {
        match learn_vcn(&config, &client, &imds_vnics).await {
            Ok(facts) => {
                if node.set_vcn_cidrs(facts.vcn_cidrs.clone()).await {
                    info!(vcn = %facts.vcn_id, cidrs = ?facts.vcn_cidrs, "VCN CIDR blocks learned from OCI");
                }
                node.ipam.set_subnets(facts.subnets.clone()).await;
                facts.save(&config);
                delay = Duration::from_secs(1);
                tokio::time::sleep(VCN_REFRESH).await;
            }
            Err(error) => {
                warn!(error = format!("{error:#}"), retry_in = ?delay, "learning the VCN from OCI failed; the node runs on what IMDS and the last start knew, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(OCI_RETRY_MAX);
            }
        }
    }
}

/// The VCN's CIDR blocks before OCI answered: the last known ones, or else the subnets of
/// the node's VNICs as IMDS lists them (a lower bound: traffic to the rest of the VCN is
/// masqueraded until `GetVcn` answers, which still reaches it).
fn initial_vcn_cidrs(
    known: Option<&VcnFacts>,
    imds_vnics: &[crate::oci::imds::ImdsVnic],
) -> BTreeSet<Ipv4Net> {
    if let Some(facts) = known {
        return facts.vcn_cidrs.clone();
    }
    imds_vnics
        .iter()
        .filter_map(|v| v.subnet_cidr_block.parse::<Ipv4Net>().ok())
        .map(|n| n.trunc())
        .collect()
}

pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    // First of all: one agent per node. A second one stops here, before any OCI call or
    // file write; the lock lives until this function returns.
    let state_lock = StateLock::acquire(&config.node.state_dir)?;
    // The datapath: adopt what a previous agent left pinned and attached, or load it; done
    // while IMDS and OCI are asked, since it needs neither.
    let load_options = LoadOptions {
        pin_dir: config.datapath.pin_dir.clone(),
        nat_max_entries: config.datapath.nat_max_entries,
    };
    let loading = tokio::task::spawn_blocking(move || Datapath::load(&load_options));
    let Cloud {
        instance,
        imds_vnics,
        client,
    } = connect(&config).await?;
    // IMDS lists the primary first (as cloud-init assumes); `learn_vcn` confirms it.
    let primary = imds_vnics[0].clone();
    let known = VcnFacts::load(&config);
    let mut datapath = loading.await.context("loading the datapath")??;
    let adopted = datapath.adopted;
    let netlink = Netlink::connect()?;
    let primary_mac =
        parse_mac(&primary.mac_addr).with_context(|| format!("IMDS MAC {:?}", primary.mac_addr))?;
    let primary_link = netlink.link_by_mac(primary_mac).await?;
    datapath.attach(&primary_link.name)?;
    let bare_metal = bare_metal(&config, &instance, &primary_link.name);

    // IPAM: restore the checkpoint, and hold what the node shows in use that it lacks; it
    // reconciles with OCI and grows the pool in the background. The datapath already carries
    // the existing pods' traffic, and the restored pods are served before OCI is asked, so an
    // unreachable OCI is waited out, not fatal.
    let physical_nics = bare_metal.as_ref().map_or(1, |b| b.nics.len());
    let running = running_pods(&datapath, &netlink).await;
    let recovered_imds = running.iter().filter(|h| h.imds).map(|h| h.ip).collect();
    let (datapath, datapath_task) = datapath::task::spawn(datapath, config.datapath.nat_timeouts);
    enable_forwarding();
    reserve_nat_ports(config.datapath.nat_port_min..=config.datapath.nat_port_max);
    let ipam = start_ipam(
        &config,
        &instance,
        known.as_ref(),
        &client,
        physical_nics,
        &running,
        state_lock.earlier_agent_this_boot(),
    )?;
    wait_for_every_pods_vnic(&ipam).await;

    let primary_subnet: Ipv4Net = primary
        .subnet_cidr_block
        .parse()
        .context("IMDS subnetCidrBlock")?;
    let primary_ip: Ipv4Addr = primary.private_ip.parse().context("IMDS privateIp")?;
    let router_ip: Ipv4Addr = primary
        .virtual_router_ip
        .parse()
        .context("IMDS virtualRouterIp")?;
    let node = Arc::new(
        Node::new(
            ipam.clone(),
            datapath.clone(),
            netlink,
            node_settings(&config, &primary.vnic_id, recovered_imds),
            initial_vcn_cidrs(known.as_ref(), &imds_vnics),
        )
        .with_bare_metal(bare_metal),
    );
    node.add_primary(
        &primary.vnic_id,
        primary_mac,
        primary_ip,
        primary_subnet,
        router_ip,
    )
    .await
    .context("setting up the primary VNIC")?;
    let nat = config.datapath.nat_port_min..=config.datapath.nat_port_max;
    let report = first_sync(&node, primary_ip, nat).await?;
    info!(adopted, ?report, "datapath ready");

    let introspection = Arc::new(Introspection {
        node: node.clone(),
        oci: client.metrics(),
        health: Health::new(config.node.state_dir.clone()),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (api_server, http_server) = serve(&config, &node, &introspection, &stop_rx).await?;
    introspection
        .health
        .socket_served
        .store(true, Ordering::Release);
    info!(socket = %config.node.socket.display(), listen = %config.node.listen, "serving");

    let vcn_task = tokio::spawn(keep_vcn_current(
        config.clone(),
        client.clone(),
        imds_vnics,
        node.clone(),
    ));
    supervise(&config, &node, &datapath, &introspection).await?;
    vcn_task.abort();
    info!("stopping; the datapath stays attached and pinned, allocations stay checkpointed");
    let _ = stop_tx.send(true);
    let _ = api_server.await;
    let _ = http_server.await;
    drop(node);
    drop(introspection);
    drop(datapath);
    let _ = datapath_task.await;
    Ok(())
}

/// The datapath settings that do not change while running; the primary VNIC masquerades.
fn node_settings(
    config: &AgentConfig,
    primary_vnic_id: &str,
    recovered_imds: BTreeSet<std::net::Ipv4Addr>,
) -> NodeSettings {
    NodeSettings {
        masq_vnic_id: primary_vnic_id.to_owned(),
        nonmasq_cidrs: config
            .datapath
            .nonmasq_cidrs
            .iter()
            .map(Ipv4Net::trunc)
            .collect(),
        port_min: config.datapath.nat_port_min,
        port_max: config.datapath.nat_port_max,
        mtu: config.datapath.mtu,
        imds: ImdsPolicy {
            all: config.datapath.pod_imds == PodImds::Allow,
            namespaces: config
                .datapath
                .pod_imds_allow_namespaces
                .iter()
                .cloned()
                .collect(),
        },
        recovered_imds,
    }
}

/// On a bare-metal shape (oci-utils' test, `network_interface.py`: the shape starts with
/// `BM`) secondary VNICs are VLANs on the physical NICs, which the agent builds.
fn bare_metal(
    config: &AgentConfig,
    instance: &crate::oci::imds::Instance,
    primary_interface: &str,
) -> Option<BareMetal> {
    let bare_metal = instance
        .shape
        .starts_with("BM")
        .then(|| BareMetal::new(&config.node.physical_nics, primary_interface))?;
    info!(nics = ?bare_metal.nics, "bare-metal shape: secondary VNICs become macvlan + VLAN interfaces on these NICs");
    Some(bare_metal)
}

/// Sets up the visible VNICs and fills the maps, and records the host's `nf_nat` flows
/// from before the datapath (`masq`, ports in `nat`); then pod veths made before this agent
/// (an upgrade that introduced or replaced the anti-spoofing program) are covered, all
/// before serving.
async fn first_sync(
    node: &Node,
    masq: Ipv4Addr,
    nat: std::ops::RangeInclusive<u16>,
) -> anyhow::Result<datapath::SyncReport> {
    node.setup_vnics().await;
    let report = node.sync().await?;
    super::record_nf_nat_flows(&node.datapath, masq, nat).await;
    if let Err(error) = node.repair().await {
        warn!(%error, "the first repair pass failed; the periodic pass retries");
    }
    Ok(report)
}

/// Serves the CNI plugin's API (and `/v1/status`) on the socket and introspection over
/// HTTP, until `stop` turns true.
async fn serve(
    config: &AgentConfig,
    node: &Arc<Node>,
    introspection: &Arc<Introspection>,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(
    tokio::task::JoinHandle<Result<(), api::ServeError>>,
    tokio::task::JoinHandle<()>,
)> {
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let stop_rx = stop;
    let listener = api::bind(&config.node.socket)?;
    let api_router = api::router(node.clone())
        .merge(http::status_router(introspection.clone()))
        .merge(api::status_router(introspection.clone()));
    let api_server = tokio::spawn(api::serve(listener, api_router, stopped(stop_rx.clone())));
    let tcp = tokio::net::TcpListener::bind(config.node.listen)
        .await
        .with_context(|| {
            format!(
                "binding {} for /metrics, /healthz, /readyz",
                config.node.listen
            )
        })?;
    let http_server = tokio::spawn(api::listen::serve(
        tcp,
        http::router(introspection.clone()),
        api::Limits::HTTP,
        stopped(stop_rx.clone()),
    ));
    Ok((api_server, http_server))
}

/// Installs the CNI configuration once the agent is ready, and puts it back should someone
/// remove or change it.
async fn install_when_ready(conflist: &Conflist, introspection: &Introspection) {
    if !introspection.not_ready().await.is_empty() {
        return;
    }
    let installing = conflist.clone();
    match tokio::task::spawn_blocking(move || installing.install()).await {
        Ok(Ok(true)) => {
            info!(path = %conflist.path().display(), "CNI configuration installed: the runtime reports the network ready");
        }
        Ok(Ok(false)) => {}
        Ok(Err(error)) => {
            warn!(%error, "installing the CNI configuration failed; the next sync retries");
        }
        Err(error) => warn!(%error, "the CNI configuration task failed; the next sync retries"),
    }
}

/// The agent's periodic work, until SIGTERM or SIGINT: VNIC interfaces and datapath sync,
/// NAT garbage collection and sysctls, the VCN's CIDR blocks.
async fn supervise(
    config: &AgentConfig,
    node: &Node,
    datapath: &datapath::task::DatapathHandle,
    introspection: &Introspection,
) -> anyhow::Result<()> {
    let conflist = config
        .cni
        .conf_dir
        .as_deref()
        .map(|dir| Conflist::new(dir, &config.node.socket, &config.datapath.pin_dir));
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // VNIC interfaces are looked for (besides on link notifications), the maps re-synced
    // and what others removed repaired once per period.
    let mut host_tick = tokio::time::interval(Duration::from_secs(
        config.datapath.sync_interval_secs.max(1),
    ));
    let mut gc_tick =
        tokio::time::interval(Duration::from_secs(config.datapath.gc_interval_secs.max(1)));
    // A VNIC's interface is set up as soon as the kernel announces it; the tick is the
    // safety net (and keeps readiness and the maps current).
    let mut links = match LinkEvents::subscribe() {
        Ok(events) => Some(events),
        Err(error) => {
            warn!(%error, "cannot subscribe to link notifications; new VNICs are found by the periodic scan only");
            None
        }
    };
    loop {
        tokio::select! {
            Some(()) = async {
                match links.as_mut() {
                    Some(events) => events.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                node.setup_vnics().await;
            }
            () = node.ipam.vnic_added() => {
                node.setup_vnics().await;
            }
            () = node.ipam.pods_moved() => {
                // A pod's address now lives on another VNIC: steer it there at once.
                if let Err(error) = node.sync().await {
                    warn!(%error, "datapath sync after a pod's address moved failed; the periodic sync retries");
                }
            }
            _ = host_tick.tick() => {
                node.setup_vnics().await;
                let synced = node.sync().await;
                if let Err(error) = &synced {
                    warn!(%error, "periodic datapath sync failed");
                }
                if let Err(error) = node.repair().await {
                    warn!(%error, "periodic datapath repair failed");
                }
                let usable = node.ipam.status().await.vnics.iter().any(|v| v.interface.is_some());
                let health = &introspection.health;
                health.datapath_synced.store(synced.is_ok(), Ordering::Release);
                health.usable_vnic.store(usable, Ordering::Release);
                health.state_dir_writable.store(dir_writable(&health.state_dir), Ordering::Release);
                health.beat();
                if let Some(conflist) = &conflist {
                    install_when_ready(conflist, introspection).await;
                }
            }
            _ = gc_tick.tick() => {
                match datapath.collect_nat().await {
                    Ok(gc) if gc.removed > 0 => info!(scanned = gc.scanned, removed = gc.removed, "NAT entries expired"),
                    Ok(_) => {}
                    Err(error) => warn!(%error, "NAT garbage collection failed"),
                }
                node.ensure_sysctls().await;
                node.hold_routed().await;
                node.collect_unattached().await;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    if let Some(conflist) = conflist.filter(|_| config.cni.uninstall) {
        match conflist.remove() {
            Ok(()) => {
                info!(path = %conflist.path().display(), "CNI configuration removed (cni.uninstall): the runtime reports the network not ready");
            }
            Err(error) => warn!(%error, "uninstalling the CNI configuration failed"),
        }
    }
    Ok(())
}

/// Restores IPAM from its checkpoint; it reconciles with OCI and grows the pool in the
/// background. The subnets for new VNICs are the configured ones, else the last known ones,
/// else none until OCI names them.
/// A checkpoint from an older agent lists the pods but not their VNICs, and a pod held from
/// what the node shows has none until OCI names it: publishing a datapath state before would
/// stop steering those pods.
async fn wait_for_every_pods_vnic(ipam: &Ipam) {
    if !ipam.knows_every_pods_vnic().await {
        info!(
            "the checkpoint does not name every pod's VNIC; waiting for OCI before the first sync"
        );
        ipam.reconciled().await;
    }
}

/// The pod addresses the node shows in use (veths with /32 routes, the pinned `endpoints`
/// map): IPAM holds those the checkpoint lacks. A failed read is logged, not fatal: the
/// checkpoint is then the only record, as before.
async fn running_pods(datapath: &Datapath, netlink: &Netlink) -> Vec<crate::ipam::HostHolder> {
    let endpoints = datapath.maps.pod_endpoints().unwrap_or_else(|error| {
        warn!(%error, "cannot read the pinned endpoints map; only the host's routes show running pods");
        std::collections::BTreeMap::new()
    });
    crate::host::pods::scan(netlink, &endpoints)
        .await
        .unwrap_or_else(|error| {
            warn!(error = format!("{error:#}"), "cannot read the node's pod veths and routes; only the checkpoint shows running pods");
            Vec::new()
        })
}

fn start_ipam(
    config: &AgentConfig,
    instance: &crate::oci::imds::Instance,
    known: Option<&VcnFacts>,
    client: &Arc<CoreClient>,
    physical_nics: usize,
    running: &[crate::ipam::HostHolder],
    earlier_agent_this_boot: bool,
) -> anyhow::Result<Arc<Ipam>> {
    let subnets = if config.ipam.subnets.is_empty() {
        known.map(|k| k.subnets.clone()).unwrap_or_default()
    } else {
        config.ipam.subnets.clone()
    };
    info!(?subnets, "subnets for new VNICs known at start");
    let mut ipam_config = IpamConfig::new(
        instance.id.clone(),
        config.pool(instance.shape_config.max_vnic_attachments as usize, subnets),
    );
    // The checkpoint names every pod on the node: root only (a hostPath directory is
    // created 0755, so the mode is set even when it exists). The state lock created it; a
    // directory already 0700 is left alone, so a read-only one does not stop the agent.
    let state_dir = &config.node.state_dir;
    std::fs::metadata(state_dir)
        .and_then(|meta| {
            if meta.permissions().mode() & 0o777 == 0o700 {
                Ok(())
            } else {
                std::fs::set_permissions(state_dir, Permissions::from_mode(0o700))
            }
        })
        .with_context(|| {
            format!(
                "making the state directory {} private (mode 0700)",
                state_dir.display()
            )
        })?;
    ipam_config.checkpoint_path = config.node.state_dir.join("ipam.json");
    ipam_config.mtu = config.datapath.mtu;
    ipam_config.allocation_gc_grace = Duration::from_secs(config.ipam.allocation_gc_grace_secs);
    ipam_config.pool.physical_nics = u32::try_from(physical_nics).unwrap_or(1).max(1);
    ipam_config.earlier_agent_this_boot = earlier_agent_this_boot;
    ipam_config.start_jitter = Duration::from_millis(config.oci.start_jitter_ms);
    let cloud = OciCloud::new(
        client.clone(),
        instance.compartment_id.clone(),
        instance.id.clone(),
        ATTACH_TIMEOUT,
    );
    Ok(Arc::new(Ipam::start_with_host(
        Arc::new(cloud),
        ipam_config,
        running,
    )?))
}

fn parse_cidrs(blocks: &[String]) -> anyhow::Result<BTreeSet<Ipv4Net>> {
    blocks
        .iter()
        .map(|c| {
            c.parse::<Ipv4Net>()
                .map(|n| n.trunc())
                .with_context(|| format!("VCN CIDR block {c:?}"))
        })
        .collect()
}

/// The kernel must not hand the NAT's ports to host sockets (see `host::ports`).
fn reserve_nat_ports(nat: std::ops::RangeInclusive<u16>) {
    use crate::host::ports::Reservation;
    let (min, max) = (*nat.start(), *nat.end());
    match crate::host::ports::reserve(nat) {
        Ok(Reservation::Held) => {}
        Ok(Reservation::Write { shrinks, .. }) => info!(
            min,
            max,
            ephemeral_ports_lost = shrinks,
            "NAT ports reserved in net.ipv4.ip_local_reserved_ports"
        ),
        Ok(Reservation::CoversEphemeral) => warn!(
            min,
            max,
            "the NAT port range covers all of net.ipv4.ip_local_port_range, so it is not reserved and host sockets may take ports of pods' flows; set datapath.nat_port_min/nat_port_max outside the ephemeral range (the default is 61000-65535)"
        ),
        Err(error) => warn!(
            %error,
            min,
            max,
            "cannot reserve the NAT ports in net.ipv4.ip_local_reserved_ports (/proc/sys is read-only in an unprivileged container); reserve them on the node, or a host socket may take a pod flow's port"
        ),
    }
}

/// Pods' traffic is forwarded by the node. Managed VNICs get `forwarding` per interface over
/// netlink (see `host::sysctl`); the node-wide switch, which new pod veths copy, can only be
/// written where /proc/sys is writable.
fn enable_forwarding() {
    match crate::host::sysctl::ensure_ip_forward_all() {
        Ok(true) => info!("net.ipv4.ip_forward turned on"),
        Ok(false) => {}
        Err(error) => warn!(
            %error,
            "net.ipv4.ip_forward is off and cannot be turned on from here (/proc/sys is read-only in an unprivileged container); enable it on the node, or pods' traffic is not forwarded"
        ),
    }
}
