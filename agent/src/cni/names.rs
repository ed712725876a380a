//! The host-side veth name: derived from the attachment alone, so DEL can find (and
//! remove) it from the container id even when the pod's netns is already gone, and a
//! retried ADD finds what a killed plugin left behind.

use std::fmt::Write as _;

use sha2::{Digest as _, Sha256};

/// Prefix of every host-side pod veth, so `ip link | grep vcn` lists them.
pub const HOST_VETH_PREFIX: &str = "vcn";

/// `vcn` + 12 hex digits of SHA-256(container id, interface): 15 characters, the kernel's
/// limit (IFNAMSIZ - 1). The interface is part of the key because CNI identifies an
/// attachment by both, and 48 bits keep collisions negligible at a node's pod counts.
pub fn host_veth(container_id: &str, ifname: &str) -> String {
    let mut hash = Sha256::new();
    hash.update(container_id.as_bytes());
    hash.update([0]);
    hash.update(ifname.as_bytes());
    let digest = hash.finalize();
    let mut name = String::from(HOST_VETH_PREFIX);
    for byte in &digest[..6] {
        let _ = write!(name, "{byte:02x}");
    }
    name
}

/// Whether `name` is a host-side pod veth as [`host_veth`] names them: the prefix and
/// exactly 12 lowercase hex digits, so no other interface is mistaken for a pod's.
pub fn is_host_veth(name: &str) -> bool {
    name.strip_prefix(HOST_VETH_PREFIX).is_some_and(|hex| {
        hex.len() == 12
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_the_plugin_makes_are_pod_veths() {
        assert!(is_host_veth(&host_veth("0123456789abcdef", "eth0")));
        for other in [
            "vcn0",
            "vcnpath",
            "vcn0123456789ab0",
            "vcn0123456789AB",
            "eth0",
        ] {
            assert!(!is_host_veth(other), "{other} is not a pod veth");
        }
    }

    #[test]
    fn names_are_short_stable_and_distinct() {
        let a = host_veth("0123456789abcdef", "eth0");
        assert_eq!(a.len(), 15, "{a} must fit IFNAMSIZ");
        assert!(a.starts_with(HOST_VETH_PREFIX));
        assert_eq!(
            a,
            host_veth("0123456789abcdef", "eth0"),
            "not deterministic"
        );
        assert_ne!(a, host_veth("0123456789abcdef", "eth1"));
        assert_ne!(a, host_veth("0123456789abcdee", "eth0"));
    }
}
