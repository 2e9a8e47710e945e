//! The daemon: converge, then keep watching; repair drift with backoff; publish readiness to
//! the HTTP endpoint, systemd (READY/STATUS/WATCHDOG/STOPPING) and the journal.

use anyhow::{Context as _, Result};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{watch, Notify};

use crate::checks::{CheckSet, Observation};
use crate::control::{self, ControlState};
use crate::engine::eviction::{Conditions, Countdown, Hold, Verdict};
use crate::http::{self, AppState, Snapshot};
use crate::identity;
use crate::journal;
use crate::metrics::Metrics;
use crate::pass::{next_pass_due, observations, repair_pass, Backoff};
use crate::steps::{self, Context, Step};
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
    let failing = checks.failing_of(&[Step::Linger, Step::PodmanSocket]);
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
    let names: Vec<&'static str> = steps.iter().flat_map(|s| s.checks()).collect();
    CheckSet::pending_with(&names, |n| crate::checks::configured_policy(&cx.settings, n), SystemTime::now())
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
    /// What runs on the node as of the latest pass; `None` while the API cannot be asked.
    jobs: Option<crate::jobs::Jobs>,
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
        transitions.iter().any(|t| !Step::Canary.reports(t.name))
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

    /// Records what runs on the node; tells probes and metrics when it changed.
    fn jobs_seen(&mut self, jobs: Option<crate::jobs::Jobs>) {
        if jobs == self.jobs {
            return;
        }
        tracing::debug!("jobs: {}", jobs.as_ref().map_or("unknown".into(), |j| j.describe()));
        self.metrics.jobs(jobs.as_ref());
        self.jobs = jobs;
        self.republish();
    }

    /// Gives probes the latest results (bodies serialised here, once).
    fn republish(&self) {
        self.snapshot.send_replace(Snapshot::with_jobs(
            self.checks.clone(),
            self.instance.clone(),
            self.jobs.clone(),
            &self.runner,
        ));
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
        WatchedDir { dir: cx.root.join("/etc"), names: names(&["subuid", "subgid", "nologin"]) },
        // `shutdown` writes /run/nologin; the `logins` check says it refuses the runner.
        WatchedDir { dir: cx.root.join("/run"), names: names(&["nologin"]) },
        WatchedDir { dir: cx.root.join("/etc/sysctl.d"), names: vec![] },
        WatchedDir { dir: "/var/lib/systemd/linger".into(), names: names(&[cx.user.name.as_str()]) },
        WatchedDir { dir: cx.user.runtime_dir().join("podman"), names: names(&["podman.sock"]) },
        // The runtime dir itself appears and disappears with the user manager.
        WatchedDir { dir: "/run/user".into(), names: names(&[cx.user.uid.to_string().as_str()]) },
    ]
}

/// The units of the user's manager whose changes wake the loop. The API service only when the
/// agent keeps it running: then it stopping (a crash, an OOM kill, someone's `systemctl stop`)
/// means the next job meets a fresh start that may fail, and is worth a pass at once. A service
/// left to exit after 5 s idle goes up and down with every probe and would wake the loop itself.
fn user_units_to_watch<'a>(settings: &'a crate::config::Settings, api_service: &'a str) -> Vec<&'a str> {
    let mut units = vec![settings.podman.socket_unit.as_str()];
    if settings.podman_config.manage && settings.podman_config.keep_api_service {
        units.push(api_service);
    }
    units
}

/// Runs until SIGTERM or SIGINT: start-up, the loop, then stopping what start-up started.
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
    let (reporter, mut events, servers) = start(&cx, &steps, runner.as_ref(), started).await?;
    main_loop(&cx, &steps, runner.as_ref(), reporter, &mut events, started).await;

    tracing::info!(message_id = journal::AGENT_LIFECYCLE, "stopping");
    if let Some(task) = servers.canary_task {
        // A round cut short leaves objects; the next agent's first round removes them.
        task.abort();
    }
    notify(&[sd_notify::NotifyState::Stopping]);
    events.user_watch.stop();
    let _ = servers.stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), servers.http).await;
    Ok(())
}

/// What the loop waits on, and the watches it re-arms after each pass.
struct Events {
    /// Drift may have happened: inotify, the system bus, the user manager, a control request.
    wake: Arc<Notify>,
    files: Arc<FileWatcher>,
    /// The runner user's containers configuration: a change asks for a canary round.
    containers_conf: Arc<FileWatcher>,
    containers_dirs: Vec<WatchedDir>,
    canary_kick: Arc<Notify>,
    canary_rounds: Option<watch::Receiver<crate::canary::Latest>>,
    user_watch: UserWatch,
    user_units: Vec<String>,
    /// Lists the runner user's containers after each pass (on the live node only).
    jobs_api: Option<crate::podman_api::Client>,
    /// The EC2 Spot watcher, once Afterburn's attributes say this is EC2.
    spot_watch: Option<tokio::task::JoinHandle<()>>,
    sigterm: tokio::signal::unix::Signal,
    sigint: tokio::signal::unix::Signal,
}

/// What stopping ends.
struct Servers {
    http: tokio::task::JoinHandle<()>,
    stop: watch::Sender<bool>,
    canary_task: Option<tokio::task::JoinHandle<()>>,
}

/// Start-up: the probe server and the control socket, the watchers, the system bus watch,
/// the canary runner and the watchdog. Everything here fails fast (a listener that cannot be
/// bound is a configuration error); nothing here inspects or changes the node.
async fn start(
    cx: &Arc<Context>,
    steps: &[Step],
    runner: Option<&Arc<crate::canary::Runner>>,
    started: Instant,
) -> Result<(Reporter, Events, Servers)> {
    let wake = Arc::new(Notify::new());
    let metrics = Arc::new(Metrics::new());
    let served = http::Runner {
        user: cx.user.name.clone(),
        uid: cx.user.uid,
        socket: steps::podman_socket::socket_path(cx).display().to_string(),
    };
    let (snapshot_tx, snapshot_rx) =
        watch::channel(Snapshot::new(pending_checks(cx, steps), Default::default(), &served));

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
            ControlState { root: cx.root.clone(), wake: wake.clone(), by, jobs_api: jobs_api(cx) },
        ));
    }
    let (stop_servers, servers_stopped) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let server =
        tokio::spawn(http::serve(listener, app, http::Limits::default(), stopped(servers_stopped.clone())));
    if cx.root.is_host() {
        let state = ControlState {
            root: cx.root.clone(),
            wake: wake.clone(),
            by: "root over the control socket",
            jobs_api: jobs_api(cx),
        };
        let socket = cx.settings.control.socket.clone();
        let stop = stopped(servers_stopped.clone());
        tokio::spawn(async move {
            if let Err(e) = control::serve_socket(&socket, state, stop).await {
                tracing::error!("error: control socket -> {}", journal::chain(&e));
            }
        });
    }

    if cx.root.is_host() && cx.settings.fleet_lock.enabled {
        let listen = cx.settings.fleet_lock.listen;
        match tokio::net::TcpListener::bind(listen).await {
            Ok(listener) => {
                let state = crate::fleet_lock::LockState {
                    root: cx.root.clone(),
                    wake: wake.clone(),
                    jobs_api: jobs_api(cx),
                    local: listener.local_addr().unwrap_or(listen),
                    busy: Arc::default(),
                };
                let app = crate::fleet_lock::router(state);
                tokio::spawn(http::serve(
                    listener,
                    app,
                    http::Limits::default(),
                    stopped(servers_stopped.clone()),
                ));
            }
            // zincati then gets no lock and takes no reboot: safe, and said.
            Err(e) => tracing::error!(
                "error: FleetLock cannot listen on {listen} -> {e}; zincati will not get a reboot lock"
            ),
        }
    }

    let files = FileWatcher::new().context("setting up inotify")?;
    files.arm(&watched_dirs(cx));
    tokio::spawn(files.clone().run(wake.clone()));
    if cx.root.is_host() {
        tokio::spawn(crate::watch::watch_system_bus(cx.system_bus.clone(), cx.user.clone(), wake.clone()));
    }
    let api_service = cx.settings.podman.api_service_unit();
    let user_units = user_units_to_watch(&cx.settings, &api_service).into_iter().map(String::from).collect();
    // The runner user's containers configuration can break a round without any check
    // flipping (a network backend, a runtime): a change asks for a round.
    let canary_kick = Arc::new(Notify::new());
    let containers_conf = FileWatcher::new().context("setting up inotify")?;
    let containers_dirs =
        vec![WatchedDir { dir: cx.root.join(&cx.user.home).join(".config/containers"), names: vec![] }];
    containers_conf.arm(&containers_dirs);
    tokio::spawn(containers_conf.clone().run(canary_kick.clone()));
    let canary_rounds = runner.map(|r| r.subscribe());
    let canary_task = runner.cloned().map(|r| tokio::spawn(r.run()));

    let sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    if let Some(interval) = sd_notify::watchdog_enabled() {
        tokio::spawn(keep_watchdog_fed(
            snapshot_tx.subscribe(),
            interval / 2,
            pass_limit(&cx.settings) + TICK * 2,
        ));
    }

    let reporter = Reporter {
        checks: pending_checks(cx, steps),
        status_line: String::new(),
        instance: identity::read(&cx.root),
        runner: served,
        snapshot: snapshot_tx,
        metrics,
        started,
        was_ever_ready: false,
        jobs: None,
    };
    let events = Events {
        wake,
        files,
        containers_conf,
        containers_dirs,
        canary_kick,
        canary_rounds,
        user_watch: UserWatch::default(),
        user_units,
        jobs_api: jobs_api(cx),
        spot_watch: None,
        sigterm,
        sigint,
    };
    Ok((reporter, events, Servers { http: server, stop: stop_servers, canary_task }))
}

/// The runner user's Podman API, to list what runs (on the live node only).
pub fn jobs_api(cx: &Context) -> Option<crate::podman_api::Client> {
    cx.root.is_host().then(|| {
        crate::podman_api::Client::new(steps::podman_socket::socket_path(cx), cx.settings.podman.api_timeout)
            .with_expected_peer(cx.user.uid)
    })
}

/// Whether to send READY=1 now. After the first pass, and once the first canary round has
/// decided readiness, unless no round can decide it (another required check fails, the canary
/// is blocked or off) or the wait for it is over.
fn ready_to_announce(first_pass_done: Option<Instant>, awaiting_canary: bool, wait_limit: Duration) -> bool {
    first_pass_done.is_some_and(|done| !awaiting_canary || done.elapsed() > wait_limit)
}

/// Self-eviction's turn (opt-in): the conditions as the latest pass left them, the verdict,
/// and what is said (journal, metrics) or done about it.
async fn self_eviction_turn(
    cx: &Context,
    countdown: &mut Countdown,
    last: &mut Option<Verdict>,
    reporter: &Reporter,
) {
    use crate::system::eviction as record;
    let settings = &cx.settings.self_eviction;
    let ready = reporter.checks.ready();
    let evicted_before = match record::recorded(&cx.root) {
        Ok(found) => found,
        Err(e) => Some(record::Record {
            at: "an unknown time".into(),
            reason: crate::journal::detail(&e),
            action: String::new(),
        }),
    };
    if ready && evicted_before.is_some() {
        match record::forget(&cx.root) {
            Ok(_) => tracing::info!(
                message_id = journal::SELF_EVICTION,
                "ready again since the self-eviction: a later one may end the node again"
            ),
            Err(e) => tracing::warn!("error: forgetting the self-eviction -> {}", journal::chain(&e)),
        }
    }
    // Unknown while the API cannot be asked: containers outlive their API service, and the
    // hardened unit cannot see the runner user's processes (ProtectProc=invisible).
    let conditions = Conditions {
        ready,
        jobs_running: reporter.jobs.as_ref().map(|jobs| jobs.any()),
        // The record and the check both: a turn between an undrain and the pass that sees it
        // would announce a wait whose reason still names the drain.
        drained: !matches!(crate::drain::current(&cx.root), Ok(None))
            || !reporter.checks.step_passes(Step::Drain),
        evicted_before: evicted_before.is_some() && !ready,
    };
    let was_pending = countdown.pending();
    let verdict = countdown.observe(Instant::now(), &conditions, settings.after);
    let action = crate::system::eviction::describe(&settings.command);
    let after = humantime::format_duration(settings.after);
    match verdict {
        Verdict::Pending { due, started: true } => {
            let due_unix = SystemTime::now() + due.saturating_duration_since(Instant::now());
            let due_unix = due_unix.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            tracing::warn!(
                message_id = journal::SELF_EVICTION,
                "not ready with no job running and no drain: the node ends itself in {after} ({action}) unless it \
                 recovers: {}",
                reporter.status_line
            );
            reporter.metrics.self_eviction(Some(due_unix));
        }
        Verdict::Pending { .. } => {}
        Verdict::Ready | Verdict::Held(_) if was_pending => {
            let why = match verdict {
                Verdict::Held(hold) => hold.describe(),
                _ => "the node is ready",
            };
            tracing::info!(message_id = journal::SELF_EVICTION, "self-eviction called off: {why}");
            reporter.metrics.self_eviction(None);
        }
        Verdict::Held(Hold::EvictedBefore) if *last != Some(verdict) => {
            if let Some(before) = &evicted_before {
                tracing::warn!(
                    message_id = journal::SELF_EVICTION,
                    "not ending the node again: it ended itself at {} ({}) and has not been ready since",
                    before.at,
                    before.reason
                );
            }
        }
        Verdict::Ready | Verdict::Held(_) => {}
        Verdict::Act => {
            reporter.metrics.self_eviction(None);
            let reason = reporter.status_line.clone();
            // Written first: the node that comes back must find it, or it could loop.
            if let Err(e) = record::record(&cx.root, &reason, &action) {
                tracing::error!(
                    message_id = journal::SELF_EVICTION,
                    "error: not ending the node: the record that prevents a loop cannot be written -> {}",
                    journal::chain(&e)
                );
            } else {
                tracing::error!(
                    message_id = journal::SELF_EVICTION,
                    "ending the node ({action}): not ready for {after} with no job running and no drain, repairs did \
                     not help: {reason}"
                );
                let status =
                    crate::text::one_line(&format!("ending the node (self-eviction): {reason}"), 300);
                notify(&[sd_notify::NotifyState::Status(&status)]);
                if let Err(e) = record::act(&cx.system_bus, &settings.command).await {
                    tracing::error!(
                        message_id = journal::SELF_EVICTION,
                        "error: self-eviction -> {}",
                        journal::chain(&e)
                    );
                }
            }
        }
    }
    *last = Some(verdict);
}

/// The loop: a pass when woken, when a retry or the resync is due; canary rounds as they come;
/// READY=1 once; a heartbeat for the watchdog and /healthz each turn. Ends at SIGTERM/SIGINT.
async fn main_loop(
    cx: &Arc<Context>,
    steps: &[Step],
    runner: Option<&Arc<crate::canary::Runner>>,
    mut reporter: Reporter,
    ev: &mut Events,
    started: Instant,
) {
    let mut backoff: HashMap<Step, Backoff> = HashMap::new();
    let mut ready_sent = false;
    let mut first_pass_done = None;
    // READY=1 waits for the first canary round, within its bounds.
    let ready_wait_limit = cx.settings.canary.timeout + Duration::from_secs(25);
    let mut next_resync = Instant::now();
    let mut countdown = Countdown::default();
    let mut last_verdict = None;
    let evicts = cx.settings.self_eviction.enabled && cx.root.is_host();
    loop {
        let now = Instant::now();
        let pass_due = next_pass_due(now, next_resync, reporter.checks.ready(), backoff.values());
        let woken = tokio::select! {
            _ = ev.wake.notified() => {
                tokio::time::sleep(COALESCE).await;
                true
            }
            _ = tokio::time::sleep_until(
                pass_due.min(now + TICK).min(countdown.due(cx.settings.self_eviction.after).unwrap_or(pass_due)).into()
            ) => false,
            Some(Ok(())) = async {
                match ev.canary_rounds.as_mut() {
                    Some(rx) => Some(rx.changed().await),
                    None => std::future::pending().await,
                }
            } => {
                let latest = ev.canary_rounds.as_mut().map(|rx| rx.borrow_and_update().clone());
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
            _ = ev.canary_kick.notified() => {
                if let Some(runner) = runner {
                    runner.request();
                }
                false
            }
            _ = ev.sigterm.recv() => break,
            _ = ev.sigint.recv() => break,
        };
        let first_pass = first_pass_done.is_none();
        if woken || first_pass || Instant::now() >= pass_due {
            let limit = pass_limit(&cx.settings);
            if tokio::time::timeout(limit, one_pass(cx, steps, &mut backoff, &mut reporter)).await.is_err() {
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
            if let Some(api) = &ev.jobs_api {
                let api_ok = reporter.checks.step_passes(Step::PodmanSocket);
                reporter.jobs_seen(if api_ok { crate::jobs::running(api).await.ok() } else { None });
            }
            next_resync = Instant::now() + cx.settings.repair.resync_interval;
            // Afterburn may write its metadata after the agent started.
            reporter.instance = identity::read(&cx.root);
            if ev.spot_watch.is_none() && cx.settings.spot.enabled && crate::spot::on_aws(&reporter.instance)
            {
                tracing::info!(
                    message_id = journal::AGENT_LIFECYCLE,
                    "on EC2: watching IMDS at {} every {} for Spot interruption notices{}",
                    cx.settings.spot.imds_address,
                    humantime::format_duration(cx.settings.spot.poll_interval),
                    if cx.settings.spot.drain_on_rebalance { " and rebalance recommendations" } else { "" }
                );
                ev.spot_watch = Some(tokio::spawn(crate::spot::watch(
                    cx.settings.spot.clone(),
                    cx.root.clone(),
                    ev.wake.clone(),
                )));
            }
            ev.files.arm(&watched_dirs(cx));
            ev.containers_conf.arm(&ev.containers_dirs);
            if cx.root.is_host() {
                let manager_up = reporter.checks.step_passes(Step::Linger);
                if manager_up {
                    let units: Vec<&str> = ev.user_units.iter().map(String::as_str).collect();
                    ev.user_watch.ensure_running(&cx.user, &units, &ev.wake);
                }
            }
        }
        if !ready_sent {
            let others_fail =
                reporter.checks.checks().iter().any(|c| c.required && !c.ok && !Step::Canary.reports(c.name));
            let awaiting_canary =
                runner.is_some_and(|r| !others_fail && r.unblocked() && r.subscribe().borrow().rounds == 0);
            if ready_to_announce(first_pass_done, awaiting_canary, ready_wait_limit) {
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
        if evicts && first_pass_done.is_some() {
            self_eviction_turn(cx, &mut countdown, &mut last_verdict, &reporter).await;
        }
        reporter.heartbeat();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_service_is_watched_only_when_the_agent_keeps_it_running() {
        let mut settings = crate::config::Settings::default();
        let service = settings.podman.api_service_unit();
        assert_eq!(service, "podman.service");
        assert_eq!(user_units_to_watch(&settings, &service), ["podman.socket", "podman.service"]);
        settings.podman_config.keep_api_service = false;
        assert_eq!(user_units_to_watch(&settings, &service), ["podman.socket"]);
        settings.podman_config.keep_api_service = true;
        settings.podman_config.manage = false;
        assert_eq!(user_units_to_watch(&settings, &service), ["podman.socket"]);
    }

    #[test]
    fn ready_is_announced_after_the_first_pass_and_the_first_round_or_its_wait() {
        let limit = Duration::from_secs(30);
        assert!(!ready_to_announce(None, false, limit), "before the first pass");
        let just_now = Some(Instant::now());
        assert!(ready_to_announce(just_now, false, limit), "no round to wait for");
        assert!(!ready_to_announce(just_now, true, limit), "waiting for the first round");
        let long_ago = Instant::now().checked_sub(Duration::from_secs(31));
        assert!(ready_to_announce(long_ago, true, limit), "the wait is over");
    }
}
