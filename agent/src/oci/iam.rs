//! Which IAM permission each Core operation the agent calls needs (OCI's "Details for the
//! Core Services", Verb + Resource-Type tables; docs/oci.md lists them with the policy to
//! grant), so a `404 NotAuthorizedOrNotFound` can be told to the operator as the statement
//! that is missing rather than as "not found".

/// The permissions (`verb resource-type`) `operation` needs; empty for operations not listed.
pub fn needs(operation: &str) -> &'static [&'static str] {
    match operation {
        "AttachVnic" | "DetachVnic" => &["manage instances", "use subnets", "use vnics"],
        "CreatePrivateIp" | "DeletePrivateIp" => &["use private-ips", "use subnets", "use vnics"],
        "ListPrivateIps" | "GetPrivateIp" => &["inspect private-ips"],
        "GetVnic" => &["inspect vnics"],
        "ListVnicAttachments" => &["inspect vnic-attachments", "inspect instances"],
        "GetVnicAttachment" | "WaitVnicAttached" => &["inspect vnic-attachments"],
        "GetSubnet" | "ListSubnets" => &["inspect subnets"],
        "GetVcn" => &["inspect vcns"],
        _ => &[],
    }
}

const VERBS: [&str; 4] = ["inspect", "read", "use", "manage"];

/// Whether holding `held` (e.g. `use vnics`) implies `wanted` (e.g. `inspect vnics`): same
/// resource-type, a verb at least as strong.
pub fn implies(held: &str, wanted: &str) -> bool {
    let rank = |p: &str| -> Option<(usize, String)> {
        let (verb, resource) = p.split_once(' ')?;
        Some((VERBS.iter().position(|v| *v == verb)?, resource.to_owned()))
    };
    match (rank(held), rank(wanted)) {
        (Some((h, hr)), Some((w, wr))) => hr == wr && h >= w,
        _ => false,
    }
}

/// The permissions that explain the denials: needed by a denied operation and not proven
/// granted by an operation that succeeded.
pub fn suspects<'a>(
    denied: impl IntoIterator<Item = &'a str>,
    succeeded: &[&str],
) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for op in denied {
        for wanted in needs(op) {
            let proven = succeeded
                .iter()
                .any(|ok| needs(ok).iter().any(|held| implies(held, wanted)));
            if !proven && !out.contains(wanted) {
                out.push(wanted);
            }
        }
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_denied_attach_with_working_creates_points_at_manage_instances() {
        assert_eq!(
            suspects(["AttachVnic"], &["CreatePrivateIp", "GetVnic"]),
            ["manage instances"]
        );
        assert_eq!(
            suspects(["CreatePrivateIp"], &["GetVnic", "ListPrivateIps"]),
            ["use private-ips", "use subnets", "use vnics"]
        );
        assert!(implies("manage instances", "inspect instances"));
        assert!(!implies("inspect vnics", "use vnics"));
    }
}
