//! `BulkCreatePrivateIps` and `BulkDeletePrivateIps`: asynchronous work requests in OCI's
//! SDKs (the answer has no body, only `opc-work-request-id`), read back with the Work
//! Requests service's `GetWorkRequest` and `ListWorkRequestErrors` on the same endpoint.
use std::time::SystemTime;

use serde_json::{Value, json};

use super::state::{ApiError, Cloud};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bulk {
    Create,
    Delete,
}

impl Bulk {
    /// The operation's name, as the SDK and the work request's `operationType` spell it.
    pub fn operation(self) -> &'static str {
        match self {
            Self::Create => "BulkCreatePrivateIps",
            Self::Delete => "BulkDeletePrivateIps",
        }
    }

    fn items_field(self) -> &'static str {
        match self {
            Self::Create => "bulkCreatePrivateIpItem",
            Self::Delete => "bulkDeletePrivateIpItem",
        }
    }
}

/// A checked bulk request, ready to run.
#[derive(Debug, Clone)]
pub struct Job {
    pub kind: Bulk,
    pub vnic_id: Option<String>,
    pub items: Vec<Value>,
}

/// Checks what OCI can refuse before accepting the work: the body's shape, the VNIC, the
/// item count and each item's fields. What only running it shows (a limit, a collision, a
/// full subnet) fails the work request instead.
pub fn accept(
    cloud: &Cloud,
    kind: Bulk,
    body: &Value,
    max_items: Option<usize>,
) -> Result<Job, ApiError> {
    let field = kind.items_field();
    let items = body[field]
        .as_array()
        .ok_or_else(|| ApiError::new(400, "MissingParameter", format!("{field} is required")))?
        .clone();
    if items.is_empty() {
        return Err(ApiError::new(
            400,
            "InvalidParameter",
            format!("{field} is empty"),
        ));
    }
    if let Some(max) = max_items
        && items.len() > max
    {
        return Err(ApiError::new(
            400,
            "InvalidParameter",
            format!(
                "{field} has {} items; at most {max} are allowed",
                items.len()
            ),
        ));
    }
    let vnic_id = body["vnicId"].as_str().map(str::to_owned);
    if let Some(vnic) = &vnic_id {
        if !cloud.vnics.contains_key(vnic) {
            return Err(ApiError::not_found("VNIC", vnic));
        }
    } else if kind == Bulk::Create {
        let other = ["subnetId", "vlanId"].iter().any(|f| !body[f].is_null());
        return Err(if other {
            ApiError::new(
                400,
                "InvalidParameter",
                "only vnicId is simulated for BulkCreatePrivateIps (unassigned IPs by subnetId or vlanId are not)",
            )
        } else {
            ApiError::new(
                400,
                "MissingParameter",
                "one of vnicId, subnetId, vlanId is required",
            )
        });
    }
    for item in &items {
        match kind {
            Bulk::Create => {
                super::cidr::Want::parse(item, &cloud.cfg.cidr)?;
            }
            Bulk::Delete => {
                item["privateIpId"].as_str().ok_or_else(|| {
                    ApiError::new(
                        400,
                        "MissingParameter",
                        "every bulkDeletePrivateIpItem needs privateIpId",
                    )
                })?;
            }
        }
    }
    Ok(Job {
        kind,
        vnic_id,
        items,
    })
}

/// Runs the job all or nothing (whether OCI applies part of a failed bulk call is not
/// documented; the simulator keeps none of it). Returns the work request's resources.
pub fn run(cloud: &mut Cloud, job: &Job) -> Result<Vec<(&'static str, String)>, ApiError> {
    let before = cloud.clone();
    let done = apply(cloud, job);
    if done.is_err() {
        *cloud = before;
    }
    done
}

fn apply(cloud: &mut Cloud, job: &Job) -> Result<Vec<(&'static str, String)>, ApiError> {
    let mut resources = Vec::new();
    for item in &job.items {
        match job.kind {
            Bulk::Create => {
                let mut details = item.clone();
                details["vnicId"] = json!(job.vnic_id);
                resources.push(("CREATED", cloud.create_private_ip(&details)?));
            }
            Bulk::Delete => {
                let id = item["privateIpId"].as_str().unwrap_or_default();
                let ip = cloud
                    .private_ips
                    .get(id)
                    .ok_or_else(|| ApiError::not_found("private IP", id))?;
                if let Some(vnic) = &job.vnic_id
                    && ip.vnic_id != *vnic
                {
                    return Err(ApiError::new(
                        400,
                        "InvalidParameter",
                        format!("private IP {id} is not on VNIC {vnic}"),
                    ));
                }
                cloud.delete_private_ip(id)?;
                resources.push(("DELETED", id.to_owned()));
            }
        }
    }
    Ok(resources)
}

/// A work request as `GetWorkRequest` shows it.
#[derive(Debug, Clone)]
pub struct WorkRequest {
    pub id: String,
    pub operation: &'static str,
    pub compartment_id: String,
    pub status: &'static str,
    pub resources: Vec<(&'static str, String)>,
    pub errors: Vec<(ApiError, SystemTime)>,
    pub accepted: SystemTime,
    pub started: Option<SystemTime>,
    pub finished: Option<SystemTime>,
}

impl WorkRequest {
    pub fn accepted(id: String, kind: Bulk, compartment_id: String) -> Self {
        Self {
            id,
            operation: kind.operation(),
            compartment_id,
            status: "ACCEPTED",
            resources: Vec::new(),
            errors: Vec::new(),
            accepted: SystemTime::now(),
            started: None,
            finished: None,
        }
    }

    /// Records how the job ended: SUCCEEDED with what it touched, or FAILED with why.
    pub fn finish(&mut self, outcome: Result<Vec<(&'static str, String)>, ApiError>) {
        let now = SystemTime::now();
        self.started.get_or_insert(now);
        self.finished = Some(now);
        match outcome {
            Ok(resources) => {
                self.status = "SUCCEEDED";
                self.resources = resources;
            }
            Err(e) => {
                self.status = "FAILED";
                self.errors.push((e, now));
            }
        }
    }

    /// `entityType` is `private_ip`: OCI documents no value, and oci-cli, waiting on a work
    /// request that names one resource, reads it back with the client's `get_<entityType>`.
    pub fn json(&self) -> Value {
        let done = self.finished.is_some();
        json!({
            "id": self.id, "operationType": self.operation, "status": self.status,
            "compartmentId": self.compartment_id,
            "resources": self.resources.iter().map(|(action, id)| json!({
                "actionType": action, "entityType": "private_ip", "identifier": id,
                "entityUri": format!("/20160918/privateIps/{id}"),
            })).collect::<Vec<_>>(),
            "percentComplete": if done { 100.0 } else { 0.0 },
            "timeAccepted": rfc3339(self.accepted),
            "timeStarted": self.started.map(rfc3339),
            "timeFinished": self.finished.map(rfc3339),
        })
    }

    pub fn errors_json(&self) -> Value {
        self.errors
            .iter()
            .map(|(e, at)| json!({"code": e.code, "message": e.message, "timestamp": rfc3339(*at)}))
            .collect()
    }
}

fn rfc3339(t: SystemTime) -> String {
    super::state::rfc3339(&httpdate::fmt_http_date(t))
}
