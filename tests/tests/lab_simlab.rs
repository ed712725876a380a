//! The simulator-driven lab checked against OCI's behaviour: VNICs appear in the node when
//! the simulator attaches them, named as a VM guest names them (`ens4`, `ens5`, … in order
//! of appearance; every VNIC of a VM has `nicIndex` 0), the router's source/destination
//! check follows the simulator's private IPs, and the simulator is reachable from the node
//! namespace. Needs root; each test builds its own lab.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vcnpath::oci::models::{AttachVnicDetails, CreatePrivateIpDetails, CreateVnicDetails};
use vcnpath::oci::{CoreClient, new_retry_token};
use vcnpath_tests::lab::process::{output, run};
use vcnpath_tests::lab::{LabOptions, PEER_IP, SimLab, cmd_in, lab_sim_config};
use vcnpath_tests::ocikit::{fast_retries, instance_principal_client};
use vcnpath_tests::ocisim::{EventKind, SimConfig};
use vcnpath_tests::privileged::have_root;

/// The simulator's attach/detach delay in these tests, and the margin on top of it within
/// which the lab must have followed.
const ATTACH_DELAY: Duration = Duration::from_millis(300);
const MARGIN: Duration = Duration::from_secs(2);

fn config() -> SimConfig {
    SimConfig {
        attach_delay_ms: u64::try_from(ATTACH_DELAY.as_millis()).expect("small"),
        ..lab_sim_config()
    }
}

fn new_lab() -> SimLab {
    SimLab::new(LabOptions::default(), config()).expect("building the simulator lab")
}

/// An instance-principal client: IMDS certificate, federation, session token, all served
/// on the node's loopback.
fn client(lab: &SimLab) -> Arc<CoreClient> {
    Arc::new(instance_principal_client(lab.sim(), fast_retries()).0)
}

/// Attaches a VNIC in subnet `subnet` through the OCI API; returns (attachment, VNIC) ids
/// once ATTACHED.
fn attach(lab: &SimLab, client: &Arc<CoreClient>, subnet: usize) -> (String, String) {
    let cfg = lab.sim().config();
    let details = AttachVnicDetails {
        instance_id: cfg.instance_id.clone(),
        create_vnic_details: CreateVnicDetails {
            subnet_id: cfg.subnets[subnet].id.clone(),
            ..Default::default()
        },
        display_name: Some("lab-test".into()),
        nic_index: None,
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

fn listed_namespaces() -> HashSet<String> {
    run(Command::new("ip").args(["netns", "list"]))
        .expect("ip netns list")
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn lab_namespaces_left(prefix: &str) -> Vec<String> {
    listed_namespaces()
        .into_iter()
        .filter(|name| name.starts_with(&format!("{prefix}-")))
        .collect()
}

/// The attachment `id` as the simulator holds it.
fn attachment_json(lab: &SimLab, id: &str) -> serde_json::Value {
    lab.sim().snapshot()["attachments"]
        .as_array()
        .expect("attachments")
        .iter()
        .find(|a| a["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("no attachment {id} in the simulator"))
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one attach/detach story, read top to bottom"
)]
fn attaching_vnics_creates_ens4_and_ens5_with_the_reported_macs_and_detaching_removes_them() {
    if !have_root("lab_simlab") {
        return;
    }
    let lab = new_lab();
    let client = client(&lab);
    let mut events = lab.sim().subscribe();
    let started = Instant::now();
    let (attachment, vnic_id) = attach(&lab, &client, 1);
    // Counted from the AttachVnic call: the attach delay plus the margin, in all.
    let budget = (ATTACH_DELAY + MARGIN).saturating_sub(started.elapsed());
    let link = lab
        .wait_for_vnic(&vnic_id, budget)
        .expect("the VNIC appears in the node namespace within the attach delay and a margin");
    assert_eq!(
        link.ifname, "ens4",
        "the first secondary VNIC of a VM appears as ens4 (the primary is ens3)"
    );
    let event = events.try_recv().expect("an ATTACHED event was sent");
    assert_eq!(event.kind, EventKind::Attached, "first event: {event:?}");
    assert_eq!(event.vnic_id, vnic_id, "the event names the attached VNIC");
    assert_eq!(
        link.mac.to_string(),
        event.mac.to_lowercase(),
        "ens4 must carry the MAC the simulator reported"
    );
    assert_eq!(
        attachment_json(&lab, &attachment)["nicIndex"],
        0,
        "on a VM every VNIC is on physical NIC 0"
    );

    let node = lab.lab().node();
    let shown = node.ip(&["-o", "link", "show", "dev", "ens4"]).unwrap();
    assert!(
        shown.contains("state DOWN") && shown.contains("mtu 1500"),
        "a new VNIC is handed over down at MTU 1500 (the agent brings it up and sets 9000), saw: {shown}"
    );
    let addrs = node
        .ip(&["-o", "-4", "addr", "show", "dev", "ens4"])
        .unwrap();
    assert!(
        addrs.trim().is_empty(),
        "a new VNIC has no address until the agent sets one, saw: {addrs}"
    );
    let gateway = lab
        .lab()
        .router()
        .ip(&["-o", "-4", "addr", "show", "dev", "r1"])
        .unwrap();
    assert!(
        gateway.contains(&format!("{}/24", event.virtual_router_ip)),
        "the router's end should be subnet B's virtual router {}, saw: {gateway}",
        event.virtual_router_ip
    );
    assert_eq!(lab.router_drops(1).unwrap(), 0, "a fresh VNIC has no drops");

    // A second VNIC on the same physical NIC: no conflict, the next name.
    let (second_attachment, second) = attach(&lab, &client, 2);
    let second_link = lab
        .wait_for_vnic(&second, MARGIN)
        .expect("a second VNIC appears");
    assert_eq!(
        second_link.ifname, "ens5",
        "the second secondary VNIC is ens5"
    );
    assert_eq!(attachment_json(&lab, &second_attachment)["nicIndex"], 0);

    let detach_client = Arc::clone(&client);
    lab.block_on(async move { detach_client.detach_vnic(&attachment).await })
        .expect("DetachVnic");
    lab.wait_for_vnic_gone(&vnic_id, ATTACH_DELAY + MARGIN)
        .expect("ens4 leaves the node namespace after the detach");
    assert!(
        node.ip(&["link", "show", "dev", "ens4"]).is_err(),
        "ens4 should be gone"
    );
    assert!(
        lab.lab()
            .router()
            .ip(&["link", "show", "dev", "r1"])
            .is_err(),
        "the router's end of ens4 should be gone too"
    );
    assert!(
        lab.router_drops(1).is_err(),
        "a detached VNIC should have no counters left in the router"
    );
    assert_eq!(
        lab.wait_for_vnic(&second, MARGIN)
            .expect("still there")
            .ifname,
        "ens5",
        "the other VNIC keeps its name"
    );
    let (_, third) = attach(&lab, &client, 3);
    assert_eq!(
        lab.wait_for_vnic(&third, MARGIN)
            .expect("a third VNIC appears")
            .ifname,
        "ens4",
        "a new VNIC takes the free name, as a hot-plugged NIC takes the free slot"
    );
    assert!(
        lab.sync_errors().is_empty(),
        "sync errors: {:?}",
        lab.sync_errors()
    );
}

/// Pings the peer from the node with source `src` (routed out of ens4); true if answered.
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
        // A probe that fails at once (no route yet) must not spin.
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn router_passes_a_source_only_while_the_simulator_assigns_it_to_the_vnic() {
    if !have_root("lab_simlab") {
        return;
    }
    let lab = new_lab();
    let client = client(&lab);
    let (_attachment, vnic_id) = attach(&lab, &client, 1);
    let link = lab
        .wait_for_vnic(&vnic_id, MARGIN)
        .expect("the VNIC appears");
    assert_eq!(link.ifname, "ens4");

    // What the agent would do; no agent runs here. The extra address is on ens4 so the
    // node answers for it, and the route sends traffic to the peer out of ens4.
    let node = lab.lab().node();
    let primary = lab.sim().snapshot()["vnics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == vnic_id.as_str())
        .and_then(|v| v["privateIp"].as_str())
        .expect("the VNIC's primary IP")
        .to_owned();
    let extra = Ipv4Addr::new(10, 0, 1, 77);
    node.ip(&["addr", "add", &format!("{primary}/24"), "dev", "ens4"])
        .unwrap();
    node.ip(&["addr", "add", &format!("{extra}/32"), "dev", "ens4"])
        .unwrap();
    node.ip(&["link", "set", "ens4", "up"]).unwrap();
    node.ip(&[
        "route",
        "add",
        &format!("{PEER_IP}/32"),
        "via",
        "10.0.1.1",
        "dev",
        "ens4",
    ])
    .unwrap();

    // Retried: a link just set up may drop its first packets until the kernel activates
    // its queue (link events are processed up to a second later).
    assert!(
        wait_until(MARGIN, || ping_from(&lab, primary.parse().unwrap())),
        "the VNIC's primary IP {primary} should reach the peer"
    );
    assert!(
        !ping_from(&lab, extra),
        "{extra} is not assigned in the simulator: the router should drop it"
    );
    let dropped = lab.router_drop_counts_of(&vnic_id).unwrap();
    assert!(
        dropped.source >= 1,
        "expected a source-check drop on VNIC 1, saw {dropped:?}"
    );

    let create_client = Arc::clone(&client);
    let details = CreatePrivateIpDetails {
        vnic_id: vnic_id.clone(),
        ip_address: Some(extra.to_string()),
        ..Default::default()
    };
    let ip = lab
        .block_on(async move {
            create_client
                .create_private_ip(&details, &new_retry_token())
                .await
        })
        .expect("CreatePrivateIp");
    assert!(
        wait_until(MARGIN, || ping_from(&lab, extra)),
        "{extra} is assigned to the VNIC now: the router should pass it"
    );
    let before = lab.router_drop_counts(1).unwrap();
    assert!(
        ping_from(&lab, extra),
        "{extra} should keep reaching the peer"
    );
    assert_eq!(
        lab.router_drop_counts(1).unwrap(),
        before,
        "nothing should be dropped while {extra} is assigned"
    );

    let delete_client = Arc::clone(&client);
    lab.block_on(async move { delete_client.delete_private_ip(&ip.id).await })
        .expect("DeletePrivateIp");
    assert!(
        wait_until(MARGIN, || !ping_from(&lab, extra)),
        "{extra} was unassigned: the router should drop it again"
    );
    assert!(
        lab.sync_errors().is_empty(),
        "sync errors: {:?}",
        lab.sync_errors()
    );
}

#[test]
fn the_simulator_answers_inside_the_node_namespace_and_not_outside() {
    if !have_root("lab_simlab") {
        return;
    }
    let lab = new_lab();
    let endpoints = lab.agent_endpoints();
    let url = format!("{}instance/", endpoints.imds_url);
    let curl = |cmd: &mut Command| {
        output(cmd.args(["-sS", "-m", "5", "-H", "Authorization: Bearer Oracle", &url]))
            .expect("running curl")
    };
    let inside = curl(&mut cmd_in(lab.lab().node(), "curl"));
    let body = String::from_utf8_lossy(&inside.stdout);
    let instance_id = lab.sim().config().instance_id;
    assert!(
        inside.status.success() && body.contains(&instance_id),
        "curl {url} in the node namespace should get instance {instance_id}, saw {}: {body} {}",
        inside.status,
        String::from_utf8_lossy(&inside.stderr)
    );
    assert!(
        endpoints.oci_endpoint.starts_with("http://127.0.0.1:")
            && url.starts_with(&endpoints.oci_endpoint),
        "both endpoints should be on the node's loopback: {endpoints:?}"
    );

    let outside = curl(&mut Command::new("curl"));
    assert!(
        !String::from_utf8_lossy(&outside.stdout).contains(&instance_id),
        "the simulator must not be reachable from the root namespace at {url}"
    );
}

#[test]
fn dropping_a_simlab_deletes_its_namespaces_also_after_a_panic() {
    if !have_root("lab_simlab") {
        return;
    }
    let lab = new_lab();
    let prefix = lab.lab().id().to_owned();
    let client = client(&lab);
    let (_, vnic_id) = attach(&lab, &client, 2);
    lab.wait_for_vnic(&vnic_id, MARGIN)
        .expect("a VNIC in subnet C appears");
    let pod = lab
        .lab()
        .add_pod_netns("empty")
        .expect("an empty pod namespace");
    let links = pod.ip(&["-o", "link", "show"]).unwrap();
    assert_eq!(
        links.lines().count(),
        1,
        "an empty pod netns holds only lo, saw: {links}"
    );
    assert_eq!(
        lab_namespaces_left(&prefix).len(),
        5,
        "node, router, peer, inet, pod"
    );
    drop(client);
    drop(pod);
    drop(lab);
    let left = lab_namespaces_left(&prefix);
    assert!(
        left.is_empty(),
        "expected every namespace of {prefix} deleted, saw {left:?}"
    );

    let mut prefix = String::new();
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let lab = new_lab();
        prefix = lab.lab().id().to_owned();
        let _pod = lab.lab().add_pod_netns("panic").unwrap();
        panic!("deliberate panic with a simulator lab alive");
    }));
    assert!(outcome.is_err(), "the body should have panicked");
    let left = lab_namespaces_left(&prefix);
    assert!(
        left.is_empty(),
        "expected every namespace of {prefix} deleted after the panic, saw {left:?}"
    );
}
