//! `cargo xtask test` (every tier) and `cargo xtask bench`.

use std::process::Command;

use crate::{build_ebpf, cmd, setup, vmtest};

pub fn run() -> anyhow::Result<()> {
    let root = cmd::is_root();
    if root {
        setup::run()?;
    } else {
        eprintln!(
            "xtask test: not root, so setup is skipped and privileged tests will print why they skip"
        );
    }

    // Lints: formatting, clippy on the host crates, clippy on the eBPF crate.
    cmd::run(Command::new("cargo").args(["fmt", "--all", "--check"]))?;
    cmd::run(Command::new("cargo").args([
        "clippy",
        "--workspace",
        "--exclude",
        "vcnpath-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    cmd::run(build_ebpf::cargo("clippy").args(["--", "-D", "warnings"]))?;

    // The privileged tests run the real binaries (`vcnpath`, `vcnpath-cni`).
    cmd::run(Command::new("cargo").args(["build", "-p", "vcnpath-agent", "--bins"]))?;

    // Tier 1 and 2: unit tests and BPF_PROG_TEST_RUN packet tests (parallel-safe).
    let lab_tests = lab_test_targets()?;
    let mut unit = Command::new("cargo");
    unit.args([
        "test",
        "--workspace",
        "--exclude",
        "vcnpath-ebpf",
        "--lib",
        "--bins",
    ]);
    for target in other_test_targets()? {
        unit.args(["--test", &target]);
    }
    cmd::run(&mut unit)?;

    // Tier 3: namespace tests with real traffic, one at a time (they share CPU and timing).
    if !lab_tests.is_empty() {
        let figures = cmd::root().join("target/fault-suite");
        let _ = std::fs::remove_dir_all(&figures);
        let mut lab = Command::new("cargo");
        lab.args(["test", "-p", "vcnpath-tests"]);
        for target in &lab_tests {
            lab.args(["--test", target]);
        }
        lab.args(["--", "--test-threads=1"]);
        cmd::run(&mut lab)?;
        print_figures(&figures);
    }

    // Tier 4: the packet and lab tiers again, in VMs booting the kernels OCI nodes run.
    if !root {
        eprintln!(
            "xtask test: the VM tier needs root (qemu, bpffs, namespaces in the guest): skipped"
        );
    } else if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!(
            "xtask test: no /dev/kvm on this machine, so the VM tier (5.10, 6.1, 6.12) is skipped"
        );
    } else {
        vmtest::run(
            &vmtest::select("all")?,
            "all",
            vmtest::Matrix::Test,
            Some(&host_kernel()),
        )?;
    }
    Ok(())
}

/// The fault suite's figures (`tests/tests/lab_faults.rs` writes one line per case).
fn print_figures(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    files.sort();
    for file in files {
        if let Ok(text) = std::fs::read_to_string(&file) {
            eprint!("{text}");
        }
    }
}

/// `uname -r` of the machine the host tiers ran on.
fn host_kernel() -> String {
    let release = cmd::output(Command::new("uname").arg("-r")).unwrap_or_default();
    format!("host ({})", release.trim())
}

pub fn vmtest(kernels: &[&str], tier: &str) -> anyhow::Result<()> {
    if !cmd::is_root() {
        anyhow::bail!("cargo xtask vmtest boots VMs that load BPF programs: run it as root");
    }
    setup::run()?;
    vmtest::run(kernels, tier, vmtest::Matrix::Asked, None)
}

fn test_targets() -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(cmd::root().join("tests/tests"))?
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".rs"))
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    Ok(names)
}

fn lab_test_targets() -> anyhow::Result<Vec<String>> {
    Ok(test_targets()?
        .into_iter()
        .filter(|n| n.starts_with("lab_"))
        .collect())
}

fn other_test_targets() -> anyhow::Result<Vec<String>> {
    Ok(test_targets()?
        .into_iter()
        .filter(|n| !n.starts_with("lab_"))
        .collect())
}

pub fn bench(what: &str, args: &[String]) -> anyhow::Result<()> {
    if cmd::is_root() {
        setup::run()?;
    }
    // `compare` and `control` run the real agent and CNI plugin, found next to the bench
    // binary (target/release).
    cmd::run(Command::new("cargo").args(["build", "--release", "-p", "vcnpath-agent", "--bins"]))?;
    cmd::run(
        Command::new("cargo")
            .args([
                "run",
                "--release",
                "-p",
                "vcnpath-tests",
                "--bin",
                "vcnpath-bench",
                "--",
                what,
            ])
            .args(args),
    )
}

pub fn demo() -> anyhow::Result<()> {
    setup::run()?;
    cmd::run(Command::new("cargo").args(["build", "-p", "vcnpath-agent", "--bins"]))?;
    cmd::run(Command::new("cargo").args([
        "run",
        "-q",
        "-p",
        "vcnpath-tests",
        "--bin",
        "vcnpath-demo",
    ]))
}
