//! Reading, as root, what the runner user controls.
//!
//! The runner user is hostile: a container breakout runs as its UID, and everything that UID
//! can write or race (its home, `/run/user/UID`, Podman's runtime and storage directories,
//! the API socket) is untrusted input to this root process. A path string is not a safe
//! handle on such a place: a symlink planted anywhere on the way would make root read,
//! measure or connect elsewhere (`pause.pid -> /etc/shadow` made an agent show the shadow
//! file on `/readyz`). So every such path is opened here, one component at a time, relative
//! to the directory descriptor opened before it:
//!
//! - every component is opened with `O_NOFOLLOW` (`O_DIRECTORY` for directories, `O_NONBLOCK`
//!   and `O_NOCTTY` for files, `O_PATH` for sockets), and its type is checked on the opened
//!   descriptor with `fstat`: a FIFO where a file is meant fails at once, never blocks;
//! - a symlink is followed only where the runner user cannot have made it: a link owned by
//!   root, in a directory owned by root that neither group nor others may write (FCOS's
//!   `/home -> var/home`, `/var/run -> ../run`). Any other link is refused;
//! - with a runner UID given, every entry (directories on the way and the final one) must
//!   belong to that UID or to root;
//! - files are read with a size bound; a larger one is an error naming the path and the
//!   bound. Errors state facts about the path and never echo what a file holds.
//!
//! Why not `openat2(RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH)`: it resolves a whole path at once
//! and hands back only the last descriptor, so the owner of each directory on the way could
//! not be checked, and root's own links above the user's tree (`/home -> var/home`) could not
//! be allowed. Walking with `openat(O_NOFOLLOW)` and refusing `..` inside a [`Dir`] gives the
//! same guarantees on every kernel the agent supports, with those checks.
//!
//! [`Dir`] is also the anchor for root's writes into the user's tree (podman-config's files):
//! `O_EXCL` temporary files created through the descriptor, then `renameat` over the name.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write as _};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};

use crate::fsutil;

/// Symlinks (root's own) followed on one walk before it is given up, as the kernel's 40.
pub const MAX_LINKS: usize = 40;
/// Largest configuration file read as root (podman-config, storage).
pub const MAX_CONFIG_FILE: u64 = 1 << 20;

// ------------------------------------------------------------------------------------------------
// What is asked for, who may own it, and why something is refused.

/// The type of file an open expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Socket,
}

impl Kind {
    fn sflag(self) -> SFlag {
        match self {
            Kind::File => SFlag::S_IFREG,
            Kind::Dir => SFlag::S_IFDIR,
            Kind::Socket => SFlag::S_IFSOCK,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(type_name(self.sflag()))
    }
}

fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT
}

/// "a regular file", "a FIFO", ... for an `S_IFMT` value.
fn type_name(t: SFlag) -> &'static str {
    match t {
        SFlag::S_IFREG => "a regular file",
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFLNK => "a symlink",
        SFlag::S_IFIFO => "a FIFO",
        SFlag::S_IFSOCK => "a socket",
        SFlag::S_IFCHR => "a character device",
        SFlag::S_IFBLK => "a block device",
        _ => "an unknown type of file",
    }
}

/// Who may own what root reads and writes for the runner user: that user, or root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    pub fn accepts(self, uid: u32) -> bool {
        uid == self.uid || uid == 0
    }
}

/// Why a path was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Why {
    /// A symlink the runner user may have made.
    Symlink,
    WrongType {
        found: &'static str,
        wanted: Kind,
    },
    TooLarge {
        max: u64,
    },
    /// Owned by `uid`, neither the runner user `runner` nor root.
    Owner {
        uid: u32,
        runner: u32,
    },
    HardLinks(u64),
    NotUtf8,
    NotAbsolute,
    /// A name that is not one plain component (`..`, `a/b`, empty).
    NotAName,
    TooManyLinks,
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Why::Symlink => {
                f.write_str("it is a symlink (root follows no link the runner user could have made)")
            }
            Why::WrongType { found, wanted } => write!(f, "it is {found}, not {wanted}"),
            Why::TooLarge { max } => write!(f, "it is larger than {max} bytes"),
            Why::Owner { uid, runner } => {
                write!(f, "owned by UID {uid}, not the runner user (UID {runner}) or root")
            }
            Why::HardLinks(n) => write!(f, "it has {n} hard links"),
            Why::NotUtf8 => f.write_str("it is not UTF-8 text"),
            Why::NotAbsolute => f.write_str("it is not an absolute path"),
            Why::NotAName => f.write_str("it is not a plain file name"),
            Why::TooManyLinks => write!(f, "more than {MAX_LINKS} symlinks on the way"),
        }
    }
}

/// A refusal: `refusing PATH: WHY`. Carried in an [`io::Error`] of kind `PermissionDenied`;
/// [`refusal`] finds it again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub path: PathBuf,
    pub why: Why,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "refusing {}: {}", self.path.display(), self.why)
    }
}

impl std::error::Error for Refused {}

fn refused(path: &Path, why: Why) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, Refused { path: path.to_path_buf(), why })
}

/// The refusal an error carries, if it is one.
pub fn refusal(e: &io::Error) -> Option<&Refused> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<Refused>())
}

/// The refusal anywhere in an error chain (an [`io::Error`] wrapped in `anyhow` context).
pub fn refusal_in(e: &anyhow::Error) -> Option<&Refused> {
    e.chain().find_map(|cause| {
        cause.downcast_ref::<Refused>().or_else(|| cause.downcast_ref::<io::Error>().and_then(refusal))
    })
}

fn errno_io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// "opening PATH: error", with a hint when the agent's sandbox is the cause.
fn at(path: &Path, what: &str, e: io::Error) -> io::Error {
    let hint = if e.raw_os_error() == Some(libc::EROFS) {
        " (the agent's unit must list the runner user's home in ReadWritePaths=)"
    } else {
        ""
    };
    io::Error::new(e.kind(), format!("{what} {}: {e}{hint}", path.display()))
}

fn check_owner(path: &Path, st: &FileStat, runner: Option<u32>) -> io::Result<()> {
    match runner {
        Some(uid) if st.st_uid != uid && st.st_uid != 0 => {
            Err(refused(path, Why::Owner { uid: st.st_uid, runner: uid }))
        }
        _ => Ok(()),
    }
}

/// Reads at most `max` bytes; one more is a refusal naming only the path and the bound.
fn read_bounded(fd: OwnedFd, path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::from(fd).take(max.saturating_add(1)).read_to_end(&mut bytes).map_err(|e| at(path, "reading", e))?;
    if bytes.len() as u64 > max {
        return Err(refused(path, Why::TooLarge { max }));
    }
    Ok(bytes)
}

/// True for a single plain name: not empty, no `/`, not `.` or `..`.
fn plain_name(name: &OsStr) -> bool {
    let b = name.as_bytes();
    !b.is_empty() && b != b"." && b != b".." && !b.contains(&b'/')
}

// ------------------------------------------------------------------------------------------------
// Directories opened without following the user's links.

/// A directory opened without following a link the user could have made, with the path it
/// was reached by (for messages).
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    pub path: PathBuf,
}

/// An entry opened by a walk: its descriptor (`O_PATH` for a socket), `fstat` and path.
#[derive(Debug)]
pub struct Found {
    pub fd: OwnedFd,
    pub stat: FileStat,
    pub path: PathBuf,
}

/// An existing file, read through its directory, and what identifies it.
#[derive(Clone, Debug)]
pub struct UserFile {
    pub text: String,
    pub mode: u32,
    dev: u64,
    ino: u64,
    mtime: (i64, i64),
    size: i64,
    label: Option<Vec<u8>>,
}

/// One `openat` step.
enum Step {
    Opened(OwnedFd, FileStat),
    Missing,
    Link(FileStat),
}

impl Dir {
    /// The home directory named by passwd (a root-controlled path: symlinks above it, like
    /// FCOS's /home -> var/home, are followed). It must belong to the user or root.
    pub fn open_home(path: &Path, owner: Owner) -> io::Result<Option<Dir>> {
        let fd = match nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(at(path, "opening", errno_io(e))),
        };
        let dir = Dir { fd, path: path.to_path_buf() };
        dir.check(owner)?;
        Ok(Some(dir))
    }

    /// The directory at the absolute `path`, walked from `/` (see the module's rules); with
    /// `runner`, every entry below `/` must belong to that UID or root. `None` when it or a
    /// directory on the way does not exist.
    pub fn open(path: &Path, runner: Option<u32>) -> io::Result<Option<Dir>> {
        Ok(match walk(path, runner, Kind::Dir)? {
            Walked::Found(f) => Some(Dir { fd: f.fd, path: f.path }),
            Walked::Missing { .. } => None,
        })
    }

    /// The directory at `path` if it exists (`true`), else its deepest existing ancestor
    /// (`false`): where it would be created.
    pub fn open_or_ancestor(path: &Path, runner: Option<u32>) -> io::Result<(Dir, bool)> {
        Ok(match walk(path, runner, Kind::Dir)? {
            Walked::Found(f) => (Dir { fd: f.fd, path: f.path }, true),
            Walked::Missing { deepest } => (deepest, false),
        })
    }

    fn root() -> io::Result<Dir> {
        let fd =
            nix::fcntl::open("/", OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
                .map_err(|e| at(Path::new("/"), "opening", errno_io(e)))?;
        Ok(Dir { fd, path: PathBuf::from("/") })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn stat(&self) -> io::Result<FileStat> {
        nix::sys::stat::fstat(&self.fd).map_err(|e| at(&self.path, "inspecting", errno_io(e)))
    }

    fn check(&self, owner: Owner) -> io::Result<FileStat> {
        let st = self.stat()?;
        check_owner(&self.path, &st, Some(owner.uid))?;
        Ok(st)
    }

    /// Opens `name` in this directory as `kind`, never following a symlink.
    fn step(&self, name: &OsStr, kind: Kind) -> io::Result<Step> {
        let path = self.path.join(name);
        if !plain_name(name) {
            return Err(refused(&path, Why::NotAName));
        }
        let flags = match kind {
            Kind::Dir => OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            // O_NONBLOCK: a FIFO opens at once (and is then refused), it never waits for a writer.
            Kind::File => {
                OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC
            }
            // A socket cannot be opened for reading; O_PATH names its inode for connect().
            Kind::Socket => OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        };
        match nix::fcntl::openat(&self.fd, name, flags, Mode::empty()) {
            Ok(fd) => {
                let st = nix::sys::stat::fstat(&fd).map_err(|e| at(&path, "inspecting", errno_io(e)))?;
                match file_type(&st) {
                    SFlag::S_IFLNK => Ok(Step::Link(st)),
                    t if t == kind.sflag() => Ok(Step::Opened(fd, st)),
                    t => Err(refused(&path, Why::WrongType { found: type_name(t), wanted: kind })),
                }
            }
            Err(Errno::ENOENT) => Ok(Step::Missing),
            // ELOOP (a symlink), ENOTDIR (not a directory), ENXIO (a socket opened for
            // reading), ...: say what is there.
            Err(e) => match self.stat_at(name)? {
                None => Ok(Step::Missing),
                Some(st) => match file_type(&st) {
                    SFlag::S_IFLNK => Ok(Step::Link(st)),
                    t if t != kind.sflag() => {
                        Err(refused(&path, Why::WrongType { found: type_name(t), wanted: kind }))
                    }
                    _ => Err(at(&path, "opening", errno_io(e))),
                },
            },
        }
    }

    /// `step`, refusing a symlink and checking the owner.
    fn strict(&self, name: &OsStr, kind: Kind, runner: Option<u32>) -> io::Result<Option<Found>> {
        let path = self.path.join(name);
        match self.step(name, kind)? {
            Step::Missing => Ok(None),
            Step::Link(_) => Err(refused(&path, Why::Symlink)),
            Step::Opened(fd, stat) => {
                check_owner(&path, &stat, runner)?;
                Ok(Some(Found { fd, stat, path }))
            }
        }
    }

    /// The directory `name` below this one, not following a symlink; `None` when missing.
    pub fn child(&self, name: &str, owner: Owner) -> io::Result<Option<Dir>> {
        Ok(self.strict(OsStr::new(name), Kind::Dir, Some(owner.uid))?.map(|f| Dir { fd: f.fd, path: f.path }))
    }

    /// Like [`Dir::child`], creating a missing directory with `mode`, owned by the user.
    pub fn child_or_create(&self, name: &str, mode: u32, owner: Owner) -> io::Result<(Dir, bool)> {
        if let Some(dir) = self.child(name, owner)? {
            return Ok((dir, false));
        }
        let path = self.path.join(name);
        match nix::sys::stat::mkdirat(&self.fd, name, Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(at(&path, "creating", errno_io(e))),
        }
        let dir =
            self.child(name, owner)?.ok_or_else(|| at(&path, "opening", io::ErrorKind::NotFound.into()))?;
        let st = dir.check(owner)?;
        // Only what we just made (root's) is handed to the user.
        if st.st_uid == 0 && owner.uid != 0 {
            nix::unistd::fchown(&dir.fd, Some(owner.uid.into()), Some(owner.gid.into()))
                .map_err(|e| at(&path, "changing owner of", errno_io(e)))?;
        }
        nix::sys::stat::fchmod(&dir.fd, Mode::from_bits_truncate(mode))
            .map_err(|e| at(&path, "changing mode of", errno_io(e)))?;
        Ok((dir, true))
    }

    /// Reads the regular file `name` (no symlink, at most `max` bytes, one link, owned by
    /// `runner` or root when given); `None` when missing.
    pub fn read_file(&self, name: &str, runner: Option<u32>, max: u64) -> io::Result<Option<Vec<u8>>> {
        let Some(found) = self.strict(OsStr::new(name), Kind::File, runner)? else { return Ok(None) };
        read_found(found, max).map(Some)
    }

    /// Reads a configuration file `name` of the user (regular, single-linked, the user's or
    /// root's, at most [`MAX_CONFIG_FILE`] bytes of UTF-8), with what identifies it for a
    /// later [`Dir::replace`]; `None` when missing.
    pub fn read(&self, name: &str, owner: Owner) -> io::Result<Option<UserFile>> {
        let Some(found) = self.strict(OsStr::new(name), Kind::File, Some(owner.uid))? else {
            return Ok(None);
        };
        let st = found.stat;
        let path = found.path.clone();
        let label = {
            // The label of the file itself, for the replacement.
            let file = File::from(found.fd.try_clone().map_err(|e| at(&path, "reading", e))?);
            fsutil::FileMeta::of(&file).ok().and_then(|m| m.selinux_label)
        };
        let bytes = read_found(found, MAX_CONFIG_FILE)?;
        let text = String::from_utf8(bytes).map_err(|_| refused(&path, Why::NotUtf8))?;
        Ok(Some(UserFile {
            text,
            mode: st.st_mode & 0o777,
            dev: st.st_dev,
            ino: st.st_ino,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            size: st.st_size,
            label,
        }))
    }

    /// What is at `name` now, without following a symlink.
    pub fn stat_at(&self, name: &OsStr) -> io::Result<Option<FileStat>> {
        match nix::sys::stat::fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(at(&self.path.join(name), "inspecting", errno_io(e))),
        }
    }

    /// True when `name` is a directory (not a link to one).
    pub fn is_dir_at(&self, name: &OsStr) -> bool {
        self.stat_at(name).ok().flatten().is_some_and(|st| file_type(&st) == SFlag::S_IFDIR)
    }

    /// Replaces `name` with `contents`, owned by the user, with `prior`'s mode (else
    /// `new_mode`) and SELinux label; refuses when `name` is no longer what was read.
    pub fn replace(
        &self,
        name: &str,
        contents: &[u8],
        prior: Option<&UserFile>,
        new_mode: u32,
        owner: Owner,
    ) -> io::Result<()> {
        let path = self.path.join(name);
        let now = self.stat_at(OsStr::new(name))?;
        let same = match (prior, &now) {
            (None, None) => true,
            (Some(p), Some(st)) => {
                (st.st_dev, st.st_ino, (st.st_mtime, st.st_mtime_nsec), st.st_size)
                    == (p.dev, p.ino, p.mtime, p.size)
            }
            _ => false,
        };
        if !same {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "{} changed while it was being edited; left alone until the next pass",
                    path.display()
                ),
            ));
        }
        let (temp, fd) = self.create_temp(name)?;
        let result = (|| {
            let mut file = File::from(fd);
            file.write_all(contents).map_err(|e| at(&path, "writing", e))?;
            nix::unistd::fchown(file.as_fd(), Some(owner.uid.into()), Some(owner.gid.into()))
                .map_err(|e| at(&path, "changing owner of", errno_io(e)))?;
            let mode = prior.map_or(new_mode, |p| p.mode) & 0o777;
            nix::sys::stat::fchmod(file.as_fd(), Mode::from_bits_truncate(mode))
                .map_err(|e| at(&path, "changing mode of", errno_io(e)))?;
            if let Some(label) = prior.and_then(|p| p.label.as_ref()) {
                // Best effort: a label the policy refuses leaves the directory's default,
                // which is what Podman itself would create.
                let name = c"security.selinux";
                // SAFETY: `label` is valid for reads of its length; the name is NUL-terminated.
                unsafe {
                    libc::fsetxattr(file.as_raw_fd(), name.as_ptr(), label.as_ptr().cast(), label.len(), 0);
                }
            }
            file.sync_all().map_err(|e| at(&path, "syncing", e))?;
            nix::fcntl::renameat(&self.fd, temp.as_os_str(), &self.fd, name)
                .map_err(|e| at(&path, "renaming into place", errno_io(e)))
        })();
        if result.is_err() {
            let _ =
                nix::unistd::unlinkat(&self.fd, temp.as_os_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
            return result;
        }
        nix::unistd::fsync(&self.fd).map_err(|e| at(&self.path, "syncing", errno_io(e)))
    }

    fn create_temp(&self, name: &str) -> io::Result<(OsString, OwnedFd)> {
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        for attempt in 0u32..64 {
            let nonce = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
                ^ std::process::id().rotate_left(16)
                ^ attempt.wrapping_mul(0x9E37_79B9);
            let temp = OsString::from(format!(".{name}.executor-agent.{nonce:08x}"));
            match nix::fcntl::openat(&self.fd, temp.as_os_str(), flags, Mode::from_bits_truncate(0o600)) {
                Ok(fd) => return Ok((temp, fd)),
                Err(Errno::EEXIST) => continue,
                Err(e) => return Err(at(&self.path, "creating a temporary file in", errno_io(e))),
            }
        }
        Err(at(&self.path, "creating a temporary file in", io::ErrorKind::AlreadyExists.into()))
    }

    /// Names in this directory (through the opened descriptor), sorted.
    pub fn names(&self) -> io::Result<Vec<OsString>> {
        let mut names: Vec<OsString> = std::fs::read_dir(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
            .and_then(|entries| entries.map(|e| e.map(|e| e.file_name())).collect())
            .map_err(|e| at(&self.path, "listing", e))?;
        names.sort();
        Ok(names)
    }

    /// True when a symlink in this directory can only be root's doing: the directory is
    /// root's and neither its group nor others may write it.
    fn holds_only_roots_links(&self) -> io::Result<bool> {
        let st = self.stat()?;
        Ok(st.st_uid == 0 && st.st_mode & 0o022 == 0)
    }
}

/// Reads an opened regular file: one link, at most `max` bytes.
fn read_found(found: Found, max: u64) -> io::Result<Vec<u8>> {
    // A hard link would make another file (root's, on the same file system) look like this one.
    // nlink_t is u64 on x86_64 and u32 on aarch64.
    #[allow(clippy::useless_conversion)]
    let links = u64::from(found.stat.st_nlink);
    if links != 1 {
        return Err(refused(&found.path, Why::HardLinks(links)));
    }
    if found.stat.st_size < 0 || found.stat.st_size as u64 > max {
        return Err(refused(&found.path, Why::TooLarge { max }));
    }
    read_bounded(found.fd, &found.path, max)
}

// ------------------------------------------------------------------------------------------------
// Walking an absolute path.

/// How a walk ended.
#[derive(Debug)]
pub enum Walked {
    Found(Found),
    /// A component does not exist; `deepest` is the last directory reached.
    Missing {
        deepest: Dir,
    },
}

/// The components of `path` as names to open, `..` kept (it pops a directory already opened).
fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

/// Opens the absolute `path` as `kind`, from `/`, one component at a time: each opened with
/// `O_NOFOLLOW` relative to the one before, a symlink followed only when root made it in a
/// directory only root may write, each entry owned by `runner` or root when given.
pub fn walk(path: &Path, runner: Option<u32>, kind: Kind) -> io::Result<Walked> {
    if !path.is_absolute() {
        return Err(refused(path, Why::NotAbsolute));
    }
    let mut stack = vec![Dir::root()?];
    let mut todo = components(path);
    let mut links = 0;
    loop {
        let Some(name) = todo.pop_front() else {
            // The path ends on a directory already opened: `/`, or after a `..`.
            let dir = stack.pop().expect("the root stays on the stack");
            if kind != Kind::Dir {
                return Err(refused(&dir.path, Why::WrongType { found: "a directory", wanted: kind }));
            }
            let stat = dir.stat()?;
            return Ok(Walked::Found(Found { fd: dir.fd, stat, path: dir.path }));
        };
        if name == ".." {
            if stack.len() > 1 {
                stack.pop();
            }
            continue;
        }
        let last = todo.is_empty();
        let want = if last { kind } else { Kind::Dir };
        let parent = stack.last().expect("the root stays on the stack");
        let here = parent.path.join(&name);
        match parent.step(&name, want)? {
            Step::Missing => {
                return Ok(Walked::Missing { deepest: stack.pop().expect("the root stays on the stack") })
            }
            Step::Opened(fd, stat) => {
                check_owner(&here, &stat, runner)?;
                if last {
                    return Ok(Walked::Found(Found { fd, stat, path: here }));
                }
                stack.push(Dir { fd, path: here });
            }
            Step::Link(link) => {
                if link.st_uid != 0 || !parent.holds_only_roots_links()? {
                    return Err(refused(&here, Why::Symlink));
                }
                links += 1;
                if links > MAX_LINKS {
                    return Err(refused(path, Why::TooManyLinks));
                }
                let target = nix::fcntl::readlinkat(&parent.fd, name.as_os_str())
                    .map_err(|e| at(&here, "reading the link", errno_io(e)))?;
                let target = PathBuf::from(target);
                if target.is_absolute() {
                    stack.truncate(1);
                }
                for c in components(&target).into_iter().rev() {
                    todo.push_front(c);
                }
            }
        }
    }
}

/// Reads the regular file at the absolute `path` (see [`walk`]): at most `max` bytes, one
/// link, owned by `runner` or root when given. `None` when it or a directory on the way does
/// not exist.
pub fn read_file(path: &Path, runner: Option<u32>, max: u64) -> io::Result<Option<Vec<u8>>> {
    match walk(path, runner, Kind::File)? {
        Walked::Found(found) => read_found(found, max).map(Some),
        Walked::Missing { .. } => Ok(None),
    }
}

/// The socket at the absolute `path` (see [`walk`]), opened `O_PATH`: connect to
/// `/proc/self/fd/N` to reach exactly this inode, whatever the name points to by then.
/// `None` when it or a directory on the way does not exist.
pub fn open_socket(path: &Path, runner: Option<u32>) -> io::Result<Option<Found>> {
    match walk(path, runner, Kind::Socket)? {
        Walked::Found(found) => Ok(Some(found)),
        Walked::Missing { .. } => Ok(None),
    }
}

/// The path through which `found` (an `O_PATH` socket) is connected to.
pub fn proc_path(found: &Found) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", found.fd.as_raw_fd()))
}

/// Helpers for the unit tests of modules that read the runner user's files.
#[cfg(test)]
pub(crate) mod test_support {
    use std::path::Path;

    /// A symlink as the runner user makes it: its own. (Root's own links in root's
    /// directories are followed; tests that run as another user make that user's.)
    pub fn users_symlink(target: impl AsRef<Path>, link: &Path) {
        std::os::unix::fs::symlink(target, link).unwrap();
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::lchown(link, Some(1000), Some(1000)).unwrap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn why(e: io::Error) -> Why {
        refusal(&e).unwrap_or_else(|| panic!("not a refusal: {e}")).why.clone()
    }

    use super::test_support::users_symlink;

    #[test]
    fn reads_a_small_file_and_refuses_a_larger_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pause.pid");
        std::fs::write(&path, "4242\n").unwrap();
        assert_eq!(read_file(&path, None, 64).unwrap().unwrap(), b"4242\n");
        assert_eq!(read_file(&path, None, 5).unwrap().unwrap(), b"4242\n");
        let e = read_file(&path, None, 4).unwrap_err();
        assert_eq!(e.to_string(), format!("refusing {}: it is larger than 4 bytes", path.display()));
        assert_eq!(read_file(&dir.path().join("missing"), None, 4).unwrap(), None);
        assert_eq!(read_file(&dir.path().join("missing/deeper/file"), None, 4).unwrap(), None);
    }

    #[test]
    fn messages_state_facts() {
        let p = Path::new("/run/user/1000/libpod/tmp/pause.pid");
        let text = |why| refused(p, why).to_string();
        assert_eq!(
            text(Why::Symlink),
            "refusing /run/user/1000/libpod/tmp/pause.pid: it is a symlink (root follows no link the \
             runner user could have made)"
        );
        assert_eq!(
            text(Why::WrongType { found: "a FIFO", wanted: Kind::File }),
            "refusing /run/user/1000/libpod/tmp/pause.pid: it is a FIFO, not a regular file"
        );
        assert_eq!(
            text(Why::Owner { uid: 4243, runner: 1000 }),
            "refusing /run/user/1000/libpod/tmp/pause.pid: owned by UID 4243, not the runner user (UID 1000) \
             or root"
        );
        assert_eq!(
            text(Why::TooLarge { max: 64 }),
            "refusing /run/user/1000/libpod/tmp/pause.pid: it is larger than 64 bytes"
        );
    }

    #[test]
    fn a_symlinked_file_is_refused_without_reading_its_target() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("shadow");
        std::fs::write(&secret, "root:$6$secret\n").unwrap();
        let link = dir.path().join("pause.pid");
        users_symlink(&secret, &link);
        let e = read_file(&link, None, 64).unwrap_err();
        assert_eq!(why(e), Why::Symlink);
        // Also a dangling one, and a link in the middle of the path.
        users_symlink("/nonexistent", &dir.path().join("dangling"));
        assert_eq!(why(read_file(&dir.path().join("dangling"), None, 64).unwrap_err()), Why::Symlink);
        std::fs::create_dir(dir.path().join("real")).unwrap();
        std::fs::write(dir.path().join("real/pause.pid"), "1").unwrap();
        users_symlink("real", &dir.path().join("tmp"));
        let e = read_file(&dir.path().join("tmp/pause.pid"), None, 64).unwrap_err();
        let r = refusal(&e).unwrap().clone();
        assert_eq!((r.path, r.why), (dir.path().join("tmp"), Why::Symlink));
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    #[test]
    fn a_fifo_fails_at_once_instead_of_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pause.pid");
        nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o644)).unwrap();
        // Without O_NONBLOCK the open would wait for a writer forever: run it on a thread
        // and give it a bound.
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || tx.send(read_file(&path, None, 64)).unwrap());
        let outcome = rx.recv_timeout(std::time::Duration::from_secs(5)).expect("reading a FIFO blocked");
        let e = outcome.unwrap_err();
        assert_eq!(why(e), Why::WrongType { found: "a FIFO", wanted: Kind::File });
        assert_eq!(
            read_file(&fifo, None, 64).unwrap_err().to_string(),
            format!("refusing {}: it is a FIFO, not a regular file", fifo.display())
        );
    }

    #[test]
    fn wrong_types_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let sock = dir.path().join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert_eq!(
            why(read_file(&sub, None, 64).unwrap_err()),
            Why::WrongType { found: "a directory", wanted: Kind::File }
        );
        assert_eq!(
            why(read_file(&sock, None, 64).unwrap_err()),
            Why::WrongType { found: "a socket", wanted: Kind::File }
        );
        assert_eq!(
            why(Dir::open(&file, None).unwrap_err()),
            Why::WrongType { found: "a regular file", wanted: Kind::Dir }
        );
        assert_eq!(
            why(read_file(&file.join("below"), None, 64).unwrap_err()),
            Why::WrongType { found: "a regular file", wanted: Kind::Dir }
        );
        assert_eq!(
            why(open_socket(&file, None).unwrap_err()),
            Why::WrongType { found: "a regular file", wanted: Kind::Socket }
        );
        assert_eq!(
            why(open_socket(&sub, None).unwrap_err()),
            Why::WrongType { found: "a directory", wanted: Kind::Socket }
        );
        let found = open_socket(&sock, None).unwrap().unwrap();
        assert_eq!(file_type(&found.stat), SFlag::S_IFSOCK);
        assert_eq!(why(read_file(Path::new("relative/file"), None, 64).unwrap_err()), Why::NotAbsolute);
        assert_eq!(
            why(read_file(Path::new("/"), None, 64).unwrap_err()),
            Why::WrongType { found: "a directory", wanted: Kind::File }
        );
    }

    #[test]
    fn hard_links_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, "secret").unwrap();
        std::fs::hard_link(&a, dir.path().join("b")).unwrap();
        let e = read_file(&dir.path().join("b"), None, 64).unwrap_err();
        assert_eq!(why(e), Why::HardLinks(2));
    }

    #[test]
    fn owners_other_than_the_runner_and_root_are_refused() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to give files away");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let user_dir = dir.path().join("1000");
        std::fs::create_dir(&user_dir).unwrap();
        let file = user_dir.join("pause.pid");
        std::fs::write(&file, "7").unwrap();
        std::os::unix::fs::chown(&user_dir, Some(1000), Some(1000)).unwrap();
        std::os::unix::fs::chown(&file, Some(1000), Some(1000)).unwrap();
        // The runner's and root's entries pass.
        assert_eq!(read_file(&file, Some(1000), 64).unwrap().unwrap(), b"7");
        // Another user's file or directory on the way does not.
        let e = read_file(&file, Some(1001), 64).unwrap_err();
        let r = refusal(&e).unwrap();
        assert_eq!((&r.path, &r.why), (&user_dir, &Why::Owner { uid: 1000, runner: 1001 }));
        std::os::unix::fs::chown(&user_dir, Some(0), Some(0)).unwrap();
        std::os::unix::fs::chown(&file, Some(4243), Some(0)).unwrap();
        let e = read_file(&file, Some(1000), 64).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("refusing {}: owned by UID 4243, not the runner user (UID 1000) or root", file.display())
        );
        // Without a runner UID the owner is not asked.
        assert!(read_file(&file, None, 64).is_ok());
    }

    #[test]
    fn roots_links_in_roots_directories_are_followed_the_users_are_not() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to make root's and another user's links");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let real = dir.path().join("var/home/core");
        std::fs::create_dir_all(&real).unwrap();
        std::fs::write(real.join("f"), "ok").unwrap();
        // Root's relative link, like FCOS's /home -> var/home.
        symlink("var/home", dir.path().join("home")).unwrap();
        assert_eq!(read_file(&dir.path().join("home/core/f"), Some(1000), 64).unwrap().unwrap(), b"ok");
        // `..` in a link's target and in the path work on the directories already opened.
        symlink("../home/core", dir.path().join("var/up")).unwrap();
        assert_eq!(read_file(&dir.path().join("var/up/f"), None, 64).unwrap().unwrap(), b"ok");
        assert_eq!(read_file(&dir.path().join("var/home/../home/core/f"), None, 64).unwrap().unwrap(), b"ok");
        // The same link made by the user is refused...
        let user_link = dir.path().join("mine");
        users_symlink("var/home", &user_link);
        assert_eq!(why(read_file(&user_link.join("core/f"), None, 64).unwrap_err()), Why::Symlink);
        // ...and so is root's link in a directory the user owns or others may write.
        std::os::unix::fs::chown(&real, Some(1000), Some(1000)).unwrap();
        symlink("f", real.join("g")).unwrap();
        assert_eq!(why(read_file(&real.join("g"), None, 64).unwrap_err()), Why::Symlink);
        std::os::unix::fs::chown(&real, Some(0), Some(0)).unwrap();
        std::fs::set_permissions(&real, std::os::unix::fs::PermissionsExt::from_mode(0o1777)).unwrap();
        assert_eq!(why(read_file(&real.join("g"), None, 64).unwrap_err()), Why::Symlink);
        std::fs::set_permissions(&real, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        assert_eq!(read_file(&real.join("g"), None, 64).unwrap().unwrap(), b"ok");
        // A loop ends.
        symlink("loop", dir.path().join("loop")).unwrap();
        assert_eq!(why(read_file(&dir.path().join("loop"), None, 64).unwrap_err()), Why::TooManyLinks);
    }

    #[test]
    fn the_nearest_existing_ancestor_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let (d, exact) = Dir::open_or_ancestor(&dir.path().join("a/b/storage"), None).unwrap();
        assert_eq!((d.path.as_path(), exact), (dir.path(), false));
        let (d, exact) = Dir::open_or_ancestor(dir.path(), None).unwrap();
        assert_eq!((d.path.as_path(), exact), (dir.path(), true));
        assert!(Dir::open(&dir.path().join("a"), None).unwrap().is_none());
        users_symlink("/etc", &dir.path().join("storage"));
        assert_eq!(why(Dir::open_or_ancestor(&dir.path().join("storage"), None).unwrap_err()), Why::Symlink);
    }

    #[test]
    fn names_that_are_not_one_component_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = Dir::open(dir.path(), None).unwrap().unwrap();
        for bad in ["..", ".", "", "a/b"] {
            assert_eq!(why(d.read_file(bad, None, 64).unwrap_err()), Why::NotAName, "{bad:?}");
        }
        std::fs::write(dir.path().join("x"), "1").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        assert_eq!(d.read_file("x", None, 64).unwrap().unwrap(), b"1");
        assert_eq!(d.read_file("y", None, 64).unwrap(), None);
        assert!(d.is_dir_at(OsStr::new("sub")) && !d.is_dir_at(OsStr::new("x")));
        assert!(!d.is_dir_at(OsStr::new("missing")));
    }

    #[test]
    fn refusals_are_found_in_error_chains() {
        let e = anyhow::Error::from(refused(Path::new("/x"), Why::Symlink)).context("reading /x");
        assert_eq!(refusal_in(&e).map(|r| r.why.clone()), Some(Why::Symlink));
        assert!(refusal_in(&anyhow::anyhow!("other")).is_none());
    }
}
