//! Test traffic with `std::net` on threads (no external tools except ping), with a timeout
//! on every wait.

mod tcp;
mod udp;

pub use tcp::{BulkReport, ConnRecord, TcpConn, TcpServer, tcp_bulk, tcp_connect};
pub use udp::{UdpEchoServer, UdpReply, udp_request};

use std::io::{self, ErrorKind};
use std::net::Ipv4Addr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Result;

use super::netns::{Netns, cmd_in};
use super::process::output;

/// How often server threads look at their stop flag.
const POLL: Duration = Duration::from_millis(50);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking handler thread must not hide what the others recorded.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Time left until `deadline`, or a timeout error naming `what`.
fn remaining(deadline: Instant, what: &str) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(
            ErrorKind::TimedOut,
            format!("{what}: timed out"),
        ));
    }
    Ok(left)
}

fn is_timeout(error: &io::Error) -> bool {
    matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Pings `dst` from `ns` `count` times (0.2 s apart); true if every echo was answered
/// within `timeout`. Failing to run ping at all is an error.
pub fn ping(ns: &Netns, dst: Ipv4Addr, count: u32, timeout: Duration) -> Result<bool> {
    ping_with(ns, dst, count, timeout, &[])
}

/// [`ping`] with extra arguments, e.g. `["-s", "8000", "-M", "do"]`.
pub fn ping_with(
    ns: &Netns,
    dst: Ipv4Addr,
    count: u32,
    timeout: Duration,
    extra: &[&str],
) -> Result<bool> {
    let deadline = timeout.as_secs().max(1).to_string();
    let out = output(
        cmd_in(ns, "ping")
            .args([
                "-n",
                "-q",
                "-i",
                "0.2",
                "-c",
                &count.to_string(),
                "-w",
                &deadline,
            ])
            .args(extra)
            .arg(dst.to_string()),
    )?;
    Ok(out.status.success())
}
