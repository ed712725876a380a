//! Introspection: `/metrics` (Prometheus text), `/healthz`, `/readyz` over TCP, and
//! `/v1/status` on the local API socket for `vcnpath status`.

use std::{fmt::Write as _, sync::Arc, sync::atomic::Ordering};

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use serde_json::{Value, json};

use super::{
    health::{Health, LOCK_TIMEOUT, Liveness},
    node::Node,
};
use vcnpath_common::Direction;

use crate::datapath::Counters;

/// What the HTTP handlers read.
pub struct Introspection {
    pub node: Arc<Node>,
    /// OCI API attempts and latency.
    pub oci: Arc<crate::oci::metrics::ApiMetrics>,
    /// What the probes check, kept current by the supervisor loop.
    pub health: Health,
}

impl Introspection {
    /// Whether the agent is alive, and if not, why.
    pub async fn liveness(&self) -> Liveness {
        let lock = tokio::time::timeout(LOCK_TIMEOUT, self.node.ipam.status()).await;
        Liveness {
            supervisor_silent_for: self.health.silent_for(),
            state_lock_answered: lock.is_ok(),
            ipam_running: self.node.ipam.background_running(),
        }
    }

    /// What keeps the agent from being ready; empty when it is.
    pub async fn not_ready(&self) -> Vec<&'static str> {
        match tokio::time::timeout(LOCK_TIMEOUT, self.node.ipam.status()).await {
            Ok(pool) => self.health.readiness(pool.reconciled).problems(),
            Err(_) => vec!["the IPAM state lock is not free"],
        }
    }
}

/// CNI STATUS is readiness: an agent that is not ready is one ADD cannot rely on.
impl crate::api::Readiness for Introspection {
    fn not_ready(&self) -> crate::ipam::BoxFuture<'_, Vec<String>> {
        Box::pin(async move {
            self.not_ready()
                .await
                .into_iter()
                .map(str::to_owned)
                .collect()
        })
    }
}

/// `/metrics`, `/healthz`, `/readyz`.
pub fn router(state: Arc<Introspection>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// `/v1/status`, merged into the local API.
pub fn status_router(state: Arc<Introspection>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .with_state(state)
}

async fn healthz(State(state): State<Arc<Introspection>>) -> impl IntoResponse {
    let problems = state.liveness().await.problems();
    if problems.is_empty() {
        (StatusCode::OK, "ok\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not alive: {}\n", problems.join("; ")),
        )
    }
}

async fn readyz(State(state): State<Arc<Introspection>>) -> impl IntoResponse {
    let problems = state.not_ready().await;
    if problems.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", problems.join("; ")),
        )
    }
}

async fn status(State(state): State<Arc<Introspection>>) -> Json<Value> {
    Json(status_json(&state).await)
}

/// The node's state as `vcnpath status` shows it.
pub async fn status_json(state: &Introspection) -> Value {
    let node = &state.node;
    let pool = node.ipam.status().await;
    let vnics = node.vnics().await;
    let pods: Vec<Value> = node
        .ipam
        .allocations()
        .await
        .into_iter()
        .map(|(pod, a)| json!({"container_id": pod.container_id, "ifname": pod.ifname, "namespace": pod.namespace, "name": pod.name, "ip": a.ip, "vnic": a.vnic_id, "interface": a.interface}))
        .collect();
    let counters = node.datapath.counters().await.unwrap_or_default();
    let nat_entries = node.datapath.nat_entries().await.unwrap_or(0);
    let not_ready = state.health.readiness(pool.reconciled).problems();
    json!({
        "ready": not_ready.is_empty(),
        "not_ready": not_ready,
        "vnics": pool.vnics.iter().map(|v| {
            let managed = vnics.get(&v.vnic_id);
            json!({
                "vnic_id": v.vnic_id, "is_primary": v.is_primary, "nic_index": v.nic_index, "mac": v.mac,
                "interface": v.interface, "ifindex": managed.map(|m| m.link.index),
                "primary_ip": v.primary_ip, "subnet": v.subnet,
                "router_mac_resolved": managed.is_some_and(|m| m.router_mac.is_some()),
                "free": v.free, "assigned": v.assigned, "cooldown": v.cooldown, "full": v.full,
                "blocks": v.blocks, "objects": v.objects,
                "suspect": v.suspect, "link": v.link,
            })
        }).collect::<Vec<_>>(),
        "sysctls": {
            "failures": node.sysctls.failures.load(Ordering::Relaxed),
            "last_error": node.sysctls.last_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone(),
        },
        "oci": {
            "trouble": pool.oci,
            "missing_permissions": state.oci.missing_permissions(),
        },
        "pool": {"capacity": pool.capacity, "allocations": pool.allocations, "reconciled": pool.reconciled, "quarantined": pool.quarantined, "recovered": pool.recovered},
        "pods": pods,
        "datapath": {
            "nat_entries": nat_entries,
            "counters": counters.totals().map(|(r, n)| (r.name().to_owned(), json!(n))).collect::<serde_json::Map<_, _>>(),
            "counters_by_direction": Direction::ALL.iter().map(|d| {
                let counts = counters.0.iter()
                    .filter(|(dir, _, n)| dir == d && *n > 0)
                    .map(|(_, r, n)| (r.name().to_owned(), json!(n)))
                    .collect::<serde_json::Map<_, _>>();
                (d.name().to_owned(), serde_json::Value::Object(counts))
            }).collect::<serde_json::Map<_, _>>(),
        },
    })
}

async fn metrics(State(state): State<Arc<Introspection>>) -> impl IntoResponse {
    let node = &state.node;
    let pool = node.ipam.status().await;
    let counters = node.datapath.counters().await.unwrap_or_default();
    let nat = node.datapath.nat_entries().await.unwrap_or(0);
    let mut out = String::new();
    render(&mut out, &pool, &counters, nat, node);
    state.oci.render(&mut out);
    ([("content-type", "text/plain; version=0.0.4")], out)
}

fn render(
    out: &mut String,
    pool: &crate::ipam::IpamStatus,
    counters: &Counters,
    nat: usize,
    node: &Node,
) {
    let _ = writeln!(
        out,
        "# HELP vcnpath_pool_addresses Secondary private IPs per VNIC by state.\n# TYPE vcnpath_pool_addresses gauge"
    );
    for v in &pool.vnics {
        let interface = v.interface.as_deref().unwrap_or("");
        for (state, n) in [
            ("free", v.free),
            ("assigned", v.assigned),
            ("cooldown", v.cooldown),
        ] {
            let _ = writeln!(
                out,
                "vcnpath_pool_addresses{{vnic=\"{}\",interface=\"{interface}\",state=\"{state}\"}} {n}",
                v.vnic_id
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP vcnpath_pool_capacity Addresses this node can hold.\n# TYPE vcnpath_pool_capacity gauge\nvcnpath_pool_capacity {}",
        pool.capacity
    );
    let _ = writeln!(
        out,
        "# HELP vcnpath_ipam_quarantined_addresses Addresses of live pods on no VNIC of the node (detached or moved away behind the agent's back), handed to nobody else.\n# TYPE vcnpath_ipam_quarantined_addresses gauge\nvcnpath_ipam_quarantined_addresses {}",
        pool.quarantined.len()
    );
    let _ = writeln!(
        out,
        "# HELP vcnpath_ipam_recovered_addresses Addresses held for pods the node runs (their veths, routes, endpoints entries) but the checkpoint did not list; released when their veths are gone.\n# TYPE vcnpath_ipam_recovered_addresses gauge\nvcnpath_ipam_recovered_addresses {}",
        pool.recovered
    );
    let _ = writeln!(
        out,
        "# HELP vcnpath_ipam_gc_released_total Allocations released because the pod's host veth was gone beyond allocation_gc_grace_secs (a DEL that never came).\n# TYPE vcnpath_ipam_gc_released_total counter\nvcnpath_ipam_gc_released_total {}",
        pool.gc_released
    );
    let _ = writeln!(
        out,
        "# HELP vcnpath_ipam_cni_gc_released_total Allocations released by the runtime's CNI GC because its valid attachments did not list them.\n# TYPE vcnpath_ipam_cni_gc_released_total counter\nvcnpath_ipam_cni_gc_released_total {}",
        pool.cni_gc_released
    );
    let _ = writeln!(
        out,
        "# HELP vcnpath_ipam_reconciled 1 once IPAM has reconciled with OCI since the agent started.\n# TYPE vcnpath_ipam_reconciled gauge\nvcnpath_ipam_reconciled {}",
        u8::from(pool.reconciled)
    );
    let _ = writeln!(
        out,
        "# HELP vcnpath_allocations_total CNI allocations and releases.\n# TYPE vcnpath_allocations_total counter"
    );
    for (result, n) in [
        ("ok", &node.counters.ok),
        ("failed", &node.counters.failed),
        ("released", &node.counters.released),
    ] {
        let _ = writeln!(
            out,
            "vcnpath_allocations_total{{result=\"{result}\"}} {}",
            n.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP vcnpath_sysctl_failures_total Failures to keep an interface's rp_filter loose and forwarding on.\n# TYPE vcnpath_sysctl_failures_total counter\nvcnpath_sysctl_failures_total {}",
        node.sysctls.failures.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP vcnpath_datapath_repairs_total Filters (per interface) and pins put back after something removed them.\n# TYPE vcnpath_datapath_repairs_total counter\nvcnpath_datapath_repairs_total{{what=\"filter\"}} {}\nvcnpath_datapath_repairs_total{{what=\"pin\"}} {}",
        node.repairs.filters.load(Ordering::Relaxed),
        node.repairs.pins.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP vcnpath_datapath_packets_total Packets by datapath decision and the program that took it (egress and ingress of the VNICs, pod: the pods' veths).\n# TYPE vcnpath_datapath_packets_total counter"
    );
    for (direction, reason, n) in &counters.0 {
        let _ = writeln!(
            out,
            "vcnpath_datapath_packets_total{{direction=\"{}\",reason=\"{}\"}} {n}",
            direction.name(),
            reason.name()
        );
    }
    let _ = writeln!(
        out,
        "# HELP vcnpath_nat_entries Entries in the NAT table (two per translated flow).\n# TYPE vcnpath_nat_entries gauge\nvcnpath_nat_entries {nat}"
    );
}
