//! Pods wired the way the CNI plugin wires them: a namespace with `eth0` (address /32,
//! default route via a link-local gateway answered by a static neighbour entry), a host
//! veth in the node with a /32 route, and the address assigned to a VNIC on the router.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context, Result, bail};

use super::LabInner;
use super::build::namespace;
use super::netns::Netns;
use super::router;
use super::topology::{LINK_MTU, Mac, POD_GATEWAY, Vnic};

/// A pod. Dropping it removes its address from the router, its host veth and route from
/// the node, and its namespace.
pub struct Pod {
    name: String,
    ip: Ipv4Addr,
    vnic: &'static Vnic,
    host_ifname: String,
    host_mac: Mac,
    on_router: bool,
    lab: Arc<LabInner>,
    // Last, so the namespace is deleted after `drop` has undone the node and router side.
    ns: Netns,
}

/// FNV-1a: stable across runs and Rust versions (unlike `DefaultHasher`), so a pod's host
/// interface name and MAC can be predicted from its name.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |hash, &byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    })
}

/// 64-bit FNV-1a, for the 48 bits of a host interface name.
fn fnv1a_64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `vcn` + 12 hex digits, the shape of the names the CNI plugin gives host veths (so
/// the agent treats lab pods as the pods it covers): 15 characters, the kernel's limit.
pub fn host_ifname(pod_name: &str) -> String {
    format!(
        "vcn{:012x}",
        fnv1a_64(pod_name.as_bytes()) & 0xffff_ffff_ffff
    )
}

/// A locally administered unicast MAC derived from the pod name.
pub fn host_mac(pod_name: &str) -> Mac {
    let [a, b, c, d] = fnv1a(pod_name.as_bytes()).to_be_bytes();
    Mac([0x02, 0xfe, a, b, c, d])
}

/// Pod names end up in namespace and interface names, so they are kept to a safe alphabet.
pub(super) fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        bail!("pod name {name:?}: use letters, digits and '-'");
    }
    Ok(())
}

impl Pod {
    pub(super) fn create(
        lab: Arc<LabInner>,
        n: u32,
        name: &str,
        ip: Ipv4Addr,
        vnic: &'static Vnic,
    ) -> Result<Self> {
        check_name(name)?;
        let ns = namespace(&format!("{}-pod{n}-{name}", lab.id))?;
        let mut pod = Self {
            name: name.to_owned(),
            ip,
            vnic,
            host_ifname: host_ifname(name),
            host_mac: host_mac(name),
            on_router: false,
            lab,
            ns,
        };
        // On error `pod` is dropped here, which undoes whatever was done.
        pod.wire()
            .with_context(|| format!("adding pod {name} ({ip})"))?;
        Ok(pod)
    }

    fn wire(&mut self) -> Result<()> {
        let node = &self.lab.node;
        let ip = self.ip.to_string();
        let gateway = POD_GATEWAY.to_string();
        // Created from inside the node with the peer placed straight into the pod.
        node.add_veth_into(
            &self.host_ifname,
            &self.host_mac.to_string(),
            LINK_MTU,
            "eth0",
            &self.ns,
        )?;
        let host_route = format!("{ip}/32");
        node.ip_batch(&[
            &["link", "set", &self.host_ifname, "up"],
            &["route", "add", &host_route, "dev", &self.host_ifname],
        ])?;

        let host_mac = self.host_mac.to_string();
        self.ns.ip_batch(&[
            &["addr", "add", &host_route, "dev", "eth0"],
            &["link", "set", "eth0", "up"],
            &["route", "add", &gateway, "dev", "eth0", "scope", "link"],
            &["route", "add", "default", "via", &gateway, "dev", "eth0"],
            &[
                "neigh",
                "add",
                &gateway,
                "lladdr",
                &host_mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
        ])?;

        router::add_address(&self.lab.router, &self.vnic.into(), self.ip)?;
        self.on_router = true;
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The pod's address with `port`, e.g. to bind a client to a fixed source port.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }

    /// The pod's namespace (its interface is `eth0`).
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// The VNIC that owns the pod's address.
    pub fn vnic(&self) -> &'static Vnic {
        self.vnic
    }

    /// The host side of the pod's veth, in the node namespace.
    pub fn host_ifname(&self) -> &str {
        &self.host_ifname
    }

    pub fn host_mac(&self) -> Mac {
        self.host_mac
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if self.on_router
            && let Err(error) = router::remove_address(&self.lab.router, &self.vnic.into(), self.ip)
        {
            eprintln!("lab cleanup: pod {}: {error:#}", self.name);
        }
        // Deleting the host end deletes the pair and the /32 route. If the veth was never
        // created there is nothing to delete; a link that is already gone is not an error.
        let node = &self.lab.node;
        if node.ip(&["link", "show", "dev", &self.host_ifname]).is_ok()
            && let Err(error) = node.ip(&["link", "del", "dev", &self.host_ifname])
        {
            eprintln!("lab cleanup: pod {}: {error:#}", self.name);
        }
    }
}
