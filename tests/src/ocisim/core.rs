//! The Core Services API subset under `/20160918`: authentication, faults, then the operation.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use rand::Rng as _;
use rsa::RsaPublicKey;
use rsa::pkcs8::DecodePublicKey as _;
use serde_json::{Value, json};

use super::server::{EventKind, Shared, error_response, lock};
use super::state::{ApiError, AttachmentState, Cloud, NewVnic};
use super::verify;
use super::workreq::{self, Bulk, WorkRequest};

type Answer = Result<(StatusCode, Value, Option<String>), ApiError>;

#[expect(
    clippy::too_many_lines,
    reason = "one flat route table reads better than split halves"
)]
pub(super) async fn handle(
    State(s): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(response) = throttle(&s, &method, &uri) {
        return response;
    }
    if let Some(response) = inject_faults(&s, &method, &uri).await {
        return response;
    }
    if let Err(reason) = authenticate(&s, &method, &uri, &headers, &body) {
        tracing::debug!(%method, %uri, reason, "rejecting unauthenticated request");
        return error_response(&ApiError::new(401, "NotAuthenticated", reason));
    }
    let query: HashMap<String, String> = Query::try_from_uri(&uri).map(|q| q.0).unwrap_or_default();
    let path = uri
        .path()
        .trim_start_matches("/20160918/")
        .trim_end_matches('/')
        .to_owned();
    let segments: Vec<&str> = path.split('/').collect();
    let op = operation(&method, uri.path());
    if let Some(policy) = lock(&s.policy).as_ref() {
        let missing = policy.missing(op);
        if !missing.is_empty() {
            tracing::debug!(op, ?missing, "IAM denies the request");
            *lock(&s.denied).entry(op.to_owned()).or_default() += 1;
            return error_response(&ApiError::new(
                404,
                "NotAuthorizedOrNotFound",
                "Authorization failed or requested resource not found.",
            ));
        }
    }
    let retry_token = headers
        .get("opc-retry-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if method != Method::GET {
        s.remember(&lock(&s.cloud));
    }
    // A list answers from the past in stale-read mode; everything else from the present.
    let stale = s.stale_view();
    let view = |f: &dyn Fn(&Cloud) -> Answer| match &stale {
        Some(past) => f(past),
        None => f(&lock(&s.cloud)),
    };
    let bulk = match (method.clone(), segments.as_slice()) {
        (Method::POST, ["privateIps", "actions", "bulkCreatePrivateIps"]) => Some(Bulk::Create),
        (Method::POST, ["privateIps", "actions", "bulkDeletePrivateIps"]) => Some(Bulk::Delete),
        _ => None,
    };
    if let Some(kind) = bulk {
        return bulk_call(&s, kind, retry_token, &body);
    }
    let answer = match (method.clone(), segments.as_slice()) {
        (Method::GET, ["workRequests", id]) => lock(&s.work_requests)
            .get(*id)
            .map(|w| ok(w.json()))
            .ok_or_else(|| ApiError::not_found("work request", id)),
        (Method::GET, ["workRequests", id, "errors"]) => match lock(&s.work_requests).get(*id) {
            Some(w) => paginate(
                w.errors_json().as_array().cloned().unwrap_or_default(),
                &query,
                lock(&s.cloud).cfg.page_size,
            ),
            None => Err(ApiError::not_found("work request", id)),
        },
        (Method::POST, ["vnicAttachments"]) => {
            idempotent(&s, "AttachVnic", retry_token, &body, || attach(&s, &body))
        }
        (Method::GET, ["vnicAttachments"]) => view(&|c| list_attachments(c, &query)),
        (Method::GET, ["vnicAttachments", id]) => get_attachment(&s, id),
        (Method::DELETE, ["vnicAttachments", id]) => detach(&s, id),
        (Method::GET, ["vnics", id]) => {
            let cloud = lock(&s.cloud);
            cloud
                .vnics
                .get(*id)
                .map(|v| ok(cloud.vnic_json(v)))
                .ok_or_else(|| ApiError::not_found("VNIC", id))
        }
        (Method::PUT, ["vnics", id]) => update(&s, &body, |cloud, body| {
            cloud.update_vnic(id, body)?;
            Ok(cloud.vnic_json(&cloud.vnics[*id]))
        }),
        (Method::POST, ["privateIps"]) => {
            idempotent(&s, "CreatePrivateIp", retry_token, &body, || {
                create_ip(&s, &body)
            })
        }
        (Method::GET, ["privateIps"]) => view(&|c| list_ips(c, &query)),
        (Method::GET, ["privateIps", id]) => {
            let cloud = lock(&s.cloud);
            cloud
                .private_ips
                .get(*id)
                .map(|p| ok(cloud.private_ip_json(p)))
                .ok_or_else(|| ApiError::not_found("private IP", id))
        }
        (Method::PUT, ["privateIps", id]) => update(&s, &body, |cloud, body| {
            cloud.update_private_ip(id, body)?;
            Ok(cloud.private_ip_json(&cloud.private_ips[*id]))
        }),
        (Method::DELETE, ["privateIps", id]) => {
            lock(&s.cloud).delete_private_ip(id).map(|()| no_content())
        }
        (Method::GET, ["subnets", id]) => {
            let cloud = lock(&s.cloud);
            cloud.subnet(id).map(|sub| ok(cloud.subnet_json(sub)))
        }
        (Method::GET, ["subnets"]) => view(&|c| list_subnets(c, &query)),
        (Method::GET, ["vcns", id]) => {
            let cloud = lock(&s.cloud);
            if *id == cloud.cfg.vcn.id {
                Ok(ok(cloud.vcn_json()))
            } else {
                Err(ApiError::not_found("VCN", id))
            }
        }
        _ => Err(ApiError::new(
            404,
            "NotAuthorizedOrNotFound",
            format!("{method} {} is not simulated", uri.path()),
        )),
    };
    match answer {
        Ok((status, value, next_page)) => {
            let mut response = if status == StatusCode::NO_CONTENT {
                status.into_response()
            } else {
                (status, axum::Json(value)).into_response()
            };
            if let Some(page) = next_page {
                response.headers_mut().insert(
                    "opc-next-page",
                    HeaderValue::from_str(&page).expect("page tokens are ASCII"),
                );
            }
            response
        }
        Err(e) => error_response(&e),
    }
}

/// The API reference's name of the operation a request makes: what faults and IAM key on.
/// `Imds` and `X509` name the metadata service and the federation endpoint.
pub(super) fn operation(method: &Method, path: &str) -> &'static str {
    if path.starts_with("/opc/") || (path.starts_with("/instances/") && path.contains("/opc/")) {
        return "Imds";
    }
    if path.starts_with("/v1/x509") {
        return "X509";
    }
    let path = path.trim_start_matches("/20160918/").trim_end_matches('/');
    let segments: Vec<&str> = path.split('/').collect();
    match (method.as_str(), segments.as_slice()) {
        ("POST", ["vnicAttachments"]) => "AttachVnic",
        ("GET", ["vnicAttachments"]) => "ListVnicAttachments",
        ("GET", ["vnicAttachments", _]) => "GetVnicAttachment",
        ("DELETE", ["vnicAttachments", _]) => "DetachVnic",
        ("GET", ["vnics", _]) => "GetVnic",
        ("PUT", ["vnics", _]) => "UpdateVnic",
        ("POST", ["privateIps"]) => "CreatePrivateIp",
        ("GET", ["privateIps"]) => "ListPrivateIps",
        ("GET", ["privateIps", _]) => "GetPrivateIp",
        ("PUT", ["privateIps", _]) => "UpdatePrivateIp",
        ("DELETE", ["privateIps", _]) => "DeletePrivateIp",
        ("POST", ["privateIps", "actions", "bulkCreatePrivateIps"]) => "BulkCreatePrivateIps",
        ("POST", ["privateIps", "actions", "bulkDeletePrivateIps"]) => "BulkDeletePrivateIps",
        ("GET", ["workRequests", _]) => "GetWorkRequest",
        ("GET", ["workRequests", _, "errors"]) => "ListWorkRequestErrors",
        ("GET", ["subnets", _]) => "GetSubnet",
        ("GET", ["subnets"]) => "ListSubnets",
        ("GET", ["vcns", _]) => "GetVcn",
        _ => "Unknown",
    }
}

fn update(
    s: &Shared,
    body: &[u8],
    apply: impl FnOnce(&mut Cloud, &Value) -> Result<Value, ApiError>,
) -> Answer {
    let body = json_body(body)?;
    let mut cloud = lock(&s.cloud);
    apply(&mut cloud, &body).map(ok)
}

fn ok(value: Value) -> (StatusCode, Value, Option<String>) {
    (StatusCode::OK, value, None)
}

fn no_content() -> (StatusCode, Value, Option<String>) {
    (StatusCode::NO_CONTENT, Value::Null, None)
}

/// The tenancy-wide budget: beyond it 429 `TooManyRequests`, whichever instance asks.
fn throttle(s: &Shared, method: &Method, uri: &Uri) -> Option<Response> {
    let mut bucket = lock(&s.throttle);
    let bucket = bucket.as_mut()?;
    if bucket.admit(std::time::Instant::now()) {
        return None;
    }
    let op = operation(method, uri.path());
    *lock(&s.throttled).entry(op.to_owned()).or_default() += 1;
    Some(error_response(&ApiError::new(
        429,
        "TooManyRequests",
        bucket.message().to_owned(),
    )))
}

/// A bulk call: checked at once, then run as a work request; the answer carries only
/// `opc-work-request-id` (and `opc-request-id`), as the SDK's response type reads it.
fn bulk_call(s: &Arc<Shared>, kind: Bulk, token: Option<String>, body: &Bytes) -> Response {
    let answer = idempotent(s, kind.operation(), token, body, || {
        start_bulk(s, kind, body)
    });
    match answer {
        Ok((_, accepted, _)) => {
            let status =
                StatusCode::from_u16(lock(&s.cloud).cfg.bulk.status).unwrap_or(StatusCode::OK);
            let mut response = status.into_response();
            let id = accepted["workRequestId"].as_str().unwrap_or_default();
            response.headers_mut().insert(
                "opc-work-request-id",
                HeaderValue::from_str(id).expect("OCIDs are ASCII"),
            );
            response
        }
        Err(e) => error_response(&e),
    }
}

fn start_bulk(s: &Arc<Shared>, kind: Bulk, body: &[u8]) -> Answer {
    let body = json_body(body)?;
    let mut cloud = lock(&s.cloud);
    let job = workreq::accept(&cloud, kind, &body, cloud.cfg.bulk.max_items)?;
    let id = cloud.id("workrequest");
    let delay = Duration::from_millis(cloud.cfg.bulk.work_request_ms);
    let request = WorkRequest::accepted(id.clone(), kind, cloud.cfg.compartment_id.clone());
    lock(&s.work_requests).insert(id.clone(), request);
    if delay.is_zero() {
        let outcome = workreq::run(&mut cloud, &job);
        if let Some(w) = lock(&s.work_requests).get_mut(&id) {
            w.finish(outcome);
        }
    } else {
        drop(cloud);
        let (shared, id) = (s.clone(), id.clone());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let mut cloud = lock(&shared.cloud);
            shared.remember(&cloud);
            let outcome = workreq::run(&mut cloud, &job);
            if let Some(w) = lock(&shared.work_requests).get_mut(&id) {
                w.finish(outcome);
            }
        });
    }
    Ok(ok(json!({ "workRequestId": id })))
}

async fn inject_faults(s: &Shared, method: &Method, uri: &Uri) -> Option<Response> {
    let faults = lock(&s.faults).clone();
    let creates_ip =
        method == Method::POST && uri.path().trim_end_matches('/').ends_with("/privateIps");
    let latency = faults.latency_ms
        + if creates_ip {
            faults.create_private_ip_ms
        } else {
            0
        };
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let roll = |rate: f64| rate > 0.0 && rand::thread_rng().r#gen::<f64>() < rate;
    if roll(faults.rate_hang) {
        // Never answer; the connection is dropped when the client gives up or the simulator stops.
        std::future::pending::<()>().await;
    }
    if roll(faults.rate_429) {
        return Some(error_response(&ApiError::new(
            429,
            "TooManyRequests",
            "Too many requests for the tenancy (injected)",
        )));
    }
    if roll(faults.rate_5xx) {
        return Some(error_response(&ApiError::new(
            500,
            "InternalServerError",
            "Internal error (injected)",
        )));
    }
    None
}

fn authenticate(
    s: &Shared,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), String> {
    let sig = verify::parse_authorization(headers)?;
    let key = if let Some(token) = sig.key_id.strip_prefix("ST$") {
        let claims = s
            .pki
            .verify_token(token)
            .ok_or("the session token is invalid or expired")?;
        if s.is_revoked(&claims.jti) {
            return Err("the session token is invalid or expired".into());
        }
        let der = B64
            .decode(&claims.spki)
            .map_err(|_| "the session token's key is invalid")?;
        RsaPublicKey::from_public_key_der(&der).map_err(|_| "the session token's key is invalid")?
    } else {
        lock(&s.api_keys)
            .get(&sig.key_id)
            .cloned()
            .ok_or("the keyId names no registered API key")?
    };
    verify::verify(method, uri, headers, body, &sig, &key, (true, s.clock()))
}

/// `opc-retry-token`: the same token with the same body answers the first result again;
/// with another body it is refused, as OCI does.
fn idempotent(
    s: &Shared,
    operation: &'static str,
    token: Option<String>,
    body: &Bytes,
    create: impl FnOnce() -> Answer,
) -> Answer {
    let Some(token) = token else { return create() };
    let key = (operation, token);
    if let Some((first_body, answer)) = lock(&s.retry_tokens).get(&key) {
        if first_body != body {
            return Err(ApiError::new(
                409,
                "InvalidatedRetryToken",
                "The retry token was used with different parameters",
            ));
        }
        return Ok(ok(answer.clone()));
    }
    let answer = create()?;
    lock(&s.retry_tokens).insert(key, (body.clone(), answer.1.clone()));
    Ok(answer)
}

fn json_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            400,
            "InvalidParameter",
            format!("body is not valid JSON: {e}"),
        )
    })
}

pub(super) fn attach(s: &Arc<Shared>, body: &[u8]) -> Answer {
    let body = json_body(body)?;
    let mut cloud = lock(&s.cloud);
    let instance = body["instanceId"].as_str().unwrap_or_default();
    if !cloud.has_instance(instance) {
        return Err(ApiError::not_found("instance", instance));
    }
    let details = &body["createVnicDetails"];
    let subnet = details["subnetId"].as_str().ok_or_else(|| {
        ApiError::new(
            400,
            "InvalidParameter",
            "createVnicDetails.subnetId is required",
        )
    })?;
    let nic_index = body["nicIndex"].as_u64().map(|i| i as u32);
    let display_name = body["displayName"]
        .as_str()
        .or(details["displayName"].as_str())
        .map(str::to_owned);
    let tags = details
        .get("freeformTags")
        .cloned()
        .unwrap_or_else(|| json!({}));
    let new = NewVnic {
        instance_id: instance,
        subnet_id: subnet,
        nic_index,
        display_name,
        is_primary: false,
    };
    let (id, vnic_id) = cloud.create_vnic(&new, tags)?;
    if let Some(vnic) = cloud.vnics.get_mut(&vnic_id) {
        vnic.skip_source_dest_check = details["skipSourceDestCheck"].as_bool().unwrap_or(false);
    }
    let delay = Duration::from_millis(cloud.cfg.attach_delay_ms);
    let answer = cloud.attachment_json(&cloud.attachments[&id]);
    drop(cloud);
    let shared = s.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let mut cloud = lock(&shared.cloud);
        shared.remember(&cloud);
        if let Some(a) = cloud
            .attachments
            .get_mut(&id)
            .filter(|a| a.state == AttachmentState::Attaching)
        {
            a.state = AttachmentState::Attached;
            shared.emit(EventKind::Attached, &cloud, &id);
        }
    });
    Ok(ok(answer))
}

pub(super) fn detach(s: &Arc<Shared>, id: &str) -> Answer {
    let mut cloud = lock(&s.cloud);
    if !cloud.start_detach(id)? {
        return Ok(no_content());
    }
    let delay = Duration::from_millis(cloud.cfg.attach_delay_ms);
    drop(cloud);
    let (shared, id) = (s.clone(), id.to_owned());
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let mut cloud = lock(&shared.cloud);
        shared.remember(&cloud);
        // The event is sent while the VNIC still exists so it can carry the MAC and address.
        shared.emit(EventKind::Detached, &cloud, &id);
        cloud.finish_detach(&id);
    });
    Ok(no_content())
}

fn get_attachment(s: &Shared, id: &str) -> Answer {
    let cloud = lock(&s.cloud);
    cloud
        .attachments
        .get(id)
        .map(|a| ok(cloud.attachment_json(a)))
        .ok_or_else(|| ApiError::not_found("VNIC attachment", id))
}

fn create_ip(s: &Shared, body: &[u8]) -> Answer {
    let body = json_body(body)?;
    let mut cloud = lock(&s.cloud);
    let id = cloud.create_private_ip(&body)?;
    Ok(ok(cloud.private_ip_json(&cloud.private_ips[&id])))
}

fn require<'a>(query: &'a HashMap<String, String>, name: &str) -> Result<&'a str, ApiError> {
    query
        .get(name)
        .map(String::as_str)
        .ok_or_else(|| ApiError::new(400, "MissingParameter", format!("{name} is required")))
}

/// The list call's `compartmentId` must be `expected`: OCI lists a compartment's resources,
/// and one named that holds none of them answers an empty list or 404, never another's.
fn in_compartment(query: &HashMap<String, String>, expected: &str) -> Result<(), ApiError> {
    let c = require(query, "compartmentId")?;
    if c == expected {
        Ok(())
    } else {
        Err(ApiError::not_found("compartment", c))
    }
}

fn compartment(cloud: &Cloud, query: &HashMap<String, String>) -> Result<(), ApiError> {
    in_compartment(query, &cloud.cfg.compartment_id)
}

fn list_attachments(cloud: &Cloud, query: &HashMap<String, String>) -> Answer {
    compartment(cloud, query)?;
    let items = cloud
        .attachments
        .values()
        .filter(|a| query.get("instanceId").is_none_or(|i| *i == a.instance_id))
        .filter(|a| query.get("vnicId").is_none_or(|v| *v == a.vnic_id))
        .map(|a| cloud.attachment_json(a))
        .collect();
    paginate(items, query, cloud.cfg.page_size)
}

fn list_ips(cloud: &Cloud, query: &HashMap<String, String>) -> Answer {
    let (vnic, subnet) = (query.get("vnicId"), query.get("subnetId"));
    if vnic.is_none() && subnet.is_none() {
        return Err(ApiError::new(
            400,
            "MissingParameter",
            "vnicId or subnetId is required",
        ));
    }
    let items = cloud
        .private_ips
        .values()
        .filter(|p| vnic.is_none_or(|v| *v == p.vnic_id))
        .filter(|p| subnet.is_none_or(|v| *v == p.subnet_id))
        .filter(|p| {
            query
                .get("ipAddress")
                .is_none_or(|ip| *ip == p.ip.to_string())
        })
        // Every simulated address is assigned to a VNIC and ephemeral (no reserved IPs).
        .filter(|_| query.get("ipState").is_none_or(|v| v == "ASSIGNED"))
        .filter(|_| query.get("lifetime").is_none_or(|v| v == "EPHEMERAL"))
        .map(|p| cloud.private_ip_json(p))
        .collect();
    paginate(items, query, cloud.cfg.page_size)
}

fn list_subnets(cloud: &Cloud, query: &HashMap<String, String>) -> Answer {
    in_compartment(query, &cloud.cfg.network_compartment_id)?;
    let items = cloud
        .subnets
        .iter()
        .filter(|_| query.get("vcnId").is_none_or(|v| *v == cloud.cfg.vcn.id))
        .map(|sub| cloud.subnet_json(sub))
        .collect();
    paginate(items, query, cloud.cfg.page_size)
}

/// Pages of at most `page_size` (or a smaller `limit`); the token is an opaque offset.
fn paginate(items: Vec<Value>, query: &HashMap<String, String>, page_size: usize) -> Answer {
    let limit = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(page_size)
        .clamp(1, page_size.max(1));
    let start = match query.get("page") {
        Some(page) => page
            .strip_prefix("simpage-")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| {
                ApiError::new(
                    400,
                    "InvalidParameter",
                    format!("invalid page token {page}"),
                )
            })?,
        None => 0,
    };
    let end = (start + limit).min(items.len());
    let next = (end < items.len()).then(|| format!("simpage-{end}"));
    let page: Vec<Value> = items.into_iter().skip(start).take(limit).collect();
    Ok((StatusCode::OK, Value::Array(page), next))
}
