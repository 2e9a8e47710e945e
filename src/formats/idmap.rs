//! User namespace maps as text and the rights of the ID-mapping helpers: `/proc/PID/uid_map`
//! parsed and compared with the subordinate ID files, `security.capability` (vfs_cap_data)
//! decoded, and who may run a file. No I/O: the id-mapping and host-tools steps read.

use crate::subid::IdRange;

/// One line of `/proc/PID/uid_map`: IDs `inside..inside+count` in the namespace are
/// `outside..outside+count` on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLine {
    pub inside: u32,
    pub outside: u32,
    pub count: u32,
}

/// Parses the kernel's `uid_map`/`gid_map` text (three right-aligned numbers a line).
pub fn parse_id_map(text: &str) -> Result<Vec<MapLine>, String> {
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let numbers: Option<Vec<u32>> = fields.iter().map(|f| f.parse().ok()).collect();
        match numbers.as_deref() {
            Some(&[inside, outside, count]) => lines.push(MapLine { inside, outside, count }),
            _ => return Err(format!("line {}: {line:?} is not three numbers", i + 1)),
        }
    }
    Ok(lines)
}

/// True for the initial namespace's map (`0 0 4294967295`): a process outside any user
/// namespace, so not Podman's pause process.
pub fn is_identity(map: &[MapLine]) -> bool {
    map == [MapLine { inside: 0, outside: 0, count: u32::MAX }]
}

/// Sorted, with ranges that touch merged: newuidmap writes one line per file line, and
/// two adjacent file lines are the same IDs as one.
fn normalise(ranges: impl IntoIterator<Item = (u32, u32)>) -> Vec<(u64, u64)> {
    let mut spans: Vec<(u64, u64)> = ranges
        .into_iter()
        .filter(|r| r.1 > 0)
        .map(|(s, c)| (u64::from(s), u64::from(s) + u64::from(c)))
        .collect();
    spans.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
    for (start, end) in spans {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

fn spans_text(spans: &[(u64, u64)]) -> String {
    spans.iter().map(|(s, e)| format!("{s}:{}", e - s)).collect::<Vec<_>>().join(", ")
}

/// Why a map is not what the files say, in words for a check's detail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapMismatch {
    /// "maps 0 → 1000 only" or "maps 1000 and 100000:65536".
    pub mapped: String,
    /// "524288:65536".
    pub expected: String,
    /// Only the user's own ID is mapped: newuidmap refused or found no range.
    pub single: bool,
}

/// Compares a namespace's map with the owner's ID `id` and its ranges from the file.
/// Podman maps `0 → id` and then every range of the user, lowest first, from 1 up.
pub fn compare_map(id: u32, map: &[MapLine], expected: &[IdRange]) -> Result<(), MapMismatch> {
    let own = MapLine { inside: 0, outside: id, count: 1 };
    let has_own = map.contains(&own);
    let others = normalise(map.iter().filter(|l| **l != own).map(|l| (l.outside, l.count)));
    let wanted = normalise(expected.iter().map(|r| (r.start, r.count)));
    if has_own && others == wanted {
        return Ok(());
    }
    let single = others.is_empty();
    let mapped = match (has_own, single) {
        (true, true) => format!("maps 0 → {id} only"),
        (true, false) => format!("maps {id} and {}", spans_text(&others)),
        (false, _) => {
            let lines: Vec<String> =
                map.iter().map(|l| format!("{} {} {}", l.inside, l.outside, l.count)).collect();
            format!("maps {:?} (no 0 → {id} line)", lines.join(", "))
        }
    };
    let expected = if wanted.is_empty() { "no range".to_string() } else { spans_text(&wanted) };
    Err(MapMismatch { mapped, expected, single })
}

/// `CAP_SETGID` and `CAP_SETUID` (linux/capability.h).
pub const CAP_SETGID: u32 = 6;
pub const CAP_SETUID: u32 = 7;

/// A file capability set, from the `security.capability` extended attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileCaps {
    pub permitted: u64,
    pub inheritable: u64,
    /// `VFS_CAP_FLAGS_EFFECTIVE`: the permitted set becomes effective at exec.
    pub effective: bool,
    /// Revision 3 (namespaced) capabilities apply only where this UID is root.
    pub rootid: Option<u32>,
}

impl FileCaps {
    pub fn has(&self, cap: u32) -> bool {
        cap < 64 && self.permitted & (1u64 << cap) != 0
    }
}

/// Parses a `vfs_cap_data` (revision 1, 2) or `vfs_ns_cap_data` (revision 3) blob:
/// little-endian `magic_etc`, then `{permitted, inheritable}` 32-bit words, then (rev. 3)
/// the root UID.
pub fn parse_vfs_cap(blob: &[u8]) -> Result<FileCaps, String> {
    const REVISION_MASK: u32 = 0xFF00_0000;
    const FLAGS_EFFECTIVE: u32 = 0x0000_0001;
    let word = |i: usize| -> Option<u32> {
        blob.get(4 * i..4 * i + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    let magic = word(0).ok_or_else(|| format!("{} bytes is too short for a capability set", blob.len()))?;
    let (words, expected_len) = match magic & REVISION_MASK {
        0x0100_0000 => (1, 12),
        0x0200_0000 => (2, 20),
        0x0300_0000 => (2, 24),
        other => return Err(format!("unknown capability revision {:#x}", other >> 24)),
    };
    if blob.len() != expected_len {
        return Err(format!(
            "revision {} capability set has {} bytes, not {expected_len}",
            magic >> 24,
            blob.len()
        ));
    }
    let (mut permitted, mut inheritable) = (0u64, 0u64);
    for i in 0..words {
        permitted |= u64::from(word(1 + 2 * i).expect("length checked")) << (32 * i);
        inheritable |= u64::from(word(2 + 2 * i).expect("length checked")) << (32 * i);
    }
    let rootid = (expected_len == 24).then(|| word(5).expect("length checked"));
    Ok(FileCaps { permitted, inheritable, effective: magic & FLAGS_EFFECTIVE != 0, rootid })
}

/// What makes a newuidmap/newgidmap binary able to write another process's map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Privilege {
    SetuidRoot,
    FileCap,
}

/// Decides whether a helper found at `path` can do its job: a regular file the user may
/// execute, and setuid root or carrying `cap` (permitted and effective) in a capability
/// set that applies on the host.
pub fn judge_helper(
    mode: u32,
    owner: u32,
    group: u32,
    is_file: bool,
    caps: Option<Result<FileCaps, String>>,
    cap: u32,
    user: (u32, u32),
) -> Result<Privilege, String> {
    if !is_file {
        return Err("is not a regular file".into());
    }
    if !executable_by(mode, owner, group, user.0, user.1) {
        return Err(format!("is not executable by the runner user (mode {:04o})", mode & 0o7777));
    }
    if mode & 0o4000 != 0 && owner == 0 {
        return Ok(Privilege::SetuidRoot);
    }
    let cap_name = if cap == CAP_SETUID { "cap_setuid" } else { "cap_setgid" };
    match caps {
        None => Err(format!("is neither setuid root nor has the {cap_name} file capability")),
        Some(Err(e)) => Err(format!("has an unreadable security.capability attribute: {e}")),
        Some(Ok(caps)) => {
            if !caps.has(cap) {
                Err(format!("has file capabilities without {cap_name} and is not setuid root"))
            } else if !caps.effective {
                Err(format!("has {cap_name} permitted but not effective (+p without +e)"))
            } else if caps.rootid.is_some_and(|id| id != 0) {
                Err(format!(
                    "has {cap_name} only for a user namespace rooted at UID {} (revision 3 capability)",
                    caps.rootid.unwrap_or_default()
                ))
            } else {
                Ok(Privilege::FileCap)
            }
        }
    }
}

/// Mode bits only (no ACLs), with the user's primary group: owner, then group, then others.
pub fn executable_by(mode: u32, owner: u32, group: u32, uid: u32, gid: u32) -> bool {
    if uid == 0 {
        return mode & 0o111 != 0;
    }
    if owner == uid {
        mode & 0o100 != 0
    } else if group == gid {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    }
}
