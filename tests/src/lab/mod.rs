//! The network-namespace lab: an OCI node, its VCN's virtual router, a VCN peer and the
//! internet, all in namespaces this process creates and deletes.
//!
//! ```text
//!   pod ns ── vcnXXXXXXXXXXXX ┐                  ┌─ rpeer ── eth0  peer ns  10.0.2.50
//!                        node ns                  router ns
//!   10.0.0.10 eth0 ──────────────── r0 10.0.0.1 ─┤
//!   10.0.1.10 eth1 ──────────────── r1 10.0.1.1 ─┤
//!                                                 └─ rinet ── eth0  inet ns  203.0.113.10
//! ```
//!
//! Nothing here touches the root namespace: every link is created inside a lab namespace,
//! every sysctl is written from a thread inside one, and every guard cleans up on drop.
//!
//! Things a test writer should know:
//! - With [`LabOptions::inet_mtu`] below 9000 only the router's end shrinks. The inet host
//!   keeps 9000, so it advertises a large MSS and the node really sends segments the router
//!   must refuse with fragmentation-needed. The other way round there is no PMTU signal: a
//!   veth drops (silently, counted as `rx_dropped` on `rinet`) any frame larger than the
//!   receiving end's MTU, so bulk data must flow towards the internet, not from it.
//! - Programs started with [`spawn_in`] or [`cmd_in`] share the root mount namespace:
//!   /sys/fs/bpf is the real one (what the agent needs), but /sys/class/net shows the
//!   root namespace's links. Code under test must find links through netlink.
//! - The router knows every VNIC address through a permanent neighbour entry (OCI's
//!   router never ARPs for them), so the node never needs proxy ARP for pod addresses.
//! - [`SimLab`] is the same lab driven by the OCI simulator, shaped like a VM: the node
//!   starts with its primary VNIC only, named `ens3` as a guest names it; each VNIC the
//!   simulator attaches appears as the next free `ensN` (down, unaddressed, MTU 1500),
//!   never named after its `nicIndex` (0 for every VNIC of a VM); the router's sets follow
//!   the simulator's private IPs (an IP CIDR block as its prefix: every address inside it
//!   passes the check and reaches the VNIC), and the simulator listens on the node's
//!   loopback, where an agent spawned in the node finds it.
//! - With a `BM.*` shape [`SimLab`] builds a bare-metal node instead: two physical NICs
//!   (`ens2f0` with the primary VNIC untagged, `ens2f1`) and no link per secondary VNIC; the
//!   router terminates each secondary's VLAN `vlanTag` on its end of the NIC of its
//!   `nicIndex`, so only a guest that builds the macvlan + VLAN reaches it. Needs 802.1Q in
//!   the kernel ([`kernel_has_vlan`]).

mod build;
pub mod netns;
pub mod pod;
pub mod process;
pub mod router;
mod simlab;
mod simsync;
pub mod stats;
pub mod topology;
pub mod traffic;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};

pub use netns::{Netns, cmd_in, enter_before_exec, run_in, spawn_in};
pub use pod::Pod;
pub use process::ChildGuard;
pub use router::RouterDrops;
pub use simlab::{AgentEndpoints, SimLab, VlanCarrier, VnicLink, lab_sim_config};
pub use topology::{BM_NICS, INET_IP, PEER_IP, PhysicalNic, VNICS, Vnic};

/// Whether this kernel has 802.1Q VLAN interfaces (`CONFIG_VLAN_8021Q`), which a bare-metal
/// lab needs: tried in a throwaway namespace (the module loads on first use if it exists).
/// Some development kernels are built without it; the VM tier's Debian kernels have it.
pub fn kernel_has_vlan() -> Result<bool> {
    static NEXT_PROBE: AtomicU32 = AtomicU32::new(0);
    build::sweep_stale(NAME_PREFIX);
    let ns = Netns::create(&format!(
        "{NAME_PREFIX}{}xvlanprobe{}",
        std::process::id(),
        NEXT_PROBE.fetch_add(1, Ordering::Relaxed)
    ))?;
    ns.ip(&[
        "link", "add", "name", "vp0", "type", "veth", "peer", "name", "vp1",
    ])?;
    Ok(ns
        .ip(&[
            "link", "add", "link", "vp0", "name", "vp0.5", "type", "vlan", "id", "5",
        ])
        .is_ok())
}

/// Choices a test can make about the lab.
#[derive(Clone, Debug, Default)]
pub struct LabOptions {
    /// MTU of the router's end of the internet link (`rinet`); every other link is 9000.
    /// 1400 makes the router send fragmentation-needed for large packets towards the
    /// internet, for PMTU discovery tests.
    pub inet_mtu: Option<u32>,
}

/// A running lab. Dropping it deletes every namespace it created (pods keep the lab's
/// namespaces alive until they are dropped too).
pub struct Lab {
    inner: Arc<LabInner>,
}

/// The namespaces, shared with pods so a pod can always undo its router entries.
/// Field order is drop order: the node goes first, taking the VNIC links with it.
struct LabInner {
    id: String,
    node: Netns,
    router: Netns,
    peer: Netns,
    inet: Netns,
    options: LabOptions,
    /// The VNICs wired at build time (the first is the primary).
    vnics: &'static [Vnic],
    next_pod: AtomicU32,
}

/// Prefix of every lab namespace name: `vl<pid>x<n>-<role>`.
const NAME_PREFIX: &str = "vl";

impl Lab {
    /// Builds the topology. Namespace names carry this process's id and a counter, so labs
    /// can run side by side, and namespaces left by a lab process that died without
    /// cleaning up (SIGKILL) are swept first.
    pub fn new(options: LabOptions) -> Result<Self> {
        Self::build(options, &VNICS)
    }

    /// A lab whose node has only its primary VNIC, named `ens3` as on a VM, like an
    /// instance just launched. Further VNICs come from the cloud: [`SimLab`] creates
    /// `ens4`, `ens5`, … when the simulator attaches one.
    pub fn primary_only(options: LabOptions) -> Result<Self> {
        Self::build(options, &topology::GUEST_PRIMARY)
    }

    /// A bare-metal node just launched: its two physical NICs (`ens2f0` with the primary
    /// VNIC untagged and addressed, `ens2f1` up without an address), as the image leaves
    /// them. Secondary VNICs never get a link of their own: [`SimLab`] carries each as
    /// VLAN-tagged frames on the NIC of its `nicIndex`.
    pub fn bare_metal(options: LabOptions) -> Result<Self> {
        let lab = Self::build(options, &topology::BM_PRIMARY)?;
        build::wire_second_nic(&lab.inner.node, &lab.inner.router, &topology::BM_NICS[1])?;
        Ok(lab)
    }

    fn build(options: LabOptions, vnics: &'static [Vnic]) -> Result<Self> {
        static NEXT_LAB: AtomicU32 = AtomicU32::new(0);
        build::sweep_stale(NAME_PREFIX);
        let id = format!(
            "{NAME_PREFIX}{}x{}",
            std::process::id(),
            NEXT_LAB.fetch_add(1, Ordering::Relaxed)
        );
        let parts = build::build(&id, &options, vnics)?;
        Ok(Self {
            inner: Arc::new(LabInner {
                id,
                node: parts.node,
                router: parts.router,
                peer: parts.peer,
                inet: parts.inet,
                options,
                vnics,
                next_pod: AtomicU32::new(0),
            }),
        })
    }

    /// The prefix shared by all of this lab's namespace names.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The options the lab was built with.
    pub fn options(&self) -> &LabOptions {
        &self.inner.options
    }

    /// The names of the lab's own namespaces (pods not included).
    pub fn namespace_names(&self) -> Vec<String> {
        [self.node(), self.router(), self.peer(), self.inet()]
            .iter()
            .map(|ns| ns.name().to_owned())
            .collect()
    }

    /// The node: `eth0`, `eth1` (the VNICs; only `eth0` in a [`Lab::primary_only`] lab),
    /// pod host veths, `ip_forward` on, `rp_filter` loose.
    pub fn node(&self) -> &Netns {
        &self.inner.node
    }

    /// The VCN's virtual router, enforcing the source/destination check.
    pub fn router(&self) -> &Netns {
        &self.inner.router
    }

    /// A VCN host in the peer subnet, at [`PEER_IP`].
    pub fn peer(&self) -> &Netns {
        &self.inner.peer
    }

    /// The internet host, at [`INET_IP`].
    pub fn inet(&self) -> &Netns {
        &self.inner.inet
    }

    /// The node's VNIC at `index` (0 = primary), among those wired at build time.
    pub fn vnic(&self, index: usize) -> Result<&'static Vnic> {
        self.inner.vnics.get(index).ok_or_else(|| {
            anyhow::anyhow!(
                "no VNIC {index}: this lab was built with {}",
                self.inner.vnics.len()
            )
        })
    }

    /// The VCN peer host's address.
    pub fn peer_ip(&self) -> Ipv4Addr {
        PEER_IP
    }

    /// The internet host's address.
    pub fn inet_ip(&self) -> Ipv4Addr {
        INET_IP
    }

    /// The masquerade address: the primary VNIC's primary IP.
    pub fn node_ip(&self) -> Ipv4Addr {
        VNICS[0].ip
    }

    /// Creates a pod namespace wired to the node, with `ip` assigned to VNIC `vnic`
    /// (added to that VNIC's addresses on the router). Dropping the pod removes it all.
    ///
    /// For tests of the datapath alone. In a [`SimLab`] the simulator owns the router's
    /// addresses, so there pods get theirs through the agent and `vcnpath-cni`.
    pub fn add_pod(&self, name: &str, ip: Ipv4Addr, vnic: usize) -> Result<Pod> {
        let vnic = self.vnic(vnic)?;
        let n = self.inner.next_pod.fetch_add(1, Ordering::Relaxed);
        Pod::create(Arc::clone(&self.inner), n, name, ip, vnic)
    }

    /// An empty pod network namespace (loopback up, IPv6 off), named like the lab's
    /// others so a crashed run's leftovers are swept. For the CNI plugin to wire; dropping
    /// the guard deletes it and, with it, the pod end of any veth inside.
    pub fn add_pod_netns(&self, name: &str) -> Result<Netns> {
        pod::check_name(name)?;
        let n = self.inner.next_pod.fetch_add(1, Ordering::Relaxed);
        build::namespace(&format!("{}-pod{n}-{name}", self.inner.id))
    }

    /// Packets dropped by the source/destination check of VNIC `vnic` (both directions).
    pub fn router_drops(&self, vnic: usize) -> Result<u64> {
        Ok(self.router_drop_counts(vnic)?.total())
    }

    /// The source and destination check drop counters of VNIC `vnic`, separately.
    pub fn router_drop_counts(&self, vnic: usize) -> Result<RouterDrops> {
        router::drops(self.router(), vnic)
            .with_context(|| format!("VNIC {vnic} has no counters: is it attached?"))
    }
}
