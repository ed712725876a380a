//! Running helper programs, and a guard for long-running children.

use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Runs `cmd` to completion and returns its stdout; a failure names the command line, the
/// exit status and stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let output = output(cmd)?;
    if !output.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `cmd` with `input` on its stdin (e.g. `nft -f -`), like [`run`].
pub fn run_stdin(cmd: &mut Command, input: &str) -> Result<String> {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    let mut stdin = child.stdin.take().context("child stdin")?;
    stdin
        .write_all(input.as_bytes())
        .with_context(|| format!("writing stdin of {cmd:?}"))?;
    drop(stdin);
    let output = child
        .wait_with_output()
        .with_context(|| format!("waiting for {cmd:?}"))?;
    if !output.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}\ninput was:\n{input}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `cmd` to completion whatever its exit status (for probes such as ping, where
/// failure is an answer).
pub fn output(cmd: &mut Command) -> Result<Output> {
    cmd.output().with_context(|| format!("running {cmd:?}"))
}

/// A child process that is killed (SIGKILL) and reaped when the guard is dropped, also
/// when a test panics.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    what: String,
    status: Option<ExitStatus>,
}

impl ChildGuard {
    pub(crate) fn new(child: Child, what: String) -> Self {
        Self {
            child,
            what,
            status: None,
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The child itself, e.g. to take its stdout pipe.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Sends SIGKILL (as `kill -9` would, leaving no chance to clean up) and reaps it.
    pub fn kill9(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        self.child
            .kill()
            .with_context(|| format!("SIGKILL to {}", self.what))?;
        self.wait()
    }

    /// Sends SIGTERM and waits up to `grace` for a clean exit, then SIGKILL.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: kill(2) with a pid we own and have not reaped yet, so it cannot name
        // another process.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            let error = std::io::Error::last_os_error();
            bail!("SIGTERM to {}: {error}", self.what);
        }
        match self.wait_timeout(grace)? {
            Some(status) => Ok(status),
            None => self.kill9(),
        }
    }

    /// Waits for the child to exit.
    pub fn wait(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let status = self
            .child
            .wait()
            .with_context(|| format!("waiting for {}", self.what))?;
        self.status = Some(status);
        Ok(status)
    }

    /// The exit status if the child has exited, without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("polling {}", self.what))?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for the child to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(error) = self.kill9() {
            eprintln!("lab cleanup: {error:#}");
        }
    }
}
