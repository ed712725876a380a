//! Files replaced atomically: a reader (the agent after a crash, a container runtime
//! watching its CNI configuration directory) sees the old content or the new, never a part.

use std::{
    fs::{self, File},
    io::{self, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::Path,
};

/// The suffix of the temp files [`replace`] writes: a crash between write and rename leaves
/// one behind, which readers of the directory ignore (libcni loads only `.conf`,
/// `.conflist` and `.json`; the checkpoint loader skips it).
pub const TEMP_SUFFIX: &str = ".tmp";

/// Replaces `path` with `bytes` (mode `mode`): a temp file of its own beside it (never shared
/// with another writer), fsynced, renamed over `path`, the directory fsynced. Blocking.
pub fn replace(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(path.file_name().unwrap_or_default());
    prefix.push(".");
    let mut out = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(TEMP_SUFFIX)
        .permissions(fs::Permissions::from_mode(mode))
        .tempfile_in(dir)?;
    out.write_all(bytes)?;
    out.as_file().sync_all()?;
    // On failure the temp file is removed when `out` drops.
    out.persist(path).map_err(|e| e.error)?;
    // The rename is durable only once the directory entry is.
    File::open(dir)?.sync_all()
}

/// Renames `path` to `to` (same directory) and makes the rename durable. Blocking.
pub fn rename_durably(path: &Path, to: &Path) -> io::Result<()> {
    fs::rename(path, to)?;
    let dir = to
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}
