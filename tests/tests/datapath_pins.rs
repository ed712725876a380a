//! Upgrade safety of the pinned datapath: the loader meets pins another release could have
//! left (another value size, capacity, map type or ABI) and either replaces them, when the
//! agent can fill them again, converts them, when they hold flow state of an older layout
//! it knows, or refuses before changing anything. A pinned program is adopted only while
//! it uses the maps in use.

use std::path::Path;

use aya::maps::{Array, HashMap, Map, MapData, MapInfo, MapType, PerCpuArray, PerCpuValues};
use aya::programs::SchedClassifier;
use aya_obj::generated::bpf_map_type;
use vcnpath::datapath::{
    Datapath, DatapathError, DatapathMaps, LoadOptions,
    compat::{Field, Refusal},
};
use vcnpath_common::{
    DATAPATH_ABI, MAP_ABI, MAP_INBOUND, MAP_NAT, MAP_STATS, MAP_VNICS, NAT_DIR_EGRESS,
    NAT_DIR_INGRESS, NAT_F_INBOUND, NatEntry, NatKey, PROG_EGRESS, Reason, STATS_ENTRIES,
};
use vcnpath_tests::{
    datapath_fixture::{
        Fixture, MASQ, POD0, POD1, REMOTE, TC_ACT_OK, abi_2_entry, clear_inbound_marks,
        leave_abi_1_pins, leave_abi_2_pins, pin_foreign_map, run, state, tcp_key,
    },
    lab::{Netns, cmd_in, run_in},
    packet::{Spec, build, view},
    privileged::{PinDir, have_root},
};

macro_rules! root_or_skip {
    ($name:literal) => {
        if !have_root($name) {
            return;
        }
    };
}

const NAT_KEY: u32 = size_of::<NatKey>() as u32;
const NAT_VALUE: u32 = size_of::<NatEntry>() as u32;

/// A pin directory with one map another release could have pinned at `name`.
fn pins_with(tag: &str, name: &str, map_type: bpf_map_type, sizes: (u32, u32, u32)) -> PinDir {
    let pins = PinDir::new(tag);
    std::fs::create_dir_all(&pins.path).expect("create the pin directory (is bpffs mounted?)");
    pin_foreign_map(&pins.path.join(name), name, map_type, sizes);
    pins
}

/// Records `abi` as the datapath ABI of the pins in `pins`, as the release of that ABI did.
fn record_abi(pins: &PinDir, abi: u32) {
    let path = pins.path.join(MAP_ABI);
    if !path.exists() {
        pin_foreign_map(&path, MAP_ABI, bpf_map_type::BPF_MAP_TYPE_ARRAY, (4, 4, 1));
    }
    let mut record: Array<MapData, u32> = open(&path).try_into().unwrap();
    record.set(0, abi, 0).unwrap();
}

fn open(path: &Path) -> Map {
    Map::from_map_data(MapData::from_pin(path).expect("open the pin")).expect("a map")
}

fn map_id(path: &Path) -> u32 {
    MapInfo::from_pin(path).expect("pinned map").id()
}

/// Loads into `pins`, expecting a refusal of `map`; returns the refusal.
fn expect_refusal(pins: PinDir, map: &str) -> (Refusal, String, PinDir) {
    match Fixture::load_into(pins, 1024, 65535) {
        Ok(fx) => panic!(
            "the loader adopted the incompatible {map} pin in {}",
            fx.pin_dir().display()
        ),
        Err((error @ DatapathError::IncompatiblePin { .. }, pins)) => {
            let message = error.to_string();
            let DatapathError::IncompatiblePin {
                map: refused,
                path,
                refusal,
            } = error
            else {
                unreachable!()
            };
            assert_eq!(refused, map, "the error must name the map: {message}");
            assert_eq!(path, pins.path.join(map), "the error must name the pin");
            (*refusal, message, pins)
        }
        Err((other, _)) => panic!("expected the {map} pin to be refused, got: {other}"),
    }
}

/// Nothing in the directory changed: the foreign pin is the same map, no program was pinned.
fn assert_untouched(pins: &PinDir, map: &str, id: u32) {
    assert_eq!(
        map_id(&pins.path.join(map)),
        id,
        "a refused pin must be left as it was"
    );
    assert!(
        !pins.path.join(PROG_EGRESS).exists(),
        "a refused load must pin no program"
    );
}

#[test]
fn a_nat_table_with_another_value_size_is_refused_and_left_alone() {
    root_or_skip!("nat_value_size_refused");
    let pins = pins_with(
        "natvalue",
        MAP_NAT,
        bpf_map_type::BPF_MAP_TYPE_LRU_HASH,
        (NAT_KEY, NAT_VALUE + 16, 1 << 16),
    );
    record_abi(&pins, DATAPATH_ABI);
    let nat = pins.path.join(MAP_NAT);
    let mut flows: HashMap<MapData, NatKey, [u8; 32]> = open(&nat).try_into().unwrap();
    flows
        .insert(NatKey::default(), [7; 32], 0)
        .expect("an established flow of the old release");
    drop(flows);
    let id = map_id(&nat);

    let (refusal, message, pins) = expect_refusal(pins, MAP_NAT);
    let Refusal::Layout(mismatch) = refusal else {
        panic!("expected a layout refusal, got {refusal:?}")
    };
    assert_eq!(mismatch.fields, [Field::ValueSize], "{message}");
    for needle in [
        "value size 32 pinned, 16 expected",
        &format!("rm {}", nat.display()),
        "resets every masqueraded connection",
    ] {
        assert!(
            message.contains(needle),
            "the error must say {needle:?}: {message}"
        );
    }
    assert_untouched(&pins, MAP_NAT, id);
    let flows: HashMap<MapData, NatKey, [u8; 32]> = open(&nat).try_into().unwrap();
    assert_eq!(
        flows.get(&NatKey::default(), 0).ok(),
        Some([7; 32]),
        "the old release's flows must survive a refused upgrade"
    );

    // The documented remedy works: without the pin the datapath loads.
    std::fs::remove_file(&nat).unwrap();
    let fx = Fixture::load_into(pins, 1024, 65535)
        .unwrap_or_else(|(e, _)| panic!("loading after removing the pin: {e}"));
    assert_snat_works(&fx);
}

#[test]
fn a_nat_table_of_another_map_type_is_refused() {
    root_or_skip!("nat_type_refused");
    let pins = pins_with(
        "nattype",
        MAP_NAT,
        bpf_map_type::BPF_MAP_TYPE_HASH,
        (NAT_KEY, NAT_VALUE, 1 << 16),
    );
    record_abi(&pins, DATAPATH_ABI);
    let id = map_id(&pins.path.join(MAP_NAT));
    let (refusal, message, pins) = expect_refusal(pins, MAP_NAT);
    assert!(
        matches!(&refusal, Refusal::Layout(m) if m.fields == [Field::Type]
            && m.pinned.map_type == MapType::Hash && m.expected.map_type == MapType::LruHash),
        "expected a type refusal (Hash pinned, LruHash expected): {message}"
    );
    assert_untouched(&pins, MAP_NAT, id);
}

#[test]
fn a_nat_table_of_another_capacity_is_adopted_with_its_flows() {
    root_or_skip!("nat_capacity_adopted");
    let pins = pins_with(
        "natcap",
        MAP_NAT,
        bpf_map_type::BPF_MAP_TYPE_LRU_HASH,
        (NAT_KEY, NAT_VALUE, 4096),
    );
    record_abi(&pins, DATAPATH_ABI);
    let nat = pins.path.join(MAP_NAT);
    let id = map_id(&nat);
    let fx = Fixture::load_into(pins, 1024, 65535)
        .unwrap_or_else(|(e, _)| panic!("a NAT table of another capacity must be adopted: {e}"));
    assert_eq!(map_id(&nat), id, "the pinned NAT table must be kept");
    assert_snat_works(&fx);
}

#[test]
fn pins_of_another_datapath_abi_are_refused_while_they_hold_a_nat_table() {
    root_or_skip!("abi_refused");
    let pins = Fixture::load_into(PinDir::new("abi"), 1024, 65535)
        .unwrap_or_else(|(e, _)| panic!("first load: {e}"))
        .into_pins();
    record_abi(&pins, DATAPATH_ABI + 1);
    let id = map_id(&pins.path.join(MAP_NAT));
    // `vcnpath counters` and `vcnpath nat` would misname what they read.
    match DatapathMaps::from_pins(&pins.path) {
        Err(DatapathError::ForeignAbi {
            pinned, expected, ..
        }) => assert_eq!((pinned, expected), (DATAPATH_ABI + 1, DATAPATH_ABI)),
        Err(other) => panic!("expected the read-only open to refuse another ABI, got {other}"),
        Ok(_) => panic!("the read-only open accepted pins of another datapath ABI"),
    }

    let (refusal, message, pins) = expect_refusal(pins, MAP_NAT);
    assert_eq!(
        refusal,
        Refusal::Abi {
            pinned: DATAPATH_ABI + 1,
            expected: DATAPATH_ABI
        },
        "{message}"
    );
    assert_eq!(
        map_id(&pins.path.join(MAP_NAT)),
        id,
        "a refused NAT table must be left as it was"
    );
}

#[test]
fn stats_of_a_release_with_fewer_reasons_are_replaced_with_their_counts() {
    root_or_skip!("stats_replaced");
    let pins = pins_with(
        "stats",
        MAP_STATS,
        bpf_map_type::BPF_MAP_TYPE_PERCPU_ARRAY,
        (4, 8, STATS_ENTRIES - 1),
    );
    // A release of this ABI (with fewer reasons needs no other): its record says so.
    record_abi(&pins, DATAPATH_ABI);
    let stats = pins.path.join(MAP_STATS);
    let mut old: PerCpuArray<MapData, u64> = open(&stats).try_into().unwrap();
    let cpus = aya::util::nr_cpus().unwrap();
    let seven = PerCpuValues::try_from(vec![7u64; cpus]).unwrap();
    old.set(Reason::PassNotIpv4 as u32, seven, 0).unwrap();
    drop(old);

    let fx = Fixture::load_into(pins, 1024, 65535)
        .unwrap_or_else(|(e, _)| panic!("stats with fewer reasons must be replaced: {e}"));
    let info = MapInfo::from_pin(&stats).unwrap();
    assert_eq!(
        info.max_entries(),
        STATS_ENTRIES,
        "the pinned stats must have a counter per direction and reason"
    );
    let before = 7 * cpus as u64;
    assert_eq!(
        fx.count(Reason::PassNotIpv4),
        before,
        "the old counts must be carried over"
    );
    let (verdict, _) = fx.egress(&arp_frame());
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        fx.count(Reason::PassNotIpv4),
        before + 1,
        "the programs must count into the stats map the agent reads"
    );
    assert_eq!(
        fx.count(Reason::PassNoVnic),
        0,
        "the new reason starts at 0"
    );
}

#[test]
fn vnics_of_another_layout_are_replaced_and_refilled() {
    root_or_skip!("vnics_replaced");
    // A `Vnic` 4 bytes shorter: the new programs read past it, so the verifier refuses
    // them if this map is adopted.
    let pins = pins_with(
        "vnics",
        MAP_VNICS,
        bpf_map_type::BPF_MAP_TYPE_HASH,
        (4, 28, 64),
    );
    let vnics = pins.path.join(MAP_VNICS);
    let old = map_id(&vnics);
    let fx = Fixture::load_into(pins, 1024, 65535)
        .unwrap_or_else(|(e, _)| panic!("vnics of another layout must be replaced: {e}"));
    assert_ne!(map_id(&vnics), old, "the vnics pin must hold a new map");
    assert_eq!(MapInfo::from_pin(&vnics).unwrap().value_size(), 32);
    assert_snat_works(&fx);
}

#[test]
fn a_pinned_program_bound_to_a_replaced_map_is_not_adopted() {
    root_or_skip!("program_maps");
    let pins = Fixture::load_into(PinDir::new("progmaps"), 1024, 65535)
        .unwrap_or_else(|(e, _)| panic!("first load: {e}"))
        .into_pins();
    // The stats pin goes (by hand, or a release that replaced it); the pinned programs
    // still count into the old map, with code identical to the embedded one.
    std::fs::remove_file(pins.path.join(MAP_STATS)).unwrap();

    let fx =
        Fixture::load_into(pins, 1024, 65535).unwrap_or_else(|(e, _)| panic!("second load: {e}"));
    assert!(
        !fx.datapath.adopted,
        "programs bound to a map no longer pinned must be replaced"
    );
    let (verdict, _) = fx.egress(&arp_frame());
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        fx.count(Reason::PassNotIpv4),
        1,
        "the program in use must count into the pinned stats map"
    );
}

/// The upgrade from ABI 1, whose `stats` had one counter per reason and whose flow
/// entries carried a creation time: the flow tables are converted, so a flow translated
/// before the upgrade carries on with its port and its replies; the counters start over
/// in the new layout; the record says the new ABI.
#[test]
fn pins_of_abi_1_are_upgraded_keeping_every_flow() {
    upgrade_keeps_every_flow("abi1", leave_abi_1_pins);
}

/// The upgrade from ABI 2, whose flow entries carried a creation time: every flow, of
/// both flow tables, is converted into the new layout and carries on.
#[test]
fn pins_of_abi_2_are_upgraded_keeping_every_flow() {
    upgrade_keeps_every_flow("abi2", leave_abi_2_pins);
}

fn upgrade_keeps_every_flow(tag: &str, older: fn(&Path)) {
    root_or_skip!("abi_upgrade");
    let first = Fixture::load_into(PinDir::new(tag), 1024, 65535)
        .unwrap_or_else(|(e, _)| panic!("first load: {e}"));
    let (_, out) = first.egress(&build(&Spec::tcp(POD0, 40000, REMOTE, 443)));
    let port = view(&out).sport;
    // A flow opened from outside, recorded in `inbound`.
    let syn = Spec::tcp(REMOTE, 50000, POD1, 8080).with_tcp_flags(0x02);
    assert_eq!(first.ingress(&build(&syn)).0, TC_ACT_OK);
    let pins = first.into_pins();
    older(&pins.path);
    let stats = pins.path.join(MAP_STATS);
    let old_nat = map_id(&pins.path.join(MAP_NAT));
    assert_eq!(
        MapInfo::from_pin(pins.path.join(MAP_NAT))
            .unwrap()
            .value_size(),
        24,
        "the older release's layout"
    );

    let fx = Fixture::load_into(pins, 1024, 65535)
        .unwrap_or_else(|(e, _)| panic!("the flow tables of an older ABI must be converted: {e}"));
    for map in [MAP_NAT, MAP_INBOUND] {
        let info = MapInfo::from_pin(fx.pin_dir().join(map)).unwrap();
        assert_eq!(
            info.value_size(),
            NAT_VALUE,
            "{map} has this build's layout"
        );
    }
    assert_ne!(
        map_id(&fx.pin_dir().join(MAP_NAT)),
        old_nat,
        "a new NAT table"
    );
    let (_, back) = fx.ingress(&build(&Spec::tcp(REMOTE, 443, MASQ, port)));
    assert_eq!(
        (view(&back).dst, view(&back).dport),
        (POD0, 40000),
        "a reply of the flow from before the upgrade reaches its pod"
    );
    let (_, again) = fx.egress(&build(&Spec::tcp(POD0, 40000, REMOTE, 443)));
    assert_eq!(view(&again).sport, port, "the flow keeps its port");
    let (_, answer) = fx.egress(&build(
        &Spec::tcp(POD1, 8080, REMOTE, 50000).with_tcp_flags(0x12),
    ));
    assert_eq!(
        view(&answer).src,
        POD1,
        "the pod's answer on the inbound flow from before the upgrade keeps its address"
    );
    assert_eq!(
        (fx.count(Reason::SnatEstablished), fx.count(Reason::SnatNew)),
        (1, 0),
        "and rides its old mapping"
    );
    assert_eq!(
        MapInfo::from_pin(&stats).unwrap().max_entries(),
        STATS_ENTRIES
    );
    let record: Array<MapData, u32> = open(&fx.pin_dir().join(MAP_ABI)).try_into().unwrap();
    assert_eq!(record.get(&0, 0).unwrap(), DATAPATH_ABI);
}

/// The programs attached before an upgrade keep running until the first sync attaches
/// the new ones: a flow they open after the conversion's first copy is in the old table
/// only. The sync copies it over, so its replies still reach the pod.
#[test]
fn flows_the_old_programs_open_during_the_upgrade_are_carried_over() {
    root_or_skip!("abi_catch_up");
    let first = Fixture::load_into(PinDir::new("catchup"), 1024, 65535)
        .unwrap_or_else(|(e, _)| panic!("first load: {e}"));
    let pins = first.into_pins();
    leave_abi_2_pins(&pins.path);
    // What the attached programs hold: the old table, whatever becomes of its pin.
    let mut old: HashMap<MapData, NatKey, [u8; 24]> =
        open(&pins.path.join(MAP_NAT)).try_into().unwrap();

    let mut datapath = Datapath::load(&LoadOptions {
        pin_dir: pins.path.clone(),
        nat_max_entries: Some(1 << 16),
    })
    .unwrap_or_else(|e| panic!("the upgrade's load: {e}"));
    // Meanwhile the old programs translate a new flow POD0:40001 -> MASQ:62001.
    let fwd = tcp_key(NAT_DIR_EGRESS, POD0, 40001, REMOTE, 443);
    let back = tcp_key(NAT_DIR_INGRESS, REMOTE, 443, MASQ, 62001);
    for (key, addr, port) in [(fwd, MASQ, 62001), (back, POD0, 40001)] {
        let entry = NatEntry {
            last_seen_ns: vcnpath::datapath::monotonic_now_ns(),
            addr: addr.octets(),
            port,
            ..NatEntry::default()
        };
        old.insert(key, abi_2_entry(&entry), 0).unwrap();
    }
    let new: HashMap<MapData, NatKey, NatEntry> =
        open(&pins.path.join(MAP_NAT)).try_into().unwrap();
    assert!(
        new.get(&back, 0).is_err(),
        "the first copy ran before the flow was opened"
    );

    datapath.sync(&state(1024, 65535)).expect("the first sync");
    let reply = build(&Spec::tcp(REMOTE, 443, MASQ, 62001));
    let (_, out) = run(datapath.ingress(), &reply);
    assert_eq!(
        (view(&out).dst, view(&out).dport),
        (POD0, 40001),
        "a reply of the flow opened during the upgrade reaches its pod"
    );
    let (_, out) = run(
        datapath.egress(),
        &build(&Spec::tcp(POD0, 40001, REMOTE, 443)),
    );
    assert_eq!(
        (view(&out).src, view(&out).sport),
        (MASQ, 62001),
        "and the flow keeps its mapping"
    );
    drop(datapath);
    drop(pins);
}

/// A release before the pods' inbound mark (the same ABI: the flag was padding) leaves
/// `inbound` records naming pods it never marked, and its programs, attached until the
/// first sync, go on writing such records. The load marks the pods of the first before
/// anything is attached, the first sync those of the others: each pod's answers on those
/// flows keep its address.
#[test]
fn records_of_a_release_before_the_inbound_mark_keep_their_answers_untranslated() {
    root_or_skip!("inbound_mark");
    let first = Fixture::load_into(PinDir::new("inmark"), 1024, 65535)
        .unwrap_or_else(|(e, _)| panic!("first load: {e}"));
    let syn = Spec::tcp(REMOTE, 50000, POD1, 8080).with_tcp_flags(0x02);
    assert_eq!(first.ingress(&build(&syn)).0, TC_ACT_OK);
    let pins = first.into_pins();
    clear_inbound_marks(&pins.path);

    let mut datapath = Datapath::load(&LoadOptions {
        pin_dir: pins.path.clone(),
        nat_max_entries: Some(1 << 16),
    })
    .unwrap_or_else(|e| panic!("the upgrade's load: {e}"));
    let answer = |datapath: &Datapath, pod, remote_port| {
        let (_, out) = run(
            datapath.egress(),
            &build(&Spec::tcp(pod, 8080, REMOTE, remote_port)),
        );
        view(&out).src
    };
    assert_eq!(
        answer(&datapath, POD1, 50000),
        POD1,
        "the pod of a record from before the upgrade is marked before anything is attached"
    );
    // Meanwhile the programs attached before record a flow to POD0, without marking it.
    let record = NatEntry {
        last_seen_ns: vcnpath::datapath::monotonic_now_ns(),
        addr: POD0.octets(),
        port: 8080,
        flags: NAT_F_INBOUND,
        ..NatEntry::default()
    };
    datapath
        .maps
        .flow_tables()
        .inbound
        .insert(
            tcp_key(NAT_DIR_EGRESS, POD0, 8080, REMOTE, 50001),
            record,
            0,
        )
        .expect("a record of the old programs");
    datapath.sync(&state(1024, 65535)).expect("the first sync");
    assert_eq!(
        answer(&datapath, POD0, 50001),
        POD0,
        "the pod of a record the old programs wrote during the upgrade is marked by the first sync"
    );
    drop(datapath);
    drop(pins);
}

/// Pins recorded as ABI 2 whose NAT table has this build's layout are not what ABI 2
/// left: nothing is read from them, and the table is left as it was.
#[test]
fn a_flow_table_of_abi_2_with_another_layout_is_refused() {
    root_or_skip!("abi2_layout");
    let pins = pins_with(
        "abi2layout",
        MAP_NAT,
        bpf_map_type::BPF_MAP_TYPE_LRU_HASH,
        (NAT_KEY, NAT_VALUE, 4096),
    );
    record_abi(&pins, 2);
    let id = map_id(&pins.path.join(MAP_NAT));
    let (refusal, message, pins) = expect_refusal(pins, MAP_NAT);
    assert!(
        matches!(&refusal, Refusal::Layout(m) if m.fields == [Field::ValueSize]
            && m.pinned.value_size == NAT_VALUE && m.expected.value_size == 24),
        "expected a value-size refusal (16 pinned, ABI 2's 24 expected): {message}"
    );
    assert_untouched(&pins, MAP_NAT, id);
}

#[test]
fn a_restart_adopts_every_pin_and_records_the_abi() {
    root_or_skip!("restart_adopts");
    let first = Fixture::load_into(PinDir::new("restart"), 1024, 65535)
        .unwrap_or_else(|(e, _)| panic!("first load: {e}"));
    let nat = first.pin_dir().join(MAP_NAT);
    assert_snat_works(&first);
    let ids: Vec<u32> = [MAP_NAT, MAP_STATS, MAP_VNICS]
        .iter()
        .map(|m| map_id(&first.pin_dir().join(m)))
        .collect();
    let pins = first.into_pins();

    let fx = Fixture::load_into(pins, 1024, 65535).unwrap_or_else(|(e, _)| panic!("restart: {e}"));
    assert!(fx.datapath.adopted, "unchanged programs must be adopted");
    let again: Vec<u32> = [MAP_NAT, MAP_STATS, MAP_VNICS]
        .iter()
        .map(|m| map_id(&fx.pin_dir().join(m)))
        .collect();
    assert_eq!(again, ids, "every compatible map must be adopted");
    let flows: HashMap<MapData, NatKey, NatEntry> = open(&nat).try_into().unwrap();
    assert_eq!(flows.keys().count(), 2, "the flow must survive the restart");
    let record: Array<MapData, u32> = open(&fx.pin_dir().join(MAP_ABI)).try_into().unwrap();
    assert_eq!(record.get(&0, 0).unwrap(), DATAPATH_ABI);
    assert!(
        !fx.pin_dir().join("staging").exists(),
        "no staging directory may be left behind"
    );
}

/// A pod's packet to the outside leaves from the masquerade address.
fn assert_snat_works(fx: &Fixture) {
    let (verdict, out) = fx.egress(&build(&Spec::tcp(POD0, 40000, REMOTE, 443)));
    assert_eq!(verdict, TC_ACT_OK, "a pod's flow to the outside must pass");
    assert_eq!(
        view(&out).src,
        MASQ,
        "a pod's flow to the outside must leave from the masquerade address"
    );
}

/// An ARP request: not IPv4, so it is passed and counted as `PassNotIpv4`.
fn arp_frame() -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    frame.extend_from_slice(&0x0806u16.to_be_bytes());
    frame.extend_from_slice(&[0; 28]);
    frame
}

/// After a load that replaced a map by an empty one, the filters attached before keep
/// their programs (and the complete maps those hold) until the first sync has filled the
/// new maps; only then are the new programs attached.
#[test]
fn attaching_waits_for_the_first_sync_when_a_map_was_replaced_empty() {
    root_or_skip!("attach_held");
    let ns = Netns::create(&format!("vcnpath-pins-{}", std::process::id())).expect("netns");
    // A veth pair inside the test's namespace (the kernel here has no dummy driver).
    ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"])
        .unwrap();
    ns.ip(&["link", "set", "d0", "up"]).unwrap();
    let egress_filter = || {
        let out = cmd_in(&ns, "tc")
            .args(["filter", "show", "dev", "d0", "egress"])
            .output()
            .expect("tc filter show");
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        out.split_whitespace()
            .skip_while(|w| *w != "id")
            .nth(1)
            .and_then(|id| id.parse::<u32>().ok())
            .unwrap_or_else(|| panic!("no program attached to d0 egress: {out}"))
    };
    let pinned_egress = |pins: &PinDir| {
        SchedClassifier::from_pin(pins.path.join(PROG_EGRESS))
            .and_then(|p| p.info())
            .expect("pinned egress program")
            .id()
    };

    let pins = PinDir::new("held");
    let first = run_in(&ns, || {
        let mut fx = Fixture::load_into(pins, 1024, 65535)
            .unwrap_or_else(|(e, _)| panic!("first load: {e}"));
        fx.datapath.attach("d0").expect("attach to d0");
        fx.into_pins()
    })
    .unwrap();
    let pins = first;
    let old_program = egress_filter();
    assert_eq!(old_program, pinned_egress(&pins));

    let vnics = pins.path.join(MAP_VNICS);
    std::fs::remove_file(&vnics).unwrap();
    pin_foreign_map(
        &vnics,
        MAP_VNICS,
        bpf_map_type::BPF_MAP_TYPE_HASH,
        (4, 28, 64),
    );
    let (pins, held, after_sync) = run_in(&ns, || {
        let mut datapath = Datapath::load(&LoadOptions {
            pin_dir: pins.path.clone(),
            nat_max_entries: Some(1 << 16),
        })
        .unwrap_or_else(|e| panic!("loading over the foreign vnics pin: {e}"));
        datapath.attach("d0").expect("attach (held)");
        let held = egress_filter();
        datapath.sync(&state(1024, 65535)).expect("first sync");
        (pins, held, egress_filter())
    })
    .unwrap();
    assert_eq!(
        held, old_program,
        "with empty maps the new programs must not be attached before the first sync"
    );
    assert_ne!(
        after_sync, old_program,
        "the first sync must attach the new programs"
    );
    assert_eq!(
        after_sync,
        pinned_egress(&pins),
        "the pinned program is the attached one"
    );
    drop(ns);
}
