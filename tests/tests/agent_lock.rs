//! One agent per node: a second `vcnpath run` on the same state directory (someone
//! debugging, a `DaemonSet` surge) exits at once, before it asks IMDS or OCI anything and
//! before it writes a file. The real binary, unprivileged: the lock is its first step.

use std::{
    net::TcpListener,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use vcnpath::daemon::StateLock;
use vcnpath_tests::agent::binary;

#[test]
fn a_second_agent_exits_before_touching_oci_or_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // The first agent's lock, taken as `vcnpath run` takes it.
    let first = StateLock::acquire(&state).expect("the first agent locks the state dir");
    let checkpoint = state.join("ipam.json");
    let saved = br#"{"version":2,"allocations":[],"vnics":[]}"#;
    std::fs::write(&checkpoint, saved).unwrap();
    let before: Vec<_> = names(&state);
    // IMDS and OCI: any connection here would be a call the second agent must not make.
    let cloud = TcpListener::bind("127.0.0.1:0").unwrap();
    cloud.set_nonblocking(true).unwrap();
    let url = format!("http://{}/", cloud.local_addr().unwrap());

    let started = Instant::now();
    let mut child = Command::new(binary())
        .args(["run", "--state-dir"])
        .arg(&state)
        .args(["--imds-url", &url, "--oci-endpoint", &url])
        .arg("--socket")
        .arg(dir.path().join("second.sock"))
        .args(["--listen", "127.0.0.1:0", "--pin-dir"])
        .arg(dir.path().join("pins"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning vcnpath run");
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("a second agent must exit at once; it still runs after 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
    assert!(
        !status.success(),
        "a second agent must fail; stderr: {stderr}"
    );
    assert!(
        stderr.contains("another vcnpath agent")
            && stderr.contains(&format!("pid {}", std::process::id()))
            && stderr.contains("agent.lock"),
        "the error must say another agent (and which) holds the lock; got: {stderr}"
    );
    assert!(
        cloud.accept().is_err(),
        "the second agent connected to IMDS/OCI before giving up"
    );
    assert_eq!(
        std::fs::read(&checkpoint).unwrap(),
        saved,
        "the checkpoint is untouched"
    );
    assert_eq!(names(&state), before, "no file was created or removed");
    assert!(
        !dir.path().join("second.sock").exists() && !dir.path().join("pins").exists(),
        "no socket or pin directory was created"
    );
    drop(first);
}

fn names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}
