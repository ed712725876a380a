//! One bench node: the lab, the measured pod on the secondary VNIC, and N pod addresses,
//! with either the baseline or `vcnpath datapath` carrying the traffic.
//!
//! Only the measured pod has a namespace. The other N − 1 addresses exist the way they
//! cost something on the packet path: a /32 route each (both setups, as every pod has
//! one), plus a policy rule each (baseline) or an endpoint entry each (vcnpath). They sit
//! on a third VNIC `eth2` with a /19 subnet, because the lab's real VNICs have /24
//! subnets that cannot hold 4096 addresses; neither datapath's per-packet work depends
//! on which VNIC owns an address. `eth2` is a veth whose peer stays, unused, in the node
//! (the lab's kernels may lack the dummy driver); nothing is ever sent through it.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use vcnpath::datapath::{Counters, DatapathMaps};

use super::Setup;
use super::baseline::{self, VnicTable};
use crate::agent::Agent;
use crate::lab::process::run_stdin;
use crate::lab::topology::VCN_CIDR;
use crate::lab::traffic::{UdpEchoServer, udp_request};
use crate::lab::{Lab, LabOptions, Netns, Pod, VNICS, cmd_in};
use crate::privileged::PinDir;

/// The measured pod's address, owned by VNIC 1 (`eth1`).
pub const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 20);
/// The extra VNIC carrying the other pod addresses.
pub const FILLER_IF: &str = "eth2";
const FILLER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 32, 10);
const FILLER_ROUTER: Ipv4Addr = Ipv4Addr::new(10, 0, 32, 1);
const FILLER_SUBNET: &str = "10.0.32.0/19";
/// First filler pod address; 10.0.33.0 onwards stays inside the /19 for 8000 pods.
const FILLER_FIRST: u32 = u32::from_be_bytes([10, 0, 33, 0]);
/// Baseline route tables: 100 + VNIC index, as the AWS CNI numbers them per device.
const TABLE_ETH1: u32 = 101;
const TABLE_FILLER: u32 = 102;

/// A built bench node. Field order is drop order: the agent stops, then the pod and the
/// lab go, then the pins.
pub struct BenchNode {
    pub setup: Setup,
    /// Pod addresses on the node, the measured one included.
    pub n: usize,
    agent: Option<Agent>,
    pod: Pod,
    lab: Lab,
    pins: Option<PinDir>,
}

/// The N − 1 addresses besides the measured pod.
pub fn filler_ips(n: usize) -> Vec<Ipv4Addr> {
    (0..n.saturating_sub(1))
        .map(|i| Ipv4Addr::from(FILLER_FIRST + u32::try_from(i).expect("pod count fits u32")))
        .collect()
}

impl BenchNode {
    /// Builds the lab and the node's datapath for `n` pod addresses.
    pub fn new(setup: Setup, n: usize) -> Result<Self> {
        ensure!(n >= 1, "a bench node needs the measured pod (n >= 1)");
        let lab = Lab::new(LabOptions::default())?;
        let pod = lab.add_pod("bench", POD_IP, 1)?;
        let fillers = filler_ips(n);
        add_filler_vnic(lab.node(), &fillers)
            .with_context(|| format!("adding {} filler pod addresses", fillers.len()))?;
        let (agent, pins) = match setup {
            Setup::Baseline => {
                install_baseline(lab.node(), &fillers)?;
                (None, None)
            }
            Setup::Vcnpath => {
                let pins = PinDir::new(&format!("bench{n}"));
                let config = agent_config(&pins, &fillers);
                let agent = Agent::start(&lab, &format!("bench{n}"), &config)?;
                (Some(agent), Some(pins))
            }
        };
        Ok(Self {
            setup,
            n,
            agent,
            pod,
            lab,
            pins,
        })
    }

    pub fn lab(&self) -> &Lab {
        &self.lab
    }

    /// The measured pod's namespace.
    pub fn pod_ns(&self) -> &Netns {
        self.pod.ns()
    }

    /// Proves the node carries traffic as it must before anything is measured: the VCN
    /// peer sees the pod's own address, the internet sees the masquerade address, and the
    /// VCN router's source/destination check dropped nothing.
    pub fn verify(&self) -> Result<()> {
        let t = Duration::from_secs(5);
        for (ns, ip, expect) in [
            (self.lab.peer(), self.lab.peer_ip(), POD_IP),
            (self.lab.inet(), self.lab.inet_ip(), self.lab.node_ip()),
        ] {
            let echo = UdpEchoServer::start(ns, SocketAddr::from((ip, 5353)))?;
            let reply = udp_request(self.pod_ns(), None, echo.addr(), b"bench", t)
                .with_context(|| format!("{self}: UDP from the pod to {ip}"))?;
            if reply.peer_seen.ip() != IpAddr::V4(expect) {
                bail!(
                    "{self}: {ip} saw the pod as {}, expected {expect}",
                    reply.peer_seen
                );
            }
        }
        self.check_router_drops()
    }

    /// Fails if the VCN router's source/destination check dropped anything.
    pub fn check_router_drops(&self) -> Result<()> {
        for vnic in 0..VNICS.len() {
            let drops = self.lab.router_drop_counts(vnic)?;
            if drops.total() != 0 {
                bail!(
                    "{self}: the VCN router dropped packets of VNIC {vnic} (source check {}, destination check {})",
                    drops.source,
                    drops.destination
                );
            }
        }
        Ok(())
    }

    /// vcnpath's per-reason counters (`None` for the baseline).
    pub fn counters(&self) -> Result<Option<Counters>> {
        let Some(pins) = &self.pins else {
            return Ok(None);
        };
        let maps = DatapathMaps::from_pins(&pins.path)
            .with_context(|| format!("{self}: opening the pinned maps"))?;
        Ok(Some(Counters::read(&maps).context("reading counters")?))
    }

    /// The agent's log (empty for the baseline), for error reports.
    pub fn agent_log(&self) -> String {
        self.agent.as_ref().map(Agent::log).unwrap_or_default()
    }
}

impl std::fmt::Display for BenchNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} node with {} pod addresses", self.setup, self.n)
    }
}

/// The extra VNIC and a /32 route per filler address, in one `ip -batch`. Both ends
/// must be up, or the kernel refuses routes through it.
fn add_filler_vnic(node: &Netns, fillers: &[Ipv4Addr]) -> Result<()> {
    let mut batch = format!(
        "link add {FILLER_IF} type veth peer name {FILLER_IF}p\naddr add {FILLER_IP}/19 dev {FILLER_IF}\n\
         link set {FILLER_IF}p up\nlink set {FILLER_IF} up\n"
    );
    for ip in fillers {
        // Writing to a String cannot fail.
        let _ = writeln!(batch, "route add {ip}/32 dev {FILLER_IF}");
    }
    run_stdin(cmd_in(node, "ip").args(["-batch", "-"]), &batch)?;
    Ok(())
}

fn install_baseline(node: &Netns, fillers: &[Ipv4Addr]) -> Result<()> {
    let eth1 = &VNICS[1];
    let tables = [
        VnicTable {
            ifname: eth1.ifname.to_owned(),
            primary_ip: eth1.ip,
            subnet: eth1.subnet_cidr(),
            router_ip: eth1.router_ip,
            table: TABLE_ETH1,
        },
        VnicTable {
            ifname: FILLER_IF.to_owned(),
            primary_ip: FILLER_IP,
            subnet: FILLER_SUBNET.to_owned(),
            router_ip: FILLER_ROUTER,
            table: TABLE_FILLER,
        },
    ];
    // The measured pod last: its rule is the newest, walked after every other pod's.
    let pods: Vec<(Ipv4Addr, u32)> = fillers
        .iter()
        .map(|ip| (*ip, TABLE_FILLER))
        .chain([(POD_IP, TABLE_ETH1)])
        .collect();
    baseline::install(node, (VNICS[0].ifname, VNICS[0].ip), &tables, &pods)?;
    let rules = baseline::pod_rules(node)?;
    ensure!(
        rules == pods.len(),
        "expected {} pod rules in {}, found {rules}",
        pods.len(),
        node.name()
    );
    Ok(())
}

/// The `vcnpath datapath` configuration: the lab's two VNICs (the measured pod on eth1)
/// and the extra VNIC with the fillers.
fn agent_config(pins: &PinDir, fillers: &[Ipv4Addr]) -> String {
    let quoted = |ips: &[Ipv4Addr]| {
        ips.iter()
            .map(|ip| format!("\"{ip}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut text = format!(
        "pin_dir = {:?}\nvcn_cidrs = [\"{VCN_CIDR}\"]\nmasquerade_interface = \"{}\"\n",
        pins.path.display().to_string(),
        VNICS[0].ifname
    );
    let vnics = [
        (
            VNICS[0].ifname,
            VNICS[0].ip,
            VNICS[0].subnet_cidr(),
            VNICS[0].router_ip,
            String::new(),
        ),
        (
            VNICS[1].ifname,
            VNICS[1].ip,
            VNICS[1].subnet_cidr(),
            VNICS[1].router_ip,
            quoted(&[POD_IP]),
        ),
        (
            FILLER_IF,
            FILLER_IP,
            FILLER_SUBNET.to_owned(),
            FILLER_ROUTER,
            quoted(fillers),
        ),
    ];
    for (interface, ip, subnet, router, pods) in vnics {
        let _ = write!(
            text,
            "\n[[vnic]]\ninterface = \"{interface}\"\nprimary_ip = \"{ip}\"\nsubnet = \"{subnet}\"\nrouter_ip = \"{router}\"\npods = [{pods}]\n"
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fillers_stay_inside_the_extra_vnic_subnet() {
        let subnet: ipnet::Ipv4Net = FILLER_SUBNET.parse().unwrap();
        let fillers = filler_ips(4096);
        assert_eq!(fillers.len(), 4095);
        assert!(
            fillers
                .iter()
                .all(|ip| subnet.contains(ip) && *ip != FILLER_IP)
        );
        assert!(filler_ips(1).is_empty());
    }

    #[test]
    fn agent_config_lists_every_pod_once() {
        let pins = PinDir {
            path: "/sys/fs/bpf/x".into(),
        };
        let text = agent_config(&pins, &filler_ips(3));
        assert!(text.contains("pods = [\"10.0.1.20\"]"), "{text}");
        assert!(
            text.contains("pods = [\"10.0.33.0\", \"10.0.33.1\"]"),
            "{text}"
        );
        std::mem::forget(pins);
    }
}
