//! `cargo xtask bench datapath`: kernel-timed cost per packet of each datapath path,
//! measured with `BPF_PROG_TEST_RUN` (`repeat` runs in the kernel, which reports the mean).
//!
//! The kernel feeds every repeat the buffer the previous repeat left behind, so each case
//! is built to take the same path on every repeat, and the per-reason counters are read
//! afterwards to prove it.

use std::net::Ipv4Addr;

use crate::{
    datapath_fixture::{Fixture, MASQ, PEER, POD0, POD1, REMOTE, state, time_ns},
    packet::{Spec, build},
};
use aya::programs::SchedClassifier;
use vcnpath_common::{NAT_DIR_EGRESS, NAT_DIR_INGRESS, NatEntry, NatKey, Reason};

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

/// Times `frame` through `program` (`RUNS` runs of `REPEAT`) and checks with the
/// counters that the repeats took the path of `reason`.
pub fn measure(
    fx: &Fixture,
    program: &SchedClassifier,
    frame: &[u8],
    reason: Reason,
    name: &'static str,
) -> anyhow::Result<Row> {
    crate::interrupt::check()?;
    let before = fx.counters();
    let mut runs: Vec<f64> = (0..RUNS)
        .map(|_| time_ns(program, frame, REPEAT).1)
        .collect();
    runs.sort_by(f64::total_cmp);
    let (ns, min_ns) = (runs[runs.len() / 2], runs[0]);
    let delta = before.delta(&fx.counters());
    // Counts are at most RUNS * REPEAT (5e6): exact in an f64.
    let share = f64::from(u32::try_from(delta.get(reason)).unwrap_or(u32::MAX))
        / (f64::from(REPEAT) * f64::from(RUNS));
    Ok(Row {
        name,
        ns,
        min_ns,
        reason,
        share,
    })
}

/// A TCP NAT key.
pub fn key(dir: u8, src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> NatKey {
    NatKey {
        src: src.octets(),
        dst: dst.octets(),
        sport,
        dport,
        proto: 6,
        dir,
        pad: [0; 2],
    }
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
fn translating_pair(
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
        fx.datapath.maps.nat.insert(k, entry(to_ip, to_port), 0)?;
    }
    Ok(())
}

/// Every path of the `datapath` benchmark.
pub fn datapath() -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let mut fx = Fixture::new("bench", 1024, 65535);
    rows.push(measure(
        &fx,
        fx.datapath.egress(),
        &build(&Spec::tcp(Ipv4Addr::new(172, 16, 0, 5), 40000, REMOTE, 443)),
        Reason::PassNotEndpoint,
        "non-endpoint pass-through",
    )?);
    rows.push(measure(
        &fx,
        fx.datapath.egress(),
        &build(&Spec::tcp(POD0, 40000, PEER, 443)),
        Reason::PassVcn,
        "VCN-internal pass",
    )?);
    rows.push(measure(
        &fx,
        fx.datapath.egress(),
        &build(&Spec::tcp(POD1, 40000, PEER, 443)),
        Reason::RedirectOwner,
        "egress redirect to owning VNIC",
    )?);

    // Established SNAT: two mappings that translate into each other (POD0:1000 <->
    // POD1:2000), so every repeat is an established translation with real rewrites. The
    // port changes too: the costlier case (two L4 checksum updates), the one the target
    // is checked against.
    translating_pair(&mut fx, NAT_DIR_EGRESS, (POD0, 1000), (POD1, 2000))?;
    rows.push(measure(
        &fx,
        fx.datapath.egress(),
        &build(&Spec::tcp(POD0, 1000, REMOTE, 443)),
        Reason::SnatEstablished,
        "established-flow SNAT",
    )?);
    // The common case: the flow kept its original port (the translation rewrites only
    // the address, so one L4 checksum update instead of two).
    translating_pair(&mut fx, NAT_DIR_EGRESS, (POD0, 5000), (POD1, 5000))?;
    rows.push(measure(
        &fx,
        fx.datapath.egress(),
        &build(&Spec::tcp(POD0, 5000, REMOTE, 443)),
        Reason::SnatEstablished,
        "established-flow SNAT, original port kept",
    )?);
    // Reverse translation: replies to MASQ:3000 and MASQ:4000 map onto each other.
    translating_pair(&mut fx, NAT_DIR_INGRESS, (MASQ, 3000), (MASQ, 4000))?;
    rows.push(measure(
        &fx,
        fx.datapath.ingress(),
        &build(&Spec::tcp(REMOTE, 443, MASQ, 3000)),
        Reason::ReverseNat,
        "reverse translation",
    )?);

    // The same redirect and established translation with 4096 pod addresses in
    // `endpoints` instead of 3: the lookup is a hash, so the cost must not move.
    let mut st = state(1024, 65535);
    let pod = st.endpoints[&POD1];
    st.endpoints.extend(
        crate::bench::node::filler_ips(4096 - 2)
            .into_iter()
            .map(|ip| (ip, pod)),
    );
    fx.datapath.maps.sync(&st)?;
    rows.push(measure(
        &fx,
        fx.datapath.egress(),
        &build(&Spec::tcp(POD1, 40000, PEER, 443)),
        Reason::RedirectOwner,
        "egress redirect, 4096 pod endpoints",
    )?);
    rows.push(measure(
        &fx,
        fx.datapath.egress(),
        &build(&Spec::tcp(POD0, 1000, REMOTE, 443)),
        Reason::SnatEstablished,
        "established-flow SNAT, 4096 pod endpoints",
    )?);
    drop(fx);

    // New-flow SNAT: the masquerade address is itself a pod address, so each translated
    // packet is the next repeat's new flow. Its original port is always taken (by the
    // previous repeat), so this is the slower "collision, pick another port" creation,
    // with a small NAT table that LRU-evicts: a conservative figure.
    let mut fx = Fixture::with_nat_capacity("bench-new", 1024, 65535, 4096);
    let mut st = state(1024, 65535);
    st.config.as_mut().unwrap().masq_ip = POD0.octets();
    fx.datapath.maps.sync(&st)?;
    rows.push(measure(
        &fx,
        fx.datapath.egress(),
        &build(&Spec::tcp(POD1, 40000, REMOTE, 443)),
        Reason::SnatNew,
        "new-flow SNAT (port collision, LRU full)",
    )?);
    Ok(rows)
}
