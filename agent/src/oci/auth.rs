//! Who signs requests: an API key from an `~/.oci/config` profile, or the instance itself
//! (instance principals: a session token obtained by federation with the instance certificate).
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use rsa::RsaPrivateKey;
use rsa::pkcs1::DecodeRsaPrivateKey as _;
use rsa::pkcs8::DecodePrivateKey as _;

use super::error::AuthError;
use super::signer::{HostHeader, RequestSigner};

mod federation;
pub use federation::InstancePrincipalAuth;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A signer plus the generation it belongs to, so a 401 can invalidate exactly that generation.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub signer: Arc<RequestSigner>,
    pub generation: u64,
}

/// Supplies the signer for the next request.
pub trait AuthProvider: Send + Sync + fmt::Debug {
    fn credentials(&self) -> BoxFuture<'_, Result<Credentials, AuthError>>;

    /// A service answered 401 to a request signed by `generation`. Returns whether fresh
    /// credentials may fix it (then the caller retries once).
    fn unauthorized(&self, generation: u64) -> BoxFuture<'_, bool>;
}

/// API-key authentication from one profile of an OCI config file.
#[derive(Debug)]
pub struct ConfigFileAuth {
    credentials: Credentials,
    /// The profile's `region`, e.g. `us-ashburn-1`.
    pub region: Option<String>,
    pub tenancy: String,
}

impl ConfigFileAuth {
    /// Reads `profile` (usually `DEFAULT`) from `path` (usually `~/.oci/config`).
    pub fn from_file(path: &Path, profile: &str) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::ConfigRead {
            path: path.display().to_string(),
            source,
        })?;
        let profiles = parse_ini(&text);
        let defaults = profiles.get("DEFAULT");
        let section = profiles
            .get(profile)
            .ok_or_else(|| AuthError::ProfileMissing {
                path: path.display().to_string(),
                profile: profile.to_owned(),
            })?;
        // Like the SDKs: a key missing from a profile falls back to [DEFAULT].
        let get = |key: &'static str| {
            section
                .get(key)
                .or_else(|| defaults.and_then(|d| d.get(key)))
                .cloned()
        };
        let require = |key: &'static str| {
            get(key).ok_or(AuthError::ConfigKeyMissing {
                profile: profile.to_owned(),
                key,
            })
        };
        let user = require("user")?;
        let fingerprint = require("fingerprint")?;
        let tenancy = require("tenancy")?;
        let key_file = expand_home(&require("key_file")?, path);
        let passphrase = get("pass_phrase");
        let pem = std::fs::read_to_string(&key_file).map_err(|source| AuthError::KeyRead {
            path: key_file.display().to_string(),
            source,
        })?;
        let key = parse_private_key(&pem, passphrase.as_deref(), &key_file.display().to_string())?;
        let key_id = format!("{tenancy}/{user}/{fingerprint}");
        Ok(Self {
            credentials: Credentials {
                signer: Arc::new(RequestSigner::new(key_id, key, HostHeader::Signed)),
                generation: 0,
            },
            region: get("region"),
            tenancy,
        })
    }
}

impl AuthProvider for ConfigFileAuth {
    fn credentials(&self) -> BoxFuture<'_, Result<Credentials, AuthError>> {
        let credentials = self.credentials.clone();
        Box::pin(async move { Ok(credentials) })
    }

    fn unauthorized(&self, _generation: u64) -> BoxFuture<'_, bool> {
        // An API key does not change by itself: a retry would fail the same way.
        Box::pin(async { false })
    }
}

/// Parses an RSA private key in PKCS#1, PKCS#8 or passphrase-encrypted PKCS#8 PEM.
/// `origin` names the key in errors (a path, never the key).
pub fn parse_private_key(
    pem: &str,
    passphrase: Option<&str>,
    origin: &str,
) -> Result<RsaPrivateKey, AuthError> {
    let parse_error = |reason: String| AuthError::KeyParse {
        origin: origin.to_owned(),
        reason,
    };
    if pem.contains("BEGIN ENCRYPTED PRIVATE KEY") {
        let passphrase = passphrase.ok_or_else(|| AuthError::PassphraseRequired {
            origin: origin.to_owned(),
        })?;
        RsaPrivateKey::from_pkcs8_encrypted_pem(pem, passphrase)
            .map_err(|e| parse_error(e.to_string()))
    } else if pem.contains("Proc-Type: 4,ENCRYPTED") {
        Err(AuthError::LegacyEncryptedKey {
            origin: origin.to_owned(),
        })
    } else if pem.contains("BEGIN RSA PRIVATE KEY") {
        RsaPrivateKey::from_pkcs1_pem(pem).map_err(|e| parse_error(e.to_string()))
    } else {
        RsaPrivateKey::from_pkcs8_pem(pem).map_err(|e| parse_error(e.to_string()))
    }
}

/// `[section]` → key → value. Comments start with `#` or `;`.
fn parse_ini(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut sections: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut current = String::from("DEFAULT");
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            name.trim().clone_into(&mut current);
            sections.entry(current.clone()).or_default();
        } else if let Some((key, value)) = line.split_once('=') {
            sections
                .entry(current.clone())
                .or_default()
                .insert(key.trim().to_owned(), value.trim().to_owned());
        }
    }
    sections
}

/// `~/x` → `$HOME/x`; a relative path is relative to the config file, as the OCI CLI does.
fn expand_home(path: &str, config: &Path) -> PathBuf {
    if let Some(rest) = path.strip_prefix("~/")
        && let Some(home) = std::env::var_os("HOME")
    {
        return PathBuf::from(home).join(rest);
    }
    let path = PathBuf::from(path);
    if path.is_relative() {
        config.parent().map_or(path.clone(), |dir| dir.join(&path))
    } else {
        path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsa::pkcs8::{EncodePrivateKey as _, LineEnding};

    fn small_key() -> RsaPrivateKey {
        // 1024 bits keeps the test fast; the size does not matter to parsing.
        RsaPrivateKey::new(&mut rand::thread_rng(), 1024).expect("keygen")
    }

    #[test]
    fn config_profile_with_encrypted_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = small_key();
        // PBKDF2 + AES-256-CBC as `openssl pkcs8 -topk8 -v2 aes256` and the OCI CLI write it
        // (few iterations: unoptimised test builds are slow).
        let der = key.to_pkcs8_der().expect("der");
        let info = pkcs8::PrivateKeyInfo::try_from(der.as_bytes()).expect("info");
        let params =
            pkcs8::pkcs5::pbes2::Parameters::pbkdf2_sha256_aes256cbc(64, &[7; 16], &[9; 16])
                .expect("params");
        let pem = info
            .encrypt_with_params(params, "s3cret")
            .expect("encrypt")
            .to_pem("ENCRYPTED PRIVATE KEY", LineEnding::LF)
            .expect("pem");
        std::fs::write(dir.path().join("key.pem"), pem.as_bytes()).expect("write key");
        let config = dir.path().join("config");
        std::fs::write(
            &config,
            "[DEFAULT]\nregion=us-ashburn-1\n\n[node]\nuser=ocid1.user.oc1..u\nfingerprint=aa:bb\n\
             tenancy=ocid1.tenancy.oc1..t\nkey_file=key.pem\npass_phrase=s3cret\n",
        )
        .expect("write config");
        let auth = ConfigFileAuth::from_file(&config, "node").expect("profile loads");
        assert_eq!(
            auth.region.as_deref(),
            Some("us-ashburn-1"),
            "region falls back to [DEFAULT]"
        );
        assert_eq!(auth.tenancy, "ocid1.tenancy.oc1..t");

        std::fs::write(
            &config,
            "[node]\nuser=u\nfingerprint=f\ntenancy=t\nkey_file=key.pem\n",
        )
        .expect("write");
        let err = ConfigFileAuth::from_file(&config, "node").expect_err("no passphrase must fail");
        assert!(
            matches!(err, AuthError::PassphraseRequired { .. }),
            "expected PassphraseRequired, got {err:?}"
        );

        std::fs::write(
            &config,
            "[node]\nuser=u\nfingerprint=f\ntenancy=t\nkey_file=key.pem\npass_phrase=nope\n",
        )
        .expect("write");
        let err =
            ConfigFileAuth::from_file(&config, "node").expect_err("wrong passphrase must fail");
        assert!(
            matches!(err, AuthError::KeyParse { .. }),
            "expected KeyParse, got {err:?}"
        );
        assert!(
            !err.to_string().contains("nope"),
            "error text leaked the passphrase: {err}"
        );
    }

    #[test]
    fn missing_profile_and_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("config");
        std::fs::write(&config, "[DEFAULT]\nuser=u\n").expect("write");
        let err = ConfigFileAuth::from_file(&config, "other").expect_err("missing profile");
        assert!(
            matches!(err, AuthError::ProfileMissing { .. }),
            "got {err:?}"
        );
        let err = ConfigFileAuth::from_file(&config, "DEFAULT").expect_err("missing keys");
        assert!(
            matches!(
                err,
                AuthError::ConfigKeyMissing {
                    key: "fingerprint",
                    ..
                }
            ),
            "got {err:?}"
        );
    }

    #[test]
    fn debug_output_has_no_key_material() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = small_key();
        let pem = key.to_pkcs8_pem(LineEnding::LF).expect("pem");
        std::fs::write(dir.path().join("k.pem"), pem.as_bytes()).expect("write key");
        let config = dir.path().join("config");
        std::fs::write(
            &config,
            "[DEFAULT]\nuser=u\nfingerprint=f\ntenancy=t\nkey_file=k.pem\n",
        )
        .expect("write");
        let auth = ConfigFileAuth::from_file(&config, "DEFAULT").expect("loads");
        let debug = format!("{auth:?}");
        let body_line = pem.lines().nth(1).expect("pem body");
        assert!(
            !debug.contains(body_line) && !debug.contains("t/u/f"),
            "Debug leaked key material: {debug}"
        );
    }
}
