//! IPAM configuration: the pool's targets plus what the service needs around them.
use std::path::PathBuf;
use std::time::Duration;

use super::pool::PoolConfig;

/// Freeform tag key put on every VNIC and private IP IPAM creates; the value is the node's
/// instance OCID. The sweep only ever deletes what carries this tag with this node's OCID.
pub const NODE_TAG: &str = "vcnpath-node";

#[derive(Debug, Clone)]
pub struct IpamConfig {
    pub pool: PoolConfig,
    /// The node's instance OCID, the value of [`NODE_TAG`].
    pub instance_id: String,
    /// Where allocations are checkpointed (default `/run/vcnpath/ipam.json`).
    pub checkpoint_path: PathBuf,
    /// MTU handed to pods (default 9000, OCI's VCN MTU).
    pub mtu: u32,
    /// Hand out addresses only from VNICs whose interface host setup has reported through
    /// [`super::Ipam::set_interface`] (default true; tests without a host set it false).
    pub require_interface: bool,
    /// OCI calls the background grower makes at once (default 4); the OCI client's rate
    /// limiter spaces them further.
    pub parallel_calls: usize,
    /// How often the pool is re-planned when nothing wakes it (default 1 s).
    pub tick: Duration,
    /// How often the pool is compared with OCI (default 5 min).
    pub reconcile_interval: Duration,
    /// The wait suggested to the CNI when the pool is empty (default 1 s).
    pub retry_after: Duration,
    /// How long an ADD for a new pod waits for the first reconcile with OCI after a start
    /// before it is asked to retry (default 5 s, below the CNI plugin's timeout).
    pub startup_wait: Duration,
    /// How long after a DEL an ADD for the same attachment is refused (default 10 s): a DEL
    /// that raced ahead of a slow ADD must not be followed by an allocation nobody frees.
    pub tombstone_grace: Duration,
    /// How long the grower leaves an operation alone after OCI denied it (IAM, a wrong
    /// compartment or OCID, a tenancy quota): retrying sooner only adds calls (default 5 min).
    pub denied_backoff: Duration,
    /// The longest wait between retries of an operation that keeps failing for a transient
    /// reason; the wait doubles from `tick` with jitter (default 60 s).
    pub error_backoff_max: Duration,
    /// How long an allocation's host side (its `vcn…` veth) may be missing before the
    /// allocation GC releases it (default 5 min): a DEL that never came must not hold an
    /// address until reboot, and an ADD still creating the veth must never lose it.
    pub allocation_gc_grace: Duration,
    /// An agent ran on this node earlier in this boot (the state lock says so). Then a
    /// missing checkpoint was lost, and with it the record of which addresses are cooling
    /// down: every free address the first reconcile finds rests a whole cooldown before a
    /// new pod gets it. After a reboot no pod from before runs, so none needs to.
    pub earlier_agent_this_boot: bool,
    /// The first reconcile waits a random time up to this long (default 0; the agent's
    /// `oci.start_jitter_ms`), so nodes started together spread their first calls.
    pub start_jitter: Duration,
}

impl IpamConfig {
    pub fn new(instance_id: impl Into<String>, pool: PoolConfig) -> Self {
        Self {
            pool,
            instance_id: instance_id.into(),
            checkpoint_path: PathBuf::from("/run/vcnpath/ipam.json"),
            mtu: 9000,
            require_interface: true,
            parallel_calls: 4,
            tick: Duration::from_secs(1),
            reconcile_interval: Duration::from_mins(5),
            retry_after: Duration::from_secs(1),
            startup_wait: Duration::from_secs(5),
            tombstone_grace: Duration::from_secs(10),
            denied_backoff: Duration::from_mins(5),
            error_backoff_max: Duration::from_mins(1),
            allocation_gc_grace: Duration::from_mins(5),
            earlier_agent_this_boot: false,
            start_jitter: Duration::ZERO,
        }
    }
}
