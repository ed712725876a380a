//! `cargo xtask bench`: vcnpath's datapath measured against the iptables + `ip rule`
//! datapath it replaces, on the same namespace lab, and the NAT table at scale.
//!
//! - [`node`] builds one bench node (the lab, the measured pod, N pod addresses) in either
//!   [`Setup`]; [`baseline`] is the incumbent datapath, the agent is the other.
//! - [`load`] is the load generators (UDP blaster/sink, TCP ping-pong, bulk TCP).
//! - [`compare`] runs them interleaved on both setups; [`nat`] and [`per_packet`] time the
//!   programs themselves with `BPF_PROG_TEST_RUN`; [`report`] prints and writes JSON.
//! - [`control`] is one node's agent and CNI plugin against the OCI simulator, [`fleet`]
//!   hundreds of nodes' pools against one simulator and one tenancy-wide request budget.

pub mod baseline;
pub mod compare;
pub mod control;
pub mod fleet;
pub mod load;
pub mod nat;
pub mod node;
pub mod per_packet;
pub mod report;

use std::fmt;
use std::path::PathBuf;

/// The two datapaths compared on the same topology.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Setup {
    /// iptables SNAT + conntrack + one `ip rule` per secondary-VNIC pod.
    Baseline,
    /// `vcnpath datapath`: TC programs, no netfilter, no rules.
    Vcnpath,
}

impl fmt::Display for Setup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Baseline => "baseline",
            Self::Vcnpath => "vcnpath",
        })
    }
}

/// `<target>/bench`, next to the profile directory the bench binary runs from, so the
/// figures land under the same `target/` as the build (whatever `CARGO_TARGET_DIR` says).
pub fn output_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let profile = exe.parent().expect("executable directory");
    let target = profile.parent().unwrap_or(profile);
    target.join("bench")
}

/// Pins the calling thread to the machine's last CPU, where the kernel-timed benchmarks
/// run: CPU 0 takes most of a VM's interrupts (every path measured 15-20% slower there
/// on the benchmark machine), and a NAT table filled on one CPU and timed on another
/// measured 40 ns slower per packet than one filled and timed on the same CPU.
pub fn pin_to_last_cpu() {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    pin_to_cpu(cpus - 1);
}

/// Pins the calling thread to `cpu`, so a load generator and its sink do not fight for
/// the same core (and the kernel's softirq work lands where the sender runs). A machine
/// with fewer CPUs is left unpinned: the figure is still valid, only noisier.
pub fn pin_to_cpu(cpu: usize) {
    if std::thread::available_parallelism().map_or(1, usize::from) <= cpu {
        return;
    }
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it (cpu < CPU_SETSIZE since
    // the machine has more CPUs than `cpu`), and sched_setaffinity(0) affects only this
    // thread and reads exactly size_of::<cpu_set_t>() bytes.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set) != 0 {
            eprintln!(
                "bench: cannot pin to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// The machine the figures come from, for the report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cpus: usize,
    pub kernel: String,
    pub hypervisor: bool,
    /// 1-minute load average when the run started (other builds make the figures noisy).
    pub load_at_start: f64,
}

impl Machine {
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            cpuinfo
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        Self {
            cpu: field("model name"),
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            hypervisor: field("flags").split_whitespace().any(|f| f == "hypervisor"),
            load_at_start: load_average(),
        }
    }
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}, {} CPUs{}, kernel {}, load average {:.2} at start",
            self.cpu,
            self.cpus,
            if self.hypervisor { " (VM)" } else { "" },
            self.kernel,
            self.load_at_start
        )
    }
}

/// The 1-minute load average.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}
