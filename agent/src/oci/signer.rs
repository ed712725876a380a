//! OCI HTTP request signatures ("version 1", draft-cavage HTTP signatures with RSA-SHA256).
//!
//! The signature covers the request exactly as it goes on the wire, so the caller signs the final
//! URL and body and must not change either afterwards.
use std::fmt;
use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use reqwest::Method;
use reqwest::Url;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use rsa::RsaPrivateKey;
use rsa::pkcs1v15::SigningKey;
use rsa::signature::{SignatureEncoding, Signer as _};
use sha2::{Digest, Sha256};

/// Which headers a request signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostHeader {
    /// Service calls sign `host`.
    Signed,
    /// The federation endpoint's clients (all official SDKs) leave `host` out.
    Omitted,
}

/// Signs requests with one key. `Debug` shows neither the key nor the key id, because a session
/// key id is `ST$<token>` and the token is a bearer credential.
pub struct RequestSigner {
    key_id: String,
    key: SigningKey<Sha256>,
    host: HostHeader,
}

impl fmt::Debug for RequestSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestSigner")
            .field("key_id", &"<redacted>")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// Whether a method's body is part of the signature (OCI: POST, PUT, PATCH — even an empty one).
pub fn signs_body(method: &Method) -> bool {
    *method == Method::POST || *method == Method::PUT || *method == Method::PATCH
}

impl RequestSigner {
    pub fn new(key_id: String, key: RsaPrivateKey, host: HostHeader) -> Self {
        Self {
            key_id,
            key: SigningKey::new(key),
            host,
        }
    }

    /// Adds the headers the signature needs (`date`, `host`, and for body methods `content-length`,
    /// `content-type`, `x-content-sha256`) unless present, then `authorization`.
    pub fn sign(&self, method: &Method, url: &Url, headers: &mut HeaderMap, body: &[u8]) {
        self.sign_at(method, url, headers, body, SystemTime::now());
    }

    /// [`Self::sign`] with the `date` taken from `now` when the request carries none.
    pub fn sign_at(
        &self,
        method: &Method,
        url: &Url,
        headers: &mut HeaderMap,
        body: &[u8],
        now: SystemTime,
    ) {
        let names = self.fill_headers(method, url, headers, body, now);
        let signing_string = signing_string(method, url, headers, &names);
        let signature = B64.encode(self.key.sign(signing_string.as_bytes()).to_bytes());
        let value = format!(
            "Signature version=\"1\",headers=\"{}\",keyId=\"{}\",algorithm=\"rsa-sha256\",signature=\"{signature}\"",
            names.join(" "),
            self.key_id,
        );
        headers.insert(
            reqwest::header::AUTHORIZATION,
            HeaderValue::try_from(value)
                .expect("base64, header names and an OCID-based key id are valid header text"),
        );
    }

    fn fill_headers(
        &self,
        method: &Method,
        url: &Url,
        headers: &mut HeaderMap,
        body: &[u8],
        now: SystemTime,
    ) -> Vec<&'static str> {
        let mut names = vec!["date", "(request-target)"];
        if !headers.contains_key("date") {
            set(headers, "date", &httpdate::fmt_http_date(now));
        }
        if self.host == HostHeader::Signed {
            names.push("host");
            if !headers.contains_key("host") {
                set(headers, "host", &host_of(url));
            }
        }
        if signs_body(method) {
            names.extend(["content-length", "content-type", "x-content-sha256"]);
            // reqwest omits content-length for an empty body; OCI wants it sent and signed as 0.
            set(headers, "content-length", &body.len().to_string());
            if !headers.contains_key("content-type") {
                set(headers, "content-type", "application/json");
            }
            set(
                headers,
                "x-content-sha256",
                &B64.encode(Sha256::digest(body)),
            );
        }
        names
    }
}

/// `host[:port]` as it appears in the URL (a port is kept only when the URL names one).
pub fn host_of(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    }
}

/// `(request-target)`: lower-case method, then the path and query exactly as sent.
pub fn request_target(method: &Method, url: &Url) -> String {
    let mut target = format!("{} {}", method.as_str().to_ascii_lowercase(), url.path());
    if let Some(query) = url.query() {
        target.push('?');
        target.push_str(query);
    }
    target
}

/// The string that is signed: one `name: value` line per signed header, in order, no trailing newline.
pub fn signing_string(method: &Method, url: &Url, headers: &HeaderMap, names: &[&str]) -> String {
    names
        .iter()
        .map(|name| {
            if *name == "(request-target)" {
                format!("(request-target): {}", request_target(method, url))
            } else {
                let value = headers
                    .get(*name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                format!("{name}: {value}")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn set(headers: &mut HeaderMap, name: &'static str, value: &str) {
    headers.insert(
        HeaderName::from_static(name),
        HeaderValue::from_str(value).expect("signer-generated header values are ASCII"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsa::pkcs1::DecodeRsaPrivateKey as _;

    #[derive(serde::Deserialize)]
    struct Vectors {
        private_key_pem: String,
        key_id: String,
        date: String,
        cases: Vec<Case>,
    }

    #[derive(serde::Deserialize)]
    struct Case {
        name: String,
        method: String,
        url: String,
        headers: std::collections::BTreeMap<String, String>,
        body: Option<String>,
        signed_headers: String,
        signing_string: String,
        signature: String,
    }

    fn param<'a>(authorization: &'a str, name: &str) -> &'a str {
        let start = authorization
            .find(&format!("{name}=\""))
            .unwrap_or_else(|| panic!("authorization lacks {name}: {authorization}"))
            + name.len()
            + 2;
        let len = authorization[start..].find('"').expect("closing quote");
        &authorization[start..start + len]
    }

    /// The Go SDK's own signer test vectors: GET with an encoded query, POST, and POST with an empty body.
    #[test]
    fn official_vectors() {
        let v: Vectors = serde_json::from_str(include_str!("testdata/signing-vectors.json"))
            .expect("vectors parse");
        let key = RsaPrivateKey::from_pkcs1_pem(&v.private_key_pem).expect("vector key parses");
        let signer = RequestSigner::new(v.key_id.clone(), key, HostHeader::Signed);
        assert_eq!(v.cases.len(), 3, "expected the three published vectors");
        for case in v.cases {
            let method: Method = case.method.parse().expect("method");
            let url = Url::parse(&case.url).expect("url");
            let mut headers = HeaderMap::new();
            headers.insert("date", v.date.parse().expect("date header"));
            for (k, val) in &case.headers {
                headers.insert(
                    HeaderName::try_from(k.as_str()).expect("name"),
                    val.parse().expect("value"),
                );
            }
            let body = case.body.unwrap_or_default();
            signer.sign(&method, &url, &mut headers, body.as_bytes());

            let names: Vec<&str> = case.signed_headers.split(' ').collect();
            assert_eq!(
                signing_string(&method, &url, &headers, &names),
                case.signing_string,
                "signing string of case {}",
                case.name
            );
            let auth = headers["authorization"].to_str().expect("ascii");
            assert_eq!(
                param(auth, "headers"),
                case.signed_headers,
                "signed headers of case {}",
                case.name
            );
            assert_eq!(
                param(auth, "keyId"),
                v.key_id,
                "keyId of case {}",
                case.name
            );
            assert_eq!(
                param(auth, "signature"),
                case.signature,
                "signature of case {}",
                case.name
            );
            if case.name == "post-empty-body" {
                assert_eq!(
                    headers["content-length"], "0",
                    "empty POST must send content-length: 0"
                );
            }
        }
    }

    #[test]
    fn debug_hides_the_key_id() {
        let v: Vectors = serde_json::from_str(include_str!("testdata/signing-vectors.json"))
            .expect("vectors parse");
        let key = RsaPrivateKey::from_pkcs1_pem(&v.private_key_pem).expect("vector key parses");
        let signer = RequestSigner::new("ST$secret-token".into(), key, HostHeader::Signed);
        let debug = format!("{signer:?}");
        assert!(
            !debug.contains("secret-token"),
            "Debug leaked the token: {debug}"
        );
    }

    #[test]
    fn federation_signature_omits_host() {
        let v: Vectors = serde_json::from_str(include_str!("testdata/signing-vectors.json"))
            .expect("vectors parse");
        let key = RsaPrivateKey::from_pkcs1_pem(&v.private_key_pem).expect("vector key parses");
        let signer = RequestSigner::new("t/fed-x509-sha256/aa".into(), key, HostHeader::Omitted);
        let mut headers = HeaderMap::new();
        let url = Url::parse("http://127.0.0.1:9/v1/x509").expect("url");
        signer.sign(&Method::POST, &url, &mut headers, b"{}");
        let auth = headers["authorization"].to_str().expect("ascii");
        assert_eq!(
            param(auth, "headers"),
            "date (request-target) content-length content-type x-content-sha256"
        );
    }
}
