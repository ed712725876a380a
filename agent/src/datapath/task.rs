//! The single owner of the datapath maps. Everyone else holds a [`DatapathHandle`] and
//! sends intents; the task applies them one at a time, so map writes never interleave.

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info_span};

use super::{
    Counters, Datapath, DatapathError, DatapathState, GcReport, HostFlow, NatTimeouts, Observed,
    RepairReport, SyncReport,
};

enum Intent {
    Sync(
        Box<DatapathState>,
        oneshot::Sender<Result<SyncReport, DatapathError>>,
    ),
    Attach(String, oneshot::Sender<Result<(), DatapathError>>),
    Repair(
        Vec<Observed>,
        oneshot::Sender<Result<RepairReport, DatapathError>>,
    ),
    CollectNat(oneshot::Sender<Result<GcReport, DatapathError>>),
    Counters(oneshot::Sender<Result<Counters, DatapathError>>),
    NatEntries(oneshot::Sender<usize>),
    ClaimHostFlows(
        std::net::Ipv4Addr,
        Vec<HostFlow>,
        oneshot::Sender<Result<usize, DatapathError>>,
    ),
}

/// Sends intents to the datapath task.
#[derive(Clone)]
pub struct DatapathHandle {
    tx: mpsc::Sender<Intent>,
}

/// Starts the owner task on a blocking thread (map operations are syscalls).
pub fn spawn(
    mut datapath: Datapath,
    timeouts: NatTimeouts,
) -> (DatapathHandle, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Intent>(64);
    let task = tokio::task::spawn_blocking(move || {
        while let Some(intent) = rx.blocking_recv() {
            match intent {
                Intent::Sync(state, reply) => {
                    let _span = info_span!("datapath_sync").entered();
                    let result = datapath.sync(&state);
                    if let Ok(report) = &result {
                        debug!(?report, "maps synced");
                    }
                    let _ = reply.send(result);
                }
                Intent::Attach(interface, reply) => {
                    let _ = reply.send(datapath.attach(&interface));
                }
                Intent::Repair(observed, reply) => {
                    let _span = info_span!("datapath_repair").entered();
                    let _ = reply.send(datapath.repair(&observed));
                }
                Intent::CollectNat(reply) => {
                    let _ = reply.send(datapath.maps.collect_nat(&timeouts));
                }
                Intent::Counters(reply) => {
                    let _ = reply.send(Counters::read(&datapath.maps));
                }
                Intent::NatEntries(reply) => {
                    let _ = reply.send(datapath.maps.nat_len());
                }
                Intent::ClaimHostFlows(masq, flows, reply) => {
                    let _ = reply.send(datapath.maps.claim_host_flows(masq, &flows));
                }
            }
        }
    });
    (DatapathHandle { tx }, task)
}

impl DatapathHandle {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Intent,
    ) -> Result<T, DatapathError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| DatapathError::TaskGone)?;
        answer.await.map_err(|_| DatapathError::TaskGone)
    }

    /// Makes the maps equal to `state` (diff-based).
    pub async fn sync(&self, state: DatapathState) -> Result<SyncReport, DatapathError> {
        self.ask(|r| Intent::Sync(Box::new(state), r)).await?
    }

    /// Attaches the programs to an interface.
    pub async fn attach(&self, interface: &str) -> Result<(), DatapathError> {
        self.ask(|r| Intent::Attach(interface.to_owned(), r))
            .await?
    }

    /// Puts back missing pins and the filters `observed` shows missing or foreign.
    pub async fn repair(&self, observed: Vec<Observed>) -> Result<RepairReport, DatapathError> {
        self.ask(|r| Intent::Repair(observed, r)).await?
    }

    /// Runs one NAT garbage collection.
    pub async fn collect_nat(&self) -> Result<GcReport, DatapathError> {
        self.ask(Intent::CollectNat).await?
    }

    /// Reads the per-reason counters.
    pub async fn counters(&self) -> Result<Counters, DatapathError> {
        self.ask(Intent::Counters).await?
    }

    /// Records the host's flows from before the datapath (see
    /// [`super::DatapathMaps::claim_host_flows`]).
    pub async fn claim_host_flows(
        &self,
        masq: std::net::Ipv4Addr,
        flows: Vec<HostFlow>,
    ) -> Result<usize, DatapathError> {
        self.ask(|r| Intent::ClaimHostFlows(masq, flows, r)).await?
    }

    /// Number of NAT entries in use.
    pub async fn nat_entries(&self) -> Result<usize, DatapathError> {
        self.ask(Intent::NatEntries).await
    }
}
