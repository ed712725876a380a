//! `vcnpath-bench WHAT`, run by `cargo xtask bench WHAT`:
//! - `datapath`: kernel-timed cost per packet of each datapath path (`BPF_PROG_TEST_RUN`);
//! - `compare`: vcnpath against the iptables + `ip rule` baseline in the namespace lab;
//! - `nat`: established-flow cost, memory and garbage collection with a full NAT table;
//! - `control`: the agent and CNI plugin against the OCI simulator with OCI's latencies;
//! - `fleet`: 200 nodes' IPAM scaling at once against one simulator and one tenancy-wide
//!   request budget, in both `ipam.mode`s (not in `all`: it takes about ten minutes);
//! - `all`: datapath, nat, control and compare.
//!
//! Each prints a table and writes the same figures to `target/bench/<what>.json`.
//! `compare` takes `--rounds R`, `--secs S` and `--pods 1,64,…` for quicker runs;
//! `control` takes `--churn N` (pods created and deleted, 1000 by default); `fleet` takes
//! `--nodes N`, `--pods N` (per node, 30 by default), `--modes ip,cidr` and
//! `--deadline-secs S` (per mode, 900 by default).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use vcnpath_tests::bench::{
    Machine, compare, control, fleet,
    load::Timing,
    nat, per_packet,
    report::{self, write_json},
};

const USAGE: &str = "usage: vcnpath-bench datapath|compare|nat|control|fleet|all [--rounds R] [--secs S] [--pods N,N,…] [--churn N] (fleet: [--nodes N] [--pods N] [--modes ip,cidr] [--deadline-secs S])";

/// `--churn N` out of `args`, the rest for [`compare_options`].
fn churn_option(args: &[String]) -> Result<(usize, Vec<String>)> {
    let mut churn = 1000;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "--churn" {
            churn = it
                .next()
                .context("--churn needs a value")?
                .parse()
                .context("--churn")?;
        } else {
            rest.push(arg.clone());
        }
    }
    Ok((churn, rest))
}

fn control(machine: &Machine, churn: usize) -> Result<()> {
    let figures = control::run(churn)?;
    print!("{}", control::report::table(&figures));
    let path = write_json(
        "control",
        &serde_json::json!({
            "machine": machine,
            "control": figures,
            "targets": control::report::targets(&figures),
        }),
    )?;
    println!("figures written to {}\n", path.display());
    Ok(())
}

/// The `--flag value` pairs of `args`, in order.
fn flag_values(args: &[String]) -> Result<Vec<(&str, &str)>> {
    args.chunks(2)
        .map(|pair| match pair {
            [flag, value] => Ok((flag.as_str(), value.as_str())),
            [flag, ..] => bail!("{flag} needs a value; {USAGE}"),
            [] => unreachable!("chunks are never empty"),
        })
        .collect()
}

fn fleet_options(args: &[String]) -> Result<fleet::Options> {
    let mut options = fleet::Options::realistic();
    for (flag, value) in flag_values(args)? {
        match flag {
            "--nodes" => options.nodes = value.parse().context("--nodes")?,
            "--pods" => options.pods = value.parse().context("--pods")?,
            "--deadline-secs" => {
                options.deadline = Duration::from_secs(value.parse().context("--deadline-secs")?);
            }
            "--modes" => {
                options.modes = value
                    .split(',')
                    .map(|m| match m {
                        "ip" => Ok("ip"),
                        "cidr" => Ok("cidr"),
                        "auto" => Ok("auto"),
                        _ => bail!("--modes: {m:?} is no ipam.mode (ip, cidr, auto)"),
                    })
                    .collect::<Result<_>>()?;
            }
            _ => bail!("unknown option {flag}; {USAGE}"),
        }
    }
    if options.nodes == 0 || options.pods == 0 {
        bail!("--nodes and --pods must be at least 1");
    }
    Ok(options)
}

fn fleet(machine: &Machine, options: &fleet::Options) -> Result<()> {
    let started = std::time::Instant::now();
    let figures = fleet::run(options)?;
    print!("{}", fleet::report::table(&figures));
    println!("run time {:.0} s", started.elapsed().as_secs_f64());
    let path = write_json(
        &format!("fleet-{}", options.nodes),
        &serde_json::json!({
            "machine": machine,
            "fleet": figures,
            "goals": fleet::report::goals(&figures),
            "run_secs": started.elapsed().as_secs_f64(),
        }),
    )?;
    std::fs::copy(&path, path.with_file_name("fleet.json"))
        .context("copying the figures to fleet.json")?;
    println!(
        "figures written to {} and fleet.json beside it\n",
        path.display()
    );
    Ok(())
}

fn compare_options(args: &[String]) -> Result<compare::Options> {
    let mut options = compare::Options {
        pod_counts: compare::POD_COUNTS.to_vec(),
        rounds: 3,
        timing: Timing {
            warmup: Duration::from_millis(300),
            measure: Duration::from_secs(1),
        },
    };
    for (flag, value) in flag_values(args)? {
        match flag {
            "--rounds" => options.rounds = value.parse().context("--rounds")?,
            "--secs" => {
                options.timing.measure = Duration::from_secs_f64(value.parse().context("--secs")?);
            }
            "--pods" => {
                options.pod_counts = value
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .context("--pods")?;
            }
            _ => bail!("unknown option {flag}; {USAGE}"),
        }
    }
    Ok(options)
}

fn datapath(machine: &Machine) -> Result<()> {
    let rows = per_packet::datapath()?;
    print!("{}", report::per_packet_table(&rows));
    let path = write_json(
        "datapath",
        &serde_json::json!({
            "machine": machine,
            "rows": rows,
            "targets": report::per_packet_targets(&rows),
        }),
    )?;
    println!("figures written to {}\n", path.display());
    Ok(())
}

fn compare(machine: &Machine, options: &compare::Options) -> Result<()> {
    let comparison = compare::run(options)?;
    print!("{}", report::compare_table(&comparison));
    let path = write_json(
        "compare",
        &serde_json::json!({
            "machine": machine,
            "comparison": comparison,
            "targets": report::targets(&comparison),
        }),
    )?;
    println!("figures written to {}\n", path.display());
    Ok(())
}

fn nat(machine: &Machine) -> Result<()> {
    let scale = nat::run()?;
    print!("{}", report::nat_table(&scale));
    let path = write_json(
        "nat",
        &serde_json::json!({ "machine": machine, "nat": scale }),
    )?;
    println!("figures written to {}\n", path.display());
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (what, rest) = args
        .split_first()
        .map_or(("datapath", &[][..]), |(w, r)| (w.as_str(), r));
    // The fleet is in-process against the simulator; the others need the namespace lab or BPF.
    if what != "fleet" && !vcnpath_tests::privileged::have_root("vcnpath-bench") {
        std::process::exit(1);
    }
    vcnpath_tests::interrupt::install();
    let (churn, rest) = churn_option(rest)?;
    let rest = rest.as_slice();
    let machine = Machine::detect();
    println!("{}\n", report::machine_line(&machine));
    match what {
        "datapath" => datapath(&machine),
        "compare" => compare(&machine, &compare_options(rest)?),
        "nat" => nat(&machine),
        "control" => control(&machine, churn),
        "fleet" => fleet(&machine, &fleet_options(rest)?),
        "all" => {
            datapath(&machine)?;
            nat(&machine)?;
            control(&machine, churn)?;
            compare(&machine, &compare_options(rest)?)
        }
        _ => bail!("unknown benchmark {what:?}; {USAGE}"),
    }
}
