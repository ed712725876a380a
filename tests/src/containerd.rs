//! containerd (Debian's, fetched by `cargo xtask setup` into `target/runtime/root`) in the
//! lab's node namespace with every path private to the test, driven through CRI by
//! `tests/python/cri.py` the way kubelet does.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{
    agent::binary,
    lab::{ChildGuard, Netns, spawn_in},
};

/// The one image: busybox-static as the sandbox ("pause") and the containers' image.
pub const IMAGE: &str = "vcnpath.test/busybox:1";

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_owned()
}

/// Where setup unpacked the runtime's packages.
pub fn runtime_root() -> PathBuf {
    workspace().join("target/runtime/root")
}

/// Whether the runtime tier can run; prints why not.
pub fn available(test: &str) -> bool {
    if !crate::privileged::have_root(test) {
        return false;
    }
    let stubs = runtime_root().join("cri/api_pb2_grpc.py");
    if !stubs.exists() {
        eprintln!(
            "skipping {test}: {} is missing; run `cargo xtask setup` (fetches containerd and the CRI client)",
            stubs.display()
        );
        return false;
    }
    true
}

/// A running containerd, killed on drop (its directory goes with it).
pub struct Containerd {
    child: Option<ChildGuard>,
    pub dir: tempfile::TempDir,
    starts: u32,
}

impl Containerd {
    /// Writes the config, the CNI conf and bin dirs (the shipped conflist with `socket`,
    /// the plugin and the reference plugins the image ships), starts containerd in `node`
    /// and imports the image.
    pub fn start(node: &Netns, socket: &Path) -> Result<Self> {
        Self::start_with(node, Some(socket))
    }

    /// [`Self::start`]; with `socket` `None` the CNI conf dir is left empty (for the agent to
    /// fill, [`Self::cni_conf_dir`]).
    pub fn start_with(node: &Netns, socket: Option<&Path>) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("vcnpath-ctrd").tempdir()?;
        let d = dir.path();
        let cni_bin = d.join("cni/bin");
        let cni_conf = d.join("cni/conf");
        std::fs::create_dir_all(&cni_bin)?;
        std::fs::create_dir_all(&cni_conf)?;
        std::fs::copy(
            binary().with_file_name("vcnpath-cni"),
            cni_bin.join("vcnpath-cni"),
        )?;
        for plugin in ["loopback", "portmap"] {
            std::fs::copy(
                runtime_root().join("usr/lib/cni").join(plugin),
                cni_bin.join(plugin),
            )?;
        }
        if let Some(socket) = socket {
            let shipped = std::fs::read_to_string(workspace().join("deploy/10-vcnpath.conflist"))?;
            let conflist =
                shipped.replace("/run/vcnpath/vcnpath.sock", &socket.display().to_string());
            std::fs::write(cni_conf.join("10-vcnpath.conflist"), conflist)?;
        }
        let runc = runtime_root().join("usr/sbin/runc");
        let cri = r#"plugins."io.containerd.grpc.v1.cri""#;
        let config = format!(
            "version = 2\nroot = {root:?}\nstate = {state:?}\n\
             [grpc]\naddress = {sock:?}\n[ttrpc]\naddress = {ttrpc:?}\n[debug]\naddress = \"\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\npath = {opt:?}\n\
             [{cri}]\nsandbox_image = {IMAGE:?}\nrestrict_oom_score_adj = true\nnetns_mounts_under_state_dir = true\n\
             [{cri}.cni]\nbin_dir = {bin:?}\nconf_dir = {conf:?}\n\
             [{cri}.containerd]\nsnapshotter = \"native\"\ndefault_runtime_name = \"runc\"\n\
             [{cri}.containerd.runtimes.runc]\nruntime_type = \"io.containerd.runc.v2\"\n\
             [{cri}.containerd.runtimes.runc.options]\nBinaryName = {runc:?}\n",
            root = d.join("root").display().to_string(),
            state = d.join("state").display().to_string(),
            sock = d.join("containerd.sock").display().to_string(),
            ttrpc = d.join("ttrpc.sock").display().to_string(),
            opt = d.join("opt").display().to_string(),
            bin = cni_bin.display().to_string(),
            conf = cni_conf.display().to_string(),
            runc = runc.display().to_string(),
        );
        std::fs::write(d.join("config.toml"), config)?;
        let mut this = Self {
            child: None,
            dir,
            starts: 0,
        };
        this.spawn(node)?;
        this.import_image()?;
        Ok(this)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// Where containerd looks for CNI network configurations.
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.path().join("cni/conf")
    }

    /// CRI's `NetworkReady` condition.
    pub fn network_ready(&self) -> Result<bool> {
        self.cri(&["status"])?["NetworkReady"]
            .as_bool()
            .context("CRI status has no NetworkReady condition")
    }

    fn log(&self) -> PathBuf {
        self.dir
            .path()
            .join(format!("containerd-{}.log", self.starts))
    }

    /// Everything the latest containerd logged.
    pub fn latest_log(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    fn spawn(&mut self, node: &Netns) -> Result<()> {
        self.starts += 1;
        let bin = runtime_root().join("usr/bin");
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = Command::new(bin.join("containerd"));
        cmd.arg("--config")
            .arg(self.dir.path().join("config.toml"))
            .env("PATH", path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.log())?);
        self.child = Some(spawn_in(node, cmd)?);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.cri(&["status"]).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "containerd does not answer CRI after 30 s; its log:\n{}",
                    self.latest_log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// Kills containerd (SIGKILL; its shims and containers live on) and starts it again.
    pub fn restart(&mut self, node: &Netns) -> Result<()> {
        self.child.as_mut().expect("running").kill9()?;
        self.spawn(node)
    }

    /// A docker-archive of one layer (busybox-static as `/bin/busybox`, `sleep`, `sh`),
    /// imported into the `k8s.io` namespace.
    fn import_image(&self) -> Result<()> {
        let d = self.dir.path().join("image");
        let rootfs = d.join("rootfs/bin");
        std::fs::create_dir_all(&rootfs)?;
        std::fs::copy(runtime_root().join("bin/busybox"), rootfs.join("busybox"))?;
        for applet in ["sleep", "sh"] {
            std::os::unix::fs::symlink("busybox", rootfs.join(applet))?;
        }
        run(Command::new("tar")
            .args(["--numeric-owner", "--owner=0", "--group=0", "-cf"])
            .arg(d.join("layer.tar"))
            .arg("-C")
            .arg(d.join("rootfs"))
            .arg("bin"))?;
        let digest = run(Command::new("sha256sum").arg(d.join("layer.tar")))?;
        let digest = digest.split_whitespace().next().context("sha256sum")?;
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Cmd": ["/bin/sleep", "2147483647"]},
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{digest}")]},
        });
        std::fs::write(d.join("config.json"), config.to_string())?;
        let manifest = serde_json::json!([{"Config": "config.json", "RepoTags": [IMAGE], "Layers": ["layer.tar"]}]);
        std::fs::write(d.join("manifest.json"), manifest.to_string())?;
        run(Command::new("tar")
            .arg("-cf")
            .arg(d.join("image.tar"))
            .arg("-C")
            .arg(&d)
            .args(["manifest.json", "config.json", "layer.tar"]))?;
        run(Command::new(runtime_root().join("usr/bin/ctr"))
            .arg("--address")
            .arg(self.socket())
            .args(["-n", "k8s.io", "images", "import"])
            .arg(d.join("image.tar")))?;
        Ok(())
    }

    /// One CRI call through `tests/python/cri.py`; its JSON answer, or its error.
    pub fn cri(&self, args: &[&str]) -> Result<Value> {
        let out = Command::new(workspace().join("target/oci-venv/bin/python"))
            .arg(workspace().join("tests/python/cri.py"))
            .arg(self.socket())
            .arg(runtime_root().join("cri"))
            .args(args)
            .output()
            .context("running tests/python/cri.py")?;
        let json: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if !out.status.success() {
            bail!(
                "cri {args:?} failed: {json} {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(json)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Sandboxes first (their shims, netns mounts and CNI DELs), then containerd.
        if let Ok(Value::Array(ids)) = self.cri(&["list"]) {
            for id in ids.iter().filter_map(Value::as_str) {
                let _ = self.cri(&["stop", id]);
                let _ = self.cri(&["remove", id]);
            }
        }
        drop(self.child.take());
        let _ = Command::new("umount")
            .arg("-R")
            .arg("-l")
            .arg(self.dir.path().join("state"))
            .status();
    }
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
