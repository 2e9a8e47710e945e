//! Subordinate IDs: the runner user owns enough IDs in /etc/subuid and /etc/subgid for
//! rootless Podman's user namespace.

use anyhow::{bail, Context as _, Result};

use super::{CheckSpec, Context, Inspection, Spec};
use crate::checks::Observation;
use crate::subid::{self, EnsureOutcome, IdKind, IdRange};
use crate::user_manager;

pub const SUBUID_CHECK: &str = "subuid";
pub const SUBGID_CHECK: &str = "subgid";

fn check_name(kind: IdKind) -> &'static str {
    match kind {
        IdKind::Uid => SUBUID_CHECK,
        IdKind::Gid => SUBGID_CHECK,
    }
}

fn ranges(owned: &[IdRange]) -> String {
    owned.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ")
}

pub const SPEC: Spec = Spec {
    name: "subids",
    checks: &[CheckSpec::required(SUBUID_CHECK), CheckSpec::required(SUBGID_CHECK)],
    needs_live_system: false,
    after: &[],
    requires: &[],
    repairs: super::always,
};

pub async fn inspect(cx: &Context) -> Inspection {
    let user = cx.user.as_subid_owner();
    let mut inspection = Inspection::default();
    for kind in [IdKind::Uid, IdKind::Gid] {
        let name = check_name(kind);
        let observation = match subid::inspect(&cx.root, kind, &user, cx.settings.subids.count) {
            Err(e) => Observation::fail(name, e.to_string()),
            Ok(view) => match view.would_add {
                None => Observation::pass(name, format!("{} owns {}", user.name, ranges(&view.owned))),
                Some(range) => {
                    inspection.plan.push(format!(
                        "add {}:{}:{} to {}",
                        user.name,
                        range.start,
                        range.count,
                        kind.file_name()
                    ));
                    let has =
                        if view.owned.is_empty() { "no range".to_string() } else { ranges(&view.owned) };
                    Observation::fail(
                        name,
                        format!("{} owns {has}; needs {}", user.name, cx.settings.subids.count),
                    )
                }
            },
        };
        inspection.observations.push(observation);
    }
    inspection
}

pub async fn converge(cx: &Context) -> Result<Vec<String>> {
    let user = cx.user.as_subid_owner();
    let mut changes = Vec::new();
    for kind in [IdKind::Uid, IdKind::Gid] {
        let (root, count, timeout) =
            (cx.root.clone(), cx.settings.subids.count, cx.settings.subids.lock_timeout);
        let owner = user.clone();
        // Locking may wait on another writer: keep the runtime's threads free.
        let outcome =
            tokio::task::spawn_blocking(move || subid::ensure(&root, kind, &owner, count, timeout)).await??;
        if let EnsureOutcome::Added { range } = outcome {
            changes.push(format!(
                "added {}:{}:{} to {}",
                user.name,
                range.start,
                range.count,
                kind.file_name()
            ));
        }
    }
    if !changes.is_empty() && cx.root.is_host() && has_used_podman(cx) {
        migrate(cx).await?;
        changes.push(format!("ran podman system migrate as {}", user.name));
    }
    Ok(changes)
}

/// Podman keeps its user namespace (and so the old ranges) in the pause process and storage.
fn has_used_podman(cx: &Context) -> bool {
    cx.user.home.join(".local/share/containers/storage").exists()
}

async fn migrate(cx: &Context) -> Result<()> {
    if let Some(why) = super::podman_config::user_config_refused(cx) {
        bail!("not running podman system migrate as {} while {why}", cx.user.name);
    }
    user_manager::migrate(&cx.user, std::time::Duration::from_secs(120))
        .await
        .with_context(|| format!("podman system migrate as {}", cx.user.name))
}
