//! IPAM against the in-process OCI simulator: the pool fills, grows across VNICs, survives a
//! restart and a fault storm, and never hands one address to two pods.
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vcnpath::ipam::checkpoint::Checkpoint;
use vcnpath::ipam::{
    AllocError, Allocation, Cloud, HostHolder, Ipam, IpamConfig, NODE_TAG, OciCloud, PodRef,
    PoolConfig,
};
use vcnpath::oci::{CoreClient, RateLimit};
use vcnpath_tests::ocikit::{
    fast_retries, instance_principal_client, instance_principal_client_at, node_ips,
    private_ip_range,
};
use vcnpath_tests::ocisim::{FaultRule, Faults, RateLimit as TenancyBudget, SimConfig, Simulator};

const PODS_SUBNET: &str = "ocid1.subnet.oc1.iad.simpods";

async fn sim(ips_per_vnic: u32, max_vnics: u32) -> Simulator {
    let config = SimConfig {
        ips_per_vnic,
        max_vnic_attachments: max_vnics,
        attach_delay_ms: 100,
        ..SimConfig::default()
    };
    Simulator::start(config, "127.0.0.1:0")
        .await
        .expect("simulator starts")
}

fn client(sim: &Simulator) -> Arc<CoreClient> {
    Arc::new(instance_principal_client(sim, fast_retries()).0)
}

fn cloud(sim: &Simulator) -> Arc<dyn Cloud> {
    cloud_of(sim, client(sim))
}

fn cloud_of(sim: &Simulator, client: Arc<CoreClient>) -> Arc<dyn Cloud> {
    let cfg = sim.config();
    Arc::new(OciCloud::new(
        client,
        cfg.compartment_id,
        cfg.instance_id,
        Duration::from_secs(10),
    ))
}

fn config(sim: &Simulator, dir: &Path, pool: PoolConfig) -> IpamConfig {
    let mut cfg = IpamConfig::new(sim.config().instance_id, pool);
    cfg.checkpoint_path = dir.join("ipam.json");
    cfg.require_interface = false;
    cfg.tick = Duration::from_millis(100);
    cfg.retry_after = Duration::from_millis(100);
    cfg.reconcile_interval = Duration::from_hours(1);
    cfg
}

fn pool(sim: &Simulator, warm_ips: usize) -> PoolConfig {
    let cfg = sim.config();
    PoolConfig {
        warm_ips,
        ips_per_vnic: cfg.ips_per_vnic as usize,
        max_vnics: cfg.max_vnic_attachments as usize,
        subnets: vec![PODS_SUBNET.into()],
        cooldown: Duration::from_millis(500),
        release_delay: Duration::from_hours(1),
        ..PoolConfig::default()
    }
}

async fn start(sim: &Simulator, cfg: IpamConfig) -> Ipam {
    start_with(cloud(sim), cfg).await
}

async fn start_with(cloud: Arc<dyn Cloud>, cfg: IpamConfig) -> Ipam {
    // RUST_LOG=vcnpath=debug shows the grower's and reconcile's decisions.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let ipam = Ipam::start(cloud, cfg).expect("IPAM starts");
    ipam.reconciled().await;
    ipam
}

fn pod(n: usize) -> PodRef {
    PodRef {
        container_id: format!("container-{n:03}"),
        ifname: "eth0".into(),
        namespace: Some("default".into()),
        name: Some(format!("pod-{n}")),
    }
}

/// Allocates as the CNI does: retry while the pool is empty.
async fn allocate(ipam: &Ipam, pod: &PodRef, within: Duration) -> Allocation {
    let deadline = Instant::now() + within;
    loop {
        match ipam.allocate(pod).await {
            Ok(a) => return a,
            Err(e @ (AllocError::PoolEmpty { .. } | AllocError::CoolingDown { .. }))
                if Instant::now() < deadline =>
            {
                tokio::time::sleep(e.retry_after().expect("a temporary error says when")).await;
            }
            Err(e) => panic!("allocation for {} failed: {e}", pod.container_id),
        }
    }
}

async fn wait_for(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The node's secondary private-IP objects in OCI: (first address, prefix length).
fn node_objects(sim: &Simulator) -> Vec<(Ipv4Addr, u8)> {
    let instance = sim.config().instance_id;
    sim.snapshot()["privateIps"]
        .as_array()
        .expect("privateIps")
        .iter()
        .filter(|p| {
            p["isPrimary"] != true
                && p["freeformTags"][NODE_TAG].as_str() == Some(instance.as_str())
        })
        .map(|p| {
            let range = private_ip_range(p).unwrap_or_else(|e| panic!("simulator snapshot: {e:#}"));
            (range.network(), range.prefix_len())
        })
        .collect()
}

/// The pool of [`pool`] growing by /28 blocks (`ipam.mode = "cidr"`, or `"auto"` with
/// `single_fallback`).
fn block_pool(sim: &Simulator, warm_ips: usize, single_fallback: bool) -> PoolConfig {
    PoolConfig {
        block_prefix: Some(28),
        single_fallback,
        block_addresses_per_vnic: 64,
        ..pool(sim, warm_ips)
    }
}

fn attached_vnics(sim: &Simulator) -> usize {
    sim.snapshot()["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["lifecycleState"] == "ATTACHED")
        .count()
}

/// The checkpoint, the pool and OCI agree: every checkpointed address exists in OCI on its
/// VNIC, tagged for this node, held by one pod; every address of this node in OCI is known to
/// the pool (nothing leaked).
async fn assert_consistent(sim: &Simulator, ipam: &Ipam, checkpoint: &Path) {
    let _still = ipam.quiesce().await;
    let saved = Checkpoint::new(checkpoint)
        .load()
        .expect("checkpoint loads")
        .allocations;
    let in_oci = node_ips(sim);
    let mut seen = BTreeSet::new();
    for entry in saved.values() {
        let a = &entry.allocation;
        assert!(seen.insert(a.ip), "{} is checkpointed for two pods", a.ip);
        assert_eq!(
            in_oci.get(&a.ip),
            Some(&a.vnic_id),
            "checkpointed {} of {} must exist in OCI on VNIC {}",
            a.ip,
            entry.pod.container_id,
            a.vnic_id
        );
    }
    let mut live: Vec<_> = ipam.allocations().await;
    live.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        live.len(),
        saved.len(),
        "memory and checkpoint hold the same pods"
    );
    let status = ipam.status().await;
    for v in &status.vnics {
        let held = v.free + v.assigned + v.cooldown;
        let in_cloud = in_oci.values().filter(|id| **id == v.vnic_id).count();
        assert_eq!(
            held, in_cloud,
            "VNIC {}: the pool holds {held} addresses, OCI has {in_cloud} tagged for this node",
            v.vnic_id
        );
    }
    let pooled: usize = status
        .vnics
        .iter()
        .map(|v| v.free + v.assigned + v.cooldown)
        .sum();
    assert_eq!(
        pooled,
        in_oci.len(),
        "an address of this node in OCI is unknown to the pool (leak)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_pool_fills_and_allocations_never_wait_for_the_cloud() {
    let sim = sim(8, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let ipam = start(&sim, config(&sim, dir.path(), pool(&sim, 5))).await;
    wait_for("5 warm addresses", Duration::from_secs(15), async || {
        ipam.status()
            .await
            .vnics
            .iter()
            .map(|v| v.free)
            .sum::<usize>()
            >= 5
    })
    .await;
    assert_eq!(
        node_ips(&sim).len(),
        5,
        "exactly the warm target is created"
    );

    // The cloud now takes 2 s per call: an allocation from the warm pool must not notice.
    sim.set_faults(Faults {
        latency_ms: 2000,
        ..Faults::default()
    });
    let mut ips = BTreeSet::new();
    for n in 0..3 {
        let started = Instant::now();
        let a = ipam.allocate(&pod(n)).await.expect("warm allocation");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "allocation {n} took {:?} with a warm pool",
            started.elapsed()
        );
        assert!(ips.insert(a.ip), "{} handed out twice", a.ip);
        assert_eq!(a.subnet.to_string(), "10.0.16.0/20");
        assert_eq!(a.router_ip, Ipv4Addr::new(10, 0, 16, 1));
        assert_eq!(
            ipam.allocate(&pod(n)).await.expect("repeat").ip,
            a.ip,
            "allocate is idempotent for the same pod"
        );
    }
    sim.set_faults(Faults::default());
    assert_consistent(&sim, &ipam, &dir.path().join("ipam.json")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filling_past_one_vnic_attaches_a_second() {
    let sim = sim(4, 3).await;
    let dir = tempfile::tempdir().unwrap();
    // IPAM believes 31 IPs fit a VNIC; the simulator's LimitExceeded at 4 must mark it full.
    let pool = PoolConfig {
        ips_per_vnic: 31,
        ..pool(&sim, 2)
    };
    let ipam = start(&sim, config(&sim, dir.path(), pool)).await;
    let mut by_vnic: BTreeMap<String, usize> = BTreeMap::new();
    for n in 0..7 {
        let a = allocate(&ipam, &pod(n), Duration::from_secs(20)).await;
        *by_vnic.entry(a.vnic_id).or_default() += 1;
    }
    assert_eq!(
        by_vnic.len(),
        2,
        "7 pods on 4-address VNICs need two VNICs: {by_vnic:?}"
    );
    assert_eq!(attached_vnics(&sim), 3, "primary + two pod VNICs");
    let status = ipam.status().await;
    assert!(
        status.vnics.iter().any(|v| v.full),
        "a LimitExceeded marks the first VNIC full: {status:?}"
    );
    assert_consistent(&sim, &ipam, &dir.path().join("ipam.json")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_pool_says_try_later_then_serves_after_growth() {
    let sim = sim(8, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let ipam = start(&sim, config(&sim, dir.path(), pool(&sim, 0))).await;
    match ipam.allocate(&pod(0)).await {
        Err(AllocError::PoolEmpty { retry_after_ms, .. }) => assert_eq!(retry_after_ms, 100),
        other => panic!("an empty pool must answer PoolEmpty, got {other:?}"),
    }
    let a = allocate(&ipam, &pod(0), Duration::from_secs(15)).await;
    assert_eq!(ipam.lookup(&pod(0)).await, Some(a));
    assert_consistent(&sim, &ipam, &dir.path().join("ipam.json")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_address_is_reused_only_after_the_cooldown() {
    // Capacity 2: one pod VNIC of 2 addresses.
    let sim = sim(2, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let ipam = start(&sim, config(&sim, dir.path(), pool(&sim, 2))).await;
    let a = allocate(&ipam, &pod(0), Duration::from_secs(15)).await;
    let _b = allocate(&ipam, &pod(1), Duration::from_secs(15)).await;
    assert_eq!(
        ipam.allocate(&pod(2)).await,
        Err(AllocError::Exhausted { capacity: 2 }),
        "a full node says so"
    );
    // Taken before the release, which starts the cooldown: a retry at the time the agent
    // suggests comes exactly when it ends.
    let released = Instant::now();
    assert_eq!(ipam.release(&pod(0)).await, Ok(Some(a.clone())));
    assert_eq!(
        ipam.release(&pod(0)).await,
        Ok(None),
        "release is idempotent"
    );
    assert_eq!(ipam.lookup(&pod(0)).await, None);
    let refused = ipam.allocate(&pod(2)).await;
    match &refused {
        Err(e @ AllocError::CoolingDown { addresses: 1, .. }) => {
            let wait = e.retry_after().expect("a retry time");
            assert!(
                wait > Duration::ZERO && wait <= Duration::from_millis(500),
                "retry when the address is free (within the 500 ms cooldown), not in {wait:?}"
            );
            let text = e.to_string();
            assert!(
                text.contains("cooling down") && !text.contains("growing"),
                "the message says what is happening: {text}"
            );
        }
        other => panic!(
            "the only address left is cooling down and the node cannot grow; expected CoolingDown, got {other:?}"
        ),
    }
    let c = allocate(&ipam, &pod(2), Duration::from_secs(5)).await;
    assert!(
        released.elapsed() >= Duration::from_millis(500),
        "reused after {:?}, before the 500 ms cooldown",
        released.elapsed()
    );
    assert_eq!(c.ip, a.ip, "the only free address is the released one");
    assert_consistent(&sim, &ipam, &dir.path().join("ipam.json")).await;
}

/// A restart while OCI does not answer: the checkpointed pods (and their VNICs) are served
/// from the checkpoint at once, a new pod is asked to retry, and once OCI answers the pool is
/// reconciled and grows again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_serves_checkpointed_pods_before_oci_answers() {
    let sim = sim(8, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&sim, dir.path(), pool(&sim, 2));
    cfg.startup_wait = Duration::from_millis(300);
    let ipam = start(&sim, cfg.clone()).await;
    let mut before = BTreeMap::new();
    for n in 0..12 {
        before.insert(n, allocate(&ipam, &pod(n), Duration::from_secs(20)).await);
    }
    let vnics_before: BTreeSet<String> = ipam
        .status()
        .await
        .vnics
        .iter()
        .map(|v| v.vnic_id.clone())
        .collect();
    assert!(
        vnics_before.len() >= 2,
        "12 pods of 8 per VNIC need two VNICs"
    );
    drop(ipam);

    sim.set_faults(Faults {
        rate_5xx: 1.0,
        ..Faults::default()
    });
    let ipam = Ipam::start(cloud(&sim), cfg).expect("IPAM starts without OCI");
    let status = ipam.status().await;
    assert!(!status.reconciled);
    let restored: BTreeSet<String> = status.vnics.iter().map(|v| v.vnic_id.clone()).collect();
    assert_eq!(
        restored, vnics_before,
        "the pods' VNICs come from the checkpoint"
    );
    for (n, a) in &before {
        assert_eq!(ipam.lookup(&pod(*n)).await.as_ref(), Some(a));
        assert_eq!(
            ipam.allocate(&pod(*n)).await.as_ref(),
            Ok(a),
            "a repeated ADD of restored pod {n} is answered without OCI"
        );
    }
    assert_eq!(
        ipam.release(&pod(0)).await.unwrap().as_ref(),
        Some(&before[&0]),
        "a DEL is served without OCI"
    );
    match ipam.allocate(&pod(100)).await {
        Err(AllocError::PoolEmpty { .. }) => {}
        other => panic!("a new pod before the first reconcile must retry, got {other:?}"),
    }

    sim.set_faults(Faults::default());
    tokio::time::timeout(Duration::from_secs(30), ipam.reconciled())
        .await
        .expect("the first reconcile succeeds once OCI answers");
    assert!(ipam.status().await.reconciled);
    let fresh = allocate(&ipam, &pod(100), Duration::from_secs(20)).await;
    let held: BTreeSet<Ipv4Addr> = before.values().skip(1).map(|a| a.ip).collect();
    assert!(
        !held.contains(&fresh.ip),
        "{} of a restored pod was handed out again",
        fresh.ip
    );
    assert_consistent(&sim, &ipam, &dir.path().join("ipam.json")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_from_checkpoint_keeps_every_pods_address_once() {
    let sim = sim(8, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&sim, dir.path(), pool(&sim, 3));
    let ipam = start(&sim, cfg.clone()).await;
    let mut before = BTreeMap::new();
    for n in 0..10 {
        before.insert(n, allocate(&ipam, &pod(n), Duration::from_secs(20)).await);
    }
    drop(ipam);

    let ipam = start(&sim, cfg).await;
    for (n, a) in &before {
        assert_eq!(
            ipam.lookup(&pod(*n)).await.as_ref(),
            Some(a),
            "pod {n} keeps its address across a restart"
        );
        assert_eq!(ipam.allocate(&pod(*n)).await.as_ref(), Ok(a));
    }
    let old: BTreeSet<Ipv4Addr> = before.values().map(|a| a.ip).collect();
    for n in 10..14 {
        let a = allocate(&ipam, &pod(n), Duration::from_secs(20)).await;
        assert!(
            !old.contains(&a.ip),
            "{} of a restored pod was handed to pod {n}",
            a.ip
        );
    }
    assert_consistent(&sim, &ipam, &dir.path().join("ipam.json")).await;
}

/// Scale-up through a storm: every fifth call fails 5xx, and the tenancy's budget (a token
/// bucket, as OCI throttles: docs/oci.md) answers 429 to whatever goes beyond it, for a node
/// calling at the agent's own default rate, twice the budget. The throttling
/// is the budget's and not a fixed share of every call: a node cannot tell a fixed share
/// apart from a full tenancy, and under one above ~12% its limiter slows it to one call per
/// 10 s by design (docs/oci.md, "Calls are rate limited").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_storm_during_scale_up_leaks_and_duplicates_nothing() {
    let sim = sim(8, 4).await;
    let dir = tempfile::tempdir().unwrap();
    let client = instance_principal_client_at(&sim, fast_retries(), RateLimit::default()).0;
    let cloud = cloud_of(&sim, Arc::new(client));
    let ipam = Arc::new(start_with(cloud, config(&sim, dir.path(), pool(&sim, 4))).await);
    sim.set_rate_limit(Some(TenancyBudget {
        per_second: 5.0,
        burst: 5,
        ..TenancyBudget::default()
    }));
    sim.set_faults(Faults {
        latency_ms: 20,
        rate_5xx: 0.2,
        rate_hang: 0.0,
        ..Faults::default()
    });
    let mut tasks = Vec::new();
    for n in 0..20 {
        let ipam = ipam.clone();
        tasks.push(tokio::spawn(async move {
            allocate(&ipam, &pod(n), Duration::from_secs(40)).await
        }));
    }
    let mut ips = BTreeSet::new();
    for t in tasks {
        let a = t.await.expect("allocation task");
        assert!(ips.insert(a.ip), "{} handed out twice", a.ip);
    }
    for n in 0..5 {
        ipam.release(&pod(n)).await.expect("release");
    }
    sim.set_faults(Faults::default());
    let throttled: u64 = sim.throttled().values().sum();
    assert!(throttled > 0, "the tenancy's budget throttled the node");
    sim.set_rate_limit(None);
    // No reconcile here: it would adopt a leak; what the grower left must already be exact.
    assert_consistent(&sim, &ipam, &dir.path().join("ipam.json")).await;
    assert_eq!(ipam.allocations().await.len(), 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_allocations_and_releases() {
    let sim = sim(31, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let ipam = Arc::new(start(&sim, config(&sim, dir.path(), pool(&sim, 10))).await);
    let mut tasks = Vec::new();
    for n in 0..50 {
        let ipam = ipam.clone();
        tasks.push(tokio::spawn(async move {
            let a = allocate(&ipam, &pod(n), Duration::from_secs(30)).await;
            if n % 2 == 1 {
                assert_eq!(ipam.release(&pod(n)).await, Ok(Some(a.clone())));
            }
            (n, a)
        }));
    }
    let mut holders: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
    for t in tasks {
        let (n, a) = t.await.expect("task");
        if n % 2 == 0
            && let Some(other) = holders.insert(a.ip, n)
        {
            panic!("{} is held by pods {other} and {n}", a.ip);
        }
    }
    let live = ipam.allocations().await;
    assert_eq!(
        live.len(),
        25,
        "the 25 pods that kept their address are recorded"
    );
    for (p, a) in &live {
        let n: usize = p.container_id["container-".len()..].parse().unwrap();
        assert_eq!(
            holders.get(&a.ip),
            Some(&n),
            "{} recorded for the wrong pod",
            a.ip
        );
    }
    assert_consistent(&sim, &ipam, &dir.path().join("ipam.json")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_checkpoint_write_rolls_the_allocation_back() {
    let sim = sim(8, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let ipam = start(&sim, config(&sim, dir.path(), pool(&sim, 3))).await;
    let first = allocate(&ipam, &pod(0), Duration::from_secs(15)).await;
    // A non-empty directory where the checkpoint goes makes the next write fail.
    let checkpoint = dir.path().join("ipam.json");
    let kept = dir.path().join("kept.json");
    std::fs::rename(&checkpoint, &kept).unwrap();
    std::fs::create_dir_all(checkpoint.join("blocker")).unwrap();
    match ipam.allocate(&pod(1)).await {
        Err(AllocError::Checkpoint { reason }) => {
            assert!(
                reason.contains("ipam.json"),
                "the error names the file: {reason}"
            );
        }
        other => panic!("a failed checkpoint must fail the allocation, got {other:?}"),
    }
    assert_eq!(ipam.lookup(&pod(1)).await, None, "nothing was handed out");
    assert_eq!(
        ipam.status()
            .await
            .vnics
            .iter()
            .map(|v| v.assigned)
            .sum::<usize>(),
        1
    );
    std::fs::remove_dir_all(&checkpoint).unwrap();
    std::fs::rename(&kept, &checkpoint).unwrap();
    let second = allocate(&ipam, &pod(1), Duration::from_secs(5)).await;
    assert_ne!(second.ip, first.ip);
    assert_consistent(&sim, &ipam, &dir.path().join("ipam.json")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_restores_a_pods_address_and_touches_nothing_foreign() {
    use vcnpath::oci::models::CreatePrivateIpDetails;
    use vcnpath::oci::new_retry_token;
    let sim = sim(8, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let ipam = start(&sim, config(&sim, dir.path(), pool(&sim, 1))).await;
    let a = allocate(&ipam, &pod(0), Duration::from_secs(15)).await;
    let oci = client(&sim);
    // Someone adds addresses that are not this node's: untagged, and tagged for another node.
    let foreign = |tags: vcnpath::oci::models::Tags| CreatePrivateIpDetails {
        vnic_id: a.vnic_id.clone(),
        freeform_tags: tags,
        ..Default::default()
    };
    let untagged = oci
        .create_private_ip(&foreign(BTreeMap::default()), &new_retry_token())
        .await
        .unwrap();
    let other_node = oci
        .create_private_ip(
            &foreign(
                [(
                    NODE_TAG.to_owned(),
                    "ocid1.instance.oc1.iad.other".to_owned(),
                )]
                .into(),
            ),
            &new_retry_token(),
        )
        .await
        .unwrap();

    // And deletes the pod's address behind the agent's back.
    let ids = oci
        .list_private_ips(&vcnpath::oci::models::PrivateIpFilter::Vnic(
            a.vnic_id.clone(),
        ))
        .await
        .unwrap();
    let pod_ip = ids
        .iter()
        .find(|p| p.ip_address == a.ip.to_string())
        .unwrap();
    oci.delete_private_ip(&pod_ip.id).await.unwrap();
    ipam.reconcile().await.expect("reconcile");
    let in_oci = node_ips(&sim);
    assert_eq!(
        in_oci.get(&a.ip),
        Some(&a.vnic_id),
        "the checkpointed pod's address is restored, not given up"
    );
    for foreign in [&untagged, &other_node] {
        oci.get_private_ip(&foreign.id).await.unwrap_or_else(|e| {
            panic!(
                "{} is not this node's and must survive: {e}",
                foreign.ip_address
            )
        });
        assert!(!in_oci.contains_key(&foreign.ip_address.parse().unwrap()));
    }
    assert_eq!(ipam.lookup(&pod(0)).await, Some(a));
    assert_consistent(&sim, &ipam, &dir.path().join("ipam.json")).await;
}

/// `vcnpath max-pods` tells kubelet what the agent will hold: it reads the agent's
/// configuration file (the one `run` gets) and the shape's VNIC limit from IMDS, which it
/// reaches directly even when a proxy is set for the OCI API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_pods_reads_the_agents_configuration() {
    let sim = sim(31, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[oci]\nimds_url = {:?}\n[ipam]\nips_per_vnic = 8\n",
            sim.imds_url()
        ),
    )
    .unwrap();
    // The simulator answers on this runtime, so the command is awaited, not waited for.
    // A proxy for the OCI API (here one that refuses every connection) is never used for
    // IMDS, which is link-local.
    let max_pods = async |args: &[&str]| {
        let out = tokio::process::Command::new(vcnpath_tests::agent::binary())
            .arg("max-pods")
            .args(args)
            .env_remove("VCNPATH_CONFIG")
            .env_remove("VCNPATH_IMDS_URL")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .env("HTTP_PROXY", "http://127.0.0.1:9")
            .env("HTTPS_PROXY", "http://127.0.0.1:9")
            .kill_on_drop(true)
            .output()
            .await
            .expect("run vcnpath max-pods");
        assert!(
            out.status.success(),
            "vcnpath max-pods {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let config = config.to_str().unwrap();
    assert_eq!(
        max_pods(&["--config", config]).await,
        "16",
        "3 VNICs, the primary left out, 8 addresses each (from the file)"
    );
    assert_eq!(
        max_pods(&["--config", config, "--use-primary-vnic", "true"]).await,
        "24",
        "a flag overrides the file as for `run`"
    );
    assert_eq!(
        max_pods(&["--imds-url", &sim.imds_url()]).await,
        "62",
        "without a file, the agent's defaults (31 per VNIC)"
    );
}

/// A plugin that disconnects while its ADD is being checkpointed (the API drops the handler's
/// future): the change still runs to its end. Here the write fails, so the allocation must be
/// rolled back although nobody waits for the answer any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_mid_add_leaves_pool_and_checkpoint_consistent() {
    let sim = sim(8, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let ipam = start(&sim, config(&sim, dir.path(), pool(&sim, 3))).await;
    allocate(&ipam, &pod(0), Duration::from_secs(15)).await;
    let checkpoint = dir.path().join("ipam.json");
    let kept = dir.path().join("kept.json");
    std::fs::rename(&checkpoint, &kept).unwrap();
    std::fs::create_dir_all(checkpoint.join("blocker")).unwrap();
    // One poll takes the ADD into its checkpoint write; then the caller is gone. (On a
    // multi-threaded runtime the change may also finish within that poll; the outcome
    // below must be the same either way.)
    let _ = tokio::time::timeout(Duration::ZERO, ipam.allocate(&pod(1))).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        ipam.lookup(&pod(1)).await,
        None,
        "the write failed, so the allocation must be rolled back even without a caller"
    );
    let assigned: usize = ipam.status().await.vnics.iter().map(|v| v.assigned).sum();
    assert_eq!(assigned, 1, "only pod 0's address is assigned in the pool");
    std::fs::remove_dir_all(&checkpoint).unwrap();
    std::fs::rename(&kept, &checkpoint).unwrap();
    // And a cut-off ADD whose write succeeds is kept, in memory and in the file. (With the
    // checkpoint writable the change can finish before the one poll ends; either way it
    // must be kept.)
    let _ = tokio::time::timeout(Duration::ZERO, ipam.allocate(&pod(2))).await;
    wait_for(
        "the cut-off ADD to finish",
        Duration::from_secs(5),
        async || ipam.lookup(&pod(2)).await.is_some(),
    )
    .await;
    assert_consistent(&sim, &ipam, &checkpoint).await;
}

/// Cooldown is counted from the wall-clock time of release, recorded in the checkpoint: a
/// restart does not hand the address to a new pod before its cooldown has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cooldown_survives_a_restart() {
    // Capacity 2: one pod VNIC of 2 addresses.
    let sim = sim(2, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let cooldown = Duration::from_secs(3);
    let cfg = config(
        &sim,
        dir.path(),
        PoolConfig {
            cooldown,
            ..pool(&sim, 2)
        },
    );
    let ipam = start(&sim, cfg.clone()).await;
    let a = allocate(&ipam, &pod(0), Duration::from_secs(15)).await;
    let b = allocate(&ipam, &pod(1), Duration::from_secs(15)).await;
    // Taken before the release starts the cooldown, so the check below cannot be early.
    let released = Instant::now();
    assert_eq!(ipam.release(&pod(0)).await, Ok(Some(a.clone())));
    drop(ipam);

    let ipam = start(&sim, cfg).await;
    match ipam.allocate(&pod(2)).await {
        Err(AllocError::CoolingDown { .. }) => {}
        other => panic!(
            "{} was released {:?} ago with a {cooldown:?} cooldown; after a restart it must still cool down, got {other:?}",
            a.ip,
            released.elapsed()
        ),
    }
    let c = allocate(&ipam, &pod(2), Duration::from_secs(10)).await;
    assert!(
        released.elapsed() >= cooldown,
        "reused after {:?}, before the {cooldown:?} cooldown",
        released.elapsed()
    );
    assert_eq!(c.ip, a.ip, "the only address not held by pod 1");
    assert_ne!(c.ip, b.ip);
    assert_consistent(&sim, &ipam, &dir.path().join("ipam.json")).await;
}

/// A checkpoint deleted while the agent is down takes the record of cooldowns with it: if an
/// agent ran earlier in this boot, every free address rests a whole cooldown; after a reboot
/// (no agent before in this boot) nothing from before runs, and the address is served at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_checkpoint_cools_every_free_address_unless_the_node_rebooted() {
    for earlier_agent_this_boot in [true, false] {
        // Capacity 1: one pod VNIC of 1 address.
        let sim = sim(1, 2).await;
        let dir = tempfile::tempdir().unwrap();
        let cooldown = Duration::from_secs(3);
        let cfg = IpamConfig {
            earlier_agent_this_boot,
            ..config(
                &sim,
                dir.path(),
                PoolConfig {
                    cooldown,
                    ..pool(&sim, 1)
                },
            )
        };
        let ipam = start(&sim, cfg.clone()).await;
        let a = allocate(&ipam, &pod(0), Duration::from_secs(15)).await;
        let released = Instant::now();
        assert_eq!(ipam.release(&pod(0)).await, Ok(Some(a.clone())));
        drop(ipam);
        std::fs::remove_file(dir.path().join("ipam.json")).unwrap();

        let ipam = start(&sim, cfg).await;
        let first = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match ipam.allocate(&pod(1)).await {
                    Err(AllocError::PoolEmpty { .. }) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    other => return other,
                }
            }
        })
        .await
        .expect("the reconcile finds the address");
        if earlier_agent_this_boot {
            assert!(
                matches!(first, Err(AllocError::CoolingDown { .. })),
                "{} was released {:?} ago and the checkpoint lost: it must cool down, got {first:?}",
                a.ip,
                released.elapsed()
            );
            let b = allocate(&ipam, &pod(1), Duration::from_secs(10)).await;
            assert!(
                released.elapsed() >= cooldown,
                "reused after {:?}",
                released.elapsed()
            );
            assert_eq!(b.ip, a.ip);
        } else {
            assert_eq!(
                first.map(|b| b.ip),
                Ok(a.ip),
                "after a reboot the address is served at once"
            );
        }
    }
}

/// Durations near their limits (a configuration that slipped past validation, a test) never
/// panic a handler: a DEL with a cooldown of `u64::MAX` seconds releases the address, which then
/// stays out of reach, also across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_cooldown_does_not_panic_a_release() {
    let sim = sim(2, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        &sim,
        dir.path(),
        PoolConfig {
            cooldown: Duration::from_secs(u64::MAX),
            release_delay: Duration::MAX,
            ..pool(&sim, 2)
        },
    );
    let ipam = start(&sim, cfg.clone()).await;
    let a = allocate(&ipam, &pod(0), Duration::from_secs(15)).await;
    assert_eq!(ipam.release(&pod(0)).await, Ok(Some(a.clone())));
    let b = allocate(&ipam, &pod(1), Duration::from_secs(15)).await;
    assert_ne!(b.ip, a.ip, "the released address is cooling down");
    drop(ipam);
    let ipam = start(&sim, cfg).await;
    assert_eq!(ipam.lookup(&pod(1)).await, Some(b));
    match ipam.allocate(&pod(2)).await {
        Err(AllocError::CoolingDown { .. }) => {}
        other => panic!("{} must still be cooling down, got {other:?}", a.ip),
    }
}

/// A DEL that raced ahead of a slow ADD: the ADD arriving just after it is refused, so no
/// address is allocated for a container nobody will delete again; after the grace it is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_add_after_a_del_is_refused() {
    let sim = sim(8, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&sim, dir.path(), pool(&sim, 2));
    cfg.tombstone_grace = Duration::from_millis(700);
    let ipam = start(&sim, cfg).await;
    assert_eq!(ipam.release(&pod(5)).await, Ok(None), "DEL before the ADD");
    match ipam.allocate(&pod(5)).await {
        Err(AllocError::Invalid { reason }) => assert!(
            reason.contains("deleted") && reason.contains("container-005"),
            "the refusal says why: {reason}"
        ),
        other => panic!("a late ADD right after its DEL must be refused, got {other:?}"),
    }
    assert_eq!(ipam.allocations().await.len(), 0, "nothing allocated");
    allocate(&ipam, &pod(6), Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    allocate(&ipam, &pod(5), Duration::from_secs(10)).await;
    assert_consistent(&sim, &ipam, &dir.path().join("ipam.json")).await;
}

/// Another actor edits OCI through the simulator's admin endpoint (a person, Terraform).
async fn admin(sim: &Simulator, method: reqwest::Method, path: &str, body: serde_json::Value) {
    let response = reqwest::Client::new()
        .request(method, format!("{}/admin/{path}", sim.base_url()))
        .json(&body)
        .send()
        .await
        .expect("admin endpoint answers");
    assert!(
        response.status().is_success(),
        "admin {path}: {}",
        response.status()
    );
}

/// The OCID of the private IP with this address.
fn ip_ocid(sim: &Simulator, ip: Ipv4Addr) -> String {
    sim.snapshot()["privateIps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["ipAddress"] == ip.to_string())
        .unwrap_or_else(|| panic!("{ip} exists in OCI"))["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// What `vcnpath status` says is held by pods, per VNIC.
async fn assigned_by_vnic(ipam: &Ipam) -> BTreeMap<String, usize> {
    ipam.status()
        .await
        .vnics
        .into_iter()
        .filter(|v| v.assigned > 0)
        .map(|v| (v.vnic_id, v.assigned))
        .collect()
}

/// Pods `from..to` allocated one after another; none may get an address in `taken`.
async fn allocate_avoiding(ipam: &Ipam, pods: std::ops::Range<usize>, taken: &BTreeSet<Ipv4Addr>) {
    for n in pods {
        let a = allocate(ipam, &pod(n), Duration::from_secs(20)).await;
        assert!(
            !taken.contains(&a.ip),
            "{} handed to {} while another pod still holds it",
            a.ip,
            pod(n).container_id
        );
    }
}

/// Someone strips the `vcnpath-node` tag of a pod's address: the reconcile keeps the slot the
/// pod holds (OCI still has the address), so status, growth and emptiness stay right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_address_whose_tag_was_stripped_stays_the_pods() {
    let sim = sim(8, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let ipam = start(&sim, config(&sim, dir.path(), pool(&sim, 1))).await;
    let a = allocate(&ipam, &pod(0), Duration::from_secs(15)).await;
    let id = ip_ocid(&sim, a.ip);
    admin(
        &sim,
        reqwest::Method::PUT,
        &format!("privateIps/{id}"),
        serde_json::json!({"freeformTags": {}}),
    )
    .await;
    ipam.reconcile().await.expect("reconcile");
    assert_eq!(
        assigned_by_vnic(&ipam).await,
        BTreeMap::from([(a.vnic_id.clone(), 1)]),
        "the pod still holds {} on its VNIC",
        a.ip
    );
    assert_eq!(ipam.lookup(&pod(0)).await, Some(a.clone()));
    assert_eq!(
        sim.calls().get("CreatePrivateIp").copied().unwrap_or(0),
        2,
        "no attempt to recreate an address OCI still has (one pod, one warm)"
    );
}

/// `ListPrivateIps` lags the writes: an address created a moment ago is missing from the list.
/// The reconcile asks `GetPrivateIp` before it gives up a pod's slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_private_ip_list_does_not_drop_a_pods_address() {
    let sim = sim(8, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let ipam = start(&sim, config(&sim, dir.path(), pool(&sim, 1))).await;
    let first = allocate(&ipam, &pod(0), Duration::from_secs(15)).await;
    sim.set_faults(Faults {
        stale_read_ms: 60_000,
        ..Faults::default()
    });
    // Created after the lists stopped moving: invisible to them.
    let second = allocate(&ipam, &pod(1), Duration::from_secs(15)).await;
    ipam.reconcile().await.expect("reconcile");
    assert_eq!(
        assigned_by_vnic(&ipam).await,
        BTreeMap::from([(first.vnic_id.clone(), 2)]),
        "both pods still hold their addresses ({} and {})",
        first.ip,
        second.ip
    );
    let _still = ipam.quiesce().await;
    assert_eq!(node_ips(&sim).get(&second.ip), Some(&second.vnic_id));
}

/// Someone moves a pod's address to another VNIC of the node (`UpdatePrivateIp` `vnicId`):
/// the pod's allocation follows it, and the address is never adopted as free on its new VNIC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_moved_to_another_vnic_follows_its_pod() {
    let sim = sim(3, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let ipam = start(&sim, config(&sim, dir.path(), pool(&sim, 1))).await;
    let mut held = BTreeMap::new();
    for n in 0..4 {
        let a = allocate(&ipam, &pod(n), Duration::from_secs(20)).await;
        held.insert(a.ip, a);
    }
    let vnics: BTreeSet<String> = held.values().map(|a| a.vnic_id.clone()).collect();
    assert_eq!(vnics.len(), 2, "4 pods on 3-address VNICs: {held:?}");
    let moved = held
        .values()
        .find(|a| a.vnic_id == *vnics.first().unwrap())
        .unwrap()
        .clone();
    let target = vnics.last().unwrap().clone();
    {
        let _still = ipam.quiesce().await;
        admin(
            &sim,
            reqwest::Method::PUT,
            &format!("privateIps/{}", ip_ocid(&sim, moved.ip)),
            serde_json::json!({"vnicId": target}),
        )
        .await;
    }
    ipam.reconcile().await.expect("reconcile");
    let now = ipam.lookup(&pod_of(&ipam, moved.ip).await).await.unwrap();
    assert_eq!(
        now.vnic_id, target,
        "the allocation follows its address to VNIC {target}"
    );
    // The agent syncs the datapath on this, so the pod is steered through its new VNIC at
    // once rather than at the next periodic sync.
    tokio::time::timeout(Duration::from_secs(1), ipam.pods_moved())
        .await
        .expect("the move is announced for the datapath");
    let taken: BTreeSet<Ipv4Addr> = held.keys().copied().collect();
    allocate_avoiding(&ipam, 4..6, &taken).await;
    let _still = ipam.quiesce().await;
    assert_eq!(
        node_ips(&sim).get(&moved.ip),
        Some(&target),
        "OCI keeps it where it was moved"
    );
}

async fn pod_of(ipam: &Ipam, ip: Ipv4Addr) -> PodRef {
    ipam.allocations()
        .await
        .into_iter()
        .find(|(_, a)| a.ip == ip)
        .unwrap_or_else(|| panic!("a pod holds {ip}"))
        .0
}

/// A VNIC with pods is detached behind the agent's back: OCI frees its addresses, and a new
/// VNIC in the same subnet gets them again. While those pods live their addresses go to
/// nobody else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_of_pods_on_a_vnic_detached_out_of_band_go_to_nobody_else() {
    let sim = sim(2, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let ipam = start(&sim, config(&sim, dir.path(), pool(&sim, 0))).await;
    let a = allocate(&ipam, &pod(0), Duration::from_secs(20)).await;
    let b = allocate(&ipam, &pod(1), Duration::from_secs(20)).await;
    assert_eq!(a.vnic_id, b.vnic_id);
    let attachment = sim.snapshot()["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["vnicId"] == a.vnic_id.as_str())
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    {
        let _still = ipam.quiesce().await;
        admin(
            &sim,
            reqwest::Method::DELETE,
            &format!("vnicAttachments/{attachment}"),
            serde_json::Value::Null,
        )
        .await;
        wait_for("the detach", Duration::from_secs(5), async || {
            !node_ips(&sim).contains_key(&a.ip)
        })
        .await;
    }
    ipam.reconcile().await.expect("reconcile");
    let quarantined: BTreeSet<Ipv4Addr> = ipam
        .status()
        .await
        .quarantined
        .iter()
        .map(|q| q.ip)
        .collect();
    assert_eq!(
        quarantined,
        BTreeSet::from([a.ip, b.ip]),
        "status names the quarantined addresses"
    );
    // Capacity 4 (two pod VNICs of 2): the two new pods fill a new VNIC, in the same subnet.
    let taken = BTreeSet::from([a.ip, b.ip]);
    allocate_avoiding(&ipam, 2..4, &taken).await;
    assert_eq!(
        ipam.lookup(&pod(0)).await.map(|x| x.ip),
        Some(a.ip),
        "the pod keeps its record"
    );
    // The checkpoint still reads: a restart keeps the quarantined pods and their addresses.
    let cfg = config(&sim, dir.path(), pool(&sim, 0));
    drop(ipam);
    let ipam = start(&sim, cfg).await;
    assert_eq!(ipam.lookup(&pod(1)).await.map(|x| x.ip), Some(b.ip));
    assert_eq!(ipam.allocations().await.len(), 4);
}

/// The attachment of the VNIC that holds `vnic_id`, detached behind the agent's back; returns
/// once OCI has freed its addresses.
async fn detach_out_of_band(sim: &Simulator, ipam: &Ipam, vnic_id: &str, gone: Ipv4Addr) {
    let attachment = sim.snapshot()["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["vnicId"] == vnic_id)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let _still = ipam.quiesce().await;
    admin(
        sim,
        reqwest::Method::DELETE,
        &format!("vnicAttachments/{attachment}"),
        serde_json::Value::Null,
    )
    .await;
    wait_for("the detach", Duration::from_secs(5), async || {
        !node_ips(sim).contains_key(&gone)
    })
    .await;
}

/// The addresses `vcnpath status` lists as quarantined.
async fn quarantined(ipam: &Ipam) -> BTreeSet<Ipv4Addr> {
    ipam.status()
        .await
        .quarantined
        .iter()
        .map(|q| q.ip)
        .collect()
}

/// The node sees a VNIC's interface vanish (detached behind the agent's back): from that
/// moment no ADD gets one of its free addresses, and the reconcile runs at once (it
/// quarantines the VNIC's pods) rather than at the next interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_vnic_interface_stops_its_addresses_at_once() {
    let sim = sim(4, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let ipam = start(&sim, config(&sim, dir.path(), pool(&sim, 2))).await;
    let a = allocate(&ipam, &pod(0), Duration::from_secs(20)).await;
    wait_for("two warm addresses", Duration::from_secs(10), async || {
        ipam.status()
            .await
            .vnics
            .iter()
            .map(|v| v.free)
            .sum::<usize>()
            >= 2
    })
    .await;
    detach_out_of_band(&sim, &ipam, &a.vnic_id, a.ip).await;
    ipam.vnic_vanished(&a.vnic_id).await;
    let b = allocate(&ipam, &pod(1), Duration::from_secs(20)).await;
    assert_held_in_oci(&sim, &b, &a.vnic_id);
    wait_for(
        "the reconcile the vanished interface asks for (it drops the VNIC)",
        Duration::from_secs(10),
        async || {
            let vnics = ipam.status().await.vnics;
            !vnics.iter().any(|v| v.vnic_id == a.vnic_id)
        },
    )
    .await;
}

/// OCI answers 404 for a VNIC the grower creates an address on (detached behind the agent's
/// back): its remaining free addresses go to nobody, and the reconcile runs at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_404_for_a_vnic_stops_its_addresses_at_once() {
    let sim = sim(6, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let ipam = start(&sim, config(&sim, dir.path(), pool(&sim, 2))).await;
    let a = allocate(&ipam, &pod(0), Duration::from_secs(20)).await;
    wait_for("two warm addresses", Duration::from_secs(10), async || {
        ipam.status()
            .await
            .vnics
            .iter()
            .map(|v| v.free)
            .sum::<usize>()
            >= 2
    })
    .await;
    detach_out_of_band(&sim, &ipam, &a.vnic_id, a.ip).await;
    // The node has not noticed: this ADD still gets a free address of the gone VNIC, and
    // the grower, topping up the warm pool there, hears 404.
    let _ = allocate(&ipam, &pod(1), Duration::from_secs(20)).await;
    wait_for(
        "the 404 and the reconcile it asks for",
        Duration::from_secs(10),
        async || quarantined(&ipam).await.contains(&a.ip),
    )
    .await;
    for n in 2..4 {
        let b = allocate(&ipam, &pod(n), Duration::from_secs(20)).await;
        assert_held_in_oci(&sim, &b, &a.vnic_id);
    }
}

/// A new pod's address exists in OCI on the VNIC its allocation names, which is not the one
/// that was detached: a pod given an address of a gone VNIC has no network.
fn assert_held_in_oci(sim: &Simulator, b: &Allocation, gone_vnic: &str) {
    assert!(
        b.vnic_id != gone_vnic,
        "{} handed out on the detached VNIC {gone_vnic}",
        b.ip
    );
    assert_eq!(
        node_ips(sim).get(&b.ip),
        Some(&b.vnic_id),
        "a new pod's {} must exist in OCI on its VNIC {}",
        b.ip,
        b.vnic_id
    );
}

/// An address released into its cooldown on a VNIC that is then detached behind the agent's
/// back: OCI frees it and may give it to the node's next VNIC; it still rests out its
/// cooldown there before any pod gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cooling_address_of_a_detached_vnic_rests_out_its_cooldown_elsewhere() {
    let sim = sim(2, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let mut p = pool(&sim, 0);
    p.cooldown = Duration::from_hours(1);
    let ipam = start(&sim, config(&sim, dir.path(), p.clone())).await;
    let a = allocate(&ipam, &pod(0), Duration::from_secs(20)).await;
    ipam.release(&pod(0)).await.expect("release");
    detach_out_of_band(&sim, &ipam, &a.vnic_id, a.ip).await;
    ipam.reconcile().await.expect("reconcile");
    // A restart in between: the rest is checkpointed even with its VNIC gone.
    drop(ipam);
    let ipam = start(&sim, config(&sim, dir.path(), p)).await;
    let mut given = BTreeSet::new();
    for n in 1..4 {
        given.insert(allocate(&ipam, &pod(n), Duration::from_secs(20)).await.ip);
    }
    let reused = node_ips(&sim).contains_key(&a.ip);
    assert!(
        !given.contains(&a.ip),
        "{} handed out again within its cooldown (OCI gave it back to the node: {reused}); given {given:?}",
        a.ip
    );
}

/// The host as the allocation GC sees it: the attachments whose veth exists.
#[derive(Default)]
struct FakeHost(std::sync::Mutex<BTreeSet<String>>);

impl FakeHost {
    fn add(&self, pod: &PodRef) {
        self.0.lock().unwrap().insert(pod.container_id.clone());
    }
}

impl vcnpath::ipam::gc::HostView for FakeHost {
    fn attached(&self, pod: &PodRef) -> Option<bool> {
        Some(self.0.lock().unwrap().contains(&pod.container_id))
    }
}

/// A pod whose DEL never came (its sandbox was force-removed: the veth is gone) gets its
/// address released once the veth has been missing for the grace period, into the cooldown;
/// a pod whose veth exists and one whose ADD is recent (its plugin may still be creating the
/// veth) keep theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allocation_whose_veth_is_gone_beyond_the_grace_is_released() {
    let sim = sim(8, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let mut p = pool(&sim, 3);
    p.cooldown = Duration::from_hours(1);
    let mut cfg = config(&sim, dir.path(), p);
    cfg.allocation_gc_grace = Duration::from_millis(400);
    let ipam = start(&sim, cfg).await;
    let host = FakeHost::default();
    let gone = allocate(&ipam, &pod(0), Duration::from_secs(15)).await;
    let kept = allocate(&ipam, &pod(1), Duration::from_secs(15)).await;
    host.add(&pod(1));
    assert!(
        ipam.collect_unattached(&host).await.is_empty(),
        "nothing is released before the grace period"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A pod being added now: no veth yet.
    let adding = allocate(&ipam, &pod(2), Duration::from_secs(15)).await;
    let released = ipam.collect_unattached(&host).await;
    assert_eq!(
        released
            .iter()
            .map(|p| p.container_id.as_str())
            .collect::<Vec<_>>(),
        vec!["container-000"],
        "only the pod whose veth is gone beyond the grace is released"
    );
    assert_eq!(ipam.lookup(&pod(0)).await, None);
    assert_eq!(ipam.lookup(&pod(1)).await, Some(kept));
    assert_eq!(ipam.lookup(&pod(2)).await, Some(adding));
    let status = ipam.status().await;
    assert_eq!(status.gc_released, 1, "the release is counted");
    let cooling: usize = status.vnics.iter().map(|v| v.cooldown).sum();
    assert_eq!(cooling, 1, "{} rests in its cooldown", gone.ip);
    for n in 3..6 {
        let a = allocate(&ipam, &pod(n), Duration::from_secs(15)).await;
        assert_ne!(a.ip, gone.ip, "{} reused within its cooldown", gone.ip);
    }
    assert_consistent(&sim, &ipam, &dir.path().join("ipam.json")).await;
}

/// The runtime's CNI GC lists the attachments it still holds: every other allocation is
/// released into the cooldown, except one whose ADD is recent (the runtime's list may have
/// been taken before it); a listed one keeps its address; a GC that lists everything
/// releases nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtimes_gc_releases_only_unlisted_attachments_past_their_add() {
    let sim = sim(8, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let mut p = pool(&sim, 3);
    p.cooldown = Duration::from_hours(1);
    let mut cfg = config(&sim, dir.path(), p);
    cfg.allocation_gc_grace = Duration::from_millis(400);
    let ipam = start(&sim, cfg).await;
    let key = |p: &PodRef| (p.container_id.clone(), p.ifname.clone());
    let stale = allocate(&ipam, &pod(0), Duration::from_secs(15)).await;
    let listed = allocate(&ipam, &pod(1), Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let adding = allocate(&ipam, &pod(2), Duration::from_secs(15)).await;
    let everything: BTreeSet<_> = (0..3).map(|n| key(&pod(n))).collect();
    assert!(
        ipam.collect_not_listed(&everything).await.is_empty(),
        "a GC that lists every attachment releases nothing"
    );
    let valid: BTreeSet<_> = [key(&pod(1))].into();
    let released = ipam.collect_not_listed(&valid).await;
    assert_eq!(
        released
            .iter()
            .map(|(p, a)| (p.container_id.as_str(), a.ip))
            .collect::<Vec<_>>(),
        vec![("container-000", stale.ip)],
        "only the unlisted attachment past its ADD's grace is released"
    );
    assert_eq!(ipam.lookup(&pod(0)).await, None);
    assert_eq!(ipam.lookup(&pod(1)).await, Some(listed));
    assert_eq!(
        ipam.lookup(&pod(2)).await,
        Some(adding),
        "a recent ADD is kept"
    );
    let status = ipam.status().await;
    assert_eq!(status.cni_gc_released, 1, "the release is counted");
    let cooling: usize = status.vnics.iter().map(|v| v.cooldown).sum();
    assert_eq!(cooling, 1, "{} rests in its cooldown", stale.ip);
    for n in 3..6 {
        let a = allocate(&ipam, &pod(n), Duration::from_secs(15)).await;
        assert_ne!(a.ip, stale.ip, "{} reused within its cooldown", stale.ip);
    }
    assert_consistent(&sim, &ipam, &dir.path().join("ipam.json")).await;
}

/// Every `op` request naming `vnic_id` answers `status`/`code` (past the client's retries);
/// every other request is answered.
fn fault_one_vnic(sim: &Simulator, op: &str, vnic_id: &str, status: u16, code: &str) {
    sim.set_faults(Faults {
        rules: vec![FaultRule {
            op: op.into(),
            status,
            code: code.into(),
            resource: Some(vnic_id.to_owned()),
            ..FaultRule::default()
        }],
        ..Faults::default()
    });
}

/// Pods `0..n` allocated one after another, with what they got.
async fn allocate_pods(ipam: &Ipam, n: usize) -> Vec<Allocation> {
    let mut held = Vec::new();
    for i in 0..n {
        held.push(allocate(ipam, &pod(i), Duration::from_secs(20)).await);
    }
    held
}

/// Each pod still holds the address it was given, and no address is held twice.
async fn assert_pods_keep_their_addresses(ipam: &Ipam, pods: &[Allocation]) {
    for (n, a) in pods.iter().enumerate() {
        assert_eq!(
            ipam.lookup(&pod(n)).await.map(|x| (x.ip, x.vnic_id)),
            Some((a.ip, a.vnic_id.clone())),
            "{} must keep {} on {}",
            pod(n).container_id,
            a.ip,
            a.vnic_id
        );
    }
    let all = ipam.allocations().await;
    let distinct: BTreeSet<Ipv4Addr> = all.iter().map(|(_, a)| a.ip).collect();
    assert_eq!(
        distinct.len(),
        all.len(),
        "an address is held twice: {all:?}"
    );
}

/// OCI keeps failing the reads of one VNIC (a 5xx that outlasts the retries): the reconcile
/// still reads the other VNICs and adopts what changed there, and the unreadable VNIC's pods
/// keep their addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_vnics_read_failing_does_not_stop_the_others_reconciling() {
    use vcnpath::oci::models::CreatePrivateIpDetails;
    use vcnpath::oci::new_retry_token;
    let sim = sim(2, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let ipam = start(&sim, config(&sim, dir.path(), pool(&sim, 0))).await;
    let pods = allocate_pods(&ipam, 3).await;
    let (failing, healthy) = (pods[0].vnic_id.clone(), pods[2].vnic_id.clone());
    assert_ne!(failing, healthy, "3 pods on 2-address VNICs: {pods:?}");
    // Someone adds an address tagged for this node on the healthy VNIC.
    let tags = [(NODE_TAG.to_owned(), sim.config().instance_id)].into();
    let details = CreatePrivateIpDetails {
        vnic_id: healthy.clone(),
        freeform_tags: tags,
        ..Default::default()
    };
    let added = client(&sim)
        .create_private_ip(&details, &new_retry_token())
        .await
        .expect("the out-of-band address is created");
    fault_one_vnic(&sim, "GetVnic", &failing, 500, "InternalServerError");
    if let Err(e) = ipam.reconcile().await {
        panic!("one unreadable VNIC ({failing}) stopped the reconcile of the others: {e}");
    }
    let status = ipam.status().await;
    let on = |id: &str| status.vnics.iter().find(|v| v.vnic_id == id).cloned();
    let healthy_now = on(&healthy).expect("the healthy VNIC stays in the pool");
    assert_eq!(
        (healthy_now.assigned, healthy_now.free),
        (1, 1),
        "{} added on {healthy} is adopted as free next to its pod",
        added.ip_address
    );
    let failing_now = on(&failing).expect("the unreadable VNIC stays in the pool");
    assert_eq!(
        failing_now.assigned, 2,
        "the unreadable VNIC's pods keep their addresses"
    );
    assert_pods_keep_their_addresses(&ipam, &pods).await;
    assert!(quarantined(&ipam).await.is_empty(), "nothing quarantined");
    sim.set_faults(Faults::default());
    assert_consistent(&sim, &ipam, &dir.path().join("ipam.json")).await;
}

/// OCI answers 404 for one attached VNIC with pods (another actor is detaching it, or IAM
/// hides it): its pods keep their addresses, each held once; no address of it goes to a new
/// pod until a reconcile reads it again, and then it serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_404_for_an_attached_vnic_keeps_its_pods_and_serves_no_new_one() {
    a_404_on_one_vnic_keeps_its_pods("GetVnic").await;
}

/// As above, with the 404 on the VNIC's `ListPrivateIps` (its `GetVnic` still answers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_404_listing_one_vnics_addresses_keeps_its_pods_and_serves_no_new_one() {
    a_404_on_one_vnic_keeps_its_pods("ListPrivateIps").await;
}

async fn a_404_on_one_vnic_keeps_its_pods(op: &str) {
    let sim = sim(3, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let ipam = start(&sim, config(&sim, dir.path(), pool(&sim, 1))).await;
    let pods = allocate_pods(&ipam, 2).await;
    let vanishing = pods[0].vnic_id.clone();
    assert_eq!(pods[1].vnic_id, vanishing, "both pods on the first VNIC");
    wait_for(
        "a warm address beside them",
        Duration::from_secs(10),
        async || {
            ipam.status()
                .await
                .vnics
                .iter()
                .any(|v| v.vnic_id == vanishing && v.free == 1)
        },
    )
    .await;
    fault_one_vnic(&sim, op, &vanishing, 404, "NotAuthorizedOrNotFound");
    let reconciled = ipam.reconcile().await;
    tracing::info!(?reconciled, op, "reconcile with one VNIC answering 404");
    let new = allocate(&ipam, &pod(2), Duration::from_secs(20)).await;
    assert_ne!(
        new.vnic_id, vanishing,
        "{} handed to a new pod from VNIC {vanishing}, for which OCI answers {op} with 404",
        new.ip
    );
    assert_held_in_oci(&sim, &new, &vanishing);
    assert_pods_keep_their_addresses(&ipam, &pods).await;
    let suspect = |status: &vcnpath::ipam::IpamStatus| {
        status
            .vnics
            .iter()
            .filter(|v| v.suspect)
            .map(|v| v.vnic_id.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        suspect(&ipam.status().await),
        vec![vanishing.clone()],
        "the status shows which VNIC serves no new pod"
    );
    let in_oci = node_ips(&sim);
    for a in &pods {
        assert_eq!(
            in_oci.get(&a.ip),
            Some(&vanishing),
            "{} stays in OCI on its VNIC",
            a.ip
        );
    }
    // OCI answers for the VNIC again: the next reconcile reads it and it serves again.
    sim.set_faults(Faults::default());
    ipam.reconcile().await.expect("reconcile");
    assert!(suspect(&ipam.status().await).is_empty());
    let next = allocate(&ipam, &pod(3), Duration::from_secs(20)).await;
    assert_eq!(
        next.vnic_id, vanishing,
        "once read again, the first VNIC's free address serves the next pod"
    );
    let mut all = pods;
    all.extend([new, next]);
    assert_pods_keep_their_addresses(&ipam, &all).await;
}

/// A bare-metal node on which someone else attached two VNICs to physical NIC 1: the agent's
/// first VNIC goes to NIC 0, which carries only the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_bare_metal_a_new_vnic_goes_to_the_nic_other_actors_left_free() {
    let sim = Simulator::start(
        SimConfig {
            shape: "BM.Standard.E4.128".into(),
            ips_per_vnic: 4,
            max_vnic_attachments: 5,
            attach_delay_ms: 100,
            ..SimConfig::default()
        },
        "127.0.0.1:0",
    )
    .await
    .expect("simulator starts");
    for _ in 0..2 {
        let body = serde_json::json!({"subnetId": PODS_SUBNET, "nicIndex": 1});
        admin(&sim, reqwest::Method::POST, "vnicAttachments", body).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let pool = PoolConfig {
        physical_nics: 2,
        ..pool(&sim, 0)
    };
    let ipam = start(&sim, config(&sim, dir.path(), pool)).await;
    let a = allocate(&ipam, &pod(0), Duration::from_secs(20)).await;
    let snapshot = sim.snapshot();
    let attachments = snapshot["attachments"].as_array().unwrap();
    let nic_of = |vnic: &str| {
        attachments
            .iter()
            .find(|x| x["vnicId"] == vnic)
            .and_then(|x| x["nicIndex"].as_u64())
    };
    assert_eq!(
        nic_of(&a.vnic_id),
        Some(0),
        "NIC 0 carries the primary, NIC 1 two VNICs of another actor: {attachments:#?}"
    );
}

/// A VNIC takes as long to attach as on real OCI (10–30 s; docs/oci.md), here longer than the
/// agent waits for one attach (10 s): the wait that runs out is asked again with the same retry
/// token, so the node gets one VNIC, not two, its pod gets an address on it, and the attachment
/// is polled gently rather than every tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vnic_slower_to_attach_than_the_wait_is_attached_once() {
    let sim = Simulator::start(
        SimConfig {
            ips_per_vnic: 4,
            max_vnic_attachments: 3,
            attach_delay_ms: 12_000,
            ..SimConfig::default()
        },
        "127.0.0.1:0",
    )
    .await
    .expect("simulator starts");
    let dir = tempfile::tempdir().unwrap();
    let ipam = start(&sim, config(&sim, dir.path(), pool(&sim, 1))).await;
    let a = allocate(&ipam, &pod(0), Duration::from_secs(40)).await;
    let calls = sim.calls();
    let attached: BTreeSet<String> = node_ips(&sim).into_values().collect();
    assert_eq!(
        attached,
        BTreeSet::from([a.vnic_id.clone()]),
        "one VNIC for the node, the pod's: {calls:?}"
    );
    let snapshot = sim.snapshot();
    let live = snapshot["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["lifecycleState"] != "DETACHED" && x["subnetId"] == PODS_SUBNET)
        .count();
    assert_eq!(
        live, 1,
        "no second attachment was made: {calls:?} {}",
        snapshot["attachments"]
    );
    assert_eq!(
        calls.get("DetachVnic"),
        None,
        "the slow attachment is adopted, not torn down: {calls:?}"
    );
    let polls = calls.get("GetVnicAttachment").copied().unwrap_or(0);
    assert!(
        polls <= 12,
        "{polls} polls of an attachment that took 12 s (1 s doubling to 5 s): {calls:?}"
    );
}

/// A VNIC whose creates keep failing is detached behind the agent's back: once the reconcile
/// has dropped it from the pool, `vcnpath status` no longer lists its failing creates (nothing
/// retries them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trouble_of_a_vnic_that_left_the_pool_is_forgotten() {
    let sim = sim(8, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let ipam = start(&sim, config(&sim, dir.path(), pool(&sim, 1))).await;
    let a = allocate(&ipam, &pod(0), Duration::from_secs(20)).await;
    sim.set_faults(Faults {
        rules: vec![FaultRule {
            op: "CreatePrivateIp".into(),
            ..FaultRule::default()
        }],
        ..Faults::default()
    });
    // A second pod takes the warm address (if it is there yet); the refill on the pod's
    // VNIC fails.
    let _ = ipam.allocate(&pod(1)).await;
    wait_for(
        "the failing create in status",
        Duration::from_secs(10),
        async || {
            ipam.status()
                .await
                .oci
                .iter()
                .any(|t| t.target == a.vnic_id)
        },
    )
    .await;
    detach_out_of_band(&sim, &ipam, &a.vnic_id, a.ip).await;
    ipam.reconcile().await.expect("reconcile");
    wait_for(
        "the gone VNIC's trouble to leave status",
        Duration::from_secs(5),
        async || {
            !ipam
                .status()
                .await
                .oci
                .iter()
                .any(|t| t.target == a.vnic_id)
        },
    )
    .await;
}

/// A lost checkpoint (issue 10, item 3): the addresses the node shows in use — a pod veth
/// with its /32 route — are held at start for their unknown pods; no new pod gets one; the
/// runtime's CNI GC cannot release one (no list can name an unknown attachment); the one
/// whose veth is gone beyond the grace period is released into its cooldown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_the_node_shows_in_use_are_held_when_the_checkpoint_is_lost() {
    let sim = sim(8, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let mut p = pool(&sim, 3);
    p.cooldown = Duration::from_hours(1);
    let config = || {
        let mut cfg = config(&sim, dir.path(), p.clone());
        cfg.allocation_gc_grace = Duration::from_millis(400);
        cfg
    };
    let first = start(&sim, config()).await;
    let mut running = Vec::new();
    for n in 0..3 {
        running.push(allocate(&first, &pod(n), Duration::from_secs(15)).await);
    }
    drop(first);
    std::fs::remove_file(dir.path().join("ipam.json")).expect("lose the checkpoint");

    let holders: Vec<HostHolder> = running
        .iter()
        .enumerate()
        .map(|(n, a)| HostHolder {
            ip: a.ip,
            veth: Some(format!("vcnlost{n}")),
            interface: None,
            imds: false,
        })
        .collect();
    let ipam = Ipam::start_with_host(cloud(&sim), config(), &holders).expect("IPAM starts");
    ipam.reconciled().await;
    assert_eq!(ipam.status().await.recovered, 3);
    let held: BTreeSet<Ipv4Addr> = running.iter().map(|a| a.ip).collect();
    let host = FakeHost::default();
    let mut valid = BTreeSet::new();
    // Five more fill the node (8 addresses): every free one, none of the held.
    for n in 3..8 {
        let a = allocate(&ipam, &pod(n), Duration::from_secs(15)).await;
        assert!(
            !held.contains(&a.ip),
            "a new pod got {}, a running pod's",
            a.ip
        );
        host.add(&pod(n));
        valid.insert((pod(n).container_id, pod(n).ifname));
    }
    assert!(
        ipam.collect_not_listed(&valid).await.is_empty(),
        "the runtime's GC released an address held for an unknown pod"
    );
    for holder in &holders[1..] {
        host.add(&vcnpath::ipam::holders::recovered_pod(holder));
    }
    assert!(ipam.collect_unattached(&host).await.is_empty());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let released = ipam.collect_unattached(&host).await;
    assert_eq!(
        released,
        vec![vcnpath::ipam::holders::recovered_pod(&holders[0])],
        "only the held address whose veth is gone is released"
    );
    let status = ipam.status().await;
    assert_eq!(status.recovered, 2);
    let cooling: usize = status.vnics.iter().map(|v| v.cooldown).sum();
    assert_eq!(cooling, 1, "{} rests in its cooldown", running[0].ip);
    assert_consistent(&sim, &ipam, &dir.path().join("ipam.json")).await;
}

/// The periodic host scan: an address the node routes to a pod veth while the pool has it
/// free (a veth made behind the agent's back) is held from then on, once, and no pod gets
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_the_node_routes_while_free_is_held_from_then_on() {
    let sim = sim(8, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let ipam = start(&sim, config(&sim, dir.path(), pool(&sim, 3))).await;
    let first = allocate(&ipam, &pod(0), Duration::from_secs(15)).await;
    let routed = *node_ips(&sim)
        .keys()
        .find(|ip| **ip != first.ip)
        .expect("a free address in the pool");
    let holder = HostHolder {
        ip: routed,
        veth: Some("vcnbyhand".into()),
        interface: None,
        imds: false,
    };
    assert_eq!(ipam.hold_host(std::slice::from_ref(&holder)).await, Ok(1));
    assert_eq!(
        ipam.hold_host(std::slice::from_ref(&holder)).await,
        Ok(0),
        "held once"
    );
    // The node's other seven addresses, none of them the routed one.
    for n in 1..7 {
        let a = allocate(&ipam, &pod(n), Duration::from_secs(15)).await;
        assert_ne!(
            a.ip,
            routed,
            "{} got the address the node routes to a veth",
            pod(n).container_id
        );
    }
    assert_eq!(ipam.status().await.recovered, 1);
    assert_consistent(&sim, &ipam, &dir.path().join("ipam.json")).await;
}

/// Issue 14: in CIDR mode the pool grows by /28 blocks, one `CreatePrivateIp` for sixteen
/// addresses; every address of a block serves one pod, and pool, checkpoint and OCI agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cidr_mode_serves_pods_from_blocks_with_one_call_per_sixteen_addresses() {
    let sim = sim(31, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let ipam = start(&sim, config(&sim, dir.path(), block_pool(&sim, 8, false))).await;
    let mut seen = BTreeSet::new();
    for n in 0..40 {
        let a = allocate(&ipam, &pod(n), Duration::from_secs(20)).await;
        assert!(seen.insert(a.ip), "{} handed out twice", a.ip);
    }
    wait_for("the warm target", Duration::from_secs(10), async || {
        ipam.status()
            .await
            .vnics
            .iter()
            .map(|v| v.free)
            .sum::<usize>()
            >= 8
    })
    .await;
    let objects = node_objects(&sim);
    assert!(
        objects.iter().all(|(_, prefix)| *prefix == 28),
        "only blocks: {objects:?}"
    );
    // 40 pods + 8 warm = 48 addresses: three /28s.
    assert_eq!(objects.len(), 3, "{objects:?}");
    let creates = sim.calls().get("CreatePrivateIp").copied().unwrap_or(0);
    assert!(
        creates <= 4,
        "{creates} CreatePrivateIp calls for 48 addresses"
    );
    // `vcnpath status` shows the blocks OCI holds, each VNIC's as OCI counts them.
    let status = ipam.status().await;
    let shown: BTreeSet<String> = status
        .vnics
        .iter()
        .flat_map(|v| v.blocks.iter().map(ToString::to_string))
        .collect();
    let held: BTreeSet<String> = objects
        .iter()
        .map(|(network, prefix)| format!("{network}/{prefix}"))
        .collect();
    assert_eq!(shown, held, "status blocks vs OCI's");
    assert_eq!(status.vnics.iter().map(|v| v.objects).sum::<usize>(), 3);
    assert_consistent(&sim, &ipam, &dir.path().join("ipam.json")).await;
}

/// Issue 14: a restart with blocks restores every pod's address from the checkpoint, the
/// reconcile rebuilds the blocks from OCI, and no address inside a block goes to two pods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_blocks_keeps_every_pods_address_once() {
    let sim = sim(31, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&sim, dir.path(), block_pool(&sim, 4, false));
    let ipam = start(&sim, cfg.clone()).await;
    let mut before = BTreeMap::new();
    for n in 0..20 {
        before.insert(
            n,
            allocate(&ipam, &pod(n), Duration::from_secs(20)).await.ip,
        );
    }
    for n in 0..5 {
        ipam.release(&pod(n)).await.expect("release");
        before.remove(&n);
    }
    let saved = Checkpoint::new(dir.path().join("ipam.json"))
        .load()
        .unwrap();
    assert!(
        saved.allocations.values().all(|e| e.block.is_some()),
        "the checkpoint records each pod's block"
    );
    drop(ipam);

    let ipam = start(&sim, cfg).await;
    for (n, ip) in &before {
        assert_eq!(
            ipam.lookup(&pod(*n)).await.map(|a| a.ip),
            Some(*ip),
            "pod {n} keeps its address"
        );
    }
    let mut held: BTreeSet<Ipv4Addr> = before.values().copied().collect();
    for n in 100..130 {
        let a = allocate(&ipam, &pod(n), Duration::from_secs(20)).await;
        assert!(
            held.insert(a.ip),
            "{} handed to a second pod after the restart",
            a.ip
        );
    }
    assert_consistent(&sim, &ipam, &dir.path().join("ipam.json")).await;
}

/// Issue 14: a block goes back to OCI only whole, once none of its addresses is assigned or
/// cooling down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_are_deleted_whole_once_no_address_of_them_is_in_use() {
    let sim = sim(31, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let pool = PoolConfig {
        release_delay: Duration::from_millis(300),
        ..block_pool(&sim, 0, false)
    };
    let ipam = start(&sim, config(&sim, dir.path(), pool)).await;
    for n in 0..20 {
        allocate(&ipam, &pod(n), Duration::from_secs(20)).await;
    }
    assert_eq!(node_objects(&sim).len(), 2, "20 pods in two /28s");
    // One pod left in each block keeps both.
    let keep: BTreeSet<usize> = [0, 19].into();
    for n in (0..20).filter(|n| !keep.contains(n)) {
        ipam.release(&pod(n)).await.expect("release");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let objects = node_objects(&sim);
    let held: Vec<Ipv4Addr> = held_ips(&ipam).await;
    for ip in &held {
        assert!(
            objects
                .iter()
                .any(|(first, p)| ipnet::Ipv4Net::new(*first, *p).unwrap().contains(ip)),
            "{ip} is held but its block is gone: {objects:?}"
        );
    }
    for n in keep {
        ipam.release(&pod(n)).await.expect("release");
    }
    wait_for("every block deleted", Duration::from_secs(10), async || {
        node_objects(&sim).is_empty()
    })
    .await;
    assert_consistent(&sim, &ipam, &dir.path().join("ipam.json")).await;
}

/// The addresses the pods hold.
async fn held_ips(ipam: &Ipam) -> Vec<Ipv4Addr> {
    ipam.allocations()
        .await
        .into_iter()
        .map(|(_, a)| a.ip)
        .collect()
}

/// Issue 14: a subnet with free addresses but no free aligned block (fragmented; a /27 holds
/// no /28 without a reserved address) never leaves `auto` stuck: it grows by single
/// addresses. `cidr` mode does not, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fragmented_subnet_gets_single_addresses_in_auto_mode_and_an_answer_in_cidr_mode() {
    for auto in [true, false] {
        let mut sim_config = SimConfig {
            ips_per_vnic: 31,
            max_vnic_attachments: 3,
            attach_delay_ms: 100,
            ..SimConfig::default()
        };
        let pods = sim_config
            .subnets
            .iter_mut()
            .find(|s| s.id == PODS_SUBNET)
            .expect("the pods subnet");
        pods.cidr_block = "10.0.16.0/27".into();
        let sim = Simulator::start(sim_config, "127.0.0.1:0").await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ipam = start(&sim, config(&sim, dir.path(), block_pool(&sim, 4, auto))).await;
        if auto {
            for n in 0..10 {
                allocate(&ipam, &pod(n), Duration::from_secs(20)).await;
            }
            let objects = node_objects(&sim);
            assert!(
                objects.iter().all(|(_, p)| *p == 32),
                "single addresses: {objects:?}"
            );
            assert_consistent(&sim, &ipam, &dir.path().join("ipam.json")).await;
        } else {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let told = ipam.allocate(&pod(0)).await.expect_err("no block anywhere");
            let status = ipam.status().await;
            let trouble = format!("{:?}", status.oci);
            assert!(
                trouble.contains("LimitExceeded") && trouble.contains("aligned"),
                "status says OCI gives no block: {trouble} (the pod was told {told})"
            );
            assert_eq!(attached_vnics(&sim), 2, "no VNIC attached to chase blocks");
        }
    }
}

/// Nodes started together spread their first calls to OCI over `start_jitter`: twelve IPAM
/// instances started at once with a 6 s jitter reconcile more than 2 s apart (without the
/// jitter they finish within about a second of each other, contending for two threads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_started_together_spread_their_first_reconcile_over_the_start_jitter() {
    let sim = sim(8, 2).await;
    let dirs: Vec<_> = (0..12).map(|_| tempfile::tempdir().unwrap()).collect();
    let started = Instant::now();
    let reconciles = dirs.iter().map(|dir| {
        let mut cfg = config(&sim, dir.path(), pool(&sim, 0));
        cfg.start_jitter = Duration::from_secs(6);
        async {
            let ipam = start(&sim, cfg).await;
            drop(ipam);
            started.elapsed()
        }
    });
    let mut took: Vec<Duration> = futures::future::join_all(reconciles).await;
    took.sort();
    let (first, last) = (took[0], took[took.len() - 1]);
    assert!(
        last > first + Duration::from_secs(2),
        "first reconciles at {took:?}: not spread"
    );
    assert!(
        last < Duration::from_secs(9),
        "the jitter is at most 6 s: {took:?}"
    );
}
