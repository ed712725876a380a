//! Batch reads and deletes on hash maps (`BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_DELETE_BATCH`,
//! kernel 5.6+), which aya 0.14 does not wrap. One syscall moves thousands of entries,
//! where aya's iterator spends two syscalls per entry and `remove` one per key: that is
//! the difference between milliseconds and seconds on a full NAT table.

use std::{
    borrow::Borrow,
    io,
    marker::PhantomData,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
};

use aya::{
    Pod,
    maps::{HashMap, IterableMap as _, MapData, MapError, MapType},
    sys::SyscallError,
};

// `enum bpf_cmd` values from the kernel's uapi `linux/bpf.h`.
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The `batch` member of the kernel's `union bpf_attr`. The kernel accepts an attribute
/// shorter than the whole union and treats the rest as zero.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    /// Resume token from the previous call (null on the first).
    in_batch: u64,
    /// Where the kernel writes the token to resume from.
    out_batch: u64,
    keys: u64,
    values: u64,
    /// In: buffer capacity in elements. Out: elements processed, also on failure.
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const _: () = assert!(size_of::<BatchAttr>() == 56);

/// The member of `union bpf_attr` for the `BPF_MAP_*_ELEM` commands.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const _: () = assert!(size_of::<ElemAttr>() == 32);

/// The value at index 0 of an array map whose values are `value_size` bytes, as raw bytes:
/// for maps whose layout only the object file knows (its `.rodata`, `.data`, `.bss`), which
/// aya's typed maps cannot read without a compile-time size. `value_size` must be the
/// kernel's (from `BPF_OBJ_GET_INFO_BY_FD`) for the same fd.
pub fn array_value(fd: BorrowedFd<'_>, value_size: u32) -> io::Result<Vec<u8>> {
    let key = 0u32;
    let mut value = vec![0u8; value_size as usize];
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd().cast_unsigned(),
        key: user_ptr(&raw const key),
        value: user_ptr(value.as_mut_ptr()),
        ..ElemAttr::default()
    };
    // SAFETY: `attr` is a valid prefix of `union bpf_attr` of the size passed; `key` is a
    // 4-byte array index and `value` has room for the `value_size` bytes the kernel copies.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_ELEM,
            &raw mut attr,
            size_of::<ElemAttr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(value)
    }
}

/// Issues one batch command. On return `attr.count` holds the number of elements the
/// kernel processed, whether or not it failed.
///
/// # Safety
/// Every nonzero pointer in `attr` must address a buffer the kernel may read and write:
/// `keys` and `values` for `attr.count` keys and values of the map's sizes, `in_batch`
/// and `out_batch` for the map's resume token.
unsafe fn bpf_batch(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid, writable prefix of `union bpf_attr` of the size passed;
    // the buffers it names are the caller's promise.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &raw mut *attr,
            size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn syscall_error(call: &'static str, io_error: io::Error) -> MapError {
    MapError::SyscallError(SyscallError { call, io_error })
}

/// Pointer-to-`u64` conversion the kernel ABI uses for user buffers.
fn user_ptr<T>(ptr: *const T) -> u64 {
    ptr as usize as u64
}

/// A hash map (plain or LRU) on which the batch operations are sound: the kernel map's key
/// and value sizes are those of `K` and `V` (checked against the kernel when it is built,
/// not against the object file aya's typed map was checked with: a map adopted from a pin
/// can differ), and such a map holds exactly one `V` per key (per-CPU maps are refused).
pub struct BatchMap<'m, K, V> {
    fd: BorrowedFd<'m>,
    _entries: PhantomData<fn() -> (K, V)>,
}

impl<'m, K: Pod + Default, V: Pod + Default> BatchMap<'m, K, V> {
    /// Fails, without any batch call, unless the kernel map is a plain or LRU hash map with
    /// keys of `size_of::<K>()` and values of `size_of::<V>()` bytes.
    pub fn new<T: Borrow<MapData>>(map: &'m HashMap<T, K, V>) -> Result<Self, MapError> {
        Self::checked(map.map())
    }

    fn checked(map: &'m MapData) -> Result<Self, MapError> {
        let info = map.info()?;
        let map_type = info.map_type()?;
        if !matches!(map_type, MapType::Hash | MapType::LruHash) {
            return Err(MapError::InvalidMapType {
                map_type: map_type as u32,
            });
        }
        check_size::<K>(info.key_size(), |size, expected| MapError::InvalidKeySize {
            size,
            expected,
        })?;
        check_size::<V>(info.value_size(), |size, expected| {
            MapError::InvalidValueSize { size, expected }
        })?;
        Ok(Self {
            fd: map.fd().as_fd(),
            _entries: PhantomData,
        })
    }

    /// Reads the map `chunk` entries per syscall; see [`BatchReader::next_chunk`].
    pub fn reader(&self, chunk: usize) -> BatchReader<'_, 'm, K, V> {
        let chunk = chunk.max(1);
        BatchReader {
            map: self,
            keys: vec![K::default(); chunk],
            values: vec![V::default(); chunk],
            // A hash map's resume token is a `u32` bucket index; 8 bytes leave room.
            token_in: [0; 8],
            token_out: [0; 8],
            started: false,
            done: false,
        }
    }

    /// Calls `f` on every entry, reading `chunk` entries per syscall; returns how many
    /// there were.
    pub fn for_each(&self, chunk: usize, mut f: impl FnMut(&K, &V)) -> Result<usize, MapError> {
        let mut reader = self.reader(chunk);
        let mut seen = 0;
        while let Some((keys, values)) = reader.next_chunk()? {
            seen += keys.len();
            for (key, value) in keys.iter().zip(values) {
                f(key, value);
            }
        }
        Ok(seen)
    }

    /// Deletes `keys`, as many per syscall as the kernel takes. Keys no longer in the map
    /// (an LRU eviction, a program's delete, a duplicate in `keys`) are skipped. Returns
    /// how many entries were deleted.
    pub fn delete(&self, keys: &[K]) -> Result<usize, MapError> {
        let mut deleted = 0;
        let mut rest = keys;
        while !rest.is_empty() {
            let mut attr = BatchAttr {
                keys: user_ptr(rest.as_ptr()),
                count: u32::try_from(rest.len()).unwrap_or(u32::MAX),
                map_fd: self.fd.as_raw_fd().cast_unsigned(),
                ..BatchAttr::default()
            };
            // SAFETY: `keys` holds `attr.count` keys of the map's key size (checked in `new`);
            // the kernel only reads it.
            let result = unsafe { bpf_batch(BPF_MAP_DELETE_BATCH, &mut attr) };
            let done = attr.count as usize;
            deleted += done;
            match result {
                Ok(()) => rest = &rest[done.min(rest.len())..],
                // The kernel stops at the first key it cannot find: skip that one.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    rest = &rest[(done + 1).min(rest.len())..];
                }
                Err(e) => return Err(syscall_error("bpf_map_delete_batch", e)),
            }
        }
        Ok(deleted)
    }
}

/// `Ok` when the kernel's size equals `T`'s; otherwise the error `mismatch(size of T,
/// kernel size)`.
fn check_size<T>(
    kernel: u32,
    mismatch: impl FnOnce(usize, usize) -> MapError,
) -> Result<(), MapError> {
    let size = size_of::<T>();
    if usize::try_from(kernel) == Ok(size) {
        Ok(())
    } else {
        Err(mismatch(size, kernel as usize))
    }
}

/// The keys of one chunk and their values, index for index.
pub type Chunk<'a, K, V> = (&'a [K], &'a [V]);

/// Streams a map's entries in chunks. The kernel walks the table bucket by bucket, so a
/// full pass yields every key present throughout exactly once, however the map changes
/// meanwhile (keys added or removed during the pass may or may not appear).
pub struct BatchReader<'b, 'm, K, V> {
    map: &'b BatchMap<'m, K, V>,
    keys: Vec<K>,
    values: Vec<V>,
    token_in: [u8; 8],
    token_out: [u8; 8],
    started: bool,
    done: bool,
}

impl<K: Pod + Default, V: Pod + Default> BatchReader<'_, '_, K, V> {
    /// The next chunk of entries, `None` once the whole map was read. A chunk is never
    /// empty; it holds at most the chunk size given to [`BatchMap::reader`] (more if a
    /// single hash bucket holds more entries than that, which the reader then grows for).
    pub fn next_chunk(&mut self) -> Result<Option<Chunk<'_, K, V>>, MapError> {
        loop {
            if self.done {
                return Ok(None);
            }
            let mut attr = BatchAttr {
                in_batch: if self.started {
                    user_ptr(self.token_in.as_ptr())
                } else {
                    0
                },
                out_batch: user_ptr(self.token_out.as_mut_ptr()),
                keys: user_ptr(self.keys.as_mut_ptr()),
                values: user_ptr(self.values.as_mut_ptr()),
                count: u32::try_from(self.keys.len()).unwrap_or(u32::MAX),
                map_fd: self.map.fd.as_raw_fd().cast_unsigned(),
                ..BatchAttr::default()
            };
            // SAFETY: `keys` and `values` have room for `attr.count` keys and values of
            // the map's sizes (checked in `new`); both tokens are 8 bytes, more than a hash
            // map's 4-byte token.
            let result = unsafe { bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr) };
            let count = (attr.count as usize).min(self.keys.len());
            match result {
                Ok(()) => {}
                // The end of the table; the last entries may come with it.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => self.done = true,
                // One bucket holds more entries than the buffers: grow them and retry.
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && count == 0 => {
                    let grown = self.keys.len() * 2;
                    self.keys.resize(grown, K::default());
                    self.values.resize(grown, V::default());
                    continue;
                }
                Err(e) => return Err(syscall_error("bpf_map_lookup_batch", e)),
            }
            self.started = true;
            self.token_in = self.token_out;
            if count > 0 {
                return Ok(Some((&self.keys[..count], &self.values[..count])));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use aya::maps::HashMap;
    use aya_obj::generated::bpf_map_type;
    use vcnpath_common::{MAP_NAT, NatEntry, NatKey};

    use super::*;
    use crate::datapath::object::OBJECT;

    /// A bpffs directory for one test, removed with its pins on drop.
    struct Pins(PathBuf);

    impl Drop for Pins {
        fn drop(&mut self) {
            if let Ok(entries) = std::fs::read_dir(&self.0) {
                for entry in entries.flatten() {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
            let _ = std::fs::remove_dir(&self.0);
        }
    }

    fn root(test: &str) -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            eprintln!("skipping {test}: needs root (CAP_BPF)");
        }
        root
    }

    /// aya hands out a typed map checked against the object file even when the map it
    /// adopted from a pin has other sizes; a batch read of it would write 32-byte values
    /// into 16-byte slots. `BatchMap` asks the kernel and refuses before any batch call.
    #[test]
    fn a_map_whose_kernel_value_size_differs_is_refused() {
        if !root("a_map_whose_kernel_value_size_differs_is_refused") {
            return;
        }
        let pins = Pins(PathBuf::from(format!(
            "/sys/fs/bpf/vcnpath-unit-{}-batch",
            std::process::id()
        )));
        std::fs::create_dir_all(&pins.0).expect("bpffs directory (is bpffs mounted?)");
        let path = pins.0.join(MAP_NAT);
        let wider = aya_obj::Map::new_from_params(
            bpf_map_type::BPF_MAP_TYPE_LRU_HASH as u32,
            u32::try_from(size_of::<NatKey>()).unwrap(),
            u32::try_from(size_of::<NatEntry>() + 16).unwrap(),
            1024,
            0,
        );
        let foreign = MapData::create(wider, MAP_NAT, None).expect("create a 32-byte-value map");
        foreign.pin(&path).expect("pin it");
        // Entries a batch read would copy out, 16 bytes too many each.
        let mut raw: HashMap<MapData, NatKey, [u8; 32]> =
            HashMap::try_from(aya::maps::Map::from_map_data(foreign).unwrap()).unwrap();
        for port in 0..64u16 {
            let key = NatKey {
                sport: port,
                ..NatKey::default()
            };
            raw.insert(key, [0xa5; 32], 0).expect("insert");
        }

        let mut ebpf = aya::EbpfLoader::new()
            .map_pin_path(MAP_NAT, path.as_path())
            .load(OBJECT)
            .expect("load the object with the foreign pin");
        let nat: HashMap<MapData, NatKey, NatEntry> = ebpf
            .take_map(MAP_NAT)
            .expect("nat")
            .try_into()
            .expect("aya checks the object's sizes, so this succeeds");

        match BatchMap::new(&nat) {
            Err(MapError::InvalidValueSize {
                size: 16,
                expected: 32,
            }) => {}
            Err(other) => panic!("expected a value-size error (16 vs 32), got {other}"),
            Ok(map) => {
                let seen = map.for_each(64, |_, _| {});
                panic!("a batch map over 32-byte values was built for 16-byte ones (read {seen:?})")
            }
        }
    }

    /// The raw read used to compare the object's data maps returns the bytes stored.
    #[test]
    fn array_value_reads_the_stored_bytes() {
        if !root("array_value_reads_the_stored_bytes") {
            return;
        }
        let obj =
            aya_obj::Map::new_from_params(bpf_map_type::BPF_MAP_TYPE_ARRAY as u32, 4, 12, 1, 0);
        let data = MapData::create(obj, "globals", None).expect("create an array");
        let mut array: aya::maps::Array<MapData, [u8; 12]> = aya::maps::Map::from_map_data(data)
            .unwrap()
            .try_into()
            .unwrap();
        let stored = *b"coarse=1\0\0\0\x07";
        array.set(0, stored, 0).unwrap();
        let read = array_value(array.map().fd().as_fd(), 12).expect("lookup");
        assert_eq!(read, stored, "the raw read must return the stored value");
    }
}
