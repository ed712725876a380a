//! The agent's map sync (`DatapathMaps::sync`, the same diff-based path it runs at
//! start-up, on each pod change and in its periodic reconcile) with 4096 pod endpoints:
//! from empty maps, a no-op resync, and one pod added to the full maps.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;
use vcnpath::datapath::{Datapath, LoadOptions};
use vcnpath_common::{ENDPOINT_KIND_POD, Endpoint};

use crate::datapath_fixture::{ETH1, state};
use crate::privileged::PinDir;

pub const ENDPOINTS: u32 = 4096;
/// Each figure is the median of this many runs.
const RUNS: usize = 5;

#[derive(Clone, Debug, Serialize)]
pub struct MapSync {
    pub endpoints: u32,
    pub from_empty_ms: f64,
    pub noop_ms: f64,
    pub one_more_ms: f64,
}

fn pod(i: u32) -> (Ipv4Addr, Endpoint) {
    // 10.2.0.0/16: clear of the fixture's own addresses.
    (
        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 2, 0, 0)) + i),
        Endpoint {
            ifindex: ETH1,
            kind: ENDPOINT_KIND_POD,
            flags: 0,
            inbound_ports: 0,
        },
    )
}

fn median_ms(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1e3
}

pub fn run() -> Result<MapSync> {
    let pins = PinDir::new("benchsync");
    let mut datapath = Datapath::load(&LoadOptions {
        pin_dir: pins.path.clone(),
        nat_max_entries: Some(1 << 16),
    })?;
    let empty = state(40000, 60000);
    let mut full = empty.clone();
    full.endpoints.extend((0..ENDPOINTS).map(pod));
    let mut more = full.clone();
    more.endpoints.extend([pod(ENDPOINTS)]);

    let mut timed = |from: &_, to: &_| -> Result<Duration> {
        datapath.maps.sync(from)?;
        let started = Instant::now();
        datapath.maps.sync(to)?;
        Ok(started.elapsed())
    };
    let mut from_empty = Vec::new();
    let mut noop = Vec::new();
    let mut one_more = Vec::new();
    for _ in 0..RUNS {
        from_empty.push(timed(&empty, &full)?);
        noop.push(timed(&full, &full)?);
        one_more.push(timed(&full, &more)?);
    }
    Ok(MapSync {
        endpoints: ENDPOINTS,
        from_empty_ms: median_ms(from_empty),
        noop_ms: median_ms(noop),
        one_more_ms: median_ms(one_more),
    })
}
