//! What `/healthz` (liveness) and `/readyz` (readiness) mean.
//!
//! - Alive: the supervisor loop (VNIC setup and datapath sync, every second) has beaten
//!   within [`LIVENESS_TIMEOUT`], the IPAM state lock answers within [`LOCK_TIMEOUT`], and
//!   IPAM's background task (first reconcile, then the grower and the periodic reconcile)
//!   is still running. A failure here means a restart helps: kubelet restarts the agent, and
//!   the datapath keeps pods' traffic flowing meanwhile (programs and maps stay pinned).
//! - Ready: reconciled with OCI, the last datapath sync succeeded, the CNI socket is served,
//!   the state directory takes a write (every ADD is checkpointed there), and some VNIC that
//!   serves pods has its interface set up.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// The supervisor loop may stay silent this long before the agent counts as hung.
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(30);
/// The IPAM state lock must be taken within this long.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// What the supervisor loop reports on every tick, read by the probes.
#[derive(Debug)]
pub struct Health {
    start: Instant,
    /// Milliseconds since `start` at the supervisor's latest beat.
    beat: AtomicU64,
    pub datapath_synced: AtomicBool,
    pub socket_served: AtomicBool,
    pub state_dir_writable: AtomicBool,
    pub usable_vnic: AtomicBool,
    /// Where the checkpoint is written.
    pub state_dir: PathBuf,
}

impl Health {
    pub fn new(state_dir: PathBuf) -> Self {
        Self {
            start: Instant::now(),
            beat: AtomicU64::new(0),
            datapath_synced: AtomicBool::new(false),
            socket_served: AtomicBool::new(false),
            state_dir_writable: AtomicBool::new(false),
            usable_vnic: AtomicBool::new(false),
            state_dir,
        }
    }

    /// The supervisor loop is alive.
    pub fn beat(&self) {
        self.beat
            .store(self.start.elapsed().as_millis() as u64, Ordering::Release);
    }

    /// How long since the supervisor's latest beat (or the start, before the first).
    pub fn silent_for(&self) -> Duration {
        self.start
            .elapsed()
            .saturating_sub(Duration::from_millis(self.beat.load(Ordering::Acquire)))
    }

    /// Readiness from what the supervisor recorded and whether IPAM has reconciled.
    pub fn readiness(&self, reconciled: bool) -> Readiness {
        Readiness {
            reconciled,
            datapath_synced: self.datapath_synced.load(Ordering::Acquire),
            socket_served: self.socket_served.load(Ordering::Acquire),
            state_dir_writable: self.state_dir_writable.load(Ordering::Acquire),
            usable_vnic: self.usable_vnic.load(Ordering::Acquire),
        }
    }
}

/// The conditions of readiness, each on its own so `/readyz` can say which is missing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent conditions, each named in /readyz's answer"
)]
pub struct Readiness {
    pub reconciled: bool,
    pub datapath_synced: bool,
    pub socket_served: bool,
    pub state_dir_writable: bool,
    pub usable_vnic: bool,
}

impl Readiness {
    /// What keeps the agent from being ready; empty when it is.
    pub fn problems(&self) -> Vec<&'static str> {
        [
            (
                self.reconciled,
                "IPAM has not reconciled with OCI yet (see the agent's log for OCI errors)",
            ),
            (
                self.datapath_synced,
                "the latest datapath sync failed or has not run",
            ),
            (self.socket_served, "the CNI socket is not served"),
            (
                self.state_dir_writable,
                "the state directory is not writable, so no allocation can be checkpointed",
            ),
            (
                self.usable_vnic,
                "no VNIC that serves pods has its interface set up yet",
            ),
        ]
        .into_iter()
        .filter_map(|(ok, problem)| (!ok).then_some(problem))
        .collect()
    }
}

/// The conditions of liveness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Liveness {
    pub supervisor_silent_for: Duration,
    pub state_lock_answered: bool,
    pub ipam_running: bool,
}

impl Liveness {
    /// What says the agent is hung or broken; empty when it is alive.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.supervisor_silent_for > LIVENESS_TIMEOUT {
            problems.push(format!(
                "the supervisor loop (VNIC setup, datapath sync) has not run for {:?}",
                self.supervisor_silent_for
            ));
        }
        if !self.state_lock_answered {
            problems.push(format!(
                "the IPAM state lock was not free within {LOCK_TIMEOUT:?}"
            ));
        }
        if !self.ipam_running {
            problems.push("IPAM's background task (reconcile, grower) has ended".to_owned());
        }
        problems
    }
}

/// Whether a file can be created, written, synced and removed in `dir`, as the checkpoint
/// is (a read-only or full file system fails this).
pub fn dir_writable(dir: &Path) -> bool {
    let probe = dir.join(".vcnpath-ready-probe");
    let written = std::fs::File::create(&probe).and_then(|mut f| {
        f.write_all(b"ok")?;
        f.sync_all()
    });
    let removed = std::fs::remove_file(&probe);
    written.is_ok() && removed.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_every_condition_and_names_the_missing_one() {
        let all = Readiness {
            reconciled: true,
            datapath_synced: true,
            socket_served: true,
            state_dir_writable: true,
            usable_vnic: true,
        };
        assert!(all.problems().is_empty());
        let read_only = Readiness {
            state_dir_writable: false,
            ..all
        };
        assert_eq!(read_only.problems().len(), 1);
        assert!(
            read_only.problems()[0].contains("state directory"),
            "{:?}",
            read_only.problems()
        );
        for broken in [
            Readiness {
                reconciled: false,
                ..all
            },
            Readiness {
                datapath_synced: false,
                ..all
            },
            Readiness {
                socket_served: false,
                ..all
            },
            Readiness {
                usable_vnic: false,
                ..all
            },
        ] {
            assert_eq!(broken.problems().len(), 1, "{broken:?}");
        }
        assert_eq!(Readiness::default().problems().len(), 5);
    }

    #[test]
    fn alive_until_the_supervisor_is_silent_or_ipam_is_stuck() {
        let alive = Liveness {
            supervisor_silent_for: Duration::from_secs(1),
            state_lock_answered: true,
            ipam_running: true,
        };
        assert!(alive.problems().is_empty());
        let hung = Liveness {
            supervisor_silent_for: LIVENESS_TIMEOUT + Duration::from_secs(1),
            ..alive
        };
        assert!(
            hung.problems()[0].contains("supervisor"),
            "{:?}",
            hung.problems()
        );
        assert_eq!(
            Liveness {
                state_lock_answered: false,
                ..alive
            }
            .problems()
            .len(),
            1
        );
        assert_eq!(
            Liveness {
                ipam_running: false,
                ..alive
            }
            .problems()
            .len(),
            1
        );
    }

    #[test]
    fn a_beat_resets_the_silence() {
        let health = Health::new(PathBuf::from("/nonexistent"));
        health.beat();
        assert!(health.silent_for() < Duration::from_secs(1));
    }

    /// A read-only state directory (a read-only mount as root, else a directory without
    /// write permission) is reported unwritable; a temp dir is writable.
    #[test]
    fn a_read_only_state_dir_is_not_writable() {
        let dir = tempfile::tempdir().unwrap();
        assert!(dir_writable(dir.path()));
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let path = dir.path().to_owned();
        let writable = std::thread::spawn(move || {
            if root {
                // Root ignores permissions: mount the directory read-only over itself in a
                // mount namespace private to this thread (gone when it ends).
                let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
                // SAFETY: plain system calls on NUL-terminated strings; unshare affects this
                // thread only.
                unsafe {
                    assert_eq!(libc::unshare(libc::CLONE_NEWNS), 0, "unshare");
                    assert_eq!(
                        libc::mount(
                            std::ptr::null(),
                            c"/".as_ptr(),
                            std::ptr::null(),
                            libc::MS_REC | libc::MS_PRIVATE,
                            std::ptr::null()
                        ),
                        0
                    );
                    assert_eq!(
                        libc::mount(
                            c.as_ptr(),
                            c.as_ptr(),
                            std::ptr::null(),
                            libc::MS_BIND,
                            std::ptr::null()
                        ),
                        0
                    );
                    assert_eq!(
                        libc::mount(
                            std::ptr::null(),
                            c.as_ptr(),
                            std::ptr::null(),
                            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                            std::ptr::null()
                        ),
                        0,
                        "remount read-only"
                    );
                }
            } else {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o500)).unwrap();
            }
            dir_writable(&path)
        })
        .join()
        .unwrap();
        assert!(
            !writable,
            "a read-only state directory must not count as writable"
        );
    }
}
