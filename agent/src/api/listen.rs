//! Serving HTTP/1 to clients that may be slow, idle or hostile, on the Unix socket and the
//! TCP listener alike: a header read timeout, an idle timeout, a request timeout and a
//! connection cap. At the cap the connection idle the longest gives way to the new one, so
//! a client holding many idle (or slowloris) connections cannot lock out a CNI ADD or a
//! kubelet probe; only when every connection is busy with a request is a new one refused.
//!
//! Each listener has its own connections and cap: the TCP listener filling up never
//! touches the CNI socket. axum's own `serve` has none of these limits, hence this loop.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    http::{Request, StatusCode},
    response::{IntoResponse, Response},
    serve::Listener,
};
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{sync::Notify, task::JoinSet, time::Instant};
use tower::ServiceExt as _;
use tracing::{debug, warn};

/// How long a client may take, and how many connections it may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// From the start of a request to the end of its headers.
    pub header_read: Duration,
    /// A connection with no request in flight for this long is closed (counted from its
    /// accept or its last response).
    pub idle: Duration,
    /// One request, body and handler included.
    pub request: Duration,
    /// Open connections at most.
    pub max_connections: usize,
}

impl Limits {
    /// The CNI socket: an ADD may wait for the pool (the plugin gives up after 10 s by
    /// default, configurable), so requests get well over that.
    pub const UNIX_SOCKET: Self = Self {
        header_read: Duration::from_secs(5),
        idle: Duration::from_secs(10),
        request: Duration::from_mins(2),
        max_connections: 256,
    };
    /// `/metrics`, `/healthz`, `/readyz`: quick answers; Prometheus' keep-alive connection
    /// between scrapes may be closed and is simply reopened.
    pub const HTTP: Self = Self {
        header_read: Duration::from_secs(5),
        idle: Duration::from_secs(30),
        request: Duration::from_secs(10),
        max_connections: 64,
    };
}

/// One connection's bookkeeping, shared by its task and the cap.
struct Conn {
    /// Requests being handled now.
    busy: AtomicUsize,
    /// Milliseconds since the listener's start at the accept or the last response.
    idle_since: AtomicU64,
    /// Told to close (given way to a newer connection).
    evict: Notify,
}

struct Registry {
    start: Instant,
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
}

impl Registry {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Room for a new connection, evicting the longest-idle one at the cap; `None` when
    /// every connection is busy.
    fn admit(self: &Arc<Self>, max: usize) -> Option<Admitted> {
        let mut conns = self.lock();
        if conns.len() >= max {
            let oldest = conns
                .iter()
                .filter(|(_, c)| c.busy.load(Ordering::Acquire) == 0)
                .min_by_key(|(_, c)| c.idle_since.load(Ordering::Relaxed))
                .map(|(id, _)| *id)?;
            if let Some(evicted) = conns.remove(&oldest) {
                evicted.evict.notify_one();
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            busy: AtomicUsize::new(0),
            idle_since: AtomicU64::new(self.now_ms()),
            evict: Notify::new(),
        });
        conns.insert(id, conn.clone());
        Some(Admitted {
            registry: self.clone(),
            id,
            conn,
        })
    }
}

/// A connection's place under the cap, given back when its task ends.
struct Admitted {
    registry: Arc<Registry>,
    id: u64,
    conn: Arc<Conn>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

/// A request in flight: the connection is not idle until it is dropped (answered, timed
/// out, or the connection went away).
struct InFlight<'a>(&'a Conn, &'a Registry);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.idle_since.store(self.1.now_ms(), Ordering::Relaxed);
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves `router` on `listener` with `limits` until `shutdown` completes; then lets the
/// requests in flight finish (a few seconds at most).
pub async fn serve<L: Listener>(
    mut listener: L,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let registry = Arc::new(Registry {
        start: Instant::now(),
        next: AtomicU64::new(0),
        conns: Mutex::new(HashMap::new()),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut refused = 0u64;
    tokio::pin!(shutdown);
    loop {
        let (io, _) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        while tasks.try_join_next().is_some() {}
        let Some(admitted) = registry.admit(limits.max_connections) else {
            refused += 1;
            if refused.is_power_of_two() {
                warn!(
                    max = limits.max_connections,
                    refused, "every connection is busy with a request; refusing new ones"
                );
            }
            continue;
        };
        tasks.spawn(connection(
            io,
            router.clone(),
            admitted,
            limits,
            stop_rx.clone(),
        ));
    }
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    });
    if drained.await.is_err() {
        debug!("requests still in flight at shutdown were cut");
    }
}

async fn connection<Io>(
    io: Io,
    router: Router,
    admitted: Admitted,
    limits: Limits,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = admitted.conn.clone();
    let registry = admitted.registry.clone();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let (router, conn, registry) = (router.clone(), conn.clone(), registry.clone());
        async move {
            conn.busy.fetch_add(1, Ordering::AcqRel);
            let _in_flight = InFlight(&conn, &registry);
            let response = match tokio::time::timeout(limits.request, router.oneshot(request)).await
            {
                Ok(Ok(response)) => response,
                Ok(Err(never)) => match never {},
                Err(_) => request_timed_out(limits.request),
            };
            Ok::<_, Infallible>(response)
        }
    });
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(served);
    tokio::select! {
        _ = &mut served => {}
        () = admitted.conn.evict.notified() => {}
        () = idle(&admitted, limits.idle) => {}
        () = async { drop(stop.wait_for(|stop| *stop).await) } => {
            served.as_mut().graceful_shutdown();
            let _ = served.await;
        }
    }
}

/// Completes once the connection has had no request in flight for `limit`.
async fn idle(admitted: &Admitted, limit: Duration) {
    let limit_ms = limit.as_millis() as u64;
    loop {
        let conn = &admitted.conn;
        let wait = if conn.busy.load(Ordering::Acquire) == 0 {
            let idle_for = admitted
                .registry
                .now_ms()
                .saturating_sub(conn.idle_since.load(Ordering::Relaxed));
            if idle_for >= limit_ms {
                return;
            }
            limit_ms - idle_for
        } else {
            limit_ms
        };
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
}

fn request_timed_out(limit: Duration) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the request took longer than {limit:?}; try again\n"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    async fn get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        Ok(answer)
    }

    /// 2,100 idle connections to the HTTP listener (the number that broke other pods'
    /// probes) leave `/healthz` answering at once, stay within the cap on the server side,
    /// and are closed after the idle timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_do_not_block_probes_and_are_closed() {
        let limits = Limits {
            header_read: Duration::from_millis(300),
            idle: Duration::from_millis(500),
            ..Limits::HTTP
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/healthz", axum::routing::get(|| async { "ok\n" }));
        tokio::spawn(serve(listener, app, limits, std::future::pending()));
        let mut held = Vec::new();
        for _ in 0..2100 {
            held.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
        }
        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(2), get(addr, "/healthz"))
            .await
            .expect("/healthz answers within 2 s with 2,100 idle connections open")
            .expect("/healthz");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        let mut open = 0;
        let deadline = Duration::from_secs(5);
        let mut reads = JoinSet::new();
        for mut stream in held {
            reads.spawn(async move {
                let mut sink = Vec::new();
                tokio::time::timeout(deadline, stream.read_to_end(&mut sink))
                    .await
                    .is_ok()
            });
        }
        for closed in reads.join_all().await {
            open += usize::from(!closed);
        }
        assert_eq!(
            open, 0,
            "every idle connection must be closed by the server"
        );
    }

    /// A request stuck in its handler is cut at the request timeout, and its connection
    /// is not evicted while it is busy.
    #[tokio::test]
    async fn a_slow_request_is_answered_at_the_request_timeout() {
        let limits = Limits {
            request: Duration::from_millis(200),
            ..Limits::HTTP
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route(
            "/slow",
            axum::routing::get(std::future::pending::<&'static str>),
        );
        tokio::spawn(serve(listener, app, limits, std::future::pending()));
        let answer = tokio::time::timeout(Duration::from_secs(2), get(addr, "/slow"))
            .await
            .expect("answered at the request timeout")
            .expect("request");
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    }
}
