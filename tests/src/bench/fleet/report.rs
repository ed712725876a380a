//! The fleet table and the goals checked against it.

use std::fmt::Write as _;

use super::{Fleet, FleetRun, ratio};

/// One line per run, for the progress output.
pub fn run_line(r: &FleetRun) -> String {
    format!(
        "fleet: ipam.mode = {:?}: {}/{} nodes ready{}, {} calls, {} answered 429",
        r.mode,
        r.converged,
        r.nodes,
        r.all_ready_secs
            .map(|s| format!(" in {s:.1} s"))
            .unwrap_or_default(),
        r.calls_total,
        r.throttled
    )
}

pub fn table(f: &Fleet) -> String {
    let o = &f.options;
    let mut out = format!(
        "fleet: {} nodes (real IPAM + OCI client each, instance principal) scaling 0 → {} pods at once \
         against one simulator; tenancy budget {} requests/s (burst {}), each node's client {}/s, start \
         jitter {} ms; every Core API call {} ms, CreatePrivateIp {} ms, attach → ATTACHED {} ms\n",
        o.nodes,
        o.pods,
        o.tenancy_per_second,
        o.tenancy_burst,
        f.node_per_second,
        f.start_jitter_ms,
        o.api_ms,
        o.api_ms + o.create_ip_ms,
        o.attach_ms
    );
    let mut row = |what: &str, figure: String| {
        let _ = writeln!(out, "{what:<52} {figure}");
    };
    for r in &f.runs {
        let mode = format!("ipam.mode = {:?}", r.mode);
        row(
            &format!(
                "{mode}: every node's {} pods hold addresses",
                r.pods_per_node
            ),
            r.all_ready_secs.map_or_else(
                || {
                    format!(
                        "not within {:.0} s: {}/{} nodes ready",
                        o.deadline.as_secs_f64(),
                        r.converged,
                        r.nodes
                    )
                },
                |s| format!("{s:.1} s ({}/{} nodes)", r.converged, r.nodes),
            ),
        );
        row(
            &format!("{mode}: per node, wait for its last pod"),
            format!(
                "p50 {:.1} s, p99 {:.1} s, max {:.1} s",
                r.node_ready.p50_ms / 1e3,
                r.node_ready.p99_ms / 1e3,
                r.node_ready.max_ms / 1e3
            ),
        );
        row(
            &format!("{mode}: per pod, wait for its address"),
            format!(
                "p50 {:.1} s, p99 {:.1} s",
                r.pod_wait.p50_ms / 1e3,
                r.pod_wait.p99_ms / 1e3
            ),
        );
        let each: Vec<String> = r.calls.iter().map(|(op, n)| format!("{op} {n}")).collect();
        row(
            &format!("{mode}: Core API calls"),
            format!("{} ({})", r.calls_total, each.join(", ")),
        );
        row(
            &format!("{mode}: answered 429"),
            format!(
                "{} ({:.1}% of calls; the simulator counted {})",
                r.throttled,
                r.throttled_fraction * 100.0,
                r.throttled_by_simulator
            ),
        );
        row(
            &format!("{mode}: authentication before the clock"),
            format!("{:.1} s", r.auth_secs),
        );
    }
    if let Some((ip, cidr)) = pair(f) {
        row(
            "cidr against ip: faster to full readiness / fewer calls",
            format!(
                "{} / {:.1}×",
                speedup_text(ip, cidr),
                ratio(ip.calls_total, cidr.calls_total.max(1))
            ),
        );
    }
    for line in goals(f) {
        let _ = writeln!(out, "{line}");
    }
    out
}

/// The ip-mode and cidr-mode runs, when both ran.
fn pair(f: &Fleet) -> Option<(&FleetRun, &FleetRun)> {
    let find = |mode: &str| f.runs.iter().find(|r| r.mode == mode);
    Some((find("ip")?, find("cidr")?))
}

/// How many times sooner the cidr fleet was ready: a lower bound when the ip fleet did
/// not converge before the deadline (its figure is then the deadline).
fn speedup(f: &Fleet, ip: &FleetRun, cidr: &FleetRun) -> Option<f64> {
    let cidr_secs = cidr.all_ready_secs?;
    let ip_secs = ip
        .all_ready_secs
        .unwrap_or(f.options.deadline.as_secs_f64());
    Some(ip_secs / cidr_secs)
}

fn speedup_text(ip: &FleetRun, cidr: &FleetRun) -> String {
    match (ip.all_ready_secs, cidr.all_ready_secs) {
        (Some(i), Some(c)) => format!("{:.1}×", i / c),
        (None, Some(_)) => "more than deadline / cidr time".to_owned(),
        _ => "cidr did not converge".to_owned(),
    }
}

/// The goals, each with the figure and met or missed.
pub fn goals(f: &Fleet) -> Vec<String> {
    let verdict = |met: bool| if met { "met" } else { "MISSED" };
    let mut out = Vec::new();
    for r in &f.runs {
        out.push(format!(
            "goal: ipam.mode = {:?}: every node converges: {}/{} nodes, {}",
            r.mode,
            r.converged,
            r.nodes,
            verdict(r.converged == r.nodes)
        ));
        out.push(format!(
            "goal: ipam.mode = {:?}: 429s a small fraction (≤ 5%) of calls: {:.1}%, {}",
            r.mode,
            r.throttled_fraction * 100.0,
            verdict(r.throttled_fraction <= 0.05)
        ));
    }
    if let Some((ip, cidr)) = pair(f) {
        let s = speedup(f, ip, cidr);
        let bound = if ip.all_ready_secs.is_none() {
            "at least "
        } else {
            ""
        };
        out.push(format!(
            "goal: cidr ≥ 5× faster to full readiness: {}, {}",
            s.map_or_else(
                || "cidr did not converge".to_owned(),
                |s| format!("{bound}{s:.1}×")
            ),
            verdict(s.is_some_and(|s| s >= 5.0))
        ));
    }
    out
}
