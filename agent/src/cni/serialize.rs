//! One ADD or DEL per attachment at a time on a node. A misbehaving runtime may run several
//! for one container at once; without this, one reports success while a sibling's rollback
//! removes the veth and releases the address under it. An exclusive `flock` on a file named
//! like the host veth (next to the agent's socket) is held for the whole operation; the
//! kernel drops it if the plugin dies, so a killed plugin never blocks the next one.
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::DirBuilderExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use super::error::{CniError, ErrorCode};

/// The directory of the lock files, beside the agent's socket.
pub const LOCK_DIR: &str = "cni-locks";

/// Waits (at most `timeout`) for the attachment's lock and returns it held.
pub async fn lock_attachment(
    socket: &Path,
    host_veth: &str,
    timeout: Duration,
) -> Result<File, CniError> {
    let dir = socket
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join(LOCK_DIR);
    let path = dir.join(format!("{host_veth}.lock"));
    let failed = |what: &str, e: std::io::Error| {
        CniError::new(
            ErrorCode::Internal,
            format!("{what} {} failed", path.display()),
            e.to_string(),
        )
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| failed("creating the lock directory for", e))?;
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| failed("opening", e))?;
    let deadline = Instant::now() + timeout;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(fs::TryLockError::WouldBlock) => {
                return Err(CniError::new(
                    ErrorCode::TryAgainLater,
                    format!(
                        "another ADD or DEL of this attachment is still running ({})",
                        path.display()
                    ),
                    "the runtime called the plugin for one container more than once at a time; retry",
                ));
            }
            Err(fs::TryLockError::Error(e)) => return Err(failed("locking", e)),
        }
    }
}
