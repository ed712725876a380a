//! The simulator's IP CIDR blocks, bulk calls and tenancy-wide throttling, driven through
//! the agent's signed OCI client as a caller sees them: which addresses a block takes, what
//! collides, what a fragmented subnet answers, how blocks count against a VNIC's limit, and
//! 429s shared by several instances of one tenancy.
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;
use std::sync::Arc;
use vcnpath::oci::models::{
    AttachVnicDetails, BulkCreatePrivateIpItem, BulkCreatePrivateIpsDetails,
    BulkDeletePrivateIpItem, BulkDeletePrivateIpsDetails, CreatePrivateIpDetails,
    CreateVnicDetails, PrivateIp, PrivateIpFilter,
};

use vcnpath::oci::{
    CoreClient, Endpoints, ImdsClient, InstancePrincipalAuth, OciError, RetryPolicy,
    new_retry_token,
};
use vcnpath_tests::ocikit::{api_key, config_file_client, fast_retries, register};
use vcnpath_tests::ocisim::{
    BulkConfig, CidrConfig, ErrorAnswer, LimitCount, RateLimit, SimConfig, Simulator, SubnetConfig,
};
use x509_cert::Certificate;
use x509_cert::der::DecodePem as _;

async fn start(config: SimConfig) -> (Simulator, CoreClient, tempfile::TempDir) {
    let sim = Simulator::start(config, "127.0.0.1:0")
        .await
        .expect("simulator starts");
    let key = api_key(&sim, "ocid1.user.oc1..cidr");
    register(&sim, &key);
    let client = config_file_client(&sim, &key.config, fast_retries());
    (sim, client, key.dir)
}

/// The primary VNIC of instance `instance` (the first one when `None`).
fn primary_vnic(sim: &Simulator, instance: Option<&str>) -> String {
    let instance = instance.map_or_else(|| sim.config().instance_id, str::to_owned);
    let state = sim.snapshot();
    let attached: Vec<&str> = state["attachments"]
        .as_array()
        .expect("attachments")
        .iter()
        .filter(|a| a["instanceId"] == instance.as_str())
        .filter_map(|a| a["vnicId"].as_str())
        .collect();
    state["vnics"]
        .as_array()
        .expect("vnics")
        .iter()
        .find(|v| v["isPrimary"] == true && attached.contains(&v["id"].as_str().unwrap_or("")))
        .and_then(|v| v["id"].as_str())
        .unwrap_or_else(|| panic!("instance {instance} has a primary VNIC"))
        .to_owned()
}

fn block(vnic: &str, at: Option<&str>, prefix: u8) -> CreatePrivateIpDetails {
    CreatePrivateIpDetails {
        vnic_id: vnic.into(),
        ip_address: at.map(str::to_owned),
        cidr_prefix_length: Some(prefix),
        ..Default::default()
    }
}

fn single(vnic: &str, at: Option<&str>) -> CreatePrivateIpDetails {
    CreatePrivateIpDetails {
        vnic_id: vnic.into(),
        ip_address: at.map(str::to_owned),
        ..Default::default()
    }
}

async fn create(client: &CoreClient, details: &CreatePrivateIpDetails) -> PrivateIp {
    client
        .create_private_ip(details, &new_retry_token())
        .await
        .unwrap_or_else(|e| panic!("CreatePrivateIp {details:?} must succeed, got {e}"))
}

async fn refused(client: &CoreClient, details: &CreatePrivateIpDetails) -> OciError {
    client
        .create_private_ip(details, &new_retry_token())
        .await
        .expect_err(&format!("CreatePrivateIp {details:?} must be refused"))
}

fn range_of(ip: &PrivateIp) -> Ipv4Net {
    let at: Ipv4Addr = ip.ip_address.parse().expect("ipAddress is an IPv4 address");
    Ipv4Net::new(at, ip.cidr_prefix_length.unwrap_or(32)).expect("a prefix of at most 32")
}

/// A subnet of its own for the primary VNIC, to lay addresses out by hand.
fn with_nodes_subnet(cidr: &str) -> SimConfig {
    SimConfig {
        subnets: vec![SubnetConfig {
            id: "ocid1.subnet.oc1.iad.simsmall".into(),
            display_name: "small".into(),
            cidr_block: cidr.into(),
            freeform_tags: std::collections::BTreeMap::new(),
        }],
        ..SimConfig::default()
    }
}

#[tokio::test]
async fn a_block_is_one_aligned_object_that_list_and_get_show_with_its_prefix() {
    let (sim, client, _key) = start(SimConfig::default()).await;
    let vnic = primary_vnic(&sim, None);
    let subnet: Ipv4Net = sim.config().subnets[0].cidr_block.parse().expect("CIDR");

    let first = create(&client, &block(&vnic, None, 28)).await;
    let one = create(&client, &single(&vnic, None)).await;
    let second = create(&client, &block(&vnic, None, 28)).await;

    for b in [&first, &second] {
        let range = range_of(b);
        assert_eq!(
            b.cidr_prefix_length,
            Some(28),
            "a block carries its prefix: {b:?}"
        );
        assert_eq!(
            range.network().to_string(),
            b.ip_address,
            "a /28 starts on a multiple of 16: {b:?}"
        );
        assert!(subnet.contains(&range), "{range} lies inside {subnet}");
        assert!(
            !range.contains(&subnet.network())
                && !range.contains(&Ipv4Addr::from(u32::from(subnet.network()) + 1))
                && !range.contains(&subnet.broadcast()),
            "{range} holds none of the subnet's reserved addresses (network, router, broadcast)"
        );
    }
    assert_eq!(
        one.cidr_prefix_length, None,
        "a single address has no prefix"
    );
    let one_ip: Ipv4Addr = one.ip_address.parse().expect("address");
    assert!(
        !range_of(&first).contains(&one_ip) && !range_of(&second).contains(&one_ip),
        "the single address {one_ip} is outside both blocks"
    );
    assert_ne!(
        range_of(&first),
        range_of(&second),
        "two blocks never overlap"
    );

    let listed = client
        .list_private_ips(&PrivateIpFilter::Vnic(vnic.clone()))
        .await
        .expect("ListPrivateIps");
    for b in [&first, &second] {
        let seen = listed
            .iter()
            .find(|p| p.id == b.id)
            .unwrap_or_else(|| panic!("block {} is listed: {listed:?}", b.id));
        assert_eq!(
            (seen.ip_address.as_str(), seen.cidr_prefix_length),
            (b.ip_address.as_str(), Some(28)),
            "ListPrivateIps shows the block as one object with cidrPrefixLength"
        );
    }
    assert_eq!(
        listed.len(),
        4,
        "primary + two blocks + one address, one object each: {listed:?}"
    );
    let got = client
        .get_private_ip(&first.id)
        .await
        .expect("GetPrivateIp");
    assert_eq!(
        (got.ip_address, got.cidr_prefix_length),
        (first.ip_address.clone(), Some(28))
    );
    let plain = client.get_private_ip(&one.id).await.expect("GetPrivateIp");
    assert_eq!(plain.cidr_prefix_length, None);
}

#[tokio::test]
async fn a_single_address_can_report_prefix_32_when_configured() {
    let config = SimConfig {
        cidr: CidrConfig {
            single_ip_prefix: Some(32),
            ..CidrConfig::default()
        },
        ..SimConfig::default()
    };
    let (sim, client, _key) = start(config).await;
    let vnic = primary_vnic(&sim, None);
    let one = create(&client, &single(&vnic, None)).await;
    assert_eq!(one.cidr_prefix_length, Some(32));
}

#[tokio::test]
async fn blocks_never_collide_with_addresses_other_blocks_or_reserved_addresses() {
    let (sim, client, _key) = start(SimConfig::default()).await;
    let vnic = primary_vnic(&sim, None);
    let code = |e: &OciError| (e.status(), e.code().map(str::to_owned));
    let invalid = (Some(400), Some("InvalidParameter".to_owned()));
    let conflict = (Some(409), Some("Conflict".to_owned()));

    let network = refused(&client, &block(&vnic, Some("10.0.0.0"), 28)).await;
    assert_eq!(
        code(&network),
        invalid,
        "a block over the network and router addresses: {network}"
    );
    let broadcast = refused(&client, &block(&vnic, Some("10.0.0.240"), 28)).await;
    assert_eq!(
        code(&broadcast),
        invalid,
        "a block over the broadcast address: {broadcast}"
    );
    let unaligned = refused(&client, &block(&vnic, Some("10.0.0.20"), 28)).await;
    assert_eq!(
        code(&unaligned),
        invalid,
        "a /28 must start on a multiple of 16: {unaligned}"
    );
    for prefix in [16, 17, 31] {
        let e = refused(&client, &block(&vnic, None, prefix)).await;
        assert_eq!(
            code(&e),
            invalid,
            "/{prefix} is outside the allowed /18–/30: {e}"
        );
    }

    create(&client, &single(&vnic, Some("10.0.0.50"))).await;
    let over_address = refused(&client, &block(&vnic, Some("10.0.0.48"), 28)).await;
    assert_eq!(
        code(&over_address),
        conflict,
        "10.0.0.50 is taken: {over_address}"
    );

    let big = create(&client, &block(&vnic, Some("10.0.0.64"), 27)).await;
    assert_eq!(big.ip_address, "10.0.0.64");
    let inside = refused(&client, &block(&vnic, Some("10.0.0.80"), 28)).await;
    assert_eq!(code(&inside), conflict, "inside another block: {inside}");
    let address_inside = refused(&client, &single(&vnic, Some("10.0.0.95"))).await;
    assert_eq!(
        code(&address_inside),
        conflict,
        "an address of another block: {address_inside}"
    );

    let wrong_cidr = CreatePrivateIpDetails {
        ipv4_subnet_cidr_at_creation: Some("10.9.0.0/24".into()),
        ..block(&vnic, None, 28)
    };
    let e = refused(&client, &wrong_cidr).await;
    assert_eq!(
        code(&e),
        invalid,
        "ipv4SubnetCidrAtCreation must be one of the subnet's: {e}"
    );
    let right_cidr = CreatePrivateIpDetails {
        ipv4_subnet_cidr_at_creation: Some("10.0.0.0/24".into()),
        ..block(&vnic, None, 28)
    };
    let b = create(&client, &right_cidr).await;
    assert_eq!(
        b.ipv4_subnet_cidr_at_creation.as_deref(),
        Some("10.0.0.0/24")
    );
}

#[tokio::test]
async fn a_fragmented_subnet_answers_the_configured_error_and_still_gives_single_addresses() {
    // 10.0.0.0/27: .0, .1 and .31 reserved, the primary at .2. Addresses at .8, .20 and .24
    // leave 25 free but no free aligned /29 (.0/29 and .24/29 hold reserved ones).
    for fragmented in [None, Some(("InvalidParameter", 400))] {
        let mut config = with_nodes_subnet("10.0.0.0/27");
        if let Some((code, status)) = fragmented {
            config.cidr.fragmented = ErrorAnswer {
                status,
                code: code.into(),
            };
        }
        let (sim, client, _key) = start(config).await;
        let vnic = primary_vnic(&sim, None);
        for at in ["10.0.0.8", "10.0.0.20", "10.0.0.24"] {
            create(&client, &single(&vnic, Some(at))).await;
        }
        let e = refused(&client, &block(&vnic, None, 29)).await;
        let expected = fragmented.map_or((400, "LimitExceeded"), |(c, s)| (s, c));
        assert_eq!(
            (e.status(), e.code()),
            (Some(expected.0), Some(expected.1)),
            "free addresses but no aligned /29: {e}"
        );
        assert!(
            e.to_string().contains("no free aligned /29"),
            "the message says why: {e}"
        );
        let four = create(&client, &block(&vnic, None, 30)).await;
        assert_eq!(four.ip_address, "10.0.0.4", "a /30 still fits at .4");
        let one = create(&client, &single(&vnic, None)).await;
        assert_eq!(one.ip_address, "10.0.0.3", "single addresses still come");
    }
    // Fewer free addresses than the block holds: the subnet is full for it.
    let (sim, client, _key) = start(with_nodes_subnet("10.0.0.0/29")).await;
    let vnic = primary_vnic(&sim, None);
    let e = refused(&client, &block(&vnic, None, 30)).await;
    assert_eq!(
        (e.status(), e.code()),
        (Some(400), Some("LimitExceeded")),
        "{e}"
    );
}

#[tokio::test]
async fn the_per_vnic_limit_counts_a_block_as_one_object_or_as_its_addresses() {
    let objects = SimConfig {
        ips_per_vnic: 4,
        ..SimConfig::default()
    };
    let (sim, client, _key) = start(objects).await;
    let vnic = primary_vnic(&sim, None);
    for _ in 0..4 {
        create(&client, &block(&vnic, None, 28)).await;
    }
    let e = refused(&client, &block(&vnic, None, 28)).await;
    assert_eq!(
        (e.status(), e.code()),
        (Some(400), Some("LimitExceeded")),
        "four /28s are four objects, the limit: {e}"
    );

    let addresses = SimConfig {
        ips_per_vnic: 20,
        cidr: CidrConfig {
            limit_counts: LimitCount::Addresses,
            ..CidrConfig::default()
        },
        ..SimConfig::default()
    };
    let (sim, client, _key) = start(addresses).await;
    let vnic = primary_vnic(&sim, None);
    create(&client, &block(&vnic, None, 28)).await;
    let small = create(&client, &block(&vnic, None, 30)).await;
    let e = refused(&client, &single(&vnic, None)).await;
    assert_eq!(
        (e.status(), e.code()),
        (Some(400), Some("LimitExceeded")),
        "16 + 4 addresses fill a limit of 20: {e}"
    );
    client
        .delete_private_ip(&small.id)
        .await
        .expect("DeletePrivateIp");
    create(&client, &single(&vnic, None)).await;
}

#[tokio::test]
async fn deleting_a_block_frees_every_address_of_it() {
    let (sim, client, _key) = start(SimConfig::default()).await;
    let vnic = primary_vnic(&sim, None);
    let b = create(&client, &block(&vnic, Some("10.0.0.32"), 27)).await;
    let e = refused(&client, &single(&vnic, Some("10.0.0.63"))).await;
    assert_eq!(e.status(), Some(409), "the block holds .63: {e}");
    client
        .delete_private_ip(&b.id)
        .await
        .expect("DeletePrivateIp");
    let gone = client.get_private_ip(&b.id).await.expect_err("deleted");
    assert_eq!(gone.status(), Some(404));
    for at in ["10.0.0.32", "10.0.0.63", "10.0.0.47"] {
        let one = create(&client, &single(&vnic, Some(at))).await;
        assert_eq!(one.ip_address, at, "{at} is free again");
    }
}

fn bulk_items(items: &[(Option<&str>, Option<u8>)]) -> Vec<BulkCreatePrivateIpItem> {
    items
        .iter()
        .map(|(at, prefix)| BulkCreatePrivateIpItem {
            ip_address: at.map(str::to_owned),
            cidr_prefix_length: *prefix,
            ..Default::default()
        })
        .collect()
}

async fn secondaries(client: &CoreClient, vnic: &str) -> Vec<PrivateIp> {
    let mut ips = client
        .list_private_ips(&PrivateIpFilter::Vnic(vnic.into()))
        .await
        .expect("ListPrivateIps");
    ips.retain(|p| !p.is_primary);
    ips
}

#[tokio::test]
async fn bulk_calls_create_and_delete_every_item_or_none() {
    let config = SimConfig {
        bulk: BulkConfig {
            max_items: Some(3),
            ..BulkConfig::default()
        },
        ..SimConfig::default()
    };
    let (sim, client, _key) = start(config).await;
    let vnic = primary_vnic(&sim, None);
    let details = BulkCreatePrivateIpsDetails {
        vnic_id: vnic.clone(),
        bulk_create_private_ip_item: bulk_items(&[
            (None, Some(28)),
            (Some("10.0.0.64"), Some(28)),
            (None, None),
        ]),
    };
    let token = new_retry_token();
    client
        .bulk_create_private_ips(&details, &token)
        .await
        .expect("BulkCreatePrivateIps");
    client
        .bulk_create_private_ips(&details, &token)
        .await
        .expect("the same call retried with its token");
    let created = secondaries(&client, &vnic).await;
    let mut shapes: Vec<Option<u8>> = created.iter().map(|p| p.cidr_prefix_length).collect();
    shapes.sort_unstable();
    assert_eq!(
        shapes,
        [None, Some(28), Some(28)],
        "one call made two blocks and one address, once despite the retry: {created:?}"
    );
    assert!(created.iter().any(|p| p.ip_address == "10.0.0.64"));

    // One item collides: nothing of the call is kept.
    let colliding = BulkCreatePrivateIpsDetails {
        vnic_id: vnic.clone(),
        bulk_create_private_ip_item: bulk_items(&[(None, Some(28)), (Some("10.0.0.70"), None)]),
    };
    client
        .bulk_create_private_ips(&colliding, &new_retry_token())
        .await
        .expect("accepted: the failure shows in the work request");
    assert_eq!(
        secondaries(&client, &vnic).await.len(),
        3,
        "a failed bulk create leaves no half of it behind"
    );

    let too_many = BulkCreatePrivateIpsDetails {
        vnic_id: vnic.clone(),
        bulk_create_private_ip_item: bulk_items(&[(None, None); 4]),
    };
    let e = client
        .bulk_create_private_ips(&too_many, &new_retry_token())
        .await
        .expect_err("four items, three allowed");
    assert_eq!(
        (e.status(), e.code()),
        (Some(400), Some("InvalidParameter")),
        "{e}"
    );

    let delete = BulkDeletePrivateIpsDetails {
        vnic_id: vnic.clone(),
        bulk_delete_private_ip_item: created
            .iter()
            .map(|p| BulkDeletePrivateIpItem {
                private_ip_id: p.id.clone(),
            })
            .collect(),
    };
    client
        .bulk_delete_private_ips(&delete, &new_retry_token())
        .await
        .expect("BulkDeletePrivateIps");
    assert!(
        secondaries(&client, &vnic).await.is_empty(),
        "every item deleted"
    );
    let again = create(&client, &block(&vnic, Some("10.0.0.64"), 28)).await;
    assert_eq!(
        again.ip_address, "10.0.0.64",
        "the deleted block's addresses are free"
    );
}

#[tokio::test]
async fn a_bulk_call_is_a_work_request_that_runs_after_it_is_answered() {
    let config = SimConfig {
        bulk: BulkConfig {
            work_request_ms: 400,
            ..BulkConfig::default()
        },
        ..SimConfig::default()
    };
    let (sim, client, _key) = start(config).await;
    let vnic = primary_vnic(&sim, None);
    let details = BulkCreatePrivateIpsDetails {
        vnic_id: vnic.clone(),
        bulk_create_private_ip_item: bulk_items(&[(None, Some(29)), (None, Some(29))]),
    };
    client
        .bulk_create_private_ips(&details, &new_retry_token())
        .await
        .expect("BulkCreatePrivateIps");
    assert!(
        secondaries(&client, &vnic).await.is_empty(),
        "answered before the work ran"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        secondaries(&client, &vnic).await.len(),
        2,
        "then the blocks exist"
    );
}

fn one_attempt() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 1,
        ..fast_retries()
    }
}

#[tokio::test]
async fn one_tenancy_wide_limit_throttles_every_instance_together() {
    let config = SimConfig {
        instance_count: 2,
        attach_delay_ms: 50,
        tenancy_rate_limit: Some(RateLimit {
            per_second: 4.0,
            burst: 4,
            ..RateLimit::default()
        }),
        ..SimConfig::default()
    };
    let sim = Simulator::start(config, "127.0.0.1:0")
        .await
        .expect("simulator starts");
    let ids = sim.instance_ids();
    assert_eq!(ids.len(), 2);
    let keys = [
        api_key(&sim, "ocid1.user.oc1..node0"),
        api_key(&sim, "ocid1.user.oc1..node1"),
    ];
    for key in &keys {
        register(&sim, key);
    }
    let node0 = config_file_client(&sim, &keys[0].config, one_attempt());
    let node1 = config_file_client(&sim, &keys[1].config, one_attempt());
    let vcn = sim.config().vcn.id;

    for n in 0..4 {
        node0
            .get_vcn(&vcn)
            .await
            .unwrap_or_else(|e| panic!("call {n} within the burst: {e}"));
    }
    let e = node1
        .get_vcn(&vcn)
        .await
        .expect_err("the other instance, another user, the same tenancy: over the budget");
    assert_eq!(
        (e.status(), e.code()),
        (Some(429), Some("TooManyRequests")),
        "{e}"
    );
    assert!(
        e.to_string().contains("Too many requests for the tenant"),
        "{e}"
    );
    assert_eq!(sim.throttled().get("GetVcn"), Some(&1));

    tokio::time::sleep(Duration::from_millis(600)).await;
    node1
        .get_vcn(&vcn)
        .await
        .expect("the budget refills at 4/s");
    sim.set_rate_limit(None);

    // Each instance has its own IMDS, primary VNIC and attachments.
    let imds1 = ImdsClient::new(&sim.imds_url_of(1), reqwest::Client::new()).expect("IMDS URL");
    let vnics1 = imds1.vnics().await.expect("IMDS vnics of instance 1");
    let primary1 = primary_vnic(&sim, Some(&ids[1]));
    assert_eq!(vnics1.len(), 1);
    assert_eq!(vnics1[0].vnic_id, primary1);
    assert_ne!(
        primary1,
        primary_vnic(&sim, None),
        "each instance its own primary VNIC"
    );
    let attach = AttachVnicDetails {
        instance_id: ids[1].clone(),
        create_vnic_details: CreateVnicDetails {
            subnet_id: sim.config().subnets[1].id.clone(),
            ..Default::default()
        },
        display_name: None,
        nic_index: None,
    };
    let attachment = node1
        .attach_vnic(&attach, &new_retry_token())
        .await
        .expect("AttachVnic to instance 1");
    let cfg = sim.config();
    let of = |instance: &str| {
        let (client, compartment, instance) =
            (&node0, cfg.compartment_id.clone(), instance.to_owned());
        async move {
            client
                .list_vnic_attachments(&compartment, Some(&instance))
                .await
                .expect("ListVnicAttachments")
        }
    };
    let on1 = of(&ids[1]).await;
    let on0 = of(&ids[0]).await;
    assert!(
        on1.iter().any(|a| a.id == attachment.id),
        "listed for instance 1"
    );
    assert!(
        !on0.iter().any(|a| a.id == attachment.id),
        "not for instance 0"
    );
    assert_eq!(on0.len(), 1, "instance 0 keeps only its primary: {on0:?}");
}

#[tokio::test]
async fn two_hundred_instances_share_one_simulator_each_with_its_own_imds() {
    let config = SimConfig {
        instance_count: 200,
        ..SimConfig::default()
    };
    let sim = Simulator::start(config, "127.0.0.1:0")
        .await
        .expect("a simulator with 200 instances starts");
    let instances = sim.instance_ids();
    assert_eq!(instances.len(), 200);
    let http = reqwest::Client::new();
    let mut primaries = std::collections::BTreeSet::new();
    for n in [0_u32, 1, 117, 199] {
        let imds = ImdsClient::new(&sim.imds_url_of(n), http.clone()).expect("IMDS URL");
        let instance = imds.instance().await.expect("IMDS instance");
        assert_eq!(
            instance.id, instances[n as usize],
            "IMDS {n} names its own instance"
        );
        let vnics = imds.vnics().await.expect("IMDS vnics");
        assert_eq!(vnics.len(), 1, "instance {n} has only its primary VNIC");
        primaries.insert(vnics[0].vnic_id.clone());
    }
    assert_eq!(primaries.len(), 4, "no two instances share a primary VNIC");
    let past = ImdsClient::new(&sim.imds_url_of(200), http).expect("IMDS URL");
    assert!(past.instance().await.is_err(), "there is no instance 200");
}

#[tokio::test]
async fn every_instance_signs_in_as_itself_through_its_own_imds() {
    let config = SimConfig {
        instance_count: 3,
        ..SimConfig::default()
    };
    let sim = Simulator::start(config, "127.0.0.1:0")
        .await
        .expect("simulator starts");
    let instances = sim.instance_ids();
    let http = reqwest::Client::new();
    let endpoints = Endpoints::single(&sim.base_url()).expect("endpoints");
    let mut certificates = std::collections::BTreeSet::new();
    for n in [0_u32, 2] {
        let imds = ImdsClient::new(&sim.imds_url_of(n), http.clone()).expect("IMDS URL");
        let identity = imds
            .identity()
            .await
            .unwrap_or_else(|e| panic!("IMDS of instance {n} serves an instance certificate: {e}"));
        let cert = Certificate::from_pem(identity.cert_pem.as_bytes()).expect("PEM certificate");
        let subject = cert.tbs_certificate.subject.to_string();
        assert!(
            subject.contains(&format!("opc-instance:{}", instances[n as usize])),
            "instance {n}'s certificate names it: {subject}"
        );
        certificates.insert(identity.cert_pem.clone());
        let auth = Arc::new(InstancePrincipalAuth::new(
            imds,
            &endpoints.auth,
            http.clone(),
        ));
        let client = CoreClient::new(
            http.clone(),
            &endpoints,
            auth,
            one_attempt(),
            vcnpath_tests::ocikit::unlimited(),
        );
        let attachments = client
            .list_vnic_attachments(&sim.config().compartment_id, Some(&instances[n as usize]))
            .await
            .unwrap_or_else(|e| panic!("instance {n} signed in as itself calls OCI: {e}"));
        assert_eq!(attachments.len(), 1, "instance {n}: its primary VNIC");
    }
    assert_eq!(
        certificates.len(),
        2,
        "each instance has its own certificate"
    );
}
