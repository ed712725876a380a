//! Mounts the tests make, by system call rather than through mount(8).
//!
//! mount(8) finds a remount's target by reading /proc/self/mountinfo, which is not read
//! atomically: while another thread of the test adds a network namespace (itself a bind
//! mount under /run/netns), the target can be missing from what it read and the remount
//! fails with status 32. The kernel resolves a path given to mount(2) directly.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))
}

fn check(rc: libc::c_int, what: &str, path: &Path) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        let error = io::Error::last_os_error();
        Err(io::Error::new(
            error.kind(),
            format!("{what} {}: {error}", path.display()),
        ))
    }
}

/// Makes every mount of the calling thread's mount namespace private, so that what it
/// mounts next stays there (after `unshare(CLONE_NEWNS)`).
pub fn make_private_recursively() -> io::Result<()> {
    // SAFETY: mount(2) with NUL-terminated constants and null optional arguments.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    check(rc, "make private", Path::new("/"))
}

/// Bind-mounts `dir` over itself, read-only: writes under it then fail with EROFS, while
/// files already open for writing (a lock file) stay open on the same inode.
pub fn bind_read_only(dir: &Path) -> io::Result<()> {
    let path = c_path(dir)?;
    // SAFETY: mount(2) with NUL-terminated paths that outlive the calls and null optional
    // arguments.
    let rc = unsafe {
        libc::mount(
            path.as_ptr(),
            path.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    check(rc, "bind-mount", dir)?;
    // SAFETY: as above.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            path.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
            std::ptr::null(),
        )
    };
    check(rc, "remount read-only", dir)
}

/// Detaches the mount on `dir` lazily (`umount -l`): a process holding a file open through
/// it keeps that file.
pub fn detach(dir: &Path) -> io::Result<()> {
    let path = c_path(dir)?;
    // SAFETY: umount2(2) with a NUL-terminated path that outlives the call.
    let rc = unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    check(rc, "unmount", dir)
}
