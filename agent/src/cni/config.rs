//! What the runtime gives the plugin: `CNI_*` environment variables and the network
//! configuration on stdin (a plugin's entry of a conflist, possibly with `prevResult`).

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use super::error::{CniError, ErrorCode};
use crate::api::DEFAULT_SOCKET;
use crate::ipam::PodRef;

/// The CNI versions whose configurations and results this plugin speaks. 1.1.0 adds GC
/// and STATUS to 1.0.0 with the same result; the 0.3/0.4 results differ only by the
/// `version` field on each IP.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The plugin's `type`, and the binary's name in the CNI bin directory.
pub const PLUGIN_TYPE: &str = "vcnpath-cni";

/// MTU when neither the agent nor the configuration names one (OCI VNICs default to 9000).
pub const DEFAULT_MTU: u32 = 9000;

/// How long one call to the agent may take by default. Allocation never waits for a
/// cloud call, so a slow answer means the agent is stuck; the runtime retries ADD.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// `CNI_COMMAND`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    /// CNI 1.1.0: release what the runtime's valid attachments do not list.
    Gc,
    /// CNI 1.1.0: whether ADDs can be served now.
    Status,
}

impl Command {
    /// The commands that name no attachment: only `CNI_COMMAND` (and `CNI_PATH`) is set.
    fn is_network_wide(self) -> bool {
        matches!(self, Self::Version | Self::Gc | Self::Status)
    }
}

/// The `CNI_*` environment of one invocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Environment {
    pub command: Command,
    pub container_id: String,
    /// `CNI_NETNS`; DEL may come without it (the netns is already gone).
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
}

impl Environment {
    /// Reads and validates the variables through `var` (`std::env::var` in the binary).
    /// VERSION, GC and STATUS need only `CNI_COMMAND`; every other command needs a container id and an
    /// interface name, and ADD/CHECK a netns.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let invalid = |name: &str, why: &str| {
            CniError::new(
                ErrorCode::InvalidEnvironment,
                format!("invalid environment variable {name}: {why}"),
                "the container runtime sets CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS and CNI_IFNAME (CNI spec 1.1.0, section 'Parameters'; GC, STATUS and VERSION need only CNI_COMMAND)",
            )
        };
        let non_empty = |name: &str| var(name).filter(|v| !v.is_empty());
        let command = match non_empty("CNI_COMMAND").as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("VERSION") => Command::Version,
            Some("GC") => Command::Gc,
            Some("STATUS") => Command::Status,
            Some(other) => {
                return Err(invalid(
                    "CNI_COMMAND",
                    &format!("{other:?} is not one of ADD, DEL, CHECK, GC, STATUS, VERSION"),
                ));
            }
            None => return Err(invalid("CNI_COMMAND", "missing")),
        };
        if command.is_network_wide() {
            return Ok(Self {
                command,
                container_id: String::new(),
                netns: None,
                ifname: String::new(),
                pod_namespace: None,
                pod_name: None,
            });
        }
        let container_id =
            non_empty("CNI_CONTAINERID").ok_or_else(|| invalid("CNI_CONTAINERID", "missing"))?;
        if !container_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        {
            return Err(invalid(
                "CNI_CONTAINERID",
                "only letters, digits, '_', '.' and '-' are allowed",
            ));
        }
        let ifname = non_empty("CNI_IFNAME").ok_or_else(|| invalid("CNI_IFNAME", "missing"))?;
        if ifname.len() > 15
            || ifname == "."
            || ifname == ".."
            || ifname
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace())
        {
            return Err(invalid(
                "CNI_IFNAME",
                &format!(
                    "{ifname:?} is not a valid interface name (at most 15 characters, no '/', ':' or spaces)"
                ),
            ));
        }
        let netns = non_empty("CNI_NETNS").map(PathBuf::from);
        if netns.is_none() && command != Command::Del {
            return Err(invalid("CNI_NETNS", "missing"));
        }
        let (pod_namespace, pod_name) = parse_args(&var("CNI_ARGS").unwrap_or_default())
            .map_err(|why| invalid("CNI_ARGS", &why))?;
        Ok(Self {
            command,
            container_id,
            netns,
            ifname,
            pod_namespace,
            pod_name,
        })
    }

    /// The attachment this invocation is about, as the agent keys it.
    pub fn pod_ref(&self) -> PodRef {
        PodRef {
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
            namespace: self.pod_namespace.clone(),
            name: self.pod_name.clone(),
        }
    }
}

/// `K8S_POD_NAMESPACE` and `K8S_POD_NAME` from `CNI_ARGS` (`K=V;K=V`); other keys are
/// ignored, as kubelet always sends `IgnoreUnknown=1`.
fn parse_args(args: &str) -> Result<(Option<String>, Option<String>), String> {
    let (mut namespace, mut name) = (None, None);
    for pair in args.split(';').filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} is not KEY=VALUE"))?;
        match key {
            "K8S_POD_NAMESPACE" => namespace = Some(value.to_owned()),
            "K8S_POD_NAME" => name = Some(value.to_owned()),
            _ => {}
        }
    }
    Ok((namespace, name))
}

/// The plugin's network configuration. Unknown fields (`runtimeConfig`, `args`,
/// `capabilities`, `dns`, …) are accepted and ignored.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// The agent's socket; [`DEFAULT_SOCKET`] when absent.
    #[serde(default)]
    pub socket_path: Option<PathBuf>,
    /// MTU for pods when the agent's allocation does not name one.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Per-call timeout towards the agent.
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
    /// The agent's bpffs pin directory ([`vcnpath_common::DEFAULT_PIN_DIR`] when absent):
    /// each pod veth gets the pinned anti-spoofing program found there.
    #[serde(default)]
    pub pin_dir: Option<PathBuf>,
    /// The previous plugin's result in a chain (required by CHECK in 1.0.0).
    #[serde(default)]
    pub prev_result: Option<serde_json::Value>,
    /// GC (1.1.0): the attachments still valid on this network; absent on other commands.
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<ValidAttachment>>,
}

/// One entry of `cni.dev/valid-attachments`: the `CNI_CONTAINERID` and `CNI_IFNAME` of an
/// ADD the runtime still holds.
#[derive(Clone, Debug, Deserialize)]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

impl NetConf {
    /// Parses stdin. Not JSON → code 6; no usable `cniVersion` → 1 (7 when missing);
    /// required fields missing or mistyped → 7.
    pub fn parse(bytes: &[u8]) -> Result<Self, CniError> {
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(
                ErrorCode::Decode,
                "the network configuration on stdin is not valid JSON",
                e.to_string(),
            )
        })?;
        let version = match value.get("cniVersion") {
            Some(serde_json::Value::String(v)) => v.clone(),
            _ => {
                return Err(CniError::new(
                    ErrorCode::InvalidConfig,
                    "the network configuration has no cniVersion",
                    format!("set \"cniVersion\" to one of {SUPPORTED_VERSIONS:?}"),
                ));
            }
        };
        if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
            return Err(CniError::new(
                ErrorCode::IncompatibleVersion,
                format!("vcnpath-cni does not support CNI version {version:?}"),
                format!("supported versions: {SUPPORTED_VERSIONS:?}"),
            ));
        }
        let conf: NetConf = serde_json::from_value(value).map_err(|e| {
            CniError::new(
                ErrorCode::InvalidConfig,
                "the network configuration is missing or mistypes a field",
                e.to_string(),
            )
        })?;
        if conf.plugin_type != PLUGIN_TYPE {
            return Err(CniError::new(
                ErrorCode::UnsupportedField,
                format!("type {:?} is not {PLUGIN_TYPE:?}", conf.plugin_type),
                "this binary is vcnpath-cni; check the conflist's \"type\"",
            ));
        }
        if conf.mtu.is_some_and(|m| !(68..=65535).contains(&m)) {
            return Err(CniError::new(
                ErrorCode::UnsupportedField,
                format!("mtu {} is out of range", conf.mtu.unwrap_or_default()),
                "an IPv4 interface MTU is between 68 and 65535",
            ));
        }
        Ok(conf)
    }

    pub fn socket(&self) -> PathBuf {
        self.socket_path
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
    }

    pub fn pin_dir(&self) -> PathBuf {
        self.pin_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(vcnpath_common::DEFAULT_PIN_DIR))
    }

    pub fn timeout(&self) -> Duration {
        self.timeout_seconds
            .map_or(DEFAULT_TIMEOUT, Duration::from_secs)
    }

    /// True for 1.1.0 and later, the versions that have GC and STATUS.
    pub fn has_gc_and_status(&self) -> bool {
        !self.cni_version.starts_with("0.") && self.cni_version != "1.0.0"
    }

    /// True for versions before 1.0.0, whose results carry `"version": "4"` on each IP.
    pub fn legacy_result(&self) -> bool {
        self.cni_version.starts_with("0.")
    }
}
