//! podman.socket: enabled and listening in the runner user's manager, and the
//! Docker-compatible API behind it answering.

use anyhow::{bail, Result};
use std::path::PathBuf;

use super::{CheckSpec, Context, Inspection, Repaired, Spec, Step};
use crate::checks::Observation;
use crate::podman_api::{self, EngineVersion};
use crate::systemd::UnitState;
use crate::user_manager;

pub const SOCKET_CHECK: &str = "podman-socket";
pub const API_CHECK: &str = "podman-api";

/// `/run/user/UID/podman/podman.sock`.
pub fn socket_path(cx: &Context) -> PathBuf {
    cx.user.runtime_dir().join("podman/podman.sock")
}

/// The API client for the runner user's socket: only a listener of the user's is talked to.
pub fn client(cx: &Context) -> podman_api::Client {
    podman_api::Client::new(socket_path(cx), cx.settings.podman.api_timeout).with_expected_peer(cx.user.uid)
}

/// Whether the socket file is there, looked at without following a link the user could
/// have made; `Err` says why what is there is refused (a symlink, not a socket, not the
/// user's).
fn socket_file(cx: &Context) -> Result<bool, String> {
    match crate::userfs::open_socket(&socket_path(cx), Some(cx.user.uid)) {
        Ok(found) => Ok(found.is_some()),
        Err(e) if crate::userfs::refusal(&e).is_some() => Err(e.to_string()),
        Err(_) => Ok(false),
    }
}

struct Seen {
    unit: Result<UnitState>,
    socket_file: bool,
    /// Why the file at the socket's path is refused.
    socket_refused: Option<String>,
    api: Result<EngineVersion>,
}

async fn see(cx: &Context) -> Seen {
    let unit = user_manager::status(
        &cx.user,
        &cx.settings.podman.socket_unit,
        cx.settings.linger.user_manager_timeout,
    )
    .await;
    let (socket_file, socket_refused) = match socket_file(cx) {
        Ok(present) => (present, None),
        Err(why) => (false, Some(why)),
    };
    // Only a real request proves the API: the socket file can outlive a dead listener.
    let api = if socket_file {
        client(cx).probe().await
    } else if let Some(why) = &socket_refused {
        Err(anyhow::anyhow!("{why}"))
    } else {
        Err(anyhow::anyhow!("{} does not exist", socket_path(cx).display()))
    };
    Seen { unit, socket_file, socket_refused, api }
}

pub const SPEC: Spec = Spec {
    name: "podman-socket",
    checks: &[CheckSpec::required(SOCKET_CHECK), CheckSpec::required(API_CHECK)],
    needs_live_system: true,
    // The Podman service fixes its user namespace and storage driver when it first starts:
    // give it the subordinate IDs and its configuration first.
    after: &[Step::SubIds, Step::PodmanConfig, Step::Linger],
    // Everything that talks to the user's manager or Podman needs the manager.
    requires: &[Step::Linger],
    repairs: super::always,
};

pub async fn inspect(cx: &Context) -> Inspection {
    judge(cx, &see(cx).await)
}

/// The checks and the plan for what was seen.
fn judge(cx: &Context, seen: &Seen) -> Inspection {
    let unit_name = &cx.settings.podman.socket_unit;
    let user = &cx.user.name;
    let mut plan = Vec::new();
    let socket = match &seen.unit {
        Err(e) => {
            plan.push(format!("enable and start {unit_name} for {user} once the user manager runs"));
            Observation::fail(SOCKET_CHECK, format!("{user}'s manager: {}", crate::journal::detail(e)))
        }
        Ok(state) => {
            if !state.is_enabled() {
                plan.push(format!("enable {unit_name} for {user}"));
            }
            if !state.is_active() {
                plan.push(format!("start {unit_name} for {user}"));
            } else if !seen.socket_file {
                plan.push(format!(
                    "restart {unit_name} for {user} to recreate {}",
                    socket_path(cx).display()
                ));
            }
            let ok = state.is_enabled() && state.is_active() && seen.socket_file;
            let detail = if let (true, Some(why)) = (state.is_active(), &seen.socket_refused) {
                format!("{}, but {why}", state.summary())
            } else if state.is_active() && !seen.socket_file {
                format!("{}, but {} is missing", state.summary(), socket_path(cx).display())
            } else {
                state.summary()
            };
            Observation { name: SOCKET_CHECK, ok, detail }
        }
    };
    let api = match &seen.api {
        Ok(v) => {
            Observation::pass(API_CHECK, format!("/_ping OK, Podman {} (API {})", v.version, v.api_version))
        }
        Err(e) => {
            if seen.unit.as_ref().is_ok_and(|s| s.is_active()) && seen.socket_file {
                plan.push(format!("restart {unit_name} and its service for {user}"));
            }
            Observation::fail(API_CHECK, crate::journal::detail(e))
        }
    };
    Inspection { observations: vec![socket, api], plan }
}

/// Starts (or restarts) the socket and proves the API; what it saw then is the step's
/// inspection, so the pass does not ask the user manager and the API a second time.
pub async fn converge(cx: &Context) -> Result<Repaired> {
    let seen = see(cx).await;
    let unit_was_active = seen.unit.as_ref().is_ok_and(|s| s.is_active());
    let restart = unit_was_active && (!seen.socket_file || seen.api.is_err());
    if !unit_was_active {
        if let Some(why) = super::podman_config::storage_not_ready(cx) {
            bail!(
                "not starting {} before podman-config is in place ({why}): Podman would create the storage without it",
                cx.settings.podman.socket_unit
            );
        }
    }
    let timeout = cx.settings.linger.user_manager_timeout;
    let report = user_manager::ensure(&cx.user, &cx.settings.podman.socket_unit, restart, timeout).await?;
    let changes: Vec<String> =
        report.changes.into_iter().map(|c| format!("{c} for {}", cx.user.name)).collect();
    // Prove the API before calling the step done.
    let api = match client(cx).probe().await {
        Ok(version) => version,
        Err(e) => bail!(
            "{} is active but the API does not answer: {}",
            cx.settings.podman.socket_unit,
            crate::journal::detail(&e)
        ),
    };
    // The API answered through the socket file, so the file is there; looked at anyway, as
    // inspect does, so that a refused file still says why.
    let (socket_file, socket_refused) = match socket_file(cx) {
        Ok(present) => (present, None),
        Err(why) => (false, Some(why)),
    };
    let seen = Seen { unit: Ok(report.state), socket_file, socket_refused, api: Ok(api) };
    Ok(Repaired { changes, proof: Some(judge(cx, &seen)) })
}
