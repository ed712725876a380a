//! Durable allocations: a JSON file replaced atomically (write temp, fsync, rename, fsync dir),
//! so after a crash it holds either the old or the new set, never a torn one. Written before an
//! address is handed out; a restart restores every pod's address from it, and the VNICs those
//! addresses live on, so the agent serves its pods before it has talked to OCI.
//!
//! The file records the kernel's boot id: pods do not survive a reboot, so after one the
//! checkpointed pods are forgotten (their addresses return to the pool at the first reconcile)
//! instead of being held for containers that no longer exist. The default location,
//! `/run/vcnpath`, is a tmpfs on nodes, where the same holds by construction and the fsync
//! before every ADD costs nothing.
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::pool::VnicInfo;
use super::types::{Allocation, PodRef};

/// CNI identifies an attachment by container id and interface name.
pub type Key = (String, String);

pub fn key(pod: &PodRef) -> Key {
    (pod.container_id.clone(), pod.ifname.clone())
}

/// One pod's address, with the OCID of the private IP so a restart can match it against OCI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub pod: PodRef,
    pub allocation: Allocation,
    pub ip_id: String,
}

/// Version 2 added `vnics`; version 1 files (allocations only) are still read.
const VERSION: u32 = 2;
const OLDEST_READABLE: u32 = 1;

#[derive(Serialize, Deserialize)]
struct FileFormat {
    version: u32,
    allocations: Vec<Entry>,
    #[serde(default)]
    vnics: Vec<VnicInfo>,
    /// `/proc/sys/kernel/random/boot_id` when the file was written.
    #[serde(default)]
    boot_id: Option<String>,
}

/// What a checkpoint holds.
#[derive(Debug, Default)]
pub struct Restored {
    pub allocations: BTreeMap<Key, Entry>,
    /// The pool's VNICs when the checkpoint was written (empty for a version 1 file).
    pub vnics: Vec<VnicInfo>,
    /// Pods the checkpoint listed that are forgotten because the node rebooted since.
    pub dropped_by_reboot: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read the IPAM checkpoint {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the IPAM checkpoint {path} is corrupt ({source}); it lists the pods' addresses, so it is not discarded: fix or move it away (the reconcile then re-adopts the node's addresses as free)"
    )]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "the IPAM checkpoint {path} has version {found}; this agent reads versions {OLDEST_READABLE} to {VERSION}: run the agent version that wrote it, or move the file away"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("the IPAM checkpoint {path} lists {container_id}/{ifname} twice")]
    Duplicate {
        path: PathBuf,
        container_id: String,
        ifname: String,
    },
    #[error("cannot write the IPAM checkpoint {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct Checkpoint {
    path: PathBuf,
    /// This boot's id (`None` where the kernel does not tell: no reboot detection then).
    boot_id: Option<String>,
}

/// The kernel's id of the current boot.
fn current_boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|id| id.trim().to_owned())
        .filter(|id| !id.is_empty())
}

impl Checkpoint {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            boot_id: current_boot_id(),
        }
    }

    /// The same checkpoint seen from another boot (for tests of reboot handling).
    #[must_use]
    pub fn with_boot_id(mut self, boot_id: impl Into<String>) -> Self {
        self.boot_id = Some(boot_id.into());
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn temp_path(&self) -> PathBuf {
        let mut name = self.path.file_name().unwrap_or_default().to_os_string();
        name.push(".tmp");
        self.path.with_file_name(name)
    }

    /// The saved allocations and VNICs; none if the file does not exist yet. A temp file left
    /// by a crash mid-write is ignored: the rename never happened, so the old file is the truth.
    pub fn load(&self) -> Result<Restored, CheckpointError> {
        let text = match fs::read(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Restored::default()),
            Err(source) => {
                return Err(CheckpointError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let file: FileFormat =
            serde_json::from_slice(&text).map_err(|source| CheckpointError::Corrupt {
                path: self.path.clone(),
                source,
            })?;
        if !(OLDEST_READABLE..=VERSION).contains(&file.version) {
            return Err(CheckpointError::Version {
                path: self.path.clone(),
                found: file.version,
            });
        }
        let rebooted = match (&file.boot_id, &self.boot_id) {
            (Some(then), Some(now)) => then != now,
            _ => false,
        };
        if rebooted {
            return Ok(Restored {
                allocations: BTreeMap::new(),
                vnics: file.vnics,
                dropped_by_reboot: file.allocations.len(),
            });
        }
        let mut entries = BTreeMap::new();
        for entry in file.allocations {
            let k = key(&entry.pod);
            if entries.insert(k.clone(), entry).is_some() {
                return Err(CheckpointError::Duplicate {
                    path: self.path.clone(),
                    container_id: k.0,
                    ifname: k.1,
                });
            }
        }
        Ok(Restored {
            allocations: entries,
            vnics: file.vnics,
            dropped_by_reboot: 0,
        })
    }

    /// Replaces the file with `entries` and `vnics`. Blocking: call it from `spawn_blocking`.
    pub fn save<'a>(
        &self,
        entries: impl Iterator<Item = &'a Entry>,
        vnics: impl Iterator<Item = &'a VnicInfo>,
    ) -> Result<(), CheckpointError> {
        let file = FileFormat {
            version: VERSION,
            allocations: entries.cloned().collect(),
            vnics: vnics.cloned().collect(),
            boot_id: self.boot_id.clone(),
        };
        let text = serde_json::to_vec_pretty(&file).expect("allocations serialise");
        let write_error = |source| CheckpointError::Write {
            path: self.path.clone(),
            source,
        };
        let temp = self.temp_path();
        // It names every pod on the node: root only. The mode applies when the file is
        // created; a temp file left by a crash is narrowed too.
        let mut out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)
            .map_err(write_error)?;
        out.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(write_error)?;
        out.write_all(&text).map_err(write_error)?;
        out.sync_all().map_err(write_error)?;
        drop(out);
        fs::rename(&temp, &self.path).map_err(write_error)?;
        // The rename is durable only once the directory entry is.
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(write_error)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn entry(n: u8) -> Entry {
        Entry {
            pod: PodRef {
                container_id: format!("container-{n}"),
                ifname: "eth0".into(),
                namespace: Some("default".into()),
                name: Some(format!("pod-{n}")),
            },
            allocation: Allocation {
                ip: Ipv4Addr::new(10, 0, 16, n),
                vnic_id: "vnic-1".into(),
                interface: "eth1".into(),
                subnet: "10.0.16.0/20".parse().unwrap(),
                router_ip: Ipv4Addr::new(10, 0, 16, 1),
                mtu: 9000,
            },
            ip_id: format!("ip-{n}"),
        }
    }

    fn vnic() -> VnicInfo {
        VnicInfo {
            id: "vnic-1".into(),
            attachment_id: "attachment-1".into(),
            nic_index: 0,
            attached_at: "2026-01-01T00:00:01.000Z".into(),
            mac: "02:00:17:00:00:01".into(),
            interface: Some("eth1".into()),
            subnet_id: "subnet-1".into(),
            subnet: "10.0.16.0/20".parse().unwrap(),
            router_ip: Ipv4Addr::new(10, 0, 16, 1),
            primary_ip: Ipv4Addr::new(10, 0, 16, 2),
            is_primary: false,
        }
    }

    #[test]
    fn a_reboot_forgets_the_pods_but_keeps_the_vnics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        let before = Checkpoint::new(&path).with_boot_id("boot-a");
        before
            .save([entry(10), entry(11)].iter(), [vnic()].iter())
            .unwrap();
        let same_boot = before.load().unwrap();
        assert_eq!(same_boot.allocations.len(), 2);
        assert_eq!(same_boot.dropped_by_reboot, 0);
        let after = Checkpoint::new(&path)
            .with_boot_id("boot-b")
            .load()
            .unwrap();
        assert!(after.allocations.is_empty(), "no pod survives a reboot");
        assert_eq!(after.dropped_by_reboot, 2);
        assert_eq!(after.vnics.len(), 1, "the VNICs are still attached");
    }

    #[test]
    fn vnics_checkpointed_before_attach_times_were_kept_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        let mut old = serde_json::to_value(vnic()).unwrap();
        old.as_object_mut().unwrap().remove("attached_at");
        let file = serde_json::json!({"version": 2, "allocations": [entry(10)], "vnics": [old]});
        fs::write(&path, file.to_string()).unwrap();
        let loaded = Checkpoint::new(&path).load().unwrap();
        assert_eq!(loaded.allocations.len(), 1);
        assert_eq!(loaded.vnics.len(), 1);
        assert_eq!(
            loaded.vnics[0].attached_at, "",
            "unknown until the reconcile"
        );
        assert_eq!(loaded.vnics[0].id, "vnic-1");
    }

    #[test]
    fn version_1_files_are_read_without_vnics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        let v1 = serde_json::json!({"version": 1, "allocations": [entry(10)]});
        fs::write(&path, v1.to_string()).unwrap();
        let loaded = Checkpoint::new(&path).load().unwrap();
        assert_eq!(loaded.allocations.len(), 1);
        assert!(loaded.vnics.is_empty());
    }

    #[test]
    fn newer_versions_are_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        fs::write(&path, br#"{"version": 3, "allocations": []}"#).unwrap();
        let err = Checkpoint::new(&path).load().unwrap_err();
        assert!(
            matches!(err, CheckpointError::Version { found: 3, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("move the file away"), "{err}");
    }

    #[test]
    fn missing_file_is_an_empty_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoint::new(dir.path().join("ipam.json"));
        assert!(cp.load().unwrap().allocations.is_empty());
    }

    #[test]
    fn saved_allocations_load_back() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoint::new(dir.path().join("ipam.json"));
        let entries = [entry(10), entry(11)];
        let vnics = [vnic()];
        cp.save(entries.iter(), vnics.iter()).unwrap();
        let loaded = cp.load().unwrap();
        assert_eq!(
            loaded.allocations.values().cloned().collect::<Vec<_>>(),
            entries.to_vec()
        );
        assert_eq!(loaded.vnics.len(), 1);
        assert_eq!(
            loaded.vnics[0].interface, None,
            "the interface is host state, found again by MAC"
        );
        assert_eq!(
            VnicInfo {
                interface: Some("eth1".into()),
                ..loaded.vnics[0].clone()
            },
            vnics[0]
        );
        assert!(!cp.temp_path().exists(), "the temp file is renamed away");
    }

    /// The checkpoint names every pod on the node: only root reads it, whatever the umask,
    /// and a leftover temp file with a wider mode is narrowed on the next save.
    #[test]
    fn the_checkpoint_is_readable_by_root_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoint::new(dir.path().join("ipam.json"));
        fs::write(cp.temp_path(), "left by a crash").unwrap();
        fs::set_permissions(cp.temp_path(), fs::Permissions::from_mode(0o644)).unwrap();
        cp.save([entry(10)].iter(), [vnic()].iter()).unwrap();
        let mode = fs::metadata(dir.path().join("ipam.json"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "checkpoint mode {mode:o}");
    }

    #[test]
    fn temp_file_left_by_a_crash_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoint::new(dir.path().join("ipam.json"));
        cp.save([entry(10)].iter(), [].iter()).unwrap();
        // A crash between write and rename leaves a half-written temp file.
        fs::write(cp.temp_path(), b"{\"version\":2,\"allocati").unwrap();
        let loaded = cp.load().unwrap();
        assert_eq!(
            loaded.allocations.len(),
            1,
            "the last complete checkpoint wins"
        );
        cp.save([entry(10), entry(12)].iter(), [].iter()).unwrap();
        assert_eq!(
            cp.load().unwrap().allocations.len(),
            2,
            "the next save replaces it"
        );
    }

    #[test]
    fn corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        fs::write(&path, b"not json").unwrap();
        let err = Checkpoint::new(&path).load().unwrap_err();
        assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "the error must name the file: {err}"
        );
        assert_eq!(fs::read(&path).unwrap(), b"not json", "left untouched");
    }

    #[test]
    fn failed_write_is_reported_and_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        let cp = Checkpoint::new(&path);
        cp.save([entry(10)].iter(), [].iter()).unwrap();
        // A directory where the temp file should go makes the write fail, even for root.
        fs::create_dir(cp.temp_path()).unwrap();
        let err = cp
            .save([entry(10), entry(11)].iter(), [].iter())
            .unwrap_err();
        assert!(matches!(err, CheckpointError::Write { .. }), "{err:?}");
        assert_eq!(
            cp.load().unwrap().allocations.len(),
            1,
            "the old checkpoint survives"
        );
    }
}
