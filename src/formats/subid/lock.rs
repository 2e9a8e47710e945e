//! shadow-utils' locking, so that a concurrent useradd/usermod cannot interleave with us:
//! lckpwdf() (an fcntl write lock on /etc/.pwd.lock), then commonio's `<file>.lock`,
//! made by link(2) from `<file>.<pid>` holding the PID.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, PoisonError};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};
use nix::sys::signal::kill;
use nix::unistd::Pid;
use serde::Serialize;

use crate::paths::Root;

use super::SubidError;

const POLL: Duration = Duration::from_millis(50);

/// Who holds a lock we timed out on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "holder", rename_all = "snake_case")]
pub enum LockHolder {
    Pid {
        pid: i32,
    },
    /// An empty lock file: shadow-utils treats it as held, so do we.
    NoPid,
    InvalidPid {
        content: String,
    },
    OtherThread,
    Unknown,
}

impl fmt::Display for LockHolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockHolder::Pid { pid } => write!(f, "PID {pid}"),
            LockHolder::NoPid => f.write_str("an unknown process (the lock file holds no PID)"),
            LockHolder::InvalidPid { content } => {
                write!(f, "an unknown process (invalid PID {content:?})")
            }
            LockHolder::OtherThread => f.write_str("another thread of this process"),
            LockHolder::Unknown => f.write_str("another process"),
        }
    }
}

/// Both locks; released (lock file removed, fcntl lock dropped) on drop.
#[derive(Debug)]
pub(crate) struct ShadowLock {
    lock: PathBuf,
    // Field order is release order: the link lock in drop(), then lckpwdf, then the thread guard.
    _pwd: File,
    _local: LocalGuard,
}

impl ShadowLock {
    /// Locks `db` (e.g. `<root>/etc/subuid`), waiting at most `timeout` in total.
    pub(crate) fn acquire(root: &Root, db: &Path, timeout: Duration) -> Result<ShadowLock, SubidError> {
        let started = Instant::now();
        let deadline = started + timeout;
        let pwd_path = root.join("/etc/.pwd.lock");
        // fcntl locks belong to the process, so they do not keep our own threads apart.
        let local = LocalGuard::acquire(&pwd_path, deadline).ok_or_else(|| SubidError::Locked {
            path: pwd_path.clone(),
            holder: LockHolder::OtherThread,
            waited: started.elapsed(),
        })?;
        let pwd = lock_pwd(&pwd_path, deadline, started)?;
        let lock = with_suffix(db, ".lock");
        let own = with_suffix(db, &format!(".{}", std::process::id()));
        loop {
            match try_link_lock(&own, &lock)? {
                None => {
                    let held = ShadowLock { lock, _pwd: pwd, _local: local };
                    remove_dead_pid_files(db)?;
                    return Ok(held);
                }
                Some(holder) if Instant::now() >= deadline => {
                    return Err(SubidError::Locked { path: lock, holder, waited: started.elapsed() })
                }
                Some(_) => sleep(POLL.min(deadline.saturating_duration_since(Instant::now()))),
            }
        }
    }
}

impl Drop for ShadowLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.lock);
    }
}

pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// lckpwdf(): a whole-file fcntl write lock on `.pwd.lock`, created 0600. glibc waits
/// with F_SETLKW under a 15 s alarm; polling F_SETLK gives the same bound without signals.
fn lock_pwd(path: &Path, deadline: Instant, started: Instant) -> Result<File, SubidError> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| SubidError::Io { op: "opening", path: path.to_owned(), source })?;
    let want = whole_file(libc::F_WRLCK);
    loop {
        match fcntl(&file, FcntlArg::F_SETLK(&want)) {
            Ok(_) => return Ok(file),
            Err(Errno::EACCES | Errno::EAGAIN) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(SubidError::Io { op: "locking", path: path.to_owned(), source: e.into() }),
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(SubidError::Locked {
                path: path.to_owned(),
                holder: fcntl_holder(&file),
                waited: started.elapsed(),
            });
        }
        sleep(POLL.min(deadline - now));
    }
}

fn whole_file(l_type: i32) -> libc::flock {
    libc::flock { l_type: l_type as _, l_whence: libc::SEEK_SET as _, l_start: 0, l_len: 0, l_pid: 0 }
}

fn fcntl_holder(file: &File) -> LockHolder {
    let mut probe = whole_file(libc::F_WRLCK);
    match fcntl(file, FcntlArg::F_GETLK(&mut probe)) {
        // l_pid is -1 for open-file-description locks, which have no owning process.
        Ok(_) if i32::from(probe.l_type) != libc::F_UNLCK && probe.l_pid > 0 => {
            LockHolder::Pid { pid: probe.l_pid }
        }
        _ => LockHolder::Unknown,
    }
}

/// One pass of commonio's do_lock_file(): `Ok(None)` when we hold `lock`, else who does.
fn try_link_lock(own: &Path, lock: &Path) -> Result<Option<LockHolder>, SubidError> {
    fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SubidError + 'a {
        move |source| SubidError::Io { op, path: path.to_owned(), source }
    }
    let _own = RemoveOnDrop(own);
    write_pid_file(own).map_err(io_err("writing", own))?;
    crate::fsutil::failpoint("subid-lock-pid-written").map_err(io_err("writing", own))?;
    match fs::hard_link(own, lock) {
        Ok(()) => return check_link_count(own, lock).map(|()| None),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err("linking", lock)(e)),
    }
    let holder = match read_holder(lock).map_err(io_err("reading", lock))? {
        Some(holder) => holder,
        None => return Ok(Some(LockHolder::Unknown)), // released meanwhile: try again
    };
    // The holder is dead, or is us: our own threads are kept apart by LocalGuard, so a lock
    // with our PID is left over (e.g. a PID reused after a crash and reboot).
    let stale = match holder {
        LockHolder::Pid { pid } => {
            pid == std::process::id() as i32 || kill(Pid::from_raw(pid), None) == Err(Errno::ESRCH)
        }
        _ => false,
    };
    if !stale {
        return Ok(Some(holder));
    }
    match fs::remove_file(lock) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("removing stale lock", lock)(e)),
    }
    match fs::hard_link(own, lock) {
        Ok(()) => check_link_count(own, lock).map(|()| None),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(Some(LockHolder::Unknown)),
        Err(e) => Err(io_err("linking", lock)(e)),
    }
}

/// Removes `<db>.<pid>` files whose process is dead: what a writer (shadow-utils or us)
/// killed between writing its PID file and removing it leaves behind. Only files that
/// hold exactly their own PID (and an optional NUL) go, so that an administrator's
/// `subuid.2024` copy stays. Called while holding the lock.
fn remove_dead_pid_files(db: &Path) -> Result<(), SubidError> {
    let (Some(dir), Some(name)) = (db.parent(), db.file_name()) else {
        return Ok(());
    };
    let prefix = format!("{}.", name.to_string_lossy());
    fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SubidError + 'a {
        move |source| SubidError::Io { op, path: path.to_owned(), source }
    }
    for entry in fs::read_dir(dir).map_err(io_err("listing", dir))? {
        let entry = entry.map_err(io_err("listing", dir))?;
        let file_name = entry.file_name();
        let Some(digits) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let Ok(pid) = digits.parse::<i32>() else { continue };
        if pid <= 0
            || !digits.bytes().all(|b| b.is_ascii_digit())
            || pid == std::process::id() as i32
            || kill(Pid::from_raw(pid), None) != Err(Errno::ESRCH)
        {
            continue;
        }
        let path = entry.path();
        let mut contents = Vec::new();
        let readable = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .and_then(|f| f.take(32).read_to_end(&mut contents));
        let exact = contents == digits.as_bytes() || contents == [digits.as_bytes(), b"\0"].concat();
        if readable.is_err() || !exact {
            continue;
        }
        match fs::remove_file(&path) {
            Ok(()) => tracing::warn!("removed {}, left by a writer that died (PID {pid})", path.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("removing stale PID file", &path)(e)),
        }
    }
    Ok(())
}

/// `<pid>` and a NUL, exactly what shadow-utils writes and parses.
fn write_pid_file(path: &Path) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    file.write_all(format!("{}\0", std::process::id()).as_bytes())?;
    file.sync_data()
}

/// A link count other than 2 means someone else linked to our file too: not ours.
fn check_link_count(own: &Path, lock: &Path) -> Result<(), SubidError> {
    let nlink = fs::metadata(own)
        .map_err(|source| SubidError::Io { op: "inspecting", path: own.to_owned(), source })?
        .nlink();
    if nlink == 2 {
        return Ok(());
    }
    let _ = fs::remove_file(lock);
    let source = io::Error::other(format!("lock file already used (link count {nlink})"));
    Err(SubidError::Io { op: "locking", path: lock.to_owned(), source })
}

/// `Ok(None)` when the lock file no longer exists.
fn read_holder(lock: &Path) -> io::Result<Option<LockHolder>> {
    let mut file =
        match OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(lock) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
    let mut buf = Vec::new();
    Read::by_ref(&mut file).take(32).read_to_end(&mut buf)?;
    let text = buf.split(|&b| b == 0).next().unwrap_or_default();
    let text = String::from_utf8_lossy(text.trim_ascii()).into_owned();
    Ok(Some(match text.parse::<i32>() {
        _ if text.is_empty() => LockHolder::NoPid,
        Ok(pid) if pid > 0 && text.bytes().all(|b| b.is_ascii_digit()) => LockHolder::Pid { pid },
        _ => LockHolder::InvalidPid { content: text },
    }))
}

struct RemoveOnDrop<'a>(&'a Path);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        let _ = fs::remove_file(self.0);
    }
}

static HELD: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static RELEASED: Condvar = Condvar::new();

/// Keeps threads of this process from taking the same `.pwd.lock` at once.
#[derive(Debug)]
struct LocalGuard(PathBuf);

impl LocalGuard {
    fn acquire(path: &Path, deadline: Instant) -> Option<LocalGuard> {
        let mut held = HELD.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if !held.iter().any(|p| p == path) {
                held.push(path.to_owned());
                return Some(LocalGuard(path.to_owned()));
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            held = RELEASED.wait_timeout(held, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }
}

impl Drop for LocalGuard {
    fn drop(&mut self) {
        HELD.lock().unwrap_or_else(PoisonError::into_inner).retain(|p| p != &self.0);
        RELEASED.notify_all();
    }
}
