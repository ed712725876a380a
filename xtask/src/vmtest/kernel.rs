//! Debian's kernel packages for the VM tier: resolved and downloaded with a private apt
//! configuration under `target/vmtest/apt` (the host's sources and /boot stay as they
//! are), unpacked under `target/vmtest/kernels/<label>`, with `depmod` run on the copy.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{cmd, debian};

/// A kernel the VM tier boots: the kernel of a Debian release, close to what OCI nodes run
/// (Oracle Linux UEK7 is 5.15, UEK8 6.12; Ubuntu 22.04/24.04 5.15/6.8).
#[derive(Debug, Clone, Copy)]
pub struct Release {
    /// What `--kernel` takes and the table prints.
    pub label: &'static str,
    /// The Debian suite whose `linux-image-amd64` is booted.
    pub suite: &'static str,
}

pub const RELEASES: [Release; 3] = [
    Release {
        label: "5.10",
        suite: "bullseye",
    },
    Release {
        label: "6.1",
        suite: "bookworm",
    },
    Release {
        label: "6.12",
        suite: "trixie",
    },
];

/// An unpacked kernel package.
#[derive(Debug)]
pub struct Kernel {
    pub release: Release,
    /// `uname -r` of the kernel, e.g. `6.1.0-57-amd64`.
    pub version: String,
    pub vmlinuz: PathBuf,
    /// `lib/modules/<version>` of the unpacked package, `depmod`ed.
    pub modules: PathBuf,
    /// The unpacked package's root, for `modprobe -d`.
    pub root: PathBuf,
}

/// Downloads (once) and unpacks the newest `linux-image` of the release's suite.
pub fn fetch(base: &Path, release: Release) -> anyhow::Result<Kernel> {
    let dir = base.join("kernels").join(release.label);
    let root = dir.join("root");
    if !root.join(".unpacked").exists() {
        download(base, &dir, release)?;
    }
    let (version, vmlinuz) = find_vmlinuz(&root)?;
    let modules = root.join("lib/modules").join(&version);
    Ok(Kernel {
        release,
        version,
        vmlinuz,
        modules,
        root,
    })
}

fn download(base: &Path, dir: &Path, release: Release) -> anyhow::Result<()> {
    eprintln!(
        "vmtest: fetching Debian {}'s kernel ({})",
        release.suite, release.label
    );
    debian::update(base, release.suite)?;
    // linux-image-amd64 is a metapackage; the image it depends on is the real kernel.
    let depends = cmd::output(debian::apt(base, release.suite, "apt-cache")?.args([
        "depends",
        "--no-recommends",
        "linux-image-amd64",
    ]))
    .with_context(|| format!("apt-cache depends linux-image-amd64 ({})", release.suite))?;
    let image = depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
        .with_context(|| format!("no linux-image-*-amd64 in {depends:?}"))?
        .to_owned();
    let root = dir.join("root");
    let _ = fs::remove_dir_all(&root);
    debian::fetch_unpacked(base, release.suite, &[&image], &root)?;
    // Newer packages keep modules under usr/lib (merged /usr); depmod and modprobe -d look in lib/.
    if !root.join("lib/modules").exists() && root.join("usr/lib/modules").exists() {
        fs::create_dir_all(root.join("lib"))?;
        std::os::unix::fs::symlink("../usr/lib/modules", root.join("lib/modules"))?;
    }
    let (version, _) = find_vmlinuz(&root)?;
    cmd::run(Command::new("depmod").arg("-b").arg(&root).arg(&version))?;
    fs::write(root.join(".unpacked"), &image)?;
    Ok(())
}

fn find_vmlinuz(root: &Path) -> anyhow::Result<(String, PathBuf)> {
    let boot = root.join("boot");
    for entry in fs::read_dir(&boot).with_context(|| format!("reading {}", boot.display()))? {
        let path = entry?.path();
        if let Some(version) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
        {
            return Ok((version.to_owned(), path));
        }
    }
    bail!("no vmlinuz-* in {}", boot.display())
}

/// The files `modprobe` would insert for `module` (dependencies first), from the
/// unpacked kernel; built-in modules yield nothing.
pub fn module_files(kernel: &Kernel, module: &str) -> anyhow::Result<Vec<PathBuf>> {
    let out = cmd::output(Command::new("modprobe").arg("-d").arg(&kernel.root).args([
        "-S",
        &kernel.version,
        "--show-depends",
        module,
    ]))
    .with_context(|| format!("modprobe --show-depends {module} for {}", kernel.version))?;
    Ok(out
        .lines()
        .filter_map(|l| l.strip_prefix("insmod "))
        .map(|l| PathBuf::from(l.split_whitespace().next().unwrap_or_default()))
        .collect())
}

/// busybox-static from the host's release, the initramfs's only program.
pub fn busybox(base: &Path) -> anyhow::Result<PathBuf> {
    let dir = base.join("busybox");
    let binary = dir.join("root/bin/busybox");
    if binary.exists() {
        return Ok(binary);
    }
    let suite = "bookworm";
    debian::update(base, suite)?;
    let unpacked = dir.join("unpacked");
    let _ = fs::remove_dir_all(&unpacked);
    debian::fetch_unpacked(base, suite, &["busybox-static"], &unpacked)?;
    let found = [
        unpacked.join("bin/busybox"),
        unpacked.join("usr/bin/busybox"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .context("busybox-static has no busybox binary")?;
    fs::create_dir_all(binary.parent().expect("has a parent"))?;
    fs::copy(found, &binary)?;
    Ok(binary)
}
