//! Ingress on a VNIC: replies to the masquerade address go back to the pod (rule 3), and
//! flows opened from outside the VCN towards a pod address are recorded so the pod's
//! answers leave untranslated through its VNIC (rule 4).

use aya_ebpf::{bindings::BPF_NOEXIST, programs::TcContext};
use vcnpath_common::{Config, ENDPOINT_KIND_POD, NAT_DIR_INGRESS, NAT_F_INBOUND, NatEntry, Reason};

use crate::{
    csum,
    decision::{Decision, Step},
    frag, helpers, hostsock, icmp,
    maps::{self, INBOUND},
    nat::{self, NatSlot, Side},
    parse::{
        self, Header, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, IP_DST_OFF, IPPROTO_ICMP, IPPROTO_TCP,
        IPPROTO_UDP, Ipv4,
    },
};

#[inline(always)]
pub fn run(ctx: &TcContext) -> Step<Decision> {
    let Some(config) = maps::config() else {
        return Ok(Decision::pass(Reason::PassUnconfigured));
    };
    let hdr = parse::ipv4(ctx)?;
    if hdr.dst == config.masq_ip {
        let Some(ip) = hdr.bounded(ctx) else {
            // Not ours to judge: the kernel's IP input drops it. Never rewritten.
            return Ok(Decision::pass(Reason::PassBadLength));
        };
        return reverse(ctx, &config, &ip);
    }
    Ok(inbound(ctx, &hdr))
}

/// Translates a reply for a masqueraded flow back to the pod.
#[inline(always)]
fn reverse(ctx: &TcContext, config: &Config, ip: &Ipv4) -> Step<Decision> {
    if ip.later_fragment {
        return frag::ingress_later(ctx, ip);
    }
    let l4 = match parse::l4_head(ctx, ip) {
        Ok(l4) => l4,
        Err(bad) => return Ok(bad.pass()),
    };
    // `droppable`: a TCP segment that cannot open a connection (no lone SYN), so without
    // an entry it belongs to a flow that is gone, and the host would answer it with a RST.
    // UDP is not: a datagram may open a flow towards a host service (a UDP NodePort, which
    // kube-proxy serves without a socket, inside a range an operator chose wider).
    let (sport, dport, seen, droppable) = match ip.proto {
        IPPROTO_TCP => {
            let flags = match parse::tcp_flags(ctx, ip) {
                Ok(flags) => flags,
                Err(bad) => return Ok(bad.pass()),
            };
            (
                port(l4.port_or_id(ip.proto)),
                port(l4.dport()),
                nat::tcp_seen(flags),
                !nat::opens(flags),
            )
        }
        IPPROTO_UDP => (port(l4.port_or_id(ip.proto)), port(l4.dport()), 0, false),
        IPPROTO_ICMP if l4.icmp_type() == ICMP_ECHO_REPLY => {
            (0, port(l4.port_or_id(ip.proto)), 0, false)
        }
        IPPROTO_ICMP if parse::is_icmp_error(l4.icmp_type()) => {
            return icmp::ingress_error(ctx, config, ip);
        }
        _ => return Ok(Decision::pass(Reason::PassHost)),
    };
    let key = nat::ingress_key(ip.proto, ip.src, ip.dst, sport, dport);
    let Some(mut entry) = nat::lookup(&key) else {
        // The NAT range is the table's: a connection of the host's there is recorded from
        // its first packet out, so such a segment from outside belongs to no live flow, and
        // the RST the host would answer could end a flow the remote still knows.
        if droppable && nat::in_range(config, dport) && !maps::is_nonmasq(ip.src) {
            // Unless it is a connection of the host's opened before the datapath could see
            // its packets (a restart of the node's programs, a range widened): the kernel's
            // socket table knows it; it is recorded by its next packet out.
            if hostsock::tcp_connected(ctx, ip.src, sport, ip.dst, dport) {
                return Ok(Decision::pass(Reason::PassHostSocket));
            }
            return Ok(Decision::drop(Reason::DropNoFlow));
        }
        return Ok(Decision::pass(Reason::PassHost));
    };
    entry.touch(seen);
    if entry.is_host() {
        return Ok(Decision::pass(Reason::PassHostFlow));
    }
    let (pod_addr, pod_port) = (entry.addr(), entry.port());
    csum::set_port(
        ctx,
        ip.l4_off + parse::port_field(ip.proto, false),
        dport.to_be_bytes(),
        pod_port.to_be_bytes(),
        ip.proto,
        ip.l4_off,
    )?;
    csum::set_addr(ctx, IP_DST_OFF, ip.dst, pod_addr, ip.proto, ip.l4_off)?;
    frag::note_first(ctx, ip, NAT_DIR_INGRESS, pod_addr, 0);
    Ok(Decision::pass(Reason::ReverseNat))
}

/// Records a flow that a host outside the VCN opened towards a pod address.
#[inline(always)]
fn inbound(ctx: &TcContext, hdr: &Header) -> Decision {
    let Some(mut pod) = maps::endpoint_value(hdr.dst).filter(|o| o.get().kind == ENDPOINT_KIND_POD)
    else {
        return parse::pass_untouched(ctx, hdr, Reason::PassNotEndpoint);
    };
    if maps::is_nonmasq(hdr.src) {
        return parse::pass_untouched(ctx, hdr, Reason::PassVcn);
    }
    let Some(ip) = hdr.bounded(ctx) else {
        // Not ours to judge: the kernel's IP input drops it. Never recorded.
        return Decision::pass(Reason::PassBadLength);
    };
    if ip.later_fragment {
        return Decision::pass(Reason::PassFragment);
    }
    let l4 = match parse::l4_head(ctx, &ip) {
        Ok(l4) => l4,
        Err(bad) => return bad.pass(),
    };
    // The key is the one the pod's answers will carry on egress.
    let (pod_port, remote_port, seen, opens) = match ip.proto {
        IPPROTO_TCP => {
            let flags = match parse::tcp_flags(ctx, &ip) {
                Ok(flags) => flags,
                Err(bad) => return bad.pass(),
            };
            (
                port(l4.dport()),
                port(l4.port_or_id(ip.proto)),
                nat::tcp_seen(flags),
                nat::opens(flags),
            )
        }
        IPPROTO_UDP => (port(l4.dport()), port(l4.port_or_id(ip.proto)), 0, false),
        IPPROTO_ICMP if l4.icmp_type() == ICMP_ECHO_REQUEST => {
            (port(l4.port_or_id(ip.proto)), 0, 0, false)
        }
        _ => return Decision::pass(Reason::PassInboundUnrecorded),
    };
    let key = nat::egress_key(ip.proto, ip.dst, ip.src, pod_port, remote_port);
    let on_record = |record: &mut NatSlot| {
        if nat::touch_inbound(record, seen, opens, Side::Outside) {
            Reason::InboundNew
        } else {
            Reason::PassInboundToPod
        }
    };
    // The pod's answers must find a record of `inbound`: its egress looks there only for
    // the classes of ports marked so, which each record's packets mark before reaching
    // the pod.
    let reason = if let Some(mut record) = nat::inbound(&key) {
        maps::note_inbound(&mut pod, pod_port);
        on_record(&mut record)
    } else if let Some(mut entry) = nat::lookup(&key) {
        if entry.is_inbound() {
            // A record an earlier release kept in `nat`: honoured until it expires.
            on_record(&mut entry)
        } else {
            entry.touch(seen);
            Reason::PassInboundToPod
        }
    } else if ip.proto != IPPROTO_TCP || opens {
        // Only what opens a flow records one: a TCP segment without SYN (a spoofed ACK
        // flood, a stray packet of a flow long gone) passes to the pod, which answers a
        // connection it does not know with a RST, but takes no place in the table.
        let now = helpers::now_ns();
        let entry = NatEntry {
            last_seen_ns: now,
            addr: ip.dst,
            port: pod_port,
            flags: NAT_F_INBOUND,
            tcp_seen: seen,
        };
        // A failure here only means another CPU recorded it first.
        let _ = INBOUND.insert(key, entry, u64::from(BPF_NOEXIST));
        maps::note_inbound(&mut pod, pod_port);
        Reason::InboundNew
    } else {
        Reason::PassInboundUnrecorded
    };
    Decision::pass(reason)
}

#[inline(always)]
fn port(raw: [u8; 2]) -> u16 {
    u16::from_be_bytes(raw)
}
