//! Builds the eBPF object from `ebpf/` with the nightly toolchain and bpf-linker (both
//! installed by `cargo xtask setup`) and leaves it in `OUT_DIR`, where
//! `datapath::object` embeds it. The object is rebuilt whenever `ebpf/` or `common/`
//! change, so the agent can never embed a stale or missing program.
fn main() {
    println!("cargo:rerun-if-changed=../common/src");
    if let Err(error) = aya_build::build_ebpf(
        [aya_build::Package {
            name: "vcnpath-ebpf",
            root_dir: "../ebpf",
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    ) {
        panic!(
            "building the eBPF programs failed: {error:#}\n\
             (they need the nightly toolchain with rust-src and bpf-linker; run `cargo xtask setup`)"
        );
    }
}
