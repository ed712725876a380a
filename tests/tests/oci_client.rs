//! The agent's OCI client against the simulator, in both authentication modes.
use std::time::{Duration, Instant};

use vcnpath::oci::models::{
    AttachVnicDetails, AttachmentState, CreatePrivateIpDetails, CreateVnicDetails, PrivateIpFilter,
};
use vcnpath::oci::{CoreClient, ImdsClient, OciError, RateLimit, RetryPolicy, new_retry_token};
use vcnpath_tests::ocikit::{
    ApiKey, api_key, config_file_client, config_file_client_at, fast_retries,
    instance_principal_client, register,
};
use vcnpath_tests::ocisim::{
    EventKind, FaultRule, Faults, RateLimit as TenancyBudget, SimConfig, Simulator,
};

async fn sim(config: SimConfig) -> Simulator {
    Simulator::start(config, "127.0.0.1:0")
        .await
        .expect("simulator starts")
}

/// A simulator and a registered API key of a node user.
async fn with_node_key(config: SimConfig) -> (Simulator, ApiKey) {
    let sim = sim(config).await;
    let key = api_key(&sim, "ocid1.user.oc1..node");
    register(&sim, &key);
    (sim, key)
}

fn small_limits() -> SimConfig {
    SimConfig {
        ips_per_vnic: 7,
        page_size: 3,
        attach_delay_ms: 200,
        ..SimConfig::default()
    }
}

/// Attach → ATTACHED → fill with IPs until `LimitExceeded` → list (paginated) → delete → detach.
#[expect(
    clippy::too_many_lines,
    reason = "one end-to-end story, read top to bottom"
)]
async fn vnic_cycle(sim: &Simulator, client: &CoreClient) {
    let cfg = sim.config();
    let pods = &cfg.subnets[1];
    let mut events = sim.subscribe();
    let details = AttachVnicDetails {
        instance_id: cfg.instance_id.clone(),
        create_vnic_details: CreateVnicDetails {
            subnet_id: pods.id.clone(),
            ..Default::default()
        },
        display_name: Some("pods-1".into()),
        nic_index: None,
    };
    let token = new_retry_token();
    let attachment = client
        .attach_vnic(&details, &token)
        .await
        .expect("AttachVnic");
    assert_eq!(
        attachment.lifecycle_state,
        AttachmentState::Attaching,
        "a new attachment starts ATTACHING"
    );
    let again = client
        .attach_vnic(&details, &token)
        .await
        .expect("AttachVnic retried with the same token");
    assert_eq!(
        again.id, attachment.id,
        "the same opc-retry-token must return the same attachment"
    );

    let attached = client
        .wait_attached(&attachment.id, Duration::from_secs(10))
        .await
        .expect("becomes ATTACHED");
    let vnic_id = attached
        .vnic_id
        .clone()
        .expect("an ATTACHED attachment names its VNIC");
    assert_eq!(
        attached.nic_index,
        Some(0),
        "on a VM shape every VNIC is on physical NIC 0"
    );
    let vnic = client.get_vnic(&vnic_id).await.expect("GetVnic");
    assert!(!vnic.is_primary, "a secondary VNIC must not be primary");
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("attach event")
        .expect("event");
    assert_eq!(
        (event.kind, event.mac.as_str()),
        (
            EventKind::Attached,
            vnic.mac_address.as_deref().unwrap_or("")
        )
    );
    assert_eq!(event.subnet_cidr, pods.cidr_block, "event subnet");
    assert_eq!(
        event.virtual_router_ip, "10.0.16.1",
        "the router is the subnet's .1"
    );

    let imds = ImdsClient::new(&sim.imds_url(), reqwest::Client::new()).expect("IMDS");
    let imds_vnics = imds.vnics().await.expect("IMDS vnics");
    assert!(
        imds_vnics.iter().any(|v| v.vnic_id == vnic_id
            && v.nic_index == 0
            && Some(&v.private_ip) == vnic.private_ip.as_ref()),
        "IMDS /vnics/ must show the new VNIC, got {imds_vnics:?}"
    );
    let primary_vnic = client
        .get_vnic(&imds_vnics[0].vnic_id)
        .await
        .expect("GetVnic of IMDS's first entry");
    assert!(
        primary_vnic.is_primary,
        "IMDS lists the primary VNIC first, got {imds_vnics:?}"
    );

    let mut created = Vec::new();
    let limit_error = loop {
        let details = CreatePrivateIpDetails {
            vnic_id: vnic_id.clone(),
            ..Default::default()
        };
        match client.create_private_ip(&details, &new_retry_token()).await {
            Ok(ip) => created.push(ip),
            Err(e) => break e,
        }
        assert!(
            created.len() <= 100,
            "the IPs-per-VNIC limit was never reached"
        );
    };
    assert!(
        limit_error.is_limit_exceeded(),
        "expected 400 LimitExceeded, got {limit_error}"
    );
    assert_eq!(limit_error.status(), Some(400));
    assert_eq!(
        created.len() as u32,
        cfg.ips_per_vnic,
        "secondary IPs created before the limit"
    );

    let listed = client
        .list_private_ips(&PrivateIpFilter::Vnic(vnic_id.clone()))
        .await
        .expect("ListPrivateIps");
    assert_eq!(
        listed.len(),
        created.len() + 1,
        "all pages, primary included (page size {})",
        cfg.page_size
    );
    assert_eq!(
        listed.iter().filter(|p| p.is_primary).count(),
        1,
        "exactly one primary IP"
    );
    let by_addr = PrivateIpFilter::Subnet {
        subnet_id: pods.id.clone(),
        ip_address: Some(created[0].ip_address.clone()),
    };
    let found = client
        .list_private_ips(&by_addr)
        .await
        .expect("ListPrivateIps by address");
    assert_eq!(found.len(), 1, "lookup by subnet and address");
    assert_eq!(found[0].id, created[0].id);

    let primary = listed.iter().find(|p| p.is_primary).expect("primary");
    let err = client
        .delete_private_ip(&primary.id)
        .await
        .expect_err("the primary IP cannot be deleted");
    assert_eq!(err.status(), Some(400), "deleting the primary IP: {err}");
    for ip in &created {
        client
            .delete_private_ip(&ip.id)
            .await
            .expect("DeletePrivateIp");
    }
    let err = client
        .get_private_ip(&created[0].id)
        .await
        .expect_err("deleted IP is gone");
    assert!(
        err.is_not_found(),
        "expected 404 for a deleted IP, got {err}"
    );
    let remaining = client
        .list_private_ips(&PrivateIpFilter::Vnic(vnic_id.clone()))
        .await
        .expect("list");
    assert_eq!(remaining.len(), 1, "only the primary IP is left");

    let attachments = client
        .list_vnic_attachments(&cfg.compartment_id, Some(&cfg.instance_id))
        .await
        .expect("list");
    let primary_attachment = attachments
        .iter()
        .find(|a| a.vnic_id.as_deref() == Some(primary_vnic.id.as_str()))
        .expect("primary attachment");
    let err = client
        .detach_vnic(&primary_attachment.id)
        .await
        .expect_err("primary VNIC cannot be detached");
    assert_eq!(err.status(), Some(409), "detaching the primary VNIC: {err}");

    client
        .detach_vnic(&attachment.id)
        .await
        .expect("DetachVnic");
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("detach event")
        .expect("event");
    assert_eq!(
        (event.kind, event.vnic_id.as_str()),
        (EventKind::Detached, vnic_id.as_str())
    );
    let detached = client
        .get_vnic_attachment(&attachment.id)
        .await
        .expect("GetVnicAttachment");
    assert_eq!(detached.lifecycle_state, AttachmentState::Detached);
    assert!(
        client
            .get_vnic(&vnic_id)
            .await
            .expect_err("VNIC deleted")
            .is_not_found()
    );

    let subnets = client
        .list_subnets(&cfg.network_compartment_id, Some(&cfg.vcn.id))
        .await
        .expect("ListSubnets");
    assert_eq!(subnets.len(), cfg.subnets.len(), "all subnets across pages");
    let subnet = client.get_subnet(&pods.id).await.expect("GetSubnet");
    assert_eq!(
        (
            subnet.cidr_block.as_str(),
            subnet.virtual_router_ip.as_str()
        ),
        ("10.0.16.0/20", "10.0.16.1")
    );
    let vcn = client.get_vcn(&cfg.vcn.id).await.expect("GetVcn");
    assert_eq!(vcn.cidr_blocks, cfg.vcn.cidr_blocks, "every VCN CIDR");
}

#[tokio::test]
async fn vnic_cycle_with_api_key() {
    let (sim, key) = with_node_key(small_limits()).await;
    let client = config_file_client(&sim, &key.config, fast_retries());
    vnic_cycle(&sim, &client).await;
}

#[tokio::test]
async fn vnic_cycle_with_instance_principal() {
    let sim = sim(small_limits()).await;
    let (client, auth) = instance_principal_client(&sim, fast_retries());
    vnic_cycle(&sim, &client).await;
    assert_eq!(
        auth.refreshes(),
        1,
        "one token serves the whole cycle (1 h lifetime)"
    );
    assert_eq!(
        auth.tenancy().await.expect("tenancy"),
        sim.config().tenancy_id,
        "tenancy from the certificate"
    );
}

#[tokio::test]
async fn wrong_key_is_not_authenticated() {
    let sim = sim(SimConfig::default()).await;
    let key = api_key(&sim, "ocid1.user.oc1..stranger");
    let client = config_file_client(&sim, &key.config, fast_retries());
    let err = client
        .get_vcn(&sim.config().vcn.id)
        .await
        .expect_err("an unregistered key must be refused");
    assert_eq!(
        (err.status(), err.code()),
        (Some(401), Some("NotAuthenticated")),
        "got {err}"
    );
    assert!(
        err.request_id().is_some_and(|id| id.starts_with("sim/")),
        "error must carry opc-request-id: {err:?}"
    );
}

#[tokio::test]
async fn session_token_is_refreshed_before_expiry_without_a_failed_call() {
    let sim = sim(SimConfig {
        token_lifetime_s: 4,
        ..SimConfig::default()
    })
    .await;
    let (client, auth) = instance_principal_client(
        &sim,
        RetryPolicy {
            max_attempts: 1,
            ..fast_retries()
        },
    );
    let vcn = sim.config().vcn.id;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(7) {
        // max_attempts 1: any 401 (an expired token used) would fail the call.
        client
            .get_vcn(&vcn)
            .await
            .expect("every call succeeds across token refreshes");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        auth.refreshes() >= 3,
        "a 4 s token is refreshed at half life: expected >= 3 tokens in 7 s, got {}",
        auth.refreshes()
    );
    assert_eq!(
        sim.federations(),
        auth.refreshes(),
        "every refresh is one federation call"
    );
}

#[tokio::test]
async fn concurrent_callers_share_one_refresh() {
    let sim = sim(SimConfig::default()).await;
    let (client, auth) = instance_principal_client(&sim, fast_retries());
    let client = std::sync::Arc::new(client);
    let vcn = sim.config().vcn.id;
    let calls = (0..8).map(|_| {
        let (client, vcn) = (client.clone(), vcn.clone());
        tokio::spawn(async move { client.get_vcn(&vcn).await })
    });
    for call in calls {
        call.await.expect("task").expect("GetVcn");
    }
    assert_eq!(
        auth.refreshes(),
        1,
        "8 concurrent first calls must share one federation"
    );
}

#[tokio::test]
async fn retries_ride_out_injected_429_and_5xx() {
    let (sim, key) = with_node_key(SimConfig::default()).await;
    let client = config_file_client(&sim, &key.config, fast_retries());
    sim.set_faults(Faults {
        rate_429: 0.2,
        rate_5xx: 0.2,
        ..Faults::default()
    });
    let vcn = sim.config().vcn.id;
    for i in 0..20 {
        client
            .get_vcn(&vcn)
            .await
            .unwrap_or_else(|e| panic!("call {i} should succeed through retries, got {e}"));
    }
}

#[tokio::test]
async fn a_permanently_failing_call_ends_in_a_typed_error_within_the_budget() {
    let (sim, key) = with_node_key(SimConfig::default()).await;
    let budget = Duration::from_secs(2);
    let policy = RetryPolicy {
        total_budget: budget,
        attempt_timeout: Duration::from_millis(400),
        max_attempts: 100,
        ..fast_retries()
    };
    let client = config_file_client(&sim, &key.config, policy);
    let vcn = sim.config().vcn.id;

    sim.set_faults(Faults {
        rate_5xx: 1.0,
        ..Faults::default()
    });
    let started = Instant::now();
    let err = client.get_vcn(&vcn).await.expect_err("every attempt fails");
    assert!(
        started.elapsed() < budget + Duration::from_millis(500),
        "took {:?} with a {budget:?} budget",
        started.elapsed()
    );
    assert!(
        matches!(err, OciError::RetriesExhausted { attempts, .. } if attempts > 1),
        "expected retries, got {err:?}"
    );
    assert_eq!(
        (err.status(), err.code()),
        (Some(500), Some("InternalServerError")),
        "got {err}"
    );

    sim.set_faults(Faults {
        rate_hang: 1.0,
        ..Faults::default()
    });
    let started = Instant::now();
    let err = client.get_vcn(&vcn).await.expect_err("every attempt hangs");
    assert!(
        started.elapsed() < budget + Duration::from_millis(500),
        "hung calls took {:?}",
        started.elapsed()
    );
    assert!(
        matches!(err.root(), OciError::Timeout { .. }),
        "expected a timeout, got {err:?}"
    );
}

/// A node slowed down by 429s may not be allowed another attempt before the call's budget
/// runs out. The call then ends at once with what OCI answered, and no attempt goes out that
/// could not be answered in time: sent at the budget's end it would get a timeout of a few
/// milliseconds, fail as "no answer", and a create may take effect at OCI all the same.
#[tokio::test]
async fn a_call_the_slowed_node_cannot_retry_within_its_budget_sends_no_doomed_attempt() {
    let (sim, key) = with_node_key(SimConfig::default()).await;
    let budget = Duration::from_secs(2);
    let policy = RetryPolicy {
        total_budget: budget,
        attempt_timeout: Duration::from_secs(1),
        max_attempts: 10,
        ..fast_retries()
    };
    // One call per second: after a 429, half that, and the retry waits 1–3 s.
    let client = config_file_client_at(
        &sim,
        &key.config,
        policy,
        RateLimit {
            per_second: 1.0,
            burst: 1,
        },
    );
    let vcn = sim.config().vcn.id;
    sim.set_faults(Faults {
        latency_ms: 50,
        rate_429: 1.0,
        ..Faults::default()
    });
    sim.reset_calls();
    let started = Instant::now();
    let err = client
        .get_vcn(&vcn)
        .await
        .expect_err("every attempt is throttled");
    let took = started.elapsed();
    assert!(took < budget, "took {took:?} with a {budget:?} budget");
    assert_eq!(
        (err.status(), err.code()),
        (Some(429), Some("TooManyRequests")),
        "the call ends with what OCI answered: {err}"
    );
    assert_eq!(
        sim.calls().get("GetVcn"),
        Some(&1),
        "the retry the slowed-down rate allows only after the budget is not sent"
    );

    // The next call, which the slowed-down rate would let out only after its own budget,
    // is not sent either, and says so.
    let err = client.get_vcn(&vcn).await.expect_err("held back");
    assert!(
        matches!(err, OciError::HeldBack { .. }),
        "expected the call to be held back, got {err:?}"
    );
    assert!(!err.may_have_committed(), "{err}");
    assert_eq!(sim.calls().get("GetVcn"), Some(&1), "nothing more was sent");
}

/// A create whose first attempt took effect although its answer was lost (503 after the
/// commit), and whose retry was then throttled, may have taken effect: the caller keeps its
/// retry token, and the next create with it returns the address the first attempt made
/// instead of making a second one.
#[tokio::test]
async fn a_create_that_committed_before_a_throttled_retry_keeps_its_token() {
    let (sim, key) = with_node_key(SimConfig::default()).await;
    let policy = RetryPolicy {
        max_attempts: 2,
        ..fast_retries()
    };
    let client = config_file_client(&sim, &key.config, policy);
    let cfg = sim.config();
    let imds = ImdsClient::new(&sim.imds_url(), reqwest::Client::new()).expect("IMDS");
    let vnic_id = imds.vnics().await.expect("IMDS vnics")[0].vnic_id.clone();
    sim.set_faults(Faults {
        rules: vec![FaultRule {
            op: "CreatePrivateIp".into(),
            status: 503,
            code: "ServiceUnavailable".into(),
            after_commit: true,
            times: Some(1),
            ..FaultRule::default()
        }],
        ..Faults::default()
    });
    // The tenancy's budget has room for one request: the retry is answered 429.
    sim.set_rate_limit(Some(TenancyBudget {
        per_second: 0.01,
        burst: 1,
        ..TenancyBudget::default()
    }));
    let details = CreatePrivateIpDetails {
        vnic_id: vnic_id.clone(),
        ..Default::default()
    };
    let token = new_retry_token();
    let err = client
        .create_private_ip(&details, &token)
        .await
        .expect_err("503 after the commit, then 429");
    assert_eq!(err.status(), Some(429), "{err}");
    assert!(
        err.may_have_committed(),
        "the first attempt may have taken effect: {err}"
    );
    sim.set_rate_limit(None);
    let again = client
        .create_private_ip(&details, &token)
        .await
        .expect("the same token again");
    let on_vnic = client
        .list_private_ips(&PrivateIpFilter::Vnic(vnic_id))
        .await
        .expect("ListPrivateIps");
    let secondary: Vec<_> = on_vnic.iter().filter(|p| !p.is_primary).collect();
    assert_eq!(
        secondary.len(),
        1,
        "one address made, answered again: {secondary:?} (tenancy {})",
        cfg.tenancy_id
    );
    assert_eq!(secondary[0].id, again.id);
}

/// A VM shape as OCI describes it: every VNIC is on physical NIC 0, so several secondary
/// VNICs attach without any `nicIndex` conflict, a NIC the shape does not have is refused,
/// and IMDS lists the primary first. Some IMDS answers carry no `nicIndex` at all.
#[tokio::test]
async fn a_vm_shape_puts_every_vnic_on_nic_0_and_imds_lists_the_primary_first() {
    let sim = sim(SimConfig {
        max_vnic_attachments: 4,
        attach_delay_ms: 50,
        imds_nic_index: false,
        ..SimConfig::default()
    })
    .await;
    let (client, _auth) = instance_principal_client(&sim, fast_retries());
    let cfg = sim.config();
    let details = |nic_index| AttachVnicDetails {
        instance_id: cfg.instance_id.clone(),
        create_vnic_details: CreateVnicDetails {
            subnet_id: cfg.subnets[1].id.clone(),
            ..Default::default()
        },
        display_name: None,
        nic_index,
    };
    let mut attached = Vec::new();
    for nic_index in [None, Some(0), None] {
        let a = client
            .attach_vnic(&details(nic_index), &new_retry_token())
            .await
            .expect("AttachVnic on NIC 0 never conflicts");
        let a = client
            .wait_attached(&a.id, Duration::from_secs(5))
            .await
            .expect("ATTACHED");
        assert_eq!(a.nic_index, Some(0), "a VM's VNIC is on NIC 0: {a:?}");
        attached.push(a.vnic_id.expect("vnicId"));
    }
    let err = client
        .attach_vnic(&details(Some(1)), &new_retry_token())
        .await
        .expect_err("a VM has no physical NIC 1");
    assert_eq!(err.status(), Some(400), "{err}");

    let imds = ImdsClient::new(&sim.imds_url(), reqwest::Client::new()).expect("IMDS");
    let listed = imds.vnics().await.expect("IMDS vnics");
    assert_eq!(
        listed.len(),
        4,
        "the primary and three secondaries: {listed:?}"
    );
    assert!(
        client
            .get_vnic(&listed[0].vnic_id)
            .await
            .expect("GetVnic")
            .is_primary,
        "the first IMDS entry is the primary VNIC"
    );
    let rest: Vec<String> = listed[1..].iter().map(|v| v.vnic_id.clone()).collect();
    assert_eq!(rest, attached, "then the secondaries in attach order");
    let raw: serde_json::Value = reqwest::Client::new()
        .get(format!("{}vnics/", sim.imds_url()))
        .header("Authorization", "Bearer Oracle")
        .send()
        .await
        .expect("IMDS answers")
        .json()
        .await
        .expect("JSON");
    let first = raw[0].as_object().expect("an object");
    let fields: Vec<&str> = first.keys().map(String::as_str).collect();
    for field in [
        "vnicId",
        "privateIp",
        "vlanTag",
        "macAddr",
        "virtualRouterIp",
        "subnetCidrBlock",
    ] {
        assert!(
            fields.contains(&field),
            "IMDS entry lacks {field}: {first:?}"
        );
    }
    assert!(
        !fields.contains(&"nicIndex"),
        "configured like cloud-init's VM fixture, without nicIndex: {first:?}"
    );
}

/// A bare-metal shape (`BM.*`): two physical NICs, an attachment lands on the NIC it asks
/// for (0 when it names none, as the API reference says), a NIC beyond the second is
/// refused, and each VNIC gets its own VLAN tag (0 for the primary, as in cloud-init's BM
/// fixture). IMDS lists `vlanTag` and `nicIndex` on every entry, primary first.
#[tokio::test]
async fn a_bm_shape_has_two_nics_honours_nic_index_and_tags_each_vnic() {
    let sim = sim(SimConfig {
        shape: "BM.Standard.E4.128".into(),
        max_vnic_attachments: 4,
        attach_delay_ms: 50,
        ..SimConfig::default()
    })
    .await;
    let (client, _auth) = instance_principal_client(&sim, fast_retries());
    let cfg = sim.config();
    let details = |nic_index| AttachVnicDetails {
        instance_id: cfg.instance_id.clone(),
        create_vnic_details: CreateVnicDetails {
            subnet_id: cfg.subnets[1].id.clone(),
            ..Default::default()
        },
        display_name: None,
        nic_index,
    };
    let mut attached = Vec::new();
    for (asked, expected) in [(Some(1), 1), (None, 0), (Some(1), 1)] {
        let a = client
            .attach_vnic(&details(asked), &new_retry_token())
            .await
            .expect("AttachVnic on either physical NIC of a BM shape");
        let a = client
            .wait_attached(&a.id, Duration::from_secs(5))
            .await
            .expect("ATTACHED");
        assert_eq!(
            a.nic_index,
            Some(expected),
            "asked for {asked:?}, the attachment is on NIC {expected}: {a:?}"
        );
        attached.push((a.vnic_id.clone().expect("vnicId"), expected, a.vlan_tag));
    }
    let err = client
        .attach_vnic(&details(Some(2)), &new_retry_token())
        .await
        .expect_err("a BM shape has physical NICs 0 and 1 only");
    assert_eq!(err.status(), Some(400), "{err}");

    let imds = ImdsClient::new(&sim.imds_url(), reqwest::Client::new()).expect("IMDS");
    let listed = imds.vnics().await.expect("IMDS vnics");
    assert_eq!(
        listed.len(),
        4,
        "the primary and three secondaries: {listed:?}"
    );
    assert_eq!(
        (listed[0].vlan_tag, listed[0].nic_index),
        (0, 0),
        "the primary is untagged on NIC 0: {:?}",
        listed[0]
    );
    let mut tags = std::collections::BTreeSet::new();
    for (entry, (vnic_id, nic, tag)) in listed[1..].iter().zip(&attached) {
        assert_eq!(&entry.vnic_id, vnic_id, "secondaries in attach order");
        assert_eq!(entry.nic_index, *nic, "IMDS nicIndex of {vnic_id}");
        assert_eq!(
            Some(entry.vlan_tag),
            *tag,
            "IMDS and the attachment agree on {vnic_id}'s VLAN tag"
        );
        assert!(
            (1..=4094).contains(&entry.vlan_tag),
            "a secondary VNIC of a BM instance arrives tagged: {entry:?}"
        );
        assert!(
            tags.insert(entry.vlan_tag),
            "VLAN tags are distinct: {listed:?}"
        );
    }
}
