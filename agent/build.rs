//! Builds the eBPF object from `ebpf/` with the nightly toolchain and bpf-linker (both
//! installed by `cargo xtask setup`) and leaves it in `OUT_DIR`, where
//! `datapath::object` embeds it. The object is rebuilt whenever `ebpf/` or `common/`
//! change, so the agent can never embed a stale or missing program.
//!
//! The same steps as aya-build (and `cargo xtask build-ebpf`): `cargo build` of the eBPF
//! crate for `bpf{el,eb}-unknown-none` with `-Z build-std=core` and the BTF/debuginfo flags,
//! in a target directory of its own. Done here rather than by aya-build because aya-build
//! forwards every line of the inner cargo's progress as a `warning:`; this forwards only
//! the compiler's diagnostics and says in one line that the programs were built.

use std::{env, path::PathBuf, process::Command, time::Instant};

const PACKAGE: &str = "vcnpath-ebpf";
/// The toolchain for the eBPF crate (a nightly whose LLVM matches bpf-linker's), e.g. a
/// dated `nightly-2026-05-20` where the plain `nightly` is a different LLVM.
const TOOLCHAIN_ENV: &str = "VCNPATH_EBPF_TOOLCHAIN";

fn main() {
    println!("cargo:rerun-if-changed=../ebpf");
    println!("cargo:rerun-if-changed=../common/src");
    println!("cargo:rerun-if-env-changed={TOOLCHAIN_ENV}");
    let toolchain = env::var(TOOLCHAIN_ENV).unwrap_or_else(|_| "nightly".to_owned());
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("cargo sets CARGO_CFG_TARGET_ARCH");
    let target = if env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() == Ok("big") {
        "bpfeb-unknown-none"
    } else {
        "bpfel-unknown-none"
    };
    // Apart from the outer build's target directory: cargo would wait on its own lock.
    let target_dir = out_dir.join("ebpf-target");
    let started = Instant::now();
    let output = Command::new("rustup")
        .args(["run", &toolchain, "cargo", "build", "--package", PACKAGE])
        .args(["--bins", "--release", "--target", target])
        .args([
            "-Z",
            "build-std=core",
            "--message-format=short",
            "--color=never",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
        )
        // The outer build's toolchain must not leak into the nightly one.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .output()
        .unwrap_or_else(|error| {
            panic!("cannot run `rustup run {toolchain} cargo` ({error}); run `cargo xtask setup`")
        });
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Diagnostics (warnings, errors and their context) are forwarded; cargo's right-aligned
    // status lines ("   Compiling core …", "    Finished …") are not.
    for line in stderr.lines().filter(|line| !is_progress(line)) {
        println!("cargo:warning={line}");
    }
    assert!(
        output.status.success(),
        "building the eBPF programs failed ({}); they need the nightly toolchain with rust-src and bpf-linker: run `cargo xtask setup`",
        output.status
    );
    let built = target_dir.join(target).join("release").join(PACKAGE);
    std::fs::copy(&built, out_dir.join(PACKAGE))
        .unwrap_or_else(|error| panic!("cannot copy {} into OUT_DIR: {error}", built.display()));
    println!(
        "cargo:warning=eBPF programs built in {:.1} s",
        started.elapsed().as_secs_f32()
    );
}

/// A cargo status line: a right-aligned capitalised verb and its subject.
fn is_progress(line: &str) -> bool {
    let trimmed = line.trim_start();
    line.len() > trimmed.len()
        && trimmed.split_once(' ').is_some_and(|(verb, _)| {
            verb.len() > 1
                && verb.starts_with(|c: char| c.is_ascii_uppercase())
                && verb[1..].chars().all(|c| c.is_ascii_lowercase())
        })
}
