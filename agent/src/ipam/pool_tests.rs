//! The pool policy, decided without any cloud: given a pool and targets, what happens next.
use super::*;

/// No allocation names any VNIC (the slots alone tell).
const NO_PODS: BTreeSet<String> = BTreeSet::new();

fn cfg() -> PoolConfig {
    PoolConfig {
        warm_ips: 4,
        min_ips: 0,
        warm_vnics: 0,
        ips_per_vnic: 8,
        max_vnics: 3,
        use_primary_vnic: false,
        subnets: vec!["subnet-a".into(), "subnet-b".into()],
        release_delay: Duration::from_mins(1),
        cooldown: Duration::from_secs(10),
        subnet_retry: Duration::from_mins(10),
        physical_nics: 1,
        ..PoolConfig::default()
    }
}

fn info(n: u32) -> VnicInfo {
    VnicInfo {
        id: format!("vnic-{n}"),
        attachment_id: format!("att-{n}"),
        // Every VNIC of a VM is on NIC 0; the attach time orders them.
        nic_index: 0,
        vlan_tag: 0,
        attached_at: format!("2026-01-01T00:00:{n:02}.000Z"),
        mac: format!("02:00:00:00:00:0{n}"),
        interface: None,
        subnet_id: "subnet-a".into(),
        subnet: "10.0.16.0/20".parse().unwrap(),
        router_ip: Ipv4Addr::new(10, 0, 16, 1),
        primary_ip: Ipv4Addr::new(10, 0, 16, 2 + n as u8),
        is_primary: false,
    }
}

fn pod(n: usize) -> PodRef {
    PodRef {
        container_id: format!("c{n}"),
        ifname: "eth0".into(),
        namespace: None,
        name: None,
    }
}

/// A pool with the primary VNIC outside it and one secondary VNIC holding `free` free and
/// `assigned` assigned addresses.
fn pool_with(now: Instant, free: usize, assigned: usize) -> Pool {
    let mut pool = Pool {
        other_attachments: vec![0],
        ..Pool::default()
    };
    pool.upsert_vnic(info(1));
    for i in 0..free + assigned {
        let state = if i < assigned {
            SlotState::Assigned(pod(i))
        } else {
            SlotState::Free { since: now }
        };
        let ip = Ipv4Addr::new(10, 0, 17, i as u8 + 1);
        pool.add_slot(
            "vnic-1",
            ip,
            Slot {
                ocid: format!("ip-{i}"),
                state,
                block: None,
            },
        );
    }
    pool
}

#[test]
fn vnics_are_used_in_attach_order_not_by_nic_index() {
    // On a VM every VNIC has nicIndex 0; the pool must still keep a stable, meaningful
    // order: the primary first, then by attach time, whatever order they are learnt in.
    let mut pool = Pool::default();
    pool.upsert_vnic(info(3));
    pool.upsert_vnic(info(1));
    pool.upsert_vnic(VnicInfo {
        is_primary: true,
        attached_at: "2026-01-01T00:00:09.000Z".into(),
        ..info(9)
    });
    pool.upsert_vnic(info(2));
    let order: Vec<&str> = pool.vnics().iter().map(|v| v.info.id.as_str()).collect();
    assert_eq!(order, ["vnic-9", "vnic-1", "vnic-2", "vnic-3"]);
    // Equal times (a checkpoint from before times were kept): the attachment id decides.
    let mut old = Pool::default();
    for n in [2, 1] {
        old.upsert_vnic(VnicInfo {
            attached_at: String::new(),
            ..info(n)
        });
    }
    let order: Vec<&str> = old.vnics().iter().map(|v| v.info.id.as_str()).collect();
    assert_eq!(order, ["vnic-1", "vnic-2"]);
}

#[test]
fn max_pods_leaves_out_the_primary_vnic_unless_it_serves_pods() {
    assert_eq!(max_pods(5, 31, false), 124, "a 5-VNIC shape fits 110 pods");
    assert_eq!(max_pods(5, 31, true), 155);
    assert_eq!(max_pods(1, 31, false), 0, "only a primary VNIC: no pods");
    assert_eq!(PoolConfig::default().capacity(), 31);
}

#[test]
fn an_empty_pool_attaches_a_vnic_in_the_first_subnet() {
    let now = Instant::now();
    let pool = Pool {
        other_attachments: vec![0],
        ..Pool::default()
    };
    let plan = pool.plan(&cfg(), now, &NO_PODS);
    assert_eq!(plan.attach, vec!["subnet-a".to_string()], "{plan:?}");
    assert!(plan.create.is_empty(), "no VNIC to create IPs on: {plan:?}");
}

#[test]
fn warm_target_creates_the_missing_free_addresses() {
    let now = Instant::now();
    let plan = pool_with(now, 1, 2).plan(&cfg(), now, &NO_PODS);
    assert_eq!(
        plan.create.len(),
        3,
        "4 warm wanted, 1 free: create 3 ({plan:?})"
    );
    assert!(plan.attach.is_empty() && plan.release.is_empty());
}

#[test]
fn minimum_target_holds_addresses_with_no_pods() {
    let now = Instant::now();
    let cfg = PoolConfig {
        min_ips: 6,
        ..cfg()
    };
    let plan = pool_with(now, 4, 0).plan(&cfg, now, &NO_PODS);
    assert_eq!(plan.create.len(), 2, "{plan:?}");
}

#[test]
fn a_full_vnic_spills_to_a_new_vnic() {
    let now = Instant::now();
    // 6 assigned + 1 free on an 8-IP VNIC: one more fits, the other 2 warm need a new VNIC.
    let plan = pool_with(now, 1, 6).plan(&cfg(), now, &NO_PODS);
    assert_eq!(
        plan.create,
        vec![Create {
            vnic: "vnic-1".to_string(),
            block: None
        }],
        "{plan:?}"
    );
    assert_eq!(plan.attach.len(), 1, "{plan:?}");
}

#[test]
fn limit_exceeded_marks_a_vnic_full() {
    let now = Instant::now();
    let mut pool = pool_with(now, 0, 3);
    pool.mark_full("vnic-1");
    let plan = pool.plan(&cfg(), now, &NO_PODS);
    assert!(plan.create.is_empty(), "a full VNIC gets no IPs: {plan:?}");
    assert_eq!(plan.attach.len(), 1);
}

#[test]
fn exhausted_subnet_spills_to_the_next_then_comes_back() {
    let now = Instant::now();
    let mut pool = pool_with(now, 0, 8);
    pool.mark_subnet_exhausted("subnet-a", now + Duration::from_mins(10));
    assert_eq!(
        pool.plan(&cfg(), now, &NO_PODS).attach,
        vec!["subnet-b".to_string()]
    );
    pool.mark_subnet_exhausted("subnet-b", now + Duration::from_mins(10));
    assert!(pool.plan(&cfg(), now, &NO_PODS).attach.is_empty());
    assert!(
        pool.is_exhausted(&cfg(), now),
        "full VNIC and no subnet left"
    );
    let later = now + Duration::from_secs(601);
    pool.tick(later);
    assert_eq!(
        pool.plan(&cfg(), later, &NO_PODS).attach,
        vec!["subnet-a".to_string()]
    );
}

#[test]
fn vnic_limit_of_the_shape_is_respected() {
    let now = Instant::now();
    let mut pool = pool_with(now, 0, 8);
    pool.other_attachments = vec![0, 0]; // primary + a VNIC someone else attached
    assert!(pool.plan(&cfg(), now, &NO_PODS).is_empty());
    assert!(pool.is_exhausted(&cfg(), now));
}

#[test]
fn capacity_caps_the_warm_target() {
    let now = Instant::now();
    let cfg = PoolConfig {
        max_vnics: 2,
        ..cfg()
    };
    let plan = pool_with(now, 0, 7).plan(&cfg, now, &NO_PODS);
    assert_eq!(plan.create.len(), 1, "capacity 8, 7 used: {plan:?}");
    assert!(plan.attach.is_empty());
}

#[test]
fn excess_free_addresses_are_released_only_after_the_delay() {
    let now = Instant::now();
    let pool = pool_with(now, 7, 1);
    assert!(
        pool.plan(&cfg(), now, &NO_PODS).is_empty(),
        "too early to release"
    );
    let later = now + Duration::from_secs(61);
    let plan = pool.plan(&cfg(), later, &NO_PODS);
    assert_eq!(plan.release.len(), 3, "7 free, 4 warm wanted: {plan:?}");
}

#[test]
fn freed_address_rests_in_cooldown_before_reuse() {
    let now = Instant::now();
    let mut pool = pool_with(now, 0, 1);
    let ip = Ipv4Addr::new(10, 0, 17, 1);
    pool.set_state(
        "vnic-1",
        ip,
        SlotState::Cooldown {
            until: now + Duration::from_secs(10),
            released_at: std::time::SystemTime::now(),
        },
    );
    assert!(pool.pick_free(false).is_none(), "cooldown is not free");
    pool.tick(now + Duration::from_secs(5));
    assert!(pool.pick_free(false).is_none());
    pool.tick(now + Duration::from_secs(10));
    assert_eq!(pool.pick_free(false).map(|(_, ip)| ip), Some(ip));
}

#[test]
fn allocation_waits_for_the_interface_when_asked() {
    let now = Instant::now();
    let mut pool = pool_with(now, 1, 0);
    assert!(pool.pick_free(true).is_none());
    assert!(pool.set_interface("02:00:00:00:00:01", "eth1"));
    assert!(pool.pick_free(true).is_some());
}

#[test]
fn empty_vnic_above_warm_target_is_detached() {
    let now = Instant::now();
    let mut pool = pool_with(now, 4, 2);
    pool.upsert_vnic(info(2));
    for i in 0..3u8 {
        pool.add_slot(
            "vnic-2",
            Ipv4Addr::new(10, 0, 18, i + 1),
            Slot {
                ocid: format!("ip2-{i}"),
                state: SlotState::Free { since: now },
                block: None,
            },
        );
    }
    assert!(
        pool.plan(&cfg(), now, &NO_PODS).detach.is_empty(),
        "a VNIC is detached only after the release delay"
    );
    let later = now + Duration::from_secs(61);
    let plan = pool.plan(&cfg(), later, &NO_PODS);
    assert_eq!(
        plan.detach,
        vec![("vnic-2".to_string(), "att-2".to_string())],
        "{plan:?}"
    );
    assert!(
        plan.release.is_empty(),
        "detaching deletes its IPs: {plan:?}"
    );

    let keep_one = PoolConfig {
        warm_vnics: 1,
        ..cfg()
    };
    let plan = pool.plan(&keep_one, later, &NO_PODS);
    assert!(plan.detach.is_empty(), "one warm VNIC is kept: {plan:?}");
}

#[test]
fn vnic_with_a_pod_is_never_detached() {
    let now = Instant::now();
    let pool = pool_with(now, 20, 1);
    let plan = pool.plan(&cfg(), now + Duration::from_hours(1), &NO_PODS);
    assert!(plan.detach.is_empty(), "{plan:?}");
}

#[test]
fn vnic_whose_pods_slot_was_dropped_is_never_detached() {
    // A stripped tag or a stale list made the reconcile drop the pod's slot: the VNIC's
    // remaining slots are all free and idle, but an allocation still names it.
    let now = Instant::now();
    let mut pool = pool_with(now, 4, 2);
    pool.upsert_vnic(info(2));
    for i in 0..3u8 {
        pool.add_slot(
            "vnic-2",
            Ipv4Addr::new(10, 0, 18, i + 1),
            Slot {
                ocid: format!("ip2-{i}"),
                state: SlotState::Free { since: now },
                block: None,
            },
        );
    }
    let pods_on = BTreeSet::from(["vnic-1".to_owned(), "vnic-2".to_owned()]);
    let plan = pool.plan(&cfg(), now + Duration::from_hours(1), &pods_on);
    assert!(
        plan.detach.is_empty(),
        "vnic-2 still holds a pod's address: {plan:?}"
    );
}

#[test]
fn durations_and_counts_near_their_limits_do_not_panic() {
    let now = Instant::now();
    let huge = PoolConfig {
        warm_ips: usize::MAX,
        min_ips: usize::MAX,
        warm_vnics: usize::MAX,
        release_delay: Duration::MAX,
        cooldown: Duration::MAX,
        subnet_retry: Duration::MAX,
        ..cfg()
    };
    let mut pool = pool_with(now, 2, 1);
    let _ = pool.plan(&huge, now, &NO_PODS);
    let _ = pool.is_exhausted(&huge, now);
    assert_eq!(
        max_pods(usize::MAX, usize::MAX, true),
        usize::MAX,
        "saturates"
    );
    let until = later(now, Duration::MAX);
    assert!(until > now + Duration::from_hours(24 * 365), "far future");
    pool.set_state(
        "vnic-1",
        Ipv4Addr::new(10, 0, 17, 1),
        SlotState::Cooldown {
            until,
            released_at: std::time::SystemTime::now(),
        },
    );
    pool.tick(now + Duration::from_hours(1));
    assert_eq!(pool.counts().cooldown, 1, "still cooling");
}

#[test]
fn warm_vnic_target_attaches_a_spare() {
    let now = Instant::now();
    let cfg = PoolConfig {
        warm_vnics: 1,
        ..cfg()
    };
    let plan = pool_with(now, 4, 1).plan(&cfg, now, &NO_PODS);
    assert_eq!(plan.attach.len(), 1, "{plan:?}");
}

#[test]
fn refused_allocations_grow_a_pool_without_warm_target() {
    let now = Instant::now();
    let cfg = PoolConfig {
        warm_ips: 0,
        ..cfg()
    };
    let mut pool = pool_with(now, 0, 2);
    assert!(
        pool.plan(&cfg, now, &NO_PODS).is_empty(),
        "no demand, no warm target"
    );
    pool.waiting.insert(("c8".into(), "eth0".into()));
    pool.waiting.insert(("c9".into(), "eth0".into()));
    assert_eq!(pool.plan(&cfg, now, &NO_PODS).create.len(), 2);
}

#[test]
fn waiting_pods_come_on_top_of_the_warm_target() {
    let now = Instant::now();
    let mut pool = pool_with(now, 0, 0);
    let blocks = cidr_cfg();
    for n in 0..14 {
        pool.waiting.insert((format!("c{n}"), "eth0".into()));
    }
    // 14 pods waiting and a warm target of 4 are 18 addresses: two /28 blocks in one step,
    // not one block now and another once the first 14 pods hold theirs.
    assert_eq!(blocks.warm_ips, 4);
    assert_eq!(pool.plan(&blocks, now, &NO_PODS).create.len(), 2);
    let plan = pool.plan(&cfg(), now, &NO_PODS);
    assert_eq!(
        (plan.create.len(), plan.attach.len()),
        (8, 1),
        "single addresses: 18 wanted, 8 on the one VNIC and the shape's last VNIC to attach: {plan:?}"
    );
}

#[test]
fn cooldown_is_not_exhaustion() {
    let now = Instant::now();
    let cfg = PoolConfig {
        max_vnics: 2,
        ..cfg()
    };
    let mut pool = pool_with(now, 0, 8);
    assert!(pool.is_exhausted(&cfg, now));
    pool.set_state(
        "vnic-1",
        Ipv4Addr::new(10, 0, 17, 1),
        SlotState::Cooldown {
            until: now + Duration::from_secs(10),
            released_at: std::time::SystemTime::now(),
        },
    );
    assert!(
        !pool.is_exhausted(&cfg, now),
        "the address comes back after its cooldown"
    );
}

#[test]
fn a_suspect_vnics_free_addresses_do_not_hold_back_growth() {
    let now = Instant::now();
    let mut pool = pool_with(now, 4, 2);
    assert!(
        pool.plan(&cfg(), now, &NO_PODS).is_empty(),
        "4 warm: {pool:?}"
    );
    pool.mark_suspect("vnic-1");
    assert!(
        pool.pick_free(false).is_none(),
        "a suspect VNIC hands out nothing"
    );
    let plan = pool.plan(&cfg(), now, &NO_PODS);
    assert_eq!(
        plan.attach,
        vec!["subnet-a".to_string()],
        "its 4 free addresses serve nobody: another VNIC brings the warm target ({plan:?})"
    );
}

#[test]
fn a_suspect_vnic_is_neither_shrunk_nor_detached() {
    let now = Instant::now();
    let mut pool = pool_with(now, 8, 0);
    pool.mark_suspect("vnic-1");
    let cfg = PoolConfig {
        warm_ips: 0,
        ..cfg()
    };
    let later = now + Duration::from_secs(61);
    let plan = pool.plan(&cfg, later, &NO_PODS);
    assert!(
        plan.release.is_empty() && plan.detach.is_empty(),
        "nothing is done to a VNIC the reconcile could not read: {plan:?}"
    );
}

#[test]
fn a_vnic_whose_interface_was_lost_stays_out_of_the_pool_after_the_reconcile_clears_it() {
    // OCI still lists the VNIC attached, so the reconcile clears `suspect`; the interface is
    // still gone, so its free addresses must neither serve a pod nor hold back growth.
    let now = Instant::now();
    let mut pool = pool_with(now, 4, 2);
    pool.vnic_mut("vnic-1").unwrap().interface_lost = true;
    assert!(
        pool.pick_free(false).is_none(),
        "an interface-less VNIC hands out nothing"
    );
    let plan = pool.plan(&cfg(), now, &NO_PODS);
    assert!(
        plan.attach == vec!["subnet-a".to_string()] && plan.create.is_empty(),
        "its free addresses count for nothing, nothing is created on it: another VNIC ({plan:?})"
    );
    assert!(pool.set_interface("02:00:00:00:00:01", "ens4"));
    assert!(
        pool.pick_free(true).is_some(),
        "found again, it serves again"
    );
}

fn cidr_cfg() -> PoolConfig {
    PoolConfig {
        block_prefix: Some(28),
        block_addresses_per_vnic: 64,
        ..cfg()
    }
}

/// Adds the /28 at `first` to `vnic` as one object (`ocid`), every address free since `since`.
fn add_block(pool: &mut Pool, vnic: &str, first: Ipv4Addr, ocid: &str, since: Instant) {
    let block = Ipv4Net::new(first, 28).unwrap();
    for ip in crate::oci::models::block_addresses(block) {
        let slot = Slot {
            ocid: ocid.into(),
            state: SlotState::Free { since },
            block: Some(block),
        };
        assert!(pool.add_slot(vnic, ip, slot));
    }
}

#[test]
fn in_cidr_mode_the_warm_target_is_met_with_blocks_and_capacity_counts_addresses() {
    let now = Instant::now();
    let cfg = cidr_cfg();
    // 8 objects of /28 would be 128 addresses; the budget caps a VNIC at 64.
    assert_eq!(cfg.addresses_per_vnic(), 64);
    assert_eq!(cfg.capacity(), 2 * 64, "two VNICs besides the primary");
    let mut pool = pool_with(now, 0, 0);
    let plan = pool.plan(&cfg, now, &NO_PODS);
    assert_eq!(
        plan.create,
        vec![Create {
            vnic: "vnic-1".into(),
            block: Some(28)
        }],
        "one /28 covers a warm target of 4: {plan:?}"
    );
    // 20 pods waiting need two blocks.
    for n in 0..20 {
        pool.waiting.insert((format!("c{n}"), "eth0".into()));
    }
    assert_eq!(pool.plan(&cfg, now, &NO_PODS).create.len(), 2);
    // A full VNIC of 4 blocks (64 addresses) gets no fifth; the plan attaches another.
    for n in 0..4u8 {
        let first = Ipv4Addr::new(10, 0, 17, 16 * n);
        add_block(&mut pool, "vnic-1", first, &format!("block-{n}"), now);
    }
    assert_eq!(pool.vnic("vnic-1").unwrap().objects(), 4);
    for n in 0..70 {
        pool.waiting.insert((format!("d{n}"), "eth0".into()));
    }
    let plan = pool.plan(&cfg, now, &NO_PODS);
    assert!(
        plan.create.is_empty() && plan.attach == ["subnet-a"],
        "{plan:?}"
    );
}

#[test]
fn a_block_is_released_whole_and_only_when_none_of_its_addresses_is_in_use() {
    let now = Instant::now();
    let cfg = PoolConfig {
        warm_ips: 0,
        ..cidr_cfg()
    };
    let mut pool = pool_with(now, 0, 1);
    let first = Ipv4Addr::new(10, 0, 17, 32);
    add_block(&mut pool, "vnic-1", first, "block-a", now);
    let inside = Ipv4Addr::new(10, 0, 17, 40);
    pool.set_state("vnic-1", inside, SlotState::Assigned(pod(7)));
    let later = now + Duration::from_secs(61);
    let plan = pool.plan(&cfg, later, &NO_PODS);
    assert!(
        plan.release.is_empty(),
        "a pod holds an address of the block: {plan:?}"
    );
    pool.set_state(
        "vnic-1",
        inside,
        SlotState::Cooldown {
            until: later + Duration::from_secs(10),
            released_at: std::time::SystemTime::now(),
        },
    );
    assert!(
        pool.plan(&cfg, later, &NO_PODS).release.is_empty(),
        "an address of the block cools down"
    );
    pool.set_state("vnic-1", inside, SlotState::Free { since: later });
    assert!(
        pool.plan(&cfg, later, &NO_PODS).release.is_empty(),
        "free, but not past the release delay"
    );
    let plan = pool.plan(&cfg, later + Duration::from_secs(61), &NO_PODS);
    assert_eq!(
        plan.release,
        vec![("vnic-1".to_string(), first, "block-a".to_string())],
        "the block goes as one object: {plan:?}"
    );
    // A block with an address missing from the pool (a quarantined pod's) stays.
    pool.vnic_mut("vnic-1").unwrap().ips.remove(&inside);
    assert!(
        pool.plan(&cfg, later + Duration::from_secs(61), &NO_PODS)
            .release
            .is_empty()
    );
}

#[test]
fn in_auto_mode_a_vnic_refused_a_block_grows_by_single_addresses_and_in_cidr_mode_not() {
    let now = Instant::now();
    let mut pool = pool_with(now, 0, 0);
    pool.vnic_mut("vnic-1").unwrap().no_blocks_until = Some(now + Duration::from_mins(10));
    let auto = PoolConfig {
        single_fallback: true,
        ..cidr_cfg()
    };
    let plan = pool.plan(&auto, now, &NO_PODS);
    assert_eq!(plan.create.len(), 4, "{plan:?}");
    assert!(plan.create.iter().all(|c| c.block.is_none()), "{plan:?}");
    let plan = pool.plan(&cidr_cfg(), now, &NO_PODS);
    assert!(
        plan.create.is_empty() && plan.attach == ["subnet-a"],
        "cidr mode grows by another VNIC instead: {plan:?}"
    );
    let plan = pool.plan(&auto, now + Duration::from_mins(10), &NO_PODS);
    assert_eq!(
        plan.create.len(),
        1,
        "blocks are tried again later: {plan:?}"
    );
    assert_eq!(plan.create[0].block, Some(28));
}
