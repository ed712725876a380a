//! vcnpath's TC programs. This file holds only the maps and the entry points; each
//! concern lives in its own module and the entry points return the verdict of the work
//! they delegate, after counting its reason in `stats`.
#![no_std]
#![no_main]
#![expect(
    clippy::inline_always,
    reason = "every helper is inlined on purpose: BPF-to-BPF calls limit stack and pointer passing, and the verifier tracks packet bounds best within one function"
)]

mod antispoof;
mod csum;
mod decision;
mod egress;
mod hostsock;
mod icmp;
mod ingress;
mod maps;
mod nat;
mod parse;
mod redirect;

use aya_ebpf::{macros::classifier, programs::TcContext};

#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the signature #[classifier] requires"
)]
pub fn vcnpath_egress(ctx: TcContext) -> i32 {
    let decision = match egress::run(&ctx) {
        Ok(decision) | Err(decision) => decision,
    };
    maps::count(decision.reason);
    decision.action
}

#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the signature #[classifier] requires"
)]
pub fn vcnpath_ingress(ctx: TcContext) -> i32 {
    let decision = match ingress::run(&ctx) {
        Ok(decision) | Err(decision) => decision,
    };
    maps::count(decision.reason);
    decision.action
}

/// TC ingress of a pod's host-side veth: drops what the pod sends with an address not its own.
#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the signature #[classifier] requires"
)]
pub fn vcnpath_pod(ctx: TcContext) -> i32 {
    let decision = match antispoof::run(&ctx) {
        Ok(decision) | Err(decision) => decision,
    };
    maps::count(decision.reason);
    decision.action
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // verifier: no panic can be reached in a loaded program; this only satisfies no_std.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
