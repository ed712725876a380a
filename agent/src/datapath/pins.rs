//! The kernel side of adopting pins: what the embedded object declares, what sits at each
//! pin, the pinned ABI record, copying a replaced map's entries, and swapping staged pins
//! into place. The decisions are [`super::compat`]'s.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::programs::{ProgramError, ProgramInfo};
use aya::{
    Pod,
    maps::{
        Array, HashMap as BpfHashMap, LpmTrie, Map, MapData, MapError, MapInfo, MapType,
        PerCpuArray,
    },
};
use aya_obj::generated::bpf_map_type;
use tracing::warn;
use vcnpath_common::{
    CidrValue, Config, DATAPATH_ABI, Endpoint, EndpointKey, MAP_ABI, MAP_CONFIG, MAP_ENDPOINTS,
    MAP_NAMES, MAP_NAT, MAP_NONMASQ_CIDRS, MAP_STATS, MAP_VCN_CIDRS, MAP_VNICS, Vnic,
};

use super::{DatapathError, compat::MapSpec, object::OBJECT};

/// Directory under the pin directory where replacement maps and programs are pinned
/// until the programs have loaded; then they are renamed over the live pins.
// bpffs refuses names with a dot (they are reserved for the kernel), hence no `.staging`.
pub const STAGING_DIR: &str = "staging";

/// The ABI of pins that carry no record: the releases before the record existed.
pub const ABI_BEFORE_RECORD: u32 = 1;

/// The spec of the ABI record map.
const ABI_SPEC: MapSpec = MapSpec {
    map_type: MapType::Array,
    key_size: 4,
    value_size: 4,
    max_entries: 1,
    flags: 0,
};

fn to_map_type(raw: u32) -> Result<MapType, MapError> {
    let raw = bpf_map_type::try_from(raw).unwrap_or(bpf_map_type::__MAX_BPF_MAP_TYPE);
    MapType::try_from(raw)
}

/// The spec of the map the kernel describes in `info`.
pub fn spec_of(info: &MapInfo) -> Result<MapSpec, MapError> {
    Ok(MapSpec {
        map_type: info.map_type()?,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    })
}

/// The maps the embedded object declares, as the loader will create them (`nat` with the
/// configured capacity).
pub fn declared(nat_max_entries: Option<u32>) -> Result<HashMap<String, MapSpec>, DatapathError> {
    let object = aya_obj::Object::parse(OBJECT).map_err(|e| DatapathError::Object(Box::new(e)))?;
    object
        .maps
        .iter()
        .map(|(name, map)| {
            let map_type = to_map_type(map.map_type())
                .map_err(|e| DatapathError::Load(Box::new(aya::EbpfError::MapError(e))))?;
            let max_entries = match nat_max_entries {
                Some(max) if name == MAP_NAT => max,
                _ => map.max_entries(),
            };
            Ok((
                name.clone(),
                MapSpec {
                    map_type,
                    key_size: map.key_size(),
                    value_size: map.value_size(),
                    max_entries,
                    flags: map.map_flags(),
                },
            ))
        })
        .collect()
}

/// The spec of the map pinned at `path`, `None` when nothing is pinned there.
pub fn pinned(map: &'static str, path: &Path) -> Result<Option<MapSpec>, DatapathError> {
    if !exists(path).map_err(|source| pin_error(path, source))? {
        return Ok(None);
    }
    let info = MapInfo::from_pin(path).map_err(DatapathError::map(map))?;
    spec_of(&info).map(Some).map_err(DatapathError::map(map))
}

fn exists(path: &Path) -> io::Result<bool> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn pin_error(path: &Path, source: io::Error) -> DatapathError {
    DatapathError::Pin {
        path: path.to_owned(),
        source,
    }
}

/// The ABI the pins in `pin_dir` were created with: the record's, or
/// [`ABI_BEFORE_RECORD`] when there is none.
pub fn read_abi(pin_dir: &Path) -> Result<u32, DatapathError> {
    let path = pin_dir.join(MAP_ABI);
    let Some(spec) = pinned(MAP_ABI, &path)? else {
        return Ok(ABI_BEFORE_RECORD);
    };
    if let Some(mismatch) = super::compat::compare(&ABI_SPEC, &spec, &[]) {
        return Err(DatapathError::IncompatiblePin {
            map: MAP_ABI,
            path,
            refusal: Box::new(super::compat::Refusal::Layout(mismatch)),
        });
    }
    let data = MapData::from_pin(&path).map_err(DatapathError::map(MAP_ABI))?;
    let record: Array<MapData, u32> = Map::from_map_data(data)
        .and_then(TryInto::try_into)
        .map_err(DatapathError::map(MAP_ABI))?;
    record.get(&0, 0).map_err(DatapathError::map(MAP_ABI))
}

/// Records [`DATAPATH_ABI`] for the pins in `pin_dir`, creating the record if needed.
pub fn write_abi(pin_dir: &Path) -> Result<(), DatapathError> {
    let path = pin_dir.join(MAP_ABI);
    let mut record: Array<MapData, u32> = if exists(&path).map_err(|e| pin_error(&path, e))? {
        // `read_abi` has checked the pinned record's layout.
        Map::from_map_data(MapData::from_pin(&path).map_err(DatapathError::map(MAP_ABI))?)
            .and_then(TryInto::try_into)
            .map_err(DatapathError::map(MAP_ABI))?
    } else {
        let obj = aya_obj::Map::new_from_params(
            bpf_map_type::BPF_MAP_TYPE_ARRAY as u32,
            ABI_SPEC.key_size,
            ABI_SPEC.value_size,
            ABI_SPEC.max_entries,
            ABI_SPEC.flags,
        );
        let data = MapData::create(obj, MAP_ABI, None).map_err(DatapathError::map(MAP_ABI))?;
        data.pin(&path)
            .map_err(|e| pin_error(&path, io::Error::other(e)))?;
        Map::from_map_data(data)
            .and_then(TryInto::try_into)
            .map_err(DatapathError::map(MAP_ABI))?
    };
    record
        .set(0, DATAPATH_ABI, 0)
        .map_err(DatapathError::map(MAP_ABI))
}

/// How a program uses one map, for telling whether two programs use the same maps.
#[derive(Debug, PartialEq)]
pub enum MapUse {
    /// A map the loader pins (one of `MAP_NAMES`): the same map means the same id.
    Pinned(u32),
    /// A map of the object's own (`.rodata`, `.data`, `.bss`: globals), created afresh on
    /// every load: the same map means the same type, size and contents.
    Internal(MapSpec, Vec<u8>),
}

/// The maps the program described by `info` uses, by kernel name; `None` when the kernel
/// does not report them.
pub fn program_maps(info: &ProgramInfo) -> Result<Option<BTreeMap<String, MapUse>>, ProgramError> {
    let Some(ids) = info.map_ids()? else {
        return Ok(None);
    };
    let mut maps = BTreeMap::new();
    for id in ids {
        let map = MapInfo::from_id(id).map_err(ProgramError::MapError)?;
        let name = map.name_as_str().unwrap_or_default().to_owned();
        let used = if MAP_NAMES.contains(&name.as_str()) {
            MapUse::Pinned(id)
        } else {
            let spec = spec_of(&map).map_err(ProgramError::MapError)?;
            let fd = map.fd().map_err(ProgramError::MapError)?;
            let contents = if spec.map_type == MapType::Array && spec.max_entries == 1 {
                super::batch::array_value(fd.as_fd(), spec.value_size).map_err(|io_error| {
                    ProgramError::SyscallError(aya::sys::SyscallError {
                        call: "bpf_map_lookup_elem",
                        io_error,
                    })
                })?
            } else {
                // Not a globals map: its contents cannot be compared, so it never matches.
                id.to_le_bytes().to_vec()
            };
            MapUse::Internal(spec, contents)
        };
        maps.insert(name, used);
    }
    Ok(Some(maps))
}

/// Empties and recreates the staging directory (a crashed upgrade may have left pins in it).
pub fn fresh_staging(pin_dir: &Path) -> Result<PathBuf, DatapathError> {
    let staging = pin_dir.join(STAGING_DIR);
    remove_staging(pin_dir)?;
    std::fs::create_dir(&staging).map_err(|e| pin_error(&staging, e))?;
    Ok(staging)
}

/// Removes the staging directory and whatever is pinned in it.
pub fn remove_staging(pin_dir: &Path) -> Result<(), DatapathError> {
    let staging = pin_dir.join(STAGING_DIR);
    match std::fs::read_dir(&staging) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry.map_err(|e| pin_error(&staging, e))?;
                std::fs::remove_file(entry.path()).map_err(|e| pin_error(&entry.path(), e))?;
            }
            std::fs::remove_dir(&staging).map_err(|e| pin_error(&staging, e))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(pin_error(&staging, e)),
    }
}

/// Moves the pin at `from` to `to`, replacing what was pinned there in one step (bpffs
/// renames like any filesystem): the name never points at nothing.
pub fn swap_in(from: &Path, to: &Path) -> Result<(), DatapathError> {
    std::fs::rename(from, to).map_err(|e| pin_error(to, e))
}

/// The map pinned at `path`.
pub fn open(name: &'static str, path: &Path) -> Result<Map, DatapathError> {
    Map::from_map_data(MapData::from_pin(path).map_err(DatapathError::map(name))?)
        .map_err(DatapathError::map(name))
}

/// Copies the entries of the map pinned at `from` into `to`, a fresh map of the same type,
/// key and value size (only capacity or flags differ). Entries beyond a smaller capacity
/// are dropped; the agent's next sync restores what it owns.
pub fn copy_entries(name: &'static str, from: &Path, to: &mut Map) -> Result<(), DatapathError> {
    let old = open(name, from)?;
    let result = match name {
        MAP_VNICS => copy_hash::<u32, Vnic>(&old, to),
        MAP_ENDPOINTS => copy_hash::<EndpointKey, Endpoint>(&old, to),
        MAP_VCN_CIDRS | MAP_NONMASQ_CIDRS => copy_trie(&old, to),
        MAP_CONFIG => copy_array::<Config>(&old, to),
        MAP_STATS => copy_per_cpu(&old, to),
        // The flow tables are never replaced, only converted (see `super::convert`); the fragments in flight
        // (`frags`) are not worth carrying over: a datagram cut in two by the upgrade is
        // lost as one lost packet is.
        _ => Ok(()),
    };
    match result {
        Ok(()) => Ok(()),
        Err(MapError::SyscallError(error))
            if error.io_error.raw_os_error() == Some(libc::E2BIG) =>
        {
            warn!(
                map = name,
                "the new map is smaller; entries beyond its capacity were not copied"
            );
            Ok(())
        }
        Err(source) => Err(DatapathError::map(name)(source)),
    }
}

fn copy_hash<K: Pod, V: Pod>(old: &Map, new: &mut Map) -> Result<(), MapError> {
    let old: BpfHashMap<&MapData, K, V> = old.try_into()?;
    let mut new: BpfHashMap<&mut MapData, K, V> = new.try_into()?;
    for entry in &old {
        let (key, value) = entry?;
        new.insert(key, value, 0)?;
    }
    Ok(())
}

fn copy_trie(old: &Map, new: &mut Map) -> Result<(), MapError> {
    let old: LpmTrie<&MapData, [u8; 4], CidrValue> = old.try_into()?;
    let mut new: LpmTrie<&mut MapData, [u8; 4], CidrValue> = new.try_into()?;
    for entry in &old {
        let (key, value) = entry?;
        new.insert(&key, value, 0)?;
    }
    Ok(())
}

fn copy_array<V: Pod>(old: &Map, new: &mut Map) -> Result<(), MapError> {
    let old: Array<&MapData, V> = old.try_into()?;
    let mut new: Array<&mut MapData, V> = new.try_into()?;
    for index in 0..old.len().min(new.len()) {
        new.set(index, old.get(&index, 0)?, 0)?;
    }
    Ok(())
}

fn copy_per_cpu(old: &Map, new: &mut Map) -> Result<(), MapError> {
    let old: PerCpuArray<&MapData, u64> = old.try_into()?;
    let mut new: PerCpuArray<&mut MapData, u64> = new.try_into()?;
    for index in 0..old.len().min(new.len()) {
        new.set(index, old.get(&index, 0)?, 0)?;
    }
    Ok(())
}
