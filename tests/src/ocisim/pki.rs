//! The simulator's identity world: a root CA, an intermediate, the instance's leaf certificate
//! (subject carrying `opc-tenant:`), and the key that signs session tokens (JWT, RS256).
use std::str::FromStr as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use rsa::pkcs1v15::{Signature, SigningKey, VerifyingKey};
use rsa::pkcs8::{DecodePublicKey as _, EncodePrivateKey as _, LineEnding};
use rsa::signature::{SignatureEncoding as _, Signer as _, Verifier as _};
use rsa::{RsaPrivateKey, RsaPublicKey};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use x509_cert::Certificate;
use x509_cert::builder::{Builder as _, CertificateBuilder, Profile};
use x509_cert::der::{Encode as _, EncodePem as _};
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::SubjectPublicKeyInfoOwned;
use x509_cert::time::Validity;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("key generation: {0}")]
    Key(#[from] rsa::Error),
    #[error("certificate building: {0}")]
    Build(#[from] x509_cert::builder::Error),
    #[error("encoding: {0}")]
    Der(#[from] x509_cert::der::Error),
    #[error("public key encoding: {0}")]
    Spki(#[from] x509_cert::spki::Error),
    #[error("private key encoding: {0}")]
    Pkcs8(#[from] rsa::pkcs8::Error),
}

pub struct Pki {
    root: Certificate,
    pub intermediate_pem: String,
    inter_key: RsaPrivateKey,
    leaf_subject: String,
    /// The instance certificate and its key, as IMDS serves them now; OCI rotates them.
    leaf: std::sync::Mutex<Leaf>,
    /// The other instances' certificates (`instance_count` > 1), each made the first time
    /// its IMDS is asked: RSA key generation for hundreds of instances would slow every start.
    others: std::sync::Mutex<std::collections::BTreeMap<u32, Leaf>>,
    token_key: SigningKey<Sha256>,
}

/// One instance certificate (PEM) and its private key (PKCS#8 PEM).
#[derive(Debug, Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    serial: u32,
}

const INTER_NAME: &str = "CN=vcnpath simulator intermediate CA,O=vcnpath";

fn leaf(subject: &str, serial: u32, inter_key: &RsaPrivateKey) -> Result<Leaf, PkiError> {
    let key = RsaPrivateKey::new(&mut rand::thread_rng(), 2048)?;
    let cert = cert(
        Profile::Leaf {
            issuer: Name::from_str(INTER_NAME)?,
            enable_key_agreement: false,
            enable_key_encipherment: true,
        },
        serial,
        subject,
        &key.to_public_key(),
        inter_key,
    )?;
    Ok(Leaf {
        cert_pem: cert.to_pem(LineEnding::LF)?,
        key_pem: key.to_pkcs8_pem(LineEnding::LF)?.to_string(),
        serial,
    })
}

/// Claims of a session token. `spki` carries the session public key, so a token alone says
/// which key must have signed a request (as OCI's tokens do with their `jwk` claim).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub tenant: String,
    pub iat: u64,
    pub exp: u64,
    pub jti: String,
    pub spki: String,
}

fn cert(
    profile: Profile,
    serial: u32,
    subject: &str,
    key: &RsaPublicKey,
    signer: &RsaPrivateKey,
) -> Result<Certificate, PkiError> {
    let signer = SigningKey::<Sha256>::new(signer.clone());
    let builder = CertificateBuilder::new(
        profile,
        SerialNumber::from(serial),
        Validity::from_now(Duration::from_hours(30 * 24))?,
        Name::from_str(subject)?,
        SubjectPublicKeyInfoOwned::from_key(key.clone())?,
        &signer,
    )?;
    Ok(builder.build::<Signature>()?)
}

impl Pki {
    pub fn generate(tenancy: &str, instance: &str, compartment: &str) -> Result<Self, PkiError> {
        let mut rng = rand::thread_rng();
        let root_key = RsaPrivateKey::new(&mut rng, 2048)?;
        let inter_key = RsaPrivateKey::new(&mut rng, 2048)?;
        let root_name = "CN=vcnpath simulator root CA,O=vcnpath";
        let inter_name = INTER_NAME;
        let root = cert(
            Profile::Root,
            1,
            root_name,
            &root_key.to_public_key(),
            &root_key,
        )?;
        let intermediate = cert(
            Profile::SubCA {
                issuer: Name::from_str(root_name)?,
                path_len_constraint: Some(0),
            },
            2,
            inter_name,
            &inter_key.to_public_key(),
            &root_key,
        )?;
        // The shape of a real instance certificate's subject: the tenancy is the `opc-tenant:` OU.
        let leaf_subject = format!(
            "CN={instance},OU=opc-certtype:instance,OU=opc-compartment:{compartment},OU=opc-instance:{instance},OU=opc-tenant:{tenancy}"
        );
        let leaf = leaf(&leaf_subject, 3, &inter_key)?;
        Ok(Self {
            root,
            intermediate_pem: intermediate.to_pem(LineEnding::LF)?,
            inter_key,
            leaf_subject,
            leaf: std::sync::Mutex::new(leaf),
            others: std::sync::Mutex::default(),
            token_key: SigningKey::new(RsaPrivateKey::new(&mut rng, 2048)?),
        })
    }

    /// The instance certificate and key IMDS serves now.
    pub fn leaf(&self) -> Leaf {
        self.leaf
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// A new instance key and certificate from the same intermediate, as OCI rotates them;
    /// the old certificate still verifies until it expires. Slow (RSA key generation).
    pub fn rotate_leaf(&self) -> Result<Leaf, PkiError> {
        let serial = self.leaf().serial + 1;
        let new = leaf(&self.leaf_subject, serial, &self.inter_key)?;
        *self
            .leaf
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = new.clone();
        Ok(new)
    }

    /// The certificate and key of instance `n` ≥ 1 (`instance`, in `compartment`), made on
    /// the first call. Slow then (RSA key generation).
    pub fn leaf_of(
        &self,
        n: u32,
        tenancy: &str,
        instance: &str,
        compartment: &str,
    ) -> Result<Leaf, PkiError> {
        if let Some(leaf) = self.lock_others().get(&n) {
            return Ok(leaf.clone());
        }
        let subject = format!(
            "CN={instance},OU=opc-certtype:instance,OU=opc-compartment:{compartment},OU=opc-instance:{instance},OU=opc-tenant:{tenancy}"
        );
        // Serials 3, 4, … are the first instance's rotations; the others count from 2^20.
        let made = leaf(&subject, (1 << 20) + n, &self.inter_key)?;
        // Two first calls at once: the first one stored wins, so IMDS serves one certificate.
        Ok(self.lock_others().entry(n).or_insert(made).clone())
    }

    fn lock_others(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<u32, Leaf>> {
        self.others
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether `der` is a certificate IMDS serves now (not one rotated away).
    pub fn is_current_leaf(&self, der: &[u8]) -> bool {
        use x509_cert::der::DecodePem as _;
        let is = |pem: &str| {
            Certificate::from_pem(pem.as_bytes())
                .ok()
                .and_then(|c| c.to_der().ok())
                .is_some_and(|current| current == der)
        };
        is(&self.leaf().cert_pem) || self.lock_others().values().any(|l| is(&l.cert_pem))
    }

    /// Checks that `intermediate` was issued by the root and `leaf` by `intermediate`.
    pub fn verify_chain(&self, leaf: &Certificate, intermediate: &Certificate) -> bool {
        issued_by(intermediate, &self.root) && issued_by(leaf, intermediate)
    }

    pub fn issue_token(&self, claims: &Claims) -> String {
        let header = B64URL.encode(br#"{"alg":"RS256","typ":"JWT","kid":"vcnpath-sim"}"#);
        let payload = B64URL.encode(serde_json::to_vec(claims).expect("claims serialise"));
        let signed = format!("{header}.{payload}");
        let signature = B64URL.encode(self.token_key.sign(signed.as_bytes()).to_bytes());
        format!("{signed}.{signature}")
    }

    /// The claims of a token this simulator issued and that has not expired.
    pub fn verify_token(&self, token: &str) -> Option<Claims> {
        let (signed, signature) = token.rsplit_once('.')?;
        let signature = Signature::try_from(B64URL.decode(signature).ok()?.as_slice()).ok()?;
        VerifyingKey::<Sha256>::new(self.token_key.as_ref().to_public_key())
            .verify(signed.as_bytes(), &signature)
            .ok()?;
        let payload = signed.split('.').nth(1)?;
        let claims: Claims = serde_json::from_slice(&B64URL.decode(payload).ok()?).ok()?;
        (claims.exp > now_secs()).then_some(claims)
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The RSA public key of a certificate.
pub fn public_key(cert: &Certificate) -> Option<RsaPublicKey> {
    let der = cert.tbs_certificate.subject_public_key_info.to_der().ok()?;
    RsaPublicKey::from_public_key_der(&der).ok()
}

fn issued_by(cert: &Certificate, issuer: &Certificate) -> bool {
    if cert.tbs_certificate.issuer != issuer.tbs_certificate.subject {
        return false;
    }
    let (Some(key), Ok(tbs)) = (public_key(issuer), cert.tbs_certificate.to_der()) else {
        return false;
    };
    let Some(raw) = cert.signature.as_bytes() else {
        return false;
    };
    let Ok(signature) = Signature::try_from(raw) else {
        return false;
    };
    VerifyingKey::<Sha256>::new(key)
        .verify(&tbs, &signature)
        .is_ok()
}
