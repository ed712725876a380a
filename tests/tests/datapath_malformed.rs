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

/// The packets of one flow a malformed class is tried on: the pod's packet out (needs
/// translation), the reply to the masquerade address, and a packet from outside opening a
/// flow to the pod (rule 4).
struct Flow {
    out: Spec,
    back: Spec,
    inbound: Spec,
}

fn tcp_flow(port: u16) -> Flow {
    Flow {
        out: Spec::tcp(POD0, port, REMOTE, 443),
        back: Spec::tcp(REMOTE, 443, MASQ, port),
        // A SYN: only what opens a flow would record one.
        inbound: Spec::tcp(REMOTE, 443, POD0, port).with_tcp_flags(0x02),
    }
}

fn udp_flow(port: u16) -> Flow {
    Flow {
        out: Spec::udp(POD0, port, REMOTE, 53),
        back: Spec::udp(REMOTE, 53, MASQ, port),
        inbound: Spec::udp(REMOTE, 53, POD0, port),
    }
}

fn echo_flow(id: u16) -> Flow {
    Flow {
        out: Spec::echo(POD0, REMOTE, 8, id),
        back: Spec::echo(REMOTE, MASQ, 0, id),
        inbound: Spec::echo(REMOTE, POD0, 8, id),
    }
}

/// One malformed class: the flow it is tried on, how a well-formed frame is made
/// malformed, and the reasons a dropped and a passed packet are counted under.
struct Class {
    what: &'static str,
    flow: Flow,
    malform: fn(Vec<u8>) -> Vec<u8>,
    drop: Reason,
    pass: Reason,
}

impl Class {
    /// The well-formed packet of the flow from the pod, which would be translated.
    fn good_pod(&self) -> Vec<u8> {
        build(&self.flow.out)
    }
    fn pod(&self) -> Vec<u8> {
        (self.malform)(build(&self.flow.out))
    }
    fn reply(&self) -> Vec<u8> {
        (self.malform)(build(&self.flow.back))
    }
    fn inbound(&self) -> Vec<u8> {
        (self.malform)(build(&self.flow.inbound))
    }
}

fn classes() -> Vec<Class> {
    let options = vec![1, 1, 1, 1, 0x44, 8, 5, 0];
    let mut with_options = tcp_flow(40001);
    for spec in [
        &mut with_options.out,
        &mut with_options.back,
        &mut with_options.inbound,
    ] {
        spec.options.clone_from(&options);
    }
    vec![
        Class {
            what: "total length beyond the frame",
            flow: tcp_flow(40000),
            malform: |f| {
                let longer = total_length(&f) + 10;
                with_total_length(f, longer)
            },
            drop: Reason::DropBadLength,
            pass: Reason::PassBadLength,
        },
        Class {
            what: "IP options beyond the total length",
            flow: with_options,
            malform: |f| with_total_length(f, 24),
            drop: Reason::DropBadLength,
            pass: Reason::PassBadLength,
        },
        Class {
            what: "UDP header beyond the total length",
            flow: udp_flow(5000),
            malform: |f| with_total_length(f, 20 + 4),
            drop: Reason::DropMalformed,
            pass: Reason::PassMalformed,
        },
        Class {
            what: "TCP header beyond the total length",
            flow: tcp_flow(40000),
            malform: |f| with_total_length(f, 20 + 12),
            drop: Reason::DropMalformed,
            pass: Reason::PassMalformed,
        },
        Class {
            what: "ICMP echo header beyond the total length",
            flow: echo_flow(77),
            malform: |f| with_total_length(f, 20 + 4),
            drop: Reason::DropMalformed,
            pass: Reason::PassMalformed,
        },
        Class {
            what: "TCP data offset below 5",
            flow: tcp_flow(40000),
            malform: |f| with_tcp_offset(f, 4),
            drop: Reason::DropBadTcpOffset,
            pass: Reason::PassBadTcpOffset,
        },
        Class {
            what: "TCP data offset beyond the total length",
            flow: tcp_flow(40000),
            malform: |f| with_tcp_offset(f, 15),
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
        let pod = class.pod();
        let (verdict, out) = fx.egress(&pod);
        let c = fx.counters();
        let created = fx.datapath.maps.flows().next().is_some();
        if (verdict, &out) != (TC_ACT_SHOT, &pod) || c.get(class.drop) != 1 || created {
            wrong.push(format!(
                "{}: verdict {verdict}, rewritten {}, NAT entry created {created}, {} {}, {} {}",
                class.what,
                out != pod,
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

/// The established-flow fast path looks the flow up before anything else is decided: a
/// malformed packet of a flow that exists must not ride it.
#[test]
fn malformed_packets_of_an_established_flow_are_dropped_untouched() {
    root_or_skip!("malformed_established");
    let mut wrong = vec![];
    for class in classes() {
        let fx = Fixture::new("malest", 1024, 65535);
        let (verdict, _) = fx.egress(&class.good_pod());
        assert_eq!(
            (verdict, fx.count(Reason::SnatNew)),
            (TC_ACT_OK, 1),
            "{}: the well-formed packet must open the flow",
            class.what
        );
        let pod = class.pod();
        let (verdict, out) = fx.egress(&pod);
        let c = fx.counters();
        if (verdict, &out) != (TC_ACT_SHOT, &pod)
            || c.get(class.drop) != 1
            || c.get(Reason::SnatEstablished) != 0
        {
            wrong.push(format!(
                "{}: verdict {verdict}, rewritten {}, {} {}, {} {}",
                class.what,
                out != pod,
                class.drop.name(),
                c.get(class.drop),
                Reason::SnatEstablished.name(),
                c.get(Reason::SnatEstablished),
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "a malformed packet of an established flow must be dropped, never rewritten, counted by its class:\n{}",
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
        fx.egress(&class.good_pod());
        let reply = class.reply();
        let (verdict, out) = fx.ingress(&reply);
        let c = fx.counters();
        if (verdict, &out) != (TC_ACT_OK, &reply) || c.get(class.pass) != 1 {
            wrong.push(format!(
                "{}: verdict {verdict}, rewritten {}, {} {}, {} {}",
                class.what,
                out != reply,
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

/// Rule 4 records a flow opened from outside towards a pod: a malformed packet records
/// nothing (its ports cannot be trusted) and passes untouched, counted by its class.
#[test]
fn malformed_packets_from_outside_to_a_pod_pass_untouched_and_record_nothing() {
    root_or_skip!("malformed_inbound");
    let mut wrong = vec![];
    for class in classes() {
        let fx = Fixture::new("malrec", 1024, 65535);
        let inbound = class.inbound();
        let (verdict, out) = fx.ingress(&inbound);
        let c = fx.counters();
        let recorded = fx.datapath.maps.flows().next().is_some();
        if (verdict, &out) != (TC_ACT_OK, &inbound) || c.get(class.pass) != 1 || recorded {
            wrong.push(format!(
                "{}: verdict {verdict}, rewritten {}, recorded {recorded}, {} {}, {} {}",
                class.what,
                out != inbound,
                class.pass.name(),
                c.get(class.pass),
                Reason::InboundNew.name(),
                c.get(Reason::InboundNew),
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "a malformed packet from outside to a pod must pass unmodified, record no flow, be counted by its class:\n{}",
        wrong.join("\n")
    );
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
