//! Durable file replacement: atomic write that keeps owner, mode and SELinux label.

use std::ffi::CStr;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{fchown, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

const SELINUX_XATTR: &CStr = c"security.selinux";

/// Owner, permission bits and SELinux label that a replacement file must carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileMeta {
    pub uid: u32,
    pub gid: u32,
    /// Permission bits only (`0o7777`).
    pub mode: u32,
    /// Raw `security.selinux` value; `None` leaves the label to the policy's default.
    pub selinux_label: Option<Vec<u8>>,
}

impl FileMeta {
    /// A file that does not exist yet: root-owned with `mode`.
    pub fn new_file(mode: u32) -> Self {
        FileMeta { uid: 0, gid: 0, mode: mode & 0o7777, selinux_label: None }
    }

    /// Reads the metadata of an open file.
    pub fn of(file: &File) -> io::Result<Self> {
        let md = file.metadata()?;
        Ok(FileMeta {
            uid: md.uid(),
            gid: md.gid(),
            mode: md.mode() & 0o7777,
            selinux_label: get_selinux_label(file)?,
        })
    }
}

/// Replaces `path` with `contents` so that readers see either the old or the new file,
/// never a partial one. An existing file's owner, mode and SELinux label carry over
/// (an unlabeled /etc/subuid breaks newuidmap under enforcing SELinux); a new file is
/// root:root with `new_file_mode`. A symlinked `path` is refused.
pub fn replace_file_atomically(path: &Path, contents: &[u8], new_file_mode: u32) -> io::Result<()> {
    replace_with(&RealOps, path, contents, None, new_file_mode)
}

/// Like [`replace_file_atomically`], but the new file carries `meta` whatever `path`
/// holds now (a backup mirrors the file it backs up, as shadow-utils does).
pub fn replace_file_with_meta(path: &Path, contents: &[u8], meta: &FileMeta) -> io::Result<()> {
    replace_with(&RealOps, path, contents, Some(meta), meta.mode)
}

/// Opens an existing regular file for reading without following a final symlink.
/// `Ok(None)` when it does not exist.
pub fn open_regular_nofollow(path: &Path) -> io::Result<Option<File>> {
    let opened = OpenOptions::new()
        .read(true)
        // O_NONBLOCK: a FIFO planted at the path must not hang us.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path);
    let file = match opened {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(symlink_refused(path)),
        Err(e) => return Err(with_context("opening", path, e)),
    };
    let md = file.metadata().map_err(|e| with_context("inspecting", path, e))?;
    if !md.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("refusing {}: not a regular file", path.display()),
        ));
    }
    Ok(Some(file))
}

/// True when `path` itself (no link followed) is a Unix socket.
pub fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt as _;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// The error for a symlinked path; see [`is_symlink_refusal`].
pub fn symlink_refused(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, SymlinkRefused(path.to_owned()))
}

/// True when `e` came from refusing a symlinked path.
pub fn is_symlink_refusal(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<SymlinkRefused>())
}

#[derive(Debug)]
struct SymlinkRefused(PathBuf);

impl fmt::Display for SymlinkRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "refusing symlinked {}", self.0.display())
    }
}

impl std::error::Error for SymlinkRefused {}

/// The I/O steps of a replacement, so that tests can make each one fail. The default
/// methods also carry fail points (`fsutil-write`, `fsutil-fsync`, `fsutil-rename`,
/// `fsutil-sync-dir`), so that a build with the `failpoints` feature can fail them
/// from outside with `FAILPOINTS=fsutil-write=return(ENOSPC)`.
pub(crate) trait FileOps {
    fn write_all(&self, file: &mut File, contents: &[u8]) -> io::Result<()> {
        if let Err(e) = failpoint("fsutil-write") {
            // A short write first, like a disk filling up mid-way.
            file.write_all(&contents[..contents.len() / 2])?;
            return Err(e);
        }
        file.write_all(contents)
    }
    fn sync(&self, file: &File) -> io::Result<()> {
        failpoint("fsutil-fsync")?;
        file.sync_all()
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        failpoint("fsutil-rename")?;
        fs::rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        failpoint("fsutil-sync-dir")?;
        File::open(dir)?.sync_all()
    }
}

pub(crate) struct RealOps;
impl FileOps for RealOps {}

pub(crate) fn replace_with(
    ops: &dyn FileOps,
    path: &Path,
    contents: &[u8],
    meta: Option<&FileMeta>,
    new_file_mode: u32,
) -> io::Result<()> {
    // Checked even when `meta` is given: renaming over a symlink would silently
    // replace the link, not what the administrator pointed it at.
    let existing = open_regular_nofollow(path)?;
    let meta = match (meta, existing) {
        (Some(meta), _) => meta.clone(),
        (None, Some(file)) => FileMeta::of(&file).map_err(|e| with_context("inspecting", path, e))?,
        (None, None) => FileMeta::new_file(new_file_mode),
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("{} has no file name", path.display()))
    })?;

    let (mut file, temp) = create_temp(dir, &name.to_string_lossy())?;
    let step = |what: &'static str, r: io::Result<()>| r.map_err(|e| with_context(what, &temp.0, e));
    step("creating", failpoint("fsutil-after-temp-create"))?;
    step("writing", ops.write_all(&mut file, contents))?;
    step("writing", failpoint("fsutil-after-temp-write"))?;
    // chown before chmod: chown clears set-id bits.
    step("changing owner of", fchown(&file, Some(meta.uid), Some(meta.gid)))?;
    step("changing mode of", file.set_permissions(fs::Permissions::from_mode(meta.mode)))?;
    if let Some(label) = &meta.selinux_label {
        step("labelling", set_selinux_label(&file, label))?;
    }
    step("syncing", ops.sync(&file))?;
    step("syncing", failpoint("fsutil-after-fsync"))?;
    drop(file);
    ops.rename(&temp.0, path).map_err(|e| with_context("renaming into place", path, e))?;
    temp.disarm();
    failpoint("fsutil-after-rename").map_err(|e| with_context("renaming into place", path, e))?;
    // The rename is done; a failure here only means it may not survive a crash.
    ops.sync_dir(dir).map_err(|e| with_context("syncing directory", dir, e))
}

/// Removes the temporary file unless it was renamed into place.
struct TempPath(PathBuf, bool);

impl TempPath {
    fn disarm(mut self) {
        self.1 = false;
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if self.1 {
            let _ = fs::remove_file(&self.0);
        }
    }
}

/// Where [`create_temp`] puts the temporary file for a file named `name`, minus the
/// six-character suffix: `.<name>.executor-agent.`.
fn temp_prefix(name: &str) -> String {
    format!(".{name}.executor-agent.")
}

/// True when `entry` is a name [`create_temp`] would pick for `name`.
fn is_temp_name(entry: &[u8], name: &str) -> bool {
    let prefix = temp_prefix(name);
    entry
        .strip_prefix(prefix.as_bytes())
        .is_some_and(|rest| rest.len() == 6 && rest.iter().all(u8::is_ascii_alphanumeric))
}

/// Removes the temporary files a killed replacement of `path` left behind (only names
/// of our exact pattern, `.<name>.executor-agent.XXXXXX`, next to `path`) and returns
/// them. Call it only while holding a lock that keeps every other replacement of `path`
/// away, or it may remove a live one's temporary file.
pub(crate) fn remove_orphaned_temps(path: &Path) -> io::Result<Vec<PathBuf>> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(Vec::new());
    };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let name = name.to_string_lossy();
    let mut removed = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(with_context("listing", dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| with_context("listing", dir, e))?;
        if !is_temp_name(entry.file_name().as_bytes(), &name) {
            continue;
        }
        let orphan = entry.path();
        match fs::remove_file(&orphan) {
            Ok(()) => removed.push(orphan),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(with_context("removing orphaned temporary file", &orphan, e)),
        }
    }
    Ok(removed)
}

fn create_temp(dir: &Path, name: &str) -> io::Result<(File, TempPath)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut last_err = None;
    for _ in 0..64 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        hasher.write_u32(std::process::id());
        let temp = dir.join(format!("{}{}", temp_prefix(name), suffix(hasher.finish())));
        let opened = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&temp);
        match opened {
            Ok(file) => return Ok((file, TempPath(temp, true))),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_err = Some(e),
            Err(e) => return Err(with_context("creating temporary file in", dir, e)),
        }
    }
    Err(with_context("creating temporary file in", dir, last_err.expect("loop ran")))
}

fn suffix(mut n: u64) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    (0..6)
        .map(|_| {
            let c = CHARS[(n % CHARS.len() as u64) as usize];
            n /= CHARS.len() as u64;
            c as char
        })
        .collect()
}

fn xattr_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTSUP | libc::ENODATA))
}

fn get_selinux_label(file: &File) -> io::Result<Option<Vec<u8>>> {
    // Retry when the label grows between the size query and the read.
    for _ in 0..4 {
        // SAFETY: a null buffer with size 0 only asks for the value's length.
        let len =
            unsafe { libc::fgetxattr(file.as_raw_fd(), SELINUX_XATTR.as_ptr(), std::ptr::null_mut(), 0) };
        if len < 0 {
            let e = io::Error::last_os_error();
            return if xattr_unsupported(&e) { Ok(None) } else { Err(e) };
        }
        let mut buf = vec![0u8; len as usize];
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
        let got = unsafe {
            libc::fgetxattr(file.as_raw_fd(), SELINUX_XATTR.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        };
        if got >= 0 {
            buf.truncate(got as usize);
            return Ok(Some(buf));
        }
        let e = io::Error::last_os_error();
        if xattr_unsupported(&e) {
            return Ok(None);
        }
        if e.raw_os_error() != Some(libc::ERANGE) {
            return Err(e);
        }
    }
    Err(io::Error::other("security.selinux kept changing size"))
}

fn set_selinux_label(file: &File, label: &[u8]) -> io::Result<()> {
    // SAFETY: `label` is valid for reads of `label.len()` bytes.
    let rc = unsafe {
        libc::fsetxattr(file.as_raw_fd(), SELINUX_XATTR.as_ptr(), label.as_ptr().cast(), label.len(), 0)
    };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    // A file system without xattrs has no labels to keep; any other failure (policy
    // refusing the label) fails closed rather than leaving an unlabeled file.
    if e.raw_os_error() == Some(libc::ENOTSUP) {
        Ok(())
    } else {
        Err(e)
    }
}

/// A fail point: a no-op unless the crate is built with the `failpoints` feature (tests
/// only; release builds contain none). Then `FAILPOINTS="name=action;..."` in the
/// environment configures them, with the fail crate's actions (`sleep(ms)`, `panic`,
/// `pause`, counts like `1*off->...`) and these for `return(ARG)`:
/// `return(stop)` stops the process with SIGSTOP so that a test can SIGKILL it at exactly
/// this step; `return(ENOSPC)`, `return(EIO)` (or any errno name or number) makes the
/// step fail with that error.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn failpoint(_name: &'static str) -> io::Result<()> {
    Ok(())
}

#[cfg(feature = "failpoints")]
pub(crate) fn failpoint(name: &'static str) -> io::Result<()> {
    static FROM_ENV: std::sync::Once = std::sync::Once::new();
    FROM_ENV.call_once(|| {
        // What fail::FailScenario::setup() does, without holding its global lock for the
        // life of the process (the agent's main() knows nothing of fail points).
        let Ok(spec) = std::env::var("FAILPOINTS") else { return };
        for cfg in spec.split(';').map(str::trim).filter(|c| !c.is_empty()) {
            let Some((point, actions)) = cfg.split_once('=') else {
                panic!("FAILPOINTS: {cfg:?} is not name=actions");
            };
            if let Err(e) = fail::cfg(point.trim(), actions.trim()) {
                panic!("FAILPOINTS: {cfg:?}: {e}");
            }
        }
    });
    let Some(arg) = fail::eval(name, |arg| arg) else { return Ok(()) };
    match arg.as_deref() {
        Some("stop") => {
            // SAFETY: raise has no preconditions.
            unsafe { libc::raise(libc::SIGSTOP) };
            Ok(())
        }
        Some(errno) => {
            Err(io::Error::from_raw_os_error(errno_named(errno).unwrap_or_else(|| {
                panic!("fail point {name}: return({errno}) is neither `stop` nor an errno")
            })))
        }
        None => Err(io::Error::other(format!("fail point {name}"))),
    }
}

#[cfg(feature = "failpoints")]
fn errno_named(name: &str) -> Option<i32> {
    Some(match name {
        "ENOSPC" => libc::ENOSPC,
        "EIO" => libc::EIO,
        "EDQUOT" => libc::EDQUOT,
        "EROFS" => libc::EROFS,
        "EXDEV" => libc::EXDEV,
        "EBUSY" => libc::EBUSY,
        "EPERM" => libc::EPERM,
        "EACCES" => libc::EACCES,
        "ENOMEM" => libc::ENOMEM,
        "EINTR" => libc::EINTR,
        number => return number.parse().ok(),
    })
}

/// An I/O error that says which step on which path failed and keeps the original kind.
#[derive(Debug)]
struct Context {
    what: &'static str,
    path: PathBuf,
    source: io::Error,
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.what, self.path.display(), self.source)
    }
}

impl std::error::Error for Context {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

fn with_context(what: &'static str, path: &Path, source: io::Error) -> io::Error {
    io::Error::new(source.kind(), Context { what, path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::os::unix::fs::symlink;

    fn dir_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn set_label(path: &Path, label: &[u8]) {
        let file = File::open(path).unwrap();
        set_selinux_label(&file, label).unwrap();
    }

    #[test]
    fn replaces_contents_and_keeps_owner_mode_and_label() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subuid");
        fs::write(&path, b"old\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        std::os::unix::fs::chown(&path, Some(12), Some(34)).unwrap();
        let label = b"system_u:object_r:etc_t:s0\0";
        set_label(&path, label);

        replace_file_atomically(&path, b"new\n", 0o600).unwrap();

        assert_eq!(fs::read(&path).unwrap(), b"new\n");
        let md = fs::metadata(&path).unwrap();
        assert_eq!((md.uid(), md.gid(), md.mode() & 0o7777), (12, 34, 0o640));
        let meta = FileMeta::of(&File::open(&path).unwrap()).unwrap();
        assert_eq!(meta.selinux_label.as_deref(), Some(&label[..]));
        assert_eq!(dir_names(dir.path()), ["subuid"]);
    }

    #[test]
    fn new_file_is_root_owned_with_given_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subgid");
        replace_file_atomically(&path, b"x\n", 0o644).unwrap();
        let md = fs::metadata(&path).unwrap();
        assert_eq!((md.uid(), md.gid(), md.mode() & 0o7777), (0, 0, 0o644));
        assert_eq!(fs::read(&path).unwrap(), b"x\n");
    }

    #[test]
    fn explicit_meta_wins_over_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subuid-");
        fs::write(&path, b"stale").unwrap();
        let meta = FileMeta { uid: 5, gid: 6, mode: 0o604, selinux_label: Some(b"a_t\0".to_vec()) };
        replace_file_with_meta(&path, b"backup", &meta).unwrap();
        assert_eq!(FileMeta::of(&File::open(&path).unwrap()).unwrap(), meta);
    }

    #[test]
    fn symlink_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("real");
        fs::write(&target, b"real\n").unwrap();
        let link = dir.path().join("subuid");
        symlink(&target, &link).unwrap();

        let err = replace_file_atomically(&link, b"new\n", 0o644).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(err.to_string(), format!("refusing symlinked {}", link.display()));
        assert!(is_symlink_refusal(&err));
        assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(fs::read(&target).unwrap(), b"real\n");
        assert_eq!(dir_names(dir.path()), ["real", "subuid"]);
    }

    /// Fails one step of the replacement with `errno`.
    #[derive(Default)]
    struct Faulty {
        write: Option<i32>,
        sync: Option<i32>,
        rename: Option<i32>,
        renamed: Cell<bool>,
    }

    impl FileOps for Faulty {
        fn write_all(&self, file: &mut File, contents: &[u8]) -> io::Result<()> {
            match self.write {
                // A short write first, like a disk filling up mid-way.
                Some(errno) => {
                    file.write_all(&contents[..contents.len() / 2])?;
                    Err(io::Error::from_raw_os_error(errno))
                }
                None => file.write_all(contents),
            }
        }
        fn sync(&self, file: &File) -> io::Result<()> {
            self.sync.map_or_else(|| file.sync_all(), |e| Err(io::Error::from_raw_os_error(e)))
        }
        fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
            if let Some(errno) = self.rename {
                return Err(io::Error::from_raw_os_error(errno));
            }
            self.renamed.set(true);
            fs::rename(from, to)
        }
    }

    fn assert_fault_leaves_original(ops: Faulty, expect: &str) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subuid");
        fs::write(&path, b"core:100000:65536\n").unwrap();
        let before = fs::metadata(&path).unwrap().ino();

        let err =
            replace_with(&ops, &path, b"core:100000:65536\nnew:165536:65536\n", None, 0o644).unwrap_err();

        assert!(err.to_string().contains(expect), "{err}");
        assert!(!ops.renamed.get());
        assert_eq!(fs::read(&path).unwrap(), b"core:100000:65536\n");
        assert_eq!(fs::metadata(&path).unwrap().ino(), before);
        assert_eq!(dir_names(dir.path()), ["subuid"], "temporary file left behind");
    }

    #[test]
    fn enospc_on_write_leaves_original() {
        assert_fault_leaves_original(
            Faulty { write: Some(libc::ENOSPC), ..Default::default() },
            "No space left",
        );
    }

    #[test]
    fn eio_on_write_leaves_original() {
        assert_fault_leaves_original(
            Faulty { write: Some(libc::EIO), ..Default::default() },
            "Input/output error",
        );
    }

    #[test]
    fn failing_fsync_leaves_original() {
        let err = Faulty { sync: Some(libc::EIO), ..Default::default() };
        assert_fault_leaves_original(err, "syncing");
    }

    #[test]
    fn failing_rename_leaves_original() {
        let err = Faulty { rename: Some(libc::EXDEV), ..Default::default() };
        assert_fault_leaves_original(err, "renaming into place");
    }

    #[test]
    fn temp_names_are_recognised_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let (file, temp) = create_temp(dir.path(), "subuid").unwrap();
        drop(file);
        let name = temp.0.file_name().unwrap().to_owned();
        assert!(is_temp_name(name.as_bytes(), "subuid"), "{name:?}");
        assert!(!is_temp_name(name.as_bytes(), "subuid-"));
        assert!(!is_temp_name(name.as_bytes(), "subgid"));
        for other in [
            ".subuid.executor-agent.abc",
            ".subuid.executor-agent.abcdefg",
            ".subuid.executor-agent.ab-def",
            "subuid",
            ".subuid.cioAbCdEf",
        ] {
            assert!(!is_temp_name(other.as_bytes(), "subuid"), "{other}");
        }
        drop(temp);
        assert!(dir_names(dir.path()).is_empty());
    }

    #[test]
    fn orphaned_temps_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subuid");
        for name in [
            "subuid",
            ".subuid.executor-agent.aaaaaa",
            ".subuid.executor-agent.Z9Z9Z9",
            ".subuid-.executor-agent.aaaaaa",
            ".subuid.executor-agent.aaaaa",
        ] {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        let mut removed = remove_orphaned_temps(&path).unwrap();
        removed.sort();
        assert_eq!(
            removed,
            [
                dir.path().join(".subuid.executor-agent.Z9Z9Z9"),
                dir.path().join(".subuid.executor-agent.aaaaaa")
            ]
        );
        assert_eq!(
            dir_names(dir.path()),
            [".subuid-.executor-agent.aaaaaa", ".subuid.executor-agent.aaaaa", "subuid"]
        );
        assert!(remove_orphaned_temps(&dir.path().join("missing/subuid")).unwrap().is_empty());
    }

    #[test]
    fn errors_keep_their_kind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subuid");
        let ops = Faulty { write: Some(libc::ENOSPC), ..Default::default() };
        let err = replace_with(&ops, &path, b"abc", None, 0o644).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
        assert!(!path.exists());
        assert!(dir_names(dir.path()).is_empty());
    }
}
