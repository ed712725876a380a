//! `vcnpath status` and `vcnpath max-pods`.

use std::{path::Path, time::Duration};

use anyhow::Context as _;
use serde_json::Value;

use crate::{api::Client, oci::ImdsClient};

/// Prints the node's VNICs, pool, pods and datapath counters from the running agent.
pub async fn status(socket: &Path, json: bool) -> anyhow::Result<()> {
    let status = Client::new(socket, Duration::from_secs(5)).status().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    let s = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    println!("ready: {}", status["ready"]);
    for problem in status["not_ready"].as_array().into_iter().flatten() {
        println!("  not ready: {}", s(problem));
    }
    println!("\nVNICs:");
    println!(
        "  {:<9} {:<8} {:<17} {:<15} {:<18} {:>5} {:>8} {:>8}",
        "vnic", "iface", "mac", "primary ip", "subnet", "free", "assigned", "cooldown"
    );
    for v in status["vnics"].as_array().into_iter().flatten() {
        println!(
            "  {:<9} {:<8} {:<17} {:<15} {:<18} {:>5} {:>8} {:>8}{}",
            if v["is_primary"] == true {
                "primary"
            } else {
                "secondary"
            },
            s(&v["interface"]),
            s(&v["mac"]),
            s(&v["primary_ip"]),
            s(&v["subnet"]),
            s(&v["free"]),
            s(&v["assigned"]),
            s(&v["cooldown"]),
            match (v["full"] == true, v["suspect"] == true, v["link"] == "lost") {
                (_, _, true) => "  interface lost on the host; serves no new pod until it is back",
                (_, true, false) =>
                    "  suspect: OCI answered 404 or the interface vanished; serves no new pod until the next reconcile",
                (true, false, false) => "  full",
                (false, false, false) => "",
            }
        );
    }
    println!(
        "\npool: {} of {} addresses in use{}",
        status["pool"]["allocations"],
        status["pool"]["capacity"],
        if status["pool"]["reconciled"] == false {
            " (restored from the checkpoint; not reconciled with OCI yet)"
        } else {
            ""
        }
    );
    let sysctl_failures = status["sysctls"]["failures"].as_u64().unwrap_or(0);
    if sysctl_failures > 0 {
        println!(
            "\nIPv4 settings: {sysctl_failures} failures to keep rp_filter loose and forwarding on; last: {}",
            s(&status["sysctls"]["last_error"])
        );
    }
    println!("\npods:");
    for p in status["pods"].as_array().into_iter().flatten() {
        println!(
            "  {:<15} {:<6} {}/{}  ({})",
            s(&p["ip"]),
            s(&p["interface"]),
            s(&p["namespace"]),
            s(&p["name"]),
            s(&p["container_id"])
        );
    }
    println!(
        "\ndatapath: {} NAT entries",
        status["datapath"]["nat_entries"]
    );
    for (reason, n) in status["datapath"]["counters"]
        .as_object()
        .into_iter()
        .flatten()
    {
        if n.as_u64().unwrap_or(0) > 0 {
            println!("  {reason:<32} {n}");
        }
    }
    Ok(())
}

/// The pod capacity of this shape with the agent's configuration, for kubelet's
/// `--max-pods`, at most `cap`.
pub async fn max_pods_for(
    config: &crate::daemon::AgentConfig,
    cap: usize,
) -> anyhow::Result<usize> {
    let imds = ImdsClient::new(&config.oci.imds_url, crate::oci::transport::imds_client()?)?;
    let instance = imds
        .instance()
        .await
        .context("reading the shape from IMDS")?;
    let capacity = config.max_pods(instance.shape_config.max_vnic_attachments as usize);
    Ok(capacity.min(cap))
}
