//! Linger: logind keeps the runner user's manager (`user@UID.service`) running without a login.

use anyhow::{Context as _, Result};
use zbus_systemd::login1;

use super::{CheckSpec, Context, Inspection, Spec};
use crate::checks::Observation;
use crate::systemd::{self, UnitState};

pub const CHECK: &str = "linger";

struct Seen {
    lingering: bool,
    manager: UnitState,
}

async fn is_lingering(conn: &zbus::Connection, uid: u32, linger_file: &std::path::Path) -> Result<bool> {
    let logind = login1::ManagerProxy::new(conn).await?;
    // logind forgets a user whose manager failed even though linger is on; its linger file
    // (which SetUserLinger writes) then still says the truth.
    let path = match logind.get_user(uid).await {
        Ok(path) => path,
        Err(e) if systemd::is_dbus_error(&e, "org.freedesktop.login1.NoSuchUser") => {
            return Ok(linger_file.exists())
        }
        Err(e) => return Err(e).context("asking logind about the user"),
    };
    let user = login1::UserProxy::builder(conn)
        .path(path)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    match user.linger().await {
        Ok(linger) => Ok(linger),
        // The user object went away between the two calls: logind just dropped the user.
        Err(e) if systemd::is_dbus_error(&e, "org.freedesktop.DBus.Error.UnknownObject") => {
            Ok(linger_file.exists())
        }
        Err(e) => Err(e).context("reading the user's Linger property"),
    }
}

async fn see(cx: &Context) -> Result<Seen> {
    let conn = cx.system_bus.get().await?;
    let result = async {
        let linger_file = cx.root.join(format!("/var/lib/systemd/linger/{}", cx.user.name));
        let lingering = is_lingering(&conn, cx.user.uid, &linger_file).await?;
        let manager = systemd::unit_state(&conn, &cx.user.manager_unit()).await?;
        Ok(Seen { lingering, manager })
    }
    .await;
    if result.is_err() {
        cx.system_bus.reset().await;
    }
    result
}

pub const SPEC: Spec = Spec {
    name: "linger",
    checks: &[CheckSpec::required(CHECK)],
    needs_live_system: true,
    after: &[],
    requires: &[],
    repairs: super::always,
};

pub async fn inspect(cx: &Context) -> Inspection {
    let user = &cx.user.name;
    match see(cx).await {
        Err(e) => Inspection {
            observations: vec![Observation::fail(CHECK, crate::journal::detail(&e))],
            plan: vec![format!("enable linger for {user} once the system bus answers")],
        },
        Ok(seen) => {
            let mut plan = Vec::new();
            if !seen.lingering {
                plan.push(format!("enable linger for {user} (logind SetUserLinger)"));
            }
            if !seen.manager.is_active() {
                plan.push(format!("start {} and wait until it is active", seen.manager.name));
            }
            let detail = match (seen.lingering, seen.manager.is_active()) {
                (true, true) => format!("linger on for {user}, {} active", seen.manager.name),
                (false, _) => format!("linger off for {user}"),
                (true, false) => format!("linger on for {user}, but {}", seen.manager.summary()),
            };
            let ok = plan.is_empty();
            Inspection { observations: vec![Observation { name: CHECK, ok, detail }], plan }
        }
    }
}

pub async fn converge(cx: &Context) -> Result<Vec<String>> {
    let seen = see(cx).await?;
    let conn = cx.system_bus.get().await?;
    let mut changes = Vec::new();
    if !seen.lingering {
        let logind = login1::ManagerProxy::new(&conn).await?;
        logind
            .set_user_linger(cx.user.uid, true, false)
            .await
            .with_context(|| format!("enabling linger for {}", cx.user.name))?;
        changes.push(format!("enabled linger for {}", cx.user.name));
    }
    if !seen.manager.is_active() || !seen.lingering {
        // SetUserLinger only queues the start: wait for it as for our own job ("replace"
        // merges with logind's job).
        let manager = systemd::manager(&conn).await?;
        if seen.manager.active_state == "failed" {
            manager.reset_failed_unit(seen.manager.name.clone()).await?;
        }
        // Right after linger was turned off the manager may still be stopping, and a start
        // queued behind that stop fails: try again shortly rather than after a full backoff.
        let timeout = cx.settings.linger.user_manager_timeout;
        let mut attempt = 1;
        while let Err(e) = systemd::start(&manager, &seen.manager.name, timeout).await {
            if attempt == 3 {
                return Err(e);
            }
            attempt += 1;
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        if !seen.manager.is_active() {
            changes.push(format!("started {}", seen.manager.name));
        }
    }
    Ok(changes)
}
