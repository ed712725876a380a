//! Keeping the lab's VNIC links and the router's check in step with the simulator.
//!
//! The simulator's state is the truth, read with `snapshot()`: a VNIC whose attachment is
//! ATTACHED (or still DETACHING) has a link, and its set in the router holds exactly the
//! private IPs the simulator assigns to it. A background thread compares that with what it
//! has applied and repairs the difference. It wakes on every simulator event (so an
//! ATTACHED `ethN` appears at once) and at least every [`TICK`], because private IPs come
//! and go without events. Comparing whole states rather than replaying events also means a
//! burst that overflows the event channel cannot leave the lab out of step.

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
use super::topology::{LINK_MTU, Mac};
use crate::ocisim::Simulator;

/// How often the simulator's private IPs are compared with the router's sets.
pub(super) const TICK: Duration = Duration::from_millis(100);

/// One attached VNIC as the simulator describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct VnicView {
    pub vnic_id: String,
    pub mac: Mac,
    pub subnet: Ipv4Net,
    pub router_ip: Ipv4Addr,
    /// The primary private IP and every secondary one.
    pub addrs: BTreeSet<Ipv4Addr>,
}

impl VnicView {
    fn port(&self, index: u32) -> Port {
        Port {
            index: index as usize,
            ifname: router_ifname(index),
            mac: self.mac,
        }
    }
}

pub(super) fn node_ifname(index: u32) -> String {
    format!("eth{index}")
}

fn router_ifname(index: u32) -> String {
    format!("r{index}")
}

fn field<'a>(value: &'a Value, name: &str) -> Result<&'a str> {
    value[name]
        .as_str()
        .with_context(|| format!("simulator snapshot: no string {name:?} in {value}"))
}

/// The attached VNICs by `nicIndex`, from the simulator's `snapshot()`.
pub(super) fn attached_vnics(snapshot: &Value) -> Result<BTreeMap<u32, VnicView>> {
    let list = |name: &str| {
        snapshot[name]
            .as_array()
            .with_context(|| format!("simulator snapshot: no {name:?} list"))
    };
    let mut views = BTreeMap::new();
    for attachment in list("attachments")? {
        let state = field(attachment, "lifecycleState")?;
        if state != "ATTACHED" && state != "DETACHING" {
            continue;
        }
        let vnic_id = field(attachment, "vnicId")?;
        let index = attachment["nicIndex"]
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .with_context(|| format!("simulator snapshot: bad nicIndex in {attachment}"))?;
        let Some(vnic) = list("vnics")?.iter().find(|v| v["id"] == vnic_id) else {
            continue;
        };
        let subnet_id = field(vnic, "subnetId")?;
        let subnet = list("subnets")?
            .iter()
            .find(|s| s["id"] == subnet_id)
            .with_context(|| format!("simulator snapshot: no subnet {subnet_id}"))?;
        let addrs = list("privateIps")?
            .iter()
            .filter(|p| p["vnicId"] == vnic_id)
            .map(|p| field(p, "ipAddress")?.parse().context("private IP"))
            .collect::<Result<_>>()?;
        views.insert(
            index,
            VnicView {
                vnic_id: vnic_id.to_owned(),
                mac: field(vnic, "macAddress")?.parse()?,
                subnet: field(subnet, "cidrBlock")?.parse().context("subnet CIDR")?,
                router_ip: field(subnet, "virtualRouterIp")?
                    .parse()
                    .context("virtual router IP")?,
                addrs,
            },
        );
    }
    Ok(views)
}

/// The background thread; stopped and joined on drop.
pub(super) struct SimSync {
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl SimSync {
    /// Starts following `sim`. `applied` is what the lab already built (the primary VNIC).
    pub(super) fn start(
        lab: Arc<LabInner>,
        sim: Arc<Simulator>,
        runtime: tokio::runtime::Handle,
        applied: BTreeMap<u32, VnicView>,
    ) -> Result<Self> {
        let (stop, mut stopped) = watch::channel(false);
        let errors = Arc::new(Mutex::new(Vec::new()));
        let mut state = Applied {
            lab,
            vnics: applied,
            errors: Arc::clone(&errors),
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
        self.errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
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

/// What the thread has applied to the namespaces, by `nicIndex`.
struct Applied {
    lab: Arc<LabInner>,
    vnics: BTreeMap<u32, VnicView>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl Applied {
    fn reconcile(&mut self, sim: &Simulator) {
        if let Err(error) = self.try_reconcile(sim) {
            let text = format!("{error:#}");
            eprintln!("simlab: {text}");
            let mut errors = self.errors.lock().unwrap_or_else(PoisonError::into_inner);
            // The same failure repeats every tick; keep one of each.
            if !errors.contains(&text) {
                errors.push(text);
            }
        }
    }

    fn try_reconcile(&mut self, sim: &Simulator) -> Result<()> {
        let desired = attached_vnics(&sim.snapshot())?;
        let gone: Vec<u32> = self
            .vnics
            .iter()
            .filter(|(index, view)| desired.get(index).is_none_or(|d| d.vnic_id != view.vnic_id))
            .map(|(index, _)| *index)
            .collect();
        for index in gone {
            let view = self.vnics.remove(&index).expect("listed above");
            self.detach(index, &view)?;
        }
        for (index, want) in desired {
            match self.vnics.get_mut(&index) {
                None => {
                    attach(&self.lab, index, &want)?;
                    self.vnics.insert(index, want);
                }
                Some(have) => sync_addresses(&self.lab, index, have, &want.addrs)?,
            }
        }
        Ok(())
    }

    fn detach(&self, index: u32, view: &VnicView) -> Result<()> {
        if index == 0 {
            bail!("the simulator detached the primary VNIC, which OCI never does");
        }
        // Unhook the check before the link goes, then delete the node end (which takes the
        // router end, its address, routes and neighbour entries with it).
        router::remove_port(&self.lab.router, &view.port(index))?;
        self.lab
            .node
            .ip(&["link", "del", "dev", &node_ifname(index)])
            .with_context(|| format!("removing VNIC {} ({})", index, view.vnic_id))?;
        Ok(())
    }
}

/// Creates `ethN` (down, unaddressed, as OCI hands a new VNIC to the instance) and its
/// router end configured as the subnet's virtual router, then adds the port to the check.
fn attach(lab: &LabInner, index: u32, view: &VnicView) -> Result<()> {
    let (node, router) = (&lab.node, &lab.router);
    let (ifname, rname) = (node_ifname(index), router_ifname(index));
    let what = || format!("attaching VNIC {index} ({}) as {ifname}", view.vnic_id);
    // Created from inside the node with the peer placed straight into the router, so
    // neither end ever exists in the root namespace.
    node.add_veth_into(&ifname, &view.mac.to_string(), LINK_MTU, &rname, router)
        .with_context(what)?;
    let configured = (|| -> Result<()> {
        let gateway = format!("{}/{}", view.router_ip, view.subnet.prefix_len());
        router.ip(&["addr", "add", &gateway, "dev", &rname])?;
        router.ip(&["link", "set", &rname, "up"])?;
        let addrs: Vec<Ipv4Addr> = view.addrs.iter().copied().collect();
        router::add_port(router, &view.port(index), &addrs)
    })();
    if let Err(error) = configured {
        // Leave nothing half-built: the next tick starts this VNIC again from scratch.
        let _ = router::remove_port(router, &view.port(index));
        let _ = node.ip(&["link", "del", "dev", &ifname]);
        return Err(error).with_context(what);
    }
    Ok(())
}

/// Makes the router's set for VNIC `index` hold exactly `want`.
fn sync_addresses(
    lab: &LabInner,
    index: u32,
    have: &mut VnicView,
    want: &BTreeSet<Ipv4Addr>,
) -> Result<()> {
    let port = have.port(index);
    for ip in want.difference(&have.addrs.clone()) {
        router::add_address(&lab.router, &port, *ip)
            .with_context(|| format!("giving {ip} to VNIC {index} in the router"))?;
        have.addrs.insert(*ip);
    }
    for ip in have.addrs.clone().difference(want) {
        router::remove_address(&lab.router, &port, *ip)
            .with_context(|| format!("taking {ip} from VNIC {index} in the router"))?;
        have.addrs.remove(ip);
    }
    Ok(())
}
