//! Drain (maintenance): an operator marks the node not ready with a reason, e.g. before
//! scale-in or an update. Kept in a state file so it survives an agent restart; the `drain`
//! step reports it, `drain`/`undrain` (control socket, token over HTTP) change it.

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use crate::paths::Root;

/// The agent's state directory (systemd `StateDirectory=executor-agent`).
pub const STATE_FILE: &str = "/var/lib/executor-agent/drain.json";

/// Why and since when the node is drained, and who asked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    pub reason: String,
    /// RFC 3339.
    pub since: String,
    /// Who asked: `uid 0 over /run/executor-agent/control.sock` or `token over HTTP`.
    pub by: String,
}

pub fn state_file(root: &Root) -> PathBuf {
    root.join(STATE_FILE)
}

/// The current drain, if any. An unreadable state file counts as drained: never make a
/// node ready by accident.
pub fn current(root: &Root) -> Result<Option<Drain>> {
    crate::system::state_file::read(&state_file(root), "a drain record")
}

/// Marks the node drained (replacing an earlier reason).
pub fn drain(root: &Root, reason: &str, by: &str) -> Result<Drain> {
    let record = Drain {
        reason: reason.to_string(),
        since: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        by: by.to_string(),
    };
    crate::system::state_file::write(&state_file(root), &record)?;
    Ok(record)
}

/// Ends a drain; returns the one that ended.
pub fn undrain(root: &Root) -> Result<Option<Drain>> {
    let ended = current(root).ok().flatten();
    match std::fs::remove_file(state_file(root)) {
        Ok(()) => Ok(ended),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).context("removing the drain record"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_survives_in_the_state_file_until_undrain() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        assert_eq!(current(&root).unwrap(), None);
        let d = drain(&root, "scale-in", "uid 0 over the control socket").unwrap();
        assert_eq!(current(&root).unwrap(), Some(d.clone()));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(state_file(&root)).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(undrain(&root).unwrap(), Some(d));
        assert_eq!(current(&root).unwrap(), None);
        assert_eq!(undrain(&root).unwrap(), None);
    }

    #[test]
    fn a_corrupt_record_counts_as_drained() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        std::fs::create_dir_all(state_file(&root).parent().unwrap()).unwrap();
        std::fs::write(state_file(&root), "{not json").unwrap();
        assert!(current(&root).is_err());
    }
}
