//! Named network namespaces owned by a guard, and ways to run code and programs inside one.
//!
//! Namespaces are created with `ip netns add`, so they appear as `/run/netns/NAME` and
//! in `ip netns list`, where an operator debugging a failed test can find them. Code
//! enters them with setns(2) on a dedicated thread and programs with setns(2) between fork
//! and exec, never with `ip netns exec`: that remounts /sys, which hides /sys/fs/bpf from the agent.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;

use anyhow::{Context, Result, bail};

use super::process::{ChildGuard, run, run_stdin};

/// Where `ip netns add` puts the bind mounts that keep named namespaces alive.
pub const NETNS_DIR: &str = "/run/netns";

/// A named network namespace, deleted when the guard is dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
    deleted: bool,
}

impl Netns {
    /// Creates the namespace `name` and brings its loopback up.
    pub fn create(name: &str) -> Result<Self> {
        run(Command::new("ip").args(["netns", "add", name]))
            .with_context(|| format!("creating network namespace {name}"))?;
        // From here on the guard owns the namespace, so a failure below still deletes it.
        let ns = Self {
            name: name.to_owned(),
            path: Path::new(NETNS_DIR).join(name),
            deleted: false,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, for `nsenter --net=` or setns(2).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `ip ARGS` inside the namespace; the error names the namespace, the command
    /// and its stderr.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run(cmd_in(self, "ip").args(args))
    }

    /// Runs several `ip` commands inside the namespace with one `ip -batch -`, which stops
    /// at the first that fails; the error names it. One process instead of one per command
    /// matters under emulation, where each exec costs a tenth of a second.
    pub fn ip_batch(&self, commands: &[&[&str]]) -> Result<String> {
        let text: String = commands.iter().map(|c| c.join(" ") + "\n").collect();
        run_stdin(cmd_in(self, "ip").args(["-batch", "-"]), &text)
            .with_context(|| format!("ip -batch in netns {}", self.name))
    }

    /// Creates the veth `name` here (with `mac`) and its peer `peer` straight inside
    /// `peer_ns`, both with `mtu`: neither end ever exists in the root namespace.
    pub fn add_veth_into(
        &self,
        name: &str,
        mac: &str,
        mtu: u32,
        peer: &str,
        peer_ns: &Netns,
    ) -> Result<String> {
        let mtu = mtu.to_string();
        self.ip(&[
            "link",
            "add",
            name,
            "address",
            mac,
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            peer,
            "mtu",
            &mtu,
            "netns",
            peer_ns.name(),
        ])
    }

    /// Runs `nft ARGS` inside the namespace.
    pub fn nft(&self, args: &[&str]) -> Result<String> {
        run(cmd_in(self, "nft").args(args))
    }

    /// Writes a sysctl of this namespace, e.g. `sysctl("net/ipv4/ip_forward", "1")`.
    ///
    /// `/proc/sys/net` shows the namespace of the thread that opens it, so the write
    /// happens on a thread inside the namespace; it can never reach the root namespace's
    /// sysctls because `run_in` fails rather than running the closure elsewhere.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = Path::new("/proc/sys").join(key);
        run_in(self, || std::fs::write(&path, value))?.with_context(|| {
            format!(
                "writing {} = {value} in netns {}",
                path.display(),
                self.name
            )
        })
    }

    /// Reads a sysctl of this namespace.
    pub fn read_sysctl(&self, key: &str) -> Result<String> {
        let path = Path::new("/proc/sys").join(key);
        let value = run_in(self, || std::fs::read_to_string(&path))?
            .with_context(|| format!("reading {} in netns {}", path.display(), self.name))?;
        Ok(value.trim().to_owned())
    }

    /// Deletes the namespace now. Idempotent; `Drop` calls it and only logs failures.
    pub fn delete(&mut self) -> Result<()> {
        if self.deleted {
            return Ok(());
        }
        self.deleted = true;
        run(Command::new("ip").args(["netns", "delete", &self.name]))
            .with_context(|| format!("deleting network namespace {}", self.name))?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(error) = self.delete() {
            eprintln!("lab cleanup: {error:#}");
        }
    }
}

/// Runs `f` on a new thread that has entered `ns`, and returns its value.
///
/// Sockets created by `f` stay in `ns` after the thread ends, so the usual pattern is to
/// create and bind a socket here and use it from anywhere. A panic in `f` is re-raised
/// in the caller.
pub fn run_in<T: Send, F: FnOnce() -> T + Send>(ns: &Netns, f: F) -> Result<T> {
    let file = File::open(ns.path()).with_context(|| {
        format!(
            "opening {} to enter netns {}",
            ns.path().display(),
            ns.name()
        )
    })?;
    let name = ns.name();
    thread::scope(|scope| {
        let worker = scope.spawn(move || -> Result<T> {
            // SAFETY: setns only reads the descriptor, which `file` keeps open for the
            // call; it changes the network namespace of this thread alone, and the thread
            // ends with the closure, so no other code runs in the wrong namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let error = std::io::Error::last_os_error();
                bail!("setns into netns {name}: {error}");
            }
            Ok(f())
        });
        match worker.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// `PROGRAM` run inside `ns`'s network namespace. Only the network namespace changes, so
/// the program still sees the real /sys/fs/bpf (as with `nsenter --net=`, but without an
/// `nsenter` process on the way: under emulation every exec costs a tenth of a second).
pub fn cmd_in(ns: &Netns, program: &str) -> Command {
    let mut cmd = Command::new(program);
    enter_before_exec(&mut cmd, ns);
    cmd
}

/// Makes `cmd` enter `ns` between fork and exec (so stdio and environment set on `cmd`
/// are kept). The child opens the namespace itself; when that fails, the spawn fails with
/// the error of open(2) or setns(2).
pub fn enter_before_exec(cmd: &mut Command, ns: &Netns) {
    let path = std::ffi::CString::new(ns.path().as_os_str().as_encoded_bytes())
        .expect("a /run/netns path has no NUL byte");
    // SAFETY: the hook runs in the forked child before exec and calls only open(2),
    // setns(2) and close(2), which are async-signal-safe; `path` was allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let entered = libc::setns(fd, libc::CLONE_NEWNET);
            let error = std::io::Error::last_os_error();
            libc::close(fd);
            if entered == 0 { Ok(()) } else { Err(error) }
        });
    }
}

/// Spawns `cmd` inside `ns` and returns a guard that kills it on drop.
pub fn spawn_in(ns: &Netns, mut cmd: Command) -> Result<ChildGuard> {
    enter_before_exec(&mut cmd, ns);
    let what = format!("{cmd:?} in netns {}", ns.name());
    let child = cmd.spawn().with_context(|| format!("spawning {what}"))?;
    Ok(ChildGuard::new(child, what))
}
