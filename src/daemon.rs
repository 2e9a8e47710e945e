//! The daemon: converge, then keep watching; repair drift with backoff; publish readiness to
//! the HTTP endpoint, systemd (READY/STATUS/WATCHDOG/STOPPING) and the journal.

use anyhow::{Context as _, Result};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{watch, Notify};

use crate::checks::{CheckSet, Observation};
use crate::control::{self, ControlState};
use crate::http::{self, AppState, Snapshot};
use crate::identity;
use crate::journal;
use crate::metrics::Metrics;
use crate::steps::{self, Context, Inspection, Step};
use crate::watch::{FileWatcher, UserWatch, WatchedDir};

/// The loop wakes at least this often to prove it is alive (healthz, watchdog).
const TICK: Duration = Duration::from_secs(5);
/// A pass that takes longer than this is abandoned (its helpers killed) so the loop goes on.
pub fn pass_limit(settings: &crate::config::Settings) -> Duration {
    // Linger's start job, then podman.socket's stop and restart jobs, then two API requests.
    settings.linger.user_manager_timeout * 4 + settings.podman.api_timeout * 2
}

/// Events often come in bursts (a rename is a delete and a create): wait this long for more.
const COALESCE: Duration = Duration::from_millis(20);

/// Exponential backoff for a step that keeps failing, reset when it converges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backoff {
    failures: u32,
    next_attempt: Option<Instant>,
}

impl Backoff {
    pub const fn new() -> Self {
        Backoff { failures: 0, next_attempt: None }
    }

    pub fn may_attempt(&self, now: Instant) -> bool {
        self.next_attempt.is_none_or(|t| now >= t)
    }

    /// Records a failed attempt; returns the delay until the next one.
    pub fn failed(&mut self, now: Instant, min: Duration, max: Duration) -> Duration {
        let delay = min.saturating_mul(1u32 << self.failures.min(20)).min(max);
        self.failures += 1;
        self.next_attempt = Some(now + delay);
        delay
    }

    pub fn succeeded(&mut self) {
        *self = Backoff::new();
    }

    pub fn next_attempt(&self) -> Option<Instant> {
        self.next_attempt
    }
}

/// One pass's outcome for the caller (the daemon or `apply`).
pub struct PassResult {
    pub inspections: Vec<(Step, Inspection)>,
    /// Steps whose repair was attempted.
    pub attempted: Vec<Step>,
    pub changes: Vec<(Step, String)>,
    pub errors: Vec<(Step, anyhow::Error)>,
}

/// Converges the steps that `seen` shows drifted (dependencies first, independent steps
/// concurrently, each only when its backoff allows), and inspects the repaired ones again
/// (unless the repair already proved its result).
pub async fn repair_pass(
    cx: &Context,
    steps: &[Step],
    seen: Vec<(Step, Inspection)>,
    backoff: &mut HashMap<Step, Backoff>,
) -> PassResult {
    let now = Instant::now();
    let mut inspections: HashMap<Step, Inspection> = seen.into_iter().collect();
    let mut changes = Vec::new();
    let mut errors = Vec::new();
    let mut attempted: Vec<Step> = Vec::new();
    // Rounds: each repairs, concurrently, the drifted steps whose predecessors were
    // attempted in an earlier round and whose requirements pass.
    loop {
        let due: Vec<Step> = steps
            .iter()
            .copied()
            .filter(|s| inspections[s].wants_repair() && s.repairs(cx) && !attempted.contains(s))
            .filter(|s| backoff.get(s).is_none_or(|b| b.may_attempt(now)))
            .filter(|s| {
                s.after().iter().all(|d| {
                    !steps.contains(d)
                        || attempted.contains(d)
                        || inspections.get(d).is_none_or(|i| i.converged())
                })
            })
            .filter(|s| s.requires().iter().all(|d| inspections.get(d).is_none_or(|i| i.converged())))
            .collect();
        if due.is_empty() {
            break;
        }
        let outcomes =
            futures_util::future::join_all(due.iter().map(|&s| steps::timed(s, "converged", s.converge(cx))))
                .await;
        let mut proven: Vec<(Step, Inspection)> = Vec::new();
        for (step, outcome) in due.iter().copied().zip(outcomes) {
            match outcome {
                Ok(done) => {
                    backoff.entry(step).or_default().succeeded();
                    changes.extend(done.changes.into_iter().map(|c| (step, c)));
                    proven.extend(done.proof.map(|p| (step, p)));
                }
                Err(e) => {
                    let delay = backoff.entry(step).or_default().failed(
                        now,
                        cx.settings.repair.backoff_min,
                        cx.settings.repair.backoff_max,
                    );
                    tracing::warn!(
                        message_id = journal::REPAIR_FAILED,
                        step = step.name(),
                        retry_in_ms = delay.as_millis() as u64,
                        "error: repairing {} -> {}; retrying in {}",
                        step.name(),
                        journal::chain(&e),
                        humantime::format_duration(delay)
                    );
                    errors.push((step, e));
                }
            }
            attempted.push(step);
        }
        let unproven: Vec<Step> =
            due.iter().copied().filter(|s| !proven.iter().any(|(p, _)| p == s)).collect();
        let again = steps::inspect_all(cx, &unproven).await;
        inspections.extend(proven);
        inspections.extend(again);
    }
    for (step, inspection) in &inspections {
        if !inspection.wants_repair() {
            backoff.entry(*step).or_default().succeeded();
        }
    }
    let inspections = steps.iter().map(|s| (*s, inspections.remove(s).unwrap_or_default())).collect();
    PassResult { inspections, attempted, changes, errors }
}

/// Observations of a pass, with the repair error added where a repair failed.
pub fn observations(result: &PassResult) -> Vec<Observation> {
    let mut out = Vec::new();
    for (step, inspection) in &result.inspections {
        let error = result.errors.iter().find(|(s, _)| s == step).map(|(_, e)| crate::journal::detail(e));
        for obs in &inspection.observations {
            let mut obs = obs.clone();
            if let (false, Some(error)) = (obs.ok, &error) {
                if !obs.detail.contains(error.as_str()) {
                    obs.detail = format!("{} (repair failed: {error})", obs.detail);
                }
            }
            out.push(obs);
        }
    }
    out
}

fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("sd_notify: {e}");
    }
}

/// Inspects, publishes what it saw (so drift shows as "not ready" to probes before the
/// repair), repairs, and publishes again.
async fn one_pass(
    cx: &Context,
    steps: &[Step],
    backoff: &mut HashMap<Step, Backoff>,
    reporter: &mut Reporter,
) {
    let seen = steps::inspect_all(cx, steps).await;
    let observed: Vec<Observation> = seen.iter().flat_map(|(_, i)| i.observations.clone()).collect();
    let mut changed = reporter.publish(observed);
    let pass = repair_pass(cx, steps, seen, backoff).await;
    for (step, change) in &pass.changes {
        let change = crate::text::one_line(change, crate::checks::MAX_DETAIL_CHARS);
        tracing::info!(message_id = journal::NODE_CHANGED, step = step.name(), "{change}");
    }
    for step in &pass.attempted {
        reporter.metrics.repaired(step.name(), !pass.errors.iter().any(|(s, _)| s == step));
    }
    reporter.metrics.image_gc_freed(steps::storage::take_freed_bytes());
    changed |= reporter.publish(observations(&pass));
    if let crate::canary::Handle::Daemon(runner) = &*cx.canary {
        runner.set_blocked(canary_blocked_by(&reporter.checks));
        // A repair or a check that flipped can have broken (or fixed) what a job needs.
        if changed || !pass.changes.is_empty() {
            runner.request();
        }
    }
}

/// The checks a canary round needs, and why it cannot run when one fails.
fn canary_blocked_by(checks: &CheckSet) -> Option<String> {
    const NEEDED: [&str; 3] = ["linger", "podman-socket", "podman-api"];
    let failing: Vec<&str> =
        checks.checks().iter().filter(|c| NEEDED.contains(&c.name) && !c.ok).map(|c| c.name).collect();
    (!failing.is_empty()).then(|| format!("waiting for {} to pass", failing.join(", ")))
}

/// Sends WATCHDOG=1 while the main loop keeps ticking; a loop stuck for longer than `stall`
/// (a pass is bounded well below it) stops the pings, and systemd restarts the agent.
async fn keep_watchdog_fed(snapshot: watch::Receiver<Snapshot>, every: Duration, stall: Duration) {
    let mut interval = tokio::time::interval(every);
    loop {
        interval.tick().await;
        let age = snapshot.borrow().heartbeat.elapsed();
        if age < stall {
            notify(&[sd_notify::NotifyState::Watchdog]);
        } else {
            tracing::error!(
                "main loop stalled for {}s; letting the watchdog restart the agent",
                age.as_secs()
            );
        }
    }
}

/// Every check the steps will report, with the configured policies, none run yet.
pub fn pending_checks(cx: &Context, steps: &[Step]) -> CheckSet {
    let names: Vec<&'static str> = steps.iter().flat_map(|s| s.checks().iter().copied()).collect();
    CheckSet::pending_with(&names, |n| cx.settings.check_policy(n), SystemTime::now())
}

/// Everything the agent tells about the checks: journal, systemd status, probes, metrics.
struct Reporter {
    checks: CheckSet,
    status_line: String,
    instance: std::collections::BTreeMap<String, String>,
    runner: http::Runner,
    snapshot: watch::Sender<Snapshot>,
    metrics: Arc<Metrics>,
    started: Instant,
    was_ever_ready: bool,
}

impl Reporter {
    /// Records observations, logs check and readiness transitions, and tells probes,
    /// metrics and systemd. Returns whether a check other than the canary flipped.
    fn publish(&mut self, observed: Vec<Observation>) -> bool {
        let was_ready = self.checks.ready();
        let transitions = self.checks.record(observed, SystemTime::now());
        for t in &transitions {
            let verdict = if t.ok { "passes" } else { "fails" };
            tracing::info!(
                message_id = journal::CHECK_CHANGED,
                check = t.name,
                ok = t.ok,
                required = t.required,
                "check {} {verdict}: {}",
                t.name,
                t.detail
            );
        }
        self.metrics.observe(&self.checks, &transitions);
        let line = self.checks.status_line();
        match (was_ready, self.checks.ready()) {
            (false, true) => {
                tracing::info!(message_id = journal::NODE_READY, "{line}");
                if !self.was_ever_ready {
                    self.was_ever_ready = true;
                    self.metrics.first_ready(self.started.elapsed().as_secs_f64());
                }
            }
            (true, false) => tracing::warn!(message_id = journal::NODE_NOT_READY, "{line}"),
            _ => {}
        }
        self.republish();
        if line != self.status_line {
            notify(&[sd_notify::NotifyState::Status(&line)]);
            self.status_line = line;
        }
        transitions.iter().any(|t| t.name != crate::canary::CHECK)
    }

    /// A finished canary round: journal, metrics, the check.
    fn canary_round(&mut self, report: &crate::canary::round::Report) {
        self.metrics.canary_round(report);
        match &report.failure {
            Some((stage, why)) => tracing::warn!(
                message_id = journal::CANARY_FAILED,
                stage = stage.name(),
                duration_ms = report.total.as_millis() as u64,
                "error: canary round failed at stage {} -> {why}",
                stage.name()
            ),
            None => tracing::debug!(duration_ms = report.total.as_millis() as u64, "canary round passed"),
        }
        self.publish(vec![crate::canary::observation(report)]);
    }

    /// Gives probes the latest results (bodies serialised here, once).
    fn republish(&self) {
        self.snapshot.send_replace(Snapshot::new(self.checks.clone(), self.instance.clone(), &self.runner));
    }

    /// Tells probes the loop is alive; re-serialises only when Afterburn's attributes changed.
    fn heartbeat(&self) {
        if self.snapshot.borrow().instance != self.instance {
            return self.republish();
        }
        self.snapshot.send_modify(|s| s.heartbeat = Instant::now());
    }
}

/// The directories whose changes can mean drift.
fn watched_dirs(cx: &Context) -> Vec<WatchedDir> {
    let names = |n: &[&str]| n.iter().map(Into::into).collect();
    vec![
        WatchedDir { dir: cx.root.join("/etc"), names: names(&["subuid", "subgid"]) },
        WatchedDir { dir: cx.root.join("/etc/sysctl.d"), names: vec![] },
        WatchedDir { dir: "/var/lib/systemd/linger".into(), names: names(&[cx.user.name.as_str()]) },
        WatchedDir { dir: cx.user.runtime_dir().join("podman"), names: names(&["podman.sock"]) },
        // The runtime dir itself appears and disappears with the user manager.
        WatchedDir { dir: "/run/user".into(), names: names(&[cx.user.uid.to_string().as_str()]) },
    ]
}

/// Runs until SIGTERM or SIGINT.
/// Runs until SIGTERM or SIGINT.
pub async fn run(mut cx: Context) -> Result<()> {
    let started = Instant::now();
    let steps = Step::for_context(&cx);
    let runner = steps.contains(&Step::Canary).then(|| {
        let api = crate::podman_api::Client::new(
            steps::podman_socket::socket_path(&cx),
            cx.settings.canary.timeout,
        )
        .with_expected_peer(cx.user.uid);
        let user = cx.root.is_host().then(|| cx.user.clone());
        crate::canary::Runner::new(api, cx.settings.canary.clone(), user)
    });
    if let Some(runner) = &runner {
        cx.canary = Arc::new(crate::canary::Handle::Daemon(runner.clone()));
    }
    let cx = Arc::new(cx);
    let wake = Arc::new(Notify::new());
    let metrics = Arc::new(Metrics::new());
    let served = http::Runner {
        user: cx.user.name.clone(),
        uid: cx.user.uid,
        socket: steps::podman_socket::socket_path(&cx).display().to_string(),
    };
    let (snapshot_tx, snapshot_rx) =
        watch::channel(Snapshot::new(pending_checks(&cx, &steps), Default::default(), &served));

    let listener = crate::listen::http_listener(cx.settings.http.listen).await?;
    let state = Arc::new(AppState {
        snapshot: snapshot_rx,
        started,
        liveness_limit: pass_limit(&cx.settings) + TICK * 2,
        metrics: metrics.clone(),
    });
    let mut app = http::app(state);
    if !cx.settings.control.token_file.as_os_str().is_empty() {
        let token = control::read_token(&cx.settings.control.token_file)?;
        let by = "a bearer token over HTTP";
        app = app.merge(control::token_router(
            token,
            ControlState { root: cx.root.clone(), wake: wake.clone(), by },
        ));
    }
    let (stop_servers, servers_stopped) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let server =
        tokio::spawn(http::serve(listener, app, http::Limits::default(), stopped(servers_stopped.clone())));
    if cx.root.is_host() {
        let state =
            ControlState { root: cx.root.clone(), wake: wake.clone(), by: "root over the control socket" };
        let socket = cx.settings.control.socket.clone();
        let stop = stopped(servers_stopped.clone());
        tokio::spawn(async move {
            if let Err(e) = control::serve_socket(&socket, state, stop).await {
                tracing::error!("error: control socket -> {}", journal::chain(&e));
            }
        });
    }

    let files = FileWatcher::new().context("setting up inotify")?;
    files.arm(&watched_dirs(&cx));
    tokio::spawn(files.clone().run(wake.clone()));
    if cx.root.is_host() {
        tokio::spawn(crate::watch::watch_system_bus(cx.system_bus.clone(), cx.user.clone(), wake.clone()));
    }
    let mut user_watch = UserWatch::default();
    // The runner user's containers configuration can break a round without any check
    // flipping (a network backend, a runtime): a change asks for a round.
    let canary_kick = Arc::new(Notify::new());
    let containers_conf = FileWatcher::new().context("setting up inotify")?;
    let containers_dirs =
        vec![WatchedDir { dir: cx.root.join(&cx.user.home).join(".config/containers"), names: vec![] }];
    containers_conf.arm(&containers_dirs);
    tokio::spawn(containers_conf.clone().run(canary_kick.clone()));
    let mut canary_rounds = runner.as_ref().map(|r| r.subscribe());
    let canary_task = runner.clone().map(|r| tokio::spawn(r.run()));

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    if let Some(interval) = sd_notify::watchdog_enabled() {
        tokio::spawn(keep_watchdog_fed(
            snapshot_tx.subscribe(),
            interval / 2,
            pass_limit(&cx.settings) + TICK * 2,
        ));
    }

    let mut reporter = Reporter {
        checks: pending_checks(&cx, &steps),
        status_line: String::new(),
        instance: identity::read(&cx.root),
        runner: served,
        snapshot: snapshot_tx,
        metrics,
        started,
        was_ever_ready: false,
    };
    let mut backoff: HashMap<Step, Backoff> = HashMap::new();
    let mut ready_sent = false;
    let mut first_pass_done = None;
    // READY=1 waits for the first canary round, within its bounds.
    let ready_wait_limit = cx.settings.canary.timeout + Duration::from_secs(25);
    let mut next_resync = Instant::now();
    loop {
        let now = Instant::now();
        let retry_at = backoff.values().filter_map(Backoff::next_attempt).filter(|t| *t > now).min();
        let failing = !reporter.checks.ready();
        let pass_due =
            if failing { retry_at.map_or(next_resync, |r| r.min(next_resync)) } else { next_resync };
        let woken = tokio::select! {
            _ = wake.notified() => {
                tokio::time::sleep(COALESCE).await;
                true
            }
            _ = tokio::time::sleep_until(pass_due.min(now + TICK).into()) => false,
            Some(Ok(())) = async {
                match canary_rounds.as_mut() {
                    Some(rx) => Some(rx.changed().await),
                    None => std::future::pending().await,
                }
            } => {
                let latest = canary_rounds.as_mut().map(|rx| rx.borrow_and_update().clone());
                if let Some(latest) = latest {
                    if let Some(report) = &latest.report {
                        reporter.canary_round(report);
                    }
                    for change in &latest.repairs {
                        let change = crate::text::one_line(change, crate::checks::MAX_DETAIL_CHARS);
                        tracing::info!(message_id = journal::NODE_CHANGED, step = crate::canary::CHECK, "{change}");
                    }
                }
                false
            }
            _ = canary_kick.notified() => {
                if let Some(runner) = &runner {
                    runner.request();
                }
                false
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        };
        let first_pass = first_pass_done.is_none();
        if woken || first_pass || Instant::now() >= pass_due {
            let limit = pass_limit(&cx.settings);
            if tokio::time::timeout(limit, one_pass(&cx, &steps, &mut backoff, &mut reporter)).await.is_err()
            {
                tracing::warn!(
                    message_id = journal::REPAIR_FAILED,
                    "error: a pass took longer than {}; abandoned it",
                    humantime::format_duration(limit)
                );
            }
            if first_pass {
                tracing::info!(
                    message_id = journal::AGENT_LIFECYCLE,
                    first_pass_ms = started.elapsed().as_millis() as u64,
                    "first pass done after {:?}: {}",
                    started.elapsed(),
                    reporter.status_line
                );
                first_pass_done = Some(Instant::now());
            }
            next_resync = Instant::now() + cx.settings.repair.resync_interval;
            // Afterburn may write its metadata after the agent started.
            reporter.instance = identity::read(&cx.root);
            files.arm(&watched_dirs(&cx));
            containers_conf.arm(&containers_dirs);
            if cx.root.is_host() {
                let manager_up = reporter.checks.checks().iter().any(|c| c.name == "linger" && c.ok);
                if manager_up {
                    user_watch.ensure_running(&cx.user, &cx.settings.podman.socket_unit, &wake);
                }
            }
        }
        if !ready_sent && first_pass_done.is_some() {
            // Wait for the first round only when it decides readiness: a node that another
            // required check keeps from being ready is started (READY=1) at once.
            let others_fail = reporter
                .checks
                .checks()
                .iter()
                .any(|c| c.required && !c.ok && c.name != crate::canary::CHECK);
            let canary_done = match &runner {
                None => true,
                Some(r) => others_fail || !r.unblocked() || r.subscribe().borrow().rounds > 0,
            };
            if canary_done || first_pass_done.is_some_and(|t| t.elapsed() > ready_wait_limit) {
                tracing::info!(
                    message_id = journal::AGENT_LIFECYCLE,
                    ready_ms = started.elapsed().as_millis() as u64,
                    "started after {:?}: {}",
                    started.elapsed(),
                    reporter.status_line
                );
                notify(&[sd_notify::NotifyState::Ready]);
                ready_sent = true;
            }
        }
        reporter.heartbeat();
    }

    tracing::info!(message_id = journal::AGENT_LIFECYCLE, "stopping");
    if let Some(task) = canary_task {
        // A round cut short leaves objects; the next agent's first round removes them.
        task.abort();
    }
    notify(&[sd_notify::NotifyState::Stopping]);
    user_watch.stop();
    let _ = stop_servers.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_limit_and_resets() {
        let t0 = Instant::now();
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(5));
        let mut b = Backoff::new();
        assert!(b.may_attempt(t0));
        let delays: Vec<_> = (0..5).map(|_| b.failed(t0, min, max).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 5, 5]);
        assert!(!b.may_attempt(t0 + Duration::from_secs(4)));
        assert!(b.may_attempt(t0 + Duration::from_secs(5)));
        b.succeeded();
        assert_eq!(b, Backoff::new());
    }

    #[test]
    fn a_failed_repair_is_added_to_the_failing_check() {
        let pass = PassResult {
            inspections: vec![(
                Step::PodmanSocket,
                Inspection {
                    observations: vec![
                        Observation::pass("podman-socket", "ok"),
                        Observation::fail("podman-api", "refused"),
                    ],
                    plan: vec![],
                },
            )],
            attempted: vec![Step::PodmanSocket],
            changes: vec![],
            errors: vec![(Step::PodmanSocket, anyhow::anyhow!("podman.socket is masked"))],
        };
        let obs = observations(&pass);
        assert_eq!(obs[0].detail, "ok");
        assert_eq!(obs[1].detail, "refused (repair failed: podman.socket is masked)");
    }
}
