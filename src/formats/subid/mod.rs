//! Subordinate ID ranges: parse /etc/subuid and /etc/subgid, allocate like shadow-utils, and write them safely.
//!
//! Existing lines are never rewritten: the only change ever made is one appended
//! `name:start:count` line (plus a newline before it if the file lacked a final one).
//! Everything that decides what to write is pure ([`SubidFile::parse`], [`allocate`],
//! [`append_entry`]); [`ensure`] adds shadow-utils' locks, the `<file>-` backup and an
//! atomic replacement around it.

mod allocate;
mod lock;
mod login_defs;
mod parse;
#[cfg(test)]
mod tests;

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::fsutil::{self, FileMeta};
use crate::paths::Root;

pub use allocate::{allocate, is_owned_by, Allocation};
pub use lock::LockHolder;
pub use parse::{append_entry, Entry, LineProblem, SubidFile, MAX_LINE};

/// Which of the two files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IdKind {
    Uid,
    Gid,
}

impl IdKind {
    /// The node path of the file.
    pub fn file_name(self) -> &'static str {
        match self {
            IdKind::Uid => "/etc/subuid",
            IdKind::Gid => "/etc/subgid",
        }
    }

    /// `SUB_UID` or `SUB_GID`, the prefix of the login.defs keys.
    pub fn login_defs_prefix(self) -> &'static str {
        match self {
            IdKind::Uid => "SUB_UID",
            IdKind::Gid => "SUB_GID",
        }
    }
}

/// The user whose ranges we manage; lines may name it by `name` or by decimal `uid`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunnerUser {
    pub name: String,
    pub uid: u32,
}

/// `count` IDs from `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct IdRange {
    pub start: u32,
    pub count: u32,
}

impl IdRange {
    /// One past the last ID.
    pub fn end(self) -> u64 {
        u64::from(self.start) + u64::from(self.count)
    }
}

/// As in the file: `start:count`.
impl fmt::Display for IdRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.start, self.count)
    }
}

/// Where new ranges may go (`min..=max`) and login.defs' default size, which is informational.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Limits {
    pub min: u32,
    pub max: u32,
    pub count: u32,
}

/// What the step sees and would change, without taking a lock or writing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubidView {
    pub file: PathBuf,
    pub owned: Vec<IdRange>,
    pub would_add: Option<IdRange>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum EnsureOutcome {
    AlreadyPresent { owned: Vec<IdRange> },
    Added { range: IdRange },
}

#[derive(Debug, thiserror::Error)]
pub enum SubidError {
    #[error("{}:{line}: {problem}", path.display())]
    Malformed { path: PathBuf, line: usize, problem: LineProblem },
    #[error("refusing symlinked {}", path.display())]
    Symlink { path: PathBuf },
    #[error("{}: the runner user's {ours} overlaps {theirs}, which belongs to another owner; fix the file by hand", path.display())]
    Overlap { path: PathBuf, ours: String, theirs: String },
    #[error("{}: no free range of {count} IDs in {min}..{max}", path.display())]
    Exhausted { path: PathBuf, count: u32, min: u32, max: u32 },
    #[error("the number of subordinate IDs to ensure must be at least 1")]
    InvalidCount,
    #[error("runner user name {name:?} cannot be written to a subordinate ID file: {reason}")]
    InvalidUser { name: String, reason: &'static str },
    #[error("{}:{line}: {key} {value:?} is not a number from 0 to 4294967295", path.display())]
    LoginDefs { path: PathBuf, line: usize, key: String, value: String },
    #[error("{}: {prefix}_MIN ({min}) is above {prefix}_MAX ({max})", path.display())]
    LimitsInverted { path: PathBuf, prefix: &'static str, min: u32, max: u32 },
    #[error("{} is locked by {holder} (waited {waited:.1?})", path.display())]
    Locked { path: PathBuf, holder: LockHolder, waited: Duration },
    #[error("{op} {}: {source}", path.display())]
    Io { op: &'static str, path: PathBuf, source: io::Error },
}

/// Reads and plans without locking: a view for status pages and dry runs.
pub fn inspect(root: &Root, kind: IdKind, user: &RunnerUser, count: u32) -> Result<SubidView, SubidError> {
    check_user(user)?;
    let limits = Limits::from_login_defs(root, kind)?;
    let path = root.join(kind.file_name());
    let current = read_current(&path)?;
    let bytes = current.as_ref().map_or(&[][..], |(bytes, _)| bytes);
    let plan = allocate(&SubidFile::parse(&path, bytes)?, user, count, &limits)?;
    Ok(SubidView { file: path, owned: plan.owned, would_add: plan.add })
}

/// Makes `user` own at least `count` IDs in the file, appending one range if needed.
/// Reads, plans and writes only under shadow-utils' locks, waiting at most `lock_timeout`.
pub fn ensure(
    root: &Root,
    kind: IdKind,
    user: &RunnerUser,
    count: u32,
    lock_timeout: Duration,
) -> Result<EnsureOutcome, SubidError> {
    check_user(user)?;
    let limits = Limits::from_login_defs(root, kind)?;
    let path = root.join(kind.file_name());
    let lock = lock::ShadowLock::acquire(root, &path, lock_timeout)?;
    failpoint("subid-after-lock", &path)?;
    let backup = lock::with_suffix(&path, "-");
    // Only we write these two files under this lock, so a temporary file of ours here is
    // an orphan of a run that was killed mid-write.
    remove_orphaned_temps(&path)?;
    remove_orphaned_temps(&backup)?;
    let current = read_current(&path)?;
    let bytes = current.as_ref().map_or(&[][..], |(bytes, _)| bytes);
    let plan = allocate(&SubidFile::parse(&path, bytes)?, user, count, &limits)?;
    let Some(range) = plan.add else {
        return Ok(EnsureOutcome::AlreadyPresent { owned: plan.owned });
    };
    let contents = append_entry(bytes, &user.name, range);
    let meta = match &current {
        // Like shadow-utils: the backup is the previous file with its owner, mode and label.
        Some((old, meta)) => {
            fsutil::replace_file_with_meta(&backup, old, meta)
                .map_err(|e| io_error("replacing", &backup, e))?;
            failpoint("subid-after-backup", &backup)?;
            meta.clone()
        }
        None => FileMeta::new_file(0o644),
    };
    fsutil::replace_file_with_meta(&path, &contents, &meta).map_err(|e| io_error("replacing", &path, e))?;
    failpoint("subid-before-unlock", &path)?;
    drop(lock);
    Ok(EnsureOutcome::Added { range })
}

fn failpoint(name: &'static str, path: &Path) -> Result<(), SubidError> {
    fsutil::failpoint(name).map_err(|source| SubidError::Io { op: name, path: path.to_owned(), source })
}

fn remove_orphaned_temps(path: &Path) -> Result<(), SubidError> {
    let removed = fsutil::remove_orphaned_temps(path).map_err(|source| SubidError::Io {
        op: "cleaning up after an interrupted write to",
        path: path.to_owned(),
        source,
    })?;
    for orphan in removed {
        tracing::warn!("removed {}, left by an interrupted write", orphan.display());
    }
    Ok(())
}

/// A name with `:` or a line break would corrupt the file; one starting with `#` would
/// make our line a comment.
fn check_user(user: &RunnerUser) -> Result<(), SubidError> {
    let reason = if user.name.is_empty() {
        "it is empty"
    } else if user.name.contains([':', '\n', '\r', '\0']) {
        "it contains ':', a line break or NUL"
    } else if user.name.starts_with('#') {
        "it starts with '#'"
    } else {
        return Ok(());
    };
    Err(SubidError::InvalidUser { name: user.name.clone(), reason })
}

/// The file's bytes and metadata, `None` if it does not exist. Never follows a symlink.
fn read_current(path: &Path) -> Result<Option<(Vec<u8>, FileMeta)>, SubidError> {
    let Some(mut file) = fsutil::open_regular_nofollow(path).map_err(|e| io_error("opening", path, e))?
    else {
        return Ok(None);
    };
    let read = |file: &mut File| -> io::Result<(Vec<u8>, FileMeta)> {
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok((bytes, FileMeta::of(file)?))
    };
    read(&mut file).map(Some).map_err(|source| SubidError::Io {
        op: "reading",
        path: path.to_owned(),
        source,
    })
}

fn io_error(op: &'static str, path: &Path, source: io::Error) -> SubidError {
    if fsutil::is_symlink_refusal(&source) {
        SubidError::Symlink { path: path.to_owned() }
    } else {
        SubidError::Io { op, path: path.to_owned(), source }
    }
}
