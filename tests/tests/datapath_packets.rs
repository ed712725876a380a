//! Packet-level tests of the TC programs through `BPF_PROG_TEST_RUN`: crafted packets in,
//! verdicts and rewritten packets out, checksums verified independently.

use std::net::Ipv4Addr;

use vcnpath_common::{
    Direction, ENDPOINT_F_IMDS, NAT_DIR_EGRESS, NAT_F_INBOUND, NatEntry, NatKey, Reason,
    inbound_port_bit,
};
use vcnpath_tests::{
    datapath_fixture::*,
    packet::{self, ETH_HLEN, L4, Spec, assert_checksums, build, view},
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

#[test]
fn rule1_vcn_traffic_from_a_secondary_vnic_pod_is_redirected_to_its_vnic() {
    root_or_skip!("rule1_redirect");
    let fx = Fixture::new("r1", 1024, 65535);
    // POD1 is owned by eth1, but the kernel routed it out of eth0 (the test device).
    let input = build(&Spec::tcp(POD1, 40000, PEER, 80));
    let (verdict, out) = fx.egress(&input);
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "expected a redirect to the owning VNIC"
    );
    let v = view(&out);
    assert_eq!(
        (v.src, v.dst),
        (POD1, PEER),
        "VCN traffic must keep its addresses"
    );
    assert_eq!(v.src_mac, ETH1_MAC, "source MAC must be eth1's");
    assert_eq!(
        v.dst_mac, ROUTER1_MAC,
        "next hop must be eth1's virtual router"
    );
    assert_eq!(ip(&out), ip(&input), "the IP packet must be unchanged");
    assert_eq!(fx.count(Reason::RedirectOwner), 1);

    // Non-masquerade destinations follow the same rule.
    let (verdict, _) = fx.egress(&build(&Spec::udp(POD1, 5000, NONMASQ_DST, 53)));
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "a non-masquerade destination is not translated but redirected"
    );

    // On-link destination in the owner's subnet: the kernel resolves the neighbour.
    let (verdict, out) = fx.egress(&build(&Spec::tcp(POD1, 40000, ON_LINK_ETH1, 80)));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        view(&out).dst_mac,
        packet::DST_MAC,
        "on-link next hop is left to bpf_redirect_neigh"
    );
}

#[test]
fn rule1_vcn_traffic_already_on_its_vnic_passes_untouched() {
    root_or_skip!("rule1_pass");
    let fx = Fixture::new("r1p", 1024, 65535);
    let input = build(&Spec::tcp(POD0, 40000, PEER, 80));
    let (verdict, out) = fx.egress(&input);
    assert_eq!(
        (verdict, out),
        (TC_ACT_OK, input),
        "POD0 is owned by eth0: nothing to do"
    );
    assert_eq!(fx.count(Reason::PassVcn), 1);
}

#[test]
fn rule2_and_3_tcp_is_masqueraded_keeping_its_port_and_replies_come_back() {
    root_or_skip!("rule2_tcp");
    let fx = Fixture::new("r2", 1024, 65535);
    let (verdict, out) = fx.egress(&build(&Spec::tcp(POD1, 40000, REMOTE, 443)));
    assert_eq!(
        verdict, TC_ACT_OK,
        "already on the masquerade interface: pass"
    );
    let v = view(&out);
    assert_eq!(
        (v.src, v.sport, v.dst, v.dport),
        (MASQ, 40000, REMOTE, 443),
        "source NAT keeping the free port"
    );
    assert_checksums(ip(&out));
    assert_eq!(fx.count(Reason::SnatNew), 1);

    let (_, out2) = fx.egress(&build(&Spec::tcp(POD1, 40000, REMOTE, 443)));
    assert_eq!(view(&out2).src, MASQ);
    assert_eq!(
        fx.count(Reason::SnatEstablished),
        1,
        "second packet uses the established entry"
    );

    let (verdict, back) = fx.ingress(&build(&Spec::tcp(REMOTE, 443, MASQ, 40000)));
    assert_eq!(verdict, TC_ACT_OK);
    let v = view(&back);
    assert_eq!(
        (v.src, v.sport, v.dst, v.dport),
        (REMOTE, 443, POD1, 40000),
        "reply translated back to the pod"
    );
    assert_checksums(ip(&back));
    assert_eq!(fx.count(Reason::ReverseNat), 1);
}

#[test]
fn rule2_udp_with_and_without_checksum() {
    root_or_skip!("rule2_udp");
    let fx = Fixture::new("r2u", 1024, 65535);
    let (_, out) = fx.egress(&build(&Spec::udp(POD0, 5353, REMOTE, 53)));
    assert_eq!(view(&out).src, MASQ);
    assert_checksums(ip(&out));

    let mut spec = Spec::udp(POD0, 5354, REMOTE, 53);
    spec.l4 = L4::Udp {
        sport: 5354,
        dport: 53,
        payload: b"x".to_vec(),
        zero_csum: true,
    };
    let (_, out) = fx.egress(&build(&spec));
    let l4 = &ip(&out)[20..];
    assert_eq!(view(&out).src, MASQ);
    assert_eq!(
        &l4[6..8],
        &[0, 0],
        "a zero UDP checksum means none and must stay zero"
    );
    let (_, back) = fx.ingress(&build(&Spec::udp(REMOTE, 53, MASQ, 5353)));
    assert_eq!(view(&back).dst, POD0);
    assert_checksums(ip(&back));
}

#[test]
fn rule2_masqueraded_traffic_routed_out_of_another_vnic_is_redirected_to_the_masquerade_vnic() {
    root_or_skip!("rule2_redirect");
    let fx = Fixture::new("r2r", 1024, 65535);
    let mut state = state(1024, 65535);
    // Make the test device (ifindex 1) play eth1 and move the masquerade VNIC away.
    let mut config = state.config.unwrap();
    config.masq_ifindex = ETH1;
    state.config = Some(config);
    let mut fx = fx;
    fx.datapath.maps.sync(&state).unwrap();
    let (verdict, out) = fx.egress(&build(&Spec::tcp(POD0, 40001, REMOTE, 443)));
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "must leave through the masquerade interface"
    );
    assert_eq!(view(&out).src, MASQ);
    assert_eq!(view(&out).dst_mac, ROUTER1_MAC);
    assert_checksums(ip(&out));
}

#[test]
fn collisions_get_another_port_and_both_flows_stay_intact() {
    root_or_skip!("collision");
    let fx = Fixture::new("col", 1024, 65535);
    let (_, a) = fx.egress(&build(&Spec::tcp(POD0, 40000, REMOTE, 443)));
    let (_, b) = fx.egress(&build(&Spec::tcp(POD1, 40000, REMOTE, 443)));
    let (pa, pb) = (view(&a).sport, view(&b).sport);
    assert_eq!(pa, 40000, "the first flow keeps its port");
    assert_ne!(
        pb, 40000,
        "the second flow must not reuse the first one's translated tuple"
    );
    assert!(
        (1024..=65535).contains(&pb),
        "the replacement port {pb} is in the range"
    );
    assert_checksums(ip(&b));

    // Replies reach the right pod each, repeatedly.
    for _ in 0..2 {
        let (_, ra) = fx.ingress(&build(&Spec::tcp(REMOTE, 443, MASQ, pa)));
        let (_, rb) = fx.ingress(&build(&Spec::tcp(REMOTE, 443, MASQ, pb)));
        assert_eq!((view(&ra).dst, view(&ra).dport), (POD0, 40000));
        assert_eq!((view(&rb).dst, view(&rb).dport), (POD1, 40000));
        assert_checksums(ip(&rb));
    }
    // And the second flow's later packets keep their mapping.
    let (_, b2) = fx.egress(&build(&Spec::tcp(POD1, 40000, REMOTE, 443)));
    assert_eq!(view(&b2).sport, pb);
}

/// An egress NAT entry as a flow leaves it, last refreshed at boot (so the next packet
/// runs the once-a-second checks), translating `pod:port` to `MASQ:masq_port`.
fn plant_egress(fx: &mut Fixture, pod: Ipv4Addr, port: u16, masq_port: u16) {
    let key = NatKey {
        src: pod.octets(),
        dst: REMOTE.octets(),
        sport: port,
        dport: 443,
        proto: 6,
        dir: NAT_DIR_EGRESS,
        pad: [0; 2],
    };
    let entry = NatEntry {
        addr: MASQ.octets(),
        port: masq_port,
        ..NatEntry::default()
    };
    fx.datapath
        .maps
        .flow_tables()
        .nat
        .insert(key, entry, 0)
        .expect("insert");
}

#[test]
fn a_flow_whose_reply_entry_was_evicted_gets_it_back() {
    root_or_skip!("evicted_reply");
    let mut fx = Fixture::new("evict", 1024, 65535);
    // The LRU evicted the reply half of POD0:41000's flow; its egress half is left.
    plant_egress(&mut fx, POD0, 41000, 41000);
    let (verdict, out) = fx.egress(&build(&Spec::tcp(POD0, 41000, REMOTE, 443)));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!((view(&out).src, view(&out).sport), (MASQ, 41000));
    assert_eq!(
        (fx.count(Reason::SnatRepaired), fx.count(Reason::SnatNew)),
        (1, 0),
        "still the same flow, its reply entry put back and counted"
    );
    let (_, reply) = fx.ingress(&build(&Spec::tcp(REMOTE, 443, MASQ, 41000)));
    assert_eq!(
        (view(&reply).dst, view(&reply).dport),
        (POD0, 41000),
        "the reply entry is back, so replies reach the pod"
    );
}

#[test]
fn a_stale_flow_whose_port_another_flow_took_starts_over_with_its_own() {
    root_or_skip!("stale_flow");
    let mut fx = Fixture::new("stale", 1024, 65535);
    // POD1's flow holds MASQ:40000 (both halves).
    let (_, b) = fx.egress(&build(&Spec::tcp(POD1, 40000, REMOTE, 443)));
    assert_eq!(view(&b).sport, 40000);
    // POD0:50000's flow was translated to MASQ:40000 before its reply half was evicted
    // and the port given to POD1's flow: its egress half names POD1's reply entry.
    plant_egress(&mut fx, POD0, 50000, 40000);
    let (verdict, a) = fx.egress(&build(&Spec::tcp(POD0, 50000, REMOTE, 443)));
    assert_eq!(verdict, TC_ACT_OK);
    assert_ne!(
        view(&a).sport,
        40000,
        "the stale flow must not leave with the port another flow owns"
    );
    assert_eq!(
        fx.count(Reason::SnatNew),
        2,
        "the stale flow starts over as a new one"
    );
    assert_checksums(ip(&a));
    let (_, rb) = fx.ingress(&build(&Spec::tcp(REMOTE, 443, MASQ, 40000)));
    assert_eq!((view(&rb).dst, view(&rb).dport), (POD1, 40000));
    let (_, ra) = fx.ingress(&build(&Spec::tcp(REMOTE, 443, MASQ, view(&a).sport)));
    assert_eq!((view(&ra).dst, view(&ra).dport), (POD0, 50000));
}

#[test]
fn exhaustion_drops_with_a_counter_and_never_corrupts() {
    root_or_skip!("exhaustion");
    // Two ports in the range: two flows fit (their own port 40000 lies outside the range,
    // so neither keeps it), the third cannot.
    let fx = Fixture::new("exh", 2000, 2001);
    let mut ports = vec![];
    for pod in [POD0, POD1] {
        let (verdict, out) = fx.egress(&build(&Spec::tcp(pod, 40000, REMOTE, 443)));
        assert_eq!(verdict, TC_ACT_OK);
        ports.push(view(&out).sport);
    }
    ports.sort_unstable();
    assert_eq!(
        ports,
        vec![2000, 2001],
        "two flows, two distinct translated ports"
    );
    let input = build(&Spec::tcp(POD1B, 40000, REMOTE, 443));
    let (verdict, out) = fx.egress(&input);
    assert_eq!(verdict, TC_ACT_SHOT, "no port left: drop");
    assert_eq!(out, input, "a dropped packet is never rewritten");
    assert_eq!(fx.count(Reason::DropNoPort), 1);
    // The two flows are intact.
    for (pod, port) in [(POD0, ports[0]), (POD1, ports[1])] {
        let (_, back) = fx.ingress(&build(&Spec::tcp(REMOTE, 443, MASQ, port)));
        let v = view(&back);
        assert!(
            v.dport == 40000 && (v.dst == POD0 || v.dst == POD1),
            "{pod}: the reply on {port} still reaches a pod flow"
        );
    }
}

#[test]
fn icmp_echo_identifier_is_translated_both_ways() {
    root_or_skip!("icmp_echo");
    let fx = Fixture::new("echo", 1024, 65535);
    let (_, a) = fx.egress(&build(&Spec::echo(POD0, REMOTE, 8, 7077)));
    let (_, b) = fx.egress(&build(&Spec::echo(POD1, REMOTE, 8, 7077)));
    assert_eq!((view(&a).src, view(&a).sport), (MASQ, 7077));
    let id_b = view(&b).sport;
    assert_ne!(id_b, 7077, "a colliding echo id gets another identifier");
    assert_checksums(ip(&a));
    assert_checksums(ip(&b));
    let (_, ra) = fx.ingress(&build(&Spec::echo(REMOTE, MASQ, 0, 7077)));
    let (_, rb) = fx.ingress(&build(&Spec::echo(REMOTE, MASQ, 0, id_b)));
    assert_eq!((view(&ra).dst, view(&ra).sport), (POD0, 7077));
    assert_eq!(
        (view(&rb).dst, view(&rb).sport),
        (POD1, 7077),
        "the reply gets the pod's own id back"
    );
    assert_checksums(ip(&rb));
}

#[test]
fn icmp_frag_needed_quoting_a_translated_flow_is_translated_back() {
    root_or_skip!("icmp_frag_needed");
    let fx = Fixture::new("pmtu", 1024, 65535);
    // Two flows from the same port so the second is remapped: inner port must change too.
    fx.egress(&build(&Spec::tcp(POD0, 40000, REMOTE, 443)));
    let (_, sent) = fx.egress(&build(&Spec::tcp(POD1, 40000, REMOTE, 443)));
    let nat_port = view(&sent).sport;
    for quote_len in [28, 40, ip(&sent).len()] {
        let err = packet::icmp_error(ROUTER0, MASQ, 3, 4, 1400, ip(&sent), quote_len);
        let (verdict, out) = fx.ingress(&err);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(
            view(&out).dst,
            POD1,
            "outer destination is the pod (quote {quote_len} bytes)"
        );
        let icmp = &ip(&out)[20..];
        let inner = &icmp[8..];
        assert_eq!(&inner[12..16], &POD1.octets(), "quoted source is the pod");
        assert_eq!(
            u16::from_be_bytes([inner[20], inner[21]]),
            40000,
            "quoted source port is the pod's, not {nat_port}"
        );
        assert_eq!(
            u16::from_be_bytes([icmp[6], icmp[7]]),
            1400,
            "the MTU is untouched"
        );
        assert_checksums(ip(&out));
        if quote_len == ip(&sent).len() {
            // The whole quoted segment is there: its TCP checksum must be valid for the pod's tuple.
            assert_checksums(inner);
        }
    }
    assert_eq!(fx.count(Reason::IcmpErrorReverse), 3);

    // An error about a flow we never translated is the host's business.
    let stranger = packet::ipv4_bytes(&Spec::tcp(MASQ, 22, REMOTE, 50000));
    let err = packet::icmp_error(ROUTER0, MASQ, 3, 4, 1400, &stranger, 28);
    let (verdict, out) = fx.ingress(&err);
    assert_eq!((verdict, out), (TC_ACT_OK, err));
}

#[test]
fn icmp_time_exceeded_for_udp_and_echo_flows() {
    root_or_skip!("icmp_time_exceeded");
    let fx = Fixture::new("ttl", 1024, 65535);
    let (_, udp) = fx.egress(&build(&Spec::udp(POD1, 33434, REMOTE, 33435)));
    let err = packet::icmp_error(ROUTER0, MASQ, 11, 0, 0, ip(&udp), ip(&udp).len());
    let (_, out) = fx.ingress(&err);
    assert_eq!(view(&out).dst, POD1);
    assert_checksums(ip(&out));
    assert_checksums(&ip(&out)[28..]);

    let (_, echo) = fx.egress(&build(&Spec::echo(POD1, REMOTE, 8, 9)));
    let err = packet::icmp_error(ROUTER0, MASQ, 11, 0, 0, ip(&echo), ip(&echo).len());
    let (_, out) = fx.ingress(&err);
    assert_eq!(view(&out).dst, POD1);
    assert_checksums(ip(&out));
    assert_checksums(&ip(&out)[28..]);
}

#[test]
fn rule4_flows_from_outside_to_a_pod_are_answered_from_the_pod_address() {
    root_or_skip!("rule4");
    let fx = Fixture::new("r4", 1024, 65535);
    let syn = Spec::tcp(REMOTE, 50000, POD1, 8080).with_tcp_flags(0x02);
    let (verdict, out) = fx.ingress(&build(&syn));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(view(&out).dst, POD1, "inbound packets are never translated");
    let (verdict, reply) = fx.egress(&build(
        &Spec::tcp(POD1, 8080, REMOTE, 50000).with_tcp_flags(0x12),
    ));
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "the answer leaves through the pod's own VNIC"
    );
    let v = view(&reply);
    assert_eq!(
        (v.src, v.sport),
        (POD1, 8080),
        "the answer is not masqueraded"
    );
    assert_eq!(v.src_mac, ETH1_MAC);
    assert_eq!(fx.count(Reason::SnatNew), 0);
}

/// A SYN from a pod opens a connection of its own, so it is masqueraded even on the tuple
/// of a flow opened from outside (the egress program does not look `inbound` up for it),
/// while the pod's SYN-ACK and data on that flow still leave with the pod's address.
#[test]
fn a_pods_syn_opens_its_own_flow_even_on_an_inbound_records_tuple() {
    root_or_skip!("rule4-syn");
    let fx = Fixture::new("r4syn", 1024, 65535);
    let inbound = Spec::tcp(REMOTE, 50000, POD1, 8080).with_tcp_flags(0x02);
    let (verdict, _) = fx.ingress(&build(&inbound));
    assert_eq!(verdict, TC_ACT_OK);
    let (_, answer) = fx.egress(&build(
        &Spec::tcp(POD1, 8080, REMOTE, 50000).with_tcp_flags(0x12),
    ));
    assert_eq!(
        view(&answer).src,
        POD1,
        "the SYN-ACK answers the inbound flow"
    );
    let (_, own) = fx.egress(&build(
        &Spec::tcp(POD1, 8081, REMOTE, 50000).with_tcp_flags(0x02),
    ));
    assert_eq!(
        view(&own).src,
        MASQ,
        "a SYN on another tuple is the pod's own flow"
    );
    let (_, reuse) = fx.egress(&build(
        &Spec::tcp(POD1, 8080, REMOTE, 50000).with_tcp_flags(0x02),
    ));
    assert_eq!(
        view(&reuse).src,
        MASQ,
        "a SYN on the inbound tuple opens the pod's own connection: masqueraded"
    );
    assert_eq!(fx.count(Reason::SnatNew), 2);
    assert_eq!(
        fx.count(Reason::RedirectOwner),
        1,
        "the answer left through the pod's VNIC"
    );
}

/// A pod's new flow looks `inbound` up only when a host outside the VCN has reached the
/// pod on a port of the same class as the flow's source port: the record's first packet
/// marks the class (`Endpoint::inbound_ports`) before reaching the pod, and the agent's
/// syncs keep the marks, also when they rewrite the pod's entry. A flow from a port of
/// another class, or of a pod never reached, is masqueraded without the lookup, even on
/// the tuple of a record (planted here: no program writes one without marking it).
#[test]
fn only_ports_reached_from_outside_look_their_answers_up_in_inbound() {
    root_or_skip!("inbound-mark");
    let mut fx = Fixture::new("r4mark", 1024, 65535);
    let marks = |fx: &Fixture, pod| {
        fx.datapath.maps.pod_endpoints().expect("endpoints")[&pod].inbound_ports
    };
    assert_eq!(
        marks(&fx, POD1),
        0,
        "no host outside has reached the pod yet"
    );
    let syn = Spec::tcp(REMOTE, 50000, POD1, 8080).with_tcp_flags(0x02);
    assert_eq!(fx.ingress(&build(&syn)).0, TC_ACT_OK);
    assert_eq!(
        marks(&fx, POD1),
        inbound_port_bit(8080),
        "the record's SYN marks its port's class"
    );
    let answer = |fx: &Fixture| {
        let (_, out) = fx.egress(&build(&Spec::tcp(POD1, 8080, REMOTE, 50000)));
        view(&out).src
    };
    assert_eq!(
        answer(&fx),
        POD1,
        "the pod's answer on the inbound flow keeps its address"
    );

    // Records on tuples whose ports no packet from outside marked.
    let other = (8081..9000)
        .find(|p| inbound_port_bit(*p) != inbound_port_bit(8080))
        .expect("a port");
    let mut plant = |pod: Ipv4Addr, port| {
        let record = NatEntry {
            last_seen_ns: vcnpath::datapath::monotonic_now_ns(),
            addr: pod.octets(),
            port,
            flags: NAT_F_INBOUND,
            ..NatEntry::default()
        };
        fx.datapath
            .maps
            .flow_tables()
            .inbound
            .insert(tcp_key(NAT_DIR_EGRESS, pod, port, REMOTE, 50001), record, 0)
            .expect("plant a record");
    };
    plant(POD0, 8080);
    plant(POD1, other);
    for (pod, port, why) in [
        (POD0, 8080, "a pod no host outside reached"),
        (POD1, other, "a port of a class no host outside reached"),
    ] {
        let (_, own) = fx.egress(&build(&Spec::tcp(pod, port, REMOTE, 50001)));
        assert_eq!(view(&own).src, MASQ, "{why} does not look `inbound` up");
    }
    assert_eq!(
        (fx.count(Reason::RedirectOwner), fx.count(Reason::SnatNew)),
        (1, 2),
        "the answer left through its pod's VNIC, the other flows masqueraded"
    );

    let mut st = state(1024, 65535);
    let report = fx.datapath.maps.sync(&st).expect("sync");
    assert!(
        report.unchanged(),
        "the marks are not a difference: {report:?}"
    );
    st.endpoints.get_mut(&POD1).expect("POD1").flags ^= ENDPOINT_F_IMDS;
    let report = fx.datapath.maps.sync(&st).expect("sync");
    assert_eq!(report.written, 1, "the pod's entry is rewritten");
    assert_eq!(
        marks(&fx, POD1),
        u16::MAX,
        "a rewrite marks every class (a mark set meanwhile is not lost)"
    );
    assert_eq!(answer(&fx), POD1, "and the answer still keeps its address");
}

/// Issue 11 (3): flows opened from outside are recorded in their own table, and only by
/// what opens one. A flood of 20,000 spoofed SYNs from as many sources, against a NAT
/// table of 4,096 entries holding 200 established masqueraded flows, must leave each of
/// those flows working both ways. Before, the records shared the NAT table's LRU and
/// evicted them.
#[test]
fn an_inbound_syn_flood_leaves_established_masqueraded_flows_working() {
    root_or_skip!("inbound_flood");
    let fx = Fixture::with_nat_capacity("flood", 1024, 65535, 4096);
    let flows: Vec<(u16, u16)> = (0..200)
        .map(|n| {
            let port = 20000 + n;
            let (_, out) = fx.egress(&build(&Spec::tcp(POD0, port, REMOTE, 443)));
            let translated = view(&out).sport;
            fx.ingress(&build(&Spec::tcp(REMOTE, 443, MASQ, translated)));
            (port, translated)
        })
        .collect();
    assert_eq!(fx.count(Reason::SnatNew), 200);
    for n in 0..20_000_u32 {
        let [_, _, hi, lo] = n.to_be_bytes();
        let spoofed = Ipv4Addr::new(198, 18, hi, lo);
        let syn = Spec::tcp(spoofed, 40000, POD1, 8080).with_tcp_flags(0x02);
        fx.ingress(&build(&syn));
    }
    assert_eq!(
        fx.count(Reason::InboundNew),
        20_000,
        "each SYN recorded its flow"
    );
    let mut broken = Vec::new();
    for (port, translated) in &flows {
        // The remote speaks first (a download): its segment must find the flow.
        let (_, back) = fx.ingress(&build(&Spec::tcp(REMOTE, 443, MASQ, *translated)));
        let (_, out) = fx.egress(&build(&Spec::tcp(POD0, *port, REMOTE, 443)));
        let (out, back) = (view(&out), view(&back));
        if (out.src, out.sport, back.dst, back.dport) != (MASQ, *translated, POD0, *port) {
            broken.push(format!(
                "{port}: out {}:{}, back {}:{}",
                out.src, out.sport, back.dst, back.dport
            ));
        }
    }
    assert!(
        broken.is_empty(),
        "{} of 200 established flows broken by the flood: {broken:?}",
        broken.len()
    );
    assert_eq!(fx.count(Reason::SnatNew), 200, "no flow had to start over");
}

/// A TCP segment from outside without SYN (a spoofed ACK flood, a stray segment of a
/// flow long gone) reaches the pod untouched but records no flow.
#[test]
fn an_outside_segment_without_syn_records_no_flow() {
    root_or_skip!("inbound_ack");
    let mut fx = Fixture::new("inack", 1024, 65535);
    let input = build(&Spec::tcp(REMOTE, 50001, POD1, 8080));
    assert_eq!(
        fx.ingress(&input),
        (TC_ACT_OK, input.clone()),
        "passed untouched"
    );
    assert_eq!(fx.count(Reason::PassInboundUnrecorded), 1);
    assert_eq!(fx.datapath.maps.flows().count(), 0, "an ACK opens no flow");
    fx.ingress(&build(
        &Spec::tcp(REMOTE, 50001, POD1, 8080).with_tcp_flags(0x02),
    ));
    let tables = fx.datapath.maps.flow_tables();
    assert_eq!(tables.inbound.keys().count(), 1, "a SYN does");
    assert_eq!(fx.count(Reason::InboundNew), 1);
    fx.ingress(&build(&Spec::tcp(REMOTE, 50001, POD1, 8080)));
    assert_eq!(
        fx.count(Reason::PassInboundToPod),
        1,
        "the next segment is on the flow"
    );
    assert_eq!(
        fx.datapath.maps.flow_tables().nat.keys().count(),
        0,
        "in its own table"
    );
}

#[test]
fn rule5_non_endpoint_and_host_traffic_pass_untouched() {
    root_or_skip!("rule5");
    let fx = Fixture::new("r5", 1024, 65535);
    for src in [Ipv4Addr::new(172, 16, 0, 5), MASQ, ETH1_IP] {
        let input = build(&Spec::tcp(src, 40000, REMOTE, 443));
        let (verdict, out) = fx.egress(&input);
        assert_eq!(
            (verdict, &out),
            (TC_ACT_OK, &input),
            "traffic from {src} must pass untouched"
        );
    }
    // A host reply to the masquerade address without a NAT entry is the host's.
    let input = build(&Spec::tcp(REMOTE, 443, MASQ, 22));
    assert_eq!(fx.ingress(&input), (TC_ACT_OK, input));
    assert_eq!(fx.count(Reason::PassNotEndpoint), 2);
    assert_eq!(
        fx.count(Reason::PassHostFlow),
        1,
        "the masquerade address's port 40000 lies in the NAT range: recorded as the host's"
    );
    assert_eq!(fx.count(Reason::PassHost), 1);
}

#[test]
fn ip_options_are_honoured() {
    root_or_skip!("ip_options");
    let fx = Fixture::new("opt", 1024, 65535);
    let mut spec = Spec::tcp(POD0, 41000, REMOTE, 443);
    spec.options = vec![1, 1, 1, 1, 0x44, 8, 5, 0]; // NOPs + a timestamp option: IHL 7
    let input = build(&spec);
    let (verdict, out) = fx.egress(&input);
    assert_eq!(verdict, TC_ACT_OK);
    let v = view(&out);
    assert_eq!(v.ihl, 28);
    assert_eq!(
        (v.src, v.sport, v.dport),
        (MASQ, 41000, 443),
        "ports read after the options"
    );
    assert_eq!(&ip(&out)[20..28], &spec.options[..], "options preserved");
    assert_checksums(ip(&out));
    let mut back = Spec::tcp(REMOTE, 443, MASQ, 41000);
    back.options = spec.options.clone();
    let (_, out) = fx.ingress(&build(&back));
    assert_eq!((view(&out).dst, view(&out).dport), (POD0, 41000));
    assert_checksums(ip(&out));
}

/// A UDP datagram of `len` payload bytes from `src` to `dst`, cut into MTU-1500
/// fragments with identification `id`.
fn fragmented_udp(
    (src, sport): (Ipv4Addr, u16),
    (dst, dport): (Ipv4Addr, u16),
    len: usize,
    id: u16,
) -> Vec<Vec<u8>> {
    let mut spec = Spec::udp(src, sport, dst, dport);
    spec.l4 = L4::Udp {
        sport,
        dport,
        payload: (0..len).map(|n| (n % 251) as u8).collect(),
        zero_csum: false,
    };
    packet::fragment(&packet::ipv4_bytes(&spec), 1480, id)
}

/// Runs each fragment through `program`, expecting `verdict` for each; the IP packets out.
fn through(
    program: impl Fn(&[u8]) -> (u32, Vec<u8>),
    fragments: &[Vec<u8>],
    verdict: u32,
) -> Vec<Vec<u8>> {
    fragments
        .iter()
        .enumerate()
        .map(|(n, f)| {
            let (got, out) = program(&packet::frame(f));
            assert_eq!(got, verdict, "fragment {n}: verdict");
            let ip = ip(&out).to_vec();
            let ihl = usize::from(ip[0] & 0xf) * 4;
            assert_eq!(
                packet::ones_sum(&ip[..ihl], 0),
                0xffff,
                "fragment {n}: IP checksum"
            );
            ip
        })
        .collect()
}

/// Issue 11 (6): a datagram larger than the MTU leaves a pod in fragments (large DNS and
/// EDNS answers, `WireGuard` or `IPsec` over UDP). Every fragment must leave with the
/// masquerade address and the reassembled datagram carry the translated port and a valid
/// UDP checksum; the fragmented reply must reach the pod whole. Before, every fragment
/// after the first was dropped on the way out and passed untranslated on the way in.
#[test]
fn fragmented_udp_leaves_masqueraded_whole_and_its_fragmented_reply_reaches_the_pod() {
    root_or_skip!("fragments");
    let fx = Fixture::new("frag", 1024, 65535);
    let out = fragmented_udp((POD0, 5000), (REMOTE, 53), 3000, 0x4242);
    assert_eq!(out.len(), 3, "three fragments at MTU 1500");
    let sent = through(|f| fx.egress(f), &out, TC_ACT_OK);
    for (n, f) in sent.iter().enumerate() {
        assert_eq!(
            &f[12..16],
            &MASQ.octets(),
            "fragment {n} leaves with the masquerade address"
        );
    }
    let datagram = packet::reassemble(&sent);
    let v = view(&packet::frame(&datagram));
    assert_eq!(
        (v.src, v.dst, v.dport),
        (MASQ, REMOTE, 53),
        "the far end sees the node"
    );
    assert_checksums(&datagram);
    assert_eq!(fx.count(Reason::SnatNew), 1);
    assert_eq!(fx.count(Reason::SnatFragment), 2);
    assert_eq!(fx.count(Reason::DropFragment), 0);

    let back = fragmented_udp((REMOTE, 53), (MASQ, v.sport), 4000, 0x5151);
    let received = through(|f| fx.ingress(f), &back, TC_ACT_OK);
    for (n, f) in received.iter().enumerate() {
        assert_eq!(
            &f[16..20],
            &POD0.octets(),
            "reply fragment {n} goes to the pod"
        );
    }
    let reply = packet::reassemble(&received);
    let v = view(&packet::frame(&reply));
    assert_eq!(
        (v.src, v.dst, v.dport),
        (REMOTE, POD0, 5000),
        "the pod gets its reply"
    );
    assert_checksums(&reply);
    assert_eq!(fx.count(Reason::ReverseNatFragment), 2);

    // A later fragment whose first fragment was never seen cannot be told apart from
    // another datagram: dropped on the way out (it would leak the pod address), the
    // host's on the way in; neither is rewritten.
    let orphan = &fragmented_udp((POD0, 5000), (REMOTE, 53), 3000, 0x4343)[1];
    let input = packet::frame(orphan);
    assert_eq!(
        fx.egress(&input),
        (TC_ACT_SHOT, input.clone()),
        "orphan dropped, untouched"
    );
    assert_eq!(fx.count(Reason::DropFragment), 1);
    let orphan = &fragmented_udp((REMOTE, 53), (MASQ, 5000), 3000, 0x5252)[1];
    let input = packet::frame(orphan);
    assert_eq!(
        fx.ingress(&input),
        (TC_ACT_OK, input.clone()),
        "passed, unmodified"
    );
    assert_eq!(fx.count(Reason::PassFragment), 1);

    // Inside the VCN fragments need no L4: they are handled by address alone.
    let inside = fragmented_udp((POD1, 5000), (PEER, 53), 3000, 0x4444);
    for f in through(|f| fx.egress(f), &inside[1..], TC_ACT_REDIRECT) {
        assert_eq!(
            &f[12..16],
            &POD1.octets(),
            "VCN traffic keeps the pod address"
        );
    }
}

/// The pod's fragmented answer on a flow opened from outside (rule 4) leaves
/// untranslated, every fragment through the pod's own VNIC.
#[test]
fn a_fragmented_answer_on_an_inbound_flow_leaves_untranslated_through_the_pods_vnic() {
    root_or_skip!("fragments_inbound");
    let fx = Fixture::new("fragin", 1024, 65535);
    let (verdict, _) = fx.ingress(&build(&Spec::udp(REMOTE, 40000, POD1, 53)));
    assert_eq!(verdict, TC_ACT_OK);
    let answer = fragmented_udp((POD1, 53), (REMOTE, 40000), 3000, 0x6161);
    let sent = through(|f| fx.egress(f), &answer, TC_ACT_REDIRECT);
    let datagram = packet::reassemble(&sent);
    let v = view(&packet::frame(&datagram));
    assert_eq!(
        (v.src, v.sport),
        (POD1, 53),
        "the answer is not masqueraded"
    );
    assert_checksums(&datagram);
    assert_eq!(
        fx.count(Reason::SnatNew) + fx.count(Reason::SnatFragment),
        0
    );
    assert_eq!(fx.count(Reason::DropFragment), 0);
}

#[test]
fn truncated_headers_at_every_offset_are_never_rewritten() {
    root_or_skip!("truncated");
    let fx = Fixture::new("trunc", 1024, 65535);
    // BPF_PROG_TEST_RUN itself refuses IPv4 frames shorter than 34 bytes (it pulls a
    // 20-byte IP header), so cuts inside the header are made in a packet whose header is
    // 60 bytes long (IHL 15): every offset from 34 to the end of the TCP header.
    let mut spec = Spec::tcp(POD0, 42000, REMOTE, 443);
    spec.options = vec![1; 40];
    let full = build(&spec);
    for len in ETH_HLEN + 20..ETH_HLEN + 60 + 20 {
        let input = full[..len].to_vec();
        let (verdict, out) = fx.egress(&input);
        assert!(
            verdict == TC_ACT_OK || verdict == TC_ACT_SHOT,
            "cut at {len}: verdict {verdict}"
        );
        assert_eq!(
            out, input,
            "cut at {len}: a truncated packet must never be rewritten"
        );
    }
    // Replies to the masquerade address cut short are passed, unmodified.
    let mut reply = Spec::tcp(REMOTE, 443, MASQ, 42000);
    reply.options = vec![1; 40];
    let full_reply = build(&reply);
    for len in ETH_HLEN + 20..ETH_HLEN + 60 + 20 {
        let input = full_reply[..len].to_vec();
        let (verdict, out) = fx.ingress(&input);
        assert_eq!((verdict, &out), (TC_ACT_OK, &input), "ingress cut at {len}");
    }
    // A cut packet is shorter than its IP total length says: that class of malformed.
    let c = fx.counters();
    assert_eq!(
        c.get(Reason::DropBadLength),
        60,
        "every cut pod packet is dropped as malformed: {c}"
    );
    assert_eq!(
        c.get(Reason::PassBadLength),
        60,
        "every cut reply is passed as malformed: {c}"
    );
    assert_eq!(
        c.get(Reason::SnatNew),
        0,
        "no mapping is created from a truncated packet"
    );

    // Truncated ICMP errors: the quoted header cut short.
    let (_, sent) = fx.egress(&build(&Spec::tcp(POD0, 42000, REMOTE, 443)));
    let err = packet::icmp_error(ROUTER0, MASQ, 3, 4, 1400, ip(&sent), 28);
    for len in ETH_HLEN + 20..err.len() {
        let input = err[..len].to_vec();
        let (verdict, out) = fx.ingress(&input);
        assert_eq!(
            (verdict, &out),
            (TC_ACT_OK, &input),
            "ICMP error cut at {len} passes unmodified"
        );
    }
}

#[test]
fn unconfigured_datapath_passes_everything() {
    root_or_skip!("unconfigured");
    let mut fx = Fixture::new("off", 1024, 65535);
    let mut state = state(1024, 65535);
    state.config = None;
    fx.datapath.maps.sync(&state).unwrap();
    let input = build(&Spec::tcp(POD1, 40000, REMOTE, 443));
    assert_eq!(fx.egress(&input), (TC_ACT_OK, input));
    assert_eq!(fx.count(Reason::PassUnconfigured), 1);
}

/// The NAT range of the port-space tests: disjoint from the host's ephemeral ports, as the
/// agent's default is.
const RANGE: (u16, u16) = (61000, 65535);

/// Issue: a pod flow kept its own port although it lay outside the NAT range (among the
/// host's ephemeral ports); a host socket connecting later from the same port to the same
/// remote had its replies translated to the pod.
#[test]
fn a_host_socket_opened_after_a_pod_flow_on_its_port_keeps_its_replies() {
    root_or_skip!("host_after_pod");
    let fx = Fixture::new("hafter", RANGE.0, RANGE.1);
    let (_, out) = fx.egress(&build(&Spec::tcp(POD1, 40000, REMOTE, 443)));
    let translated = view(&out).sport;
    assert!(
        (RANGE.0..=RANGE.1).contains(&translated),
        "a port outside the NAT range is the host's, never kept: got {translated}"
    );
    // The host's own connection from its ephemeral port 40000 to the same remote.
    let host = build(&Spec::tcp(MASQ, 40000, REMOTE, 443).with_tcp_flags(0x02));
    assert_eq!(fx.egress(&host), (TC_ACT_OK, host.clone()));
    let reply = build(&Spec::tcp(REMOTE, 443, MASQ, 40000).with_tcp_flags(0x12));
    assert_eq!(
        fx.ingress(&reply),
        (TC_ACT_OK, reply),
        "the host's reply reaches the host, untranslated"
    );
    let (_, back) = fx.ingress(&build(&Spec::tcp(REMOTE, 443, MASQ, translated)));
    assert_eq!(
        (view(&back).dst, view(&back).dport),
        (POD1, 40000),
        "and the pod's replies still reach the pod"
    );
}

/// `nf_nat`'s MASQUERADE (a Docker container, kube-proxy) may pick a port of the NAT range
/// that a pod's flow holds: the host keeps its replies, and the pod's flow moves.
#[test]
fn an_nf_nat_host_flow_on_a_pod_flows_tuple_keeps_its_replies_and_the_pod_flow_moves() {
    root_or_skip!("host_collision");
    let fx = Fixture::new("hcoll", RANGE.0, RANGE.1);
    let (_, out) = fx.egress(&build(&Spec::tcp(POD1, 61500, REMOTE, 443)));
    assert_eq!(view(&out).sport, 61500, "a free port of the range is kept");
    let host = build(&Spec::tcp(MASQ, 61500, REMOTE, 443).with_tcp_flags(0x02));
    assert_eq!(fx.egress(&host), (TC_ACT_OK, host.clone()));
    assert_eq!(
        fx.count(Reason::HostFlowCollision),
        1,
        "the collision is counted"
    );
    let reply = build(&Spec::tcp(REMOTE, 443, MASQ, 61500).with_tcp_flags(0x12));
    assert_eq!(
        fx.ingress(&reply),
        (TC_ACT_OK, reply),
        "the host's reply reaches the host, untranslated"
    );
    let (_, moved) = fx.egress(&build(&Spec::tcp(POD1, 61500, REMOTE, 443)));
    let port = view(&moved).sport;
    assert!(
        port != 61500 && (RANGE.0..=RANGE.1).contains(&port),
        "the pod's flow starts over on another port of the range: got {port}"
    );
    assert_eq!(fx.count(Reason::SnatNew), 2);
    let (_, back) = fx.ingress(&build(&Spec::tcp(REMOTE, 443, MASQ, port)));
    assert_eq!((view(&back).dst, view(&back).dport), (POD1, 61500));
    assert_eq!(
        fx.count(Reason::PassHostFlow),
        1,
        "the host's reply (its SYN counted the collision)"
    );
}

/// A host flow seen first keeps a pod's new flow (TCP, and ICMP echo ids) off its tuple,
/// although no socket of the node holds it (`nf_nat`'s mappings are not sockets).
#[test]
fn a_pod_flow_after_a_host_flow_takes_another_port_and_echo_id() {
    root_or_skip!("pod_after_host");
    let fx = Fixture::new("pafter", RANGE.0, RANGE.1);
    let host = build(&Spec::tcp(MASQ, 62000, REMOTE, 443).with_tcp_flags(0x02));
    assert_eq!(fx.egress(&host), (TC_ACT_OK, host.clone()));
    let (_, out) = fx.egress(&build(&Spec::tcp(POD1, 62000, REMOTE, 443)));
    assert_ne!(view(&out).sport, 62000, "the host's tuple is not taken");
    let ping = build(&Spec::echo(MASQ, REMOTE, 8, 62001));
    assert_eq!(fx.egress(&ping), (TC_ACT_OK, ping.clone()));
    let (_, out) = fx.egress(&build(&Spec::echo(POD1, REMOTE, 8, 62001)));
    assert_ne!(view(&out).sport, 62001, "nor the host's echo identifier");
    let echo_reply = build(&Spec::echo(REMOTE, MASQ, 0, 62001));
    assert_eq!(
        fx.ingress(&echo_reply),
        (TC_ACT_OK, echo_reply),
        "the host's echo reply is the host's"
    );
    let counters = fx.counters();
    assert_eq!(
        (
            counters.get_in(Direction::Egress, Reason::PassHostFlow),
            counters.get_in(Direction::Ingress, Reason::PassHostFlow)
        ),
        (2, 1),
        "the counters say which way: the host's SYN and echo request out, the echo reply in"
    );
}

/// A connection of the host's own on a port of the NAT range that the datapath has not
/// recorded (opened before the programs were attached, so none of its packets out was
/// seen): its segments from outside still reach it, found in the kernel's socket table. A
/// listener alone on such a port does not make a stray segment one of its connections.
#[test]
fn a_host_connection_from_before_the_datapath_keeps_its_segments_inside_the_nat_range() {
    root_or_skip!("host_socket");
    let ns = vcnpath_tests::lab::Netns::create(&format!("hsk{}", std::process::id()))
        .expect("a namespace for the host's sockets");
    ns.ip(&["link", "set", "lo", "up"]).unwrap();
    for addr in [MASQ, REMOTE] {
        ns.ip(&["addr", "add", &format!("{addr}/32"), "dev", "lo"])
            .unwrap();
    }
    vcnpath_tests::lab::run_in(&ns, || {
        let server = std::net::TcpListener::bind((REMOTE, 443)).expect("the remote's listener");
        let client = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("a socket");
        client
            .bind(&std::net::SocketAddr::from((MASQ, 61234)).into())
            .expect("bind the host's socket in the NAT range");
        client
            .connect(&std::net::SocketAddr::from((REMOTE, 443)).into())
            .expect("connect");
        let _accepted = server.accept().expect("accept");
        let _listener =
            std::net::TcpListener::bind((MASQ, 61300)).expect("a host listener in the range");

        let fx = Fixture::new("hsock", RANGE.0, RANGE.1);
        let segment = build(&Spec::tcp(REMOTE, 443, MASQ, 61234));
        assert_eq!(
            fx.ingress(&segment),
            (TC_ACT_OK, segment),
            "the host's connection keeps its segments, untranslated"
        );
        assert_eq!(fx.count(Reason::PassHostSocket), 1);
        for stray in [
            Spec::tcp(REMOTE, 443, MASQ, 61235),
            Spec::tcp(REMOTE, 443, MASQ, 61300),
            Spec::tcp(REMOTE, 444, MASQ, 61234),
        ] {
            assert_eq!(
                fx.ingress(&build(&stray)).0,
                TC_ACT_SHOT,
                "no connection of the host's holds {stray:?}"
            );
        }
        assert_eq!(fx.count(Reason::DropNoFlow), 3);
    })
    .expect("run in the namespace");
}

/// From outside the VCN, a TCP segment on a port of the NAT range that matches no flow
/// belongs to a flow gone: dropped and counted, not answered by the host with a RST. What
/// may open a flow (a TCP SYN towards a host listener, any UDP datagram: a UDP node port has
/// no socket to record), what comes from inside the VCN and what is addressed to a port
/// outside the range still pass to the host.
#[test]
fn unmatched_tcp_inside_the_nat_range_is_dropped() {
    root_or_skip!("no_flow");
    let fx = Fixture::new("noflow", RANGE.0, RANGE.1);
    for stray in [
        Spec::tcp(REMOTE, 443, MASQ, 61234),
        Spec::tcp(REMOTE, 443, MASQ, 61234).with_tcp_flags(0x04),
        Spec::tcp(REMOTE, 443, MASQ, 61234).with_tcp_flags(0x12),
    ] {
        assert_eq!(fx.ingress(&build(&stray)).0, TC_ACT_SHOT);
    }
    assert_eq!(fx.count(Reason::DropNoFlow), 3);
    for host in [
        Spec::tcp(REMOTE, 443, MASQ, 61234).with_tcp_flags(0x02),
        Spec::udp(REMOTE, 53, MASQ, 61234),
        Spec::tcp(PEER, 443, MASQ, 61234),
        Spec::udp(PEER, 53, MASQ, 61234),
        Spec::tcp(REMOTE, 443, MASQ, 22),
        Spec::udp(REMOTE, 53, MASQ, 40000),
    ] {
        let input = build(&host);
        assert_eq!(fx.ingress(&input), (TC_ACT_OK, input));
    }
    assert_eq!(fx.count(Reason::PassHost), 6);
}
