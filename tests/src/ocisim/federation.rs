//! `POST /v1/x509`: an instance proves itself with its certificate (signed by the leaf key,
//! chained to the simulator's CA) and gets a session token for its fresh session key.
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::json;
use sha2::{Digest as _, Sha256};
use x509_cert::Certificate;
use x509_cert::der::Decode as _;

use super::pki::{Claims, now_secs, public_key};
use super::server::{Shared, error_response, lock};
use super::state::ApiError;
use super::verify;

fn unauthenticated(message: impl Into<String>) -> Response {
    error_response(&ApiError::new(401, "NotAuthenticated", message))
}

pub(super) async fn x509(
    State(s): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let sig = match verify::parse_authorization(&headers) {
        Ok(sig) => sig,
        Err(reason) => return unauthenticated(reason),
    };
    let Ok(request) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return error_response(&ApiError::new(400, "InvalidParameter", "body is not JSON"));
    };
    let cert = |v: &serde_json::Value| {
        let der = B64.decode(v.as_str()?).ok()?;
        Certificate::from_der(&der).ok().map(|c| (c, der))
    };
    let Some((leaf, leaf_der)) = cert(&request["certificate"]) else {
        return unauthenticated("certificate is missing or invalid");
    };
    let Some((intermediate, _)) = request["intermediateCertificates"].get(0).and_then(cert) else {
        return unauthenticated("intermediateCertificates is missing or invalid");
    };
    if !s.pki.verify_chain(&leaf, &intermediate) {
        return unauthenticated("the certificate chain does not lead to a trusted root");
    }
    let superseded_valid = lock(&s.cloud).cfg.superseded_leaf_valid;
    if !superseded_valid && !s.pki.is_current_leaf(&leaf_der) {
        return unauthenticated("the certificate has expired (it was rotated away)");
    }
    // keyId = <tenancy>/fed-x509-sha256/<colon-hex SHA-256 of the leaf>.
    let fingerprint: String = Sha256::digest(&leaf_der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let tenancy = lock(&s.cloud).cfg.tenancy_id.clone();
    let expected = format!("{tenancy}/fed-x509-sha256/{fingerprint}");
    if !sig.key_id.eq_ignore_ascii_case(&expected) {
        return unauthenticated("keyId does not name the presented certificate and its tenancy");
    }
    let Some(leaf_key) = public_key(&leaf) else {
        return unauthenticated("the certificate's key is not RSA");
    };
    if let Err(reason) = verify::verify(
        &method,
        &uri,
        &headers,
        &body,
        &sig,
        &leaf_key,
        (false, s.clock()),
    ) {
        return unauthenticated(reason);
    }
    let Some(spki) = request["publicKey"].as_str() else {
        return error_response(&ApiError::new(
            400,
            "InvalidParameter",
            "publicKey is required",
        ));
    };
    let (instance, lifetime) = {
        let cloud = lock(&s.cloud);
        (
            instance_of(&leaf).unwrap_or_else(|| cloud.cfg.instance_id.clone()),
            cloud.cfg.token_lifetime_s,
        )
    };
    let now = now_secs();
    let mut count = lock(&s.federations);
    *count += 1;
    let claims = Claims {
        sub: instance,
        tenant: tenancy,
        iat: now,
        exp: now + lifetime,
        jti: format!("sim-token-{count}"),
        spki: spki.to_owned(),
    };
    axum::Json(json!({"token": s.pki.issue_token(&claims)})).into_response()
}

/// The instance a certificate names in its `OU=opc-instance:` attribute: the session's
/// principal, as OCI takes it from the certificate.
fn instance_of(leaf: &Certificate) -> Option<String> {
    leaf.tbs_certificate
        .subject
        .to_string()
        .split(',')
        .find_map(|rdn| rdn.strip_prefix("OU=opc-instance:"))
        .map(str::to_owned)
}
