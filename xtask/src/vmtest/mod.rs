//! `cargo xtask vmtest [--kernel 5.10|6.1|6.12|all]`: the packet tier (`BPF_PROG_TEST_RUN`)
//! and the namespace lab tier run inside VMs that boot Debian's kernels, with the test
//! binaries built on the host. Each VM shares the host's root filesystem read-only (9p,
//! under a tmpfs overlay), so the guest runs exactly the host's binaries and tools; the
//! results come back through a second, writable share under `target/vmtest/run/`.

mod initramfs;
pub(crate) mod kernel;
mod qemu;

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::cmd;
pub use qemu::Accel;

/// A group of test targets run together and reported as one cell of the table.
struct Tier {
    name: &'static str,
    targets: &'static [&'static str],
    /// Each test in its own process, timed on its own (the lab's tests run one at a time
    /// anyway); otherwise one process per target with two test threads.
    one_by_one: bool,
    /// Tests of the tier left to the host tiers: their assertions are about OCI's faults,
    /// the state lock, the checkpoint or the IPAM at scale, which no kernel changes, and
    /// under emulation each costs minutes.
    host_only: &'static [&'static str],
    /// The kernels `cargo xtask test` runs the tier on (`vmtest --kernel` runs what it is
    /// asked).
    kernels: &'static [&'static str],
}

/// Which kernel × tier cells a run covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matrix {
    /// `cargo xtask test`: each tier on its `kernels`.
    Test,
    /// `cargo xtask vmtest`: every tier asked for on every kernel asked for.
    Asked,
}

/// What runs in the VMs: the lab's datapath and agent scenarios and the packet tests.
/// The lab's checks of itself (`lab_selfcheck`, `lab_simlab`) and the benchmark smoke test
/// stay on the host: they prove the test bed, not vcnpath, and under emulation they would
/// double the tier's time. The lab goes first: the NAT GC test needs the clock two minutes
/// past boot, which it then is.
///
/// The packet tier (the verifier, the helpers, every program path) runs on every kernel.
/// The lab tier runs on the two kernels that bound what OCI nodes boot — 5.10, older than
/// UEK7's 5.15, and 6.12, UEK8's own — and not on 6.1 between them, where it would add
/// ten minutes of emulation for no kernel interface the other two leave untried.
const TIERS: [Tier; 2] = [
    Tier {
        name: "lab",
        // `lab_baremetal` needs 802.1Q VLANs, which some host kernels lack (the host tier
        // skips it there with a printed reason); Debian's kernels have them.
        targets: &["lab_datapath", "lab_host", "lab_agent", "lab_baremetal"],
        one_by_one: true,
        host_only: &[
            "lab_a_restart_while_oci_fails_serves_restored_pods_and_converges",
            "lab_a_second_agent_on_the_node_exits_and_the_first_serves_on",
            "lab_kill_9_during_a_burst_and_a_fault_storm_loses_nothing",
            // Forty pods exercise the agent's IPAM and the plugin at scale; the kernel paths
            // they take (two VNICs, the VCN and the internet) are the datapath tests' own.
            // Under emulation it alone took four to five minutes per kernel.
            "lab_forty_pods_across_two_vnics_reach_the_vcn_and_the_internet_and_addresses_come_back",
            // The metadata-service check is the pod program's, run on every kernel by the
            // packet tier (`datapath_spoof`); this shows the namespace policy end to end.
            "lab_pods_reach_the_metadata_service_only_from_an_allowed_namespace",
            // Which subnet the agent picks is an OCI question, not a kernel one.
            "lab_subnet_tag_finds_the_pod_subnet_in_the_vcns_compartment",
            // Which addresses IPAM holds is the agent's question; the kernel only lists routes.
            "lab_an_address_routed_to_a_veth_behind_the_agents_back_is_held",
            "lab_a_lost_checkpoint_never_hands_a_running_pods_address_to_a_new_pod",
        ],
        kernels: &["5.10", "6.12"],
    },
    Tier {
        name: "packet",
        targets: &[
            "datapath_kernel",
            "datapath_packets",
            "datapath_malformed",
            "datapath_tcp_state",
            "datapath_pins",
            "datapath_nat_gc",
            "datapath_spoof",
        ],
        one_by_one: false,
        host_only: &[],
        kernels: &["5.10", "6.1", "6.12"],
    },
];

/// Longest a tier may run in a VM under emulation before it is called failed.
const TIER_LIMIT: Duration = Duration::from_mins(25);
/// Longest one test of a one-by-one tier may run under emulation.
const TEST_LIMIT: Duration = Duration::from_mins(8);
/// What the tests read to stretch their time budgets (`vcnpath_tests::scaled`).
const TIME_SCALE_ENV: &str = "VCNPATH_TEST_TIME_SCALE";
/// How many of the slowest tests the results list for each kernel.
const SLOWEST_SHOWN: usize = 6;

/// The outcome of one target in one VM.
#[derive(Debug)]
struct Outcome {
    tier: &'static str,
    target: String,
    exit: i32,
    secs: u64,
    passed: u32,
    failed: Vec<String>,
    skipped: Vec<String>,
    /// Seconds each test took, for tiers run one by one.
    times: Vec<(String, u64)>,
}

/// One kernel's line of the table.
struct Row {
    kernel: String,
    /// The tiers its VM ran.
    ran: Vec<&'static str>,
    outcomes: Vec<Outcome>,
    error: Option<String>,
}

/// Which kernels `--kernel` names.
pub fn select(kernel: &str) -> anyhow::Result<Vec<&'static str>> {
    if kernel == "all" {
        return Ok(kernel::RELEASES.iter().map(|r| r.label).collect());
    }
    kernel
        .split(',')
        .map(|k| {
            kernel::RELEASES
                .iter()
                .find(|r| r.label == k)
                .map(|r| r.label)
                .with_context(|| {
                    format!("unknown kernel {k:?}: choose 5.10, 6.1, 6.12 or all (comma-separated)")
                })
        })
        .collect()
}

/// Runs the VM tier for `labels`, prints the kernel × tier table and fails when any cell
/// failed. `host` is the host kernel's row (its tiers ran before, on the host).
pub fn run(labels: &[&str], tier: &str, matrix: Matrix, host: Option<&str>) -> anyhow::Result<()> {
    let tiers: Vec<&Tier> = TIERS
        .iter()
        .filter(|t| tier == "all" || t.name == tier)
        .collect();
    if tiers.is_empty() {
        bail!("unknown tier {tier:?}: choose packet, lab or all");
    }
    let root = cmd::root();
    let base = root.join("target/vmtest");
    fs::create_dir_all(&base)?;
    let accel = Accel::detect();
    eprintln!("vmtest: VMs run under {}", accel.describe());
    let executables = build_tests(&tiers)?;
    let busybox = kernel::busybox(&base)?;
    let mut rows: Vec<Row> = Vec::new();
    for label in labels {
        let here: Vec<&Tier> = tiers
            .iter()
            .copied()
            .filter(|t| matrix == Matrix::Asked || t.kernels.contains(label))
            .collect();
        let ran = here.iter().map(|t| t.name).collect();
        let release = kernel::RELEASES
            .iter()
            .find(|r| r.label == *label)
            .copied()
            .expect("select() checked the label");
        let started = Instant::now();
        let row = kernel::fetch(&base, release).and_then(|k| {
            let mut outcomes = run_one(&base, &accel, &k, &busybox, &here, &executables)?;
            if let Some(kept) = kernel_panicked(&base, &k)? {
                eprintln!(
                    "vmtest: the {label} VM's kernel panicked before every cell ran (its console is kept in {}); running the cells once more",
                    kept.display()
                );
                outcomes = run_one(&base, &accel, &k, &busybox, &here, &executables)?;
            }
            Ok((k.version, outcomes))
        });
        match row {
            Ok((version, outcomes)) => {
                eprintln!(
                    "vmtest: {label} ({version}) done in {} s",
                    started.elapsed().as_secs()
                );
                rows.push(Row {
                    kernel: format!("{label} ({version})"),
                    ran,
                    outcomes,
                    error: None,
                });
            }
            Err(e) => rows.push(Row {
                kernel: (*label).to_string(),
                ran,
                outcomes: Vec::new(),
                error: Some(format!("{e:#}")),
            }),
        }
    }
    let (table, ok) = table(&tiers, host, &rows);
    eprintln!("{table}");
    fs::write(base.join("results.txt"), &table)?;
    if !ok {
        bail!(
            "the VM tier failed on some kernel: logs in {}",
            base.join("run").display()
        );
    }
    Ok(())
}

/// Builds the test targets the tiers name (and the agent binaries they run) and returns
/// each target's executable.
fn build_tests(tiers: &[&Tier]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    cmd::run(Command::new("cargo").args(["build", "-p", "vcnpath-agent", "--bins"]))?;
    let mut cargo = Command::new("cargo");
    cargo.current_dir(cmd::root()).args([
        "test",
        "-p",
        "vcnpath-tests",
        "--no-run",
        "--message-format=json",
    ]);
    for target in tiers.iter().flat_map(|t| t.targets) {
        cargo.args(["--test", target]);
    }
    let out = cargo.output().context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!(
            "building the VM tier's tests failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let (Some(name), Some(exe)) = (
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
        ) {
            found.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    for target in tiers.iter().flat_map(|t| t.targets) {
        if !found.iter().any(|(n, _)| n == target) {
            bail!("cargo built no executable for the test target {target}");
        }
    }
    snapshot(&found)
}

/// Copies the test executables and the binaries they run into `target/vmtest/bin` (the
/// layout of target/debug: tests under `deps/`, which is how they find `vcnpath`), so a
/// build on the host while the VMs run cannot change what they test.
fn snapshot(found: &[(String, PathBuf)]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let bin = cmd::root().join("target/vmtest/bin");
    let _ = fs::remove_dir_all(&bin);
    fs::create_dir_all(bin.join("deps"))?;
    let profile_dir = cmd::root().join("target/debug");
    // Without their debug info (200 MB → 40 MB each): the guest reads them over 9p, and
    // every test starts them many times. Symbols stay, so backtraces still name functions.
    for binary in ["vcnpath", "vcnpath-cni"] {
        cmd::run(
            Command::new("objcopy")
                .arg("--strip-debug")
                .arg(profile_dir.join(binary))
                .arg(bin.join(binary)),
        )
        .with_context(|| format!("copying target/debug/{binary} without its debug info"))?;
    }
    found
        .iter()
        .map(|(name, exe)| {
            let copy = bin
                .join("deps")
                .join(exe.file_name().context("executable name")?);
            fs::copy(exe, &copy).with_context(|| format!("copying {}", exe.display()))?;
            Ok((name.clone(), copy))
        })
        .collect()
}

/// Whether the VM of `kernel` died in a kernel panic; if so its console is copied aside
/// (the next run replaces the run directory) and the copy returned. Under TCG emulation a
/// kernel patching its own text while the other vCPU runs it was seen to trip on its own
/// breakpoint (an `int3` Oops in `__netif_receive_skb_core`, no test's doing): such a run is
/// repeated once, and said so; a second panic stands.
fn kernel_panicked(base: &Path, kernel: &kernel::Kernel) -> anyhow::Result<Option<PathBuf>> {
    let out = base.join("run").join(kernel.release.label);
    let console = fs::read_to_string(out.join("console.log")).unwrap_or_default();
    if !console.contains("Kernel panic") {
        return Ok(None);
    }
    let kept = base
        .join("run")
        .join(format!("{}-panic-console.log", kernel.release.label));
    fs::write(&kept, console)?;
    Ok(Some(kept))
}

fn run_one(
    base: &Path,
    accel: &Accel,
    kernel: &kernel::Kernel,
    busybox: &Path,
    tiers: &[&Tier],
    executables: &[(String, PathBuf)],
) -> anyhow::Result<Vec<Outcome>> {
    let out = base.join("run").join(kernel.release.label);
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;
    let initramfs = initramfs::build(&out, kernel, busybox)?;
    let script = out.join("tiers.sh");
    fs::write(&script, tier_script(&out, accel, tiers, executables))?;
    let limit = TIER_LIMIT * u32::try_from(tiers.len()).unwrap_or(1) + Duration::from_mins(2);
    eprintln!(
        "vmtest: booting {} ({}) with 2 vCPUs",
        kernel.release.label, kernel.version
    );
    qemu::boot(accel, kernel, &initramfs, &out, &script, limit)?;
    let results = fs::read_to_string(out.join("results")).with_context(|| {
        format!(
            "the {} VM wrote no results; console in {}",
            kernel.version,
            out.join("console.log").display()
        )
    })?;
    let uname = fs::read_to_string(out.join("uname")).unwrap_or_default();
    if uname.trim() != kernel.version {
        bail!(
            "the VM ran kernel {:?}, not {}",
            uname.trim(),
            kernel.version
        );
    }
    let mut outcomes: Vec<Outcome> = Vec::new();
    for line in results.lines() {
        let mut fields = line.splitn(5, ' ');
        let (Some(tier), Some(target), Some(exit), Some(secs)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let test = fields.next().filter(|t| *t != "-");
        let exit: i32 = exit.parse().unwrap_or(-1);
        let secs: u64 = secs.parse().unwrap_or(0);
        if let Some(o) = outcomes.iter_mut().find(|o| o.target == target) {
            o.secs += secs;
            if o.exit == 0 {
                o.exit = exit;
            }
            o.times.extend(test.map(|t| (t.to_owned(), secs)));
            continue;
        }
        let tier = tiers
            .iter()
            .find(|t| t.name == tier)
            .map_or("?", |t| t.name);
        let log = fs::read_to_string(out.join(format!("{target}.log"))).unwrap_or_default();
        let (passed, failed, skipped) = parse_log(&log);
        outcomes.push(Outcome {
            tier,
            target: target.to_owned(),
            exit,
            secs,
            passed,
            failed,
            skipped,
            times: test.map(|t| (t.to_owned(), secs)).into_iter().collect(),
        });
    }
    Ok(outcomes)
}

/// The script the VM runs: each target (or each test) with a line in `results`, its output
/// appended to the target's log. The agent's binaries are read once first, so the first
/// test does not wait for them to come over 9p.
fn tier_script(
    out: &Path,
    accel: &Accel,
    tiers: &[&Tier],
    executables: &[(String, PathBuf)],
) -> String {
    let out = out.display();
    let root = cmd::root();
    let mut s = format!(
        "#!/bin/sh\n\
         export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root RUST_BACKTRACE=1\n\
         export {scale_env}={scale}\n\
         cd {root}\n\
         uname -r > {out}/uname\n\
         : > {out}/results\n\
         cat {bin}/vcnpath {bin}/vcnpath-cni > /dev/null\n\
         # The static keys the tests would turn on and off (ingress/egress on the first and\n\
         # last clsact, timestamps on the first and last timestamping socket) stay on for the\n\
         # run, so the kernel does not patch its receive path while the other vCPU runs it.\n\
         tc qdisc add dev lo clsact 2>/dev/null\n\
         command -v python3 >/dev/null && python3 -c 'import socket, time; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.setsockopt(socket.SOL_SOCKET, socket.SO_TIMESTAMP, 1); time.sleep(1e9)' &\n\
         t() {{ tier=$1; target=$2; test=$3; limit=$4; shift 4; echo \"vmtest: $tier $target $test: running\"; s=$(date +%s)\n\
         timeout -k 10 $limit \"$@\" >> {out}/$target.log 2>&1; rc=$?; e=$(date +%s)\n\
         echo \"$tier $target $rc $((e - s)) $test\" >> {out}/results; echo \"vmtest: $tier $target $test: exit $rc after $((e - s)) s\"; }}\n",
        root = root.display(),
        bin = root.join("target/vmtest/bin").display(),
        scale_env = TIME_SCALE_ENV,
        scale = accel.time_scale(),
    );
    for tier in tiers {
        for target in tier.targets {
            let exe = executables
                .iter()
                .find(|(n, _)| n == target)
                .map(|(_, p)| p.display().to_string())
                .unwrap_or_default();
            if tier.one_by_one {
                let mut skip = String::new();
                for test in tier.host_only {
                    let _ = write!(skip, " --skip {test}");
                }
                let _ = writeln!(
                    s,
                    "for n in $({exe} --list --format terse --exact{skip} | sed -n 's/: test$//p'); do \
                     t {tier} {target} \"$n\" {limit} {exe} --exact \"$n\" --test-threads=1; done",
                    tier = tier.name,
                    limit = TEST_LIMIT.as_secs(),
                );
            } else {
                let _ = writeln!(
                    s,
                    "t {} {target} - {} {exe} --test-threads=2",
                    tier.name,
                    TIER_LIMIT.as_secs()
                );
            }
        }
    }
    s.push_str("sync\n");
    s
}

/// Passed count, failed test names and skip reasons from a libtest log.
fn parse_log(log: &str) -> (u32, Vec<String>, Vec<String>) {
    let mut passed = 0;
    let mut failed = Vec::new();
    let mut skipped = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += rest
                .split(';')
                .find_map(|p| p.trim().strip_suffix(" passed"))
                .and_then(|p| p.rsplit(' ').next())
                .and_then(|n| n.parse::<u32>().ok())
                .unwrap_or(0);
        } else if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|l| l.strip_suffix(" ... FAILED"))
        {
            failed.push(name.to_owned());
        } else if let Some(reason) = line.strip_prefix("skipping ") {
            skipped.push(reason.to_owned());
        }
    }
    (passed, failed, skipped)
}

/// The kernel × tier table, and whether every cell passed.
fn table(tiers: &[&Tier], host: Option<&str>, rows: &[Row]) -> (String, bool) {
    let mut ok = true;
    let mut t = String::from("\nkernel × tier\n");
    let _ = writeln!(t, "{:<28} {:<8} result", "kernel", "tier");
    if let Some(host) = host {
        for tier in tiers {
            let _ = writeln!(t, "{host:<28} {:<8} passed (host tiers above)", tier.name);
        }
    }
    for row in rows {
        let (kernel, outcomes) = (&row.kernel, &row.outcomes);
        if let Some(error) = &row.error {
            ok = false;
            let _ = writeln!(t, "{kernel:<28} {:<8} FAILED: {error}", "all");
            continue;
        }
        for tier in tiers {
            if !row.ran.contains(&tier.name) {
                let _ = writeln!(
                    t,
                    "{kernel:<28} {:<8} not run here by cargo xtask test (README, Kernels)",
                    tier.name
                );
                continue;
            }
            let mine: Vec<&Outcome> = outcomes.iter().filter(|o| o.tier == tier.name).collect();
            let cell = cell(tier, &mine);
            if cell.starts_with("FAILED") {
                ok = false;
            }
            let _ = writeln!(t, "{kernel:<28} {:<8} {cell}", tier.name);
        }
    }
    for Row {
        kernel, outcomes, ..
    } in rows
    {
        let mut times: Vec<(String, u64)> = outcomes
            .iter()
            .flat_map(|o| {
                o.times
                    .iter()
                    .map(|(n, s)| (format!("{}::{n}", o.target), *s))
            })
            .collect();
        if times.is_empty() {
            continue;
        }
        times.sort_by_key(|(_, s)| std::cmp::Reverse(*s));
        let _ = writeln!(t, "slowest tests on {kernel}:");
        for (name, secs) in times.iter().take(SLOWEST_SHOWN) {
            let _ = writeln!(t, "  {secs:>5} s  {name}");
        }
    }
    (t, ok)
}

fn cell(tier: &Tier, outcomes: &[&Outcome]) -> String {
    let ran: Vec<&str> = outcomes.iter().map(|o| o.target.as_str()).collect();
    let missing: Vec<&str> = tier
        .targets
        .iter()
        .copied()
        .filter(|t| !ran.contains(t))
        .collect();
    let passed: u32 = outcomes.iter().map(|o| o.passed).sum();
    let secs: u64 = outcomes.iter().map(|o| o.secs).sum();
    let failed: Vec<String> = outcomes
        .iter()
        .flat_map(|o| {
            if o.exit != 0 && o.failed.is_empty() {
                vec![format!("{} (exit {})", o.target, o.exit)]
            } else {
                o.failed
                    .iter()
                    .map(|f| format!("{}::{f}", o.target))
                    .collect()
            }
        })
        .collect();
    let skipped: Vec<&String> = outcomes.iter().flat_map(|o| &o.skipped).collect();
    if !failed.is_empty() || !missing.is_empty() {
        let mut all = failed;
        all.extend(missing.iter().map(|m| format!("{m} (did not run)")));
        return format!("FAILED: {} ({passed} passed, {secs} s)", all.join(", "));
    }
    let mut s = format!("passed ({passed} tests, {secs} s)");
    if !skipped.is_empty() {
        let reasons: Vec<&str> = skipped.iter().map(|s| s.as_str()).collect();
        let _ = write!(s, "; {} skipped: {}", skipped.len(), reasons.join("; "));
    }
    s
}
