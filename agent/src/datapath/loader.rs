//! Loading, adopting, pinning and attaching the programs.
//!
//! Restarts and upgrades never interrupt traffic: maps are reused from their pins once the
//! kernel confirms they are what this build expects, a pinned program identical to the
//! embedded one (same kernel tag, same maps) is adopted rather than replaced, and
//! attachments are replaced in place (netlink, same priority and handle), never removed
//! and re-added.

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::programs::{
    SchedClassifier, TcAttachType,
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
};
use tracing::{debug, info, warn};
use vcnpath_common::{
    DATAPATH_ABI, GLOBAL_COARSE_CLOCK, MAP_ABI, MAP_NAMES, MAP_NAT, PROG_EGRESS, PROG_INGRESS,
    PROG_POD,
};

use super::{
    DatapathError, DatapathMaps, DatapathState, SyncReport,
    compat::{self, Plan},
    convert::{self, FlowLayout},
    object::OBJECT,
    pins,
    probe::{self, Features},
};

/// Priority of vcnpath's filters on the clsact hooks (lower runs first).
pub const TC_PRIORITY: u16 = 1;
/// Handle of vcnpath's filters; with the priority it identifies them for replacement.
const TC_HANDLE: TcHandle = TcHandle::new(0, 1);
/// [`TC_HANDLE`] as the kernel reports it (`tcm_handle`).
pub const TC_HANDLE_RAW: u32 = 1;

/// Where and how to load.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// bpffs directory for the pins (default `/sys/fs/bpf/vcnpath`).
    pub pin_dir: PathBuf,
    /// Capacity of the `nat` map when it is created (a pinned table keeps its own).
    pub nat_max_entries: Option<u32>,
}

/// Every program, in the order the agent loads and pins them.
pub(super) const PROGRAMS: [&str; 3] = [PROG_EGRESS, PROG_INGRESS, PROG_POD];

/// The loaded datapath: its maps and the programs, ready to attach.
pub struct Datapath {
    pub maps: DatapathMaps,
    pub(super) egress: SchedClassifier,
    pub(super) ingress: SchedClassifier,
    /// The anti-spoofing check on each pod's host-side veth.
    pub(super) pod: SchedClassifier,
    /// True when every program was adopted from its pin unchanged.
    pub adopted: bool,
    /// `Some` while attachments are held back: some map was replaced by an empty one, so
    /// the new programs would run without the state the attached ones still have. Holds the
    /// interfaces to attach once the first [`Datapath::sync`] has filled the maps.
    pub(super) held: Option<Vec<String>>,
    /// Flow tables converted from an older layout: the old tables, which the programs
    /// attached until the held attachments keep writing, for the catch-up after them.
    converted: Vec<Converted>,
    /// Until the first [`Datapath::sync`] has attached everything: the pods `inbound` names
    /// are marked again then (see [`DatapathMaps::mark_inbound_pods`]).
    mark_after_attach: bool,
    pub(super) pin_dir: PathBuf,
}

/// A flow table this load converted (see [`convert`]).
struct Converted {
    name: &'static str,
    from: FlowLayout,
    /// The table as the older release pinned it.
    old: aya::maps::Map,
}

impl Datapath {
    /// Loads the embedded object, reusing the pinned maps this build can use and adopting
    /// pinned programs whose code and maps are identical.
    ///
    /// Every pin is checked before anything is adopted (see [`super::compat`]): a pin that
    /// cannot be used and holds state the agent cannot rebuild (the NAT table) is refused
    /// with an error that says what to do, before anything pinned changes; any other
    /// incompatible map is replaced by a fresh one. Replacement maps and programs are
    /// pinned under a staging directory and renamed over the live pins only once every
    /// program has passed the verifier, so a failed upgrade leaves every pin as it was.
    pub fn load(options: &LoadOptions) -> Result<Self, DatapathError> {
        let pin_dir = &options.pin_dir;
        std::fs::create_dir_all(pin_dir).map_err(|source| DatapathError::PinDir {
            path: pin_dir.clone(),
            source,
        })?;
        let plans = plan_maps(options)?;
        let staging = pins::fresh_staging(pin_dir)?;
        let loaded = load_staged(options, &plans, &staging);
        // Whatever the outcome, nothing is left behind in the staging directory: on success
        // it was moved into place, on failure it is dropped.
        let cleaned = pins::remove_staging(pin_dir);
        let (mut ebpf, adopted, converted) = loaded?;
        cleaned?;
        // A map the agent fills that starts empty (new, or replaced without its entries)
        // would make the new programs act on missing state; whatever is attached now keeps
        // its own complete maps until the first sync has filled these (a deleted pin, an
        // upgrade), and on a fresh node nothing is lost by attaching after that sync.
        let emptied: Vec<&str> = plans
            .iter()
            .filter(|(name, plan)| {
                compat::contents(name) == compat::Contents::Rebuilt
                    && matches!(plan, Plan::Create | Plan::Replace { copy: false })
            })
            .map(|(name, _)| *name)
            .collect();
        if !emptied.is_empty() {
            info!(
                maps = ?emptied,
                "these maps start empty: attaching waits for the first sync, the programs attached now stay until then"
            );
        }
        // Attaching waits after a conversion too, so the catch-up runs once every new
        // program is attached (see `Datapath::sync`).
        let hold = !emptied.is_empty() || !converted.is_empty();

        let mut maps = DatapathMaps::take(&mut ebpf)?;
        // Before the new programs are attached: they look `inbound` up only for marked pods.
        mark_inbound_pods(&mut maps)?;
        let egress = open_pinned(PROG_EGRESS, &pin_dir.join(PROG_EGRESS))?;
        let ingress = open_pinned(PROG_INGRESS, &pin_dir.join(PROG_INGRESS))?;
        let pod = open_pinned(PROG_POD, &pin_dir.join(PROG_POD))?;
        info!(pin_dir = %pin_dir.display(), adopted, "datapath loaded");
        Ok(Self {
            maps,
            egress,
            ingress,
            pod,
            adopted,
            held: hold.then(Vec::new),
            converted,
            mark_after_attach: true,
            pin_dir: pin_dir.clone(),
        })
    }

    /// Makes the maps equal to `state` (see [`DatapathMaps::sync`]), then attaches whatever
    /// was held back for this first sync, and after that copies into converted flow tables
    /// what the programs attached until then created meanwhile.
    pub fn sync(&mut self, state: &DatapathState) -> Result<SyncReport, DatapathError> {
        let report = self.maps.sync(state)?;
        if let Some(held) = self.held.take() {
            // The entries this sync wrote, before the held programs run.
            mark_inbound_pods(&mut self.maps)?;
            let mut first_error = None;
            for interface in held {
                if let Err(error) = self.attach(&interface) {
                    first_error.get_or_insert(error);
                }
            }
            let caught_up = self.catch_up();
            if let Some(error) = first_error {
                return Err(error);
            }
            caught_up?;
        }
        if std::mem::take(&mut self.mark_after_attach) {
            // The records the programs attached before wrote until they were replaced.
            mark_inbound_pods(&mut self.maps)?;
        }
        Ok(report)
    }

    /// Copies into each converted flow table the entries its old table has and it lacks:
    /// flows the programs attached before opened after the first copy. Then the old tables
    /// are let go (the kernel frees each once no program holds it).
    fn catch_up(&mut self) -> Result<(), DatapathError> {
        for converted in std::mem::take(&mut self.converted) {
            let name = converted.name;
            let mut new = pins::open(name, &self.pin_dir.join(name))?;
            let copied = convert::catch_up(name, converted.from, &converted.old, &mut new)?;
            info!(
                map = name,
                old_entries = copied.read,
                carried_over = copied.written,
                "flow table conversion finished: flows opened during the upgrade carried over"
            );
        }
        Ok(())
    }

    /// Attaches both programs to `interface` (adding its clsact qdisc if needed),
    /// replacing in place whatever vcnpath attached there before. After a load that
    /// replaced maps by empty ones, attaching waits for the first [`Datapath::sync`]:
    /// until then the programs attached before keep their own, still complete, maps.
    pub fn attach(&mut self, interface: &str) -> Result<(), DatapathError> {
        if let Some(held) = &mut self.held {
            if !held.iter().any(|i| i == interface) {
                debug!(interface, "attachment held until the first sync");
                held.push(interface.to_owned());
            }
            return Ok(());
        }
        add_clsact(interface)?;
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

    /// Attaches the anti-spoofing check to the TC ingress of a pod's host-side veth
    /// (adding its clsact qdisc if needed), replacing in place what vcnpath attached
    /// there before. It needs no state the agent fills, so it is never held back.
    pub fn attach_pod(&mut self, interface: &str) -> Result<(), DatapathError> {
        attach_pod_program(&mut self.pod, interface)
    }

    /// The pod-veth classifier (for `BPF_PROG_TEST_RUN`).
    pub fn pod(&self) -> &SchedClassifier {
        &self.pod
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

/// [`DatapathMaps::mark_inbound_pods`], saying when it found pods to mark.
fn mark_inbound_pods(maps: &mut DatapathMaps) -> Result<(), DatapathError> {
    let marked = maps.mark_inbound_pods()?;
    if marked > 0 {
        info!(
            pods = marked,
            "pods with flows opened from outside marked for their answers' lookup"
        );
    }
    Ok(())
}

/// Compares every pinned map with the map this build declares and decides what to do
/// with it; refuses, before anything changes, when a pin can be neither used nor replaced.
fn plan_maps(options: &LoadOptions) -> Result<Vec<(&'static str, Plan)>, DatapathError> {
    let declared = pins::declared(options.nat_max_entries)?;
    let pinned_abi = pins::read_abi(&options.pin_dir)?;
    let mut plans = Vec::with_capacity(MAP_NAMES.len());
    for name in MAP_NAMES {
        let expected = declared
            .get(name)
            .ok_or(DatapathError::MissingMap { map: name })?;
        let path = options.pin_dir.join(name);
        let pinned = pins::pinned(name, &path)?;
        let plan = compat::plan(name, expected, pinned.as_ref(), pinned_abi, DATAPATH_ABI)
            .map_err(|refusal| DatapathError::IncompatiblePin {
                map: name,
                path,
                refusal: Box::new(refusal),
            })?;
        match plan {
            Plan::Replace { copy } => info!(
                map = name,
                copy,
                pinned_abi,
                abi = DATAPATH_ABI,
                ?pinned,
                ?expected,
                "replacing a pinned map this build cannot use"
            ),
            Plan::Convert { from } => info!(
                map = name,
                ?from,
                pinned_abi,
                abi = DATAPATH_ABI,
                ?pinned,
                ?expected,
                "converting a pinned flow table of an older layout; its flows carry over"
            ),
            Plan::Adopt if pinned.is_some_and(|p| p.max_entries != expected.max_entries) => {
                warn!(
                    map = name,
                    pinned = pinned.map(|p| p.max_entries),
                    configured = expected.max_entries,
                    "keeping the pinned map's capacity; the configured one applies once the pin is removed"
                );
            }
            _ => {}
        }
        plans.push((name, plan));
    }
    Ok(plans)
}

/// Loads the object with the maps `plans` decided on and every program, then moves what was
/// staged into place and records the ABI. Returns the object, whether every program was
/// adopted, and the flow tables converted.
fn load_staged(
    options: &LoadOptions,
    plans: &[(&'static str, Plan)],
    staging: &Path,
) -> Result<(aya::Ebpf, bool, Vec<Converted>), DatapathError> {
    let pin_dir = &options.pin_dir;
    let staged = |name: &str| staging.join(name);
    let features = Features::detect(probe::REQUIRED)?;
    let coarse_clock = u8::from(features.coarse_clock);
    let mut loader = aya::EbpfLoader::new();
    loader.override_global(GLOBAL_COARSE_CLOCK, &coarse_clock, true);
    for (name, plan) in plans {
        let path = match plan {
            // New maps wait in staging too: until every program has loaded, no pin
            // changes, so a failed start leaves nothing a later start could mistake for
            // the previous release's state.
            Plan::Replace { .. } | Plan::Convert { .. } | Plan::Create => staged(name),
            Plan::Adopt => pin_dir.join(name),
        };
        loader.map_pin_path(name, path);
    }
    if let Some(max) = options.nat_max_entries {
        loader.map_max_entries(MAP_NAT, max);
    }
    let mut ebpf = loader
        .load(OBJECT)
        .map_err(|e| DatapathError::Load(Box::new(e)))?;
    let mut converted = Vec::new();
    for (name, plan) in plans {
        if !matches!(plan, Plan::Replace { copy: true } | Plan::Convert { .. }) {
            continue;
        }
        let map = ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap { map: name })?;
        if let Plan::Convert { from } = *plan {
            let old = pins::open(name, &pin_dir.join(name))?;
            let copied = convert::copy(name, from, &old, map)?;
            info!(
                map = name,
                entries = copied.read,
                written = copied.written,
                "flow table converted"
            );
            converted.push(Converted { name, from, old });
        } else {
            pins::copy_entries(name, &pin_dir.join(name), map)?;
        }
    }

    let mut adopted = true;
    let mut replaced = Vec::new();
    for name in PROGRAMS {
        if load_or_adopt(&mut ebpf, name, &pin_dir.join(name))? {
            continue;
        }
        adopted = false;
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram { program: name })?
            .try_into()
            .map_err(DatapathError::program(name))?;
        program.pin(staged(name)).map_err(|e| DatapathError::Pin {
            path: staged(name),
            source: io::Error::other(e),
        })?;
        replaced.push(name);
    }

    // Both programs passed the verifier: swap in the new and replaced maps, then the
    // programs that use them. The attached filters keep the old programs (and the maps those hold)
    // until `attach` replaces them.
    for (name, plan) in plans {
        if matches!(
            plan,
            Plan::Replace { .. } | Plan::Convert { .. } | Plan::Create
        ) {
            pins::swap_in(&staged(name), &pin_dir.join(name))?;
        }
    }
    for name in replaced {
        info!(program = name, "replacing the pinned program");
        pins::swap_in(&staged(name), &pin_dir.join(name))?;
    }
    pins::write_abi(pin_dir)?;
    Ok((ebpf, adopted, converted))
}

/// Loads `name` from the object (so the verifier has accepted it) and tells whether the
/// program pinned at `pin` can be adopted instead: only when it has the same code (kernel
/// tag) and uses the same maps. The tag leaves map references out, so a program with this
/// code bound to maps since replaced has the same tag; its map ids tell them apart (and,
/// for the object's own data maps, which are never pinned, their contents).
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
    let fresh = program.info().map_err(DatapathError::program(name))?;
    let Ok(pinned) = SchedClassifier::from_pin(pin) else {
        return Ok(false);
    };
    let pinned = pinned.info().map_err(DatapathError::program(name))?;
    if pinned.tag() != fresh.tag() {
        info!(program = name, "the pinned program has other code");
        return Ok(false);
    }
    let pinned_maps = pins::program_maps(&pinned).map_err(DatapathError::program(name))?;
    // Unknown map ids (a kernel before 4.15) cannot prove the maps equal.
    if pinned_maps.is_none()
        || pinned_maps != pins::program_maps(&fresh).map_err(DatapathError::program(name))?
    {
        info!(program = name, "the pinned program uses other maps");
        return Ok(false);
    }
    debug!(program = name, "adopting pinned program");
    Ok(true)
}

/// Attaches the pinned anti-spoofing program in `pin_dir` to the TC ingress of the pod
/// veth `interface`: for a process that has not loaded the datapath (the CNI plugin).
pub fn attach_pinned_pod(pin_dir: &Path, interface: &str) -> Result<(), DatapathError> {
    let mut program = open_pinned(PROG_POD, &pin_dir.join(PROG_POD))?;
    attach_pod_program(&mut program, interface)
}

fn attach_pod_program(program: &mut SchedClassifier, interface: &str) -> Result<(), DatapathError> {
    add_clsact(interface)?;
    attach_one(program, PROG_POD, interface, TcAttachType::Ingress)
}

/// Adds the clsact qdisc to `interface`; one already there is fine.
fn add_clsact(interface: &str) -> Result<(), DatapathError> {
    match tc::qdisc_add_clsact(interface) {
        Ok(()) => Ok(()),
        // EEXIST is the normal case after a restart.
        Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(source) => Err(DatapathError::Tc {
            interface: interface.to_owned(),
            source,
        }),
    }
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
            Err(source) => {
                return Err(DatapathError::Tc {
                    interface: interface.to_owned(),
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Removes every pin vcnpath created in `pin_dir`, then the directory itself.
pub fn remove_pins(pin_dir: &Path) -> Result<(), DatapathError> {
    pins::remove_staging(pin_dir)?;
    let names = MAP_NAMES
        .iter()
        .chain([MAP_ABI].iter())
        .chain(PROGRAMS.iter());
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
