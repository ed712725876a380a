//! The packet counters by direction and reason, summed over CPUs.

use vcnpath_common::{Direction, MAP_STATS, Reason, stats_index};

use super::{DatapathError, DatapathMaps};

/// One total per direction and reason code, in direction then reason order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub Vec<(Direction, Reason, u64)>);

impl Counters {
    /// Reads and sums the per-CPU `stats` map.
    pub fn read(maps: &DatapathMaps) -> Result<Self, DatapathError> {
        let mut totals = Vec::with_capacity(Direction::ALL.len() * Reason::ALL.len());
        for direction in Direction::ALL {
            for reason in Reason::ALL {
                let per_cpu = maps
                    .stats
                    .get(&stats_index(direction, reason), 0)
                    .map_err(DatapathError::map(MAP_STATS))?;
                totals.push((direction, reason, per_cpu.iter().sum()));
            }
        }
        Ok(Self(totals))
    }

    /// The total of one reason, all directions together.
    pub fn get(&self, reason: Reason) -> u64 {
        self.0
            .iter()
            .filter(|(_, r, _)| *r == reason)
            .map(|(_, _, n)| n)
            .sum()
    }

    /// The total of one reason in one direction.
    pub fn get_in(&self, direction: Direction, reason: Reason) -> u64 {
        self.0
            .iter()
            .find(|(d, r, _)| (*d, *r) == (direction, reason))
            .map_or(0, |(_, _, n)| *n)
    }

    /// Each reason with its total over the directions, in reason order.
    pub fn totals(&self) -> impl Iterator<Item = (Reason, u64)> + '_ {
        Reason::ALL.into_iter().map(|r| (r, self.get(r)))
    }

    /// `after - self` per direction and reason, for "what happened during this test".
    #[must_use]
    pub fn delta(&self, after: &Self) -> Self {
        Self(
            after
                .0
                .iter()
                .map(|(d, r, n)| (*d, *r, n.saturating_sub(self.get_in(*d, *r))))
                .collect(),
        )
    }
}

/// One line per reason: its total, then the count of each direction that saw it.
impl std::fmt::Display for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (reason, total) in self.totals() {
            write!(f, "{:<32} {total}", reason.name())?;
            for direction in Direction::ALL {
                let n = self.get_in(direction, reason);
                if n > 0 {
                    write!(f, "  {} {n}", direction.name())?;
                }
            }
            writeln!(f)?;
        }
        Ok(())
    }
}
