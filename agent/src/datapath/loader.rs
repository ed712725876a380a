//! Loading, adopting, pinning and attaching the programs.
//!
//! Restarts and upgrades never interrupt traffic: maps are reused from their pins, a
//! pinned program identical to the embedded one (same kernel tag) is adopted rather than
//! replaced, and attachments are replaced in place (netlink, same priority and handle),
//! never removed and re-added.

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::programs::{
    SchedClassifier, TcAttachType,
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
};
use tracing::{debug, info};
use vcnpath_common::{GLOBAL_COARSE_CLOCK, MAP_NAMES, MAP_NAT, PROG_EGRESS, PROG_INGRESS};

use super::{
    DatapathError, DatapathMaps,
    object::OBJECT,
    probe::{self, Features},
};

/// Priority of vcnpath's filters on the clsact hooks (lower runs first).
const TC_PRIORITY: u16 = 1;
/// Handle of vcnpath's filters; with the priority it identifies them for replacement.
const TC_HANDLE: TcHandle = TcHandle::new(0, 1);

/// Where and how to load.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// bpffs directory for the pins (default `/sys/fs/bpf/vcnpath`).
    pub pin_dir: PathBuf,
    /// Capacity of the `nat` map when it is created (ignored when adopted).
    pub nat_max_entries: Option<u32>,
}

/// The loaded datapath: its maps and the two programs, ready to attach.
pub struct Datapath {
    pub maps: DatapathMaps,
    egress: SchedClassifier,
    ingress: SchedClassifier,
    /// True when both programs were adopted from their pins unchanged.
    pub adopted: bool,
    pin_dir: PathBuf,
}

impl Datapath {
    /// Loads the embedded object, reusing pinned maps and adopting pinned programs
    /// whose code is identical.
    pub fn load(options: &LoadOptions) -> Result<Self, DatapathError> {
        let pin_dir = &options.pin_dir;
        std::fs::create_dir_all(pin_dir).map_err(|source| DatapathError::PinDir {
            path: pin_dir.clone(),
            source,
        })?;

        let pin_paths: Vec<(&str, PathBuf)> = MAP_NAMES
            .iter()
            .map(|name| (*name, pin_dir.join(name)))
            .collect();
        let features = Features::detect(probe::REQUIRED)?;
        let coarse_clock = u8::from(features.coarse_clock);
        let mut loader = aya::EbpfLoader::new();
        loader.override_global(GLOBAL_COARSE_CLOCK, &coarse_clock, true);
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        if let Some(max) = options.nat_max_entries {
            loader.map_max_entries(MAP_NAT, max);
        }
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| DatapathError::Load(Box::new(e)))?;
        let maps = DatapathMaps::take(&mut ebpf)?;

        let mut adopted = true;
        for name in [PROG_EGRESS, PROG_INGRESS] {
            adopted &= load_or_adopt(&mut ebpf, name, &pin_dir.join(name))?;
        }
        let egress = open_pinned(PROG_EGRESS, &pin_dir.join(PROG_EGRESS))?;
        let ingress = open_pinned(PROG_INGRESS, &pin_dir.join(PROG_INGRESS))?;
        info!(pin_dir = %pin_dir.display(), adopted, "datapath loaded");
        Ok(Self {
            maps,
            egress,
            ingress,
            adopted,
            pin_dir: pin_dir.clone(),
        })
    }

    /// Attaches both programs to `interface` (adding its clsact qdisc if needed),
    /// replacing in place whatever vcnpath attached there before.
    pub fn attach(&mut self, interface: &str) -> Result<(), DatapathError> {
        if let Err(error) = tc::qdisc_add_clsact(interface) {
            // EEXIST is the normal case after a restart.
            let exists = matches!(&error, tc::TcError::NetlinkError(e) if e.raw_os_error() == Some(libc::EEXIST));
            if !exists {
                return Err(DatapathError::Interface {
                    interface: interface.to_owned(),
                    source: io::Error::other(error.to_string()),
                });
            }
        }
        attach_one(
            &mut self.egress,
            PROG_EGRESS,
            interface,
            TcAttachType::Egress,
        )?;
        attach_one(
            &mut self.ingress,
            PROG_INGRESS,
            interface,
            TcAttachType::Ingress,
        )?;
        Ok(())
    }

    /// The egress classifier (for `BPF_PROG_TEST_RUN` in tests and benchmarks).
    pub fn egress(&self) -> &SchedClassifier {
        &self.egress
    }

    /// The ingress classifier.
    pub fn ingress(&self) -> &SchedClassifier {
        &self.ingress
    }

    /// The pin directory in use.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}

/// Loads `name` from the object and pins it, unless the pinned program has the same
/// code. Returns whether the pinned one was adopted.
fn load_or_adopt(
    ebpf: &mut aya::Ebpf,
    name: &'static str,
    pin: &Path,
) -> Result<bool, DatapathError> {
    let program: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram { program: name })?
        .try_into()
        .map_err(DatapathError::program(name))?;
    program.load().map_err(DatapathError::program(name))?;
    let fresh_tag = program.info().map_err(DatapathError::program(name))?.tag();

    if let Ok(pinned) = SchedClassifier::from_pin(pin) {
        let pinned_tag = pinned.info().map_err(DatapathError::program(name))?.tag();
        if pinned_tag == fresh_tag {
            debug!(program = name, "adopting pinned program");
            return Ok(true);
        }
        info!(
            program = name,
            "replacing pinned program with a different version"
        );
        std::fs::remove_file(pin).map_err(|source| DatapathError::Pin {
            path: pin.to_owned(),
            source,
        })?;
    }
    program.pin(pin).map_err(|e| DatapathError::Pin {
        path: pin.to_owned(),
        source: io::Error::other(e.to_string()),
    })?;
    Ok(false)
}

fn open_pinned(name: &'static str, pin: &Path) -> Result<SchedClassifier, DatapathError> {
    SchedClassifier::from_pin(pin).map_err(DatapathError::program(name))
}

fn attach_one(
    program: &mut SchedClassifier,
    name: &'static str,
    interface: &str,
    attach_type: TcAttachType,
) -> Result<(), DatapathError> {
    let attach_error = |source| DatapathError::Attach {
        program: name,
        interface: interface.to_owned(),
        source: Box::new(source),
    };
    // Replace first: an existing vcnpath filter is swapped atomically, so no packet
    // ever crosses the interface unprocessed.
    let replaced =
        SchedClassifierLink::attached(interface, attach_type, TC_PRIORITY, TC_HANDLE, None)
            .map_err(|source| DatapathError::Interface {
                interface: interface.to_owned(),
                source,
            })
            .and_then(|existing| program.attach_to_link(existing).map_err(attach_error));
    let link_id = match replaced {
        Ok(id) => id,
        Err(_) => program
            .attach_with_options(
                interface,
                attach_type,
                TcAttachOptions::Netlink(NlOptions {
                    priority: TC_PRIORITY,
                    handle: TC_HANDLE,
                    classid: None,
                }),
            )
            .map_err(attach_error)?,
    };
    // Keep the attachment when this process exits: dropping the link would detach it.
    let link = program.take_link(link_id).map_err(attach_error)?;
    std::mem::forget(link);
    debug!(program = name, interface, "attached");
    Ok(())
}

/// Removes vcnpath's filters from `interface` (both hooks). Missing filters are fine.
pub fn detach_interface(interface: &str) -> Result<(), DatapathError> {
    for (name, attach_type) in [
        (PROG_EGRESS, TcAttachType::Egress),
        (PROG_INGRESS, TcAttachType::Ingress),
    ] {
        match tc::qdisc_detach_program(interface, attach_type, name) {
            Ok(()) => {}
            Err(tc::TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(DatapathError::Interface {
                    interface: interface.to_owned(),
                    source: io::Error::other(e.to_string()),
                });
            }
        }
    }
    Ok(())
}

/// Removes every pin vcnpath created in `pin_dir`, then the directory itself.
pub fn remove_pins(pin_dir: &Path) -> Result<(), DatapathError> {
    let names = MAP_NAMES.iter().chain([PROG_EGRESS, PROG_INGRESS].iter());
    for name in names {
        match std::fs::remove_file(pin_dir.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(DatapathError::PinDir {
                    path: pin_dir.to_owned(),
                    source,
                });
            }
        }
    }
    match std::fs::remove_dir(pin_dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(DatapathError::PinDir {
            path: pin_dir.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}
