//! ADD, DEL and CHECK: the agent is asked for (or told to free) the address, and the
//! pod's veth, address, routes and gateway neighbour are set up, removed or verified.

use std::{fmt::Write as _, fs::File, path::Path};

use super::{
    config::{DEFAULT_MTU, Environment, NetConf},
    error::{CniError, ErrorCode},
    names,
    netlink::{Netlink, NetlinkError},
    result::{Attachment, CniResult, GATEWAY},
    serialize::lock_attachment,
};
use crate::{
    api::{Client, ClientError},
    ipam::{AllocError, Allocation},
};

/// ADD: an address from the agent, then the interfaces. Any failure after the agent
/// answered removes the veth (its pod end and every route on it go with it) and
/// releases the address, so a failed ADD leaves nothing behind.
pub async fn add(env: &Environment, conf: &NetConf) -> Result<CniResult, CniError> {
    let netns = required_netns(env)?;
    let ns = open_netns(netns)?;
    let node = Netlink::current().map_err(internal("opening a netlink socket"))?;
    let pod_side = Netlink::in_netns(&ns).map_err(not_a_netns(netns))?;
    let host_veth = names::host_veth(&env.container_id, &env.ifname);
    // Held until this ADD has succeeded or been rolled back.
    let _serialized = lock_attachment(&conf.socket(), &host_veth, conf.timeout()).await?;
    let client = Client::new(conf.socket(), conf.timeout());
    let pod = env.pod_ref();
    let allocation = client.allocate(&pod).await.map_err(|e| from_client(&e))?;
    let plan = Plan {
        env,
        conf,
        netns,
        ns: &ns,
        host_veth: &host_veth,
        allocation: &allocation,
    };
    match plan.apply(&node, &pod_side).await {
        Ok(result) => Ok(result),
        Err(error) => {
            let mut error = CniError::new(
                ErrorCode::InterfaceSetup,
                format!(
                    "setting up {} for container {} failed",
                    env.ifname, env.container_id
                ),
                error.to_string(),
            );
            let mut undone = Vec::new();
            match node.delete_link(&host_veth).await {
                Ok(_) => undone.push(format!("removed {host_veth}")),
                Err(e) => {
                    let _ = write!(
                        error.details,
                        "; rollback could not remove {host_veth}: {e}"
                    );
                }
            }
            match client.release(&pod).await {
                Ok(_) => undone.push(format!("released {}", allocation.ip)),
                Err(e) => {
                    let _ = write!(
                        error.details,
                        "; rollback could not release {} (the agent's reconcile will): {e}",
                        allocation.ip
                    );
                }
            }
            if !undone.is_empty() {
                let _ = write!(error.details, "; rolled back: {}", undone.join(", "));
            }
            Err(error)
        }
    }
}

/// DEL: removes the host veth (which takes the pod end, if its netns still exists) and
/// releases the address. Every part is idempotent: a missing veth, netns or agent record
/// is the goal already reached. Only an unreachable agent fails (code 11), so the runtime
/// retries and the address is not leaked.
pub async fn del(env: &Environment, conf: &NetConf) -> Result<(), CniError> {
    let node = Netlink::current().map_err(internal("opening a netlink socket"))?;
    let host_veth = names::host_veth(&env.container_id, &env.ifname);
    let _serialized = lock_attachment(&conf.socket(), &host_veth, conf.timeout()).await?;
    node.delete_link(&host_veth).await.map_err(|e| {
        CniError::new(
            ErrorCode::InterfaceSetup,
            format!(
                "removing {host_veth} for container {} failed",
                env.container_id
            ),
            e.to_string(),
        )
    })?;
    let client = Client::new(conf.socket(), conf.timeout());
    match client.release(&env.pod_ref()).await {
        Ok(_) => Ok(()),
        // With the host veth gone the agent's allocation GC releases the address once it
        // is back (after `allocation_gc_grace_secs`, into the cooldown); failing here would
        // only leave the runtime a sandbox it cannot remove until the agent returns.
        Err(error @ ClientError::NotRunning { .. }) => {
            eprintln!(
                "vcnpath-cni: {error}; {host_veth} is removed and the agent releases the address of container {} when it is back",
                env.container_id
            );
            Ok(())
        }
        Err(error) => Err(from_client(&error)),
    }
}

/// CHECK: the agent still holds the address, and the pod and host sides are as ADD left
/// them. Every difference is listed in `details`.
pub async fn check(env: &Environment, conf: &NetConf) -> Result<(), CniError> {
    if conf.cni_version.starts_with("0.3.") {
        return Err(CniError::new(
            ErrorCode::IncompatibleVersion,
            format!("CHECK is not defined for CNI version {}", conf.cni_version),
            "CHECK exists since CNI 0.4.0; use cniVersion 0.4.0 or 1.0.0",
        ));
    }
    let netns = required_netns(env)?;
    let ns = open_netns(netns)?;
    let node = Netlink::current().map_err(internal("opening a netlink socket"))?;
    let pod_side = Netlink::in_netns(&ns).map_err(not_a_netns(netns))?;
    let client = Client::new(conf.socket(), conf.timeout());
    let Some(allocation) = client
        .lookup(&env.pod_ref())
        .await
        .map_err(|e| from_client(&e))?
    else {
        return Err(CniError::new(
            ErrorCode::UnknownContainer,
            format!(
                "the vcnpath agent has no address for container {} interface {}",
                env.container_id, env.ifname
            ),
            "the pod was never added, or was deleted; recreate the pod sandbox",
        ));
    };
    let host_veth = names::host_veth(&env.container_id, &env.ifname);
    let mut problems = prev_result_problems(conf, &allocation);
    super::check::inspect(
        &node,
        &pod_side,
        &env.ifname,
        &host_veth,
        &allocation,
        effective_mtu(conf, &allocation),
        &mut problems,
    )
    .await
    .map_err(|e| {
        CniError::new(
            ErrorCode::InterfaceSetup,
            "reading the pod's network configuration failed",
            e.to_string(),
        )
    })?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::CheckFailed,
            format!(
                "the network of container {} does not match what ADD set up",
                env.container_id
            ),
            problems.join("; "),
        ))
    }
}

/// The steps of ADD after the agent answered, with what they need.
struct Plan<'a> {
    env: &'a Environment,
    conf: &'a NetConf,
    netns: &'a Path,
    ns: &'a File,
    host_veth: &'a str,
    allocation: &'a Allocation,
}

impl Plan<'_> {
    async fn apply(&self, node: &Netlink, pod_side: &Netlink) -> Result<CniResult, SetupError> {
        let ifname = &self.env.ifname;
        let ip = self.allocation.ip;
        let mtu = effective_mtu(self.conf, self.allocation);
        // A veth with this name can only be the leftover of an ADD for this very
        // attachment that was killed half-way: replace it.
        node.delete_link(self.host_veth).await?;
        node.create_veth(self.host_veth, ifname, self.ns).await?;
        let host = node
            .link(self.host_veth)
            .await?
            .ok_or_else(|| vanished(self.host_veth))?;
        let host_mac = host.mac.ok_or_else(|| vanished(self.host_veth))?;
        // Before the veth is up, so no packet of the pod leaves unchecked.
        attach_antispoof(self.conf, self.host_veth)?;
        node.set_mtu_up(host.index, self.host_veth, mtu).await?;
        let pod = pod_side
            .link(ifname)
            .await?
            .ok_or_else(|| vanished(ifname))?;
        pod_side.set_mtu_up(pod.index, ifname, mtu).await?;
        pod_side.add_address(pod.index, ifname, ip, 32).await?;
        pod_side.replace_route(pod.index, GATEWAY, 32, None).await?;
        pod_side
            .replace_route(pod.index, std::net::Ipv4Addr::UNSPECIFIED, 0, Some(GATEWAY))
            .await?;
        pod_side
            .permanent_neighbour(pod.index, GATEWAY, host_mac)
            .await?;
        node.replace_route(host.index, ip, 32, None).await?;
        Ok(CniResult::for_attachment(
            &self.conf.cni_version,
            self.conf.legacy_result(),
            &Attachment {
                host_veth: self.host_veth,
                host_mac,
                ifname,
                pod_mac: pod.mac.unwrap_or_default(),
                netns: &self.netns.display().to_string(),
                ip,
            },
        ))
    }
}

/// Why setting up the pod's interfaces failed.
#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("attaching the anti-spoofing check to {host_veth}: {source}")]
    AntiSpoof {
        host_veth: String,
        source: crate::datapath::DatapathError,
    },
}

/// Attaches the datapath's anti-spoofing check (a pod sends only with its own address) to
/// the host veth, when the agent has the datapath loaded: its program is pinned in the
/// configuration's pin directory. Without the pin there is no datapath on this node.
fn attach_antispoof(conf: &NetConf, host_veth: &str) -> Result<(), SetupError> {
    let pin_dir = conf.pin_dir();
    if !pin_dir.join(vcnpath_common::PROG_POD).exists() {
        return Ok(());
    }
    crate::datapath::attach_pinned_pod(&pin_dir, host_veth).map_err(|source| {
        SetupError::AntiSpoof {
            host_veth: host_veth.to_owned(),
            source,
        }
    })
}

/// The pod's MTU: the agent's (it knows the VNIC), else the configuration's default.
pub fn effective_mtu(conf: &NetConf, allocation: &Allocation) -> u32 {
    if allocation.mtu > 0 {
        allocation.mtu
    } else {
        conf.mtu.unwrap_or(DEFAULT_MTU)
    }
}

/// A link we just created is gone: someone else deleted it concurrently.
fn vanished(name: &str) -> NetlinkError {
    NetlinkError {
        step: format!("interface {name} disappeared right after it was created"),
        source: rtnetlink::Error::RequestFailed,
    }
}

/// In CHECK, the address the agent holds must be the one the runtime recorded.
fn prev_result_problems(conf: &NetConf, allocation: &Allocation) -> Vec<String> {
    let Some(prev) = &conf.prev_result else {
        return Vec::new();
    };
    let recorded = prev
        .get("ips")
        .and_then(|ips| ips.as_array())
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.get("address")?.as_str()?.parse::<ipnet::Ipv4Net>().ok())
        .any(|net| net.addr() == allocation.ip);
    if recorded {
        Vec::new()
    } else {
        vec![format!(
            "prevResult does not list {}, the address the agent holds for this pod",
            allocation.ip
        )]
    }
}

fn required_netns(env: &Environment) -> Result<&Path, CniError> {
    env.netns.as_deref().ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidEnvironment,
            "invalid environment variable CNI_NETNS: missing",
            "ADD and CHECK need the pod's network namespace",
        )
    })
}

fn open_netns(path: &Path) -> Result<File, CniError> {
    File::open(path).map_err(|e| {
        let code = if e.kind() == std::io::ErrorKind::NotFound {
            ErrorCode::UnknownContainer
        } else {
            ErrorCode::InvalidEnvironment
        };
        CniError::new(
            code,
            format!("cannot open the pod's network namespace {}", path.display()),
            format!("{e}; CNI_NETNS must name an existing netns"),
        )
    })
}

fn not_a_netns(path: &Path) -> impl FnOnce(std::io::Error) -> CniError + '_ {
    move |e| {
        CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("cannot enter the network namespace {}", path.display()),
            format!("{e}; CNI_NETNS must be a network namespace (e.g. /var/run/netns/NAME)"),
        )
    }
}

fn internal(what: &'static str) -> impl FnOnce(std::io::Error) -> CniError {
    move |e| CniError::new(ErrorCode::Internal, format!("{what} failed"), e.to_string())
}

/// How an agent failure reads to the runtime: temporary ones are "try again later" (11),
/// so kubelet retries the sandbox instead of failing the pod.
pub fn from_client(error: &ClientError) -> CniError {
    let details = match error {
        ClientError::NotRunning { .. } => {
            "start the vcnpath DaemonSet (kubectl -n kube-system get ds vcnpath) and check its logs"
        }
        ClientError::Timeout { .. } => {
            "the agent is alive but did not answer in time; check its logs"
        }
        ClientError::Agent(AllocError::PoolEmpty { .. } | AllocError::NotReady) => {
            "the agent is adding addresses in the background; the runtime retries"
        }
        ClientError::Agent(AllocError::CoolingDown { .. }) => {
            "every address left rests briefly after its pod left (ipam.cooldown_secs); the runtime retries, and `vcnpath max-pods` tells kubelet the node's real capacity"
        }
        ClientError::Agent(AllocError::Exhausted { .. }) => {
            "the node is full: lower kubelet's --max-pods to `vcnpath max-pods`, or add VNIC capacity"
        }
        ClientError::Agent(AllocError::Invalid { .. }) => {
            "the runtime's CNI_CONTAINERID / CNI_IFNAME / CNI_ARGS were rejected by the agent"
        }
        ClientError::Agent(_) => {
            "see the agent's logs for the failed checkpoint or datapath update"
        }
        ClientError::Protocol { .. } => {
            "install the vcnpath-cni binary from the same release as the agent"
        }
    };
    let code = if error.is_temporary() {
        ErrorCode::TryAgainLater
    } else {
        match error {
            ClientError::Agent(AllocError::Invalid { .. }) => ErrorCode::InvalidEnvironment,
            ClientError::Agent(_) => ErrorCode::AgentRefused,
            _ => ErrorCode::Internal,
        }
    };
    CniError::new(code, error.to_string(), details)
}
