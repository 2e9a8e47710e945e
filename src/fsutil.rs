//! Durable file replacement: atomic write that keeps owner, mode and SELinux label.

use std::ffi::CStr;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
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

/// The I/O steps of a replacement, so that tests can make each one fail.
pub(crate) trait FileOps {
    fn write_all(&self, file: &mut File, contents: &[u8]) -> io::Result<()> {
        file.write_all(contents)
    }
    fn sync(&self, file: &File) -> io::Result<()> {
        file.sync_all()
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
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
    step("writing", ops.write_all(&mut file, contents))?;
    // chown before chmod: chown clears set-id bits.
    step("changing owner of", fchown(&file, Some(meta.uid), Some(meta.gid)))?;
    step("changing mode of", file.set_permissions(fs::Permissions::from_mode(meta.mode)))?;
    if let Some(label) = &meta.selinux_label {
        step("labelling", set_selinux_label(&file, label))?;
    }
    step("syncing", ops.sync(&file))?;
    drop(file);
    ops.rename(&temp.0, path).map_err(|e| with_context("renaming into place", path, e))?;
    temp.disarm();
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

fn create_temp(dir: &Path, name: &str) -> io::Result<(File, TempPath)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut last_err = None;
    for _ in 0..64 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        hasher.write_u32(std::process::id());
        let temp = dir.join(format!(".{name}.executor-agent.{}", suffix(hasher.finish())));
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
