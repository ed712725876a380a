//! The official OCI CLI (`oci-cli`, from `PyPI`), configured with an API key registered in the
//! simulator and pointed at it with `--endpoint`, drives every operation the agent uses.
//! Each command must succeed and return what the simulator holds; with a key the
//! simulator does not know, the CLI must get `NotAuthenticated`. This proves the
//! simulator's API shapes and signature checks match what real OCI clients send and expect.

use std::{path::PathBuf, process::Command};

use serde_json::Value;
use vcnpath_tests::{
    ocikit::{ApiKey, api_key, python, register},
    ocisim::{SimConfig, Simulator},
};

/// Runs `oci <args…> --config-file … --endpoint …` and returns (success, stdout JSON, stderr).
fn oci(cli: &PathBuf, key: &ApiKey, endpoint: &str, args: &[&str]) -> (bool, Value, String) {
    let out = Command::new(cli)
        .args(args)
        .args(["--config-file"])
        .arg(&key.config)
        .args([
            "--endpoint",
            endpoint,
            "--auth",
            "api_key",
            "--output",
            "json",
        ])
        .env("OCI_CLI_SUPPRESS_FILE_PERMISSIONS_WARNING", "True")
        .env("SUPPRESS_LABEL_WARNING", "True")
        .output()
        .expect("the oci CLI runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (
        out.status.success(),
        json,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(cli: &PathBuf, key: &ApiKey, endpoint: &str, args: &[&str]) -> Value {
    let (success, json, stderr) = oci(cli, key, endpoint, args);
    assert!(success, "`oci {}` failed: {stderr}", args.join(" "));
    json
}

/// The prefix length the CLI printed for a private IP, and the block it names.
fn prefix_of(ip: &Value) -> (u64, ipnet::Ipv4Net) {
    let prefix = ip["cidr-prefix-length"]
        .as_u64()
        .unwrap_or_else(|| panic!("a block has cidr-prefix-length: {ip}"));
    let at: std::net::Ipv4Addr = ip["ip-address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("ip-address: {ip}"));
    let block = ipnet::Ipv4Net::new(at, u8::try_from(prefix).expect("prefix")).expect("prefix");
    assert_eq!(
        block.network(),
        at,
        "a block starts on its own boundary: {ip}"
    );
    (prefix, block)
}

/// IP CIDR blocks as the CLI (and the Python SDK under it) creates, reads, lists and
/// deletes them, one at a time and in bulk calls it waits on as work requests.
#[expect(clippy::too_many_lines, reason = "one walk through the block commands")]
fn cidr_blocks(run: &dyn Fn(&[&str]) -> Value, vnic_id: &str) {
    let created = run(&[
        "network",
        "private-ip",
        "create",
        "--vnic-id",
        vnic_id,
        "--cidr-prefix-length",
        "28",
    ]);
    let (prefix, block) = prefix_of(&created["data"]);
    assert_eq!(prefix, 28);
    let block_id = created["data"]["id"].as_str().expect("block id").to_owned();
    let got = run(&["network", "private-ip", "get", "--private-ip-id", &block_id]);
    assert_eq!(
        prefix_of(&got["data"]),
        (28, block),
        "GetPrivateIp reads the block back"
    );

    // oci-cli's own extended command: a chosen block, read back with GetPrivateIp.
    let assigned = run(&[
        "network",
        "vnic",
        "assign-private-ip",
        "--vnic-id",
        vnic_id,
        "--ip-address",
        "10.0.0.128",
        "--cidr-prefix-length",
        "27",
    ]);
    assert_eq!(
        prefix_of(&assigned["data"]),
        (27, "10.0.0.128/27".parse().expect("CIDR"))
    );

    let listed = run(&[
        "network",
        "private-ip",
        "list",
        "--vnic-id",
        vnic_id,
        "--all",
    ]);
    let items = listed["data"].as_array().expect("list");
    let blocks: Vec<u64> = items
        .iter()
        .filter_map(|p| p["cidr-prefix-length"].as_u64())
        .collect();
    assert_eq!(
        blocks.len(),
        2,
        "both blocks listed with their prefix: {listed}"
    );
    assert!(blocks.contains(&28) && blocks.contains(&27), "{listed}");

    // Bulk: the CLI waits on the work request (Work Requests' GetWorkRequest).
    let bulk = run(&[
        "network",
        "private-ip",
        "bulk-create",
        "--vnic-id",
        vnic_id,
        "--bulk-create-private-ip-item",
        r#"[{"cidrPrefixLength": 29}, {"cidrPrefixLength": 30}]"#,
        "--wait-for-state",
        "SUCCEEDED",
        "--wait-interval-seconds",
        "1",
        "--max-wait-seconds",
        "20",
    ]);
    assert_eq!(bulk["data"]["status"], "SUCCEEDED", "{bulk}");
    let made: Vec<String> = bulk["data"]["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| {
            assert_eq!(r["action-type"], "CREATED", "{r}");
            r["identifier"].as_str().expect("identifier").to_owned()
        })
        .collect();
    assert_eq!(made.len(), 2, "one resource per item: {bulk}");
    let mut sizes: Vec<u64> = made
        .iter()
        .map(|id| {
            prefix_of(&run(&["network", "private-ip", "get", "--private-ip-id", id])["data"]).0
        })
        .collect();
    sizes.sort_unstable();
    assert_eq!(sizes, [29, 30]);
    // With one item the CLI fetches the resource the work request names.
    let one = run(&[
        "network",
        "private-ip",
        "bulk-create",
        "--vnic-id",
        vnic_id,
        "--bulk-create-private-ip-item",
        r#"[{"cidrPrefixLength": 28}]"#,
        "--wait-for-state",
        "SUCCEEDED",
        "--wait-interval-seconds",
        "1",
        "--max-wait-seconds",
        "20",
    ]);
    assert_eq!(
        prefix_of(&one["data"]).0,
        28,
        "the created block itself: {one}"
    );
    let one_id = one["data"]["id"].as_str().expect("id").to_owned();

    let items: Vec<Value> = made
        .iter()
        .chain([&one_id])
        .map(|id| serde_json::json!({ "privateIpId": id }))
        .collect();
    let deleted = run(&[
        "network",
        "private-ip",
        "bulk-delete",
        "--vnic-id",
        vnic_id,
        "--bulk-delete-private-ip-item",
        &Value::Array(items).to_string(),
        "--wait-for-state",
        "SUCCEEDED",
        "--wait-interval-seconds",
        "1",
        "--max-wait-seconds",
        "20",
    ]);
    assert_eq!(deleted["data"]["status"], "SUCCEEDED", "{deleted}");
    for id in [&block_id, assigned["data"]["id"].as_str().expect("id")] {
        run(&[
            "network",
            "private-ip",
            "delete",
            "--private-ip-id",
            id,
            "--force",
        ]);
    }
    let left = run(&[
        "network",
        "private-ip",
        "list",
        "--vnic-id",
        vnic_id,
        "--all",
    ]);
    assert!(
        left["data"]
            .as_array()
            .expect("list")
            .iter()
            .all(|p| p["cidr-prefix-length"].is_null()),
        "every block is gone: {left}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::too_many_lines,
    reason = "one walk through every CLI operation the agent uses"
)]
async fn the_official_oci_cli_works_against_the_simulator() {
    let cli = match python() {
        Ok(python) => python.with_file_name("oci"),
        Err(reason) => {
            println!("skipping: {reason}");
            return;
        }
    };
    let config = SimConfig {
        attach_delay_ms: 200,
        page_size: 2,
        ..SimConfig::default()
    };
    let sim = Simulator::start(config, "127.0.0.1:0")
        .await
        .expect("simulator starts");
    let cfg = sim.config();
    let key = api_key(&sim, "ocid1.user.oc1..cli");
    register(&sim, &key);
    let endpoint = sim.base_url();
    let subnet = cfg.subnets[0].id.clone();

    let result = tokio::task::spawn_blocking(move || {
        let run = |args: &[&str]| ok(&cli, &key, &endpoint, args);

        let vcn = run(&["network", "vcn", "get", "--vcn-id", &cfg.vcn.id]);
        assert_eq!(vcn["data"]["id"], cfg.vcn.id.as_str());
        let blocks: Vec<&str> = vcn["data"]["cidr-blocks"]
            .as_array()
            .expect("cidr-blocks")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(
            blocks,
            cfg.vcn
                .cidr_blocks
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            "every CIDR block of the VCN"
        );

        let subnets = run(&[
            "network",
            "subnet",
            "list",
            "--compartment-id",
            &cfg.network_compartment_id,
            "--vcn-id",
            &cfg.vcn.id,
            "--all",
        ]);
        let listed = subnets["data"].as_array().expect("subnet list").len();
        assert_eq!(
            listed,
            cfg.subnets.len(),
            "pagination (page size 2) is followed to every subnet"
        );
        let got = run(&["network", "subnet", "get", "--subnet-id", &subnet]);
        assert_eq!(
            got["data"]["cidr-block"],
            cfg.subnets[0].cidr_block.as_str()
        );

        let vnic = run(&[
            "compute",
            "instance",
            "attach-vnic",
            "--instance-id",
            &cfg.instance_id,
            "--subnet-id",
            &subnet,
            "--wait",
        ]);
        let vnic_id = vnic["data"]["id"]
            .as_str()
            .expect("attach-vnic returns the new VNIC")
            .to_owned();
        let attachments = run(&[
            "compute",
            "vnic-attachment",
            "list",
            "--compartment-id",
            &cfg.compartment_id,
            "--instance-id",
            &cfg.instance_id,
            "--all",
        ]);
        let attachment = attachments["data"]
            .as_array()
            .expect("attachment list")
            .iter()
            .find(|a| a["vnic-id"] == vnic_id.as_str())
            .expect("the new VNIC is listed")
            .clone();
        assert_eq!(attachment["lifecycle-state"], "ATTACHED");
        let attachment_id = attachment["id"].as_str().expect("attachment id").to_owned();
        let fetched = run(&[
            "compute",
            "vnic-attachment",
            "get",
            "--vnic-attachment-id",
            &attachment_id,
        ]);
        assert_eq!(fetched["data"]["vnic-id"], vnic_id.as_str());
        let got_vnic = run(&["network", "vnic", "get", "--vnic-id", &vnic_id]);
        assert_eq!(got_vnic["data"]["subnet-id"], subnet.as_str());
        assert_eq!(got_vnic["data"]["is-primary"], false);

        let created = run(&[
            "network",
            "private-ip",
            "create",
            "--vnic-id",
            &vnic_id,
            "--display-name",
            "cli-pod",
        ]);
        let ip_id = created["data"]["id"]
            .as_str()
            .expect("private IP id")
            .to_owned();
        let address = created["data"]["ip-address"]
            .as_str()
            .expect("address")
            .to_owned();
        let listed = run(&[
            "network",
            "private-ip",
            "list",
            "--vnic-id",
            &vnic_id,
            "--all",
        ]);
        assert!(
            listed["data"]
                .as_array()
                .expect("list")
                .iter()
                .any(|p| p["ip-address"] == address.as_str()),
            "the new private IP {address} is listed"
        );
        let got_ip = run(&["network", "private-ip", "get", "--private-ip-id", &ip_id]);
        assert_eq!(got_ip["data"]["ip-address"], address.as_str());
        assert!(
            got_ip["data"]["cidr-prefix-length"].is_null(),
            "a single address has no prefix: {got_ip}"
        );
        cidr_blocks(&run, &vnic_id);
        run(&[
            "network",
            "private-ip",
            "delete",
            "--private-ip-id",
            &ip_id,
            "--force",
        ]);
        let (gone, _, stderr) = oci(
            &cli,
            &key,
            &endpoint,
            &["network", "private-ip", "get", "--private-ip-id", &ip_id],
        );
        assert!(
            !gone && stderr.contains("NotAuthorizedOrNotFound"),
            "a deleted private IP is gone: {stderr}"
        );

        run(&[
            "compute",
            "instance",
            "detach-vnic",
            "--vnic-id",
            &vnic_id,
            "--compartment-id",
            &cfg.compartment_id,
            "--force",
        ]);
        (vnic_id, address)
    })
    .await
    .expect("CLI walk");

    // What the CLI did is what the simulator holds.
    let state = sim.snapshot();
    assert!(
        !state["privateIps"]
            .as_array()
            .expect("privateIps")
            .iter()
            .any(|p| p["ipAddress"] == result.1.as_str()),
        "the simulator no longer holds {}",
        result.1
    );

    // A key the simulator does not know is refused.
    let stranger = api_key(&sim, "ocid1.user.oc1..stranger");
    let cli = python().expect("venv").with_file_name("oci");
    let endpoint = sim.base_url();
    let vcn_id = sim.config().vcn.id;
    let (success, _, stderr) = tokio::task::spawn_blocking(move || {
        oci(
            &cli,
            &stranger,
            &endpoint,
            &["network", "vcn", "get", "--vcn-id", &vcn_id],
        )
    })
    .await
    .expect("CLI run");
    assert!(
        !success && stderr.contains("NotAuthenticated"),
        "an unregistered key must get NotAuthenticated, got: {stderr}"
    );
}
