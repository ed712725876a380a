//! The host's own flows from the masquerade address on ports of the NAT range.
//!
//! The NAT table is the one owner of that port space. A host socket bound in the range,
//! or `nf_nat`'s MASQUERADE (Docker, kube-proxy) picking a port there, could otherwise take
//! the tuple of a pod's flow, and its replies would be translated to the pod. So the
//! host's packets from the masquerade address on a port of the range are recorded at TC
//! egress (after netfilter) under their reply key: a pod flow created later picks another
//! port, and replies pass to the host untranslated. Ports outside the range need no
//! record: pod flows only ever take ports inside it.

use aya_ebpf::programs::TcContext;
use vcnpath_common::{Config, Reason};

use crate::{
    decision::Decision,
    nat,
    parse::{self, Header, ICMP_ECHO_REQUEST, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP},
};

/// A packet the host sends from the masquerade address: passed untouched (rule 5), and
/// recorded when its port is one of the NAT range. A packet whose headers cannot be
/// judged records nothing.
#[inline(always)]
pub fn egress(ctx: &TcContext, config: &Config, hdr: &Header) -> Decision {
    let Some(ip) = hdr.bounded(ctx) else {
        return Decision::pass(Reason::PassBadLength);
    };
    if ip.later_fragment {
        return Decision::pass(Reason::PassNotEndpoint);
    }
    let Ok(l4) = parse::l4_head(ctx, &ip) else {
        return Decision::pass(Reason::PassNotEndpoint);
    };
    let (local, remote, seen) = match ip.proto {
        IPPROTO_TCP => {
            let Ok(flags) = parse::tcp_flags(ctx, &ip) else {
                return Decision::pass(Reason::PassNotEndpoint);
            };
            (
                u16::from_be_bytes(l4.port_or_id(ip.proto)),
                u16::from_be_bytes(l4.dport()),
                nat::tcp_seen(flags),
            )
        }
        IPPROTO_UDP => (
            u16::from_be_bytes(l4.port_or_id(ip.proto)),
            u16::from_be_bytes(l4.dport()),
            0,
        ),
        IPPROTO_ICMP if l4.icmp_type() == ICMP_ECHO_REQUEST => {
            (u16::from_be_bytes(l4.port_or_id(ip.proto)), 0, 0)
        }
        _ => return Decision::pass(Reason::PassNotEndpoint),
    };
    if !nat::in_range(config, local) {
        return Decision::pass(Reason::PassNotEndpoint);
    }
    let reply = nat::ingress_key(ip.proto, ip.dst, ip.src, remote, local);
    Decision::pass(nat::claim_for_host(&reply, seen))
}
