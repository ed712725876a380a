//! The agent's local API: what the CNI plugin (and `vcnpath status`) asks the agent, over a
//! root-only Unix socket.
//!
//! Why HTTP/1 + JSON (axum on the server, a bare hyper connection in the plugin) rather
//! than a hand-rolled framed protocol: axum is already in the workspace, serves a
//! `tokio::net::UnixListener` directly, and gives request size limits, JSON rejection
//! and routing for free; an operator can also poke the socket with
//! `curl --unix-socket /run/vcnpath/vcnpath.sock http://agent/v1/version`. A framed
//! protocol would save one dependency edge and cost a parser, a versioning scheme and
//! a debugging story of its own.
//!
//! Routes (all bodies JSON; the `v1` prefix is the compatibility contract between a
//! plugin binary and an agent that may have been upgraded separately):
//! - `GET  /v1/version`  → [`VersionResponse`]
//! - `POST /v1/allocate` [`PodRef`] → [`AllocateResponse`]
//! - `POST /v1/release`  [`PodRef`] → [`ReleaseResponse`]
//! - `POST /v1/lookup`   [`PodRef`] → [`LookupResponse`]
//! - `POST /v1/gc`       [`GcRequest`] → [`GcResponse`] (CNI GC)
//! - `GET  /v1/cni-status` → [`CniStatusResponse`] (CNI STATUS; served by [`status_router`])
//!
//! Every failure is an [`ErrorBody`] carrying the typed [`AllocError`].
//!
//! [`PodRef`]: crate::ipam::PodRef
//! [`AllocError`]: crate::ipam::AllocError

pub mod client;
pub mod listen;
pub mod server;
pub mod types;

pub use client::{Client, ClientError};
pub use listen::Limits;
pub use server::{Readiness, ServeError, bind, router, serve, status_router};
pub use types::{
    API_VERSION, AllocateResponse, CniStatusResponse, ErrorBody, GcRequest, GcResponse,
    LookupResponse, ReleaseResponse, VersionResponse,
};

/// Where the agent listens unless configured otherwise; the conflist names it too.
pub const DEFAULT_SOCKET: &str = "/run/vcnpath/vcnpath.sock";

#[cfg(test)]
mod tests;
