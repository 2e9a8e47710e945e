//! Whether the runner user has a path to root, which would make the rootless boundary moot: a
//! container breakout runs as the runner user, so a group that grants root, a sudo rule
//! without a password, or a rootful engine socket it can write is root for whoever breaks out.
//! On stock Fedora CoreOS the user `core` has all of that (groups `wheel sudo adm
//! systemd-journal`, `%wheel ALL=(ALL) NOPASSWD: ALL`). Inspect only, from files (works with
//! `--root`); advisory by default.
//!
//! The one repair, off by default: `[runner_privileges] mask_docker = true` masks FCOS's
//! rootful `docker.socket` and `docker.service` (enabled by default: anything that touches
//! /var/run/docker.sock starts a rootful dockerd) and stops them. Off because masking breaks
//! anyone who uses rootful Docker on purpose.

use anyhow::{bail, Context as _, Result};
use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use super::{CheckSpec, Context, Inspection, Spec};
use crate::checks::Observation;
use crate::paths::Root;
use crate::systemd;

pub const CHECK: &str = "runner-privileges";

/// Group files: `/etc/group`, and nss-altfiles' `/usr/lib/group` (where FCOS keeps system groups).
pub const GROUP_FILES: [&str; 2] = ["/etc/group", "/usr/lib/group"];
pub const SUDOERS: &str = "/etc/sudoers";
pub const SUDOERS_D: &str = "/etc/sudoers.d";
/// Rootful engine sockets a process may reach (`/var/run` is `/run` on FCOS and Debian).
pub const ENGINE_SOCKETS: [&str; 3] = ["/run/docker.sock", "/var/run/docker.sock", "/run/podman/podman.sock"];
/// FCOS's rootful Docker: the socket first, so that it cannot start the service again.
pub const DOCKER_UNITS: [&str; 2] = ["docker.socket", "docker.service"];

/// Groups whose members are root in all but name, and why.
pub const ROOT_GROUPS: [(&str, &str); 8] = [
    ("root", "group 0"),
    ("wheel", "sudo's admin group"),
    ("sudo", "sudo's admin group"),
    ("admin", "sudo's admin group"),
    ("docker", "drives the rootful Docker daemon"),
    ("disk", "raw access to the block devices"),
    ("lxd", "drives LXD, root in its containers"),
    ("libvirt", "drives libvirt, root through its VMs"),
];

/// `permission denied` rather than `Permission denied (os error 13)`.
fn io_reason(e: &io::Error) -> String {
    let text = e.to_string();
    let text = text.split(" (os error").next().unwrap_or(&text).to_string();
    text.to_lowercase()
}

// ------------------------------------------------------------------------------------------------
// Groups.

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// `name:password:gid:member,member` lines; malformed lines are skipped.
pub fn parse_group(text: &str) -> Vec<Group> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() != 4 || fields[0].is_empty() {
                return None;
            }
            Some(Group {
                name: fields[0].to_string(),
                gid: fields[2].trim().parse().ok()?,
                members: fields[3]
                    .split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(String::from)
                    .collect(),
            })
        })
        .collect()
}

/// Who the runner user is to sudoers and to file modes: its name, UID and every group
/// (name when known, GID always).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Who {
    pub name: String,
    pub uid: u32,
    /// (name, gid); the name is empty for a GID no group file names.
    pub groups: Vec<(String, u32)>,
}

impl Who {
    /// The primary group and every group that lists the user as a member.
    pub fn from_groups(name: &str, uid: u32, primary_gid: u32, groups: &[Group], extra_gids: &[u32]) -> Who {
        let name_of =
            |gid: u32| groups.iter().find(|g| g.gid == gid).map(|g| g.name.clone()).unwrap_or_default();
        let mut found: Vec<(String, u32)> = vec![(name_of(primary_gid), primary_gid)];
        for g in groups.iter().filter(|g| g.members.iter().any(|m| m == name)) {
            found.push((g.name.clone(), g.gid));
        }
        for &gid in extra_gids {
            found.push((name_of(gid), gid));
        }
        let mut seen = Vec::new();
        found.retain(|(n, gid)| {
            let new = !seen.contains(&(n.clone(), *gid));
            seen.push((n.clone(), *gid));
            new
        });
        Who { name: name.to_string(), uid, groups: found }
    }

    pub fn in_group_named(&self, group: &str) -> bool {
        self.groups.iter().any(|(n, _)| n == group)
    }

    pub fn gids(&self) -> Vec<u32> {
        self.groups.iter().map(|(_, gid)| *gid).collect()
    }
}

/// The user's groups that grant root, as findings.
pub fn root_group_findings(who: &Who) -> Vec<String> {
    let mut findings = Vec::new();
    for (name, gid) in &who.groups {
        let why = if *gid == 0 {
            Some("group 0")
        } else {
            ROOT_GROUPS.iter().find(|(g, _)| g == name).map(|(_, why)| *why)
        };
        if let Some(why) = why {
            let label = if name.is_empty() { format!("gid {gid}") } else { name.clone() };
            findings.push(format!("{} is in group {label} ({why})", who.name));
        }
    }
    findings
}

// ------------------------------------------------------------------------------------------------
// sudoers: a parser for the common forms (user specifications with run-as lists and tags,
// User_Alias and Runas_Alias, `Defaults !authenticate`). Not supported: several
// `Host = Cmnd` parts in one rule are read as far as the first one's commands.

/// A logical line (continuations joined) with the number of its first line.
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let trailing = raw.chars().rev().take_while(|c| *c == '\\').count();
        let continued = trailing % 2 == 1;
        let piece = if continued { &raw[..raw.len() - 1] } else { raw };
        let entry = current.get_or_insert_with(|| (i + 1, String::new()));
        entry.1.push_str(piece);
        if continued {
            entry.1.push(' ');
        } else {
            out.push(current.take().expect("just set"));
        }
    }
    out.extend(current);
    out
}

/// The line without its comment. `#` followed by a digit is a UID (`#1000`, `%#10`), not a
/// comment; `\#` is a literal.
fn strip_comment(line: &str) -> &str {
    let bytes = line.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'#' if !bytes.get(i + 1).is_some_and(u8::is_ascii_digit) => return &line[..i],
            _ => i += 1,
        }
    }
    line
}

/// Splits at `sep` outside parentheses and not after a backslash.
fn split_top(text: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start, mut escaped) = (0i32, 0, false);
    for (i, c) in text.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' => escaped = true,
            '(' => depth += 1,
            ')' => depth -= 1,
            c if c == sep && depth <= 0 => {
                parts.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn is_alias_name(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_uppercase())
        && s.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        && s != "ALL"
}

#[derive(Clone, Debug, Default)]
struct Aliases {
    users: BTreeMap<String, Vec<String>>,
    runas: BTreeMap<String, Vec<String>>,
}

/// Last match wins, as sudo evaluates lists; `None` when nothing in the list matches.
fn list_matches(items: &[String], depth: u32, matches: &dyn Fn(&str, u32) -> Option<bool>) -> Option<bool> {
    let mut verdict = None;
    for item in items {
        let mut item = item.trim();
        let mut negated = false;
        while let Some(rest) = item.strip_prefix('!') {
            negated = !negated;
            item = rest.trim_start();
        }
        let item = item.trim_matches('"');
        if let Some(m) = matches(item, depth) {
            verdict = Some(m != negated);
        }
    }
    verdict
}

fn items(list: &str) -> Vec<String> {
    split_top(list, ',').into_iter().map(|s| s.trim().replace('\\', "")).filter(|s| !s.is_empty()).collect()
}

fn user_item_matches(item: &str, who: &Who, aliases: &Aliases, depth: u32) -> Option<bool> {
    if item == "ALL" {
        return Some(true);
    }
    if let Some(group) = item.strip_prefix('%') {
        if let Some(gid) = group.strip_prefix('#') {
            return gid.parse::<u32>().ok().map(|gid| who.gids().contains(&gid)).filter(|m| *m);
        }
        if group.starts_with(':') {
            return None; // a non-Unix group (sudoers group plugin): not resolvable here
        }
        return who.in_group_named(group).then_some(true);
    }
    if let Some(uid) = item.strip_prefix('#') {
        return uid.parse::<u32>().ok().filter(|u| *u == who.uid).map(|_| true);
    }
    if item.starts_with('+') {
        return None; // a netgroup
    }
    if is_alias_name(item) {
        if depth > 8 {
            return None;
        }
        let members = aliases.users.get(item)?;
        return list_matches(members, depth + 1, &|i, d| user_item_matches(i, who, aliases, d));
    }
    (item == who.name).then_some(true)
}

fn runas_item_is_root(item: &str, aliases: &Aliases, depth: u32) -> Option<bool> {
    match item {
        "ALL" | "root" | "#0" => Some(true),
        _ if is_alias_name(item) && depth <= 8 => {
            let members = aliases.runas.get(item)?;
            list_matches(members, depth + 1, &|i, d| runas_item_is_root(i, aliases, d))
        }
        _ => None,
    }
}

/// Whether a run-as spec (the text inside the parentheses) lets the command run as root.
fn runas_is_root(spec: &str, aliases: &Aliases) -> bool {
    let users = spec.split_once(':').map_or(spec, |(u, _)| u);
    if users.trim().is_empty() {
        // `()`: as the invoking user only; `(:group)`: as the invoking user with that group.
        return false;
    }
    list_matches(&items(users), 0, &|i, d| runas_item_is_root(i, aliases, d)) == Some(true)
}

const TAGS: [&str; 16] = [
    "NOPASSWD",
    "PASSWD",
    "NOEXEC",
    "EXEC",
    "SETENV",
    "NOSETENV",
    "LOG_INPUT",
    "NOLOG_INPUT",
    "LOG_OUTPUT",
    "NOLOG_OUTPUT",
    "MAIL",
    "NOMAIL",
    "FOLLOW",
    "NOFOLLOW",
    "INTERCEPT",
    "NOINTERCEPT",
];
const OPTIONS: [&str; 9] =
    ["ROLE", "TYPE", "TIMEOUT", "NOTBEFORE", "NOTAFTER", "CHROOT", "CWD", "APPARMOR_PROFILE", "PRIVS"];

/// Whether a rule's command part has a command that runs as root without a password:
/// run-as specs and tags carry over to the following commands, as in sudo.
fn commands_nopasswd_as_root(spec: &str, aliases: &Aliases, no_authenticate: bool) -> bool {
    // Only the first `Host = Cmnd` part: a `: host =` would start another.
    let mut runas_root = true;
    let mut nopasswd = no_authenticate;
    for command in split_top(spec, ',') {
        let mut rest = command.trim();
        if let Some(inner) = rest.strip_prefix('(') {
            let Some(end) = inner.find(')') else { return false };
            runas_root = runas_is_root(&inner[..end], aliases);
            rest = inner[end + 1..].trim_start();
        }
        loop {
            let word: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            let after = &rest[word.len()..];
            if TAGS.contains(&word.as_str()) && after.starts_with(':') {
                match word.as_str() {
                    "NOPASSWD" => nopasswd = true,
                    "PASSWD" => nopasswd = no_authenticate,
                    _ => {}
                }
                rest = after[1..].trim_start();
            } else if OPTIONS.contains(&word.as_str()) && after.starts_with('=') {
                rest = after.split_once(char::is_whitespace).map_or("", |(_, r)| r).trim_start();
            } else {
                break;
            }
        }
        if !rest.is_empty() && runas_root && nopasswd {
            return true;
        }
    }
    false
}

/// The sudoers lines that let `who` run a command as root without a password, each as
/// `(file, line number, text)`; `notes` has the `#include`s that are not followed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SudoFindings {
    pub rules: Vec<(String, usize, String)>,
    pub notes: Vec<String>,
}

/// Reads rules from `(file, text)` in sudo's order (main file, then sudoers.d by name).
/// Aliases and `Defaults` are collected first: sudo applies them to every rule, wherever
/// they stand (the last `authenticate` setting wins).
pub fn sudo_findings(files: &[(String, String)], who: &Who) -> SudoFindings {
    let mut aliases = Aliases::default();
    let mut findings = SudoFindings::default();
    let mut defaults: Vec<String> = Vec::new();
    let mut rules: Vec<(&str, usize, String, String)> = Vec::new();
    for (file, text) in files {
        for (number, line) in logical_lines(text) {
            let trimmed = line.trim();
            if ["#include", "@include"].iter().any(|d| trimmed.starts_with(d)) {
                let target = trimmed.split_whitespace().nth(1).unwrap_or("");
                let is_dir = trimmed.starts_with("#includedir") || trimmed.starts_with("@includedir");
                if !(is_dir && Path::new(target) == Path::new(SUDOERS_D)) {
                    findings.notes.push(format!("{file}:{number}: not followed: {trimmed}"));
                }
                continue;
            }
            let code = strip_comment(&line).trim().to_string();
            let keyword = code.split_whitespace().next().unwrap_or("");
            match keyword {
                "" | "Host_Alias" | "Cmnd_Alias" | "Cmd_Alias" => {}
                "User_Alias" | "Runas_Alias" => {
                    let table = if keyword == "User_Alias" { &mut aliases.users } else { &mut aliases.runas };
                    for def in split_top(&code[keyword.len()..], ':') {
                        if let Some((name, members)) = def.split_once('=') {
                            table.insert(name.trim().to_string(), items(members));
                        }
                    }
                }
                _ if keyword.starts_with("Defaults") => defaults.push(code.clone()),
                _ => rules.push((file, number, code.clone(), trimmed.to_string())),
            }
        }
    }
    let mut no_authenticate = false;
    for code in &defaults {
        let (scope, params) = code.split_once(char::is_whitespace).unwrap_or((code, ""));
        let applies = match scope.strip_prefix("Defaults") {
            Some("") => true,
            Some(s) if s.starts_with(':') => {
                list_matches(&items(&s[1..]), 0, &|i, d| user_item_matches(i, who, &aliases, d)) == Some(true)
            }
            // Per host (@), per run-as user (>), per command (!): not about who runs sudo.
            _ => false,
        };
        if applies {
            for param in items(params) {
                match param.replace(' ', "").as_str() {
                    "!authenticate" => no_authenticate = true,
                    "authenticate" => no_authenticate = false,
                    _ => {}
                }
            }
        }
    }
    for (file, number, code, original) in rules {
        // `users hosts = commands`: the user and host lists are the two words before '='
        // once the spaces around commas are gone.
        let Some((left, right)) = code.split_once('=') else { continue };
        let left = left.split(',').map(str::trim).collect::<Vec<_>>().join(",");
        let words: Vec<&str> = left.split_whitespace().collect();
        let [users, _hosts] = words.as_slice() else { continue };
        if list_matches(&items(users), 0, &|i, d| user_item_matches(i, who, &aliases, d)) != Some(true) {
            continue;
        }
        if commands_nopasswd_as_root(right, &aliases, no_authenticate) {
            findings.rules.push((file.to_string(), number, original));
        }
    }
    findings
}

/// The sudoers files in sudo's order, as `(node path, text)`; files that cannot be read are
/// returned as facts. sudoers.d: by name, skipping names with a `.` or ending in `~`, as sudo does.
fn read_sudoers(root: &Root) -> (Vec<(String, String)>, Vec<String>) {
    let mut files = Vec::new();
    let mut unreadable = Vec::new();
    let mut read = |node: String| match std::fs::read_to_string(root.join(&node)) {
        Ok(text) => files.push((node, text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => unreadable.push(format!("cannot read {node}: {}", io_reason(&e))),
    };
    read(SUDOERS.to_string());
    match std::fs::read_dir(root.join(SUDOERS_D)) {
        Ok(entries) => {
            let mut names: Vec<String> = entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| !n.contains('.') && !n.ends_with('~'))
                .collect();
            names.sort();
            for name in names {
                read(format!("{SUDOERS_D}/{name}"));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => unreadable.push(format!("cannot list {SUDOERS_D}: {}", io_reason(&e))),
    }
    (files, unreadable)
}

// ------------------------------------------------------------------------------------------------
// Engine sockets.

/// Whether `who` has all of `bits` (4 read, 2 write, 1 search) on a file, by its mode bits.
pub fn permits(mode: u32, owner: u32, group: u32, who: &Who, bits: u32) -> bool {
    if who.uid == 0 {
        return true;
    }
    let granted = if owner == who.uid {
        mode >> 6
    } else if who.gids().contains(&group) {
        mode >> 3
    } else {
        mode
    };
    granted & bits == bits
}

/// `path` with every symlink resolved inside `root` (an absolute target starts again at
/// `root`), as a node path.
pub fn resolve_in_root(root: &Root, path: &Path) -> io::Result<PathBuf> {
    let mut pending: Vec<std::ffi::OsString> = path
        .components()
        .rev()
        .filter_map(|c| if let Component::Normal(n) = c { Some(n.to_owned()) } else { None })
        .collect();
    let mut resolved = PathBuf::from("/");
    let mut hops = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved.join(&name);
        let meta = std::fs::symlink_metadata(root.join(&candidate))?;
        if !meta.file_type().is_symlink() {
            resolved = candidate;
            continue;
        }
        hops += 1;
        if hops > 40 {
            return Err(io::Error::from_raw_os_error(libc::ELOOP));
        }
        let target = std::fs::read_link(root.join(&candidate))?;
        if target.is_absolute() {
            resolved = PathBuf::from("/");
        }
        for c in target.components().rev() {
            match c {
                Component::Normal(n) => pending.push(n.to_owned()),
                Component::ParentDir => pending.push("..".into()),
                _ => {}
            }
        }
    }
    Ok(resolved)
}

/// The rootful engine sockets `who` can write: a socket of another owner, with search on every
/// directory to it and write on the socket by the mode bits (ACLs are not read).
pub fn reachable_sockets(root: &Root, who: &Who, candidates: &[&str], names: &GroupNames) -> Vec<String> {
    let mut seen = Vec::new();
    let mut findings = Vec::new();
    for candidate in candidates {
        let Ok(node) = resolve_in_root(root, Path::new(candidate)) else { continue };
        if seen.contains(&node) {
            continue;
        }
        seen.push(node.clone());
        let Ok(meta) = std::fs::metadata(root.join(&node)) else { continue };
        if !meta.file_type().is_socket() || meta.uid() == who.uid {
            // Not a socket, or the user's own (a link to its rootless Podman).
            continue;
        }
        let dirs_searchable = node.ancestors().skip(1).all(|dir| {
            std::fs::metadata(root.join(dir)).is_ok_and(|m| permits(m.mode(), m.uid(), m.gid(), who, 1))
        });
        if dirs_searchable && permits(meta.mode(), meta.uid(), meta.gid(), who, 2) {
            let shown = if node == Path::new(candidate) {
                candidate.to_string()
            } else {
                format!("{candidate} (-> {})", node.display())
            };
            let how = if who.gids().contains(&meta.gid()) {
                format!(" through group {}", names.name(meta.gid()))
            } else {
                " (anyone may)".to_string()
            };
            findings.push(format!(
                "{shown} ({}:{} {:04o}, a rootful engine) is writable by {}{how}",
                names.user(meta.uid()),
                names.name(meta.gid()),
                meta.mode() & 0o7777,
                who.name
            ));
        }
    }
    findings
}

/// Names for owners in a detail.
#[derive(Clone, Debug, Default)]
pub struct GroupNames {
    groups: Vec<Group>,
}

impl GroupNames {
    fn name(&self, gid: u32) -> String {
        self.groups.iter().find(|g| g.gid == gid).map_or_else(|| gid.to_string(), |g| g.name.clone())
    }

    fn user(&self, uid: u32) -> String {
        if uid == 0 {
            "root".into()
        } else {
            uid.to_string()
        }
    }
}

// ------------------------------------------------------------------------------------------------
// FCOS's rootful Docker units and the mask plan.

/// What is known of one unit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnitFacts {
    pub name: String,
    pub exists: bool,
    pub masked: bool,
    pub enabled: bool,
    /// `None` when not known (files only).
    pub active: Option<bool>,
}

/// What `converge` does with `mask_docker = true`: mask what is not masked yet, then stop
/// what runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MaskPlan {
    pub mask: Vec<String>,
    pub stop: Vec<String>,
}

impl MaskPlan {
    pub fn is_empty(&self) -> bool {
        self.mask.is_empty() && self.stop.is_empty()
    }

    /// The plan's lines for `check` ("would change: ...").
    pub fn lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if !self.mask.is_empty() {
            lines.push(format!(
                "mask {} (rootful Docker; [runner_privileges] mask_docker = true)",
                self.mask.join(" and ")
            ));
        }
        lines.extend(self.stop.iter().map(|u| format!("stop {u}")));
        lines
    }
}

pub fn mask_plan(mask_docker: bool, units: &[UnitFacts]) -> MaskPlan {
    if !mask_docker {
        return MaskPlan::default();
    }
    MaskPlan {
        mask: units.iter().filter(|u| u.exists && !u.masked).map(|u| u.name.clone()).collect(),
        stop: units.iter().filter(|u| u.active == Some(true)).map(|u| u.name.clone()).collect(),
    }
}

const UNIT_DIRS: [&str; 4] =
    ["/etc/systemd/system", "/run/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system"];

fn wants_target(unit: &str) -> &'static str {
    if unit.ends_with(".socket") {
        "sockets.target.wants"
    } else {
        "multi-user.target.wants"
    }
}

/// A unit's state from its files, as `systemctl --root` sees it: masked by a link to
/// /dev/null (or an empty file) in /etc or /run, enabled by a `.wants/` link.
pub fn unit_facts_from_files(root: &Root, unit: &str) -> UnitFacts {
    let mut facts = UnitFacts { name: unit.to_string(), ..UnitFacts::default() };
    for dir in UNIT_DIRS {
        let path = root.join(format!("{dir}/{unit}"));
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        facts.exists = true;
        let to_null = meta.file_type().is_symlink()
            && std::fs::read_link(&path).is_ok_and(|t| t == Path::new("/dev/null"));
        let empty = meta.is_file() && meta.len() == 0;
        if (to_null || empty) && (dir.starts_with("/etc") || dir.starts_with("/run")) {
            facts.masked = true;
        }
        // The first directory that has the unit decides, as systemd's search path does.
        break;
    }
    if facts.exists && !facts.masked {
        facts.enabled = UNIT_DIRS.iter().any(|dir| {
            std::fs::symlink_metadata(root.join(format!("{dir}/{}/{unit}", wants_target(unit)))).is_ok()
        });
    }
    facts
}

fn unit_facts_from_state(state: &systemd::UnitState) -> UnitFacts {
    UnitFacts {
        name: state.name.clone(),
        exists: state.load_state != "not-found",
        masked: state.load_state == "masked" || state.unit_file_state.starts_with("masked"),
        enabled: state.unit_file_state.starts_with("enabled"),
        active: Some(matches!(
            state.active_state.as_str(),
            "active" | "activating" | "reloading" | "deactivating"
        )),
    }
}

/// The Docker units, from systemd on the live system (files when the bus does not answer).
async fn docker_units(cx: &Context) -> (Vec<UnitFacts>, Option<String>) {
    let from_files = || DOCKER_UNITS.iter().map(|u| unit_facts_from_files(&cx.root, u)).collect();
    if !cx.root.is_host() {
        return (from_files(), None);
    }
    let asked = async {
        let conn = cx.system_bus.get().await?;
        let mut units = Vec::new();
        for unit in DOCKER_UNITS {
            units.push(unit_facts_from_state(&systemd::unit_state(&conn, unit).await?));
        }
        Ok::<_, anyhow::Error>(units)
    };
    match asked.await {
        Ok(units) => (units, None),
        Err(e) => {
            cx.system_bus.reset().await;
            (
                from_files(),
                Some(format!("systemd not asked ({}), unit files read", crate::journal::detail(&e))),
            )
        }
    }
}

/// What the detail says about the Docker units.
pub fn docker_note(units: &[UnitFacts]) -> Option<String> {
    let socket = units.iter().find(|u| u.name == "docker.socket")?;
    if !socket.exists {
        return None;
    }
    if socket.masked {
        return Some("docker.socket is masked".into());
    }
    let state = match (socket.enabled, socket.active) {
        (true, Some(true)) => "enabled and active",
        (true, _) => "enabled",
        (false, Some(true)) => "active",
        (false, _) => return None,
    };
    Some(format!(
        "docker.socket (rootful dockerd, for root and group docker) is {state}; [runner_privileges] mask_docker = true masks it"
    ))
}

// ------------------------------------------------------------------------------------------------
// The step.

fn runner(cx: &Context) -> (Who, GroupNames, Vec<String>) {
    let mut groups = Vec::new();
    let mut unreadable = Vec::new();
    for file in GROUP_FILES {
        match std::fs::read_to_string(cx.root.join(file)) {
            Ok(text) => groups.extend(parse_group(&text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => unreadable.push(format!("cannot read {file}: {}", io_reason(&e))),
        }
    }
    // On the live system NSS may know groups no file has (sssd, LDAP).
    let nss: Vec<u32> = if cx.root.is_host() {
        std::ffi::CString::new(cx.user.name.as_str())
            .ok()
            .and_then(|n| nix::unistd::getgrouplist(&n, nix::unistd::Gid::from_raw(cx.user.gid)).ok())
            .map(|gids| gids.into_iter().map(|g| g.as_raw()).collect())
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let mut who = Who::from_groups(&cx.user.name, cx.user.uid, cx.user.gid, &groups, &nss);
    if cx.root.is_host() {
        for (name, gid) in who.groups.iter_mut().filter(|(name, _)| name.is_empty()) {
            if let Ok(Some(group)) = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(*gid)) {
                *name = group.name;
            }
        }
    }
    (who, GroupNames { groups }, unreadable)
}

/// How many findings a detail lists before `(+N more)`.
const MAX_LISTED: usize = 6;
/// A quoted sudoers line is cut here.
const MAX_QUOTE: usize = 100;

pub fn verdict(who: &Who, findings: &[String], unknown: &[String], notes: &[String]) -> Observation {
    let mut parts: Vec<String> = findings.iter().take(MAX_LISTED).cloned().collect();
    if findings.len() > MAX_LISTED {
        parts.push(format!("(+{} more)", findings.len() - MAX_LISTED));
    }
    let tail: Vec<String> = unknown.iter().chain(notes).cloned().collect();
    let join = |head: String| if tail.is_empty() { head } else { format!("{head}; {}", tail.join("; ")) };
    if !findings.is_empty() {
        Observation::fail(CHECK, join(parts.join("; ")))
    } else if !unknown.is_empty() {
        Observation::fail(
            CHECK,
            join(format!("no path to root found for {}, but not everything could be read", who.name)),
        )
    } else {
        Observation::pass(
            CHECK,
            join(format!(
                "{} has no path to root: no wheel/sudo/docker group, no NOPASSWD rule, no rootful engine socket it can write",
                who.name
            )),
        )
    }
}

pub const SPEC: Spec = Spec {
    name: "runner-privileges",
    checks: &[CheckSpec::advisory(CHECK)],
    needs_live_system: false,
    after: &[],
    requires: &[],
    // Inspect only, unless asked to mask the rootful Docker units.
    repairs: |cx| cx.settings.runner_privileges.mask_docker,
};

pub async fn inspect(cx: &Context) -> Inspection {
    let (who, names, mut unknown) = runner(cx);
    let mut findings = root_group_findings(&who);
    let (sudoers, unreadable) = read_sudoers(&cx.root);
    unknown.extend(unreadable);
    let sudo = sudo_findings(&sudoers, &who);
    for (file, line, text) in &sudo.rules {
        findings.push(format!("{file}:{line}: {}", crate::text::one_line(text, MAX_QUOTE)));
    }
    findings.extend(reachable_sockets(&cx.root, &who, &ENGINE_SOCKETS, &names));
    let mut notes: Vec<String> = sudo.notes.iter().map(|n| crate::text::one_line(n, MAX_QUOTE)).collect();
    let (units, bus_note) = docker_units(cx).await;
    notes.extend(docker_note(&units));
    notes.extend(bus_note);
    let plan = mask_plan(cx.settings.runner_privileges.mask_docker, &units);
    Inspection { observations: vec![verdict(&who, &findings, &unknown, &notes)], plan: plan.lines() }
}

pub async fn converge(cx: &Context) -> Result<Vec<String>> {
    let (units, _) = docker_units(cx).await;
    let plan = mask_plan(cx.settings.runner_privileges.mask_docker, &units);
    if plan.is_empty() {
        return Ok(Vec::new());
    }
    if cx.root.is_host() {
        let conn = cx.system_bus.get().await?;
        mask_over_bus(&conn, &plan, cx.settings.linger.user_manager_timeout).await
    } else {
        mask_in_tree(&cx.root, &plan)
    }
}

/// `systemctl mask` and `stop` through the system manager: MaskUnitFiles (in /etc, replacing
/// links that are there), Reload, then a stop job for each running unit, socket first.
pub async fn mask_over_bus(
    conn: &zbus::Connection,
    plan: &MaskPlan,
    timeout: std::time::Duration,
) -> Result<Vec<String>> {
    let manager = systemd::manager(conn).await?;
    let mut changes = Vec::new();
    if !plan.mask.is_empty() {
        manager
            .mask_unit_files(plan.mask.clone(), false, true)
            .await
            .with_context(|| format!("masking {}", plan.mask.join(" and ")))?;
        manager.reload().await.context("reloading systemd")?;
        changes.push(format!(
            "masked {} (rootful Docker; [runner_privileges] mask_docker = true)",
            plan.mask.join(" and ")
        ));
    }
    for unit in &plan.stop {
        systemd::stop(&manager, unit, timeout).await?;
        changes.push(format!("stopped {unit}"));
    }
    let sock = crate::podman_conf::DOCKER_SOCK;
    if plan.mask.iter().any(|u| u == "docker.socket") && crate::fsutil::is_socket(Path::new(sock)) {
        // systemd leaves a stopped socket unit's file behind (RemoveOnStop=no), and that dead
        // socket would keep `docker_socket_link` from linking the path to the Podman socket.
        // /run is read-only in the agent's sandbox: a transient unit removes it (only root can
        // write /run, so what was checked is what gets removed).
        let rm = ["/usr/bin/rm", "/bin/rm"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .context("rm is not installed")?;
        let argv = [rm.to_string(), "-f".into(), "--".into(), sock.into()];
        crate::user_manager::run_transient(conn, "executor-agent-docker-sock-rm.service", &argv, timeout)
            .await
            .with_context(|| format!("removing the dead socket {sock}"))?;
        changes.push(format!("removed the dead socket {sock}"));
    }
    Ok(changes)
}

/// `systemctl --root DIR mask`: a link to /dev/null in the tree's /etc/systemd/system; a link
/// already there is replaced, a file is not (as systemd refuses it).
pub fn mask_in_tree(root: &Root, plan: &MaskPlan) -> Result<Vec<String>> {
    let dir = root.join("/etc/systemd/system");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for unit in &plan.mask {
        let path = dir.join(unit);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?
            }
            Ok(_) => bail!(
                "cannot mask {unit}: /etc/systemd/system/{unit} is a file (a local unit), remove it first"
            ),
            Err(_) => {}
        }
        std::os::unix::fs::symlink("/dev/null", &path)
            .with_context(|| format!("linking {} to /dev/null", path.display()))?;
    }
    Ok(if plan.mask.is_empty() {
        Vec::new()
    } else {
        vec![format!(
            "masked {} (rootful Docker; [runner_privileges] mask_docker = true)",
            plan.mask.join(" and ")
        )]
    })
}

#[cfg(test)]
mod tests;
