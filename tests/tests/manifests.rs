//! The Kubernetes manifests in `deploy/` validate against the Kubernetes schemas, offline
//! and strictly (unknown fields are errors), with `kubernetes-validate` (from `PyPI`).

use std::{path::Path, process::Command};

use vcnpath_tests::ocikit::python;

#[test]
fn deploy_manifests_validate_against_the_kubernetes_schemas() {
    let validator = match python() {
        Ok(python) => python.with_file_name("kubernetes-validate"),
        Err(reason) => {
            println!("skipping: {reason}");
            return;
        }
    };
    if !validator.exists() {
        println!(
            "skipping: {} is missing (run the setup step)",
            validator.display()
        );
        return;
    }
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut manifests: Vec<_> = std::fs::read_dir(&deploy)
        .expect("deploy/ exists")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    manifests.sort();
    assert!(
        manifests.len() >= 2,
        "expected the DaemonSet and ConfigMap manifests in {}",
        deploy.display()
    );
    let out = Command::new(&validator)
        .args(["--strict", "--kubernetes-version", "1.33.0"])
        .args(&manifests)
        .output()
        .expect("kubernetes-validate runs");
    assert!(
        out.status.success(),
        "manifests are invalid:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The conflist the init container installs is valid JSON for the plugin.
    let conflist: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy.join("10-vcnpath.conflist")).unwrap())
            .expect("conflist is JSON");
    assert_eq!(conflist["plugins"][0]["type"], "vcnpath-cni");
}

/// Every plugin the conflist chains, and `loopback` (containerd runs it for every pod), is
/// shipped in the image and installed on the node by the init step.
#[test]
fn the_image_ships_and_the_init_step_installs_every_plugin_the_runtime_runs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let conflist: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/10-vcnpath.conflist")).unwrap(),
    )
    .unwrap();
    let mut plugins: Vec<String> = conflist["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap().to_owned())
        .collect();
    plugins.push("loopback".into());
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let daemonset = std::fs::read_to_string(root.join("deploy/daemonset.yaml")).unwrap();
    for plugin in plugins.iter().filter(|p| *p != "vcnpath-cni") {
        assert!(
            dockerfile.contains(&format!("/usr/lib/cni/{plugin}")),
            "the image does not ship the {plugin} plugin"
        );
        assert!(
            daemonset.contains(&format!("/host/opt/cni/bin/{plugin}")),
            "the init step does not install the {plugin} plugin"
        );
    }
}

/// The agent resolves OCI's endpoints before any pod can get an address, `CoreDNS` included:
/// it must use the node's resolver, not cluster DNS.
#[test]
fn the_agent_resolves_through_the_nodes_resolver() {
    let daemonset = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml"),
    )
    .unwrap();
    let policies: Vec<&str> = daemonset
        .lines()
        .filter_map(|l| l.trim().strip_prefix("dnsPolicy:"))
        .map(str::trim)
        .collect();
    assert_eq!(
        policies,
        vec!["Default"],
        "the DaemonSet must set dnsPolicy: Default (the node's resolv.conf)"
    );
}
