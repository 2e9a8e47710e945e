//! The subordinate ID files against the real world: Debian's `useradd` (shadow-utils 4.13)
//! holding the locks and racing the agent 200 times, and a real full disk (a tiny tmpfs).
//! Every case asserts the exact file contents before and after.
//!
//! Needs root (useradd, mount) and Debian's `passwd` package (useradd). Which option of
//! shadow 4.13's useradd locks what, checked with strace:
//! - `--root DIR` chroots: lckpwdf() on DIR/etc/.pwd.lock (F_SETLKW, 15 s), then the
//!   `<file>.lock` link locks; it allocates subuid/subgid ranges when the files exist.
//! - `--prefix DIR` does NOT call lckpwdf(): only the `DIR/etc/<file>.lock` link locks,
//!   each retried 15 times a second apart; it allocates ranges too.
//!
//! The agent takes both locks, so both modes exclude it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use executor_agent::paths::Root;
use executor_agent::subid::{
    ensure, EnsureOutcome, IdKind, IdRange, LockHolder, RunnerUser, SubidError, SubidFile,
};

const OTHER: &str = "# kept as is\nother:100000:65536\n";

fn core() -> RunnerUser {
    RunnerUser { name: "core".into(), uid: 1000 }
}

fn added(start: u32) -> EnsureOutcome {
    EnsureOutcome::Added { range: IdRange { start, count: 65536 } }
}

/// A root tree with the shadow files useradd needs and `core` (UID 1000) without ranges.
struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let node = Node { dir };
        fs::create_dir(node.path("etc")).unwrap();
        node.write(
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/bash\ncore:x:1000:1000::/var/home/core:/bin/bash\n",
        );
        node.write("etc/group", "root:x:0:\ncore:x:1000:\n");
        node.write("etc/shadow", "root:*:19000:0:99999:7:::\ncore:*:19000:0:99999:7:::\n");
        node.write("etc/gshadow", "root:*::\ncore:!::\n");
        node.write("etc/login.defs", "SUB_UID_COUNT 65536\nSUB_GID_COUNT 65536\n");
        node.write("etc/subuid", OTHER);
        node.write("etc/subgid", OTHER);
        node
    }

    fn root(&self) -> Root {
        Root::new(self.dir.path())
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn write(&self, rel: &str, contents: &str) {
        fs::write(self.path(rel), contents).unwrap();
    }

    fn read(&self, rel: &str) -> String {
        String::from_utf8(fs::read(self.path(rel)).unwrap()).unwrap()
    }

    fn useradd(&self, mode: &str, name: &str) -> Command {
        let mut cmd = Command::new("useradd");
        cmd.args([mode, self.dir.path().to_str().unwrap(), "-M", "-U", name])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Lock files, temporary files (ours and shadow-utils'), PID files: nothing may remain.
    fn assert_no_leftovers(&self) {
        let base = ["passwd", "group", "shadow", "gshadow", "login.defs", "subuid", "subgid", ".pwd.lock"];
        for entry in fs::read_dir(self.path("etc")).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            let backup = name.strip_suffix('-').is_some_and(|b| base.contains(&b));
            assert!(base.contains(&name.as_str()) || backup, "left behind: etc/{name}");
        }
    }
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

fn finish(child: Child, what: &str) -> Output {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{what}: {} {}", out.status, String::from_utf8_lossy(&out.stderr));
    out
}

/// useradd stuck while holding subuid.lock: the agent waits a bounded time, names the
/// holder, writes nothing; with a longer timeout it waits useradd out and allocates
/// around the range useradd just added (it reads the file only under the lock).
#[test]
fn useradd_holding_the_lock_is_waited_out_never_overwritten() {
    let node = Node::new();
    let root = node.root();
    // useradd --prefix locks passwd, group, gshadow, subuid, subgid, then shadow: a live
    // process's shadow.lock keeps it waiting (1 s retries, 15 tries) with subuid.lock held.
    let mut blocker = Command::new("sleep").arg("60").spawn().unwrap();
    node.write("etc/shadow.lock", &format!("{}\0", blocker.id()));
    let useradd = node.useradd("--prefix", "alice").spawn().unwrap();
    let pid = useradd.id() as i32;
    let held = format!("{pid}\0");
    wait_until("useradd holds subuid.lock", Duration::from_secs(10), || {
        fs::read(node.path("etc/subuid.lock")).is_ok_and(|c| c == held.as_bytes())
    });

    let started = Instant::now();
    let err = ensure(&root, IdKind::Uid, &core(), 65536, Duration::from_millis(300)).unwrap_err();
    let waited = started.elapsed();
    assert!(
        matches!(&err, SubidError::Locked { holder: LockHolder::Pid { pid: p }, .. } if *p == pid),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with(&format!("{} is locked by PID {pid}", node.path("etc/subuid.lock").display())),
        "{err}"
    );
    assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(2), "waited {waited:?}");
    assert_eq!(node.read("etc/subuid"), OTHER, "wrote without the lock");
    assert_eq!(fs::read(node.path("etc/subuid.lock")).unwrap(), held.as_bytes(), "useradd's lock touched");
    assert!(!node.path("etc/subuid-").exists());

    let waiter = {
        let root = root.clone();
        thread::spawn(move || ensure(&root, IdKind::Uid, &core(), 65536, Duration::from_secs(30)))
    };
    thread::sleep(Duration::from_millis(500));
    assert!(!waiter.is_finished(), "did not wait for useradd");
    assert_eq!(node.read("etc/subuid"), OTHER);
    blocker.kill().unwrap();
    blocker.wait().unwrap();
    finish(useradd, "useradd");
    assert_eq!(waiter.join().unwrap().unwrap(), added(231072));

    // shadow 4.13 rewrites the file sorted by range start, comment lines last; we append.
    let with_alice = "other:100000:65536\n# kept as is\nalice:165536:65536\n";
    assert_eq!(node.read("etc/subuid"), format!("{with_alice}core:231072:65536\n"));
    assert_eq!(node.read("etc/subuid-"), with_alice);
    assert_eq!(node.read("etc/subgid"), with_alice, "useradd's subgid");
    node.assert_no_leftovers();
}

/// The agent's users: each needs a range in both files while useradd runs.
fn agent_users() -> Vec<RunnerUser> {
    (0..10).map(|i| RunnerUser { name: format!("agent{i}"), uid: 5000 + i }).collect()
}

/// Runs `total` useradds, at most `parallel` at a time, while the agent ensures ranges for
/// ten users (both kinds) in between; useradds that give up on the lock ("cannot lock",
/// shadow's own 15 s bound) are run again. Returns how many were retried.
fn race_useradd(node: &Node, mode: &str, total: usize, parallel: usize) -> usize {
    let root = node.root();
    let agent = thread::spawn(move || {
        let mut outcomes = Vec::new();
        for user in agent_users() {
            for kind in [IdKind::Uid, IdKind::Gid] {
                outcomes.push(ensure(&root, kind, &user, 65536, Duration::from_secs(120)));
            }
            thread::sleep(Duration::from_millis(40));
        }
        outcomes
    });
    let mut pending: Vec<String> = (0..total).map(|i| format!("u{i:03}")).rev().collect();
    let mut running: Vec<(String, Child)> = Vec::new();
    let mut retried = 0;
    while !pending.is_empty() || !running.is_empty() {
        while running.len() < parallel {
            let Some(name) = pending.pop() else { break };
            let child = node.useradd(mode, &name).spawn().unwrap();
            running.push((name, child));
        }
        let mut still = Vec::new();
        for (name, mut child) in running {
            match child.try_wait().unwrap() {
                None => still.push((name, child)),
                Some(status) if status.success() => {}
                Some(status) => {
                    let err = String::from_utf8_lossy(&child.wait_with_output().unwrap().stderr).into_owned();
                    assert!(err.contains("cannot lock"), "useradd {name}: {status}: {err}");
                    retried += 1;
                    pending.push(name);
                }
            }
        }
        running = still;
        thread::sleep(Duration::from_millis(2));
    }
    for outcome in agent.join().unwrap() {
        assert!(matches!(outcome, Ok(EnsureOutcome::Added { .. })), "{outcome:?}");
    }
    retried
}

/// One line per owner, well formed, no two ranges overlapping, the original lines kept
/// (useradd sorts the file by range start and puts comments last, so not in place).
fn assert_whole(node: &Node, file: &str, owners: &BTreeSet<String>) {
    let text = node.read(file);
    for line in OTHER.lines() {
        assert_eq!(text.lines().filter(|l| *l == line).count(), 1, "{file}: {line:?} lost or doubled");
    }
    let parsed = SubidFile::parse(Path::new(file), text.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
    let mut per_owner: BTreeMap<&str, usize> = BTreeMap::new();
    for e in &parsed.entries {
        *per_owner.entry(&e.owner).or_default() += 1;
        assert_eq!(e.range.count, 65536, "{file}: {e:?}");
        assert!(!e.crlf);
    }
    let want: BTreeMap<&str, usize> = owners.iter().map(|o| (o.as_str(), 1)).collect();
    assert_eq!(per_owner, want, "{file}: an owner has no line or several");
    let mut ranges: Vec<IdRange> = parsed.entries.iter().map(|e| e.range).collect();
    ranges.sort_by_key(|r| r.start);
    for pair in ranges.windows(2) {
        assert!(pair[0].end() <= u64::from(pair[1].start), "{file}: {:?} overlaps {:?}", pair[0], pair[1]);
    }
    assert!(text.ends_with('\n'));
}

fn race_and_check(mode: &str, parallel: usize) -> usize {
    let node = Node::new();
    let total = 200;
    let started = Instant::now();
    let retried = race_useradd(&node, mode, total, parallel);
    let mut owners: BTreeSet<String> = (0..total).map(|i| format!("u{i:03}")).collect();
    owners.extend(agent_users().into_iter().map(|u| u.name));
    owners.insert("other".into());
    for file in ["etc/subuid", "etc/subgid"] {
        assert_whole(&node, file, &owners);
    }
    let passwd = node.read("etc/passwd");
    assert_eq!(passwd.lines().filter(|l| l.starts_with('u')).count(), total);
    node.assert_no_leftovers();
    eprintln!(
        "{total} x useradd {mode} ({parallel} at a time) + 20 agent writes: {:?}, {retried} useradd retries",
        started.elapsed()
    );
    retried
}

/// 200 `useradd --root` at once (lckpwdf, like useradd on the host) racing the agent.
#[test]
fn two_hundred_useradd_root_in_parallel_lose_nothing() {
    race_and_check("--root", 200);
}

/// 200 `useradd --prefix` (link locks only, so the agent's subuid.lock is what keeps them
/// apart), a few at a time because their 1 s lock retries make a crowd give up.
#[test]
fn two_hundred_useradd_prefix_racing_the_agent_lose_nothing() {
    race_and_check("--prefix", 8);
}

// ---- A real full disk: a tmpfs in a private mount namespace ----

const PAGE: u64 = 4096;

/// Runs `f` on a fresh tmpfs mounted with `options` (e.g. `size=64k`), in a thread of its
/// own whose mount namespace is private: nothing outside this thread sees the mount.
fn on_tmpfs<T: Send + 'static>(options: &str, f: impl FnOnce(&Path) -> T + Send + 'static) -> T {
    let options = options.to_owned();
    thread::spawn(move || {
        let c = |s: &str| std::ffi::CString::new(s).unwrap();
        let check = |what: &str, rc: libc::c_int| {
            assert!(rc == 0, "{what}: {} (needs root)", std::io::Error::last_os_error());
        };
        // SAFETY: plain system calls with valid NUL-terminated strings; unshare and the
        // mounts affect only this thread's (new) mount namespace.
        unsafe {
            check("unshare(CLONE_NEWNS)", libc::unshare(libc::CLONE_NEWNS));
            let none = std::ptr::null();
            check(
                "making / private",
                libc::mount(none, c("/").as_ptr(), none, libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()),
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let target = c(dir.path().to_str().unwrap());
        // SAFETY: as above.
        unsafe {
            let (fstype, data) = (c("tmpfs"), c(&options));
            check(
                "mounting a tmpfs",
                libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, data.as_ptr().cast()),
            );
        }
        let out = f(dir.path());
        // SAFETY: as above.
        unsafe { check("unmounting", libc::umount(target.as_ptr())) };
        out
    })
    .join()
    .unwrap()
}

fn free_blocks(dir: &Path) -> u64 {
    nix::sys::statvfs::statvfs(dir).unwrap().blocks_available()
}

fn free_inodes(dir: &Path) -> u64 {
    nix::sys::statvfs::statvfs(dir).unwrap().files_available()
}

/// Fills the file system, then gives back exactly `pages` pages.
fn leave_free_pages(dir: &Path, pages: u64) {
    let path = dir.join("filler");
    let mut filler = OpenOptions::new().create(true).append(true).open(&path).unwrap();
    let chunk = [0u8; PAGE as usize];
    loop {
        match filler.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling: {e}"),
        }
    }
    let full = fs::metadata(&path).unwrap().len() / PAGE * PAGE;
    filler.set_len(full - pages * PAGE).unwrap();
    assert_eq!(free_blocks(dir), pages);
}

/// An 8 KiB subuid (two pages) and a stale backup on the tmpfs at `top`.
fn tmpfs_node(top: &Path) -> (Root, String) {
    fs::create_dir(top.join("etc")).unwrap();
    let mut old = String::from("# 8 KiB of other owners\n");
    for i in 0..400u32 {
        old.push_str(&format!("u{i:03}:{}:10\n", 1_000_000 + i * 10));
    }
    assert!(old.len() as u64 > PAGE && (old.len() as u64) < 2 * PAGE);
    fs::write(top.join("etc/subuid"), &old).unwrap();
    // lckpwdf's lock file exists on a real node; creating it needs no data page.
    File::create(top.join("etc/.pwd.lock")).unwrap();
    (Root::new(top), old)
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// A full disk at each step: no page for the lock's PID file, none for the backup, none
/// for the new file. Each fails with ENOSPC naming the file, leaves the file exactly as it
/// was and no temporary file; with room again, the same call succeeds.
#[test]
fn real_disk_full_on_a_tiny_tmpfs() {
    on_tmpfs("size=64k,mode=0755", |top| {
        let (root, old) = tmpfs_node(top);
        let etc = top.join("etc");
        let new = format!("{old}core:100000:65536\n");
        let ensure_uid = || ensure(&root, IdKind::Uid, &core(), 65536, Duration::from_secs(5));
        let cases: [(u64, String, Option<&str>); 3] = [
            // No page at all: even the lock's PID file cannot be written.
            (0, format!("writing {}/subuid.", etc.display()), None),
            // One page: the lock, but no room for the backup.
            (
                1,
                format!(
                    "replacing {}/subuid-: writing {}/.subuid-.executor-agent.",
                    etc.display(),
                    etc.display()
                ),
                None,
            ),
            // The lock and the backup (two pages), no room for the new file.
            (
                3,
                format!(
                    "replacing {}/subuid: writing {}/.subuid.executor-agent.",
                    etc.display(),
                    etc.display()
                ),
                Some(&old),
            ),
        ];
        for (pages, message, backup) in cases {
            leave_free_pages(top, pages);
            let err = ensure_uid().unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains(&message) && text.ends_with("No space left on device (os error 28)"),
                "{pages} pages: {text}"
            );
            assert_eq!(fs::read_to_string(etc.join("subuid")).unwrap(), old, "{pages} pages: file changed");
            assert_eq!(fs::read_to_string(etc.join("subuid-")).ok().as_deref(), backup, "{pages} pages");
            let mut want = vec![".pwd.lock", "subuid"];
            if backup.is_some() {
                want.push("subuid-");
            }
            assert_eq!(names(&etc), want, "{pages} pages: something left behind");
        }
        fs::remove_file(top.join("filler")).unwrap();
        assert_eq!(ensure_uid().unwrap(), added(100000));
        assert_eq!(fs::read_to_string(etc.join("subuid")).unwrap(), new);
        assert_eq!(fs::read_to_string(etc.join("subuid-")).unwrap(), old);
        assert_eq!(names(&etc), [".pwd.lock", "subuid", "subuid-"]);
    });
}

/// Out of inodes at each step: for the lock's PID file, its link, the new file's
/// temporary file.
#[test]
fn real_inode_exhaustion_on_a_tiny_tmpfs() {
    on_tmpfs("size=256k,nr_inodes=64,mode=0755", |top| {
        let (root, old) = tmpfs_node(top);
        let etc = top.join("etc");
        let ensure_uid = || ensure(&root, IdKind::Uid, &core(), 65536, Duration::from_secs(5));
        let fill = top.join("inodes");
        fs::create_dir(&fill).unwrap();
        let mut n = 0;
        loop {
            match File::create(fill.join(n.to_string())) {
                Ok(_) => n += 1,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("{e}"),
            }
        }
        // tmpfs charges an inode for each extra hard link too: the lock (a link to the PID
        // file) needs two for a moment, so the backup never runs out on its own.
        let cases: [(u64, String, Option<&str>); 3] = [
            (0, format!("writing {}/subuid.", etc.display()), None),
            (1, format!("linking {}/subuid.lock", etc.display()), None),
            (
                2,
                format!("replacing {}/subuid: creating temporary file in {}", etc.display(), etc.display()),
                Some(&old),
            ),
        ];
        let mut freed = 0;
        for (free, message, backup) in cases {
            while free_inodes(top) < free {
                n -= 1;
                fs::remove_file(fill.join(n.to_string())).unwrap();
                freed += 1;
            }
            assert_eq!(free_inodes(top), free, "after freeing {freed}");
            let text = ensure_uid().unwrap_err().to_string();
            assert!(
                text.contains(&message) && text.ends_with("No space left on device (os error 28)"),
                "{free} inodes: {text}"
            );
            assert_eq!(fs::read_to_string(etc.join("subuid")).unwrap(), old, "{free} inodes: file changed");
            assert_eq!(fs::read_to_string(etc.join("subuid-")).ok().as_deref(), backup, "{free} inodes");
        }
        fs::remove_dir_all(&fill).unwrap();
        assert_eq!(ensure_uid().unwrap(), added(100000));
        assert_eq!(fs::read_to_string(etc.join("subuid")).unwrap(), format!("{old}core:100000:65536\n"));
        assert_eq!(names(&etc), [".pwd.lock", "subuid", "subuid-"]);
    });
}
