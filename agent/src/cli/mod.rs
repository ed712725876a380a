//! The `vcnpath` subcommands. `main.rs` only parses arguments and calls into here.

pub mod checkpoint;
pub mod datapath;
pub mod inspect;
pub mod logging;
pub mod run;
pub mod status;

/// Records as host flows the connections `nf_nat` translated to `masq` on ports of the NAT
/// range before the datapath was attached (see `datapath::HostFlow`), read from the
/// kernel's connection tracking table. A table that cannot be read is a warning: such a
/// connection then stalls until the host sends on it.
pub(crate) async fn record_nf_nat_flows(
    handle: &crate::datapath::task::DatapathHandle,
    masq: std::net::Ipv4Addr,
    nat: std::ops::RangeInclusive<u16>,
) {
    use crate::host::conntrack;
    // The kernel answers a dump at once; a start never waits on it longer than this.
    const DUMP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
    let read = tokio::time::timeout(
        DUMP_TIMEOUT,
        tokio::task::spawn_blocking(move || conntrack::flows_to(masq, nat)),
    )
    .await;
    let tracked = match read {
        Ok(Ok(Ok(tracked))) => tracked,
        Ok(Ok(Err(error))) => {
            tracing::warn!(%error, "cannot read the connection tracking table: a connection nf_nat translated into the NAT range before the datapath started stalls until the host sends on it");
            return;
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "reading the connection tracking table failed");
            return;
        }
        Err(_) => {
            tracing::warn!(
                timeout_secs = DUMP_TIMEOUT.as_secs(),
                "the connection tracking table did not answer; starting without its nf_nat flows"
            );
            return;
        }
    };
    let flows: Vec<crate::datapath::HostFlow> = tracked
        .iter()
        .map(|t| crate::datapath::HostFlow {
            proto: t.proto,
            remote: t.remote,
            remote_port: t.remote_port,
            local_port: t.local_port,
            established: t.handshake_done(),
        })
        .collect();
    match handle.claim_host_flows(masq, flows).await {
        Ok(0) => {}
        Ok(recorded) => tracing::info!(
            recorded,
            tracked = tracked.len(),
            "host flows nf_nat opened in the NAT range before the datapath recorded"
        ),
        Err(error) => tracing::warn!(%error, "recording the host's nf_nat flows failed"),
    }
}
