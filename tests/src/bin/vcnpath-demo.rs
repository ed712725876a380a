//! `cargo xtask demo`: the real `vcnpath` node agent against the built-in OCI simulator,
//! in the namespace lab. Pods are created with the real `vcnpath-cni` plugin (enough of
//! them to need a second VNIC, which the agent attaches through the simulated OCI API),
//! each sends traffic to a VCN peer and to the internet through the VCN router — which
//! drops, like OCI, anything a VNIC sends from an address it does not own — and the
//! report shows what the far ends saw. Everything is removed at the end, also on Ctrl-C.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Result, bail};
use vcnpath_tests::{
    interrupt::check,
    lab::{
        LabOptions, SimLab, lab_sim_config,
        traffic::{TcpServer, UdpEchoServer, tcp_bulk, udp_request},
    },
    node_agent::{IPS_PER_VNIC, NodeAgent, cni_add},
    privileged::have_root,
};

const T: Duration = Duration::from_secs(30);
const PODS: usize = 30;

fn main() {
    if !have_root("vcnpath demo") {
        std::process::exit(1);
    }
    vcnpath_tests::interrupt::install();
    match demo() {
        Ok(()) => println!("\nAll namespaces, links, pins and processes of the demo are removed."),
        Err(error) => {
            eprintln!("demo failed: {error:#}");
            std::process::exit(1);
        }
    }
}

#[expect(
    clippy::too_many_lines,
    reason = "the demo reads top to bottom as the story it prints"
)]
fn demo() -> Result<()> {
    println!(
        "1. The lab: a node (ens3 = primary VNIC 10.0.0.10, a VM shape), the VCN's router enforcing OCI's"
    );
    println!("   source/destination check, a VCN peer (10.0.2.50), the internet (203.0.113.10),");
    println!(
        "   and the OCI simulator (IMDS, instance principals, Core API) on the node's loopback."
    );
    let config = vcnpath_tests::ocisim::SimConfig {
        ips_per_vnic: IPS_PER_VNIC,
        ..lab_sim_config()
    };
    let lab = SimLab::new(LabOptions::default(), config)?;
    check()?;
    println!("2. Starting `vcnpath run` in the node namespace…");
    let agent = NodeAgent::start(&lab, "demo")?;
    check()?;

    println!(
        "3. Creating {PODS} pods with `vcnpath-cni` ADD ({IPS_PER_VNIC} addresses per VNIC, so a second VNIC is needed)…"
    );
    let mut pods = Vec::new();
    for i in 0..PODS {
        check()?;
        let id = format!("demo{i:02}");
        let ns = lab.lab().add_pod_netns(&id)?;
        let out = cni_add(lab.lab().node(), &agent.socket(), &id, ns.path(), T)?;
        if !out.ok {
            bail!("ADD {id} failed: {}", out.json);
        }
        let ip = out
            .ip()
            .ok_or_else(|| anyhow::anyhow!("ADD result without an address"))?;
        pods.push((id, ns, ip));
    }
    let status = agent.status()?;
    let interface_of: BTreeMap<String, String> = status["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p["container_id"].as_str()?.to_owned(),
                p["interface"].as_str()?.to_owned(),
            ))
        })
        .collect();

    println!(
        "\nVNICs (attached by the agent through the OCI API, brought up and addressed by it):"
    );
    for v in status["vnics"].as_array().into_iter().flatten() {
        println!(
            "  {:<9} {:<5} {}  primary {:<10} subnet {:<13} pods {:>2}  free {}",
            if v["is_primary"] == true {
                "primary"
            } else {
                "secondary"
            },
            v["interface"].as_str().unwrap_or("-"),
            v["mac"].as_str().unwrap_or(""),
            v["primary_ip"].as_str().unwrap_or(""),
            v["subnet"].as_str().unwrap_or(""),
            v["assigned"],
            v["free"]
        );
    }

    let peer = TcpServer::start(
        lab.lab().peer(),
        SocketAddr::from((lab.lab().peer_ip(), 8080)),
    )?;
    let inet = TcpServer::start(
        lab.lab().inet(),
        SocketAddr::from((lab.lab().inet_ip(), 8080)),
    )?;
    let udp = UdpEchoServer::start(
        lab.lab().inet(),
        SocketAddr::from((lab.lab().inet_ip(), 5353)),
    )?;
    println!(
        "\nTraffic from each pod (1 MB to the VCN peer, 1 MB and a UDP echo to the internet):"
    );
    println!(
        "  {:<7} {:<10} {:<5} {:<18} {:<18} {:<16}",
        "pod", "address", "VNIC", "VCN peer saw", "internet saw", "UDP server saw"
    );
    let mut failures = 0;
    for (id, ns, ip) in &pods {
        check()?;
        let show = |r: Result<IpAddr>| r.map_or_else(|e| format!("FAILED: {e}"), |a| a.to_string());
        let to_peer = show(tcp_bulk(ns, None, peer.addr(), 1 << 20, T).map(|r| r.peer_seen.ip()));
        let to_inet = show(tcp_bulk(ns, None, inet.addr(), 1 << 20, T).map(|r| r.peer_seen.ip()));
        let via_udp = show(udp_request(ns, None, udp.addr(), b"demo", T).map(|r| r.peer_seen.ip()));
        failures += [&to_peer, &to_inet, &via_udp]
            .iter()
            .filter(|s| s.starts_with("FAILED"))
            .count();
        let vnic = interface_of.get(id).map_or("?", String::as_str);
        println!("  {id:<7} {ip:<10} {vnic:<5} {to_peer:<18} {to_inet:<18} {via_udp:<16}");
    }
    let drops: Vec<u64> = (0..3).map(|n| lab.router_drops(n).unwrap_or(0)).collect();
    println!("\nVCN router source/destination-check drops per VNIC: {drops:?}");
    println!(
        "Each pod reached the VCN peer with its own address, through its own VNIC; the internet saw {}.",
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, 10))
    );

    let counters = agent.status()?;
    println!("\nDatapath counters (`vcnpath status`):");
    for (reason, n) in counters["datapath"]["counters"]
        .as_object()
        .into_iter()
        .flatten()
    {
        if n.as_u64().unwrap_or(0) > 0 {
            println!("  {reason:<32} {n}");
        }
    }
    println!(
        "  NAT entries in use: {}",
        counters["datapath"]["nat_entries"]
    );
    if failures > 0 {
        bail!("{failures} transfers failed");
    }
    Ok(())
}
