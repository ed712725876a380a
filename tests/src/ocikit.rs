//! Helpers shared by the tests that drive the agent's OCI client and the official OCI tools
//! against the simulator, and by those that read its private IPs back.
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, bail};
use ipnet::{Ipv4AddrRange, Ipv4Net};
use serde_json::Value;

use rsa::RsaPrivateKey;
use rsa::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _, LineEnding};
use sha2::{Digest as _, Sha256};
use vcnpath::oci::{
    ConfigFileAuth, CoreClient, Endpoints, ImdsClient, InstancePrincipalAuth, RateLimit,
    RetryPolicy,
};

use crate::ocisim::Simulator;

/// An API key written as an OCI config file profile.
pub struct ApiKey {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub key_file: PathBuf,
    pub key_id: String,
    pub user: String,
    pub fingerprint: String,
    pub key: RsaPrivateKey,
}

/// Writes `~/.oci/config`-style files for a fresh key. The key is *not* registered.
pub fn api_key(sim: &Simulator, user: &str) -> ApiKey {
    let key = RsaPrivateKey::new(&mut rand::thread_rng(), 2048).expect("RSA key generation");
    let dir = tempfile::tempdir().expect("temporary directory");
    let key_file = dir.path().join("key.pem");
    std::fs::write(
        &key_file,
        key.to_pkcs8_pem(LineEnding::LF).expect("PEM").as_bytes(),
    )
    .expect("write key");
    let der = key.to_public_key().to_public_key_der().expect("SPKI");
    // OCI's fingerprint: MD5 of the DER public key; any stable string works for the simulator.
    let digest = Sha256::digest(der.as_bytes());
    let fingerprint = digest[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let cfg = sim.config();
    let key_id = format!("{}/{user}/{fingerprint}", cfg.tenancy_id);
    let config = dir.path().join("config");
    std::fs::write(
        &config,
        format!(
            "[DEFAULT]\nuser={user}\nfingerprint={fingerprint}\ntenancy={}\nregion={}\nkey_file={}\n",
            cfg.tenancy_id,
            cfg.region,
            key_file.display()
        ),
    )
    .expect("write config");
    ApiKey {
        dir,
        config,
        key_file,
        key_id,
        user: user.into(),
        fingerprint,
        key,
    }
}

/// Registers the key with the simulator.
pub fn register(sim: &Simulator, key: &ApiKey) {
    sim.register_api_key(&key.key_id, key.key.to_public_key());
}

pub fn fast_retries() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 12,
        base_delay: std::time::Duration::from_millis(10),
        max_delay: std::time::Duration::from_millis(200),
        total_budget: std::time::Duration::from_secs(20),
        attempt_timeout: std::time::Duration::from_secs(5),
    }
}

pub fn unlimited() -> RateLimit {
    RateLimit {
        per_second: 1000.0,
        burst: 1000,
    }
}

/// A client signing with an API key from a config file.
pub fn config_file_client(sim: &Simulator, config: &Path, retry: RetryPolicy) -> CoreClient {
    config_file_client_at(sim, config, retry, unlimited())
}

/// [`config_file_client`] calling at most at `rate`.
pub fn config_file_client_at(
    sim: &Simulator,
    config: &Path,
    retry: RetryPolicy,
    rate: RateLimit,
) -> CoreClient {
    let auth = ConfigFileAuth::from_file(config, "DEFAULT").expect("config profile loads");
    let endpoints = Endpoints::single(&sim.base_url()).expect("endpoints");
    CoreClient::new(
        reqwest::Client::new(),
        &endpoints,
        Arc::new(auth),
        retry,
        rate,
    )
}

/// A client authenticated as the instance (IMDS certificate → federation → session token).
pub fn instance_principal_client(
    sim: &Simulator,
    retry: RetryPolicy,
) -> (CoreClient, Arc<InstancePrincipalAuth>) {
    instance_principal_client_at(sim, retry, unlimited())
}

/// [`instance_principal_client`] calling at most at `rate`.
pub fn instance_principal_client_at(
    sim: &Simulator,
    retry: RetryPolicy,
    rate: RateLimit,
) -> (CoreClient, Arc<InstancePrincipalAuth>) {
    let http = reqwest::Client::new();
    let imds = ImdsClient::new(&sim.imds_url(), http.clone()).expect("IMDS URL");
    let endpoints = Endpoints::single(&sim.base_url()).expect("endpoints");
    let auth = Arc::new(InstancePrincipalAuth::new(
        imds,
        &endpoints.auth,
        http.clone(),
    ));
    (
        CoreClient::new(http, &endpoints, auth.clone(), retry, rate),
        auth,
    )
}

/// The addresses one private-IP object (a `PrivateIp` answer or an entry of the simulator's
/// `snapshot()["privateIps"]`) gives its VNIC: `ipAddress` alone, or, with
/// `cidrPrefixLength` below 32, the whole aligned IP CIDR block starting there (docs/oci.md
/// "IP CIDR blocks"). A single IP carries 32 or no prefix, as `cidr.single_ip_prefix` says.
pub fn private_ip_range(private_ip: &Value) -> anyhow::Result<Ipv4Net> {
    let ip: Ipv4Addr = private_ip["ipAddress"]
        .as_str()
        .and_then(|text| text.parse().ok())
        .with_context(|| format!("private IP without an IPv4 ipAddress: {private_ip}"))?;
    let prefix = match &private_ip["cidrPrefixLength"] {
        Value::Null => 32,
        value => value
            .as_u64()
            .and_then(|n| u8::try_from(n).ok())
            .with_context(|| format!("private IP {ip}: cidrPrefixLength {value} is no prefix"))?,
    };
    let range = Ipv4Net::new(ip, prefix)
        .with_context(|| format!("private IP {ip}: cidrPrefixLength {prefix} is above 32"))?;
    if range.network() != ip {
        bail!(
            "private IP {ip}: block {range} must start at its ipAddress (OCI aligns blocks at {})",
            range.network()
        );
    }
    Ok(range)
}

/// Every address of `range`, its first and last included (unlike [`Ipv4Net::hosts`], which
/// leaves out the network and broadcast addresses: inside a block they are pod addresses).
pub fn range_addresses(range: Ipv4Net) -> Ipv4AddrRange {
    vcnpath::oci::models::block_addresses(range)
}

/// The simulator's secondary private IPs tagged for its (first) instance by the agent's
/// IPAM, address by address: address → VNIC OCID. Every address of an IP CIDR block is the
/// block's VNIC's. Panics when an address is held twice: OCI never holds one twice.
pub fn node_ips(sim: &Simulator) -> std::collections::BTreeMap<Ipv4Addr, String> {
    let instance = sim.config().instance_id;
    let mut ips = std::collections::BTreeMap::new();
    for p in sim.snapshot()["privateIps"].as_array().expect("privateIps") {
        if p["isPrimary"].as_bool() == Some(true)
            || p["freeformTags"][vcnpath::ipam::NODE_TAG].as_str() != Some(instance.as_str())
        {
            continue;
        }
        let range = private_ip_range(p).unwrap_or_else(|e| panic!("simulator snapshot: {e:#}"));
        let vnic = p["vnicId"].as_str().expect("vnicId").to_owned();
        for ip in range_addresses(range) {
            assert!(
                ips.insert(ip, vnic.clone()).is_none(),
                "{ip} exists twice in OCI"
            );
        }
    }
    ips
}

/// The Python interpreter of the tools venv: `$VCNPATH_PYTHON`, else `<workspace>/target/oci-venv/bin/python`.
pub fn python() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("VCNPATH_PYTHON") {
        return Ok(PathBuf::from(p));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace");
    let python = root.join("target/oci-venv/bin/python");
    if python.exists() {
        Ok(python)
    } else {
        Err(format!(
            "{} not found (run the setup step, or set VCNPATH_PYTHON)",
            python.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn addresses(private_ip: &Value) -> Vec<Ipv4Addr> {
        range_addresses(private_ip_range(private_ip).expect("a valid private IP")).collect()
    }

    #[test]
    fn a_block_gives_every_address_of_it_and_a_single_ip_itself() {
        let block = addresses(&json!({"ipAddress": "10.0.1.32", "cidrPrefixLength": 28}));
        let expected: Vec<Ipv4Addr> = (32..48).map(|d| Ipv4Addr::new(10, 0, 1, d)).collect();
        assert_eq!(
            block, expected,
            "a /28 at 10.0.1.32 is .32 to .47, both ends included"
        );
        for single in [
            json!({"ipAddress": "10.0.1.9"}),
            json!({"ipAddress": "10.0.1.9", "cidrPrefixLength": null}),
            json!({"ipAddress": "10.0.1.9", "cidrPrefixLength": 32}),
        ] {
            assert_eq!(addresses(&single), [Ipv4Addr::new(10, 0, 1, 9)], "{single}");
        }
        let wide = private_ip_range(&json!({"ipAddress": "10.0.64.0", "cidrPrefixLength": 18}))
            .expect("a /18");
        assert_eq!(
            range_addresses(wide).count(),
            16_384,
            "a /18 holds 16,384 addresses"
        );
    }

    #[test]
    fn a_block_not_at_its_start_or_a_bad_prefix_is_refused() {
        for bad in [
            json!({"ipAddress": "10.0.1.33", "cidrPrefixLength": 28}),
            json!({"ipAddress": "10.0.1.32", "cidrPrefixLength": 33}),
            json!({"ipAddress": "10.0.1.32", "cidrPrefixLength": "28"}),
            json!({"cidrPrefixLength": 28}),
        ] {
            assert!(private_ip_range(&bad).is_err(), "{bad} must be refused");
        }
    }
}
