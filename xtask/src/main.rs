//! `cargo xtask`: the project's own setup, build, test and benchmark entry points.

mod build_ebpf;
mod cmd;
mod debian;
mod runtime;
mod setup;
mod test;
mod vmtest;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "vcnpath developer tasks")]
struct Args {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install everything the build and the tests need (idempotent; root).
    Setup,
    /// Build the eBPF object into target/bpf and lint it.
    BuildEbpf {
        /// Also run clippy on the eBPF crate.
        #[arg(long)]
        clippy: bool,
    },
    /// Run every test tier: lints, unit, `BPF_PROG_TEST_RUN` packet tests, namespace tests.
    Test,
    /// The packet and lab tiers inside VMs booting Debian's 5.10, 6.1 and 6.12 kernels.
    Vmtest {
        /// `5.10`, `6.1`, `6.12`, a comma-separated list, or `all`.
        #[arg(long, default_value = "all")]
        kernel: String,
        /// `packet`, `lab` or `all`.
        #[arg(long, default_value = "all")]
        tier: String,
    },
    /// The main job: vcnpath in the namespace lab with pods on two VNICs, and a report.
    Demo,
    /// Print benchmark figures and write them to target/bench/*.json:
    /// `datapath` (per packet), `compare` (vcnpath vs iptables + ip rules), `nat`,
    /// `control` (agent and CNI plugin against the simulator), `fleet` (200 nodes' IPAM
    /// against one simulator and a tenancy-wide rate limit, `--nodes N --pods N`), `all`
    /// (all but fleet).
    Bench {
        /// What to measure.
        #[arg(default_value = "datapath")]
        what: String,
        /// Passed on to the benchmark (e.g. `--rounds 5 --secs 2 --pods 1,512`, or for fleet
        /// `--nodes 500 --pods 30 --modes ip,cidr --deadline-secs 900`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Args::parse().task {
        Task::Setup => setup::run(),
        Task::BuildEbpf { clippy } => build_ebpf::run(clippy),
        Task::Test => test::run(),
        Task::Bench { what, args } => test::bench(&what, &args),
        Task::Demo => test::demo(),
        Task::Vmtest { kernel, tier } => test::vmtest(&vmtest::select(&kernel)?, &tier),
    }
}
