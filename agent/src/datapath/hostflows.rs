//! The host's flows from before the datapath: connections `nf_nat` translated to the
//! masquerade address on ports of the NAT range (a Docker container's, kube-proxy's
//! MASQUERADE) before vcnpath's programs were attached. The egress program records such a
//! flow when the host sends on it (`hostflow` in the programs); until then a segment from
//! the remote end would meet no record in the range and be dropped, and a connection
//! whose remote speaks first would stall. The agent reads them from the kernel's
//! connection tracking table at start and records them here as the program would.

use std::net::Ipv4Addr;

use aya::maps::MapError;
use vcnpath_common::{
    MAP_NAT, NAT_DIR_INGRESS, NAT_F_HOST, NatEntry, NatKey, TCP_SEEN_ACK, TCP_SEEN_POD_SHIFT,
    TCP_SEEN_SYN,
};

use super::{DatapathError, DatapathMaps, collect::monotonic_now_ns};

/// `BPF_NOEXIST`: a flow the programs recorded meanwhile is theirs.
const BPF_NOEXIST: u64 = 1;
const IPPROTO_TCP: u8 = 6;

/// A flow of the host towards the masquerade address, by its reply tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostFlow {
    /// IP protocol (TCP, UDP or ICMP).
    pub proto: u8,
    pub remote: Ipv4Addr,
    /// The remote's port (0 for ICMP echo).
    pub remote_port: u16,
    /// The masquerade address's port (the echo identifier for ICMP).
    pub local_port: u16,
    /// For TCP: both ends have sent a segment without SYN, so the flow is collected after
    /// the established timeout, not the opening one.
    pub established: bool,
}

impl DatapathMaps {
    /// Records `flows` (towards `masq`) as host flows, leaving any flow the table already
    /// has as it is. Returns how many it recorded.
    pub fn claim_host_flows(
        &mut self,
        masq: Ipv4Addr,
        flows: &[HostFlow],
    ) -> Result<usize, DatapathError> {
        let now = monotonic_now_ns();
        let mut recorded = 0;
        for flow in flows {
            let key = NatKey {
                src: flow.remote.octets(),
                dst: masq.octets(),
                sport: flow.remote_port,
                dport: flow.local_port,
                proto: flow.proto,
                dir: NAT_DIR_INGRESS,
                pad: [0; 2],
            };
            // The remote's flags as they are, the host's shifted (`claim_for_host`).
            let tcp_seen = match (flow.proto, flow.established) {
                (IPPROTO_TCP, true) => TCP_SEEN_ACK | (TCP_SEEN_ACK << TCP_SEEN_POD_SHIFT),
                (IPPROTO_TCP, false) => TCP_SEEN_SYN << TCP_SEEN_POD_SHIFT,
                _ => 0,
            };
            let entry = NatEntry {
                last_seen_ns: now,
                addr: masq.octets(),
                port: flow.local_port,
                flags: NAT_F_HOST,
                tcp_seen,
            };
            match self.nat.insert(key, entry, BPF_NOEXIST) {
                Ok(()) => recorded += 1,
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(DatapathError::map(MAP_NAT)(e)),
            }
        }
        Ok(recorded)
    }
}
