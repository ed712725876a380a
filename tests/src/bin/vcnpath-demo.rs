//! `cargo xtask demo`: the real `vcnpath` in the namespace lab. Three pods on two VNICs
//! talk to a VCN peer and to the internet through the VCN router (which enforces OCI's
//! source/destination check); the report shows what each far end saw and what the
//! datapath did. Everything is removed at the end, also on Ctrl-C.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Result, bail};
use vcnpath::datapath::{Counters, DatapathMaps};
use vcnpath_tests::{
    agent::{Agent, lab_config},
    lab::{
        Lab, LabOptions,
        traffic::{TcpServer, UdpEchoServer, ping, tcp_bulk, udp_request},
    },
    privileged::{PinDir, have_root},
};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn check_stop() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted; cleaning up");
    }
    Ok(())
}

const T: Duration = Duration::from_secs(20);

fn main() {
    if !have_root("vcnpath demo") {
        std::process::exit(1);
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    match demo() {
        Ok(()) => println!("\nAll namespaces, links, pins and processes of the demo are removed."),
        Err(error) => {
            eprintln!("demo failed: {error:#}");
            std::process::exit(1);
        }
    }
}

fn demo() -> Result<()> {
    let pins = PinDir::new("demo");
    println!(
        "Building the lab: node (eth0 = VNIC 0, eth1 = VNIC 1), VCN router with OCI's source check, VCN peer, internet (1400-byte hop)…"
    );
    let lab = Lab::new(LabOptions {
        inet_mtu: Some(1400),
    })?;
    let pods = [
        ("pod-a", Ipv4Addr::new(10, 0, 0, 20), 0),
        ("pod-b", Ipv4Addr::new(10, 0, 1, 20), 1),
        ("pod-c", Ipv4Addr::new(10, 0, 1, 21), 1),
    ];
    let mut handles = Vec::new();
    for (name, ip, vnic) in pods {
        handles.push(lab.add_pod(name, ip, vnic)?);
    }
    check_stop()?;
    let config = lab_config(&pins.path, &pods.map(|(_, ip, vnic)| (ip, vnic)));
    let agent = Agent::start(&lab, "demo", &config)?;
    println!(
        "vcnpath datapath is running in the node namespace (pins in {}).\n",
        pins.path.display()
    );

    let peer_tcp = TcpServer::start(lab.peer(), SocketAddr::from((lab.peer_ip(), 8080)))?;
    let inet_tcp = TcpServer::start(lab.inet(), SocketAddr::from((lab.inet_ip(), 8080)))?;
    let inet_udp = UdpEchoServer::start(lab.inet(), SocketAddr::from((lab.inet_ip(), 5353)))?;

    println!(
        "{:<6} {:<10} {:<5} {:<22} {:<22} {:<16} {:<5}",
        "pod",
        "address",
        "VNIC",
        "VCN peer saw (1 MB)",
        "internet saw (8 MB)",
        "UDP server saw",
        "ping"
    );
    for (pod, (name, ip, vnic)) in handles.iter().zip(pods) {
        check_stop()?;
        let ns = pod.ns();
        let peer = tcp_bulk(ns, None, peer_tcp.addr(), 1 << 20, T)
            .map_or_else(|e| format!("FAILED: {e}"), |r| r.peer_seen.ip().to_string());
        let inet = tcp_bulk(ns, None, inet_tcp.addr(), 8 << 20, T)
            .map_or_else(|e| format!("FAILED: {e}"), |r| r.peer_seen.ip().to_string());
        let udp = udp_request(ns, None, inet_udp.addr(), b"demo", T)
            .map_or_else(|e| format!("FAILED: {e}"), |r| r.peer_seen.ip().to_string());
        let pinged = if ping(ns, lab.inet_ip(), 2, T).unwrap_or(false) {
            "ok"
        } else {
            "FAILED"
        };
        println!("{name:<6} {ip:<10} eth{vnic:<2} {peer:<22} {inet:<22} {udp:<16} {pinged:<5}");
    }
    let drops: Vec<u64> = (0..2).map(|v| lab.router_drops(v)).collect::<Result<_>>()?;
    println!(
        "\nVCN router source/destination-check drops: VNIC 0: {}, VNIC 1: {}",
        drops[0], drops[1]
    );
    println!(
        "Each pod reached the VCN peer with its own address (pods on eth1 were redirected out of eth1),"
    );
    println!(
        "and the internet saw the masquerade address {} (the node's primary IP).",
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, 10))
    );

    let counters = Counters::read(&DatapathMaps::from_pins(&pins.path)?)?;
    println!(
        "\nDatapath counters (vcnpath counters --pin-dir {}):",
        pins.path.display()
    );
    for (reason, n) in counters.0.iter().filter(|(_, n)| *n > 0) {
        println!("  {:<32} {n}", reason.name());
    }
    drop(agent);
    Ok(())
}
