//! IPAM against the simulator failing as OCI does: creates whose answer is lost after they
//! committed, IAM denying single operations, the documented policy. In process, no root.
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vcnpath::ipam::checkpoint::Checkpoint;
use vcnpath::ipam::{
    AllocError, Allocation, Ipam, IpamConfig, NODE_TAG, OciCloud, PodRef, PoolConfig,
};
use vcnpath::oci::{CoreClient, ErrorClass};
use vcnpath_tests::ocikit::{fast_retries, instance_principal_client, node_ips};
use vcnpath_tests::ocisim::{FaultKind, FaultRule, Faults, SimConfig, Simulator};

const PODS_SUBNET: &str = "ocid1.subnet.oc1.iad.simpods";

async fn sim(ips_per_vnic: u32, max_vnics: u32, policy: Option<Vec<String>>) -> Simulator {
    let config = SimConfig {
        ips_per_vnic,
        max_vnic_attachments: max_vnics,
        attach_delay_ms: 100,
        policy,
        ..SimConfig::default()
    };
    Simulator::start(config, "127.0.0.1:0")
        .await
        .expect("simulator starts")
}

fn config(sim: &Simulator, dir: &Path, warm_ips: usize) -> IpamConfig {
    let c = sim.config();
    let pool = PoolConfig {
        warm_ips,
        ips_per_vnic: c.ips_per_vnic as usize,
        max_vnics: c.max_vnic_attachments as usize,
        subnets: vec![PODS_SUBNET.into()],
        cooldown: Duration::from_millis(500),
        release_delay: Duration::from_hours(1),
        ..PoolConfig::default()
    };
    let mut cfg = IpamConfig::new(c.instance_id, pool);
    cfg.checkpoint_path = dir.join("ipam.json");
    cfg.require_interface = false;
    cfg.tick = Duration::from_millis(100);
    cfg.retry_after = Duration::from_millis(100);
    // No periodic reconcile within a test: what the grower leaves must already be exact.
    cfg.reconcile_interval = Duration::from_hours(1);
    cfg.denied_backoff = Duration::from_secs(5);
    cfg
}

fn start(sim: &Simulator, cfg: IpamConfig) -> (Ipam, Arc<CoreClient>) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let client = Arc::new(instance_principal_client(sim, fast_retries()).0);
    let c = sim.config();
    let cloud = Arc::new(OciCloud::new(
        client.clone(),
        c.compartment_id,
        c.instance_id,
        Duration::from_secs(10),
    ));
    let ipam = Ipam::start(cloud, cfg).expect("IPAM starts");
    (ipam, client)
}

fn pod(n: usize) -> PodRef {
    PodRef {
        container_id: format!("container-{n:03}"),
        ifname: "eth0".into(),
        namespace: Some("default".into()),
        name: Some(format!("pod-{n}")),
    }
}

async fn allocate(ipam: &Ipam, pod: &PodRef, within: Duration) -> Allocation {
    let deadline = Instant::now() + within;
    loop {
        match ipam.allocate(pod).await {
            Ok(a) => return a,
            Err(e @ (AllocError::PoolEmpty { .. } | AllocError::NotReady))
                if Instant::now() < deadline =>
            {
                tokio::time::sleep(e.retry_after().unwrap_or(Duration::from_millis(100))).await;
            }
            Err(e) => panic!("allocation for {} failed: {e}", pod.container_id),
        }
    }
}

/// Live attachments of VNICs tagged for this node.
fn node_vnics(sim: &Simulator) -> Vec<String> {
    let instance = sim.config().instance_id;
    let snapshot = sim.snapshot();
    let tagged: Vec<&str> = snapshot["vnics"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["freeformTags"][NODE_TAG].as_str() == Some(instance.as_str()))
        .filter_map(|v| v["id"].as_str())
        .collect();
    snapshot["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["lifecycleState"] != "DETACHED")
        .filter_map(|a| a["vnicId"].as_str())
        .filter(|id| tagged.contains(id))
        .map(str::to_owned)
        .collect()
}

/// Waits until the pool holds exactly what OCI holds for this node (every address and
/// secondary VNIC), failing with both sides if that does not happen `within`.
async fn wait_pool_equals_oci(sim: &Simulator, ipam: &Ipam, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let status = ipam.status().await;
        let pooled: BTreeMap<String, usize> = status
            .vnics
            .iter()
            .filter(|v| !v.is_primary)
            .map(|v| (v.vnic_id.clone(), v.free + v.assigned + v.cooldown))
            .collect();
        let mut in_oci: BTreeMap<String, usize> =
            node_vnics(sim).into_iter().map(|v| (v, 0)).collect();
        for vnic in node_ips(sim).values() {
            *in_oci.entry(vnic.clone()).or_default() += 1;
        }
        if pooled == in_oci {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "within {within:?} the pool must hold every VNIC and address OCI has for the node \
             (no orphan): pool {pooled:?}, OCI {in_oci:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn lose_answers(op: &str) -> Faults {
    Faults {
        rules: vec![
            // The body is cut after the create committed…
            FaultRule {
                op: op.into(),
                kind: FaultKind::Truncate,
                after_commit: true,
                times: Some(1),
                ..FaultRule::default()
            },
            // …and the next one commits and answers 503.
            FaultRule {
                op: op.into(),
                status: 503,
                code: "ServiceUnavailable".into(),
                after_commit: true,
                times: Some(1),
                ..FaultRule::default()
            },
        ],
        ..Faults::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_create_private_ip_answers_leave_no_orphan_and_no_duplicate() {
    let sim = sim(8, 2, None).await;
    sim.set_faults(lose_answers("CreatePrivateIp"));
    let dir = tempfile::tempdir().unwrap();
    let (ipam, _) = start(&sim, config(&sim, dir.path(), 3));
    ipam.reconciled().await;
    // One grower step (the tick is 100 ms), far below the reconcile interval.
    wait_pool_equals_oci(&sim, &ipam, Duration::from_secs(5)).await;
    let a = allocate(&ipam, &pod(1), Duration::from_secs(10)).await;
    // One pod and three warm: the pool grows back to four addresses, through lost answers.
    let deadline = Instant::now() + Duration::from_secs(10);
    while node_ips(&sim).len() < 4 {
        assert!(
            Instant::now() < deadline,
            "the pool never grew back to 4 addresses"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_pool_equals_oci(&sim, &ipam, Duration::from_secs(5)).await;
    // Several grower ticks with the target met: a lost answer retried twice would show now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    wait_pool_equals_oci(&sim, &ipam, Duration::from_secs(5)).await;
    assert_eq!(
        node_ips(&sim).len(),
        4,
        "one pod and a warm pool of 3, no extra address"
    );
    assert_checkpoint_in_oci(&sim, dir.path(), &a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_attach_vnic_answers_leave_no_orphan_and_no_duplicate() {
    let sim = sim(2, 4, None).await;
    sim.set_faults(lose_answers("AttachVnic"));
    let dir = tempfile::tempdir().unwrap();
    // Four warm addresses at two per VNIC: two secondary VNICs, both attached through a lost
    // answer.
    let (ipam, _) = start(&sim, config(&sim, dir.path(), 4));
    ipam.reconciled().await;
    let a = allocate(&ipam, &pod(1), Duration::from_secs(20)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while node_ips(&sim).len() < 4 {
        assert!(
            Instant::now() < deadline,
            "the pool never grew to 4 addresses"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_pool_equals_oci(&sim, &ipam, Duration::from_secs(5)).await;
    assert_eq!(
        node_vnics(&sim).len(),
        2,
        "two VNICs serve four addresses; an extra one is a duplicate"
    );
    assert_checkpoint_in_oci(&sim, dir.path(), &a);
}

fn assert_checkpoint_in_oci(sim: &Simulator, dir: &Path, a: &Allocation) {
    let saved = Checkpoint::new(dir.join("ipam.json"))
        .load()
        .expect("checkpoint loads")
        .allocations;
    assert_eq!(saved.len(), 1, "one pod checkpointed");
    let in_oci = node_ips(sim);
    for entry in saved.values() {
        assert_eq!(entry.allocation.ip, a.ip);
        assert_eq!(
            in_oci.get(&a.ip),
            Some(&a.vnic_id),
            "the checkpointed address must exist in OCI on its VNIC"
        );
    }
}

/// The statements between the policy markers of docs/oci.md.
fn documented_policy() -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/oci.md"))
        .expect("docs/oci.md is readable");
    let block = doc
        .split("<!-- vcnpath-policy:begin -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- vcnpath-policy:end -->").next())
        .expect("docs/oci.md has the vcnpath-policy markers");
    block
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("Allow "))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_policy_grows_shrinks_and_allocates() {
    let policy = documented_policy();
    assert!(policy.len() >= 5, "policy block found: {policy:?}");
    let sim = sim(2, 3, Some(policy)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&sim, dir.path(), 3);
    cfg.pool.release_delay = Duration::from_millis(200);
    let (ipam, _) = start(&sim, cfg);
    ipam.reconciled().await;
    let a = allocate(&ipam, &pod(1), Duration::from_secs(20)).await;
    wait_pool_equals_oci(&sim, &ipam, Duration::from_secs(20)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while node_vnics(&sim).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "with the documented policy the pool must attach a second VNIC; denied: {:?}",
            sim.denied()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ipam.release(&pod(1)).await.expect("release");
    assert!(
        sim.denied().is_empty(),
        "the documented policy must allow every call the agent makes; denied: {:?}",
        sim.denied()
    );
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_missing_permission_is_named_and_its_calls_back_off() {
    let full = documented_policy();
    // The permissions IPAM itself uses (`read vcns` is the agent's start-up read).
    for missing in [
        "manage instances",
        "use private-ips",
        "use subnets",
        "use vnics",
    ] {
        let policy: Vec<String> = full
            .iter()
            .filter(|s| !s.contains(missing))
            .cloned()
            .collect();
        let sim = sim(2, 3, Some(policy)).await;
        let dir = tempfile::tempdir().unwrap();
        // Not waiting for the first reconcile: without `use vnics` (so no GetVnic) it cannot
        // finish, and the start-up retries must back off as well.
        let (ipam, client) = start(&sim, config(&sim, dir.path(), 4));
        // Pods keep asking (the kubelet repeats ADD) while the node cannot grow.
        let window = Duration::from_secs(12);
        let until = Instant::now() + window;
        let mut last = None;
        while Instant::now() < until {
            last = ipam.allocate(&pod(1)).await.err();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The pod is told what holds the pool back, and `vcnpath status` says it too.
        let told = last.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            told.contains("404 NotAuthorizedOrNotFound") && told.contains("the policy must grant"),
            "without `{missing}` the try-again answer names the denied call: {told:?}"
        );
        let status = ipam.status().await;
        assert!(
            status.oci.iter().any(|t| t.class == ErrorClass::Permission
                && t.retry_in_ms <= 30_000
                && t.needs
                    .iter()
                    .any(|p| vcnpath::oci::iam::implies(missing, p))),
            "without `{missing}` status shows the denial, what it needs and the next try: {:#?}",
            status.oci
        );
        let denied: u64 = sim.denied().values().sum();
        let calls: u64 = sim.calls().values().sum();
        let metrics = {
            let mut out = String::new();
            client.metrics().render(&mut out);
            out
        };
        // Named as itself or as a lesser permission it grants (without `manage instances`
        // ListVnicAttachments loses `inspect instances` first).
        let named = client.metrics().missing_permissions();
        assert!(
            named.iter().any(|p| vcnpath::oci::iam::implies(missing, p)),
            "without `{missing}` the agent must name it in /metrics; got:\n{}",
            metrics
                .lines()
                .filter(|l| l.contains("permission_missing"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        // A 5 s denial backoff over 12 s: a few denied calls per operation, not one per tick.
        assert!(
            (1..=8).contains(&denied),
            "without `{missing}`: {denied} denied calls in {window:?} (calls {:?})",
            sim.calls()
        );
        assert!(
            calls <= 40,
            "without `{missing}`: {calls} calls in {window:?}, expected a handful: {:?}",
            sim.calls()
        );
    }
}

/// A tenancy's service limit (400 `LimitExceeded` "The following service limits were exceeded")
/// is not one full VNIC: the agent must not attach VNIC after VNIC chasing it, and it says
/// which limit to raise in status and in the answer a waiting pod gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenancy_limit_is_reported_and_attaches_no_vnic_to_chase_it() {
    let sim = sim(4, 3, None).await;
    sim.set_faults(Faults {
        rules: vec![FaultRule {
            op: "CreatePrivateIp".into(),
            status: 400,
            code: "LimitExceeded".into(),
            message: Some("The following service limits were exceeded: private-ip-count. Request a service limit increase from the service limits page in the console.".into()),
            ..FaultRule::default()
        }],
        ..Faults::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let (ipam, _client) = start(&sim, config(&sim, dir.path(), 4));
    ipam.reconciled().await;
    // The four warm addresses fit on the first secondary VNIC; the pod asks only once its
    // creates have met the limit, so one more address than that VNIC holds is wanted then.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sim.calls().contains_key("CreatePrivateIp") {
        assert!(
            Instant::now() < deadline,
            "no CreatePrivateIp was tried: {:?}",
            sim.calls()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let window = Duration::from_secs(6);
    let until = Instant::now() + window;
    let mut last = None;
    while Instant::now() < until {
        last = ipam.allocate(&pod(1)).await.err();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let calls = sim.calls();
    // The first secondary VNIC is attached before any address is asked for; no more after.
    assert!(
        calls.get("AttachVnic").copied().unwrap_or(0) <= 1 && node_vnics(&sim).len() <= 1,
        "a tenancy limit must not make the pool attach VNICs to chase it: {calls:?}, VNICs {:?}",
        node_vnics(&sim)
    );
    // One batch of creates meets the limit, and the long backoff follows. Under load a
    // second create can leave before the first answers set the backoff (seen once: 5 calls).
    // A pool that retried on its short backoff would make dozens in the window.
    assert!(
        calls.get("CreatePrivateIp").copied().unwrap_or(0) <= 8,
        "a tenancy limit waits out the long backoff: {calls:?}"
    );
    let told = last.map(|e| e.to_string()).unwrap_or_default();
    assert!(
        told.contains("CreatePrivateIp") && told.contains("400 LimitExceeded"),
        "the try-again answer names the call and OCI's answer: {told:?}"
    );
    let status = ipam.status().await;
    let trouble = status
        .oci
        .iter()
        .find(|t| t.class == ErrorClass::ServiceLimit)
        .unwrap_or_else(|| panic!("status shows the tenancy limit: {:#?}", status.oci));
    assert!(
        trouble.error.contains("private-ip-count") && trouble.retry_in_ms <= 5_000,
        "{trouble:#?}"
    );
}

/// The instance certificate rotates (OCI replaces it in IMDS): once the old one no longer
/// federates, the next token refresh must read the new one from IMDS, and calls go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_instance_certificate_is_read_anew_at_the_next_federation() {
    let sim = Simulator::start(
        SimConfig {
            token_lifetime_s: 2,
            superseded_leaf_valid: false,
            ..SimConfig::default()
        },
        "127.0.0.1:0",
    )
    .await
    .expect("simulator starts");
    let (client, auth) = instance_principal_client(&sim, fast_retries());
    let vcn = sim.config().vcn.id;
    client.get_vcn(&vcn).await.expect("a first call federates");
    let before = auth.refreshes();
    sim.rotate_leaf().await.expect("the certificate rotates");
    tokio::time::sleep(Duration::from_millis(2500)).await; // the token has expired
    client
        .get_vcn(&vcn)
        .await
        .expect("after the rotation the next federation uses the certificate IMDS serves now");
    assert!(
        auth.refreshes() > before,
        "the call must have federated again"
    );
}

/// The session token is revoked before it expires (401 on the next call): the client federates
/// once more and the call goes through; the calls after it use the new token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_session_token_is_replaced_by_one_new_federation() {
    let sim = Simulator::start(SimConfig::default(), "127.0.0.1:0")
        .await
        .expect("simulator starts");
    let (client, _auth) = instance_principal_client(&sim, fast_retries());
    let vcn = sim.config().vcn.id;
    client.get_vcn(&vcn).await.expect("a first call federates");
    let first = sim.federations();
    sim.revoke_tokens();
    client
        .get_vcn(&vcn)
        .await
        .expect("a call with a revoked token federates again and goes through");
    for _ in 0..3 {
        client.get_vcn(&vcn).await.expect("the new token serves");
    }
    assert_eq!(
        sim.federations(),
        first + 1,
        "one new federation for the revoked token, none after"
    );
}

/// The token expires while the federation endpoint hangs: a call fails within its retry
/// budget (it does not wait out three 10 s federation attempts), and once `/v1/x509` answers
/// again the next call federates and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_federation_fails_a_call_within_its_budget() {
    let sim = Simulator::start(
        SimConfig {
            token_lifetime_s: 2,
            ..SimConfig::default()
        },
        "127.0.0.1:0",
    )
    .await
    .expect("simulator starts");
    let budget = Duration::from_secs(4);
    let (client, _) = instance_principal_client(
        &sim,
        vcnpath::oci::RetryPolicy {
            total_budget: budget,
            attempt_timeout: Duration::from_secs(2),
            ..fast_retries()
        },
    );
    let vcn = sim.config().vcn.id;
    client.get_vcn(&vcn).await.expect("a first call federates");
    sim.set_faults(Faults {
        rules: vec![FaultRule {
            op: "X509".into(),
            kind: FaultKind::Hang,
            ..FaultRule::default()
        }],
        ..Faults::default()
    });
    tokio::time::sleep(Duration::from_millis(2500)).await; // the token has expired
    let started = Instant::now();
    let result = client.get_vcn(&vcn).await;
    let took = started.elapsed();
    assert!(result.is_err(), "no token can be had while /v1/x509 hangs");
    assert!(
        took < budget + Duration::from_secs(2),
        "the call must fail within its {budget:?} budget, took {took:?}: {result:?}"
    );
    sim.set_faults(Faults::default());
    client
        .get_vcn(&vcn)
        .await
        .expect("once /v1/x509 answers the next call federates and succeeds");
}
