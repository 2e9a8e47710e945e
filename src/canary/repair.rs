//! The one canary failure the agent repairs, because both the fault and the fix are known:
//! a rootless network namespace left behind by a dead holder (slirp4netns or pasta), after
//! which every container start on a network fails with "failed to mount runtime directory
//! for rootless netns" (Podman 4) or "rootless netns: ..." (Podman 5) until the stale file
//! goes (podman#13703, #14462, #24777). Podman makes a new namespace on the next start.
//!
//! It runs as the runner user (`executor-agent user-manager reset-rootless-netns`), so root
//! never removes anything in the user's runtime directory, and it only acts when no live
//! holder process exists: a working namespace is never touched.

use anyhow::{Context as _, Result};
use std::path::{Path, PathBuf};

/// Whether a failure reason is the stale rootless namespace.
pub fn is_stale_rootless_netns(reason: &str) -> bool {
    let reason = reason.to_ascii_lowercase();
    reason.contains("rootless netns") || reason.contains("rootless-netns")
}

/// The holders' PID files and the namespace files of both Podman layouts.
fn layout(runtime_dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let mut pid_files = Vec::new();
    let mut netns = Vec::new();
    // Podman 4: the netns in $XDG_RUNTIME_DIR/netns, slirp4netns' PID in libpod/tmp.
    for dir in [
        runtime_dir.join("libpod/tmp/rootless-netns"),
        runtime_dir.join("containers/networks/rootless-netns"),
    ] {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".pid") {
                pid_files.push(path);
            } else if name == "rootless-netns" {
                // Podman 5 keeps the namespace file beside its holder's PID.
                netns.push(path);
            }
        }
    }
    for entry in std::fs::read_dir(runtime_dir.join("netns")).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with("rootless-netns-") {
            netns.push(entry.path());
        }
    }
    (pid_files, netns)
}

/// A holder that still runs: its PID file names a live slirp4netns or pasta.
fn live_holder(pid_files: &[PathBuf]) -> Option<u32> {
    pid_files.iter().find_map(|file| {
        let text = std::fs::read_to_string(file).ok()?;
        let pid: u32 = text.trim().parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        let comm = comm.trim();
        (comm.starts_with("slirp4netns") || comm.starts_with("pasta")).then_some(pid)
    })
}

/// Removes the stale namespace files (as the user); returns what it removed, nothing when a
/// holder lives or there is nothing stale.
pub fn reset(runtime_dir: &Path) -> Result<Vec<String>> {
    let (pid_files, netns) = layout(runtime_dir);
    if netns.is_empty() || live_holder(&pid_files).is_some() {
        return Ok(Vec::new());
    }
    let mut removed = Vec::new();
    for path in netns.iter().chain(&pid_files) {
        let meta =
            std::fs::symlink_metadata(path).with_context(|| format!("inspecting {}", path.display()))?;
        // Only plain files: a directory or a link there is not Podman's.
        if !meta.file_type().is_file() {
            continue;
        }
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
        removed.push(format!("removed the stale rootless network namespace file {}", path.display()));
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_both_podman_messages() {
        assert!(is_stale_rootless_netns(
            "failed to mount runtime directory for rootless netns: no such file"
        ));
        assert!(is_stale_rootless_netns("rootless netns: mount \"/tmp/x/rootless-netns/run\" to \"/run\""));
        assert!(!is_stale_rootless_netns("netavark (exit code 1): nftables error"));
    }

    #[test]
    fn removes_a_namespace_whose_holder_is_dead_and_keeps_a_live_one() {
        let dir = tempfile::tempdir().unwrap();
        let rt = dir.path();
        std::fs::create_dir_all(rt.join("netns")).unwrap();
        std::fs::create_dir_all(rt.join("libpod/tmp/rootless-netns")).unwrap();
        std::fs::write(rt.join("netns/rootless-netns-858ea641"), "").unwrap();
        let pid_file = rt.join("libpod/tmp/rootless-netns/rootless-netns-slirp4netns.pid");
        // A PID that names no slirp4netns: this test process.
        std::fs::write(&pid_file, std::process::id().to_string()).unwrap();
        let removed = reset(rt).unwrap();
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(!rt.join("netns/rootless-netns-858ea641").exists());
        assert_eq!(reset(rt).unwrap(), Vec::<String>::new(), "nothing left to do");
    }
}
