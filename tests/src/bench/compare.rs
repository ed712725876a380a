//! The side-by-side run: for each pod count a baseline node and a vcnpath node are built
//! (independent labs, all alive at once) and verified; then each measurement is taken on
//! every node in turn before the next measurement starts, the order reversed every
//! round, so noise from the rest of the machine hits every setup and pod count alike.
//! Each figure is the median over the rounds.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use vcnpath_common::Reason;

use super::Setup;
use super::baseline;
use super::load::{self, Timing};
use super::node::BenchNode;

/// Pod addresses on the node, as the issue asks.
pub const POD_COUNTS: [usize; 4] = [1, 64, 512, 4096];

/// Where the pod's traffic goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dest {
    /// The VCN peer: no translation, must leave through the pod's own VNIC.
    Peer,
    /// The internet host: translated to the node's address, leaves the primary VNIC.
    Internet,
}

impl Dest {
    pub const ALL: [Self; 2] = [Self::Peer, Self::Internet];

    pub fn name(self) -> &'static str {
        match self {
            Self::Peer => "VCN peer",
            Self::Internet => "internet",
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Udp,
    Rr,
    Bulk,
}

/// One setup's figures for one pod count and destination.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Figures {
    /// Minimum-size UDP datagrams per second reaching the far host.
    pub udp_pps: f64,
    /// The best round's `udp_pps`: interference from the rest of the machine only ever
    /// slows a run down, so the best round is the closest to the datapath's capacity.
    pub udp_best_pps: f64,
    /// Datagrams per second the pod sent (the difference was dropped on the way).
    pub udp_sent_pps: f64,
    pub rr_p50_us: f64,
    pub rr_p99_us: f64,
    pub bulk_gbps: f64,
}

/// Both setups' medians for one pod count and destination.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    pub pods: usize,
    pub dest: Dest,
    pub baseline: Figures,
    pub vcnpath: Figures,
}

/// What was seen on each node after its runs, to show the datapaths did their job.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NodeCheck {
    pub pods: usize,
    pub setup: Setup,
    /// Packets dropped by the VCN router's source/destination check (must be 0).
    pub router_drops: u64,
    /// Baseline: the last pod rule walked (the measured pod's) and the conntrack count.
    pub detail: String,
}

/// The whole comparison.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Comparison {
    pub rounds: usize,
    pub timing: Timing,
    pub udp_payload_bytes: usize,
    pub rr_message_bytes: usize,
    pub rows: Vec<Row>,
    pub checks: Vec<NodeCheck>,
}

/// How much to measure.
#[derive(Clone, Debug)]
pub struct Options {
    pub pod_counts: Vec<usize>,
    pub rounds: usize,
    pub timing: Timing,
}

type Samples = BTreeMap<(usize, Dest, Setup), Vec<Figures>>;

pub fn run(options: &Options) -> Result<Comparison> {
    // Every node exists for the whole run, so the pod counts are interleaved too: the
    // "4096 pods within 5% of 1 pod" comparison sees the same noise on both sides.
    let mut nodes = Vec::new();
    for &n in &options.pod_counts {
        eprintln!("compare: building the baseline and vcnpath nodes with {n} pod addresses");
        for setup in [Setup::Baseline, Setup::Vcnpath] {
            crate::interrupt::check()?;
            let node = BenchNode::new(setup, n)?;
            node.verify()?;
            nodes.push(node);
        }
    }
    let mut samples: Samples = BTreeMap::new();
    for round in 0..options.rounds {
        eprintln!("compare: round {}/{}", round + 1, options.rounds);
        // Alternate the order, so neither setup always runs first (or right after the
        // other's heavier run).
        let order: Vec<&BenchNode> = if round % 2 == 0 {
            nodes.iter().collect()
        } else {
            nodes.iter().rev().collect()
        };
        for dest in Dest::ALL {
            let mut figures: BTreeMap<(usize, Setup), Figures> = BTreeMap::new();
            for kind in [Kind::Udp, Kind::Rr, Kind::Bulk] {
                for node in &order {
                    crate::interrupt::check()?;
                    let out = figures.entry((node.n, node.setup)).or_default();
                    measure(node, dest, kind, options.timing, out).with_context(|| {
                        format!(
                            "{node}: {kind:?} to the {}\n{}",
                            dest.name(),
                            node.agent_log()
                        )
                    })?;
                }
            }
            for ((n, setup), f) in figures {
                samples.entry((n, dest, setup)).or_default().push(f);
            }
        }
    }
    let checks = nodes.iter().map(check).collect::<Result<_>>()?;
    let rows = options
        .pod_counts
        .iter()
        .flat_map(|&n| Dest::ALL.map(|dest| (n, dest)))
        .map(|(n, dest)| Row {
            pods: n,
            dest,
            baseline: median(&samples[&(n, dest, Setup::Baseline)]),
            vcnpath: median(&samples[&(n, dest, Setup::Vcnpath)]),
        })
        .collect();
    Ok(Comparison {
        rounds: options.rounds,
        timing: options.timing,
        udp_payload_bytes: load::UDP_PAYLOAD,
        rr_message_bytes: load::RR_MESSAGE,
        rows,
        checks,
    })
}

fn measure(
    node: &BenchNode,
    dest: Dest,
    kind: Kind,
    timing: Timing,
    out: &mut Figures,
) -> Result<()> {
    let lab = node.lab();
    let (ns, ip) = match dest {
        Dest::Peer => (lab.peer(), lab.peer_ip()),
        Dest::Internet => (lab.inet(), lab.inet_ip()),
    };
    let pod = node.pod_ns();
    match kind {
        Kind::Udp => {
            let rate = load::udp_rate(pod, ns, SocketAddr::from((ip, 9000)), timing)?;
            out.udp_pps = rate.received_pps;
            out.udp_sent_pps = rate.sent_pps;
        }
        Kind::Rr => {
            let latency = load::tcp_rr(pod, ns, SocketAddr::from((ip, 9001)), timing)?;
            out.rr_p50_us = latency.p50_us;
            out.rr_p99_us = latency.p99_us;
        }
        Kind::Bulk => {
            out.bulk_gbps = load::tcp_bulk(pod, ns, SocketAddr::from((ip, 9002)), timing)?;
        }
    }
    Ok(())
}

fn check(node: &BenchNode) -> Result<NodeCheck> {
    let mut router_drops = 0;
    for vnic in 0..crate::lab::VNICS.len() {
        router_drops += node.lab().router_drops(vnic)?;
    }
    let detail = match node.counters()? {
        None => format!(
            "{} pod rules, last walked: `{}`; {} conntrack entries",
            baseline::pod_rules(node.lab().node())?,
            baseline::last_pod_rule(node.lab().node())?,
            baseline::conntrack_count(node.lab().node())?
        ),
        Some(c) => {
            let drops: u64 = c
                .totals()
                .filter(|(r, _)| r.is_drop())
                .map(|(_, n)| n)
                .sum();
            format!(
                "redirected {}, snat_new {}, snat_established {}, reverse_nat {}, dropped {drops}",
                c.get(Reason::RedirectOwner),
                c.get(Reason::SnatNew),
                c.get(Reason::SnatEstablished),
                c.get(Reason::ReverseNat)
            )
        }
    };
    Ok(NodeCheck {
        pods: node.n,
        setup: node.setup,
        router_drops,
        detail,
    })
}

fn median(samples: &[Figures]) -> Figures {
    let m = |f: fn(&Figures) -> f64| {
        let mut v: Vec<f64> = samples.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    Figures {
        udp_pps: m(|f| f.udp_pps),
        udp_best_pps: samples.iter().map(|f| f.udp_pps).fold(f64::NAN, f64::max),
        udp_sent_pps: m(|f| f.udp_sent_pps),
        rr_p50_us: m(|f| f.rr_p50_us),
        rr_p99_us: m(|f| f.rr_p99_us),
        bulk_gbps: m(|f| f.bulk_gbps),
    }
}
