//! Debian packages fetched without touching the host's apt: each suite gets its own sources,
//! lists and cache under a base directory in `target/`, and packages are unpacked with
//! `dpkg-deb -x` where the caller wants them, never installed.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::bail;

use crate::cmd;

const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// `tool` (apt-get, apt-cache) with its own sources, lists and cache for `suite` under
/// `base/apt/<suite>` (the host's apt setup is never read or changed).
pub fn apt(base: &Path, suite: &str, tool: &str) -> anyhow::Result<Command> {
    let dir = base.join("apt").join(suite);
    fs::create_dir_all(dir.join("lists/partial"))?;
    fs::create_dir_all(dir.join("cache/archives/partial"))?;
    let sources = dir.join("sources.list");
    fs::write(
        &sources,
        format!(
            "deb [signed-by={KEYRING}] http://deb.debian.org/debian {suite} main\n\
             deb [signed-by={KEYRING}] http://deb.debian.org/debian-security {suite}-security main\n"
        ),
    )?;
    let mut c = Command::new(tool);
    for (key, value) in [
        ("Dir::Etc::SourceList", sources),
        ("Dir::Etc::SourceParts", PathBuf::from("/dev/null")),
        ("Dir::State::Lists", dir.join("lists")),
        ("Dir::Cache", dir.join("cache")),
    ] {
        c.arg("-o").arg(format!("{key}={}", value.display()));
    }
    // Downloads land in a root-owned target/ that apt's sandbox user cannot write.
    c.args(["-o", "APT::Sandbox::User=root", "-qq"]);
    Ok(c)
}

/// Refreshes the package lists of `suite`.
pub fn update(base: &Path, suite: &str) -> anyhow::Result<()> {
    cmd::run(apt(base, suite, "apt-get")?.arg("update"))
}

/// Downloads `packages` from `suite` (lists already updated) and unpacks each into `into`;
/// the downloaded files are removed afterwards.
pub fn fetch_unpacked(
    base: &Path,
    suite: &str,
    packages: &[&str],
    into: &Path,
) -> anyhow::Result<()> {
    let debs = base.join("apt").join(suite).join("download");
    let _ = fs::remove_dir_all(&debs);
    fs::create_dir_all(&debs)?;
    cmd::run(
        apt(base, suite, "apt-get")?
            .arg("download")
            .args(packages)
            .current_dir(&debs),
    )?;
    fs::create_dir_all(into)?;
    let mut unpacked = 0;
    for entry in fs::read_dir(&debs)? {
        let deb = entry?.path();
        if deb.extension().is_some_and(|e| e == "deb") {
            cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(into))?;
            unpacked += 1;
        }
    }
    if unpacked != packages.len() {
        bail!(
            "apt-get download {} from {suite} left {unpacked} .deb files in {}, not {}",
            packages.join(" "),
            debs.display(),
            packages.len()
        );
    }
    fs::remove_dir_all(&debs)?;
    Ok(())
}
