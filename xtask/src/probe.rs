//! The prober of the node suites: polls a path of the agent (`/readyz`, `/healthz`) from a thread
//! in the node's network namespace and keeps every answer's time, status and latency, and each
//! change of status or failing checks with its text.

use crate::node::{self, Node, AGENT_PORT};
use anyhow::{ensure, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One answer of the prober: when it was asked, status (None: no answer), how long it took.
struct Sample {
    at: Instant,
    code: Option<u16>,
    latency: Duration,
}

#[derive(Default)]
struct ProbeData {
    samples: Vec<Sample>,
    /// Changes of (status, failing checks), with the text.
    changes: Vec<(Instant, Option<u16>, String)>,
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
    /// Starts polling `path` every `interval` (the pause after each answer).
    pub fn start(node: &mut Node, path: &str, interval: Duration) -> Result<Prober> {
        let leader = node.leader()?;
        let stop = Arc::new(AtomicBool::new(false));
        let data = Arc::new(Mutex::new(ProbeData::default()));
        let (stop2, data2, path) = (stop.clone(), data.clone(), path.to_string());
        let handle = std::thread::spawn(move || {
            if node::enter_netns(leader).is_err() {
                return;
            }
            let mut last: Option<(Option<u16>, String)> = None;
            while !stop2.load(Ordering::Relaxed) {
                let at = Instant::now();
                let answer = node::get_local(AGENT_PORT, &path);
                let latency = at.elapsed();
                let (code, text) = match answer {
                    Ok((200, _)) => (Some(200), String::new()),
                    Ok((code, body)) => (Some(code), failing_text(&body)),
                    Err(e) => (None, format!("{e:#}")),
                };
                let mut d = data2.lock().unwrap();
                d.samples.push(Sample { at, code, latency });
                if last.as_ref() != Some(&(code, text.clone())) {
                    d.changes.push((at, code, text.clone()));
                    last = Some((code, text));
                }
                drop(d);
                std::thread::sleep(interval);
            }
        });
        Ok(Prober { stop, data, handle: Some(handle) })
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
