//! The runner user's own systemd manager. Root cannot talk on a user's bus, so the agent runs
//! itself as the user (`executor-agent user-manager …`) and reads the JSON it prints.

use anyhow::{anyhow, bail, Context, Result};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::runner_user::Account;
use crate::systemd::{self, UnitState};

/// What `ensure` changed, for the journal.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnsureReport {
    pub changes: Vec<String>,
    pub state: UnitState,
}

/// Makes a socket unit enabled and listening; with `restart`, also replaces a running
/// listener (the socket file was deleted, or the API behind it stopped answering).
pub async fn ensure_socket(
    conn: &zbus::Connection,
    unit: &str,
    restart: bool,
    timeout: Duration,
) -> Result<EnsureReport> {
    let manager = systemd::manager(conn).await?;
    let mut changes = Vec::new();
    let state = systemd::unit_state(conn, unit).await?;
    match state.load_state.as_str() {
        "loaded" => {}
        "masked" => bail!("{unit} is masked in the user manager"),
        "not-found" => {
            bail!("{unit} is not installed (no unit file in the user manager's search path)")
        }
        other => bail!("{unit} could not be loaded ({other})"),
    }
    if !state.is_enabled() {
        manager
            .enable_unit_files(vec![unit.to_string()], false, true)
            .await
            .with_context(|| format!("enabling {unit}"))?;
        manager.reload().await.context("reloading the user manager")?;
        changes.push(format!("enabled {unit}"));
    }
    if state.active_state == "failed" {
        manager.reset_failed_unit(unit.to_string()).await.with_context(|| format!("resetting {unit}"))?;
    }
    if restart && state.is_active() {
        // A socket unit cannot be restarted under a running service; stop the service first.
        for service in &state.triggers {
            systemd::stop(&manager, service, timeout).await?;
        }
        systemd::restart(&manager, unit, timeout).await?;
        changes.push(format!("restarted {unit}"));
    } else if !state.is_active() {
        systemd::start(&manager, unit, timeout).await?;
        changes.push(format!("started {unit}"));
    }
    let state = systemd::unit_state(conn, unit).await?;
    if !state.is_active() {
        bail!("{} after starting it", state.summary());
    }
    Ok(EnsureReport { changes, state })
}

/// Runs a command as a transient oneshot service of the user's manager and waits for it.
/// Running it there rather than as the agent's child keeps it out of the agent's sandbox
/// (Podman needs user namespaces and setuid newuidmap, which the agent's unit forbids).
pub async fn run_transient(
    conn: &zbus::Connection,
    unit: &str,
    argv: &[String],
    timeout: Duration,
) -> Result<()> {
    use zbus::{OwnedVariant, Variant};
    let manager = systemd::manager(conn).await?;
    let program = argv.first().context("empty command")?.clone();
    let variant = |v: Variant<'_>| OwnedVariant::try_from(v).map_err(anyhow::Error::from);
    let properties = vec![
        ("Description".to_string(), variant(Variant::from(format!("executor-agent: {}", argv.join(" "))))?),
        ("Type".to_string(), variant(Variant::from("oneshot"))?),
        ("CollectMode".to_string(), variant(Variant::from("inactive-or-failed"))?),
        ("ExecStart".to_string(), variant(Variant::from(vec![(program, argv.to_vec(), false)]))?),
    ];
    systemd::run_job(&manager, &format!("running {} in the user manager", argv.join(" ")), timeout, || {
        manager.start_transient_unit(unit.to_string(), "replace".into(), properties, vec![])
    })
    .await
}

/// Prints one JSON line of unit states whenever one of them may have changed, until the bus
/// goes away (the user manager stopped). Run as the user by the daemon.
pub async fn watch(conn: &zbus::Connection, units: &[String]) -> Result<()> {
    let manager = systemd::manager(conn).await?;
    systemd::subscribe(&manager).await?;
    let mut signals = zbus::MessageStream::for_match_rule(
        zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .sender("org.freedesktop.systemd1")
            .build()?,
        conn,
        std::num::NonZeroUsize::new(64),
    )
    .await?;
    let mut stdout = tokio::io::stdout();
    let mut last = String::new();
    loop {
        let mut states = Vec::with_capacity(units.len());
        for unit in units {
            states.push(systemd::unit_state(conn, unit).await?);
        }
        // Sub-states are left out: a socket goes "listening" -> "running" each time the
        // API is used, and the agent's own probes must not wake it again.
        let key: Vec<_> =
            states.iter().map(|s| (&s.load_state, &s.active_state, &s.unit_file_state)).collect();
        let key = serde_json::to_string(&key)?;
        if key != last {
            let line = serde_json::to_string(&states)? + "\n";
            stdout.write_all(line.as_bytes()).await?;
            stdout.flush().await?;
            last = key;
        }
        // Any systemd signal may concern our units; re-reading two units is cheap.
        match signals.next().await {
            Some(_) => {}
            None => return Ok(()),
        }
        // Coalesce a burst (a restart emits several PropertiesChanged).
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(5), signals.next()).await {}
    }
}

/// Runs `executor-agent user-manager ARGS` as the user and parses its JSON answer.
pub async fn call_as<T: serde::de::DeserializeOwned>(
    user: &Account,
    args: &[&str],
    timeout: Duration,
) -> Result<T> {
    let exe = std::env::current_exe().context("finding our own executable")?;
    let mut cmd = user.command(&exe)?;
    cmd.arg("user-manager").args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let output = tokio::time::timeout(timeout, cmd.output())
        .await
        .map_err(|_| {
            anyhow!(
                "no answer from {}'s user manager within {}",
                user.name,
                humantime::format_duration(timeout)
            )
        })?
        .with_context(|| format!("running {} as {}", exe.display(), user.name))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let reason = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message");
        bail!("{}", reason.trim_start_matches("error: "));
    }
    serde_json::from_slice(&output.stdout).context("parsing the user manager helper's answer")
}

/// The state of `unit` in the user's manager.
pub async fn status(user: &Account, unit: &str, timeout: Duration) -> Result<UnitState> {
    call_as(user, &["status", unit], timeout).await
}

/// `ensure_socket`, run as the user.
pub async fn ensure(user: &Account, unit: &str, restart: bool, timeout: Duration) -> Result<EnsureReport> {
    let timeout_arg = format!("{}ms", timeout.as_millis());
    let mut args = vec!["ensure", unit, "--timeout", timeout_arg.as_str()];
    if restart {
        args.push("--restart");
    }
    // Leave the helper time to report its own timeout before ours fires.
    call_as(user, &args, timeout * 2 + Duration::from_secs(2)).await
}

fn find_in_path(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| p.is_file())
}

/// `podman system migrate`, run by the user's manager.
pub async fn migrate(user: &Account, timeout: Duration) -> Result<()> {
    let timeout_arg = format!("{}ms", timeout.as_millis());
    call_as::<serde_json::Value>(
        user,
        &["migrate", "--timeout", timeout_arg.as_str()],
        timeout + Duration::from_secs(2),
    )
    .await
    .map(drop)
}

/// `canary::repair::reset`, run as the user; returns what it removed.
pub async fn reset_rootless_netns(user: &Account) -> Result<Vec<String>> {
    call_as(user, &["reset-rootless-netns"], Duration::from_secs(10)).await
}

/// A running `user-manager watch` helper; each line it prints is a wake-up for the daemon.
pub struct Watcher {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Watcher {
    pub fn spawn(user: &Account, units: &[&str]) -> Result<Watcher> {
        let exe = std::env::current_exe()?;
        let mut cmd = user.command(&exe)?;
        cmd.arg("user-manager").arg("watch").args(units);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
        let mut child =
            cmd.spawn().with_context(|| format!("starting the user manager watcher as {}", user.name))?;
        let stdout = child.stdout.take().context("watcher has no stdout")?;
        Ok(Watcher { child, lines: tokio::io::BufReader::new(stdout).lines() })
    }

    /// The next state report; `None` once the watcher has exited.
    pub async fn next(&mut self) -> Option<Vec<UnitState>> {
        loop {
            match self.lines.next_line().await {
                Ok(Some(line)) => match serde_json::from_str(&line) {
                    Ok(states) => return Some(states),
                    Err(_) => continue,
                },
                _ => {
                    let _ = self.child.wait().await;
                    return None;
                }
            }
        }
    }
}

/// Entry point of the helper, already running as the user.
pub async fn helper_main(command: crate::cli::UserManagerCommand) -> Result<()> {
    use crate::cli::UserManagerCommand as C;
    if let C::ResetRootlessNetns = command {
        let runtime_dir = std::env::var_os("XDG_RUNTIME_DIR").context("XDG_RUNTIME_DIR is not set")?;
        let removed = crate::canary::repair::reset(std::path::Path::new(&runtime_dir))?;
        println!("{}", serde_json::to_string(&removed)?);
        return Ok(());
    }
    let conn = zbus::Connection::session().await.map_err(|e| {
        let bus = std::env::var("DBUS_SESSION_BUS_ADDRESS").unwrap_or_default();
        let bus = bus.trim_start_matches("unix:path=");
        match e {
            zbus::Error::InputOutput(io) => anyhow!("the user manager is not running ({bus}: {io})"),
            other => anyhow!("cannot reach the user manager at {bus}: {other}"),
        }
    })?;
    let mut stdout = tokio::io::stdout();
    match command {
        C::Status { unit } => {
            let state = systemd::unit_state(&conn, &unit).await?;
            stdout.write_all(&serde_json::to_vec(&state)?).await?;
        }
        C::Ensure { unit, restart, timeout } => {
            let report = ensure_socket(&conn, &unit, restart, timeout.into()).await?;
            stdout.write_all(&serde_json::to_vec(&report)?).await?;
        }
        C::Watch { units } => watch(&conn, &units).await?,
        C::ResetRootlessNetns => unreachable!("handled before connecting"),
        C::Migrate { timeout } => {
            let podman = find_in_path("podman").context("podman is not installed")?;
            let argv = [podman.display().to_string(), "system".into(), "migrate".into()];
            run_transient(&conn, "executor-agent-podman-migrate.service", &argv, timeout.into()).await?;
            stdout.write_all(b"{}").await?;
        }
    }
    stdout.flush().await?;
    Ok(())
}
