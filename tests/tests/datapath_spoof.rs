//! Anti-spoofing at a pod's host-side veth, through `BPF_PROG_TEST_RUN`: a pod packet
//! passes only when the node's route to its source address leaves through the interface
//! it arrived on (strict reverse-path check), whatever the node's `rp_filter`.
//!
//! The test runs in a network namespace of its own (one thread unshares it), where the
//! loopback device plays pod POD0's veth and another veth pod POD1's.

use std::{net::Ipv4Addr, process::Command};

use vcnpath_common::Reason;
use vcnpath_tests::{
    datapath_fixture::*,
    packet::{Spec, build},
    privileged::have_root,
};

fn sh(args: &[&str]) {
    let status = Command::new(args[0])
        .args(&args[1..])
        .status()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(status.success(), "{args:?} failed: {status}");
}

/// Runs `f` on a thread inside a fresh network namespace (gone when the thread ends).
fn in_own_netns(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread, which ends with the test.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        f();
    })
    .join()
    .expect("the test thread panicked");
}

fn route(addr: Ipv4Addr, dev: &str) {
    sh(&["ip", "route", "add", &format!("{addr}/32"), "dev", dev]);
}

#[test]
fn a_pod_may_send_only_with_its_own_address() {
    if !have_root("a_pod_may_send_only_with_its_own_address") {
        return;
    }
    in_own_netns(|| {
        sh(&["ip", "link", "set", "lo", "up"]);
        sh(&[
            "ip",
            "link",
            "add",
            "vcnother0",
            "type",
            "veth",
            "peer",
            "name",
            "vcnother1",
        ]);
        sh(&["ip", "link", "set", "vcnother1", "up"]);
        sh(&["ip", "link", "set", "vcnother0", "up"]);
        sh(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        sh(&["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"]);
        // The node's routes to its pods: POD0 behind the test device, POD1 behind another.
        route(POD0, "lo");
        route(POD1, "vcnother0");

        let fx = Fixture::new("spoof", 1024, 65535);
        let own = build(&Spec::tcp(POD0, 40000, REMOTE, 443));
        let (verdict, out) = fx.pod(&own);
        assert_eq!(
            (verdict, out),
            (TC_ACT_OK, own),
            "a packet with the pod's own address must pass untouched"
        );

        // Another pod's address on this node, an address no route leads to, and the
        // node's own address: all spoofed when they arrive from this pod.
        for spoofed in [POD1, Ipv4Addr::new(10, 0, 3, 3), MASQ] {
            let (verdict, _) = fx.pod(&build(&Spec::udp(spoofed, 5000, REMOTE, 53)));
            assert_eq!(
                verdict, TC_ACT_SHOT,
                "a packet from the pod claiming {spoofed} must be dropped"
            );
        }
        assert_eq!(
            fx.count(Reason::DropSpoofed),
            3,
            "every spoofed packet counted"
        );
        assert_eq!(
            fx.count(Reason::PassPodSource),
            1,
            "the pod's own packet counted"
        );

        // ARP (needed to reach the gateway) is not IPv4 and passes.
        let mut arp = build(&Spec::udp(POD1, 1, REMOTE, 1));
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(fx.pod(&arp).0, TC_ACT_OK, "ARP must pass");
    });
}

/// The instance metadata service hands out the node's instance-principal credentials: a
/// pod reaches it (169.254.169.254 TCP 80) only when its endpoint is allowed, while DNS and
/// NTP at the same address stay reachable for every pod.
#[test]
fn a_pod_reaches_the_metadata_service_only_when_allowed() {
    if !have_root("a_pod_reaches_the_metadata_service_only_when_allowed") {
        return;
    }
    in_own_netns(|| {
        sh(&["ip", "link", "set", "lo", "up"]);
        sh(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        route(POD0, "lo");
        let imds = Ipv4Addr::from(vcnpath_common::IMDS_ADDR);
        let mut fx = Fixture::new("imds", 1024, 65535);
        let metadata = build(&Spec::tcp(POD0, 40000, imds, 80));
        assert_eq!(
            fx.pod(&metadata).0,
            TC_ACT_SHOT,
            "a pod not allowed must not reach IMDS"
        );
        assert_eq!(
            fx.count(Reason::DropPodImds),
            1,
            "refused as IMDS, counted: {:?}",
            fx.counters()
        );
        for other in [
            build(&Spec::udp(POD0, 5000, imds, 53)),
            build(&Spec::tcp(POD0, 40001, imds, 53)),
            build(&Spec::udp(POD0, 5001, imds, 123)),
            build(&Spec::tcp(POD0, 40002, REMOTE, 80)),
        ] {
            assert_eq!(
                fx.pod(&other).0,
                TC_ACT_OK,
                "DNS, NTP and other destinations stay reachable: {:?}",
                fx.counters()
            );
        }
        assert_eq!(
            fx.count(Reason::DropPodImds),
            1,
            "only the IMDS packet refused"
        );
        assert_eq!(
            fx.count(Reason::DropSpoofed),
            0,
            "the pod used its own address"
        );

        let mut allowed = state(1024, 65535);
        allowed
            .endpoints
            .get_mut(&POD0)
            .expect("POD0 is an endpoint")
            .flags = vcnpath_common::ENDPOINT_F_IMDS;
        fx.datapath.sync(&allowed).expect("map sync");
        let (verdict, out) = fx.pod(&metadata);
        assert_eq!(
            (verdict, out),
            (TC_ACT_OK, metadata),
            "an allowed pod reaches IMDS, untouched"
        );
    });
}
