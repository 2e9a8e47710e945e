//! End-to-end scenarios of fleet-grade node health, each on a fresh node provisioned
//! only by the Ignition config: drain, metrics, node identity, boot gating, storage GC, the
//! runner user's Podman configuration, and the ID-mapping checks.
//!
//! A child module of `e2e` (suites/e2e/), so it shares the suite, the node helpers and the
//! figures.

use super::{Scenario, Suite, POLL};
use crate::harness::node::{self, Node, AGENT_PORT, PODMAN_SOCK};
use crate::harness::tree::{self, Os};
use crate::message_ids::NODE_CHANGED;
use anyhow::{anyhow, ensure, Context, Result};
use std::os::unix::fs::PermissionsExt as _;
use std::time::{Duration, Instant};

/// The config drop-in the scenarios write on the node.
const DROP_IN: &str = "/etc/executor-agent/config.d/50-test.toml";
/// A short resync so that changes no event reports (a helper binary, a setuid bit) are seen fast.
const FAST_RESYNC: &str = "[repair]\nresync_interval = \"1s\"\n";
/// Bound on each wait inside a scenario.
const WAIT: Duration = Duration::from_secs(20);

const SCENARIOS: &[(&str, Scenario)] = &[
    ("fleet: drain survives a restart, root only, undrain", drain),
    ("fleet: /metrics (OpenMetrics) with repairs and drift events", metrics),
    ("fleet: /status carries the Afterburn identity", identity),
    ("fleet: boot gate holds boot-complete.target until ready", boot_gate),
    ("fleet: storage GC removes unused images, keeps used ones", storage_gc),
    ("fleet: podman-config docker.sock link and credential helpers", podman_config),
    ("fleet: newuidmap setuid bit and a stale subuid mapping", id_mapping),
];

/// The fleet scenarios, chained after `e2e`'s own.
pub fn scenarios() -> &'static [(&'static str, Scenario)] {
    SCENARIOS
}

// ---- scenarios ----

fn drain(s: &mut Suite) -> Result<()> {
    const NAME: &str = "fleet: drain";
    let mut node = s.ready_node(NAME)?;
    let t = Instant::now();
    node.run(&["executor-agent", "drain", "--reason", "scale-in"])?;
    let (_, json) = node.wait_readyz(false, WAIT, POLL)?;
    s.ms(NAME, "drain command to /readyz 503", t.elapsed());
    let drain = check(&json, "drain")?;
    ensure!(drain["ok"] == false, "check drain passes while drained: {drain}");
    ensure!(json.to_string().contains("scale-in"), "/readyz does not give the reason: {json}");
    let status = status_text(&mut node)?;
    ensure!(status.contains("drain"), "StatusText does not say drained: {status:?}");
    ensure!(status.contains("scale-in"), "StatusText does not give the reason: {status:?}");
    let metrics = get_ok(&mut node, "/metrics")?;
    let line = r#"executor_agent_check_ok{check="drain",required="true"} 0"#;
    ensure!(metrics.lines().any(|l| l == line), "/metrics lacks `{line}`:\n{metrics}");
    // Kept across an agent restart.
    node.run(&["systemctl", "restart", "executor-agent"])?;
    let (_, json) = wait_answer(&mut node)?;
    ensure!(json["ready"] == false, "the drain did not survive a restart: {json}");
    ensure!(json.to_string().contains("scale-in"), "the reason did not survive a restart: {json}");
    std::thread::sleep(Duration::from_secs(2));
    let (ready, json) = node.readyz()?;
    ensure!(!ready, "/readyz turned 200 after the restart while drained: {json}");
    // Not for the runner user.
    let out = node.as_core("executor-agent drain --reason x")?;
    ensure!(!out.status.success(), "core could drain the node: {}", super::show(&out));
    let out = node.as_core("executor-agent undrain")?;
    ensure!(!out.status.success(), "core could undrain the node: {}", super::show(&out));
    let (ready, _) = node.readyz()?;
    ensure!(!ready, "/readyz is 200 after core's undrain attempt");
    let t = Instant::now();
    node.run(&["executor-agent", "undrain"])?;
    node.wait_readyz(true, WAIT, POLL)?;
    s.ms(NAME, "undrain command to /readyz 200", t.elapsed());
    let status = status_text(&mut node)?;
    ensure!(status.starts_with("ready"), "StatusText after undrain: {status:?}");
    Ok(())
}

fn metrics(s: &mut Suite) -> Result<()> {
    const NAME: &str = "fleet: metrics";
    let mut node = s.ready_node(NAME)?;
    let (headers, body) = curl(&mut node, "/metrics")?;
    ensure!(
        headers.to_ascii_lowercase().contains("content-type: application/openmetrics-text"),
        "/metrics is not OpenMetrics:\n{headers}"
    );
    ensure!(body.lines().any(|l| l == "executor_agent_ready 1"), "no `executor_agent_ready 1`:\n{body}");
    ensure!(body.contains("executor_agent_build_info{version=\""), "no build_info:\n{body}");
    ensure!(body.trim_end().ends_with("# EOF"), "the exposition does not end with # EOF");
    let (_, json) = node.readyz()?;
    for c in json["checks"].as_array().ok_or_else(|| anyhow!("/readyz has no checks: {json}"))? {
        let name = c["name"].as_str().unwrap_or_default();
        let want = format!(
            "executor_agent_check_ok{{check=\"{name}\",required=\"{}\"}} {}",
            c["required"].as_bool().unwrap_or(true),
            if c["ok"] == true { 1 } else { 0 }
        );
        ensure!(body.lines().any(|l| l == want), "/metrics lacks `{want}`:\n{body}");
    }
    // A drift: the runner user stops its own socket.
    // Counted on podman-socket, or on podman-api when the socket unit flips back before a
    // pass sees it (systemd 257 restarts a stopped socket's listener fast under Podman 5).
    let drifts = |body: &str| {
        ["podman-socket", "podman-api"]
            .iter()
            .filter_map(|c| sample(body, &format!("executor_agent_drift_events_total{{check=\"{c}\"}}")))
            .sum::<f64>()
    };
    let before = drifts(&body);
    let t = Instant::now();
    node.run(&["systemctl", "--user", "-M", "core@", "stop", "podman.socket"])?;
    node.wait_readyz(false, WAIT, Duration::from_millis(10)).context("the drift was not seen")?;
    let detect = t.elapsed();
    node.wait_readyz(true, WAIT, POLL).context("the drift was not repaired")?;
    s.ms(NAME, "detect: socket stopped to /readyz 503", detect);
    s.ms(NAME, "repair: socket stopped to /readyz 200", t.elapsed());
    let body = get_ok(&mut node, "/metrics")?;
    let drift = drifts(&body);
    ensure!(
        drift >= before + 1.0,
        "drift_events_total{{podman-socket|podman-api}} is {drift} (was {before}):\n{body}"
    );
    let repairs: f64 = body
        .lines()
        .filter(|l| l.starts_with("executor_agent_repairs_total{") && l.contains("outcome=\"success\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    ensure!(repairs >= 1.0, "no successful repair counted:\n{body}");
    ensure!(body.lines().any(|l| l == "executor_agent_ready 1"), "not ready again in /metrics");
    let ttr = sample(&body, "executor_agent_time_to_ready_seconds").unwrap_or(0.0);
    ensure!(ttr > 0.0, "time_to_ready_seconds is {ttr}");
    Ok(())
}

fn identity(s: &mut Suite) -> Result<()> {
    const NAME: &str = "fleet: identity";
    let mut node = s.ready_node(NAME)?;
    let (_, status) = get_json(&mut node, "/status")?;
    ensure!(status["instance"]["aws_instance_id"].is_null(), "an identity off-cloud: {status}");
    // /run is the node's tmpfs: write from inside.
    node.run(&[
        "sh",
        "-c",
        "mkdir -p /run/metadata && printf '%s\\n' AFTERBURN_AWS_INSTANCE_ID=i-0abc \
         AFTERBURN_AWS_INSTANCE_TYPE=m7g.large AFTERBURN_AWS_AVAILABILITY_ZONE=eu-west-1a \
         AFTERBURN_AWS_IPV4_LOCAL=10.0.1.5 > /run/metadata/afterburn",
    ])?;
    let t = Instant::now();
    // Either the agent sees it by itself, or after a restart (the file is written at boot on FCOS).
    let mut restarted = false;
    loop {
        if let Ok((200, status)) = get_json(&mut node, "/status") {
            if status["instance"]["aws_instance_id"] == "i-0abc" {
                let i = &status["instance"];
                ensure!(i["aws_instance_type"] == "m7g.large", "instance type: {i}");
                ensure!(i["aws_availability_zone"] == "eu-west-1a", "zone: {i}");
                ensure!(i["aws_ipv4_local"] == "10.0.1.5", "private IPv4: {i}");
                break;
            }
        }
        if !restarted && t.elapsed() > Duration::from_secs(3) {
            eprintln!("    not seen without a restart within 3 s; restarting the agent");
            node.run(&["systemctl", "restart", "executor-agent"])?;
            restarted = true;
        }
        if t.elapsed() >= WAIT {
            let (_, status) = get_json(&mut node, "/status")?;
            anyhow::bail!("/status never carried aws_instance_id i-0abc: instance = {}", status["instance"]);
        }
        std::thread::sleep(POLL);
    }
    let how = if restarted { "after a restart" } else { "without a restart" };
    s.ms(NAME, format!("afterburn file to /status ({how})"), t.elapsed());
    Ok(())
}

fn boot_gate(s: &mut Suite) -> Result<()> {
    const NAME: &str = "fleet: boot gate";
    const GATE: &str = "executor-agent-boot-gate.service";
    let mut node = s.ready_node(NAME)?;
    let enabled = node.exec(&["systemctl", "is-enabled", GATE])?;
    let enabled = String::from_utf8_lossy(&enabled.stdout).trim().to_string();
    ensure!(enabled == "disabled", "the gate is {enabled:?} after Ignition, not disabled");
    node.run(&["systemctl", "enable", GATE])?;
    // A ready node reaches boot-complete.target.
    let _ = node.exec(&["systemctl", "stop", "boot-complete.target", GATE])?;
    let t = Instant::now();
    let out = node.exec(&["systemctl", "start", "boot-complete.target"])?;
    ensure!(out.status.success(), "boot-complete.target failed on a ready node: {}", super::show(&out));
    s.ms(NAME, "start boot-complete.target on a ready node", t.elapsed());
    ensure!(is_active(&mut node, "boot-complete.target")?, "boot-complete.target is not active");
    // A drained node does not, with the gate's timeout shortened to 3 s.
    let dir = node.path(&format!("/etc/systemd/system/{GATE}.d"));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("50-test.conf"),
        "[Service]\nExecStart=\nExecStart=/usr/local/bin/executor-agent wait-ready --timeout 3s\n",
    )?;
    node.run(&["systemctl", "daemon-reload"])?;
    node.run(&["systemctl", "stop", "boot-complete.target", GATE])?;
    node.run(&["executor-agent", "drain", "--reason", "boot gate test"])?;
    node.wait_readyz(false, WAIT, POLL)?;
    let t = Instant::now();
    let out = node.exec(&["systemctl", "start", "boot-complete.target"])?;
    let took = t.elapsed();
    ensure!(!out.status.success(), "boot-complete.target was reached on a drained node");
    ensure!(!is_active(&mut node, "boot-complete.target")?, "boot-complete.target is active while drained");
    ensure!(took >= Duration::from_secs(2), "the gate failed after only {took:?}, not after its 3 s timeout");
    s.ms(NAME, "start boot-complete.target on a drained node fails", took);
    let log = node.run(&["journalctl", "--no-pager", "-u", GATE, "-n", "20"])?;
    ensure!(log.contains("drain"), "the gate's journal does not say why:\n{log}");
    Ok(())
}

fn storage_gc(s: &mut Suite) -> Result<()> {
    const NAME: &str = "fleet: storage GC";
    let mut node = s.ready_node(NAME)?;
    node::import_test_image(&mut node)?;
    node.run_as_core(&format!(
        "podman import --quiet --message unused {} localhost/unused >/dev/null && \
         podman create --name keep localhost/busybox true >/dev/null",
        tree::IMAGE_TAR
    ))?;
    // The graphroot's use, to be sure it is above 2 % (and thus above gc_high_percent).
    let df = node.run_as_core("stat -f -c '%b %a' \"$(podman info --format '{{.Store.GraphRoot}}')\"")?;
    let v: Vec<f64> = df.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    ensure!(v.len() == 2 && v[0] > 0.0, "stat -f said {df:?}");
    let used = 100.0 * (v[0] - v[1]) / v[0];
    eprintln!("    graphroot file system {used:.1} % used");
    ensure!(used > 2.0, "the graphroot is only {used:.1} % used: cannot push it above gc_high_percent");
    write_drop_in(&node, "[storage]\ngc_low_percent = 1\ngc_high_percent = 2\nnot_ready_percent = 100\n")?;
    let t = Instant::now();
    node.run(&["systemctl", "restart", "executor-agent"])?;
    loop {
        let out = node.as_core("podman image exists localhost/unused")?;
        if !out.status.success() {
            break;
        }
        ensure!(t.elapsed() < WAIT, "the unused image was not removed within {WAIT:?}");
        std::thread::sleep(POLL);
    }
    s.ms(NAME, "restart to the unused image removed", t.elapsed());
    let out = node.as_core("podman image exists localhost/busybox")?;
    ensure!(out.status.success(), "the image of container `keep` was removed");
    node.run_as_core("podman container exists keep")?;
    let journal = node.run(&[
        "journalctl",
        "--no-pager",
        "-o",
        "cat",
        &format!("MESSAGE_ID={NODE_CHANGED}"),
        &format!("--since=@{}", unix_now().saturating_sub(60)),
    ])?;
    ensure!(journal.contains("removed image"), "no NODE_CHANGED `removed image` in the journal:\n{journal}");
    eprintln!(
        "    journal: {}",
        journal.lines().filter(|l| l.contains("removed image")).collect::<Vec<_>>().join("; ")
    );
    let body = get_ok(&mut node, "/metrics")?;
    let freed = sample(&body, "executor_agent_image_gc_freed_bytes_total")
        .ok_or_else(|| anyhow!("no image_gc_freed_bytes_total:\n{body}"))?;
    ensure!(freed > 0.0, "image_gc_freed_bytes_total is {freed}");
    let (ready, json) = node.readyz()?;
    ensure!(ready, "/readyz is 503 below not_ready_percent: {json}");
    ensure!(check(&json, "storage")?["ok"] == true, "storage check fails: {json}");
    Ok(())
}

fn podman_config(s: &mut Suite) -> Result<()> {
    const NAME: &str = "fleet: podman-config";
    const HELPER: &str = "/usr/local/bin/docker-credential-ecr-login";
    let mut node = s.ready_node(NAME)?;
    // FCOS's rootful docker.socket holds /run/docker.sock until it is masked (see the
    // fcos-like docker.socket scenario for what the agent says before).
    let free_docker_sock =
        if s.os == Os::FcosLike { "[runner_privileges]\nmask_docker = true\n" } else { "" };
    write_drop_in(
        &node,
        &format!(
            "{FAST_RESYNC}{free_docker_sock}[podman_config]\ndocker_socket_link = true\n\
             [podman_config.cred_helpers]\n\"r.example\" = \"ecr-login\"\n"
        ),
    )?;
    let t = Instant::now();
    node.run(&["systemctl", "restart", "executor-agent"])?;
    let c = wait_check(&mut node, "podman-config", |c| c["ok"] == false && c["detail"] != "not checked yet")?;
    s.ms(NAME, "restart to podman-config failing (missing helper)", t.elapsed());
    let detail = c["detail"].as_str().unwrap_or_default();
    ensure!(detail.contains("docker-credential-ecr-login"), "the detail does not name the helper: {detail}");
    eprintln!("    podman-config: {detail}");
    let (ready, json) = node.readyz()?;
    ensure!(!ready, "/readyz is 200 with a missing credential helper: {json}");
    // The docker.sock link, usable by core (on the fcos-like node a pass after the one that
    // masked docker.socket).
    let deadline = Instant::now() + WAIT;
    loop {
        let target = node.run(&["readlink", "-f", "/var/run/docker.sock"])?;
        if target.trim() == PODMAN_SOCK {
            break;
        }
        ensure!(Instant::now() < deadline, "/var/run/docker.sock resolves to {:?}", target.trim());
        std::thread::sleep(POLL);
    }
    let version =
        node.run_as_core("docker -H unix:///var/run/docker.sock version --format '{{.Server.Version}}'")?;
    ensure!(!version.trim().is_empty(), "docker version answered nothing");
    // credHelpers in core's auth.json.
    let auth = node.run(&[
        "runuser",
        "-u",
        "core",
        "--",
        "sh",
        "-c",
        "cat /run/user/1000/containers/auth.json ~/.config/containers/auth.json 2>/dev/null; true",
    ])?;
    ensure!(
        auth.contains("credHelpers") && auth.contains("r.example") && auth.contains("ecr-login"),
        "core's auth.json has no credHelpers for r.example:\n{auth}"
    );
    // The helper appears: ready.
    let path = node.path(HELPER);
    std::fs::write(&path, "#!/bin/sh\necho '{}'\n")?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    let t = Instant::now();
    let (_, json) = node.wait_readyz(true, WAIT, POLL)?;
    s.ms(NAME, "helper installed to /readyz 200", t.elapsed());
    ensure!(check(&json, "podman-config")?["ok"] == true, "podman-config still fails: {json}");
    Ok(())
}

fn id_mapping(s: &mut Suite) -> Result<()> {
    const NAME: &str = "fleet: id mapping";
    let mut node = s.ready_node(NAME)?;
    write_drop_in(&node, FAST_RESYNC)?;
    node.run(&["systemctl", "restart", "executor-agent"])?;
    node.wait_readyz(true, WAIT, POLL)?;
    // newuidmap without its setuid bit.
    let t = Instant::now();
    node.run(&["chmod", "u-s", "/usr/bin/newuidmap"])?;
    let result = (|| {
        let (_, json) = node.wait_readyz(false, WAIT, POLL)?;
        let c = check(&json, "newuidmap")?;
        ensure!(c["ok"] == false, "newuidmap check passes without the setuid bit: {json}");
        eprintln!("    newuidmap: {}", c["detail"]);
        Ok(())
    })();
    let detect = t.elapsed();
    node.run(&["chmod", "u+s", "/usr/bin/newuidmap"])?;
    result?;
    s.ms(NAME, "newuidmap u-s to /readyz 503", detect);
    node.wait_readyz(true, WAIT, POLL)?;
    // A stale mapping: the pause process keeps the old range after the files change.
    node.run_as_core("podman unshare true")?;
    let pause = pause_pid(&mut node)?;
    let before = node.run(&["cat", &format!("/proc/{pause}/uid_map")])?;
    ensure!(before.contains("100000"), "the pause process does not map 100000: {before}");
    let t = Instant::now();
    node.run(&["sed", "-i", "s/^core:.*/core:300000:65536/", "/etc/subuid", "/etc/subgid"])?;
    let deadline = Instant::now() + WAIT;
    let uid_map = loop {
        if let Ok(pid) = pause_pid(&mut node) {
            if let Ok(map) = node.run(&["cat", &format!("/proc/{pid}/uid_map")]) {
                if map.split_whitespace().any(|f| f == "300000") {
                    break map;
                }
            }
        }
        ensure!(Instant::now() < deadline, "the pause process still maps the old range");
        std::thread::sleep(POLL);
    };
    s.ms(NAME, "subuid range changed to new mapping in place", t.elapsed());
    eprintln!("    uid_map now: {}", uid_map.trim().replace('\n', " | "));
    let (_, json) = node.wait_readyz(true, WAIT, POLL)?;
    s.ms(NAME, "subuid range changed to /readyz 200", t.elapsed());
    ensure!(check(&json, "subuid-mapping")?["ok"] == true, "subuid-mapping fails: {json}");
    let log = node.run(&["journalctl", "--no-pager", "-o", "cat", "SYSLOG_IDENTIFIER=executor-agent"])?;
    ensure!(log.contains("migrate"), "the agent's journal does not mention migrate");
    let inside = node.run_as_core("podman unshare cat /proc/self/uid_map")?;
    ensure!(inside.contains("300000"), "podman unshare maps {inside:?}");
    Ok(())
}

// ---- helpers ----

/// A check of a `/readyz` or `/status` answer by name (shared by the e2e child modules).
pub(super) use crate::harness::probe::check;

/// Polls `/readyz` (200 or 503) until check `name` satisfies `want`.
pub(super) fn wait_check(
    node: &mut Node,
    name: &str,
    want: fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let deadline = Instant::now() + WAIT;
    let mut last;
    loop {
        match node.readyz() {
            Ok((_, json)) => match check(&json, name) {
                Ok(c) if want(&c) => return Ok(c),
                Ok(c) => last = c.to_string(),
                Err(e) => last = format!("{e:#}"),
            },
            Err(e) => last = format!("{e:#}"),
        }
        ensure!(Instant::now() < deadline, "check {name} not as wanted within {WAIT:?}; last: {last}");
        std::thread::sleep(POLL);
    }
}

/// Waits until `/readyz` answers at all (after a restart).
fn wait_answer(node: &mut Node) -> Result<(bool, serde_json::Value)> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(answer) = node.readyz() {
            return Ok(answer);
        }
        ensure!(Instant::now() < deadline, "/readyz did not answer within {WAIT:?}");
        std::thread::sleep(POLL);
    }
}

/// The body of `GET path`, which must answer 200.
pub(super) fn get_ok(node: &mut Node, path: &str) -> Result<String> {
    let (code, body) = node.http_get(AGENT_PORT, path)?;
    ensure!(code == 200, "GET {path} answered {code}: {body}");
    Ok(body)
}

fn get_json(node: &mut Node, path: &str) -> Result<(u16, serde_json::Value)> {
    let (code, body) = node.http_get(AGENT_PORT, path)?;
    let json = serde_json::from_str(&body).with_context(|| format!("GET {path} ({code}): {body}"))?;
    Ok((code, json))
}

/// Headers and body of `GET path` with curl inside the node.
fn curl(node: &mut Node, path: &str) -> Result<(String, String)> {
    let out = node.run(&[
        "curl",
        "-sS",
        "--max-time",
        "10",
        "-i",
        &format!("http://127.0.0.1:{AGENT_PORT}{path}"),
    ])?;
    let out = out.replace("\r\n", "\n");
    let (head, body) = out.split_once("\n\n").ok_or_else(|| anyhow!("no headers from curl: {out}"))?;
    Ok((head.to_string(), body.to_string()))
}

/// The value of the sample line starting with `series` (name plus labels) followed by a space.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.split(' ').next()?.parse().ok())
}

fn status_text(node: &mut Node) -> Result<String> {
    Ok(node.run(&["systemctl", "show", "-p", "StatusText", "--value", "executor-agent"])?.trim().to_string())
}

fn is_active(node: &mut Node, unit: &str) -> Result<bool> {
    let out = node.exec(&["systemctl", "is-active", unit])?;
    Ok(String::from_utf8_lossy(&out.stdout).trim() == "active")
}

pub(super) fn write_drop_in(node: &Node, text: &str) -> Result<()> {
    let path = node.path(DROP_IN);
    std::fs::create_dir_all(path.parent().expect("the drop-in has a directory"))?;
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// The PID of core's Podman pause process.
fn pause_pid(node: &mut Node) -> Result<u32> {
    let text = node.run(&["cat", "/run/user/1000/libpod/tmp/pause.pid"])?;
    text.trim().parse().with_context(|| format!("pause.pid holds {text:?}"))
}

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_samples_of_an_exposition() {
        let body = "# TYPE x counter\nexecutor_agent_drift_events_total{check=\"podman-socket\"} 2\n\
                    executor_agent_ready 1\n# EOF\n";
        assert_eq!(sample(body, r#"executor_agent_drift_events_total{check="podman-socket"}"#), Some(2.0));
        assert_eq!(sample(body, "executor_agent_ready"), Some(1.0));
        assert_eq!(sample(body, "executor_agent_rea"), None);
    }
}
