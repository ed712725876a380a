//! Booting one kernel under qemu with the host's root filesystem shared over 9p.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::kernel::Kernel;

/// How the VMs are run on this machine.
#[derive(Debug, Clone)]
pub enum Accel {
    Kvm,
    /// Emulation: correct on every host, several times slower.
    Tcg {
        why: String,
    },
}

impl Accel {
    /// KVM when the host has hardware virtualisation behind /dev/kvm. Some cloud VMs expose
    /// /dev/kvm through PVM (`kvm_pvm`), which boots only kernels built as PVM guests —
    /// Debian's hang right after decompression there — so those fall back to emulation.
    /// `VCNPATH_VM_ACCEL=kvm|tcg` overrides the choice.
    pub fn detect() -> Self {
        match std::env::var("VCNPATH_VM_ACCEL").as_deref() {
            Ok("kvm") => return Self::Kvm,
            Ok("tcg") => {
                return Self::Tcg {
                    why: "VCNPATH_VM_ACCEL=tcg".into(),
                };
            }
            _ => {}
        }
        if fs::File::options()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            return Self::Tcg {
                why: "/dev/kvm cannot be opened".into(),
            };
        }
        let module = |m: &str| Path::new("/sys/module").join(m).exists();
        if module("kvm_intel") || module("kvm_amd") || !module("kvm_pvm") {
            Self::Kvm
        } else {
            Self::Tcg {
                why: "/dev/kvm is PVM (kvm_pvm), which boots only PVM-built guest kernels".into(),
            }
        }
    }

    fn args(&self) -> &'static [&'static str] {
        match self {
            Self::Kvm => &["-enable-kvm", "-cpu", "host"],
            Self::Tcg { .. } => &["-accel", "tcg,thread=multi", "-cpu", "max"],
        }
    }

    /// How many times the tests' time budgets are stretched in these VMs: under emulation
    /// a process start alone takes a tenth of a second and a lab test runs 20–30 times
    /// slower than on the host, so budgets meant for a real node are multiplied by 4.
    pub fn time_scale(&self) -> u32 {
        match self {
            Self::Kvm => 1,
            Self::Tcg { .. } => 4,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Kvm => "KVM".into(),
            Self::Tcg { why } => format!("TCG emulation ({why})"),
        }
    }
}

/// Boots `kernel` with `initramfs`, runs `script` (a path on the host, seen at the same
/// path in the guest) and waits until the VM powers off or `limit` passes. The console goes
/// to `out/console.log`; lines the tier script prints starting with `vmtest` are echoed.
pub fn boot(
    accel: &Accel,
    kernel: &Kernel,
    initramfs: &Path,
    out: &Path,
    script: &Path,
    limit: Duration,
) -> anyhow::Result<()> {
    let cmdline = format!(
        "console=ttyS0 quiet loglevel=3 panic=-1 vmtest.out={} vmtest.modules={} vmtest.script={}",
        out.display(),
        kernel.modules.display(),
        script.display()
    );
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(accel.args())
        .args([
            "-smp",
            "2",
            "-m",
            "3072",
            "-nographic",
            "-no-reboot",
            "-nic",
            "none",
        ])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .arg("-append")
        .arg(&cmdline)
        .args([
            "-fsdev",
            "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device",
            "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            "-fsdev",
        ])
        .arg(format!(
            "local,id=out,path={},security_model=none",
            out.display()
        ))
        .args(["-device", "virtio-9p-pci,fsdev=out,mount_tag=out"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = qemu.spawn().context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().expect("piped");
    let mut console = fs::File::create(out.join("console.log"))?;
    let (done_tx, done_rx) = mpsc::channel();
    let reader = thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let _ = console.write_all(&line);
            let _ = console.write_all(b"\n");
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches('\r');
            if let Some(at) = text.find("vmtest") {
                eprintln!("  [vm] {}", &text[at..]);
            }
        }
        let _ = done_tx.send(());
    });
    let started = Instant::now();
    let finished = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        let _ = done_rx.recv_timeout(Duration::from_millis(500));
    };
    let _ = reader.join();
    let stderr = child
        .stderr
        .take()
        .map(|mut e| {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut e, &mut s);
            s
        })
        .unwrap_or_default();
    match finished {
        None => bail!(
            "the {} VM did not power off within {} s; console in {}",
            kernel.version,
            limit.as_secs(),
            out.join("console.log").display()
        ),
        Some(status) if !status.success() => bail!(
            "qemu for {} exited with {status}: {}",
            kernel.version,
            stderr.trim()
        ),
        Some(_) => Ok(()),
    }
}
