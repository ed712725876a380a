//! Errors of the datapath module; each names what failed and what to check.

use std::{io, path::PathBuf};

use super::compat::Refusal;

/// Everything that can go wrong loading, attaching or syncing the datapath.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "cannot use the bpffs pin directory {path}: {source} (is bpffs mounted on /sys/fs/bpf? `mount -t bpf bpf /sys/fs/bpf`)"
    )]
    PinDir { path: PathBuf, source: io::Error },
    #[error(
        "loading the eBPF object failed: {0} (vcnpath needs root or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON)"
    )]
    Load(#[source] Box<aya::EbpfError>),
    #[error("the eBPF object has no program named {program}; the build is inconsistent")]
    MissingProgram { program: &'static str },
    #[error("the eBPF object has no map named {map}; the build is inconsistent")]
    MissingMap { map: &'static str },
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("pinning or opening {path}: {source}")]
    Pin { path: PathBuf, source: io::Error },
    #[error("attaching {program} to interface {interface} failed: {source}")]
    Attach {
        program: &'static str,
        interface: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("interface {interface}: {source} (does it exist in this network namespace?)")]
    Interface {
        interface: String,
        source: io::Error,
    },
    #[error("TC on interface {interface}: {source} (does it exist in this network namespace?)")]
    Tc {
        interface: String,
        source: aya::programs::tc::TcError,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error(
        "kernel {kernel} lacks the BPF helper {helper} (added in Linux {since}); vcnpath needs Linux {minimum} or newer"
    )]
    KernelFeature {
        kernel: String,
        helper: &'static str,
        since: &'static str,
        minimum: &'static str,
    },
    #[error(
        "probing the kernel for the BPF helper {helper} failed: {source} (vcnpath needs root or CAP_BPF, and CAP_SYS_RESOURCE before Linux 5.11, where BPF memory counts against RLIMIT_MEMLOCK)"
    )]
    Probe {
        helper: &'static str,
        source: io::Error,
    },
    #[error(
        "the {map} map pinned at {path} cannot be used by this build: {refusal}. Nothing was changed; the programs attached now keep forwarding with it. To upgrade anyway, remove the pin (`rm {path}`; for the nat map this resets every masqueraded connection) and start the agent again, or go back to the release that created it"
    )]
    IncompatiblePin {
        map: &'static str,
        path: PathBuf,
        refusal: Box<Refusal>,
    },
    #[error(
        "the pins in {pin_dir} were created with datapath ABI {pinned}; this vcnpath reads ABI {expected}. Use the vcnpath binary of the agent that created them"
    )]
    ForeignAbi {
        pin_dir: PathBuf,
        pinned: u32,
        expected: u32,
    },
    #[error("the embedded eBPF object cannot be parsed: {0}; the build is inconsistent")]
    Object(#[source] Box<aya_obj::ParseError>),
    #[error("the datapath task has stopped")]
    TaskGone,
}

impl DatapathError {
    pub(crate) fn map(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> Self {
        move |source| Self::Map {
            map,
            source: Box::new(source),
        }
    }

    pub(crate) fn program(
        program: &'static str,
    ) -> impl FnOnce(aya::programs::ProgramError) -> Self {
        move |source| Self::Program {
            program,
            source: Box::new(source),
        }
    }
}
