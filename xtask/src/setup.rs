//! `cargo xtask setup`: installs what TOOLCHAIN.md lists, idempotently. Every step checks
//! first, so a second run is a fast no-op.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::cmd::{self, output};

/// Debian packages: LLVM 22 for bpf-linker, and the tools the tests and benchmarks drive.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "bpftool",
    "iproute2",
    "iptables",
    "nftables",
    "ethtool",
    "tcpdump",
    "iperf3",
    "iputils-ping",
    "util-linux",
    // The VM tier: qemu, and modprobe/depmod for the guest kernels' modules.
    "qemu-system-x86",
    "kmod",
    "xz-utils",
    "zstd",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_MAJOR: &str = "22";

pub fn run() -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("cargo xtask setup installs system packages and mounts bpffs: run it as root");
    }
    apt_packages()?;
    nightly()?;
    bpf_linker()?;
    bpffs()?;
    python_venv()?;
    crate::runtime::fetch()?;
    crate::runtime::stubs()?;
    eprintln!("setup: everything is in place");
    Ok(())
}

fn installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn apt_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    cmd::run(
        Command::new("apt-get")
            .args(["update", "-qq"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn nightly() -> anyhow::Result<()> {
    let version = output(Command::new("rustc").args(["+nightly", "-vV"])).context(
        "no nightly toolchain: `rustup toolchain install nightly` (the eBPF build needs it)",
    )?;
    let llvm = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .unwrap_or("?");
    if !llvm.starts_with(&format!("{LLVM_MAJOR}.")) {
        bail!(
            "the nightly toolchain uses LLVM {llvm}, but bpf-linker is built against LLVM {LLVM_MAJOR}; \
             install a dated nightly whose `rustc +nightly -vV` says LLVM {LLVM_MAJOR}"
        );
    }
    let components =
        output(Command::new("rustup").args(["+nightly", "component", "list", "--installed"]))
            .unwrap_or_default();
    if !components.lines().any(|c| c.starts_with("rust-src")) {
        cmd::run(Command::new("rustup").args(["+nightly", "component", "add", "rust-src"]))?;
    }
    Ok(())
}

fn bpf_linker() -> anyhow::Result<()> {
    let current = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if current.contains(BPF_LINKER_VERSION) {
        return Ok(());
    }
    let llvm_prefix = format!("/usr/lib/llvm-{LLVM_MAJOR}");
    let path = format!(
        "{llvm_prefix}/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    cmd::run(
        Command::new("cargo")
            .args([
                "+nightly",
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{LLVM_MAJOR}"),
            ])
            .env("LLVM_PREFIX", &llvm_prefix)
            .env("PATH", path)
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO"),
    )
}

fn bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return Ok(());
    }
    cmd::run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

/// The official OCI Python SDK and CLI, used as oracles by the OCI tests.
fn python_venv() -> anyhow::Result<()> {
    let root = cmd::root();
    let requirements = root.join("tests/python/requirements.txt");
    if !requirements.exists() {
        return Ok(());
    }
    let venv = root.join("target/oci-venv");
    let stamp = venv.join(".requirements");
    let wanted = std::fs::read_to_string(&requirements)?;
    if std::fs::read_to_string(&stamp).is_ok_and(|have| have == wanted) {
        return Ok(());
    }
    if !Path::new(&venv.join("bin/python")).exists() {
        cmd::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    cmd::run(
        // `python -m pip`: the `pip` script's shebang names the venv's path at creation.
        Command::new(venv.join("bin/python"))
            .args(["-m", "pip", "install", "-q", "-r"])
            .arg(&requirements),
    )?;
    std::fs::write(stamp, wanted)?;
    Ok(())
}
