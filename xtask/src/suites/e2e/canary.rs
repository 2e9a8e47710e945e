//! End-to-end scenarios of the job canary, each on a fresh node provisioned only by the
//! Ignition config: ready only after a round passed, breakages that `GET /_ping` cannot see
//! (each reported by stage and recovered from by itself), and cleanup after a killed agent.
//!
//! A child module of `e2e` (suites/e2e/), sharing its suite and helpers.

use super::fleet::{check, get_ok};
use super::{Scenario, Suite, POLL};
use crate::harness::node::Node;
use crate::harness::probe::passing_canary;
use crate::harness::tree::Os;
use crate::message_ids::CANARY_FAILED;
use crate::render::ignition::Extras;
use anyhow::{ensure, Context, Result};
use std::time::{Duration, Instant};

/// The label on everything a round creates.
const LABEL: &str = "io.executor-agent.canary";
/// Short rounds so a breakage shows within seconds: a round at least every 15 s.
const FAST_CANARY: &str = "[canary]\ninterval = \"15s\"\nmin_gap = \"5s\"\n";
const INTERVAL: Duration = Duration::from_secs(15);
/// One round's bound (canary.timeout) plus its cleanup bound.
const ROUND: Duration = Duration::from_secs(50);
const DROP_IN: &str = "/etc/executor-agent/config.d/50-canary.toml";

const SCENARIOS: &[(&str, Scenario)] = &[
    ("canary: ready only after a round passed, nothing left behind", ready_after_a_round),
    ("canary: OCI runtime not executable", runtime_not_executable),
    ("canary: the network's firewall backend missing", firewall_missing),
    ("canary: /dev/net/tun not usable by the runner user", tun_not_usable),
    ("canary: a killed agent's objects are removed, a job's are kept", leftovers_of_a_killed_agent),
];

pub fn scenarios() -> &'static [(&'static str, Scenario)] {
    SCENARIOS
}

fn ready_after_a_round(s: &mut Suite) -> Result<()> {
    const NAME: &str = "canary: ready";
    let mut node = s.ready_node(NAME)?;
    let (detail, round) = passing_canary(&node.readyz()?.1)?;
    eprintln!("    canary: {detail}");
    if let Some(round) = round {
        s.ms(NAME, "first canary round (image import included)", round);
    }
    // READY=1 came after the round passed: the unit's start job finished no earlier.
    let journal = node.run(&["journalctl", "-o", "short-monotonic", "--no-pager", "-u", "executor-agent"])?;
    let passed_at =
        monotonic_of(&journal, "check canary passes").context("no `check canary passes` in the journal")?;
    let started_at = monotonic_of(&journal, "Started executor-agent.service")
        .or_else(|| monotonic_of(&journal, "Started Rootless Podman executor agent"))
        .context("systemd did not log the unit as started")?;
    ensure!(
        passed_at <= started_at,
        "READY=1 ({started_at} s) came before the canary passed ({passed_at} s)"
    );
    assert_nothing_left(&mut node)?;
    let images = node
        .run_as_core("podman images --format '{{.Repository}}:{{.Tag}}' localhost/executor-agent-canary")?;
    ensure!(images.lines().count() == 1, "not exactly one cached canary image: {images:?}");
    let metrics = get_ok(&mut node, "/metrics")?;
    ensure!(
        metrics.lines().any(|l| l.starts_with("executor_agent_canary_rounds_total{outcome=\"pass\"} ")),
        "no passing canary round in /metrics"
    );
    Ok(())
}

fn runtime_not_executable(s: &mut Suite) -> Result<()> {
    breakage(s, "canary: OCI runtime", "service-start", "chmod a-x /usr/bin/crun", "chmod 0755 /usr/bin/crun")
        .map(drop)
}

fn firewall_missing(s: &mut Suite) -> Result<()> {
    // netavark drives iptables on Debian 12 and nftables on Debian 13.
    let (hide, show) = match s.os {
        Os::Bookworm => (
            "mv /usr/sbin/iptables /usr/sbin/iptables.hidden && mv /usr/sbin/ip6tables /usr/sbin/ip6tables.hidden",
            "mv /usr/sbin/iptables.hidden /usr/sbin/iptables && mv /usr/sbin/ip6tables.hidden /usr/sbin/ip6tables",
        ),
        Os::Trixie | Os::FcosLike => ("mv /usr/sbin/nft /usr/sbin/nft.hidden", "mv /usr/sbin/nft.hidden /usr/sbin/nft"),
    };
    breakage(s, "canary: firewall backend", "network", hide, show).map(drop)
}

fn tun_not_usable(s: &mut Suite) -> Result<()> {
    // slirp4netns (Debian 12) and pasta (Debian 13) both open /dev/net/tun as the user.
    let mut node =
        breakage(s, "canary: /dev/net/tun", "network", "chmod 0600 /dev/net/tun", "chmod 0666 /dev/net/tun")?;
    // Podman 4 leaves the rootless network namespace file of the failed start behind; every
    // start then fails on it until the agent's one repair removes it.
    let journal = node.run(&["journalctl", "-o", "cat", "--no-pager", "-u", "executor-agent"])?;
    let stale = journal.lines().any(|l| l.contains("canary round failed") && l.contains("rootless netns"));
    let repaired: Vec<&str> =
        journal.lines().filter(|l| l.contains("removed the stale rootless network namespace")).collect();
    eprintln!("    stale rootless netns seen: {stale}; repairs: {repaired:?}");
    ensure!(!stale || !repaired.is_empty(), "a stale rootless netns failed rounds and was not repaired");
    Ok(())
}

/// Breaks the node with `break_it`, expects `/readyz` 503 with the canary failing at `stage`
/// within an interval plus a round, then undoes it and expects 200 again within the same.
/// Returns the node for more checks.
fn breakage(s: &mut Suite, name: &'static str, stage: &str, break_it: &str, undo: &str) -> Result<Node> {
    let mut node = fast_node(s, name)?;
    let t = Instant::now();
    node.run(&["sh", "-c", break_it])?;
    let (_, json) = node.wait_readyz(false, INTERVAL + ROUND, POLL)?;
    s.ms(name, "broken to /readyz 503", t.elapsed());
    let canary = check(&json, "canary")?;
    let detail = canary["detail"].as_str().unwrap_or_default();
    eprintln!("    canary: {detail}");
    ensure!(detail.starts_with(&format!("{stage}: ")), "the canary does not name stage {stage}: {detail}");
    ensure!(!detail.contains(['\n', '\r']), "the detail is not one line: {detail:?}");
    let status = node.run(&["systemctl", "show", "-p", "StatusText", "--value", "executor-agent"])?;
    ensure!(status.contains(&format!("canary: {stage}: ")), "StatusText does not name the stage: {status}");
    let entries =
        node.run(&["journalctl", "-o", "json", "--no-pager", &format!("MESSAGE_ID={CANARY_FAILED}")])?;
    ensure!(
        entries.lines().any(|l| l.contains(&format!("\"STAGE\":\"{stage}\""))),
        "no journal entry MESSAGE_ID={CANARY_FAILED} with STAGE={stage}"
    );
    let metrics = get_ok(&mut node, "/metrics")?;
    let series = format!("executor_agent_canary_failures_total{{stage=\"{stage}\"}} ");
    ensure!(metrics.lines().any(|l| l.starts_with(&series)), "/metrics lacks {series}");

    let t = Instant::now();
    node.run(&["sh", "-c", undo])?;
    node.wait_readyz(true, INTERVAL + ROUND, POLL)?;
    s.ms(name, "undone to /readyz 200", t.elapsed());
    // Let a round that is still cleaning up finish before looking.
    std::thread::sleep(Duration::from_secs(1));
    assert_nothing_left(&mut node)?;
    Ok(node)
}

fn leftovers_of_a_killed_agent(s: &mut Suite) -> Result<()> {
    const NAME: &str = "canary: killed agent";
    let mut node = fast_node(s, NAME)?;
    crate::harness::node::import_test_image(&mut node)?;
    // A job of the runner's, which the canary must never touch, and an object another tool
    // labelled with the canary's key in a form the agent never writes.
    node.run_as_core("podman run -d --name job-of-the-runner localhost/busybox sleep 600 >/dev/null")?;
    node.run_as_core(&format!("podman volume create --label {LABEL}=not-ours someones-volume >/dev/null"))?;
    // Kill the agent while a round has objects on the node.
    let deadline = Instant::now() + INTERVAL + ROUND;
    loop {
        let ours = node.run_as_core(&format!("podman ps -a -q --filter label={LABEL}"))?;
        if !ours.trim().is_empty() {
            break;
        }
        ensure!(Instant::now() < deadline, "no canary container seen within {:?}", INTERVAL + ROUND);
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = node.run(&["systemctl", "show", "-p", "MainPID", "--value", "executor-agent"])?;
    node.run(&["kill", "-9", pid.trim()])?;
    let t = Instant::now();
    let left = node.run_as_core(&format!("podman ps -a -q --filter label={LABEL}"))?;
    eprintln!(
        "    killed the agent (PID {}) with {} canary container(s) on the node",
        pid.trim(),
        left.lines().count()
    );
    // systemd restarts it; its first round removes what the killed one left.
    let deadline = Instant::now() + Duration::from_secs(60) + ROUND;
    let detail = loop {
        if let Ok((_, json)) = node.readyz() {
            if let Ok(c) = check(&json, "canary") {
                let d = c["detail"].as_str().unwrap_or_default().to_string();
                if c["ok"] == true && d.contains("leftover") {
                    break d;
                }
            }
        }
        ensure!(Instant::now() < deadline, "no passing round removed the leftovers");
        std::thread::sleep(POLL);
    };
    s.ms(NAME, "kill to a round that removed the leftovers", t.elapsed());
    eprintln!("    canary: {detail}");
    std::thread::sleep(Duration::from_secs(1));
    assert_nothing_left(&mut node)?;
    let job = node.run_as_core("podman ps --format '{{.Names}}' --filter name=job-of-the-runner")?;
    ensure!(job.trim() == "job-of-the-runner", "the runner's job container is gone: {job:?}");
    let volume = node.run_as_core("podman volume ls -q --filter name=someones-volume")?;
    ensure!(volume.trim() == "someones-volume", "a volume the agent did not create was removed");
    Ok(())
}

// ---- helpers ----

/// A ready node whose canary runs every 15 s.
fn fast_node(s: &mut Suite, name: &'static str) -> Result<Node> {
    let mut node = s.node(&Extras::default())?;
    let path = node.path(DROP_IN);
    std::fs::create_dir_all(path.parent().expect("the drop-in has a directory"))?;
    std::fs::write(&path, FAST_CANARY).with_context(|| format!("cannot write {}", path.display()))?;
    s.boot_until_ready(&mut node, name)?;
    Ok(node)
}

/// No canary container, network or volume of the agent's on the node. A round that is running
/// right now has objects for a few seconds: they must be gone well before the next round.
fn assert_nothing_left(node: &mut Node) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let mut left = Vec::new();
        for kind in ["ps -a", "network ls", "volume ls"] {
            let out = node.run_as_core(&format!("podman {kind} -q --filter label={LABEL}"))?;
            // Volumes another tool labelled are not the agent's (leftovers_of_a_killed_agent).
            let ours = out.lines().map(str::trim).filter(|l| !l.is_empty() && *l != "someones-volume");
            left.extend(ours.map(|id| format!("podman {kind}: {id}")));
        }
        if left.is_empty() {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "the canary left objects behind: {left:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The monotonic time (seconds) of the first `short-monotonic` journal line containing `text`.
fn monotonic_of(journal: &str, text: &str) -> Option<f64> {
    journal
        .lines()
        .find(|l| l.contains(text))
        .and_then(|l| l.trim_start().strip_prefix('[')?.split(']').next()?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_monotonic_journal_times() {
        let j = "[    2.104512] node executor-agent[55]: check canary passes: ok\n[    2.2] node systemd[1]: Started x\n";
        assert_eq!(monotonic_of(j, "check canary passes"), Some(2.104512));
        assert_eq!(monotonic_of(j, "Started"), Some(2.2));
        assert_eq!(monotonic_of(j, "nothing"), None);
    }
}
