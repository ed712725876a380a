//! The per-reason packet counters, summed over CPUs.

use vcnpath_common::{MAP_STATS, Reason};

use super::{DatapathError, DatapathMaps};

/// One total per reason code, in reason order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub Vec<(Reason, u64)>);

impl Counters {
    /// Reads and sums the per-CPU `stats` map.
    pub fn read(maps: &DatapathMaps) -> Result<Self, DatapathError> {
        let mut totals = Vec::with_capacity(Reason::ALL.len());
        for reason in Reason::ALL {
            let per_cpu = maps
                .stats
                .get(&(reason as u32), 0)
                .map_err(DatapathError::map(MAP_STATS))?;
            totals.push((reason, per_cpu.iter().sum()));
        }
        Ok(Self(totals))
    }

    /// The total of one reason.
    pub fn get(&self, reason: Reason) -> u64 {
        self.0
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }

    /// `after - self` per reason, for "what happened during this test".
    #[must_use]
    pub fn delta(&self, after: &Self) -> Self {
        Self(
            after
                .0
                .iter()
                .map(|(r, n)| (*r, n.saturating_sub(self.get(*r))))
                .collect(),
        )
    }
}

impl std::fmt::Display for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (reason, n) in &self.0 {
            writeln!(f, "{:<32} {n}", reason.name())?;
        }
        Ok(())
    }
}
