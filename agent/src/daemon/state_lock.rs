//! One agent per node: an exclusive lock (`flock`) on `state_dir/agent.lock`, the first thing
//! `vcnpath run` takes. A second agent (someone debugging, a `DaemonSet` surge) exits before it
//! has asked OCI anything or written a file; the kernel drops the lock when the holder dies,
//! so a `kill -9` never leaves a stale one behind.
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Seek as _, Write as _};
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

/// The lock file's name inside the state directory.
pub const LOCK_FILE: &str = "agent.lock";

#[derive(Debug, thiserror::Error)]
pub enum StateLockError {
    #[error("cannot create the state directory {path}: {source}")]
    Directory {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot open the agent lock {path}: {source}; node.state_dir must be a directory the agent can write"
    )]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "another vcnpath agent ({holder}) holds {path}: only one agent may run per node, so this one stops before touching OCI or the checkpoint; stop the other agent first (during a DaemonSet update the old pod must exit before the new one starts)"
    )]
    Held { path: PathBuf, holder: String },
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The held lock; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
    path: PathBuf,
}

impl StateLock {
    /// Takes the lock on `state_dir` (created 0700 if missing) without waiting, and records
    /// this process's pid in it for the error a second agent prints.
    pub fn acquire(state_dir: &Path) -> Result<Self, StateLockError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|source| StateLockError::Directory {
                path: state_dir.to_owned(),
                source,
            })?;
        let path = state_dir.join(LOCK_FILE);
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path);
        let (mut file, writable) = match opened {
            Ok(file) => (file, true),
            // `flock` needs no write access: on a read-only state directory that already has
            // the lock file the agent still locks it, then serves, not ready, refusing new
            // pods until the directory takes writes again (its pods keep their addresses).
            Err(source) if source.kind() == io::ErrorKind::ReadOnlyFilesystem => {
                match File::open(&path) {
                    Ok(file) => (file, false),
                    Err(_) => return Err(StateLockError::Open { path, source }),
                }
            }
            Err(source) => return Err(StateLockError::Open { path, source }),
        };
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "pid unknown".to_owned(),
                    pid => format!("pid {pid}"),
                };
                return Err(StateLockError::Held { path, holder });
            }
            Err(fs::TryLockError::Error(source)) => {
                return Err(StateLockError::Lock { path, source });
            }
        }
        if !writable {
            tracing::warn!(path = %path.display(), "the state directory is read-only: locked, but no allocation can be checkpointed until it takes writes");
            return Ok(Self { _file: file, path });
        }
        // Best effort: the pid is for people, the lock is the flock.
        let _ = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()));
        Ok(Self { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_naming_the_first_and_the_lock_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = StateLock::acquire(&state).expect("the first agent locks");
        let err = StateLock::acquire(&state).expect_err("a second agent is refused");
        let text = err.to_string();
        assert!(
            text.contains(&format!("pid {}", std::process::id())) && text.contains("agent.lock"),
            "the error names the holder and the lock: {text}"
        );
        drop(first);
        StateLock::acquire(&state).expect("free again once the first is gone");
    }
}
