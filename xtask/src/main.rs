//! `cargo xtask`: the project's own setup, build, test and benchmark entry points.

mod build_ebpf;
mod cmd;
mod setup;
mod test;

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
    /// The main job: vcnpath in the namespace lab with pods on two VNICs, and a report.
    Demo,
    /// Print benchmark figures and write them to target/bench/*.json:
    /// `datapath` (per packet), `compare` (vcnpath vs iptables + ip rules), `nat`,
    /// `control` (agent and CNI plugin against the simulator), `all`.
    Bench {
        /// What to measure.
        #[arg(default_value = "datapath")]
        what: String,
        /// Passed on to the benchmark (e.g. `--rounds 5 --secs 2 --pods 1,512`).
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
    }
}
