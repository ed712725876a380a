//! The agent's side of the local API: an axum router over any [`Allocator`], served on a
//! Unix socket that only root can open.

use std::{
    future::Future,
    io,
    os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use axum::{
    Json, Router,
    extract::{State, rejection::JsonRejection},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use tokio::net::UnixListener;
use tracing::{info, warn};

use super::types::{
    API_VERSION, AllocateResponse, CniStatusResponse, ErrorBody, GcRequest, GcResponse,
    LookupResponse, ReleaseResponse, VersionResponse,
};
use crate::ipam::{AllocError, Allocator, BoxFuture, PodRef};

/// What CNI STATUS asks: whether the agent can serve ADDs now.
pub trait Readiness: Send + Sync + 'static {
    /// What keeps the agent from serving ADDs; empty when it can.
    fn not_ready(&self) -> BoxFuture<'_, Vec<String>>;
}

/// Why the API could not be set up or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create the socket directory {path}: {source}")]
    Directory { path: PathBuf, source: io::Error },
    #[error(
        "another process already serves {path}; is a second vcnpath agent running on this node?"
    )]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket; remove it or configure another socket path")]
    NotASocket { path: PathBuf },
    #[error("cannot remove the stale socket {path}: {source}")]
    Stale { path: PathBuf, source: io::Error },
    #[error("cannot listen on {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot restrict {path} to root (chmod 0600): {source}")]
    Permissions { path: PathBuf, source: io::Error },
    #[error("serving the local API failed: {0}")]
    Serve(io::Error),
}

/// Listens on `path`: creates its directory (0700) if missing, replaces a socket left by
/// an agent that died, refuses to steal one a live agent still serves, and makes the
/// socket 0600 so only root can ask for addresses.
pub fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| ServeError::Directory {
                    path: dir.to_owned(),
                    source,
                })?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ServeError::NotASocket {
                path: path.to_owned(),
            });
        }
        Ok(_) => {
            // A socket nobody accepts on is what a killed agent leaves behind.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServeError::InUse {
                    path: path.to_owned(),
                });
            }
            std::fs::remove_file(path).map_err(|source| ServeError::Stale {
                path: path.to_owned(),
                source,
            })?;
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| ServeError::Bind {
        path: path.to_owned(),
        source,
    })?;
    // The directory is 0700 when we created it, so the socket is never reachable by
    // others between bind and this chmod.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ServeError::Permissions {
            path: path.to_owned(),
            source,
        }
    })?;
    Ok(listener)
}

/// Serves `router` on `listener` until `shutdown` completes, with the socket's
/// [`Limits`](super::Limits) (timeouts, a connection cap).
pub async fn serve(
    listener: UnixListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    super::listen::serve(listener, router, super::Limits::UNIX_SOCKET, shutdown).await;
    Ok(())
}

/// The API routes over `allocator`.
pub fn router(allocator: Arc<dyn Allocator>) -> Router {
    Router::new()
        .route("/v1/version", get(version))
        .route("/v1/allocate", post(allocate))
        .route("/v1/release", post(release))
        .route("/v1/lookup", post(lookup))
        .route("/v1/gc", post(gc))
        .fallback(unknown_route)
        .with_state(allocator)
}

async fn version() -> Json<VersionResponse> {
    Json(VersionResponse {
        api: API_VERSION.to_owned(),
        agent: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

async fn allocate(
    State(allocator): State<Arc<dyn Allocator>>,
    body: Result<Json<PodRef>, JsonRejection>,
) -> Result<Json<AllocateResponse>, ApiError> {
    let pod = body?.0;
    match allocator.allocate(&pod).await {
        Ok(allocation) => {
            info!(container_id = %pod.container_id, ifname = %pod.ifname, ip = %allocation.ip, vnic = %allocation.vnic_id, "allocated");
            Ok(Json(AllocateResponse { allocation }))
        }
        Err(error) => {
            warn!(container_id = %pod.container_id, ifname = %pod.ifname, %error, "allocation failed");
            Err(ApiError(error))
        }
    }
}

async fn release(
    State(allocator): State<Arc<dyn Allocator>>,
    body: Result<Json<PodRef>, JsonRejection>,
) -> Result<Json<ReleaseResponse>, ApiError> {
    let pod = body?.0;
    let released = allocator.release(&pod).await?;
    if let Some(allocation) = &released {
        info!(container_id = %pod.container_id, ifname = %pod.ifname, ip = %allocation.ip, "released");
    }
    Ok(Json(ReleaseResponse { released }))
}

async fn lookup(
    State(allocator): State<Arc<dyn Allocator>>,
    body: Result<Json<PodRef>, JsonRejection>,
) -> Result<Json<LookupResponse>, ApiError> {
    let pod = body?.0;
    Ok(Json(LookupResponse {
        allocation: allocator.lookup(&pod).await,
    }))
}

/// `/v1/cni-status` over `readiness`, merged into the local API.
pub fn status_router(readiness: Arc<dyn Readiness>) -> Router {
    Router::new()
        .route("/v1/cni-status", get(cni_status))
        .with_state(readiness)
}

async fn cni_status(State(readiness): State<Arc<dyn Readiness>>) -> Json<CniStatusResponse> {
    let problems = readiness.not_ready().await;
    Json(CniStatusResponse {
        ready: problems.is_empty(),
        problems,
    })
}

async fn gc(
    State(allocator): State<Arc<dyn Allocator>>,
    body: Result<Json<GcRequest>, JsonRejection>,
) -> Result<Json<GcResponse>, ApiError> {
    let valid: std::collections::BTreeSet<(String, String)> = body?
        .0
        .valid
        .into_iter()
        .map(|p| (p.container_id, p.ifname))
        .collect();
    let released = allocator.collect_not_listed(&valid).await;
    info!(
        valid = valid.len(),
        released = released.len(),
        "CNI GC done"
    );
    Ok(Json(GcResponse {
        released: released.into_iter().map(|(pod, _)| pod).collect(),
    }))
}

async fn unknown_route() -> ApiError {
    ApiError(AllocError::Invalid {
        reason: format!("no such route; this agent serves the {API_VERSION} API"),
    })
}

/// An [`AllocError`] as an HTTP answer: a status a person reading logs expects, a
/// `Retry-After` for temporary conditions, and the typed body the plugin decodes.
struct ApiError(AllocError);

impl From<AllocError> for ApiError {
    fn from(error: AllocError) -> Self {
        Self(error)
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        Self(AllocError::Invalid {
            reason: rejection.body_text(),
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self.0 {
            AllocError::Invalid { .. } => StatusCode::BAD_REQUEST,
            AllocError::PoolEmpty { .. }
            | AllocError::CoolingDown { .. }
            | AllocError::NotReady
            | AllocError::Exhausted { .. } => StatusCode::SERVICE_UNAVAILABLE,
            AllocError::Checkpoint { .. } | AllocError::Datapath { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let retry_after = self.0.retry_after();
        let mut response = (status, Json(ErrorBody::from(self.0))).into_response();
        if let Some(wait) = retry_after {
            // Whole seconds, rounded up, at least 1 (the header has no fractions).
            let secs = wait.as_millis().div_ceil(1000).max(1);
            if let Ok(value) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
    }
}
