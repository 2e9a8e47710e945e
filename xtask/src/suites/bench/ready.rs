//! Time to ready on a cold node: a fresh copy of the pristine tree provisioned by the Ignition
//! config, booted, until the node is ready; the agent against two baselines that do the same work
//! with oneshot units and the agent not installed. Every time comes from the node's systemd and
//! journal (CLOCK_MONOTONIC, shared by host and node), so a poll interval adds nothing to it.

use super::{nsenter, Json};
use crate::harness::node::{self, Node};
use crate::harness::probe::{Pace, Prober};
use crate::message_ids;
use crate::render::butane::{File, Link, NodeFields, Resource};
use crate::render::ignition::Extras;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::time::{Duration, Instant};

/// The three ways to make a node ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Agent,
    /// The Terraform podman-rootless scenario's two oneshot units (with `sleep 2`).
    Shell,
    /// The same units without the sleep, plus subordinate IDs, the sysctl and a real `_ping`.
    Lean,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Agent => "agent",
            Variant::Shell => "shell",
            Variant::Lean => "lean",
        }
    }

    /// The unit whose start is the reference point, and the unit whose end is "ready".
    fn units(self) -> (&'static str, &'static str) {
        match self {
            Variant::Agent => ("executor-agent.service", "executor-agent.service"),
            Variant::Shell | Variant::Lean => (LINGER_UNIT, PODMAN_UNIT),
        }
    }
}

const LINGER_UNIT: &str = "bench-linger.service";
const PODMAN_UNIT: &str = "bench-podman.service";
const DONE_UNIT: &str = "bench-done.service";
const DONE_MARKER: &str = "/var/lib/bench-done";

/// The executor-agent unit's own ordering, given to the baselines' first unit too, so that all
/// three start at the same point of the boot.
const AGENT_ORDERING: &str = "Wants=dbus.service systemd-logind.service\n\
                              After=dbus.service systemd-logind.service systemd-user-sessions.service\n";

fn linger_unit() -> String {
    format!(
        "# bench baseline: the Terraform podman-rootless scenario's enable-linger-core.service.\n\
         [Unit]\n\
         Description=bench baseline: enable lingering for core\n\
         Before={PODMAN_UNIT}\n\
         ConditionPathExists=!/var/lib/systemd/linger/core\n\
         # Not in the scenario: executor-agent.service's ordering, for a common starting point.\n\
         {AGENT_ORDERING}\n\
         [Service]\n\
         Type=oneshot\n\
         ExecStart=/usr/bin/loginctl enable-linger core\n\
         RemainAfterExit=yes\n\n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    )
}

/// The scenario's podman-user.service (Debian's runuser is in /usr/sbin).
fn shell_podman_unit() -> String {
    format!(
        "# bench baseline: the Terraform podman-rootless scenario's podman-user.service.\n\
         [Unit]\n\
         Description=bench baseline: rootless Podman socket for core, the scenario's way\n\
         After=network-online.target {LINGER_UNIT}\n\
         Wants=network-online.target\n\
         Requires={LINGER_UNIT}\n\n\
         [Service]\n\
         Type=oneshot\n\
         ExecStart=/usr/sbin/runuser -l core -c 'systemctl --user enable --now podman.socket'\n\
         ExecStartPost=/usr/bin/sleep 2\n\
         ExecStartPost=/usr/sbin/runuser -l core -c 'systemctl --user is-active podman.socket'\n\
         RemainAfterExit=yes\n\
         TimeoutStartSec=60\n\n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    )
}

/// The same without the sleep, plus what the scenario lacks, ending with a real API request.
fn lean_podman_unit() -> String {
    format!(
        "# bench baseline: the scenario's units without `sleep 2`, plus subordinate IDs, the sysctl\n\
         # and a real API request.\n\
         [Unit]\n\
         Description=bench baseline: rootless Podman for core, lean\n\
         After=network-online.target {LINGER_UNIT}\n\
         Wants=network-online.target\n\
         Requires={LINGER_UNIT}\n\n\
         [Service]\n\
         Type=oneshot\n\
         ExecStart=/usr/sbin/usermod --add-subuids 100000-165535 --add-subgids 100000-165535 core\n\
         ExecStart=/usr/sbin/sysctl -q -w net.ipv4.ip_unprivileged_port_start=80\n\
         ExecStart=/usr/sbin/runuser -l core -c 'systemctl --user enable --now podman.socket'\n\
         ExecStart=/usr/sbin/runuser -l core -c 'systemctl --user is-active podman.socket'\n\
         ExecStart=/usr/sbin/runuser -u core -- /usr/bin/curl -sSf --max-time 10 --unix-socket {sock} http://d/_ping\n\
         # The agent's canary round, with the docker CLI through the same socket.\n\
         ExecStart=/usr/sbin/runuser -u core -- /bin/sh {CANARY_SCRIPT}\n\
         RemainAfterExit=yes\n\
         TimeoutStartSec=60\n\n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        sock = node::PODMAN_SOCK
    )
}

/// Where the lean baseline's canary steps are on its node.
const CANARY_SCRIPT: &str = "/usr/local/libexec/bench-canary.sh";

/// The agent's canary round as shell: an image imported (never pulled), a per-round network
/// with DNS, a service with an alias and a published port, a job that reaches it by alias and
/// uses a named volume, the port reached from the host, everything removed; same limits.
pub const CANARY_STEPS: &str = r#"#!/bin/sh
# bench baseline: the executor-agent canary's steps, with the docker CLI through the socket.
set -eu
export DOCKER_HOST=unix:///run/user/1000/podman/podman.sock
n=bench-canary-$$
limits="--memory 64m --cpus 0.5 --pids-limit 32"
docker image inspect localhost/bench-canary >/dev/null 2>&1 ||
    docker import /opt/e2e/busybox.tar localhost/bench-canary >/dev/null
docker network create "$n" >/dev/null
docker volume create "$n" >/dev/null
docker run -d --name "$n-service" --network "$n" --network-alias canary-service \
    -p 127.0.0.1::8000 $limits localhost/bench-canary httpd -f -p 8000 -h /srv >/dev/null
docker run --name "$n-job" --network "$n" -v "$n:/data" $limits localhost/bench-canary sh -c '
    i=0; until wget -q -O /dev/null http://canary-service:8000/; do
        i=$((i+1)); [ $i -lt 100 ] || exit 21; sleep 0.1; done
    echo ok > /data/f && cat /data/f >/dev/null'
port=$(docker port "$n-service" 8000/tcp | head -n 1 | sed 's/.*://')
i=0; until curl -sf -o /dev/null "http://127.0.0.1:$port/"; do
    i=$((i+1)); [ $i -lt 50 ] || exit 1; sleep 0.1; done
docker rm -f "$n-job" "$n-service" >/dev/null
docker volume rm "$n" >/dev/null
docker network rm "$n" >/dev/null
"#;

/// Touches a marker once the measured unit has finished (or failed), so the host knows when to
/// read the timestamps without polling the node. Ordered after it: it changes none of its times.
fn done_unit(after: &str) -> String {
    format!(
        "[Unit]\n\
         Description=bench: the measured sequence has finished\n\
         After={after}\n\n\
         [Service]\n\
         Type=oneshot\n\
         ExecStart=/usr/bin/touch {DONE_MARKER}\n\n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    )
}

fn unit_file(name: &str, text: String) -> (File, Link) {
    let path = format!("/etc/systemd/system/{name}");
    let file = File {
        node: NodeFields { path: path.clone(), ..NodeFields::default() },
        mode: Some(0o644),
        contents: Some(Resource { inline: Some(text), ..Resource::default() }),
    };
    let link = Link {
        node: NodeFields {
            path: format!("/etc/systemd/system/multi-user.target.wants/{name}"),
            ..NodeFields::default()
        },
        target: Some(path),
        hard: None,
    };
    (file, link)
}

/// The per-node Ignition extras of a variant (the baselines' units, the done marker); with
/// `agent_log`, a drop-in that sets the agent's RUST_LOG (for reading its timeline, not for figures).
pub fn extras(variant: Variant, agent_log: Option<&str>) -> Extras {
    let mut units = Vec::new();
    match variant {
        Variant::Agent => units.push((DONE_UNIT, done_unit("executor-agent.service"))),
        Variant::Shell | Variant::Lean => {
            units.push((LINGER_UNIT, linger_unit()));
            units.push((
                PODMAN_UNIT,
                if variant == Variant::Shell { shell_podman_unit() } else { lean_podman_unit() },
            ));
            units.push((DONE_UNIT, done_unit(PODMAN_UNIT)));
        }
    }
    let mut extras = Extras::default();
    if variant == Variant::Lean {
        extras.files.push(File {
            node: NodeFields { path: CANARY_SCRIPT.into(), ..NodeFields::default() },
            mode: Some(0o755),
            contents: Some(Resource { inline: Some(CANARY_STEPS.into()), ..Resource::default() }),
        });
    }
    if let (Variant::Agent, Some(level)) = (variant, agent_log) {
        extras.files.push(File {
            node: NodeFields {
                // A unit drop-in directory makes `systemctl --root preset` fail; the manager's
                // default environment reaches the agent as well (only Rust programs read it).
                path: "/etc/systemd/system.conf.d/50-bench-log.conf".into(),
                ..NodeFields::default()
            },
            mode: Some(0o644),
            contents: Some(Resource {
                inline: Some(format!("[Manager]\nDefaultEnvironment=RUST_LOG={level}\n")),
                ..Resource::default()
            }),
        });
    }
    for (name, text) in units {
        let (file, link) = unit_file(name, text);
        extras.files.push(file);
        extras.links.push(link);
    }
    extras
}

/// Takes the agent out of a baseline node's copy before its first boot: its binary, unit (and
/// the enable link the first-boot presets made) and configuration.
fn uninstall_agent(node: &Node) -> Result<()> {
    for path in [
        "/etc/systemd/system/multi-user.target.wants/executor-agent.service",
        "/etc/systemd/system/executor-agent.service",
        "/etc/systemd/system/multi-user.target.wants/executor-agent-boot-gate.service",
        "/etc/systemd/system/executor-agent-boot-gate.service",
        crate::render::ignition::AGENT_PATH,
    ] {
        let p = node.path(path);
        if p.symlink_metadata().is_ok() {
            std::fs::remove_file(&p).with_context(|| format!("cannot remove {}", p.display()))?;
        }
    }
    let conf = node.path("/etc/executor-agent");
    if conf.exists() {
        std::fs::remove_dir_all(&conf)?;
    }
    Ok(())
}

/// One boot's times, all host CLOCK_MONOTONIC µs.
#[derive(Clone, Debug)]
pub struct Boot {
    pub variant: Variant,
    /// When systemd-nspawn was started.
    pub boot_us: u64,
    /// systemd's start of the first unit of the variant (InactiveExitTimestampMonotonic).
    pub start_us: u64,
    /// Ready: the agent's READY=1 and NODE_READY entry, whichever is later; a baseline's last
    /// unit finished (ActiveEnterTimestampMonotonic; RemainAfterExit=yes).
    pub ready_us: u64,
    /// The agent's process start (ExecMainStartTimestampMonotonic).
    pub exec_us: Option<u64>,
    /// The agent's READY=1 (ActiveEnterTimestampMonotonic).
    pub notify_us: Option<u64>,
    /// The agent's NODE_READY journal entry.
    pub node_ready_us: Option<u64>,
    /// "first pass done after ..." (the agent's own clock), ms.
    pub first_pass_ms: Option<f64>,
    /// The first `/readyz` 200 the prober saw.
    pub readyz_us: Option<u64>,
    /// user@1000.service: start and active.
    pub user_manager: Option<(u64, u64)>,
    /// The agent's journal from its start, for the breakdown: (µs after exec, message).
    pub journal: Vec<(u64, String)>,
    /// A job's first `docker run` some seconds after ready (see [`FIRST_JOB_AFTER`]), s.
    pub first_job_s: Option<f64>,
}

impl Boot {
    pub fn unit_to_ready(&self) -> f64 {
        secs(self.ready_us.saturating_sub(self.start_us))
    }

    pub fn nspawn_to_ready(&self) -> f64 {
        secs(self.ready_us.saturating_sub(self.boot_us))
    }

    pub fn exec_to_node_ready(&self) -> Option<f64> {
        Some(secs(self.node_ready_us?.saturating_sub(self.exec_us?)))
    }

    pub fn unit_to_readyz(&self) -> Option<f64> {
        Some(secs(self.readyz_us?.saturating_sub(self.start_us)))
    }
}

/// When the bench's first job arrives after ready: later than Podman's 5 s idle exit of the
/// API service, as a job that the manager schedules after `instance_ready_command` does.
pub const FIRST_JOB_AFTER: Duration = Duration::from_secs(6);

/// A first job on a just-ready node: the image is there already (imported with the podman CLI,
/// which does not touch the API service), then at ready + [`FIRST_JOB_AFTER`] one
/// `docker run --rm` through the socket, timed inside the node. A node that let the service
/// exit pays for its start here.
pub fn first_job(node: &mut Node, ready_us: u64) -> Result<f64> {
    node::import_test_image(node)?;
    let at = ready_us + FIRST_JOB_AFTER.as_micros() as u64;
    let now = node::monotonic_us();
    if at > now {
        std::thread::sleep(Duration::from_micros(at - now));
    }
    let out = node.run_as_core(&format!(
        "export DOCKER_HOST=unix://{}; s=$(date +%s%N); docker run --rm localhost/busybox true; \
         e=$(date +%s%N); echo $((e - s))",
        node::PODMAN_SOCK
    ))?;
    let ns: u64 = out.trim().lines().last().unwrap_or("").parse().context("the first job's time")?;
    Ok(ns as f64 / 1e9)
}

pub fn secs(us: u64) -> f64 {
    us as f64 / 1e6
}

/// `systemctl show` properties of a unit, as numbers (0 when unset).
pub fn unit_times(leader: i32, unit: &str, props: &[&str]) -> Result<Vec<u64>> {
    let mut argv = vec!["systemctl", "show", unit];
    for p in props {
        argv.push("-p");
        argv.push(p);
    }
    let out = nsenter(leader, &argv)?;
    // Unset timestamps are empty or 0.
    Ok(props
        .iter()
        .map(|p| {
            let line = out.lines().find_map(|l| l.strip_prefix(&format!("{p}="))).unwrap_or("0");
            line.trim().parse::<u64>().unwrap_or(0)
        })
        .collect())
}

fn unit_result(leader: i32, unit: &str) -> String {
    nsenter(leader, &["systemctl", "show", unit, "-p", "Result", "--value"])
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The agent's journal entries (JSON) on the node.
pub fn agent_journal(leader: i32) -> Result<Vec<Json>> {
    let out =
        nsenter(leader, &["journalctl", "--no-pager", "-o", "json", "SYSLOG_IDENTIFIER=executor-agent"])?;
    Ok(out.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
}

pub fn mono(entry: &Json) -> u64 {
    entry["__MONOTONIC_TIMESTAMP"].as_str().and_then(|v| v.parse().ok()).unwrap_or(0)
}

pub fn message(entry: &Json) -> String {
    match &entry["MESSAGE"] {
        Json::String(s) => s.clone(),
        Json::Array(bytes) => String::from_utf8_lossy(
            &bytes.iter().filter_map(|b| b.as_u64().map(|b| b as u8)).collect::<Vec<_>>(),
        )
        .into_owned(),
        other => other.to_string(),
    }
}

/// Waits for the leader (the node's systemd) to exist: reads /proc only, so nothing runs in the
/// node while it boots.
pub fn wait_leader(node: &mut Node, timeout: Duration) -> Result<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(leader) = node.leader() {
            return Ok(leader);
        }
        if !node.is_running() {
            bail!("node {} stopped while booting: {}", node.name, node.log_tail(20));
        }
        if Instant::now() >= deadline {
            bail!("node {}: no systemd after {timeout:?}", node.name);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Creates, boots and measures one node of `variant`. The node is returned running.
pub fn boot_one(
    name: &str,
    variant: Variant,
    pristine: &Path,
    agent: &Path,
    probe_every: Duration,
    agent_log: Option<&str>,
) -> Result<(Node, Boot)> {
    let mut node = Node::create(name, pristine, agent, &extras(variant, agent_log))?;
    if variant != Variant::Agent {
        uninstall_agent(&node)?;
    }
    // Write the fresh copy out first (syncfs): its dirty pages would otherwise be flushed while
    // the node boots and slow every fsync of the measured work.
    crate::harness::host::run(crate::harness::host::cmd("sync", ["-f".as_ref(), node.dir.as_os_str()]))?;
    node.boot(false)?;
    let boot_us = node.boot_started_us;
    let leader = wait_leader(&mut node, Duration::from_secs(30))?;
    let prober = (variant == Variant::Agent)
        .then(|| Prober::start_in(leader, "/readyz", probe_every, Pace::FixedRate));
    let marker = node.path(DONE_MARKER);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !marker.exists() {
        if Instant::now() >= deadline || !node.is_running() {
            bail!(
                "node {name} ({}): the measured units did not finish within 120 s; console:\n{}",
                variant.name(),
                node.log_tail(25)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let readyz_us = match &prober {
        Some(p) => Some(p.wait_us(0, true, Duration::from_secs(60)).with_context(|| {
            format!("node {name}: the agent's /readyz did not answer 200 within 60 s after READY=1")
        })?),
        None => None,
    };
    drop(prober);
    let (first, last) = variant.units();
    let result = unit_result(leader, last);
    if result != "success" {
        let log = nsenter(
            leader,
            &[
                "journalctl",
                "--no-pager",
                "-o",
                "short-monotonic",
                "-u",
                first,
                "-u",
                last,
                "-u",
                "user@1000.service",
            ],
        )
        .unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(25).collect();
        bail!(
            "node {name} ({}): {last} finished with Result={result}; its journal:\n{}",
            variant.name(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let start_us = unit_times(leader, first, &["InactiveExitTimestampMonotonic"])?[0];
    let t = unit_times(leader, last, &["ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic"])?;
    let um = unit_times(
        leader,
        "user@1000.service",
        &["InactiveExitTimestampMonotonic", "ActiveEnterTimestampMonotonic"],
    )?;
    let mut boot = Boot {
        variant,
        boot_us,
        start_us,
        ready_us: t[1],
        exec_us: None,
        notify_us: None,
        node_ready_us: None,
        first_pass_ms: None,
        readyz_us,
        user_manager: (um[0] > 0 && um[1] > 0).then_some((um[0], um[1])),
        journal: Vec::new(),
        first_job_s: None,
    };
    if variant == Variant::Agent {
        boot.exec_us = Some(t[0]);
        boot.notify_us = Some(t[1]);
        let journal = agent_journal(leader)?;
        for entry in &journal {
            let at = mono(entry);
            if entry["MESSAGE_ID"] == message_ids::NODE_READY && boot.node_ready_us.is_none() {
                boot.node_ready_us = Some(at);
            }
            if let Some(ms) = entry["FIRST_PASS_MS"].as_str().and_then(|v| v.parse::<f64>().ok()) {
                boot.first_pass_ms.get_or_insert(ms);
            }
            boot.journal.push((at.saturating_sub(t[0]), message(entry)));
        }
        let node_ready = boot.node_ready_us.context("the agent logged no NODE_READY entry")?;
        boot.ready_us = boot.ready_us.max(node_ready);
    }
    if start_us == 0 || boot.ready_us < start_us {
        bail!("node {name}: inconsistent unit times (start {start_us}, ready {})", boot.ready_us);
    }
    Ok((node, boot))
}
