//! The container runtime the runtime tier drives: Debian bookworm's containerd (1.6, with
//! its CRI plugin), runc, the reference CNI plugins (`loopback`, `portmap`, the ones the
//! image ships) and busybox-static for the test images. Downloaded with the private apt
//! configuration of the VM tier and unpacked under `target/runtime/root`; the host's
//! packages stay as they are.

use std::{fs, path::Path, process::Command};

use anyhow::Context as _;

use crate::{cmd, vmtest::kernel::apt};

const SUITE: &str = "bookworm";

/// The packages, and one file each must leave behind (the check that it unpacked).
const PACKAGES: &[(&str, &str)] = &[
    ("containerd", "usr/bin/containerd"),
    ("runc", "usr/sbin/runc"),
    ("containernetworking-plugins", "usr/lib/cni/portmap"),
    ("busybox-static", "bin/busybox"),
];

/// Makes sure `target/runtime/root` holds every package (a no-op when the stamp matches).
pub fn fetch() -> anyhow::Result<()> {
    let base = cmd::root().join("target/runtime");
    let root = base.join("root");
    let stamp = root.join(".unpacked");
    let wanted: String = PACKAGES.iter().map(|(p, _)| format!("{p}\n")).collect();
    if fs::read_to_string(&stamp).is_ok_and(|have| have == wanted) {
        return Ok(());
    }
    eprintln!("setup: fetching the runtime tier's packages from Debian {SUITE}");
    cmd::run(apt(&base, SUITE, "apt-get")?.arg("update"))?;
    let debs = base.join("debs");
    let _ = fs::remove_dir_all(&debs);
    fs::create_dir_all(&debs)?;
    cmd::run(
        apt(&base, SUITE, "apt-get")?
            .arg("download")
            .args(PACKAGES.iter().map(|(p, _)| p))
            .current_dir(&debs),
    )?;
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root)?;
    for deb in fs::read_dir(&debs)? {
        let deb = deb?.path();
        cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    }
    check(&root)?;
    fs::remove_dir_all(&debs)?;
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
