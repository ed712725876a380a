//! Whether a pinned map may be adopted, and what the loader does when it may not.
//!
//! aya reuses whatever map sits at a pin and checks sizes against the object file, not
//! the kernel map, so a pin left by another release can be adopted with another value
//! size (the batch reads then overrun their buffers) or make the verifier refuse the new
//! programs. The loader therefore compares the kernel's description of each pinned map
//! with the map the embedded object declares first — type, key size, value size,
//! `max_entries` and flags, the fields cilium/ebpf's `MapSpec.Compatible` compares — and
//! decides here, without touching the kernel, whether to adopt, replace or refuse.

use std::fmt;

use aya::maps::MapType;
use vcnpath_common::{MAP_INBOUND, MAP_NAT};

use super::convert::FlowLayout;

/// What the kernel knows of a map, and all its users' memory safety depends on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MapSpec {
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// One property of a [`MapSpec`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Type,
    KeySize,
    ValueSize,
    MaxEntries,
    Flags,
}

impl Field {
    const ALL: [Self; 5] = [
        Self::Type,
        Self::KeySize,
        Self::ValueSize,
        Self::MaxEntries,
        Self::Flags,
    ];

    fn differs(self, a: &MapSpec, b: &MapSpec) -> bool {
        match self {
            Self::Type => a.map_type != b.map_type,
            Self::KeySize => a.key_size != b.key_size,
            Self::ValueSize => a.value_size != b.value_size,
            Self::MaxEntries => a.max_entries != b.max_entries,
            Self::Flags => a.flags != b.flags,
        }
    }

    fn show(self, spec: &MapSpec) -> String {
        match self {
            Self::Type => format!("{:?}", spec.map_type),
            Self::KeySize => spec.key_size.to_string(),
            Self::ValueSize => spec.value_size.to_string(),
            Self::MaxEntries => spec.max_entries.to_string(),
            Self::Flags => format!("{:#x}", spec.flags),
        }
    }

    const fn label(self) -> &'static str {
        match self {
            Self::Type => "type",
            Self::KeySize => "key size",
            Self::ValueSize => "value size",
            Self::MaxEntries => "max entries",
            Self::Flags => "flags",
        }
    }
}

/// How a pinned map differs from the one this build declares.
#[derive(Clone, Debug, PartialEq)]
pub struct Mismatch {
    pub pinned: MapSpec,
    pub expected: MapSpec,
    /// The properties that differ, in [`Field`] order; never empty.
    pub fields: Vec<Field>,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, field) in self.fields.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(
                f,
                "{} {} pinned, {} expected",
                field.label(),
                field.show(&self.pinned),
                field.show(&self.expected)
            )?;
        }
        Ok(())
    }
}

/// Compares `pinned` with `expected`, leaving out the properties in `ignored`.
pub fn compare(expected: &MapSpec, pinned: &MapSpec, ignored: &[Field]) -> Option<Mismatch> {
    let fields: Vec<Field> = Field::ALL
        .into_iter()
        .filter(|field| !ignored.contains(field) && field.differs(pinned, expected))
        .collect();
    (!fields.is_empty()).then_some(Mismatch {
        pinned: *pinned,
        expected: *expected,
        fields,
    })
}

/// Who can fill a map again, which decides what an incompatible pin costs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contents {
    /// Written by the agent from its desired state (or counters), or held for a moment
    /// only (fragments in flight): a fresh map is filled again by the next sync or the next
    /// packets, so an incompatible pin is replaced.
    Rebuilt,
    /// Flow state that only the programs hold: dropping it resets every established
    /// connection, so a pin of another layout is converted ([`super::convert`]), or
    /// refused when no conversion exists.
    Kept,
}

/// The [`Contents`] of the map called `name`.
pub fn contents(name: &str) -> Contents {
    if name == MAP_NAT || name == MAP_INBOUND {
        Contents::Kept
    } else {
        Contents::Rebuilt
    }
}

/// What the loader does with one map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Nothing is pinned: create the map and pin it.
    Create,
    /// The pin is compatible: use it as it is.
    Adopt,
    /// The pin is not compatible but its contents can be rebuilt: create a fresh map and
    /// swap it in once the programs have loaded. With `copy`, the pinned entries are copied
    /// first (same ABI, type, key and value size: only capacity or flags changed), so the
    /// new programs start with the old state rather than an empty map.
    Replace { copy: bool },
    /// A flow table of an older ABI whose entries have another layout: create this build's
    /// table and copy every entry into it converted, so the flows carry on.
    Convert { from: FlowLayout },
}

/// Why a pin is not adopted and cannot be replaced.
#[derive(Clone, Debug, PartialEq)]
pub enum Refusal {
    /// The pinned map's kernel description differs from this build's.
    Layout(Mismatch),
    /// The pins were created by a release with another datapath ABI, and no conversion of
    /// this map's entries from that ABI exists.
    Abi { pinned: u32, expected: u32 },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Layout(mismatch) => mismatch.fmt(f),
            Self::Abi { pinned, expected } => write!(
                f,
                "created with datapath ABI {pinned}, this build uses ABI {expected} and cannot convert its entries"
            ),
        }
    }
}

/// Decides what to do with the map `name`, declared as `expected`, given what is pinned
/// (`None`: nothing) and the ABI the pins were recorded with.
pub fn plan(
    name: &str,
    expected: &MapSpec,
    pinned: Option<&MapSpec>,
    pinned_abi: u32,
    abi: u32,
) -> Result<Plan, Refusal> {
    let Some(pinned) = pinned else {
        return Ok(Plan::Create);
    };
    match contents(name) {
        Contents::Kept => {
            let refused = Refusal::Abi {
                pinned: pinned_abi,
                expected: abi,
            };
            // A newer ABI than this build knows (a downgrade) or one without a conversion.
            let (Some(from), Some(to)) = (FlowLayout::of_abi(pinned_abi), FlowLayout::of_abi(abi))
            else {
                return Err(refused);
            };
            if from != to && !from.converts() {
                return Err(refused);
            }
            // The pin must be what that ABI's release created, or nothing can be read from it.
            let released = MapSpec {
                value_size: from.value_size(),
                ..*expected
            };
            // The configured capacity applies when the table is created; an existing one
            // keeps its own, because resizing it would mean copying live flow state.
            match compare(&released, pinned, &[Field::MaxEntries]) {
                Some(mismatch) => Err(Refusal::Layout(mismatch)),
                None if from == to => Ok(Plan::Adopt),
                None => Ok(Plan::Convert { from }),
            }
        }
        Contents::Rebuilt => {
            if pinned_abi != abi {
                return Ok(Plan::Replace { copy: false });
            }
            match compare(expected, pinned, &[]) {
                None => Ok(Plan::Adopt),
                Some(mismatch) => {
                    let same_entries = !mismatch
                        .fields
                        .iter()
                        .any(|f| matches!(f, Field::Type | Field::KeySize | Field::ValueSize));
                    Ok(Plan::Replace { copy: same_entries })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use vcnpath_common::{MAP_CONFIG, MAP_STATS, MAP_VNICS};

    use super::*;

    const NAT: MapSpec = MapSpec {
        map_type: MapType::LruHash,
        key_size: 16,
        value_size: 16,
        max_entries: 262_144,
        flags: 0,
    };
    const STATS: MapSpec = MapSpec {
        map_type: MapType::PerCpuArray,
        key_size: 4,
        value_size: 8,
        max_entries: 21,
        flags: 0,
    };

    fn with(base: MapSpec, change: impl FnOnce(&mut MapSpec)) -> MapSpec {
        let mut spec = base;
        change(&mut spec);
        spec
    }

    #[test]
    fn identical_specs_match() {
        assert_eq!(compare(&NAT, &NAT, &[]), None);
    }

    #[test]
    fn every_field_is_compared_and_named() {
        let pinned = MapSpec {
            map_type: MapType::Hash,
            key_size: 12,
            value_size: 32,
            max_entries: 1,
            flags: 1,
        };
        let mismatch = compare(&NAT, &pinned, &[]).expect("every field differs");
        assert_eq!(mismatch.fields, Field::ALL);
        assert_eq!(
            mismatch.to_string(),
            "type Hash pinned, LruHash expected, key size 12 pinned, 16 expected, \
             value size 32 pinned, 16 expected, max entries 1 pinned, 262144 expected, \
             flags 0x1 pinned, 0x0 expected"
        );
    }

    #[test]
    fn ignored_fields_are_left_out() {
        let resized = with(NAT, |s| s.max_entries = 1024);
        assert_eq!(compare(&NAT, &resized, &[Field::MaxEntries]), None);
        let grown = with(resized, |s| s.value_size = 32);
        let mismatch = compare(&NAT, &grown, &[Field::MaxEntries]).expect("value size");
        assert_eq!(mismatch.fields, [Field::ValueSize]);
    }

    #[test]
    fn nothing_pinned_is_created() {
        assert_eq!(plan(MAP_NAT, &NAT, None, 7, 3), Ok(Plan::Create));
    }

    #[test]
    fn a_compatible_nat_table_is_adopted_whatever_its_capacity() {
        assert_eq!(plan(MAP_NAT, &NAT, Some(&NAT), 3, 3), Ok(Plan::Adopt));
        let resized = with(NAT, |s| s.max_entries = 4096);
        assert_eq!(plan(MAP_NAT, &NAT, Some(&resized), 3, 3), Ok(Plan::Adopt));
    }

    #[test]
    fn an_incompatible_nat_table_is_refused() {
        for pinned in [
            with(NAT, |s| s.value_size = 32),
            with(NAT, |s| s.key_size = 12),
            with(NAT, |s| s.map_type = MapType::Hash),
            with(NAT, |s| s.flags = 2),
        ] {
            let refusal = plan(MAP_NAT, &NAT, Some(&pinned), 3, 3).expect_err("refused");
            assert!(
                matches!(&refusal, Refusal::Layout(m) if m.pinned == pinned && m.expected == NAT),
                "{refusal:?}"
            );
        }
    }

    #[test]
    fn a_nat_table_of_an_abi_this_build_does_not_know_is_refused() {
        for (pinned, expected) in [(4, 3), (0, 3), (3, 2)] {
            assert_eq!(
                plan(MAP_NAT, &NAT, Some(&NAT), pinned, expected),
                Err(Refusal::Abi { pinned, expected })
            );
        }
    }

    /// ABI 2 changed only `stats`: the flow tables of ABI 1 have ABI 2's layout.
    #[test]
    fn the_flow_tables_of_abi_1_are_adopted_by_abi_2() {
        let timestamped = with(NAT, |s| s.value_size = 24);
        for name in [MAP_NAT, MAP_INBOUND] {
            assert_eq!(
                plan(name, &timestamped, Some(&timestamped), 1, 2),
                Ok(Plan::Adopt),
                "{name}"
            );
        }
        assert_eq!(
            plan(MAP_STATS, &STATS, Some(&STATS), 1, 2),
            Ok(Plan::Replace { copy: false }),
            "the counters, whose indices changed meaning, start over"
        );
    }

    /// ABI 3 dropped the entries' creation time: the tables of ABIs 1 and 2 are
    /// converted, whatever their capacity, and only when they have those ABIs' layout.
    #[test]
    fn the_flow_tables_of_abis_1_and_2_are_converted_by_abi_3() {
        let timestamped = with(NAT, |s| s.value_size = 24);
        let resized = with(timestamped, |s| s.max_entries = 4096);
        for name in [MAP_NAT, MAP_INBOUND] {
            for abi in [1, 2] {
                for pinned in [timestamped, resized] {
                    assert_eq!(
                        plan(name, &NAT, Some(&pinned), abi, 3),
                        Ok(Plan::Convert {
                            from: FlowLayout::Timestamped
                        }),
                        "{name} of ABI {abi}"
                    );
                }
            }
        }
        // Pinned as ABI 2 but with this build's layout (or any other): not what ABI 2
        // left, so nothing is read from it.
        for pinned in [NAT, with(timestamped, |s| s.key_size = 12)] {
            let refusal = plan(MAP_NAT, &NAT, Some(&pinned), 2, 3).expect_err("refused");
            assert!(
                matches!(&refusal, Refusal::Layout(m) if m.pinned == pinned),
                "{refusal:?}"
            );
        }
    }

    #[test]
    fn a_rebuilt_map_of_another_capacity_is_replaced_with_its_entries() {
        let fewer_reasons = with(STATS, |s| s.max_entries = 20);
        assert_eq!(
            plan(MAP_STATS, &STATS, Some(&fewer_reasons), 1, 1),
            Ok(Plan::Replace { copy: true })
        );
    }

    #[test]
    fn a_rebuilt_map_of_another_layout_is_replaced_empty() {
        let vnics = MapSpec {
            map_type: MapType::Hash,
            key_size: 4,
            value_size: 32,
            max_entries: 64,
            flags: 0,
        };
        for pinned in [
            with(vnics, |s| s.value_size = 28),
            with(vnics, |s| s.map_type = MapType::LruHash),
        ] {
            assert_eq!(
                plan(MAP_VNICS, &vnics, Some(&pinned), 1, 1),
                Ok(Plan::Replace { copy: false })
            );
        }
        assert_eq!(plan(MAP_VNICS, &vnics, Some(&vnics), 1, 1), Ok(Plan::Adopt));
    }

    #[test]
    fn another_abi_replaces_rebuilt_maps_without_copying() {
        let config = MapSpec {
            map_type: MapType::Array,
            key_size: 4,
            value_size: 16,
            max_entries: 1,
            flags: 0,
        };
        assert_eq!(
            plan(MAP_CONFIG, &config, Some(&config), 0, 1),
            Ok(Plan::Replace { copy: false })
        );
    }
}
