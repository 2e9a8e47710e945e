//! Self-eviction's record and action (src/engine/eviction.rs decides when). The record says
//! when the node last ended itself and why; it stays until the node is ready again, so a node
//! that comes back broken never ends itself a second time. The action powers the node off
//! through systemd, or runs the configured command.

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

use crate::paths::Root;

/// Beside the drain record (systemd `StateDirectory=executor-agent`): it survives a reboot.
pub const RECORD: &str = "/var/lib/executor-agent/self-eviction.json";
/// How long the configured command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// RFC 3339.
    pub at: String,
    /// The failing checks then, as the status line said them.
    pub reason: String,
    /// `power off` or the command.
    pub action: String,
}

fn path(root: &Root) -> PathBuf {
    root.join(RECORD)
}

/// The last self-eviction, if the node has not been ready since. An unreadable record counts
/// as one: never risk a loop.
pub fn recorded(root: &Root) -> Result<Option<Record>> {
    crate::system::state_file::read(&path(root), "a self-eviction record")
}

/// Written before acting: the record must be there when the node comes back.
pub fn record(root: &Root, reason: &str, action: &str) -> Result<Record> {
    let record = Record {
        at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        reason: reason.to_string(),
        action: action.to_string(),
    };
    crate::system::state_file::write(&path(root), &record)?;
    Ok(record)
}

/// The node was ready: a later spell of not being ready may end it again.
pub fn forget(root: &Root) -> Result<bool> {
    match std::fs::remove_file(path(root)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing {RECORD}")),
    }
}

/// What `act` will do, for the journal and the record.
pub fn describe(command: &[String]) -> String {
    if command.is_empty() {
        "power off through systemd's poweroff.target".into()
    } else {
        format!("run {}", command.join(" "))
    }
}

/// Powers the node off (a start job for `poweroff.target`, as `systemctl poweroff` queues it,
/// not waited for: the agent is stopped by it), or runs `command` to its end.
pub async fn act(system_bus: &crate::steps::SystemBus, command: &[String]) -> Result<()> {
    let Some((program, args)) = command.split_first() else {
        let conn = system_bus.get().await?;
        let manager = crate::systemd::manager(&conn).await?;
        manager
            .start_unit("poweroff.target".into(), "replace-irreversibly".into())
            .await
            .context("starting poweroff.target")?;
        return Ok(());
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).stdin(std::process::Stdio::null());
    let run = crate::user_manager::output_bounded(&mut cmd, 64 << 10, 64 << 10);
    let out = tokio::time::timeout(COMMAND_TIMEOUT, run)
        .await
        .with_context(|| {
            format!("{program} did not finish within {}", humantime::format_duration(COMMAND_TIMEOUT))
        })?
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} failed ({}): {}", out.status, out.reason());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_is_kept_until_forgotten_and_an_unreadable_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        assert_eq!(recorded(&root).unwrap(), None);
        let r = record(&root, "podman-api: no answer within 5s", "power off").unwrap();
        assert_eq!(recorded(&root).unwrap(), Some(r));
        assert!(forget(&root).unwrap());
        assert!(!forget(&root).unwrap());
        std::fs::write(dir.path().join(RECORD.trim_start_matches('/')), "{").unwrap();
        assert!(recorded(&root).is_err());
    }

    #[tokio::test]
    async fn the_command_runs_to_its_end_and_a_failure_says_why() {
        let bus = crate::steps::SystemBus::default();
        act(&bus, &["/bin/true".into()]).await.unwrap();
        let e =
            act(&bus, &["/bin/sh".into(), "-c".into(), "echo nope >&2; exit 3".into()]).await.unwrap_err();
        assert!(format!("{e:#}").contains("nope"), "{e:#}");
    }
}
