//! The CNI network configuration the agent installs once it can serve pods. A container
//! runtime reports `NetworkReady` as soon as a configuration is in its CNI directory; written
//! by an init step, before the agent exists, it sends pods to a plugin that can only answer
//! "try again later". Written by the agent once it is ready (reconciled, datapath synced, a
//! VNIC serving pods), `NetworkReady` means pods can start. It is never removed while the
//! agent runs (running pods' DELs need it), and on shutdown only when asked (uninstalling).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::cni::config::PLUGIN_TYPE;

/// The shipped conflist; the agent names its own socket in it.
const SHIPPED: &str = include_str!("../../../deploy/10-vcnpath.conflist");

/// The conflist's file name in the runtime's CNI configuration directory.
pub const FILE_NAME: &str = "10-vcnpath.conflist";

/// Why the conflist could not be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum ConflistError {
    #[error(
        "writing the CNI configuration {} failed: {source}; check that the CNI configuration directory is mounted writable (cni.conf_dir)",
        path.display()
    )]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("removing the CNI configuration {} failed: {source}", path.display())]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The conflist for an agent serving `socket`, in `dir`.
#[derive(Clone, Debug)]
pub struct Conflist {
    path: PathBuf,
    text: String,
}

impl Conflist {
    /// The shipped conflist, its vcnpath plugin pointed at the agent's `socket` and at the
    /// `pin_dir` holding the pod program, so the plugin attaches the pod check at ADD (with
    /// another directory than the default it would find none, and a pod's first packets
    /// would go unchecked until the repair pass covers its veth).
    pub fn new(dir: &Path, socket: &Path, pin_dir: &Path) -> Self {
        let mut conflist: Value =
            serde_json::from_str(SHIPPED).expect("deploy/10-vcnpath.conflist is JSON");
        if let Some(plugins) = conflist["plugins"].as_array_mut() {
            for plugin in plugins
                .iter_mut()
                .filter(|p| p["type"].as_str() == Some(PLUGIN_TYPE))
            {
                plugin["socketPath"] = Value::from(socket.display().to_string());
                plugin["pinDir"] = Value::from(pin_dir.display().to_string());
            }
        }
        let mut text = serde_json::to_string_pretty(&conflist).expect("JSON serialises");
        text.push('\n');
        Self {
            path: dir.join(FILE_NAME),
            text,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the conflist unless it is there already with this content; true when written.
    /// Blocking.
    pub fn install(&self) -> Result<bool, ConflistError> {
        if std::fs::read_to_string(&self.path).is_ok_and(|t| t == self.text) {
            return Ok(false);
        }
        crate::host::file::replace(&self.path, self.text.as_bytes(), 0o644)
            .map(|()| true)
            .map_err(|source| ConflistError::Write {
                path: self.path.clone(),
                source,
            })
    }

    /// Removes the conflist (uninstalling): the runtime reports the network not ready.
    pub fn remove(&self) -> Result<(), ConflistError> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ConflistError::Remove {
                path: self.path.clone(),
                source: e,
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_names_the_socket_writes_once_and_remove_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let conflist = Conflist::new(
            dir.path(),
            Path::new("/run/other/vcnpath.sock"),
            Path::new("/sys/fs/bpf/other"),
        );
        assert!(conflist.install().unwrap(), "first install writes");
        assert!(!conflist.install().unwrap(), "same content: no rewrite");
        let written: Value =
            serde_json::from_str(&std::fs::read_to_string(conflist.path()).unwrap()).unwrap();
        assert_eq!(written["plugins"][0]["type"], PLUGIN_TYPE);
        assert_eq!(
            written["plugins"][0]["socketPath"],
            "/run/other/vcnpath.sock"
        );
        assert_eq!(
            written["plugins"][0]["pinDir"], "/sys/fs/bpf/other",
            "the plugin finds the pod program where the agent pinned it"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file is left"
        );
        conflist.remove().unwrap();
        assert!(!conflist.path().exists());
        conflist.remove().unwrap();
    }
}
