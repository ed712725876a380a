//! The NAT range in the node's port space.
//!
//! The datapath translates pods' flows to ports of `datapath.nat_port_min..=nat_port_max`
//! on the masquerade address, and the host's own sockets use the same address. The
//! programs keep the two apart on the wire (see the datapath's host-flow records), but the
//! kernel does not know the NAT's ports: a host `connect()` or `bind(0)` could pick one a
//! pod's flow holds. So the agent adds the NAT range to `net.ipv4.ip_local_reserved_ports`,
//! which the kernel skips when it picks a local port (an explicit `bind` still may), unless
//! the range would leave the host no ephemeral port at all. The default range lies above
//! the kernel's default `ip_local_port_range` (32768–60999), so by default the host loses
//! nothing. Written through /proc/sys, which a container that is not privileged cannot do;
//! the agent then says so and the node must reserve the range itself.

use std::{fs, io, ops::RangeInclusive};

const LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// What reserving the NAT range takes.
#[derive(Debug, PartialEq, Eq)]
pub enum Reservation {
    /// Every port of the range is reserved already.
    Held,
    /// Write this list to `ip_local_reserved_ports`. `shrinks` counts the ephemeral ports
    /// the host loses by it.
    Write { list: String, shrinks: usize },
    /// The range covers the whole ephemeral range: reserving it would leave host sockets
    /// no port to pick, so it is not reserved.
    CoversEphemeral,
}

/// A /proc/sys value that is not what the kernel writes.
#[derive(Debug, thiserror::Error)]
#[error("{file} holds {value:?}, which is not a list of ports and port ranges")]
pub struct Unreadable {
    file: &'static str,
    value: String,
}

/// Decides how to reserve `nat`, given the current `ip_local_reserved_ports` list and the
/// `ip_local_port_range` the kernel picks local ports from.
pub fn plan(
    reserved: &str,
    ephemeral: RangeInclusive<u16>,
    nat: RangeInclusive<u16>,
) -> Result<Reservation, Unreadable> {
    let held = parse_list(reserved).ok_or_else(|| Unreadable {
        file: RESERVED_PORTS,
        value: reserved.to_owned(),
    })?;
    if nat.clone().all(|p| held.iter().any(|r| r.contains(&p))) {
        return Ok(Reservation::Held);
    }
    if nat.start() <= ephemeral.start() && ephemeral.end() <= nat.end() {
        return Ok(Reservation::CoversEphemeral);
    }
    let shrinks = ephemeral
        .filter(|p| nat.contains(p) && !held.iter().any(|r| r.contains(p)))
        .count();
    let ours = format!("{}-{}", nat.start(), nat.end());
    let reserved = reserved.trim();
    let list = if reserved.is_empty() {
        ours
    } else {
        format!("{reserved},{ours}")
    };
    Ok(Reservation::Write { list, shrinks })
}

/// Reserves `nat` in the agent's network namespace, returning what it did.
pub fn reserve(nat: RangeInclusive<u16>) -> io::Result<Reservation> {
    let reserved = fs::read_to_string(RESERVED_PORTS)?;
    let range = fs::read_to_string(LOCAL_PORT_RANGE)?;
    let ephemeral = parse_pair(&range).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{LOCAL_PORT_RANGE} holds {range:?}, not two port numbers"),
        )
    })?;
    let plan = plan(&reserved, ephemeral, nat).map_err(io::Error::other)?;
    if let Reservation::Write { list, .. } = &plan {
        fs::write(RESERVED_PORTS, list)?;
    }
    Ok(plan)
}

/// `ip_local_reserved_ports`: ports and `a-b` ranges, comma-separated (empty: none).
fn parse_list(list: &str) -> Option<Vec<RangeInclusive<u16>>> {
    list.trim()
        .split(',')
        .filter(|item| !item.trim().is_empty())
        .map(|item| {
            let item = item.trim();
            match item.split_once('-') {
                Some((a, b)) => Some(a.trim().parse().ok()?..=b.trim().parse().ok()?),
                None => item.parse().ok().map(|p| p..=p),
            }
        })
        .collect()
}

/// `ip_local_port_range`: two numbers separated by white space.
fn parse_pair(text: &str) -> Option<RangeInclusive<u16>> {
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(a)), Some(Ok(b)), None) = (it.next(), it.next(), it.next()) else {
        return None;
    };
    Some(a..=b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPHEMERAL: RangeInclusive<u16> = 32768..=60999;

    #[test]
    fn the_default_range_is_reserved_without_costing_the_host_a_port() {
        assert_eq!(
            plan("\n", EPHEMERAL, 61000..=65535).unwrap(),
            Reservation::Write {
                list: "61000-65535".into(),
                shrinks: 0
            }
        );
    }

    #[test]
    fn what_others_reserved_is_kept() {
        assert_eq!(
            plan("8080,9000-9100\n", EPHEMERAL, 61000..=65535).unwrap(),
            Reservation::Write {
                list: "8080,9000-9100,61000-65535".into(),
                shrinks: 0
            }
        );
    }

    #[test]
    fn a_range_reserved_already_is_left_alone() {
        for held in ["61000-65535", "10,60000-65535", "61000-62000,62001-65535"] {
            assert_eq!(
                plan(held, EPHEMERAL, 61000..=65535).unwrap(),
                Reservation::Held,
                "{held}"
            );
        }
    }

    #[test]
    fn an_overlap_with_the_ephemeral_ports_is_counted() {
        assert_eq!(
            plan("", 1024..=65535, 61000..=65535).unwrap(),
            Reservation::Write {
                list: "61000-65535".into(),
                shrinks: 4536
            }
        );
    }

    #[test]
    fn a_range_covering_every_ephemeral_port_is_not_reserved() {
        assert_eq!(
            plan("", EPHEMERAL, 1024..=65535).unwrap(),
            Reservation::CoversEphemeral
        );
    }

    #[test]
    fn a_list_the_kernel_would_not_write_is_an_error_naming_the_file() {
        let e = plan("80,abc", EPHEMERAL, 61000..=65535).unwrap_err();
        assert!(e.to_string().contains("ip_local_reserved_ports"), "{e}");
    }

    #[test]
    fn the_ephemeral_range_is_read_as_the_kernel_writes_it() {
        assert_eq!(parse_pair("32768\t60999\n"), Some(32768..=60999));
        assert_eq!(parse_pair("32768"), None);
    }
}
