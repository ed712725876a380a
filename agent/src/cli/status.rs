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
        if let Some(line) = blocks_line(v) {
            println!("{line}");
        }
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
    for line in oci_lines(&status["oci"]) {
        println!("{line}");
    }
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

/// What holds the pool back at OCI, one paragraph per failing piece of work: the operation and
/// its answer, when it is tried next, and what to do; then what the IAM policy lacks.
fn oci_lines(oci: &Value) -> Vec<String> {
    let s = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    let mut out = Vec::new();
    let troubles = oci["trouble"].as_array().map_or(&[][..], Vec::as_slice);
    if !troubles.is_empty() {
        out.push(
            "
OCI calls failing:"
                .to_owned(),
        );
    }
    for t in troubles {
        let answer = match (t["status"].as_u64(), t["code"].as_str()) {
            (Some(status), Some(code)) => format!("{status} {code}"),
            _ => "no answer".to_owned(),
        };
        out.push(format!(
            "  {} for {}: {answer} ({}), {} in a row, next try in {:.1} s",
            s(&t["operation"]),
            s(&t["target"]),
            s(&t["class"]),
            t["failures"],
            Duration::from_millis(t["retry_in_ms"].as_u64().unwrap_or(0)).as_secs_f64()
        ));
        let needs: Vec<String> = t["needs"].as_array().into_iter().flatten().map(s).collect();
        if !needs.is_empty() {
            out.push(format!("    the operation needs: {}", needs.join(", ")));
        }
        out.push(format!("    to do: {}", s(&t["remedy"])));
    }
    let missing: Vec<String> = oci["missing_permissions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(s)
        .collect();
    if !missing.is_empty() {
        out.push(format!(
            "
IAM: the node's policy most likely lacks: {} (docs/oci.md lists the policy)",
            missing.join(", ")
        ));
    }
    out
}

/// A VNIC's IP CIDR blocks, under its row: none for a VNIC of single addresses only.
fn blocks_line(vnic: &Value) -> Option<String> {
    let blocks: Vec<&str> = vnic["blocks"]
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    if blocks.is_empty() {
        return None;
    }
    let objects = vnic["objects"].as_u64().unwrap_or(0);
    let singles = objects.saturating_sub(blocks.len() as u64);
    Some(format!(
        "    blocks: {}{}; {objects} private-IP objects at OCI",
        blocks.join(" "),
        if singles > 0 {
            format!(" and {singles} single addresses")
        } else {
            String::new()
        }
    ))
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{blocks_line, oci_lines};

    #[test]
    fn a_vnics_blocks_are_listed_with_the_objects_oci_counts() {
        let vnic = json!({"blocks": ["10.0.1.16/28", "10.0.1.32/28"], "objects": 4});
        assert_eq!(
            blocks_line(&vnic).as_deref(),
            Some(
                "    blocks: 10.0.1.16/28 10.0.1.32/28 and 2 single addresses; 4 private-IP objects at OCI"
            )
        );
        assert_eq!(blocks_line(&json!({"blocks": [], "objects": 3})), None);
    }

    #[test]
    fn oci_trouble_reads_as_operation_answer_next_try_and_what_to_do() {
        let oci = json!({
            "trouble": [{
                "operation": "AttachVnic", "target": "ocid1.subnet.a", "class": "permission",
                "status": 404, "code": "NotAuthorizedOrNotFound", "failures": 2,
                "retry_in_ms": 299_500, "needs": ["manage instances", "use subnets"],
                "remedy": "grant it",
            }],
            "missing_permissions": ["manage instances"],
        });
        let text = oci_lines(&oci).join("\n");
        for wanted in [
            "AttachVnic for ocid1.subnet.a: 404 NotAuthorizedOrNotFound (permission), 2 in a row, next try in 299.5 s",
            "needs: manage instances, use subnets",
            "to do: grant it",
            "lacks: manage instances",
        ] {
            assert!(text.contains(wanted), "{wanted:?} in:\n{text}");
        }
        assert!(oci_lines(&json!({"trouble": [], "missing_permissions": []})).is_empty());
    }
}
