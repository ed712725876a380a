//! A datapath loaded into the kernel with a known map state, for packet-level tests and
//! per-packet benchmarks through `BPF_PROG_TEST_RUN`. Nothing is attached anywhere.
//!
//! The "current interface" of a test run is the loopback device (ifindex 1), which plays
//! VNIC 0 (eth0, the masquerade interface); VNIC 1 has an index no device uses, which is
//! fine because test runs never carry out redirects.

use std::net::Ipv4Addr;

use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
use vcnpath::datapath::{Counters, Datapath, DatapathError, DatapathState, LoadOptions};
use vcnpath_common::{
    CONFIG_F_ENABLED, Config, ENDPOINT_KIND_POD, ENDPOINT_KIND_PRIMARY, Endpoint, Reason,
    VNIC_F_ROUTER_MAC, Vnic,
};

use crate::privileged::PinDir;

pub const ETH0: u32 = 1;
pub const ETH1: u32 = 4000;
pub const MASQ: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
pub const ETH1_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
pub const POD0: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 20);
pub const POD1: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 20);
pub const POD1B: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 21);
pub const PEER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 50);
pub const ON_LINK_ETH1: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 99);
pub const NONMASQ_DST: Ipv4Addr = Ipv4Addr::new(192, 168, 7, 7);
pub const REMOTE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const ROUTER0: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
pub const ETH0_MAC: [u8; 6] = [0x02, 0, 0x0a, 0, 0, 0x0a];
pub const ETH1_MAC: [u8; 6] = [0x02, 0, 0x0a, 0, 1, 0x0a];
pub const ROUTER0_MAC: [u8; 6] = [0x02, 0, 0x0a, 0, 0, 0x01];
pub const ROUTER1_MAC: [u8; 6] = [0x02, 0, 0x0a, 0, 1, 0x01];

/// TC verdicts.
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// A loaded datapath with the fixture's state; unloads and unpins on drop.
pub struct Fixture {
    pub datapath: Datapath,
    pins: PinDir,
}

/// The map state every packet test starts from.
pub fn state(port_min: u16, port_max: u16) -> DatapathState {
    let vnic = |ifindex, ip: Ipv4Addr, mac, router_mac| Vnic {
        ifindex,
        primary_ip: ip.octets(),
        subnet_ip: [ip.octets()[0], ip.octets()[1], ip.octets()[2], 0],
        router_ip: [ip.octets()[0], ip.octets()[1], ip.octets()[2], 1],
        mac,
        router_mac,
        subnet_prefix_len: 24,
        flags: VNIC_F_ROUTER_MAC,
        pad: [0; 2],
    };
    let ep = |ifindex, kind| Endpoint {
        ifindex,
        kind,
        flags: 0,
        inbound_ports: 0,
    };
    DatapathState {
        vnics: [
            (ETH0, vnic(ETH0, MASQ, ETH0_MAC, ROUTER0_MAC)),
            (ETH1, vnic(ETH1, ETH1_IP, ETH1_MAC, ROUTER1_MAC)),
        ]
        .into(),
        endpoints: [
            (MASQ, ep(ETH0, ENDPOINT_KIND_PRIMARY)),
            (ETH1_IP, ep(ETH1, ENDPOINT_KIND_PRIMARY)),
            (POD0, ep(ETH0, ENDPOINT_KIND_POD)),
            (POD1, ep(ETH1, ENDPOINT_KIND_POD)),
            (POD1B, ep(ETH1, ENDPOINT_KIND_POD)),
        ]
        .into(),
        vcn_cidrs: ["10.0.0.0/16".parse().unwrap()].into(),
        nonmasq_cidrs: ["192.168.0.0/16".parse().unwrap()].into(),
        config: Some(Config {
            masq_ip: MASQ.octets(),
            masq_ifindex: ETH0,
            port_min,
            port_max,
            flags: CONFIG_F_ENABLED,
        }),
    }
}

impl Fixture {
    /// Loads the programs with a fresh pin directory and the fixture state.
    pub fn new(tag: &str, port_min: u16, port_max: u16) -> Self {
        Self::with_nat_capacity(tag, port_min, port_max, 1 << 20)
    }

    /// Same, with a NAT table of `nat_max` entries.
    pub fn with_nat_capacity(tag: &str, port_min: u16, port_max: u16, nat_max: u32) -> Self {
        let pins = PinDir::new(tag);
        let mut datapath = Datapath::load(&LoadOptions {
            pin_dir: pins.path.clone(),
            nat_max_entries: Some(nat_max),
        })
        .unwrap_or_else(|e| panic!("loading the datapath failed: {e}"));
        datapath.sync(&state(port_min, port_max)).expect("map sync");
        Self { datapath, pins }
    }

    /// Loads the programs into `pins` as the directory is (a test may have pinned maps
    /// there, or left a previous load's pins), then syncs the fixture state. On failure
    /// the load's error comes back with the directory, which still cleans up on drop.
    pub fn load_into(
        pins: PinDir,
        port_min: u16,
        port_max: u16,
    ) -> Result<Self, (DatapathError, PinDir)> {
        let loaded = Datapath::load(&LoadOptions {
            pin_dir: pins.path.clone(),
            nat_max_entries: Some(1 << 16),
        });
        let mut datapath = match loaded {
            Ok(datapath) => datapath,
            Err(error) => return Err((error, pins)),
        };
        datapath.sync(&state(port_min, port_max)).expect("map sync");
        Ok(Self { datapath, pins })
    }

    /// Lets go of the loaded datapath, keeping its pins (as an agent that exits does).
    pub fn into_pins(self) -> PinDir {
        let Self { datapath, pins } = self;
        drop(datapath);
        pins
    }

    /// Where the maps and programs are pinned (`<dir>/nat` is the NAT table).
    pub fn pin_dir(&self) -> &std::path::Path {
        &self.pins.path
    }

    pub fn egress(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        run(self.datapath.egress(), frame)
    }

    pub fn ingress(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        run(self.datapath.ingress(), frame)
    }

    /// Runs the program of a pod's host-side veth (TC ingress there) over `frame`.
    pub fn pod(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        run(self.datapath.pod(), frame)
    }

    pub fn counters(&self) -> Counters {
        Counters::read(&self.datapath.maps).expect("read counters")
    }

    pub fn count(&self, reason: Reason) -> u64 {
        self.counters().get(reason)
    }
}

/// A TCP key of `nat` (or `inbound`).
pub fn tcp_key(
    dir: u8,
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
) -> vcnpath_common::NatKey {
    vcnpath_common::NatKey {
        src: src.octets(),
        dst: dst.octets(),
        sport,
        dport,
        proto: 6,
        dir,
        pad: [0; 2],
    }
}

/// Pins at `path` a map `name` of the given type and `(key size, value size, max entries)`,
/// as another release of vcnpath could have left it.
pub fn pin_foreign_map(
    path: &std::path::Path,
    name: &str,
    map_type: aya_obj::generated::bpf_map_type,
    (key, value, max): (u32, u32, u32),
) {
    let obj = aya_obj::Map::new_from_params(map_type as u32, key, value, max, 0);
    let map = aya::maps::MapData::create(obj, name, None)
        .unwrap_or_else(|e| panic!("creating the foreign {name} map: {e}"));
    map.pin(path)
        .unwrap_or_else(|e| panic!("pinning the foreign {name} map at {}: {e}", path.display()));
}

/// Turns the pins in `pin_dir` into what datapath ABI 2 leaves: its record in the `abi`
/// map, and the flow tables (`nat`, `inbound`) with ABI 2's 24-byte entries holding the
/// same flows. ABI 2's entry, as that release declared it: last seen (u64), address,
/// port (u16), flags, TCP flags, then the creation time (u64), which ABI 3 dropped.
pub fn leave_abi_2_pins(pin_dir: &std::path::Path) {
    for name in [vcnpath_common::MAP_NAT, vcnpath_common::MAP_INBOUND] {
        pin_timestamped_table(&pin_dir.join(name), name);
    }
    record_abi(pin_dir, 2);
    clear_inbound_marks(pin_dir);
}

/// Clears [`vcnpath_common::Endpoint::inbound_ports`] in every pinned `endpoints` entry: what a
/// release before that flag leaves, its `inbound` records naming pods it never marked.
pub fn clear_inbound_marks(pin_dir: &std::path::Path) {
    use aya::maps::{HashMap, Map, MapData};
    use vcnpath_common::{Endpoint, EndpointKey};
    let path = pin_dir.join(vcnpath_common::MAP_ENDPOINTS);
    let mut endpoints: HashMap<MapData, EndpointKey, Endpoint> =
        Map::from_map_data(MapData::from_pin(&path).expect("the endpoints pin"))
            .and_then(TryInto::try_into)
            .expect("the endpoints map");
    let all: Vec<(EndpointKey, Endpoint)> = endpoints
        .iter()
        .collect::<Result<_, _>>()
        .expect("read the endpoints");
    for (key, mut value) in all {
        value.inbound_ports = 0;
        endpoints.insert(key, value, 0).expect("write an endpoint");
    }
}

/// Turns the pins in `pin_dir` into what datapath ABI 1 leaves: ABI 2's flow tables (see
/// [`leave_abi_2_pins`]), its record, and `stats` with one counter per reason (36 of them)
/// instead of one per direction and reason.
pub fn leave_abi_1_pins(pin_dir: &std::path::Path) {
    use aya_obj::generated::bpf_map_type;
    leave_abi_2_pins(pin_dir);
    record_abi(pin_dir, 1);
    let stats = pin_dir.join(vcnpath_common::MAP_STATS);
    std::fs::remove_file(&stats).expect("remove the stats pin");
    pin_foreign_map(
        &stats,
        vcnpath_common::MAP_STATS,
        bpf_map_type::BPF_MAP_TYPE_PERCPU_ARRAY,
        (4, 8, 36),
    );
}

/// Writes `abi` into the pinned ABI record, creating it as the agent does.
fn record_abi(pin_dir: &std::path::Path, abi: u32) {
    use aya::maps::{Array, Map, MapData};
    use aya_obj::generated::bpf_map_type;
    let path = pin_dir.join(vcnpath_common::MAP_ABI);
    if !path.exists() {
        pin_foreign_map(
            &path,
            vcnpath_common::MAP_ABI,
            bpf_map_type::BPF_MAP_TYPE_ARRAY,
            (4, 4, 1),
        );
    }
    let map = Map::from_map_data(MapData::from_pin(&path).expect("the abi pin")).expect("a map");
    let mut record: Array<MapData, u32> = map.try_into().expect("the abi record");
    record.set(0, abi, 0).expect("record the ABI");
}

/// Replaces the flow table pinned at `path` by one of ABI 2's layout, of the same capacity,
/// holding the same entries (each created "now", as far as its creation time says).
fn pin_timestamped_table(path: &std::path::Path, name: &str) {
    use aya::maps::{HashMap, Map, MapData, MapInfo};
    use aya_obj::generated::bpf_map_type;
    use vcnpath_common::{NatEntry, NatKey};
    let capacity = MapInfo::from_pin(path)
        .expect("the flow table")
        .max_entries();
    let current: HashMap<MapData, NatKey, NatEntry> =
        Map::from_map_data(MapData::from_pin(path).expect("the flow table"))
            .and_then(TryInto::try_into)
            .expect("a flow table of this build");
    let flows: Vec<(NatKey, NatEntry)> = current
        .iter()
        .collect::<Result<_, _>>()
        .expect("read the flows");
    drop(current);
    std::fs::remove_file(path).expect("remove the flow table's pin");
    pin_foreign_map(
        path,
        name,
        bpf_map_type::BPF_MAP_TYPE_LRU_HASH,
        (16, 24, capacity),
    );
    let mut old: HashMap<MapData, NatKey, [u8; 24]> =
        Map::from_map_data(MapData::from_pin(path).expect("the ABI 2 table"))
            .and_then(TryInto::try_into)
            .expect("a 24-byte flow table");
    for (key, entry) in flows {
        old.insert(key, abi_2_entry(&entry), 0)
            .expect("write a flow of ABI 2");
    }
}

/// `entry` as ABI 2 stored it (see [`leave_abi_2_pins`]), created "now".
pub fn abi_2_entry(entry: &vcnpath_common::NatEntry) -> [u8; 24] {
    let created = vcnpath::datapath::monotonic_now_ns();
    let mut value = [0u8; 24];
    value[..8].copy_from_slice(&entry.last_seen_ns.to_ne_bytes());
    value[8..12].copy_from_slice(&entry.addr);
    value[12..14].copy_from_slice(&entry.port.to_ne_bytes());
    value[14] = entry.flags;
    value[15] = entry.tcp_seen;
    value[16..].copy_from_slice(&created.to_ne_bytes());
    value
}

/// Runs `program` once over `frame`; returns the verdict and the frame it produced.
pub fn run(program: &SchedClassifier, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 512];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    let result = program.test_run(opts).expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

/// Runs `program` `repeat` times over `frame` and returns the kernel-timed mean ns.
pub fn time_ns(program: &SchedClassifier, frame: &[u8], repeat: u32) -> (u32, f64) {
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.repeat = repeat;
    let result = program.test_run(opts).expect("BPF_PROG_TEST_RUN");
    (result.return_value, result.duration.as_secs_f64() * 1e9)
}
