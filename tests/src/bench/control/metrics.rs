//! The agent's OCI call counters, read from its Prometheus `/metrics` text.

use std::collections::BTreeMap;

/// `vcnpath_oci_requests_total` summed over outcomes, by operation.
pub fn oci_requests(text: &str) -> BTreeMap<String, u64> {
    let mut calls = BTreeMap::new();
    for ((operation, _), n) in oci_outcomes(text) {
        *calls.entry(operation).or_insert(0) += n;
    }
    calls
}

/// `vcnpath_oci_requests_total` by (operation, outcome): `ok` or the OCI error code.
pub fn oci_outcomes(text: &str) -> BTreeMap<(String, String), u64> {
    let mut calls = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("vcnpath_oci_requests_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once('}') else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|l| l.strip_prefix(name)?.strip_prefix("=\""))
                .map_or("?", |v| v.trim_end_matches('"'))
                .to_owned()
        };
        // The agent prints its counters as integers.
        let value: u64 = value.trim().parse().unwrap_or(0);
        *calls
            .entry((label("operation"), label("outcome")))
            .or_insert(0) += value;
    }
    calls
}

/// What each operation's count grew by, the operations that did not grow left out.
pub fn difference(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> Vec<(String, u64)> {
    after
        .iter()
        .map(|(op, n)| (op.clone(), n - before.get(op).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_outcomes_by_operation() {
        let text = "# TYPE vcnpath_oci_requests_total counter\n\
            vcnpath_oci_requests_total{operation=\"CreatePrivateIp\",outcome=\"ok\"} 12\n\
            vcnpath_oci_requests_total{operation=\"CreatePrivateIp\",outcome=\"throttled\"} 2\n\
            vcnpath_oci_requests_total{operation=\"ListVnicAttachments\",outcome=\"ok\"} 3\n";
        let calls = oci_requests(text);
        assert_eq!(calls["CreatePrivateIp"], 14);
        let outcomes = oci_outcomes(text);
        assert_eq!(
            outcomes[&("CreatePrivateIp".to_owned(), "throttled".to_owned())],
            2
        );
        let before = BTreeMap::from([("CreatePrivateIp".to_owned(), 10)]);
        assert_eq!(
            difference(&before, &calls),
            [
                ("CreatePrivateIp".to_owned(), 4),
                ("ListVnicAttachments".to_owned(), 3)
            ]
        );
    }
}
