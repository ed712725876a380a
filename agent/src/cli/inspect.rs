//! Read-only views of a running datapath from its pins: counters and the NAT tables.

use std::{net::Ipv4Addr, path::Path};

use vcnpath_common::{NAT_DIR_EGRESS, NAT_F_HOST, NAT_F_INBOUND};

use crate::datapath::{Counters, DatapathMaps, monotonic_now_ns};

/// Prints every counter by reason name.
pub fn counters(pin_dir: &Path) -> anyhow::Result<()> {
    let maps = DatapathMaps::from_pins(pin_dir)?;
    print!("{}", Counters::read(&maps)?);
    Ok(())
}

/// Prints the NAT table and the inbound records, one flow direction per line; the host's
/// own flows on ports of the NAT range show as `host`, keyed by their replies.
pub fn nat(pin_dir: &Path) -> anyhow::Result<()> {
    let maps = DatapathMaps::from_pins(pin_dir)?;
    let now = monotonic_now_ns();
    for item in maps.flows() {
        let (key, entry) = item?;
        let kind = match (key.dir == NAT_DIR_EGRESS, entry.flags) {
            (true, flags) if flags & NAT_F_INBOUND != 0 => "inbound",
            (true, _) => "egress",
            (false, flags) if flags & NAT_F_HOST != 0 => "host",
            (false, _) => "reply",
        };
        println!(
            "{kind:<8} proto {:<3} {}:{} -> {}:{}  => {}:{}  idle {}s",
            key.proto,
            Ipv4Addr::from(key.src),
            key.sport,
            Ipv4Addr::from(key.dst),
            key.dport,
            Ipv4Addr::from(entry.addr),
            entry.port,
            now.saturating_sub(entry.last_seen_ns) / 1_000_000_000,
        );
    }
    Ok(())
}
