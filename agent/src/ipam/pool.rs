//! The in-memory pool: the node's VNICs and their secondary IPs, and the pure policy that
//! decides what to create, attach, release and detach. No I/O here: the service executes the
//! [`Plan`] and feeds the results back.
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;
use tokio::time::Instant;

use super::types::PodRef;

/// Targets and limits of the pool. The defaults suit a 110-pod node: 110 pods need four
/// secondary VNICs of 31 IPs (124 addresses); eight warm IPs absorb a burst of pod starts without
/// waiting for OCI (a `CreatePrivateIp` takes ~1 s, an `AttachVnic` 10–30 s).
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Free addresses kept ready for new pods (default 8).
    pub warm_ips: usize,
    /// Addresses (free + assigned) held even when few pods run (default 0).
    pub min_ips: usize,
    /// Attached VNICs without any pod kept ready, because attaching is slow (default 0).
    pub warm_vnics: usize,
    /// Secondary private-IP objects one VNIC may hold, a block counting as one (default 31;
    /// a 400 `LimitExceeded` also marks a VNIC full).
    pub ips_per_vnic: usize,
    /// The blocks the grower creates (`ipam.mode = "cidr"` or `"auto"`): their prefix length;
    /// `None` creates single addresses (`"ip"`).
    pub block_prefix: Option<u8>,
    /// Single addresses on a VNIC whose subnet gave no block (`"auto"`): never stuck because
    /// a subnet is fragmented.
    pub single_fallback: bool,
    /// Addresses one VNIC may hold when the grower creates blocks (default 256).
    pub block_addresses_per_vnic: usize,
    /// The shape's VNIC limit, primary included (IMDS `shapeConfig.maxVnicAttachments`).
    pub max_vnics: usize,
    /// Whether pods get addresses on the primary VNIC too (default false: it stays the node's).
    pub use_primary_vnic: bool,
    /// Subnets for new VNICs, in order of preference; the next is used when one is exhausted.
    pub subnets: Vec<String>,
    /// How long an address beyond the targets stays free before it is deleted (default 5 min).
    pub release_delay: Duration,
    /// How long a freed address rests before reuse, so stale flows and ARP entries of the old
    /// pod cannot reach the new one (default 30 s).
    pub cooldown: Duration,
    /// How long an exhausted subnet is skipped before it is tried again (default 10 min).
    pub subnet_retry: Duration,
    /// Active physical NICs new VNICs are spread over (`nicIndex` 0..n): 1 on a VM (the
    /// attachment names none), 2 on a bare-metal shape with two active NICs.
    pub physical_nics: u32,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            warm_ips: 8,
            min_ips: 0,
            warm_vnics: 0,
            ips_per_vnic: 31,
            block_prefix: None,
            single_fallback: false,
            block_addresses_per_vnic: 256,
            max_vnics: 2,
            use_primary_vnic: false,
            subnets: Vec::new(),
            release_delay: Duration::from_mins(5),
            cooldown: Duration::from_secs(30),
            subnet_retry: Duration::from_mins(10),
            physical_nics: 1,
        }
    }
}

impl PoolConfig {
    /// Addresses this node can hand out at most.
    pub fn capacity(&self) -> usize {
        max_pods(
            self.max_vnics,
            self.addresses_per_vnic(),
            self.use_primary_vnic,
        )
    }

    /// Addresses one VNIC may hold: one per object, or as many blocks as fit the objects and
    /// the address budget.
    pub fn addresses_per_vnic(&self) -> usize {
        match self.block_prefix {
            None => self.ips_per_vnic,
            Some(prefix) => self
                .ips_per_vnic
                .saturating_mul(block_size(prefix))
                .min(self.block_addresses_per_vnic),
        }
    }
}

/// Addresses in a block of prefix length `prefix`.
pub fn block_size(prefix: u8) -> usize {
    1usize << (32 - u32::from(prefix.min(32)))
}

/// `vcnpath max-pods`: (VNIC limit − the primary unless it serves pods) × IPs per VNIC.
pub fn max_pods(max_vnics: usize, ips_per_vnic: usize, use_primary_vnic: bool) -> usize {
    let vnics = if use_primary_vnic {
        max_vnics
    } else {
        max_vnics.saturating_sub(1)
    };
    vnics.saturating_mul(ips_per_vnic)
}

/// `now + after`, or a far future where that does not fit in an [`Instant`]: a duration from
/// the configuration never panics a handler.
pub fn later(now: Instant, after: Duration) -> Instant {
    now.checked_add(after)
        .or_else(|| now.checked_add(FAR_FUTURE))
        .unwrap_or(now)
}

/// Thirty years: "never" for a cooldown or a retry, and still an `Instant` on every platform.
const FAR_FUTURE: Duration = Duration::from_hours(30 * 365 * 24);

/// Whether `since + delay` has passed at `now`, without adding to an `Instant`.
fn elapsed(since: Instant, delay: Duration, now: Instant) -> bool {
    now.saturating_duration_since(since) >= delay
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotState {
    Free {
        since: Instant,
    },
    Assigned(PodRef),
    /// Resting until `until`; `released_at` (wall clock) is checkpointed, so the rest
    /// outlives a restart.
    Cooldown {
        until: Instant,
        released_at: std::time::SystemTime,
    },
}

/// One secondary address and the OCID of the private-IP object that gives it to the VNIC:
/// the address itself, or a block all of whose addresses share that OCID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub ocid: String,
    pub state: SlotState,
    /// The IP CIDR block the address belongs to (`None`: a single private IP).
    pub block: Option<Ipv4Net>,
}

impl Slot {
    /// A single private IP's slot.
    pub fn single(ocid: String, state: SlotState) -> Self {
        Self {
            ocid,
            state,
            block: None,
        }
    }
}

/// What the pool knows of a VNIC (checkpointed, so a restart knows it before OCI answers).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VnicInfo {
    pub id: String,
    pub attachment_id: String,
    /// The physical NIC (0 for every VNIC of a VM); not an identity, not an order.
    pub nic_index: u32,
    /// The attachment's VLAN tag: on bare metal, what carries a secondary VNIC on its
    /// physical NIC (0 until the reconcile has read it; checkpoints before it was recorded).
    #[serde(default)]
    pub vlan_tag: u32,
    /// The attachment's `timeCreated` (RFC 3339 as OCI sends it): the pool uses VNICs in
    /// the order they were attached. Empty in checkpoints written before it was recorded
    /// (such VNICs sort first, by attachment id, until the reconcile refreshes them).
    #[serde(default)]
    pub attached_at: String,
    pub mac: String,
    /// The interface in the node namespace, once host setup has found it by MAC (host
    /// state: not checkpointed).
    #[serde(skip)]
    pub interface: Option<String>,
    pub subnet_id: String,
    pub subnet: Ipv4Net,
    pub router_ip: Ipv4Addr,
    pub primary_ip: Ipv4Addr,
    pub is_primary: bool,
}

#[derive(Debug, Clone)]
pub struct PoolVnic {
    pub info: VnicInfo,
    /// OCI refused another IP (LimitExceeded): stop asking until the VNIC shrinks.
    pub full: bool,
    /// The host lost its interface or OCI answered 404 for it: nothing is handed out from
    /// it or created on it until the reconcile has looked (it clears this if OCI still has
    /// the VNIC attached).
    pub suspect: bool,
    /// The host had this VNIC's interface and lost it (deleted by hand, a driver reset). OCI
    /// may still list the VNIC attached, so the reconcile does not clear this; only host
    /// setup finding the interface again does. Until then its free and cooling addresses
    /// serve nobody and count for nothing, so the pool grows past it.
    pub interface_lost: bool,
    /// OCI refused a block on this VNIC (a fragmented subnet, or a block not allowed)
    /// until then: with [`PoolConfig::single_fallback`] it grows by single addresses meanwhile.
    pub no_blocks_until: Option<Instant>,
    pub ips: BTreeMap<Ipv4Addr, Slot>,
}

impl PoolVnic {
    /// Nothing can be handed out from (or created on) this VNIC now.
    fn unusable(&self) -> bool {
        self.suspect || self.interface_lost
    }

    pub fn count(&self, f: impl Fn(&SlotState) -> bool) -> usize {
        self.ips.values().filter(|s| f(&s.state)).count()
    }

    /// Private-IP objects OCI counts on this VNIC: a block once, whatever its size.
    pub fn objects(&self) -> usize {
        self.ips
            .values()
            .map(|s| s.ocid.as_str())
            .collect::<BTreeSet<_>>()
            .len()
    }

    /// The IP CIDR blocks this VNIC holds, in address order.
    pub fn blocks(&self) -> Vec<Ipv4Net> {
        let blocks: BTreeSet<Ipv4Net> = self.ips.values().filter_map(|s| s.block).collect();
        blocks.into_iter().collect()
    }

    /// What the grower creates next on this VNIC, if anything may be.
    fn next_create(&self, cfg: &PoolConfig, now: Instant) -> Option<Grow> {
        let Some(prefix) = cfg.block_prefix else {
            return Some(Grow::Single);
        };
        let refused = self.no_blocks_until.is_some_and(|until| until > now);
        match (refused, cfg.single_fallback) {
            (false, _) => Some(Grow::Block(prefix)),
            (true, true) => Some(Grow::Single),
            (true, false) => None,
        }
    }
    /// The objects that may be deleted, as (first address, OCID, addresses): each all of
    /// whose addresses are here and free past the release delay. A block with an address
    /// missing from the pool (a pod's, quarantined or elsewhere) stays.
    fn releasable(&self, cfg: &PoolConfig, now: Instant) -> Vec<(Ipv4Addr, String, usize)> {
        let idle = |s: &Slot| matches!(s.state, SlotState::Free { since } if elapsed(since, cfg.release_delay, now));
        // OCID → (first address, block, addresses here, all idle).
        let mut objects: BTreeMap<&str, (Ipv4Addr, Option<Ipv4Net>, usize, bool)> = BTreeMap::new();
        for (ip, slot) in &self.ips {
            let entry = objects
                .entry(slot.ocid.as_str())
                .or_insert((*ip, slot.block, 0, true));
            entry.2 += 1;
            entry.3 &= idle(slot) && entry.1 == slot.block;
        }
        let mut found: Vec<_> = objects
            .into_iter()
            .filter(|(_, (_, block, n, all_idle))| {
                *all_idle && *n == block.map_or(1, |b| block_size(b.prefix_len()))
            })
            .map(|(ocid, (ip, _, n, _))| (ip, ocid.to_owned(), n))
            .collect();
        // Single addresses first, then blocks, each in address order.
        found.sort_by_key(|(ip, _, n)| (*n, *ip));
        found
    }

    /// No pod holds or recently held an address here. `pods_on` (the VNICs named by the
    /// allocations) is the truth: a slot the reconcile dropped (a stripped tag, a stale list)
    /// must not make a VNIC with a pod look empty.
    fn is_empty_of_pods(&self, pods_on: &BTreeSet<String>) -> bool {
        !pods_on.contains(&self.info.id)
            && self.count(|s| !matches!(s, SlotState::Free { .. })) == 0
    }
}

/// What a VNIC grows by.
#[derive(Debug, Clone, Copy)]
enum Grow {
    Single,
    Block(u8),
}

impl Grow {
    fn block(self) -> Option<u8> {
        match self {
            Grow::Single => None,
            Grow::Block(prefix) => Some(prefix),
        }
    }
}

/// One private-IP object to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Create {
    pub vnic: String,
    /// A block of this prefix length, or a single address.
    pub block: Option<u8>,
}

/// What the service should do next.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// One entry per object to create.
    pub create: Vec<Create>,
    /// One entry per VNIC to attach, naming the subnet.
    pub attach: Vec<String>,
    /// (VNIC, address, OCID) of objects to delete: a free single address, or a block (its
    /// first address) none of whose addresses is assigned or cooling.
    pub release: Vec<(String, Ipv4Addr, String)>,
    /// (VNIC, attachment) of empty VNICs to detach.
    pub detach: Vec<(String, String)>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.create.is_empty()
            && self.attach.is_empty()
            && self.release.is_empty()
            && self.detach.is_empty()
    }
}

/// Counts over the VNICs that serve pods.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub free: usize,
    pub assigned: usize,
    pub cooldown: usize,
}

#[derive(Debug, Default)]
pub struct Pool {
    /// VNICs serving pods, in attach order (see [`Pool::sort`]).
    vnics: Vec<PoolVnic>,
    /// The physical NIC (`nicIndex`) of each attachment of the instance the pool does not use
    /// (the primary VNIC unless it serves pods, VNICs not tagged for this node, attachments in
    /// flux): they count against the shape's limit, and on bare metal against their NIC.
    pub other_attachments: Vec<u32>,
    /// Subnet → until when it is skipped.
    exhausted: BTreeMap<String, Instant>,
    /// Pods refused for want of a free address since the last plan: with a warm target of 0
    /// this is what makes the pool grow on demand. A set, so a pod retrying counts once.
    pub waiting: BTreeSet<(String, String)>,
    /// Subnets for new VNICs learned after the start (from OCI), in place of
    /// [`PoolConfig::subnets`].
    pub subnets: Option<Vec<String>>,
    /// Addresses still cooling down whose VNIC left the pool (detached behind the agent's
    /// back), with that VNIC: OCI may hand such an address to another VNIC of the node, and
    /// it must rest out its cooldown there too.
    cooling_elsewhere: BTreeMap<Ipv4Addr, (String, Slot)>,
}

impl Pool {
    pub fn vnics(&self) -> &[PoolVnic] {
        &self.vnics
    }

    pub fn vnic(&self, id: &str) -> Option<&PoolVnic> {
        self.vnics.iter().find(|v| v.info.id == id)
    }

    pub fn vnic_mut(&mut self, id: &str) -> Option<&mut PoolVnic> {
        self.vnics.iter_mut().find(|v| v.info.id == id)
    }

    /// Adds a VNIC (or refreshes what is known of it, keeping its addresses).
    pub fn upsert_vnic(&mut self, info: VnicInfo) {
        if let Some(v) = self.vnic_mut(&info.id) {
            let interface = v.info.interface.take();
            v.info = info;
            v.info.interface = v.info.interface.take().or(interface);
        } else {
            self.vnics.push(PoolVnic {
                info,
                full: false,
                suspect: false,
                interface_lost: false,
                no_blocks_until: None,
                ips: BTreeMap::new(),
            });
        }
        self.sort();
    }

    /// The primary VNIC first, then in the order the VNICs were attached (`timeCreated`,
    /// then the attachment id for equal times). RFC 3339 times from OCI share one format,
    /// so they compare as text. Never by `nicIndex`, which is 0 for every VNIC of a VM.
    fn sort(&mut self) {
        self.vnics.sort_by(|a, b| {
            let key = |v: &PoolVnic| {
                (
                    !v.info.is_primary,
                    v.info.attached_at.clone(),
                    v.info.attachment_id.clone(),
                )
            };
            key(a).cmp(&key(b))
        });
    }

    /// Forgets a VNIC, returning it (with whatever its addresses held). Its addresses in
    /// cooldown are remembered until their rest ends, wherever they turn up again.
    pub fn remove_vnic(&mut self, id: &str) -> Option<PoolVnic> {
        let i = self.vnics.iter().position(|v| v.info.id == id)?;
        let v = self.vnics.remove(i);
        for (ip, slot) in &v.ips {
            if matches!(slot.state, SlotState::Cooldown { .. }) {
                self.keep_cooling(id, *ip, slot.clone());
            }
        }
        Some(v)
    }

    /// Remembers an address in cooldown that is on no VNIC of the pool.
    pub fn keep_cooling(&mut self, vnic_id: &str, ip: Ipv4Addr, slot: Slot) {
        self.cooling_elsewhere
            .insert(ip, (vnic_id.to_owned(), slot));
    }

    /// The rest of an address that cooled on a VNIC the pool no longer has: it continues on
    /// whichever VNIC the address turns up (and is forgotten here).
    pub fn take_cooling(&mut self, ip: Ipv4Addr) -> Option<SlotState> {
        self.cooling_elsewhere
            .remove(&ip)
            .map(|(_, slot)| slot.state)
    }

    /// Addresses cooling on no VNIC of the pool: (address, their last VNIC, slot).
    pub fn cooling_elsewhere(&self) -> impl Iterator<Item = (Ipv4Addr, &str, &Slot)> {
        self.cooling_elsewhere
            .iter()
            .map(|(ip, (vnic, slot))| (*ip, vnic.as_str(), slot))
    }

    /// Stops handing out (and creating) addresses of a VNIC the host or OCI says is gone,
    /// until the reconcile has looked. Returns whether the pool has the VNIC.
    pub fn mark_suspect(&mut self, id: &str) -> bool {
        match self.vnic_mut(id) {
            Some(v) => {
                v.suspect = true;
                true
            }
            None => false,
        }
    }

    pub fn set_interface(&mut self, mac: &str, interface: &str) -> bool {
        let Some(v) = self
            .vnics
            .iter_mut()
            .find(|v| v.info.mac.eq_ignore_ascii_case(mac))
        else {
            return false;
        };
        v.info.interface = Some(interface.to_owned());
        v.interface_lost = false;
        true
    }

    /// The VNIC and slot of an address (unique in a VCN, so on one VNIC at most).
    pub fn find(&self, ip: Ipv4Addr) -> Option<(&PoolVnic, &Slot)> {
        self.vnics
            .iter()
            .find_map(|v| v.ips.get(&ip).map(|slot| (v, slot)))
    }

    pub fn add_slot(&mut self, vnic_id: &str, ip: Ipv4Addr, slot: Slot) -> bool {
        match self.vnic_mut(vnic_id) {
            Some(v) => {
                v.ips.insert(ip, slot);
                true
            }
            None => false,
        }
    }

    pub fn mark_full(&mut self, vnic_id: &str) {
        if let Some(v) = self.vnic_mut(vnic_id) {
            v.full = true;
        }
    }

    pub fn mark_subnet_exhausted(&mut self, subnet_id: &str, until: Instant) {
        self.exhausted.insert(subnet_id.to_owned(), until);
    }

    /// What the pool can serve: a suspect VNIC's free and cooling addresses serve nobody
    /// until the reconcile clears it, nor do those of a VNIC whose interface was lost until
    /// the host finds it again, so of such a VNIC only its pods count.
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for v in &self.vnics {
            for slot in v.ips.values() {
                match slot.state {
                    SlotState::Assigned(_) => c.assigned += 1,
                    _ if v.unusable() => {}
                    SlotState::Free { .. } => c.free += 1,
                    SlotState::Cooldown { .. } => c.cooldown += 1,
                }
            }
        }
        c
    }

    /// Ends expired cooldowns and subnet exclusions.
    pub fn tick(&mut self, now: Instant) {
        for slot in self.vnics.iter_mut().flat_map(|v| v.ips.values_mut()) {
            if let SlotState::Cooldown { until, .. } = slot.state
                && until <= now
            {
                slot.state = SlotState::Free { since: now };
            }
        }
        self.cooling_elsewhere.retain(
            |_, (_, slot)| !matches!(slot.state, SlotState::Cooldown { until, .. } if until <= now),
        );
        self.exhausted.retain(|_, until| *until > now);
    }

    /// A free address, packing pods onto the lowest VNICs so the highest empty out and can be
    /// detached. With `need_interface`, VNICs whose interface is not yet set up are skipped.
    pub fn pick_free(&self, need_interface: bool) -> Option<(&PoolVnic, Ipv4Addr)> {
        self.vnics
            .iter()
            .filter(|v| !v.unusable() && (!need_interface || v.info.interface.is_some()))
            .find_map(|v| {
                v.ips
                    .iter()
                    .find(|(_, s)| matches!(s.state, SlotState::Free { .. }))
                    .map(|(ip, _)| (v, *ip))
            })
    }

    pub fn set_state(&mut self, vnic_id: &str, ip: Ipv4Addr, state: SlotState) -> bool {
        match self.vnic_mut(vnic_id).and_then(|v| v.ips.get_mut(&ip)) {
            Some(slot) => {
                slot.state = state;
                true
            }
            None => false,
        }
    }

    /// The pool cannot serve another pod, now or after growing.
    pub fn is_exhausted(&self, cfg: &PoolConfig, now: Instant) -> bool {
        let c = self.counts();
        if c.free > 0 {
            return false;
        }
        if c.assigned >= cfg.capacity() {
            return true;
        }
        if c.cooldown > 0 {
            return false; // an address comes back when its cooldown ends
        }
        if self.vnics.iter().any(PoolVnic::unusable) {
            // Suspect (OCI answered 404, which IAM denials also answer) or its interface
            // lost: it may serve again, so the node is not full; the pod is told what holds
            // the pool back instead.
            return false;
        }
        if self.subnets.is_none() && cfg.subnets.is_empty() {
            return false; // the subnets for new VNICs are not known yet (OCI has not named them)
        }
        let room_on_vnics = self.vnics.iter().any(|v| {
            !v.full
                && !v.unusable()
                && v.ips.len() < cfg.addresses_per_vnic()
                && v.objects() < cfg.ips_per_vnic
                && v.next_create(cfg, now).is_some()
        });
        !room_on_vnics && self.can_attach(cfg, now) == 0
    }

    fn usable_subnet<'a>(&'a self, cfg: &'a PoolConfig, now: Instant) -> Option<&'a String> {
        self.subnets
            .as_ref()
            .unwrap_or(&cfg.subnets)
            .iter()
            .find(|s| self.exhausted.get(*s).is_none_or(|until| *until <= now))
    }

    /// How many VNICs may still be attached.
    fn can_attach(&self, cfg: &PoolConfig, now: Instant) -> usize {
        if self.usable_subnet(cfg, now).is_none() {
            return 0;
        }
        cfg.max_vnics
            .saturating_sub(self.vnics.len() + self.other_attachments.len())
    }

    /// Decides the next step towards the targets. Growth and shrinking never mix in one plan.
    /// `pods_on` names the VNICs that hold an allocation: those are never detached.
    pub fn plan(&self, cfg: &PoolConfig, now: Instant, pods_on: &BTreeSet<String>) -> Plan {
        let c = self.counts();
        // The pods waiting for an address are about to be assigned: the warm addresses are
        // what must still be free after them, so a burst of pod starts is met in one step.
        let target = c
            .assigned
            .saturating_add(self.waiting.len())
            .saturating_add(cfg.warm_ips)
            .max(cfg.min_ips)
            .min(cfg.capacity());
        // Addresses in cooldown cannot serve a pod now, so they do not count towards the target.
        let mut need = target.saturating_sub(c.assigned.saturating_add(c.free));
        let mut plan = Plan::default();
        for v in &self.vnics {
            if need == 0 {
                break;
            }
            if v.full || v.unusable() {
                continue;
            }
            let Some(block) = v.next_create(cfg, now).map(Grow::block) else {
                continue;
            };
            let size = block.map_or(1, block_size);
            let mut room = cfg.addresses_per_vnic().saturating_sub(v.ips.len());
            let mut objects = cfg.ips_per_vnic.saturating_sub(v.objects());
            while need > 0 && room >= size && objects > 0 {
                plan.create.push(Create {
                    vnic: v.info.id.clone(),
                    block,
                });
                need = need.saturating_sub(size);
                room -= size;
                objects -= 1;
            }
        }
        let empty = self
            .vnics
            .iter()
            .filter(|v| !v.info.is_primary && !v.unusable() && v.is_empty_of_pods(pods_on))
            .count();
        let attach = need
            .div_ceil(cfg.addresses_per_vnic().max(1))
            .max(cfg.warm_vnics.saturating_sub(empty))
            .min(self.can_attach(cfg, now));
        if let Some(subnet) = self.usable_subnet(cfg, now) {
            // All go to the preferred subnet; a LimitExceeded spills the next plan to the next one.
            plan.attach = vec![subnet.clone(); attach];
        }
        if !plan.create.is_empty() || !plan.attach.is_empty() {
            return plan;
        }
        self.plan_shrink(cfg, now, target, c, (empty, pods_on), &mut plan);
        plan
    }

    fn plan_shrink(
        &self,
        cfg: &PoolConfig,
        now: Instant,
        target: usize,
        c: Counts,
        (mut empty, pods_on): (usize, &BTreeSet<String>),
        plan: &mut Plan,
    ) {
        let mut held = c.assigned + c.free + c.cooldown;
        // A suspect VNIC is left as it is until the reconcile has read it again, one whose
        // interface was lost until the host finds it again.
        let settled = || self.vnics.iter().rev().filter(|v| !v.unusable());
        // Highest VNICs first: emptying them lets them be detached.
        for v in settled() {
            for (ip, ocid, size) in v.releasable(cfg, now) {
                if held < target + size {
                    continue;
                }
                plan.release.push((v.info.id.clone(), ip, ocid));
                held -= size;
            }
        }
        for v in settled() {
            if v.info.is_primary || !v.is_empty_of_pods(pods_on) || empty <= cfg.warm_vnics {
                continue;
            }
            // Like excess addresses, a VNIC goes only after it has been idle for the delay.
            let idle = v.ips.values().all(|s| match s.state {
                SlotState::Free { since } => elapsed(since, cfg.release_delay, now),
                _ => false,
            });
            if !idle {
                continue;
            }
            let released: BTreeSet<&str> = plan
                .release
                .iter()
                .filter(|r| r.0 == v.info.id)
                .map(|r| r.2.as_str())
                .collect();
            let remaining = v
                .ips
                .values()
                .filter(|s| !released.contains(s.ocid.as_str()))
                .count();
            // Detaching drops the VNIC's free addresses; only if the targets hold without them.
            if held - remaining >= target {
                plan.detach
                    .push((v.info.id.clone(), v.info.attachment_id.clone()));
                plan.release.retain(|r| r.0 != v.info.id);
                held -= remaining;
                empty -= 1;
            }
        }
    }
}

#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;
