//! The container runtime the runtime tier drives: Debian bookworm's containerd (1.6, with
//! its CRI plugin), runc, the reference CNI plugins (`loopback`, `portmap`, the ones the
//! image ships) and busybox-static for the test images. Downloaded with the private apt
//! configuration of the VM tier and unpacked under `target/runtime/root`; the host's
//! packages stay as they are. libc6 and libgcc-s1 join them for the node image the tier
//! builds to run the shipped daemon set.

use std::{fs, path::Path, process::Command};

use anyhow::Context as _;

use crate::{cmd, debian};

const SUITE: &str = "bookworm";
/// The CRI `runtime.v1` proto the tests' client is generated from (not in bookworm).
const PROTO_SUITE: &str = "trixie";
const PROTO_PACKAGE: &str = "golang-github-kubernetes-cri-api-dev";

/// The packages, and one file each must leave behind (the check that it unpacked).
const PACKAGES: &[(&str, &str)] = &[
    ("containerd", "usr/bin/containerd"),
    ("runc", "usr/sbin/runc"),
    ("containernetworking-plugins", "usr/lib/cni/portmap"),
    ("busybox-static", "bin/busybox"),
    // The node image's libraries: what the agent and the plugin link (the Dockerfile's
    // bookworm-slim base has them).
    ("libc6", "lib/x86_64-linux-gnu/libc.so.6"),
    ("libgcc-s1", "lib/x86_64-linux-gnu/libgcc_s.so.1"),
];

/// Makes sure `target/runtime/root` holds every package (a no-op when the stamp matches).
pub fn fetch() -> anyhow::Result<()> {
    let base = cmd::root().join("target/runtime");
    let root = base.join("root");
    let stamp = root.join(".unpacked");
    let wanted: String = PACKAGES
        .iter()
        .map(|(p, _)| *p)
        .chain([PROTO_PACKAGE])
        .flat_map(|p| [p, "\n"])
        .collect();
    if fs::read_to_string(&stamp).is_ok_and(|have| have == wanted) {
        return Ok(());
    }
    eprintln!("setup: fetching the runtime tier's packages from Debian {SUITE}");
    debian::update(&base, SUITE)?;
    let _ = fs::remove_dir_all(&root);
    let packages: Vec<&str> = PACKAGES.iter().map(|(p, _)| *p).collect();
    debian::fetch_unpacked(&base, SUITE, &packages, &root)?;
    check(&root)?;
    proto(&base, &root)?;
    fs::write(stamp, wanted)?;
    Ok(())
}

fn check(root: &Path) -> anyhow::Result<()> {
    for (package, file) in PACKAGES {
        let path = root.join(file);
        fs::metadata(&path).with_context(|| {
            format!(
                "{package} unpacked without {}: the package's layout changed; update PACKAGES in xtask/src/runtime.rs",
                path.display()
            )
        })?;
    }
    Ok(())
}

/// Unpacks the CRI `api.proto` from trixie's Go package into `root/cri/api.proto`.
fn proto(base: &Path, root: &Path) -> anyhow::Result<()> {
    debian::update(base, PROTO_SUITE)?;
    let dir = base.join("proto");
    let unpacked = dir.join("unpacked");
    let _ = fs::remove_dir_all(&dir);
    debian::fetch_unpacked(base, PROTO_SUITE, &[PROTO_PACKAGE], &unpacked)?;
    let found = cmd::output(
        Command::new("find")
            .arg(&unpacked)
            .args(["-path", "*/runtime/v1/api.proto"]),
    )
    .and_then(|o| o.lines().next().map(str::to_owned))
    .with_context(|| format!("{PROTO_PACKAGE} has no runtime/v1/api.proto"))?;
    // The gogoproto options only steer Go code generation; without them the proto stands alone.
    let text = fs::read_to_string(&found).with_context(|| format!("reading {found}"))?;
    let plain: String = text
        .lines()
        .filter(|l| !l.contains("gogo"))
        .flat_map(|l| [l, "\n"])
        .collect();
    fs::create_dir_all(root.join("cri"))?;
    fs::write(root.join("cri/api.proto"), plain)?;
    fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Python gRPC stubs for the CRI API (`api_pb2.py`, `api_pb2_grpc.py` next to the proto),
/// generated with the venv's grpcio-tools.
pub fn stubs() -> anyhow::Result<()> {
    let root = cmd::root();
    let cri = root.join("target/runtime/root/cri");
    if cri.join("api_pb2_grpc.py").exists() {
        return Ok(());
    }
    cmd::run(
        Command::new(root.join("target/oci-venv/bin/python"))
            .args(["-m", "grpc_tools.protoc", "-I."])
            .args(["--python_out=.", "--grpc_python_out=.", "api.proto"])
            .current_dir(&cri),
    )
}
