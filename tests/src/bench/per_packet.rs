//! `cargo xtask bench datapath`: kernel-timed cost per packet of each datapath path,
//! measured with `BPF_PROG_TEST_RUN` (`repeat` runs in the kernel, which reports the mean).
//!
//! The kernel feeds every repeat the buffer the previous repeat left behind, so each case
//! is built to take the same path on every repeat, and the per-reason counters are read
//! around every run to prove it. The paths are measured in turn, a run of each per round.

use std::net::Ipv4Addr;

use crate::{
    datapath_fixture::{Fixture, MASQ, PEER, POD0, POD1, REMOTE, state, tcp_key as key, time_ns},
    packet::{Spec, build},
};
use vcnpath_common::{NAT_DIR_EGRESS, NAT_DIR_INGRESS, NAT_F_INBOUND, NatEntry, Reason};

pub const REPEAT: u32 = 1_000_000;

/// Each case is measured this many times; the median is reported (this VM's noise is
/// tens of ns between runs), with the fastest run beside it.
pub const RUNS: u32 = 5;

/// One path's cost.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    pub name: &'static str,
    /// Median over the runs of the kernel-timed mean, ns per packet.
    pub ns: f64,
    /// The fastest run.
    pub min_ns: f64,
    #[serde(serialize_with = "reason_name")]
    pub reason: Reason,
    /// Share of the repeats the counters saw on the measured path (should be 1).
    pub share: f64,
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's serialize_with passes a reference"
)]
fn reason_name<S: serde::Serializer>(reason: &Reason, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(reason.name())
}

/// The row of a path from its runs' means and how many repeats the counter of `reason`
/// saw over all of them.
fn row(name: &'static str, reason: Reason, mut runs: Vec<f64>, on_path: u64) -> Row {
    runs.sort_by(f64::total_cmp);
    let (ns, min_ns) = (runs[runs.len() / 2], runs[0]);
    // Counts are at most RUNS * REPEAT (5e6): exact in an f64.
    let share = f64::from(u32::try_from(on_path).unwrap_or(u32::MAX))
        / (f64::from(REPEAT) * f64::from(RUNS));
    Row {
        name,
        ns,
        min_ns,
        reason,
        share,
    }
}

/// One path of the `datapath` benchmark: the frame, the program it goes through, and the
/// reason its counter records when a repeat took the path.
pub struct Case<'f> {
    fx: &'f Fixture,
    ingress: bool,
    frame: Vec<u8>,
    reason: Reason,
    name: &'static str,
}

impl<'f> Case<'f> {
    pub fn egress(fx: &'f Fixture, spec: &Spec, reason: Reason, name: &'static str) -> Self {
        Self {
            fx,
            ingress: false,
            frame: build(spec),
            reason,
            name,
        }
    }
}

/// Measures every case `RUNS` times, one run of each in turn (the order reversed every
/// round, as the side-by-side benchmark does), so a noisy stretch of the machine lands on
/// every path alike instead of on whichever path was being measured. Pins the calling
/// thread to the last CPU ([`super::pin_to_last_cpu`]).
pub fn interleaved(cases: &[Case<'_>]) -> anyhow::Result<Vec<Row>> {
    super::pin_to_last_cpu();
    let mut runs = vec![Vec::new(); cases.len()];
    let mut on_path = vec![0; cases.len()];
    for round in 0..RUNS {
        let order: Vec<usize> = if round % 2 == 0 {
            (0..cases.len()).collect()
        } else {
            (0..cases.len()).rev().collect()
        };
        for i in order {
            crate::interrupt::check()?;
            let case = &cases[i];
            let datapath = &case.fx.datapath;
            let program = if case.ingress {
                datapath.ingress()
            } else {
                datapath.egress()
            };
            let before = case.fx.counters();
            runs[i].push(time_ns(program, &case.frame, REPEAT).1);
            on_path[i] += before.delta(&case.fx.counters()).get(case.reason);
        }
    }
    Ok(cases
        .iter()
        .zip(runs)
        .zip(on_path)
        .map(|((case, runs), seen)| row(case.name, case.reason, runs, seen))
        .collect())
}

/// A NAT entry translating to `addr:port`, last seen at boot.
pub fn entry(addr: Ipv4Addr, port: u16) -> NatEntry {
    NatEntry {
        last_seen_ns: 0,
        addr: addr.octets(),
        port,
        ..Default::default()
    }
}

/// Two NAT entries of TCP flows with `REMOTE:443` that translate `a` into `b` and back, so
/// the packet each repeat leaves behind is the next repeat's translated flow. The address
/// and port are the pod's (egress) or the masquerade side's (ingress).
pub fn translating_pair(
    fx: &mut Fixture,
    dir: u8,
    a: (Ipv4Addr, u16),
    b: (Ipv4Addr, u16),
) -> anyhow::Result<()> {
    for ((ip, port), (to_ip, to_port)) in [(a, b), (b, a)] {
        let k = if dir == NAT_DIR_EGRESS {
            key(dir, ip, port, REMOTE, 443)
        } else {
            key(dir, REMOTE, 443, ip, port)
        };
        fx.datapath
            .maps
            .flow_tables()
            .nat
            .insert(k, entry(to_ip, to_port), 0)?;
    }
    Ok(())
}

/// The datapaths of the new-flow rows: the masquerade address is itself a pod address, so
/// each translated packet is the next repeat's new flow. Its original port is always taken
/// (by the previous repeat), so this is the slower "collision, pick another port" creation,
/// with a small NAT table that LRU-evicts: a conservative figure. The others are the same
/// for pods a host outside the VCN has reached, with a record in `inbound` (not on the
/// measured flows' tuples) and the marks records set (the ingress program's; here the
/// agent's as at start, since the masquerade address is never recorded as a pod): on one
/// port, so a new flow looks `inbound` up when its port falls in that port's class (one in
/// 16), and on a port of every class, so every new flow does.
fn new_flow_fixtures() -> anyhow::Result<[Fixture; 3]> {
    let mut st = state(1024, 65535);
    if let Some(config) = st.config.as_mut() {
        config.masq_ip = POD0.octets();
    }
    let reached_on = |tag, ports: &[u16]| -> anyhow::Result<Fixture> {
        let mut fx = Fixture::with_nat_capacity(tag, 1024, 65535, 4096);
        fx.datapath.maps.sync(&st)?;
        let maps = &mut fx.datapath.maps;
        for pod in [POD0, POD1] {
            for &port in ports {
                let record = NatEntry {
                    flags: NAT_F_INBOUND,
                    ..entry(pod, port)
                };
                maps.flow_tables().inbound.insert(
                    key(NAT_DIR_EGRESS, pod, port, REMOTE, 50000),
                    record,
                    0,
                )?;
            }
        }
        let marked = maps.mark_inbound_pods()?;
        anyhow::ensure!(
            ports.is_empty() || marked == 2,
            "both pods of {tag} must be marked"
        );
        Ok(fx)
    };
    let every_class: Vec<u16> = (8080..8096).collect();
    Ok([
        reached_on("bench-new", &[])?,
        reached_on("bench-reached", &[8080])?,
        reached_on("bench-reached-all", &every_class)?,
    ])
}

/// Every path of the `datapath` benchmark, on five datapaths loaded side by side: the
/// packet tests' state (three pod endpoints), the same with 4096 pod endpoints, and the
/// three of the new-flow rows ([`new_flow_fixtures`]).
pub fn datapath() -> anyhow::Result<Vec<Row>> {
    let mut fx = Fixture::new("bench", 1024, 65535);
    // Established SNAT: two mappings that translate into each other (POD0:1000 <->
    // POD1:2000), so every repeat is an established translation with real rewrites. The
    // port changes too: the costlier case (two L4 checksum updates), the one the target
    // is checked against.
    translating_pair(&mut fx, NAT_DIR_EGRESS, (POD0, 1000), (POD1, 2000))?;
    // The common case: the flow kept its original port (the translation rewrites only
    // the address, so one L4 checksum update instead of two).
    translating_pair(&mut fx, NAT_DIR_EGRESS, (POD0, 5000), (POD1, 5000))?;
    // Reverse translation: replies to MASQ:3000 and MASQ:4000 map onto each other.
    translating_pair(&mut fx, NAT_DIR_INGRESS, (MASQ, 3000), (MASQ, 4000))?;

    // The same redirect and established translation with 4096 pod addresses in
    // `endpoints` instead of 3: the lookup is a hash, so the cost must not move.
    let mut many = Fixture::new("bench-4096", 1024, 65535);
    let mut st = state(1024, 65535);
    let pod = st.endpoints[&POD1];
    st.endpoints.extend(
        crate::bench::node::filler_ips(4096 - 2)
            .into_iter()
            .map(|ip| (ip, pod)),
    );
    many.datapath.maps.sync(&st)?;
    translating_pair(&mut many, NAT_DIR_EGRESS, (POD0, 1000), (POD1, 2000))?;

    let [fresh, reached, reached_all] = new_flow_fixtures()?;

    let outside = Ipv4Addr::new(172, 16, 0, 5);
    let cases = [
        Case::egress(
            &fx,
            &Spec::tcp(outside, 40000, REMOTE, 443),
            Reason::PassNotEndpoint,
            "non-endpoint pass-through",
        ),
        // The host's own packet from the masquerade address on a port of the NAT range:
        // recorded once, then looked up and refreshed (see `hostflow`).
        Case::egress(
            &fx,
            &Spec::tcp(MASQ, 61500, REMOTE, 443),
            Reason::PassHostFlow,
            "host flow on a NAT port",
        ),
        Case::egress(
            &fx,
            &Spec::tcp(POD0, 40000, PEER, 443),
            Reason::PassVcn,
            "VCN-internal pass",
        ),
        Case::egress(
            &fx,
            &Spec::tcp(POD1, 40000, PEER, 443),
            Reason::RedirectOwner,
            "egress redirect to owning VNIC",
        ),
        Case::egress(
            &fx,
            &Spec::tcp(POD0, 1000, REMOTE, 443),
            Reason::SnatEstablished,
            "established-flow SNAT",
        ),
        Case::egress(
            &fx,
            &Spec::tcp(POD0, 5000, REMOTE, 443),
            Reason::SnatEstablished,
            "established-flow SNAT, original port kept",
        ),
        Case {
            ingress: true,
            ..Case::egress(
                &fx,
                &Spec::tcp(REMOTE, 443, MASQ, 3000),
                Reason::ReverseNat,
                "reverse translation",
            )
        },
        Case::egress(
            &many,
            &Spec::tcp(POD1, 40000, PEER, 443),
            Reason::RedirectOwner,
            "egress redirect, 4096 pod endpoints",
        ),
        Case::egress(
            &many,
            &Spec::tcp(POD0, 1000, REMOTE, 443),
            Reason::SnatEstablished,
            "established-flow SNAT, 4096 pod endpoints",
        ),
        Case::egress(
            &fresh,
            &Spec::tcp(POD1, 40000, REMOTE, 443),
            Reason::SnatNew,
            "new-flow SNAT (port collision, LRU full)",
        ),
        // How a pod's TCP connection starts: a SYN, which cannot answer a flow opened from
        // outside, so the `inbound` table is not looked up.
        Case::egress(
            &fresh,
            &Spec::tcp(POD1, 40000, REMOTE, 443).with_tcp_flags(0x02),
            Reason::SnatNew,
            "new-flow SNAT, SYN (collision, LRU full)",
        ),
        Case::egress(
            &reached,
            &Spec::tcp(POD1, 40000, REMOTE, 443),
            Reason::SnatNew,
            "new-flow SNAT, pod reached from outside",
        ),
        Case::egress(
            &reached_all,
            &Spec::tcp(POD1, 40000, REMOTE, 443),
            Reason::SnatNew,
            "new-flow SNAT, reached on every port class",
        ),
    ];
    interleaved(&cases)
}
