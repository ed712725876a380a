//! A bare-metal node (`BM.*` shape) in the simulator-driven lab: the node has its two
//! physical NICs only, and a secondary VNIC is never a link of its own but VLAN `vlanTag`
//! traffic on the physical NIC of its `nicIndex`, which the guest must terminate with a
//! macvlan (the VNIC's MAC) and a VLAN on top, as Oracle's oci-utils does. Needs root and a
//! kernel with 802.1Q VLANs (the VM tier's kernels; some development kernels lack it).

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vcnpath::oci::models::{AttachVnicDetails, CreateVnicDetails};
use vcnpath::oci::{CoreClient, new_retry_token};
use vcnpath_tests::lab::process::output;
use vcnpath_tests::lab::{LabOptions, PEER_IP, SimLab, cmd_in, lab_sim_config};
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
