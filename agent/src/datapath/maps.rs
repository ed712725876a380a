//! Typed handles on the nine maps, opened from a fresh load or from their pins.

use std::path::Path;

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray};
use vcnpath_common::{
    CidrValue, Config, DATAPATH_ABI, Endpoint, EndpointKey, FragEntry, FragKey, MAP_CONFIG,
    MAP_ENDPOINTS, MAP_FRAGS, MAP_INBOUND, MAP_NAT, MAP_NONMASQ_CIDRS, MAP_STATS, MAP_VCN_CIDRS,
    MAP_VNICS, NatEntry, NatKey, Vnic,
};

use super::DatapathError;

/// The datapath's maps. Only the datapath task writes them.
pub struct DatapathMaps {
    pub(super) vnics: HashMap<MapData, u32, Vnic>,
    pub(super) endpoints: HashMap<MapData, EndpointKey, Endpoint>,
    pub(super) vcn_cidrs: LpmTrie<MapData, [u8; 4], CidrValue>,
    pub(super) nonmasq_cidrs: LpmTrie<MapData, [u8; 4], CidrValue>,
    pub(super) config: Array<MapData, Config>,
    pub(super) nat: HashMap<MapData, NatKey, NatEntry>,
    /// Records of flows opened from outside (rule 4): the programs write them, the
    /// collector expires them.
    pub(super) inbound: HashMap<MapData, NatKey, NatEntry>,
    pub(super) stats: PerCpuArray<MapData, u64>,
    /// Only the programs write it; the agent holds it to put its pin back.
    pub(super) frags: HashMap<MapData, FragKey, FragEntry>,
}

/// The two flow tables, which in production only the programs write and the collector
/// expires: for tests and benchmarks that plant flows or look at what the programs recorded
/// ([`DatapathMaps::flow_tables`]).
pub struct FlowTables<'a> {
    pub nat: &'a mut HashMap<MapData, NatKey, NatEntry>,
    pub inbound: &'a mut HashMap<MapData, NatKey, NatEntry>,
}

impl DatapathMaps {
    /// Every flow record, the NAT table's then the inbound table's, as the programs wrote
    /// them (`vcnpath nat`).
    pub fn flows(&self) -> impl Iterator<Item = Result<(NatKey, NatEntry), MapError>> + '_ {
        self.nat.iter().chain(self.inbound.iter())
    }

    /// The flow tables themselves, to plant or inspect records directly: a test handle, the
    /// agent goes through [`Self::sync`] and the collector.
    pub fn flow_tables(&mut self) -> FlowTables<'_> {
        FlowTables {
            nat: &mut self.nat,
            inbound: &mut self.inbound,
        }
    }

    /// Takes the maps out of a freshly loaded object.
    pub(crate) fn take(ebpf: &mut aya::Ebpf) -> Result<Self, DatapathError> {
        Self::build(|name| {
            ebpf.take_map(name)
                .ok_or(DatapathError::MissingMap { map: name })
        })
    }

    /// Opens the maps pinned in `pin_dir` (read-only users such as `vcnpath counters`).
    /// Pins of another datapath ABI are refused: their sizes may match while their
    /// meaning (a field, a reason's index) does not. Sizes are checked by the typed maps,
    /// which opened from a pin take them from the kernel.
    pub fn from_pins(pin_dir: &Path) -> Result<Self, DatapathError> {
        let pinned = super::pins::read_abi(pin_dir)?;
        if pinned != DATAPATH_ABI {
            return Err(DatapathError::ForeignAbi {
                pin_dir: pin_dir.to_owned(),
                pinned,
                expected: DATAPATH_ABI,
            });
        }
        Self::build(|name| {
            let path = pin_dir.join(name);
            let data = MapData::from_pin(&path).map_err(DatapathError::map(name))?;
            Map::from_map_data(data).map_err(DatapathError::map(name))
        })
    }

    fn build(
        mut open: impl FnMut(&'static str) -> Result<Map, DatapathError>,
    ) -> Result<Self, DatapathError> {
        macro_rules! typed {
            ($name:expr) => {
                open($name)?.try_into().map_err(DatapathError::map($name))?
            };
        }
        Ok(Self {
            vnics: typed!(MAP_VNICS),
            endpoints: typed!(MAP_ENDPOINTS),
            vcn_cidrs: typed!(MAP_VCN_CIDRS),
            nonmasq_cidrs: typed!(MAP_NONMASQ_CIDRS),
            config: typed!(MAP_CONFIG),
            nat: typed!(MAP_NAT),
            inbound: typed!(MAP_INBOUND),
            stats: typed!(MAP_STATS),
            frags: typed!(MAP_FRAGS),
        })
    }
}
