//! Checks the end-to-end lab tests share (`lab_agent`, `lab_blocks`): what the far ends, OCI
//! and the checkpoint say about pods the real agent and plugin set up.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use crate::{
    lab::{
        SimLab,
        traffic::{TcpConn, TcpServer, UdpEchoServer, udp_request},
    },
    node_agent::{CniPod, NodeAgent, add_pods, checkpointed, cloud_ips, cni},
};

/// The node's masquerade address in the lab: its primary VNIC's IP.
pub const MASQ: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);

/// The port the far ends listen on.
const PORT: u16 = 8080;

/// Every checkpointed pod address exists in OCI on the VNIC the checkpoint says, and no
/// address is held twice.
pub fn assert_consistent(lab: &SimLab, agent: &NodeAgent) {
    let held = checkpointed(&agent.checkpoint()).expect("checkpoint");
    let unique: BTreeSet<Ipv4Addr> = held.iter().map(|a| a.ip).collect();
    assert_eq!(
        unique.len(),
        held.len(),
        "an address is held by two pods: {held:?}"
    );
    let cloud = cloud_ips(lab);
    for a in &held {
        assert_eq!(
            cloud.get(&a.ip),
            Some(&a.vnic_id),
            "checkpointed {} must exist in OCI on {}",
            a.ip,
            a.vnic_id
        );
    }
}

/// What the far ends saw of a set of pods.
#[derive(Debug, Default)]
pub struct Seen {
    /// Pod id → the source the VCN peer's UDP echo saw for the pod's request.
    pub udp_at_peer: BTreeMap<String, Ipv4Addr>,
    /// The sources of the TCP connections the VCN peer accepted.
    pub tcp_at_peer: BTreeSet<IpAddr>,
    /// The sources of the TCP connections the internet host accepted.
    pub tcp_at_inet: BTreeSet<IpAddr>,
    /// The source ports of those connections.
    pub ports_at_inet: BTreeSet<u16>,
}

/// Each pod sends a UDP request to the VCN peer and echoes a message over a TCP connection to
/// the peer and one to the internet host; panics, naming the pod, when one fails.
pub fn reach_peer_and_internet(lab: &SimLab, pods: &[CniPod], timeout: Duration) -> Seen {
    let peer_at = SocketAddr::from((lab.lab().peer_ip(), PORT));
    let peer = TcpServer::start(lab.lab().peer(), peer_at).expect("TCP server on the VCN peer");
    let udp = UdpEchoServer::start(lab.lab().peer(), peer_at).expect("UDP echo on the VCN peer");
    let inet = TcpServer::start(
        lab.lab().inet(),
        SocketAddr::from((lab.lab().inet_ip(), PORT)),
    )
    .expect("TCP server on the internet host");
    let mut seen = Seen::default();
    for pod in pods {
        let what = |to: &str| format!("pod {} ({} on {}) → {to}", pod.id, pod.ip, pod.interface);
        let mut c = TcpConn::connect(&pod.ns, None, peer.addr(), timeout)
            .unwrap_or_else(|e| panic!("{}: {e:#}", what("VCN peer over TCP")));
        c.roundtrip(b"vcn", timeout)
            .unwrap_or_else(|e| panic!("{}: {e:#}", what("VCN peer's TCP echo")));
        let reply = udp_request(&pod.ns, None, udp.addr(), b"vcn", timeout)
            .unwrap_or_else(|e| panic!("{}: {e:#}", what("VCN peer over UDP")));
        let SocketAddr::V4(source) = reply.peer_seen else {
            panic!("{}: the peer saw {}", what("VCN peer"), reply.peer_seen)
        };
        seen.udp_at_peer.insert(pod.id.clone(), *source.ip());
        let mut c = TcpConn::connect(&pod.ns, None, inet.addr(), timeout)
            .unwrap_or_else(|e| panic!("{}: {e:#}", what("internet")));
        c.roundtrip(b"inet", timeout)
            .unwrap_or_else(|e| panic!("{}: {e:#}", what("internet's TCP echo")));
    }
    seen.tcp_at_peer = peer
        .wait_connections(pods.len(), timeout)
        .expect("the connections the pods made")
        .iter()
        .map(|r| r.peer.ip())
        .collect();
    let at_inet = inet
        .wait_connections(pods.len(), timeout)
        .expect("the connections the pods made");
    seen.tcp_at_inet = at_inet.iter().map(|r| r.peer.ip()).collect();
    seen.ports_at_inet = at_inet.iter().map(|r| r.peer.port()).collect();
    seen
}

/// The VCN peer saw each pod's own address, over TCP and UDP; the internet host saw only the
/// node's masquerade address.
pub fn assert_own_addresses_and_masquerade(pods: &[CniPod], seen: &Seen) {
    let wrong: Vec<String> = pods
        .iter()
        .filter(|p| seen.udp_at_peer.get(&p.id) != Some(&p.ip))
        .map(|p| {
            format!(
                "{} ({}) seen as {:?}",
                p.id,
                p.ip,
                seen.udp_at_peer.get(&p.id)
            )
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "the VCN peer must see each pod's own address as the UDP source: {wrong:?}"
    );
    assert_eq!(
        seen.tcp_at_peer,
        pods.iter().map(|p| IpAddr::V4(p.ip)).collect(),
        "the VCN peer sees each pod's own address on TCP"
    );
    assert_eq!(
        seen.tcp_at_inet,
        BTreeSet::from([IpAddr::V4(MASQ)]),
        "the internet sees only the masquerade address"
    );
    // The agent's default NAT range: pods' ephemeral ports (32768–60999) are the host's.
    let (min, max) = (
        vcnpath_common::DEFAULT_NAT_PORT_MIN,
        vcnpath_common::DEFAULT_NAT_PORT_MAX,
    );
    let outside: Vec<u16> = seen
        .ports_at_inet
        .iter()
        .copied()
        .filter(|p| !(min..=max).contains(p))
        .collect();
    assert!(
        outside.is_empty(),
        "the internet sees only ports of the NAT range {min}-{max}, not {outside:?}"
    );
}

/// DELs `gone` with the plugin, waits `rest` (past the agent's cooldown) and adds as many new
/// pods named `<prefix>000`…: at least one of them must get a freed address back. Returns the
/// new pods.
pub fn delete_then_reuse(
    lab: &SimLab,
    agent: &NodeAgent,
    gone: &[CniPod],
    prefix: &str,
    rest: Duration,
    timeout: Duration,
) -> Vec<CniPod> {
    let freed: BTreeSet<Ipv4Addr> = gone.iter().map(|p| p.ip).collect();
    for pod in gone {
        let out = cni(
            lab.lab().node(),
            &agent.socket(),
            "DEL",
            &pod.id,
            Some(pod.ns.path()),
        )
        .expect("vcnpath-cni runs");
        assert!(out.ok, "DEL {}: {}", pod.id, out.json);
    }
    std::thread::sleep(rest);
    let again = add_pods(lab, agent, prefix, gone.len(), timeout);
    assert!(
        again.iter().any(|p| freed.contains(&p.ip)),
        "freed addresses are reused after the cooldown (none of {freed:?} came back)"
    );
    again
}
