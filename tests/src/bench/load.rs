//! Load generators, written here rather than taken from iperf3 so that the client and the
//! server are pinned the same way in every measurement and nothing is spawned per run:
//! - [`udp_rate`]: a `sendmmsg` blaster of minimum-size frames (18-byte payload, 60-byte
//!   frames) and a `recvmmsg` sink. Batching the system calls makes the per-packet
//!   forwarding work (where the two datapaths differ) the bulk of what the sending CPU
//!   does; iperf3 -u sends one datagram per system call, which dilutes the difference.
//! - [`tcp_rr`]: one connection, 64-byte request and response, every round trip timed.
//! - [`tcp_bulk`]: one connection, 128 KiB writes, bytes counted at the receiver.
//!
//! The client runs on CPU 0, the server on CPU 1. Veth delivers packets on the CPU that
//! sent them, so the whole path (pod, node, router, far host) is processed in softirq on
//! the client's CPU; the far host's socket is then read on the other CPU.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, Socket, Type};

use super::pin_to_cpu;
use crate::lab::{Netns, run_in};

const CLIENT_CPU: usize = 0;
const SERVER_CPU: usize = 1;
/// Datagrams per `sendmmsg`/`recvmmsg`.
const BATCH: usize = 64;
/// UDP payload giving a 60-byte Ethernet frame (the minimum without the FCS).
pub const UDP_PAYLOAD: usize = 18;
/// Request and response size of the ping-pong.
pub const RR_MESSAGE: usize = 64;
const BULK_WRITE: usize = 128 * 1024;
const IO_TIMEOUT: Duration = Duration::from_millis(100);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long to run before and while measuring.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Timing {
    #[serde(with = "secs_f64")]
    pub warmup: Duration,
    #[serde(with = "secs_f64")]
    pub measure: Duration,
}

mod secs_f64 {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// Packets per second sent by the pod and received by the far host.
#[derive(Clone, Copy, Debug, Default)]
pub struct UdpRate {
    pub sent_pps: f64,
    pub received_pps: f64,
}

/// Round-trip times of the ping-pong, in microseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub samples: usize,
}

/// A thread that runs until told to stop, counting what it did.
struct Worker {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    handle: Option<thread::JoinHandle<Result<()>>>,
}

impl Worker {
    fn spawn(
        cpu: usize,
        body: impl FnOnce(&AtomicBool, &AtomicU64) -> Result<()> + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let handle = {
            let (stop, count) = (Arc::clone(&stop), Arc::clone(&count));
            thread::spawn(move || {
                pin_to_cpu(cpu);
                body(&stop, &count)
            })
        };
        Self {
            stop,
            count,
            handle: Some(handle),
        }
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Stops the thread and returns its result.
    fn finish(mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take().map(thread::JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => Ok(()),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// Counts of two workers at the end of the warm-up and of the measurement.
fn sample(timing: Timing, workers: [&Worker; 2]) -> ([u64; 2], Duration) {
    thread::sleep(timing.warmup);
    let start = (Instant::now(), workers.map(Worker::count));
    thread::sleep(timing.measure);
    let end = workers.map(Worker::count);
    let elapsed = start.0.elapsed();
    ([end[0] - start.1[0], end[1] - start.1[1]], elapsed)
}

fn per_second(count: u64, elapsed: Duration) -> f64 {
    // Counts stay far below 2^52 within a run: exact in an f64.
    #[expect(clippy::cast_precision_loss, reason = "counts are far below 2^52")]
    let count = count as f64;
    count / elapsed.as_secs_f64()
}

/// Blasts minimum-size UDP datagrams from `client` to `dst` (a sink in `server`).
pub fn udp_rate(
    client: &Netns,
    server: &Netns,
    dst: SocketAddr,
    timing: Timing,
) -> Result<UdpRate> {
    let sink = run_in(server, || -> std::io::Result<UdpSocket> {
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        // Root may exceed rmem_max: a deep queue keeps the sink from being the bottleneck.
        force_rcvbuf(&socket, 16 << 20)?;
        socket.bind(&dst.into())?;
        socket.set_read_timeout(Some(IO_TIMEOUT))?;
        Ok(socket.into())
    })?
    .with_context(|| format!("UDP sink on {dst} in netns {}", server.name()))?;
    let blaster = run_in(client, || -> std::io::Result<UdpSocket> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.connect(dst)?;
        Ok(socket)
    })?
    .with_context(|| format!("UDP blaster to {dst} in netns {}", client.name()))?;

    let rx = Worker::spawn(SERVER_CPU, move |stop, count| {
        let mut batch = MmsgBatch::new(64);
        while !stop.load(Ordering::Relaxed) {
            match batch.recv(&sink) {
                Ok(n) => count.fetch_add(n as u64, Ordering::Relaxed),
                Err(e) if is_timeout(&e) => 0,
                Err(e) => return Err(e).context("recvmmsg on the UDP sink"),
            };
        }
        Ok(())
    });
    let tx = Worker::spawn(CLIENT_CPU, move |stop, count| {
        let mut batch = MmsgBatch::new(UDP_PAYLOAD);
        while !stop.load(Ordering::Relaxed) {
            match batch.send(&blaster) {
                Ok(n) => count.fetch_add(n as u64, Ordering::Relaxed),
                // A full queue somewhere on the path: try again, as a NIC would.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => 0,
                Err(e) => return Err(e).context("sendmmsg from the pod"),
            };
        }
        Ok(())
    });
    let ([sent, received], elapsed) = sample(timing, [&tx, &rx]);
    tx.finish()?;
    rx.finish()?;
    if received == 0 {
        bail!("no UDP datagram reached {dst} (sent {sent})");
    }
    Ok(UdpRate {
        sent_pps: per_second(sent, elapsed),
        received_pps: per_second(received, elapsed),
    })
}

fn force_rcvbuf(socket: &Socket, bytes: i32) -> std::io::Result<()> {
    // SAFETY: setsockopt reads exactly size_of::<i32>() bytes from a live i32.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const bytes).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// `BATCH` message headers, each pointing at its own buffer of `size` bytes.
struct MmsgBatch {
    // Never read directly: they own the memory `headers` points into. Boxed so those
    // pointers stay valid when the struct moves.
    _buffers: Box<[Vec<u8>]>,
    _iovecs: Box<[libc::iovec]>,
    headers: Box<[libc::mmsghdr]>,
}

// SAFETY: the raw pointers only point into the struct's own boxed buffers, which move
// with it; nothing else shares them.
unsafe impl Send for MmsgBatch {}

impl MmsgBatch {
    fn new(size: usize) -> Self {
        let mut buffers: Box<[Vec<u8>]> = (0..BATCH).map(|_| vec![0u8; size]).collect();
        let mut iovecs: Box<[libc::iovec]> = buffers
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let headers = iovecs
            .iter_mut()
            .map(|iov| {
                // SAFETY: mmsghdr is plain data for which all-zero is a valid value.
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_iov = &raw mut *iov;
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        Self {
            _buffers: buffers,
            _iovecs: iovecs,
            headers,
        }
    }

    fn send(&mut self, socket: &UdpSocket) -> std::io::Result<usize> {
        // SAFETY: every header points at a live iovec of a live buffer owned by `self`;
        // the socket is connected, so no address is needed.
        let n = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                self.headers.as_mut_ptr(),
                BATCH as libc::c_uint,
                0,
            )
        };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }

    fn recv(&mut self, socket: &UdpSocket) -> std::io::Result<usize> {
        // SAFETY: as in `send`; the kernel writes at most each iovec's length into its
        // buffer. MSG_WAITFORONE returns as soon as one datagram is there.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.headers.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }
}

/// A listener in `ns` whose single connection `serve` handles on the server CPU.
fn serve_one(
    ns: &Netns,
    addr: SocketAddr,
    serve: impl FnOnce(TcpStream, &AtomicBool, &AtomicU64) -> Result<()> + Send + 'static,
) -> Result<Worker> {
    let listener = run_in(ns, || -> std::io::Result<TcpListener> {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1)?;
        socket.set_nonblocking(true)?;
        Ok(socket.into())
    })?
    .with_context(|| format!("TCP listen on {addr} in netns {}", ns.name()))?;
    Ok(Worker::spawn(SERVER_CPU, move |stop, count| {
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if is_timeout(&e) && Instant::now() < deadline => {
                    if stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e).context("accepting the bench connection"),
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        serve(stream, stop, count)
    }))
}

/// Connects from inside `ns` (the socket belongs to the namespace it was created in).
fn connect(ns: &Netns, dst: SocketAddr) -> Result<TcpStream> {
    let socket = run_in(ns, || {
        Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
    })?
    .context("TCP socket")?;
    socket
        .connect_timeout(&dst.into(), CONNECT_TIMEOUT)
        .with_context(|| format!("connecting from netns {} to {dst}", ns.name()))?;
    let stream: TcpStream = socket.into();
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok(stream)
}

/// Times `RR_MESSAGE`-byte request/response round trips over one connection.
pub fn tcp_rr(client: &Netns, server: &Netns, dst: SocketAddr, timing: Timing) -> Result<Latency> {
    let echo = serve_one(server, dst, |mut stream, stop, _| {
        let mut buf = [0u8; RR_MESSAGE];
        while !stop.load(Ordering::Relaxed) {
            match stream.read_exact(&mut buf) {
                Ok(()) => stream.write_all(&buf)?,
                Err(e) if is_timeout(&e) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e).context("echo server read"),
            }
        }
        Ok(())
    })?;
    let mut stream = connect(client, dst)?;
    let rtts = thread::scope(|scope| {
        scope
            .spawn(|| -> Result<Vec<u32>> {
                pin_to_cpu(CLIENT_CPU);
                let mut buf = [0u8; RR_MESSAGE];
                let start = Instant::now();
                let (warm_end, end) = (
                    start + timing.warmup,
                    start + timing.warmup + timing.measure,
                );
                let mut rtts = Vec::with_capacity(1 << 16);
                loop {
                    let t0 = Instant::now();
                    if t0 >= end {
                        break;
                    }
                    stream.write_all(&buf)?;
                    stream.read_exact(&mut buf).context("reading the echo")?;
                    if t0 >= warm_end {
                        rtts.push(u32::try_from(t0.elapsed().as_nanos()).unwrap_or(u32::MAX));
                    }
                }
                Ok(rtts)
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    });
    drop(stream);
    echo.finish()?;
    let mut rtts = rtts?;
    if rtts.is_empty() {
        bail!("no round trip to {dst} completed");
    }
    rtts.sort_unstable();
    let at = |q: f64| {
        // Sample counts are far below 2^52.
        #[expect(
            clippy::cast_precision_loss,
            reason = "sample counts are far below 2^52"
        )]
        let len = rtts.len() as f64;
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "an index within the sample count"
        )]
        let i = ((len * q) as usize).min(rtts.len() - 1);
        f64::from(rtts[i]) / 1000.0
    };
    Ok(Latency {
        p50_us: at(0.50),
        p99_us: at(0.99),
        samples: rtts.len(),
    })
}

/// Bulk TCP from `client` to `dst`; returns the receiver's goodput in Gbit/s.
pub fn tcp_bulk(client: &Netns, server: &Netns, dst: SocketAddr, timing: Timing) -> Result<f64> {
    let sink = serve_one(server, dst, |mut stream, stop, count| {
        let mut buf = vec![0u8; 256 * 1024];
        while !stop.load(Ordering::Relaxed) {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    count.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if is_timeout(&e) => {}
                Err(e) => return Err(e).context("bulk sink read"),
            }
        }
        Ok(())
    })?;
    let mut stream = connect(client, dst)?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let source = Worker::spawn(CLIENT_CPU, move |stop, count| {
        let buf = vec![0x5au8; BULK_WRITE];
        while !stop.load(Ordering::Relaxed) {
            match stream.write(&buf) {
                Ok(n) => {
                    count.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if is_timeout(&e) => {}
                Err(e) => return Err(e).context("bulk write"),
            }
        }
        Ok(())
    });
    let ([_, received], elapsed) = sample(timing, [&source, &sink]);
    source.finish()?;
    sink.finish()?;
    if received == 0 {
        bail!("no bulk data reached {dst}");
    }
    Ok(per_second(received, elapsed) * 8.0 / 1e9)
}
