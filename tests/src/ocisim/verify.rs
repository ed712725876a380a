//! Server-side check of OCI request signatures, written from the protocol rather than from the
//! agent's signer, so that a shared misunderstanding cannot make both sides agree.
use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use axum::http::{HeaderMap, Method, Uri};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use rsa::RsaPublicKey;
use rsa::pkcs1v15::{Signature, VerifyingKey};
use rsa::signature::Verifier as _;
use sha2::{Digest as _, Sha256};

/// OCI rejects requests whose `date` is further than this from its clock.
pub const MAX_SKEW: Duration = Duration::from_mins(5);

/// The parsed `Authorization: Signature …` header.
#[derive(Debug)]
pub struct SignatureHeader {
    pub key_id: String,
    pub headers: Vec<String>,
    pub signature: Vec<u8>,
}

/// Why a request is not authenticated; the text goes into the 401 message.
pub type Reject = String;

pub fn parse_authorization(headers: &HeaderMap) -> Result<SignatureHeader, Reject> {
    let value = headers
        .get("authorization")
        .ok_or("The required information to complete authentication was not provided.")?
        .to_str()
        .map_err(|_| "authorization header is not text")?;
    let params = value
        .strip_prefix("Signature ")
        .ok_or("authorization is not an HTTP signature")?;
    let mut map = HashMap::new();
    // Values are quoted and none of them (base64, OCIDs, JWTs, header names) contains `",`.
    for part in params.split("\",") {
        let (k, v) = part
            .split_once('=')
            .ok_or("malformed signature parameter")?;
        map.insert(k.trim().to_owned(), v.trim().trim_matches('"').to_owned());
    }
    if map.get("version").is_some_and(|v| v != "1") {
        return Err("unsupported signature version".into());
    }
    if map.get("algorithm").is_some_and(|a| a != "rsa-sha256") {
        return Err("unsupported signature algorithm".into());
    }
    let key_id = map.remove("keyId").ok_or("signature lacks keyId")?;
    let signature = B64
        .decode(map.remove("signature").ok_or("signature lacks signature")?)
        .map_err(|_| "signature is not base64")?;
    let headers = map
        .remove("headers")
        .unwrap_or_else(|| "date".into())
        .split(' ')
        .map(str::to_ascii_lowercase)
        .collect();
    Ok(SignatureHeader {
        key_id,
        headers,
        signature,
    })
}

/// Checks the signed-header set, the date (against `now`, the simulator's clock), the body
/// digest and the signature itself; `require_host` for Core calls.
pub fn verify(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    sig: &SignatureHeader,
    key: &RsaPublicKey,
    (require_host, now): (bool, SystemTime),
) -> Result<(), Reject> {
    let mut required = vec!["(request-target)"];
    if require_host {
        required.push("host");
    }
    let body_method = matches!(*method, Method::POST | Method::PUT | Method::PATCH);
    if body_method {
        required.extend(["content-length", "content-type", "x-content-sha256"]);
    }
    for name in required {
        if !sig.headers.iter().any(|h| h == name) {
            return Err(format!("the signature must cover the {name} header"));
        }
    }
    let date_header = if sig.headers.iter().any(|h| h == "x-date") {
        "x-date"
    } else {
        "date"
    };
    if !sig.headers.iter().any(|h| h == date_header) {
        return Err("the signature must cover the date header".into());
    }
    let date = header(headers, date_header)?;
    let date =
        httpdate::parse_http_date(date).map_err(|_| format!("invalid {date_header} header"))?;
    let skew = now
        .duration_since(date)
        .or_else(|_| date.duration_since(now))
        .unwrap_or_default();
    if skew > MAX_SKEW {
        // OCI's wording (docs/oci.md): clients recognise clock skew by it.
        let fmt = |t: SystemTime| httpdate::fmt_http_date(t).replace("GMT", "UTC");
        return Err(format!(
            "Date '{}' is not within allowed clock skew. Current '{}', valid datetime range: ['{}', '{}']",
            fmt(date),
            fmt(now),
            fmt(now - MAX_SKEW),
            fmt(now + MAX_SKEW)
        ));
    }
    if body_method {
        let digest = B64.encode(Sha256::digest(body));
        if header(headers, "x-content-sha256")? != digest {
            return Err("x-content-sha256 does not match the body".into());
        }
        if header(headers, "content-length")? != body.len().to_string() {
            return Err("content-length does not match the body".into());
        }
    }
    let mut lines = Vec::with_capacity(sig.headers.len());
    for name in &sig.headers {
        if name == "(request-target)" {
            let target = uri.path_and_query().map_or("/", |p| p.as_str());
            lines.push(format!(
                "(request-target): {} {target}",
                method.as_str().to_ascii_lowercase()
            ));
        } else {
            lines.push(format!("{name}: {}", header(headers, name)?));
        }
    }
    let signature =
        Signature::try_from(sig.signature.as_slice()).map_err(|_| "malformed signature")?;
    VerifyingKey::<Sha256>::new(key.clone())
        .verify(lines.join("\n").as_bytes(), &signature)
        .map_err(|_| "the signature does not match the request and key".into())
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, Reject> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| format!("the signed header {name} is missing"))
}
