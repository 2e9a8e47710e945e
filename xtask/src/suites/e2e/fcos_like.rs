//! Scenarios of the FCOS-shaped node (`Os::FcosLike`, see `tree::fcos_layout`): the agent in
//! FCOS's layout, core's stock range left alone, the rootful docker.socket; and which of the
//! other scenarios run there too (those whose paths or files the layout changes).

use super::fleet::{check, wait_check, write_drop_in};
use super::{stamp, subid_range, Scenario, Suite, POLL};
use crate::harness::node::{self, Node, PODMAN_SOCK};
use crate::harness::tree::{Os, FCOS_CORE_RANGE};
use crate::render::ignition::{self, Extras};
use anyhow::{ensure, Context, Result};
use std::time::{Duration, Instant};

/// The label prefix of the scenarios that only make sense on the FCOS-shaped node.
const PREFIX: &str = "fcos-like: ";

const SCENARIOS: &[(&str, Scenario)] = &[
    ("fcos-like: the agent runs in FCOS's layout", layout),
    ("fcos-like: core's stock range is left alone, byte for byte", stock_range),
    ("fcos-like: the rootful docker.socket is reported, never started", rootful_docker),
];

/// The other scenarios that also run on the FCOS-shaped node: home under /var/home, the agent
/// and helpers under /usr/local (really /var/usrlocal), a read-only /usr, core's existing range,
/// newuidmap by file capability, the docker CLI in /usr/bin and a rootful /run/docker.sock.
pub const ALSO_ON_FCOS_LIKE: &[&str] = &[
    "ready with no other command",
    "rootless container through the socket, port 80 published",
    "wait-ready as core over a login shell exits 0 once ready",
    "reboot: ready again, nothing rewritten",
    "drift: core's subuid line removed",
    "canary: ready only after a round passed, nothing left behind",
    "boundary: a dedicated runner user works with the shipped unit",
    "boundary: the runner user attacks the agent: nothing leaks, nothing stalls",
    "fleet: podman-config docker.sock link and credential helpers",
    "leave: a drain refuses new SSH logins of the runner user, not open sessions or root",
];

pub fn scenarios() -> &'static [(&'static str, Scenario)] {
    SCENARIOS
}

/// Whether the scenario labelled `case` runs on `os`.
pub fn applies(os: Os, case: &str) -> bool {
    match os {
        Os::FcosLike => case.starts_with(PREFIX) || ALSO_ON_FCOS_LIKE.contains(&case),
        Os::Bookworm | Os::Trixie => !case.starts_with(PREFIX),
    }
}

fn layout(s: &mut Suite) -> Result<()> {
    const NAME: &str = "fcos-like: layout";
    let mut node = s.ready_node(NAME)?;
    let touched = node.exec(&["touch", "/usr/lib/executor-agent-write-probe"])?;
    ensure!(
        !touched.status.success()
            && String::from_utf8_lossy(&touched.stderr).contains("Read-only file system"),
        "/usr is writable on the FCOS-shaped node: {}",
        super::show(&touched)
    );
    for (link, target) in [("/home", "var/home"), ("/usr/local", "../var/usrlocal")] {
        let read = node.run(&["readlink", link])?;
        ensure!(read.trim() == target, "{link} links to {:?}, not {target}", read.trim());
    }
    let passwd = node.run(&["getent", "passwd", "core"])?;
    ensure!(passwd.split(':').nth(5) == Some("/var/home/core"), "core's passwd entry: {passwd}");
    // What Ignition wrote to /usr/local/bin is on /var, and the unit runs it from there.
    let installed = node.run(&["readlink", "-f", ignition::AGENT_PATH])?;
    ensure!(installed.trim() == "/var/usrlocal/bin/executor-agent", "the agent is at {:?}", installed.trim());
    let exe =
        node.run(&["sh", "-c", "readlink /proc/$(systemctl show -p MainPID --value executor-agent)/exe"])?;
    ensure!(exe.trim() == "/var/usrlocal/bin/executor-agent", "the unit runs {:?}", exe.trim());
    let interpreters = node.exec(&["sh", "-c", "command -v perl python3 python; true"])?;
    let found = String::from_utf8_lossy(&interpreters.stdout).trim().to_string();
    ensure!(found.is_empty(), "the FCOS-shaped node has {found}");
    let (ready, json) = node.readyz()?;
    ensure!(ready, "/readyz is 503: {json}");
    let expect = [
        // Fedora's newuidmap has no setuid bit: a file capability does its job.
        ("newuidmap", "cap_setuid"),
        ("storage", "/var/home/core/.local/share/containers/storage"),
        ("docker-cli", "/usr/bin/docker"),
    ];
    for (name, text) in expect {
        let c = check(&json, name)?;
        let detail = c["detail"].as_str().unwrap_or_default();
        eprintln!("    {name}: {detail}");
        ensure!(c["ok"] == true && detail.contains(text), "check {name} does not say {text:?}: {c}");
    }
    let graphroot = node.run_as_core("podman info --format '{{.Store.GraphRoot}}'")?;
    ensure!(graphroot.trim().starts_with("/var/home/core/"), "Podman's storage is at {:?}", graphroot.trim());
    Ok(())
}

fn stock_range(s: &mut Suite) -> Result<()> {
    const NAME: &str = "fcos-like: stock range";
    let mut node = s.node(&Extras::default())?;
    let files = ["/etc/subuid", "/etc/subgid"].map(|f| node.path(f));
    let before: Vec<_> = files.iter().map(|f| stamp(f)).collect::<Result<_>>()?;
    // shadow-utils' backups (`/etc/subuid-`), which a write would replace.
    let backups = ["/etc/subuid-", "/etc/subgid-"].map(|f| node.path(f));
    let backups_before: Vec<_> = backups.iter().map(|f| stamp(f).ok()).collect();
    s.boot_until_ready(&mut node, NAME)?;
    node.run(&["systemctl", "restart", "executor-agent"])?;
    node.wait_readyz(true, Duration::from_secs(60), POLL)?;
    for (file, was) in files.iter().zip(&before) {
        let text = std::fs::read_to_string(file)?;
        ensure!(text == FCOS_CORE_RANGE, "{} was changed to {text:?}", file.display());
        ensure!(stamp(file)? == *was, "{} was rewritten (same bytes, new inode or mtime)", file.display());
    }
    for (backup, was) in backups.iter().zip(&backups_before) {
        ensure!(stamp(backup).ok() == *was, "{} was written", backup.display());
    }
    let (_, json) = node.readyz()?;
    for name in ["subuid", "subgid", "subuid-mapping"] {
        let c = check(&json, name)?;
        eprintln!("    {name}: {}", c["detail"].as_str().unwrap_or_default());
        ensure!(c["ok"] == true, "check {name} fails: {c}");
    }
    let map = node.run_as_core("podman unshare cat /proc/self/uid_map")?;
    ensure!(
        map.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["1", "524288", "65536"]),
        "core's user namespace does not map the stock range:\n{map}"
    );
    // Lost, the range comes back where FCOS's login.defs says (SUB_UID_MIN 524288), as stock.
    node.run(&["sed", "-i", "/^core:/d", "/etc/subuid", "/etc/subgid"])?;
    let t = Instant::now();
    let deadline = t + Duration::from_secs(30);
    loop {
        let back: Vec<String> = files.iter().map(std::fs::read_to_string).collect::<std::io::Result<_>>()?;
        if back.iter().all(|t| !t.is_empty()) {
            ensure!(
                back.iter().all(|t| t == FCOS_CORE_RANGE),
                "core's range came back as {back:?}, not {FCOS_CORE_RANGE:?} (login.defs SUB_UID_MIN)"
            );
            break;
        }
        ensure!(Instant::now() < deadline, "core's range did not come back within 30 s");
        std::thread::sleep(POLL);
    }
    s.ms(NAME, "range removed to written back from login.defs", t.elapsed());
    let (start, _) = subid_range(&files[0], "core")?;
    ensure!(start == 524288, "start {start}");
    Ok(())
}

fn rootful_docker(s: &mut Suite) -> Result<()> {
    const NAME: &str = "fcos-like: rootful docker";
    let mut node = s.ready_node(NAME)?;
    ensure!(
        unit_state(&mut node, "docker.socket", "ActiveState")? == "active",
        "docker.socket is not listening"
    );
    let c = check(&node.readyz()?.1, "runner-privileges")?;
    let detail = c["detail"].as_str().unwrap_or_default().to_string();
    eprintln!("    runner-privileges: {detail}");
    ensure!(
        detail.contains("docker.socket (rootful dockerd"),
        "runner-privileges does not report docker.socket: {c}"
    );
    // The runner's path uses the Podman socket and never wakes the rootful daemon.
    let t = Instant::now();
    node.run_as_core("executor-agent wait-ready --timeout 30s")?;
    node::import_test_image(&mut node)?;
    let out = node
        .run_as_core(&format!("docker -H unix://{PODMAN_SOCK} run --rm localhost/busybox echo rootless"))?;
    ensure!(out.trim() == "rootless", "docker run printed {out:?}");
    s.ms(NAME, "wait-ready + import + docker run (Podman socket)", t.elapsed());
    never_started(&mut node, "docker.service")?;
    // Tools that hard-code /var/run/docker.sock cannot get a link to the Podman socket while
    // the rootful socket listens there: the agent says so and how to free it, and leaves it.
    write_drop_in(&node, "[repair]\nresync_interval = \"1s\"\n[podman_config]\ndocker_socket_link = true\n")?;
    node.run(&["systemctl", "restart", "executor-agent"])?;
    let c = wait_check(&mut node, "podman-config", |c| {
        c["ok"] == false && c["detail"].as_str().is_some_and(|d| d.contains("mask_docker"))
    })?;
    eprintln!("    podman-config: {}", c["detail"].as_str().unwrap_or_default());
    ensure!(unit_state(&mut node, "docker.socket", "ActiveState")? == "active", "docker.socket was stopped");
    // Masked on request: the socket stops, its path is gone, and the link takes its place.
    write_drop_in(
        &node,
        "[repair]\nresync_interval = \"1s\"\n[podman_config]\ndocker_socket_link = true\n\
         [runner_privileges]\nmask_docker = true\n",
    )?;
    let t = Instant::now();
    node.run(&["systemctl", "restart", "executor-agent"])?;
    let deadline = t + Duration::from_secs(30);
    while unit_state(&mut node, "docker.socket", "LoadState")? != "masked"
        || unit_state(&mut node, "docker.socket", "ActiveState")? != "inactive"
    {
        ensure!(
            Instant::now() < deadline,
            "docker.socket is not masked and stopped 30 s after mask_docker = true"
        );
        std::thread::sleep(POLL);
    }
    s.ms(NAME, "mask_docker = true to docker.socket masked and stopped", t.elapsed());
    ensure!(
        unit_state(&mut node, "docker.service", "LoadState")? == "masked",
        "docker.service is not masked"
    );
    never_started(&mut node, "docker.service")?;
    node.wait_readyz(true, Duration::from_secs(30), POLL)?;
    s.ms(NAME, "mask_docker = true to /readyz 200 with the docker.sock link", t.elapsed());
    let target = node.run(&["readlink", "/run/docker.sock"])?;
    ensure!(target.trim() == PODMAN_SOCK, "/run/docker.sock links to {:?}", target.trim());
    let out =
        node.run_as_core("docker -H unix:///var/run/docker.sock run --rm localhost/busybox echo linked")?;
    ensure!(out.trim() == "linked", "docker run through /var/run/docker.sock printed {out:?}");
    Ok(())
}

fn unit_state(node: &mut Node, unit: &str, property: &str) -> Result<String> {
    Ok(node.run(&["systemctl", "show", "-p", property, "--value", unit])?.trim().to_string())
}

/// A unit systemd has never started since boot: it never left `inactive` (a start that failed
/// would have).
fn never_started(node: &mut Node, unit: &str) -> Result<()> {
    let at = unit_state(node, unit, "InactiveExitTimestampMonotonic")?;
    let at: u64 = at.parse().with_context(|| format!("{unit}'s InactiveExitTimestampMonotonic is {at:?}"))?;
    ensure!(at == 0, "{unit} was started (the rootful daemon woke up)");
    Ok(())
}
