//! The runner user's own systemd manager. Root cannot talk on a user's bus, so the agent runs
//! itself as the user (`executor-agent user-manager …`) and reads the JSON it prints.

use anyhow::{anyhow, bail, Context, Result};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt};

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

// ------------------------------------------------------------------------------------------------
// Helper output. A helper runs as the runner user, who can ptrace it and make it print anything:
// its output is read incrementally with bounds, and the child is killed when it says too much.

/// Most of a helper's answer on stdout that is read (a unit state is about 1 KiB).
pub const MAX_STDOUT: usize = 1 << 20;
/// Most of a helper's stderr that is read; its last line is the error's reason.
pub const MAX_STDERR: usize = 64 << 10;
/// Longest line from the watcher helper (one JSON array of unit states).
pub const MAX_WATCH_LINE: usize = 64 << 10;
/// Most of a helper's reason that reaches a check's detail.
const MAX_REASON_CHARS: usize = 300;

/// "1 MiB", "64 KiB", "12 bytes".
fn size_text(n: usize) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} bytes"),
    }
}

/// What a helper printed, read within bounds.
#[derive(Debug)]
pub struct BoundedOutput {
    pub status: std::process::ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl BoundedOutput {
    /// The last non-empty line of stderr, as one bounded line without control characters.
    pub fn reason(&self) -> String {
        let stderr = String::from_utf8_lossy(&self.stderr);
        let reason = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message");
        crate::text::one_line(reason.trim_start_matches("error: "), MAX_REASON_CHARS)
    }
}

/// Reads `r` to its end, at most `max` bytes; more is an error naming `what` and the bound.
async fn read_capped<R: AsyncRead + Unpin>(r: R, max: usize, what: &str) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    r.take(max as u64 + 1).read_to_end(&mut bytes).await?;
    if bytes.len() > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("more than {} on {what}", size_text(max)),
        ));
    }
    Ok(bytes)
}

/// Runs `cmd` with stdout and stderr piped and reads both as they come, at most `max_stdout`
/// and `max_stderr` bytes; a child that writes more is killed and the run is an error. Bound
/// the time with an outer timeout: dropping the future kills the child (`kill_on_drop`).
pub async fn output_bounded(
    cmd: &mut tokio::process::Command,
    max_stdout: usize,
    max_stderr: usize,
) -> std::io::Result<BoundedOutput> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let read = tokio::try_join!(
        read_capped(stdout, max_stdout, "standard output"),
        read_capped(stderr, max_stderr, "standard error"),
    );
    match read {
        Ok((stdout, stderr)) => Ok(BoundedOutput { status: child.wait().await?, stdout, stderr }),
        Err(e) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            Err(std::io::Error::new(e.kind(), format!("the helper wrote {e}; stopped it")))
        }
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
    cmd.arg("user-manager").args(args).stdin(Stdio::null());
    let output = tokio::time::timeout(timeout, output_bounded(&mut cmd, MAX_STDOUT, MAX_STDERR))
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
        bail!("{}", output.reason());
    }
    // from_slice refuses trailing garbage after the one JSON value.
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

/// Reads one line (without its newline) into `line`, at most `max` bytes; `Ok(false)` at the
/// end of the stream with nothing read. A longer line is an error: nothing past `max` bytes
/// is kept, however long the writer goes on.
pub async fn read_line_capped<R: AsyncBufRead + Unpin>(
    r: &mut R,
    line: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<bool> {
    line.clear();
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            // The last line may lack its newline.
            return Ok(!line.is_empty());
        }
        let (chunk, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if line.len() + chunk.len() > max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a line longer than {}", size_text(max)),
            ));
        }
        line.extend_from_slice(chunk);
        let used = done.unwrap_or(chunk.len());
        r.consume(used);
        if done.is_some() {
            return Ok(true);
        }
    }
}

/// A running `user-manager watch` helper; each line it prints is a wake-up for the daemon.
pub struct Watcher {
    child: tokio::process::Child,
    stdout: tokio::io::BufReader<tokio::process::ChildStdout>,
    line: Vec<u8>,
}

impl Watcher {
    pub fn spawn(user: &Account, units: &[&str]) -> Result<Watcher> {
        let exe = std::env::current_exe()?;
        let mut cmd = user.command(&exe)?;
        cmd.arg("user-manager").arg("watch").args(units);
        Watcher::from_command(cmd)
            .with_context(|| format!("starting the user manager watcher as {}", user.name))
    }

    /// Runs `cmd` as a watcher (its stdout read line by line, its stderr discarded).
    pub fn from_command(mut cmd: tokio::process::Command) -> Result<Watcher> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().context("watcher has no stdout")?;
        Ok(Watcher { child, stdout: tokio::io::BufReader::new(stdout), line: Vec::new() })
    }

    /// The next state report; `Ok(None)` once the watcher has exited. A line longer than
    /// [`MAX_WATCH_LINE`] stops the watcher and is an error (the daemon starts a new one);
    /// a line that is not a JSON array of unit states is skipped.
    pub async fn next(&mut self) -> Result<Option<Vec<UnitState>>> {
        loop {
            match read_line_capped(&mut self.stdout, &mut self.line, MAX_WATCH_LINE).await {
                Ok(true) => match serde_json::from_slice(&self.line) {
                    Ok(states) => return Ok(Some(states)),
                    Err(_) => continue,
                },
                Ok(false) => {
                    let _ = self.child.wait().await;
                    return Ok(None);
                }
                Err(e) => {
                    let _ = self.child.start_kill();
                    let _ = self.child.wait().await;
                    if e.kind() == std::io::ErrorKind::InvalidData {
                        bail!("the user manager watcher wrote {e}; stopped it");
                    }
                    return Err(e).context("reading the user manager watcher's output");
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.arg("-c").arg(script).stdin(Stdio::null());
        cmd
    }

    /// Every test here ends within this, whatever the helper does.
    const BOUND: Duration = Duration::from_secs(20);

    #[tokio::test]
    async fn output_within_the_bounds_is_read_whole() {
        let script = r#"printf '{"a":1}'; printf 'warning: x\nerror: it broke\n\n' >&2; exit 3"#;
        let out = output_bounded(&mut sh(script), 100, 100).await.unwrap();
        assert_eq!(out.stdout, br#"{"a":1}"#);
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.reason(), "it broke");
        let out = output_bounded(&mut sh("printf 1234"), 4, 0).await.unwrap();
        assert_eq!(out.stdout, b"1234");
        assert_eq!(out.reason(), "no message");
    }

    #[tokio::test]
    async fn a_helper_that_writes_too_much_is_stopped() {
        // `yes` never stops by itself: read unbounded, it would fill the agent's memory.
        let mut yes = sh("exec yes");
        let run = output_bounded(&mut yes, 1 << 20, 1024);
        let err = tokio::time::timeout(BOUND, run).await.expect("the bound ends it").unwrap_err();
        assert_eq!(err.to_string(), "the helper wrote more than 1 MiB on standard output; stopped it");
        let mut yes = sh("exec yes >&2");
        let run = output_bounded(&mut yes, 1 << 20, 64 << 10);
        let err = tokio::time::timeout(BOUND, run).await.expect("the bound ends it").unwrap_err();
        assert_eq!(err.to_string(), "the helper wrote more than 64 KiB on standard error; stopped it");
        // One byte over is over.
        let err = output_bounded(&mut sh("printf 12345"), 4, 0).await.unwrap_err();
        assert_eq!(err.to_string(), "the helper wrote more than 4 bytes on standard output; stopped it");
    }

    #[tokio::test]
    async fn the_reason_is_one_clean_bounded_line() {
        let script = r#"printf 'error: bad\033[2J\rred\a\000x\n' >&2; exit 1"#;
        let out = output_bounded(&mut sh(script), 10, 1000).await.unwrap();
        assert_eq!(out.reason(), "bad [2J red x");
        let out = output_bounded(&mut sh("head -c 5000 /dev/zero | tr '\\0' y >&2; exit 1"), 10, 10_000)
            .await
            .unwrap();
        let reason = out.reason();
        assert_eq!(reason.chars().count(), MAX_REASON_CHARS);
        assert!(reason.ends_with('…'), "{reason}");
    }

    #[tokio::test]
    async fn lines_are_read_with_a_bound() {
        let mut line = Vec::new();
        let mut input: &[u8] = b"one\ntwo\n\nlast";
        for want in [&b"one"[..], b"two", b"", b"last"] {
            assert!(read_line_capped(&mut input, &mut line, 8).await.unwrap());
            assert_eq!(line, want);
        }
        assert!(!read_line_capped(&mut input, &mut line, 8).await.unwrap());
        let mut input: &[u8] = b"12345678\n123456789\n";
        assert!(read_line_capped(&mut input, &mut line, 8).await.unwrap());
        let err = read_line_capped(&mut input, &mut line, 8).await.unwrap_err();
        assert_eq!(err.to_string(), "a line longer than 8 bytes");
    }

    #[tokio::test]
    async fn the_watcher_reports_states_and_skips_what_is_not() {
        let mut w = Watcher::from_command(sh("printf '[]\\nnot json\\n[] trailing\\n[]'")).unwrap();
        assert_eq!(w.next().await.unwrap(), Some(vec![]));
        // "[] trailing" is not one JSON value: skipped like garbage.
        assert_eq!(w.next().await.unwrap(), Some(vec![]));
        assert_eq!(w.next().await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_watcher_line_that_never_ends_stops_the_watcher() {
        // A line without end: without the bound the agent would buffer it forever.
        let mut w = Watcher::from_command(sh("exec cat /dev/zero")).unwrap();
        let err = tokio::time::timeout(BOUND, w.next()).await.expect("the bound ends it").unwrap_err();
        assert_eq!(err.to_string(), "the user manager watcher wrote a line longer than 64 KiB; stopped it");
        // The child was killed, not left writing.
        let status = tokio::time::timeout(BOUND, w.child.wait()).await.unwrap().unwrap();
        assert!(!status.success());
    }
}
