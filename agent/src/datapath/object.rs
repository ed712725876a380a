//! The eBPF object, built from `ebpf/` by the agent's build script.

/// The object file embedded at build time (see `agent/build.rs`).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vcnpath-ebpf"));
