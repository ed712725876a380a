//! The listening side: routes, shared state, faults, events and the in-process handle.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use rsa::RsaPublicKey;
use rsa::pkcs1::DecodeRsaPublicKey as _;
use rsa::pkcs8::DecodePublicKey as _;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::config::{FaultKind, FaultRule, Faults, RateLimit, SimConfig};
use super::iam::Policy;
use super::pki::{Pki, PkiError};
use super::state::{ApiError, Cloud};
use super::throttle::Bucket;
use super::workreq::WorkRequest;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("invalid simulator configuration: {0}")]
    Config(String),
    #[error("cannot read API key {path}: {source}")]
    KeyFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse API key of {key_id}")]
    KeyParse { key_id: String },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot generate the certificate chain: {0}")]
    Pki(#[from] PkiError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Attached,
    Detached,
}

/// A VNIC appeared on or left the instance: what the lab needs to create or remove its interface.
#[derive(Debug, Clone, Serialize)]
pub struct VnicEvent {
    pub seq: u64,
    pub kind: EventKind,
    /// The instance the VNIC is attached to (several share one simulator).
    pub instance_id: String,
    pub attachment_id: String,
    pub vnic_id: String,
    pub nic_index: u32,
    pub vlan_tag: u32,
    pub mac: String,
    pub private_ip: String,
    pub subnet_cidr: String,
    pub virtual_router_ip: String,
}

type RetryTokens = HashMap<(&'static str, String), (Bytes, Value)>;

pub(super) struct Shared {
    pub cloud: Mutex<Cloud>,
    pub faults: Mutex<Faults>,
    pub pki: Pki,
    pub api_keys: Mutex<HashMap<String, RsaPublicKey>>,
    /// (operation, token) → (request body, answer): `opc-retry-token` idempotency.
    pub retry_tokens: Mutex<RetryTokens>,
    pub events_tx: broadcast::Sender<VnicEvent>,
    pub events: Mutex<Vec<VnicEvent>>,
    pub federations: Mutex<u64>,
    /// Session tokens of federations numbered up to this one are revoked (`POST
    /// /admin/revoke-tokens`): they answer 401 as expired ones do.
    pub revoked_through: Mutex<u64>,
    /// `None` allows every operation.
    pub policy: Mutex<Option<Policy>>,
    /// Requests per operation (as [`super::core::operation`] names them), faulted or not.
    pub calls: Mutex<BTreeMap<String, u64>>,
    /// Requests per operation that IAM denied.
    pub denied: Mutex<BTreeMap<String, u64>>,
    /// States before each change, for the stale-read mode.
    pub history: Mutex<VecDeque<(Instant, Cloud)>>,
    /// The tenancy-wide request budget (`None`: unlimited).
    pub throttle: Mutex<Option<Bucket>>,
    /// Requests per operation answered 429 by the tenancy-wide budget.
    pub throttled: Mutex<BTreeMap<String, u64>>,
    /// Work requests of the bulk calls, by OCID.
    pub work_requests: Mutex<BTreeMap<String, WorkRequest>>,
}

/// Locks ignoring poison: a panicking handler must not take the whole simulator down.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    fn revoke_tokens(&self) {
        let issued = *lock(&self.federations);
        *lock(&self.revoked_through) = issued;
        tracing::info!(
            issued,
            "every session token issued so far is revoked (admin)"
        );
    }

    /// Whether the token with this `jti` (`sim-token-N`) was revoked.
    pub fn is_revoked(&self, jti: &str) -> bool {
        let n = jti
            .strip_prefix("sim-token-")
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        n <= *lock(&self.revoked_through)
    }

    /// The simulator's clock: the real one moved by [`Faults::clock_skew_s`].
    pub fn clock(&self) -> std::time::SystemTime {
        let skew = lock(&self.faults).clock_skew_s;
        let now = std::time::SystemTime::now();
        let by = Duration::from_secs(skew.unsigned_abs());
        if skew >= 0 { now + by } else { now - by }
    }

    /// Saves the state about to change, while stale reads are on.
    pub fn remember(&self, cloud: &Cloud) {
        if lock(&self.faults).stale_read_ms == 0 {
            return;
        }
        lock(&self.history).push_back((Instant::now(), cloud.clone()));
    }

    /// The state as it was `stale_read_ms` ago: the one saved just before the first change
    /// after that moment. `None` when stale reads are off or nothing changed since.
    pub fn stale_view(&self) -> Option<Cloud> {
        let ms = lock(&self.faults).stale_read_ms;
        if ms == 0 {
            return None;
        }
        let at = Instant::now().checked_sub(Duration::from_millis(ms))?;
        let mut history = lock(&self.history);
        while history.front().is_some_and(|(t, _)| *t <= at) {
            history.pop_front();
        }
        history.front().map(|(_, past)| past.clone())
    }

    pub fn emit(&self, kind: EventKind, cloud: &Cloud, attachment_id: &str) {
        let Some(a) = cloud.attachments.get(attachment_id) else {
            return;
        };
        let Some(vnic) = cloud.vnics.get(&a.vnic_id) else {
            return;
        };
        let Ok(subnet) = cloud.subnet(&a.subnet_id) else {
            return;
        };
        let ip = cloud
            .private_ips
            .values()
            .find(|p| p.vnic_id == a.vnic_id && p.is_primary);
        let mut events = lock(&self.events);
        let event = VnicEvent {
            seq: events.len() as u64 + 1,
            kind,
            instance_id: a.instance_id.clone(),
            attachment_id: a.id.clone(),
            vnic_id: a.vnic_id.clone(),
            nic_index: a.nic_index,
            vlan_tag: a.vlan_tag,
            mac: vnic.mac.clone(),
            private_ip: ip.map(|p| p.ip.to_string()).unwrap_or_default(),
            subnet_cidr: subnet.cidr.to_string(),
            virtual_router_ip: subnet.router_ip().to_string(),
        };
        events.push(event.clone());
        // No subscriber is fine: the admin endpoint keeps the history.
        let _ = self.events_tx.send(event);
    }
}

/// A running simulator. Dropping it stops the server.
pub struct Simulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(super) fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        axum::Json(json!({"code": e.code, "message": e.message})),
    )
        .into_response()
}

impl Simulator {
    /// Starts serving on `listen` (e.g. `127.0.0.1:0` for any free port).
    pub async fn start(config: SimConfig, listen: &str) -> Result<Self, SimError> {
        let mut api_keys = HashMap::new();
        for key in &config.api_keys {
            let pem = match (&key.public_key_pem, &key.public_key_file) {
                (Some(pem), _) => pem.clone(),
                (None, Some(path)) => {
                    std::fs::read_to_string(path).map_err(|source| SimError::KeyFile {
                        path: path.clone(),
                        source,
                    })?
                }
                (None, None) => {
                    return Err(SimError::Config(format!(
                        "API key {} has no public key",
                        key.key_id
                    )));
                }
            };
            api_keys.insert(key.key_id.clone(), parse_public_key(&pem, &key.key_id)?);
        }
        let pki = {
            let (t, i, c) = (
                config.tenancy_id.clone(),
                config.instance_id.clone(),
                config.compartment_id.clone(),
            );
            tokio::task::spawn_blocking(move || Pki::generate(&t, &i, &c))
                .await
                .expect("key generation does not panic")?
        };
        let faults = config.faults.clone();
        let throttle = config.tenancy_rate_limit.clone().map(Bucket::new);
        let policy = config
            .policy
            .as_deref()
            .map(Policy::parse)
            .transpose()
            .map_err(SimError::Config)?;
        let cloud = Cloud::new(config).map_err(SimError::Config)?;
        let shared = Arc::new(Shared {
            cloud: Mutex::new(cloud),
            faults: Mutex::new(faults),
            pki,
            api_keys: Mutex::new(api_keys),
            retry_tokens: Mutex::new(HashMap::new()),
            events_tx: broadcast::channel(256).0,
            events: Mutex::new(Vec::new()),
            federations: Mutex::new(0),
            revoked_through: Mutex::new(0),
            policy: Mutex::new(policy),
            calls: Mutex::new(BTreeMap::new()),
            denied: Mutex::new(BTreeMap::new()),
            history: Mutex::new(VecDeque::new()),
            throttle: Mutex::new(throttle),
            throttled: Mutex::new(BTreeMap::new()),
            work_requests: Mutex::new(BTreeMap::new()),
        });
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|source| SimError::Bind {
                addr: listen.to_owned(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| SimError::Bind {
            addr: listen.to_owned(),
            source,
        })?;
        let app = router(shared.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "simulator server stopped");
            }
        });
        tracing::info!(%addr, "OCI simulator listening");
        Ok(Self { addr, shared, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// `http://127.0.0.1:port` — the federation endpoint's base (`/v1/x509`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
    /// IMDS v2 base, `…/opc/v2/`.
    pub fn imds_url(&self) -> String {
        format!("http://{}/opc/v2/", self.addr)
    }
    /// IMDS v2 base of instance `n` (0 is the first, also at [`Simulator::imds_url`]).
    pub fn imds_url_of(&self, n: u32) -> String {
        format!("http://{}/instances/{n}/opc/v2/", self.addr)
    }
    /// Every instance's OCID, in the order [`Simulator::imds_url_of`] numbers them.
    pub fn instance_ids(&self) -> Vec<String> {
        lock(&self.shared.cloud).cfg.instance_ids()
    }
    /// Sets (or with `None` lifts) the tenancy-wide request budget; the bucket starts full.
    pub fn set_rate_limit(&self, limit: Option<RateLimit>) {
        *lock(&self.shared.throttle) = limit.map(Bucket::new);
    }
    /// Requests per operation the tenancy-wide budget answered 429.
    pub fn throttled(&self) -> BTreeMap<String, u64> {
        lock(&self.shared.throttled).clone()
    }
    /// Core API base, `…/20160918/`.
    pub fn core_url(&self) -> String {
        format!("http://{}/20160918/", self.addr)
    }
    pub fn config(&self) -> SimConfig {
        lock(&self.shared.cloud).cfg.clone()
    }
    pub fn set_faults(&self, faults: Faults) {
        *lock(&self.shared.faults) = faults;
    }
    /// Grants `statements` (see [`SimConfig::policy`]); `None` allows everything.
    pub fn set_policy(&self, statements: Option<&[String]>) -> Result<(), SimError> {
        let policy = statements
            .map(Policy::parse)
            .transpose()
            .map_err(SimError::Config)?;
        *lock(&self.shared.policy) = policy;
        Ok(())
    }
    /// Requests per operation since the start or the last [`Simulator::reset_calls`].
    pub fn calls(&self) -> BTreeMap<String, u64> {
        lock(&self.shared.calls).clone()
    }
    /// Requests per operation that IAM denied.
    pub fn denied(&self) -> BTreeMap<String, u64> {
        lock(&self.shared.denied).clone()
    }
    pub fn reset_calls(&self) {
        lock(&self.shared.calls).clear();
        lock(&self.shared.denied).clear();
        lock(&self.shared.throttled).clear();
    }
    /// A new instance certificate and key in IMDS (OCI rotates them); sessions federated with
    /// the old one keep working until their tokens expire.
    pub async fn rotate_leaf(&self) -> Result<(), SimError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.pki.rotate_leaf())
            .await
            .expect("key generation does not panic")?;
        Ok(())
    }
    pub fn register_api_key(&self, key_id: &str, key: RsaPublicKey) {
        lock(&self.shared.api_keys).insert(key_id.to_owned(), key);
    }
    pub fn subscribe(&self) -> broadcast::Receiver<VnicEvent> {
        self.shared.events_tx.subscribe()
    }
    /// How many session tokens `/v1/x509` has issued.
    pub fn federations(&self) -> u64 {
        *lock(&self.shared.federations)
    }
    /// Revokes every session token issued so far (as `POST /admin/revoke-tokens`).
    pub fn revoke_tokens(&self) {
        self.shared.revoke_tokens();
    }
    /// The state as the admin endpoint shows it.
    pub fn snapshot(&self) -> Value {
        snapshot(&self.shared)
    }
    /// The instance's leaf certificate (PEM), as IMDS serves it.
    pub fn leaf_certificate_pem(&self) -> String {
        self.shared.pki.leaf().cert_pem
    }
}

fn parse_public_key(pem: &str, key_id: &str) -> Result<RsaPublicKey, SimError> {
    RsaPublicKey::from_public_key_pem(pem)
        .or_else(|_| RsaPublicKey::from_pkcs1_pem(pem))
        .map_err(|_| SimError::KeyParse {
            key_id: key_id.to_owned(),
        })
}

fn snapshot(shared: &Shared) -> Value {
    let cloud = lock(&shared.cloud);
    json!({
        "attachments": cloud.attachments.values().map(|a| cloud.attachment_json(a)).collect::<Vec<_>>(),
        "vnics": cloud.vnics.values().map(|v| cloud.vnic_json(v)).collect::<Vec<_>>(),
        "privateIps": cloud.private_ips.values().map(|p| cloud.private_ip_json(p)).collect::<Vec<_>>(),
        "subnets": cloud.subnets.iter().map(|s| cloud.subnet_json(s)).collect::<Vec<_>>(),
        "vcn": cloud.vcn_json(),
        "faults": *lock(&shared.faults),
    })
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/opc/v2/instance", get(imds_instance))
        .route("/opc/v2/instance/", get(imds_instance))
        .route("/opc/v2/instance/region", get(imds_region))
        .route("/opc/v2/vnics", get(imds_vnics))
        .route("/opc/v2/vnics/", get(imds_vnics))
        .route("/opc/v2/identity/{file}", get(imds_identity))
        .route("/instances/{n}/opc/v2/instance", get(imds_instance_of))
        .route("/instances/{n}/opc/v2/instance/", get(imds_instance_of))
        .route("/instances/{n}/opc/v2/instance/region", get(imds_region))
        .route("/instances/{n}/opc/v2/vnics", get(imds_vnics_of))
        .route("/instances/{n}/opc/v2/vnics/", get(imds_vnics_of))
        .route(
            "/instances/{n}/opc/v2/identity/{file}",
            get(imds_identity_of),
        )
        .route("/v1/x509", post(super::federation::x509))
        .route("/20160918/{*path}", any(super::core::handle))
        .route("/admin/faults", get(get_faults).put(put_faults))
        .route("/admin/state", get(admin_state))
        .route("/admin/events", get(admin_events))
        .route("/admin/api-keys", post(admin_api_key))
        .route("/admin/policy", get(get_policy).put(put_policy))
        .route("/admin/calls", get(admin_calls).delete(reset_calls))
        .route("/admin/rate-limit", axum::routing::put(put_rate_limit))
        .route("/admin/rotate-leaf", post(admin_rotate_leaf))
        .route("/admin/revoke-tokens", post(admin_revoke_tokens))
        .route("/admin/vnicAttachments", post(admin_attach))
        .route(
            "/admin/vnicAttachments/{id}",
            axum::routing::delete(admin_detach),
        )
        .route(
            "/admin/privateIps/{id}",
            axum::routing::put(admin_update_ip),
        )
        .route("/admin/vnics/{id}", axum::routing::put(admin_update_vnic))
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            fault_rules,
        ))
        .layer(axum::middleware::map_response(add_request_id))
        .with_state(shared)
}

/// Counts every request by operation and applies the per-operation fault rules, before the
/// handler (nothing happens) or after it (the operation took effect, the answer is lost).
async fn fault_rules(
    State(s): State<Arc<Shared>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if request.uri().path().starts_with("/admin/") {
        return next.run(request).await;
    }
    let op = super::core::operation(request.method(), request.uri().path());
    *lock(&s.calls).entry(op.to_owned()).or_default() += 1;
    let uri = request.uri().clone();
    if let Some(rule) = fire(&s, op, &uri, false) {
        return match rule.kind {
            FaultKind::Hang => std::future::pending().await,
            FaultKind::Status => fault_status(&rule),
            // Nothing was done; the answer is garbage (a proxy's page, a cut connection).
            FaultKind::Truncate => (StatusCode::OK, "{\"id\": \"ocid1.").into_response(),
        };
    }
    let response = next.run(request).await;
    if !response.status().is_success() {
        return response;
    }
    let Some(rule) = fire(&s, op, &uri, true) else {
        return response;
    };
    tracing::info!(op, kind = ?rule.kind, "losing the answer of a committed request (injected)");
    match rule.kind {
        FaultKind::Hang => std::future::pending().await,
        FaultKind::Status => fault_status(&rule),
        FaultKind::Truncate => {
            let (mut parts, body) = response.into_parts();
            let bytes = axum::body::to_bytes(body, usize::MAX)
                .await
                .unwrap_or_default();
            parts.headers.remove(axum::http::header::CONTENT_LENGTH);
            Response::from_parts(
                parts,
                axum::body::Body::from(bytes.slice(..bytes.len() / 2)),
            )
        }
    }
}

/// The first rule for `op` in this phase that fires (rolling its rate, counting down `times`).
fn fire(s: &Shared, op: &str, uri: &Uri, after_commit: bool) -> Option<FaultRule> {
    let mut faults = lock(&s.faults);
    for rule in &mut faults.rules {
        if rule.after_commit != after_commit || (rule.op != "*" && rule.op != op) {
            continue;
        }
        if rule.resource.as_deref().is_some_and(|id| !names(uri, id)) {
            continue;
        }
        if rule.times == Some(0) {
            continue;
        }
        if rule.rate < 1.0 && rand::random::<f64>() >= rule.rate {
            continue;
        }
        if let Some(n) = rule.times.as_mut() {
            *n -= 1;
        }
        return Some(rule.clone());
    }
    None
}

/// Whether the request names the resource `id`: a path segment, or a query parameter's value.
fn names(uri: &Uri, id: &str) -> bool {
    let in_path = uri.path().split('/').any(|segment| segment == id);
    let query: Option<Query<HashMap<String, String>>> = Query::try_from_uri(uri).ok();
    let in_query = query.is_some_and(|q| q.values().any(|value| value == id));
    in_path || in_query
}

fn fault_status(rule: &FaultRule) -> Response {
    let status = StatusCode::from_u16(rule.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        axum::Json(json!({"code": rule.code, "message": rule.message.as_deref().unwrap_or("injected fault")})),
    )
        .into_response()
}

async fn get_policy(State(s): State<Arc<Shared>>) -> Response {
    let granted = lock(&s.policy).is_some();
    axum::Json(json!({ "restricted": granted })).into_response()
}

/// `PUT /admin/policy` with a list of statements, or `null` to allow everything.
async fn put_policy(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    let parsed = serde_json::from_slice::<Option<Vec<String>>>(&body)
        .map_err(|e| e.to_string())
        .and_then(|statements| statements.as_deref().map(Policy::parse).transpose());
    match parsed {
        Ok(policy) => {
            *lock(&s.policy) = policy;
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => error_response(&ApiError::new(400, "InvalidParameter", e)),
    }
}

async fn admin_calls(State(s): State<Arc<Shared>>) -> Response {
    axum::Json(json!({"calls": *lock(&s.calls), "denied": *lock(&s.denied), "throttled": *lock(&s.throttled)}))
        .into_response()
}

async fn reset_calls(State(s): State<Arc<Shared>>) -> Response {
    lock(&s.calls).clear();
    lock(&s.denied).clear();
    lock(&s.throttled).clear();
    StatusCode::NO_CONTENT.into_response()
}

/// `PUT /admin/rate-limit` with `{per_second, burst, message?}`, or `null` to lift it.
async fn put_rate_limit(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    match serde_json::from_slice::<Option<RateLimit>>(&body) {
        Ok(limit) => {
            tracing::info!(?limit, "tenancy-wide rate limit changed");
            *lock(&s.throttle) = limit.map(Bucket::new);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => error_response(&ApiError::new(400, "InvalidParameter", e.to_string())),
    }
}

async fn admin_revoke_tokens(State(s): State<Arc<Shared>>) -> Response {
    s.revoke_tokens();
    StatusCode::NO_CONTENT.into_response()
}

async fn admin_rotate_leaf(State(s): State<Arc<Shared>>) -> Response {
    let shared = s.clone();
    match tokio::task::spawn_blocking(move || shared.pki.rotate_leaf()).await {
        Ok(Ok(_)) => StatusCode::NO_CONTENT.into_response(),
        _ => error_response(&ApiError::new(
            500,
            "InternalServerError",
            "cannot rotate the leaf",
        )),
    }
}

fn answer(result: Result<(StatusCode, Value, Option<String>), ApiError>) -> Response {
    match result {
        Ok((StatusCode::NO_CONTENT, ..)) => StatusCode::NO_CONTENT.into_response(),
        Ok((status, value, _)) => (status, axum::Json(value)).into_response(),
        Err(e) => error_response(&e),
    }
}

/// Another actor (a person, Terraform) attaches a VNIC to the instance: `{subnetId}`, untagged.
async fn admin_attach(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return error_response(&ApiError::new(
            400,
            "InvalidParameter",
            "expected {subnetId}",
        ));
    };
    let instance = request["instanceId"]
        .as_str()
        .map_or_else(|| lock(&s.cloud).cfg.instance_id.clone(), str::to_owned);
    let details = json!({
        "instanceId": instance,
        "displayName": request["displayName"].as_str().unwrap_or("attached by someone else"),
        "createVnicDetails": {"subnetId": request["subnetId"]},
        "nicIndex": request["nicIndex"],
    });
    s.remember(&lock(&s.cloud));
    answer(super::core::attach(&s, details.to_string().as_bytes()))
}

async fn admin_detach(
    State(s): State<Arc<Shared>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    s.remember(&lock(&s.cloud));
    answer(super::core::detach(&s, &id))
}

/// Another actor edits a private IP: `{vnicId}` moves it, `{freeformTags}` replaces its tags.
async fn admin_update_ip(
    State(s): State<Arc<Shared>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    body: Bytes,
) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return error_response(&ApiError::new(400, "InvalidParameter", "body is not JSON"));
    };
    let mut cloud = lock(&s.cloud);
    s.remember(&cloud);
    match cloud.update_private_ip(&id, &request) {
        Ok(()) => axum::Json(cloud.private_ip_json(&cloud.private_ips[&id])).into_response(),
        Err(e) => error_response(&e),
    }
}

async fn admin_update_vnic(
    State(s): State<Arc<Shared>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    body: Bytes,
) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return error_response(&ApiError::new(400, "InvalidParameter", "body is not JSON"));
    };
    let mut cloud = lock(&s.cloud);
    s.remember(&cloud);
    match cloud.update_vnic(&id, &request) {
        Ok(()) => axum::Json(cloud.vnic_json(&cloud.vnics[&id])).into_response(),
        Err(e) => error_response(&e),
    }
}

/// Every OCI answer carries an `opc-request-id`, errors included.
async fn add_request_id(mut response: Response) -> Response {
    let id: String = {
        use rand::Rng as _;
        let n: u128 = rand::thread_rng().r#gen();
        format!("sim/{n:032X}")
    };
    response.headers_mut().insert(
        "opc-request-id",
        HeaderValue::from_str(&id).expect("hex is a valid header"),
    );
    response
}

/// IMDS v2 wants `Authorization: Bearer Oracle` and refuses proxied requests.
fn imds_guard(headers: &HeaderMap) -> Result<(), Box<Response>> {
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer Oracle") {
        let denied = (
            StatusCode::UNAUTHORIZED,
            "IMDS v2 requires Authorization: Bearer Oracle",
        );
        return Err(Box::new(denied.into_response()));
    }
    if headers.contains_key("forwarded")
        || headers
            .keys()
            .any(|k| k.as_str().starts_with("x-forwarded-"))
    {
        return Err(Box::new(
            (StatusCode::FORBIDDEN, "forwarded requests are refused").into_response(),
        ));
    }
    Ok(())
}

async fn imds_instance(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    instance_document(&s, &headers, 0)
}

async fn imds_instance_of(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    axum::extract::Path(n): axum::extract::Path<usize>,
) -> Response {
    instance_document(&s, &headers, n)
}

/// The instance's OCID for IMDS path number `n`, or the 404 IMDS answers for no instance.
fn instance_of(cloud: &Cloud, n: usize) -> Result<String, Box<Response>> {
    cloud.cfg.instance_ids().into_iter().nth(n).ok_or_else(|| {
        Box::new((StatusCode::NOT_FOUND, format!("no instance {n}")).into_response())
    })
}

fn instance_document(s: &Shared, headers: &HeaderMap, n: usize) -> Response {
    if let Err(r) = imds_guard(headers) {
        return *r;
    }
    let cloud = lock(&s.cloud);
    let id = match instance_of(&cloud, n) {
        Ok(id) => id,
        Err(r) => return *r,
    };
    let name = if n == 0 {
        "vcnpath-sim-node".to_owned()
    } else {
        format!("vcnpath-sim-node-{n}")
    };
    let c = &cloud.cfg;
    axum::Json(json!({
        "id": id, "displayName": name, "compartmentId": c.compartment_id,
        "availabilityDomain": c.availability_domain, "faultDomain": "FAULT-DOMAIN-1", "region": c.region_short,
        "canonicalRegionName": c.region,
        "regionInfo": {"realmKey": "oc1", "realmDomainComponent": c.realm_domain, "regionKey": c.region_short.to_uppercase(), "regionIdentifier": c.region},
        "shape": c.shape,
        "shapeConfig": {"ocpus": c.ocpus, "memoryInGBs": c.ocpus * 16.0, "networkingBandwidthInGbps": c.ocpus, "maxVnicAttachments": c.max_vnic_attachments},
        "state": "Running", "timeCreated": 1_700_000_000_000_u64, "metadata": {}, "freeformTags": {}, "definedTags": {},
    }))
    .into_response()
}

async fn imds_region(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(r) = imds_guard(&headers) {
        return *r;
    }
    lock(&s.cloud).cfg.region_short.clone().into_response()
}

async fn imds_vnics(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    vnics_document(&s, &headers, 0)
}

async fn imds_vnics_of(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    axum::extract::Path(n): axum::extract::Path<usize>,
) -> Response {
    vnics_document(&s, &headers, n)
}

fn vnics_document(s: &Shared, headers: &HeaderMap, n: usize) -> Response {
    if let Err(r) = imds_guard(headers) {
        return *r;
    }
    let cloud = lock(&s.cloud);
    let instance = match instance_of(&cloud, n) {
        Ok(id) => id,
        Err(r) => return *r,
    };
    // The primary VNIC first (cloud-init configures `vnics[0]` as the primary), then the
    // others in the order they were attached; ids come from one counter, so id order is
    // creation order.
    let mut attached: Vec<_> = cloud
        .attachments
        .values()
        .filter(|a| a.instance_id == instance && a.state == super::state::AttachmentState::Attached)
        .collect();
    attached.sort_by_key(|a| {
        (
            !cloud.vnics.get(&a.vnic_id).is_some_and(|v| v.is_primary),
            a.id.clone(),
        )
    });
    let vnics: Vec<Value> = attached
        .iter()
        .filter_map(|a| {
            let vnic = cloud.vnics.get(&a.vnic_id)?;
            let subnet = cloud.subnet(&a.subnet_id).ok()?;
            let ip = cloud.private_ips.values().find(|p| p.vnic_id == a.vnic_id && p.is_primary)?;
            let mut entry = json!({
                "vnicId": vnic.id, "privateIp": ip.ip.to_string(), "vlanTag": a.vlan_tag, "macAddr": vnic.mac,
                "virtualRouterIp": subnet.router_ip().to_string(), "subnetCidrBlock": subnet.cidr.to_string(),
            });
            if cloud.cfg.imds_nic_index {
                entry["nicIndex"] = json!(a.nic_index);
            }
            Some(entry)
        })
        .collect();
    axum::Json(vnics).into_response()
}

/// Every instance has its own identity: a leaf certificate naming it (`opc-instance:`),
/// from the one intermediate, made the first time its IMDS is asked for it.
async fn imds_identity_of(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    axum::extract::Path((n, file)): axum::extract::Path<(u32, String)>,
) -> Response {
    if n == 0 {
        return imds_identity(State(s), headers, axum::extract::Path(file)).await;
    }
    if let Err(r) = imds_guard(&headers) {
        return *r;
    }
    let (tenancy, compartment, instance) = {
        let cloud = lock(&s.cloud);
        let cfg = &cloud.cfg;
        (
            cfg.tenancy_id.clone(),
            cfg.compartment_id.clone(),
            cfg.instance_ids().get(n as usize).cloned(),
        )
    };
    let Some(instance) = instance else {
        return (StatusCode::NOT_FOUND, format!("no instance {n}")).into_response();
    };
    let shared = s.clone();
    let leaf = tokio::task::spawn_blocking(move || {
        shared.pki.leaf_of(n, &tenancy, &instance, &compartment)
    })
    .await
    .expect("certificate generation does not panic");
    let leaf = match leaf {
        Ok(leaf) => leaf,
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("instance {n}'s certificate: {e}"),
            )
                .into_response();
        }
    };
    match file.as_str() {
        "cert.pem" => leaf.cert_pem.into_response(),
        "key.pem" => leaf.key_pem.into_response(),
        "intermediate.pem" => s.pki.intermediate_pem.clone().into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn imds_identity(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    axum::extract::Path(file): axum::extract::Path<String>,
) -> Response {
    if let Err(r) = imds_guard(&headers) {
        return *r;
    }
    match file.as_str() {
        "cert.pem" => s.pki.leaf().cert_pem.into_response(),
        "key.pem" => s.pki.leaf().key_pem.into_response(),
        "intermediate.pem" => s.pki.intermediate_pem.clone().into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn get_faults(State(s): State<Arc<Shared>>) -> Response {
    axum::Json(lock(&s.faults).clone()).into_response()
}

async fn put_faults(
    State(s): State<Arc<Shared>>,
    axum::Json(faults): axum::Json<Faults>,
) -> Response {
    tracing::info!(?faults, "faults changed");
    *lock(&s.faults) = faults.clone();
    axum::Json(faults).into_response()
}

async fn admin_state(State(s): State<Arc<Shared>>) -> Response {
    axum::Json(snapshot(&s)).into_response()
}

/// Polling: `GET /admin/events?since=N` returns the events with `seq > N`.
async fn admin_events(
    State(s): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let since: u64 = q.get("since").and_then(|v| v.parse().ok()).unwrap_or(0);
    let events: Vec<VnicEvent> = lock(&s.events)
        .iter()
        .filter(|e| e.seq > since)
        .cloned()
        .collect();
    axum::Json(events).into_response()
}

#[derive(serde::Deserialize)]
struct NewApiKey {
    key_id: String,
    public_key_pem: String,
}

async fn admin_api_key(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    let Ok(new) = serde_json::from_slice::<NewApiKey>(&body) else {
        return error_response(&ApiError::new(
            400,
            "InvalidParameter",
            "expected {key_id, public_key_pem}",
        ));
    };
    match parse_public_key(&new.public_key_pem, &new.key_id) {
        Ok(key) => {
            lock(&s.api_keys).insert(new.key_id, key);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => error_response(&ApiError::new(400, "InvalidParameter", e.to_string())),
    }
}
