//! Errors of the OCI client. Every error from a service names the operation, the HTTP status,
//! OCI's error code and the `opc-request-id`, because that id is what Oracle support asks for.
use std::time::Duration;

/// Why a key, certificate or token could not be loaded or produced.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read OCI config file {path}: {source}")]
    ConfigRead {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("OCI config file {path} has no profile [{profile}]")]
    ProfileMissing { path: String, profile: String },
    #[error("OCI config profile [{profile}] lacks the required key `{key}`")]
    ConfigKeyMissing { profile: String, key: &'static str },
    #[error("cannot read private key file {path}: {source}")]
    KeyRead {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("private key {origin} is encrypted but no pass_phrase was given")]
    PassphraseRequired { origin: String },
    #[error(
        "private key {origin} uses legacy OpenSSL PEM encryption; convert it with `openssl pkcs8 -topk8 -v2 aes256`"
    )]
    LegacyEncryptedKey { origin: String },
    #[error(
        "private key {origin} cannot be parsed (wrong pass_phrase or not an RSA key): {reason}"
    )]
    KeyParse { origin: String, reason: String },
    #[error("cannot generate a session key: {source}")]
    KeyGeneration {
        #[source]
        source: rsa::Error,
    },
    #[error("cannot parse the instance certificate: {reason}")]
    Certificate { reason: String },
    #[error("the instance certificate subject carries no opc-tenant: (subject `{subject}`)")]
    NoTenancy { subject: String },
    #[error("the federation token cannot be decoded: {reason}")]
    Token { reason: &'static str },
    #[error("instance metadata: {0}")]
    Imds(#[from] ImdsError),
    #[error("federation request failed: {0}")]
    Federation(#[source] Box<OciError>),
    /// No credentials within the call's retry budget (IMDS or the federation endpoint slow or
    /// hanging); the next call tries again.
    #[error(
        "no OCI credentials within the call's {budget_ms} ms budget (IMDS or the federation endpoint does not answer); the next call tries again"
    )]
    Timeout { budget_ms: u64 },
}

/// An instance metadata (IMDS v2) request that failed after its retries.
#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    #[error("GET {path}: HTTP {status} after {attempts} attempts")]
    Status {
        path: String,
        status: u16,
        attempts: u32,
    },
    #[error("GET {path}: {source}")]
    Transport {
        path: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("GET {path}: cannot decode the response: {source}")]
    Decode {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid IMDS base URL {url}")]
    BaseUrl { url: String },
}

/// An OCI API call that failed.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The service answered with an error status and (usually) OCI's `{code, message}` body.
    #[error("{operation}: HTTP {status} {code}: {message} (opc-request-id {})", request_id.as_deref().unwrap_or("-"))]
    Service {
        operation: &'static str,
        status: u16,
        code: String,
        message: String,
        request_id: Option<String>,
    },
    #[error("{operation}: request failed: {source}")]
    Transport {
        operation: &'static str,
        #[source]
        source: reqwest::Error,
    },
    #[error("{operation}: no response within {timeout:?}")]
    Timeout {
        operation: &'static str,
        timeout: Duration,
    },
    #[error("{operation}: cannot decode the response (opc-request-id {}): {source}", request_id.as_deref().unwrap_or("-"))]
    Decode {
        operation: &'static str,
        request_id: Option<String>,
        #[source]
        source: serde_json::Error,
    },
    #[error("{operation}: invalid endpoint or request URL {url}")]
    Url {
        operation: &'static str,
        url: String,
    },
    #[error("{operation}: gave up after {attempts} attempts in {elapsed:?}: {last}")]
    RetriesExhausted {
        operation: &'static str,
        attempts: u32,
        elapsed: Duration,
        /// Whether any attempt, not only the last, may have taken effect at OCI.
        committed: bool,
        #[source]
        last: Box<OciError>,
    },
    /// The node's own rate limit, slowed down by earlier 429s, would let the call out only
    /// after its budget had run out, so nothing was sent.
    #[error(
        "{operation}: not sent: this node slowed its OCI calls down after 429s and may make the next one in {ready_in:?}, after the call's time budget; it is tried again later"
    )]
    HeldBack {
        operation: &'static str,
        ready_in: Duration,
    },
    /// OCI refused the request's date: the node's clock is more than 5 minutes off.
    #[error(
        "{operation}: OCI rejects this node's clock (more than 5 minutes off); fix the node's time sync (chrony/NTP): {server_message}"
    )]
    ClockSkew {
        operation: &'static str,
        server_message: String,
    },
    #[error("{operation}: authentication: {source}")]
    Auth {
        operation: &'static str,
        #[source]
        source: AuthError,
    },
}

impl OciError {
    /// The error that ended the call, looking through `RetriesExhausted`.
    pub fn root(&self) -> &OciError {
        match self {
            OciError::RetriesExhausted { last, .. } => last.root(),
            other => other,
        }
    }

    /// HTTP status of the service's answer, if there was one.
    pub fn status(&self) -> Option<u16> {
        match self.root() {
            OciError::Service { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// OCI's error code (`LimitExceeded`, `NotAuthenticated`, …), if the service sent one.
    pub fn code(&self) -> Option<&str> {
        match self.root() {
            OciError::Service { code, .. } => Some(code),
            _ => None,
        }
    }

    pub fn request_id(&self) -> Option<&str> {
        match self.root() {
            OciError::Service { request_id, .. } | OciError::Decode { request_id, .. } => {
                request_id.as_deref()
            }
            _ => None,
        }
    }

    /// One resource is full: the VNIC has as many private IPs as it may hold, the shape as
    /// many VNICs, or the subnet is out of addresses (not a tenancy service limit).
    pub fn is_limit_exceeded(&self) -> bool {
        self.class() == super::ErrorClass::Capacity
    }

    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// The operation that failed.
    pub fn operation(&self) -> &'static str {
        match self {
            OciError::Service { operation, .. }
            | OciError::Transport { operation, .. }
            | OciError::Timeout { operation, .. }
            | OciError::Decode { operation, .. }
            | OciError::Url { operation, .. }
            | OciError::RetriesExhausted { operation, .. }
            | OciError::HeldBack { operation, .. }
            | OciError::ClockSkew { operation, .. }
            | OciError::Auth { operation, .. } => operation,
        }
    }

    /// Whether a create may have taken effect although its answer never arrived whole: the
    /// connection failed or timed out, the service erred (5xx may come after the commit), or
    /// the body was cut, in any of the call's attempts. Such a create is repeated with the
    /// same `opc-retry-token`.
    pub fn may_have_committed(&self) -> bool {
        if let OciError::RetriesExhausted {
            committed: true, ..
        } = self
        {
            return true;
        }
        match self.root() {
            OciError::Service { status, .. } => *status >= 500,
            OciError::Transport { .. } | OciError::Timeout { .. } | OciError::Decode { .. } => true,
            _ => false,
        }
    }
}
