//! `cargo xtask bench nat`: the NAT table at scale. The table is pre-filled from
//! userspace (as many live flows would leave it), then the established-flow translation
//! is timed with `BPF_PROG_TEST_RUN` exactly as in the per-packet benchmark, the kernel's
//! memory for the table is read with bpftool, and the agent's collector
//! ([`DatapathMaps::collect_nat`]) is timed on a full table of expired flows.
//!
//! The timed lookup hits the same key on every repeat, so it is cache-warm: it shows
//! what table size does to the hash walk, not the cache misses of a busy node.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use vcnpath::datapath::{DatapathMaps, NatTimeouts};
use vcnpath_common::{NAT_DIR_EGRESS, NAT_DIR_INGRESS, NAT_MAX, NatEntry, NatKey, Reason};

use super::per_packet::{Case, entry, interleaved, translating_pair};
use super::pin_to_last_cpu;
use crate::datapath_fixture::tcp_key as key;
use crate::datapath_fixture::{Fixture, MASQ, POD0, POD1, REMOTE};
use crate::lab::process;
use crate::packet::Spec;

/// Live entries measured: 1k, 64k and 256k (the agent's default capacity, `NAT_MAX`).
pub const LIVE: [usize; 3] = [1 << 10, 1 << 16, NAT_MAX as usize];

const IPPROTO_UDP: u8 = 17;
const PORTS_PER_REMOTE: u32 = 64_000;

/// The established-flow cost and the table's memory at one fill level.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ScaleRow {
    /// Entries asked for (two per flow).
    pub target_entries: usize,
    /// Entries in the table when measured (the LRU may evict a few near capacity).
    pub live_entries: usize,
    pub established_ns: f64,
    pub established_min_ns: f64,
    /// Share of the repeats counted as established translations (should be 1).
    pub share: f64,
    /// The kernel's memory for the `nat` map (bpftool's `bytes_memlock`).
    pub map_bytes: u64,
}

/// One collection of a table full of expired flows.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GcRow {
    pub entries: usize,
    pub removed: usize,
    pub seconds: f64,
    /// Peak resident memory the collection added to the agent process.
    pub peak_extra_rss_bytes: u64,
    /// Entries left afterwards (should be 0).
    pub left: usize,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct NatScale {
    pub capacity: u32,
    pub rows: Vec<ScaleRow>,
    pub gc: GcRow,
}

pub fn run() -> Result<NatScale> {
    // The LRU keeps free entries on per-CPU lists: filling from one CPU lets the table
    // reach its capacity before anything is evicted. The CPU the timing runs on, too.
    pin_to_last_cpu();
    let mut tables = Vec::new();
    for target in LIVE {
        eprintln!("nat: {target} live entries");
        tables.push(filled(target)?);
    }
    // The fill levels are timed in turn, like the per-packet paths, so the machine's
    // noise lands on all of them alike.
    let cases: Vec<Case<'_>> = tables
        .iter()
        .map(|(fx, _)| {
            Case::egress(
                fx,
                &Spec::tcp(POD0, 1000, REMOTE, 443),
                Reason::SnatEstablished,
                "established-flow SNAT",
            )
        })
        .collect();
    let timed = interleaved(&cases)?;
    let rows = LIVE
        .iter()
        .zip(&tables)
        .zip(timed)
        .map(|((&target, (fx, live_entries)), row)| {
            Ok(ScaleRow {
                target_entries: target,
                live_entries: *live_entries,
                established_ns: row.ns,
                established_min_ns: row.min_ns,
                share: row.share,
                map_bytes: map_memlock(&fx.pin_dir().join(vcnpath_common::MAP_NAT))?,
            })
        })
        .collect::<Result<_>>()?;
    drop(cases);
    drop(tables);
    eprintln!("nat: collecting {NAT_MAX} expired entries");
    Ok(NatScale {
        capacity: NAT_MAX,
        rows,
        gc: gc_row(NAT_MAX as usize)?,
    })
}

/// A datapath whose NAT table holds `target` live entries, among them the two mappings
/// the per-packet benchmark times (inserted last, so the LRU never evicts them); with
/// the number of entries it holds.
fn filled(target: usize) -> Result<(Fixture, usize)> {
    let mut fx = Fixture::with_nat_capacity(&format!("nat{target}"), 1024, 65535, NAT_MAX);
    fill(&mut fx.datapath.maps, target - 2, 6, 0)?;
    translating_pair(&mut fx, NAT_DIR_EGRESS, (POD0, 1000), (POD1, 2000))?;
    let live = fx.datapath.maps.nat_len();
    Ok((fx, live))
}

fn gc_row(target: usize) -> Result<GcRow> {
    let mut fx = Fixture::with_nat_capacity("natgc", 1024, 65535, NAT_MAX);
    // UDP flows last seen at boot: every one is past the 60 s UDP timeout.
    fill(&mut fx.datapath.maps, target, IPPROTO_UDP, 0)?;
    let entries = fx.datapath.maps.nat_len();
    reset_peak_rss()?;
    let rss_before = status_kib("VmRSS:")?;
    let start = Instant::now();
    let report = fx
        .datapath
        .maps
        .collect_nat(&NatTimeouts::default())
        .context("collecting the NAT table")?;
    let seconds = start.elapsed().as_secs_f64();
    let peak = status_kib("VmHWM:")?;
    Ok(GcRow {
        entries,
        removed: report.removed,
        seconds,
        peak_extra_rss_bytes: peak.saturating_sub(rss_before) * 1024,
        left: fx.datapath.maps.nat_len(),
    })
}

/// Inserts `entries` NAT entries as whole flows (an egress entry and its reply entry),
/// each keeping its own port, towards remotes outside the measured 203.0.113.0/24.
fn fill(maps: &mut DatapathMaps, entries: usize, proto: u8, last_seen_ns: u64) -> Result<()> {
    let flows = u32::try_from(entries / 2).context("flow count")?;
    let pod = Ipv4Addr::new(10, 0, 1, 30);
    for i in 0..flows {
        let remote = Ipv4Addr::from(u32::from_be_bytes([198, 18, 0, 0]) + i / PORTS_PER_REMOTE);
        let port = 1024 + u16::try_from(i % PORTS_PER_REMOTE).expect("port below 65024");
        let out = NatKey {
            proto,
            ..key(NAT_DIR_EGRESS, pod, port, remote, 443)
        };
        let back = NatKey {
            proto,
            ..key(NAT_DIR_INGRESS, remote, 443, MASQ, port)
        };
        let stamp = |addr: Ipv4Addr| NatEntry {
            last_seen_ns,
            ..entry(addr, port)
        };
        maps.flow_tables()
            .nat
            .insert(out, stamp(MASQ), 0)
            .context("filling the NAT table")?;
        maps.flow_tables()
            .nat
            .insert(back, stamp(pod), 0)
            .context("filling the NAT table")?;
    }
    Ok(())
}

/// `bytes_memlock` of a pinned map, as `bpftool map show` reports it.
fn map_memlock(pin: &Path) -> Result<u64> {
    let text = process::run(
        Command::new("bpftool")
            .args(["--json", "map", "show", "pinned"])
            .arg(pin),
    )?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("bpftool output {text:?}"))?;
    match json
        .get("bytes_memlock")
        .and_then(serde_json::Value::as_u64)
    {
        Some(bytes) => Ok(bytes),
        None => bail!("no bytes_memlock for {} in {text}", pin.display()),
    }
}

/// Resets this process's peak RSS (`VmHWM`) to its current RSS.
fn reset_peak_rss() -> Result<()> {
    std::fs::write("/proc/self/clear_refs", "5")
        .context("resetting VmHWM via /proc/self/clear_refs")
}

fn status_kib(field: &str) -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} in /proc/self/status"))?;
    let kib = line.split_whitespace().nth(1).unwrap_or_default();
    let value = kib
        .parse()
        .with_context(|| format!("{field} value {kib:?}"))?;
    ensure!(line.ends_with("kB"), "{field} not in kB: {line}");
    Ok(value)
}
