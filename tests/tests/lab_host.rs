//! The agent's host module against a real kernel, inside a throwaway network namespace:
//! finding a VNIC's interface by MAC, bringing it up with its MTU and address, and reading
//! the virtual router's MAC from the neighbour table, and keeping its IPv4 settings with
//! /proc/sys read-only (as in the unprivileged container the shipped manifests run).

use std::net::Ipv4Addr;

use vcnpath::host::{
    netlink::{LinkEvents, Netlink, parse_mac},
    sysctl,
};
use vcnpath_tests::{
    lab::{Netns, run_in},
    mounts,
    privileged::have_root,
};

#[test]
fn lab_a_secondary_vnic_is_found_by_mac_and_configured() {
    if !have_root("lab_host") {
        return;
    }
    let ns = Netns::create(&format!("vh{}", std::process::id())).expect("netns");
    let mac = "02:00:17:aa:bb:01";
    ns.ip(&[
        "link", "add", "ens5", "address", mac, "type", "veth", "peer", "name", "router",
    ])
    .expect("veth");
    ns.ip(&["link", "set", "router", "up"]).expect("peer up");
    ns.ip(&[
        "neigh",
        "add",
        "10.0.9.1",
        "lladdr",
        "02:00:17:00:00:01",
        "dev",
        "ens5",
        "nud",
        "permanent",
    ])
    .ok();

    let (link, router_mac) = run_in(&ns, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let nl = Netlink::connect().expect("netlink");
            let link = nl
                .link_by_mac(parse_mac(mac).unwrap())
                .await
                .expect("the VNIC's interface is found by MAC");
            nl.configure_vnic(&link, 9000, Ipv4Addr::new(10, 0, 9, 10), 24)
                .await
                .expect("configure");
            // Idempotent: configuring again changes nothing and does not fail.
            nl.configure_vnic(&link, 9000, Ipv4Addr::new(10, 0, 9, 10), 24)
                .await
                .expect("configure twice");
            let router = nl
                .neighbour(&link, Ipv4Addr::new(10, 0, 9, 1))
                .await
                .expect("neighbours");
            let missing = nl.link_by_mac([2, 0, 0, 0, 0, 0x99]).await;
            assert!(
                missing.is_err(),
                "an unknown MAC is an error that says the VNIC may still be attaching"
            );
            (link, router)
        })
    })
    .expect("run in netns");
    assert_eq!(link.name, "ens5");
    let shown = ns
        .ip(&["-o", "addr", "show", "dev", "ens5"])
        .expect("ip addr");
    assert!(
        shown.contains("10.0.9.10/24"),
        "the VNIC holds its primary address: {shown}"
    );
    let details = ns
        .ip(&["-o", "link", "show", "dev", "ens5"])
        .expect("ip link");
    assert!(
        details.contains("mtu 9000") && details.contains(",UP"),
        "up with MTU 9000: {details}"
    );
    assert_eq!(
        router_mac,
        parse_mac("02:00:17:00:00:01"),
        "the router's MAC comes from the neighbour table"
    );
}

/// The agent sets a VNIC's interface up when the kernel announces it: the link
/// subscription reports an interface appearing in the namespace, and is quiet otherwise.
#[test]
fn lab_a_new_interface_is_announced() {
    if !have_root("lab_host") {
        return;
    }
    let ns = Netns::create(&format!("vl{}", std::process::id())).expect("netns");
    let announced = run_in(&ns, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut events = LinkEvents::subscribe().expect("subscribe");
            let quiet =
                tokio::time::timeout(std::time::Duration::from_millis(200), events.changed()).await;
            assert!(quiet.is_err(), "no notification before a link changes");
            ns.ip(&[
                "link", "add", "ens6", "type", "veth", "peer", "name", "ens6p",
            ])
            .expect("ip link add");
            // A failure bound, not a timing claim: the notification comes at once.
            tokio::time::timeout(std::time::Duration::from_secs(10), events.changed())
                .await
                .ok()
                .flatten()
        })
    })
    .expect("run in netns");
    assert_eq!(announced, Some(()), "the new interface is announced");
}

/// Makes /proc/sys read-only for the calling thread alone, the way runc mounts it in a
/// container that is not privileged: a private mount namespace (it ends with the thread)
/// with a read-only bind of /proc/sys over itself.
fn read_only_proc_sys() -> std::io::Result<()> {
    // SAFETY: unshare affects this thread only (CLONE_NEWNS unshares its filesystem
    // attributes from the other threads).
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    mounts::make_private_recursively()?;
    mounts::bind_read_only(std::path::Path::new("/proc/sys"))
}

/// The shipped container has /proc/sys read-only and `CAP_NET_ADMIN`: the agent still
/// makes a strict reverse-path filter loose and turns forwarding on, over netlink.
#[test]
fn lab_rp_filter_is_made_loose_with_proc_sys_read_only() {
    if !have_root("lab_host") {
        return;
    }
    let ns = Netns::create(&format!("vs{}", std::process::id())).expect("netns");
    ns.ip(&[
        "link", "add", "ens7", "type", "veth", "peer", "name", "ens7p",
    ])
    .expect("veth");
    let conf = |name: &str| format!("/proc/sys/net/ipv4/conf/ens7/{name}");
    let (changed, again, rp_filter, forwarding) = run_in(&ns, || {
        // Strict, as a node image may set it; forwarding is off in a new namespace.
        std::fs::write(conf("rp_filter"), "1").expect("make rp_filter strict");
        read_only_proc_sys().expect("read-only /proc/sys for this thread");
        let write = std::fs::write(conf("rp_filter"), "2");
        assert_eq!(
            write.as_ref().map_err(std::io::Error::raw_os_error),
            Err(Some(libc::EROFS)),
            "writing /proc/sys (what the agent used to do) must fail here, or the test proves nothing"
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (changed, again) = rt.block_on(async {
            let nl = Netlink::connect().expect("netlink");
            let link = nl
                .links()
                .await
                .expect("links")
                .into_iter()
                .find(|l| l.name == "ens7")
                .expect("ens7");
            let changed = sysctl::ensure_interface(&nl, &link).await;
            let again = sysctl::ensure_interface(&nl, &link).await;
            (changed, again)
        });
        let read = |name: &str| {
            std::fs::read_to_string(conf(name))
                .expect("read /proc/sys")
                .trim()
                .to_owned()
        };
        (changed, again, read("rp_filter"), read("forwarding"))
    })
    .expect("run in netns");
    let changed = changed.unwrap_or_else(|e| {
        panic!("setting rp_filter over netlink must work with /proc/sys read-only: {e}")
    });
    assert_eq!(
        (rp_filter.as_str(), forwarding.as_str()),
        ("2", "1"),
        "the kernel shows rp_filter loose and forwarding on"
    );
    assert_eq!(
        (changed.rp_filter, changed.forwarding),
        (Some(1), Some(0)),
        "the values found are reported"
    );
    assert!(
        !again.expect("second pass").any(),
        "a suitable interface is left as it is"
    );
}
