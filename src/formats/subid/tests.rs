//! Behaviour of the subordinate ID step against real files under a temporary root.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant, SystemTime};

use super::*;

const LONG: Duration = Duration::from_secs(10);
const SHORT: Duration = Duration::from_millis(300);

fn core() -> RunnerUser {
    RunnerUser { name: "core".into(), uid: 1000 }
}

fn node() -> (tempfile::TempDir, Root) {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("etc")).unwrap();
    let root = Root::new(dir.path());
    (dir, root)
}

fn write(root: &Root, file: &str, contents: &[u8]) {
    fs::write(root.join(file), contents).unwrap();
}

fn read(root: &Root, file: &str) -> Vec<u8> {
    fs::read(root.join(file)).unwrap()
}

fn ensure_uid(root: &Root) -> Result<EnsureOutcome, SubidError> {
    ensure(root, IdKind::Uid, &core(), 65536, LONG)
}

fn added(start: u32) -> EnsureOutcome {
    EnsureOutcome::Added { range: IdRange { start, count: 65536 } }
}

/// Appends to `before` and checks the exact new contents and the backup of the old ones.
fn assert_appends(before: &str, after: &str, start: u32) {
    let (_dir, root) = node();
    write(&root, "/etc/subuid", before.as_bytes());
    assert_eq!(ensure_uid(&root).unwrap(), added(start));
    assert_eq!(String::from_utf8(read(&root, "/etc/subuid")).unwrap(), after);
    assert_eq!(String::from_utf8(read(&root, "/etc/subuid-")).unwrap(), before);
    assert_no_leftovers(&root);
}

/// No temporary, PID or lock file of ours remains in etc/.
fn assert_no_leftovers(root: &Root) {
    assert_only_these_besides(root, &[]);
}

fn assert_only_these_besides(root: &Root, extra: &[&str]) {
    for entry in fs::read_dir(root.join("/etc")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        let allowed = ["subuid", "subuid-", "subgid", "subgid-", "login.defs", ".pwd.lock", "other"];
        assert!(allowed.contains(&name.as_str()) || extra.contains(&name.as_str()), "left behind: {name}");
    }
}

#[test]
fn range_already_present_writes_nothing() {
    let (_dir, root) = node();
    // Stock Fedora CoreOS.
    write(&root, "/etc/subuid", b"core:524288:65536\n");
    let path = root.join("/etc/subuid");
    let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    fs::File::options().write(true).open(&path).unwrap().set_modified(old).unwrap();
    let before = fs::metadata(&path).unwrap();

    let outcome = ensure_uid(&root).unwrap();

    let owned = vec![IdRange { start: 524288, count: 65536 }];
    assert_eq!(outcome, EnsureOutcome::AlreadyPresent { owned });
    let after = fs::metadata(&path).unwrap();
    assert_eq!((after.ino(), after.modified().unwrap()), (before.ino(), old));
    assert_eq!(read(&root, "/etc/subuid"), b"core:524288:65536\n");
    assert!(!root.join("/etc/subuid-").exists());
    assert_no_leftovers(&root);
}

#[test]
fn missing_files_are_created_root_owned_0644() {
    let (_dir, root) = node();
    assert_eq!(ensure_uid(&root).unwrap(), added(100000));
    assert_eq!(ensure(&root, IdKind::Gid, &core(), 65536, LONG).unwrap(), added(100000));
    for file in ["/etc/subuid", "/etc/subgid"] {
        assert_eq!(read(&root, file), b"core:100000:65536\n");
        let md = fs::metadata(root.join(file)).unwrap();
        assert_eq!((md.uid(), md.gid(), md.mode() & 0o7777), (0, 0, 0o644));
    }
    assert!(!root.join("/etc/subuid-").exists(), "no backup of a file that did not exist");
    assert_no_leftovers(&root);
}

#[test]
fn lowest_fitting_hole_between_other_owners() {
    // 165536..200000 is too small; 200010..300000 fits.
    assert_appends(
        "a:100000:65536\nc:300000:65536\nb:200000:10\n",
        "a:100000:65536\nc:300000:65536\nb:200000:10\ncore:200010:65536\n",
        200010,
    );
}

#[test]
fn owners_written_by_uid() {
    // Our UID's line counts as ours (too small, so a full range is added past it);
    // another UID's line blocks its range.
    assert_appends(
        "1000:100000:30000\n1001:130000:10\n",
        "1000:100000:30000\n1001:130000:10\ncore:130010:65536\n",
        130010,
    );
    let (_dir, root) = node();
    write(&root, "/etc/subuid", b"1000:100000:65536\n");
    assert!(matches!(ensure_uid(&root).unwrap(), EnsureOutcome::AlreadyPresent { .. }));
}

#[test]
fn several_ranges_of_ours_are_summed() {
    let (_dir, root) = node();
    write(&root, "/etc/subuid", b"core:100000:30000\nx:130000:5\n1000:200000:35536\n");
    let owned = vec![IdRange { start: 100000, count: 30000 }, IdRange { start: 200000, count: 35536 }];
    assert_eq!(ensure_uid(&root).unwrap(), EnsureOutcome::AlreadyPresent { owned });
    assert!(!root.join("/etc/subuid-").exists());
}

#[test]
fn comments_and_blank_lines_are_kept() {
    let before = "# managed by hand\n\n  \nother:100000:65536\n# end\n";
    assert_appends(before, &format!("{before}core:165536:65536\n"), 165536);
}

#[test]
fn missing_final_newline_is_added_before_our_line() {
    assert_appends("other:100000:65536", "other:100000:65536\ncore:165536:65536\n", 165536);
}

#[test]
fn crlf_lines_stay_crlf() {
    let before = "# windows\r\nother:100000:65536\r\n";
    assert_appends(before, &format!("{before}core:165536:65536\n"), 165536);
}

#[test]
fn our_crlf_line_blocks_but_does_not_count() {
    // newuidmap reads the count as "65536\r" and skips the line.
    let before = "core:100000:65536\r\n";
    assert_appends(before, &format!("{before}core:165536:65536\n"), 165536);
}

#[test]
fn one_mebibyte_file() {
    let mut before = String::new();
    let mut i = 0u32;
    while before.len() < 1 << 20 {
        before.push_str(&format!("user{i}:{}:10\n", 100000 + i * 10));
        i += 1;
    }
    let start = 100000 + i * 10;
    assert_appends(&before, &format!("{before}core:{start}:65536\n"), start);
}

#[test]
fn exhausted_space_fails_without_writing() {
    let (_dir, root) = node();
    write(&root, "/etc/login.defs", b"SUB_UID_MIN\t100000\nSUB_UID_MAX 165535\n");
    write(&root, "/etc/subuid", b"other:100000:1\n");
    let err = ensure_uid(&root).unwrap_err();
    let path = root.join("/etc/subuid");
    assert_eq!(err.to_string(), format!("{}: no free range of 65536 IDs in 100000..165535", path.display()));
    assert_eq!(read(&root, "/etc/subuid"), b"other:100000:1\n");
    assert!(!root.join("/etc/subuid-").exists());
}

#[test]
fn login_defs_limits_apply_per_kind() {
    let (_dir, root) = node();
    write(&root, "/etc/login.defs", b"# shadow\nSUB_GID_MIN 2000000\n#SUB_UID_MIN 5\n");
    assert_eq!(ensure_uid(&root).unwrap(), added(100000));
    assert_eq!(ensure(&root, IdKind::Gid, &core(), 65536, LONG).unwrap(), added(2000000));
}

#[test]
fn malformed_lines_fail_closed_with_line_and_reason() {
    let long = format!("{}:1:2\n", "x".repeat(1020));
    let cases: &[(&[u8], usize, &str)] = &[
        (b"a:1\n", 1, "expected 3 fields owner:start:count, found 2"),
        (b"a:1:2:3\n", 1, "expected 3 fields owner:start:count, found 4"),
        (b"# ok\n:1:2\n", 2, "owner is empty"),
        (b"a::2\n", 1, "start is empty"),
        (b"a:1:\n", 1, "count is empty"),
        (b"ok:1:2\nother:100:3\na:1:2x\n", 3, "count \"2x\" is not a decimal number"),
        (b"a:0x10:2\n", 1, "start \"0x10\" is not a decimal number"),
        (b"a: 1:2\n", 1, "start \" 1\" is not a decimal number"),
        (b"a:010:2\n", 1, "start \"010\" has a leading zero (shadow-utils would read it as octal)"),
        (b"a:1:0\n", 1, "count is 0"),
        (b"a:4294967295:2\n", 1, "range 4294967295:2 ends past 2^32"),
        (b"a:1:99999999999\n", 1, "count \"99999999999\" is too large"),
        (long.as_bytes(), 1, "line is 1024 bytes long (shadow-utils accepts at most 1023)"),
        (b"ok:1:2\nb\0:3:4\n", 2, "contains a NUL byte"),
        (b"# note \0\n", 1, "contains a NUL byte"),
        (
            b"  # indented comments are not comments to shadow-utils\n",
            1,
            "expected 3 fields owner:start:count, found 1",
        ),
    ];
    for &(contents, line, reason) in cases {
        let (_dir, root) = node();
        write(&root, "/etc/subuid", contents);
        let path = root.join("/etc/subuid");
        let expected = format!("{}:{line}: {reason}", path.display());
        let err = ensure_uid(&root).unwrap_err();
        assert_eq!(err.to_string(), expected);
        assert!(matches!(err, SubidError::Malformed { line: l, .. } if l == line));
        assert_eq!(inspect(&root, IdKind::Uid, &core(), 65536).unwrap_err().to_string(), expected);
        assert_eq!(read(&root, "/etc/subuid"), contents, "{reason}: file changed");
        assert!(!root.join("/etc/subuid-").exists());
        assert_no_leftovers(&root);
    }
}

#[test]
fn line_of_1023_bytes_is_fine() {
    let line = format!("{}:1:2", "x".repeat(1019));
    assert_eq!(line.len(), 1023);
    let file = SubidFile::parse(Path::new("/etc/subuid"), format!("{line}\n").as_bytes()).unwrap();
    assert_eq!(file.entries.len(), 1);
}

#[test]
fn overlap_with_another_owner_names_both_lines() {
    let (_dir, root) = node();
    write(&root, "/etc/subuid", b"core:100000:65536\n# x\nother:150000:10\n");
    let err = ensure_uid(&root).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("line 1 (core:100000:65536) overlaps line 3 (other:150000:10)"), "{msg}");
    assert_eq!(read(&root, "/etc/subuid"), b"core:100000:65536\n# x\nother:150000:10\n");
}

#[test]
fn symlinked_file_is_refused() {
    let (_dir, root) = node();
    write(&root, "/etc/other", b"other:100000:65536\n");
    symlink(root.join("/etc/other"), root.join("/etc/subuid")).unwrap();
    let err = ensure_uid(&root).unwrap_err();
    assert_eq!(err.to_string(), format!("refusing symlinked {}", root.join("/etc/subuid").display()));
    assert!(matches!(inspect(&root, IdKind::Uid, &core(), 65536), Err(SubidError::Symlink { .. })));
    assert_eq!(read(&root, "/etc/other"), b"other:100000:65536\n");
    assert!(fs::symlink_metadata(root.join("/etc/subuid")).unwrap().file_type().is_symlink());
}

#[test]
fn backup_keeps_previous_contents_mode_and_label() {
    let (_dir, root) = node();
    let path = root.join("/etc/subuid");
    write(&root, "/etc/subuid", b"other:100000:65536\n");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
    let label = b"system_u:object_r:etc_t:s0\0".to_vec();
    let meta = FileMeta { uid: 0, gid: 0, mode: 0o640, selinux_label: Some(label) };
    // Label the file by replacing it with itself.
    fsutil::replace_file_with_meta(&path, b"other:100000:65536\n", &meta).unwrap();
    write(&root, "/etc/subuid-", b"stale backup\n");

    assert_eq!(ensure_uid(&root).unwrap(), added(165536));

    assert_eq!(read(&root, "/etc/subuid-"), b"other:100000:65536\n");
    for file in ["/etc/subuid", "/etc/subuid-"] {
        let got = FileMeta::of(&fs::File::open(root.join(file)).unwrap()).unwrap();
        assert_eq!(got, meta, "{file}");
    }
}

#[test]
fn inspect_plans_without_locking_or_writing() {
    let (_dir, root) = node();
    write(&root, "/etc/subuid", b"core:100000:1000\n");
    let view = inspect(&root, IdKind::Uid, &core(), 65536).unwrap();
    assert_eq!(
        view,
        SubidView {
            file: root.join("/etc/subuid"),
            owned: vec![IdRange { start: 100000, count: 1000 }],
            would_add: Some(IdRange { start: 101000, count: 65536 }),
        }
    );
    let view = inspect(&root, IdKind::Gid, &core(), 65536).unwrap();
    assert_eq!(view.would_add, Some(IdRange { start: 100000, count: 65536 }));
    assert!(!root.join("/etc/.pwd.lock").exists());
    assert_eq!(read(&root, "/etc/subuid"), b"core:100000:1000\n");
}

#[test]
fn unusable_user_names_and_counts_are_rejected() {
    let (_dir, root) = node();
    for name in ["", "co:re", "core\n", "#core"] {
        let user = RunnerUser { name: name.into(), uid: 1000 };
        let err = ensure(&root, IdKind::Uid, &user, 65536, LONG).unwrap_err();
        assert!(matches!(err, SubidError::InvalidUser { .. }), "{name:?}: {err}");
    }
    assert!(matches!(ensure(&root, IdKind::Uid, &core(), 0, LONG), Err(SubidError::InvalidCount)));
    assert!(!root.join("/etc/subuid").exists());
}

fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

#[test]
fn stale_lock_of_dead_pid_is_reclaimed() {
    let (_dir, root) = node();
    write(&root, "/etc/subuid.lock", format!("{}\0", dead_pid()).as_bytes());
    assert_eq!(ensure_uid(&root).unwrap(), added(100000));
    assert!(!root.join("/etc/subuid.lock").exists());
    assert_no_leftovers(&root);
}

fn assert_times_out(root: &Root, holder: LockHolder, lock: &str) {
    let started = Instant::now();
    let err = ensure(root, IdKind::Uid, &core(), 65536, SHORT).unwrap_err();
    assert!(started.elapsed() >= SHORT, "gave up early");
    assert!(started.elapsed() < SHORT + Duration::from_secs(2), "waited {:?}", started.elapsed());
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("{} is locked by {holder} (waited", root.join(lock).display())),
        "{msg}"
    );
    assert!(matches!(err, SubidError::Locked { holder: h, .. } if h == holder));
    assert!(!root.join("/etc/subuid").exists(), "wrote without the lock");
    // Someone else's subuid.lock stays; our subuid.<pid> must not.
    assert_only_these_besides(root, &["subuid.lock"]);
}

#[test]
fn empty_lock_file_counts_as_held() {
    let (_dir, root) = node();
    write(&root, "/etc/subuid.lock", b"");
    assert_times_out(&root, LockHolder::NoPid, "/etc/subuid.lock");
    assert!(root.join("/etc/subuid.lock").exists(), "someone else's lock was removed");
}

#[test]
fn lock_of_live_pid_times_out() {
    let (_dir, root) = node();
    let mut child = Command::new("sleep").arg("30").spawn().unwrap();
    let pid = child.id() as i32;
    write(&root, "/etc/subuid.lock", format!("{pid}\0").as_bytes());
    assert_times_out(&root, LockHolder::Pid { pid }, "/etc/subuid.lock");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(read(&root, "/etc/subuid.lock"), format!("{pid}\0").as_bytes());
}

/// A `sleep` process that holds lckpwdf()'s fcntl lock on the root's .pwd.lock. The lock
/// is taken between fork and exec and survives exec, so it is held once spawn() returns.
fn hold_pwd_lock(root: &Root, secs: &str) -> Child {
    let path = CString::new(root.join("/etc/.pwd.lock").as_os_str().as_bytes()).unwrap();
    let mut cmd = Command::new("sleep");
    cmd.arg(secs);
    // SAFETY: only async-signal-safe calls (open, fcntl) run in the forked child.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CREAT, 0o600);
            let lock = libc::flock {
                l_type: libc::F_WRLCK as _,
                l_whence: libc::SEEK_SET as _,
                l_start: 0,
                l_len: 0,
                l_pid: 0,
            };
            if fd < 0 || libc::fcntl(fd, libc::F_SETLK, &lock) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

#[test]
fn held_pwd_lock_times_out() {
    let (_dir, root) = node();
    let mut child = hold_pwd_lock(&root, "30");
    assert_times_out(&root, LockHolder::Pid { pid: child.id() as i32 }, "/etc/.pwd.lock");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn held_pwd_lock_is_waited_for() {
    let (_dir, root) = node();
    let mut child = hold_pwd_lock(&root, "1");
    let started = Instant::now();
    assert_eq!(ensure_uid(&root).unwrap(), added(100000));
    assert!(started.elapsed() >= Duration::from_millis(500), "did not wait for the holder");
    child.wait().unwrap();
    assert_no_leftovers(&root);
}

#[test]
fn lock_files_match_shadow_utils() {
    let (_dir, root) = node();
    let db = root.join("/etc/subuid");
    let held = lock::ShadowLock::acquire(&root, &db, LONG).unwrap();
    assert_eq!(read(&root, "/etc/subuid.lock"), format!("{}\0", std::process::id()).as_bytes());
    assert!(!root.join(format!("/etc/subuid.{}", std::process::id())).exists());
    let md = fs::metadata(root.join("/etc/.pwd.lock")).unwrap();
    assert_eq!(md.mode() & 0o777, 0o600);
    // Another thread of ours must wait like another process would.
    let err = lock::ShadowLock::acquire(&root, &db, Duration::from_millis(50)).unwrap_err();
    assert!(matches!(err, SubidError::Locked { holder: LockHolder::OtherThread, .. }), "{err}");
    drop(held);
    assert!(!root.join("/etc/subuid.lock").exists());
    drop(lock::ShadowLock::acquire(&root, &db, LONG).unwrap());
}

#[test]
fn parse_and_append_are_pure() {
    let file = SubidFile::parse(Path::new("x"), b"# c\r\n\ncore:1:2\r\n1000:5:6").unwrap();
    let entries: Vec<_> = file.entries.iter().map(|e| (e.line, e.owner.as_str(), e.range, e.crlf)).collect();
    assert_eq!(
        entries,
        [
            (3, "core", IdRange { start: 1, count: 2 }, true),
            (4, "1000", IdRange { start: 5, count: 6 }, false)
        ]
    );
    let range = IdRange { start: 7, count: 8 };
    assert_eq!(append_entry(b"", "core", range), b"core:7:8\n");
    assert_eq!(append_entry(b"a:1:2", "core", range), b"a:1:2\ncore:7:8\n");
    assert_eq!(append_entry(b"a:1:2\r\n", "core", range), b"a:1:2\r\ncore:7:8\n");
    assert_eq!(range.to_string(), "7:8");
    assert_eq!(range.end(), 15);
}

#[test]
fn lock_with_invalid_pid_counts_as_held() {
    let (_dir, root) = node();
    write(&root, "/etc/subuid.lock", b"abc\0");
    assert_times_out(&root, LockHolder::InvalidPid { content: "abc".into() }, "/etc/subuid.lock");
    assert_eq!(read(&root, "/etc/subuid.lock"), b"abc\0");
}

#[test]
fn stale_lock_with_our_own_pid_is_reclaimed() {
    // A PID reused after a crash and reboot: no other thread of ours holds it.
    let (_dir, root) = node();
    write(&root, "/etc/subuid.lock", format!("{}\0", std::process::id()).as_bytes());
    assert_eq!(ensure_uid(&root).unwrap(), added(100000));
    assert!(!root.join("/etc/subuid.lock").exists());
    assert_no_leftovers(&root);
}

/// Each of these planted symlinks fails the write closed and leaves the target alone.
#[test]
fn symlinked_lock_and_backup_files_are_refused() {
    for (link, reason) in [
        ("/etc/subuid.lock", "Too many levels of symbolic links"),
        ("/etc/.pwd.lock", "Too many levels of symbolic links"),
        ("/etc/subuid-", "refusing symlinked"),
    ] {
        let (_dir, root) = node();
        write(&root, "/etc/subuid", b"other:100000:65536\n");
        write(&root, "/etc/other", b"precious\n");
        symlink(root.join("/etc/other"), root.join(link)).unwrap();
        let msg = ensure_uid(&root).unwrap_err().to_string();
        assert!(
            msg.contains(&root.join(link).display().to_string()) && msg.contains(reason),
            "{link}: {msg}"
        );
        assert_eq!(read(&root, "/etc/other"), b"precious\n", "{link}: target written");
        assert_eq!(read(&root, "/etc/subuid"), b"other:100000:65536\n", "{link}: file written");
        assert!(fs::symlink_metadata(root.join(link)).unwrap().file_type().is_symlink());
        assert!(!root.join("/etc/subuid.lock").exists() || link == "/etc/subuid.lock", "{link}: lock kept");
    }
}

fn names_in_etc(root: &Root) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(root.join("/etc"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn orphans_of_a_killed_write_are_cleaned_up_under_the_lock() {
    let (_dir, root) = node();
    write(&root, "/etc/subuid", b"other:100000:65536\n");
    let dead = dead_pid();
    let mut live = Command::new("sleep").arg("30").spawn().unwrap();
    // Ours, left by a killed run: a temporary file of the file and of its backup, and a
    // PID file of a dead writer (shadow-utils' pattern, so theirs too).
    write(&root, "/etc/.subuid.executor-agent.aB3dE9", b"other:100000:65536\ncore:165");
    write(&root, "/etc/.subuid-.executor-agent.zzzzzz", b"other:1");
    write(&root, &format!("/etc/subuid.{dead}"), format!("{dead}\0").as_bytes());
    // Not ours or not dead: kept.
    let kept = [
        ".subuid.executor-agent.toolong1".to_string(),
        ".subuid.executor-agent.short".to_string(),
        ".subgid.executor-agent.aB3dE9".to_string(),
        "subuid+".to_string(),
        "subuid.cio123456".to_string(),
        format!("subuid.{}", live.id()),
        // An administrator's copy named like a PID file, of a PID that is not running.
        format!("subuid.{dead}0"),
    ];
    for name in &kept {
        let contents = if name == &format!("subuid.{}", live.id()) {
            format!("{}\0", live.id())
        } else {
            "other:100000:65536\n".to_string()
        };
        write(&root, &format!("/etc/{name}"), contents.as_bytes());
    }

    assert_eq!(ensure_uid(&root).unwrap(), added(165536));

    assert_eq!(read(&root, "/etc/subuid"), b"other:100000:65536\ncore:165536:65536\n");
    let mut expected: Vec<String> = kept.to_vec();
    expected.extend([".pwd.lock", "subuid", "subuid-"].map(String::from));
    expected.sort();
    assert_eq!(names_in_etc(&root), expected);
    live.kill().unwrap();
    live.wait().unwrap();
}

#[test]
fn cleanup_does_not_count_as_a_write() {
    let (_dir, root) = node();
    write(&root, "/etc/subuid", b"core:524288:65536\n");
    write(&root, "/etc/.subuid.executor-agent.Qw12er", b"core:5");
    let path = root.join("/etc/subuid");
    let before = fs::metadata(&path).unwrap();
    assert!(matches!(ensure_uid(&root).unwrap(), EnsureOutcome::AlreadyPresent { .. }));
    let after = fs::metadata(&path).unwrap();
    assert_eq!((after.ino(), after.modified().unwrap()), (before.ino(), before.modified().unwrap()));
    assert_eq!(names_in_etc(&root), [".pwd.lock", "subuid"]);
}
