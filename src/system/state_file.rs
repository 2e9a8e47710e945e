//! The agent's small JSON state files under /var/lib/executor-agent (the drain record, the
//! self-eviction record, FleetLock's holder): read whole, replaced atomically, root-only.

use anyhow::{Context as _, Result};
use serde::{de::DeserializeOwned, Serialize};
use std::path::Path;

use crate::fsutil;

/// The record at `path`, `None` when there is none; `what` names it in the error.
pub fn read<T: DeserializeOwned>(path: &Path, what: &str) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes).with_context(|| format!("{} is not {what}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes `record` at `path` (0600, its directory made if missing), never half.
pub fn write<T: Serialize>(path: &Path, record: &T) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut bytes = serde_json::to_vec_pretty(record)?;
    bytes.push(b'\n');
    fsutil::replace_file_atomically(path, &bytes, 0o600)
        .with_context(|| format!("writing {}", path.display()))
}
