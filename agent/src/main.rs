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
    /// Run the node agent: IPAM over the node's VNICs, the datapath, the CNI plugin's API.
    Run(Box<RunArgs>),
    /// Show the running agent's VNICs, pool, pods and datapath counters.
    Status {
        #[arg(
            long,
            default_value = "/run/vcnpath/vcnpath.sock",
            env = "VCNPATH_SOCKET"
        )]
        socket: PathBuf,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the pod capacity of this instance's shape with the agent's configuration (the
    /// same file and overrides as `run`), for kubelet's --max-pods.
    MaxPods {
        /// The agent's TOML configuration, as given to `run`.
        #[arg(long, short, env = "VCNPATH_CONFIG")]
        config: Option<PathBuf>,
        /// IMDS v2 base URL (overrides `oci.imds_url`).
        #[arg(long, env = "VCNPATH_IMDS_URL")]
        imds_url: Option<String>,
        /// Overrides `ipam.ips_per_vnic`.
        #[arg(long)]
        ips_per_vnic: Option<usize>,
        /// Overrides `ipam.use_primary_vnic`.
        #[arg(long)]
        use_primary_vnic: Option<bool>,
        /// Kubernetes' per-node default ceiling.
        #[arg(long, default_value_t = 110)]
        cap: usize,
    },
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
    /// The IPAM checkpoint (`node.state_dir/ipam.json`).
    Checkpoint {
        #[command(subcommand)]
        action: CheckpointAction,
    },
    /// Print the version.
    Version,
}

#[derive(Subcommand)]
enum CheckpointAction {
    /// With the agent stopped, keep a refused checkpoint aside so the next start rebuilds it
    /// from the node (its veths, routes and pinned endpoints map).
    Rebuild {
        /// The agent's TOML configuration, as given to `run`.
        #[arg(long, short, env = "VCNPATH_CONFIG")]
        config: Option<PathBuf>,
        /// Overrides `node.state_dir`.
        #[arg(long, env = "VCNPATH_STATE_DIR")]
        state_dir: Option<PathBuf>,
        /// Overrides `datapath.pin_dir`.
        #[arg(long, env = "VCNPATH_PIN_DIR")]
        pin_dir: Option<PathBuf>,
    },
}

/// `vcnpath run` options; each overrides the configuration file.
#[derive(clap::Args)]
struct RunArgs {
    /// The TOML configuration (every key optional).
    #[arg(long, short, env = "VCNPATH_CONFIG")]
    config: Option<PathBuf>,
    /// IMDS v2 base URL.
    #[arg(long, env = "VCNPATH_IMDS_URL")]
    imds_url: Option<String>,
    /// One base URL for the OCI Core API and federation (e.g. the simulator).
    #[arg(long, env = "VCNPATH_OCI_ENDPOINT")]
    oci_endpoint: Option<String>,
    #[arg(long, value_enum, env = "VCNPATH_AUTH")]
    auth: Option<vcnpath::daemon::AuthMode>,
    /// OCI config file for --auth config-file.
    #[arg(long, env = "VCNPATH_OCI_CONFIG")]
    oci_config: Option<PathBuf>,
    #[arg(long, env = "VCNPATH_STATE_DIR")]
    state_dir: Option<PathBuf>,
    #[arg(long, env = "VCNPATH_SOCKET")]
    socket: Option<PathBuf>,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "VCNPATH_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    #[arg(long, env = "VCNPATH_PIN_DIR")]
    pin_dir: Option<PathBuf>,
}

impl RunArgs {
    fn into_config(self) -> anyhow::Result<vcnpath::daemon::AgentConfig> {
        let mut config = vcnpath::daemon::AgentConfig::load(self.config.as_deref())?;
        if let Some(v) = self.imds_url {
            config.oci.imds_url = v;
        }
        if let Some(v) = self.oci_endpoint {
            config.oci.endpoint = Some(v);
        }
        if let Some(v) = self.auth {
            config.oci.auth = v;
        }
        if let Some(v) = self.oci_config {
            config.oci.config_file = Some(v);
        }
        if let Some(v) = self.state_dir {
            config.node.state_dir = v;
        }
        if let Some(v) = self.socket {
            config.node.socket = v;
        }
        if let Some(v) = self.listen {
            config.node.listen = v;
        }
        if let Some(v) = self.pin_dir {
            config.datapath.pin_dir = v;
        }
        Ok(config)
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    cli::logging::init(args.log_json);
    match args.command {
        Command::Run(run) => {
            let config = run.into_config()?;
            runtime()?.block_on(cli::run::run(config))
        }
        Command::Status { socket, json } => runtime()?.block_on(cli::status::status(&socket, json)),
        Command::MaxPods {
            config,
            imds_url,
            ips_per_vnic,
            use_primary_vnic,
            cap,
        } => {
            let mut config = vcnpath::daemon::AgentConfig::load(config.as_deref())?;
            if let Some(v) = imds_url {
                config.oci.imds_url = v;
            }
            if let Some(v) = ips_per_vnic {
                config.ipam.ips_per_vnic = v;
            }
            if let Some(v) = use_primary_vnic {
                config.ipam.use_primary_vnic = v;
            }
            let n = runtime()?.block_on(cli::status::max_pods_for(&config, cap))?;
            println!("{n}");
            Ok(())
        }
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
        Command::Checkpoint {
            action:
                CheckpointAction::Rebuild {
                    config,
                    state_dir,
                    pin_dir,
                },
        } => {
            let mut config = vcnpath::daemon::AgentConfig::load(config.as_deref())?;
            if let Some(v) = state_dir {
                config.node.state_dir = v;
            }
            if let Some(v) = pin_dir {
                config.datapath.pin_dir = v;
            }
            runtime()?.block_on(cli::checkpoint::rebuild(&config))
        }
        Command::Version => {
            println!("vcnpath {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}
