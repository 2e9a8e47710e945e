//! The user namespace rootless Podman really uses, and the setuid helpers that build it.
//!
//! `subuid-mapping`: Podman keeps one user namespace per user alive in its pause process
//! (`$XDG_RUNTIME_DIR/libpod/tmp/pause.pid`, Podman 4.x and 5.x alike). Its
//! `/proc/PID/uid_map` must be `0 UID 1` plus the user's ranges from /etc/subuid (and
//! likewise for GIDs). A single line means newuidmap refused the ranges (the shadow-utils
//! missing-newline bug, or no range at all); other ranges mean they changed after Podman
//! started. The repair is `podman system migrate`, run by the user's manager, then a fresh
//! `podman system service` so that the API serves from the new namespace too.
//!
//! `newuidmap`: `newuidmap`/`newgidmap` exist and may do their job: setuid root (Debian) or
//! a file capability `cap_setuid`/`cap_setgid` (Fedora CoreOS). Nothing to repair.

use anyhow::{bail, Context as _, Result};
use std::fmt;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{CheckSpec, Context, Inspection, Spec, Step};
use crate::checks::Observation;
use crate::idmap::*;
use crate::subid::{self, IdKind, IdRange};
use crate::{user_manager, userfs};

pub const MAPPING_CHECK: &str = "subuid-mapping";
pub const HELPERS_CHECK: &str = "newuidmap";

/// Where Podman 4.x (libpod tmp dir under the runtime dir) and 5.x (fixed) keep the PID of
/// the rootless pause process, relative to `$XDG_RUNTIME_DIR`.
pub const PAUSE_PID_FILE: &str = "libpod/tmp/pause.pid";
/// The pause process: catatonit when installed, else Podman's own "podman pause".
const PAUSE_NAMES: [&str; 2] = ["catatonit", "podman pause"];
/// Where Podman finds newuidmap on the user's PATH; the first hit wins.
pub const HELPER_DIRS: [&str; 3] = ["/usr/bin", "/usr/sbin", "/bin"];
/// How long `podman system migrate` may take.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(120);

// ------------------------------------------------------------------------------------------------
// Reading the live namespace.

/// What the pause PID file leads to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Namespace {
    /// No pause process: Podman has not run since boot (or since a migrate).
    None {
        why: String,
    },
    Running {
        pid: u32,
        uid_map: Vec<MapLine>,
        gid_map: Vec<MapLine>,
    },
}

/// Bound on `pause.pid`: a PID and a newline.
pub const MAX_PID_FILE: u64 = 64;
/// Bound on `/proc/PID/status` (about 1.5 KiB).
const MAX_STATUS: u64 = 64 * 1024;
/// Bound on `/proc/PID/uid_map` and `gid_map`: at most 340 lines of three numbers.
const MAX_MAP: u64 = 64 * 1024;

/// Reads `/proc/PID/<name>`, at most `max` bytes; the reader differs between root and the
/// user. `NotFound` when the process is gone (or hidden from this reader).
#[allow(async_fn_in_trait)]
pub trait ProcReader {
    async fn read(&self, pid: u32, name: &str, max: u64) -> io::Result<String>;
}

fn not_found() -> io::Error {
    io::ErrorKind::NotFound.into()
}

/// Root reading the given proc directory (`/proc`, or a fake one in tests), through
/// [`userfs`]: no symlink followed, regular files only, bounded.
pub struct DirectReader<'a> {
    pub proc: &'a Path,
}

impl ProcReader for DirectReader<'_> {
    async fn read(&self, pid: u32, name: &str, max: u64) -> io::Result<String> {
        let path = self.proc.join(pid.to_string()).join(name);
        let bytes = userfs::read_file(&path, None, max)?.ok_or_else(not_found)?;
        // A process names itself (prctl): its bytes need not be UTF-8.
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// The effective UID and the name (`comm`) from `/proc/PID/status`.
pub fn parse_status(text: &str) -> Option<(u32, String)> {
    let (mut uid, mut name) = (None, None);
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("Name:") {
            name = Some(v.strip_prefix('\t').unwrap_or(v).to_string());
        } else if let Some(v) = line.strip_prefix("Uid:") {
            // Real, effective, saved, file system.
            uid = v.split_whitespace().nth(1).and_then(|u| u.parse().ok());
        }
    }
    Some((uid?, name?))
}

/// Finds the pause process of `uid` from `pid_file` and reads its maps with `reader`.
/// `pid_file` is the runner user's to write: it is read through [`userfs`] (no symlink, a
/// regular file of the user's or root's, at most [`MAX_PID_FILE`] bytes) and its content is
/// never shown. A PID file naming a process that is gone, another user's process (root's,
/// say: nothing more of it is read), or one that is not a pause process is stale: Podman
/// makes a new namespace on its next run.
pub async fn read_namespace<R: ProcReader, F: ProcReader>(
    pid_file: &Path,
    uid: u32,
    reader: &R,
    fallback: Option<&F>,
) -> Result<Namespace> {
    let bytes = match userfs::read_file(pid_file, Some(uid), MAX_PID_FILE)? {
        Some(bytes) => bytes,
        None => return Ok(Namespace::None { why: format!("no {}", pid_file.display()) }),
    };
    let pid: u32 = std::str::from_utf8(&bytes)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .filter(|pid| *pid > 0)
        .ok_or_else(|| {
            anyhow::anyhow!("{} does not hold a PID ({} bytes)", pid_file.display(), bytes.len())
        })?;
    let stale = |why: String| Namespace::None { why: format!("stale {} ({why})", pid_file.display()) };
    match reader.read(pid, "status", MAX_STATUS).await {
        Ok(status) => return judge_process(reader, pid, uid, &status).await.map(|r| r.unwrap_or_else(stale)),
        // ProtectProc=invisible hides other users' processes from a root without
        // CAP_SYS_PTRACE; the user still sees its own.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading /proc/{pid}")),
    }
    let Some(fallback) = fallback else { return Ok(stale(format!("PID {pid} is not running"))) };
    match fallback.read(pid, "status", MAX_STATUS).await {
        Ok(status) => judge_process(fallback, pid, uid, &status).await.map(|r| r.unwrap_or_else(stale)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(stale(format!("PID {pid} is not running"))),
        Err(e) => Err(e).with_context(|| format!("reading /proc/{pid} as the runner user")),
    }
}

/// The namespace of process `pid` whose `status` was read, or why it is not the user's
/// pause process (`Err` of the inner result: the PID file is stale).
async fn judge_process<R: ProcReader>(
    reader: &R,
    pid: u32,
    uid: u32,
    status: &str,
) -> Result<Result<Namespace, String>> {
    let Some((owner, comm)) = parse_status(status) else {
        bail!("/proc/{pid}/status has no Uid or Name line");
    };
    // Checked before anything else of the process is read.
    if owner != uid {
        return Ok(Err(format!("PID {pid} belongs to UID {owner}, not the runner user (UID {uid})")));
    }
    if !PAUSE_NAMES.contains(&comm.as_str()) {
        let comm = crate::text::one_line(&comm, 32);
        return Ok(Err(format!("PID {pid} is {comm:?}, not Podman's pause process")));
    }
    let mut maps = Vec::with_capacity(2);
    for name in ["uid_map", "gid_map"] {
        let text = match reader.read(pid, name, MAX_MAP).await {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Err(format!("PID {pid} is not running")))
            }
            Err(e) => return Err(e).with_context(|| format!("reading /proc/{pid}/{name}")),
        };
        maps.push(parse_id_map(&text).map_err(|e| anyhow::anyhow!("/proc/{pid}/{name}: {e}"))?);
    }
    let gid_map = maps.pop().expect("two maps");
    let uid_map = maps.pop().expect("two maps");
    // Maps are written once, by newuidmap, right after the namespace is made.
    if uid_map.is_empty() || gid_map.is_empty() {
        return Ok(Ok(Namespace::None { why: format!("PID {pid}'s user namespace is still being set up") }));
    }
    if is_identity(&uid_map) {
        return Ok(Err(format!("PID {pid} is not in a user namespace")));
    }
    Ok(Ok(Namespace::Running { pid, uid_map, gid_map }))
}

/// Reads `/proc/PID/<name>` as the runner user (`cat` run with the user's IDs), its output
/// bounded like every helper's.
struct AsUser<'a> {
    cx: &'a Context,
}

impl ProcReader for AsUser<'_> {
    async fn read(&self, pid: u32, name: &str, max: u64) -> io::Result<String> {
        let path = format!("/proc/{pid}/{name}");
        let cat = HELPER_DIRS.iter().map(|d| Path::new(d).join("cat")).find(|p| p.is_file());
        let cat =
            cat.ok_or_else(|| io::Error::new(io::ErrorKind::Unsupported, "no cat in /usr/bin or /bin"))?;
        let mut cmd = self.cx.user.command(&cat).map_err(io::Error::other)?;
        cmd.arg("--").arg(&path).stdin(std::process::Stdio::null());
        let limit = usize::try_from(max).unwrap_or(usize::MAX);
        let output =
            tokio::time::timeout(Duration::from_secs(5), user_manager::output_bounded(&mut cmd, limit, 4096))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("reading {path} as the user")))?
                .map_err(|e| io::Error::new(e.kind(), format!("reading {path} as the user: {e}")))?;
        if output.status.success() {
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        let reason = output.reason();
        let kind =
            if reason.contains("No such file") { io::ErrorKind::NotFound } else { io::ErrorKind::Other };
        Err(io::Error::new(kind, format!("{path}: {reason}")))
    }
}

/// The ranges the files give the user, and whether a file lacks its final newline (which
/// shadow-utils 4.19+ answers by ignoring the last line).
struct Expected {
    uids: Vec<IdRange>,
    gids: Vec<IdRange>,
    hints: Vec<String>,
}

fn expected(cx: &Context) -> Result<Expected> {
    let user = cx.user.as_subid_owner();
    let mut hints = Vec::new();
    let mut get = |kind: IdKind| -> Result<Vec<IdRange>> {
        let view = subid::inspect(&cx.root, kind, &user, cx.settings.subids.count)?;
        if let Ok(bytes) = std::fs::read(&view.file) {
            if bytes.last().is_some_and(|b| *b != b'\n') {
                hints.push(format!(
                    "{} does not end with a newline: shadow-utils 4.19+ ignores its last line",
                    kind.file_name()
                ));
            }
        }
        Ok(view.owned)
    };
    let uids = get(IdKind::Uid)?;
    let gids = get(IdKind::Gid)?;
    Ok(Expected { uids, gids, hints })
}

/// The outcome of comparing the live namespace with the files.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Mapping {
    NoNamespace(String),
    Matches(u32),
    Differs { pid: u32, detail: String, files_have_ranges: bool },
}

fn judge(cx: &Context, namespace: Namespace, want: &Expected) -> Mapping {
    let (pid, uid_map, gid_map) = match namespace {
        Namespace::None { why } => return Mapping::NoNamespace(why),
        Namespace::Running { pid, uid_map, gid_map } => (pid, uid_map, gid_map),
    };
    let mut problems = Vec::new();
    for (word, file, id, map, ranges) in [
        ("uid_map", "/etc/subuid", cx.user.uid, &uid_map, &want.uids),
        ("gid_map", "/etc/subgid", cx.user.gid, &gid_map, &want.gids),
    ] {
        if let Err(m) = compare_map(id, map, ranges) {
            problems.push(format!("{word} {}; {file} gives {} {}", m.mapped, cx.user.name, m.expected));
        }
    }
    if problems.is_empty() {
        return Mapping::Matches(pid);
    }
    let mut detail = format!("Podman's user namespace (pause PID {pid}): {}", problems.join("; "));
    for hint in &want.hints {
        detail.push_str(&format!(" ({hint})"));
    }
    Mapping::Differs { pid, detail, files_have_ranges: !want.uids.is_empty() && !want.gids.is_empty() }
}

fn pause_pid_file(cx: &Context) -> PathBuf {
    cx.user.runtime_dir().join(PAUSE_PID_FILE)
}

async fn see_mapping(cx: &Context) -> Result<Mapping> {
    let want = expected(cx)?;
    let direct = DirectReader { proc: Path::new("/proc") };
    let as_user = AsUser { cx };
    let pid_file = pause_pid_file(cx);
    let namespace = read_namespace(&pid_file, cx.user.uid, &direct, Some(&as_user)).await?;
    Ok(judge(cx, namespace, &want))
}

fn mapping_observation(cx: &Context, seen: &Result<Mapping>, plan: &mut Vec<String>) -> Observation {
    match seen {
        Err(e) => Observation::fail(MAPPING_CHECK, crate::journal::detail(e)),
        Ok(Mapping::NoNamespace(why)) => {
            Observation::pass(MAPPING_CHECK, format!("no rootless user namespace yet ({why})"))
        }
        Ok(Mapping::Matches(pid)) => Observation::pass(
            MAPPING_CHECK,
            format!(
                "Podman's user namespace (pause PID {pid}) maps {}'s ranges from /etc/subuid and /etc/subgid",
                cx.user.name
            ),
        ),
        Ok(Mapping::Differs { detail, files_have_ranges, .. }) => {
            if *files_have_ranges {
                plan.push(format!(
                    "run podman system migrate as {} and restart {} (stops running containers)",
                    cx.user.name, cx.settings.podman.socket_unit
                ));
            }
            Observation::fail(MAPPING_CHECK, detail.clone())
        }
    }
}

// ------------------------------------------------------------------------------------------------
// newuidmap / newgidmap

/// What was found for one helper.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelperReport {
    pub name: &'static str,
    pub outcome: Result<(PathBuf, Privilege), String>,
}

impl fmt::Display for HelperReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Ok((path, Privilege::SetuidRoot)) => write!(f, "{} (setuid root)", path.display()),
            Ok((path, Privilege::FileCap)) => {
                let cap = if self.name == "newuidmap" { "cap_setuid" } else { "cap_setgid" };
                write!(f, "{} ({cap}=ep)", path.display())
            }
            Err(e) => write!(f, "{e}"),
        }
    }
}

fn read_file_caps(path: &Path) -> Option<Result<FileCaps, String>> {
    let name = c"security.capability";
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let mut buf = [0u8; 64];
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes; both strings are NUL-terminated.
    let len = unsafe { libc::getxattr(cpath.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) | Some(libc::ENOTSUP) => None,
            _ => Some(Err(e.to_string())),
        };
    }
    Some(parse_vfs_cap(&buf[..len as usize]))
}

/// Looks for `name` in `dirs` (under `root`) and judges the first one found.
pub fn find_helper(
    root: &crate::paths::Root,
    dirs: &[&str],
    name: &'static str,
    cap: u32,
    user: (u32, u32),
) -> HelperReport {
    for dir in dirs {
        let path = root.join(dir).join(name);
        let Ok(md) = std::fs::metadata(&path) else { continue };
        let shown = Path::new(dir).join(name);
        let caps = if md.is_file() { read_file_caps(&path) } else { None };
        let outcome = judge_helper(md.mode(), md.uid(), md.gid(), md.is_file(), caps, cap, user)
            .map(|p| (shown.clone(), p))
            .map_err(|e| format!("{} {e}", shown.display()));
        return HelperReport { name, outcome };
    }
    HelperReport { name, outcome: Err(format!("{name} is not installed (looked in {})", dirs.join(", "))) }
}

fn helpers_observation(cx: &Context) -> Observation {
    let user = (cx.user.uid, cx.user.gid);
    let reports = [
        find_helper(&cx.root, &HELPER_DIRS, "newuidmap", CAP_SETUID, user),
        find_helper(&cx.root, &HELPER_DIRS, "newgidmap", CAP_SETGID, user),
    ];
    let detail = reports.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("; ");
    if reports.iter().all(|r| r.outcome.is_ok()) {
        Observation::pass(HELPERS_CHECK, detail)
    } else {
        Observation::fail(HELPERS_CHECK, format!("{detail} (rootless Podman cannot map subordinate IDs)"))
    }
}

// ------------------------------------------------------------------------------------------------

pub const SPEC: Spec = Spec {
    name: "id-mapping",
    checks: &[CheckSpec::required(MAPPING_CHECK), CheckSpec::required(HELPERS_CHECK)],
    needs_live_system: true,
    after: &[Step::SubIds, Step::PodmanSocket],
    // A migrate with a broken subuid file would only make things worse.
    requires: &[Step::SubIds, Step::Linger, Step::PodmanSocket],
    repairs: super::always,
};

pub async fn inspect(cx: &Context) -> Inspection {
    let mut plan = Vec::new();
    let mapping = see_mapping(cx).await;
    let mapping = mapping_observation(cx, &mapping, &mut plan);
    Inspection { observations: vec![mapping, helpers_observation(cx)], plan }
}

/// Repairs a stale namespace: `podman system migrate` (stops the user's containers and the
/// pause process), then a fresh Podman API service, which makes the new namespace; checks
/// it. newuidmap problems have no repair.
pub async fn converge(cx: &Context) -> Result<Vec<String>> {
    let before = match see_mapping(cx).await? {
        Mapping::NoNamespace(_) | Mapping::Matches(_) => return Ok(Vec::new()),
        Mapping::Differs { files_have_ranges: false, detail, .. } => {
            bail!("{detail}; give {} ranges in /etc/subuid and /etc/subgid first", cx.user.name)
        }
        Mapping::Differs { detail, .. } => detail,
    };
    let user = &cx.user.name;
    // Podman run as the user would block on a FIFO of theirs, or fail on a refused link.
    if let Some(why) = super::podman_config::user_config_refused(cx) {
        bail!("{before}; not running podman system migrate as {user} while {why}");
    }
    user_manager::migrate(&cx.user, MIGRATE_TIMEOUT)
        .await
        .with_context(|| format!("podman system migrate as {user}"))?;
    let mut changes = vec![format!("ran podman system migrate as {user} ({before})")];
    // A running `podman system service` stays in the old namespace: replace it.
    let unit = &cx.settings.podman.socket_unit;
    let timeout = cx.settings.linger.user_manager_timeout;
    user_manager::ensure(&cx.user, unit, true, timeout)
        .await
        .with_context(|| format!("restarting {unit}"))?;
    changes.push(format!("restarted {unit} for {user}"));
    super::podman_socket::client(cx)
        .probe()
        .await
        .with_context(|| format!("the Podman API after restarting {unit}"))?;
    match see_mapping(cx).await? {
        Mapping::Differs { detail, .. } => bail!("after podman system migrate: {detail}"),
        Mapping::Matches(pid) => {
            changes.push(format!("Podman's new user namespace (pause PID {pid}) maps the configured ranges"))
        }
        Mapping::NoNamespace(_) => {}
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn r(start: u32, count: u32) -> IdRange {
        IdRange { start, count }
    }

    fn l(inside: u32, outside: u32, count: u32) -> MapLine {
        MapLine { inside, outside, count }
    }

    #[test]
    fn parses_the_kernels_padded_map() {
        let text = "         0       1000          1\n         1     524288      65536\n";
        assert_eq!(parse_id_map(text).unwrap(), vec![l(0, 1000, 1), l(1, 524288, 65536)]);
        assert_eq!(parse_id_map("").unwrap(), vec![]);
        assert!(parse_id_map("0 1000\n").unwrap_err().contains("line 1"));
        assert!(parse_id_map("0 1000 1\n1 x 65536\n").unwrap_err().contains("line 2"));
        assert!(is_identity(&parse_id_map("         0          0 4294967295\n").unwrap()));
        assert!(!is_identity(&[l(0, 1000, 1)]));
    }

    #[test]
    fn full_mapping_matches_the_files() {
        let map = [l(0, 1000, 1), l(1, 524288, 65536)];
        assert_eq!(compare_map(1000, &map, &[r(524288, 65536)]), Ok(()));
    }

    #[test]
    fn several_ranges_map_lowest_first_and_adjacent_ones_count_as_one() {
        let map = [l(0, 1000, 1), l(1, 100000, 65536), l(65537, 300000, 1000)];
        // File order does not matter, Podman sorts.
        assert_eq!(compare_map(1000, &map, &[r(300000, 1000), r(100000, 65536)]), Ok(()));
        // Two touching lines in the file are the same IDs as one line in the map.
        let merged = [l(0, 1000, 1), l(1, 100000, 131072)];
        assert_eq!(compare_map(1000, &merged, &[r(100000, 65536), r(165536, 65536)]), Ok(()));
    }

    #[test]
    fn single_line_is_the_missing_newline_bug() {
        let m = compare_map(1000, &[l(0, 1000, 1)], &[r(524288, 65536)]).unwrap_err();
        assert_eq!(
            m,
            MapMismatch {
                mapped: "maps 0 → 1000 only".into(),
                expected: "524288:65536".into(),
                single: true
            }
        );
    }

    #[test]
    fn stale_or_partial_ranges_are_reported_with_both_sides() {
        let map = [l(0, 1000, 1), l(1, 100000, 65536)];
        let m = compare_map(1000, &map, &[r(524288, 65536)]).unwrap_err();
        assert_eq!(m.mapped, "maps 1000 and 100000:65536");
        assert_eq!(m.expected, "524288:65536");
        assert!(!m.single);
        // A range added after Podman started: the old one alone is not enough.
        let m = compare_map(1000, &map, &[r(100000, 65536), r(600000, 65536)]).unwrap_err();
        assert_eq!(m.expected, "100000:65536, 600000:65536");
        // Mapped to another user entirely.
        let m = compare_map(1000, &[l(0, 1001, 1), l(1, 100000, 65536)], &[r(100000, 65536)]).unwrap_err();
        assert!(m.mapped.contains("no 0 → 1000 line"), "{}", m.mapped);
    }

    fn v2(magic: u32, perm: u64, inh: u64) -> Vec<u8> {
        let mut b = magic.to_le_bytes().to_vec();
        b.extend((perm as u32).to_le_bytes());
        b.extend((inh as u32).to_le_bytes());
        b.extend(((perm >> 32) as u32).to_le_bytes());
        b.extend(((inh >> 32) as u32).to_le_bytes());
        b
    }

    #[test]
    fn parses_capability_blobs_of_every_revision() {
        // cap_setuid=ep as setcap writes it on Fedora (revision 2, effective flag).
        let caps = parse_vfs_cap(&v2(0x0200_0001, 1 << CAP_SETUID, 0)).unwrap();
        assert!(caps.has(CAP_SETUID) && !caps.has(CAP_SETGID) && caps.effective);
        assert_eq!(caps.rootid, None);
        // A capability above 31 lands in the second word.
        let caps = parse_vfs_cap(&v2(0x0200_0000, 1 << 38, 0)).unwrap();
        assert!(caps.has(38) && !caps.effective);
        // Revision 1: one word each.
        let mut v1 = 0x0100_0001u32.to_le_bytes().to_vec();
        v1.extend((1u32 << CAP_SETGID).to_le_bytes());
        v1.extend(0u32.to_le_bytes());
        assert!(parse_vfs_cap(&v1).unwrap().has(CAP_SETGID));
        // Revision 3 carries the namespace's root UID.
        let mut v3 = v2(0x0300_0001, 1 << CAP_SETUID, 0);
        v3.extend(100000u32.to_le_bytes());
        assert_eq!(parse_vfs_cap(&v3).unwrap().rootid, Some(100000));
        // Garbage.
        assert!(parse_vfs_cap(&[1, 2]).is_err());
        assert!(parse_vfs_cap(&v2(0x0400_0000, 0, 0)).unwrap_err().contains("revision"));
        assert!(parse_vfs_cap(&v2(0x0200_0000, 0, 0)[..12]).unwrap_err().contains("12 bytes"));
    }

    #[test]
    fn helper_verdicts() {
        let user = (1000, 1000);
        let cap = |blob: Vec<u8>| Some(parse_vfs_cap(&blob));
        // Debian: -rwsr-xr-x root root.
        assert_eq!(judge_helper(0o104755, 0, 0, true, None, CAP_SETUID, user), Ok(Privilege::SetuidRoot));
        // Fedora CoreOS: -rwxr-xr-x with cap_setuid=ep.
        let fcos = cap(v2(0x0200_0001, 1 << CAP_SETUID, 0));
        assert_eq!(
            judge_helper(0o100755, 0, 0, true, fcos.clone(), CAP_SETUID, user),
            Ok(Privilege::FileCap)
        );
        // The uid capability on the gid helper does not do.
        assert!(judge_helper(0o100755, 0, 0, true, fcos, CAP_SETGID, user)
            .unwrap_err()
            .contains("without cap_setgid"));
        // Permitted but not effective.
        let p_only = cap(v2(0x0200_0000, 1 << CAP_SETUID, 0));
        assert!(judge_helper(0o100755, 0, 0, true, p_only, CAP_SETUID, user)
            .unwrap_err()
            .contains("not effective"));
        // Namespaced capability.
        let mut v3 = v2(0x0300_0001, 1 << CAP_SETUID, 0);
        v3.extend(5000u32.to_le_bytes());
        assert!(judge_helper(0o100755, 0, 0, true, cap(v3), CAP_SETUID, user)
            .unwrap_err()
            .contains("rooted at UID 5000"));
        // Setuid but not root's; plain; not executable by the user; not a file.
        assert!(judge_helper(0o104755, 1000, 0, true, None, CAP_SETUID, user)
            .unwrap_err()
            .contains("neither"));
        assert!(judge_helper(0o100755, 0, 0, true, None, CAP_SETUID, user).unwrap_err().contains("neither"));
        assert!(judge_helper(0o104750, 0, 0, true, None, CAP_SETUID, user)
            .unwrap_err()
            .contains("not executable"));
        assert_eq!(judge_helper(0o104750, 0, 1000, true, None, CAP_SETUID, user), Ok(Privilege::SetuidRoot));
        assert!(judge_helper(0o040755, 0, 0, false, None, CAP_SETUID, user).unwrap_err().contains("regular"));
    }

    #[test]
    fn finds_helpers_in_a_tree_by_mode_bits() {
        let dir = tempfile::tempdir().unwrap();
        let root = crate::paths::Root::new(dir.path());
        std::fs::create_dir_all(dir.path().join("usr/sbin")).unwrap();
        std::fs::create_dir_all(dir.path().join("bin")).unwrap();
        let uid_helper = dir.path().join("usr/sbin/newuidmap");
        std::fs::write(&uid_helper, b"#!/bin/true\n").unwrap();
        std::fs::set_permissions(&uid_helper, std::fs::Permissions::from_mode(0o4755)).unwrap();
        let owned_by_root = nix::unistd::geteuid().is_root();
        let report = find_helper(&root, &HELPER_DIRS, "newuidmap", CAP_SETUID, (1000, 1000));
        if owned_by_root {
            assert_eq!(report.outcome, Ok((PathBuf::from("/usr/sbin/newuidmap"), Privilege::SetuidRoot)));
            assert_eq!(report.to_string(), "/usr/sbin/newuidmap (setuid root)");
        }
        // Dropping the setuid bit is the fault this check exists for.
        std::fs::set_permissions(&uid_helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let report = find_helper(&root, &HELPER_DIRS, "newuidmap", CAP_SETUID, (1000, 1000));
        let err = report.outcome.unwrap_err();
        assert!(err.starts_with("/usr/sbin/newuidmap is neither setuid root"), "{err}");
        let missing = find_helper(&root, &HELPER_DIRS, "newgidmap", CAP_SETGID, (1000, 1000));
        assert_eq!(
            missing.outcome.unwrap_err(),
            "newgidmap is not installed (looked in /usr/bin, /usr/sbin, /bin)"
        );
    }

    #[test]
    fn reads_a_real_file_capability() {
        let dir = tempfile::tempdir().unwrap();
        let root = crate::paths::Root::new(dir.path());
        std::fs::create_dir_all(dir.path().join("usr/bin")).unwrap();
        let helper = dir.path().join("usr/bin/newgidmap");
        std::fs::write(&helper, b"#!/bin/true\n").unwrap();
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        // cap_setgid=ep, as `setcap` writes it (needs CAP_SETFCAP and a file system with xattrs).
        let blob = v2(0x0200_0001, 1 << CAP_SETGID, 0);
        let path = std::ffi::CString::new(helper.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: both strings are NUL-terminated; `blob` is valid for reads of its length.
        let rc = unsafe {
            libc::setxattr(
                path.as_ptr(),
                c"security.capability".as_ptr(),
                blob.as_ptr().cast(),
                blob.len(),
                0,
            )
        };
        if rc != 0 {
            eprintln!("skipped: cannot set a file capability here: {}", io::Error::last_os_error());
            return;
        }
        let report = find_helper(&root, &HELPER_DIRS, "newgidmap", CAP_SETGID, (1000, 1000));
        assert_eq!(report.outcome, Ok((PathBuf::from("/usr/bin/newgidmap"), Privilege::FileCap)));
        assert_eq!(report.to_string(), "/usr/bin/newgidmap (cap_setgid=ep)");
        // The same file as newuidmap lacks cap_setuid.
        std::fs::rename(&helper, dir.path().join("usr/bin/newuidmap")).unwrap();
        let report = find_helper(&root, &HELPER_DIRS, "newuidmap", CAP_SETUID, (1000, 1000));
        assert!(report.outcome.unwrap_err().contains("without cap_setuid"));
    }

    /// A fake /proc with one process of the test's own UID.
    fn fake_proc(pid: u32, comm: &str, uid_map: &str, gid_map: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("proc").join(pid.to_string());
        std::fs::create_dir_all(&p).unwrap();
        let me = me();
        std::fs::write(
            p.join("status"),
            format!("Name:\t{comm}\nUmask:\t0022\nUid:\t{me}\t{me}\t{me}\t{me}\n"),
        )
        .unwrap();
        std::fs::write(p.join("comm"), format!("{comm}\n")).unwrap();
        std::fs::write(p.join("uid_map"), uid_map).unwrap();
        std::fs::write(p.join("gid_map"), gid_map).unwrap();
        dir
    }

    fn me() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    use crate::userfs::test_support::users_symlink;

    const FULL: &str = "         0       1000          1\n         1     524288      65536\n";

    const NO: Option<&DirectReader<'static>> = None;

    #[test]
    fn parses_the_status_lines_it_needs() {
        let status =
            "Name:\tpodman pause\nUmask:\t0022\nState:\tS (sleeping)\nUid:\t1000\t1001\t1000\t1000\n";
        assert_eq!(parse_status(status), Some((1001, "podman pause".to_string())));
        assert_eq!(parse_status("Name:\tx\n"), None);
        assert_eq!(parse_status("Uid:\t0\t0\t0\t0\n"), None);
    }

    #[tokio::test]
    async fn reads_the_pause_process_from_its_pid_file() {
        let dir = fake_proc(4242, "catatonit", FULL, FULL);
        let proc = dir.path().join("proc");
        let pid_file = dir.path().join("pause.pid");
        let reader = DirectReader { proc: &proc };

        let none = read_namespace(&pid_file, me(), &reader, NO).await.unwrap();
        assert!(matches!(none, Namespace::None { ref why } if why.starts_with("no ")), "{none:?}");

        std::fs::write(&pid_file, "4242").unwrap();
        let ns = read_namespace(&pid_file, me(), &reader, NO).await.unwrap();
        assert_eq!(
            ns,
            Namespace::Running {
                pid: 4242,
                uid_map: vec![l(0, 1000, 1), l(1, 524288, 65536)],
                gid_map: vec![l(0, 1000, 1), l(1, 524288, 65536)],
            }
        );

        // Another user's process under a reused PID is not ours.
        let other = read_namespace(&pid_file, me() + 1, &reader, NO).await.unwrap();
        assert!(matches!(other, Namespace::None { ref why } if why.contains("belongs to UID")), "{other:?}");

        // A dead PID is stale, not an error.
        std::fs::write(&pid_file, "4243\n").unwrap();
        let dead = read_namespace(&pid_file, me(), &reader, NO).await.unwrap();
        assert!(matches!(dead, Namespace::None { ref why } if why.contains("not running")), "{dead:?}");

        // What the file holds is never shown.
        for junk in ["x", "0", "-1", "4242 4243", "hunter2"] {
            std::fs::write(&pid_file, junk).unwrap();
            let err = read_namespace(&pid_file, me(), &reader, NO).await.unwrap_err();
            let text = format!("{err:#}");
            assert!(text.ends_with(&format!("does not hold a PID ({} bytes)", junk.len())), "{text}");
            assert!(!text.contains("hunter2"), "{text}");
        }
    }

    #[tokio::test]
    async fn a_symlinked_pid_file_is_refused_and_its_target_not_shown() {
        let dir = fake_proc(4242, "catatonit", FULL, FULL);
        let proc = dir.path().join("proc");
        let reader = DirectReader { proc: &proc };
        let secret = dir.path().join("shadow");
        std::fs::write(&secret, "root:$6$hunter2:19000::::::\n").unwrap();
        let pid_file = dir.path().join("pause.pid");
        users_symlink(&secret, &pid_file);
        let err = read_namespace(&pid_file, me(), &reader, NO).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "refusing {}: it is a symlink (root follows no link the runner user could have made)",
                pid_file.display()
            )
        );
        assert!(!format!("{err:#}").contains("hunter2"), "{err:#}");
        // A symlinked directory on the way (libpod/tmp -> /etc) likewise.
        std::fs::create_dir(dir.path().join("libpod")).unwrap();
        users_symlink(dir.path(), &dir.path().join("libpod/tmp"));
        let err = read_namespace(&dir.path().join("libpod/tmp/shadow"), me(), &reader, NO).await.unwrap_err();
        assert_eq!(userfs::refusal_in(&err).map(|r| r.why.clone()), Some(userfs::Why::Symlink), "{err:#}");
    }

    #[tokio::test]
    async fn a_fifo_or_an_oversized_pid_file_fails_at_once() {
        let dir = fake_proc(4242, "catatonit", FULL, FULL);
        let proc = dir.path().join("proc");
        let reader = DirectReader { proc: &proc };
        let pid_file = dir.path().join("pause.pid");
        nix::unistd::mkfifo(&pid_file, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        // A blocking open would wait for a writer forever.
        let outcome =
            tokio::time::timeout(Duration::from_secs(5), read_namespace(&pid_file, me(), &reader, NO)).await;
        let err = outcome.expect("reading a FIFO blocked").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("refusing {}: it is a FIFO, not a regular file", pid_file.display())
        );
        std::fs::remove_file(&pid_file).unwrap();
        std::fs::write(&pid_file, format!("4242{}", " ".repeat(100))).unwrap();
        let err = read_namespace(&pid_file, me(), &reader, NO).await.unwrap_err();
        assert_eq!(err.to_string(), format!("refusing {}: it is larger than 64 bytes", pid_file.display()));
    }

    #[tokio::test]
    async fn a_pid_file_of_another_user_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to give the file away");
            return;
        }
        let dir = fake_proc(4242, "catatonit", FULL, FULL);
        let proc = dir.path().join("proc");
        let pid_file = dir.path().join("pause.pid");
        std::fs::write(&pid_file, "4242").unwrap();
        std::os::unix::fs::chown(&pid_file, Some(4243), Some(4243)).unwrap();
        let err = read_namespace(&pid_file, 1000, &DirectReader { proc: &proc }, NO).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "refusing {}: owned by UID 4243, not the runner user (UID 1000) or root",
                pid_file.display()
            )
        );
    }

    #[tokio::test]
    async fn a_forged_pid_naming_a_root_process_is_not_read() {
        // Our own process in the real /proc stands for any process of another user: root's
        // when the tests run as root.
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pause.pid");
        std::fs::write(&pid_file, std::process::id().to_string()).unwrap();
        let runner = me() + 1000;
        let ns =
            read_namespace(&pid_file, runner, &DirectReader { proc: Path::new("/proc") }, NO).await.unwrap();
        let want =
            format!("PID {} belongs to UID {}, not the runner user (UID {runner})", std::process::id(), me());
        assert!(matches!(ns, Namespace::None { ref why } if why.contains(&want)), "{ns:?}");
        // PID 1 (root's init) too, and the user's fallback view is not asked to override it.
        std::fs::write(&pid_file, "1").unwrap();
        let user_view = DirectReader { proc: Path::new("/proc") };
        let ns = read_namespace(&pid_file, runner, &Hidden, Some(&user_view)).await.unwrap();
        assert!(matches!(ns, Namespace::None { ref why } if why.contains("PID 1 belongs to UID")), "{ns:?}");
    }

    #[tokio::test]
    async fn the_real_proc_files_are_read_within_their_bounds() {
        let reader = DirectReader { proc: Path::new("/proc") };
        let pid = std::process::id();
        let status = reader.read(pid, "status", MAX_STATUS).await.unwrap();
        assert_eq!(parse_status(&status).map(|s| s.0), Some(me()));
        let map = reader.read(pid, "uid_map", MAX_MAP).await.unwrap();
        assert!(!parse_id_map(&map).unwrap().is_empty());
        let err = reader.read(pid, "status", 16).await.unwrap_err();
        assert!(err.to_string().ends_with("status: it is larger than 16 bytes"), "{err}");
    }

    #[tokio::test]
    async fn a_reused_pid_that_is_not_a_pause_process_is_stale() {
        let dir = fake_proc(77, "bash", FULL, FULL);
        let proc = dir.path().join("proc");
        let pid_file = dir.path().join("pause.pid");
        std::fs::write(&pid_file, "77").unwrap();
        let ns = read_namespace(&pid_file, me(), &DirectReader { proc: &proc }, NO).await.unwrap();
        assert!(matches!(ns, Namespace::None { ref why } if why.contains("\"bash\"")), "{ns:?}");

        let ident = "         0          0 4294967295\n";
        let dir = fake_proc(78, "podman pause", ident, ident);
        let proc = dir.path().join("proc");
        std::fs::write(&pid_file, "78").unwrap();
        let ns = read_namespace(&pid_file, me(), &DirectReader { proc: &proc }, NO).await.unwrap();
        assert!(
            matches!(ns, Namespace::None { ref why } if why.contains("not in a user namespace")),
            "{ns:?}"
        );

        // A name with control characters is shown as one clean line.
        let dir = fake_proc(79, "x\x1b[2Jy", FULL, FULL);
        let proc = dir.path().join("proc");
        std::fs::write(&pid_file, "79").unwrap();
        let ns = read_namespace(&pid_file, me(), &DirectReader { proc: &proc }, NO).await.unwrap();
        assert!(matches!(ns, Namespace::None { ref why } if why.contains("is \"x [2Jy\"")), "{ns:?}");
    }

    /// A reader that sees nothing, as root does under ProtectProc=invisible.
    struct Hidden;
    impl ProcReader for Hidden {
        async fn read(&self, _: u32, _: &str, _: u64) -> io::Result<String> {
            Err(io::ErrorKind::NotFound.into())
        }
    }

    #[tokio::test]
    async fn hidden_from_root_falls_back_to_the_users_view() {
        let dir = fake_proc(5000, "catatonit", "0 1000 1\n", "0 1000 1\n");
        let proc = dir.path().join("proc");
        let pid_file = dir.path().join("pause.pid");
        std::fs::write(&pid_file, "5000").unwrap();
        let user_view = DirectReader { proc: &proc };
        let ns = read_namespace(&pid_file, me(), &Hidden, Some(&user_view)).await.unwrap();
        assert!(matches!(ns, Namespace::Running { pid: 5000, .. }), "{ns:?}");
        // A namespace whose maps newuidmap has not written yet is not judged.
        let dir = fake_proc(5001, "catatonit", "", "");
        let proc = dir.path().join("proc");
        std::fs::write(&pid_file, "5001").unwrap();
        let ns = read_namespace(&pid_file, me(), &DirectReader { proc: &proc }, NO).await.unwrap();
        assert!(matches!(ns, Namespace::None { ref why } if why.contains("being set up")), "{ns:?}");
        std::fs::write(&pid_file, "5000").unwrap();
        // Without the fallback the process looks gone.
        let ns = read_namespace(&pid_file, me(), &Hidden, NO).await.unwrap();
        assert!(matches!(ns, Namespace::None { .. }));
    }
}
