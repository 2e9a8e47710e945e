//! A node: a fresh copy of the pristine tree, provisioned by the real Ignition binary, booted with
//! systemd-nspawn; commands run inside as the node's own services; HTTP from the node's network
//! namespace; poweroff with a kill on timeout; and the `cargo xtask node` commands.

use crate::harness::host;
use crate::harness::tree::{self, Os};
use crate::render::ignition::{self, Extras};
use anyhow::{anyhow, bail, Context, Result};
use std::io::{Read as _, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The agent's HTTP port on the node.
pub const AGENT_PORT: u16 = 9739;
/// The test web server: busybox httpd under a shell that exits on SIGTERM (as PID 1 of the
/// container, httpd itself would ignore it and hold up the node's poweroff for 90 s).
pub const HTTPD: &str = "sh -c 'trap \"exit 0\" TERM; httpd -f -p 8000 -h /srv & wait'";

/// Bound on one command run inside a node.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(120);
/// The rootless Podman socket of `core`.
pub const PODMAN_SOCK: &str = "/run/user/1000/podman/podman.sock";

/// Where node copies and their logs live.
fn nodes_dir() -> PathBuf {
    tree::cache_dir().join("nodes")
}

/// A node's root, log and nspawn process. Dropping a node powers it off and removes its copy
/// unless it was `detach`ed.
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pub log: PathBuf,
    nspawn: Option<Child>,
    nspawn_pid: Option<i32>,
    detached: bool,
    /// Host CLOCK_MONOTONIC when the last boot started, in microseconds.
    pub boot_started_us: u64,
    pub boot_started: Option<Instant>,
    /// The node name's lock, held while this process sets the node up or runs it.
    _lock: Option<std::fs::File>,
}

/// Takes the exclusive lock of node name `name` (`nodes/<name>.lock`, released when the file is
/// dropped, at the latest when the process exits); `None` when another process holds it. Two
/// `cargo xtask` processes (a dev node being replaced, a second e2e run cleaning up leftovers)
/// must never delete or overwrite a copy the other one is still using.
pub(crate) fn lock_name(name: &str) -> Result<Option<std::fs::File>> {
    std::fs::create_dir_all(nodes_dir())
        .with_context(|| format!("cannot create {}", nodes_dir().display()))?;
    let path = nodes_dir().join(format!("{name}.lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock on a valid fd has no memory-safety preconditions.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(Some(file));
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(None);
    }
    Err(err).with_context(|| format!("cannot lock {}", path.display()))
}

impl Node {
    /// A fresh copy of `pristine` named `name`, provisioned with the local Ignition config.
    pub fn create(name: &str, pristine: &Path, agent: &Path, extras: &Extras) -> Result<Node> {
        let lock = lock_name(name)?.with_context(|| {
            format!("node {name} is in use by another `cargo xtask` process (it holds {name}.lock)")
        })?;
        if Node::running(name)?.is_some_and(|n| n.nspawn_pid.is_some()) {
            bail!("node {name} is running (booted by another `cargo xtask` process): remove it first");
        }
        let dir = nodes_dir().join(name);
        let work = nodes_dir().join(format!("{name}.work"));
        let log = nodes_dir().join(format!("{name}.log"));
        for old in [&dir, &work] {
            if old.exists() {
                std::fs::remove_dir_all(old)
                    .with_context(|| format!("cannot remove the old {}", old.display()))?;
            }
        }
        let _ = std::fs::remove_file(&log);
        std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
        let node = Node {
            name: name.to_string(),
            dir: dir.clone(),
            log,
            nspawn: None,
            nspawn_pid: None,
            detached: false,
            boot_started_us: 0,
            boot_started: None,
            _lock: Some(lock),
        };
        let t = Instant::now();
        host::run(host::cmd("cp", ["-a", "--reflink=auto"]).arg(pristine).arg(&dir))
            .context("copying the pristine tree failed")?;
        host::write(dir.join("etc/machine-id"), format!("{}\n", random_hex(16)?))?;
        host::write(dir.join("etc/hostname"), format!("{name}\n"))?;
        let copied = t.elapsed();
        let ign = ignition::render_local(agent, extras, &work)?;
        let rendered = t.elapsed() - copied;
        apply_ignition(&dir, &ign, &work)?;
        first_boot_presets(&dir)?;
        eprintln!(
            "    node {name}: tree copied in {:.1} s, Ignition config rendered in {:.1} s, applied in {:.1} s",
            copied.as_secs_f64(),
            rendered.as_secs_f64(),
            (t.elapsed() - copied - rendered).as_secs_f64()
        );
        Ok(node)
    }

    /// A handle on the running detached node `name` (from `cargo xtask node`), if any.
    pub fn running(name: &str) -> Result<Option<Node>> {
        let pid_file = nodes_dir().join(format!("{name}.pid"));
        let Ok(text) = std::fs::read_to_string(&pid_file) else { return Ok(None) };
        let pid: i32 = text.trim().parse().with_context(|| format!("{} is not a PID", pid_file.display()))?;
        let dir = nodes_dir().join(name);
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let alive = String::from_utf8_lossy(&cmdline).contains(&*dir.to_string_lossy()) && !is_zombie(pid);
        let node = Node {
            name: name.to_string(),
            dir,
            log: nodes_dir().join(format!("{name}.log")),
            nspawn: None,
            nspawn_pid: alive.then_some(pid),
            detached: true,
            boot_started_us: 0,
            boot_started: None,
            _lock: None,
        };
        Ok(Some(node))
    }

    /// A handle on node `name` that is not running (for deleting its files).
    fn running_or_stopped(name: &str) -> Node {
        Node {
            name: name.to_string(),
            dir: nodes_dir().join(name),
            log: nodes_dir().join(format!("{name}.log")),
            nspawn: None,
            nspawn_pid: None,
            detached: true,
            boot_started_us: 0,
            boot_started: None,
            _lock: None,
        }
    }

    /// Boots the tree with systemd-nspawn (flags from shared/notes/test-environments.md).
    /// `detach` starts it in its own session so that it outlives this process.
    pub fn boot(&mut self, detach: bool) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        writeln!(&log, "===== boot at {} =====", unix_time())?;
        let mut cmd = Command::new("systemd-nspawn");
        cmd.arg("-D")
            .arg(&self.dir)
            .args([
                "--register=no",
                "--keep-unit",
                "--private-network",
                "--system-call-filter=@keyring",
                "--console=read-only",
                &format!("--machine={}", self.name),
                "-b",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if tree::has_fcos_layout(&self.dir) {
            // ostree's /usr is read-only; what FCOS writes lives under /var.
            cmd.arg(format!("--bind-ro={}:/usr", self.dir.join("usr").display()));
        }
        // Its own cgroup, so that nspawn's `payload` (where the node's systemd builds its tree)
        // is the node's alone: see [`own_cgroups`].
        let procs = own_cgroups(&self.name);
        // SAFETY: only async-signal-safe calls (open, write, close, setsid) on data prepared
        // before the fork; they only affect the child.
        unsafe {
            cmd.pre_exec(move || {
                for path in &procs {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd >= 0 {
                        libc::write(fd, b"0".as_ptr().cast(), 1);
                        libc::close(fd);
                    }
                }
                if detach {
                    libc::setsid();
                }
                Ok(())
            });
        }
        self.boot_started_us = monotonic_us();
        self.boot_started = Some(Instant::now());
        let child = cmd.spawn().context("cannot start systemd-nspawn")?;
        self.nspawn_pid = Some(child.id() as i32);
        self.detached = detach;
        // Always recorded, so that a later run can clean up after an interrupted one.
        host::write(nodes_dir().join(format!("{}.pid", self.name)), format!("{}\n", child.id()))?;
        self.nspawn = Some(child);
        Ok(())
    }

    /// Lets this node outlive the handle (the `cargo xtask node` case).
    pub fn detach(mut self) {
        self.detached = true;
        // The nspawn process is left running; forget the Child without waiting for it.
        if let Some(child) = self.nspawn.take() {
            std::mem::forget(child);
        }
    }

    pub fn is_running(&mut self) -> bool {
        if let Some(child) = self.nspawn.as_mut() {
            return matches!(child.try_wait(), Ok(None));
        }
        self.nspawn_pid.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid))
    }

    /// The host PID of the node's PID 1 (systemd), the nspawn child that runs /sbin/init.
    pub fn leader(&mut self) -> Result<i32> {
        let pid = self.nspawn_pid.ok_or_else(|| anyhow!("node {} is not running", self.name))?;
        if !self.is_running() {
            bail!("node {}: systemd-nspawn has exited{}", self.name, self.log_tail_note());
        }
        let mut pending = vec![pid];
        while let Some(p) = pending.pop() {
            for child in children(p) {
                let comm = std::fs::read_to_string(format!("/proc/{child}/comm")).unwrap_or_default();
                let ns_pid = std::fs::read_to_string(format!("/proc/{child}/status"))
                    .unwrap_or_default()
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("NSpid:")
                            .map(|v| v.split_whitespace().last().unwrap_or("").to_string())
                    });
                if ns_pid.as_deref() == Some("1") && comm.trim() == "systemd" {
                    return Ok(child);
                }
                pending.push(child);
            }
        }
        bail!("node {}: its systemd is not up yet", self.name)
    }

    /// `systemd-run` inside the node, entered through the namespaces of its PID 1, so that the
    /// command runs as one of the node's own services (nspawn's seccomp filter and capabilities).
    /// Gives up (and kills the client) after [`EXEC_TIMEOUT`].
    pub fn exec(&mut self, argv: &[&str]) -> Result<Output> {
        let leader = self.leader()?;
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &leader.to_string(), "-m", "-u", "-i", "-n", "-p", "--"])
            .args(["systemd-run", "--quiet", "--wait", "--pipe", "--collect", "--service-type=exec", "--"])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().with_context(|| format!("cannot start `{}`", host::show(&cmd)))?;
        let pid = child.id() as i32;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(EXEC_TIMEOUT) {
            Ok(out) => Ok(out?),
            Err(_) => {
                // SAFETY: kill has no memory-safety preconditions; pid is our unreaped child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                bail!("on node {}: `{}` did not finish within {EXEC_TIMEOUT:?}", self.name, argv.join(" "))
            }
        }
    }

    /// `exec` that must succeed; returns stdout.
    pub fn run(&mut self, argv: &[&str]) -> Result<String> {
        let out = self.exec(argv)?;
        if !out.status.success() {
            bail!(
                "on node {}: `{}` failed ({}):\n{}{}",
                self.name,
                argv.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A login shell of `core` (what an SSH session of GitLab Runner gets) running `script`.
    pub fn as_core(&mut self, script: &str) -> Result<Output> {
        self.exec(&["runuser", "-l", "core", "-c", script])
    }

    /// `as_core` that must succeed; returns stdout.
    pub fn run_as_core(&mut self, script: &str) -> Result<String> {
        let out = self.as_core(script)?;
        if !out.status.success() {
            bail!(
                "on node {} as core: `{script}` failed ({}):\n{}{}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `GET path` on `port` of the node's own 127.0.0.1, from inside its network namespace.
    pub fn http_get(&mut self, port: u16, path: &str) -> Result<(u16, String)> {
        let leader = self.leader()?;
        let path = path.to_string();
        let result = std::thread::spawn(move || -> Result<(u16, String)> {
            enter_netns(leader)?;
            get_local(port, &path)
        })
        .join()
        .map_err(|_| anyhow!("the HTTP probe thread panicked"))?;
        result
    }

    /// `/readyz` as (ready, JSON body); connection errors are `Err`.
    pub fn readyz(&mut self) -> Result<(bool, serde_json::Value)> {
        let (status, body) = self.http_get(AGENT_PORT, "/readyz")?;
        let json: serde_json::Value = serde_json::from_str(&body)
            .with_context(|| format!("/readyz did not answer JSON ({status}): {body}"))?;
        match status {
            200 => Ok((true, json)),
            503 => Ok((false, json)),
            other => bail!("/readyz answered {other}: {body}"),
        }
    }

    /// Polls `/readyz` every `interval` until it answers `want`; returns when it first did.
    pub fn wait_readyz(
        &mut self,
        want: bool,
        timeout: Duration,
        interval: Duration,
    ) -> Result<(Instant, serde_json::Value)> {
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            match self.readyz() {
                Ok((ready, json)) if ready == want => return Ok((Instant::now(), json)),
                Ok((_, json)) => last = json.to_string(),
                Err(e) => {
                    if !self.is_running() {
                        bail!("node {} stopped while waiting for /readyz{}", self.name, self.log_tail_note());
                    }
                    last = format!("{e:#}");
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "node {}: /readyz did not become {} within {:?}; last: {last}",
                    self.name,
                    if want { "200" } else { "503" },
                    timeout
                );
            }
            std::thread::sleep(interval);
        }
    }

    /// Waits until `systemctl` inside answers (the node's systemd accepts jobs).
    pub fn wait_systemd(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(leader) = self.leader() {
                let out = host::capture(
                    Command::new("nsenter")
                        .args(["-t", &leader.to_string(), "-m", "-u", "-i", "-n", "-p", "--"])
                        .args(["systemctl", "is-system-running"]),
                );
                if let Ok(out) = out {
                    let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
                    if matches!(state.as_str(), "starting" | "running" | "degraded") {
                        return Ok(());
                    }
                }
            } else if !self.is_running() {
                bail!("node {} stopped while booting{}", self.name, self.log_tail_note());
            }
            if Instant::now() >= deadline {
                bail!(
                    "node {}: systemd did not come up within {timeout:?}{}",
                    self.name,
                    self.log_tail_note()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Powers the node off (SIGRTMIN+4 to its systemd) and waits; kills it after `timeout`.
    pub fn poweroff(&mut self, timeout: Duration) -> Result<()> {
        if !self.is_running() {
            self.reap();
            return Ok(());
        }
        if let Ok(leader) = self.leader() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(leader, libc::SIGRTMIN() + 4) };
        }
        let deadline = Instant::now() + timeout;
        while self.is_running() {
            if Instant::now() >= deadline {
                eprintln!("warning: node {} did not power off within {timeout:?}: killing it", self.name);
                self.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.reap();
        Ok(())
    }

    /// SIGKILL to the node's PID 1 (takes its whole PID namespace) and to nspawn.
    pub fn kill(&mut self) {
        if let Ok(leader) = self.leader() {
            // SAFETY: as above.
            unsafe { libc::kill(leader, libc::SIGKILL) };
        }
        if let Some(pid) = self.nspawn_pid {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.is_running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn reap(&mut self) {
        if let Some(mut child) = self.nspawn.take() {
            let _ = child.wait();
        }
        self.nspawn_pid = None;
        remove_cgroups(&self.name);
    }

    /// Powers off (kill on timeout) and deletes the copy, its work files and pid file.
    pub fn destroy(&mut self) -> Result<()> {
        let t = Instant::now();
        self.poweroff(Duration::from_secs(20))?;
        let powered_off = t.elapsed();
        for path in [self.dir.clone(), nodes_dir().join(format!("{}.work", self.name))] {
            delete_in_background(&path)?;
        }
        let _ = std::fs::remove_file(nodes_dir().join(format!("{}.pid", self.name)));
        self.detached = true;
        eprintln!("    node {}: powered off in {:.1} s", self.name, powered_off.as_secs_f64());
        Ok(())
    }

    /// The last lines of the console log, for failures.
    pub fn log_tail(&self, lines: usize) -> String {
        file_tail(&self.log, lines)
    }

    fn log_tail_note(&self) -> String {
        format!("; last console lines ({}):\n{}", self.log.display(), self.log_tail(25))
    }

    /// A node path inside the copy, seen from the host.
    pub fn path(&self, absolute: &str) -> PathBuf {
        self.dir.join(absolute.trim_start_matches('/'))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if !self.detached {
            if let Err(e) = self.destroy() {
                eprintln!("warning: cleaning up node {}: {e:#}", self.name);
            }
        }
    }
}

/// The cgroup hierarchies a node's systemd manages under this host's nspawn (hybrid: the named
/// systemd one and the unified one; the controllers stay read-only inside).
const CGROUP_MOUNTS: &[&str] = &["/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified"];

/// This process's cgroup in the hierarchy mounted at `mount` (from /proc/self/cgroup).
fn own_cgroup(mount: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let want = if mount.ends_with("/unified") { "" } else { "name=systemd" };
    text.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        (controllers == want).then(|| path.to_string())
    })
}

/// Where node `name`'s cgroups go: `xtask-node-<name>` under this process's cgroup, in each
/// hierarchy of [`CGROUP_MOUNTS`] that is mounted.
fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    CGROUP_MOUNTS
        .iter()
        .filter(|m| Path::new(m).join("cgroup.procs").exists())
        .filter_map(|m| {
            let own = own_cgroup(m)?;
            Some(Path::new(m).join(own.trim_start_matches('/')).join(format!("xtask-node-{name}")))
        })
        .collect()
}

/// Makes node `name`'s own cgroups and returns their `cgroup.procs` files, for the nspawn child
/// to move itself into before exec.
///
/// With no systemd on the host, `--keep-unit` leaves nspawn in its caller's cgroup, and nspawn
/// puts the node into `<that cgroup>/payload`: every node booted from the same cgroup would
/// share one `payload`, so the nodes' systemds would build the same `system.slice` and
/// `user.slice/user-1000.slice/user@1000.service` cgroups. A node then sees another node's
/// processes in its units' cgroups (which it cannot kill, they are in another PID namespace):
/// stopping user@1000.service waits its whole timeout ("Processes still around after final
/// SIGKILL") and poweroff takes minutes. A node's own cgroup avoids that.
fn own_cgroups(name: &str) -> Vec<std::ffi::CString> {
    remove_cgroups(name);
    cgroup_dirs(name)
        .into_iter()
        .filter(|dir| match std::fs::create_dir_all(dir) {
            Ok(()) => true,
            Err(e) => {
                eprintln!(
                    "warning: cannot create the cgroup {}: {e}; the node shares its caller's",
                    dir.display()
                );
                false
            }
        })
        .filter_map(|dir| {
            std::ffi::CString::new(dir.join("cgroup.procs").into_os_string().into_encoded_bytes()).ok()
        })
        .collect()
}

/// Removes node `name`'s cgroups, deepest first. Right after a kill they may still hold exiting
/// processes for a moment (rmdir says EBUSY): retried for up to 2 s.
fn remove_cgroups(name: &str) {
    fn remove_tree(dir: &Path) -> bool {
        let mut ok = true;
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    ok &= remove_tree(&entry.path());
                }
            }
        }
        ok && (std::fs::remove_dir(dir).is_ok() || !dir.exists())
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    for dir in cgroup_dirs(name) {
        while dir.exists() && !remove_tree(&dir) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Deletions of node copies still running (a copy is some 20,000 files).
static DELETIONS: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>> = std::sync::Mutex::new(Vec::new());

fn trash_dir() -> PathBuf {
    nodes_dir().join(".trash")
}

/// Moves `path` aside at once (so its name can be reused) and deletes it in a thread;
/// [`finish_deletions`] waits for every such thread.
fn delete_in_background(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(trash_dir())
        .with_context(|| format!("cannot create {}", trash_dir().display()))?;
    let aside =
        trash_dir().join(format!("{}-{}", path.file_name().unwrap().to_string_lossy(), random_hex(4)?));
    std::fs::rename(path, &aside).with_context(|| format!("cannot move {} aside", path.display()))?;
    let handle = std::thread::spawn(move || {
        if let Err(e) = std::fs::remove_dir_all(&aside) {
            eprintln!("warning: cannot delete {}: {e}", aside.display());
        }
    });
    DELETIONS.lock().unwrap().push(handle);
    Ok(())
}

/// Waits until every node copy moved aside is deleted.
pub fn finish_deletions() {
    let handles: Vec<_> = DELETIONS.lock().unwrap().drain(..).collect();
    for handle in handles {
        let _ = handle.join();
    }
}

/// Runs the real Ignition binary on the copy: fetch-offline, then files with `-root`.
fn apply_ignition(dir: &Path, ign: &Path, work: &Path) -> Result<()> {
    // The files stage ends with an SELinux relabel: give it a config to read and a no-op setfiles.
    let selinux_config = dir.join("etc/selinux/config");
    let made_selinux_config = !selinux_config.exists();
    if made_selinux_config {
        host::write(&selinux_config, "SELINUX=disabled\nSELINUXTYPE=targeted\n")?;
    }
    let shims = work.join("shims");
    host::write(shims.join("setfiles"), "#!/bin/sh\n# Off SELinux there is nothing to relabel.\nexit 0\n")?;
    std::fs::set_permissions(shims.join("setfiles"), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let path = format!(
        "{}:{}",
        shims.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
    );
    let state = work.join("ignition-state");
    std::fs::create_dir_all(&state)?;
    let common = |cmd: &mut Command| {
        cmd.arg("-config-cache")
            .arg(state.join("ignition.json"))
            .arg("-neednet")
            .arg(state.join("neednet"))
            .arg("-state-file")
            .arg(state.join("state"))
            .arg("-log-to-stdout")
            .env("PATH", &path);
    };
    let log = work.join("ignition.log");
    let mut fetch = host::cmd(host::IGNITION_BIN, ["-platform", "file", "-stage", "fetch-offline"]);
    common(&mut fetch);
    fetch.env("IGNITION_CONFIG_FILE", ign);
    host::run_logged(&mut fetch, &log).context("Ignition fetch-offline stage failed")?;
    let mut files = host::cmd(host::IGNITION_BIN, ["-platform", "file", "-stage", "files", "-root"]);
    files.arg(dir);
    common(&mut files);
    host::run_logged(&mut files, &log).context("Ignition files stage failed")?;
    if made_selinux_config {
        std::fs::remove_file(&selinux_config)?;
        let _ = std::fs::remove_dir(dir.join("etc/selinux"));
    }
    Ok(())
}

/// Applies the presets Ignition wrote (`enabled: true`), as FCOS's first boot does.
fn first_boot_presets(dir: &Path) -> Result<()> {
    let preset = dir.join("etc/systemd/system-preset/20-ignition.preset");
    let text = host::read_string(&preset)?;
    let units: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("enable ").or_else(|| l.strip_prefix("disable ")))
        .map(str::trim)
        .collect();
    if units.is_empty() {
        bail!("{} names no unit", preset.display());
    }
    host::run(host::cmd("systemctl", ["--root".as_ref(), dir.as_os_str(), "preset".as_ref()]).args(&units))
}

fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let text = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            out.extend(text.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    out
}

fn is_zombie(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')).unwrap_or(true)
}

/// `GET path` on 127.0.0.1:`port` of the calling thread's network namespace.
pub fn get_local(port: u16, path: &str) -> Result<(u16, String)> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(
        format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_http(&raw)
}

/// Removes nodes named `prefix*` that an interrupted earlier run left (found by their pid files).
pub fn cleanup_leftovers(prefix: &str) -> Result<()> {
    // Copies moved aside by an earlier run whose deletion threads did not finish.
    if let Ok(entries) = std::fs::read_dir(trash_dir()) {
        for entry in entries.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(prefix)) {
            // Another run's deletion thread may be removing the same copy: not an error.
            if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                eprintln!("warning: cannot delete {}: {e}", entry.path().display());
            }
        }
    }
    let Ok(entries) = std::fs::read_dir(nodes_dir()) else { return Ok(()) };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().is_dir() || e.file_name().to_string_lossy().ends_with(".pid"))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .map(|n| n.split('.').next().unwrap_or_default().to_string())
        .collect();
    names.sort();
    names.dedup();
    for name in names {
        let Some(_lock) = lock_name(&name)? else {
            eprintln!("==> leaving node {name} alone: another `cargo xtask` process is using it");
            continue;
        };
        eprintln!("==> removing the leftover node {name}");
        match Node::running(&name)? {
            Some(mut node) => node.destroy()?,
            None => {
                let mut node = Node::running_or_stopped(&name);
                node.destroy()?;
            }
        }
    }
    Ok(())
}

/// Moves the calling thread into the network namespace of `pid`.
pub fn enter_netns(pid: i32) -> Result<()> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
        .with_context(|| format!("cannot open the netns of {pid}"))?;
    // SAFETY: setns on a valid fd affects only this thread's network namespace.
    let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setns into the node's network namespace");
    }
    Ok(())
}

/// Status code and body of an HTTP/1.x response.
pub(crate) fn parse_http(raw: &[u8]) -> Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) =
        text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("truncated HTTP response: {text:?}"))?;
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no HTTP status line in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// Host CLOCK_MONOTONIC in microseconds: the same clock as systemd's `*TimestampMonotonic`.
pub fn monotonic_us() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

fn unix_time() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Everything a node command needs: host packages, the agent binary, the pristine tree of
/// each OS in `oses` (in that order).
pub fn prepare(oses: &[Os]) -> Result<(PathBuf, Vec<(Os, PathBuf)>)> {
    host::require_root("cargo xtask node")?;
    host::ensure_packages(host::NODE_HOST_PACKAGES)?;
    // debootstrap mostly waits on the network and dpkg: build the agent meanwhile.
    std::thread::scope(|s| {
        let trees = s.spawn(|| tree::ensure_all(oses));
        let agent = host::build_agent();
        let trees = trees.join().map_err(|_| anyhow!("building the node trees panicked"))?;
        Ok((agent?, trees?))
    })
}

/// The last `lines` lines of a file (a node's console log), or why it cannot be read.
pub fn file_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("(cannot read: {e})"));
    let tail: Vec<&str> = text.lines().rev().take(lines).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// A node name of a test run: `<kind>-<os>-<n>` (e.g. `e2e-trixie-3`), so that the nodes of
/// both suites never share a name; `cleanup_leftovers("<kind>-")` finds them all.
pub fn test_node_name(kind: &str, os: Os, n: usize) -> String {
    format!("{kind}-{}-{n}", os.name())
}

/// Imports the busybox test image as core (no registry is reachable).
pub fn import_test_image(node: &mut Node) -> Result<()> {
    node.run_as_core(&format!("podman import --quiet {} localhost/busybox >/dev/null", tree::IMAGE_TAR))
        .context("importing the test image as core")?;
    Ok(())
}

const DEV_NODE: &str = "dev";

/// `cargo xtask node [--os OS]`: a fresh node of `os` left running, shown like an operator sees
/// FCOS. There is one dev node whatever its OS: a new one replaces the running one.
pub fn cmd_node(os: Os) -> Result<()> {
    let (agent, trees) = prepare(&[os])?;
    let pristine =
        trees.into_iter().next().map(|(_, tree)| tree).expect("prepare returns the tree asked for");
    if let Some(mut old) = Node::running(DEV_NODE)? {
        eprintln!("==> replacing the running node {DEV_NODE}");
        old.destroy()?;
        finish_deletions();
    }
    eprintln!("==> provisioning a fresh node with the real Ignition (local variant, agent embedded)");
    let mut node = Node::create(DEV_NODE, &pristine, &agent, &Extras::default())?;
    eprintln!("==> booting it with systemd-nspawn (console log: {})", node.log.display());
    node.boot(true)?;
    let shown = show_node(&mut node);
    if let Err(e) = shown {
        eprintln!(
            "the node is left running for a look: cargo xtask node --shell; remove it: cargo xtask node --rm"
        );
        node.detach();
        return Err(e);
    }
    println!();
    println!("The {os} node `{DEV_NODE}` is running (root file system {}).", node.dir.display());
    println!("  shell as root:   cargo xtask node --shell     (then `runuser -l core` for the runner user)");
    println!("  console log:     {}", node.log.display());
    println!("  stop and delete: cargo xtask node --rm");
    node.detach();
    Ok(())
}

/// What the operator sees: unit status, /readyz, a container through the socket, port 80.
fn show_node(node: &mut Node) -> Result<()> {
    node.wait_systemd(Duration::from_secs(60))?;
    let booted = node.boot_started.unwrap().elapsed();
    let (ready_at, _) = node.wait_readyz(true, Duration::from_secs(120), Duration::from_millis(50))?;
    let ready = ready_at - node.boot_started.unwrap();
    println!(
        "\n{} booted (systemd answering) after {:.2} s; agent ready after {:.2} s",
        os_release(node),
        booted.as_secs_f64(),
        ready.as_secs_f64()
    );
    println!("\n$ systemctl status executor-agent");
    let status = node.exec(&["systemctl", "--no-pager", "--lines=15", "status", "executor-agent"])?;
    print!("{}", String::from_utf8_lossy(&status.stdout));
    println!("\n$ curl -s http://127.0.0.1:{AGENT_PORT}/readyz");
    let (_, body) = node.http_get(AGENT_PORT, "/readyz")?;
    match serde_json::from_str::<serde_json::Value>(&body) {
        Ok(v) => println!("{}", serde_json::to_string_pretty(&v)?),
        Err(_) => println!("{body}"),
    }
    import_test_image(node)?;
    println!("\n$ runuser -l core      # the runner user, as GitLab Runner's SSH connector logs in");
    println!("$ export DOCKER_HOST=unix://{PODMAN_SOCK}");
    let run = "docker run --rm localhost/busybox echo hello from a rootless container";
    println!("$ {run}");
    print!("{}", node.run_as_core(&format!("DOCKER_HOST=unix://{PODMAN_SOCK} {run}"))?);
    let web = format!("docker run -d --name web -p 80:8000 localhost/busybox {HTTPD}");
    println!("$ {web}");
    print!("{}", node.run_as_core(&format!("DOCKER_HOST=unix://{PODMAN_SOCK} {web}"))?);
    println!("$ curl -s http://127.0.0.1:80/   # port 80 as core works only because of the agent's sysctl");
    let (code, body) = wait_http(node, 80, "/index.html", Duration::from_secs(10))?;
    print!("{code} {body}");
    Ok(())
}

/// The node's PRETTY_NAME from /etc/os-release (e.g. "Debian GNU/Linux 13 (trixie)").
pub fn os_release(node: &Node) -> String {
    let text = std::fs::read_to_string(node.path("/etc/os-release")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "the node".to_string())
}

/// Retries a GET until it answers 200 (a just-started container may need a moment).
pub fn wait_http(node: &mut Node, port: u16, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let deadline = Instant::now() + timeout;
    loop {
        let result = node.http_get(port, path);
        match result {
            Ok((200, body)) => return Ok((200, body)),
            other if Instant::now() >= deadline => {
                bail!("GET :{port}{path} on node {} did not answer 200: {other:?}", node.name)
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// `cargo xtask node --shell`: a root login shell on the running node, as a node service.
pub fn cmd_shell() -> Result<()> {
    host::require_root("cargo xtask node --shell")?;
    let mut node = Node::running(DEV_NODE)?
        .filter(|n| n.nspawn_pid.is_some())
        .context("no node is running: start one with `cargo xtask node`")?;
    let leader = node.leader()?;
    let status = Command::new("nsenter")
        .args(["-t", &leader.to_string(), "-m", "-u", "-i", "-n", "-p", "--"])
        .args([
            "systemd-run",
            "--quiet",
            "--pty",
            "--wait",
            "--collect",
            "--service-type=exec",
            "-E",
            "TERM=xterm",
            "--",
            "/bin/bash",
            "-l",
        ])
        .status()
        .context("cannot start nsenter")?;
    node.detached = true;
    if !status.success() {
        bail!("the shell ended with {status}");
    }
    Ok(())
}

/// `cargo xtask node --rm`: power off (kill on timeout) and delete the node.
pub fn cmd_rm() -> Result<()> {
    host::require_root("cargo xtask node --rm")?;
    match Node::running(DEV_NODE)? {
        Some(mut node) => {
            node.destroy()?;
            finish_deletions();
            println!("node {DEV_NODE} stopped and deleted");
        }
        None => println!("no node {DEV_NODE} to remove"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_http_responses() {
        let raw =
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\r\n{\"ready\":false}";
        assert_eq!(super::parse_http(raw).unwrap(), (503, "{\"ready\":false}".to_string()));
        assert!(super::parse_http(b"garbage").is_err());
    }
}
