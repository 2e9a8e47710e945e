//! The prober of the node suites and the bench: polls a path of the agent (`/readyz`, `/healthz`)
//! from a thread in the node's network namespace and keeps every answer's time, status and
//! latency, each change of status or failing checks with its text, and each change between 200,
//! 503 and no answer with the host CLOCK_MONOTONIC time the answer arrived (comparable with the
//! journal's `__MONOTONIC_TIMESTAMP`). Also what the suites read out of one `/readyz` answer.

use crate::harness::node::{self, Node, AGENT_PORT};
use anyhow::{anyhow, bail, ensure, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Check `name` of a `/readyz` (or `/status`) answer.
pub fn check(json: &serde_json::Value, name: &str) -> Result<serde_json::Value> {
    json["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name))
        .cloned()
        .ok_or_else(|| anyhow!("/readyz lacks check {name}: {json}"))
}

/// The `canary` check of a `/readyz` answer, which must be a passing required check whose
/// round reached its service: its detail and the round's time (`... in 0.8 s (...)`).
pub fn passing_canary(json: &serde_json::Value) -> Result<(String, Option<Duration>)> {
    let canary = check(json, "canary")?;
    ensure!(
        canary["ok"] == true && canary["required"] == true,
        "canary is not a passing required check: {canary}"
    );
    let detail = canary["detail"].as_str().unwrap_or_default().to_string();
    ensure!(detail.contains("reached its service by alias"), "canary detail: {detail}");
    let secs =
        detail.split(" in ").nth(1).and_then(|r| r.split(' ').next()).and_then(|t| t.parse::<f64>().ok());
    Ok((detail, secs.map(Duration::from_secs_f64)))
}

/// One answer of the prober: when it was asked, status (None: no answer), how long it took.
struct Sample {
    at: Instant,
    code: Option<u16>,
    latency: Duration,
}

/// A change between 200 (`Some(true)`), 503 (`Some(false)`) and no or another answer (`None`),
/// stamped with the host CLOCK_MONOTONIC in µs when the answer arrived.
pub type Change = (u64, Option<bool>);

#[derive(Default)]
struct ProbeData {
    samples: Vec<Sample>,
    /// Changes of (status, failing checks), with the text.
    changes: Vec<(Instant, Option<u16>, String)>,
    /// Changes of the 200/503/no answer state, monotonic at answer time.
    states: Vec<Change>,
}

/// When the prober asks again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pace {
    /// `interval` after each answer (the suites).
    AfterAnswer,
    /// Every `interval` on a fixed schedule, whatever the answers take (the bench), catching up
    /// without a burst when one ran late.
    FixedRate,
}

/// Polls a path of the agent from a thread in the node's network namespace.
pub struct Prober {
    stop: Arc<AtomicBool>,
    data: Arc<Mutex<ProbeData>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

/// What a stopped prober saw.
pub struct History {
    /// One `\n  +N ms CODE detail` line a change, times from the first answer.
    pub text: String,
    /// Answers other than 200 (no answer included).
    pub not_ok: usize,
    pub max_latency: Duration,
}

impl Prober {
    /// Starts polling `path` of the node's agent, pausing `interval` after each answer.
    pub fn start(node: &mut Node, path: &str, interval: Duration) -> Result<Prober> {
        Ok(Prober::start_in(node.leader()?, path, interval, Pace::AfterAnswer))
    }

    /// Starts polling `path` of the agent in the network namespace of `leader`, paced by `pace`.
    pub fn start_in(leader: i32, path: &str, interval: Duration, pace: Pace) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let data = Arc::new(Mutex::new(ProbeData::default()));
        let (stop2, data2, path) = (stop.clone(), data.clone(), path.to_string());
        let handle = std::thread::spawn(move || {
            if node::enter_netns(leader).is_err() {
                return;
            }
            let mut last: Option<(Option<u16>, String)> = None;
            let mut next = Instant::now();
            while !stop2.load(Ordering::Relaxed) {
                let at = Instant::now();
                let answer = node::get_local(AGENT_PORT, &path);
                let latency = at.elapsed();
                // The answer's time: when it arrived.
                let answered_us = node::monotonic_us();
                let (code, text) = match answer {
                    Ok((200, _)) => (Some(200), String::new()),
                    Ok((code, body)) => (Some(code), failing_text(&body)),
                    Err(e) => (None, format!("{e:#}")),
                };
                let state = match code {
                    Some(200) => Some(true),
                    Some(503) => Some(false),
                    _ => None,
                };
                let mut d = data2.lock().unwrap();
                d.samples.push(Sample { at, code, latency });
                if d.states.last().map(|c| c.1) != Some(state) {
                    d.states.push((answered_us, state));
                }
                if last.as_ref() != Some(&(code, text.clone())) {
                    d.changes.push((at, code, text.clone()));
                    last = Some((code, text));
                }
                drop(d);
                match pace {
                    Pace::AfterAnswer => std::thread::sleep(interval),
                    Pace::FixedRate => {
                        next += interval;
                        let now = Instant::now();
                        if next > now {
                            std::thread::sleep(next - now);
                        } else {
                            next = now;
                        }
                    }
                }
            }
        });
        Prober { stop, data, handle: Some(handle) }
    }

    /// When the first answer at or after `after` was 200 (`want`) or another status (`!want`);
    /// "not within {timeout}" when none came in time.
    pub fn wait(&self, after: Instant, want: bool, timeout: Duration) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .data
                .lock()
                .unwrap()
                .samples
                .iter()
                .find(|s| s.at >= after && s.code.is_some() && (s.code == Some(200)) == want)
                .map(|s| s.at);
            if let Some(at) = found {
                return Ok(at);
            }
            ensure!(Instant::now() < deadline, "not within {timeout:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// How long answers after `after` were other than 200 (sum of sample intervals).
    pub fn not_ok_time(&self, after: Instant) -> Duration {
        let d = self.data.lock().unwrap();
        let samples: Vec<&Sample> = d.samples.iter().filter(|s| s.at >= after).collect();
        samples.windows(2).filter(|w| w[0].code != Some(200)).map(|w| w[1].at - w[0].at).sum()
    }

    /// The first answer after `after` that was not 200.
    pub fn first_not_ok(&self, after: Instant) -> Option<Instant> {
        self.data.lock().unwrap().samples.iter().find(|s| s.at >= after && s.code != Some(200)).map(|s| s.at)
    }

    /// The first time (monotonic µs) at or after `after_us` the state became 200 (`want`) or 503.
    pub fn first_us(&self, after_us: u64, want: bool) -> Option<u64> {
        let d = self.data.lock().unwrap();
        d.states.iter().find(|(at, s)| *at >= after_us && *s == Some(want)).map(|c| c.0)
    }

    /// The latest state and since when (monotonic µs).
    pub fn current(&self) -> Option<Change> {
        self.data.lock().unwrap().states.last().copied()
    }

    /// Waits for the first change to 200 (`want`) or 503 at or after `after_us` (monotonic µs).
    pub fn wait_us(&self, after_us: u64, want: bool, timeout: Duration) -> Option<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(at) = self.first_us(after_us, want) {
                return Some(at);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until the state has been 200 (`want`) or 503 for `stable` without a change.
    pub fn wait_stable(&self, want: bool, stable: Duration, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((since, state)) = self.current() {
                if state == Some(want)
                    && node::monotonic_us().saturating_sub(since) >= stable.as_micros() as u64
                {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!("/readyz was not steadily {} within {timeout:?}", if want { 200 } else { 503 });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every answer's latency so far.
    pub fn latencies(&self) -> Vec<Duration> {
        self.data.lock().unwrap().samples.iter().map(|s| s.latency).collect()
    }

    /// The texts of the changes so far that `keep` accepts.
    pub fn details_matching(&self, keep: impl Fn(&str) -> bool) -> Vec<String> {
        let d = self.data.lock().unwrap();
        d.changes.iter().map(|c| c.2.clone()).filter(|t| keep(t)).collect()
    }

    /// Stops polling; returns what it saw.
    pub fn stop(mut self) -> History {
        self.halt();
        let d = self.data.lock().unwrap();
        let first = d.changes.first().map(|c| c.0);
        let text = d
            .changes
            .iter()
            .map(|(at, code, detail)| {
                let rel = first.map(|f| *at - f).unwrap_or_default();
                let code = code.map_or("no answer".to_string(), |c| c.to_string());
                format!("\n  +{:.0} ms {code} {detail}", rel.as_secs_f64() * 1000.0)
            })
            .collect();
        History {
            text,
            not_ok: d.samples.iter().filter(|s| s.code != Some(200)).count(),
            max_latency: d.samples.iter().map(|s| s.latency).max().unwrap_or_default(),
        }
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Prober {
    /// A prober dropped on an error path stops polling too.
    fn drop(&mut self) {
        self.halt();
    }
}

/// `name: detail; ...` of the failing checks in a `/readyz` body.
pub fn failing_checks(json: &serde_json::Value) -> String {
    json["checks"]
        .as_array()
        .map(|checks| {
            checks
                .iter()
                .filter(|c| c["ok"] == false)
                .map(|c| {
                    format!("{}: {}", c["name"].as_str().unwrap_or("?"), c["detail"].as_str().unwrap_or(""))
                })
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default()
}

/// The failing checks of a `/readyz` body, or the first 200 characters of another body.
pub fn failing_text(body: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(body) {
        Ok(json) => failing_checks(&json),
        Err(_) => body.chars().take(200).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_failing_checks_of_a_readyz_body() {
        let body = r#"{"ready":false,"checks":[{"name":"subuid","ok":true,"detail":"fine"},{"name":"linger","ok":false,"detail":"off"}]}"#;
        assert_eq!(failing_text(body), "linger: off");
        assert_eq!(failing_text("main loop has not run for 9s\n"), "main loop has not run for 9s\n");
        assert_eq!(failing_text(&"x".repeat(300)).len(), 200);
    }
}
