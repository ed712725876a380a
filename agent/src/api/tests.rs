//! The local API end to end over a real Unix socket in a temp dir, with an in-memory
//! allocator: the typed answers and errors a plugin relies on, and the socket's safety.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt,
    sync::{Arc, Mutex},
    time::Duration,
};

use super::{Client, ClientError, ServeError, bind, router, serve};
use crate::ipam::{AllocError, Allocation, Allocator, BoxFuture, PodRef};

/// Hands out 10.0.1.2, .3, … ; a pod named `empty` gets `PoolEmpty`.
#[derive(Default)]
struct Fake {
    pods: Mutex<HashMap<(String, String), Allocation>>,
}

impl Allocator for Fake {
    fn allocate<'a>(&'a self, pod: &'a PodRef) -> BoxFuture<'a, Result<Allocation, AllocError>> {
        Box::pin(async move {
            if pod.name.as_deref() == Some("empty") {
                return Err(AllocError::PoolEmpty {
                    retry_after_ms: 1500,
                    cause: None,
                });
            }
            let mut pods = self.pods.lock().unwrap();
            let n = pods.len() as u8 + 2;
            let key = (pod.container_id.clone(), pod.ifname.clone());
            Ok(pods
                .entry(key)
                .or_insert_with(|| Allocation {
                    ip: Ipv4Addr::new(10, 0, 1, n),
                    vnic_id: "ocid1.vnic.oc1..fake".into(),
                    interface: "eth1".into(),
                    subnet: "10.0.1.0/24".parse().unwrap(),
                    router_ip: Ipv4Addr::new(10, 0, 1, 1),
                    mtu: 9000,
                })
                .clone())
        })
    }

    fn release<'a>(
        &'a self,
        pod: &'a PodRef,
    ) -> BoxFuture<'a, Result<Option<Allocation>, AllocError>> {
        Box::pin(async move {
            let key = (pod.container_id.clone(), pod.ifname.clone());
            Ok(self.pods.lock().unwrap().remove(&key))
        })
    }

    fn lookup<'a>(&'a self, pod: &'a PodRef) -> BoxFuture<'a, Option<Allocation>> {
        Box::pin(async move {
            let key = (pod.container_id.clone(), pod.ifname.clone());
            self.pods.lock().unwrap().get(&key).cloned()
        })
    }
}

fn pod(id: &str, name: &str) -> PodRef {
    PodRef {
        container_id: id.into(),
        ifname: "eth0".into(),
        namespace: Some("default".into()),
        name: Some(name.into()),
    }
}

/// Serves the API on a socket under a fresh temp dir (call inside a runtime); the server
/// stops with the runtime.
fn start(dir: &tempfile::TempDir) -> Client {
    let path = dir.path().join("run").join("vcnpath.sock");
    let listener = bind(&path).expect("bind");
    let app = router(Arc::new(Fake::default()));
    tokio::spawn(serve(listener, app, std::future::pending()));
    Client::new(path, Duration::from_secs(5))
}

#[tokio::test]
async fn allocate_lookup_release_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let client = start(&dir);
    let version = client.version().await.expect("version");
    assert_eq!(version.api, "v1");

    let a = pod("c1", "web");
    let first = client.allocate(&a).await.expect("allocate");
    assert_eq!(first.ip, Ipv4Addr::new(10, 0, 1, 2));
    let again = client.allocate(&a).await.expect("allocate again");
    assert_eq!(first, again, "allocate must be idempotent per pod");
    assert_eq!(client.lookup(&a).await.unwrap(), Some(first.clone()));
    assert_eq!(client.release(&a).await.unwrap(), Some(first));
    assert_eq!(
        client.release(&a).await.unwrap(),
        None,
        "second release is a no-op"
    );
    assert_eq!(client.lookup(&a).await.unwrap(), None);
}

#[tokio::test]
async fn typed_errors_cross_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let client = start(&dir);
    match client.allocate(&pod("c2", "empty")).await {
        Err(ClientError::Agent(AllocError::PoolEmpty {
            retry_after_ms: 1500,
            ..
        })) => {}
        other => panic!("expected PoolEmpty from the agent, got {other:?}"),
    }
    let error = client.allocate(&pod("c2", "empty")).await.unwrap_err();
    assert!(error.is_temporary(), "PoolEmpty must be retryable: {error}");
}

#[tokio::test]
async fn malformed_request_is_a_typed_invalid_error() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let dir = tempfile::tempdir().unwrap();
    let client = start(&dir);
    let mut stream = tokio::net::UnixStream::connect(client.socket())
        .await
        .unwrap();
    let body = "{\"container_id\": 5}";
    let request = format!(
        "POST /v1/allocate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 400"),
        "expected 400, got {answer}"
    );
    let json = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    let body: super::ErrorBody = serde_json::from_str(json)
        .unwrap_or_else(|e| panic!("error body is not an ErrorBody ({e}): {json}"));
    assert!(matches!(body.error, AllocError::Invalid { .. }), "{body:?}");
}

#[tokio::test]
async fn agent_not_running_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let client = Client::new(dir.path().join("absent.sock"), Duration::from_secs(1));
    let error = client.allocate(&pod("c3", "web")).await.unwrap_err();
    assert!(matches!(error, ClientError::NotRunning { .. }), "{error:?}");
    assert!(error.is_temporary());
    assert!(
        error
            .to_string()
            .contains("is the vcnpath DaemonSet running on this node?"),
        "{error}"
    );
}

#[tokio::test]
async fn silent_agent_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("silent.sock");
    // Accepts connections but never answers.
    let _listener = tokio::net::UnixListener::bind(&path).unwrap();
    let client = Client::new(&path, Duration::from_millis(200));
    let error = client.version().await.unwrap_err();
    assert!(matches!(error, ClientError::Timeout { .. }), "{error:?}");
}

#[tokio::test]
async fn socket_is_root_only_and_never_stolen() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let path = run.join("vcnpath.sock");
    let listener = bind(&path).expect("bind");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&run), 0o700, "socket directory");
    assert_eq!(mode(&path), 0o600, "socket");
    // A live agent keeps its socket.
    assert!(matches!(bind(&path), Err(ServeError::InUse { .. })));
    // A dead one's socket is replaced.
    drop(listener);
    bind(&path).expect("rebinding over a stale socket");
    // A file that is not a socket is never deleted.
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, "keep me").unwrap();
    assert!(matches!(bind(&file), Err(ServeError::NotASocket { .. })));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

/// How long until every stream reads end-of-file (the server closed it), at most `within`.
/// Each stream reads until EOF, discarding whatever the server sent first (a 408 or 400
/// for a half-sent request).
async fn all_closed<S>(streams: Vec<S>, within: Duration) -> Result<(), usize>
where
    S: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    use tokio::io::AsyncReadExt as _;
    let mut reads = tokio::task::JoinSet::new();
    for mut stream in streams {
        reads.spawn(async move {
            let mut sink = Vec::new();
            tokio::time::timeout(within, stream.read_to_end(&mut sink))
                .await
                .is_ok()
        });
    }
    let open = reads
        .join_all()
        .await
        .iter()
        .filter(|closed| !**closed)
        .count();
    if open == 0 { Ok(()) } else { Err(open) }
}

/// 1,000 idle and slowloris connections on the CNI socket (four times its cap) do not
/// delay an ADD, and the server closes them once their header or idle time is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slowloris_connections_do_not_block_an_add() {
    use tokio::io::AsyncWriteExt as _;
    let limits = super::Limits {
        header_read: Duration::from_millis(300),
        idle: Duration::from_millis(500),
        ..super::Limits::UNIX_SOCKET
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vcnpath.sock");
    let listener = bind(&path).expect("bind");
    let app = router(Arc::new(Fake::default()));
    tokio::spawn(super::listen::serve(
        listener,
        app,
        limits,
        std::future::pending(),
    ));
    let mut held = Vec::new();
    for n in 0..1000 {
        let mut stream = tokio::net::UnixStream::connect(&path)
            .await
            .expect("connect");
        if n % 2 == 0 {
            // Slowloris: a request whose headers never end.
            stream
                .write_all(b"POST /v1/allocate HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
        }
        held.push(stream);
    }
    let client = Client::new(&path, Duration::from_secs(2));
    let started = std::time::Instant::now();
    let allocation = client.allocate(&pod("c9", "web")).await;
    assert!(
        allocation.is_ok(),
        "an ADD with 1,000 idle connections open must be served: {allocation:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the ADD waited {:?}",
        started.elapsed()
    );
    assert_eq!(
        all_closed(held, Duration::from_secs(5)).await,
        Ok(()),
        "idle and slowloris connections must be closed after the header/idle timeouts"
    );
}
