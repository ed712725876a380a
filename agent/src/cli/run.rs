//! `vcnpath run`: the node agent. Start-up order matters: read IMDS, authenticate, learn
//! the VCN, adopt (or load) the datapath on the primary VNIC, restore IPAM from its
//! checkpoint and reconcile with OCI, then serve the CNI plugin and introspection.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
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
        AgentConfig, AuthMode, Node, NodeSettings,
        config::select_subnets,
        http::{self, Introspection},
    },
    datapath::{self, Datapath, LoadOptions},
    host::netlink::{LinkEvents, Netlink, parse_mac},
    ipam::{Ipam, IpamConfig, OciCloud},
    oci::{
        AuthProvider, ConfigFileAuth, CoreClient, Endpoints, ImdsClient, InstancePrincipalAuth,
        RateLimit, RetryPolicy,
    },
};

/// How long an attachment may stay ATTACHING before IPAM gives up on it.
const ATTACH_TIMEOUT: Duration = Duration::from_mins(2);
/// How often VNIC interfaces are looked for (besides on link notifications) and the
/// datapath re-synced.
const HOST_TICK: Duration = Duration::from_secs(1);
/// How often the VCN's CIDR blocks are re-read.
const VCN_REFRESH: Duration = Duration::from_mins(5);

/// What start-up learns from IMDS and OCI.
struct Cloud {
    instance: crate::oci::imds::Instance,
    primary: crate::oci::imds::ImdsVnic,
    primary_subnet_id: String,
    vcn_id: String,
    vcn_cidrs: BTreeSet<Ipv4Net>,
    client: Arc<CoreClient>,
}

/// Reads IMDS, authenticates and learns the VCN.
async fn connect(config: &AgentConfig) -> anyhow::Result<Cloud> {
    // Every call also has its own overall timeout (IMDS 5 s, federation 10 s, Core 30 s per
    // attempt); a connection that cannot even be made fails fast.
    let http_client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .context("creating the HTTP client")?;
    let imds = ImdsClient::new(&config.oci.imds_url, http_client.clone())?;
    let instance = imds
        .instance()
        .await
        .context("reading the instance from IMDS")?;
    let imds_vnics = imds.vnics().await.context("reading the VNICs from IMDS")?;
    if imds_vnics.is_empty() {
        bail!("IMDS lists no VNIC for this instance");
    }
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
            ImdsClient::new(&config.oci.imds_url, http_client.clone())?,
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
        RateLimit::default(),
    ));

    let (primary, primary_vnic) = find_primary(&client, &imds_vnics).await?;
    let subnet = client
        .get_subnet(&primary_vnic.subnet_id)
        .await
        .context("GetSubnet for the primary VNIC")?;
    let vcn_cidrs = read_vcn_cidrs(&client, &subnet.vcn_id).await?;
    info!(vcn = %subnet.vcn_id, cidrs = ?vcn_cidrs, "VCN");

    Ok(Cloud {
        instance,
        primary,
        primary_subnet_id: primary_vnic.subnet_id,
        vcn_id: subnet.vcn_id,
        vcn_cidrs,
        client,
    })
}

/// The primary VNIC: IMDS lists it first (cloud-init configures `vnics[0]` as the
/// primary), and `GetVnic`'s `isPrimary` confirms it. `nicIndex` cannot tell: it is the
/// physical NIC, 0 for every VNIC of a VM.
async fn find_primary(
    client: &CoreClient,
    imds_vnics: &[crate::oci::imds::ImdsVnic],
) -> anyhow::Result<(crate::oci::imds::ImdsVnic, crate::oci::models::Vnic)> {
    for (i, entry) in imds_vnics.iter().enumerate() {
        let vnic = client
            .get_vnic(&entry.vnic_id)
            .await
            .with_context(|| format!("GetVnic for VNIC {} listed by IMDS", entry.vnic_id))?;
        if vnic.is_primary {
            if i > 0 {
                warn!(vnic = %entry.vnic_id, position = i, "IMDS did not list the primary VNIC first");
            }
            return Ok((entry.clone(), vnic));
        }
    }
    bail!(
        "none of the {} VNICs IMDS lists is the primary one according to GetVnic (isPrimary); the instance's metadata and the Core API disagree",
        imds_vnics.len()
    )
}

pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    // The datapath: adopt what a previous agent left pinned and attached, or load it; done
    // while IMDS and OCI are asked, since it needs neither.
    let load_options = LoadOptions {
        pin_dir: config.datapath.pin_dir.clone(),
        nat_max_entries: config.datapath.nat_max_entries,
    };
    let loading = tokio::task::spawn_blocking(move || Datapath::load(&load_options));
    let Cloud {
        instance,
        primary,
        primary_subnet_id,
        vcn_id,
        vcn_cidrs,
        client,
    } = connect(&config).await?;
    let mut datapath = loading.await.context("loading the datapath")??;
    let adopted = datapath.adopted;
    let netlink = Netlink::connect()?;
    let primary_mac =
        parse_mac(&primary.mac_addr).with_context(|| format!("IMDS MAC {:?}", primary.mac_addr))?;
    let primary_link = netlink.link_by_mac(primary_mac).await?;
    datapath.attach(&primary_link.name)?;
    let (datapath, datapath_task) = datapath::task::spawn(datapath, config.datapath.nat_timeouts);
    enable_forwarding();

    // IPAM: restore the checkpoint; it reconciles with OCI and grows the pool in the
    // background. The datapath already carries the existing pods' traffic, and the restored
    // pods are served before OCI is asked, so an unreachable OCI is waited out, not fatal.
    let ipam =
        start_ipam_patiently(&config, &instance, &primary_subnet_id, &vcn_id, &client).await?;
    if !ipam.knows_every_pods_vnic().await {
        // A checkpoint from an older agent lists the pods but not their VNICs: publishing a
        // datapath state before OCI names them would stop steering those pods.
        info!(
            "the checkpoint does not list every pod's VNIC; waiting for OCI before the first sync"
        );
        ipam.reconciled().await;
    }

    let primary_subnet: Ipv4Net = primary
        .subnet_cidr_block
        .parse()
        .context("IMDS subnetCidrBlock")?;
    let primary_ip: Ipv4Addr = primary.private_ip.parse().context("IMDS privateIp")?;
    let router_ip: Ipv4Addr = primary
        .virtual_router_ip
        .parse()
        .context("IMDS virtualRouterIp")?;
    let node = Arc::new(Node::new(
        ipam.clone(),
        datapath.clone(),
        netlink,
        NodeSettings {
            masq_vnic_id: primary.vnic_id.clone(),
            nonmasq_cidrs: config
                .datapath
                .nonmasq_cidrs
                .iter()
                .map(Ipv4Net::trunc)
                .collect(),
            port_min: config.datapath.nat_port_min,
            port_max: config.datapath.nat_port_max,
            mtu: config.datapath.mtu,
        },
        vcn_cidrs,
    ));
    node.add_primary(
        &primary.vnic_id,
        primary_mac,
        primary_ip,
        primary_subnet,
        router_ip,
    )
    .await
    .map_err(anyhow::Error::msg)
    .context("setting up the primary VNIC")?;
    node.setup_vnics().await;
    let report = node.sync().await?;
    info!(adopted, ?report, "datapath ready");

    let introspection = Arc::new(Introspection {
        node: node.clone(),
        oci: client.metrics(),
        ready: false.into(),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (api_server, http_server) = serve(&config, &node, &introspection, &stop_rx).await?;
    info!(socket = %config.node.socket.display(), listen = %config.node.listen, "serving");

    supervise(&config, &node, &datapath, &introspection, &client, &vcn_id).await?;
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

/// Serves the CNI plugin's API (and `/v1/status`) on the socket and introspection over
/// HTTP, until `stop` turns true.
async fn serve(
    config: &AgentConfig,
    node: &Arc<Node>,
    introspection: &Arc<Introspection>,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(
    tokio::task::JoinHandle<Result<(), api::ServeError>>,
    tokio::task::JoinHandle<std::io::Result<()>>,
)> {
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let stop_rx = stop;
    let listener = api::bind(&config.node.socket)?;
    let api_router = api::router(node.clone()).merge(http::status_router(introspection.clone()));
    let api_server = tokio::spawn(api::serve(listener, api_router, stopped(stop_rx.clone())));
    let tcp = tokio::net::TcpListener::bind(config.node.listen)
        .await
        .with_context(|| {
            format!(
                "binding {} for /metrics, /healthz, /readyz",
                config.node.listen
            )
        })?;
    let http_server = tokio::spawn(
        axum::serve(tcp, http::router(introspection.clone()))
            .with_graceful_shutdown(stopped(stop_rx.clone()))
            .into_future(),
    );
    Ok((api_server, http_server))
}

/// The agent's periodic work, until SIGTERM or SIGINT: VNIC interfaces and datapath sync,
/// NAT garbage collection and sysctls, the VCN's CIDR blocks.
async fn supervise(
    config: &AgentConfig,
    node: &Node,
    datapath: &datapath::task::DatapathHandle,
    introspection: &Introspection,
    client: &CoreClient,
    vcn_id: &str,
) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut host_tick = tokio::time::interval(HOST_TICK);
    let mut gc_tick =
        tokio::time::interval(Duration::from_secs(config.datapath.gc_interval_secs.max(1)));
    let mut vcn_tick = tokio::time::interval(VCN_REFRESH);
    vcn_tick.reset();
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
            _ = host_tick.tick() => {
                node.setup_vnics().await;
                if let Err(error) = node.sync().await {
                    warn!(%error, "periodic datapath sync failed");
                }
                let usable = node.ipam.status().await.vnics.iter().any(|v| v.interface.is_some());
                introspection.ready.store(usable, Ordering::Release);
            }
            _ = gc_tick.tick() => {
                match datapath.collect_nat().await {
                    Ok(gc) if gc.removed > 0 => info!(scanned = gc.scanned, removed = gc.removed, "NAT entries expired"),
                    Ok(_) => {}
                    Err(error) => warn!(%error, "NAT garbage collection failed"),
                }
                node.ensure_sysctls().await;
            }
            _ = vcn_tick.tick() => {
                match read_vcn_cidrs(client, vcn_id).await {
                    Ok(cidrs) => if node.set_vcn_cidrs(cidrs).await { info!("VCN CIDR blocks changed"); },
                    Err(error) => warn!(%error, "refreshing the VCN's CIDR blocks failed"),
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    Ok(())
}

/// [`start_ipam`], retried with capped backoff while OCI fails; configuration and
/// checkpoint errors end the agent at once (retrying cannot fix them).
async fn start_ipam_patiently(
    config: &AgentConfig,
    instance: &crate::oci::imds::Instance,
    primary_subnet_id: &str,
    vcn_id: &str,
    client: &Arc<CoreClient>,
) -> anyhow::Result<Arc<Ipam>> {
    let mut delay = Duration::from_secs(1);
    loop {
        match start_ipam(config, instance, primary_subnet_id, vcn_id, client.clone()).await {
            Ok(ipam) => return Ok(ipam),
            Err(error) if is_cloud_error(&error) => {
                warn!(error = format!("{error:#}"), retry_in = ?delay, "starting IPAM failed because OCI did not answer; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            Err(error) => return Err(error),
        }
    }
}

fn is_cloud_error(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.downcast_ref::<crate::oci::OciError>().is_some()
            || matches!(
                cause.downcast_ref::<crate::ipam::IpamError>(),
                Some(crate::ipam::IpamError::Cloud { .. })
            )
    })
}

/// Restores IPAM from its checkpoint; it reconciles with OCI and grows the pool in the
/// background.
async fn start_ipam(
    config: &AgentConfig,
    instance: &crate::oci::imds::Instance,
    primary_subnet_id: &str,
    vcn_id: &str,
    client: Arc<CoreClient>,
) -> anyhow::Result<Arc<Ipam>> {
    let vcn_subnets = if config.ipam.subnets.is_empty() && config.ipam.subnet_tag.is_some() {
        client
            .list_subnets(&instance.compartment_id, Some(vcn_id))
            .await
            .context("ListSubnets for ipam.subnet_tag")?
    } else {
        Vec::new()
    };
    let subnets = select_subnets(&config.ipam, &vcn_subnets, primary_subnet_id)?;
    info!(?subnets, "subnets for new VNICs");
    let mut ipam_config = IpamConfig::new(
        instance.id.clone(),
        config.pool(instance.shape_config.max_vnic_attachments as usize, subnets),
    );
    std::fs::create_dir_all(&config.node.state_dir).with_context(|| {
        format!(
            "creating the state directory {}",
            config.node.state_dir.display()
        )
    })?;
    ipam_config.checkpoint_path = config.node.state_dir.join("ipam.json");
    ipam_config.mtu = config.datapath.mtu;
    let cloud = OciCloud::new(
        client.clone(),
        instance.compartment_id.clone(),
        instance.id.clone(),
        ATTACH_TIMEOUT,
    );
    Ok(Arc::new(Ipam::start(Arc::new(cloud), ipam_config)?))
}

async fn read_vcn_cidrs(client: &CoreClient, vcn_id: &str) -> anyhow::Result<BTreeSet<Ipv4Net>> {
    let vcn = client.get_vcn(vcn_id).await.context("GetVcn")?;
    vcn.cidr_blocks
        .iter()
        .map(|c| {
            c.parse::<Ipv4Net>()
                .map(|n| n.trunc())
                .with_context(|| format!("VCN CIDR block {c:?}"))
        })
        .collect()
}

/// Pods' traffic is forwarded by the node.
fn enable_forwarding() {
    if let Err(error) = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1") {
        warn!(%error, "cannot enable IPv4 forwarding");
    }
}
