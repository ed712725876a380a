//! The control-plane table and the targets checked against it.

use std::fmt::Write as _;

use super::{Control, PODS};

const MIB: f64 = 1024.0;

pub fn table(c: &Control) -> String {
    let mut out = format!(
        "control plane: real vcnpath run + vcnpath-cni against the simulator (every Core API call \
         {} ms, CreatePrivateIp {} ms, AttachVnic → ATTACHED {} ms)\n",
        c.api_ms, c.create_ip_ms, c.attach_ms
    );
    let mut row = |what: &str, figure: String| {
        let _ = writeln!(out, "{what:<58} {figure}");
    };
    row(
        "CNI ADD, warm pool (one at a time, whole plugin run)",
        format!(
            "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} ADDs)",
            c.add_warm.p50_ms, c.add_warm.p99_ms, c.add_warm.max_ms, c.add_warm.count
        ),
    );
    row(
        "  of which spawning a process in the node (`true`)",
        format!(
            "p50 {:.1} ms, p99 {:.1} ms",
            c.spawn_floor.p50_ms, c.spawn_floor.p99_ms
        ),
    );
    let w = &c.checkpoint_writes;
    row(
        &format!(
            "  checkpoint write of {} pods, tmpfs (the agent's here)",
            w.pods
        ),
        format!("p50 {:.2} ms, p99 {:.2} ms", w.tmpfs.p50_ms, w.tmpfs.p99_ms),
    );
    row(
        "  the same write on this machine's disk",
        format!("p50 {:.2} ms, p99 {:.2} ms", w.disk.p50_ms, w.disk.p99_ms),
    );
    ramps(c, &mut row);
    row(
        &format!(
            "churn: {} pods created and deleted, {} at a time",
            c.churn.pods, c.churn.parallel
        ),
        format!(
            "{:.1} addresses/s ({:.1} s; {} ADDs told to try again later)",
            c.churn.addresses_per_sec, c.churn.secs, c.churn.try_again
        ),
    );
    row("churn: OCI calls", calls_text(&c.churn.oci_calls));
    let s = &c.map_sync;
    row(
        &format!("map sync, {} endpoints", s.endpoints),
        format!(
            "from empty {:.1} ms, no-op {:.1} ms, one more {:.1} ms",
            s.from_empty_ms, s.noop_ms, s.one_more_ms
        ),
    );
    row(
        &format!("agent start-up restoring {PODS} pods (simulator latency 0)"),
        format!("{:.0} ms (spawn → serving)", c.startup_110_ms),
    );
    row(
        "agent RSS: idle / 110 pods / restarted with 110 / after churn",
        format!(
            "{:.1} / {:.1} / {:.1} / {:.1} MiB",
            f64::from(c.rss_idle_kib) / MIB,
            f64::from(c.rss_110_kib) / MIB,
            f64::from(c.rss_after_restart_kib) / MIB,
            f64::from(c.rss_after_churn_kib) / MIB
        ),
    );
    for line in targets(c) {
        let _ = writeln!(out, "{line}");
    }
    out
}

/// The 0 → 110 rows of both modes and their ratios.
fn ramps(c: &Control, row: &mut impl FnMut(&str, String)) {
    let [primary_ip, primary_cidr] = &c.ramps_primary;
    for r in [&c.ramp, &c.ramp_cidr, primary_ip, primary_cidr] {
        let mode = if r.primary_vnic {
            format!("ipam.mode = {:?}, primary VNIC too", r.mode)
        } else {
            format!("ipam.mode = {:?}", r.mode)
        };
        row(
            &format!("{mode}: CNI ADD, empty pool, the first pod"),
            format!("{:.0} ms (retries included)", r.first_add_ms),
        );
        row(
            &format!(
                "{mode}: CNI ADD during 0 → {PODS}, {} at a time",
                c.ramp_parallel
            ),
            format!(
                "p50 {:.0} ms, p99 {:.0} ms (retries included)",
                r.add.p50_ms, r.add.p99_ms
            ),
        );
        row(
            &format!("{mode}: 0 → {PODS} pods"),
            format!("{:.1} s", r.secs),
        );
        row(
            &format!("{mode}: OCI calls, start to {PODS} pods"),
            format!("{} ({})", r.oci_calls_total, calls_text(&r.oci_calls)),
        );
    }
    row(
        &format!(
            "cidr (/{}) against ip: 0 → {PODS} faster / fewer calls",
            c.block_prefix
        ),
        format!("{:.1}× / {:.1}×", speedup(c), call_ratio(c)),
    );
    row(
        "cidr against ip with use_primary_vnic = true: 0 → 110 faster / fewer calls",
        format!(
            "{:.1}× / {:.1}×",
            primary_ip.secs / primary_cidr.secs,
            to_f64(primary_ip.oci_calls_total) / to_f64(primary_cidr.oci_calls_total.max(1))
        ),
    );
}

fn calls_text(calls: &[(String, u64)]) -> String {
    if calls.is_empty() {
        return "none".to_owned();
    }
    let each: Vec<String> = calls.iter().map(|(op, n)| format!("{op} {n}")).collect();
    each.join(", ")
}

/// How many times faster 0 → 110 is with blocks than with single addresses.
pub fn speedup(c: &Control) -> f64 {
    c.ramp.secs / c.ramp_cidr.secs
}

/// How many times fewer OCI calls 0 → 110 makes with blocks.
pub fn call_ratio(c: &Control) -> f64 {
    to_f64(c.ramp.oci_calls_total) / to_f64(c.ramp_cidr.oci_calls_total.max(1))
}

fn to_f64(n: u64) -> f64 {
    #[expect(
        clippy::cast_precision_loss,
        reason = "call counts stay far below 2^52"
    )]
    let f = n as f64;
    f
}

/// The control-plane targets, each with the figure and met or missed.
pub fn targets(c: &Control) -> Vec<String> {
    let verdict = |met: bool| if met { "met" } else { "MISSED" };
    let rss = f64::from(c.rss_110_kib.max(c.rss_after_restart_kib)) / MIB;
    vec![
        format!(
            "goal: ipam.mode = \"cidr\" reaches {PODS} pods ≥ 5× faster than \"ip\": {:.1}×, {}",
            speedup(c),
            verdict(speedup(c) >= 5.0)
        ),
        format!(
            "goal: ipam.mode = \"cidr\" makes ≥ 10× fewer OCI calls to {PODS} pods: {:.1}×, {}",
            call_ratio(c),
            verdict(call_ratio(c) >= 10.0)
        ),
        format!(
            "target: CNI ADD p99 ≤ 10 ms with a warm pool: {:.1} ms, {}",
            c.add_warm.p99_ms,
            verdict(c.add_warm.p99_ms <= 10.0)
        ),
        format!(
            "target: agent RSS ≤ 40 MiB with {PODS} pods: {rss:.1} MiB, {}",
            verdict(rss <= 40.0)
        ),
        format!(
            "target: start-up with {PODS} pods ≤ 1 s: {:.0} ms, {}",
            c.startup_110_ms,
            verdict(c.startup_110_ms <= 1000.0)
        ),
    ]
}
