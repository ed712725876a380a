//! The lab driven by the OCI simulator: the node starts with its primary VNIC only (`ens3`),
//! and an interface appears or disappears as the simulator attaches or detaches a VNIC,
//! named as a VM guest names it (the next free `ensN`, never from `nicIndex`), with the
//! router's source/destination check following the simulator's private IPs. Tests find a
//! VNIC's interface by its OCID ([`SimLab::wait_for_vnic`]), as an agent finds it by MAC.
//!
//! The simulator serves on the node namespace's loopback: its runtime's threads enter the
//! node namespace before they do anything, so its listener (and every socket its clients
//! open through [`SimLab::block_on`]) lives there. A `vcnpath` spawned in the node with
//! [`super::spawn_in`] reaches it at [`SimLab::agent_endpoints`], as an agent on an OCI
//! instance reaches IMDS; nothing listens in the root namespace.

use std::fs::File;
use std::future::Future;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;

use super::simsync::{self, SimSync, Slots, VnicView, Wiring, node_ifname};
use super::topology::{BM_NICS, GUEST_PRIMARY, Mac};
use super::{Lab, LabOptions, RouterDrops, run_in};
use crate::ocisim::{SimConfig, Simulator, SubnetConfig};

/// The simulator's view of the lab's addressing: the primary VNIC is the node's `ens3`
/// (10.0.0.10, its MAC) in subnet A 10.0.0.0/24; B 10.0.1.0/24 and C 10.0.3.0/24 are for
/// secondary VNICs, D 10.1.0.0/24 sits in the VCN's second CIDR block (so only a client
/// that reads every block treats it as VCN-internal). 10.0.2.0/24 is the lab's peer subnet.
pub fn lab_sim_config() -> SimConfig {
    let subnet = |name: &str, cidr: &str| SubnetConfig {
        id: format!("ocid1.subnet.oc1.iad.lab{name}"),
        display_name: format!("lab-{name}"),
        cidr_block: cidr.into(),
        freeform_tags: std::collections::BTreeMap::new(),
    };
    let primary = &GUEST_PRIMARY[0];
    SimConfig {
        // The primary and two secondary VNICs: enough for a pod count that needs a second
        // VNIC, and one more for spill-over tests.
        max_vnic_attachments: 3,
        subnets: vec![
            subnet("a", "10.0.0.0/24"),
            subnet("b", "10.0.1.0/24"),
            subnet("c", "10.0.3.0/24"),
            subnet("d", "10.1.0.0/24"),
        ],
        primary_mac: Some(primary.mac.to_string()),
        primary_ip: Some(primary.ip.to_string()),
        ..SimConfig::default()
    }
}

/// Where the lab put an attached VNIC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VnicLink {
    /// The node's interface, as a VM guest names it (`ens4`, `ens5`, …).
    pub ifname: String,
    pub mac: Mac,
    /// 0 for the primary, then the lowest free slot at attach time: the index of the
    /// router's counters ([`SimLab::router_drops`]).
    pub slot: usize,
}

/// How a bare-metal lab carries a secondary VNIC: VLAN `vlan_tag` on the node's physical
/// NIC `nic` (no link of its own; the guest builds a macvlan with `mac` and the VLAN).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VlanCarrier {
    /// The node's physical NIC (`ens2f0` for `nicIndex` 0, `ens2f1` for 1).
    pub nic: String,
    pub nic_index: u32,
    pub vlan_tag: u16,
    /// The VNIC's MAC, which the guest's macvlan must carry.
    pub mac: Mac,
    /// The router's counters' index ([`SimLab::router_drops`]).
    pub slot: usize,
}

/// Where a `vcnpath` running in the node namespace finds the simulator, and the flags'
/// values: instance-principal auth through IMDS and the federation endpoint (the default).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentEndpoints {
    /// IMDS v2 base, `http://127.0.0.1:PORT/opc/v2/` (`--imds-url`).
    pub imds_url: String,
    /// The OCI endpoint override, `http://127.0.0.1:PORT`: Core API under `/20160918/`,
    /// federation (`/v1/x509`) at the root.
    pub oci_endpoint: String,
}

/// A [`Lab`] whose VNICs come from an in-process OCI simulator. Dropping it stops the
/// sync thread, the simulator and then deletes the lab.
pub struct SimLab {
    // `Drop` stops the sync thread (it waits on the runtime's timers) and then the
    // runtime; the lab's namespaces go last, with the fields.
    sync: Option<SimSync>,
    slots: Slots,
    sim: Arc<Simulator>,
    runtime: Option<tokio::runtime::Runtime>,
    wiring: Wiring,
    lab: Lab,
}

impl SimLab {
    /// Builds a primary-only lab and starts the simulator with `config` (normally
    /// [`lab_sim_config`], perhaps with other limits or faults) on the node's loopback.
    /// A `BM.*` shape in `config` builds a bare-metal node ([`Lab::bare_metal`]): two
    /// physical NICs, secondary VNICs carried as VLANs on them.
    pub fn new(options: LabOptions, config: SimConfig) -> Result<Self> {
        let wiring = if config.is_bare_metal() {
            Wiring::BareMetal
        } else {
            Wiring::Vm
        };
        let lab = match wiring {
            Wiring::Vm => Lab::primary_only(options)?,
            Wiring::BareMetal => Lab::bare_metal(options)?,
        };
        let runtime = node_runtime(&lab)?;
        let sim = Arc::new(start_simulator(&runtime, config)?);
        check_listener_in_node(&lab, &sim)?;
        let primary = primary_view(&sim)?;
        let slots = Slots::default();
        let sync = SimSync::start(
            Arc::clone(&lab.inner),
            Arc::clone(&sim),
            runtime.handle().clone(),
            primary,
            Arc::clone(&slots),
            wiring,
        )?;
        Ok(Self {
            sync: Some(sync),
            slots,
            sim,
            runtime: Some(runtime),
            wiring,
            lab,
        })
    }

    /// The namespaces (node, router, peer, internet) and their helpers.
    pub fn lab(&self) -> &Lab {
        &self.lab
    }

    /// The simulator, for events, `snapshot()`, faults and API keys (in-process calls; its
    /// HTTP side is only reachable from the node namespace).
    pub fn sim(&self) -> &Simulator {
        &self.sim
    }

    /// The URLs to give `vcnpath run` started in the node namespace.
    pub fn agent_endpoints(&self) -> AgentEndpoints {
        AgentEndpoints {
            imds_url: self.sim.imds_url(),
            oci_endpoint: self.sim.base_url(),
        }
    }

    /// Runs `future` on the simulator's runtime, whose threads are in the node namespace,
    /// and waits for it: the way for a test to use an OCI client against the simulator.
    /// A panic in `future` is re-raised here.
    pub fn block_on<F>(&self, future: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let runtime = self.runtime.as_ref().expect("the runtime lives until drop");
        let task = runtime.spawn(future);
        // Waiting through a channel rather than `Runtime::block_on`: that would poll on
        // this thread (root namespace) and panics inside an async test.
        let (tx, rx) = mpsc::channel();
        runtime.spawn(async move {
            let _ = tx.send(task.await);
        });
        match rx.recv().expect("the waiting task reports back") {
            Ok(value) => value,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(error) => panic!("task on the simulator runtime did not finish: {error}"),
        }
    }

    /// Waits until the VNIC `vnic_id` has its interface in the node namespace (with the
    /// MAC the simulator reported) and says where it is.
    pub fn wait_for_vnic(&self, vnic_id: &str, timeout: Duration) -> Result<VnicLink> {
        if self.wiring == Wiring::BareMetal {
            bail!("VNIC {vnic_id}: a bare-metal node gets no link per VNIC; use wait_for_vlan");
        }
        self.wait(
            timeout,
            &format!("VNIC {vnic_id}'s interface to appear"),
            || {
                let Some(slot) = self.slot_of(vnic_id) else {
                    return Ok(None);
                };
                let ifname = node_ifname(slot);
                Ok(self.link_mac(&ifname)?.map(|mac| VnicLink {
                    ifname,
                    mac,
                    slot: slot as usize,
                }))
            },
        )
    }

    /// Bare metal: waits until the lab carries VNIC `vnic_id` (VLAN-tagged on its physical
    /// NIC, terminated in the router) and says how.
    pub fn wait_for_vlan(&self, vnic_id: &str, timeout: Duration) -> Result<VlanCarrier> {
        if self.wiring != Wiring::BareMetal {
            bail!("VNIC {vnic_id}: only a bare-metal lab carries VNICs as VLANs");
        }
        self.wait(timeout, &format!("VNIC {vnic_id}'s VLAN"), || {
            let Some(slot) = self.slot_of(vnic_id) else {
                return Ok(None);
            };
            let view = simsync::attached_vnics(&self.sim.snapshot())?
                .into_iter()
                .find(|v| v.vnic_id == vnic_id);
            let Some(view) = view else {
                return Ok(None);
            };
            let nic = BM_NICS
                .iter()
                .find(|n| n.nic_index == view.nic_index)
                .with_context(|| format!("no physical NIC {}", view.nic_index))?;
            Ok(Some(VlanCarrier {
                nic: nic.ifname.to_owned(),
                nic_index: view.nic_index,
                vlan_tag: view.vlan_tag,
                mac: view.mac,
                slot: slot as usize,
            }))
        })
    }

    /// Whether the node is bare metal (a `BM.*` shape).
    pub fn is_bare_metal(&self) -> bool {
        self.wiring == Wiring::BareMetal
    }

    /// Waits until the VNIC `vnic_id`'s interface is gone from the node namespace.
    pub fn wait_for_vnic_gone(&self, vnic_id: &str, timeout: Duration) -> Result<()> {
        let slot = self.slot_of(vnic_id);
        self.wait(
            timeout,
            &format!("VNIC {vnic_id}'s interface to disappear"),
            || {
                if self.slot_of(vnic_id).is_some() {
                    return Ok(None);
                }
                match slot {
                    Some(slot) => Ok(self.link_mac(&node_ifname(slot))?.is_none().then_some(())),
                    None => Ok(Some(())),
                }
            },
        )
    }

    /// The slot the lab gave VNIC `vnic_id` (0 is the primary), while it is attached.
    fn slot_of(&self, vnic_id: &str) -> Option<u32> {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(vnic_id)
            .copied()
    }

    /// Packets dropped by the source/destination check of the VNIC in `slot` (0 is the
    /// primary, then in order of appearance; see [`VnicLink::slot`]), both ways.
    pub fn router_drops(&self, slot: usize) -> Result<u64> {
        Ok(self.router_drop_counts(slot)?.total())
    }

    /// The two drop counters of the VNIC in `slot`, separately.
    pub fn router_drop_counts(&self, slot: usize) -> Result<RouterDrops> {
        self.lab.router_drop_counts(slot)
    }

    /// The drop counters of VNIC `vnic_id`, while it is attached.
    pub fn router_drop_counts_of(&self, vnic_id: &str) -> Result<RouterDrops> {
        let slot = self
            .slot_of(vnic_id)
            .with_context(|| format!("VNIC {vnic_id} is not attached in the lab"))?;
        self.router_drop_counts(slot as usize)
    }

    /// Errors the sync thread met while following the simulator (each once).
    pub fn sync_errors(&self) -> Vec<String> {
        self.sync.as_ref().map(SimSync::errors).unwrap_or_default()
    }

    /// The MAC of `ifname` in the node namespace, `None` if there is no such link.
    fn link_mac(&self, ifname: &str) -> Result<Option<Mac>> {
        let text = self.lab.node().ip(&["-o", "link", "show"])?;
        let Some(line) = text.lines().find(|line| {
            line.split(": ").nth(1) == Some(ifname) || line.contains(&format!(": {ifname}@"))
        }) else {
            return Ok(None);
        };
        let mut words = line.split_whitespace();
        words.find(|w| *w == "link/ether");
        let mac = words
            .next()
            .with_context(|| format!("no MAC in `ip link` line {line:?}"))?;
        Ok(Some(mac.parse()?))
    }

    /// Polls `probe` every 20 ms until it yields a value; the timeout error includes what
    /// the sync thread reported, which is usually why.
    fn wait<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut probe: impl FnMut() -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = probe()? {
                return Ok(value);
            }
            if Instant::now() >= deadline {
                bail!(
                    "waited {timeout:?} for {what} in netns {}; sync errors: {:?}",
                    self.lab.node().name(),
                    self.sync_errors()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for SimLab {
    fn drop(&mut self) {
        // The sync thread first: it waits on the runtime's timers and would panic if the
        // runtime went away under it. Then the runtime, with a timeout because a plain
        // drop blocks, which panics when the lab is dropped inside an async test.
        drop(self.sync.take());
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// A runtime whose every thread (workers and blocking pool) enters the node namespace
/// before running anything, so every socket created on it is the node's.
fn node_runtime(lab: &Lab) -> Result<tokio::runtime::Runtime> {
    let node = lab.node();
    let file = Arc::new(File::open(node.path()).with_context(|| {
        format!(
            "opening {} to enter netns {}",
            node.path().display(),
            node.name()
        )
    })?);
    let name = node.name().to_owned();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("simlab-node")
        .enable_all()
        .on_thread_start(move || {
            // SAFETY: setns only reads the descriptor, which the Arc keeps open; it
            // changes this runtime thread's network namespace and nothing else.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                // No way to report from here, and a thread left in the root namespace
                // would serve the simulator there: stop the process loudly instead.
                let error = std::io::Error::last_os_error();
                eprintln!("simlab: setns into netns {name}: {error}");
                std::process::abort();
            }
        })
        .build()
        .context("building the simulator's runtime")
}

fn start_simulator(runtime: &tokio::runtime::Runtime, config: SimConfig) -> Result<Simulator> {
    let (tx, rx) = mpsc::channel();
    // Spawned, not `block_on`: the bind must happen on a runtime thread (in the node).
    runtime.spawn(async move {
        let _ = tx.send(Simulator::start(config, "127.0.0.1:0").await);
    });
    // Starting generates the simulator's RSA keys (CA, intermediate, instance): a second on
    // a host, up to a minute in an emulated VM on a busy machine.
    rx.recv_timeout(Duration::from_mins(3))
        .context("the simulator did not start within 3 minutes")?
        .context("starting the simulator in the node namespace")
}

/// A connection from inside the node must succeed, or the agent would not find IMDS.
fn check_listener_in_node(lab: &Lab, sim: &Simulator) -> Result<()> {
    let addr: SocketAddr = sim.addr();
    run_in(lab.node(), move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(2))
    })?
    .with_context(|| {
        format!(
            "the simulator at {addr} is not reachable from netns {}",
            lab.node().name()
        )
    })?;
    Ok(())
}

/// The simulator's primary VNIC, which must be the node's `ens3` as the lab built it.
fn primary_view(sim: &Simulator) -> Result<VnicView> {
    let primary = simsync::attached_vnics(&sim.snapshot())?
        .into_iter()
        .find(|v| v.is_primary)
        .context("the simulator has no primary VNIC")?;
    let ens3 = &GUEST_PRIMARY[0];
    let primary_ip: Option<Ipv4Net> = primary.ranges.iter().next().copied();
    if primary.mac != ens3.mac || primary_ip != Some(ens3.ip.into()) || primary.ranges.len() != 1 {
        bail!(
            "the simulator's primary VNIC (MAC {}, IPs {:?}) is not the lab's ens3 (MAC {}, IP {}): start from lab_sim_config()",
            primary.mac,
            primary.ranges,
            ens3.mac,
            ens3.ip
        );
    }
    Ok(primary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_simulator_describes_the_labs_primary_vnic_and_subnets() {
        let sim = Simulator::start(lab_sim_config(), "127.0.0.1:0")
            .await
            .expect("simulator starts");
        let vnics = simsync::attached_vnics(&sim.snapshot()).expect("snapshot parses");
        let primary = vnics.first().expect("the primary VNIC");
        assert!(primary.is_primary, "the primary is listed first: {vnics:?}");
        let ens3 = &GUEST_PRIMARY[0];
        assert_eq!(primary.mac, ens3.mac, "primary MAC");
        assert_eq!(
            primary.ranges.iter().copied().collect::<Vec<_>>(),
            vec![Ipv4Net::from(ens3.ip)],
            "primary VNIC's addresses"
        );
        assert_eq!(primary.router_ip, ens3.router_ip, "subnet A's router");
        assert_eq!(vnics.len(), 1, "only the primary is attached: {vnics:?}");
        let cidrs: Vec<String> = sim.config().vcn.cidr_blocks;
        assert_eq!(cidrs, ["10.0.0.0/16", "10.1.0.0/16"], "VCN blocks");
    }
}
