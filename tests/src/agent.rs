//! Running the real `vcnpath` binary inside a lab's node namespace.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::lab::{ChildGuard, Lab, VNICS, spawn_in};

/// Path of the `vcnpath` binary built next to the test executable (`cargo xtask test`
/// builds it before the lab tests).
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    // Test executables live in target/<profile>/deps, binaries in target/<profile>.
    let mut dir = exe.parent().expect("executable directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target/<profile>");
    }
    let bin = dir.join("vcnpath");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build -p vcnpath-agent --bins` (cargo xtask test does)",
        bin.display()
    );
    bin
}

/// The `vcnpath datapath` configuration for the lab's two VNICs and the given pods
/// (address, VNIC index).
pub fn lab_config(pin_dir: &Path, pods: &[(Ipv4Addr, usize)]) -> String {
    let mut text = format!(
        "pin_dir = {:?}\nvcn_cidrs = [\"10.0.0.0/16\"]\nmasquerade_interface = \"eth0\"\ngc_interval_secs = 1\n",
        pin_dir.display().to_string()
    );
    for vnic in &VNICS {
        let list: Vec<String> = pods
            .iter()
            .filter(|(_, v)| *v == vnic.index)
            .map(|(ip, _)| format!("\"{ip}\""))
            .collect();
        let _ = write!(
            text,
            "\n[[vnic]]\ninterface = \"{}\"\nprimary_ip = \"{}\"\nsubnet = \"{}/{}\"\nrouter_ip = \"{}\"\npods = [{}]\n",
            vnic.ifname,
            vnic.ip,
            vnic.subnet,
            vnic.prefix,
            vnic.router_ip,
            list.join(", ")
        );
    }
    text
}

/// A running `vcnpath datapath` in the node namespace; killed on drop.
pub struct Agent {
    child: ChildGuard,
    log: PathBuf,
    pub config: PathBuf,
    /// Holds the configuration and logs; removed on drop.
    dir: std::sync::Arc<tempfile::TempDir>,
}

impl Agent {
    /// Writes `config` next to the log and starts the agent; waits until it is ready.
    pub fn start(lab: &Lab, tag: &str, config: &str) -> Result<Self> {
        let dir = std::sync::Arc::new(
            tempfile::Builder::new()
                .prefix(&format!("vcnpath-{}-{tag}-", lab.id()))
                .tempdir()?,
        );
        let config_path = dir.path().join("datapath.toml");
        std::fs::write(&config_path, config)?;
        let log = dir.path().join("agent.log");
        Self::spawn(lab, &config_path, &log, dir)
    }

    fn spawn(
        lab: &Lab,
        config: &Path,
        log: &Path,
        dir: std::sync::Arc<tempfile::TempDir>,
    ) -> Result<Self> {
        let log_file = std::fs::File::create(log)?;
        let mut cmd = Command::new(binary());
        cmd.args(["datapath", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log_file)
            .env("RUST_LOG", "info");
        let child = spawn_in(lab.node(), cmd)?;
        let mut agent = Self {
            child,
            log: log.to_owned(),
            config: config.to_owned(),
            dir,
        };
        agent.wait_ready(crate::scaled(Duration::from_secs(20)))?;
        Ok(agent)
    }

    /// Starts another agent process on the same configuration (after a kill).
    pub fn restart(&mut self, lab: &Lab) -> Result<()> {
        let log = self.log.with_extension("restart.log");
        let new = Self::spawn(
            lab,
            &self.config.clone(),
            &log,
            std::sync::Arc::clone(&self.dir),
        )?;
        *self = new;
        Ok(())
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains("datapath ready") {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "vcnpath exited ({status}) before it was ready; its log:\n{}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "vcnpath not ready after {timeout:?}; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a crash or OOM kill would.
    pub fn kill9(&mut self) -> Result<()> {
        self.child.kill9().context("killing vcnpath").map(|_| ())
    }
}
