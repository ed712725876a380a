//! Reason codes: every decision the programs take is counted in the `stats` map at the
//! index of its reason, so an operator can see why packets were passed, translated,
//! redirected or dropped.

/// One counter per decision. The discriminant is the index in the `stats` map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not IPv4 (ARP, IPv6, …): passed.
    PassNotIpv4 = 0,
    /// Source is not a pod address (the host's own traffic, forwarded traffic): passed.
    PassNotEndpoint = 1,
    /// Pod → VCN or non-masquerade destination, already on the owning VNIC: passed.
    PassVcn = 2,
    /// Pod → VCN destination routed out of the wrong VNIC: redirected to the owner.
    RedirectOwner = 3,
    /// Pod → outside: a new NAT mapping was created and the packet translated.
    SnatNew = 4,
    /// Pod → outside: translated with an existing mapping.
    SnatEstablished = 5,
    /// Reply to the masquerade address: translated back to the pod.
    ReverseNat = 6,
    /// ICMP error quoting a translated flow: translated back to the pod.
    IcmpErrorReverse = 7,
    /// ICMP error from a pod quoting a translated flow: translated to the masquerade address.
    IcmpErrorSnat = 8,
    /// A pod's packet on a flow opened from outside towards it (rule 4), or an ICMP error
    /// it sends about one: left untranslated through its VNIC.
    PassInbound = 9,
    /// No free NAT port (or ICMP identifier) for a new flow: dropped.
    DropNoPort = 10,
    /// Pod packet needing translation whose headers are truncated or invalid: dropped.
    DropMalformed = 11,
    /// Truncated or invalid packet that is not ours to translate: passed unmodified.
    PassMalformed = 12,
    /// Non-first fragment of a pod packet that would need translation, whose first
    /// fragment was not seen (or is older than `FRAG_TIMEOUT_NS`): dropped.
    DropFragment = 13,
    /// Non-first fragment for the masquerade address whose first fragment was not
    /// translated (the host's own, or arrived first): passed unmodified.
    PassFragment = 14,
    /// Pod → outside with a protocol that cannot be masqueraded (not TCP, UDP, ICMP echo): dropped.
    DropProtocol = 15,
    /// The `config` map is not set: passed untouched.
    PassUnconfigured = 16,
    /// Addressed to the masquerade address without a NAT entry (the host's own traffic): passed.
    PassHost = 17,
    /// A redirect or packet rewrite helper failed: dropped.
    DropRewrite = 18,
    /// A NAT entry could not be stored: dropped.
    DropNatFull = 19,
    /// The owning VNIC of a pod address is not in `vnics`: passed on the kernel's route.
    PassNoVnic = 20,
    /// Pod packet whose IPv4 total length disagrees with the frame (longer than it, or
    /// shorter than the IP header with its options): dropped, never rewritten.
    DropBadLength = 21,
    /// Any other packet whose IPv4 total length disagrees with the frame: passed unmodified.
    PassBadLength = 22,
    /// Pod packet whose TCP data offset is below 5 words or beyond the total length:
    /// dropped, never rewritten.
    DropBadTcpOffset = 23,
    /// Any other TCP packet with such a data offset: passed unmodified.
    PassBadTcpOffset = 24,
    /// Packet from a pod whose source address the node routes through another interface
    /// (another pod's address, the node's, or none of ours): dropped at the pod's veth.
    DropSpoofed = 25,
    /// Packet from a pod with its own address, checked at the pod's veth: passed.
    PassPodSource = 26,
    /// Packet from a pod to the instance metadata service, which the pod's namespace may not
    /// reach (`datapath.pod_imds`): dropped at the pod's veth.
    DropPodImds = 27,
    /// Non-first fragment of a pod's datagram: translated as its first fragment was.
    SnatFragment = 28,
    /// Non-first fragment of a reply to the masquerade address: translated back to the
    /// pod as its first fragment was.
    ReverseNatFragment = 29,
    /// Non-first fragment of a pod's answer on a flow opened from outside (rule 4): left
    /// untranslated through the pod's VNIC, as its first fragment.
    PassInboundFragment = 30,
    /// A packet from outside the VCN that opens a flow towards a pod address (a SYN, a UDP
    /// datagram, an ICMP echo request), recorded in `inbound` (or starting a closed
    /// record over): passed to the pod.
    InboundNew = 31,
    /// A packet from outside the VCN on a recorded flow towards a pod address: passed.
    PassInboundToPod = 32,
    /// A packet from outside the VCN towards a pod address that records no flow (a TCP
    /// segment without SYN and no record, another protocol): passed to the pod.
    PassInboundUnrecorded = 33,
    /// Pod → outside: a SYN on the tuple of a closing flow started it over, translated with
    /// its mapping.
    SnatReopened = 34,
    /// Pod → outside: translated with an existing mapping whose reply entry the LRU had
    /// evicted and which was put back.
    SnatRepaired = 35,
    /// The host's own packet from the masquerade address on a port of the NAT range, or a
    /// reply to one: recorded in `nat` (`NAT_F_HOST`) so no pod flow takes its tuple, and
    /// passed untouched.
    PassHostFlow = 36,
    /// The host opened a flow on the translated tuple of a pod's flow (`nf_nat` or a socket
    /// bound in the NAT range): the host keeps the tuple, the pod's flow starts over on
    /// another port with its next packet.
    HostFlowCollision = 37,
    /// A TCP segment from outside the VCN to the masquerade address on a port of the NAT
    /// range, matching no flow (of a flow long gone): dropped rather than answered by the
    /// host with a RST. A SYN is not dropped (a host listener may take it), nor is UDP.
    DropNoFlow = 38,
    /// Such a segment (no flow recorded) that a connected socket of the host's own holds:
    /// one opened before the datapath recorded it (its first packet out since is recorded
    /// in `nat`). Passed to it.
    PassHostSocket = 39,
}

/// Number of reason codes.
pub const REASON_COUNT: u32 = 40;

/// Which program counted a packet: the `stats` map holds one counter per direction and
/// reason, so a reason both programs count (`passed-malformed`, `passed-host-flow`, …)
/// says which way the packets went.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// TC egress of a VNIC: packets leaving the node.
    Egress = 0,
    /// TC ingress of a VNIC: packets arriving at the node.
    Ingress = 1,
    /// TC ingress of a pod's host-side veth: packets a pod sends.
    Pod = 2,
}

/// Number of directions.
pub const DIRECTION_COUNT: u32 = 3;

/// Size of the `stats` map.
pub const STATS_ENTRIES: u32 = REASON_COUNT * DIRECTION_COUNT;

impl Direction {
    /// Every direction, in index order.
    pub const ALL: [Direction; DIRECTION_COUNT as usize] =
        [Direction::Egress, Direction::Ingress, Direction::Pod];

    /// The name operators see in `vcnpath counters` and the metrics' `direction` label.
    pub const fn name(self) -> &'static str {
        match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
            Direction::Pod => "pod",
        }
    }
}

/// The index in `stats` of the counter of `reason` in `direction`.
pub const fn stats_index(direction: Direction, reason: Reason) -> u32 {
    direction as u32 * REASON_COUNT + reason as u32
}

impl Reason {
    /// Every reason, in index order.
    pub const ALL: [Reason; REASON_COUNT as usize] = [
        Reason::PassNotIpv4,
        Reason::PassNotEndpoint,
        Reason::PassVcn,
        Reason::RedirectOwner,
        Reason::SnatNew,
        Reason::SnatEstablished,
        Reason::ReverseNat,
        Reason::IcmpErrorReverse,
        Reason::IcmpErrorSnat,
        Reason::PassInbound,
        Reason::DropNoPort,
        Reason::DropMalformed,
        Reason::PassMalformed,
        Reason::DropFragment,
        Reason::PassFragment,
        Reason::DropProtocol,
        Reason::PassUnconfigured,
        Reason::PassHost,
        Reason::DropRewrite,
        Reason::DropNatFull,
        Reason::PassNoVnic,
        Reason::DropBadLength,
        Reason::PassBadLength,
        Reason::DropBadTcpOffset,
        Reason::PassBadTcpOffset,
        Reason::DropSpoofed,
        Reason::PassPodSource,
        Reason::DropPodImds,
        Reason::SnatFragment,
        Reason::ReverseNatFragment,
        Reason::PassInboundFragment,
        Reason::InboundNew,
        Reason::PassInboundToPod,
        Reason::PassInboundUnrecorded,
        Reason::SnatReopened,
        Reason::SnatRepaired,
        Reason::PassHostFlow,
        Reason::HostFlowCollision,
        Reason::DropNoFlow,
        Reason::PassHostSocket,
    ];

    /// The name operators see in `vcnpath` output and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassNotIpv4 => "passed-not-ipv4",
            Reason::PassNotEndpoint => "passed-not-endpoint",
            Reason::PassVcn => "passed-vcn",
            Reason::RedirectOwner => "redirected-to-owner",
            Reason::SnatNew => "translated-new-flow",
            Reason::SnatEstablished => "translated",
            Reason::ReverseNat => "reverse-translated",
            Reason::IcmpErrorReverse => "icmp-error-reverse-translated",
            Reason::IcmpErrorSnat => "icmp-error-translated",
            Reason::PassInbound => "passed-inbound-flow",
            Reason::DropNoPort => "dropped-no-port",
            Reason::DropMalformed => "dropped-malformed",
            Reason::PassMalformed => "passed-malformed",
            Reason::DropFragment => "dropped-fragment",
            Reason::PassFragment => "passed-fragment",
            Reason::DropProtocol => "dropped-protocol",
            Reason::PassUnconfigured => "passed-unconfigured",
            Reason::PassHost => "passed-host",
            Reason::DropRewrite => "dropped-rewrite-failed",
            Reason::DropNatFull => "dropped-nat-full",
            Reason::PassNoVnic => "passed-no-vnic",
            Reason::DropBadLength => "dropped-bad-length",
            Reason::PassBadLength => "passed-bad-length",
            Reason::DropBadTcpOffset => "dropped-bad-tcp-offset",
            Reason::PassBadTcpOffset => "passed-bad-tcp-offset",
            Reason::DropSpoofed => "dropped-spoofed-source",
            Reason::PassPodSource => "passed-pod-own-source",
            Reason::DropPodImds => "dropped-pod-imds",
            Reason::SnatFragment => "translated-fragment",
            Reason::ReverseNatFragment => "reverse-translated-fragment",
            Reason::PassInboundFragment => "passed-inbound-fragment",
            Reason::InboundNew => "recorded-inbound-flow",
            Reason::PassInboundToPod => "passed-inbound-to-pod",
            Reason::PassInboundUnrecorded => "passed-inbound-unrecorded",
            Reason::SnatReopened => "translated-reopened-flow",
            Reason::SnatRepaired => "translated-reply-repaired",
            Reason::PassHostFlow => "passed-host-flow",
            Reason::HostFlowCollision => "host-flow-took-pod-tuple",
            Reason::DropNoFlow => "dropped-no-flow",
            Reason::PassHostSocket => "passed-host-socket",
        }
    }

    /// Whether packets counted under this reason were dropped.
    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Reason::DropNoPort
                | Reason::DropMalformed
                | Reason::DropFragment
                | Reason::DropProtocol
                | Reason::DropRewrite
                | Reason::DropNatFull
                | Reason::DropBadLength
                | Reason::DropBadTcpOffset
                | Reason::DropSpoofed
                | Reason::DropPodImds
                | Reason::DropNoFlow
        )
    }
}
