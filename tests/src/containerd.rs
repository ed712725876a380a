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
    /// Run as on a node ([`Self::start_as_node`]): in a mount namespace of its own.
    as_node: bool,
}

/// Run by `unshare --mount`: overlays the node's `/etc`, `/opt` and `/run` with directories
/// of the test (so `/etc/cni/net.d`, `/opt/cni/bin` and `/run/vcnpath` are the test's own),
/// mounts a bpffs of its own on `/sys/fs/bpf`, then execs containerd ("$@").
const NODE_SETUP: &str = r#"set -e
d=$1; shift
for top in etc opt run; do
  mkdir -p "$d/$top/upper" "$d/$top/work"
  mount -t overlay overlay -o "lowerdir=/$top,upperdir=$d/$top/upper,workdir=$d/$top/work" "/$top"
done
mkdir -p /etc/cni/net.d /opt/cni/bin
mount -t bpf bpf /sys/fs/bpf
exec "$@""#;

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
        Self::configured(node, dir, &cni_bin, &cni_conf, socket, false)
    }

    /// containerd as on a node, for running the shipped daemon set: in a mount namespace of its own
    /// where the node's `/etc`, `/opt` and `/run` are overlaid with the test's directories
    /// and `/sys/fs/bpf` is a bpffs of its own, with the CNI directories at the usual
    /// `/opt/cni/bin` and `/etc/cni/net.d`, both empty (the daemon set fills them).
    /// [`Self::node_path`] reaches that view from the test.
    pub fn start_as_node(node: &Netns) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("vcnpath-ctrd").tempdir()?;
        Self::configured(
            node,
            dir,
            Path::new("/opt/cni/bin"),
            Path::new("/etc/cni/net.d"),
            None,
            true,
        )
    }

    /// A path of the node as containerd (and what it runs) sees it.
    pub fn node_path(&self, path: &str) -> PathBuf {
        let pid = self.child.as_ref().expect("running").id();
        PathBuf::from(format!("/proc/{pid}/root")).join(path.trim_start_matches('/'))
    }

    fn configured(
        node: &Netns,
        dir: tempfile::TempDir,
        cni_bin: &Path,
        cni_conf: &Path,
        socket: Option<&Path>,
        as_node: bool,
    ) -> Result<Self> {
        let d = dir.path();
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
            as_node,
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
        let mut cmd = if self.as_node {
            let mut cmd = Command::new("unshare");
            cmd.args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                NODE_SETUP,
                "sh",
            ])
            .arg(self.dir.path().join("node"))
            .arg(bin.join("containerd"));
            cmd
        } else {
            Command::new(bin.join("containerd"))
        };
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
        if self.as_node {
            bail!("a containerd started as on a node cannot restart: its node view would be new");
        }
        self.child.as_mut().expect("running").kill9()?;
        self.spawn(node)
    }

    /// The test image: busybox-static as `/bin/busybox`, `sleep`, `sh`.
    fn import_image(&self) -> Result<()> {
        let rootfs = self.dir.path().join("image/rootfs");
        busybox_into(&rootfs, &["sleep", "sh"])?;
        let config = serde_json::json!({"Cmd": ["/bin/sleep", "2147483647"]});
        self.import(IMAGE, &rootfs, &config)
    }

    /// The node image the `Dockerfile` builds, made here from the same binaries and Debian
    /// packages (no registry is reachable), tagged `tag` (the manifest's image): the agent
    /// and the plugin in `/usr/local/bin`, the reference plugins the init step installs,
    /// bookworm's libc6 and libgcc-s1 for the binaries, and busybox-static for the init
    /// step's `sh`, `cp` and `mv` (in the Dockerfile's bookworm-slim base, dash and
    /// coreutils). `ENTRYPOINT` and `CMD` are the Dockerfile's own.
    pub fn import_node_image(&self, tag: &str) -> Result<()> {
        let rootfs = self.dir.path().join("node-image/rootfs");
        busybox_into(&rootfs, &["sh", "cp", "mv"])?;
        let bin = rootfs.join("usr/local/bin");
        std::fs::create_dir_all(&bin)?;
        for name in ["vcnpath", "vcnpath-cni"] {
            std::fs::copy(binary().with_file_name(name), bin.join(name))?;
        }
        let plugins = rootfs.join("usr/local/lib/vcnpath/cni");
        std::fs::create_dir_all(&plugins)?;
        for plugin in ["portmap", "loopback"] {
            std::fs::copy(
                runtime_root().join("usr/lib/cni").join(plugin),
                plugins.join(plugin),
            )?;
        }
        for libs in ["lib", "lib64"] {
            run(Command::new("cp")
                .arg("-a")
                .arg(runtime_root().join(libs))
                .arg(&rootfs))?;
        }
        let dockerfile = std::fs::read_to_string(workspace().join("Dockerfile"))?;
        let config = serde_json::json!({
            "Entrypoint": dockerfile_exec_form(&dockerfile, "ENTRYPOINT")?,
            "Cmd": dockerfile_exec_form(&dockerfile, "CMD")?,
        });
        self.import(tag, &rootfs, &config)
    }

    /// A docker-archive of one layer (`rootfs`, owned by root) with `config` as the image's
    /// config, imported into the `k8s.io` namespace as `tag`.
    fn import(&self, tag: &str, rootfs: &Path, config: &Value) -> Result<()> {
        let d = rootfs.parent().context("a rootfs has a parent")?;
        run(Command::new("tar")
            .args(["--numeric-owner", "--owner=0", "--group=0", "-cf"])
            .arg(d.join("layer.tar"))
            .arg("-C")
            .arg(rootfs)
            .arg("."))?;
        let digest = run(Command::new("sha256sum").arg(d.join("layer.tar")))?;
        let digest = digest.split_whitespace().next().context("sha256sum")?;
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{digest}")]},
        });
        std::fs::write(d.join("config.json"), config.to_string())?;
        let manifest = serde_json::json!([{"Config": "config.json", "RepoTags": [tag], "Layers": ["layer.tar"]}]);
        std::fs::write(d.join("manifest.json"), manifest.to_string())?;
        run(Command::new("tar")
            .arg("-cf")
            .arg(d.join("image.tar"))
            .arg("-C")
            .arg(d)
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

/// busybox-static as `rootfs/bin/busybox`, with `applets` linked to it.
fn busybox_into(rootfs: &Path, applets: &[&str]) -> Result<()> {
    let bin = rootfs.join("bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::copy(runtime_root().join("bin/busybox"), bin.join("busybox"))?;
    for applet in applets {
        std::os::unix::fs::symlink("busybox", bin.join(applet))?;
    }
    Ok(())
}

/// The exec-form (JSON array) argument of the last `instruction` in `dockerfile` (the final
/// stage's).
fn dockerfile_exec_form(dockerfile: &str, instruction: &str) -> Result<Value> {
    let line = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(instruction)?.strip_prefix(' '))
        .with_context(|| format!("the Dockerfile has no {instruction}"))?;
    serde_json::from_str(line.trim())
        .with_context(|| format!("the Dockerfile's {instruction} is not in exec form: {line}"))
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
