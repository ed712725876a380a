//! STATUS (CNI 1.1.0): whether the plugin can serve ADDs now. It can when the agent
//! answers and calls itself ready (reconciled with OCI, datapath synced, state directory
//! writable, a VNIC that serves pods set up); otherwise code 50 names why. Pods already
//! running keep their traffic while the agent is away (the datapath stays pinned), so
//! code 51 is never used.

use super::{
    config::NetConf,
    error::{CniError, ErrorCode},
};
use crate::api::{Client, ClientError};

pub async fn status(conf: &NetConf) -> Result<(), CniError> {
    let client = Client::new(conf.socket(), conf.timeout());
    let unavailable =
        |msg: String, details: String| CniError::new(ErrorCode::PluginNotAvailable, msg, details);
    match client.cni_status().await {
        Ok(answer) if answer.ready => Ok(()),
        Ok(answer) => Err(unavailable(
            "the vcnpath agent is not ready to serve ADD".to_owned(),
            answer.problems.join("; "),
        )),
        Err(error @ ClientError::NotRunning { .. }) => Err(unavailable(
            "the vcnpath agent is not running".to_owned(),
            format!(
                "{error}; start the vcnpath DaemonSet (kubectl -n kube-system get ds vcnpath) and check its logs"
            ),
        )),
        Err(error @ ClientError::Timeout { .. }) => Err(unavailable(
            "the vcnpath agent does not answer".to_owned(),
            error.to_string(),
        )),
        Err(error) => Err(unavailable(
            "the vcnpath agent could not tell whether it is ready".to_owned(),
            format!("{error}; install the vcnpath-cni binary from the same release as the agent"),
        )),
    }
}
