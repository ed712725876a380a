//! The wire types of the local API. Both ends compile these same definitions, so the
//! plugin and the agent agree by construction within one release; across releases the
//! `v1` path prefix and serde's tolerance of unknown fields keep them compatible.

use serde::{Deserialize, Serialize};

use crate::ipam::{AllocError, Allocation, PodRef};

/// The API generation served under `/v1/`.
pub const API_VERSION: &str = "v1";

/// `GET /v1/version`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionResponse {
    /// The API generation (`v1`).
    pub api: String,
    /// The agent's release (its crate version).
    pub agent: String,
}

/// `POST /v1/allocate`: the pod's address, durable before this was sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocateResponse {
    pub allocation: Allocation,
}

/// `POST /v1/release`: what the pod had, `None` when the agent had no record (which is
/// not an error: CNI DEL must be idempotent).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseResponse {
    pub released: Option<Allocation>,
}

/// `POST /v1/lookup`: the pod's current allocation, if any.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LookupResponse {
    pub allocation: Option<Allocation>,
}

/// `POST /v1/gc` (CNI GC): the runtime's valid attachments; every other allocation is
/// released unless its ADD is running or recent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcRequest {
    pub valid: Vec<PodRef>,
}

/// What a `POST /v1/gc` released.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcResponse {
    pub released: Vec<PodRef>,
}

/// `GET /v1/cni-status` (CNI STATUS): whether the agent can serve ADDs now, and if not,
/// why (each reason a sentence an operator can act on).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniStatusResponse {
    pub ready: bool,
    pub problems: Vec<String>,
}

/// The body of every non-2xx answer: the typed error for programs, and its text for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: AllocError,
    pub message: String,
}

impl From<AllocError> for ErrorBody {
    fn from(error: AllocError) -> Self {
        Self {
            message: error.to_string(),
            error,
        }
    }
}
