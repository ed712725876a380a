//! IP CIDR blocks in the simulator-driven lab, without the agent: once the simulator assigns
//! a block (`CreatePrivateIp` with `cidrPrefixLength`) to a VNIC, OCI's source/destination
//! check passes every address inside it, each way, exactly as for a secondary IP, and the
//! VCN router delivers traffic for any of them to the VNIC without ARP; an address beside
//! the block is still dropped and counted. Needs root; each test builds its own lab.
//! The last test runs the real agent in CIDR mode: forty pods served from blocks.
//!
//! The node is set up as the agent leaves it for pods: the VNIC's primary IP on its
//! interface, the block's addresses elsewhere (on `lo` here, behind veths for pods) and
//! `arp_ignore` on the VNIC, so the node never answers ARP for them and only a router that
//! knows where the block lives reaches them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use vcnpath::oci::models::{
    AttachVnicDetails, CreatePrivateIpDetails, CreateVnicDetails, PrivateIp, PrivateIpFilter,
};
use vcnpath::oci::{CoreClient, new_retry_token};
use vcnpath_tests::e2e::{
    assert_consistent, assert_own_addresses_and_masquerade, delete_then_reuse,
    reach_peer_and_internet,
};
use vcnpath_tests::lab::traffic::{TcpServer, UdpEchoServer, tcp_bulk, udp_request};
use vcnpath_tests::lab::{LabOptions, PEER_IP, RouterDrops, SimLab, lab_sim_config};
use vcnpath_tests::node_agent::{
    AgentOptions, CniPod, IPS_PER_VNIC, NodeAgent, add_pods, cloud_ips,
};
use vcnpath_tests::ocikit::{fast_retries, instance_principal_client};
use vcnpath_tests::ocisim::SimConfig;
use vcnpath_tests::privileged::have_root;

/// The simulator's attach delay, and the margin within which the lab must follow it.
const ATTACH_DELAY: Duration = Duration::from_millis(300);
const MARGIN: Duration = Duration::from_secs(3);
/// How long a source the router drops is tried before the test calls it dropped.
const DROPPED_AFTER: Duration = Duration::from_millis(1500);

/// Where the block goes in subnet B (10.0.1.0/24): clear of the reserved addresses and of
/// the VNIC's primary IP, which the simulator takes from the bottom of the subnet.
const BLOCK_AT: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 32);
const BLOCK_PREFIX: u8 = 28;

fn config() -> SimConfig {
    SimConfig {
        attach_delay_ms: u64::try_from(ATTACH_DELAY.as_millis()).expect("small"),
        ..lab_sim_config()
    }
}

/// A lab whose node has a secondary VNIC in subnet B, configured as the agent would for
/// pods on it, but without any block yet.
struct BlockLab {
    lab: SimLab,
    client: Arc<CoreClient>,
    vnic_id: String,
}

impl BlockLab {
    fn new() -> Self {
        let lab = SimLab::new(LabOptions::default(), config()).expect("building the simulator lab");
        let client = Arc::new(instance_principal_client(lab.sim(), fast_retries()).0);
        let cfg = lab.sim().config();
        let details = AttachVnicDetails {
            instance_id: cfg.instance_id.clone(),
            create_vnic_details: CreateVnicDetails {
                subnet_id: cfg.subnets[1].id.clone(),
                ..Default::default()
            },
            display_name: Some("lab-blocks".into()),
            nic_index: None,
        };
        let attach_client = Arc::clone(&client);
        let vnic_id = lab.block_on(async move {
            let attachment = attach_client
                .attach_vnic(&details, &new_retry_token())
                .await
                .expect("AttachVnic");
            attach_client
                .wait_attached(&attachment.id, Duration::from_secs(10))
                .await
                .expect("the attachment becomes ATTACHED")
                .vnic_id
                .expect("ATTACHED names its VNIC")
        });
        let link = lab
            .wait_for_vnic(&vnic_id, ATTACH_DELAY + MARGIN)
            .expect("the VNIC's interface appears in the node");
        let primary = lab.sim().snapshot()["vnics"]
            .as_array()
            .expect("vnics")
            .iter()
            .find(|v| v["id"] == vnic_id.as_str())
            .and_then(|v| v["privateIp"].as_str())
            .expect("the VNIC's primary IP")
            .to_owned();
        let node = lab.lab().node();
        let ifname = &link.ifname;
        node.ip(&["addr", "add", &format!("{primary}/24"), "dev", ifname])
            .expect("the VNIC's primary IP on its interface");
        // Answer ARP only for addresses on the VNIC's own interface, and ask with its
        // primary IP: nothing on the node answers for a block address.
        node.sysctl(&format!("net/ipv4/conf/{ifname}/arp_ignore"), "1")
            .expect("arp_ignore");
        node.sysctl(&format!("net/ipv4/conf/{ifname}/arp_announce"), "2")
            .expect("arp_announce");
        node.ip(&["link", "set", ifname, "up"])
            .expect("the VNIC's interface up");
        node.ip(&[
            "route",
            "add",
            &format!("{PEER_IP}/32"),
            "via",
            "10.0.1.1",
            "dev",
            ifname,
        ])
        .expect("the route to the peer through the VNIC");
        Self {
            lab,
            client,
            vnic_id,
        }
    }

    /// Creates a /28 block at [`BLOCK_AT`] on the VNIC through the OCI API, as the agent
    /// does in CIDR mode.
    fn create_block(&self) -> (PrivateIp, Ipv4Net) {
        let client = Arc::clone(&self.client);
        let details = CreatePrivateIpDetails {
            vnic_id: self.vnic_id.clone(),
            ip_address: Some(BLOCK_AT.to_string()),
            cidr_prefix_length: Some(BLOCK_PREFIX),
            ..Default::default()
        };
        let block = self
            .lab
            .block_on(async move { client.create_private_ip(&details, &new_retry_token()).await })
            .expect("CreatePrivateIp of a /28 block");
        let range = Ipv4Net::new(BLOCK_AT, BLOCK_PREFIX).expect("a /28");
        assert_eq!(
            (block.ip_address.as_str(), block.cidr_prefix_length),
            (BLOCK_AT.to_string().as_str(), Some(BLOCK_PREFIX)),
            "the simulator assigns the block asked for: {block:?}"
        );
        (block, range)
    }

    fn delete(&self, private_ip: &PrivateIp) {
        let client = Arc::clone(&self.client);
        let id = private_ip.id.clone();
        self.lab
            .block_on(async move { client.delete_private_ip(&id).await })
            .expect("DeletePrivateIp of the block");
    }

    /// Gives `ip` to the node without making it the VNIC interface's (a pod address).
    fn add_local(&self, ip: Ipv4Addr) {
        self.lab
            .lab()
            .node()
            .ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"])
            .unwrap_or_else(|e| panic!("adding {ip} to the node's lo: {e:#}"));
    }

    fn drops(&self) -> RouterDrops {
        self.lab
            .router_drop_counts_of(&self.vnic_id)
            .expect("the VNIC's drop counters")
    }

    fn assert_no_sync_errors(&self) {
        let errors = self.lab.sync_errors();
        assert!(
            errors.is_empty(),
            "the lab's sync with the simulator failed: {errors:?}"
        );
    }
}

/// The source the peer's echo server saw for a UDP request from `from`, or `None` if no
/// answer came within `timeout` (the router dropped it).
fn udp_seen(
    lab: &SimLab,
    server: &UdpEchoServer,
    from: Ipv4Addr,
    timeout: Duration,
) -> Option<Ipv4Addr> {
    let from = SocketAddr::from((from, 0));
    match udp_request(
        lab.lab().node(),
        Some(from),
        server.addr(),
        b"block",
        timeout,
    ) {
        Ok(reply) => match reply.peer_seen {
            SocketAddr::V4(seen) => Some(*seen.ip()),
            SocketAddr::V6(seen) => panic!("the peer saw an IPv6 source {seen}"),
        },
        Err(_) => None,
    }
}

fn nth(range: Ipv4Net, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(range.network()) + n)
}

fn wait_until(timeout: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one block's story, both ways and both edges, read top to bottom"
)]
fn lab_every_address_of_a_block_passes_the_vcn_router_both_ways_and_one_beside_it_is_dropped() {
    if !have_root("lab_blocks") {
        return;
    }
    let lab = BlockLab::new();
    let (_block, range) = lab.create_block();
    // Inside: neither the block's first address (the object's `ipAddress`) nor its last.
    let inside = nth(range, 5);
    let last = range.broadcast();
    // Beside it on both sides, in the same subnet, assigned to nothing.
    let below = Ipv4Addr::from(u32::from(range.network()) - 1);
    let above = Ipv4Addr::from(u32::from(range.broadcast()) + 1);
    for ip in [inside, last, below, above] {
        lab.add_local(ip);
    }
    let peer = lab.lab.lab().peer();
    let echo =
        UdpEchoServer::start(peer, SocketAddr::from((PEER_IP, 0))).expect("UDP echo on the peer");

    // The lab follows the simulator within a tick; the first packets on a link just set
    // up may be lost, so the first address is given a few seconds.
    let mut seen = None;
    assert!(
        wait_until(MARGIN, || {
            seen = udp_seen(&lab.lab, &echo, inside, Duration::from_millis(500));
            seen.is_some()
        }),
        "a UDP request from {inside}, inside block {range} of the VNIC, should pass the VCN router and be answered; drops {:?}",
        lab.drops()
    );
    assert_eq!(
        seen,
        Some(inside),
        "the peer should see the block address {inside} as the source"
    );
    // Requests sent before the lab followed the simulator may have been dropped; from now
    // on nothing may be.
    let settled = lab.drops();
    assert_eq!(
        udp_seen(&lab.lab, &echo, last, MARGIN),
        Some(last),
        "the block's last address {last} should pass as well, the peer seeing it"
    );

    let server =
        TcpServer::start(peer, SocketAddr::from((PEER_IP, 0))).expect("TCP server on the peer");
    let report = tcp_bulk(
        lab.lab.lab().node(),
        Some(SocketAddr::from((inside, 0))),
        server.addr(),
        256 * 1024,
        MARGIN,
    )
    .unwrap_or_else(|e| {
        panic!("a TCP transfer from block address {inside} to the peer should complete: {e:#}")
    });
    assert_eq!(
        report.peer_seen.ip(),
        std::net::IpAddr::V4(inside),
        "the peer should see the TCP connection come from {inside}"
    );

    // The other way: the peer opens a connection to a block address, which the router
    // must deliver to the VNIC by itself (the node answers no ARP for it).
    let on_node = TcpServer::start(lab.lab.lab().node(), SocketAddr::from((inside, 0)))
        .expect("TCP server on the block address");
    let from_peer = tcp_bulk(peer, None, on_node.addr(), 64 * 1024, MARGIN).unwrap_or_else(|e| {
        panic!(
            "a TCP connection from the peer to block address {inside} should be delivered to the VNIC: {e:#}; drops {:?}",
            lab.drops()
        )
    });
    assert_eq!(
        from_peer.peer_seen.ip(),
        std::net::IpAddr::V4(PEER_IP),
        "the node should see the peer's own address"
    );

    assert_eq!(
        lab.drops(),
        settled,
        "nothing from or to the block should have been dropped"
    );
    for outside in [below, above] {
        let counted = lab.drops();
        assert_eq!(
            udp_seen(&lab.lab, &echo, outside, DROPPED_AFTER),
            None,
            "{outside} lies outside block {range} and every other address of the VNIC: the router should drop it"
        );
        let after = lab.drops();
        assert!(
            after.source > counted.source,
            "the router's source check should count the packets from {outside}: {counted:?} then {after:?}"
        );
    }
    let counted = lab.drops();
    let to_outside = TcpServer::start(lab.lab.lab().node(), SocketAddr::from((above, 0)))
        .expect("TCP server beside the block");
    assert!(
        tcp_bulk(peer, None, to_outside.addr(), 1024, DROPPED_AFTER).is_err(),
        "a connection from the peer to {above}, outside block {range}, should be dropped by the router"
    );
    let after = lab.drops();
    assert!(
        after.destination > counted.destination,
        "the router's destination check should count the packets towards {above}: {counted:?} then {after:?}"
    );
    assert!(
        echo.peers()
            .iter()
            .all(|p| p.ip() != std::net::IpAddr::V4(below) && p.ip() != std::net::IpAddr::V4(above)),
        "the peer must never have seen an address outside the block: {:?}",
        echo.peers()
    );
    lab.assert_no_sync_errors();
}

#[test]
fn lab_a_deleted_block_is_dropped_again_and_a_new_one_passes() {
    if !have_root("lab_blocks") {
        return;
    }
    let lab = BlockLab::new();
    let (block, range) = lab.create_block();
    // What the end-to-end invariant checks read: every address of the block is the VNIC's.
    let cloud = cloud_ips(&lab.lab);
    let in_block: Vec<Ipv4Addr> = cloud
        .iter()
        .filter(|(ip, vnic)| range.contains(*ip) && **vnic == lab.vnic_id)
        .map(|(ip, _)| *ip)
        .collect();
    assert_eq!(
        in_block.len(),
        16,
        "cloud_ips should give all 16 addresses of {range} to VNIC {}: {cloud:?}",
        lab.vnic_id
    );
    let inside = nth(range, 9);
    lab.add_local(inside);
    let echo = UdpEchoServer::start(lab.lab.lab().peer(), SocketAddr::from((PEER_IP, 0)))
        .expect("UDP echo on the peer");
    assert!(
        wait_until(MARGIN, || udp_seen(
            &lab.lab,
            &echo,
            inside,
            Duration::from_millis(500)
        ) == Some(inside)),
        "{inside} in block {range} should reach the peer while the block is assigned; drops {:?}",
        lab.drops()
    );

    lab.delete(&block);
    assert!(
        wait_until(MARGIN, || udp_seen(
            &lab.lab,
            &echo,
            inside,
            Duration::from_millis(300)
        )
        .is_none()),
        "block {range} was deleted: the router should drop {inside} again"
    );
    let counted = lab.drops();
    assert_eq!(
        udp_seen(&lab.lab, &echo, inside, DROPPED_AFTER),
        None,
        "{inside} stays dropped"
    );
    assert!(
        lab.drops().source > counted.source,
        "the drops of {inside} should be counted after the block is gone: {counted:?} then {:?}",
        lab.drops()
    );

    // The same addresses as a block again: the router takes them back.
    let (_again, _) = lab.create_block();
    assert!(
        wait_until(MARGIN, || udp_seen(
            &lab.lab,
            &echo,
            inside,
            Duration::from_millis(500)
        ) == Some(inside)),
        "block {range} is assigned again: {inside} should reach the peer again"
    );
    lab.assert_no_sync_errors();
}

/// The agent's blocks in the forty-pod test: /28s, at most two on a VNIC, so forty pods and
/// the warm target (46 addresses, three blocks) need both secondary VNICs the lab's shape
/// allows, and the pool holds at most four blocks (64 addresses) whatever it does.
const POD_BLOCK: u8 = 28;
const POD_BLOCK_ADDRESSES_PER_VNIC: usize = 32;
const PODS: usize = 40;
const T: Duration = Duration::from_mins(1);

/// The node's secondary private-IP objects as OCI lists them, by VNIC: `ListVnicAttachments`
/// of the instance, then `ListPrivateIps` of each attached VNIC.
fn listed_private_ips(lab: &SimLab) -> BTreeMap<String, Vec<PrivateIp>> {
    let client = instance_principal_client(lab.sim(), fast_retries()).0;
    let cfg = lab.sim().config();
    lab.block_on(async move {
        let attachments = client
            .list_vnic_attachments(&cfg.compartment_id, Some(&cfg.instance_id))
            .await
            .expect("ListVnicAttachments");
        let mut by_vnic = BTreeMap::new();
        for vnic in attachments.into_iter().filter_map(|a| a.vnic_id) {
            let ips = client
                .list_private_ips(&PrivateIpFilter::Vnic(vnic.clone()))
                .await
                .expect("ListPrivateIps");
            by_vnic.insert(vnic, ips.into_iter().filter(|p| !p.is_primary).collect());
        }
        by_vnic
    })
}

/// Each pod whose address lies in no `/POD_BLOCK` block that OCI lists on the VNIC behind the
/// interface the agent put the pod on, as a sentence, followed by what OCI lists on each VNIC
/// (nothing when every pod is inside its VNIC's blocks).
fn pods_outside_their_vnics_blocks(lab: &SimLab, pods: &[CniPod]) -> Vec<String> {
    let listed = listed_private_ips(lab);
    let vnic_of_interface: BTreeMap<String, &String> = listed
        .keys()
        .map(|vnic| {
            let link = lab
                .wait_for_vnic(vnic, MARGIN)
                .unwrap_or_else(|e| panic!("VNIC {vnic}'s interface in the node: {e:#}"));
            (link.ifname, vnic)
        })
        .collect();
    let mut found: Vec<String> = pods
        .iter()
        .filter_map(|pod| {
            let Some(vnic) = vnic_of_interface.get(&pod.interface) else {
                return Some(format!(
                    "{} ({}) is on {}, the interface of no VNIC OCI has attached ({vnic_of_interface:?})",
                    pod.id, pod.ip, pod.interface
                ));
            };
            let inside = listed[*vnic]
                .iter()
                .filter_map(PrivateIp::block)
                .any(|b| b.prefix_len() == POD_BLOCK && b.contains(&pod.ip));
            (!inside).then(|| {
                format!(
                    "{} has {}, in no /{POD_BLOCK} block OCI lists on {vnic} ({})",
                    pod.id, pod.ip, pod.interface
                )
            })
        })
        .collect();
    if !found.is_empty() {
        for (vnic, ips) in &listed {
            let objects: Vec<String> = ips
                .iter()
                .map(|p| match p.cidr_prefix_length {
                    Some(prefix) => format!("{}/{prefix}", p.ip_address),
                    None => p.ip_address.clone(),
                })
                .collect();
            found.push(format!("OCI lists on {vnic}: {}", objects.join(" ")));
        }
    }
    found
}

/// Blocks keep OCI's private-IP objects far fewer than the pods: each one a /`POD_BLOCK` block.
fn assert_few_block_objects(listed: &BTreeMap<String, Vec<PrivateIp>>) {
    let objects: Vec<(&str, &str, Option<u8>)> = listed
        .iter()
        .flat_map(|(vnic, ips)| {
            ips.iter()
                .map(move |p| (vnic.as_str(), p.ip_address.as_str(), p.cidr_prefix_length))
        })
        .collect();
    let most = 2 * POD_BLOCK_ADDRESSES_PER_VNIC / (1 << (32 - POD_BLOCK));
    assert!(
        objects.len() <= most && objects.iter().all(|(_, _, p)| *p == Some(POD_BLOCK)),
        "{PODS} pods from blocks need at most {most} private-IP objects at OCI, each a /{POD_BLOCK} block; OCI lists {}: {objects:?}",
        objects.len()
    );
}

/// `vcnpath status` shows each VNIC's blocks and private-IP objects as OCI lists them.
fn assert_status_shows_blocks(agent: &NodeAgent, listed: &BTreeMap<String, Vec<PrivateIp>>) {
    let status = agent.status().expect("vcnpath status");
    for (vnic, ips) in listed.iter().filter(|(_, ips)| !ips.is_empty()) {
        let at_oci: Vec<String> = ips
            .iter()
            .filter_map(PrivateIp::block)
            .map(|b| b.to_string())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let row = status["vnics"]
            .as_array()
            .expect("vnics")
            .iter()
            .find(|v| v["vnic_id"] == vnic.as_str())
            .unwrap_or_else(|| panic!("vcnpath status lists VNIC {vnic}: {}", status["vnics"]));
        assert_eq!(
            (&row["blocks"], &row["objects"]),
            (&serde_json::json!(at_oci), &serde_json::json!(ips.len())),
            "vcnpath status must show VNIC {vnic}'s blocks and private-IP objects as OCI lists them: {row}"
        );
    }
}

#[test]
fn lab_forty_pods_from_blocks_on_two_vnics_reach_the_vcn_with_their_own_addresses_and_the_internet_masqueraded()
 {
    if !have_root("lab_blocks_forty_pods") {
        return;
    }
    let lab = SimLab::new(
        LabOptions::default(),
        SimConfig {
            ips_per_vnic: IPS_PER_VNIC,
            ..config()
        },
    )
    .expect("building the simulator lab");
    let agent = NodeAgent::start_with(
        &lab,
        "blocks40",
        AgentOptions {
            ipam_mode: Some("cidr"),
            block_prefix: Some(POD_BLOCK),
            block_addresses_per_vnic: Some(POD_BLOCK_ADDRESSES_PER_VNIC),
            ..AgentOptions::default()
        },
    )
    .expect("vcnpath run in CIDR mode");
    let pods = add_pods(&lab, &agent, "blk", PODS, T);
    let addresses: BTreeSet<Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
    assert_eq!(addresses.len(), PODS, "{PODS} distinct addresses");

    let outside = pods_outside_their_vnics_blocks(&lab, &pods);
    assert!(
        outside.is_empty(),
        "every pod's address must lie in a block OCI lists on the pod's VNIC:\n{}\nagent log:\n{}",
        outside.join("\n"),
        agent.latest_log()
    );
    let interfaces: BTreeSet<&str> = pods.iter().map(|p| p.interface.as_str()).collect();
    assert_eq!(
        interfaces.len(),
        2,
        "{PODS} pods at {POD_BLOCK_ADDRESSES_PER_VNIC} addresses per VNIC are spread over two VNICs, got {interfaces:?}"
    );
    let listed = listed_private_ips(&lab);
    assert_few_block_objects(&listed);
    assert_status_shows_blocks(&agent, &listed);

    let seen = reach_peer_and_internet(&lab, &pods, T);
    assert_own_addresses_and_masquerade(&pods, &seen);
    for vnic in listed.keys() {
        assert_eq!(
            lab.router_drop_counts_of(vnic)
                .expect("the VNIC's drop counters")
                .total(),
            0,
            "the VCN router's source/destination check dropped packets of VNIC {vnic}"
        );
    }
    assert_consistent(&lab, &agent);

    // Deleted pods' addresses come back to new pods after the cooldown, from the same blocks.
    let again = delete_then_reuse(
        &lab,
        &agent,
        &pods[..10],
        "blknew",
        Duration::from_secs(4),
        T,
    );
    let outside = pods_outside_their_vnics_blocks(&lab, &again);
    assert!(
        outside.is_empty(),
        "pods added after DELs must get addresses of their VNIC's blocks:\n{}",
        outside.join("\n")
    );
    assert_consistent(&lab, &agent);
    let errors = lab.sync_errors();
    assert!(
        errors.is_empty(),
        "the lab's sync with the simulator failed: {errors:?}"
    );
}
