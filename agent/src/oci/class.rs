//! What a failed OCI call means for the caller's next move. OCI's "API Errors" reference gives
//! each error code a status and says whether to retry; one code, `LimitExceeded`, covers a
//! tenancy's service limits and a single resource's own limits alike and is told apart by its
//! message. docs/oci.md ("Error classes") cites the source of every rule here.
use serde::Serialize;

use super::{AuthError, OciError};

/// The kind of trouble a failed call is, from the status, OCI's code and (for
/// `LimitExceeded`) the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// IAM refused the call, or the resource is not visible to the node: 404
    /// `NotAuthorizedOrNotFound`, 403, 400 `RelatedResourceNotAuthorizedOrNotFound`.
    Permission,
    /// The node's identity was not accepted: 401, a clock OCI refuses, credentials that cannot
    /// be loaded.
    Authentication,
    /// OCI finds the request itself wrong (400 `InvalidParameter`, `MissingParameter`, …, 409
    /// `Conflict`): a wrong subnet or compartment in the configuration.
    Request,
    /// A tenancy service limit (400 `LimitExceeded` "The following service limits were
    /// exceeded: …") or a compartment quota (400 `QuotaExceeded`).
    ServiceLimit,
    /// One resource is full: 400 `LimitExceeded` otherwise (a VNIC's private IPs, a shape's
    /// VNIC attachments, a subnet's addresses). The pool moves on to another VNIC or subnet.
    Capacity,
    /// 429 `TooManyRequests`.
    Throttled,
    /// 409 `IncorrectState`: the resource is in transition.
    InTransition,
    /// No usable answer: 5xx, a timeout, a lost connection, a body that cannot be read.
    Unavailable,
}

impl ErrorClass {
    /// Whether retrying soon can succeed without anyone changing anything.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorClass::Throttled | ErrorClass::InTransition | ErrorClass::Unavailable
        )
    }

    /// What an operator does about it, for `vcnpath status` and the logs.
    pub fn remedy(self) -> &'static str {
        match self {
            ErrorClass::Permission => {
                "grant the node's dynamic group the permissions listed (docs/oci.md), or check the subnet and compartment OCIDs"
            }
            ErrorClass::Authentication => {
                "check the node's clock (chrony/NTP) and its instance principal or OCI config"
            }
            ErrorClass::Request => {
                "check the agent's OCI configuration (subnets, compartment); OCI's message says which parameter"
            }
            ErrorClass::ServiceLimit => {
                "raise the tenancy's service limit or the compartment's quota named in OCI's message"
            }
            ErrorClass::Capacity => {
                "none needed: the pool uses another VNIC or subnet; add subnets if every one is full"
            }
            ErrorClass::Throttled => {
                "none needed: the agent backs off; many nodes calling at once share the tenancy's rate"
            }
            ErrorClass::InTransition => "none needed: the agent retries once OCI has settled",
            ErrorClass::Unavailable => {
                "none needed: the agent retries; check OCI's status if it lasts"
            }
        }
    }
}

/// The start of the message OCI gives a `LimitExceeded` that is a tenancy service limit (seen
/// in answers quoted in public issue threads; docs/oci.md). Any other `LimitExceeded` is one
/// resource's own limit.
const SERVICE_LIMITS_MESSAGE: &str = "the following service limits were exceeded";

impl OciError {
    /// The kind of trouble this is (see [`ErrorClass`]).
    pub fn class(&self) -> ErrorClass {
        match self.root() {
            OciError::Service {
                status,
                code,
                message,
                ..
            } => service_class(*status, code, message),
            OciError::Transport { .. } | OciError::Timeout { .. } | OciError::Decode { .. } => {
                ErrorClass::Unavailable
            }
            OciError::Url { .. } => ErrorClass::Request,
            OciError::HeldBack { .. } => ErrorClass::Throttled,
            OciError::ClockSkew { .. } => ErrorClass::Authentication,
            OciError::Auth { source, .. } => auth_class(source),
            // `root()` has looked through these already; the last attempt decides.
            OciError::RetriesExhausted { last, .. } => last.class(),
        }
    }
}

fn service_class(status: u16, code: &str, message: &str) -> ErrorClass {
    match (status, code) {
        (400, "LimitExceeded") => {
            if message
                .trim_start()
                .to_ascii_lowercase()
                .starts_with(SERVICE_LIMITS_MESSAGE)
            {
                ErrorClass::ServiceLimit
            } else {
                ErrorClass::Capacity
            }
        }
        (400, "QuotaExceeded") => ErrorClass::ServiceLimit,
        (400, "RelatedResourceNotAuthorizedOrNotFound") | (403 | 404, _) => ErrorClass::Permission,
        (401, _) => ErrorClass::Authentication,
        (409, "IncorrectState" | "ExternalServerIncorrectState") => ErrorClass::InTransition,
        (429, _) => ErrorClass::Throttled,
        (500.., _) => ErrorClass::Unavailable,
        _ => ErrorClass::Request,
    }
}

/// Credentials that could not be had: slow or failing IMDS and federation are waited out;
/// a refused identity or broken local credentials need an operator.
fn auth_class(error: &AuthError) -> ErrorClass {
    match error {
        AuthError::Timeout { .. } | AuthError::Imds(_) => ErrorClass::Unavailable,
        AuthError::Federation(inner) => match inner.class() {
            ErrorClass::Permission => ErrorClass::Authentication,
            other => other,
        },
        _ => ErrorClass::Authentication,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn service(status: u16, code: &str, message: &str) -> OciError {
        OciError::Service {
            operation: "CreatePrivateIp",
            status,
            code: code.into(),
            message: message.into(),
            request_id: None,
        }
    }

    #[test]
    fn one_limit_code_is_told_apart_by_its_message() {
        let tenancy = service(
            400,
            "LimitExceeded",
            "The following service limits were exceeded: vnic-count. Request a service limit increase from the service limits page in the console. ",
        );
        assert_eq!(tenancy.class(), ErrorClass::ServiceLimit);
        let vnic = service(400, "LimitExceeded", "VNIC already has the maximum of 31");
        assert_eq!(vnic.class(), ErrorClass::Capacity);
        assert!(vnic.is_limit_exceeded());
        assert!(
            !tenancy.is_limit_exceeded(),
            "a tenancy limit is not one full VNIC"
        );
        assert_eq!(
            service(400, "QuotaExceeded", "quota").class(),
            ErrorClass::ServiceLimit
        );
    }

    #[test]
    fn codes_map_to_what_the_api_reference_says_about_retrying() {
        let cases = [
            (404, "NotAuthorizedOrNotFound", ErrorClass::Permission),
            (403, "NotAuthorized", ErrorClass::Permission),
            (
                400,
                "RelatedResourceNotAuthorizedOrNotFound",
                ErrorClass::Permission,
            ),
            (401, "NotAuthenticated", ErrorClass::Authentication),
            (400, "InvalidParameter", ErrorClass::Request),
            (400, "CannotParseRequest", ErrorClass::Request),
            (409, "Conflict", ErrorClass::Request),
            (409, "IncorrectState", ErrorClass::InTransition),
            (429, "TooManyRequests", ErrorClass::Throttled),
            (500, "InternalServerError", ErrorClass::Unavailable),
            (503, "ServiceUnavailable", ErrorClass::Unavailable),
        ];
        for (status, code, class) in cases {
            let error = service(status, code, "m");
            assert_eq!(error.class(), class, "{status} {code}");
            assert_eq!(class.is_transient(), error.class().is_transient());
        }
        let timeout = OciError::Timeout {
            operation: "AttachVnic",
            timeout: Duration::from_secs(1),
        };
        assert_eq!(timeout.class(), ErrorClass::Unavailable);
        let retried = OciError::RetriesExhausted {
            operation: "CreatePrivateIp",
            attempts: 3,
            elapsed: Duration::from_secs(1),
            committed: false,
            last: Box::new(service(429, "TooManyRequests", "m")),
        };
        assert_eq!(retried.class(), ErrorClass::Throttled);
        let held = OciError::HeldBack {
            operation: "CreatePrivateIp",
            ready_in: Duration::from_secs(9),
        };
        assert_eq!(held.class(), ErrorClass::Throttled);
        assert!(!held.may_have_committed(), "nothing was sent");
        let waiting = OciError::Auth {
            operation: "GetVnic",
            source: AuthError::Timeout { budget_ms: 100 },
        };
        assert_eq!(waiting.class(), ErrorClass::Unavailable);
    }
}
