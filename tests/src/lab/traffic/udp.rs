//! UDP: an echo server that reports the source address it saw.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

use super::{POLL, is_timeout, lock, remaining};
use crate::lab::netns::{Netns, run_in};

/// A UDP server inside a namespace that answers each datagram with
/// `"<peer address>\n"` followed by the datagram, and records the peers.
pub struct UdpEchoServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEchoServer {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        let socket = run_in(ns, || UdpSocket::bind(addr))?
            .with_context(|| format!("UDP bind {addr} in netns {}", ns.name()))?;
        socket.set_read_timeout(Some(POLL))?;
        let addr = socket.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, peers) = (Arc::clone(&stop), Arc::clone(&peers));
            thread::spawn(move || {
                let mut buf = vec![0; 65536];
                while !stop.load(Ordering::Relaxed) {
                    match socket.recv_from(&mut buf) {
                        Ok((n, peer)) => {
                            lock(&peers).push(peer);
                            let mut reply = format!("{peer}\n").into_bytes();
                            reply.extend_from_slice(&buf[..n]);
                            if let Err(error) = socket.send_to(&reply, peer) {
                                eprintln!("lab UDP server: reply to {peer}: {error}");
                            }
                        }
                        Err(error) if is_timeout(&error) => {}
                        Err(error) => eprintln!("lab UDP server: {error}"),
                    }
                }
            })
        };
        Ok(Self {
            addr,
            stop,
            peers,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The source of every datagram received, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        lock(&self.peers).clone()
    }
}

impl Drop for UdpEchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A [`UdpEchoServer`]'s answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpReply {
    /// The source address the server saw.
    pub peer_seen: SocketAddr,
    pub payload: Vec<u8>,
}

/// Sends `payload` from `ns` (bound to `from` if given) to a [`UdpEchoServer`] and waits
/// for its answer, resending every 500 ms until `timeout`.
pub fn udp_request(
    ns: &Netns,
    from: Option<SocketAddr>,
    to: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Result<UdpReply> {
    let what = format!("UDP request to {to} from netns {}", ns.name());
    let socket = run_in(ns, || -> io::Result<UdpSocket> {
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        socket.set_reuse_address(true)?;
        let from = from.unwrap_or_else(|| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
        socket.bind(&from.into())?;
        let socket: UdpSocket = socket.into();
        // Connected, so only the server's answers are accepted.
        socket.connect(to)?;
        Ok(socket)
    })?
    .with_context(|| what.clone())?;
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0; 65536];
    loop {
        let left = remaining(deadline, "no answer").with_context(|| what.clone())?;
        socket.send(payload).with_context(|| what.clone())?;
        socket.set_read_timeout(Some(left.min(Duration::from_millis(500))))?;
        match socket.recv(&mut buf) {
            Ok(n) => {
                let reply = &buf[..n];
                let newline = reply
                    .iter()
                    .position(|&b| b == b'\n')
                    .with_context(|| format!("{what}: malformed answer"))?;
                let peer = std::str::from_utf8(&reply[..newline])
                    .ok()
                    .and_then(|peer| peer.parse().ok())
                    .with_context(|| format!("{what}: malformed answer"))?;
                return Ok(UdpReply {
                    peer_seen: peer,
                    payload: reply[newline + 1..].to_vec(),
                });
            }
            Err(error) if is_timeout(&error) => {}
            Err(error) => return Err(error).with_context(|| what.clone()),
        }
    }
}
