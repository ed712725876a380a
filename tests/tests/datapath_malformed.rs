//! Rule 6 through `BPF_PROG_TEST_RUN`: a packet whose lengths lie is never rewritten. A
//! pod's packet is dropped (its headers cannot say whether it needs translation, and
//! passing it could leak the pod address past the VCN); anything else passes unmodified.
//! Each class is counted under its own reason. Also the checksum corner the rewrite must
//! get right: a UDP checksum that computes to 0 is sent as 0xffff.

use std::net::Ipv4Addr;

use vcnpath_common::Reason;
use vcnpath_tests::{
    datapath_fixture::*,
    packet::{ETH_HLEN, L4, Spec, assert_checksums, build, ones_sum, view},
    privileged::have_root,
};

macro_rules! root_or_skip {
    ($name:literal) => {
        if !have_root($name) {
            return;
        }
    };
}

fn ip(frame: &[u8]) -> &[u8] {
    &frame[ETH_HLEN..]
}

/// Sets the IPv4 total length of `frame` and fixes the header checksum, so only the
/// length is wrong.
fn with_total_length(mut frame: Vec<u8>, total: u16) -> Vec<u8> {
    frame[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&total.to_be_bytes());
    fix_ip_csum(&mut frame);
    frame
}

fn fix_ip_csum(frame: &mut [u8]) {
    let ihl = usize::from(frame[ETH_HLEN] & 0xf) * 4;
    frame[ETH_HLEN + 10..ETH_HLEN + 12].fill(0);
    let c = !ones_sum(&frame[ETH_HLEN..ETH_HLEN + ihl], 0);
    frame[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&c.to_be_bytes());
}

fn total_length(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[ETH_HLEN + 2], frame[ETH_HLEN + 3]])
}

/// Sets the TCP data offset (in 32-bit words) of a frame without IP options.
fn with_tcp_offset(mut frame: Vec<u8>, words: u8) -> Vec<u8> {
    frame[ETH_HLEN + 20 + 12] = words << 4;
    frame
}

/// One malformed class: its pod packet (egress, needs translation), its reply-shaped
/// packet (ingress, to the masquerade address) and the reasons each is counted under.
struct Class {
    what: &'static str,
    pod: Vec<u8>,
    reply: Vec<u8>,
    drop: Reason,
    pass: Reason,
}

fn classes() -> Vec<Class> {
    let out_tcp = build(&Spec::tcp(POD0, 40000, REMOTE, 443));
    let back_tcp = build(&Spec::tcp(REMOTE, 443, MASQ, 40000));
    let out_udp = build(&Spec::udp(POD0, 5000, REMOTE, 53));
    let back_udp = build(&Spec::udp(REMOTE, 53, MASQ, 5000));
    let mut opts_out = Spec::tcp(POD0, 40001, REMOTE, 443);
    opts_out.options = vec![1, 1, 1, 1, 0x44, 8, 5, 0];
    let mut opts_back = Spec::tcp(REMOTE, 443, MASQ, 40001);
    opts_back.options.clone_from(&opts_out.options);
    let longer = |f: &Vec<u8>| with_total_length(f.clone(), total_length(f) + 10);
    vec![
        Class {
            what: "total length beyond the frame",
            pod: longer(&out_tcp),
            reply: longer(&back_tcp),
            drop: Reason::DropBadLength,
            pass: Reason::PassBadLength,
        },
        Class {
            what: "IP options beyond the total length",
            pod: with_total_length(build(&opts_out), 24),
            reply: with_total_length(build(&opts_back), 24),
            drop: Reason::DropBadLength,
            pass: Reason::PassBadLength,
        },
        Class {
            what: "UDP header beyond the total length",
            pod: with_total_length(out_udp, 20 + 4),
            reply: with_total_length(back_udp, 20 + 4),
            drop: Reason::DropMalformed,
            pass: Reason::PassMalformed,
        },
        Class {
            what: "TCP header beyond the total length",
            pod: with_total_length(out_tcp.clone(), 20 + 12),
            reply: with_total_length(back_tcp.clone(), 20 + 12),
            drop: Reason::DropMalformed,
            pass: Reason::PassMalformed,
        },
        Class {
            what: "TCP data offset below 5",
            pod: with_tcp_offset(out_tcp.clone(), 4),
            reply: with_tcp_offset(back_tcp.clone(), 4),
            drop: Reason::DropBadTcpOffset,
            pass: Reason::PassBadTcpOffset,
        },
        Class {
            what: "TCP data offset beyond the total length",
            pod: with_tcp_offset(out_tcp, 15),
            reply: with_tcp_offset(back_tcp, 15),
            drop: Reason::DropBadTcpOffset,
            pass: Reason::PassBadTcpOffset,
        },
    ]
}

#[test]
fn malformed_pod_packets_are_dropped_untouched_and_counted_by_class() {
    root_or_skip!("malformed_egress");
    let mut wrong = vec![];
    for class in classes() {
        let fx = Fixture::new("malout", 1024, 65535);
        let (verdict, out) = fx.egress(&class.pod);
        let c = fx.counters();
        let created = fx.datapath.maps.nat.keys().next().is_some();
        if (verdict, &out) != (TC_ACT_SHOT, &class.pod) || c.get(class.drop) != 1 || created {
            wrong.push(format!(
                "{}: verdict {verdict}, rewritten {}, NAT entry created {created}, {} {}, {} {}",
                class.what,
                out != class.pod,
                class.drop.name(),
                c.get(class.drop),
                Reason::SnatNew.name(),
                c.get(Reason::SnatNew),
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "a pod packet with lying headers must be dropped, never rewritten, counted by its class:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn malformed_replies_and_host_packets_pass_untouched_and_counted_by_class() {
    root_or_skip!("malformed_ingress");
    let mut wrong = vec![];
    for class in classes() {
        let fx = Fixture::new("malin", 1024, 65535);
        // The flow exists, so a well-formed reply would be translated.
        let port = view(&class.reply).dport;
        let sport = view(&class.reply).sport;
        let good = if view(&class.reply).proto == 17 {
            build(&Spec::udp(POD0, port, REMOTE, sport))
        } else {
            build(&Spec::tcp(POD0, port, REMOTE, sport))
        };
        fx.egress(&good);
        let (verdict, out) = fx.ingress(&class.reply);
        let c = fx.counters();
        if (verdict, &out) != (TC_ACT_OK, &class.reply) || c.get(class.pass) != 1 {
            wrong.push(format!(
                "{}: verdict {verdict}, rewritten {}, {} {}, {} {}",
                class.what,
                out != class.reply,
                class.pass.name(),
                c.get(class.pass),
                Reason::ReverseNat.name(),
                c.get(Reason::ReverseNat),
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "a reply with lying headers must pass unmodified, counted by its class:\n{}",
        wrong.join("\n")
    );
    // The host's own packet with a lying total length is not ours either.
    let fx = Fixture::new("malhost", 1024, 65535);
    let host = build(&Spec::tcp(MASQ, 22, REMOTE, 50000));
    let host = with_total_length(host.clone(), total_length(&host) + 10);
    assert_eq!(fx.egress(&host), (TC_ACT_OK, host));
    assert_eq!(fx.count(Reason::PassBadLength), 1);
}

#[test]
fn link_layer_padding_after_the_total_length_is_fine() {
    root_or_skip!("padding");
    let fx = Fixture::new("pad", 1024, 65535);
    // A short frame padded to the Ethernet minimum: the total length is below the frame.
    let mut spec = Spec::udp(POD0, 5000, REMOTE, 53);
    spec.l4 = L4::Udp {
        sport: 5000,
        dport: 53,
        payload: vec![],
        zero_csum: false,
    };
    let mut input = build(&spec);
    input.resize(60, 0);
    let (verdict, out) = fx.egress(&input);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(view(&out).src, MASQ, "a padded frame is translated");
    assert_checksums(ip(&out));
    assert_eq!(&out[out.len() - 10..], &[0; 10], "the padding is untouched");
}

/// A UDP packet POD0:5353 → REMOTE:53 whose checksum, once the source is MASQ, computes
/// to 0 (two payload bytes chosen to make the sum 0xffff).
fn udp_summing_to_zero_after_masquerade() -> Vec<u8> {
    let payload_for = |first: [u8; 2]| {
        let mut p = first.to_vec();
        p.extend_from_slice(b"dns?");
        p
    };
    let as_sent = |src: Ipv4Addr, payload: Vec<u8>| {
        let mut spec = Spec::udp(src, 5353, REMOTE, 53);
        spec.l4 = L4::Udp {
            sport: 5353,
            dport: 53,
            payload,
            zero_csum: true,
        };
        build(&spec)
    };
    let probe = as_sent(MASQ, payload_for([0, 0]));
    let l4 = &ip(&probe)[20..];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&MASQ.octets());
    pseudo.extend_from_slice(&REMOTE.octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&u16::try_from(l4.len()).unwrap().to_be_bytes());
    let sum = ones_sum(l4, u32::from(ones_sum(&pseudo, 0)));
    let mut spec = Spec::udp(POD0, 5353, REMOTE, 53);
    spec.l4 = L4::Udp {
        sport: 5353,
        dport: 53,
        payload: payload_for((!sum).to_be_bytes()),
        zero_csum: false,
    };
    build(&spec)
}

#[test]
fn a_udp_checksum_that_computes_to_zero_is_sent_as_ffff() {
    root_or_skip!("udp_csum_zero");
    let fx = Fixture::new("csum0", 1024, 65535);
    let input = udp_summing_to_zero_after_masquerade();
    let (verdict, out) = fx.egress(&input);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!((view(&out).src, view(&out).sport), (MASQ, 5353));
    let l4 = &ip(&out)[20..];
    assert_eq!(
        &l4[6..8],
        &[0xff, 0xff],
        "a computed 0 must be sent as 0xffff: 0 would mean \"no checksum\""
    );
    assert_checksums(ip(&out));

    // Negative control: the checker notices a single flipped payload byte.
    let mut broken = out.clone();
    let last = broken.len() - 1;
    broken[last] ^= 0x01;
    let caught = std::panic::catch_unwind(|| assert_checksums(ip(&broken)));
    assert!(
        caught.is_err(),
        "the checksum checker must reject a flipped byte"
    );
}
