//! Every read and write of the skb: its bytes, by bounds-checked direct packet access
//! (pulling paged headers into the linear area when needed), and the fields of its
//! metadata the programs use. What the bytes mean is `parse`'s business; keeping the
//! checksums right when they change is `csum`'s.

use aya_ebpf::programs::TcContext;
use vcnpath_common::{
    Reason,
    wire::{ETH_DST, ETH_SRC},
};

use crate::decision::{Decision, Step};

/// A write into the packet that did not fit: the packet is dropped rather than sent half
/// rewritten.
pub const REWRITE_FAILED: Decision = Decision::drop(Reason::DropRewrite);

/// The length of the whole frame (linear and paged parts).
#[inline(always)]
pub fn len(ctx: &TcContext) -> usize {
    ctx.len() as usize
}

/// Copies a `T` out of the packet at `off`, pulling non-linear data into the linear
/// area first when the skb is long enough but its headers are paged.
#[inline(always)]
pub fn load<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    if let Some(value) = read::<T>(ctx, off) {
        return Some(value);
    }
    let want = off + core::mem::size_of::<T>();
    if len(ctx) < want || ctx.pull_data(want as u32).is_err() {
        return None;
    }
    // verifier: pull_data invalidated every packet pointer; read() re-derives them.
    read::<T>(ctx, off)
}

#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    // SAFETY: bounds checked against data_end just above. The read is typed (not
    // `read_unaligned`) so the compiler emits word loads instead of byte loads; packet
    // data is only 2-byte aligned, which BPF on x86 (and every architecture with
    // efficient unaligned access) permits: the verifier enforces strict alignment only
    // where the hardware needs it.
    Some(unsafe { core::ptr::read((start + off) as *const T) })
}

/// Writes `value` into the packet with direct packet access (no helper call: the
/// verifier's TC prologue already made the head writable). Pointers are re-derived on
/// every call because the checksum helpers invalidate them.
#[inline(always)]
pub fn store<T: Copy>(ctx: &TcContext, off: usize, value: &T) -> Step<()> {
    let start = ctx.data();
    if start + off + core::mem::size_of::<T>() > ctx.data_end() {
        return Err(REWRITE_FAILED);
    }
    // SAFETY: bounds checked against data_end just above.
    unsafe { core::ptr::write_unaligned((start + off) as *mut T, *value) };
    Ok(())
}

/// Rewrites the Ethernet destination and source addresses.
#[inline(always)]
pub fn store_macs(ctx: &TcContext, dst: &[u8; 6], src: &[u8; 6]) -> Step<()> {
    store(ctx, ETH_DST, dst)?;
    store(ctx, ETH_SRC, src)
}

/// Whether the skb carries an offloaded VLAN tag (`skb->vlan_present`).
#[inline(always)]
pub fn vlan_tagged(ctx: &TcContext) -> bool {
    // SAFETY: the context pointer is valid for the whole program run.
    unsafe { (*ctx.skb.skb).vlan_present != 0 }
}

/// Ingress interface index of the skb (for egress programs: the device it leaves).
#[inline(always)]
pub fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the context pointer is valid for the whole program run.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// The skb's mark.
#[inline(always)]
pub fn mark(ctx: &TcContext) -> u32 {
    // SAFETY: the context pointer is valid for the whole program run.
    unsafe { (*ctx.skb.skb).mark }
}

/// Sets the skb's mark.
#[inline(always)]
pub fn set_mark(ctx: &TcContext, mark: u32) {
    ctx.set_mark(mark);
}
