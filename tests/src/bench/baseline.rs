//! The incumbent node datapath vcnpath replaces, as the AWS VPC CNI sets it up (and the
//! Cilium-based OCI integration copies): conntrack-backed SNAT in iptables for traffic
//! leaving the VCN, a route table per secondary VNIC, and one policy rule per pod on a
//! secondary VNIC so its VCN traffic leaves through the VNIC that owns its address.
//!
//! Following the AWS VPC CNI (`AWS_VPC_K8S_CNI_EXTERNALSNAT=false`), a pod's rule only
//! covers destinations inside the VCN (`from POD to VCN lookup TABLE`, priority 1536):
//! traffic to the internet stays on the main table, leaves the primary VNIC and is
//! translated to the node's primary address, which is the only way it passes OCI's source
//! check. The AWS CNI also adds a `to POD lookup main` rule per pod at priority 512; it
//! is left out here, which flatters the baseline (half the rules to walk).
//!
//! Everything is written inside the lab's node namespace, and goes when it is deleted.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use anyhow::{Context, Result};

use crate::lab::netns::{Netns, cmd_in};
use crate::lab::process::{run, run_stdin};
use crate::lab::topology::VCN_CIDR;

/// Priority of the AWS VPC CNI's per-pod "from pod" rules.
pub const POD_RULE_PREF: u32 = 1536;

/// A secondary VNIC's own route table: its subnet and a default route via its router.
#[derive(Clone, Debug)]
pub struct VnicTable {
    pub ifname: String,
    pub primary_ip: Ipv4Addr,
    pub subnet: String,
    pub router_ip: Ipv4Addr,
    pub table: u32,
}

/// Installs the baseline in `node`: the SNAT rule, the VNIC tables, then one rule per pod
/// in `pods` order. The kernel appends a rule after the existing rules of the same
/// priority, so the last pod's rule is the last one walked, as the newest pod's is on
/// a real node.
pub fn install(
    node: &Netns,
    masquerade: (&str, Ipv4Addr),
    tables: &[VnicTable],
    pods: &[(Ipv4Addr, u32)],
) -> Result<()> {
    let (interface, address) = masquerade;
    run(cmd_in(node, "iptables").args([
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "!",
        "-d",
        VCN_CIDR,
        "-o",
        interface,
        "-j",
        "SNAT",
        "--to-source",
        &address.to_string(),
    ]))
    .with_context(|| format!("adding the SNAT rule in netns {}", node.name()))?;

    let mut batch = String::new();
    for t in tables {
        // Writing to a String cannot fail.
        let _ = writeln!(
            batch,
            "route add {} dev {} src {} table {}\nroute add default via {} dev {} table {}",
            t.subnet, t.ifname, t.primary_ip, t.table, t.router_ip, t.ifname, t.table
        );
    }
    for (pod, table) in pods {
        let _ = writeln!(
            batch,
            "rule add from {pod} to {VCN_CIDR} lookup {table} pref {POD_RULE_PREF}"
        );
    }
    run_stdin(cmd_in(node, "ip").args(["-batch", "-"]), &batch).with_context(|| {
        format!(
            "adding {} VNIC tables and {} pod rules in netns {}",
            tables.len(),
            pods.len(),
            node.name()
        )
    })?;
    Ok(())
}

/// Number of policy rules at [`POD_RULE_PREF`] in `node`, to check what was installed.
pub fn pod_rules(node: &Netns) -> Result<usize> {
    let rules = node.ip(&["-4", "rule", "show", "pref", &POD_RULE_PREF.to_string()])?;
    Ok(rules.lines().count())
}

/// The last pod rule the kernel walks, as `ip rule` prints it.
pub fn last_pod_rule(node: &Netns) -> Result<String> {
    let rules = node.ip(&["-4", "rule", "show", "pref", &POD_RULE_PREF.to_string()])?;
    Ok(rules.lines().last().unwrap_or_default().trim().to_owned())
}

/// Connections conntrack tracks in `node` (`nf_conntrack_count` is per namespace).
pub fn conntrack_count(node: &Netns) -> Result<u64> {
    let value = node.read_sysctl("net/netfilter/nf_conntrack_count")?;
    value
        .parse()
        .with_context(|| format!("nf_conntrack_count {value:?} in netns {}", node.name()))
}
