//! `vcnpath-ocisim`: the OCI simulator as a process (for the demo and manual poking).
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use vcnpath_tests::ocisim::{ApiKeyConfig, RateLimit, SimConfig, Simulator};

#[derive(Debug, Parser)]
#[command(
    about = "Simulated OCI: IMDS v2, /v1/x509 federation and the Core API subset vcnpath uses"
)]
struct Args {
    /// Address to listen on (keep it on loopback).
    #[arg(long, default_value = "127.0.0.1:8787")]
    listen: String,
    /// Start-up state and limits as TOML (`.toml`) or JSON; flags below override it.
    #[arg(long)]
    state: Option<PathBuf>,
    /// VNIC attachments the shape allows, the primary VNIC included.
    #[arg(long)]
    max_vnics: Option<u32>,
    /// Secondary private IPs per VNIC.
    #[arg(long)]
    ips_per_vnic: Option<u32>,
    /// Milliseconds an attachment spends ATTACHING / DETACHING.
    #[arg(long)]
    attach_delay_ms: Option<u64>,
    /// Largest page returned by list calls.
    #[arg(long)]
    page_size: Option<usize>,
    /// Lifetime of issued session tokens, in seconds.
    #[arg(long)]
    token_lifetime_s: Option<u64>,
    /// Register an API key: `<tenancy>/<user>/<fingerprint>=<public key PEM file>` (repeatable).
    #[arg(long = "api-key")]
    api_keys: Vec<String>,
    /// Added latency in ms for Core API requests.
    #[arg(long)]
    latency_ms: Option<u64>,
    /// Fraction of Core API requests answered 429.
    #[arg(long)]
    rate_429: Option<f64>,
    /// Fraction of Core API requests answered 500.
    #[arg(long)]
    rate_5xx: Option<f64>,
    /// Fraction of Core API requests left hanging.
    #[arg(long)]
    rate_hang: Option<f64>,
    /// Instances in the simulated tenancy, each with its IMDS at `/instances/<n>/opc/v2/`.
    #[arg(long)]
    instances: Option<u32>,
    /// Tenancy-wide Core API budget in requests/s (429 beyond it; burst from `--tenancy-burst`).
    #[arg(long)]
    tenancy_rps: Option<f64>,
    /// Requests admitted at once above `--tenancy-rps` (5, as Oracle's controllers budget).
    #[arg(long, default_value_t = 5)]
    tenancy_burst: u32,
}

fn load(path: &PathBuf) -> anyhow::Result<SimConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    } else {
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let mut config = match &args.state {
        Some(path) => load(path)?,
        None => SimConfig::default(),
    };
    macro_rules! set {
        ($($arg:ident => $($field:ident).+),*) => { $(if let Some(v) = args.$arg { config.$($field).+ = v; })* };
    }
    set!(max_vnics => max_vnic_attachments, ips_per_vnic => ips_per_vnic, attach_delay_ms => attach_delay_ms,
         page_size => page_size, token_lifetime_s => token_lifetime_s, latency_ms => faults.latency_ms,
         rate_429 => faults.rate_429, rate_5xx => faults.rate_5xx, rate_hang => faults.rate_hang,
         instances => instance_count);
    if let Some(per_second) = args.tenancy_rps {
        config.tenancy_rate_limit = Some(RateLimit {
            per_second,
            burst: args.tenancy_burst,
            ..RateLimit::default()
        });
    }
    for spec in &args.api_keys {
        let (key_id, file) = spec
            .split_once('=')
            .context("--api-key wants KEY_ID=PEM_FILE")?;
        config.api_keys.push(ApiKeyConfig {
            key_id: key_id.to_owned(),
            public_key_pem: None,
            public_key_file: Some(file.to_owned()),
        });
    }
    let sim = Simulator::start(config, &args.listen).await?;
    println!("vcnpath-ocisim listening on {}", sim.base_url());
    println!("  IMDS:     {}", sim.imds_url());
    let instances = sim.instance_ids().len();
    if instances > 1 {
        println!(
            "  {instances} instances, IMDS of instance n at {}",
            sim.imds_url_of(0).replace("/0/", "/<n>/")
        );
    }
    println!("  Core API: {}", sim.core_url());
    println!(
        "  admin:    {}/admin/{{state,faults,events,api-keys}}",
        sim.base_url()
    );
    tokio::signal::ctrl_c()
        .await
        .context("waiting for ctrl-c")?;
    Ok(())
}
