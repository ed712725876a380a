//! Repairing what others removed: a vcnpath filter deleted by hand (`tc filter del`), or
//! replaced by another program, a pin deleted from the pin directory. The periodic pass
//! compares what the kernel has with what the datapath needs and puts back only what
//! differs — the same diff-based shape as the map sync.
//!
//! Interfaces are named by ifindex, which a rename does not change: the caller reports
//! each interface's current name with what it found on it, so a renamed interface is
//! repaired under its new name.

use std::io;

use aya::maps::{IterableMap as _, MapData};
use tracing::warn;
use vcnpath_common::{
    MAP_CONFIG, MAP_ENDPOINTS, MAP_FRAGS, MAP_INBOUND, MAP_NAT, MAP_NONMASQ_CIDRS, MAP_STATS,
    MAP_VCN_CIDRS, MAP_VNICS, PROG_EGRESS, PROG_INGRESS, PROG_POD,
};

use super::{Datapath, DatapathError, pins};

/// What an interface is to the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A managed VNIC: the egress and ingress programs.
    Vnic,
    /// A pod's host-side veth: the anti-spoofing check on its ingress.
    Pod,
}

/// What the kernel has on one interface: the program id of the vcnpath filter (its
/// priority and handle) on each clsact hook, `None` where there is none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub ifindex: u32,
    /// The interface's name now (after a rename, the new one).
    pub name: String,
    pub role: Role,
    pub egress: Option<u32>,
    pub ingress: Option<u32>,
}

/// The kernel ids of the programs this datapath attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgramIds {
    pub egress: u32,
    pub ingress: u32,
    pub pod: u32,
}

/// What one repair pass put back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Interfaces whose filters were missing or ran another program, by current name.
    pub interfaces: Vec<String>,
    /// Pins that were missing and were pinned again.
    pub pins: Vec<&'static str>,
}

impl RepairReport {
    /// Whether everything was in place.
    pub fn nothing(&self) -> bool {
        self.interfaces.is_empty() && self.pins.is_empty()
    }
}

/// Whether `observed` lacks a filter the datapath needs there, or has one running
/// another program (a pod veth made before an upgrade replaced the pinned program).
pub fn needs_attach(observed: &Observed, ours: ProgramIds) -> bool {
    match observed.role {
        Role::Vnic => {
            observed.egress != Some(ours.egress) || observed.ingress != Some(ours.ingress)
        }
        Role::Pod => observed.ingress != Some(ours.pod),
    }
}

impl Datapath {
    /// The kernel ids of the programs this datapath attaches.
    pub fn program_ids(&self) -> Result<ProgramIds, DatapathError> {
        let id = |program: &aya::programs::SchedClassifier, name: &'static str| {
            program
                .info()
                .map(|info| info.id())
                .map_err(DatapathError::program(name))
        };
        Ok(ProgramIds {
            egress: id(&self.egress, PROG_EGRESS)?,
            ingress: id(&self.ingress, PROG_INGRESS)?,
            pod: id(&self.pod, PROG_POD)?,
        })
    }

    /// Puts back every missing pin, then attaches the programs wherever `observed` shows
    /// a filter missing or running another program. Every interface is tried; the first
    /// error is returned after the rest were repaired.
    pub fn repair(&mut self, observed: &[Observed]) -> Result<RepairReport, DatapathError> {
        let mut report = RepairReport {
            pins: self.repin()?,
            ..RepairReport::default()
        };
        if self.held.is_some() {
            // Attaching waits for the first sync (see `Datapath::load`).
            return Ok(report);
        }
        let ours = self.program_ids()?;
        let mut first_error = None;
        for seen in observed.iter().filter(|o| needs_attach(o, ours)) {
            let attached = match seen.role {
                Role::Vnic => self.attach(&seen.name),
                Role::Pod => self.attach_pod(&seen.name),
            };
            match attached {
                Ok(()) => report.interfaces.push(seen.name.clone()),
                Err(error) => {
                    warn!(interface = %seen.name, ifindex = seen.ifindex, %error, "cannot put vcnpath's filters back");
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(report),
        }
    }

    /// Pins again whatever map, program or ABI record is missing from the pin directory
    /// (recreating the directory if it went): the CNI plugin attaches the pod program from
    /// its pin, and the next agent adopts the maps from theirs.
    fn repin(&mut self) -> Result<Vec<&'static str>, DatapathError> {
        let dir = self.pin_dir.clone();
        std::fs::create_dir_all(&dir).map_err(|source| DatapathError::PinDir {
            path: dir.clone(),
            source,
        })?;
        let missing = |name: &str| {
            std::fs::symlink_metadata(dir.join(name))
                .is_err_and(|e| e.kind() == io::ErrorKind::NotFound)
        };
        let pin_error = |name: &str, error: aya::pin::PinError| DatapathError::Pin {
            path: dir.join(name),
            source: io::Error::other(error),
        };
        let mut repinned = Vec::new();
        let maps: [(&'static str, &MapData); 9] = [
            (MAP_VNICS, self.maps.vnics.map()),
            (MAP_ENDPOINTS, self.maps.endpoints.map()),
            (MAP_VCN_CIDRS, self.maps.vcn_cidrs.map()),
            (MAP_NONMASQ_CIDRS, self.maps.nonmasq_cidrs.map()),
            (MAP_CONFIG, self.maps.config.map()),
            (MAP_NAT, self.maps.nat.map()),
            (MAP_STATS, self.maps.stats.map()),
            (MAP_FRAGS, self.maps.frags.map()),
            (MAP_INBOUND, self.maps.inbound.map()),
        ];
        for (name, data) in maps {
            if missing(name) {
                data.pin(dir.join(name)).map_err(|e| pin_error(name, e))?;
                repinned.push(name);
            }
        }
        for (name, program) in [
            (PROG_EGRESS, &mut self.egress),
            (PROG_INGRESS, &mut self.ingress),
            (PROG_POD, &mut self.pod),
        ] {
            if missing(name) {
                program
                    .pin(dir.join(name))
                    .map_err(|e| pin_error(name, e))?;
                repinned.push(name);
            }
        }
        if missing(vcnpath_common::MAP_ABI) {
            pins::write_abi(&dir)?;
            repinned.push(vcnpath_common::MAP_ABI);
        }
        Ok(repinned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: ProgramIds = ProgramIds {
        egress: 10,
        ingress: 11,
        pod: 12,
    };

    fn seen(role: Role, egress: Option<u32>, ingress: Option<u32>) -> Observed {
        Observed {
            ifindex: 3,
            name: "eth1".into(),
            role,
            egress,
            ingress,
        }
    }

    #[test]
    fn a_missing_or_foreign_filter_needs_attaching() {
        assert!(!needs_attach(&seen(Role::Vnic, Some(10), Some(11)), OURS));
        assert!(needs_attach(&seen(Role::Vnic, None, Some(11)), OURS));
        assert!(needs_attach(&seen(Role::Vnic, Some(10), None), OURS));
        assert!(
            needs_attach(&seen(Role::Vnic, Some(10), Some(99)), OURS),
            "a filter running another program is replaced"
        );
        assert!(!needs_attach(&seen(Role::Pod, None, Some(12)), OURS));
        assert!(needs_attach(&seen(Role::Pod, None, None), OURS));
        assert!(
            needs_attach(&seen(Role::Pod, None, Some(7)), OURS),
            "a pod veth still on a replaced program is moved to the current one"
        );
    }
}
