//! The node: which VNIC interfaces are set up, what the datapath must hold, and the
//! [`Allocator`] the local API serves — IPAM plus the datapath, so an address is in the
//! `endpoints` map before the CNI ADD returns and leaves it (with its NAT entries) on DEL.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use ipnet::Ipv4Net;
use tokio::sync::Mutex;
use tracing::{Instrument as _, debug, info, info_span, warn};
use vcnpath_common::{
    CONFIG_F_ENABLED, Config, ENDPOINT_F_IMDS, ENDPOINT_KIND_POD, ENDPOINT_KIND_PRIMARY, Endpoint,
};

use super::repair::{self, RepairCounters, RepairError};
use crate::{
    datapath::{DatapathError, DatapathState, SyncReport, task::DatapathHandle, vnic_entry},
    host::{
        netlink::{Link, Netlink, ROUTER_ARP_WAIT, parse_mac},
        sysctl,
        vlan::VlanVnic,
    },
    ipam::{AllocError, Allocation, Allocator, BoxFuture, Ipam, PodRef, holders},
};

/// Why a VNIC's interface could not be set up (the periodic setup retries it).
#[derive(Debug, thiserror::Error)]
pub enum VnicSetupError {
    #[error(transparent)]
    Host(#[from] crate::host::netlink::HostError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

/// A VNIC whose interface is up and managed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManagedVnic {
    pub vnic_id: String,
    pub link: Link,
    pub primary_ip: Ipv4Addr,
    pub subnet: Ipv4Net,
    pub router_ip: Ipv4Addr,
    pub router_mac: Option<[u8; 6]>,
}

/// A bare-metal node's physical NICs: the interface of each `nicIndex`, where the VLANs of
/// its secondary VNICs are built (see [`crate::host::vlan`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BareMetal {
    pub nics: Vec<String>,
}

impl BareMetal {
    /// NIC 0 is the one carrying the primary VNIC untagged (`primary`) unless `configured`
    /// names it; the others only as configured (OCI does not say which interface is NIC 1).
    pub fn new(configured: &[String], primary: &str) -> Self {
        let mut nics = configured.to_vec();
        if nics.is_empty() {
            nics.push(primary.to_owned());
        }
        Self { nics }
    }
}

/// Settings the datapath state is built from that do not change while running.
#[derive(Clone, Debug)]
pub struct NodeSettings {
    pub masq_vnic_id: String,
    pub nonmasq_cidrs: BTreeSet<Ipv4Net>,
    pub port_min: u16,
    pub port_max: u16,
    pub mtu: u32,
    pub imds: ImdsPolicy,
    /// The addresses whose pinned `endpoints` entry let them reach IMDS at start. A
    /// recovered pod (see `ipam::holders`) keeps that: its namespace, which the policy is
    /// decided by, is unknown until the runtime asks for it again.
    pub recovered_imds: BTreeSet<Ipv4Addr>,
}

/// Which pods may reach the instance metadata service (`datapath.pod_imds`).
#[derive(Clone, Debug, Default)]
pub struct ImdsPolicy {
    /// Every pod may (`pod_imds = "allow"`).
    pub all: bool,
    /// Pods of these namespaces may.
    pub namespaces: BTreeSet<String>,
}

impl ImdsPolicy {
    /// The endpoint flags of a pod in `namespace` (unknown when the runtime did not say).
    pub fn flags(&self, namespace: Option<&str>) -> u8 {
        let allowed = self.all || namespace.is_some_and(|ns| self.namespaces.contains(ns));
        if allowed { ENDPOINT_F_IMDS } else { 0 }
    }
}

/// Allocation outcomes, for `/metrics`.
#[derive(Debug, Default)]
pub struct AllocationCounters {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub released: AtomicU64,
}

/// Failures to keep an interface's IPv4 settings (never fatal), for `/metrics` and status.
#[derive(Debug, Default)]
pub struct SysctlHealth {
    pub failures: AtomicU64,
    /// The latest failure, which interface and why.
    pub last_error: std::sync::Mutex<Option<String>>,
}

pub struct Node {
    pub ipam: Arc<Ipam>,
    pub datapath: DatapathHandle,
    netlink: Netlink,
    settings: NodeSettings,
    vnics: Mutex<BTreeMap<String, ManagedVnic>>,
    vcn_cidrs: Mutex<BTreeSet<Ipv4Net>>,
    /// Serialises "compute desired state, sync" so concurrent CNI calls cannot apply
    /// stale snapshots over newer ones.
    sync_lock: Mutex<()>,
    pub counters: AllocationCounters,
    pub sysctls: SysctlHealth,
    bare_metal: Option<BareMetal>,
    pub repairs: RepairCounters,
}

/// The virtual router of an OCI subnet is its first host address.
pub fn router_of(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}

impl Node {
    pub fn new(
        ipam: Arc<Ipam>,
        datapath: DatapathHandle,
        netlink: Netlink,
        settings: NodeSettings,
        vcn_cidrs: BTreeSet<Ipv4Net>,
    ) -> Self {
        Self {
            ipam,
            datapath,
            netlink,
            settings,
            vnics: Mutex::new(BTreeMap::new()),
            vcn_cidrs: Mutex::new(vcn_cidrs),
            sync_lock: Mutex::new(()),
            counters: AllocationCounters::default(),
            sysctls: SysctlHealth::default(),
            bare_metal: None,
            repairs: RepairCounters::default(),
        }
    }

    /// On a bare-metal shape: secondary VNICs get a macvlan + VLAN on the NIC of their
    /// `nicIndex` instead of a link of their own.
    #[must_use]
    pub fn with_bare_metal(mut self, bare_metal: Option<BareMetal>) -> Self {
        self.bare_metal = bare_metal;
        self
    }

    /// The managed VNICs, by OCID.
    pub async fn vnics(&self) -> BTreeMap<String, ManagedVnic> {
        self.vnics.lock().await.clone()
    }

    /// Replaces the VCN's CIDR blocks (refreshed periodically from `GetVcn`).
    pub async fn set_vcn_cidrs(&self, cidrs: BTreeSet<Ipv4Net>) -> bool {
        let mut current = self.vcn_cidrs.lock().await;
        let changed = *current != cidrs;
        *current = cidrs;
        changed
    }

    /// What the maps must hold now.
    pub async fn desired(&self) -> DatapathState {
        let vnics = self.vnics.lock().await.clone();
        let mut state = DatapathState {
            vcn_cidrs: self.vcn_cidrs.lock().await.clone(),
            nonmasq_cidrs: self.settings.nonmasq_cidrs.clone(),
            ..DatapathState::default()
        };
        let mut by_interface = BTreeMap::new();
        for vnic in vnics.values() {
            let ifindex = vnic.link.index;
            by_interface.insert(vnic.link.name.clone(), ifindex);
            state.vnics.insert(
                ifindex,
                vnic_entry(
                    ifindex,
                    vnic.link.mac,
                    vnic.primary_ip,
                    vnic.subnet,
                    vnic.router_ip,
                    vnic.router_mac,
                ),
            );
            state.endpoints.insert(
                vnic.primary_ip,
                Endpoint {
                    ifindex,
                    kind: ENDPOINT_KIND_PRIMARY,
                    flags: 0,
                    inbound_ports: 0,
                },
            );
            if vnic.vnic_id == self.settings.masq_vnic_id {
                state.config = Some(Config {
                    masq_ip: vnic.primary_ip.octets(),
                    masq_ifindex: ifindex,
                    port_min: self.settings.port_min,
                    port_max: self.settings.port_max,
                    flags: CONFIG_F_ENABLED,
                });
            }
        }
        for (pod, allocation) in self.ipam.allocations().await {
            // A VNIC not managed yet (start-up) still owns its pods through its interface:
            // keep steering them rather than drop their endpoints.
            let ifindex = by_interface
                .get(&allocation.interface)
                .copied()
                .or_else(|| crate::host::link::index(&allocation.interface).ok());
            match ifindex {
                Some(ifindex) => {
                    state.endpoints.insert(
                        allocation.ip,
                        Endpoint {
                            ifindex,
                            kind: ENDPOINT_KIND_POD,
                            flags: self.imds_flags(&pod, allocation.ip),
                            inbound_ports: 0,
                        },
                    );
                }
                None => {
                    debug!(pod = %pod.container_id, ip = %allocation.ip, interface = %allocation.interface,
                    "the pod's VNIC interface does not exist yet");
                }
            }
        }
        state
    }

    /// Makes the maps equal to [`Self::desired`] (diff-based).
    pub async fn sync(&self) -> Result<SyncReport, DatapathError> {
        let _guard = self.sync_lock.lock().await;
        let desired = self.desired().await;
        self.datapath.sync(desired).await
    }

    /// Registers the primary VNIC (configured by the OS image).
    pub async fn add_primary(
        &self,
        vnic_id: &str,
        mac: [u8; 6],
        ip: Ipv4Addr,
        subnet: Ipv4Net,
        router_ip: Ipv4Addr,
    ) -> Result<(), VnicSetupError> {
        let link = self.netlink.link_by_mac(mac).await?;
        self.manage(vnic_id, link, ip, subnet, router_ip, false)
            .await
    }

    /// Brings up every VNIC IPAM knows whose interface has appeared, attaches the
    /// datapath to it and tells IPAM. Idempotent; run periodically.
    pub async fn setup_vnics(&self) {
        let vanished = self.forget_vanished().await;
        let status = self.ipam.status().await;
        let known: BTreeSet<String> = self.vnics.lock().await.keys().cloned().collect();
        let mut managed_any = false;
        for vnic in &status.vnics {
            if known.contains(&vnic.vnic_id) {
                if vnic.interface.is_none() {
                    // Managed before the pool had it: the primary VNIC, set up at start,
                    // joins the pool at the first reconcile when `ipam.use_primary_vnic`
                    // makes it serve pods. IPAM hands out its addresses once it knows the
                    // interface.
                    let link = self
                        .vnics
                        .lock()
                        .await
                        .get(&vnic.vnic_id)
                        .map(|v| v.link.clone());
                    if let Some(link) = link {
                        self.ipam
                            .set_interface(&crate::host::netlink::format_mac(&link.mac), &link.name)
                            .await;
                    }
                }
                continue;
            }
            let Some(mac) = parse_mac(&vnic.mac) else {
                warn!(vnic = %vnic.vnic_id, mac = %vnic.mac, "OCI reported a MAC that does not parse");
                continue;
            };
            let link = match &self.bare_metal {
                Some(bare_metal) if !vnic.is_primary => {
                    match self.vlan_link(bare_metal, vnic, mac).await {
                        Some(link) => link,
                        None => continue,
                    }
                }
                _ => {
                    let Ok(link) = self.netlink.link_by_mac(mac).await else {
                        continue; // not visible yet: OCI says ATTACHED before the kernel shows the NIC
                    };
                    link
                }
            };
            let router = router_of(vnic.subnet);
            // OCI's `isPrimary`, never `nicIndex`: on a VM every VNIC is on NIC 0.
            let secondary = !vnic.is_primary;
            if let Err(error) = self
                .manage(
                    &vnic.vnic_id,
                    link,
                    vnic.primary_ip,
                    vnic.subnet,
                    router,
                    secondary,
                )
                .await
            {
                warn!(vnic = %vnic.vnic_id, %error, "setting up the VNIC's interface failed; retrying");
            } else {
                managed_any = true;
            }
        }
        // Only once OCI has answered: before, the checkpoint may not list every VNIC.
        if let Some(bare_metal) = &self.bare_metal
            && status.reconciled
        {
            managed_any |= self.prune_vlan_vnics(bare_metal, &status.vnics).await;
        }
        if (managed_any || vanished)
            && let Err(error) = self.sync().await
        {
            warn!(%error, "datapath sync after VNIC setup failed; the periodic sync retries");
        }
        self.refresh_router_macs().await;
    }

    /// Holds every pod address the node routes through a `vcn…` veth that no allocation
    /// holds (a veth and route made behind the agent's back, or left over a lost record):
    /// the start's scan (see [`crate::ipam::holders`]), run again periodically. A failed
    /// scan is logged; the next one retries.
    /// A pod's endpoint flags: by the IMDS policy for its namespace, or, for a recovered pod
    /// (namespace unknown), what its pinned entry had at start.
    fn imds_flags(&self, pod: &PodRef, ip: Ipv4Addr) -> u8 {
        if holders::is_recovered(pod) && self.settings.recovered_imds.contains(&ip) {
            ENDPOINT_F_IMDS
        } else {
            self.settings.imds.flags(pod.namespace.as_deref())
        }
    }

    pub async fn hold_routed(&self) {
        match crate::host::pods::scan(&self.netlink, &BTreeMap::new()).await {
            Ok(routed) => {
                if let Err(error) = self.ipam.hold_host(&routed).await {
                    warn!(%error, "cannot hold the addresses the node routes to unknown pods; the next pass retries");
                }
            }
            Err(error) => {
                warn!(
                    error = format!("{error:#}"),
                    "cannot read the node's pod veths and routes; the next pass retries"
                );
            }
        }
    }

    /// One pass of the allocation GC over the pods' host veths; the datapath drops the
    /// endpoints of what it released (counted in `vcnpath_ipam_gc_released_total`).
    pub async fn collect_unattached(&self) {
        let released = self.ipam.collect_unattached(&PodVeths).await;
        if !released.is_empty()
            && let Err(error) = self.sync().await
        {
            warn!(%error, "datapath sync after the allocation GC failed; the periodic sync retries");
        }
    }

    /// Managed VNICs whose interface the kernel no longer has (hot-unplugged: detached
    /// behind the agent's back) leave the managed set, and IPAM stops handing out their
    /// addresses at once and reconciles; should the interface come back it is set up anew.
    /// Returns whether any vanished.
    async fn forget_vanished(&self) -> bool {
        let managed: Vec<ManagedVnic> = self.vnics.lock().await.values().cloned().collect();
        let Ok(links) = self.netlink.links().await else {
            return false; // cannot tell: nothing is taken for gone
        };
        let mut vanished = false;
        for vnic in managed {
            let present = links
                .iter()
                .any(|l| l.mac == vnic.link.mac && l.index == vnic.link.index);
            if present {
                continue;
            }
            warn!(vnic = %vnic.vnic_id, interface = %vnic.link.name, "the VNIC's interface vanished");
            self.vnics.lock().await.remove(&vnic.vnic_id);
            self.ipam.vnic_vanished(&vnic.vnic_id).await;
            vanished = true;
        }
        vanished
    }

    /// Bare metal: the VLAN interface of a secondary VNIC, built (or adopted) on the NIC of
    /// its `nicIndex`; `None` (logged) while it cannot be yet.
    async fn vlan_link(
        &self,
        bare_metal: &BareMetal,
        vnic: &crate::ipam::VnicStatus,
        mac: [u8; 6],
    ) -> Option<Link> {
        let tag = match u16::try_from(vnic.vlan_tag) {
            Ok(0) => {
                debug!(vnic = %vnic.vnic_id, "the VNIC's VLAN tag is not known yet (waiting for the reconcile with OCI)");
                return None;
            }
            Ok(tag) if tag < 4095 => tag,
            _ => {
                warn!(vnic = %vnic.vnic_id, vlan_tag = vnic.vlan_tag, "OCI reported a VLAN tag outside 1-4094");
                return None;
            }
        };
        let Some(nic_name) = bare_metal.nics.get(vnic.nic_index as usize) else {
            warn!(vnic = %vnic.vnic_id, nic_index = vnic.nic_index, nics = ?bare_metal.nics,
                "the VNIC is on a physical NIC node.physical_nics does not name; name its interface there");
            return None;
        };
        let nic = match self.netlink.links().await {
            Ok(links) => links.into_iter().find(|l| &l.name == nic_name)?,
            Err(error) => {
                warn!(%error, "listing links for a bare-metal VNIC failed; retrying");
                return None;
            }
        };
        match self
            .netlink
            .ensure_vlan_vnic(&nic, mac, tag, self.settings.mtu)
            .await
        {
            Ok(VlanVnic { vlan, macvlan, .. }) => {
                info!(vnic = %vnic.vnic_id, nic = %nic.name, macvlan = %macvlan.name, vlan = %vlan.name, tag,
                    "the bare-metal VNIC's macvlan and VLAN are in place");
                Some(vlan)
            }
            Err(error) => {
                warn!(vnic = %vnic.vnic_id, nic = %nic.name, tag, %error,
                    "building the bare-metal VNIC's macvlan and VLAN failed; retrying");
                None
            }
        }
    }

    /// Bare metal: removes the macvlan + VLAN of every VNIC that is gone (detached) and
    /// forgets it; true when something was forgotten (the datapath must follow).
    async fn prune_vlan_vnics(
        &self,
        bare_metal: &BareMetal,
        vnics: &[crate::ipam::VnicStatus],
    ) -> bool {
        let present: BTreeSet<[u8; 6]> = vnics
            .iter()
            .filter(|v| !v.is_primary)
            .filter_map(|v| parse_mac(&v.mac))
            .collect();
        let nics: Vec<Link> = match self.netlink.links().await {
            Ok(links) => links
                .into_iter()
                .filter(|l| bare_metal.nics.contains(&l.name))
                .collect(),
            Err(error) => {
                warn!(%error, "listing links to prune bare-metal VNICs failed");
                return false;
            }
        };
        let pairs = match self.netlink.vlan_vnics(&nics).await {
            Ok(pairs) => pairs,
            Err(error) => {
                warn!(%error, "listing bare-metal VNIC interfaces failed");
                return false;
            }
        };
        for pair in pairs.iter().filter(|p| !present.contains(&p.macvlan.mac)) {
            match self.netlink.remove_vlan_vnic(pair).await {
                Ok(()) => {
                    info!(macvlan = %pair.macvlan.name, vlan = %pair.vlan.name, "removed the interfaces of a detached bare-metal VNIC");
                }
                Err(error) => {
                    warn!(macvlan = %pair.macvlan.name, %error, "removing a detached bare-metal VNIC's interfaces failed; retrying");
                }
            }
        }
        let ids: BTreeSet<&str> = vnics.iter().map(|v| v.vnic_id.as_str()).collect();
        let mut managed = self.vnics.lock().await;
        let before = managed.len();
        managed.retain(|id, _| ids.contains(id.as_str()) || *id == self.settings.masq_vnic_id);
        managed.len() != before
    }

    async fn manage(
        &self,
        vnic_id: &str,
        link: Link,
        ip: Ipv4Addr,
        subnet: Ipv4Net,
        router_ip: Ipv4Addr,
        configure: bool,
    ) -> Result<(), VnicSetupError> {
        let span = info_span!("vnic_setup", vnic = vnic_id, interface = %link.name);
        async {
            if configure {
                // Secondary VNICs are not configured by the OS image.
                self.netlink
                    .configure_vnic(&link, self.settings.mtu, ip, subnet.prefix_len())
                    .await?;
            }
            self.ensure_interface_sysctls(&link).await;
            self.datapath.attach(&link.name).await?;
            self.ipam
                .set_interface(&crate::host::netlink::format_mac(&link.mac), &link.name)
                .await;
            info!(ip = %ip, subnet = %subnet, "VNIC managed");
            self.vnics.lock().await.insert(
                vnic_id.to_owned(),
                ManagedVnic {
                    vnic_id: vnic_id.to_owned(),
                    link,
                    primary_ip: ip,
                    subnet,
                    router_ip,
                    router_mac: None,
                },
            );
            // No sync here: the caller syncs once every visible VNIC is managed, so a
            // restart never publishes a state missing the VNICs not yet re-managed.
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Puts back the filters and pins someone removed (see [`repair::pass`]), and follows
    /// a managed VNIC's interface through a rename: the datapath knows it by ifindex, IPAM
    /// and the pods' endpoints by name.
    pub async fn repair(&self) -> Result<(), RepairError> {
        let vnics: Vec<u32> = self
            .vnics
            .lock()
            .await
            .values()
            .map(|v| v.link.index)
            .collect();
        let (observed, _) =
            repair::pass(&self.datapath, &self.netlink, &vnics, &self.repairs).await?;
        let mut renamed = Vec::new();
        for vnic in self.vnics.lock().await.values_mut() {
            if let Some(now) = observed.iter().find(|o| o.ifindex == vnic.link.index)
                && now.name != vnic.link.name
            {
                info!(vnic = %vnic.vnic_id, from = %vnic.link.name, to = %now.name, "VNIC interface renamed; following it");
                vnic.link.name.clone_from(&now.name);
                renamed.push(vnic.link.clone());
            }
        }
        for link in &renamed {
            self.ipam
                .set_interface(&crate::host::netlink::format_mac(&link.mac), &link.name)
                .await;
        }
        if !renamed.is_empty()
            && let Err(error) = self.sync().await
        {
            warn!(%error, "datapath sync after an interface rename failed; the periodic sync retries");
        }
        Ok(())
    }

    /// Fills in routers' MACs once the kernel has resolved them, and asks it to resolve
    /// those it has not. With the MAC, a packet redirected to a VNIC gets its Ethernet
    /// header from the datapath; without, `bpf_redirect_neigh` resolves it, and a packet
    /// that has to wait for the ARP answer is then sent with the header of the route it
    /// was first given (the other VNIC's MACs), which OCI drops: the first packets a VNIC
    /// redirects would be lost.
    async fn refresh_router_macs(&self) {
        let vnics = self.vnics.lock().await.clone();
        let mut changed = false;
        for vnic in vnics.values().filter(|v| v.router_mac.is_none()) {
            match self
                .netlink
                .resolved_neighbour(&vnic.link, vnic.router_ip, ROUTER_ARP_WAIT)
                .await
            {
                Ok(Some(mac)) => {
                    if let Some(v) = self.vnics.lock().await.get_mut(&vnic.vnic_id) {
                        v.router_mac = Some(mac);
                        changed = true;
                    }
                }
                Ok(None) => {}
                Err(error) => {
                    warn!(vnic = %vnic.vnic_id, router = %vnic.router_ip, %error, "cannot resolve the subnet's router; redirects to this VNIC leave it to the kernel meanwhile");
                }
            }
        }
        if changed && let Err(error) = self.sync().await {
            warn!(%error, "datapath sync after router MAC resolution failed");
        }
    }

    /// Keeps reverse-path filtering permissive and forwarding on for managed interfaces.
    pub async fn ensure_sysctls(&self) {
        let links: Vec<Link> = self
            .vnics
            .lock()
            .await
            .values()
            .map(|v| v.link.clone())
            .collect();
        for link in &links {
            self.ensure_interface_sysctls(link).await;
        }
    }

    /// One interface's IPv4 settings; a failure is logged and counted, never fatal: the
    /// interface may still work (the node's own settings may be permissive enough).
    async fn ensure_interface_sysctls(&self, link: &Link) {
        match sysctl::ensure_interface(&self.netlink, link).await {
            Ok(changed) if changed.any() => {
                info!(interface = %link.name, rp_filter_was = ?changed.rp_filter, forwarding_was = ?changed.forwarding, "IPv4 settings made suitable for the datapath");
            }
            Ok(_) => {}
            Err(error) => {
                warn!(interface = %link.name, %error, "cannot keep rp_filter loose and forwarding on");
                self.sysctls.failures.fetch_add(1, Ordering::Relaxed);
                *self
                    .sysctls
                    .last_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some(format!("{}: {error}", link.name));
            }
        }
    }
}

/// The pods' host veths, named from the attachment as the CNI plugin names them.
pub struct PodVeths;

impl crate::ipam::gc::HostView for PodVeths {
    fn attached(&self, pod: &PodRef) -> Option<bool> {
        let name = if holders::is_recovered(pod) {
            // Held for a pod the checkpoint lacked: its veth is the evidence (none known,
            // only the endpoints map showed it: gone unless a veth appears).
            match holders::recovered_veth(pod) {
                Some(veth) => veth.to_owned(),
                None => return Some(false),
            }
        } else {
            crate::cni::names::host_veth(&pod.container_id, &pod.ifname)
        };
        match crate::host::link::index(&name) {
            Ok(_) => Some(true),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Some(false),
            Err(error) => {
                warn!(interface = %name, %error, "cannot tell whether a pod's host veth exists; its allocation is left alone");
                None
            }
        }
    }
}

impl Allocator for Node {
    fn allocate<'a>(&'a self, pod: &'a PodRef) -> BoxFuture<'a, Result<Allocation, AllocError>> {
        Box::pin(async move {
            let veth = crate::cni::names::host_veth(&pod.container_id, &pod.ifname);
            if let Err(error) = self.ipam.adopt_recovered(&veth, pod).await {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                return Err(error);
            }
            let allocation = match self.ipam.allocate(pod).await {
                Ok(a) => a,
                Err(error) => {
                    self.counters.failed.fetch_add(1, Ordering::Relaxed);
                    return Err(error);
                }
            };
            if let Err(error) = self.sync().await {
                // Never hand out an address the datapath does not steer.
                let _ = self.ipam.release(pod).await;
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                return Err(AllocError::Datapath {
                    reason: error.to_string(),
                });
            }
            self.counters.ok.fetch_add(1, Ordering::Relaxed);
            Ok(allocation)
        })
    }

    fn release<'a>(
        &'a self,
        pod: &'a PodRef,
    ) -> BoxFuture<'a, Result<Option<Allocation>, AllocError>> {
        Box::pin(async move {
            let mut released = self.ipam.release(pod).await?;
            if released.is_none() {
                // A pod the checkpoint lacked is held under its veth's name: this DEL is
                // its runtime saying it is gone.
                let veth = crate::cni::names::host_veth(&pod.container_id, &pod.ifname);
                released = self.ipam.release_recovered(&veth).await?;
            }
            if released.is_some() {
                self.counters.released.fetch_add(1, Ordering::Relaxed);
                if let Err(error) = self.sync().await {
                    // The address is free in IPAM; the periodic sync removes the endpoint.
                    warn!(%error, pod = %pod.container_id, "datapath sync after release failed; will retry");
                }
            }
            Ok(released)
        })
    }

    fn lookup<'a>(&'a self, pod: &'a PodRef) -> BoxFuture<'a, Option<Allocation>> {
        Box::pin(self.ipam.lookup(pod))
    }

    fn collect_not_listed<'a>(
        &'a self,
        valid: &'a std::collections::BTreeSet<(String, String)>,
    ) -> BoxFuture<'a, Vec<(PodRef, Allocation)>> {
        Box::pin(async move {
            let released = self.ipam.collect_not_listed(valid).await;
            if !released.is_empty() {
                self.counters
                    .released
                    .fetch_add(released.len() as u64, Ordering::Relaxed);
                if let Err(error) = self.sync().await {
                    warn!(%error, "datapath sync after CNI GC failed; will retry");
                }
            }
            released
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_virtual_router_is_the_first_host_address() {
        assert_eq!(
            router_of("10.0.1.0/24".parse().unwrap()),
            Ipv4Addr::new(10, 0, 1, 1)
        );
        assert_eq!(
            router_of("10.0.0.0/16".parse().unwrap()),
            Ipv4Addr::new(10, 0, 0, 1)
        );
    }
}

#[cfg(test)]
mod imds_tests {
    use vcnpath_common::ENDPOINT_F_IMDS;

    use super::ImdsPolicy;

    #[test]
    fn a_pod_reaches_imds_by_policy_or_by_its_namespace() {
        let deny = ImdsPolicy {
            all: false,
            namespaces: ["kube-system".to_owned()].into(),
        };
        assert_eq!(deny.flags(Some("kube-system")), ENDPOINT_F_IMDS);
        assert_eq!(deny.flags(Some("default")), 0);
        assert_eq!(deny.flags(None), 0, "a pod of unknown namespace is denied");
        let allow = ImdsPolicy {
            all: true,
            ..ImdsPolicy::default()
        };
        assert_eq!(allow.flags(None), ENDPOINT_F_IMDS);
    }
}
