//! End-to-end scenarios of a node leaving the fleet without killing a job: what runs is
//! known (`check`, `/status`), `drain --wait` returns once no job runs, zincati's FleetLock
//! grants a reboot only to root and only once idle, and an EC2 Spot interruption notice from
//! a fake IMDS at 169.254.169.254 (inside the node's own network namespace) drains the node,
//! and a drained node refuses the runner user's new SSH logins through the node's real sshd.
//!
//! A child module of `e2e` (suites/e2e/), so it shares the suite, the node helpers and the
//! figures.

use super::fleet::unix_now;
use super::{Scenario, Suite, POLL};
use crate::harness::host;
use crate::harness::node::{self, Node, PODMAN_SOCK};
use crate::message_ids::NODE_CHANGED;
use anyhow::{anyhow, ensure, Context, Result};
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bound on each wait inside a scenario.
const WAIT: Duration = Duration::from_secs(30);
/// The GitLab job ID the fake job's container carries, as GitLab Runner labels it.
const JOB_ID: &str = "4242";

const SCENARIOS: &[(&str, Scenario)] = &[
    ("leave: drain --wait returns once no job runs, names it at the timeout", drain_wait),
    ("leave: FleetLock lock only for root and only once no job runs", fleet_lock),
    ("leave: an EC2 Spot interruption notice drains the node", spot_notice),
    ("leave: a drain refuses new SSH logins of the runner user, not open sessions or root", ssh_gate),
];

/// The scenarios, chained after `e2e`'s own.
pub fn scenarios() -> &'static [(&'static str, Scenario)] {
    SCENARIOS
}

/// Starts a container as GitLab Runner's docker executor would for job [`JOB_ID`].
fn start_job(node: &mut Node) -> Result<()> {
    node::import_test_image(node)?;
    node.run_as_core(&format!(
        "DOCKER_HOST=unix://{PODMAN_SOCK} docker run -d --name job --label com.gitlab.gitlab-runner.job.id={JOB_ID} \
         --label com.gitlab.gitlab-runner.type=build localhost/busybox sleep 600 >/dev/null"
    ))?;
    Ok(())
}

fn end_job(node: &mut Node) -> Result<()> {
    node.run_as_core(&format!("DOCKER_HOST=unix://{PODMAN_SOCK} docker rm -f job >/dev/null"))?;
    Ok(())
}

fn drain_wait(s: &mut Suite) -> Result<()> {
    const NAME: &str = "leave: drain --wait";
    let mut node = s.ready_node(NAME)?;
    let t = Instant::now();
    let idle =
        node.run(&["executor-agent", "drain", "--reason", "scale-in", "--wait", "--timeout", "20s"])?;
    s.ms(NAME, "drain --wait on an idle node: exit 0", t.elapsed());
    ensure!(idle.contains("no job runs"), "drain --wait on an idle node said {idle:?}");
    node.run(&["executor-agent", "undrain"])?;

    start_job(&mut node)?;
    let check = node.exec(&["executor-agent", "check"])?;
    let check = String::from_utf8_lossy(&check.stdout).into_owned();
    let want = format!("jobs: GitLab job {JOB_ID} (1 container)");
    ensure!(check.lines().any(|l| l == want), "`check` does not say {want:?}:\n{check}");

    let out = node.exec(&["executor-agent", "drain", "--reason", "scale-in", "--wait", "--timeout", "3s"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "drain --wait exited 0 while a job ran");
    ensure!(
        stderr.contains(&format!("still running after 3s: GitLab job {JOB_ID} (1 container)")),
        "drain --wait at its timeout said {stderr:?}"
    );

    // Waiting in the background while the job ends.
    node.run(&[
        "systemd-run",
        "--unit=e2e-drain-wait",
        "--",
        "sh",
        "-c",
        "executor-agent drain --reason scale-in --wait --timeout 60s >/var/tmp/drain-wait.out 2>&1; echo $? >/var/tmp/drain-wait.rc",
    ])?;
    std::thread::sleep(Duration::from_secs(3));
    ensure!(!node.path("/var/tmp/drain-wait.rc").exists(), "drain --wait returned while the job ran");
    let ended = Instant::now();
    end_job(&mut node)?;
    let deadline = Instant::now() + WAIT;
    let rc = loop {
        if let Ok(rc) = std::fs::read_to_string(node.path("/var/tmp/drain-wait.rc")) {
            break rc;
        }
        if Instant::now() >= deadline {
            let said = std::fs::read_to_string(node.path("/var/tmp/drain-wait.out")).unwrap_or_default();
            let unit = node.exec(&["systemctl", "status", "--no-pager", "e2e-drain-wait"])?;
            anyhow::bail!(
                "drain --wait did not return within {WAIT:?} of the job's end; it said {said:?}; its unit:\n{}",
                String::from_utf8_lossy(&unit.stdout)
            );
        }
        std::thread::sleep(POLL);
    };
    s.ms(NAME, "job ended to drain --wait exit", ended.elapsed());
    let said = std::fs::read_to_string(node.path("/var/tmp/drain-wait.out")).unwrap_or_default();
    ensure!(rc.trim() == "0", "drain --wait exited {rc:?} after the job ended: {said}");
    ensure!(
        said.contains(&format!("waiting: GitLab job {JOB_ID}")) && said.contains("no job runs"),
        "{said}"
    );
    Ok(())
}

/// `curl` of a FleetLock endpoint inside the node: as root, or as core with `as_core`.
fn fleet_lock_call(path: &str) -> String {
    format!(
        "curl -s -o /dev/null -w '%{{http_code}}' -H 'fleet-lock-protocol: true' \
         -d '{{\"client_params\": {{\"id\": \"e2e-node\", \"group\": \"default\"}}}}' http://127.0.0.1:9740{path}"
    )
}

fn fleet_lock(s: &mut Suite) -> Result<()> {
    const NAME: &str = "leave: FleetLock";
    let mut node = s.ready_node(NAME)?;
    let since = unix_now();
    start_job(&mut node)?;

    let as_core = node.run_as_core(&fleet_lock_call("/v1/pre-reboot"))?;
    ensure!(as_core == "403", "pre-reboot as core answered {as_core}");
    let (ready, json) = node.readyz()?;
    ensure!(ready, "the runner user drained its node through FleetLock: {json}");

    let t = Instant::now();
    let busy = node.run(&["sh", "-c", &fleet_lock_call("/v1/pre-reboot")])?;
    ensure!(busy == "409", "pre-reboot as root with a job running answered {busy}");
    let (_, json) = node.wait_readyz(false, WAIT, POLL)?;
    s.ms(NAME, "pre-reboot (job running) to /readyz 503", t.elapsed());
    ensure!(
        json.to_string().contains("OS update: zincati asks to reboot"),
        "not drained for the update: {json}"
    );

    end_job(&mut node)?;
    let granted = node.run(&["sh", "-c", &fleet_lock_call("/v1/pre-reboot")])?;
    ensure!(granted == "200", "pre-reboot as root with no job answered {granted}");
    let held = std::fs::read_to_string(node.path("/var/lib/executor-agent/fleet-lock.json"))
        .context("the lock was granted but not recorded")?;
    ensure!(held.contains("e2e-node"), "{held}");
    let metrics = node.http_get(node::AGENT_PORT, "/metrics")?.1;
    ensure!(metrics.contains(r#"executor_agent_check_ok{check="drain",required="true"} 0"#), "{metrics}");

    node.run(&["systemctl", "restart", "executor-agent"])?;
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    let released = node.run(&["sh", "-c", &fleet_lock_call("/v1/steady-state")])?;
    ensure!(released == "200", "steady-state answered {released}");
    node.wait_readyz(true, WAIT, POLL)?;
    s.ms(NAME, "steady-state to /readyz 200 (undrained)", t.elapsed());
    ensure!(!node.path("/var/lib/executor-agent/fleet-lock.json").exists(), "the lock was not released");
    journal_says(
        &mut node,
        since,
        &[
            "drained: OS update: zincati asks to reboot",
            "reboot lock granted to e2e-node: no job runs",
            "reboot lock released by e2e-node",
            "undrained: the update is done",
        ],
    )?;
    Ok(())
}

/// A fake IMDSv2 in the node's network namespace: a token, then 404 for both notices until
/// `interruption` is set.
struct FakeImds {
    interruption: Arc<Mutex<Option<String>>>,
    asked: Arc<Mutex<u32>>,
}

impl FakeImds {
    fn start(node: &mut Node) -> Result<FakeImds> {
        let leader = node.leader()?;
        // The host's `ip`, in the node's network namespace only.
        let status = std::process::Command::new("nsenter")
            .args(["-t", &leader.to_string(), "-n", "ip", "addr", "add", "169.254.169.254/32", "dev", "lo"])
            .status()?;
        ensure!(status.success(), "cannot add 169.254.169.254 to the node's loopback");
        let interruption = Arc::new(Mutex::new(None::<String>));
        let asked = Arc::new(Mutex::new(0));
        let (notice, count) = (interruption.clone(), asked.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let listener = node::enter_netns(leader)
                .and_then(|()| std::net::TcpListener::bind("169.254.169.254:80").map_err(Into::into));
            let listener = match listener {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            for stream in listener.incoming().flatten() {
                let _ = answer(stream, &notice, &count);
            }
        });
        rx.recv_timeout(Duration::from_secs(5)).map_err(|_| anyhow!("the fake IMDS did not start"))??;
        Ok(FakeImds { interruption, asked })
    }
}

/// One request, one answer, then close (as IMDS allows).
fn answer(
    mut stream: std::net::TcpStream,
    notice: &Mutex<Option<String>>,
    asked: &Mutex<u32>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&request);
    let line = text.lines().next().unwrap_or_default().to_string();
    let has_token = text.to_ascii_lowercase().contains("x-aws-ec2-metadata-token: tok");
    *asked.lock().unwrap() += 1;
    let (status, body) = if line.starts_with("PUT /latest/api/token ") {
        ("200 OK", "tok".to_string())
    } else if !has_token {
        ("401 Unauthorized", String::new())
    } else if line.starts_with("GET /latest/meta-data/spot/instance-action ") {
        match notice.lock().unwrap().clone() {
            Some(body) => ("200 OK", body),
            None => ("404 Not Found", String::new()),
        }
    } else {
        ("404 Not Found", String::new())
    };
    write!(stream, "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
}

fn spot_notice(s: &mut Suite) -> Result<()> {
    const NAME: &str = "leave: Spot notice";
    let mut node = s.ready_node(NAME)?;
    let since = unix_now();
    let imds = FakeImds::start(&mut node)?;
    // Afterburn's attributes say EC2; the agent reads them at each pass.
    node.run(&[
        "sh",
        "-c",
        "mkdir -p /run/metadata && printf 'AFTERBURN_AWS_INSTANCE_ID=i-0e2e0e2e0e2e0e2e0\\n' >/run/metadata/afterburn",
    ])?;
    node.run(&["systemctl", "restart", "executor-agent"])?;
    node.wait_readyz(true, WAIT, POLL)?;
    let deadline = Instant::now() + WAIT;
    while *imds.asked.lock().unwrap() < 2 {
        ensure!(Instant::now() < deadline, "the agent never asked the fake IMDS");
        std::thread::sleep(POLL);
    }
    let (ready, json) = node.readyz()?;
    ensure!(ready, "IMDS with no notice made the node not ready: {json}");

    let t = Instant::now();
    *imds.interruption.lock().unwrap() =
        Some(r#"{"action": "terminate", "time": "2026-12-01T17:02:00Z"}"#.into());
    let (_, json) = node.wait_readyz(false, WAIT, POLL)?;
    s.ms(NAME, "interruption notice to /readyz 503", t.elapsed());
    ensure!(
        json.to_string().contains("EC2 Spot interruption notice: terminate at 2026-12-01T17:02:00Z"),
        "the drain does not give the notice: {json}"
    );
    let metrics = node.http_get(node::AGENT_PORT, "/metrics")?.1;
    ensure!(metrics.contains(r#"executor_agent_check_ok{check="drain",required="true"} 0"#), "{metrics}");
    journal_says(
        &mut node,
        since,
        &["EC2 Spot interruption notice: terminate at 2026-12-01T17:02:00Z: drained"],
    )?;
    node.run(&["executor-agent", "undrain"])?;
    node.wait_readyz(true, WAIT, POLL)?;
    let asked = *imds.asked.lock().unwrap();
    s.fig(NAME, "IMDS requests over the scenario", asked.to_string());
    Ok(())
}

/// The agent's NODE_CHANGED messages since `since` (Unix seconds), one per line.
fn changes_since(node: &mut Node, since: u64) -> Result<String> {
    node.run(&[
        "journalctl",
        "--no-pager",
        "-o",
        "cat",
        &format!("MESSAGE_ID={NODE_CHANGED}"),
        &format!("--since=@{since}"),
    ])
}

/// Fails unless each of `wanted` is in one of the agent's NODE_CHANGED messages since `since`.
fn journal_says(node: &mut Node, since: u64, wanted: &[&str]) -> Result<()> {
    let journal = changes_since(node, since)?;
    for w in wanted {
        ensure!(journal.contains(w), "no NODE_CHANGED entry saying {w:?} in the journal:\n{journal}");
    }
    Ok(())
}

/// The client key of the SSH scenario, inside the node (root's).
const SSH_KEY: &str = "/root/.ssh/e2e_ed25519";

/// A key for root's client, authorized for core (the runner user) and for root.
fn ssh_setup(node: &mut Node) -> Result<()> {
    node.run(&[
        "sh",
        "-c",
        &format!("mkdir -p -m 700 /root/.ssh && rm -f {SSH_KEY} {SSH_KEY}.pub && ssh-keygen -q -t ed25519 -N '' -f {SSH_KEY} && install -m 600 {SSH_KEY}.pub /root/.ssh/authorized_keys"),
    ])?;
    let public = std::fs::read_to_string(node.path(&format!("{SSH_KEY}.pub")))?;
    // core's own file, written as core.
    node.run_as_core(&format!(
        "umask 077 && mkdir -p ~/.ssh && printf '%s\\n' '{}' >~/.ssh/authorized_keys",
        public.trim()
    ))?;
    let deadline = Instant::now() + WAIT;
    while !node.exec(&["systemctl", "is-active", "--quiet", "ssh.service"])?.status.success() {
        ensure!(Instant::now() < deadline, "sshd (ssh.service) is not active on the node");
        std::thread::sleep(POLL);
    }
    Ok(())
}

/// The client's arguments for a non-interactive session of `user` running `command`, like
/// the runner's (`exit 0` is its acquire heartbeat).
fn ssh_argv(user: &str, command: &str) -> Vec<String> {
    let destination = format!("{user}@127.0.0.1");
    let head = ["ssh", "-i", SSH_KEY];
    let tail = ["-o", "ConnectTimeout=5", destination.as_str(), command];
    head.iter().chain(host::BATCH_SSH_OPTIONS).chain(&tail).map(|a| a.to_string()).collect()
}

fn ssh(node: &mut Node, user: &str, command: &str) -> Result<std::process::Output> {
    let argv = ssh_argv(user, command);
    node.exec(&argv.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Polls `ssh USER exit 0` until it succeeds (`ok`) or fails; returns the time and the last
/// client stderr.
fn wait_ssh(node: &mut Node, user: &str, ok: bool) -> Result<(Duration, String)> {
    let t = Instant::now();
    loop {
        let out = ssh(node, user, "exit 0")?;
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if out.status.success() == ok {
            return Ok((t.elapsed(), stderr));
        }
        ensure!(
            t.elapsed() < WAIT,
            "ssh {user}@node `exit 0` still {} after {WAIT:?}: {stderr}",
            if ok { "fails" } else { "succeeds" }
        );
        std::thread::sleep(POLL);
    }
}

fn ssh_gate(s: &mut Suite) -> Result<()> {
    const NAME: &str = "leave: SSH gate";
    let mut node = s.ready_node(NAME)?;
    ssh_setup(&mut node)?;
    wait_ssh(&mut node, "core", true).context("core's SSH login before any drain")?;

    // A session that is open when the drain comes: a running job's connection.
    node.run(&[
        "systemd-run",
        "--unit=e2e-ssh-open",
        "--",
        "sh",
        "-c",
        &format!(
            "{} >/var/tmp/ssh-open.out 2>&1; echo $? >/var/tmp/ssh-open.rc",
            ssh_argv("core", "echo started; sleep 6; echo still-here")
                .iter()
                .map(|a| format!("'{a}'"))
                .collect::<Vec<_>>()
                .join(" ")
        ),
    ])?;
    let deadline = Instant::now() + WAIT;
    while !std::fs::read_to_string(node.path("/var/tmp/ssh-open.out")).unwrap_or_default().contains("started")
    {
        ensure!(Instant::now() < deadline, "the open SSH session never started");
        std::thread::sleep(POLL);
    }

    let t0 = unix_now();
    node.run(&["executor-agent", "drain", "--reason", "e2e: scale-in"])?;
    let (refused_after, client_said) = wait_ssh(&mut node, "core", false)?;
    s.ms(NAME, "drain to core's new SSH login refused", refused_after);
    let nologin =
        std::fs::read_to_string(node.path("/etc/nologin")).context("no /etc/nologin while drained")?;
    ensure!(
        nologin.contains("drained (e2e: scale-in)"),
        "/etc/nologin does not give the reason: {nologin:?}"
    );
    // sshd-session logs through syslog: under load journald may file the line after the client
    // has already seen the connection closed.
    let deadline = Instant::now() + WAIT;
    let sshd = loop {
        let sshd = node.run(&[
            "journalctl",
            "--no-pager",
            "-o",
            "cat",
            "-u",
            "ssh.service",
            &format!("--since=@{t0}"),
        ])?;
        if sshd.contains("Access denied for user core") || Instant::now() > deadline {
            break sshd;
        }
        std::thread::sleep(POLL);
    };
    ensure!(
        sshd.contains("Access denied for user core by PAM account configuration"),
        "sshd did not refuse core through PAM (pam_nologin); the client said {client_said:?}; sshd's journal:\n{sshd}"
    );
    if let Some(line) = sshd.lines().find(|l| l.contains("Access denied for user core")) {
        eprintln!("    sshd: {line}");
    }
    // The operator's way in: pam_nologin never refuses root.
    let root = ssh(&mut node, "root", "exit 0")?;
    ensure!(
        root.status.success(),
        "root's SSH login was refused while drained: {}",
        String::from_utf8_lossy(&root.stderr)
    );
    let (ready, json) = node.readyz()?;
    ensure!(!ready, "drained, yet ready: {json}");
    let logins = json["checks"].as_array().into_iter().flatten().find(|c| c["name"] == "logins").cloned();
    ensure!(
        logins.as_ref().is_some_and(
            |c| c["ok"] == true && c["detail"].as_str().unwrap_or("").contains("refused while drained")
        ),
        "the logins check does not say logins are refused while drained: {logins:?}"
    );

    // The open session lives on to its end.
    let deadline = Instant::now() + WAIT;
    let rc = loop {
        if let Ok(rc) = std::fs::read_to_string(node.path("/var/tmp/ssh-open.rc")) {
            break rc;
        }
        ensure!(Instant::now() < deadline, "the open SSH session did not end");
        std::thread::sleep(POLL);
    };
    let said = std::fs::read_to_string(node.path("/var/tmp/ssh-open.out")).unwrap_or_default();
    ensure!(
        rc.trim() == "0" && said.contains("still-here"),
        "the session open before the drain was cut: exit {rc:?}, {said:?}"
    );

    let t = Instant::now();
    node.run(&["executor-agent", "undrain"])?;
    let (allowed_after, _) = wait_ssh(&mut node, "core", true)?;
    s.ms(NAME, "undrain to core's SSH login allowed", allowed_after);
    ensure!(!node.path("/etc/nologin").exists(), "/etc/nologin left after undrain");
    node.wait_readyz(true, WAIT, POLL)?;
    s.ms(NAME, "undrain to /readyz 200", t.elapsed());
    journal_says(
        &mut node,
        t0,
        &["drained: e2e: scale-in", "wrote /etc/nologin", "undrained", "removed /etc/nologin"],
    )?;

    // Someone else's nologin (`shutdown +5` writes /run/nologin): the runner cannot log in,
    // so the node is not ready, and the file is left alone.
    let t = Instant::now();
    node.run(&["sh", "-c", "echo 'The system is going down for maintenance' >/run/nologin"])?;
    let (_, json) = node.wait_readyz(false, WAIT, POLL)?;
    s.ms(NAME, "/run/nologin written to /readyz 503", t.elapsed());
    ensure!(
        json.to_string().contains("/run/nologin refuses the logins of every user but root"),
        "readiness does not name /run/nologin: {json}"
    );
    wait_ssh(&mut node, "core", false).context("core's login with /run/nologin")?;
    let metrics = node.http_get(node::AGENT_PORT, "/metrics")?.1;
    ensure!(metrics.contains(r#"executor_agent_check_ok{check="logins",required="true"} 0"#), "{metrics}");
    std::thread::sleep(Duration::from_secs(2));
    ensure!(node.run(&["cat", "/run/nologin"])?.contains("going down"), "the agent touched /run/nologin");
    let t = Instant::now();
    node.run(&["rm", "/run/nologin"])?;
    node.wait_readyz(true, WAIT, POLL)?;
    s.ms(NAME, "/run/nologin removed to /readyz 200", t.elapsed());
    Ok(())
}
