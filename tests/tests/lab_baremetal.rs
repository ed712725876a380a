//! A bare-metal node (`BM.*` shape) in the simulator-driven lab: the node has its two
//! physical NICs only, and a secondary VNIC is never a link of its own but VLAN `vlanTag`
//! traffic on the physical NIC of its `nicIndex`, which the guest must terminate with a
//! macvlan (the VNIC's MAC) and a VLAN on top, as Oracle's oci-utils does. Needs root and a
//! kernel with 802.1Q VLANs (the VM tier's kernels; some development kernels lack it).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vcnpath::oci::models::{AttachVnicDetails, CreateVnicDetails};
use vcnpath::oci::{CoreClient, new_retry_token};
use vcnpath_tests::lab::process::output;
use vcnpath_tests::lab::traffic::{TcpConn, TcpServer};
use vcnpath_tests::lab::{LabOptions, PEER_IP, SimLab, cmd_in, lab_sim_config};
use vcnpath_tests::node_agent::{AgentOptions, CniPod, NodeAgent, add_pods};
use vcnpath_tests::ocikit::{fast_retries, instance_principal_client};
use vcnpath_tests::ocisim::SimConfig;
use vcnpath_tests::privileged::{have_root, have_vlan};

/// Generous: the VM tier runs this under emulation.
const MARGIN: Duration = Duration::from_secs(10);

fn bare_metal_config() -> SimConfig {
    SimConfig {
        shape: "BM.Standard.E4.128".into(),
        attach_delay_ms: 300,
        ..lab_sim_config()
    }
}

fn can_run(test: &str) -> bool {
    have_root(test) && have_vlan(test)
}

fn client(lab: &SimLab) -> Arc<CoreClient> {
    Arc::new(instance_principal_client(lab.sim(), fast_retries()).0)
}

/// Attaches a VNIC in subnet `subnet` on physical NIC `nic_index`; returns (attachment,
/// VNIC) ids once ATTACHED.
fn attach_on(
    lab: &SimLab,
    client: &Arc<CoreClient>,
    subnet: usize,
    nic_index: Option<u32>,
) -> (String, String) {
    let cfg = lab.sim().config();
    let details = AttachVnicDetails {
        instance_id: cfg.instance_id.clone(),
        create_vnic_details: CreateVnicDetails {
            subnet_id: cfg.subnets[subnet].id.clone(),
            ..Default::default()
        },
        display_name: Some("lab-test".into()),
        nic_index,
    };
    let client = Arc::clone(client);
    lab.block_on(async move {
        let attachment = client
            .attach_vnic(&details, &new_retry_token())
            .await
            .expect("AttachVnic");
        let attached = client
            .wait_attached(&attachment.id, Duration::from_secs(10))
            .await
            .expect("the attachment becomes ATTACHED");
        (
            attachment.id,
            attached.vnic_id.expect("ATTACHED names its VNIC"),
        )
    })
}

fn ping_from(lab: &SimLab, src: Ipv4Addr) -> bool {
    output(cmd_in(lab.lab().node(), "ping").args([
        "-n",
        "-q",
        "-c",
        "1",
        "-W",
        "1",
        "-I",
        &src.to_string(),
        &PEER_IP.to_string(),
    ]))
    .expect("running ping")
    .status
    .success()
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

/// The node's link names (without the `@parent` suffix).
fn node_links(lab: &SimLab) -> Vec<String> {
    lab.lab()
        .node()
        .ip(&["-o", "link", "show"])
        .expect("ip link show")
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .collect()
}

/// The VNIC's primary private IP, from the simulator.
fn vnic_ip(lab: &SimLab, vnic_id: &str) -> Ipv4Addr {
    lab.sim().snapshot()["vnics"]
        .as_array()
        .expect("vnics")
        .iter()
        .find(|v| v["id"] == vnic_id)
        .and_then(|v| v["privateIp"].as_str())
        .expect("the VNIC's primary IP")
        .parse()
        .expect("an IPv4 address")
}

/// The lab as a bare-metal guest sees it: two NICs, no link per VNIC; a plain macvlan with
/// the VNIC's MAC does not reach the VCN, the macvlan plus the VLAN on top does.
#[test]
fn a_bare_metal_node_reaches_a_secondary_vnic_only_through_a_vlan_on_its_physical_nic() {
    if !can_run("lab_baremetal") {
        return;
    }
    let lab = SimLab::new(LabOptions::default(), bare_metal_config())
        .expect("building a bare-metal simulator lab");
    assert_eq!(
        node_links(&lab),
        ["lo", "ens2f0", "ens2f1"],
        "a bare-metal node has its two physical NICs"
    );
    let client = client(&lab);
    let (attachment, vnic_id) = attach_on(&lab, &client, 1, Some(1));
    let carrier = lab
        .wait_for_vlan(&vnic_id, MARGIN)
        .expect("the lab carries the VNIC");
    let json = lab.sim().snapshot()["attachments"]
        .as_array()
        .expect("attachments")
        .iter()
        .find(|a| a["id"] == attachment.as_str())
        .cloned()
        .expect("the attachment");
    assert_eq!(
        (carrier.nic.as_str(), u64::from(carrier.vlan_tag)),
        (
            "ens2f1",
            json["vlanTag"].as_u64().expect("vlanTag once ATTACHED")
        ),
        "VLAN vlanTag on the NIC the attachment asked for: {json}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        node_links(&lab),
        ["lo", "ens2f0", "ens2f1"],
        "no link appears for a bare-metal secondary VNIC"
    );
    let node = lab.lab().node();
    let shown = node.ip(&["-o", "link", "show"]).expect("ip link show");
    assert!(
        !shown.contains(&carrier.mac.to_string()),
        "no link carries the VNIC's MAC {}:\n{shown}",
        carrier.mac
    );

    let ip = vnic_ip(&lab, &vnic_id);
    let mac = carrier.mac.to_string();
    let tag = carrier.vlan_tag.to_string();
    let macvlan = format!("{}.{tag}", carrier.nic);
    let vlan = format!("{}v{tag}", carrier.nic);
    let address = |dev: &str| {
        node.ip(&["addr", "add", &format!("{ip}/24"), "dev", dev])
            .expect("addr add");
        node.ip(&["link", "set", dev, "up"]).expect("link up");
        let peer = format!("{PEER_IP}/32");
        node.ip(&["route", "replace", &peer, "via", "10.0.1.1", "dev", dev])
            .expect("route to the peer");
    };
    node.ip(&[
        "link",
        "add",
        "link",
        &carrier.nic,
        "name",
        &macvlan,
        "address",
        &mac,
        "type",
        "macvlan",
    ])
    .expect("a macvlan with the VNIC's MAC");
    address(&macvlan);
    assert!(
        !wait_until(MARGIN, || ping_from(&lab, ip)),
        "untagged frames from the VNIC's MAC must not reach the VCN"
    );
    node.ip(&["addr", "flush", "dev", &macvlan])
        .expect("addr flush");
    node.ip(&[
        "link", "add", "link", &macvlan, "name", &vlan, "type", "vlan", "id", &tag,
    ])
    .expect("the VLAN on the macvlan");
    address(&vlan);
    assert!(
        wait_until(MARGIN, || ping_from(&lab, ip)),
        "{ip} on VLAN {tag} over a macvlan on {} should reach the peer",
        carrier.nic
    );
    assert!(
        lab.sync_errors().is_empty(),
        "sync errors: {:?}",
        lab.sync_errors()
    );
}

/// Addresses per VNIC in the agent test: a handful of pods fit one secondary VNIC.
const PER_VNIC: u32 = 6;
const T: Duration = Duration::from_mins(1);

/// `ip -d link show dev NAME`, one line.
fn link_detail(lab: &SimLab, name: &str) -> String {
    lab.lab()
        .node()
        .ip(&["-o", "-d", "link", "show", "dev", name])
        .unwrap_or_else(|e| panic!("no link {name} in the node: {e:#}"))
}

/// Each pod opens a TCP connection to the VCN peer; the peer must see each pod's own address.
fn assert_pods_reach_the_peer(lab: &SimLab, agent: &NodeAgent, pods: &[CniPod], port: u16) {
    let peer = TcpServer::start(
        lab.lab().peer(),
        SocketAddr::from((lab.lab().peer_ip(), port)),
    )
    .expect("peer server");
    for pod in pods {
        let mut c = TcpConn::connect(&pod.ns, None, peer.addr(), Duration::from_secs(5))
            .unwrap_or_else(|e| {
                panic!(
                    "pod {} ({} on {}) → VCN peer: {e:#}\nagent log:\n{}",
                    pod.id,
                    pod.ip,
                    pod.interface,
                    agent.latest_log()
                )
            });
        c.roundtrip(b"vcn", T).expect("peer echo");
    }
    let seen: BTreeSet<IpAddr> = peer
        .wait_connections(pods.len(), T)
        .expect("the peer's connections")
        .iter()
        .map(|r| r.peer.ip())
        .collect();
    assert_eq!(
        seen,
        pods.iter().map(|p| IpAddr::V4(p.ip)).collect(),
        "the VCN peer sees each pod's own address"
    );
}

/// The agent on a bare-metal node: the pool grows to a secondary VNIC, placed on the NIC
/// with fewer VNICs (NIC 1: the primary is on NIC 0); the agent builds the macvlan (the
/// VNIC's MAC) on `ens2f1` and the VLAN `vlanTag` on it, addressed, up at MTU 9000; the pods
/// on that VNIC reach the VCN peer with their own address through it, also after an
/// agent restart, which adopts the same interfaces, and after the VLAN is deleted by hand,
/// which the agent builds again.
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one growth story, read top to bottom"
)]
fn lab_a_bare_metal_node_grows_to_a_secondary_vnic_and_its_pods_reach_the_peer_through_the_agents_vlan()
 {
    if !can_run("lab_baremetal_agent") {
        return;
    }
    let lab = SimLab::new(
        LabOptions::default(),
        SimConfig {
            ips_per_vnic: PER_VNIC,
            max_vnic_attachments: 3,
            ..bare_metal_config()
        },
    )
    .expect("a bare-metal simulator lab");
    let mut agent = NodeAgent::start_with(
        &lab,
        "bmgrow",
        AgentOptions {
            ips_per_vnic: PER_VNIC,
            warm_ips: 1,
            ..AgentOptions::default()
        },
    )
    .expect("vcnpath run");
    let pods = add_pods(&lab, &agent, "bm", 3, T);

    let snapshot = lab.sim().snapshot();
    let secondaries: Vec<serde_json::Value> = snapshot["attachments"]
        .as_array()
        .expect("attachments")
        .iter()
        .filter(|a| a["lifecycleState"] == "ATTACHED" && a["vnicId"] != snapshot["vnics"][0]["id"])
        .cloned()
        .collect();
    let vnic_id = pods_vnic(&agent, &pods);
    let attachment = secondaries
        .iter()
        .find(|a| a["vnicId"] == vnic_id.as_str())
        .unwrap_or_else(|| panic!("the pods' VNIC {vnic_id} is attached: {secondaries:?}"));
    assert_eq!(
        attachment["nicIndex"], 1,
        "the first new VNIC goes to the NIC without one (the primary is on NIC 0): {attachment}"
    );
    let carrier = lab
        .wait_for_vlan(&vnic_id, T)
        .expect("the lab carries the VNIC");
    let (macvlan, vlan) = (
        format!("{}.{}", carrier.nic, carrier.vlan_tag),
        format!("{}v{}", carrier.nic, carrier.vlan_tag),
    );
    assert!(
        pods.iter().all(|p| p.interface == vlan),
        "the pods live on the VLAN interface {vlan}: {:?}\nagent log:\n{}",
        pods.iter().map(|p| &p.interface).collect::<Vec<_>>(),
        agent.latest_log()
    );
    let shown = link_detail(&lab, &macvlan);
    assert!(
        shown.contains(&format!("{macvlan}@{}", carrier.nic))
            && shown.contains("macvlan")
            && shown.contains(&format!("link/ether {}", carrier.mac)),
        "the agent's macvlan on {} carries the VNIC's MAC {}: {shown}",
        carrier.nic,
        carrier.mac
    );
    let shown = link_detail(&lab, &vlan);
    assert!(
        shown.contains(&format!("{vlan}@{macvlan}"))
            && shown.contains(&format!("vlan protocol 802.1Q id {} ", carrier.vlan_tag))
            && shown.contains(",UP")
            && shown.contains("mtu 9000"),
        "the agent's VLAN {} on {macvlan}, up at MTU 9000: {shown}",
        carrier.vlan_tag
    );
    let primary_ip = vnic_ip(&lab, &vnic_id);
    let addrs = lab
        .lab()
        .node()
        .ip(&["-o", "-4", "addr", "show", "dev", &vlan])
        .expect("ip addr");
    assert!(
        addrs.contains(&format!("inet {primary_ip}/24")),
        "{vlan} carries the VNIC's primary IP {primary_ip}/24: {addrs}"
    );
    let ifindex_before = link_detail(&lab, &vlan)
        .split(':')
        .next()
        .expect("ifindex")
        .to_owned();

    assert_pods_reach_the_peer(&lab, &agent, &pods, 8080);
    assert_eq!(
        lab.router_drop_counts(carrier.slot)
            .expect("router counters")
            .total(),
        0,
        "the VCN router's source/destination check dropped packets of VNIC {vnic_id}"
    );

    // A restart adopts the interfaces it finds: same VLAN link, pods still served.
    agent.kill9().expect("kill -9");
    agent.restart(&lab).expect("vcnpath run again");
    std::thread::sleep(Duration::from_secs(2));
    let ifindex_after = link_detail(&lab, &vlan)
        .split(':')
        .next()
        .expect("ifindex")
        .to_owned();
    assert_eq!(
        ifindex_after,
        ifindex_before,
        "the restarted agent adopts {vlan} rather than rebuilding it\nagent log:\n{}",
        agent.latest_log()
    );
    assert_pods_reach_the_peer(&lab, &agent, &pods, 8081);

    // Someone deletes the VLAN by hand (or a network service flushes it): the agent builds it
    // again on the same macvlan and the pods reach the peer again through it.
    lab.lab()
        .node()
        .ip(&["link", "del", &vlan])
        .expect("delete the agent's VLAN");
    let rebuilt = wait_until(vcnpath_tests::scaled(Duration::from_secs(20)), || {
        lab.lab()
            .node()
            .ip(&["-o", "-4", "addr", "show", "dev", &vlan])
            .is_ok_and(|a| a.contains(&format!("inet {primary_ip}/24")))
            && link_detail(&lab, &vlan).contains(",UP")
    });
    assert!(
        rebuilt,
        "the agent rebuilds the deleted VLAN {vlan}, up and addressed\nagent log:\n{}",
        agent.latest_log()
    );
    assert_ne!(
        link_detail(&lab, &vlan).split(':').next().expect("ifindex"),
        ifindex_after,
        "{vlan} is a new link"
    );
    assert_pods_reach_the_peer(&lab, &agent, &pods, 8082);
}

/// The VNIC the pods' addresses are on (they all fit one).
fn pods_vnic(agent: &NodeAgent, pods: &[CniPod]) -> String {
    let status = agent.status().expect("status");
    let vnics: BTreeSet<String> = status["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .filter(|p| pods.iter().any(|pod| p["container_id"] == pod.id.as_str()))
        .map(|p| p["vnic"].as_str().expect("vnic").to_owned())
        .collect();
    assert_eq!(vnics.len(), 1, "the pods share one VNIC: {vnics:?}");
    vnics.into_iter().next().expect("one")
}
