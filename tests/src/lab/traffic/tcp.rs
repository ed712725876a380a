//! TCP: a server recording each peer, bulk transfers and long-lived echo connections.
//!
//! [`TcpServer`] speaks a one-byte protocol chosen by the client's first byte:
//! - `B` (bulk): the server counts bytes until the client shuts down its sending side, then
//!   replies `"<bytes> <peer address>\n"` and closes, so the client learns both whether
//!   everything arrived and which source address the server saw.
//! - `E` (echo): the server echoes everything until the client closes.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, Socket, Type};

use super::{POLL, is_timeout, lock, remaining};
use crate::lab::netns::{Netns, run_in};

const MODE_BULK: u8 = b'B';
const MODE_ECHO: u8 = b'E';

/// One connection a [`TcpServer`] accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnRecord {
    /// The source address and port the server saw.
    pub peer: SocketAddr,
    /// Payload bytes received so far (the mode byte not included).
    pub bytes: u64,
    /// The client closed its side.
    pub closed: bool,
}

#[derive(Default)]
struct ServerState {
    stop: AtomicBool,
    connections: Mutex<Vec<ConnRecord>>,
    handlers: Mutex<Vec<JoinHandle<()>>>,
}

/// A TCP server listening inside a namespace; stops (and joins its threads) on drop.
pub struct TcpServer {
    addr: SocketAddr,
    state: Arc<ServerState>,
    acceptor: Option<JoinHandle<()>>,
}

impl TcpServer {
    /// Listens on `addr` (port 0 picks one; see [`TcpServer::addr`]) inside `ns`.
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        let listener = run_in(ns, || -> io::Result<TcpListener> {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
            socket.set_reuse_address(true)?;
            socket.bind(&addr.into())?;
            socket.listen(128)?;
            // Non-blocking so the acceptor can notice the stop flag.
            socket.set_nonblocking(true)?;
            Ok(socket.into())
        })?
        .with_context(|| format!("TCP listen on {addr} in netns {}", ns.name()))?;
        let addr = listener.local_addr()?;
        let state = Arc::new(ServerState::default());
        let acceptor = {
            let state = Arc::clone(&state);
            thread::spawn(move || accept_loop(&listener, &state))
        };
        Ok(Self {
            addr,
            state,
            acceptor: Some(acceptor),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every connection accepted so far, in order.
    pub fn connections(&self) -> Vec<ConnRecord> {
        lock(&self.state.connections).clone()
    }

    /// Waits until at least `n` connections were accepted.
    pub fn wait_connections(&self, n: usize, timeout: Duration) -> Result<Vec<ConnRecord>> {
        let deadline = Instant::now() + timeout;
        loop {
            let connections = self.connections();
            if connections.len() >= n {
                return Ok(connections);
            }
            if Instant::now() >= deadline {
                bail!(
                    "server {}: expected {n} connections within {timeout:?}, saw {connections:?}",
                    self.addr
                );
            }
            thread::sleep(POLL);
        }
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for handler in lock(&self.state.handlers).drain(..) {
            let _ = handler.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, state: &Arc<ServerState>) {
    while !state.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let index = {
                    let mut connections = lock(&state.connections);
                    connections.push(ConnRecord {
                        peer,
                        bytes: 0,
                        closed: false,
                    });
                    connections.len() - 1
                };
                let handler_state = Arc::clone(state);
                let handler = thread::spawn(move || {
                    if let Err(error) = serve(stream, peer, index, &handler_state) {
                        eprintln!("lab TCP server: connection from {peer}: {error}");
                    }
                });
                lock(&state.handlers).push(handler);
            }
            Err(error) if is_timeout(&error) => thread::sleep(POLL / 5),
            Err(error) => {
                eprintln!("lab TCP server: accept: {error}");
                thread::sleep(POLL);
            }
        }
    }
}

fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    index: usize,
    state: &ServerState,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(POLL))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut mode = None;
    let mut buf = vec![0; 256 * 1024];
    while !state.stop.load(Ordering::Relaxed) {
        let n = match stream.read(&mut buf) {
            Ok(n) => n,
            Err(error) if is_timeout(&error) => continue,
            Err(error) => return Err(error),
        };
        if n == 0 {
            lock(&state.connections)[index].closed = true;
            if mode == Some(MODE_BULK) {
                let bytes = lock(&state.connections)[index].bytes;
                stream.write_all(format!("{bytes} {peer}\n").as_bytes())?;
            }
            return Ok(());
        }
        let mut data = &buf[..n];
        if mode.is_none() {
            mode = Some(data[0]);
            data = &data[1..];
        }
        lock(&state.connections)[index].bytes += data.len() as u64;
        if mode == Some(MODE_ECHO) {
            stream.write_all(data)?;
        }
    }
    Ok(())
}

/// A TCP socket created and connected inside `ns`, bound first to `from` if given
/// (with `SO_REUSEADDR`, so several sockets may share a source port towards different
/// destinations).
pub fn tcp_connect(
    ns: &Netns,
    from: Option<SocketAddr>,
    to: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream> {
    run_in(ns, || -> io::Result<TcpStream> {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        if let Some(from) = from {
            socket.set_reuse_address(true)?;
            socket.bind(&from.into())?;
        }
        socket.connect_timeout(&to.into(), timeout)?;
        Ok(socket.into())
    })?
    .with_context(|| {
        let from = from.map_or_else(|| "any".to_owned(), |a| a.to_string());
        format!("TCP connect from {from} to {to} in netns {}", ns.name())
    })
}

/// What a completed bulk transfer reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BulkReport {
    /// The client socket's own address.
    pub local: SocketAddr,
    /// The source address the server saw (after any translation).
    pub peer_seen: SocketAddr,
    /// Bytes the server received, equal to those sent.
    pub bytes: u64,
    pub elapsed: Duration,
}

/// Sends `bytes` bytes from `ns` to a [`TcpServer`] at `to` and checks that all of them
/// arrived, all within `timeout`.
pub fn tcp_bulk(
    ns: &Netns,
    from: Option<SocketAddr>,
    to: SocketAddr,
    bytes: u64,
    timeout: Duration,
) -> Result<BulkReport> {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut stream = tcp_connect(ns, from, to, timeout)?;
    let local = stream.local_addr()?;
    let what = format!(
        "TCP bulk of {bytes} bytes {local} -> {to} in netns {}",
        ns.name()
    );
    let report = (|| -> io::Result<String> {
        let chunk = vec![0x5a_u8; 64 * 1024];
        stream.set_write_timeout(Some(remaining(deadline, "sending")?))?;
        stream.write_all(&[MODE_BULK])?;
        let mut left = bytes;
        while left > 0 {
            let n = usize::try_from(left).unwrap_or(usize::MAX).min(chunk.len());
            stream.set_write_timeout(Some(remaining(deadline, "sending")?))?;
            stream.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        stream.shutdown(Shutdown::Write)?;
        stream.set_read_timeout(Some(remaining(deadline, "waiting for the report")?))?;
        let mut report = String::new();
        stream.read_to_string(&mut report)?;
        Ok(report)
    })()
    .with_context(|| what.clone())?;
    let (received, peer) = report
        .trim()
        .split_once(' ')
        .with_context(|| format!("{what}: malformed report {report:?}"))?;
    let received: u64 = received
        .parse()
        .with_context(|| format!("{what}: malformed report {report:?}"))?;
    if received != bytes {
        bail!("{what}: server received {received} bytes");
    }
    Ok(BulkReport {
        local,
        peer_seen: peer
            .parse()
            .with_context(|| format!("{what}: malformed report {report:?}"))?,
        bytes,
        elapsed: start.elapsed(),
    })
}

/// A TCP connection to a [`TcpServer`] in echo mode that stays open, e.g. across an
/// agent restart.
pub struct TcpConn {
    stream: TcpStream,
    to: SocketAddr,
}

impl TcpConn {
    pub fn connect(
        ns: &Netns,
        from: Option<SocketAddr>,
        to: SocketAddr,
        timeout: Duration,
    ) -> Result<Self> {
        let mut stream = tcp_connect(ns, from, to, timeout)?;
        stream.set_write_timeout(Some(timeout))?;
        stream
            .write_all(&[MODE_ECHO])
            .with_context(|| format!("starting echo to {to}"))?;
        Ok(Self { stream, to })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.stream.local_addr()?)
    }

    /// How many segments the kernel retransmitted on this connection (`TCP_INFO`'s
    /// `tcpi_total_retrans`): a lost segment or a lost reply shows here.
    pub fn retransmits(&self) -> Result<u32> {
        use std::os::fd::AsRawFd as _;
        // SAFETY: `tcp_info` is plain integers; all zeroes is a valid value.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `info`, which has that size.
        let rc = unsafe {
            libc::getsockopt(
                self.stream.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&raw mut info).cast(),
                &raw mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("getsockopt(TCP_INFO)");
        }
        Ok(info.tcpi_total_retrans)
    }

    /// Sends `message` and waits for the identical echo.
    pub fn roundtrip(&mut self, message: &[u8], timeout: Duration) -> Result<()> {
        let (local, to) = (self.stream.local_addr()?, self.to);
        let what = || format!("echo of {} bytes {local} -> {to}", message.len());
        self.stream.set_write_timeout(Some(timeout))?;
        self.stream.set_read_timeout(Some(timeout))?;
        self.stream.write_all(message).with_context(what)?;
        let mut echo = vec![0; message.len()];
        self.stream.read_exact(&mut echo).with_context(what)?;
        if echo != message {
            bail!("{}: the echo differs from what was sent", what());
        }
        Ok(())
    }
}
