//! Per-operation OCI API call metrics: attempts by outcome and a latency histogram, for the
//! agent's `/metrics`. Recorded for every attempt (retries included), so a storm of 429s
//! shows up even when the call finally succeeds.

use std::{collections::BTreeMap, fmt::Write as _, sync::Mutex, time::Duration};

/// Upper bounds of the latency buckets, in seconds.
pub const BUCKETS: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Clone, Debug, Default)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Attempts by (operation, outcome) and latency by operation.
#[derive(Debug, Default)]
pub struct ApiMetrics {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    attempts: BTreeMap<(&'static str, String), u64>,
    latency: BTreeMap<&'static str, Histogram>,
    /// Per operation, whether its last answer was an IAM denial (true) or a success (false).
    denied: BTreeMap<&'static str, bool>,
    /// The calls per second the client allows itself now (lowered after 429s).
    rate_limit: f64,
}

impl ApiMetrics {
    /// Metrics of a client allowed `rate_limit` calls per second.
    pub fn new(rate_limit: f64) -> Self {
        Self {
            inner: Mutex::new(Inner {
                rate_limit,
                ..Inner::default()
            }),
        }
    }

    /// The client's rate limit changed (throttled, or earning its rate back).
    pub fn set_rate_limit(&self, per_second: f64) {
        self.lock().rate_limit = per_second;
    }

    /// The calls per second the client allows itself now.
    pub fn rate_limit(&self) -> f64 {
        self.lock().rate_limit
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records one attempt of `operation`: `outcome` is `ok`, the OCI error code (e.g.
    /// `TooManyRequests`), `timeout` or `transport`.
    pub fn record(&self, operation: &'static str, outcome: &str, elapsed: Duration) {
        let mut inner = self.lock();
        *inner
            .attempts
            .entry((operation, outcome.to_owned()))
            .or_default() += 1;
        let h = inner.latency.entry(operation).or_default();
        let secs = elapsed.as_secs_f64();
        for (bucket, bound) in h.buckets.iter_mut().zip(BUCKETS) {
            if secs <= bound {
                *bucket += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
        match outcome {
            "ok" => {
                inner.denied.insert(operation, false);
            }
            "NotAuthorizedOrNotFound" => {
                inner.denied.insert(operation, true);
            }
            _ => {}
        }
    }

    /// The IAM permissions that explain the operations now denied (`404
    /// NotAuthorizedOrNotFound` on their last attempt), minus those proven by an operation that
    /// succeeded: what the policy most likely lacks. Empty when nothing is denied.
    pub fn missing_permissions(&self) -> Vec<&'static str> {
        let inner = self.lock();
        let denied = inner.denied.iter().filter(|(_, d)| **d).map(|(op, _)| *op);
        let succeeded: Vec<&str> = inner
            .denied
            .iter()
            .filter(|(_, d)| !**d)
            .map(|(op, _)| *op)
            .collect();
        super::iam::suspects(denied, &succeeded)
    }

    /// Prometheus text exposition.
    pub fn render(&self, out: &mut String) {
        let missing = self.missing_permissions();
        let _ = writeln!(
            out,
            "# HELP vcnpath_oci_permission_missing IAM permissions the node's policy most likely lacks (operations denied with 404 NotAuthorizedOrNotFound).\n# TYPE vcnpath_oci_permission_missing gauge"
        );
        for permission in missing {
            let _ = writeln!(
                out,
                "vcnpath_oci_permission_missing{{permission=\"{permission}\"}} 1"
            );
        }
        let inner = self.lock();
        let _ = writeln!(
            out,
            "# HELP vcnpath_oci_requests_total OCI API attempts by operation and outcome (ok or the OCI error code).\n# TYPE vcnpath_oci_requests_total counter"
        );
        let _ = writeln!(
            out,
            "# HELP vcnpath_oci_rate_limit_per_second The OCI calls per second the agent allows itself now: its configured rate, lower while OCI throttles the tenancy (429).\n# TYPE vcnpath_oci_rate_limit_per_second gauge\nvcnpath_oci_rate_limit_per_second {}",
            inner.rate_limit
        );
        for ((operation, outcome), n) in &inner.attempts {
            let _ = writeln!(
                out,
                "vcnpath_oci_requests_total{{operation=\"{operation}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP vcnpath_oci_request_duration_seconds OCI API attempt latency.\n# TYPE vcnpath_oci_request_duration_seconds histogram"
        );
        for (operation, h) in &inner.latency {
            for (bound, n) in BUCKETS.iter().zip(h.buckets) {
                let _ = writeln!(
                    out,
                    "vcnpath_oci_request_duration_seconds_bucket{{operation=\"{operation}\",le=\"{bound}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "vcnpath_oci_request_duration_seconds_bucket{{operation=\"{operation}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "vcnpath_oci_request_duration_seconds_sum{{operation=\"{operation}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "vcnpath_oci_request_duration_seconds_count{{operation=\"{operation}\"}} {}",
                h.count
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_and_latency_are_exposed() {
        let m = ApiMetrics::default();
        m.record("CreatePrivateIp", "ok", Duration::from_millis(20));
        m.record(
            "CreatePrivateIp",
            "TooManyRequests",
            Duration::from_millis(3),
        );
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("vcnpath_oci_requests_total{operation=\"CreatePrivateIp\",outcome=\"TooManyRequests\"} 1"), "{out}");
        assert!(out.contains("vcnpath_oci_request_duration_seconds_bucket{operation=\"CreatePrivateIp\",le=\"0.025\"} 2"), "{out}");
        assert!(
            out.contains(
                "vcnpath_oci_request_duration_seconds_count{operation=\"CreatePrivateIp\"} 2"
            ),
            "{out}"
        );
    }
}
