//! End-to-end scenarios of the rootless boundary: a dedicated runner user with the shipped
//! unit, and the runner user as an attacker of the root agent.
//!
//! A child module of `e2e` (suites/e2e/), sharing its suite and helpers.

use super::fleet::check;
use super::{Scenario, Suite};
use crate::harness::node::Node;
use crate::render::ignition::Extras;
use anyhow::{bail, ensure, Context, Result};
use std::time::Duration;

const DROP_IN: &str = "/etc/executor-agent/config.d/50-runner.toml";
/// A dedicated runner user as the README's Butane snippet makes it: no groups, its own UID.
const RUNNER: &str = "runner";
const RUNNER_UID: u32 = 1001;

const SCENARIOS: &[(&str, Scenario)] = &[
    ("boundary: a dedicated runner user works with the shipped unit", dedicated_runner_user),
    ("boundary: the runner user attacks the agent: nothing leaks, nothing stalls", attacker),
];

/// The runner user's files the attacks replace.
const PAUSE_PID: &str = "/run/user/1000/libpod/tmp/pause.pid";
const CONTAINERS_CONF: &str = "/home/core/.config/containers/containers.conf";
const STORAGE_CONF: &str = "/home/core/.config/containers/storage.conf";
const API_SOCKET: &str = "/run/user/1000/podman/podman.sock";
const FAST_RESYNC: &str = "[repair]\nresync_interval = \"1s\"\n";

pub fn scenarios() -> &'static [(&'static str, Scenario)] {
    SCENARIOS
}

fn dedicated_runner_user(s: &mut Suite) -> Result<()> {
    const NAME: &str = "boundary: runner user";
    let mut node = s.node(&Extras::default())?;
    // The user, as `passwd.users` in Butane would make it (no groups), with none of the
    // subordinate ranges Debian's useradd adds by itself and no containers configuration.
    let root = node.dir.to_string_lossy().into_owned();
    crate::harness::host::run(crate::harness::host::cmd(
        "chroot",
        [root.as_str(), "useradd", "-m", "-u", &RUNNER_UID.to_string(), "-U", "-s", "/bin/bash", RUNNER],
    ))?;
    for file in ["/etc/subuid", "/etc/subgid"] {
        let path = node.path(file);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let kept: String = text
            .lines()
            .filter(|l| !l.starts_with(&format!("{RUNNER}:")))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&path, kept)?;
    }
    let path = node.path(DROP_IN);
    std::fs::create_dir_all(path.parent().expect("the drop-in has a directory"))?;
    std::fs::write(&path, format!("[runner]\nuser = \"{RUNNER}\"\n"))?;
    s.boot_until_ready(&mut node, NAME)?;

    let json = node.readyz()?.1;
    let canary = check(&json, "canary")?;
    ensure!(canary["ok"] == true, "the canary does not pass for {RUNNER}: {canary}");
    let status: serde_json::Value =
        serde_json::from_str(&node.http_get(crate::harness::node::AGENT_PORT, "/status")?.1)?;
    ensure!(status["user"] == RUNNER && status["uid"] == RUNNER_UID, "/status names another user: {status}");
    // Podman created the storage only after the agent wrote storage.conf: overlay, not vfs.
    let driver = as_user(&mut node, RUNNER, "podman info --format '{{.Store.GraphDriverName}}'")?;
    ensure!(driver.trim() == "overlay", "{RUNNER}'s storage driver is {driver:?}, not overlay");
    let subuid = std::fs::read_to_string(node.path("/etc/subuid"))?;
    ensure!(subuid.lines().any(|l| l.starts_with(&format!("{RUNNER}:"))), "no range for {RUNNER}: {subuid}");
    if let Ok(privileges) = check(&json, "runner-privileges") {
        eprintln!("    runner-privileges: {}", privileges["detail"]);
        ensure!(privileges["ok"] == true, "{RUNNER} has a path to root: {privileges}");
    }
    let journal = node.run(&["journalctl", "-o", "cat", "--no-pager", "-u", "executor-agent"])?;
    for bad in ["EROFS", "Read-only file system", "Permission denied"] {
        ensure!(!journal.contains(bad), "the agent's journal says {bad:?}:\n{journal}");
    }
    Ok(())
}

/// As core, each attack in turn on a ready node, asserting that no byte of a root-only file
/// reaches any output, the unit's MainPID (and journald's) never moves, the loop keeps
/// repairing a drift injected during the attacks, and memory stays bounded.
fn attacker(s: &mut Suite) -> Result<()> {
    const NAME: &str = "boundary: attacker";
    let mut node = s.node(&Extras::default())?;
    let path = node.path("/etc/executor-agent/config.d/50-resync.toml");
    std::fs::create_dir_all(path.parent().expect("a drop-in has a directory"))?;
    std::fs::write(&path, FAST_RESYNC)?;
    // Secrets only root can read, for the leak check.
    let marker = format!("rootsecret{:016x}", crate::suites::bench::random_u64());
    let shadow = node.path("/etc/shadow");
    let mut text = std::fs::read_to_string(&shadow)?;
    text.push_str(&format!("attacked:$6${marker}$x:19000:0:99999:7:::\n"));
    std::fs::write(&shadow, text)?;
    s.boot_until_ready(&mut node, NAME)?;
    // A pause process exists once core has used Podman.
    node.run_as_core("podman info >/dev/null")?;
    let main_pid = prop(&mut node, "executor-agent", "MainPID")?;
    let journald_pid = prop(&mut node, "systemd-journald", "MainPID")?;
    let mut outputs = Vec::new();

    type Attack = (&'static str, String);
    let attacks: Vec<Attack> = vec![
        ("pause.pid is a symlink to /etc/shadow", format!("rm -f {PAUSE_PID}; ln -s /etc/shadow {PAUSE_PID}")),
        ("pause.pid names PID 1 (root)", format!("rm -f {PAUSE_PID}; echo 1 > {PAUSE_PID}")),
        (
            "containers.conf smuggles sd_notify lines in cgroup_manager",
            format!(
                "printf '[engine]\\ncgroup_manager = \"\"\"x\\nMAINPID={journald_pid}\\nREADY=1\\nSTATUS=owned\\nWATCHDOG=trigger\"\"\"\\n' > {CONTAINERS_CONF}"
            ),
        ),
        ("storage.conf is a FIFO", format!("rm -f {STORAGE_CONF}; mkfifo {STORAGE_CONF}")),
        ("storage.conf is a symlink to /etc/shadow", format!("rm -f {STORAGE_CONF}; ln -s /etc/shadow {STORAGE_CONF}")),
        (
            "the graphroot is a symlink to /root",
            "mkdir -p ~/.local/share/containers && mv ~/.local/share/containers/storage ~/storage.moved && \
             ln -s /root ~/.local/share/containers/storage"
                .to_string(),
        ),
        (
            "the API socket path points at the agent's root-only control socket",
            format!(
                "systemctl --user stop podman.socket; rm -f {API_SOCKET}; ln -s /run/executor-agent/control.sock {API_SOCKET}"
            ),
        ),
    ];
    for (what, script) in &attacks {
        eprintln!("    attack: {what}");
        node.run_as_core(script).with_context(|| format!("attack {what:?}"))?;
        // A drift the agent must still repair while under attack.
        remove_subuid_line(&node, "core")?;
        let repaired = wait_for(&mut node, Duration::from_secs(20), |n| {
            Ok(std::fs::read_to_string(n.path("/etc/subuid"))?.lines().any(|l| l.starts_with("core:")))
        });
        outputs.push(collect_outputs(&mut node)?);
        repaired.with_context(|| format!("during attack {what:?}: the subuid drift was not repaired"))?;
        let healthz = node.http_get(crate::harness::node::AGENT_PORT, "/healthz")?;
        ensure!(healthz.0 == 200, "during attack {what:?}: /healthz answered {}", healthz.0);
        ensure!(
            prop(&mut node, "executor-agent", "MainPID")? == main_pid,
            "during {what:?}: the agent's MainPID moved"
        );
        ensure!(
            prop(&mut node, "systemd-journald", "MainPID")? == journald_pid,
            "during {what:?}: journald was replaced"
        );
    }
    let rss_kib: u64 = node
        .run(&["sh", "-c", &format!("grep VmHWM /proc/{main_pid}/status")])?
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .context("no VmHWM for the agent")?;
    s.ms(NAME, format!("agent peak RSS after the attacks: {} KiB", rss_kib), Duration::ZERO);
    ensure!(rss_kib < 64 * 1024, "the agent's peak RSS grew to {rss_kib} KiB");
    // The health port while the agent is down: systemd's socket keeps it, so the runner user
    // cannot answer wait-ready, load balancers or the boot gate in the agent's place.
    node.run(&["systemctl", "stop", "executor-agent.service"])?;
    let squat = node.as_core("timeout 2 busybox nc -l -p 9739 </dev/null; echo rc=$?")?;
    let squat = String::from_utf8_lossy(&squat.stdout).trim().to_string();
    eprintln!("    core binding 9739 while the agent is stopped: {squat}");
    ensure!(!squat.ends_with("rc=124"), "core could listen on the health port while the agent was stopped");
    // The next probe starts the agent again through the socket.
    let mut answer = None;
    wait_for(&mut node, Duration::from_secs(60), |n| {
        answer = n.readyz().ok();
        Ok(answer.is_some())
    })
    .context("no answer on 9739 after the stop")?;
    let json = answer.map(|(_, j)| j).unwrap_or_default();
    ensure!(json["checks"].is_array(), "the answer on 9739 is not the agent's: {json}");
    for (i, text) in outputs.iter().enumerate() {
        ensure!(!text.contains(&marker), "attack {:?}: a root-only secret reached an output", attacks[i].0);
        ensure!(
            !text.contains("root:*:") && !text.contains("root:!"),
            "attack {:?}: /etc/shadow's root line reached an output",
            attacks[i].0
        );
    }
    Ok(())
}

/// Everything the agent says to the outside: HTTP answers, StatusText, its journal.
fn collect_outputs(node: &mut Node) -> Result<String> {
    let mut all = String::new();
    for path in ["/readyz", "/status", "/metrics"] {
        all.push_str(&node.http_get(crate::harness::node::AGENT_PORT, path)?.1);
    }
    all.push_str(&prop(node, "executor-agent", "StatusText")?);
    all.push_str(&node.run(&["journalctl", "-o", "json", "--no-pager", "-u", "executor-agent"])?);
    Ok(all)
}

fn prop(node: &mut Node, unit: &str, name: &str) -> Result<String> {
    Ok(node.run(&["systemctl", "show", "-p", name, "--value", unit])?.trim().to_string())
}

fn remove_subuid_line(node: &Node, owner: &str) -> Result<()> {
    let path = node.path("/etc/subuid");
    let text = std::fs::read_to_string(&path)?;
    let kept: String =
        text.lines().filter(|l| !l.starts_with(&format!("{owner}:"))).map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, kept)?;
    Ok(())
}

fn wait_for(
    node: &mut Node,
    timeout: Duration,
    mut done: impl FnMut(&mut Node) -> Result<bool>,
) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if done(node)? {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            bail!("not within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---- helpers ----

fn as_user(node: &mut Node, user: &str, script: &str) -> Result<String> {
    let out = node.exec(&["runuser", "-l", user, "-c", script])?;
    if !out.status.success() {
        bail!("as {user}: `{script}` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
