//! `net.ipv4.ip_unprivileged_port_start`: set live under /proc/sys and persisted in sysctl.d,
//! so rootless containers can publish low ports such as 80.

use anyhow::{bail, Context as _, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{CheckSpec, Context, Inspection, Spec};
use crate::checks::Observation;
use crate::fsutil;

pub const CHECK: &str = "unprivileged-ports";
pub const KEY: &str = "net.ipv4.ip_unprivileged_port_start";
const LIVE: &str = "/proc/sys/net/ipv4/ip_unprivileged_port_start";
const LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
/// Our drop-in. Sorted late so that vendor files do not override it by accident.
pub const PERSISTED: &str = "/etc/sysctl.d/90-executor-agent.conf";
/// systemd-sysctl's search path; for the same file name the first directory wins.
const SYSCTL_DIRS: [&str; 5] =
    ["/etc/sysctl.d", "/run/sysctl.d", "/usr/local/lib/sysctl.d", "/usr/lib/sysctl.d", "/lib/sysctl.d"];

pub fn persisted_contents(value: u16) -> String {
    format!(
        "# Written by executor-agent: rootless Podman may publish ports from {value} up.\n\
         # Change [sysctl] unprivileged_port_start in /etc/executor-agent/config.toml instead.\n\
         {KEY} = {value}\n"
    )
}

/// A setting of our key in a sysctl.d file that is read after ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    pub file: PathBuf,
    pub line: usize,
    pub value: String,
}

/// The last file (in systemd-sysctl's order) after ours that sets the key to another value.
pub fn find_override(root: &crate::paths::Root, wanted: u16) -> Option<Override> {
    let mut files: BTreeMap<std::ffi::OsString, PathBuf> = BTreeMap::new();
    for dir in SYSCTL_DIRS {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if Path::new(&name).extension().is_some_and(|e| e == "conf") {
                files.entry(name).or_insert_with(|| entry.path());
            }
        }
    }
    let ours = Path::new(PERSISTED).file_name()?.to_os_string();
    let mut last = None;
    for (name, path) in files.range(ours..) {
        if path == &root.join(PERSISTED) || name.as_os_str() == Path::new(PERSISTED).file_name()? {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        for (i, line) in text.lines().enumerate() {
            if let Some(value) = sysctl_assignment(line, KEY) {
                last = (value != wanted.to_string()).then(|| Override {
                    file: path.clone(),
                    line: i + 1,
                    value,
                });
            }
        }
    }
    last
}

/// The value a sysctl.d line assigns to `key`, if it does (`a.b = v`, `a/b=v`, `-a.b = v`).
fn sysctl_assignment(line: &str, key: &str) -> Option<String> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
        return None;
    }
    let (name, value) = line.split_once('=')?;
    let name = name.trim().trim_start_matches('-');
    // sysctl.d(5): a key whose first separator is '/' uses '/' throughout.
    let name = if name.find('/') < name.find('.') || !name.contains('.') {
        name.replace('/', ".")
    } else {
        name.to_string()
    };
    (name == key).then(|| value.trim().to_string())
}

fn read_trimmed(path: &str) -> Result<String> {
    Ok(std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?.trim().to_string())
}

/// The kernel refuses a start above the low end of the local port range (EINVAL).
fn validate(wanted: u16) -> Result<()> {
    validate_against(wanted, &read_trimmed(LOCAL_PORT_RANGE)?)
}

fn validate_against(wanted: u16, local_port_range: &str) -> Result<()> {
    let low: u32 = local_port_range
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("cannot parse ip_local_port_range {local_port_range:?}"))?;
    if u32::from(wanted) > low {
        bail!(
            "[sysctl] unprivileged_port_start = {wanted} is above the low end of \
             net.ipv4.ip_local_port_range ({}); the kernel would reject it",
            local_port_range.split_whitespace().collect::<Vec<_>>().join(" ")
        );
    }
    Ok(())
}

pub const SPEC: Spec = Spec {
    name: "unprivileged-ports",
    checks: &[CheckSpec::required(CHECK)],
    needs_live_system: false,
    after: &[],
    requires: &[],
    repairs: super::always,
};

pub async fn inspect(cx: &Context) -> Inspection {
    let wanted = cx.settings.sysctl.unprivileged_port_start;
    let persisted_path = cx.root.join(PERSISTED);
    let mut plan = Vec::new();
    let mut problems = Vec::new();
    if cx.root.is_host() {
        match validate(wanted).and_then(|_| read_trimmed(LIVE)) {
            Err(e) => problems.push(crate::journal::detail(&e)),
            Ok(live) if live != wanted.to_string() => {
                problems.push(format!("live value is {live}"));
                plan.push(format!("write {wanted} to {LIVE}"));
            }
            Ok(_) => {}
        }
    }
    match std::fs::read_to_string(&persisted_path) {
        Ok(text) if text == persisted_contents(wanted) => {}
        Ok(_) => {
            problems.push(format!("{PERSISTED} has other contents"));
            plan.push(format!("rewrite {PERSISTED}"));
        }
        Err(_) => {
            problems.push(format!("{PERSISTED} is missing"));
            plan.push(format!("write {PERSISTED}"));
        }
    }
    if let Some(o) = find_override(&cx.root, wanted) {
        problems.push(format!(
            "{}:{} sets {} after {PERSISTED}, so it wins at boot",
            o.file
                .strip_prefix(cx.root.dir())
                .map(|p| Path::new("/").join(p))
                .unwrap_or(o.file.clone())
                .display(),
            o.line,
            o.value
        ));
    }
    let observation = if problems.is_empty() {
        Observation::pass(CHECK, format!("{KEY} = {wanted}, live and persisted"))
    } else {
        Observation::fail(CHECK, format!("want {wanted}: {}", problems.join("; ")))
    };
    Inspection { observations: vec![observation], plan }
}

pub async fn converge(cx: &Context) -> Result<Vec<String>> {
    let wanted = cx.settings.sysctl.unprivileged_port_start;
    let mut changes = Vec::new();
    if cx.root.is_host() {
        validate(wanted)?;
    }
    let path = cx.root.join(PERSISTED);
    let contents = persisted_contents(wanted);
    if std::fs::read_to_string(&path).ok().as_deref() != Some(contents.as_str()) {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        fsutil::replace_file_atomically(&path, contents.as_bytes(), 0o644)
            .with_context(|| format!("writing {}", path.display()))?;
        changes.push(format!("wrote {PERSISTED}"));
    }
    if cx.root.is_host() && read_trimmed(LIVE)? != wanted.to_string() {
        std::fs::write(LIVE, wanted.to_string()).with_context(|| format!("writing {LIVE}"))?;
        changes.push(format!("set {KEY} = {wanted}"));
    }
    if let Some(o) = find_override(&cx.root, wanted) {
        bail!(
            "{}:{} sets {KEY} = {} after our file; remove it or set the same value",
            o.file.display(),
            o.line,
            o.value
        );
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::Root;

    #[test]
    fn recognises_assignments_in_every_spelling() {
        assert_eq!(sysctl_assignment("net.ipv4.ip_unprivileged_port_start = 80", KEY).as_deref(), Some("80"));
        assert_eq!(sysctl_assignment("net/ipv4/ip_unprivileged_port_start=0", KEY).as_deref(), Some("0"));
        assert_eq!(
            sysctl_assignment("-net.ipv4.ip_unprivileged_port_start = 1024", KEY).as_deref(),
            Some("1024")
        );
        assert_eq!(sysctl_assignment("# net.ipv4.ip_unprivileged_port_start = 1", KEY), None);
        assert_eq!(sysctl_assignment("net.ipv4.ip_forward = 1", KEY), None);
    }

    fn write(root: &Root, path: &str, text: &str) {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn reports_a_later_file_that_overrides_ours() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        write(&root, PERSISTED, &persisted_contents(80));
        // Earlier than ours: harmless. Same value later: harmless.
        write(&root, "/usr/lib/sysctl.d/50-default.conf", "net.ipv4.ip_unprivileged_port_start = 1024\n");
        write(&root, "/etc/sysctl.d/95-same.conf", "net.ipv4.ip_unprivileged_port_start = 80\n");
        assert_eq!(find_override(&root, 80), None);

        write(
            &root,
            "/usr/lib/sysctl.d/99-vendor.conf",
            "# vendor\nnet/ipv4/ip_unprivileged_port_start = 1024\n",
        );
        let o = find_override(&root, 80).unwrap();
        assert_eq!((o.line, o.value.as_str()), (2, "1024"));
        assert!(o.file.ends_with("usr/lib/sysctl.d/99-vendor.conf"));

        // A same-named file in /etc hides the vendor one.
        write(&root, "/etc/sysctl.d/99-vendor.conf", "kernel.panic = 10\n");
        assert_eq!(find_override(&root, 80), None);
    }

    #[test]
    fn refuses_a_start_above_the_local_port_range() {
        assert!(validate_against(80, "32768\t60999").is_ok());
        assert!(validate_against(32768, "32768\t60999").is_ok());
        let err = validate_against(40000, "32768\t60999").unwrap_err().to_string();
        assert!(err.contains("unprivileged_port_start = 40000 is above the low end"), "{err}");
        assert!(err.contains("(32768 60999)"), "{err}");
        assert!(validate_against(80, "garbage").is_err());
    }

    #[test]
    fn persisted_file_sets_the_key() {
        let text = persisted_contents(80);
        assert!(text.ends_with('\n'));
        assert_eq!(text.lines().filter_map(|l| sysctl_assignment(l, KEY)).collect::<Vec<_>>(), ["80"]);
    }
}
