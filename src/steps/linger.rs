//! Linger: logind keeps the runner user's manager (`user@UID.service`) running without a login.
//!
//! logind of systemd 257 (Debian 13, FCOS) does not come back onto the system bus when D-Bus
//! restarts: its unit stays active, every call to it waits out D-Bus's activation timeout
//! (25 s), and SSH logins stall in pam_systemd. Seen, that is repaired by restarting
//! systemd-logind.service (sessions and linger survive a logind restart).

use anyhow::{Context as _, Result};
use zbus_systemd::login1;

use super::{CheckSpec, Context, Inspection, Spec};
use crate::checks::Observation;
use crate::systemd::{self, UnitState};

pub const CHECK: &str = "linger";
const LOGIND_UNIT: &str = "systemd-logind.service";
const LOGIND_NAME: &str = "org.freedesktop.login1";
/// How long logind may be off the bus while its unit is active before the repair restarts it:
/// logind takes its name back by itself where it can (systemd 252).
const LOGIND_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

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

/// logind's unit runs but its name has no owner on the bus.
#[derive(Debug)]
struct LogindOffBus;

impl std::fmt::Display for LogindOffBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{LOGIND_UNIT} is active but not on the system bus (logind does not reconnect after D-Bus restarts)")
    }
}

impl std::error::Error for LogindOffBus {}

/// Fails with [`LogindOffBus`] when logind runs without its bus name; asking it then would
/// wait out D-Bus's activation timeout. When logind is not running, bus activation starts it.
async fn logind_on_bus(conn: &zbus::Connection) -> Result<()> {
    let bus = zbus::fdo::DBusProxy::new(conn).await?;
    let name = zbus::names::BusName::try_from(LOGIND_NAME)?;
    if bus.name_has_owner(name).await.context("asking the bus whether logind is on it")? {
        return Ok(());
    }
    if systemd::unit_state(conn, LOGIND_UNIT).await?.is_active() {
        return Err(LogindOffBus.into());
    }
    Ok(())
}

fn is_logind_off_bus(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<LogindOffBus>())
}

async fn see(cx: &Context) -> Result<Seen> {
    let conn = cx.system_bus.get().await?;
    let result = async {
        logind_on_bus(&conn).await?;
        let linger_file = cx.root.join(format!("/var/lib/systemd/linger/{}", cx.user.name));
        let lingering = is_lingering(&conn, cx.user.uid, &linger_file).await?;
        let manager = systemd::unit_state(&conn, &cx.user.manager_unit()).await?;
        Ok(Seen { lingering, manager })
    }
    .await;
    if result.as_ref().is_err_and(|e| !is_logind_off_bus(e)) {
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
        Err(e) if is_logind_off_bus(&e) => Inspection {
            observations: vec![Observation::fail(CHECK, crate::journal::detail(&e))],
            plan: vec![format!("restart {LOGIND_UNIT} if it is still off the bus in {LOGIND_GRACE:?}")],
        },
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
    let mut changes = Vec::new();
    let seen = match see(cx).await {
        Err(e) if is_logind_off_bus(&e) => {
            tokio::time::sleep(LOGIND_GRACE).await;
            let conn = cx.system_bus.get().await?;
            if logind_on_bus(&conn).await.is_err_and(|e| is_logind_off_bus(&e)) {
                let manager = systemd::manager(&conn).await?;
                systemd::restart(&manager, LOGIND_UNIT, cx.settings.linger.user_manager_timeout).await?;
                changes.push(format!("restarted {LOGIND_UNIT} (it was active but not on the system bus)"));
            }
            see(cx).await?
        }
        other => other?,
    };
    let conn = cx.system_bus.get().await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logind_off_the_bus_is_told_apart_through_the_context_chain() {
        let e = anyhow::Error::from(LogindOffBus).context("asking logind about the user");
        assert!(is_logind_off_bus(&e));
        assert!(
            crate::journal::detail(&e).contains("systemd-logind.service is active but not on the system bus")
        );
        assert!(!is_logind_off_bus(&anyhow::anyhow!("org.freedesktop.DBus.Error.TimedOut")));
    }
}
