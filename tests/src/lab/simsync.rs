//! Keeping the lab's VNIC links and the router's check in step with the simulator.
//!
//! The simulator's state is the truth, read with `snapshot()`: a VNIC whose attachment is
//! ATTACHED (or still DETACHING) has a link, and its set in the router holds exactly the
//! private IPs the simulator assigns to it: each single IP as its /32, each IP CIDR block
//! (`cidrPrefixLength` below 32) as its prefix, so every address inside a block passes. A
//! background thread compares that with what it has applied and repairs the difference. It
//! wakes on every simulator event (so a newly ATTACHED VNIC's interface appears at once) and
//! at least every [`TICK`], because private IPs come and go without events. Comparing whole
//! states rather than replaying events also means a burst that overflows the event channel
//! cannot leave the lab out of step.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;
use serde_json::Value;
use tokio::sync::watch;

use super::LabInner;
use super::router::{self, Port};
use super::topology::{BM_NICS, LINK_MTU, Mac};
use crate::ocikit::private_ip_range;
use crate::ocisim::Simulator;

/// How often the simulator's private IPs are compared with the router's sets.
pub(super) const TICK: Duration = Duration::from_millis(100);

/// One attached VNIC as the simulator describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct VnicView {
    pub vnic_id: String,
    pub is_primary: bool,
    pub mac: Mac,
    pub subnet: Ipv4Net,
    pub router_ip: Ipv4Addr,
    /// The VNIC's private-IP objects as address ranges: the primary IP and every secondary
    /// one as a /32, every IP CIDR block as its prefix.
    pub ranges: BTreeSet<Ipv4Net>,
    /// The attachment's physical NIC (0 on a VM).
    pub nic_index: u32,
    /// The attachment's VLAN tag: what carries the VNIC on a bare-metal NIC (0 untagged).
    pub vlan_tag: u16,
}

/// How the lab carries a VNIC to the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Wiring {
    /// A VM: each VNIC is a NIC of its own (a new `ensN` link with the VNIC's MAC).
    Vm,
    /// Bare metal: a secondary VNIC is VLAN `vlanTag` on physical NIC `nicIndex`; the node
    /// gets no link for it (oci-utils' `network_interface.py`: the guest makes the macvlan
    /// and VLAN itself).
    BareMetal,
}

/// Where the lab put a VNIC: its slot (0 is the primary; each new VNIC takes the lowest
/// free one, as a hot-plugged NIC takes a free PCI slot), which names the node's interface
/// as a guest with predictable names sees it (`ens3`, `ens4`, …) and the router's port.
/// Nothing here comes from `nicIndex`: on a VM every VNIC has `nicIndex` 0.
pub(super) fn node_ifname(slot: u32) -> String {
    format!("ens{}", slot + 3)
}

fn router_ifname(slot: u32) -> String {
    format!("r{slot}")
}

fn port(slot: u32, mac: Mac) -> Port {
    Port {
        index: slot as usize,
        ifname: router_ifname(slot),
        mac,
    }
}

/// VNIC OCID → slot, shared with [`super::SimLab`] so tests can ask where a VNIC went.
pub(super) type Slots = Arc<Mutex<BTreeMap<String, u32>>>;

fn field<'a>(value: &'a Value, name: &str) -> Result<&'a str> {
    value[name]
        .as_str()
        .with_context(|| format!("simulator snapshot: no string {name:?} in {value}"))
}

/// The attached VNICs from the simulator's `snapshot()`: the primary first, then in the
/// order they were attached (`timeCreated`, then id).
pub(super) fn attached_vnics(snapshot: &Value) -> Result<Vec<VnicView>> {
    let list = |name: &str| {
        snapshot[name]
            .as_array()
            .with_context(|| format!("simulator snapshot: no {name:?} list"))
    };
    let mut views = Vec::new();
    for attachment in list("attachments")? {
        let state = field(attachment, "lifecycleState")?;
        if state != "ATTACHED" && state != "DETACHING" {
            continue;
        }
        let vnic_id = field(attachment, "vnicId")?;
        let Some(vnic) = list("vnics")?.iter().find(|v| v["id"] == vnic_id) else {
            continue;
        };
        let subnet_id = field(vnic, "subnetId")?;
        let subnet = list("subnets")?
            .iter()
            .find(|s| s["id"] == subnet_id)
            .with_context(|| format!("simulator snapshot: no subnet {subnet_id}"))?;
        let ranges = list("privateIps")?
            .iter()
            .filter(|p| p["vnicId"] == vnic_id)
            .map(|p| private_ip_range(p).context("simulator snapshot"))
            .collect::<Result<_>>()?;
        let vlan_tag = attachment["vlanTag"].as_u64().unwrap_or_default();
        let order = (
            field(attachment, "timeCreated")?.to_owned(),
            field(attachment, "id")?.to_owned(),
        );
        views.push((
            order,
            VnicView {
                vnic_id: vnic_id.to_owned(),
                is_primary: vnic["isPrimary"] == true,
                mac: field(vnic, "macAddress")?.parse()?,
                subnet: field(subnet, "cidrBlock")?.parse().context("subnet CIDR")?,
                router_ip: field(subnet, "virtualRouterIp")?
                    .parse()
                    .context("virtual router IP")?,
                ranges,
                nic_index: attachment["nicIndex"]
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .unwrap_or_default(),
                vlan_tag: u16::try_from(vlan_tag)
                    .with_context(|| format!("simulator snapshot: VLAN tag {vlan_tag}"))?,
            },
        ));
    }
    views.sort_by(|(a, va), (b, vb)| (!va.is_primary, a).cmp(&(!vb.is_primary, b)));
    Ok(views.into_iter().map(|(_, view)| view).collect())
}

/// The background thread; stopped and joined on drop.
pub(super) struct SimSync {
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl SimSync {
    /// Starts following `sim`. `primary` is what the lab already built (slot 0, `ens3`);
    /// `slots` is kept up to date with where each VNIC is.
    pub(super) fn start(
        lab: Arc<LabInner>,
        sim: Arc<Simulator>,
        runtime: tokio::runtime::Handle,
        primary: VnicView,
        slots: Slots,
        wiring: Wiring,
    ) -> Result<Self> {
        let (stop, mut stopped) = watch::channel(false);
        let errors = Arc::new(Mutex::new(Vec::new()));
        lock(&slots).insert(primary.vnic_id.clone(), 0);
        let mut state = Applied {
            lab,
            vnics: BTreeMap::from([(primary.vnic_id.clone(), (0, primary))]),
            slots,
            errors: Arc::clone(&errors),
            wiring,
        };
        let mut events = sim.subscribe();
        let thread = std::thread::Builder::new()
            .name("simlab-sync".into())
            .spawn(move || {
                loop {
                    state.reconcile(&sim);
                    // Handle::block_on: this thread is not a runtime thread, and it only
                    // waits here; the namespace work happens in `reconcile`.
                    let stop = runtime.block_on(async {
                        tokio::select! {
                            _ = events.recv() => false,
                            () = tokio::time::sleep(TICK) => false,
                            _ = stopped.changed() => true,
                        }
                    });
                    if stop {
                        break;
                    }
                }
            })
            .context("starting the simulator sync thread")?;
        Ok(Self {
            stop,
            thread: Some(thread),
            errors,
        })
    }

    /// Every error the thread has met (it logs them too and retries on the next tick).
    pub(super) fn errors(&self) -> Vec<String> {
        lock(&self.errors).clone()
    }
}

impl Drop for SimSync {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("lab cleanup: the simulator sync thread panicked");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the thread has applied to the namespaces: VNIC OCID → (slot, view).
struct Applied {
    lab: Arc<LabInner>,
    vnics: BTreeMap<String, (u32, VnicView)>,
    slots: Slots,
    errors: Arc<Mutex<Vec<String>>>,
    wiring: Wiring,
}

impl Applied {
    fn reconcile(&mut self, sim: &Simulator) {
        if let Err(error) = self.try_reconcile(sim) {
            let text = format!("{error:#}");
            eprintln!("simlab: {text}");
            let mut errors = lock(&self.errors);
            // The same failure repeats every tick; keep one of each.
            if !errors.contains(&text) {
                errors.push(text);
            }
        }
    }

    /// One VNIC failing (its router side gone with a link deleted by a test, say) does not
    /// hold back the others: every VNIC is tried, and the failures are reported together.
    fn try_reconcile(&mut self, sim: &Simulator) -> Result<()> {
        let desired = attached_vnics(&sim.snapshot())?;
        let gone: Vec<String> = self
            .vnics
            .keys()
            .filter(|id| !desired.iter().any(|d| d.vnic_id == **id))
            .cloned()
            .collect();
        let mut failures = Vec::new();
        for vnic_id in gone {
            let (slot, view) = self.vnics.remove(&vnic_id).expect("listed above");
            lock(&self.slots).remove(&vnic_id);
            if let Err(error) = self.detach(slot, &view) {
                failures.push(format!("{error:#}"));
            }
        }
        for want in desired {
            let result = match self.vnics.get_mut(&want.vnic_id) {
                None => {
                    let used: BTreeSet<u32> = self.vnics.values().map(|(slot, _)| *slot).collect();
                    // One more slot than VNICs held: one of them is free.
                    let slot = (0..=u32::try_from(used.len()).expect("few VNICs"))
                        .find(|s| !used.contains(s))
                        .expect("a free slot");
                    let wired = match self.wiring {
                        Wiring::Vm => attach(&self.lab, slot, &want),
                        Wiring::BareMetal => attach_vlan(&self.lab, slot, &want),
                    };
                    wired.map(|()| {
                        lock(&self.slots).insert(want.vnic_id.clone(), slot);
                        self.vnics.insert(want.vnic_id.clone(), (slot, want));
                    })
                }
                Some((slot, have)) => sync_ranges(&self.lab, *slot, have, &want.ranges),
            };
            if let Err(error) = result {
                failures.push(format!("{error:#}"));
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            bail!("{}", failures.join("; "))
        }
    }

    fn detach(&self, slot: u32, view: &VnicView) -> Result<()> {
        if view.is_primary {
            bail!("the simulator detached the primary VNIC, which OCI never does");
        }
        // Unhook the check before the link goes, then delete the node end (which takes the
        // router end, its address, routes and neighbour entries with it).
        router::remove_port(&self.lab.router, &port(slot, view.mac))?;
        if self.wiring == Wiring::BareMetal {
            // The VNIC's VLAN ends in the router; the node's macvlan and VLAN (the guest's
            // own) stay, carrying nothing, until the guest removes them.
            let rname = router_ifname(slot);
            self.lab
                .router
                .ip(&["link", "del", "dev", &rname])
                .with_context(|| format!("removing VNIC {}'s VLAN ({rname})", view.vnic_id))?;
            return Ok(());
        }
        let ifname = node_ifname(slot);
        self.lab
            .node
            .ip(&["link", "del", "dev", &ifname])
            .with_context(|| format!("removing VNIC {} ({ifname})", view.vnic_id))?;
        Ok(())
    }
}

/// Creates the node's interface for a new VNIC as OCI hands it to a VM: down, without an
/// address and at the kernel's default MTU (the guest's network setup, here the agent,
/// configures it), with its router end configured as the subnet's virtual router; then adds
/// the port to the check.
fn attach(lab: &LabInner, slot: u32, view: &VnicView) -> Result<()> {
    let (node, router) = (&lab.node, &lab.router);
    let (ifname, rname) = (node_ifname(slot), router_ifname(slot));
    let what = || format!("attaching VNIC {} as {ifname}", view.vnic_id);
    // Created from inside the node with the peer placed straight into the router, so
    // neither end ever exists in the root namespace.
    let configured = (|| -> Result<()> {
        // The node's end is created at the fresh MTU, never changed by the lab afterwards:
        // the agent may configure it the moment it appears. The router's end (OCI's
        // fabric) takes jumbo frames.
        node.add_veth_into(
            &ifname,
            &view.mac.to_string(),
            FRESH_NIC_MTU,
            &rname,
            router,
        )?;
        let gateway = format!("{}/{}", view.router_ip, view.subnet.prefix_len());
        router.ip_batch(&[
            &["link", "set", &rname, "mtu", &LINK_MTU.to_string()],
            &["addr", "add", &gateway, "dev", &rname],
            &["link", "set", &rname, "up"],
        ])?;
        let ranges: Vec<Ipv4Net> = view.ranges.iter().copied().collect();
        router::add_port(router, &port(slot, view.mac), &ranges)
    })();
    if let Err(error) = configured {
        // Leave nothing half-built: the next tick starts this VNIC again from scratch.
        let _ = router::remove_port(router, &port(slot, view.mac));
        let _ = node.ip(&["link", "del", "dev", &ifname]);
        return Err(error).with_context(what);
    }
    Ok(())
}

/// Carries a new secondary VNIC of a bare-metal node as OCI does: frames tagged with its
/// `vlanTag` on the physical NIC of its `nicIndex`. The router terminates that VLAN on its
/// end of the NIC's cable (its own VLAN interface, configured as the subnet's virtual
/// router and added to the check), so only a guest that builds the macvlan with the VNIC's
/// MAC and the VLAN on top reaches it; the node gets nothing.
fn attach_vlan(lab: &LabInner, slot: u32, view: &VnicView) -> Result<()> {
    let router = &lab.router;
    let rname = router_ifname(slot);
    let what = || {
        format!(
            "carrying VNIC {} as VLAN {} on NIC {}",
            view.vnic_id, view.vlan_tag, view.nic_index
        )
    };
    let nic = BM_NICS
        .iter()
        .find(|n| n.nic_index == view.nic_index)
        .with_context(|| {
            format!(
                "the lab's bare-metal node has no physical NIC {}",
                view.nic_index
            )
        })
        .with_context(what)?;
    if view.vlan_tag == 0 {
        return Err(anyhow::anyhow!(
            "a secondary VNIC of a bare-metal instance must be tagged (vlanTag 0)"
        ))
        .with_context(what);
    }
    let configured = (|| -> Result<()> {
        router.ip(&[
            "link",
            "add",
            "link",
            nic.router_ifname,
            "name",
            &rname,
            "mtu",
            &LINK_MTU.to_string(),
            "type",
            "vlan",
            "id",
            &view.vlan_tag.to_string(),
        ])?;
        let gateway = format!("{}/{}", view.router_ip, view.subnet.prefix_len());
        router.ip(&["addr", "add", &gateway, "dev", &rname])?;
        router.ip(&["link", "set", &rname, "up"])?;
        let ranges: Vec<Ipv4Net> = view.ranges.iter().copied().collect();
        router::add_port(router, &port(slot, view.mac), &ranges)
    })();
    if let Err(error) = configured {
        let _ = router::remove_port(router, &port(slot, view.mac));
        let _ = router.ip(&["link", "del", "dev", &rname]);
        return Err(error).with_context(what);
    }
    Ok(())
}

/// The MTU a newly attached VNIC's interface has before the guest configures it (the
/// kernel's Ethernet default; OCI's 9000 is set by the guest, as cloud-init does).
pub(super) const FRESH_NIC_MTU: u32 = 1500;

/// Makes the router's set for the VNIC in `slot` hold exactly `want`. Ranges leave before
/// new ones come, so a block that replaced single addresses inside it (or the reverse)
/// never overlaps them in the set.
fn sync_ranges(
    lab: &LabInner,
    slot: u32,
    have: &mut VnicView,
    want: &BTreeSet<Ipv4Net>,
) -> Result<()> {
    let port = port(slot, have.mac);
    for range in have.ranges.clone().difference(want) {
        router::remove_range(&lab.router, &port, *range)
            .with_context(|| format!("taking {range} from VNIC {} in the router", have.vnic_id))?;
        have.ranges.remove(range);
    }
    for range in want.difference(&have.ranges.clone()) {
        router::add_range(&lab.router, &port, *range)
            .with_context(|| format!("giving {range} to VNIC {} in the router", have.vnic_id))?;
        have.ranges.insert(*range);
    }
    Ok(())
}
