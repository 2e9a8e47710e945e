//! Units over systemd's D-Bus API (system or user manager): read their state, and run start,
//! stop and restart jobs to completion.

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::time::Duration;
use zbus::proxy::CacheProperties;
use zbus::OwnedObjectPath;
use zbus_systemd::systemd1::{ManagerProxy, UnitProxy};

/// What systemd says about a unit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitState {
    pub name: String,
    pub load_state: String,
    pub active_state: String,
    pub sub_state: String,
    pub unit_file_state: String,
    /// The units this one activates (a socket's service).
    pub triggers: Vec<String>,
    /// Why a socket or service last failed (`trigger-limit-hit`, `exit-code`...), "success"
    /// otherwise; empty when systemd did not say.
    #[serde(default)]
    pub result: String,
}

impl UnitState {
    pub fn is_active(&self) -> bool {
        self.active_state == "active"
    }

    /// Enabled in a way that survives a reboot.
    pub fn is_enabled(&self) -> bool {
        matches!(self.unit_file_state.as_str(), "enabled" | "linked" | "alias" | "static" | "generated")
    }

    /// One line for a check's detail, in `systemctl status` words.
    pub fn summary(&self) -> String {
        let why = if self.active_state == "failed" && !self.result.is_empty() && self.result != "success" {
            &self.result
        } else {
            &self.sub_state
        };
        format!("{} {}, {} ({why})", self.name, self.unit_file_state, self.active_state)
    }
}

pub async fn manager(conn: &zbus::Connection) -> Result<ManagerProxy<'static>> {
    Ok(ManagerProxy::builder(conn).cache_properties(CacheProperties::No).build().await?)
}

async fn unit_proxy(conn: &zbus::Connection, path: OwnedObjectPath) -> Result<UnitProxy<'static>> {
    Ok(UnitProxy::builder(conn).path(path).cache_properties(CacheProperties::No).build().await?)
}

/// Reads a unit's state. `LoadUnit` rather than `GetUnit`, which fails for units not loaded.
pub async fn unit_state(conn: &zbus::Connection, name: &str) -> Result<UnitState> {
    let manager = manager(conn).await?;
    let path = manager.load_unit(name.to_string()).await.with_context(|| format!("loading {name}"))?;
    let unit = unit_proxy(conn, path).await?;
    let (load_state, active_state, sub_state, unit_file_state, triggers) = tokio::try_join!(
        unit.load_state(),
        unit.active_state(),
        unit.sub_state(),
        unit.unit_file_state(),
        unit.triggers(),
    )
    .with_context(|| format!("reading the state of {name}"))?;
    let result = unit_result(conn, unit.inner().path().to_owned().into(), name).await;
    Ok(UnitState {
        name: name.to_string(),
        load_state,
        active_state,
        sub_state,
        unit_file_state,
        triggers,
        result,
    })
}

/// The `Result` property of a socket or service unit; empty when it cannot be read.
async fn unit_result(conn: &zbus::Connection, path: OwnedObjectPath, name: &str) -> String {
    let interface = if name.ends_with(".socket") {
        "org.freedesktop.systemd1.Socket"
    } else if name.ends_with(".service") {
        "org.freedesktop.systemd1.Service"
    } else {
        return String::new();
    };
    let read = async {
        let properties = zbus::fdo::PropertiesProxy::builder(conn)
            .destination("org.freedesktop.systemd1")
            .path(path)
            .cache_properties(CacheProperties::No)
            .build()
            .await?;
        let value = properties
            .get(zbus::names::InterfaceName::from_static_str_unchecked(interface), "Result")
            .await?;
        Ok::<_, zbus::Error>(String::try_from(value).unwrap_or_default())
    };
    read.await.unwrap_or_default()
}

/// Runs one job-returning call (StartUnit, StopUnit, RestartUnit…) and waits for its
/// `JobRemoved`. The signal stream is opened before the call because systemd may send
/// `JobRemoved` before the method reply; the stream buffers it.
pub async fn run_job<F, Fut>(manager: &ManagerProxy<'_>, what: &str, timeout: Duration, call: F) -> Result<()>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = zbus::Result<OwnedObjectPath>>,
{
    subscribe(manager).await?;
    let mut removed = manager.receive_job_removed().await?;
    let job = call().await.with_context(|| format!("{what}: request refused"))?;
    let outcome = tokio::time::timeout(timeout, async {
        while let Some(signal) = removed.next().await {
            let args = signal.args()?;
            if args.job == job {
                return Ok(args.result);
            }
        }
        bail!("{what}: the bus closed before the job finished")
    })
    .await
    .with_context(|| format!("{what}: no result within {}", humantime::format_duration(timeout)))??;
    match outcome.as_str() {
        "done" | "skipped" => Ok(()),
        other => bail!("{what}: job {other}"),
    }
}

/// True when `error` is the D-Bus error `name` (zbus reports well-known ones as `FDO`).
pub fn is_dbus_error(error: &zbus::Error, name: &str) -> bool {
    use zbus::DBusError;
    match error {
        zbus::Error::MethodError(error_name, _, _) => error_name.as_str() == name,
        zbus::Error::FDO(fdo) => fdo.name().as_str() == name,
        _ => false,
    }
}

/// Asks systemd to send job and unit signals; a connection that already asked is fine.
pub async fn subscribe(manager: &ManagerProxy<'_>) -> Result<()> {
    match manager.subscribe().await {
        Ok(()) => Ok(()),
        Err(e) if is_dbus_error(&e, "org.freedesktop.systemd1.AlreadySubscribed") => Ok(()),
        Err(e) => Err(e).context("subscribing to systemd's signals"),
    }
}

pub async fn start(manager: &ManagerProxy<'_>, unit: &str, timeout: Duration) -> Result<()> {
    run_job(manager, &format!("starting {unit}"), timeout, || {
        manager.start_unit(unit.to_string(), "replace".into())
    })
    .await
}

pub async fn stop(manager: &ManagerProxy<'_>, unit: &str, timeout: Duration) -> Result<()> {
    run_job(manager, &format!("stopping {unit}"), timeout, || {
        manager.stop_unit(unit.to_string(), "replace".into())
    })
    .await
}

pub async fn restart(manager: &ManagerProxy<'_>, unit: &str, timeout: Duration) -> Result<()> {
    run_job(manager, &format!("restarting {unit}"), timeout, || {
        manager.restart_unit(unit.to_string(), "replace".into())
    })
    .await
}

/// systemd's object path for a unit name (`user@1000.service` → `.../unit/user_401000_2eservice`).
pub fn unit_object_path(name: &str) -> String {
    let mut path = String::from("/org/freedesktop/systemd1/unit/");
    for (i, b) in name.bytes().enumerate() {
        if b.is_ascii_alphanumeric() && !(i == 0 && b.is_ascii_digit()) {
            path.push(b as char);
        } else {
            path.push_str(&format!("_{b:02x}"));
        }
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_unit_names_like_systemd() {
        assert_eq!(
            unit_object_path("user@1000.service"),
            "/org/freedesktop/systemd1/unit/user_401000_2eservice"
        );
        assert_eq!(unit_object_path("podman.socket"), "/org/freedesktop/systemd1/unit/podman_2esocket");
    }
}
