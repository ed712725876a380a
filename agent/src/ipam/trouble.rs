//! The OCI calls the pool's background work cannot get through right now: which operation, on
//! what, the kind of error and OCI's code, what the node's policy lacks, and when it is tried
//! next. Kept for `vcnpath status` and for the "try again" answer a waiting pod gets, so
//! neither has to be read out of the logs.
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::oci::{ErrorClass, OciError};

/// One unit of work that keeps failing, as `vcnpath status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OciTrouble {
    /// The OCI operation that failed last (`CreatePrivateIp`, `AttachVnic`, …).
    pub operation: &'static str,
    /// What the work is about: a VNIC or subnet OCID, `instance` or `reconcile`.
    pub target: String,
    pub class: ErrorClass,
    /// HTTP status and OCI's error code, when OCI answered.
    pub status: Option<u16>,
    pub code: Option<String>,
    /// The error as logged (OCI's message and `opc-request-id`).
    pub error: String,
    /// For a denied call, the IAM permissions the operation needs.
    pub needs: Vec<&'static str>,
    pub remedy: &'static str,
    /// Failures in a row.
    pub failures: u32,
    /// Milliseconds until the next try (0: due now).
    pub retry_in_ms: u64,
}

#[derive(Debug)]
struct Record {
    operation: &'static str,
    class: ErrorClass,
    status: Option<u16>,
    code: Option<String>,
    error: String,
    failures: u32,
    until: Instant,
}

/// The troubles now, by (kind of work, target). Cleared when that work next succeeds.
#[derive(Debug, Default)]
pub(super) struct Troubles {
    records: Mutex<BTreeMap<(&'static str, String), Record>>,
}

impl Troubles {
    fn records(&self) -> std::sync::MutexGuard<'_, BTreeMap<(&'static str, String), Record>> {
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `work` on `target` failed with `error` for the `failures`-th time; next try at `until`.
    pub fn failed(
        &self,
        work: &'static str,
        target: &str,
        error: &OciError,
        failures: u32,
        until: Instant,
    ) {
        let record = Record {
            operation: error.operation(),
            class: error.class(),
            status: error.status(),
            code: error.code().map(str::to_owned),
            error: error.to_string(),
            failures,
            until,
        };
        self.records().insert((work, target.to_owned()), record);
    }

    /// `work` on `target` went through (or is no longer wanted).
    pub fn cleared(&self, work: &'static str, target: &str) {
        self.records().remove(&(work, target.to_owned()));
    }

    /// Every trouble, the ones an operator must act on first.
    pub fn list(&self, now: Instant) -> Vec<OciTrouble> {
        let mut out: Vec<OciTrouble> = self
            .records()
            .iter()
            .map(|((_, target), r)| OciTrouble {
                operation: r.operation,
                target: target.clone(),
                class: r.class,
                status: r.status,
                code: r.code.clone(),
                error: r.error.clone(),
                needs: if r.class == ErrorClass::Permission {
                    crate::oci::iam::needs(r.operation).to_vec()
                } else {
                    Vec::new()
                },
                remedy: r.class.remedy(),
                failures: r.failures,
                retry_in_ms: millis(r.until.saturating_duration_since(now)),
            })
            .collect();
        out.sort_by_key(|t| (t.class.is_transient(), std::cmp::Reverse(t.failures)));
        out
    }

    /// One sentence for a pod told to try again: what holds the pool back, if OCI does.
    pub fn summary(&self, now: Instant) -> Option<String> {
        let all = self.list(now);
        let first = all.first()?;
        let answer = match (first.status, &first.code) {
            (Some(status), Some(code)) => format!("answered {status} {code}"),
            // Nothing was sent: the node slowed down after 429s (`OciError::HeldBack`).
            _ if first.class == ErrorClass::Throttled => {
                "was held back by the node's own rate limit after OCI's 429s".to_owned()
            }
            _ => "got no answer".to_owned(),
        };
        let needs = if first.needs.is_empty() {
            String::new()
        } else {
            format!(" (the policy must grant {})", first.needs.join(", "))
        };
        let more = match all.len() - 1 {
            0 => String::new(),
            n => format!("; {n} more in `vcnpath status`"),
        };
        Some(format!(
            "OCI {} for {} {answer}{needs}, next try in {} ms{more}",
            first.operation, first.target, first.retry_in_ms
        ))
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(operation: &'static str, status: u16, code: &str) -> OciError {
        OciError::Service {
            operation,
            status,
            code: code.into(),
            message: "m".into(),
            request_id: Some("req-1".into()),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_denial_comes_before_throttling_and_names_what_the_policy_lacks() {
        let troubles = Troubles::default();
        let now = Instant::now();
        let throttled = service("CreatePrivateIp", 429, "TooManyRequests");
        troubles.failed(
            "create",
            "vnic-a",
            &throttled,
            3,
            now + Duration::from_secs(2),
        );
        let denied = service("AttachVnic", 404, "NotAuthorizedOrNotFound");
        troubles.failed(
            "attach",
            "subnet-a",
            &denied,
            1,
            now + Duration::from_mins(5),
        );
        let list = troubles.list(now);
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].class, ErrorClass::Permission);
        assert!(list[0].needs.contains(&"manage instances"), "{list:?}");
        assert_eq!(list[0].retry_in_ms, 300_000);
        let summary = troubles.summary(now).expect("a summary");
        assert!(
            summary.contains("AttachVnic")
                && summary.contains("404 NotAuthorizedOrNotFound")
                && summary.contains("manage instances")
                && summary.contains("1 more"),
            "{summary}"
        );
        troubles.cleared("attach", "subnet-a");
        troubles.cleared("create", "vnic-a");
        assert!(troubles.summary(now).is_none());
    }
}
