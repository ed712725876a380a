//! CNI errors as the runtime reads them: `{"cniVersion", "code", "msg", "details"}` on
//! stdout with a non-zero exit status.

use serde::Serialize;

/// The error codes of CNI spec 1.1.0 ("Error" section), plus this plugin's own in the
/// 100+ range the spec reserves for plugins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// 1: the configuration asks for a CNI version this plugin does not speak.
    IncompatibleVersion,
    /// 2: a configuration field has a value this plugin does not support.
    UnsupportedField,
    /// 3: the container (its network namespace, or the agent's record) does not exist;
    /// the runtime need not clean anything up.
    UnknownContainer,
    /// 4: a `CNI_*` environment variable is missing or invalid.
    InvalidEnvironment,
    /// 5: reading the configuration from stdin failed.
    Io,
    /// 6: the configuration is not JSON.
    Decode,
    /// 7: the configuration is JSON but misses or mistypes a required field.
    InvalidConfig,
    /// 11: a temporary condition (pool empty, agent starting or unreachable): retry.
    TryAgainLater,
    /// 50 (STATUS): the plugin cannot serve ADDs now; running pods are not affected.
    PluginNotAvailable,
    /// 100: the agent refused for a reason retrying will not fix (node full, checkpoint
    /// or datapath failure).
    AgentRefused,
    /// 101: creating or removing the pod's interfaces, addresses or routes failed.
    InterfaceSetup,
    /// 102: CHECK found the pod's network different from what ADD set up.
    CheckFailed,
    /// 999: anything else (a bug, or a broken agent answer).
    Internal,
}

impl ErrorCode {
    /// The number written in the `code` field.
    pub fn number(self) -> u32 {
        match self {
            ErrorCode::IncompatibleVersion => 1,
            ErrorCode::UnsupportedField => 2,
            ErrorCode::UnknownContainer => 3,
            ErrorCode::InvalidEnvironment => 4,
            ErrorCode::Io => 5,
            ErrorCode::Decode => 6,
            ErrorCode::InvalidConfig => 7,
            ErrorCode::TryAgainLater => 11,
            ErrorCode::PluginNotAvailable => 50,
            ErrorCode::AgentRefused => 100,
            ErrorCode::InterfaceSetup => 101,
            ErrorCode::CheckFailed => 102,
            ErrorCode::Internal => 999,
        }
    }
}

/// A failed CNI operation: what the runtime logs (`msg`), and what an operator needs to
/// act on it (`details`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{msg} ({details})")]
pub struct CniError {
    pub code: ErrorCode,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The JSON document for stdout, in the version the configuration asked for (or
    /// 1.0.0 when it could not be read).
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire<'a> {
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            details: &'a str,
        }
        serde_json::to_string(&Wire {
            cni_version,
            code: self.code.number(),
            msg: &self.msg,
            details: &self.details,
        })
        .unwrap_or_else(|_| format!("{{\"code\":{}}}", self.code.number()))
    }
}
