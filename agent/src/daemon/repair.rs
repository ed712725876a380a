//! The periodic repair pass: what vcnpath attached or pinned and someone removed (a TC
//! filter deleted by hand, a pin deleted, a pod veth left on a replaced program) is put
//! back, each repair logged with the interface or pin it concerned and counted.

use std::sync::atomic::{AtomicU64, Ordering};

use tracing::warn;

use crate::{
    datapath::{DatapathError, Observed, RepairReport, task::DatapathHandle},
    host::{
        netlink::{HostError, Netlink},
        tc,
    },
};

/// Repairs so far, for `/metrics`.
#[derive(Debug, Default)]
pub struct RepairCounters {
    /// Interfaces whose filters were put back.
    pub filters: AtomicU64,
    /// Pins put back.
    pub pins: AtomicU64,
}

/// Why a repair pass could not finish.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error("reading the interfaces' TC filters: {0}")]
    Observe(#[from] HostError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

/// Observes the managed VNICs `vnics` (ifindices) and every pod veth, then has the
/// datapath put back what is missing. Returns what was observed (the interfaces' current
/// names) with the report.
pub async fn pass(
    datapath: &DatapathHandle,
    netlink: &Netlink,
    vnics: &[u32],
    counters: &RepairCounters,
) -> Result<(Vec<Observed>, RepairReport), RepairError> {
    let observed = tc::observe(netlink, vnics).await?;
    let report = datapath.repair(observed.clone()).await?;
    for interface in &report.interfaces {
        warn!(%interface, "vcnpath's TC filter was missing or replaced on this interface; attached again");
    }
    for pin in &report.pins {
        warn!(%pin, "a vcnpath pin was missing; pinned again");
    }
    counters
        .filters
        .fetch_add(report.interfaces.len() as u64, Ordering::Relaxed);
    counters
        .pins
        .fetch_add(report.pins.len() as u64, Ordering::Relaxed);
    Ok((observed, report))
}
