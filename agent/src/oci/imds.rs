//! Instance metadata service, version 2 (`http://169.254.169.254/opc/v2`).
use std::fmt;
use std::time::Duration;

use reqwest::{StatusCode, Url};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::error::ImdsError;

/// The well-known IMDS v2 base URL on every OCI instance.
pub const DEFAULT_BASE: &str = "http://169.254.169.254/opc/v2/";
/// IMDS is rate limited and can answer 404 for a moment after boot: retry this many times.
const RETRIES: u32 = 3;
/// IMDS is a link-local service answering in milliseconds; one that has not answered by then
/// is hung, and the attempt is retried or reported.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct ImdsClient {
    base: Url,
    http: reqwest::Client,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Instance {
    pub id: String,
    #[serde(default)]
    pub display_name: String,
    pub compartment_id: String,
    #[serde(default)]
    pub availability_domain: String,
    #[serde(default)]
    pub region: String,
    pub canonical_region_name: String,
    pub region_info: RegionInfo,
    pub shape: String,
    pub shape_config: ShapeConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegionInfo {
    #[serde(default)]
    pub realm_key: String,
    pub realm_domain_component: String,
    #[serde(default)]
    pub region_key: String,
    #[serde(default)]
    pub region_identifier: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShapeConfig {
    #[serde(default)]
    pub ocpus: f64,
    #[serde(default)]
    pub memory_in_gbs: f64,
    pub max_vnic_attachments: u32,
}

/// One entry of `/vnics/`; the first is the primary VNIC (cloud-init relies on that too).
/// `nicIndex` is the physical NIC (0 on every VM, and missing in older answers); it never
/// tells VNICs apart.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ImdsVnic {
    pub vnic_id: String,
    pub private_ip: String,
    #[serde(default)]
    pub vlan_tag: u32,
    pub mac_addr: String,
    pub virtual_router_ip: String,
    pub subnet_cidr_block: String,
    #[serde(default)]
    pub nic_index: u32,
}

/// The instance's identity: its leaf certificate and key (rotated by OCI), and the intermediate CA.
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
    pub intermediate_pem: String,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("cert_pem", &self.cert_pem.len())
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl ImdsClient {
    /// `base` is `.../opc/v2/` (trailing slash added when missing), e.g. the simulator's address.
    pub fn new(base: &str, http: reqwest::Client) -> Result<Self, ImdsError> {
        let with_slash = if base.ends_with('/') {
            base.to_owned()
        } else {
            format!("{base}/")
        };
        let base = Url::parse(&with_slash).map_err(|_| ImdsError::BaseUrl {
            url: base.to_owned(),
        })?;
        Ok(Self { base, http })
    }

    pub async fn instance(&self) -> Result<Instance, ImdsError> {
        self.get_json("instance/").await
    }

    pub async fn vnics(&self) -> Result<Vec<ImdsVnic>, ImdsError> {
        self.get_json("vnics/").await
    }

    pub async fn identity(&self) -> Result<Identity, ImdsError> {
        Ok(Identity {
            cert_pem: self.get_text("identity/cert.pem").await?,
            key_pem: self.get_text("identity/key.pem").await?,
            intermediate_pem: self.get_text("identity/intermediate.pem").await?,
        })
    }

    async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ImdsError> {
        let text = self.get_text(path).await?;
        serde_json::from_str(&text).map_err(|source| ImdsError::Decode {
            path: path.to_owned(),
            source,
        })
    }

    async fn get_text(&self, path: &str) -> Result<String, ImdsError> {
        let url = self.base.join(path).map_err(|_| ImdsError::BaseUrl {
            url: format!("{}{path}", self.base),
        })?;
        let transport = |source| ImdsError::Transport {
            path: path.to_owned(),
            source,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let sent = self
                .http
                .get(url.clone())
                .header("authorization", "Bearer Oracle")
                .timeout(ATTEMPT_TIMEOUT)
                .send()
                .await;
            let response = match sent {
                Ok(response) => response,
                // Refused, reset or hung: IMDS restarts and updates, so try again a few times.
                Err(source) if attempt <= RETRIES => {
                    tracing::debug!(path, error = %source, attempt, "IMDS request failed, retrying");
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                    continue;
                }
                Err(source) => return Err(transport(source)),
            };
            let status = response.status();
            if status.is_success() {
                return response.text().await.map_err(transport);
            }
            let retryable = status == StatusCode::NOT_FOUND
                || status == StatusCode::TOO_MANY_REQUESTS
                || status.is_server_error();
            if !retryable || attempt > RETRIES {
                return Err(ImdsError::Status {
                    path: path.to_owned(),
                    status: status.as_u16(),
                    attempts: attempt,
                });
            }
            tracing::debug!(
                path,
                status = status.as_u16(),
                attempt,
                "IMDS request failed, retrying"
            );
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
    }
}
