//! Fail points in the subuid/subgid write path (`--features failpoints`, see
//! `fsutil::failpoint`): the agent SIGKILLed at each step of a write and restarted, killed
//! at random moments, and I/O errors injected at each step. Asserts the exact contents of
//! every file after each fault and after the restart.
//!
//! The writer is this test binary run again as a child (`child_writer`, which does what the
//! subids step does: `ensure` for subuid, then subgid). A fail point configured with
//! `return(stop)` makes the child SIGSTOP itself exactly there; the test sees it stopped
//! (waitpid WUNTRACED) and SIGKILLs it, so no destructor or unwinding runs.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use executor_agent::paths::Root;
use executor_agent::subid::{ensure, EnsureOutcome, IdKind, IdRange, RunnerUser};

const CHILD_ROOT: &str = "SUBID_TEST_CHILD_ROOT";

const OLD_UID: &str = "# kept\nother:100000:65536\n";
/// No final newline: the append adds one before our line.
const OLD_GID: &str = "other:100000:65536";
const STALE_BACKUP: &str = "stale backup from an earlier write\n";
const NEW_UID: &str = "# kept\nother:100000:65536\ncore:165536:65536\n";
const NEW_GID: &str = "other:100000:65536\ncore:165536:65536\n";

fn core() -> RunnerUser {
    RunnerUser { name: "core".into(), uid: 1000 }
}

/// Not a test of its own: the writer process the tests below start and kill.
#[test]
fn child_writer() {
    let Some(dir) = std::env::var_os(CHILD_ROOT) else { return };
    let root = Root::new(dir);
    // Tells sigkill_at_random_moments_loses_nothing that the writing starts now.
    println!("start");
    std::io::stdout().flush().unwrap();
    for kind in [IdKind::Uid, IdKind::Gid] {
        match ensure(&root, kind, &core(), 65536, Duration::from_secs(10)) {
            Ok(outcome) => println!("{kind:?}: {outcome:?}"),
            Err(e) => {
                eprintln!("{kind:?}: {e}");
                std::process::exit(1);
            }
        }
    }
}

fn writer(root: &Path, failpoints: Option<&str>) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["child_writer", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ROOT, root)
        .env_remove("FAILPOINTS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(spec) = failpoints {
        cmd.env("FAILPOINTS", spec);
    }
    cmd
}

/// Runs the writer to the end; it must succeed.
fn restart(root: &Path) {
    let out = writer(root, None).output().unwrap();
    assert!(out.status.success(), "restart failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("etc")).unwrap();
    fs::write(dir.path().join("etc/subuid"), OLD_UID).unwrap();
    fs::write(dir.path().join("etc/subgid"), OLD_GID).unwrap();
    fs::write(dir.path().join("etc/subuid-"), STALE_BACKUP).unwrap();
    dir
}

fn read(root: &Path, file: &str) -> Option<String> {
    fs::read(root.join("etc").join(file)).ok().map(|b| String::from_utf8(b).unwrap())
}

/// Names in etc/, with the writer's PID and temporary-file suffixes made generic.
fn etc_names(root: &Path, pid: Option<u32>) -> BTreeSet<String> {
    fs::read_dir(root.join("etc"))
        .unwrap()
        .map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            let name = match pid {
                Some(pid) => name.replace(&pid.to_string(), "PID"),
                None => name,
            };
            match name.find(".executor-agent.") {
                Some(i) => format!("{}.executor-agent.XXXXXX", &name[..i]),
                None => name,
            }
        })
        .collect()
}

/// Waits until the child stops itself at the fail point (or fails if it exits instead),
/// then SIGKILLs it.
fn kill_when_stopped(pid: Pid, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match waitpid(pid, Some(WaitPidFlag::WUNTRACED | WaitPidFlag::WNOHANG)).unwrap() {
            WaitStatus::Stopped(_, Signal::SIGSTOP) => break,
            WaitStatus::StillAlive => {
                assert!(Instant::now() < deadline, "{what}: the writer never reached the fail point");
                std::thread::sleep(Duration::from_millis(2));
            }
            other => panic!("{what}: the writer ended before the fail point: {other:?}"),
        }
    }
    kill(pid, Signal::SIGKILL).unwrap();
    assert_eq!(waitpid(pid, None).unwrap(), WaitStatus::Signaled(pid, Signal::SIGKILL, false));
}

/// Where the writer is killed, in the order a write passes them, and what each file must
/// hold right after the kill: (fail point, which hit of it, subuid, subgid, subuid-,
/// subgid-, what a kill there leaves behind in etc/).
#[allow(clippy::type_complexity)]
const KILL_POINTS: &[(&str, u32, &str, &str, Option<&str>, Option<&str>, &[&str])] = &[
    ("subid-lock-pid-written", 1, OLD_UID, OLD_GID, Some(STALE_BACKUP), None, &["subuid.PID"]),
    ("subid-after-lock", 1, OLD_UID, OLD_GID, Some(STALE_BACKUP), None, &["subuid.lock"]),
    // The backup of subuid, then subuid itself: 1st and 2nd replacement.
    (
        "fsutil-after-temp-create",
        1,
        OLD_UID,
        OLD_GID,
        Some(STALE_BACKUP),
        None,
        &["subuid.lock", ".subuid-.executor-agent.XXXXXX"],
    ),
    (
        "fsutil-after-temp-write",
        1,
        OLD_UID,
        OLD_GID,
        Some(STALE_BACKUP),
        None,
        &["subuid.lock", ".subuid-.executor-agent.XXXXXX"],
    ),
    (
        "fsutil-after-fsync",
        1,
        OLD_UID,
        OLD_GID,
        Some(STALE_BACKUP),
        None,
        &["subuid.lock", ".subuid-.executor-agent.XXXXXX"],
    ),
    ("fsutil-after-rename", 1, OLD_UID, OLD_GID, Some(OLD_UID), None, &["subuid.lock"]),
    ("subid-after-backup", 1, OLD_UID, OLD_GID, Some(OLD_UID), None, &["subuid.lock"]),
    (
        "fsutil-after-temp-create",
        2,
        OLD_UID,
        OLD_GID,
        Some(OLD_UID),
        None,
        &["subuid.lock", ".subuid.executor-agent.XXXXXX"],
    ),
    (
        "fsutil-after-temp-write",
        2,
        OLD_UID,
        OLD_GID,
        Some(OLD_UID),
        None,
        &["subuid.lock", ".subuid.executor-agent.XXXXXX"],
    ),
    (
        "fsutil-after-fsync",
        2,
        OLD_UID,
        OLD_GID,
        Some(OLD_UID),
        None,
        &["subuid.lock", ".subuid.executor-agent.XXXXXX"],
    ),
    ("fsutil-after-rename", 2, NEW_UID, OLD_GID, Some(OLD_UID), None, &["subuid.lock"]),
    ("subid-before-unlock", 1, NEW_UID, OLD_GID, Some(OLD_UID), None, &["subuid.lock"]),
    // Then subgid: its backup (3rd replacement) and the file (4th).
    ("subid-lock-pid-written", 2, NEW_UID, OLD_GID, Some(OLD_UID), None, &["subgid.PID"]),
    ("subid-after-lock", 2, NEW_UID, OLD_GID, Some(OLD_UID), None, &["subgid.lock"]),
    (
        "fsutil-after-temp-create",
        3,
        NEW_UID,
        OLD_GID,
        Some(OLD_UID),
        None,
        &["subgid.lock", ".subgid-.executor-agent.XXXXXX"],
    ),
    (
        "fsutil-after-temp-write",
        3,
        NEW_UID,
        OLD_GID,
        Some(OLD_UID),
        None,
        &["subgid.lock", ".subgid-.executor-agent.XXXXXX"],
    ),
    (
        "fsutil-after-fsync",
        3,
        NEW_UID,
        OLD_GID,
        Some(OLD_UID),
        None,
        &["subgid.lock", ".subgid-.executor-agent.XXXXXX"],
    ),
    ("fsutil-after-rename", 3, NEW_UID, OLD_GID, Some(OLD_UID), Some(OLD_GID), &["subgid.lock"]),
    ("subid-after-backup", 2, NEW_UID, OLD_GID, Some(OLD_UID), Some(OLD_GID), &["subgid.lock"]),
    (
        "fsutil-after-temp-create",
        4,
        NEW_UID,
        OLD_GID,
        Some(OLD_UID),
        Some(OLD_GID),
        &["subgid.lock", ".subgid.executor-agent.XXXXXX"],
    ),
    (
        "fsutil-after-temp-write",
        4,
        NEW_UID,
        OLD_GID,
        Some(OLD_UID),
        Some(OLD_GID),
        &["subgid.lock", ".subgid.executor-agent.XXXXXX"],
    ),
    (
        "fsutil-after-fsync",
        4,
        NEW_UID,
        OLD_GID,
        Some(OLD_UID),
        Some(OLD_GID),
        &["subgid.lock", ".subgid.executor-agent.XXXXXX"],
    ),
    ("fsutil-after-rename", 4, NEW_UID, NEW_GID, Some(OLD_UID), Some(OLD_GID), &["subgid.lock"]),
    ("subid-before-unlock", 2, NEW_UID, NEW_GID, Some(OLD_UID), Some(OLD_GID), &["subgid.lock"]),
];

fn spec(point: &str, hit: u32) -> String {
    if hit == 1 {
        format!("{point}=return(stop)")
    } else {
        format!("{point}={}*off->return(stop)", hit - 1)
    }
}

fn base_names(files: &[&str]) -> BTreeSet<String> {
    files.iter().map(|s| s.to_string()).collect()
}

#[test]
fn sigkill_at_each_step_then_restart_converges() {
    for &(point, hit, uid, gid, uid_backup, gid_backup, garbage) in KILL_POINTS {
        let what = format!("SIGKILL at {point} #{hit}");
        let dir = setup();
        let root = dir.path();
        // Reaped by kill_when_stopped's waitpid, which also sees it stop.
        #[allow(clippy::zombie_processes)]
        let child = writer(root, Some(&spec(point, hit))).spawn().unwrap();
        let pid = child.id();
        kill_when_stopped(Pid::from_raw(pid as i32), &what);

        // Whole files, exactly the old or the new contents, and the expected debris.
        assert_eq!(read(root, "subuid").as_deref(), Some(uid), "{what}: subuid");
        assert_eq!(read(root, "subgid").as_deref(), Some(gid), "{what}: subgid");
        assert_eq!(read(root, "subuid-").as_deref(), uid_backup, "{what}: subuid-");
        assert_eq!(read(root, "subgid-").as_deref(), gid_backup, "{what}: subgid-");
        let mut expected = base_names(&["subuid", "subgid", "subuid-", ".pwd.lock"]);
        if gid_backup.is_some() {
            expected.insert("subgid-".into());
        }
        expected.extend(garbage.iter().map(|g| g.to_string()));
        assert_eq!(etc_names(root, Some(pid)), expected, "{what}: debris");
        if let Some(lock) = garbage.iter().find(|g| g.ends_with(".lock")) {
            let held = fs::read(root.join("etc").join(lock)).unwrap();
            assert_eq!(held, format!("{pid}\0").as_bytes(), "{what}: the dead writer's lock");
        }

        // The restart reclaims the dead PID's lock, removes the debris and converges.
        restart(root);
        assert_eq!(read(root, "subuid").as_deref(), Some(NEW_UID), "{what}: restart");
        assert_eq!(read(root, "subgid").as_deref(), Some(NEW_GID), "{what}: restart");
        assert_eq!(read(root, "subuid-").as_deref(), Some(OLD_UID), "{what}: restart");
        assert_eq!(read(root, "subgid-").as_deref(), Some(OLD_GID), "{what}: restart");
        assert_eq!(
            etc_names(root, None),
            base_names(&["subuid", "subgid", "subuid-", "subgid-", ".pwd.lock"]),
            "{what}: after restart"
        );

        // And once converged, a further run writes nothing.
        let md = |f: &str| fs::metadata(root.join("etc").join(f)).unwrap();
        let before: Vec<(u64, SystemTime)> =
            ["subuid", "subgid"].iter().map(|f| (md(f).ino(), md(f).modified().unwrap())).collect();
        restart(root);
        let after: Vec<(u64, SystemTime)> =
            ["subuid", "subgid"].iter().map(|f| (md(f).ino(), md(f).modified().unwrap())).collect();
        assert_eq!(before, after, "{what}: a converged node was written again");
    }
}

/// A small xorshift, seeded from the clock and printed, so a failure can be replayed with
/// SUBID_KILL_SEED.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("SUBID_KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
        });
        eprintln!("SUBID_KILL_SEED={seed}");
        Rng(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// SIGKILL at random moments of a write of two 1 MiB files (no fail point: the kill lands
/// wherever it lands), then restart.
#[test]
fn sigkill_at_random_moments_loses_nothing() {
    let mut big = String::from("# one mebibyte\n");
    let mut i = 0u32;
    while big.len() < 1 << 20 {
        big.push_str(&format!("user{i}:{}:10\n", 1_000_000 + i * 10));
        i += 1;
    }
    let new = format!("{big}core:100000:65536\n");
    // How long an uninterrupted run takes, to spread the kills over it.
    let fresh = || {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("etc")).unwrap();
        fs::write(dir.path().join("etc/subuid"), &big).unwrap();
        fs::write(dir.path().join("etc/subgid"), &big).unwrap();
        dir
    };
    // Spawns the writer and returns once it is about to write.
    let start = |root: &Path| {
        let mut child = writer(root, None).spawn().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.trim_end().ends_with("start") {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "the writer did not start");
        }
        (child, out)
    };
    let dir = fresh();
    let (mut child, _out) = start(dir.path());
    let started = Instant::now();
    assert!(child.wait().unwrap().success());
    let span = started.elapsed().as_micros() as u64;

    let mut rng = Rng::new();
    let (mut killed, mut finished) = (0, 0);
    for round in 0..40 {
        let dir = fresh();
        let root = dir.path();
        let (mut child, _out) = start(root);
        std::thread::sleep(Duration::from_micros(rng.below(span + span / 4)));
        match child.try_wait().unwrap() {
            Some(_) => finished += 1,
            None => {
                child.kill().unwrap();
                killed += 1;
            }
        }
        child.wait().unwrap();
        for file in ["subuid", "subgid"] {
            let now = read(root, file).unwrap();
            assert!(
                now == big || now == new,
                "round {round}: {file} is neither old nor new ({} bytes)",
                now.len()
            );
            let backup = read(root, &format!("{file}-"));
            assert!(backup.is_none() || backup.as_deref() == Some(&big), "round {round}: {file}- partial");
        }
        restart(root);
        for file in ["subuid", "subgid"] {
            assert_eq!(
                read(root, file).as_deref(),
                Some(new.as_str()),
                "round {round}: {file} after restart"
            );
        }
        assert_eq!(
            etc_names(root, None),
            base_names(&["subuid", "subgid", "subuid-", "subgid-", ".pwd.lock"]),
            "round {round}: after restart"
        );
    }
    eprintln!("40 rounds over {span} us: {killed} killed mid-run, {finished} finished first");
    assert!(killed >= 5, "too few kills landed mid-run ({killed})");
}

/// In-process injected errors: (fail point, actions, what the error must say, subuid and
/// subuid- after the failure). subuid- starts as a stale backup.
#[allow(clippy::type_complexity)]
const INJECTED: &[(&str, &str, &[&str], &str, &str)] = &[
    (
        "fsutil-write",
        "return(ENOSPC)",
        &["replacing", "subuid-: writing", ".subuid-.executor-agent.", "No space left on device"],
        OLD_UID,
        STALE_BACKUP,
    ),
    (
        "fsutil-write",
        "1*off->return(ENOSPC)",
        &["replacing", "subuid: writing", ".subuid.executor-agent.", "No space left on device"],
        OLD_UID,
        OLD_UID,
    ),
    ("fsutil-write", "return(EIO)", &["subuid-: writing", "Input/output error"], OLD_UID, STALE_BACKUP),
    ("fsutil-write", "1*off->return(EDQUOT)", &["subuid: writing", "Disk quota exceeded"], OLD_UID, OLD_UID),
    ("fsutil-fsync", "return(EIO)", &["subuid-: syncing", "Input/output error"], OLD_UID, STALE_BACKUP),
    (
        "fsutil-fsync",
        "1*off->return(EIO)",
        &["subuid: syncing", ".subuid.executor-agent.", "Input/output error"],
        OLD_UID,
        OLD_UID,
    ),
    (
        "fsutil-rename",
        "return(EBUSY)",
        &["subuid-: renaming into place", "Device or resource busy"],
        OLD_UID,
        STALE_BACKUP,
    ),
    (
        "fsutil-rename",
        "1*off->return(EXDEV)",
        &["subuid: renaming into place", "Invalid cross-device link"],
        OLD_UID,
        OLD_UID,
    ),
    (
        "fsutil-after-temp-create",
        "return(EROFS)",
        &["subuid-: creating", "Read-only file system"],
        OLD_UID,
        STALE_BACKUP,
    ),
    (
        "fsutil-after-temp-write",
        "1*off->return(EIO)",
        &["subuid: writing", "Input/output error"],
        OLD_UID,
        OLD_UID,
    ),
    // A failing directory fsync comes after the rename: the new file is in place (whole)
    // and the error is still reported, so the step is retried and finds it done.
    (
        "fsutil-sync-dir",
        "1*off->return(EIO)",
        &["subuid: syncing directory", "Input/output error"],
        NEW_UID,
        OLD_UID,
    ),
    (
        "subid-after-lock",
        "return(EIO)",
        &["subid-after-lock", "subuid: Input/output error"],
        OLD_UID,
        STALE_BACKUP,
    ),
];

#[test]
fn injected_io_errors_leave_the_file_whole_and_are_reported() {
    for &(point, actions, messages, uid, uid_backup) in INJECTED {
        let what = format!("{point}={actions}");
        let dir = setup();
        let root = Root::new(dir.path());
        let scenario = fail::FailScenario::setup();
        fail::cfg(point, actions).unwrap();
        let err = ensure(&root, IdKind::Uid, &core(), 65536, Duration::from_secs(5)).unwrap_err();
        scenario.teardown();
        let text = err.to_string();
        for m in messages {
            assert!(text.contains(m), "{what}: {text:?} lacks {m:?}");
        }
        assert_eq!(read(dir.path(), "subuid").as_deref(), Some(uid), "{what}: subuid");
        assert_eq!(read(dir.path(), "subuid-").as_deref(), Some(uid_backup), "{what}: subuid-");
        assert_eq!(
            etc_names(dir.path(), None),
            base_names(&["subuid", "subgid", "subuid-", ".pwd.lock"]),
            "{what}: temporary or lock file left"
        );

        // Without the fault, the same call converges.
        let outcome = ensure(&root, IdKind::Uid, &core(), 65536, Duration::from_secs(5)).unwrap();
        let range = IdRange { start: 165536, count: 65536 };
        if uid == NEW_UID {
            assert_eq!(outcome, EnsureOutcome::AlreadyPresent { owned: vec![range] }, "{what}");
        } else {
            assert_eq!(outcome, EnsureOutcome::Added { range }, "{what}");
        }
        assert_eq!(read(dir.path(), "subuid").as_deref(), Some(NEW_UID), "{what}: after");
        assert_eq!(read(dir.path(), "subuid-").as_deref(), Some(OLD_UID), "{what}: after");
    }
}
