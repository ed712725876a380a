//! The plugin's side of the local API: one short HTTP/1 exchange per call over the Unix
//! socket, bounded by a timeout, with errors that tell an operator what to check.

use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use http_body_util::{BodyExt as _, Full};
use hyper::{
    Method, Request, StatusCode,
    body::Bytes,
    header::{CONTENT_TYPE, HOST},
};
use hyper_util::rt::TokioIo;
use serde::{Serialize, de::DeserializeOwned};
use tokio::net::UnixStream;

use super::types::{
    AllocateResponse, CniStatusResponse, ErrorBody, GcRequest, GcResponse, LookupResponse,
    ReleaseResponse, VersionResponse,
};
use crate::ipam::{AllocError, Allocation, PodRef};

/// Why a call to the agent did not produce an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the vcnpath agent at {}: {source}; is the vcnpath DaemonSet running on this node?",
        socket.display()
    )]
    NotRunning { socket: PathBuf, source: io::Error },
    #[error(
        "the vcnpath agent at {} did not answer {what} within {after:?}; check the agent's logs",
        socket.display()
    )]
    Timeout {
        socket: PathBuf,
        what: &'static str,
        after: Duration,
    },
    /// The agent answered with a typed refusal.
    #[error(transparent)]
    Agent(AllocError),
    #[error(
        "unexpected answer from the vcnpath agent at {} to {what}: {detail}; are vcnpath-cni and the agent the same release?",
        socket.display()
    )]
    Protocol {
        socket: PathBuf,
        what: &'static str,
        detail: String,
    },
}

impl ClientError {
    /// True when retrying later may succeed (the agent is down, slow, or its pool is
    /// still filling): the plugin reports these as CNI "try again later".
    pub fn is_temporary(&self) -> bool {
        match self {
            ClientError::NotRunning { .. } | ClientError::Timeout { .. } => true,
            ClientError::Agent(error) => error.retry_after().is_some(),
            ClientError::Protocol { .. } => false,
        }
    }
}

/// A client for the agent's socket. Cheap to create; holds no connection.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    /// A client for the agent listening on `socket`; each call gives up after `timeout`.
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            socket: socket.into(),
            timeout,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The agent's API and release.
    pub async fn version(&self) -> Result<VersionResponse, ClientError> {
        self.call(Method::GET, "/v1/version", "version", None::<&()>)
            .await
    }

    /// An address for `pod` (the same one again if it already has one).
    pub async fn allocate(&self, pod: &PodRef) -> Result<Allocation, ClientError> {
        let answer: AllocateResponse = self
            .call(Method::POST, "/v1/allocate", "allocate", Some(pod))
            .await?;
        Ok(answer.allocation)
    }

    /// Frees `pod`'s address; `None` when the agent had no record of it.
    pub async fn release(&self, pod: &PodRef) -> Result<Option<Allocation>, ClientError> {
        let answer: ReleaseResponse = self
            .call(Method::POST, "/v1/release", "release", Some(pod))
            .await?;
        Ok(answer.released)
    }

    /// `pod`'s current allocation, if any.
    pub async fn lookup(&self, pod: &PodRef) -> Result<Option<Allocation>, ClientError> {
        let answer: LookupResponse = self
            .call(Method::POST, "/v1/lookup", "lookup", Some(pod))
            .await?;
        Ok(answer.allocation)
    }

    /// CNI GC: releases every allocation not in `valid`; returns the attachments released.
    pub async fn gc(&self, valid: Vec<PodRef>) -> Result<Vec<PodRef>, ClientError> {
        let answer: GcResponse = self
            .call(Method::POST, "/v1/gc", "gc", Some(&GcRequest { valid }))
            .await?;
        Ok(answer.released)
    }

    /// CNI STATUS: whether the agent can serve ADDs now, and if not, why.
    pub async fn cni_status(&self) -> Result<CniStatusResponse, ClientError> {
        self.call(Method::GET, "/v1/cni-status", "status", None::<&()>)
            .await
    }

    /// The node's state (`vcnpath status`), as served by the running agent.
    pub async fn status(&self) -> Result<serde_json::Value, ClientError> {
        self.call(Method::GET, "/v1/status", "status", None::<&()>)
            .await
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &'static str,
        what: &'static str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        match tokio::time::timeout(self.timeout, self.exchange(method, path, what, body)).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout {
                socket: self.socket.clone(),
                what,
                after: self.timeout,
            }),
        }
    }

    async fn exchange<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &'static str,
        what: &'static str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let protocol = |detail: String| ClientError::Protocol {
            socket: self.socket.clone(),
            what,
            detail,
        };
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::NotRunning {
                    socket: self.socket.clone(),
                    source,
                })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| protocol(format!("HTTP handshake: {e}")))?;
        // The connection future moves the bytes; it ends when `sender` is dropped.
        let driver = tokio::spawn(connection);
        let payload = match body {
            Some(body) => serde_json::to_vec(body)
                .map_err(|e| protocol(format!("encoding the request: {e}")))?,
            None => Vec::new(),
        };
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, "vcnpath")
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(payload)))
            .map_err(|e| protocol(format!("building the request: {e}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| protocol(format!("sending the request: {e}")))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| protocol(format!("reading the answer: {e}")))?
            .to_bytes();
        drop(sender);
        driver.abort();
        if status == StatusCode::OK {
            return serde_json::from_slice(&bytes)
                .map_err(|e| protocol(format!("decoding the answer: {e}")));
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Err(ClientError::Agent(body.error)),
            Err(_) => Err(protocol(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&bytes).trim()
            ))),
        }
    }
}
