//! Per-operation IAM: which OCI permission each Core operation needs, and whether a policy
//! grants it. The table is OCI's "Details for the Core Services" (Verb + Resource-Type
//! combinations), as docs/oci.md records it.
use std::collections::BTreeSet;

/// OCI's verbs, each including the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verb {
    Inspect,
    Read,
    Use,
    Manage,
}

impl Verb {
    fn parse(word: &str) -> Option<Self> {
        Some(match word {
            "inspect" => Self::Inspect,
            "read" => Self::Read,
            "use" => Self::Use,
            "manage" => Self::Manage,
            _ => return None,
        })
    }
}

/// Aggregate resource-types and what they cover ("Details for the Core Services",
/// Resource-Types): the parts of them this simulator serves.
const FAMILIES: [(&str, &[&str]); 3] = [
    (
        "virtual-network-family",
        &[
            "vcns",
            "subnets",
            "vnics",
            "vnic-attachments",
            "private-ips",
        ],
    ),
    ("instance-family", &["instances"]),
    (
        "all-resources",
        &[
            "instances",
            "vcns",
            "subnets",
            "vnics",
            "vnic-attachments",
            "private-ips",
        ],
    ),
];

/// A policy: the (verb, resource-type) pairs it grants, families expanded.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    grants: BTreeSet<(String, Verb)>,
}

impl Policy {
    /// Parses statements such as `use vnics` or `Allow dynamic-group nodes to use vnics in
    /// compartment pods`; conditions (`where …`) are ignored. Names the statement it cannot read.
    pub fn parse(statements: &[String]) -> Result<Self, String> {
        let mut grants = BTreeSet::new();
        for statement in statements {
            let lower = statement.to_ascii_lowercase();
            let words: Vec<&str> = lower.split_whitespace().collect();
            let start = words.iter().position(|w| *w == "to").map_or(0, |i| i + 1);
            let (Some(verb), Some(resource)) = (
                words.get(start).and_then(|w| Verb::parse(w)),
                words.get(start + 1),
            ) else {
                return Err(format!(
                    "policy statement `{statement}` names no verb and resource-type"
                ));
            };
            let covered = FAMILIES
                .iter()
                .find(|(family, _)| family == resource)
                .map_or_else(
                    || vec![(*resource).to_owned()],
                    |(_, members)| members.iter().map(|m| (*m).to_owned()).collect(),
                );
            grants.extend(covered.into_iter().map(|r| (r, verb)));
        }
        Ok(Self { grants })
    }

    fn grants(&self, verb: Verb, resource: &str) -> bool {
        self.grants.iter().any(|(r, v)| r == resource && *v >= verb)
    }

    /// The permissions `operation` needs that the policy lacks, as `verb resource-type`.
    pub fn missing(&self, operation: &str) -> Vec<String> {
        required(operation)
            .iter()
            .filter(|(verb, resource)| !self.grants(*verb, resource))
            .map(|(verb, resource)| format!("{} {resource}", format!("{verb:?}").to_lowercase()))
            .collect()
    }
}

/// What each simulated operation needs. `AttachVnic`/`DetachVnic` need `manage instances`
/// (`INSTANCE_ATTACH_SECONDARY_VNIC` and its detach twin exist only at `manage`).
pub fn required(operation: &str) -> &'static [(Verb, &'static str)] {
    use Verb::{Inspect, Manage, Use};
    match operation {
        "AttachVnic" | "DetachVnic" => &[(Manage, "instances"), (Use, "subnets"), (Use, "vnics")],
        "CreatePrivateIp" | "DeletePrivateIp" | "BulkCreatePrivateIps" | "BulkDeletePrivateIps" => {
            &[(Use, "private-ips"), (Use, "subnets"), (Use, "vnics")]
        }
        "UpdatePrivateIp" => &[(Use, "private-ips"), (Use, "vnics")],
        "ListPrivateIps" | "GetPrivateIp" => &[(Inspect, "private-ips")],
        "GetVnic" => &[(Inspect, "vnics")],
        "ListVnicAttachments" => &[(Inspect, "vnic-attachments"), (Inspect, "instances")],
        "GetVnicAttachment" => &[(Inspect, "vnic-attachments")],
        "GetSubnet" | "ListSubnets" => &[(Inspect, "subnets")],
        "GetVcn" => &[(Inspect, "vcns")],
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_include_the_lesser_ones_and_families_expand() {
        let policy = Policy::parse(&[
            "Allow dynamic-group n to manage instances in compartment c".into(),
            "use virtual-network-family".into(),
        ])
        .unwrap();
        for op in [
            "AttachVnic",
            "CreatePrivateIp",
            "ListVnicAttachments",
            "GetVcn",
        ] {
            assert!(
                policy.missing(op).is_empty(),
                "{op}: {:?}",
                policy.missing(op)
            );
        }
        let read_only = Policy::parse(&["read virtual-network-family".into()]).unwrap();
        assert_eq!(
            read_only.missing("CreatePrivateIp"),
            ["use private-ips", "use subnets", "use vnics"]
        );
        assert_eq!(read_only.missing("AttachVnic")[0], "manage instances");
        assert!(Policy::parse(&["allow everything".into()]).is_err());
    }
}
