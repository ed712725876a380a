//! vcnpath's TC programs. This file holds only the maps and the entry points; each
//! concern lives in its own module and the entry points return the verdict of the work
//! they delegate, after counting its reason in `stats`.
//!
//! The programs exist only for the BPF target (the agent's build script builds them). On the
//! host, `cargo build --workspace` compiles this crate to a small `main` that says so, so the
//! plain workspace commands work.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
#![cfg_attr(
    target_arch = "bpf",
    expect(
        clippy::inline_always,
        reason = "every helper is inlined on purpose: BPF-to-BPF calls limit stack and pointer passing, and the verifier tracks packet bounds best within one function"
    )
)]

#[cfg(target_arch = "bpf")]
mod antispoof;
#[cfg(target_arch = "bpf")]
mod csum;
#[cfg(target_arch = "bpf")]
mod decision;
#[cfg(target_arch = "bpf")]
mod egress;
#[cfg(target_arch = "bpf")]
mod frag;
#[cfg(target_arch = "bpf")]
mod helpers;
#[cfg(target_arch = "bpf")]
mod hostflow;
#[cfg(target_arch = "bpf")]
mod hostsock;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod ingress;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod packet;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod redirect;

#[cfg(target_arch = "bpf")]
use aya_ebpf::{macros::classifier, programs::TcContext};
#[cfg(target_arch = "bpf")]
use vcnpath_common::Direction;

#[cfg(target_arch = "bpf")]
#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the signature #[classifier] requires"
)]
pub fn vcnpath_egress(ctx: TcContext) -> i32 {
    // A packet redirected here from another VNIC's egress was counted there; it is still
    // judged (idempotently: it is already in its final form), only not counted again.
    let again = redirect::take_redirect_mark(&ctx);
    let decision = decide(egress::run(&ctx, again));
    if !again {
        maps::count(Direction::Egress, decision.reason);
    }
    decision.action
}

#[cfg(target_arch = "bpf")]
#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the signature #[classifier] requires"
)]
pub fn vcnpath_ingress(ctx: TcContext) -> i32 {
    finish(Direction::Ingress, ingress::run(&ctx))
}

/// TC ingress of a pod's host-side veth: drops what the pod sends with an address not its own.
#[cfg(target_arch = "bpf")]
#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the signature #[classifier] requires"
)]
pub fn vcnpath_pod(ctx: TcContext) -> i32 {
    finish(Direction::Pod, antispoof::run(&ctx))
}

/// Counts the reason of a program's decision (reached normally or by an early return) and
/// returns its TC action.
#[cfg(target_arch = "bpf")]
#[inline(always)]
fn finish(direction: Direction, result: decision::Step<decision::Decision>) -> i32 {
    let decision = decide(result);
    maps::count(direction, decision.reason);
    decision.action
}

/// The decision of a program, reached normally or by an early return.
#[cfg(target_arch = "bpf")]
#[inline(always)]
fn decide(result: decision::Step<decision::Decision>) -> decision::Decision {
    match result {
        Ok(decision) | Err(decision) => decision,
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // verifier: no panic can be reached in a loaded program; this only satisfies no_std.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

/// The host build: the programs are built for the BPF target by the agent's build script.
#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!(
        "vcnpath-ebpf holds BPF programs; the agent embeds them (cargo build -p vcnpath-agent or cargo xtask build-ebpf). Nothing runs on the host."
    );
}
