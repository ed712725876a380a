//! Durable allocations: a JSON file replaced atomically (write temp, fsync, rename, fsync dir),
//! so after a crash it holds either the old or the new set, never a torn one. Written before an
//! address is handed out; a restart restores every pod's address from it, and the VNICs those
//! addresses live on, so the agent serves its pods before it has talked to OCI.
//!
//! It also lists the addresses still cooling down, with the wall-clock time each was
//! released, so a restart keeps them from new pods until their cooldown has passed.
//!
//! At load the file is checked for sense (one pod per address, each pod's VNIC known, no pod
//! on a VNIC's primary address or outside its subnet): a file that fails is refused, never
//! discarded, since it is the only record of which running pod holds which address.
//!
//! The file records the kernel's boot id: pods do not survive a reboot, so after one the
//! checkpointed pods are forgotten (their addresses return to the pool at the first reconcile)
//! instead of being held for containers that no longer exist. The default location,
//! `/run/vcnpath`, is a tmpfs on nodes, where the same holds by construction and the fsync
//! before every ADD costs nothing.
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    /// The private-IP object giving the address: the address's own, or its block's.
    pub ip_id: String,
    /// The IP CIDR block the address belongs to, if it came from one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<ipnet::Ipv4Net>,
}

/// A freed address resting before reuse, and when (wall clock) it was freed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cooling {
    pub ip: Ipv4Addr,
    pub vnic_id: String,
    pub ip_id: String,
    /// Milliseconds since the Unix epoch when the pod released it.
    pub released_at_ms: u64,
    /// The IP CIDR block the address belongs to, if it came from one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<ipnet::Ipv4Net>,
}

impl Cooling {
    pub fn released_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.released_at_ms)
    }

    pub fn millis_since_epoch(at: SystemTime) -> u64 {
        at.duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// Version 2 added `vnics`; version 1 files (allocations only) are still read. `cooling`
/// is optional within version 2 (an older agent reading it forgets the cooldowns, nothing more).
const VERSION: u32 = 2;
const OLDEST_READABLE: u32 = 1;

#[derive(Serialize, Deserialize)]
struct FileFormat {
    version: u32,
    allocations: Vec<Entry>,
    #[serde(default)]
    vnics: Vec<VnicInfo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    cooling: Vec<Cooling>,
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
    /// Addresses cooling down when the checkpoint was written.
    pub cooling: Vec<Cooling>,
    /// Pods the checkpoint listed that are forgotten because the node rebooted since.
    pub dropped_by_reboot: usize,
    /// Whether there was a file at all.
    pub found: bool,
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
        "the IPAM checkpoint {path} is corrupt ({source}); it is the only record of which running pod holds which address, so the agent does not start without it: keep the file, repair it by hand, restore it from a copy or, with the agent stopped, run `vcnpath checkpoint rebuild`, which keeps it aside and has the next start hold every address the node shows in use, then start the agent again"
    )]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "the IPAM checkpoint {path} has version {found}; this agent reads versions {OLDEST_READABLE} to {VERSION}: keep the file and run the agent version that wrote it"
    )]
    Version { path: PathBuf, found: u32 },
    #[error(
        "the IPAM checkpoint {path} lists {container_id}/{ifname} twice: keep the file, remove one of the two by hand or, with the agent stopped, run `vcnpath checkpoint rebuild`, which keeps it aside and has the next start hold every address the node shows in use, then start the agent again"
    )]
    Duplicate {
        path: PathBuf,
        container_id: String,
        ifname: String,
    },
    #[error(
        "the IPAM checkpoint {path} is inconsistent: {problem}; it is the only record of which running pod holds which address, so the agent does not start from it: keep the file, correct that entry by hand (the pods, their veths and /32 routes on this node tell the truth) or, with the agent stopped, run `vcnpath checkpoint rebuild`, which keeps it aside and has the next start hold every address the node shows in use, then start the agent again"
    )]
    Inconsistent {
        path: PathBuf,
        problem: Inconsistency,
    },
    #[error(
        "cannot write the IPAM checkpoint {path}: {source}; no new pod gets an address until the state directory (node.state_dir) takes writes again (free space, or remount it read-write); running pods keep theirs"
    )]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What makes a checkpoint contradict itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Inconsistency {
    #[error("{ip} is held by two pods, {first} and {second}")]
    SharedAddress {
        ip: Ipv4Addr,
        first: String,
        second: String,
    },
    #[error("pod {container_id} holds {ip} on VNIC {vnic_id}, which the checkpoint does not list")]
    UnknownVnic {
        container_id: String,
        ip: Ipv4Addr,
        vnic_id: String,
    },
    #[error("pod {container_id} holds {ip}, the primary address of VNIC {vnic_id}")]
    PrimaryAddress {
        container_id: String,
        ip: Ipv4Addr,
        vnic_id: String,
    },
    #[error("pod {container_id} holds {ip}, outside {subnet}, the subnet of its VNIC {vnic_id}")]
    OutsideSubnet {
        container_id: String,
        ip: Ipv4Addr,
        vnic_id: String,
        subnet: ipnet::Ipv4Net,
    },
}

/// One pod per address; each pod's address a secondary one inside the subnet of a VNIC the
/// file lists (version 1 files list no VNICs: only the first rule applies to them).
fn validate(entries: &BTreeMap<Key, Entry>, vnics: &[VnicInfo]) -> Result<(), Inconsistency> {
    let mut holders: BTreeMap<Ipv4Addr, &str> = BTreeMap::new();
    for entry in entries.values() {
        let a = &entry.allocation;
        let container_id = &entry.pod.container_id;
        if let Some(first) = holders.insert(a.ip, container_id) {
            return Err(Inconsistency::SharedAddress {
                ip: a.ip,
                first: first.to_owned(),
                second: container_id.clone(),
            });
        }
        // A recovered allocation names its VNIC once the reconcile has found its address.
        let unplaced = super::holders::is_recovered(&entry.pod) && a.vnic_id.is_empty();
        if vnics.is_empty() || unplaced {
            continue;
        }
        let Some(vnic) = vnics.iter().find(|v| v.id == a.vnic_id) else {
            return Err(Inconsistency::UnknownVnic {
                container_id: container_id.clone(),
                ip: a.ip,
                vnic_id: a.vnic_id.clone(),
            });
        };
        if vnic.primary_ip == a.ip {
            return Err(Inconsistency::PrimaryAddress {
                container_id: container_id.clone(),
                ip: a.ip,
                vnic_id: a.vnic_id.clone(),
            });
        }
        if !vnic.subnet.contains(&a.ip) {
            return Err(Inconsistency::OutsideSubnet {
                container_id: container_id.clone(),
                ip: a.ip,
                vnic_id: a.vnic_id.clone(),
                subnet: vnic.subnet,
            });
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct Checkpoint {
    path: PathBuf,
    /// This boot's id (`None` where the kernel does not tell: no reboot detection then).
    boot_id: Option<String>,
}

impl Checkpoint {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            boot_id: crate::host::boot::id(),
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
                // Cooldowns protect pods that are gone with the reboot too.
                cooling: Vec::new(),
                dropped_by_reboot: file.allocations.len(),
                found: true,
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
        validate(&entries, &file.vnics).map_err(|problem| CheckpointError::Inconsistent {
            path: self.path.clone(),
            problem,
        })?;
        // An address a pod holds is not cooling, whatever an older record says.
        let held: BTreeSet<Ipv4Addr> = entries.values().map(|e| e.allocation.ip).collect();
        let cooling = file
            .cooling
            .into_iter()
            .filter(|c| !held.contains(&c.ip))
            .collect();
        Ok(Restored {
            allocations: entries,
            vnics: file.vnics,
            cooling,
            dropped_by_reboot: 0,
            found: true,
        })
    }

    /// Moves a refused file aside, kept as `<name>.refused-<unix seconds>` beside it, so the
    /// next start rebuilds the record from the node (see [`holders`](super::holders)).
    /// Returns where it now is; `None` if there was no file. Blocking.
    pub fn set_aside(&self) -> io::Result<Option<PathBuf>> {
        if !self.path.exists() {
            return Ok(None);
        }
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut name = self.path.file_name().unwrap_or_default().to_owned();
        name.push(format!(".refused-{secs}"));
        let kept = self.path.with_file_name(name);
        crate::host::file::rename_durably(&self.path, &kept)?;
        Ok(Some(kept))
    }

    /// Replaces the file with `entries` and `vnics`. Blocking: call it from `spawn_blocking`.
    pub fn save<'a>(
        &self,
        entries: impl Iterator<Item = &'a Entry>,
        vnics: impl Iterator<Item = &'a VnicInfo>,
    ) -> Result<(), CheckpointError> {
        self.save_with_cooling(entries, vnics, std::iter::empty())
    }

    /// [`Checkpoint::save`], recording the addresses cooling down too. Each write goes to a
    /// temp file of its own (never shared with another writer), is fsynced, renamed over the
    /// file and the directory fsynced.
    pub fn save_with_cooling<'a>(
        &self,
        entries: impl Iterator<Item = &'a Entry>,
        vnics: impl Iterator<Item = &'a VnicInfo>,
        cooling: impl Iterator<Item = &'a Cooling>,
    ) -> Result<(), CheckpointError> {
        let file = FileFormat {
            version: VERSION,
            allocations: entries.cloned().collect(),
            vnics: vnics.cloned().collect(),
            cooling: cooling.cloned().collect(),
            boot_id: self.boot_id.clone(),
        };
        let text = serde_json::to_vec_pretty(&file).expect("allocations serialise");
        // It names every pod on the node: root only, whatever the umask.
        crate::host::file::replace(&self.path, &text, 0o600).map_err(|source| {
            CheckpointError::Write {
                path: self.path.clone(),
                source,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::os::unix::fs::PermissionsExt as _;

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
            block: None,
        }
    }

    fn vnic() -> VnicInfo {
        VnicInfo {
            id: "vnic-1".into(),
            attachment_id: "attachment-1".into(),
            nic_index: 0,
            vlan_tag: 0,
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
        assert!(err.to_string().contains("keep the file"), "{err}");
        assert!(
            !err.to_string().contains("move"),
            "never advise discarding: {err}"
        );
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
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["ipam.json"], "the temp file is renamed away");
    }

    /// The checkpoint names every pod on the node: only root reads it, whatever the umask.
    #[test]
    fn the_checkpoint_is_readable_by_root_only() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoint::new(dir.path().join("ipam.json"));
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
        fs::write(
            dir.path().join("ipam.json.a1b2c3.tmp"),
            b"{\"version\":2,\"allocati",
        )
        .unwrap();
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
        assert!(
            !err.to_string().contains("move"),
            "never advise discarding the only record of the pods: {err}"
        );
    }

    #[test]
    fn failed_write_is_reported_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        // A non-empty directory where the file goes makes the rename fail, even for root.
        fs::create_dir_all(path.join("blocker")).unwrap();
        let err = Checkpoint::new(&path)
            .save([entry(10), entry(11)].iter(), [].iter())
            .unwrap_err();
        assert!(matches!(err, CheckpointError::Write { .. }), "{err:?}");
        assert!(err.to_string().contains("ipam.json"), "{err}");
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "the failed write's temp file is removed"
        );
    }

    #[test]
    fn concurrent_writers_never_tear_the_file() {
        // A save whose caller went away may still be writing when the next one starts: the
        // two must not share a temp file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        let sets: Vec<Vec<Entry>> = (0..4u8)
            .map(|w| (0..40).map(|n| entry(w * 50 + n + 10)).collect())
            .collect();
        std::thread::scope(|scope| {
            for set in &sets {
                let cp = Checkpoint::new(&path);
                scope.spawn(move || {
                    for _ in 0..25 {
                        cp.save(set.iter(), [vnic()].iter())
                            .expect("a save never fails because another one runs");
                    }
                });
            }
        });
        let loaded = Checkpoint::new(&path).load().expect("the file is whole");
        let got: Vec<Entry> = loaded.allocations.into_values().collect();
        assert!(
            sets.contains(&got),
            "the file holds one writer's complete set"
        );
    }

    fn inconsistent(mutate: impl FnOnce(&mut Vec<Entry>, &mut Vec<VnicInfo>)) -> CheckpointError {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        let (mut entries, mut vnics) = (vec![entry(10), entry(11)], vec![vnic()]);
        mutate(&mut entries, &mut vnics);
        let file = serde_json::json!({"version": 2, "allocations": entries, "vnics": vnics});
        fs::write(&path, file.to_string()).unwrap();
        let err = Checkpoint::new(&path)
            .load()
            .expect_err("an inconsistent checkpoint is refused");
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(
            !text.contains("move") && !text.contains("delete") && !text.contains("remove"),
            "the advice must never be to discard the only record of the pods: {text}"
        );
        assert!(
            fs::read(&path).unwrap() == file.to_string().into_bytes(),
            "left untouched"
        );
        err
    }

    #[test]
    fn an_address_held_for_an_unknown_pod_loads_before_its_vnic_is_known() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        let mut held = entry(12);
        held.pod = super::super::holders::recovered_pod(&super::super::holders::HostHolder {
            ip: held.allocation.ip,
            veth: Some("vcn0123456789ab".into()),
            interface: None,
            imds: false,
        });
        held.allocation.vnic_id = String::new();
        Checkpoint::new(&path)
            .save([entry(10), held.clone()].iter(), [vnic()].iter())
            .unwrap();
        let loaded = Checkpoint::new(&path).load().expect("loads");
        assert!(loaded.allocations.values().any(|e| *e == held));
        // Any other pod on no VNIC is still refused.
        let err = inconsistent(|e, _| e[0].allocation.vnic_id = String::new());
        assert!(matches!(err, CheckpointError::Inconsistent { .. }), "{err}");
    }

    #[test]
    fn inconsistent_checkpoints_are_refused_with_what_is_wrong() {
        let err = inconsistent(|e, _| e[1].allocation.ip = e[0].allocation.ip);
        assert!(
            matches!(
                &err,
                CheckpointError::Inconsistent {
                    problem: Inconsistency::SharedAddress { .. },
                    ..
                }
            ),
            "two pods on one address: {err}"
        );
        let err = inconsistent(|e, _| e[0].allocation.vnic_id = "vnic-gone".into());
        assert!(
            err.to_string().contains("vnic-gone"),
            "a pod on an unknown VNIC: {err}"
        );
        let err = inconsistent(|e, v| e[0].allocation.ip = v[0].primary_ip);
        assert!(
            matches!(
                &err,
                CheckpointError::Inconsistent {
                    problem: Inconsistency::PrimaryAddress { .. },
                    ..
                }
            ),
            "a pod on a VNIC's primary address: {err}"
        );
        let err = inconsistent(|e, _| e[0].allocation.ip = Ipv4Addr::new(10, 9, 0, 5));
        assert!(
            matches!(
                &err,
                CheckpointError::Inconsistent {
                    problem: Inconsistency::OutsideSubnet { .. },
                    ..
                }
            ),
            "a pod's address on the wrong VNIC: {err}"
        );
    }

    #[test]
    fn cooling_addresses_load_back_except_one_a_pod_holds() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoint::new(dir.path().join("ipam.json"));
        let cooling = |n: u8| Cooling {
            ip: Ipv4Addr::new(10, 0, 16, n),
            vnic_id: "vnic-1".into(),
            ip_id: format!("ip-{n}"),
            released_at_ms: 1_700_000_000_000,
            block: None,
        };
        cp.save_with_cooling(
            [entry(10)].iter(),
            [vnic()].iter(),
            [cooling(10), cooling(20)].iter(),
        )
        .unwrap();
        assert_eq!(cp.load().unwrap().cooling, vec![cooling(20)]);
    }
}
