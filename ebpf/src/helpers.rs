//! Safe wrappers for the kernel helpers and map-value pointers the programs use: the one
//! place, besides the packet accesses (`packet`) and the socket lookups (`hostsock`),
//! where `unsafe` is written. Each wrapper is inlined, so the verifier sees
//! the same calls as before.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{bpf_fib_lookup, bpf_redir_neigh},
    btf_maps::{HashMap, LruHashMap, PerCpuArray},
    helpers::{
        bpf_fib_lookup as fib_lookup_helper, bpf_get_prandom_u32, bpf_ktime_get_coarse_ns,
        bpf_ktime_get_ns, bpf_redirect, bpf_redirect_neigh,
    },
    programs::TcContext,
};

/// A value inside a map, found by a lookup in this program run.
///
/// The kernel keeps it alive until the program returns (map values are RCU-protected);
/// other CPUs and the agent may write it meanwhile, with plain loads and stores as in BPF
/// C: every reader of these maps tolerates a torn update of one entry. Not `Copy`, so
/// one lookup gives at most one writer here.
pub struct MapValue<T>(*mut T);

impl<T> MapValue<T> {
    #[inline(always)]
    pub fn get(&self) -> &T {
        // SAFETY: a non-null pointer from a map lookup in this run (see the type).
        unsafe { &*self.0 }
    }

    #[inline(always)]
    pub fn get_mut(&mut self) -> &mut T {
        // SAFETY: as in `get`; `&mut self` keeps this the only reference made from it.
        unsafe { &mut *self.0 }
    }
}

/// The value under `key` in an LRU hash map, to read and update in place.
#[inline(always)]
pub fn lru_value<K, V, const M: usize, const F: usize>(
    map: &LruHashMap<K, V, M, F>,
    key: &K,
) -> Option<MapValue<V>> {
    map.get_ptr_mut(key).map(MapValue)
}

/// A copy of the value under `key` in an LRU hash map.
#[inline(always)]
pub fn lru_copied<K, V: Copy, const M: usize, const F: usize>(
    map: &LruHashMap<K, V, M, F>,
    key: &K,
) -> Option<V> {
    lru_value(map, key).map(|value| *value.get())
}

/// The value under `key` in a hash map, to read and update in place.
#[inline(always)]
pub fn hash_value<K, V, const M: usize, const F: usize>(
    map: &HashMap<K, V, M, F>,
    key: &K,
) -> Option<MapValue<V>> {
    map.get_ptr_mut(key).map(MapValue)
}

/// A copy of the value under `key` in a hash map.
#[inline(always)]
pub fn hash_copied<K, V: Copy, const M: usize, const F: usize>(
    map: &HashMap<K, V, M, F>,
    key: &K,
) -> Option<V> {
    hash_value(map, key).map(|value| *value.get())
}

/// This CPU's slot `index` of a per-CPU array, to update in place: only this program on
/// this CPU writes it while it runs.
#[inline(always)]
pub fn per_cpu_value<V, const M: usize>(
    map: &PerCpuArray<V, M>,
    index: u32,
) -> Option<MapValue<V>> {
    map.get_ptr_mut(index).map(MapValue)
}

/// `CLOCK_MONOTONIC`, precise.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: the helper has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// 1 when the kernel has `bpf_ktime_get_coarse_ns` (set by the agent, see
/// `vcnpath_common::GLOBAL_COARSE_CLOCK`); 0 falls back to the precise clock.
#[unsafe(no_mangle)]
static VCNPATH_COARSE_CLOCK: u8 = 0;

/// Now, for expiry: the coarse clock (jiffies) is plenty for second-granularity expiry and
/// cheaper; both clocks read `CLOCK_MONOTONIC`, so entries stamped by either compare.
#[inline(always)]
pub fn coarse_now_ns() -> u64 {
    // verifier: a frozen read-only global; on a kernel without the coarse helper the
    // verifier sees the constant 0 and never checks the call it guards.
    // SAFETY: a plain read of a static; the helpers have no preconditions.
    unsafe {
        if core::ptr::read_volatile(&raw const VCNPATH_COARSE_CLOCK) != 0 {
            bpf_ktime_get_coarse_ns()
        } else {
            bpf_ktime_get_ns()
        }
    }
}

/// A pseudo-random number (not for secrets).
#[inline(always)]
pub fn prandom_u32() -> u32 {
    // SAFETY: the helper has no preconditions.
    unsafe { bpf_get_prandom_u32() }
}

/// `bpf_redirect` to the egress of `ifindex`: `TC_ACT_REDIRECT` on success.
#[inline(always)]
pub fn redirect(ifindex: u32) -> i64 {
    // SAFETY: the helper has no preconditions.
    unsafe { bpf_redirect(ifindex, 0) }
}

#[expect(clippy::cast_possible_wrap, reason = "a 20-byte struct")]
const SIZE_OF_REDIR_NEIGH: i32 = core::mem::size_of::<bpf_redir_neigh>() as i32;

/// `bpf_redirect_neigh` to the egress of `ifindex`, resolving L2 for the next hop in
/// `params`: `TC_ACT_REDIRECT` on success.
#[inline(always)]
pub fn redirect_neigh(ifindex: u32, params: &mut bpf_redir_neigh) -> i64 {
    // SAFETY: `params` lives for the duration of the call, which reads only it.
    unsafe { bpf_redirect_neigh(ifindex, params, SIZE_OF_REDIR_NEIGH, 0) }
}

/// The size the FIB helper is told its parameters have.
#[expect(
    clippy::cast_possible_wrap,
    clippy::cast_possible_truncation,
    reason = "the struct is 64 bytes"
)]
const FIB_PARAMS_LEN: i32 = core::mem::size_of::<bpf_fib_lookup>() as i32;

/// All-zero parameters for [`fib_lookup`], to fill in.
#[inline(always)]
pub fn fib_params() -> bpf_fib_lookup {
    // SAFETY: an all-zero bpf_fib_lookup is valid (plain integers and unions of them).
    unsafe { core::mem::zeroed() }
}

/// `bpf_fib_lookup` in the node's tables; the kernel's return code.
#[inline(always)]
pub fn fib_lookup(ctx: &TcContext, params: &mut bpf_fib_lookup) -> i64 {
    // SAFETY: the helper reads and writes only `params`, sized by the third argument.
    unsafe { fib_lookup_helper(ctx.as_ptr(), params, FIB_PARAMS_LEN, 0) }
}
