//! `cargo xtask build-ebpf`: builds the eBPF object on its own, into target/bpf, with the
//! flags aya-build uses (the agent's build script builds its own copy the same way).

use std::process::Command;

use crate::cmd;

/// A cargo command for the eBPF crate with the nightly toolchain and BPF flags.
pub fn cargo(subcommand: &str) -> Command {
    let mut c = Command::new("cargo");
    c.args([
        "+nightly",
        subcommand,
        "-p",
        "vcnpath-ebpf",
        "--target",
        "bpfel-unknown-none",
    ])
    .args([
        "-Z",
        "build-std=core",
        "--release",
        "--target-dir",
        "target/bpf",
    ])
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
    )
    .env_remove("RUSTC")
    .env_remove("RUSTC_WORKSPACE_WRAPPER")
    .env_remove("RUSTUP_TOOLCHAIN")
    .env_remove("CARGO");
    c
}

pub fn run(clippy: bool) -> anyhow::Result<()> {
    cmd::run(&mut cargo("build"))?;
    if clippy {
        cmd::run(cargo("clippy").args(["--", "-D", "warnings"]))?;
    }
    eprintln!(
        "eBPF object: {}",
        cmd::root()
            .join("target/bpf/bpfel-unknown-none/release/vcnpath-ebpf")
            .display()
    );
    Ok(())
}
