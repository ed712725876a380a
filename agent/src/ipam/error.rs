//! Errors of the IPAM service (the CNI-facing errors are [`super::AllocError`]).
use crate::oci::OciError;

use super::checkpoint::CheckpointError;

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("IPAM could not {action} (VNIC {}): {source}", vnic.as_deref().unwrap_or("-"))]
    Cloud {
        action: &'static str,
        vnic: Option<String>,
        #[source]
        source: Box<OciError>,
    },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("OCI returned an invalid {what} for {id}: {value:?}")]
    Invalid {
        what: &'static str,
        id: String,
        value: String,
    },
    #[error("invalid IPAM configuration: {reason}")]
    Config { reason: String },
}

impl IpamError {
    pub(crate) fn cloud(action: &'static str, vnic: Option<&str>) -> impl FnOnce(OciError) -> Self {
        let vnic = vnic.map(str::to_owned);
        move |source| IpamError::Cloud {
            action,
            vnic,
            source: Box::new(source),
        }
    }

    /// The OCI call that failed, if a call failed.
    pub(crate) fn oci(&self) -> Option<&OciError> {
        match self {
            IpamError::Cloud { source, .. } => Some(source),
            _ => None,
        }
    }
}
