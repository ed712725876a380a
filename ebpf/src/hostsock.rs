//! Rule 5's second half: a translated flow never takes a 4-tuple that one of the host's
//! own sockets uses (the masquerade address is the host's address too). The kernel's
//! socket tables are asked directly before a port is claimed.

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
    },
    helpers::{bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::TcContext,
};

use crate::parse::{IPPROTO_TCP, IPPROTO_UDP};

/// `TCP_LISTEN` of the kernel's `enum tcp_state` (`bpf_sock.state`).
const TCP_LISTEN: u32 = 10;

/// Whether a host socket would receive a packet `remote:rport → local:port` (an
/// established or listening TCP socket, or a bound UDP socket).
#[inline(always)]
pub fn in_use(
    ctx: &TcContext,
    proto: u8,
    remote: [u8; 4],
    rport: u16,
    local: [u8; 4],
    port: u16,
) -> bool {
    lookup(ctx, proto, remote, rport, local, port).is_some()
}

/// Whether a TCP connection of the host's own (not a listener: a handshake in progress,
/// an established or closing socket) holds `remote:rport → local:port`.
#[inline(always)]
pub fn tcp_connected(
    ctx: &TcContext,
    remote: [u8; 4],
    rport: u16,
    local: [u8; 4],
    port: u16,
) -> bool {
    lookup(ctx, IPPROTO_TCP, remote, rport, local, port).is_some_and(|state| state != TCP_LISTEN)
}

/// The state (`bpf_sock.state`) of the host socket that would receive the packet, if any.
#[inline(always)]
fn lookup(
    ctx: &TcContext,
    proto: u8,
    remote: [u8; 4],
    rport: u16,
    local: [u8; 4],
    port: u16,
) -> Option<u32> {
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
            ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                saddr: u32::from_ne_bytes(remote),
                daddr: u32::from_ne_bytes(local),
                sport: rport.to_be(),
                dport: port.to_be(),
            },
        },
    };
    let size = core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32;
    // The kernel takes BPF_F_CURRENT_NETNS (-1) as an all-ones u64.
    let netns = u64::from_ne_bytes(i64::from(BPF_F_CURRENT_NETNS).to_ne_bytes());
    let skb = ctx.skb.skb.cast();
    // SAFETY: the tuple lives on the stack for the call; a found socket is released below.
    let sk = unsafe {
        match proto {
            IPPROTO_TCP => bpf_skc_lookup_tcp(skb, &raw mut tuple, size, netns, 0),
            IPPROTO_UDP => bpf_sk_lookup_udp(skb, &raw mut tuple, size, netns, 0),
            _ => return None,
        }
    };
    if sk.is_null() {
        return None;
    }
    // SAFETY: `sk` is a referenced socket returned by the lookup above: its common fields
    // (`state` among them) may be read until it is released.
    let state = unsafe { (*sk).state };
    // SAFETY: as above; released exactly once.
    unsafe { bpf_sk_release(sk.cast()) };
    Some(state)
}
