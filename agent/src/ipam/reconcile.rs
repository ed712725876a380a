//! Reconcile: read what OCI has (the node's attachments, VNICs and their private IPs), compare
//! with the pool and the checkpoint, and repair. Runs at start (it builds the pool) and
//! periodically. Only addresses and VNICs tagged for this node are ever adopted or deleted, and
//! an address a checkpointed pod holds is never deleted: if OCI lost it, it is recreated.
use std::collections::{BTreeMap, BTreeSet, HashMap, hash_map};
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::oci::models::{AttachmentState, PrivateIp, Subnet, Tags, Vnic, VnicAttachment};
use crate::oci::{OciError, new_retry_token};

use super::checkpoint::Key;
use super::config::NODE_TAG;
use super::error::IpamError;
use super::pool::{Slot, SlotState, VnicInfo};
use super::state::{Inner, State, move_to};

pub(super) async fn periodic(inner: Arc<Inner>) {
    let mut failures = 0;
    loop {
        tokio::select! {
            () = tokio::time::sleep(inner.cfg.reconcile_interval) => {}
            () = inner.reconcile_now.notified() => {
                tracing::info!("reconcile asked for now: a VNIC may be gone");
            }
        }
        match run(&inner).await {
            Ok(()) => failures = 0,
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, "reconcile failed; retrying at the next interval");
                book(&inner, &e, failures, inner.cfg.reconcile_interval);
            }
        }
    }
}

/// Files a failed reconcile's OCI error in the node's troubles, next try after `retry_in`;
/// a successful reconcile clears it (in [`run`]).
pub(super) fn book(inner: &Inner, error: &IpamError, failures: u32, retry_in: std::time::Duration) {
    if let Some(oci) = error.oci() {
        let until = Instant::now() + retry_in;
        inner
            .troubles
            .failed(RECONCILE, "node", oci, failures, until);
    }
}

/// How a reconcile is filed in the troubles.
const RECONCILE: &str = "reconcile";

pub(super) async fn run(inner: &Inner) -> Result<(), IpamError> {
    async {
        let _ops = inner.ops.lock().await;
        let observed = observe(inner).await?;
        let unlisted = unlisted(&*inner.state.lock().await, &observed);
        let checked = recheck(inner, unlisted).await;
        let repairs = {
            let mut state = inner.state.lock().await;
            apply(inner, &mut state, observed, &checked)
        };
        repair(inner, repairs).await;
        inner.troubles.cleared(RECONCILE, "node");
        inner.wake.notify_one();
        Ok(())
    }
    .instrument(tracing::info_span!("reconcile"))
    .await
}

#[derive(Default)]
struct Observed {
    /// The attached VNICs the pool manages, as OCI has them now, with their private IPs.
    vnics: Vec<(VnicInfo, Vec<PrivateIp>)>,
    /// Attached VNICs that could not be read this round: the pool keeps what it knew of them.
    unread: Vec<Unread>,
    /// The physical NIC of each attachment the pool does not use.
    other_attachments: Vec<u32>,
}

impl Observed {
    /// Whether OCI has the VNIC attached: read this round, or attached but unreadable.
    fn has(&self, vnic_id: &str) -> bool {
        self.vnics.iter().any(|(info, _)| info.id == vnic_id) || self.is_unread(vnic_id)
    }

    fn is_unread(&self, vnic_id: &str) -> bool {
        self.unread.iter().any(|u| u.vnic_id == vnic_id)
    }

    /// The addresses the lists of the VNICs read this round show.
    fn listed(&self) -> BTreeSet<Ipv4Addr> {
        self.vnics
            .iter()
            .flat_map(|(_, ips)| ips.iter())
            .flat_map(PrivateIp::addresses)
            .collect()
    }
}

/// An attached VNIC whose `GetVnic`, `GetSubnet` or `ListPrivateIps` failed this round. One
/// such VNIC never stops the reconcile of the others, and never frees its pods' addresses.
struct Unread {
    vnic_id: String,
    /// The physical NIC its attachment names.
    nic_index: u32,
    /// OCI answered 404 for the VNIC or its addresses: it is being detached or was deleted
    /// since the attachments were listed, or IAM hides it. Nothing is handed out from it
    /// until a reconcile reads it again (or finds it detached and quarantines its pods).
    vanished: bool,
}

impl Unread {
    fn new(attachment: &VnicAttachment, vnic_id: &str, error: &IpamError) -> Self {
        let vanished = error.oci().is_some_and(|e| {
            e.is_not_found() && matches!(e.operation(), "GetVnic" | "ListPrivateIps")
        });
        Self {
            vnic_id: vnic_id.to_owned(),
            nic_index: attachment.nic_index.unwrap_or_default(),
            vanished,
        }
    }

    fn log(&self, error: &IpamError) {
        let oci = error.oci();
        let operation = oci.map_or("-", OciError::operation);
        let status = oci.and_then(OciError::status);
        let code = oci.and_then(OciError::code).unwrap_or("-");
        let request_id = oci.and_then(OciError::request_id).unwrap_or("-");
        if self.vanished {
            tracing::warn!(vnic = %self.vnic_id, operation, ?status, code, request_id, %error, "OCI answers 404 for an attached VNIC (detached or deleted meanwhile, or hidden by IAM): its addresses are handed out no more and its pods keep theirs until a later reconcile reads it");
        } else {
            tracing::warn!(vnic = %self.vnic_id, operation, ?status, code, request_id, %error, "cannot read an attached VNIC this round; keeping what the pool knew of it and reconciling the others");
        }
    }
}

#[derive(Default)]
struct Repairs {
    /// Tagged for this node, held by no pod, with no room in the pool: (VNIC, IP, OCID).
    delete: Vec<(String, Ipv4Addr, String)>,
    /// Checkpointed pods whose address OCI no longer has.
    recreate: Vec<(Key, String, Ipv4Addr)>,
}

fn tagged_for(tags: &Tags, instance_id: &str) -> bool {
    tags.get(NODE_TAG).is_some_and(|v| v == instance_id)
}

/// What OCI has attached to the node. Only a failing `ListVnicAttachments` fails it (then
/// nothing is known); a VNIC that cannot be read is noted as [`Unread`] and the rest are read.
async fn observe(inner: &Inner) -> Result<Observed, IpamError> {
    let attachments = inner
        .cloud
        .list_vnic_attachments()
        .await
        .map_err(IpamError::cloud("list the node's VNIC attachments", None))?;
    let mut subnets = HashMap::new();
    let mut observed = Observed::default();
    for attachment in attachments {
        let nic = attachment.nic_index.unwrap_or_default();
        match (attachment.lifecycle_state, &attachment.vnic_id) {
            (AttachmentState::Detached, _) => {}
            (AttachmentState::Attached, Some(vnic_id)) => {
                match read_vnic(inner, &attachment, vnic_id, &mut subnets).await {
                    Ok(Some(read)) => observed.vnics.push(read),
                    Ok(None) => observed.other_attachments.push(nic),
                    Err(e) => {
                        let unread = Unread::new(&attachment, vnic_id, &e);
                        unread.log(&e);
                        observed.unread.push(unread);
                    }
                }
            }
            // Attaching or detaching: it holds a slot of the shape's limit; adopted once settled.
            _ => observed.other_attachments.push(nic),
        }
    }
    Ok(observed)
}

/// One attached VNIC and its private IPs as OCI has them; `None` if the pool does not manage
/// it (the primary unless it serves pods, a VNIC not tagged for this node).
async fn read_vnic(
    inner: &Inner,
    attachment: &VnicAttachment,
    vnic_id: &str,
    subnets: &mut HashMap<String, Subnet>,
) -> Result<Option<(VnicInfo, Vec<PrivateIp>)>, IpamError> {
    let cloud = &inner.cloud;
    let vnic = cloud
        .get_vnic(vnic_id)
        .await
        .map_err(IpamError::cloud("read a VNIC", Some(vnic_id)))?;
    let managed = if vnic.is_primary {
        inner.cfg.pool.use_primary_vnic
    } else {
        tagged_for(&vnic.freeform_tags, &inner.cfg.instance_id)
    };
    if !managed {
        return Ok(None);
    }
    let subnet = match subnets.entry(vnic.subnet_id.clone()) {
        hash_map::Entry::Occupied(known) => known.into_mut(),
        hash_map::Entry::Vacant(slot) => slot.insert(
            cloud
                .get_subnet(&vnic.subnet_id)
                .await
                .map_err(IpamError::cloud("read the subnet of VNIC", Some(vnic_id)))?,
        ),
    };
    let info = info_from(attachment, &vnic, subnet)?;
    let ips = cloud
        .list_private_ips(vnic_id)
        .await
        .map_err(IpamError::cloud(
            "list the private IPs of VNIC",
            Some(vnic_id),
        ))?;
    Ok(Some((info, ips)))
}

/// The pool's view of a freshly attached VNIC.
pub(super) async fn vnic_info(
    inner: &Inner,
    attachment: &VnicAttachment,
) -> Result<VnicInfo, IpamError> {
    let vnic_id = attachment.vnic_id.as_deref().ok_or(IpamError::Invalid {
        what: "VNIC id",
        id: attachment.id.clone(),
        value: String::new(),
    })?;
    let vnic = inner
        .cloud
        .get_vnic(vnic_id)
        .await
        .map_err(IpamError::cloud("read a VNIC", Some(vnic_id)))?;
    let subnet = inner
        .cloud
        .get_subnet(&vnic.subnet_id)
        .await
        .map_err(IpamError::cloud("read the subnet of VNIC", Some(vnic_id)))?;
    info_from(attachment, &vnic, &subnet)
}

fn info_from(
    attachment: &VnicAttachment,
    vnic: &Vnic,
    subnet: &Subnet,
) -> Result<VnicInfo, IpamError> {
    let invalid = |what, value: &str| IpamError::Invalid {
        what,
        id: vnic.id.clone(),
        value: value.to_owned(),
    };
    let primary = vnic.private_ip.as_deref().unwrap_or_default();
    Ok(VnicInfo {
        id: vnic.id.clone(),
        attachment_id: attachment.id.clone(),
        nic_index: attachment.nic_index.unwrap_or_default(),
        vlan_tag: attachment.vlan_tag.unwrap_or_default(),
        attached_at: attachment.time_created.clone().unwrap_or_default(),
        mac: vnic.mac_address.clone().unwrap_or_default(),
        interface: None,
        subnet_id: subnet.id.clone(),
        subnet: subnet
            .cidr_block
            .parse::<Ipv4Net>()
            .map_err(|_| invalid("subnet CIDR", &subnet.cidr_block))?
            .trunc(),
        router_ip: subnet
            .virtual_router_ip
            .parse()
            .map_err(|_| invalid("virtual router IP", &subnet.virtual_router_ip))?,
        primary_ip: primary
            .parse()
            .map_err(|_| invalid("primary private IP", primary))?,
        is_primary: vnic.is_primary,
    })
}

/// What `GetPrivateIp` said of an address the lists left out: the present, where a list may lag.
type Checked = BTreeMap<Ipv4Addr, Option<PrivateIp>>;

/// Addresses a pod holds or that cool down which no list shows (on any VNIC, tagged or not),
/// with the OCID to ask for. Those of an unread VNIC are kept as they were, unasked.
fn unlisted(state: &State, observed: &Observed) -> Vec<(Ipv4Addr, String)> {
    let listed = observed.listed();
    let slots = state
        .pool
        .vnics()
        .iter()
        .filter(|v| !observed.is_unread(&v.info.id))
        .flat_map(|v| v.ips.iter());
    let busy = slots
        .filter(|(_, slot)| !matches!(slot.state, SlotState::Free { .. }))
        .map(|(ip, slot)| (*ip, slot.ocid.clone()));
    let held = state
        .allocations
        .values()
        .filter(|e| !observed.is_unread(&e.allocation.vnic_id))
        .map(|e| (e.allocation.ip, e.ip_id.clone()));
    let mut ask: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    for (ip, ocid) in busy.chain(held) {
        if !listed.contains(&ip) && !ocid.is_empty() {
            ask.insert(ip, ocid);
        }
    }
    ask.into_iter().collect()
}

/// Asks OCI for each address the lists left out: `Some` it exists (and where), `None` it is
/// gone (404); an address whose get failed otherwise is left out and kept as it was.
async fn recheck(inner: &Inner, unlisted: Vec<(Ipv4Addr, String)>) -> Checked {
    let mut checked = Checked::new();
    // The addresses of one block share its OCID: one get answers for all of them.
    let mut answers: HashMap<String, Result<PrivateIp, OciError>> = HashMap::new();
    for (ip, ocid) in unlisted {
        let answer = match answers.entry(ocid.clone()) {
            hash_map::Entry::Occupied(e) => e.into_mut(),
            hash_map::Entry::Vacant(e) => e.insert(inner.cloud.get_private_ip(&ocid).await),
        };
        match answer {
            Ok(p) => {
                tracing::info!(%ip, vnic = p.vnic_id.as_deref().unwrap_or("-"), "an address the lists left out still exists");
                checked.insert(ip, Some(p.clone()));
            }
            Err(e) if e.is_not_found() => {
                checked.insert(ip, None);
            }
            Err(e) => {
                tracing::warn!(%ip, error = %e, "cannot check an address the lists left out; keeping it as it was");
            }
        }
    }
    checked
}

/// Brings pool and checkpoint in line with what OCI has; returns the cloud calls still needed.
/// Slots are keyed by address (unique in a VCN): an address a pod holds stays the pod's
/// wherever OCI shows it (another VNIC of the node, a stripped tag), and leaves the pool only
/// when `GetPrivateIp` says it is gone.
fn apply(inner: &Inner, state: &mut State, observed: Observed, checked: &Checked) -> Repairs {
    let now = Instant::now();
    let cfg = &inner.cfg;
    let mut repairs = Repairs::default();
    // An unreadable VNIC the pool does not know may be anyone's; it holds a slot of the limit.
    let unknown = observed
        .unread
        .iter()
        .filter(|u| state.pool.vnic(&u.vnic_id).is_none())
        .map(|u| u.nic_index);
    state.pool.other_attachments = observed
        .other_attachments
        .iter()
        .copied()
        .chain(unknown)
        .collect();
    let mut before: BTreeMap<Ipv4Addr, (String, Slot)> = BTreeMap::new();
    for v in state.pool.vnics() {
        for (ip, slot) in &v.ips {
            before.insert(*ip, (v.info.id.clone(), slot.clone()));
        }
    }
    drop_gone(state, &observed);
    keep_unread(state, &observed);
    let held: HashMap<Ipv4Addr, Key> = state
        .allocations
        .iter()
        .map(|(k, e)| (e.allocation.ip, k.clone()))
        .collect();
    let mut adopt = Vec::new();
    for (info, ips) in observed.vnics {
        let vnic_id = info.id.clone();
        state.pool.upsert_vnic(info);
        let v = state.pool.vnic_mut(&vnic_id).expect("just upserted");
        v.ips.clear();
        // OCI still has it attached: serve from it again (once host setup finds its interface).
        v.suspect = false;
        for p in ips.into_iter().filter(|p| !p.is_primary) {
            let tagged = tagged_for(&p.freeform_tags, &cfg.instance_id);
            let block = p.block();
            // A block gives the VNIC each of its addresses, all under the block's OCID.
            for ip in p.addresses() {
                let known = before.get(&ip).map(|(_, slot)| &slot.state);
                let state_of_ip = match (held.get(&ip), known) {
                    (Some(key), _) => SlotState::Assigned(state.allocations[key].pod.clone()),
                    // Not this node's (any more): never adopted, never deleted.
                    (None, _) if !tagged => continue,
                    (None, Some(s @ (SlotState::Free { .. } | SlotState::Cooldown { .. }))) => {
                        s.clone()
                    }
                    // It was cooling on a VNIC detached behind the agent's back.
                    (None, _) => {
                        if let Some(cooling) = state.pool.take_cooling(ip) {
                            cooling
                        } else {
                            adopt.push((vnic_id.clone(), ip, p.id.clone(), block));
                            continue;
                        }
                    }
                };
                let slot = Slot {
                    ocid: p.id.clone(),
                    state: state_of_ip,
                    block,
                };
                state.pool.add_slot(&vnic_id, ip, slot);
            }
        }
    }
    keep_unlisted(state, before, checked);
    for (vnic_id, ip, ocid, block) in adopt {
        let v = state.pool.vnic(&vnic_id).expect("observed VNIC");
        // A block is adopted whole (it is deleted whole, by the pool's shrink, or not at all).
        if block.is_some() || v.ips.len() < cfg.pool.addresses_per_vnic() {
            tracing::info!(%ip, vnic = %vnic_id, block = ?block, "adopting a free address tagged for this node");
            let slot = Slot {
                ocid,
                state: state.unrecorded(now),
                block,
            };
            state.pool.add_slot(&vnic_id, ip, slot);
        } else {
            repairs.delete.push((vnic_id, ip, ocid));
        }
    }
    if follow(state, checked, &mut repairs) {
        inner.moved.notify_one();
    }
    state.forget_gone();
    repairs
}

/// VNICs the node no longer has leave the pool; those with pods are remembered as gone.
fn drop_gone(state: &mut State, observed: &Observed) {
    let gone: Vec<String> = state
        .pool
        .vnics()
        .iter()
        .map(|v| v.info.id.clone())
        .filter(|id| !observed.has(id))
        .collect();
    for id in gone {
        let pods = state.pods_of(&id);
        if pods.is_empty() {
            tracing::warn!(vnic = %id, "VNIC is no longer attached to this node; dropping it from the pool");
        } else {
            tracing::error!(vnic = %id, pods = ?pods, "a VNIC with pods was detached behind the agent's back: their addresses are quarantined (handed to nobody else) while the pods live");
        }
        if let Some(v) = state.pool.remove_vnic(&id) {
            state.remember_gone(v.info);
        }
    }
}

/// An unread VNIC keeps its slots as the pool knew them, but not an address the list of
/// another VNIC shows (it was moved; the list wins). One OCI answered 404 for serves no new
/// pod until a reconcile reads it again.
fn keep_unread(state: &mut State, observed: &Observed) {
    let listed = observed.listed();
    for unread in &observed.unread {
        let Some(v) = state.pool.vnic_mut(&unread.vnic_id) else {
            continue;
        };
        v.ips.retain(|ip, _| !listed.contains(ip));
        if unread.vanished {
            v.suspect = true;
        }
    }
}

/// A pod's or a cooling address no list showed stays where it was, or moves to where
/// `GetPrivateIp` shows it; it leaves only when OCI says it is gone.
fn keep_unlisted(state: &mut State, before: BTreeMap<Ipv4Addr, (String, Slot)>, checked: &Checked) {
    for (ip, (vnic_id, slot)) in before {
        if state.pool.find(ip).is_some() || matches!(slot.state, SlotState::Free { .. }) {
            continue; // listed, or free: the lists are the truth for free addresses
        }
        let target = match checked.get(&ip) {
            Some(Some(p)) => p
                .vnic_id
                .clone()
                .filter(|id| state.pool.vnic(id).is_some())
                .or(Some(vnic_id)),
            Some(None) => None,    // gone: a pod's is recreated below
            None => Some(vnic_id), // not checked: kept as it was
        };
        if let Some(target) = target {
            state.pool.add_slot(&target, ip, slot);
        }
    }
}

/// Each allocation follows its address to the VNIC the pool has it on; one whose address OCI
/// lost is recreated on its VNIC; one whose VNIC is gone stays quarantined. Returns whether
/// an allocation moved to another VNIC.
fn follow(state: &mut State, checked: &Checked, repairs: &mut Repairs) -> bool {
    let mut moved = false;
    let State {
        pool, allocations, ..
    } = state;
    for (key, entry) in allocations.iter_mut() {
        let a = &mut entry.allocation;
        if let Some((v, slot)) = pool.find(a.ip) {
            entry.ip_id.clone_from(&slot.ocid);
            entry.block = slot.block;
            if v.info.id != a.vnic_id {
                tracing::warn!(ip = %a.ip, from = %a.vnic_id, to = %v.info.id, container_id = %key.0, "a pod's address was moved to another VNIC; the pod follows it");
                move_to(a, &v.info);
                moved = true;
            }
            continue;
        }
        match (pool.vnic(&a.vnic_id), checked.get(&a.ip)) {
            (Some(_), Some(None)) => {
                repairs
                    .recreate
                    .push((key.clone(), a.vnic_id.clone(), a.ip));
            }
            _ => {
                tracing::error!(ip = %a.ip, vnic = %a.vnic_id, container_id = %key.0, "a pod's address is on no VNIC of this node; it stays quarantined (handed to nobody else) until the pod is deleted");
            }
        }
    }
    moved
}

async fn repair(inner: &Inner, repairs: Repairs) {
    for (vnic, ip, ocid) in repairs.delete {
        match inner.cloud.delete_private_ip(&ocid).await {
            Ok(()) => tracing::info!(%ip, %vnic, "deleted an untracked address of this node"),
            Err(e) => tracing::warn!(%ip, %vnic, error = %e, "cannot delete an untracked address"),
        }
    }
    for (key, vnic, ip) in repairs.recreate {
        let token = new_retry_token();
        let created = inner
            .cloud
            .create_private_ip(&vnic, Some(ip), None, &inner.tags, &token)
            .await;
        let mut state = inner.state.lock().await;
        let Some(entry) = state.allocations.get_mut(&key) else {
            continue; // released meanwhile
        };
        match created {
            Ok(p) => {
                entry.ip_id.clone_from(&p.id);
                entry.block = None;
                let pod = entry.pod.clone();
                let slot = Slot::single(p.id, SlotState::Assigned(pod));
                state.pool.add_slot(&vnic, ip, slot);
                tracing::warn!(%ip, %vnic, container_id = %key.0, "restored a checkpointed pod's address that OCI had lost");
            }
            Err(e) => {
                tracing::error!(%ip, %vnic, container_id = %key.0, error = %e, "a checkpointed pod's address is missing in OCI and cannot be restored");
            }
        }
    }
    let state = inner.state.lock().await;
    if let Err(e) = inner.save(&state).await {
        tracing::error!(error = %e, "cannot checkpoint after reconcile");
    }
}
