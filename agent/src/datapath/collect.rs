//! The collector's IO: streams the live NAT and inbound tables through the expiry rules
//! of [`super::gc`] in batches ([`super::batch`]), so a collection costs a few syscalls
//! per thousand entries and memory for the flows in flight, not a copy of the table, and
//! deletes what the rules decide.

use aya::maps::MapError;
use vcnpath_common::{MAP_INBOUND, MAP_NAT};

use super::{
    DatapathError, DatapathMaps,
    batch::BatchMap,
    gc::{Collector, GcReport, NatTimeouts, expired_inbound},
};

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    // CLOCK_MONOTONIC is never negative.
    ts.tv_sec.unsigned_abs() * 1_000_000_000 + ts.tv_nsec.unsigned_abs()
}

/// Entries one batch syscall reads or deletes: 160 KiB of buffers for the NAT table.
pub(super) const BATCH_CHUNK: usize = 4096;

impl DatapathMaps {
    /// Removes expired NAT entries. The table is read in chunks with one syscall each and
    /// judged as it streams ([`Collector`]); the expired keys are deleted in chunks once
    /// the whole table has been judged, so no decision reads a table this collection has
    /// already changed (16 bytes per expired entry held meanwhile).
    pub fn collect_nat(&mut self, timeouts: &NatTimeouts) -> Result<GcReport, DatapathError> {
        let map = BatchMap::new(&self.nat).map_err(DatapathError::map(MAP_NAT))?;
        let mut collector = Collector::new(monotonic_now_ns(), timeouts);
        let mut reader = map.reader(BATCH_CHUNK);
        while let Some((keys, entries)) =
            reader.next_chunk().map_err(DatapathError::map(MAP_NAT))?
        {
            for (key, entry) in keys.iter().zip(entries) {
                collector.add(*key, *entry);
            }
        }
        let scanned = collector.scanned();
        let doomed = collector
            .finish(|key| match self.nat.get(key, 0) {
                Ok(entry) => Ok(Some(entry)),
                Err(MapError::KeyNotFound) => Ok(None),
                Err(e) => Err(e),
            })
            .map_err(DatapathError::map(MAP_NAT))?;
        let mut removed = 0;
        for chunk in doomed.chunks(BATCH_CHUNK) {
            // Keys gone already (evicted, a program raced us, doomed twice) are skipped.
            removed += map.delete(chunk).map_err(DatapathError::map(MAP_NAT))?;
        }
        let inbound = self.collect_inbound(timeouts)?;
        Ok(GcReport {
            scanned: scanned + inbound.scanned,
            removed: removed + inbound.removed,
        })
    }

    /// Removes expired records of flows opened from outside (`inbound`).
    fn collect_inbound(&mut self, timeouts: &NatTimeouts) -> Result<GcReport, DatapathError> {
        let map = BatchMap::new(&self.inbound).map_err(DatapathError::map(MAP_INBOUND))?;
        let now = monotonic_now_ns();
        let (mut scanned, mut doomed) = (0, Vec::new());
        let mut reader = map.reader(BATCH_CHUNK);
        while let Some((keys, records)) = reader
            .next_chunk()
            .map_err(DatapathError::map(MAP_INBOUND))?
        {
            scanned += keys.len();
            doomed.extend(expired_inbound(keys.iter().zip(records), now, timeouts));
        }
        let mut removed = 0;
        for chunk in doomed.chunks(BATCH_CHUNK) {
            removed += map.delete(chunk).map_err(DatapathError::map(MAP_INBOUND))?;
        }
        Ok(GcReport { scanned, removed })
    }

    /// Number of entries in the NAT table (0 if it cannot be read).
    pub fn nat_len(&self) -> usize {
        BatchMap::new(&self.nat)
            .and_then(|map| map.for_each(BATCH_CHUNK, |_, _| {}))
            .unwrap_or(0)
    }
}
