//! The Core Services API calls the agent makes, signed, rate limited, retried and paginated.
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, Response, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use super::auth::AuthProvider;
use super::class::ErrorClass;
use super::error::{AuthError, OciError};
use super::models::{
    AttachVnicDetails, AttachmentState, BulkCreatePrivateIpsDetails, BulkDeletePrivateIpsDetails,
    CreatePrivateIpDetails, PrivateIp, PrivateIpFilter, Subnet, Vcn, Vnic, VnicAttachment,
};
use super::retry::{RateLimit, RateLimiter, RetryPolicy};

/// Where the services of one region live.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// `https://iaas.<region>.<realm domain>/20160918/`
    pub core: Url,
    /// `https://auth.<region>.<realm domain>/`
    pub auth: Url,
}

impl Endpoints {
    /// E.g. `us-ashburn-1` and `oraclecloud.com` (IMDS `regionInfo.realmDomainComponent`).
    pub fn for_region(region: &str, realm_domain: &str) -> Result<Self, OciError> {
        let parse = |s: String| {
            Url::parse(&s).map_err(|_| OciError::Url {
                operation: "Endpoints",
                url: s,
            })
        };
        Ok(Self {
            core: parse(format!("https://iaas.{region}.{realm_domain}/20160918/"))?,
            auth: parse(format!("https://auth.{region}.{realm_domain}/"))?,
        })
    }

    /// Both services behind one base URL, as the simulator serves them (`http://127.0.0.1:port`).
    pub fn single(base: &str) -> Result<Self, OciError> {
        let base = if base.ends_with('/') {
            base.to_owned()
        } else {
            format!("{base}/")
        };
        let auth = Url::parse(&base).map_err(|_| OciError::Url {
            operation: "Endpoints",
            url: base.clone(),
        })?;
        let core = auth.join("20160918/").map_err(|_| OciError::Url {
            operation: "Endpoints",
            url: base,
        })?;
        Ok(Self { core, auth })
    }
}

/// The least of a call's budget an attempt must have left to be sent: OCI answers within
/// a second (the slowest call modelled, `CreatePrivateIp`, takes about 500 ms).
const LEAST_ANSWER_TIME: Duration = Duration::from_secs(1);
/// Attachment polling starts at this interval and doubles up to [`ATTACH_POLL_MAX`].
const ATTACH_POLL_FIRST: Duration = Duration::from_secs(1);
const ATTACH_POLL_MAX: Duration = Duration::from_secs(5);

/// A random `opc-retry-token`: the same token on a repeated create returns the first result.
pub fn new_retry_token() -> String {
    use rand::Rng as _;
    let bytes: [u8; 16] = rand::thread_rng().r#gen();
    bytes.iter().fold(String::with_capacity(32), |mut s, b| {
        use std::fmt::Write as _;
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[derive(Debug)]
pub struct CoreClient {
    http: reqwest::Client,
    base: Url,
    auth: Arc<dyn AuthProvider>,
    retry: RetryPolicy,
    limiter: RateLimiter,
    metrics: Arc<super::metrics::ApiMetrics>,
}

/// One request, rebuilt and re-signed for every attempt.
struct Call<'a> {
    operation: &'static str,
    method: Method,
    path: &'a str,
    query: Vec<(&'static str, String)>,
    body: Option<Vec<u8>>,
    retry_token: Option<&'a str>,
}

/// One attempt's answer, the credentials' generation it was signed with, and when the rate
/// limiter let it go.
struct Attempted {
    result: Result<Answer, OciError>,
    generation: u64,
    sent: Instant,
}

struct Answer {
    text: String,
    request_id: Option<String>,
    next_page: Option<String>,
}

impl CoreClient {
    pub fn new(
        http: reqwest::Client,
        endpoints: &Endpoints,
        auth: Arc<dyn AuthProvider>,
        retry: RetryPolicy,
        rate: RateLimit,
    ) -> Self {
        Self {
            http,
            base: endpoints.core.clone(),
            auth,
            retry,
            limiter: RateLimiter::new(rate),
            metrics: Arc::new(super::metrics::ApiMetrics::new(rate.per_second)),
        }
    }

    /// Attempts and latency per operation, for `/metrics`.
    pub fn metrics(&self) -> Arc<super::metrics::ApiMetrics> {
        Arc::clone(&self.metrics)
    }

    pub async fn attach_vnic(
        &self,
        details: &AttachVnicDetails,
        retry_token: &str,
    ) -> Result<VnicAttachment, OciError> {
        self.create("AttachVnic", "vnicAttachments", details, retry_token)
            .await
    }

    pub async fn get_vnic_attachment(&self, id: &str) -> Result<VnicAttachment, OciError> {
        self.get("GetVnicAttachment", &format!("vnicAttachments/{id}"))
            .await
    }

    pub async fn list_vnic_attachments(
        &self,
        compartment_id: &str,
        instance_id: Option<&str>,
    ) -> Result<Vec<VnicAttachment>, OciError> {
        let mut query = vec![("compartmentId", compartment_id.to_owned())];
        if let Some(instance) = instance_id {
            query.push(("instanceId", instance.to_owned()));
        }
        self.list("ListVnicAttachments", "vnicAttachments", query)
            .await
    }

    /// Detaching also deletes the VNIC and its secondary IPs.
    pub async fn detach_vnic(&self, id: &str) -> Result<(), OciError> {
        self.delete("DetachVnic", &format!("vnicAttachments/{id}"))
            .await
    }

    /// Polls until the attachment is ATTACHED (or fails if it ends DETACHED or `timeout` passes).
    pub async fn wait_attached(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<VnicAttachment, OciError> {
        let deadline = Instant::now() + timeout;
        let mut poll = ATTACH_POLL_FIRST;
        loop {
            let attachment = self.get_vnic_attachment(id).await?;
            match attachment.lifecycle_state {
                AttachmentState::Attached => return Ok(attachment),
                AttachmentState::Detaching | AttachmentState::Detached => {
                    return Err(OciError::Service {
                        operation: "WaitVnicAttached",
                        status: 409,
                        code: "IncorrectState".into(),
                        message: format!("attachment {id} is {:?}", attachment.lifecycle_state),
                        request_id: None,
                    });
                }
                AttachmentState::Attaching | AttachmentState::Unknown => {}
            }
            if Instant::now() >= deadline {
                return Err(OciError::Timeout {
                    operation: "WaitVnicAttached",
                    timeout,
                });
            }
            // OCI takes 10–30 s to attach: poll at 1 s, 2 s, 4 s, then every 5 s.
            tokio::time::sleep(poll.min(deadline.saturating_duration_since(Instant::now()))).await;
            poll = (poll * 2).min(ATTACH_POLL_MAX);
        }
    }

    pub async fn get_vnic(&self, id: &str) -> Result<Vnic, OciError> {
        self.get("GetVnic", &format!("vnics/{id}")).await
    }

    pub async fn create_private_ip(
        &self,
        details: &CreatePrivateIpDetails,
        retry_token: &str,
    ) -> Result<PrivateIp, OciError> {
        self.create("CreatePrivateIp", "privateIps", details, retry_token)
            .await
    }

    /// `BulkCreatePrivateIps`: OCI answers headers only, so the caller reads the result back
    /// with [`Self::list_private_ips`].
    pub async fn bulk_create_private_ips(
        &self,
        details: &BulkCreatePrivateIpsDetails,
        retry_token: &str,
    ) -> Result<(), OciError> {
        self.post_action(
            "BulkCreatePrivateIps",
            "privateIps/actions/bulkCreatePrivateIps",
            details,
            retry_token,
        )
        .await
    }

    pub async fn bulk_delete_private_ips(
        &self,
        details: &BulkDeletePrivateIpsDetails,
        retry_token: &str,
    ) -> Result<(), OciError> {
        self.post_action(
            "BulkDeletePrivateIps",
            "privateIps/actions/bulkDeletePrivateIps",
            details,
            retry_token,
        )
        .await
    }

    pub async fn list_private_ips(
        &self,
        filter: &PrivateIpFilter,
    ) -> Result<Vec<PrivateIp>, OciError> {
        let query = match filter {
            PrivateIpFilter::Vnic(vnic) => vec![("vnicId", vnic.clone())],
            PrivateIpFilter::Subnet {
                subnet_id,
                ip_address,
            } => {
                let mut q = vec![("subnetId", subnet_id.clone())];
                if let Some(ip) = ip_address {
                    q.push(("ipAddress", ip.clone()));
                }
                q
            }
        };
        self.list("ListPrivateIps", "privateIps", query).await
    }

    pub async fn get_private_ip(&self, id: &str) -> Result<PrivateIp, OciError> {
        self.get("GetPrivateIp", &format!("privateIps/{id}")).await
    }

    pub async fn delete_private_ip(&self, id: &str) -> Result<(), OciError> {
        self.delete("DeletePrivateIp", &format!("privateIps/{id}"))
            .await
    }

    pub async fn get_subnet(&self, id: &str) -> Result<Subnet, OciError> {
        self.get("GetSubnet", &format!("subnets/{id}")).await
    }

    pub async fn list_subnets(
        &self,
        compartment_id: &str,
        vcn_id: Option<&str>,
    ) -> Result<Vec<Subnet>, OciError> {
        let mut query = vec![("compartmentId", compartment_id.to_owned())];
        if let Some(vcn) = vcn_id {
            query.push(("vcnId", vcn.to_owned()));
        }
        self.list("ListSubnets", "subnets", query).await
    }

    pub async fn get_vcn(&self, id: &str) -> Result<Vcn, OciError> {
        self.get("GetVcn", &format!("vcns/{id}")).await
    }

    async fn get<T: DeserializeOwned>(
        &self,
        operation: &'static str,
        path: &str,
    ) -> Result<T, OciError> {
        let call = Call {
            operation,
            method: Method::GET,
            path,
            query: Vec::new(),
            body: None,
            retry_token: None,
        };
        let answer = self.execute(&call).await?;
        decode(operation, &answer)
    }

    async fn delete(&self, operation: &'static str, path: &str) -> Result<(), OciError> {
        let call = Call {
            operation,
            method: Method::DELETE,
            path,
            query: Vec::new(),
            body: None,
            retry_token: None,
        };
        self.execute(&call).await.map(drop)
    }

    async fn create<B: Serialize, T: DeserializeOwned>(
        &self,
        operation: &'static str,
        path: &str,
        body: &B,
        retry_token: &str,
    ) -> Result<T, OciError> {
        let body = serde_json::to_vec(body).expect("request models serialise");
        let call = Call {
            operation,
            method: Method::POST,
            path,
            query: Vec::new(),
            body: Some(body),
            retry_token: Some(retry_token),
        };
        let answer = self.execute(&call).await?;
        decode(operation, &answer)
    }

    /// A POST whose answer carries no body (OCI's `actions/…` calls).
    async fn post_action<B: Serialize>(
        &self,
        operation: &'static str,
        path: &str,
        body: &B,
        retry_token: &str,
    ) -> Result<(), OciError> {
        let body = serde_json::to_vec(body).expect("request models serialise");
        let call = Call {
            operation,
            method: Method::POST,
            path,
            query: Vec::new(),
            body: Some(body),
            retry_token: Some(retry_token),
        };
        self.execute(&call).await.map(drop)
    }

    /// Follows `opc-next-page` until the last page.
    async fn list<T: DeserializeOwned>(
        &self,
        operation: &'static str,
        path: &str,
        query: Vec<(&'static str, String)>,
    ) -> Result<Vec<T>, OciError> {
        let mut items = Vec::new();
        let mut call = Call {
            operation,
            method: Method::GET,
            path,
            query,
            body: None,
            retry_token: None,
        };
        loop {
            let answer = self.execute(&call).await?;
            let page: Vec<T> = decode(operation, &answer)?;
            items.extend(page);
            match answer.next_page {
                Some(page) => {
                    call.query.retain(|(k, _)| *k != "page");
                    call.query.push(("page", page));
                }
                None => return Ok(items),
            }
        }
    }

    async fn execute(&self, call: &Call<'_>) -> Result<Answer, OciError> {
        let started = Instant::now();
        let mut attempts = 0;
        let mut reauthenticated = false;
        // What the attempts so far came to: a create is repeated with its retry token if
        // any of them may have taken effect, not only the last.
        let mut committed = false;
        let mut last: Option<OciError> = None;
        loop {
            let Attempted {
                result,
                generation,
                sent,
            } = match self.attempt(call, started).await {
                Ok(sent) => sent,
                Err(OciError::HeldBack { ready_in, .. }) if last.is_some() => {
                    let error = last.take().expect("checked");
                    tracing::warn!(operation = call.operation, attempts, ?ready_in, error = %error, "OCI call failed; the node's slowed-down rate allows no retry within the call's budget");
                    return Err(gave_up(call, attempts, started, committed, error));
                }
                Err(error) => return Err(error),
            };
            attempts += 1;
            let error = match result {
                Ok(answer) => {
                    self.answered().await;
                    return Ok(answer);
                }
                Err(error) => error,
            };
            committed |= error.may_have_committed();
            if let Some(server_message) = clock_skew(&error) {
                // A new token would be refused the same way: say what to fix, once per call.
                tracing::error!(operation = call.operation, %server_message, "OCI refuses the node's clock; fix its time sync (chrony/NTP)");
                return Err(OciError::ClockSkew {
                    operation: call.operation,
                    server_message,
                });
            }
            if error.status() == Some(401)
                && !reauthenticated
                && self.auth.unauthorized(generation).await
            {
                reauthenticated = true;
                last = Some(error);
                continue;
            }
            let delay = self.retry.backoff(attempts - 1);
            if error.class() == ErrorClass::Throttled {
                // Every call of this node waits, not only this one's retry, and the node
                // slows down to what the tenancy has room for.
                let rate = self.limiter.throttled(sent, delay).await;
                self.metrics.set_rate_limit(rate);
                tracing::info!(operation = call.operation, calls_per_second = rate, pause = ?delay, "OCI throttled the node; it slows down");
            } else if matches!(error, OciError::Service { .. }) {
                self.answered().await;
            }
            let within_bounds = attempts < self.retry.max_attempts
                && started.elapsed() + delay < self.retry.total_budget;
            if !RetryPolicy::is_retryable(&error) || !within_bounds {
                tracing::warn!(operation = call.operation, attempts, error = %error, "OCI call failed");
                return Err(gave_up(call, attempts, started, committed, error));
            }
            tracing::debug!(operation = call.operation, attempts, ?delay, error = %error, "retrying OCI call");
            tokio::time::sleep(delay).await;
            last = Some(error);
        }
    }

    /// OCI answered without throttling: the limiter earns back rate.
    async fn answered(&self) {
        let rate = self.limiter.answered().await;
        self.metrics.set_rate_limit(rate);
    }

    /// One signed attempt. The outer error is not retryable (no credentials, bad URL).
    async fn attempt(&self, call: &Call<'_>, started: Instant) -> Result<Attempted, OciError> {
        let operation = call.operation;
        // An attempt goes out only while it can still be answered within the call's budget:
        // one sent at the budget's end would time out at once, and a create may take effect
        // at OCI all the same.
        let answer_time = self
            .retry
            .attempt_timeout
            .min(LEAST_ANSWER_TIME)
            .min(self.retry.total_budget / 2);
        let latest = started + self.retry.total_budget.saturating_sub(answer_time);
        let sent =
            self.limiter
                .acquire_by(latest)
                .await
                .map_err(|ready_in| OciError::HeldBack {
                    operation,
                    ready_in,
                })?;
        let attempt_started = Instant::now();
        // A refresh that hangs (IMDS, `/v1/x509`) must not hold the call past its budget.
        let remaining = self.retry.total_budget.saturating_sub(started.elapsed());
        let credentials = tokio::time::timeout(remaining, self.auth.credentials())
            .await
            .unwrap_or_else(|_| {
                Err(AuthError::Timeout {
                    budget_ms: self.retry.total_budget.as_millis() as u64,
                })
            })
            .map_err(|source| OciError::Auth { operation, source })?;
        let mut url = self.base.join(call.path).map_err(|_| OciError::Url {
            operation,
            url: format!("{}{}", self.base, call.path),
        })?;
        if !call.query.is_empty() {
            url.query_pairs_mut()
                .extend_pairs(call.query.iter().map(|(k, v)| (*k, v.as_str())));
        }
        let mut headers = HeaderMap::new();
        headers.insert("accept", HeaderValue::from_static("application/json"));
        if let Some(token) = call.retry_token {
            headers.insert(
                "opc-retry-token",
                HeaderValue::from_str(token).map_err(|_| OciError::Url {
                    operation,
                    url: url.to_string(),
                })?,
            );
        }
        let body = call.body.clone().unwrap_or_default();
        credentials
            .signer
            .sign(&call.method, &url, &mut headers, &body);
        let mut request = self.http.request(call.method.clone(), url).headers(headers);
        if call.body.is_some() {
            request = request.body(body);
        }
        // A hung attempt must not eat the whole budget of the call.
        let remaining = self.retry.total_budget.saturating_sub(started.elapsed());
        let timeout = self
            .retry
            .attempt_timeout
            .min(remaining)
            .max(Duration::from_millis(10));
        let result = tokio::time::timeout(timeout, async {
            let response = request
                .send()
                .await
                .map_err(|source| OciError::Transport { operation, source })?;
            let request_id = request_id(&response);
            if !response.status().is_success() {
                return Err(service_error(operation, response).await);
            }
            let next_page = response
                .headers()
                .get("opc-next-page")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let text = response
                .text()
                .await
                .map_err(|source| OciError::Transport { operation, source })?;
            Ok(Answer {
                text,
                request_id,
                next_page,
            })
        })
        .await
        .unwrap_or(Err(OciError::Timeout { operation, timeout }));
        let outcome = match &result {
            Ok(_) => "ok".to_owned(),
            Err(OciError::Service { code, .. }) => code.clone(),
            Err(OciError::Timeout { .. }) => "timeout".to_owned(),
            Err(_) => "transport".to_owned(),
        };
        self.metrics
            .record(operation, &outcome, attempt_started.elapsed());
        Ok(Attempted {
            result,
            generation: credentials.generation,
            sent,
        })
    }
}

/// How the call ended after `attempts` attempts: the one error, or the last with the count.
fn gave_up(
    call: &Call<'_>,
    attempts: u32,
    started: Instant,
    committed: bool,
    error: OciError,
) -> OciError {
    if attempts > 1 {
        OciError::RetriesExhausted {
            operation: call.operation,
            attempts,
            elapsed: started.elapsed(),
            committed,
            last: Box::new(error),
        }
    } else {
        error
    }
}

/// OCI's 401 for a request dated too far from its clock ("Date '…' is not within allowed
/// clock skew. Current '…', valid datetime range: […]", docs/oci.md): the message, if so.
fn clock_skew(error: &OciError) -> Option<String> {
    match error {
        OciError::Service {
            status: 401,
            message,
            ..
        } if message.contains("clock skew") => Some(message.clone()),
        _ => None,
    }
}

fn decode<T: DeserializeOwned>(operation: &'static str, answer: &Answer) -> Result<T, OciError> {
    serde_json::from_str(&answer.text).map_err(|source| OciError::Decode {
        operation,
        request_id: answer.request_id.clone(),
        source,
    })
}

pub(crate) fn request_id(response: &Response) -> Option<String> {
    response
        .headers()
        .get("opc-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Turns an error answer into a typed error; OCI's body is `{"code": …, "message": …}`.
pub(crate) async fn service_error(operation: &'static str, response: Response) -> OciError {
    #[derive(serde::Deserialize)]
    struct Body {
        code: String,
        #[serde(default)]
        message: String,
    }
    let status = response.status();
    let request_id = request_id(&response);
    let text = response.text().await.unwrap_or_default();
    let (code, message) = match serde_json::from_str::<Body>(&text) {
        Ok(body) => (body.code, body.message),
        Err(_) => (
            status
                .canonical_reason()
                .unwrap_or("Unknown")
                .replace(' ', ""),
            text.chars().take(200).collect(),
        ),
    };
    OciError::Service {
        operation,
        status: status.as_u16(),
        code,
        message,
        request_id,
    }
}
