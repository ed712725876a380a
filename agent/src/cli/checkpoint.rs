//! `vcnpath checkpoint rebuild`: the way out of a checkpoint the agent refuses (it does not
//! parse, or contradicts itself). With the agent stopped, the refused file is kept aside and
//! the next `vcnpath run` rebuilds the record from the node itself: every address a `vcn…`
//! veth routes or the pinned `endpoints` map steers is held for its pod (see
//! [`crate::ipam::holders`]), and every free address rests a whole cooldown. A checkpoint
//! that loads is left alone: setting it aside would only forget which pod holds which address.
use std::path::Path;

use anyhow::{Context as _, bail};

use crate::daemon::{AgentConfig, StateLock, StateLockError};
use crate::datapath::DatapathMaps;
use crate::ipam::checkpoint::Checkpoint;

pub async fn rebuild(config: &AgentConfig) -> anyhow::Result<()> {
    let state_dir = &config.node.state_dir;
    // Held for the whole command: no agent may start meanwhile and read a half-done change.
    let _lock = match StateLock::acquire(state_dir) {
        Err(StateLockError::Held { holder, .. }) => bail!(
            "the agent runs ({holder}) on {}: stop it first (on Kubernetes, keep the DaemonSet's pod off this node), then run this again",
            state_dir.display()
        ),
        other => other?,
    };
    let checkpoint = Checkpoint::new(state_dir.join("ipam.json"));
    match checkpoint.load() {
        Ok(restored) if restored.found => bail!(
            "the IPAM checkpoint {} loads ({} pods): nothing to rebuild, and setting it aside would only forget which pod holds which address",
            checkpoint.path().display(),
            restored.allocations.len()
        ),
        Ok(_) => {
            println!(
                "no IPAM checkpoint at {}: the next start rebuilds it from the node",
                checkpoint.path().display()
            );
        }
        Err(refused) => {
            let kept = checkpoint
                .set_aside()
                .with_context(|| format!("setting {} aside", checkpoint.path().display()))?
                .expect("a refused checkpoint exists");
            println!("refused: {refused}");
            println!("kept as {} (nothing was deleted)", kept.display());
        }
    }
    println!("{}", node_shows(&config.datapath.pin_dir).await);
    println!(
        "the next `vcnpath run` holds each of those addresses for its pod (`recovered:<ip>` in `vcnpath status` until the runtime asks for the pod again) and lets every free address rest a whole cooldown"
    );
    Ok(())
}

/// What the node shows in use now, for the operator to compare with the pods it runs.
async fn node_shows(pin_dir: &Path) -> String {
    let endpoints = DatapathMaps::from_pins(pin_dir)
        .and_then(|maps| maps.pod_endpoints())
        .unwrap_or_default();
    let scanned = match crate::host::netlink::Netlink::connect() {
        Ok(netlink) => crate::host::pods::scan(&netlink, &endpoints).await,
        Err(error) => Err(error.into()),
    };
    match scanned {
        Ok(holders) => {
            let ips: Vec<String> = holders.iter().map(|h| h.ip.to_string()).collect();
            format!(
                "the node shows {} pod addresses in use (veths with /32 routes, the pinned endpoints map): {}",
                ips.len(),
                ips.join(" ")
            )
        }
        Err(error) => format!(
            "cannot read the node's pod veths and routes ({error:#}); the next start reads them again"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> AgentConfig {
        let mut config = AgentConfig::default();
        config.node.state_dir = dir.to_owned();
        config.datapath.pin_dir = dir.join("no-pins");
        config
    }

    #[tokio::test]
    async fn a_refused_checkpoint_is_kept_aside_intact() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ipam.json"), b"{\"version\": 2, \"alloc").unwrap();
        rebuild(&config(dir.path())).await.expect("rebuild");
        assert!(!dir.path().join("ipam.json").exists());
        let kept: Vec<Vec<u8>> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("ipam.json.refused-")
            })
            .map(|e| std::fs::read(e.path()).unwrap())
            .collect();
        assert_eq!(kept, [b"{\"version\": 2, \"alloc".to_vec()]);
    }

    #[tokio::test]
    async fn a_checkpoint_that_loads_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let checkpoint = Checkpoint::new(dir.path().join("ipam.json"));
        checkpoint.save([].iter(), [].iter()).unwrap();
        let before = std::fs::read(checkpoint.path()).unwrap();
        let err = rebuild(&config(dir.path())).await.expect_err("refused");
        assert!(err.to_string().contains("nothing to rebuild"), "{err}");
        assert_eq!(std::fs::read(checkpoint.path()).unwrap(), before);
    }

    #[tokio::test]
    async fn nothing_is_touched_while_the_agent_runs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ipam.json"), b"not json").unwrap();
        let _agent = StateLock::acquire(dir.path()).unwrap();
        let err = rebuild(&config(dir.path())).await.expect_err("refused");
        assert!(err.to_string().contains("stop it first"), "{err}");
        assert_eq!(
            std::fs::read(dir.path().join("ipam.json")).unwrap(),
            b"not json"
        );
    }
}
