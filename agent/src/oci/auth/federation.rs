//! Instance principals: trade the instance certificate for a session token at `/v1/x509`.
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use reqwest::header::HeaderMap;
use reqwest::{Method, Url};
use rsa::RsaPrivateKey;
use rsa::pkcs8::EncodePublicKey as _;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use x509_cert::Certificate;
use x509_cert::der::{DecodePem as _, Encode as _};

use super::{AuthProvider, BoxFuture, Credentials, parse_private_key};
use crate::oci::error::{AuthError, OciError};
use crate::oci::imds::ImdsClient;
use crate::oci::signer::{HostHeader, RequestSigner};

/// The Go SDK refreshes when the token has less than this left.
const REFRESH_MARGIN: Duration = Duration::from_mins(5);
const FEDERATION_ATTEMPTS: u32 = 4;
/// One federation attempt that has not answered by then is abandoned (a hung endpoint).
const FEDERATION_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed refresh, the still-valid token is used and the refresh tried again this
/// much later (not on every call).
const REFRESH_RETRY: Duration = Duration::from_secs(30);

pub struct InstancePrincipalAuth {
    imds: ImdsClient,
    federation_url: Url,
    http: reqwest::Client,
    /// Held across a refresh so that concurrent callers wait for, and share, one refresh.
    session: Mutex<Option<Session>>,
    refreshes: AtomicU64,
}

struct Session {
    credentials: Credentials,
    refresh_at: SystemTime,
    /// The token's own `exp`: until then it still works, even when refreshing fails.
    expires_at: SystemTime,
    /// The service refused the token (401): it must not be used again.
    rejected: bool,
    tenancy: String,
}

impl fmt::Debug for InstancePrincipalAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InstancePrincipalAuth")
            .field("federation_url", &self.federation_url.as_str())
            .field("refreshes", &self.refreshes.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl InstancePrincipalAuth {
    /// `auth_endpoint` is `https://auth.<region>.<realm domain>` (see `client::Endpoints`).
    pub fn new(imds: ImdsClient, auth_endpoint: &Url, http: reqwest::Client) -> Self {
        let federation_url = auth_endpoint
            .join("v1/x509")
            .expect("a fixed relative path joins any base URL");
        Self {
            imds,
            federation_url,
            http,
            session: Mutex::new(None),
            refreshes: AtomicU64::new(0),
        }
    }

    /// How many tokens have been obtained so far.
    pub fn refreshes(&self) -> u64 {
        self.refreshes.load(Ordering::Relaxed)
    }

    /// The tenancy named by the current certificate (refreshing first if needed).
    pub async fn tenancy(&self) -> Result<String, AuthError> {
        self.credentials().await?;
        Ok(self
            .session
            .lock()
            .await
            .as_ref()
            .map(|s| s.tenancy.clone())
            .unwrap_or_default())
    }

    async fn refresh(&self, generation: u64) -> Result<Session, AuthError> {
        // The certificate and its key rotate, so read them anew at every refresh.
        let identity = self.imds.identity().await?;
        let leaf = Certificate::from_pem(identity.cert_pem.as_bytes()).map_err(|e| {
            AuthError::Certificate {
                reason: e.to_string(),
            }
        })?;
        let leaf_der = leaf.to_der().map_err(|e| AuthError::Certificate {
            reason: e.to_string(),
        })?;
        let tenancy = tenancy_of(&leaf)?;
        let leaf_key = parse_private_key(&identity.key_pem, None, "from instance metadata")?;
        let session_key =
            tokio::task::spawn_blocking(|| RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048))
                .await
                .expect("key generation does not panic")
                .map_err(|source| AuthError::KeyGeneration { source })?;
        let public = session_key
            .to_public_key()
            .to_public_key_der()
            .map_err(|e| AuthError::Certificate {
                reason: e.to_string(),
            })?;
        let body = serde_json::json!({
            "certificate": pem_body(&identity.cert_pem),
            "publicKey": B64.encode(public.as_bytes()),
            "intermediateCertificates": [pem_body(&identity.intermediate_pem)],
            "fingerprintAlgorithm": "SHA256",
            "purpose": "DEFAULT",
        })
        .to_string();
        let key_id = format!(
            "{tenancy}/fed-x509-sha256/{}",
            colon_hex(&Sha256::digest(&leaf_der))
        );
        let leaf_signer = RequestSigner::new(key_id, leaf_key, HostHeader::Omitted);
        let token = self.federate(&leaf_signer, body).await?;
        let exp = token_expiry(&token)?;
        let now = SystemTime::now();
        // A token shorter-lived than the margin (a test's) is refreshed at half its life rather than at once.
        let lifetime = exp.duration_since(now).unwrap_or_default();
        let refresh_at = exp - REFRESH_MARGIN.min(lifetime / 2);
        self.refreshes.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            tenancy,
            expires_in_s = lifetime.as_secs(),
            "obtained instance principal session token"
        );
        let signer = RequestSigner::new(format!("ST${token}"), session_key, HostHeader::Signed);
        Ok(Session {
            credentials: Credentials {
                signer: Arc::new(signer),
                generation,
            },
            refresh_at,
            expires_at: exp,
            rejected: false,
            tenancy,
        })
    }

    async fn federate(&self, signer: &RequestSigner, body: String) -> Result<String, AuthError> {
        let operation = "Federation";
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut headers = HeaderMap::new();
            headers.insert("content-type", "application/json".parse().expect("static"));
            signer.sign(
                &Method::POST,
                &self.federation_url,
                &mut headers,
                body.as_bytes(),
            );
            let result = self
                .http
                .post(self.federation_url.clone())
                .headers(headers)
                .body(body.clone())
                .timeout(FEDERATION_ATTEMPT_TIMEOUT)
                .send()
                .await;
            let error = match result {
                Ok(response) if response.status().is_success() => {
                    #[derive(serde::Deserialize)]
                    struct TokenResponse {
                        token: String,
                    }
                    let request_id = crate::oci::client::request_id(&response);
                    let text = response.text().await.map_err(|source| {
                        AuthError::Federation(Box::new(OciError::Transport { operation, source }))
                    })?;
                    let parsed: TokenResponse = serde_json::from_str(&text).map_err(|source| {
                        AuthError::Federation(Box::new(OciError::Decode {
                            operation,
                            request_id,
                            source,
                        }))
                    })?;
                    return Ok(parsed.token);
                }
                Ok(response) => crate::oci::client::service_error(operation, response).await,
                Err(source) => OciError::Transport { operation, source },
            };
            // Not on 4xx: a bad certificate or signature will not get better.
            let client_error = error.status().is_some_and(|s| (400..500).contains(&s));
            if client_error || attempt >= FEDERATION_ATTEMPTS {
                return Err(AuthError::Federation(Box::new(error)));
            }
            tracing::warn!(attempt, error = %error, "federation failed, retrying");
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
    }
}

impl AuthProvider for InstancePrincipalAuth {
    fn credentials(&self) -> BoxFuture<'_, Result<Credentials, AuthError>> {
        Box::pin(async move {
            let mut session = self.session.lock().await;
            if let Some(s) = session
                .as_ref()
                .filter(|s| SystemTime::now() < s.refresh_at)
            {
                return Ok(s.credentials.clone());
            }
            let generation = session.as_ref().map_or(1, |s| s.credentials.generation + 1);
            match self.refresh(generation).await {
                Ok(fresh) => {
                    let credentials = fresh.credentials.clone();
                    *session = Some(fresh);
                    Ok(credentials)
                }
                Err(error) => {
                    let now = SystemTime::now();
                    let Some(s) = session
                        .as_mut()
                        .filter(|s| !s.rejected && now < s.expires_at)
                    else {
                        return Err(error);
                    };
                    let left = s.expires_at.duration_since(now).unwrap_or_default();
                    tracing::warn!(error = %error, expires_in_s = left.as_secs(), "cannot refresh the session token; using the current one until it expires");
                    s.refresh_at = now + REFRESH_RETRY.min(left);
                    Ok(s.credentials.clone())
                }
            }
        })
    }

    fn unauthorized(&self, generation: u64) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let mut session = self.session.lock().await;
            // Only the first caller to report a generation expires it; later ones use the new token.
            if let Some(s) = session
                .as_mut()
                .filter(|s| s.credentials.generation == generation)
            {
                tracing::info!(generation, "service rejected the session token, refreshing");
                s.refresh_at = UNIX_EPOCH;
                s.rejected = true;
            }
            true
        })
    }
}

/// The value after `opc-tenant:` (or `opc-identity:`) in the certificate subject.
fn tenancy_of(cert: &Certificate) -> Result<String, AuthError> {
    let subject = cert.tbs_certificate.subject.to_string();
    for prefix in ["opc-tenant:", "opc-identity:"] {
        if let Some(start) = subject.find(prefix) {
            let rest = &subject[start + prefix.len()..];
            let end = rest.find([',', '+']).unwrap_or(rest.len());
            return Ok(rest[..end].trim().to_owned());
        }
    }
    Err(AuthError::NoTenancy { subject })
}

/// A PEM's base64 body on one line, the form the federation endpoint takes.
fn pem_body(pem: &str) -> String {
    pem.lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::trim)
        .collect()
}

fn colon_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Reads `exp` from the JWT's claims. The signature is the issuer's business: the token is only
/// passed back to OCI, which checks it.
fn token_expiry(token: &str) -> Result<SystemTime, AuthError> {
    #[derive(serde::Deserialize)]
    struct Claims {
        exp: u64,
    }
    let claims = token.split('.').nth(1).ok_or(AuthError::Token {
        reason: "not a JWT",
    })?;
    let claims = B64URL
        .decode(claims.trim_end_matches('='))
        .map_err(|_| AuthError::Token {
            reason: "claims are not base64url",
        })?;
    let claims: Claims = serde_json::from_slice(&claims).map_err(|_| AuthError::Token {
        reason: "claims lack exp",
    })?;
    Ok(UNIX_EPOCH + Duration::from_secs(claims.exp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_read_from_claims() {
        let claims = B64URL.encode(br#"{"exp":1700000000,"sub":"x"}"#);
        let exp = token_expiry(&format!("e30.{claims}.sig")).expect("valid token");
        assert_eq!(exp, UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        assert!(
            token_expiry("garbage").is_err(),
            "a non-JWT must be rejected"
        );
    }

    #[test]
    fn pem_body_strips_armour_and_newlines() {
        assert_eq!(
            pem_body("-----BEGIN X-----\nAB\nCD\n-----END X-----\n"),
            "ABCD"
        );
    }
}
