//! End-to-end scenarios of the node's basics, each on a fresh node provisioned only by the
//! Ignition config: readiness, a rootless container with port 80, `wait-ready`, restart and
//! reboot without rewrites, drift repair with detect/repair times, and a malformed /etc/subuid.

use super::runner::{self, indent, Kind, Table, Tally, Words};
use crate::harness::node::{self, Node, PODMAN_SOCK};
use crate::harness::probe::Prober;
use crate::harness::tree::{self, Os};
use crate::message_ids::{CHECK_CHANGED, NODE_READY};
use crate::render::butane::{File, Link, NodeFields, Resource};
use crate::render::ignition::{self, Extras};
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod canary;
mod fcos_like;
mod fleet;
mod hostile;
mod leave;

/// Bound on boot + first convergence of a fresh node.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the drift prober asks `/readyz`.
const PROBE_INTERVAL: Duration = Duration::from_millis(10);
/// How often the other waits poll.
const POLL: Duration = Duration::from_millis(50);
/// The agent's persisted sysctl.
const SYSCTL_KEY: &str = "net.ipv4.ip_unprivileged_port_start";

/// The e2e suite, as the runner prints it.
pub struct E2e;

impl Kind for E2e {
    const WORDS: Words = Words {
        suite: "e2e",
        one: "scenario",
        log_lines: 30,
        table: Table { case: 28, figure: 48, value: 10, value_title: "time", rule: 98 },
    };

    fn applies(os: Os, case: &str) -> bool {
        fcos_like::applies(os, case)
    }
}

/// What the scenarios of one OS share (the runner's, with the e2e node helpers below).
type Suite = runner::Suite<E2e>;

type Scenario = runner::Case<E2e>;

const SCENARIOS: &[(&str, Scenario)] = &[
    ("ready with no other command", ready_without_commands),
    ("rootless container through the socket, port 80 published", rootless_container),
    ("wait-ready as core over a login shell exits 0 once ready", wait_ready_succeeds),
    ("wait-ready fails with a reason when podman.socket is masked", wait_ready_fails),
    ("restarting the agent rewrites nothing", restart_rewrites_nothing),
    ("reboot: ready again, nothing rewritten", reboot_rewrites_nothing),
    ("drift: podman.socket stopped by core", drift_socket_stopped),
    ("drift: socket file deleted", drift_socket_file_deleted),
    ("drift: linger turned off", drift_linger_off),
    ("drift: core's subuid line removed", drift_subuid_line_removed),
    ("malformed /etc/subuid is reported, not touched", malformed_subuid),
];

/// `cargo xtask e2e [--os OS|all]`.
pub fn cmd_e2e(oses: &[Os]) -> Result<()> {
    let (agent, trees) = node::prepare(oses)?;
    run(&agent, &trees)?.close("end-to-end scenario(s)")
}

/// Runs every scenario (those whose name contains `E2E_ONLY`, when set) on each OS of `trees`
/// in turn through the suite runner, and returns the count (the caller prints the closing line).
pub fn run(agent: &Path, trees: &[(Os, PathBuf)]) -> Result<Tally> {
    // E2E_ONLY=TEXT runs only the scenarios whose name contains TEXT (while developing one).
    let only = std::env::var("E2E_ONLY").unwrap_or_default();
    let cases: Vec<(String, Scenario)> = all_scenarios()
        .filter(|(name, _)| name.contains(only.as_str()))
        .map(|(name, scenario)| (name.to_string(), *scenario))
        .collect();
    runner::run(agent, trees, &cases)
}

/// Every scenario, in the order they run; [`fcos_like::applies`] says which run on which OS.
fn all_scenarios() -> impl Iterator<Item = &'static (&'static str, Scenario)> {
    SCENARIOS
        .iter()
        .chain(fleet::scenarios())
        .chain(canary::scenarios())
        .chain(hostile::scenarios())
        .chain(leave::scenarios())
        .chain(fcos_like::scenarios())
}

impl Suite {
    /// A fresh node booted until `/readyz` answers 200; records boot and ready times.
    fn ready_node(&mut self, scenario: &'static str) -> Result<Node> {
        let mut node = self.node(&Extras::default())?;
        self.boot_until_ready(&mut node, scenario)?;
        Ok(node)
    }

    fn boot_until_ready(&mut self, node: &mut Node, scenario: &'static str) -> Result<()> {
        node.boot(false)?;
        node.wait_systemd(Duration::from_secs(60))?;
        let booted = node.boot_started.unwrap().elapsed();
        let (ready_at, _) = node.wait_readyz(true, READY_TIMEOUT, POLL)?;
        self.ms(scenario, "boot (nspawn start to systemd answering)", booted);
        self.ms(
            scenario,
            "time to ready (nspawn start to /readyz 200)",
            ready_at - node.boot_started.unwrap(),
        );
        Ok(())
    }
}

// ---- scenarios ----

fn ready_without_commands(s: &mut Suite) -> Result<()> {
    const NAME: &str = "ready";
    let mut node = s.ready_node(NAME)?;
    if let Some(active) = unit_active_after_boot(&mut node)? {
        s.ms(NAME, "agent unit active (READY=1) after nspawn start", active);
    }
    let (ready, json) = node.readyz()?;
    ensure!(ready, "/readyz is not 200: {json}");
    let checks = json["checks"].as_array().ok_or_else(|| anyhow!("/readyz has no checks: {json}"))?;
    for want in ["subuid", "subgid", "linger", "podman-socket", "podman-api", "unprivileged-ports"] {
        let check = checks
            .iter()
            .find(|c| c["name"] == want)
            .ok_or_else(|| anyhow!("/readyz lacks check {want}: {json}"))?;
        ensure!(check["ok"] == true, "check {want} is not ok: {check}");
    }
    // Both ID files hold a range for core.
    for file in ["/etc/subuid", "/etc/subgid"] {
        let (start, count) = subid_range(&node.path(file), "core")?;
        ensure!(count >= 65536, "{file}: core has only {count} IDs from {start}");
    }
    // Linger, as logind sees it and on disk.
    ensure!(node.path("/var/lib/systemd/linger/core").exists(), "no /var/lib/systemd/linger/core");
    let linger = node.run(&["loginctl", "show-user", "core", "--property=Linger", "--value"])?;
    ensure!(linger.trim() == "yes", "logind says Linger={}", linger.trim());
    // podman.socket enabled and active in core's manager.
    let enabled = node.exec(&["systemctl", "--user", "-M", "core@", "is-enabled", "podman.socket"])?;
    ensure!(
        String::from_utf8_lossy(&enabled.stdout).trim() == "enabled",
        "podman.socket is-enabled: {}",
        show(&enabled)
    );
    let active = node.exec(&["systemctl", "--user", "-M", "core@", "is-active", "podman.socket"])?;
    ensure!(
        String::from_utf8_lossy(&active.stdout).trim() == "active",
        "podman.socket is-active: {}",
        show(&active)
    );
    // The API answers through the socket.
    ensure_ping(&mut node)?;
    // The sysctl, live in the node's network namespace and persisted in sysctl.d.
    let live = node.run(&["cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start"])?;
    ensure!(live.trim() == "80", "live {SYSCTL_KEY} is {}", live.trim());
    let (file, value) = persisted_sysctl(&node)?;
    ensure!(value == "80", "{} sets {SYSCTL_KEY} = {value}", file.display());
    // What Ignition installed is what the repository has.
    let installed = std::fs::read(node.path(ignition::AGENT_PATH))?;
    ensure!(installed == std::fs::read(&s.agent)?, "the installed agent differs from the built one");
    let config = std::fs::read(node.path(ignition::CONFIG_PATH))?;
    ensure!(config == std::fs::read(ignition::config_toml_path())?, "config.toml differs");
    let enabled = node.run(&["systemctl", "is-enabled", "executor-agent"])?;
    ensure!(enabled.trim() == "enabled", "executor-agent is {}", enabled.trim());
    Ok(())
}

fn rootless_container(s: &mut Suite) -> Result<()> {
    const NAME: &str = "container";
    let mut node = s.ready_node(NAME)?;
    node::import_test_image(&mut node)?;
    let docker = format!("DOCKER_HOST=unix://{PODMAN_SOCK} docker");
    let t = Instant::now();
    let out = node
        .run_as_core(&format!("{docker} run --rm localhost/busybox echo hello from a rootless container"))?;
    s.ms(NAME, "docker run --rm (through the Podman socket)", t.elapsed());
    ensure!(out.trim() == "hello from a rootless container", "docker run printed {out:?}");
    let uid_map = node.run_as_core(&format!("{docker} run --rm localhost/busybox cat /proc/self/uid_map"))?;
    ensure!(uid_map.lines().count() >= 2, "the container has no subordinate range mapped: {uid_map:?}");
    let t = Instant::now();
    node.run_as_core(&format!("{docker} run -d --name web -p 80:8000 localhost/busybox {}", node::HTTPD))?;
    let (_, body) = node::wait_http(&mut node, 80, "/index.html", Duration::from_secs(15))?;
    s.ms(NAME, "docker run -p 80:8000 until port 80 answers", t.elapsed());
    ensure!(body == tree::IMAGE_INDEX, "port 80 answered {body:?}");
    let t = Instant::now();
    node.run_as_core(&format!("{docker} stop web >/dev/null && {docker} rm web >/dev/null"))?;
    s.ms(NAME, "docker stop + rm (SIGTERM honoured)", t.elapsed());
    Ok(())
}

fn wait_ready_succeeds(s: &mut Suite) -> Result<()> {
    const NAME: &str = "wait-ready";
    let mut node = s.node(&Extras::default())?;
    node.boot(false)?;
    node.wait_systemd(Duration::from_secs(60))?;
    // Started right after boot, so it has to wait for the agent.
    let t = Instant::now();
    let out = node.as_core("executor-agent wait-ready --timeout 60s")?;
    let took = t.elapsed();
    ensure!(out.status.success(), "wait-ready failed: {}", show(&out));
    let (ready, json) = node.readyz()?;
    ensure!(ready, "wait-ready exited 0 but /readyz is 503: {json}");
    s.ms(NAME, "wait-ready (from systemd up) exit 0", took);
    Ok(())
}

fn wait_ready_fails(s: &mut Suite) -> Result<()> {
    const NAME: &str = "wait-ready fails";
    // An operator's config that masks podman.socket for every user: the node cannot get ready.
    let extras = Extras {
        links: vec![Link {
            node: NodeFields { path: "/etc/systemd/user/podman.socket".into(), ..NodeFields::default() },
            target: Some("/dev/null".into()),
            hard: None,
        }],
        ..Extras::default()
    };
    let mut node = s.node(&extras)?;
    node.boot(false)?;
    node.wait_systemd(Duration::from_secs(60))?;
    let t = Instant::now();
    let out = node.as_core("executor-agent wait-ready --timeout 10s")?;
    let took = t.elapsed();
    ensure!(!out.status.success(), "wait-ready exited 0 on a node that cannot be ready: {}", show(&out));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    ensure!(text.contains("podman"), "wait-ready gave no reason naming podman: {text}");
    ensure!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(30),
        "wait-ready took {took:?} for --timeout 10s"
    );
    eprintln!("    wait-ready said: {}", text.trim().replace('\n', "\n    "));
    s.ms(NAME, "wait-ready --timeout 10s exit non-zero", took);
    let (ready, json) = node.readyz()?;
    ensure!(!ready, "/readyz is 200 with podman.socket masked: {json}");
    Ok(())
}

fn restart_rewrites_nothing(s: &mut Suite) -> Result<()> {
    const NAME: &str = "restart";
    let mut node = s.ready_node(NAME)?;
    let before = stamps(&node)?;
    let t = Instant::now();
    node.run(&["systemctl", "restart", "executor-agent"])?;
    node.wait_readyz(true, Duration::from_secs(60), POLL)?;
    s.ms(NAME, "systemctl restart until /readyz 200", t.elapsed());
    // Let a full pass run after the restart before comparing.
    std::thread::sleep(Duration::from_secs(1));
    compare_stamps(&before, &stamps(&node)?)
}

fn reboot_rewrites_nothing(s: &mut Suite) -> Result<()> {
    const NAME: &str = "reboot";
    let mut node = s.ready_node(NAME)?;
    let before = stamps(&node)?;
    let t = Instant::now();
    node.poweroff(Duration::from_secs(60))?;
    s.ms(NAME, "poweroff", t.elapsed());
    node.boot(false)?;
    node.wait_systemd(Duration::from_secs(60))?;
    let (ready_at, _) = node.wait_readyz(true, READY_TIMEOUT, POLL)?;
    s.ms(NAME, "second boot: time to ready", ready_at - node.boot_started.unwrap());
    std::thread::sleep(Duration::from_secs(1));
    compare_stamps(&before, &stamps(&node)?)?;
    ensure_ping(&mut node)
}

fn drift_socket_stopped(s: &mut Suite) -> Result<()> {
    drift(
        s,
        "drift: socket stopped",
        &["systemctl", "--user", "-M", "core@", "stop", "podman.socket"],
        |node| {
            let active = node.exec(&["systemctl", "--user", "-M", "core@", "is-active", "podman.socket"])?;
            ensure!(
                String::from_utf8_lossy(&active.stdout).trim() == "active",
                "podman.socket is not active again"
            );
            ensure_ping(node)
        },
    )
}

fn drift_socket_file_deleted(s: &mut Suite) -> Result<()> {
    drift(s, "drift: socket file deleted", &["rm", "-f", PODMAN_SOCK], ensure_ping)
}

fn drift_linger_off(s: &mut Suite) -> Result<()> {
    drift(s, "drift: linger off", &["loginctl", "disable-linger", "core"], |node| {
        ensure!(node.path("/var/lib/systemd/linger/core").exists(), "linger is not back on");
        ensure_ping(node)
    })
}

fn drift_subuid_line_removed(s: &mut Suite) -> Result<()> {
    drift(s, "drift: subuid line removed", &["sed", "-i", "/^core:/d", "/etc/subuid"], |node| {
        let (_, count) = subid_range(&node.path("/etc/subuid"), "core")?;
        ensure!(count >= 65536, "core's subuid range is back with only {count} IDs");
        ensure_ping(node)
    })
}

fn malformed_subuid(s: &mut Suite) -> Result<()> {
    const NAME: &str = "malformed subuid";
    const BAD: &str = "builder:100000:65536\nthis line is not owner:start:count\n";
    let extras = Extras {
        files: vec![File {
            node: NodeFields { path: "/etc/subuid".into(), overwrite: Some(true), ..NodeFields::default() },
            mode: Some(0o644),
            contents: Some(Resource { inline: Some(BAD.into()), ..Resource::default() }),
        }],
        ..Extras::default()
    };
    let mut node = s.node(&extras)?;
    let file = node.path("/etc/subuid");
    let before = stamp(&file)?;
    ensure!(std::fs::read_to_string(&file)? == BAD, "Ignition did not write the malformed /etc/subuid");
    node.boot(false)?;
    node.wait_systemd(Duration::from_secs(60))?;
    // Wait until the agent has judged the file.
    let deadline = Instant::now() + READY_TIMEOUT;
    let detail = loop {
        if let Ok((ready, json)) = node.readyz() {
            ensure!(!ready, "/readyz is 200 with a malformed /etc/subuid: {json}");
            let check =
                json["checks"].as_array().and_then(|c| c.iter().find(|c| c["name"] == "subuid")).cloned();
            if let Some(check) = check {
                let detail = check["detail"].as_str().unwrap_or_default().to_string();
                if check["ok"] == false && detail != "not checked yet" {
                    break detail;
                }
            }
        }
        ensure!(
            Instant::now() < deadline,
            "the agent did not report on /etc/subuid within {READY_TIMEOUT:?}"
        );
        std::thread::sleep(POLL);
    };
    s.ms(NAME, "nspawn start to /readyz 503 naming subuid", node.boot_started.unwrap().elapsed());
    eprintln!("    /readyz subuid detail: {detail}");
    let names_line =
        ["/etc/subuid:2", "/etc/subuid line 2", "/etc/subuid, line 2"].iter().any(|p| detail.contains(p));
    ensure!(names_line, "the detail does not name /etc/subuid and line 2: {detail}");
    // Give the agent time to (wrongly) touch the file, then check that it did not.
    std::thread::sleep(Duration::from_secs(3));
    let status = node.exec(&["systemctl", "--no-pager", "--lines=20", "status", "executor-agent"])?;
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    ensure!(status.contains("subuid"), "systemctl status does not mention subuid:\n{status}");
    eprintln!("    systemctl status shows:\n{}", indent(&status));
    ensure!(std::fs::read_to_string(&file)? == BAD, "the agent changed the malformed /etc/subuid");
    ensure!(stamp(&file)? == before, "the agent rewrote /etc/subuid (inode or mtime changed)");
    let (ready, _) = node.readyz()?;
    ensure!(!ready, "/readyz turned 200");
    Ok(())
}

// ---- drift ----

/// A fresh ready node; `drift` applied at t0 as a node service; `/readyz` must go 503 and then
/// 200 by itself; `verify` checks the repair. Records detect and repair times.
fn drift(
    s: &mut Suite,
    name: &'static str,
    command: &[&str],
    verify: fn(&mut Node) -> Result<()>,
) -> Result<()> {
    let mut node = s.ready_node(name)?;
    let prober = Prober::start(&mut node, "/readyz", PROBE_INTERVAL)?;
    std::thread::sleep(Duration::from_millis(200));
    let t0_us = node::monotonic_us();
    let t0 = Instant::now();
    node.run(command)?;
    let applied = t0.elapsed();
    let result = (|| {
        let down = prober.wait(t0, false, Duration::from_secs(30)).context("/readyz never went 503")?;
        let up = prober
            .wait(down, true, Duration::from_secs(60))
            .context("/readyz did not come back to 200 by itself")?;
        Ok::<_, anyhow::Error>((down, up))
    })();
    let history = prober.stop();
    let (down, up) = result.with_context(|| format!("/readyz history:{}", history.text))?;
    s.ms(name, "drift command ran (systemd-run round trip)", applied);
    s.ms(name, "detect: drift to /readyz 503", down - t0);
    s.ms(name, "repair: drift to /readyz 200 again", up - t0);
    if let Some((detect, repair)) = journal_times(&mut node, t0_us)? {
        s.ms(name, "agent journal: drift to first check failing", detect);
        s.ms(name, "agent journal: drift to ready again", repair);
    }
    verify(&mut node)
}

/// From the agent's journal after `t0_us` (host CLOCK_MONOTONIC, shared with the node): when it
/// first logged a failing check and when it logged the node ready again.
fn journal_times(node: &mut Node, t0_us: u64) -> Result<Option<(Duration, Duration)>> {
    let out = node.run(&["journalctl", "--no-pager", "-o", "json", "SYSLOG_IDENTIFIER=executor-agent"])?;
    let (mut detect, mut repair) = (None, None);
    for line in out.lines() {
        let Ok(entry) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let at: u64 = entry["__MONOTONIC_TIMESTAMP"].as_str().and_then(|v| v.parse().ok()).unwrap_or(0);
        if at < t0_us {
            continue;
        }
        let id = entry["MESSAGE_ID"].as_str().unwrap_or_default();
        let since = Duration::from_micros(at - t0_us);
        if id == CHECK_CHANGED && detect.is_none() {
            detect = Some(since);
        }
        if id == NODE_READY && detect.is_some() && repair.is_none() {
            repair = Some(since);
        }
    }
    Ok(detect.zip(repair))
}

// ---- helpers ----

/// When the agent unit became active, measured from the nspawn start (systemd's monotonic stamps).
fn unit_active_after_boot(node: &mut Node) -> Result<Option<Duration>> {
    let out =
        node.run(&["systemctl", "show", "-p", "ActiveEnterTimestampMonotonic", "--value", "executor-agent"])?;
    let us: u64 = out.trim().parse().unwrap_or(0);
    Ok((us > node.boot_started_us).then(|| Duration::from_micros(us - node.boot_started_us)))
}

/// `GET /_ping` on the Podman socket as core must answer OK.
fn ensure_ping(node: &mut Node) -> Result<()> {
    let out = node.run(&[
        "runuser",
        "-u",
        "core",
        "--",
        "curl",
        "-sS",
        "--max-time",
        "10",
        "--unix-socket",
        PODMAN_SOCK,
        "http://d/_ping",
    ])?;
    ensure!(out.trim() == "OK", "GET /_ping answered {out:?}");
    Ok(())
}

/// The first range of `owner` in a subordinate ID file.
fn subid_range(path: &Path, owner: &str) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    for line in text.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() == 3 && fields[0] == owner {
            let start =
                fields[1].parse().with_context(|| format!("{}: bad start in {line:?}", path.display()))?;
            let count =
                fields[2].parse().with_context(|| format!("{}: bad count in {line:?}", path.display()))?;
            return Ok((start, count));
        }
    }
    bail!("{} has no line for {owner}:\n{text}", path.display())
}

/// The sysctl.d file in /etc that sets the key, and the value it sets.
fn persisted_sysctl(node: &Node) -> Result<(PathBuf, String)> {
    let dir = node.path("/etc/sysctl.d");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?.flatten()
    {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in text.lines() {
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == SYSCTL_KEY && !line.trim_start().starts_with(['#', ';']) {
                    return Ok((entry.path(), v.trim().to_string()));
                }
            }
        }
    }
    bail!("no file in /etc/sysctl.d sets {SYSCTL_KEY}")
}

/// Inode, mtime (ns) and size of a file.
#[derive(Debug, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    mtime_ns: i128,
    size: u64,
}

fn stamp(path: &Path) -> Result<Stamp> {
    let m = std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    Ok(Stamp {
        ino: m.ino(),
        mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        size: m.size(),
    })
}

/// The files the agent manages, stamped.
fn stamps(node: &Node) -> Result<Vec<(PathBuf, Stamp)>> {
    let (sysctl_file, _) = persisted_sysctl(node)?;
    let files = [
        node.path("/etc/subuid"),
        node.path("/etc/subgid"),
        sysctl_file,
        node.path("/var/lib/systemd/linger/core"),
    ];
    files.into_iter().map(|f| stamp(&f).map(|s| (f, s))).collect()
}

fn compare_stamps(before: &[(PathBuf, Stamp)], after: &[(PathBuf, Stamp)]) -> Result<()> {
    for ((path, a), (_, b)) in before.iter().zip(after) {
        ensure!(a == b, "{} was rewritten: {a:?} -> {b:?}", path.display());
    }
    Ok(())
}

fn show(out: &std::process::Output) -> String {
    format!("{} {}{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_subid_ranges_and_rejects_missing_owners() {
        let dir = std::env::temp_dir().join(format!("xtask-subid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("subuid");
        std::fs::write(&file, "root:1:2\ncore:100000:65536\n").unwrap();
        assert_eq!(subid_range(&file, "core").unwrap(), (100000, 65536));
        assert!(subid_range(&file, "nobody").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_fcos_like_node_runs_scenarios_that_exist_and_the_debian_nodes_not_its_own() {
        let names: Vec<&str> = all_scenarios().map(|(name, _)| *name).collect();
        for name in fcos_like::ALSO_ON_FCOS_LIKE {
            assert!(names.contains(name), "{name:?} is not a scenario (renamed?)");
        }
        let on = |os| names.iter().filter(|n| E2e::applies(os, n)).count();
        assert_eq!(on(Os::Bookworm), on(Os::Trixie));
        assert_eq!(on(Os::Bookworm) + on(Os::FcosLike), names.len() + fcos_like::ALSO_ON_FCOS_LIKE.len());
        assert!(names.iter().filter(|n| n.starts_with("fcos-like: ")).all(|n| !E2e::applies(Os::Trixie, n)));
    }
}
