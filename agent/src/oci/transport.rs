//! The HTTP clients the agent reaches OCI with.
//!
//! - The API client (Core API, the auth federation endpoint) trusts the public web roots
//!   built into the binary plus, when configured, a PEM bundle (`oci.ca_bundle`): a private
//!   realm's CA, or the node's system store, e.g. `/etc/ssl/certs/ca-certificates.crt`.
//!   It honours `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` and `NO_PROXY` from the
//!   environment (reqwest's standard handling).
//! - The IMDS client never uses a proxy: IMDS is link-local (169.254.169.254) and answers
//!   only from the instance itself, so a proxy set for the API would break it.

use std::path::{Path, PathBuf};

/// An HTTP client that cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot read the CA bundle {path} (oci.ca_bundle): {source}")]
    ReadBundle {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the CA bundle {path} (oci.ca_bundle) holds no usable PEM certificate: {source}")]
    Bundle {
        path: PathBuf,
        source: reqwest::Error,
    },
    #[error("cannot create the HTTP client: {0}")]
    Build(#[source] reqwest::Error),
}

/// How long making a connection may take, for every OCI endpoint.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The client for the Core API and federation, trusting `ca_bundle` too when given.
pub fn api_client(ca_bundle: Option<&Path>) -> Result<reqwest::Client, TransportError> {
    // Every call also has its own overall timeout (IMDS 5 s, federation 10 s, Core 30 s per
    // attempt); a connection that cannot even be made fails fast.
    let mut builder = reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT);
    if let Some(path) = ca_bundle {
        let pem = std::fs::read(path).map_err(|source| TransportError::ReadBundle {
            path: path.to_owned(),
            source,
        })?;
        let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| {
            TransportError::Bundle {
                path: path.to_owned(),
                source,
            }
        })?;
        if certificates.is_empty() {
            // from_pem_bundle accepts a file without any certificate; a bundle that adds
            // nothing is a mistake worth stopping for.
            return Err(TransportError::ReadBundle {
                path: path.to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "no PEM certificate in the file",
                ),
            });
        }
        for certificate in certificates {
            builder = builder.add_root_certificate(certificate);
        }
    }
    builder.build().map_err(TransportError::Build)
}

/// The client for IMDS: never through a proxy.
pub fn imds_client() -> Result<reqwest::Client, TransportError> {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .no_proxy()
        .build()
        .map_err(TransportError::Build)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_bundle_that_cannot_be_used_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.pem");
        let error = api_client(Some(&missing)).unwrap_err().to_string();
        assert!(
            error.contains("absent.pem") && error.contains("oci.ca_bundle"),
            "{error}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let error = api_client(Some(&empty)).unwrap_err().to_string();
        assert!(error.contains("empty.pem"), "{error}");
    }

    #[test]
    fn a_pem_bundle_is_accepted() {
        // A self-signed CA made with `openssl req -x509` for this test.
        let bundle =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("src/oci/testdata/private-realm-ca.pem");
        api_client(Some(&bundle)).expect("a bundle with one certificate");
    }
}
