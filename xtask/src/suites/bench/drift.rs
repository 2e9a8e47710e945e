//! Time to detect and to repair drift: faults injected from the host with as little delay as
//! possible, `/readyz` watched by a 10 ms prober and the agent's own journal entries; and the
//! poll-only baseline, a shell health check every 10 s in a node without the agent.

use super::ready::{agent_journal, message, mono};
use super::{nsenter, nsenter_as_core, random_u64};
use crate::harness::node::{self, Node, PODMAN_SOCK};
use crate::harness::probe::{Pace, Prober};
use crate::message_ids::{NODE_NOT_READY, NODE_READY, REPAIR_FAILED};
use anyhow::{bail, Context, Result};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    SocketStopped,
    SocketFileDeleted,
    PodmanKilled,
    LingerOff,
}

pub const ALL: [Fault; 4] =
    [Fault::SocketStopped, Fault::SocketFileDeleted, Fault::PodmanKilled, Fault::LingerOff];

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::SocketStopped => "podman.socket stopped (as core)",
            Fault::SocketFileDeleted => "socket file deleted",
            Fault::PodmanKilled => "podman.service killed (SIGKILL to its main process)",
            Fault::LingerOff => "linger off (loginctl disable-linger)",
        }
    }

    /// Makes the fault possible (podman.service must run before it can be killed).
    fn prepare(self, leader: i32) -> Result<()> {
        if self == Fault::PodmanKilled {
            let ping = nsenter_as_core(
                leader,
                &["curl", "-sSf", "--max-time", "10", "--unix-socket", PODMAN_SOCK, "http://d/_ping"],
            )?;
            if ping.trim() != "OK" {
                bail!("/_ping answered {ping:?}");
            }
            let state = nsenter_as_core(leader, &["systemctl", "--user", "is-active", "podman.service"])
                .unwrap_or_default();
            if state.trim() != "active" {
                bail!("podman.service is {} after a /_ping", state.trim());
            }
        }
        Ok(())
    }

    /// Applies the fault; returns host CLOCK_MONOTONIC µs just before and just after.
    fn inject(self, leader: i32) -> Result<(u64, u64)> {
        let t0 = node::monotonic_us();
        match self {
            Fault::SocketStopped => {
                nsenter_as_core(leader, &["systemctl", "--user", "stop", "podman.socket"])?;
            }
            Fault::SocketFileDeleted => {
                // Through the node's root as the host sees it: no process start in the way.
                let path = format!("/proc/{leader}/root{PODMAN_SOCK}");
                std::fs::remove_file(&path).with_context(|| format!("cannot remove {path}"))?;
            }
            Fault::PodmanKilled => {
                nsenter_as_core(
                    leader,
                    &["systemctl", "--user", "kill", "--kill-who=main", "-s", "KILL", "podman.service"],
                )?;
            }
            Fault::LingerOff => {
                nsenter(leader, &["loginctl", "disable-linger", "core"])?;
            }
        }
        Ok((t0, node::monotonic_us()))
    }
}

/// One injected fault on the agent's node. Times in µs after `t0`.
#[derive(Clone, Debug)]
pub struct AgentFault {
    pub fault: Fault,
    pub t0: u64,
    /// How long the injecting command took (the fault happened within it).
    pub inject_us: u64,
    pub probe_down: Option<u64>,
    pub probe_up: Option<u64>,
    pub journal_down: Option<u64>,
    pub journal_up: Option<u64>,
    /// When `/readyz` stayed 200: whether a `GET /_ping` as core answered OK right after.
    pub api_ok_after: Option<bool>,
    /// The agent's "repair failed" entries between the fault and the next one (µs after t0, text).
    pub repair_failures: Vec<(u64, String)>,
}

/// Injects `reps` rounds of `faults` (interleaved) on a ready agent node.
pub fn agent_faults(
    node: &mut Node,
    faults: &[Fault],
    reps: usize,
    verbose: bool,
) -> Result<Vec<AgentFault>> {
    let leader = node.leader()?;
    let prober = Prober::start_in(leader, "/readyz", Duration::from_millis(10), Pace::FixedRate);
    let mut runs = Vec::new();
    for rep in 0..reps {
        for &fault in faults {
            prober.wait_stable(true, Duration::from_millis(500), Duration::from_secs(60)).with_context(
                || format!("before fault {} #{}: the node did not settle ready", fault.name(), rep + 1),
            )?;
            fault.prepare(leader).with_context(|| format!("preparing {}", fault.name()))?;
            // The /_ping above may have woken the agent: let it settle again.
            prober.wait_stable(true, Duration::from_millis(300), Duration::from_secs(30))?;
            let (t0, t1) = fault.inject(leader).with_context(|| format!("injecting {}", fault.name()))?;
            let down = prober.wait_us(t0, false, Duration::from_secs(3));
            let up = match down {
                Some(d) => Some(prober.wait_us(d, true, Duration::from_secs(60)).with_context(|| {
                    format!("{} #{}: /readyz did not come back to 200 within 60 s", fault.name(), rep + 1)
                })?),
                None => None,
            };
            let api_ok_after = down.is_none().then(|| {
                nsenter_as_core(
                    leader,
                    &["curl", "-sSf", "--max-time", "10", "--unix-socket", PODMAN_SOCK, "http://d/_ping"],
                )
                .is_ok_and(|out| out.trim() == "OK")
            });
            let run = AgentFault {
                fault,
                t0,
                inject_us: t1 - t0,
                probe_down: down.map(|d| d.saturating_sub(t0)),
                probe_up: up.map(|u| u.saturating_sub(t0)),
                journal_down: None,
                journal_up: None,
                api_ok_after,
                repair_failures: Vec::new(),
            };
            if verbose {
                eprintln!(
                    "    {:<40} #{:<2} inject {:>5.1} ms  503 after {}  200 after {}",
                    fault.name(),
                    rep + 1,
                    run.inject_us as f64 / 1000.0,
                    ms_opt(run.probe_down),
                    ms_opt(run.probe_up)
                );
            }
            runs.push(run);
        }
    }
    prober.wait_stable(true, Duration::from_millis(500), Duration::from_secs(60))?;
    drop(prober);
    // The agent's own view: NODE_NOT_READY and NODE_READY after each fault, before the next one.
    let journal = agent_journal(leader)?;
    let events: Vec<(u64, bool)> = journal
        .iter()
        .filter_map(|e| {
            let id = e["MESSAGE_ID"].as_str()?;
            (id == NODE_NOT_READY || id == NODE_READY).then(|| (mono(e), id == NODE_READY))
        })
        .collect();
    for i in 0..runs.len() {
        let (t0, end) = (runs[i].t0, runs.get(i + 1).map_or(u64::MAX, |r| r.t0));
        let down = events.iter().find(|(at, ready)| *at >= t0 && *at < end && !ready).map(|e| e.0);
        let up =
            down.and_then(|d| events.iter().find(|(at, ready)| *at >= d && *at < end && *ready).map(|e| e.0));
        runs[i].journal_down = down.map(|d| d - t0);
        runs[i].journal_up = up.map(|u| u - t0);
        runs[i].repair_failures = journal
            .iter()
            .filter(|e| e["MESSAGE_ID"] == REPAIR_FAILED && (t0..end).contains(&mono(e)))
            .map(|e| (mono(e) - t0, message(e)))
            .collect();
    }
    Ok(runs)
}

fn ms_opt(us: Option<u64>) -> String {
    us.map_or("-".to_string(), |u| format!("{:.0} ms", u as f64 / 1000.0))
}

// ---- the poll-only baseline ----

pub const POLL_INTERVAL_S: u64 = 10;

/// A shell health check at the usual 10 s interval: the checks a shell can do for what the
/// agent checks, and the lean repair when one fails. Prints its own CPU time (utime, stime,
/// cutime, cstime from /proc/$$/stat, clock ticks) after every round.
const POLLER_SCRIPT: &str = r#"#!/bin/bash
# bench baseline: a poll-only health check of rootless Podman for core, every 10 s.
SOCK=/run/user/1000/podman/podman.sock
as_core() { runuser -u core -- env XDG_RUNTIME_DIR=/run/user/1000 DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/1000/bus "$@"; }
check() {
  [ -e /var/lib/systemd/linger/core ] || { echo "linger off"; return 1; }
  as_core systemctl --user is-active --quiet podman.socket || { echo "podman.socket not active"; return 1; }
  [ -S "$SOCK" ] || { echo "socket file missing"; return 1; }
  as_core curl -sf --max-time 5 --unix-socket "$SOCK" http://d/_ping >/dev/null || { echo "_ping failed"; return 1; }
}
repair() {
  loginctl enable-linger core
  systemctl start user@1000.service
  as_core systemctl --user enable podman.socket
  as_core systemctl --user stop podman.service
  as_core systemctl --user restart podman.socket
}
cpu() { read -r -a f < /proc/$$/stat; echo "POLL CPU ${f[13]} ${f[14]} ${f[15]} ${f[16]}"; }
while :; do
  if why=$(check); then
    echo "POLL OK"
  else
    echo "POLL NOT-READY $why"
    repair >/dev/null 2>&1
    if why=$(check); then echo "POLL REPAIRED"; else echo "POLL STILL-NOT-READY $why"; fi
  fi
  cpu
  sleep 10
done
"#;

const POLLER_UNIT: &str = "[Unit]\n\
Description=bench baseline: poll-only health check every 10 s\n\n\
[Service]\n\
ExecStart=/bin/bash /usr/local/bin/bench-poller\n";

#[derive(Clone, Debug)]
pub struct PollerFault {
    pub fault: Fault,
    /// µs after the fault.
    pub detect: Option<u64>,
    pub repair: Option<u64>,
}

#[derive(Clone, Debug, Default)]
pub struct PollerResult {
    pub faults: Vec<PollerFault>,
    /// CPU seconds per second (fraction of a core) of idle rounds.
    pub idle_cpu: Option<f64>,
    /// How long one idle round of checks took, s (median).
    pub check_s: Option<f64>,
}

/// A poller journal line: monotonic µs and text.
fn poller_lines(leader: i32) -> Result<Vec<(u64, String)>> {
    let out = nsenter(
        leader,
        &["journalctl", "--no-pager", "-o", "json", "-n", "400", "_SYSTEMD_UNIT=bench-poller.service"],
    )?;
    Ok(out
        .lines()
        .filter_map(|l| serde_json::from_str::<super::Json>(l).ok())
        .map(|e| (mono(&e), message(&e)))
        .filter(|(_, m)| m.starts_with("POLL "))
        .collect())
}

/// Runs the poller on a ready baseline node without the agent: `idle_rounds` quiet rounds for
/// its CPU cost, then each fault `reps` times, each at a random phase of the poll interval.
pub fn poller_experiment(
    node: &mut Node,
    faults: &[Fault],
    reps: usize,
    idle_rounds: usize,
    verbose: bool,
) -> Result<PollerResult> {
    let leader = node.leader()?;
    crate::harness::host::write(node.path("/usr/local/bin/bench-poller"), POLLER_SCRIPT)?;
    crate::harness::host::write(node.path("/etc/systemd/system/bench-poller.service"), POLLER_UNIT)?;
    nsenter(leader, &["systemctl", "daemon-reload"])?;
    nsenter(leader, &["systemctl", "start", "bench-poller.service"])?;
    let mut result = PollerResult::default();
    // Quiet rounds: CPU per round.
    let deadline = Instant::now() + Duration::from_secs(POLL_INTERVAL_S * (idle_rounds as u64 + 2) + 10);
    let lines = loop {
        let lines = poller_lines(leader)?;
        if lines.iter().filter(|(_, m)| m.starts_with("POLL CPU")).count() > idle_rounds {
            break lines;
        }
        if Instant::now() >= deadline {
            bail!("the poller did not run {idle_rounds} rounds: {lines:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let cpu_lines: Vec<(u64, f64)> = lines
        .iter()
        .filter_map(|(at, m)| {
            let ticks: Vec<f64> =
                m.strip_prefix("POLL CPU ")?.split_whitespace().filter_map(|v| v.parse().ok()).collect();
            (ticks.len() == 4).then(|| (*at, ticks.iter().sum::<f64>()))
        })
        .collect();
    if cpu_lines.len() >= 2 {
        let (a, b) = (cpu_lines.first().unwrap(), cpu_lines.last().unwrap());
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        result.idle_cpu = Some(((b.1 - a.1) / hz) / ((b.0 - a.0) as f64 / 1e6));
    }
    // A round's duration: from the previous round's CPU line (then sleep 10) to the next OK line.
    let mut checks = Vec::new();
    for w in lines.windows(2) {
        if w[0].1.starts_with("POLL CPU") && w[1].1 == "POLL OK" {
            let gap = secs_f(w[1].0.saturating_sub(w[0].0)) - POLL_INTERVAL_S as f64;
            if gap >= 0.0 {
                checks.push(gap);
            }
        }
    }
    result.check_s = super::median(&checks);
    // Faults at random phases.
    for rep in 0..reps {
        for &fault in faults {
            let delay = Duration::from_millis(random_u64() % (POLL_INTERVAL_S * 1000));
            std::thread::sleep(delay);
            fault.prepare(leader).with_context(|| format!("poller: preparing {}", fault.name()))?;
            let (t0, _) = fault.inject(leader)?;
            let deadline = Instant::now() + Duration::from_secs(POLL_INTERVAL_S * 2 + 5);
            let (mut detect, mut repair) = (None, None);
            while Instant::now() < deadline && repair.is_none() {
                std::thread::sleep(Duration::from_millis(300));
                let lines = poller_lines(leader)?;
                detect =
                    lines.iter().find(|(at, m)| *at >= t0 && m.starts_with("POLL NOT-READY")).map(|l| l.0);
                if let Some(d) = detect {
                    repair = lines
                        .iter()
                        .find(|(at, m)| *at >= d && (m == "POLL REPAIRED" || m.starts_with("POLL STILL")))
                        .map(|l| l.0);
                }
            }
            let run = PollerFault { fault, detect: detect.map(|d| d - t0), repair: repair.map(|r| r - t0) };
            if verbose {
                eprintln!(
                    "    poller: {:<40} #{:<2} not ready after {}  repaired after {}",
                    fault.name(),
                    rep + 1,
                    ms_opt(run.detect),
                    ms_opt(run.repair)
                );
            }
            result.faults.push(run);
        }
    }
    nsenter(leader, &["systemctl", "stop", "bench-poller.service"])?;
    Ok(result)
}

fn secs_f(us: u64) -> f64 {
    us as f64 / 1e6
}
