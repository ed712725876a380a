//! One agent per node: an exclusive lock (`flock`) on `state_dir/agent.lock`, the first thing
//! `vcnpath run` takes. A second agent (someone debugging, a `DaemonSet` surge) exits before it
//! has asked OCI anything or written a file; the kernel drops the lock when the holder dies,
//! so a `kill -9` never leaves a stale one behind.
//!
//! The file holds the holder's pid and the boot it ran in, so the next agent knows whether
//! one ran before it since the node booted (then a missing checkpoint was lost, not never
//! written: see `IpamConfig::earlier_agent_this_boot`).
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
    earlier_agent_this_boot: bool,
}

impl StateLock {
    /// Takes the lock on `state_dir` (created 0700 if missing) without waiting, and records
    /// this process's pid (for the error a second agent prints) and boot id in it.
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
                let holder = match Record::read(&mut file).pid {
                    None => "pid unknown".to_owned(),
                    Some(pid) => format!("pid {pid}"),
                };
                return Err(StateLockError::Held { path, holder });
            }
            Err(fs::TryLockError::Error(source)) => {
                return Err(StateLockError::Lock { path, source });
            }
        }
        let boot = crate::host::boot::id();
        let earlier = Record::read(&mut file).boot;
        let earlier_agent_this_boot = boot.is_some() && earlier == boot;
        if writable {
            // Best effort: the pid is for people; the boot id only makes a lost checkpoint's
            // cooldowns safe (without it they are taken for never written).
            let record = Record {
                pid: Some(std::process::id().to_string()),
                boot,
            };
            let _ = file
                .set_len(0)
                .and_then(|()| file.rewind())
                .and_then(|()| file.write_all(record.to_string().as_bytes()));
        } else {
            tracing::warn!(path = %path.display(), "the state directory is read-only: locked, but no allocation can be checkpointed until it takes writes");
        }
        Ok(Self {
            _file: file,
            path,
            earlier_agent_this_boot,
        })
    }

    /// Whether an agent held this lock earlier in the node's current boot.
    pub fn earlier_agent_this_boot(&self) -> bool {
        self.earlier_agent_this_boot
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The lock file's lines: the holder's pid, then its boot id.
#[derive(Debug, Default, PartialEq, Eq)]
struct Record {
    pid: Option<String>,
    boot: Option<String>,
}

impl Record {
    /// What an earlier holder wrote (nothing of an unreadable or empty file).
    fn read(file: &mut File) -> Self {
        let mut text = String::new();
        if file
            .rewind()
            .and_then(|()| file.read_to_string(&mut text))
            .is_err()
        {
            return Self::default();
        }
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        Self {
            pid: lines.next().map(str::to_owned),
            boot: lines.next().map(str::to_owned),
        }
    }
}

impl std::fmt::Display for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for line in [&self.pid, &self.boot].into_iter().flatten() {
            writeln!(f, "{line}")?;
        }
        Ok(())
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
        assert!(
            !first.earlier_agent_this_boot(),
            "no agent held it before the first"
        );
        drop(first);
        let again = StateLock::acquire(&state).expect("free again once the first is gone");
        assert!(
            again.earlier_agent_this_boot() || crate::host::boot::id().is_none(),
            "the next agent knows one ran before it in this boot"
        );
    }

    #[test]
    fn a_holder_from_another_boot_is_not_an_earlier_agent_of_this_one() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(LOCK_FILE), "4242\nanother-boot\n").unwrap();
        let lock = StateLock::acquire(dir.path()).unwrap();
        assert!(!lock.earlier_agent_this_boot());
    }
}
