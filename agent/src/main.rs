//! `vcnpath`: the node agent and its inspection commands.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use vcnpath::cli;
use vcnpath_common::DEFAULT_PIN_DIR;

#[derive(Parser)]
#[command(
    name = "vcnpath",
    version,
    about = "VCN-native pod networking with an eBPF datapath for OCI"
)]
struct Args {
    /// Log as JSON lines.
    #[arg(long, global = true, env = "VCNPATH_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the datapath from a static configuration file until stopped.
    Datapath {
        /// The TOML configuration.
        #[arg(long, short)]
        config: PathBuf,
        /// Detach from the configured interfaces and remove the pins instead of running.
        #[arg(long)]
        detach: bool,
    },
    /// Print the datapath's packet counters by reason.
    Counters {
        #[arg(long, default_value = DEFAULT_PIN_DIR, env = "VCNPATH_PIN_DIR")]
        pin_dir: PathBuf,
    },
    /// Print the NAT table.
    Nat {
        #[arg(long, default_value = DEFAULT_PIN_DIR, env = "VCNPATH_PIN_DIR")]
        pin_dir: PathBuf,
    },
    /// Print the version.
    Version,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    cli::logging::init(args.log_json);
    match args.command {
        Command::Datapath {
            config,
            detach: true,
        } => cli::datapath::detach(&config),
        Command::Datapath {
            config,
            detach: false,
        } => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(cli::datapath::run(&config)),
        Command::Counters { pin_dir } => cli::inspect::counters(&pin_dir),
        Command::Nat { pin_dir } => cli::inspect::nat(&pin_dir),
        Command::Version => {
            println!("vcnpath {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}
