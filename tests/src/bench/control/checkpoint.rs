//! The IPAM checkpoint write every ADD and DEL waits for (`Checkpoint::save`: temp file,
//! fsync, rename, directory fsync) with 110 pods, timed on a tmpfs (the default state
//! directory `/run/vcnpath` is one on nodes; the control benchmark's agent uses one) and on
//! the disk under `target/`, so the cost of a disk-backed `state_dir` is visible.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use vcnpath::ipam::checkpoint::{Checkpoint, Entry};
use vcnpath::ipam::{Allocation, PodRef};

use super::{Latency, PODS};
use crate::node_agent::TmpfsMount;

const WRITES: usize = 100;

#[derive(Clone, Debug, Serialize)]
pub struct CheckpointWrites {
    pub pods: usize,
    pub tmpfs: Latency,
    pub disk: Latency,
}

fn entries() -> Vec<Entry> {
    (0..PODS)
        .map(|i| Entry {
            pod: PodRef {
                container_id: format!("{i:064x}"),
                ifname: "eth0".into(),
                namespace: Some("default".into()),
                name: Some(format!("pod-{i}")),
            },
            allocation: Allocation {
                ip: Ipv4Addr::from(
                    u32::from(Ipv4Addr::new(10, 0, 16, 10)) + u32::try_from(i).unwrap_or(0),
                ),
                vnic_id: "ocid1.vnic.oc1.iad.bench".into(),
                interface: "eth1".into(),
                subnet: "10.0.16.0/20".parse().expect("literal"),
                router_ip: Ipv4Addr::new(10, 0, 16, 1),
                mtu: 9000,
            },
            ip_id: format!("ocid1.privateip.oc1.iad.bench{i}"),
            block: None,
        })
        .collect()
}

fn time_writes(dir: &Path, entries: &[Entry]) -> Result<Latency> {
    let checkpoint = Checkpoint::new(dir.join("ipam.json"));
    let samples = (0..WRITES)
        .map(|_| {
            let started = Instant::now();
            checkpoint.save(entries.iter(), [].iter())?;
            Ok(started.elapsed())
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Latency::of(&samples))
}

pub fn run() -> Result<CheckpointWrites> {
    let entries = entries();
    let base = tempfile::tempdir()?;
    let tmpfs = TmpfsMount::new(base.path().join("state"))?;
    let on_tmpfs = time_writes(tmpfs.path(), &entries).context("checkpoint writes on tmpfs")?;
    drop(tmpfs);
    std::fs::create_dir_all(super::super::output_dir())?;
    let disk_dir = tempfile::tempdir_in(super::super::output_dir())?;
    let on_disk = time_writes(disk_dir.path(), &entries).context("checkpoint writes on disk")?;
    Ok(CheckpointWrites {
        pods: PODS,
        tmpfs: on_tmpfs,
        disk: on_disk,
    })
}
