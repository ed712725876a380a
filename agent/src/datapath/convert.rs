//! The entry layouts of the flow tables (`nat`, `inbound`) in each datapath ABI, and the
//! conversion of a pinned flow table from an older layout.
//!
//! Those tables hold state only the programs have: a table dropped on upgrade resets every
//! established connection. So when a release changes [`NatEntry`], the loader creates the
//! new table in staging, copies every pinned entry into it converted ([`copy`]), loads the
//! new programs with it and renames the pins. The programs attached until then keep
//! writing the old table; once the new ones are attached, what the old ones created in the
//! meantime is copied too ([`catch_up`]), so a flow opened during the upgrade is kept.
//! A layout kept here must never change: it describes what a released agent left pinned.

use aya::{
    Pod,
    maps::{HashMap, Map, MapData, MapError},
};
use vcnpath_common::{NatEntry, NatKey};

use super::{DatapathError, batch::BatchMap};

/// Entries read per `BPF_MAP_LOOKUP_BATCH` while converting.
const CHUNK: usize = 4096;

/// The layout of a flow-table entry (key [`NatKey`] in every ABI so far).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowLayout {
    /// ABIs 1 and 2: [`NatEntry`] with a trailing creation time, 24 bytes.
    Timestamped,
    /// ABI 3: [`NatEntry`] as this build declares it, 16 bytes.
    Compact,
}

impl FlowLayout {
    /// The layout the flow tables of datapath ABI `abi` have, if this build knows it.
    pub const fn of_abi(abi: u32) -> Option<Self> {
        match abi {
            1 | 2 => Some(Self::Timestamped),
            3 => Some(Self::Compact),
            _ => None,
        }
    }

    /// The size of an entry's value, as the kernel map declares it.
    pub const fn value_size(self) -> u32 {
        match self {
            Self::Timestamped => size_of::<TimestampedEntry>() as u32,
            Self::Compact => size_of::<NatEntry>() as u32,
        }
    }

    /// Whether this build converts entries of this layout into its own ([`Self::Compact`]).
    pub const fn converts(self) -> bool {
        matches!(self, Self::Timestamped)
    }
}

/// A flow-table value of ABIs 1 and 2.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct TimestampedEntry {
    last_seen_ns: u64,
    addr: [u8; 4],
    port: u16,
    flags: u8,
    tcp_seen: u8,
    /// Written by those programs, read by nothing: dropped in ABI 3.
    created_ns: u64,
}

const _: () = assert!(size_of::<TimestampedEntry>() == 24);

// SAFETY: `repr(C)` with no padding (8 + 4 + 2 + 1 + 1 + 8) and only integer fields, so
// every bit pattern is a valid value.
unsafe impl Pod for TimestampedEntry {}

impl From<&TimestampedEntry> for NatEntry {
    fn from(old: &TimestampedEntry) -> Self {
        Self {
            last_seen_ns: old.last_seen_ns,
            addr: old.addr,
            port: old.port,
            flags: old.flags,
            tcp_seen: old.tcp_seen,
        }
    }
}

/// How many entries a conversion wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    /// Entries of the old table.
    pub read: usize,
    /// Entries written into the new one.
    pub written: usize,
}

/// Copies every entry of `old` (a flow table pinned in `from`'s layout) into `new`, this
/// build's table, converted; an entry already in `new` is overwritten.
pub fn copy(
    name: &'static str,
    from: FlowLayout,
    old: &Map,
    new: &mut Map,
) -> Result<Copied, DatapathError> {
    convert(name, from, old, new, 0)
}

/// Copies the entries of `old` that `new` lacks: the flows the programs attached before
/// the new ones created after [`copy`]. An entry in both is left as the new programs keep
/// it.
pub fn catch_up(
    name: &'static str,
    from: FlowLayout,
    old: &Map,
    new: &mut Map,
) -> Result<Copied, DatapathError> {
    const BPF_NOEXIST: u64 = 1;
    convert(name, from, old, new, BPF_NOEXIST)
}

fn convert(
    name: &'static str,
    from: FlowLayout,
    old: &Map,
    new: &mut Map,
    flags: u64,
) -> Result<Copied, DatapathError> {
    let map_error = DatapathError::map(name);
    let mut new: HashMap<&mut MapData, NatKey, NatEntry> =
        new.try_into().map_err(DatapathError::map(name))?;
    let mut copied = Copied::default();
    let mut failure = None;
    let mut write = |key: &NatKey, entry: NatEntry| match new.insert(key, entry, flags) {
        Ok(()) => copied.written += 1,
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
        Err(error) => {
            failure.get_or_insert(error);
        }
    };
    copied.read = match from {
        FlowLayout::Timestamped => {
            let old: HashMap<&MapData, NatKey, TimestampedEntry> =
                old.try_into().map_err(DatapathError::map(name))?;
            BatchMap::new(&old)
                .and_then(|batch| batch.for_each(CHUNK, |key, entry| write(key, entry.into())))
                .map_err(DatapathError::map(name))?
        }
        FlowLayout::Compact => {
            let old: HashMap<&MapData, NatKey, NatEntry> =
                old.try_into().map_err(DatapathError::map(name))?;
            BatchMap::new(&old)
                .and_then(|batch| batch.for_each(CHUNK, |key, entry| write(key, *entry)))
                .map_err(DatapathError::map(name))?
        }
    };
    match failure {
        Some(error) => Err(map_error(error)),
        None => Ok(copied),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layouts_are_the_sizes_the_kernel_maps_declare() {
        assert_eq!(FlowLayout::of_abi(1), Some(FlowLayout::Timestamped));
        assert_eq!(FlowLayout::of_abi(2), Some(FlowLayout::Timestamped));
        assert_eq!(
            FlowLayout::of_abi(vcnpath_common::DATAPATH_ABI),
            Some(FlowLayout::Compact)
        );
        assert_eq!(FlowLayout::of_abi(0), None);
        assert_eq!(FlowLayout::of_abi(vcnpath_common::DATAPATH_ABI + 1), None);
        assert_eq!(FlowLayout::Timestamped.value_size(), 24);
        assert_eq!(FlowLayout::Compact.value_size(), 16);
    }

    #[test]
    fn a_timestamped_entry_keeps_everything_but_its_creation_time() {
        let old = TimestampedEntry {
            last_seen_ns: 0x0102_0304_0506_0708,
            addr: [203, 0, 113, 9],
            port: 61234,
            flags: 0b101,
            tcp_seen: 0x3a,
            created_ns: 42,
        };
        assert_eq!(
            NatEntry::from(&old),
            NatEntry {
                last_seen_ns: 0x0102_0304_0506_0708,
                addr: [203, 0, 113, 9],
                port: 61234,
                flags: 0b101,
                tcp_seen: 0x3a,
            }
        );
    }
}
