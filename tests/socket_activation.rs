//! Socket activation of the health endpoint as systemd does it: a listening socket on fd 3,
//! `LISTEN_PID` set to the process that gets it (`sh -c 'LISTEN_PID=$$ exec ...'`, which is
//! what systemd-socket-activate does), `LISTEN_FDS=1`. The test process plays systemd: it
//! holds the socket while agents come and go.
//!
//! The fd-level checks run in a child: this test binary again, in `child` mode, so that
//! taking fd 3 and clearing the environment happen in a process of their own.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const CHILD_MODE: &str = "EXECUTOR_AGENT_TEST_LISTEN_CHILD";

/// `program args...` with `fd` as its fd 3 and LISTEN_PID/LISTEN_FDS for it.
fn activated(fd: Option<i32>, listen_pid: Option<&str>, program: &Path, args: &[&str]) -> Command {
    let script = match listen_pid {
        Some(pid) => format!("LISTEN_PID={pid} exec \"$@\""),
        None => "LISTEN_PID=$$ exec \"$@\"".to_string(),
    };
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(script).arg("sh").arg(program).args(args);
    cmd.env("LISTEN_FDS", "1").env("LISTEN_FDNAMES", "executor-agent.socket").env_remove("RUST_LOG");
    if let Some(fd) = fd {
        // SAFETY: dup2 and fcntl are async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let rc = if fd == 3 { libc::fcntl(3, libc::F_SETFD, 0) } else { libc::dup2(fd, 3) };
                if rc < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd
}

/// This test binary in child mode.
fn spawn_child(mode: &str, fd: Option<i32>, listen_pid: Option<&str>) -> Command {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = activated(fd, listen_pid, &exe, &["--exact", "child", "--nocapture", "--test-threads=1"]);
    cmd.env(CHILD_MODE, mode);
    cmd
}

/// The `child: KEY=VALUE` lines a child printed.
fn reported(out: &Output) -> Vec<(String, String)> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("child: "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn value<'a>(report: &'a [(String, String)], key: &str) -> &'a str {
    report
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {key} in {report:?}"))
}

/// The child side: adopt what was passed, say what it saw, serve one connection.
#[test]
fn child() {
    let Ok(mode) = std::env::var(CHILD_MODE) else { return };
    executor_agent::listen::adopt();
    // libtest has printed "test child ... " without a newline.
    println!();
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        println!("child: {v}={}", std::env::var(v).unwrap_or_else(|_| "<unset>".into()));
    }
    // SAFETY: F_GETFD on a descriptor number.
    let flags = unsafe { libc::fcntl(3, libc::F_GETFD) };
    println!("child: fd3_cloexec={}", flags >= 0 && flags & libc::FD_CLOEXEC != 0);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let configured: SocketAddr = "127.0.0.1:0".parse().unwrap();
        match executor_agent::listen::http_listener(configured).await {
            Err(e) => println!("child: error={e:#}"),
            Ok(listener) => {
                println!("child: addr={}", listener.local_addr().unwrap());
                println!("child: fd={}", listener.as_raw_fd());
                if mode == "serve" {
                    let (mut stream, _) = listener.accept().await.unwrap();
                    use tokio::io::AsyncWriteExt;
                    stream.write_all(format!("served by {}\n", std::process::id()).as_bytes()).await.unwrap();
                }
            }
        }
    });
}

#[test]
fn the_passed_listener_is_taken_and_the_variables_cleared() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut proc =
        spawn_child("serve", Some(listener.as_raw_fd()), None).stdout(Stdio::piped()).spawn().unwrap();
    let pid = proc.id();
    // The child serves on the socket this process made, not on one of its own.
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, format!("served by {pid}\n"));
    let out = wait_output(&mut proc);
    assert!(out.status.success(), "{out:?}");
    let report = reported(&out);
    assert_eq!(value(&report, "addr"), addr.to_string());
    assert_eq!(value(&report, "fd"), "3");
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        assert_eq!(value(&report, v), "<unset>", "{v} must not reach the agent's children");
    }
    assert_eq!(value(&report, "fd3_cloexec"), "true", "helpers run as the runner user must not inherit it");
}

#[test]
fn variables_for_another_process_are_ignored_and_cleared() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let out = spawn_child("bind", Some(listener.as_raw_fd()), Some("1")).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let report = reported(&out);
    // It bound http.listen itself: a port of its own, not the inherited socket.
    assert_ne!(value(&report, "addr"), listener.local_addr().unwrap().to_string());
    assert_ne!(value(&report, "fd"), "3");
    assert_eq!(value(&report, "LISTEN_PID"), "<unset>");
    assert_eq!(value(&report, "LISTEN_FDS"), "<unset>");
}

#[test]
fn a_passed_descriptor_that_is_no_tcp_listener_is_an_error() {
    // A bound but not listening socket.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let out = spawn_child("bind", Some(socket.as_raw_fd()), None).output().unwrap();
    let report = reported(&out);
    let error = value(&report, "error");
    assert!(error.contains("no listening TCP socket passed"), "{error}");
    // No descriptor at all, though LISTEN_FDS says one.
    let out = spawn_child("bind", None, None).output().unwrap();
    let error = value(&reported(&out), "error").to_string();
    assert!(error.contains("descriptor 3 is not open"), "{error}");
}

fn wait_output(proc: &mut Child) -> Output {
    let deadline = Instant::now() + Duration::from_secs(30);
    while proc.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "child did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut stdout = Vec::new();
    if let Some(mut s) = proc.stdout.take() {
        s.read_to_end(&mut stdout).unwrap();
    }
    let mut stderr = Vec::new();
    if let Some(mut s) = proc.stderr.take() {
        s.read_to_end(&mut stderr).unwrap();
    }
    Output { status: proc.wait().unwrap(), stdout, stderr }
}

// ------------------------------------------------------------------------------------------------
// The real agent across a restart.

/// A node tree for `executor-agent --root` (file steps only) whose http.listen is `addr`.
fn tree(addr: SocketAddr) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    std::fs::create_dir_all(etc.join("executor-agent")).unwrap();
    std::fs::write(
        etc.join("passwd"),
        "root:x:0:0::/root:/bin/sh\ncore:x:1000:1000::/var/home/core:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(etc.join("group"), "root:x:0:\ncore:x:1000:\n").unwrap();
    std::fs::write(etc.join("subuid"), "core:100000:65536\n").unwrap();
    std::fs::write(etc.join("subgid"), "core:100000:65536\n").unwrap();
    std::fs::write(etc.join("executor-agent/config.toml"), format!("[http]\nlisten = \"{addr}\"\n")).unwrap();
    dir
}

struct Agent {
    child: Child,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Agent {
    fn start(fd: i32, root: &Path) -> Agent {
        let agent = Path::new(env!("CARGO_BIN_EXE_executor-agent"));
        let mut child = activated(Some(fd), None, agent, &["--root", root.to_str().unwrap(), "run"])
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Agent { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGTERM, as `systemctl stop/restart` sends; panics unless the exit was clean as systemd
    /// counts it (0, or death by SIGTERM before the agent handles it), with the status and log.
    fn stop(mut self) {
        // SAFETY: kill(2) on the child's PID, which has not been reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                use std::os::unix::process::ExitStatusExt;
                assert!(
                    status.success() || status.signal() == Some(libc::SIGTERM),
                    "the agent's exit on SIGTERM was not clean: {status}\n{}",
                    self.log()
                );
                return;
            }
            assert!(Instant::now() < deadline, "the agent did not stop on SIGTERM:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The whole answer to a GET; empty when the connection is refused.
fn get(addr: SocketAddr, path: &str) -> String {
    let Ok(mut stream) = TcpStream::connect(addr) else { return String::new() };
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

fn await_answer(addr: SocketAddr, agent: &Agent) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !get(addr, "/healthz").starts_with("HTTP/1.1 200") {
        assert!(Instant::now() < deadline, "the agent never answered:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_probe_during_a_restart_waits_for_the_next_agent_instead_of_being_refused() {
    // The "systemd" side: bound and listening before any agent, and after each one.
    let socket = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let root = tree(addr);
    let first = Agent::start(socket.as_raw_fd(), root.path());
    await_answer(addr, &first);
    let log = first.log();
    assert!(log.contains("held by executor-agent.socket (socket activation)"), "{log}");
    assert!(!log.contains("http.listen is"), "http.listen equals the socket's address: {log}");
    first.stop();

    // No agent runs: nobody else can bind the port, and a probe is queued, not refused.
    assert_eq!(
        TcpListener::bind(addr).unwrap_err().kind(),
        std::io::ErrorKind::AddrInUse,
        "the port must stay taken between agents"
    );
    let probe = std::thread::spawn(move || {
        let asked = Instant::now();
        (get(addr, "/healthz"), asked.elapsed())
    });
    let gap = Duration::from_millis(500);
    std::thread::sleep(gap);
    let second = Agent::start(socket.as_raw_fd(), root.path());
    let (answer, waited) = probe.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}\n{}", second.log());
    assert!(answer.ends_with("ok\n"), "{answer}");
    assert!(waited >= gap, "answered after {waited:?}, before the second agent started");
    eprintln!("a probe made while no agent ran was answered after {waited:?} ({gap:?} without an agent)");
    second.stop();
}

#[test]
fn without_socket_activation_the_agent_binds_http_listen() {
    let free = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let root = tree(addr);
    let agent = Path::new(env!("CARGO_BIN_EXE_executor-agent"));
    let child = Command::new(agent)
        .args(["--root", root.path().to_str().unwrap(), "run"])
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let agent = Agent { child, log: Default::default() };
    await_answer(addr, &agent);
    agent.stop();
}
