//! The job canary: proof that a GitLab docker-executor job with a service would run here,
//! below what `GET /_ping` can see (network backend and firewall, aardvark-dns, the rootless
//! network, the OCI runtime and conmon, storage and ID mapping).
//!
//! A round ([`round`]) runs through the same API the runner uses, from an image the agent
//! makes from its own binary ([`image`], [`payload`]). In the daemon a [`Runner`] task runs
//! the rounds, one at a time, on a [`Schedule`]; probes only ever read its latest result.
//! The CLI (`check`, `apply`) runs a round in place ([`Direct`]).

pub mod image;
pub mod payload;
pub mod repair;
pub mod round;

use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

use crate::checks::Observation;
use crate::config::Canary as Settings;
use crate::podman_api::Client;

/// The check's name.
pub const CHECK: &str = "canary";

/// The stages of a round, in the order they run; a failure names one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    Image,
    Leftovers,
    Network,
    Volume,
    ServiceStart,
    JobStart,
    Job,
    Dns,
    ServiceExchange,
    PortPublish,
    Cleanup,
}

impl Stage {
    pub const ALL: [Stage; 11] = [
        Stage::Image,
        Stage::Leftovers,
        Stage::Network,
        Stage::Volume,
        Stage::ServiceStart,
        Stage::JobStart,
        Stage::Job,
        Stage::Dns,
        Stage::ServiceExchange,
        Stage::PortPublish,
        Stage::Cleanup,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Image => "image",
            Stage::Leftovers => "leftovers",
            Stage::Cleanup => "cleanup",
            Stage::Network => "network",
            Stage::Volume => "volume",
            Stage::ServiceStart => "service-start",
            Stage::JobStart => "job-start",
            Stage::Job => "job",
            Stage::Dns => "dns",
            Stage::ServiceExchange => "service-exchange",
            Stage::PortPublish => "port-publish",
        }
    }
}

/// The process that owns canary objects: its PID and start time (clock ticks since boot),
/// so an object whose owner died is known even after its PID was reused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub start_ticks: u64,
}

/// This process, read once.
pub static OWNER: LazyLock<Owner> = LazyLock::new(|| {
    let pid = std::process::id();
    Owner { pid, start_ticks: start_ticks(pid).unwrap_or(0) }
});

/// Field 22 of `/proc/PID/stat` (after the command name, which may hold spaces and parentheses).
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_ticks(&stat)
}

fn parse_start_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // Fields after the name start at field 3 (state); the start time is field 22.
    after_name.split_whitespace().nth(22 - 3)?.parse().ok()
}

impl Owner {
    /// The label value: `PID-STARTTICKS`.
    pub fn label(&self) -> String {
        format!("{}-{}", self.pid, self.start_ticks)
    }

    /// Whether an object labelled `value` is left over: made by an earlier round of this
    /// process, or by a process that no longer runs. A value the agent would not write is
    /// somebody else's and is left alone.
    pub fn is_leftover(&self, value: &str) -> bool {
        let Some((pid, ticks)) = value.split_once('-') else { return false };
        let (Ok(pid), Ok(ticks)) = (pid.parse::<u32>(), ticks.parse::<u64>()) else { return false };
        if pid == self.pid {
            return ticks == self.start_ticks || start_ticks(pid) != Some(ticks);
        }
        start_ticks(pid) != Some(ticks)
    }
}

/// When the next round is due: at start, on the interval, sooner after a failure (backing
/// off from `min_gap` to the interval) and after a request, never sooner than `min_gap`
/// after the last round started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Schedule {
    pub last_start: Option<Instant>,
    /// Rounds in a row that failed (0 after a pass).
    pub failures: u32,
    /// Something that can break a round happened since the last one started.
    pub requested: bool,
}

impl Schedule {
    pub fn due(&self, s: &Settings) -> Option<Instant> {
        let last = self.last_start?;
        let by_interval = if self.failures == 0 {
            s.interval
        } else {
            s.min_gap.saturating_mul(1 << (self.failures - 1).min(16)).min(s.interval)
        };
        let after = if self.requested { s.min_gap.min(by_interval) } else { by_interval };
        Some(last + after)
    }

    /// Whether a round may start now (`None` from [`Schedule::due`]: none ran yet).
    pub fn may_start(&self, now: Instant, s: &Settings) -> bool {
        self.due(s).is_none_or(|due| now >= due)
    }

    pub fn started(&mut self, now: Instant) {
        self.last_start = Some(now);
        self.requested = false;
    }

    pub fn finished(&mut self, ok: bool) {
        self.failures = if ok { 0 } else { self.failures.saturating_add(1) };
    }
}

/// The check's observation of a round.
pub fn observation(report: &round::Report) -> Observation {
    let seconds = report.total.as_secs_f64();
    match &report.failure {
        Some((stage, why)) => {
            Observation::fail(CHECK, format!("{}: {why} (round {seconds:.1} s)", stage.name()))
        }
        None => {
            let stages: Vec<String> = report
                .stages
                .iter()
                .map(|(stage, took)| format!("{} {} ms", stage.name(), took.as_millis()))
                .collect();
            let mut detail = format!(
                "a job reached its service by alias on a per-round network, used a named volume and a published port in {seconds:.1} s ({})",
                stages.join(", ")
            );
            if report.imported {
                detail.push_str("; image imported");
            }
            if report.leftovers_removed > 0 {
                detail.push_str(&format!("; removed {} leftover canary object(s)", report.leftovers_removed));
            }
            Observation::pass(CHECK, detail)
        }
    }
}

/// How the `canary` step gets its result: its own round (CLI) or the daemon's runner.
pub enum Handle {
    Direct(Direct),
    Daemon(Arc<Runner>),
}

impl Default for Handle {
    fn default() -> Self {
        Handle::Direct(Direct::default())
    }
}

/// Rounds run in place, for `check` and `apply`: the first inspection runs one, a repair
/// (once the socket is up) runs another.
#[derive(Default)]
pub struct Direct {
    last: tokio::sync::Mutex<Option<Observation>>,
    cache: round::ImageCache,
}

impl Direct {
    pub async fn inspect(&self, api: &Client, settings: &Settings) -> Observation {
        let mut last = self.last.lock().await;
        if let Some(obs) = last.as_ref() {
            return obs.clone();
        }
        let obs = observation(&round::run(api, settings, &OWNER, &self.cache).await);
        *last = Some(obs.clone());
        obs
    }

    pub async fn rerun(&self, api: &Client, settings: &Settings) {
        let mut last = self.last.lock().await;
        *last = Some(observation(&round::run(api, settings, &OWNER, &self.cache).await));
    }
}

/// What the runner last did.
#[derive(Clone, Debug, Default)]
pub struct Latest {
    pub report: Option<round::Report>,
    /// What the runner changed after that round ([`repair`]); empty mostly.
    pub repairs: Vec<String>,
    /// Counts finished rounds, so a watcher sees each one.
    pub rounds: u64,
}

/// The daemon's canary: one task, one round at a time, results published to a watch.
pub struct Runner {
    settings: Settings,
    api: Client,
    /// The runner user, for the one known repair; `None` leaves every failure reported only.
    user: Option<crate::runner_user::Account>,
    cache: round::ImageCache,
    state: Mutex<RunnerState>,
    kick: Notify,
    latest: watch::Sender<Latest>,
}

struct RunnerState {
    schedule: Schedule,
    /// Why rounds cannot run now (the checks they need fail), if so.
    blocked: Option<String>,
}

impl Runner {
    pub fn new(api: Client, settings: Settings, user: Option<crate::runner_user::Account>) -> Arc<Self> {
        Arc::new(Runner {
            settings,
            api,
            user,
            cache: round::ImageCache::default(),
            state: Mutex::new(RunnerState {
                schedule: Schedule::default(),
                blocked: Some("waiting for the first pass".into()),
            }),
            kick: Notify::new(),
            latest: watch::Sender::new(Latest::default()),
        })
    }

    /// Asks for a round soon (something that can break it happened).
    pub fn request(&self) {
        self.state.lock().unwrap().schedule.requested = true;
        self.kick.notify_one();
    }

    /// Tells whether the checks a round needs pass; `Some(why)` holds rounds back.
    pub fn set_blocked(&self, why: Option<String>) {
        let mut state = self.state.lock().unwrap();
        if state.blocked.is_some() && why.is_none() {
            state.schedule.requested = true;
            self.kick.notify_one();
        }
        state.blocked = why;
    }

    /// Whether a round could run now (nothing holds it back).
    pub fn unblocked(&self) -> bool {
        self.state.lock().unwrap().blocked.is_none()
    }

    pub fn subscribe(&self) -> watch::Receiver<Latest> {
        self.latest.subscribe()
    }

    /// The check as it stands: held back, not run yet, or the last round's result.
    pub fn observation(&self) -> Observation {
        if let Some(why) = &self.state.lock().unwrap().blocked {
            return Observation::fail(CHECK, format!("not run: {why}"));
        }
        match &self.latest.borrow().report {
            Some(report) => observation(report),
            None => Observation::fail(CHECK, "no round has run yet"),
        }
    }

    /// Runs rounds when due, until the task is aborted.
    pub async fn run(self: Arc<Self>) {
        loop {
            let now = Instant::now();
            let (may_start, due) = {
                let state = self.state.lock().unwrap();
                let may = state.blocked.is_none() && state.schedule.may_start(now, &self.settings);
                (may, state.schedule.due(&self.settings))
            };
            if !may_start {
                // Woken by a request, an unblock, or the due time (re-checked at least every
                // interval).
                let until = due.filter(|d| *d > now).unwrap_or(now + self.settings.interval);
                let _ = tokio::time::timeout_at(until.into(), self.kick.notified()).await;
                continue;
            }
            self.state.lock().unwrap().schedule.started(now);
            let report = round::run(&self.api, &self.settings, &OWNER, &self.cache).await;
            self.state.lock().unwrap().schedule.finished(report.failure.is_none());
            let repairs = self.repair(&report).await;
            if !repairs.is_empty() {
                // Prove the repair soon rather than after the failure backoff.
                self.state.lock().unwrap().schedule.requested = true;
            }
            self.latest.send_modify(|latest| {
                latest.report = Some(report);
                latest.repairs = repairs;
                latest.rounds += 1;
            });
        }
    }
}

impl Runner {
    /// The known repair for a failed round, if it applies; what it changed.
    async fn repair(&self, report: &round::Report) -> Vec<String> {
        let (Some(user), Some((_, why))) = (&self.user, &report.failure) else { return Vec::new() };
        if !repair::is_stale_rootless_netns(why) {
            return Vec::new();
        }
        match crate::user_manager::reset_rootless_netns(user).await {
            Ok(removed) => removed,
            Err(e) => {
                tracing::warn!(
                    message_id = crate::journal::REPAIR_FAILED,
                    step = CHECK,
                    "error: removing a stale rootless network namespace -> {}",
                    crate::text::one_line(&crate::journal::chain(&e), 600)
                );
                Vec::new()
            }
        }
    }
}

/// The cost of a round for the README and the bench: median wall time.
pub fn median(mut values: Vec<Duration>) -> Option<Duration> {
    values.sort();
    values.get(values.len() / 2).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            enabled: true,
            interval: Duration::from_secs(300),
            timeout: Duration::from_secs(30),
            min_gap: Duration::from_secs(15),
        }
    }

    #[test]
    fn first_round_at_once_then_on_the_interval() {
        let s = settings();
        let t0 = Instant::now();
        let mut sched = Schedule::default();
        assert!(sched.may_start(t0, &s));
        sched.started(t0);
        sched.finished(true);
        assert_eq!(sched.due(&s), Some(t0 + s.interval));
        assert!(!sched.may_start(t0 + Duration::from_secs(299), &s));
        assert!(sched.may_start(t0 + s.interval, &s));
    }

    #[test]
    fn a_request_brings_the_round_forward_but_not_closer_than_the_gap() {
        let s = settings();
        let t0 = Instant::now();
        let mut sched = Schedule::default();
        sched.started(t0);
        sched.finished(true);
        sched.requested = true;
        assert_eq!(sched.due(&s), Some(t0 + s.min_gap));
        sched.started(t0 + s.min_gap);
        assert!(!sched.requested, "a started round answers the request");
        assert_eq!(sched.due(&s), Some(t0 + s.min_gap + s.interval));
    }

    #[test]
    fn failures_back_off_from_the_gap_to_the_interval() {
        let s = settings();
        let t0 = Instant::now();
        let mut sched = Schedule::default();
        let mut gaps = Vec::new();
        for _ in 0..7 {
            sched.started(t0);
            sched.finished(false);
            gaps.push((sched.due(&s).unwrap() - t0).as_secs());
        }
        assert_eq!(gaps, [15, 30, 60, 120, 240, 300, 300]);
        // A request does not hammer a failing node faster than its gap.
        sched.requested = true;
        assert_eq!(sched.due(&s), Some(t0 + s.min_gap));
        sched.finished(true);
        sched.requested = false;
        assert_eq!(sched.due(&s), Some(t0 + s.interval));
    }

    #[test]
    fn start_ticks_survive_odd_command_names() {
        let stat = "4242 (we ird) (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_ticks(stat), Some(987654));
        assert_eq!(parse_start_ticks("garbage"), None);
    }

    #[test]
    fn leftovers_are_objects_of_dead_owners_or_earlier_rounds() {
        let me = OWNER.clone();
        assert!(me.is_leftover(&me.label()), "an earlier round of this very process");
        // PID 1 runs, but not since tick 1 (a reused PID after a reboot).
        let init_ticks = start_ticks(1).unwrap();
        assert!(!me.is_leftover(&format!("1-{init_ticks}")), "a live other owner keeps its objects");
        assert!(me.is_leftover(&format!("1-{}", init_ticks + 1)));
        assert!(me.is_leftover("4194304999-1"), "no such PID");
        assert!(!me.is_leftover("someone-else"));
        assert!(!me.is_leftover("image"));
    }

    #[test]
    fn a_failure_names_its_stage_and_a_pass_its_timings() {
        let report = round::Report {
            stages: vec![
                (Stage::Image, Duration::from_millis(3)),
                (Stage::Network, Duration::from_millis(40)),
            ],
            total: Duration::from_millis(1234),
            failure: None,
            leftovers_removed: 2,
            imported: true,
        };
        let obs = observation(&report);
        assert!(obs.ok);
        assert!(
            obs.detail.ends_with(
                "in 1.2 s (image 3 ms, network 40 ms); image imported; removed 2 leftover canary object(s)"
            ),
            "{}",
            obs.detail
        );
        let failed = round::Report {
            failure: Some((Stage::Network, "netavark: nftables error: unable to execute nft".into())),
            ..report
        };
        assert_eq!(
            observation(&failed),
            Observation::fail(
                CHECK,
                "network: netavark: nftables error: unable to execute nft (round 1.2 s)"
            )
        );
    }
}
