//! The VM's initramfs: a static busybox, the kernel modules that reach the host's files
//! (virtio-pci, 9p, overlayfs; Debian builds them as modules), and `init.sh`, which mounts
//! the host's root read-only under a tmpfs overlay and runs the tier script in it.

use std::{
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use cpio::{NewcBuilder, newc};

use super::kernel::{self, Kernel};

/// What `init.sh` needs before it can see the host's files.
const BOOT_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];

const INIT: &str = include_str!("init.sh");

const DIR: u32 = 0o040_755;
const FILE: u32 = 0o100_755;
const CHAR_DEVICE: u32 = 0o020_600;

/// Writes `<dir>/initramfs-<version>.cpio` for `kernel` and returns its path.
pub fn build(dir: &Path, kernel: &Kernel, busybox: &Path) -> anyhow::Result<PathBuf> {
    let mut modules: Vec<PathBuf> = Vec::new();
    for module in BOOT_MODULES {
        for file in kernel::module_files(kernel, module)? {
            if !modules.contains(&file) {
                modules.push(file);
            }
        }
    }
    let mut archive = io::BufWriter::new(Vec::new());
    for d in [".", "bin", "dev", "modules"] {
        archive = entry(archive, NewcBuilder::new(d).mode(DIR), &[])?;
    }
    // The kernel opens /dev/console for init before anything is mounted.
    archive = entry(
        archive,
        NewcBuilder::new("dev/console")
            .mode(CHAR_DEVICE)
            .rdev_major(5)
            .rdev_minor(1),
        &[],
    )?;
    archive = entry(
        archive,
        NewcBuilder::new("init").mode(FILE),
        INIT.as_bytes(),
    )?;
    archive = entry(
        archive,
        NewcBuilder::new("bin/busybox").mode(FILE),
        &fs::read(busybox)?,
    )?;
    let mut order = String::new();
    for file in &modules {
        let (name, bytes) = decompressed(file)?;
        order.push_str(&name);
        order.push('\n');
        archive = entry(
            archive,
            NewcBuilder::new(&format!("modules/{name}")).mode(FILE),
            &bytes,
        )?;
    }
    archive = entry(
        archive,
        NewcBuilder::new("modules.list").mode(FILE),
        order.as_bytes(),
    )?;
    let bytes = newc::trailer(archive)?
        .into_inner()
        .map_err(io::IntoInnerError::into_error)?;
    let path = dir.join(format!("initramfs-{}.cpio", kernel.version));
    fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn entry<W: io::Write>(out: W, header: NewcBuilder, data: &[u8]) -> io::Result<W> {
    let size = u32::try_from(data.len()).map_err(io::Error::other)?;
    let mut writer = header.write(out, size);
    writer.write_all(data)?;
    writer.finish()
}

/// A module file as busybox's `insmod` can load it (Debian compresses them since 6.x).
fn decompressed(file: &Path) -> anyhow::Result<(String, Vec<u8>)> {
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("module path {}", file.display()))?;
    let tool = match file.extension().and_then(|e| e.to_str()) {
        Some("ko") => return Ok((name.to_owned(), fs::read(file)?)),
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => bail!("{}: unknown module compression", file.display()),
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(file)
        .output()
        .with_context(|| format!("running {tool} -dc {}", file.display()))?;
    if !out.status.success() {
        bail!(
            "{tool} -dc {} failed: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let plain = name.rsplit_once('.').map_or(name, |(stem, _)| stem);
    Ok((plain.to_owned(), out.stdout))
}
