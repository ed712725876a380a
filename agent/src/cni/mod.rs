//! The CNI plugin `vcnpath-cni` (spec 1.1.0; 0.3.x/0.4.0/1.0.0 configurations accepted):
//! ADD asks the agent for a VCN address over its local API and wires the pod to the node
//! with a veth pair; DEL undoes it idempotently; CHECK verifies it; GC releases what the
//! runtime no longer holds; STATUS says whether ADDs can be served; VERSION reports what
//! it speaks. The binary is a thin shell over [`run`].
//!
//! The pod's view: `eth0` with its VCN address /32, a scope-link route to the
//! link-local gateway 169.254.1.1, a default route via it, and a permanent neighbour
//! entry for it pointing at the host veth's MAC. The node's view: the host veth
//! (`vcn` + hash of the container id and interface) up, and a /32 route to the pod
//! through it. The node answers for the gateway only by being the veth's far end, so
//! no node address, proxy ARP or per-pod sysctl is needed.

mod check;
pub mod config;
pub mod error;
mod gc;
pub mod names;
pub mod netlink;
pub mod plugin;
pub mod result;
mod serialize;
mod status;

use serde::Serialize;

pub use config::{Command, Environment, NetConf, SUPPORTED_VERSIONS};
pub use error::{CniError, ErrorCode};
pub use result::CniResult;

/// What the binary writes to stdout, and its exit status.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub exit_code: i32,
}

/// One plugin invocation: `var` reads the `CNI_*` environment, `stdin` is the
/// configuration (or the error reading it). Needs a Tokio runtime with IO and time.
pub async fn run(var: impl Fn(&str) -> Option<String>, stdin: std::io::Result<Vec<u8>>) -> Outcome {
    // Errors are reported in the configuration's version when it could be read.
    let mut version = "1.0.0".to_owned();
    match invoke(var, stdin, &mut version).await {
        Ok(stdout) => Outcome {
            stdout,
            exit_code: 0,
        },
        Err(error) => Outcome {
            stdout: error.to_json(&version),
            exit_code: 1,
        },
    }
}

async fn invoke(
    var: impl Fn(&str) -> Option<String>,
    stdin: std::io::Result<Vec<u8>>,
    version: &mut String,
) -> Result<String, CniError> {
    let env = Environment::from_vars(var)?;
    let stdin = stdin.map_err(|e| {
        CniError::new(
            ErrorCode::Io,
            "cannot read the network configuration from stdin",
            e.to_string(),
        )
    })?;
    if env.command == Command::Version {
        return Ok(version_json(&stdin));
    }
    let conf = NetConf::parse(&stdin)?;
    version.clone_from(&conf.cni_version);
    if matches!(env.command, Command::Gc | Command::Status) && !conf.has_gc_and_status() {
        return Err(CniError::new(
            ErrorCode::IncompatibleVersion,
            format!("CNI version {} has no GC or STATUS", conf.cni_version),
            "GC and STATUS exist since CNI 1.1.0; list \"1.1.0\" in the conflist's cniVersions",
        ));
    }
    match env.command {
        Command::Add => {
            let result = plugin::add(&env, &conf).await?;
            serde_json::to_string(&result).map_err(|e| {
                CniError::new(
                    ErrorCode::Internal,
                    "encoding the result failed",
                    e.to_string(),
                )
            })
        }
        Command::Del => plugin::del(&env, &conf).await.map(|()| String::new()),
        Command::Check => plugin::check(&env, &conf).await.map(|()| String::new()),
        Command::Gc => gc::gc(&conf).await.map(|()| String::new()),
        Command::Status => status::status(&conf).await.map(|()| String::new()),
        Command::Version => unreachable!("answered above"),
    }
}

/// VERSION's answer. Its stdin carries only `cniVersion`, and may be empty.
fn version_json(stdin: &[u8]) -> String {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Versions<'a> {
        cni_version: &'a str,
        supported_versions: &'a [&'a str],
    }
    let asked = serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| "1.0.0".to_owned());
    serde_json::to_string(&Versions {
        cni_version: &asked,
        supported_versions: SUPPORTED_VERSIONS,
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests;
