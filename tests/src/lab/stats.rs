//! Kernel counters and interface offloads of a namespace.

use std::collections::HashMap;

use anyhow::{Context, Result, bail};

use super::netns::{Netns, cmd_in, run_in};
use super::process::run;

/// The namespace's SNMP and extended counters under nstat's names (`IpInReceives`,
/// `TcpInCsumErrors`, `TcpExtTCPTimeouts`, …), absolute values.
///
/// Read from `/proc/thread-self/net/{snmp,netstat}` on a thread inside the namespace
/// rather than by running `nstat`, which keeps a history file shared by every caller.
pub fn nstat(ns: &Netns) -> Result<HashMap<String, u64>> {
    let files = run_in(ns, || -> std::io::Result<[String; 2]> {
        Ok([
            std::fs::read_to_string("/proc/thread-self/net/snmp")?,
            std::fs::read_to_string("/proc/thread-self/net/netstat")?,
        ])
    })?
    .with_context(|| format!("reading /proc/net/snmp and netstat in netns {}", ns.name()))?;
    let mut counters = HashMap::new();
    for text in &files {
        parse_snmp(text, &mut counters)
            .with_context(|| format!("parsing counters of netns {}", ns.name()))?;
    }
    Ok(counters)
}

/// The files hold pairs of lines: `Tcp: Name1 Name2 …` then `Tcp: 1 2 …`. Negative values
/// (`TcpMaxConn` is -1) are not counters and are left out.
fn parse_snmp(text: &str, counters: &mut HashMap<String, u64>) -> Result<()> {
    let mut lines = text.lines();
    while let Some(header) = lines.next() {
        let Some(values) = lines.next() else {
            bail!("header line without values: {header:?}");
        };
        let (Some((prefix, names)), Some((prefix2, values))) =
            (header.split_once(':'), values.split_once(':'))
        else {
            bail!("malformed lines {header:?} / {values:?}");
        };
        if prefix != prefix2 {
            bail!("header {prefix} followed by values of {prefix2}");
        }
        for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
            if let Ok(value) = value.parse::<u64>() {
                counters.insert(format!("{prefix}{name}"), value);
            }
        }
    }
    Ok(())
}

/// The checksum error counters (`IpExtInCsumErrors`, `IcmpInCsumErrors`,
/// `TcpInCsumErrors`, `UdpInCsumErrors`, `UdpLiteInCsumErrors`) that are non-zero.
pub fn checksum_errors(ns: &Netns) -> Result<HashMap<String, u64>> {
    Ok(nstat(ns)?
        .into_iter()
        .filter(|(name, value)| name.ends_with("CsumErrors") && *value > 0)
        .collect())
}

/// Turns checksum offload, TSO, GSO and GRO of `ifname` in `ns` on or off (ethtool -K).
/// With them off, every checksum is computed in software and checked by the receiver,
/// so a wrong incremental update shows up in [`checksum_errors`].
pub fn set_offloads(ns: &Netns, ifname: &str, on: bool) -> Result<()> {
    let state = if on { "on" } else { "off" };
    let mut args = vec!["-K", ifname];
    for feature in ["rx", "tx", "tso", "gso", "gro"] {
        args.extend([feature, state]);
    }
    run(cmd_in(ns, "ethtool").args(&args)).with_context(|| {
        format!(
            "setting offloads {state} on {ifname} in netns {}",
            ns.name()
        )
    })?;
    Ok(())
}

/// [`set_offloads`] on every veth in `ns` (all lab links are veths), for tests that
/// want software checksums end to end.
pub fn set_all_offloads(ns: &Netns, on: bool) -> Result<()> {
    let links = ns.ip(&["-o", "link", "show", "type", "veth"])?;
    // Lines look like `5: eth0@if2: <BROADCAST,...`.
    for name in links
        .lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name))
    {
        set_offloads(ns, name, on)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_snmp_pairs_and_skips_negative_values() {
        let text = "Tcp: RtoAlgorithm MaxConn InCsumErrors\nTcp: 1 -1 7\n\
                    Udp: InDatagrams InCsumErrors\nUdp: 5 0\n";
        let mut counters = HashMap::new();
        parse_snmp(text, &mut counters).unwrap();
        assert_eq!(counters.get("TcpInCsumErrors"), Some(&7));
        assert_eq!(counters.get("UdpInDatagrams"), Some(&5));
        assert_eq!(counters.get("TcpMaxConn"), None);
    }
}
