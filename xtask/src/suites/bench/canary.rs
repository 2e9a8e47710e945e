//! What the job canary costs: round wall time, and CPU per round (every process of the node:
//! the agent, Podman's API service, conmon, netavark, the containers), from a node whose
//! canary runs every `INTERVAL`, against the same node with the canary off.

use super::procfs;
use super::Json;
use crate::harness::node::{Node, AGENT_PORT};
use anyhow::{bail, Context, Result};
use std::time::{Duration, Instant};

const DROP_IN: &str = "/etc/executor-agent/config.d/50-bench-canary.toml";
/// Rounds close together so a window holds several; each a fresh round of the same work.
const INTERVAL: Duration = Duration::from_secs(20);

#[derive(Clone, Debug, Default)]
pub struct Cost {
    /// Wall time of each round the window saw, seconds.
    pub round_s: Vec<f64>,
    /// Node CPU seconds per round beyond the same node idle.
    pub cpu_per_round_s: f64,
    pub window_s: f64,
    /// Node CPU seconds over the window, with rounds and with the canary off.
    pub cpu_with_s: f64,
    pub cpu_idle_s: f64,
}

impl Cost {
    /// CPU seconds per hour at the default interval (5 min: 12 rounds).
    pub fn cpu_per_hour_at_default_s(&self) -> f64 {
        self.cpu_per_round_s * 12.0
    }
}

/// Everything the node's processes have used, waited-for children included: a process that
/// exits moves its time into its parent's, so the sum only grows.
fn node_cpu(leader: i32) -> f64 {
    std::iter::once(leader)
        .chain(procfs::descendants(leader))
        .filter_map(|p| procfs::cpu(p).ok())
        .map(|c| c.total())
        .sum()
}

fn rounds_and_detail(node: &mut Node) -> Result<(u64, String)> {
    let (_, body) = node.http_get(AGENT_PORT, "/metrics")?;
    let rounds = body
        .lines()
        .filter(|l| l.starts_with("executor_agent_canary_rounds_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64;
    let (_, readyz) = node.http_get(AGENT_PORT, "/readyz")?;
    let json: Json = serde_json::from_str(&readyz).context("/readyz is not JSON")?;
    let detail = json["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "canary"))
        .and_then(|c| c["detail"].as_str())
        .unwrap_or_default()
        .to_string();
    Ok((rounds, detail))
}

/// "... in 1.4 s (...)" of a passing round's detail.
fn round_seconds(detail: &str) -> Option<f64> {
    detail.split(" in ").nth(1)?.split(" s").next()?.parse().ok()
}

/// Measures `window` on the agent node with rounds every 20 s, then the same with the canary
/// off (the agent restarted with `enabled = false`).
pub fn cost(node: &mut Node, leader: i32, window: Duration) -> Result<Cost> {
    let path = node.path(DROP_IN);
    std::fs::create_dir_all(path.parent().expect("a drop-in has a directory"))?;
    std::fs::write(&path, format!("[canary]\ninterval = \"{}s\"\nmin_gap = \"5s\"\n", INTERVAL.as_secs()))?;
    super::nsenter(leader, &["systemctl", "restart", "executor-agent"])?;
    // The restart's own round, and Podman's service going idle after it, are not measured.
    wait_rounds(node, 1, Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_secs(7));

    let (start_rounds, _) = rounds_and_detail(node)?;
    let cpu0 = node_cpu(leader);
    let started = Instant::now();
    let mut round_s = Vec::new();
    let mut seen = start_rounds;
    while started.elapsed() < window {
        std::thread::sleep(Duration::from_millis(200));
        let (rounds, detail) = rounds_and_detail(node)?;
        if rounds > seen {
            seen = rounds;
            if let Some(s) = round_seconds(&detail) {
                round_s.push(s);
            }
        }
    }
    let cpu_with = node_cpu(leader) - cpu0;
    let rounds = seen - start_rounds;
    if rounds == 0 {
        bail!("no canary round ran in a {}s window", window.as_secs());
    }

    std::fs::write(&path, "[canary]\nenabled = false\n")?;
    super::nsenter(leader, &["systemctl", "restart", "executor-agent"])?;
    std::thread::sleep(Duration::from_secs(7));
    let cpu1 = node_cpu(leader);
    std::thread::sleep(window);
    let cpu_idle = node_cpu(leader) - cpu1;
    std::fs::remove_file(&path)?;
    super::nsenter(leader, &["systemctl", "restart", "executor-agent"])?;
    Ok(Cost {
        round_s,
        cpu_per_round_s: (cpu_with - cpu_idle).max(0.0) / rounds as f64,
        window_s: window.as_secs_f64(),
        cpu_with_s: cpu_with,
        cpu_idle_s: cpu_idle,
    })
}

fn wait_rounds(node: &mut Node, at_least: u64, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok((rounds, _)) = rounds_and_detail(node) {
            if rounds >= at_least {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            bail!("no canary round within {}s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_round_time_of_a_detail() {
        let d = "a job reached its service by alias on a per-round network, used a named volume and a published port in 1.4 s (image 3 ms)";
        assert_eq!(round_seconds(d), Some(1.4));
        assert_eq!(round_seconds("network: failed (round 0.1 s)"), None);
    }
}
