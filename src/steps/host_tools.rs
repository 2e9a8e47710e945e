//! Host facts that jobs depend on but the agent mostly cannot change: cgroup v2 controllers
//! delegated to the user's manager (else job resource limits silently do nothing), and a
//! `docker` CLI for the manager's `docker system dial-stdio`. Both advisory by default.

use anyhow::{Context as _, Result};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{CheckSpec, Context, Inspection, Spec};
use crate::checks::Observation;
use crate::fsutil;
use crate::idmap::executable_by;

pub const CGROUP_CHECK: &str = "cgroup-delegation";
pub const DOCKER_CHECK: &str = "docker-cli";

/// Our drop-in for every user manager; `Delegate=` lists add up across drop-ins.
pub const DROP_IN: &str = "/etc/systemd/system/user@.service.d/50-executor-agent-delegate.conf";
/// What rootless Podman needs to enforce `--cpus`, `--memory` and `--pids-limit`.
pub const NEEDED: [&str; 3] = ["cpu", "memory", "pids"];
/// The manager's login PATH as an SSH session of the runner user has it.
pub const DOCKER_DIRS: [&str; 5] = ["/usr/local/bin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/sbin"];
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

pub fn drop_in_contents() -> String {
    "# Written by executor-agent ([cgroups] fix_delegation = true): delegate the cgroup v2\n\
     # controllers rootless Podman needs to enforce CPU, memory and PID limits of CI jobs.\n\
     # Takes effect when user@UID.service restarts (or at the next boot).\n\
     [Service]\n\
     Delegate=cpu cpuset io memory pids\n"
        .to_string()
}

/// Which cgroup hierarchy the host runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hierarchy {
    /// cgroup v2 only, at /sys/fs/cgroup.
    Unified,
    /// v1 controllers, with an empty v2 tree at /sys/fs/cgroup/unified.
    Hybrid,
    /// v1 only.
    Legacy,
}

fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

pub fn hierarchy(cgroup_root: &Path) -> Hierarchy {
    if is_cgroup2(cgroup_root) {
        Hierarchy::Unified
    } else if is_cgroup2(&cgroup_root.join("unified")) {
        Hierarchy::Hybrid
    } else {
        Hierarchy::Legacy
    }
}

/// `<v2 root>/user.slice/user-UID.slice/user@UID.service/cgroup.controllers`.
pub fn controllers_file(cgroup_root: &Path, hierarchy: Hierarchy, uid: u32) -> PathBuf {
    let v2 = match hierarchy {
        Hierarchy::Hybrid => cgroup_root.join("unified"),
        _ => cgroup_root.to_path_buf(),
    };
    v2.join(format!("user.slice/user-{uid}.slice/user@{uid}.service/cgroup.controllers"))
}

fn read_controllers(root: &Path, hierarchy: Hierarchy, uid: u32) -> (io::Result<String>, io::Result<String>) {
    (
        std::fs::read_to_string(root.join("cgroup.controllers")),
        std::fs::read_to_string(controllers_file(root, hierarchy, uid)),
    )
}

/// The needed controllers missing from a `cgroup.controllers` text.
pub fn missing_controllers(text: &str) -> Vec<&'static str> {
    let present: Vec<&str> = text.split_whitespace().collect();
    NEEDED.iter().copied().filter(|c| !present.contains(c)).collect()
}

/// What the check says, from the hierarchy, the v2 root's `cgroup.controllers` (what the
/// kernel offers at all) and the user manager's. `Err((detail, fixable))`: fixable when a
/// `Delegate=` drop-in would help.
pub fn judge_delegation(
    hierarchy: Hierarchy,
    root_controllers: &io::Result<String>,
    controllers: &io::Result<String>,
    uid: u32,
) -> Result<String, (String, bool)> {
    let unit = format!("user@{uid}.service");
    let not_enforced = "resource limits of jobs are not enforced";
    if let (Hierarchy::Unified, Ok(root)) = (hierarchy, root_controllers) {
        let missing = missing_controllers(root);
        if !missing.is_empty() {
            return Err((
                format!(
                    "cgroup v2 offers no {} controller here (held by a v1 hierarchy or not built): {not_enforced}",
                    missing.join(", ")
                ),
                false,
            ));
        }
    }
    match (hierarchy, controllers) {
        (Hierarchy::Legacy, _) => Err((format!("cgroup v2 not in use: {not_enforced}"), false)),
        (Hierarchy::Unified | Hierarchy::Hybrid, Err(e)) if e.kind() == io::ErrorKind::NotFound => {
            Err((format!("{unit} is not running (it has no cgroup)"), false))
        }
        (_, Err(e)) => Err((format!("reading {unit}'s cgroup.controllers: {e}"), false)),
        (_, Ok(text)) => {
            let missing = missing_controllers(text);
            let present = if text.trim().is_empty() { "none".to_string() } else { text.trim().to_string() };
            match (hierarchy, missing.is_empty()) {
                (_, true) => Ok(format!("{unit} has {present} delegated")),
                (Hierarchy::Hybrid, false) => Err((
                    format!(
                        "cgroup v2 not in use (hybrid hierarchy, the controllers are on v1): {not_enforced}"
                    ),
                    false,
                )),
                (_, false) => Err((
                    format!(
                        "{unit} has {present} delegated, missing {}: job containers that set {} limits \
                         fail to start (crun: controller is not available)",
                        missing.join(" "),
                        missing.join(", ")
                    ),
                    true,
                )),
            }
        }
    }
}

fn drop_in_in_place(cx: &Context) -> bool {
    std::fs::read_to_string(cx.root.join(DROP_IN)).is_ok_and(|t| t == drop_in_contents())
}

fn cgroup_observation(cx: &Context, plan: &mut Vec<String>) -> Observation {
    let root = Path::new(CGROUP_ROOT);
    let hierarchy = hierarchy(root);
    let (root_controllers, controllers) = read_controllers(root, hierarchy, cx.user.uid);
    match judge_delegation(hierarchy, &root_controllers, &controllers, cx.user.uid) {
        Ok(detail) => Observation::pass(CGROUP_CHECK, detail),
        Err((detail, false)) => Observation::fail(CGROUP_CHECK, detail),
        Err((mut detail, true)) => {
            let unit = cx.user.manager_unit();
            if drop_in_in_place(cx) {
                detail.push_str(&format!(
                    "; {DROP_IN} is in place and takes effect when {unit} restarts \
                     (the agent does not restart it: that would stop running jobs)"
                ));
            } else if cx.settings.cgroups.fix_delegation {
                plan.push(format!("write {DROP_IN} and reload systemd (takes effect when {unit} restarts)"));
            } else {
                detail.push_str("; [cgroups] fix_delegation = true adds a Delegate= drop-in");
            }
            Observation::fail(CGROUP_CHECK, detail)
        }
    }
}

/// The first `docker` in `dirs` (under `root`) that the user may run; else why not.
pub fn find_docker(root: &crate::paths::Root, dirs: &[&str], uid: u32, gid: u32) -> Result<PathBuf, String> {
    let mut refused = Vec::new();
    for dir in dirs {
        let shown = Path::new(dir).join("docker");
        let Ok(md) = std::fs::metadata(root.join(&shown)) else { continue };
        if !md.is_file() {
            refused.push(format!("{} is not a regular file", shown.display()));
        } else if !executable_by(md.mode(), md.uid(), md.gid(), uid, gid) {
            refused.push(format!(
                "{} is not executable by the runner user (mode {:04o})",
                shown.display(),
                md.mode() & 0o7777
            ));
        } else {
            return Ok(shown);
        }
    }
    let mut why = format!(
        "no docker CLI on the runner user's PATH ({}): the runner manager's `docker system dial-stdio` fails",
        dirs.join(", ")
    );
    if !refused.is_empty() {
        why.push_str(&format!(" ({})", refused.join("; ")));
    }
    Err(why)
}

fn docker_observation(cx: &Context) -> Observation {
    match find_docker(&cx.root, &DOCKER_DIRS, cx.user.uid, cx.user.gid) {
        Ok(path) => Observation::pass(DOCKER_CHECK, format!("docker at {}", path.display())),
        Err(why) => Observation::fail(DOCKER_CHECK, why),
    }
}

pub const SPEC: Spec = Spec {
    name: "host-tools",
    checks: &[CheckSpec::advisory(CGROUP_CHECK), CheckSpec::advisory(DOCKER_CHECK)],
    needs_live_system: true,
    after: &[],
    requires: &[],
    // Only the delegation drop-in can be written, and only when asked to.
    repairs: |cx| cx.settings.cgroups.fix_delegation,
};

pub async fn inspect(cx: &Context) -> Inspection {
    let mut plan = Vec::new();
    let cgroup = cgroup_observation(cx, &mut plan);
    Inspection { observations: vec![cgroup, docker_observation(cx)], plan }
}

/// Writes the drop-in when `[cgroups] fix_delegation` is on; nothing about docker.
/// Never restarts the user manager: that would kill the jobs running under it.
pub async fn converge(cx: &Context) -> Result<Vec<String>> {
    if !cx.settings.cgroups.fix_delegation {
        return Ok(Vec::new());
    }
    let root = Path::new(CGROUP_ROOT);
    let hierarchy = hierarchy(root);
    let (root_controllers, controllers) = read_controllers(root, hierarchy, cx.user.uid);
    if !matches!(judge_delegation(hierarchy, &root_controllers, &controllers, cx.user.uid), Err((_, true))) {
        return Ok(Vec::new());
    }
    write_drop_in(cx).await
}

/// Writes the drop-in if it differs and makes systemd load it; never restarts anything.
pub async fn write_drop_in(cx: &Context) -> Result<Vec<String>> {
    let unit = cx.user.manager_unit();
    let path = cx.root.join(DROP_IN);
    let mut changes = Vec::new();
    let wrote = ensure_file(&path, drop_in_contents().as_bytes())?;
    if wrote {
        changes.push(format!(
            "wrote {DROP_IN}: takes effect when {unit} restarts (not restarted: that would stop running jobs)"
        ));
    }
    let conn = cx.system_bus.get().await?;
    let manager = crate::systemd::manager(&conn).await?;
    // Reload only when systemd has not loaded our drop-in yet: a failed reload after a
    // write is retried on the next pass, and a converged node is not reloaded every pass.
    let loaded = loaded_drop_ins(&conn, &manager, &unit).await;
    let reload = match &loaded {
        Ok(paths) => !paths.iter().any(|p| p == DROP_IN),
        Err(_) => wrote,
    };
    if reload {
        manager.reload().await.context("reloading systemd")?;
        changes.push("reloaded systemd".to_string());
    }
    Ok(changes)
}

async fn loaded_drop_ins(
    conn: &zbus::Connection,
    manager: &zbus_systemd::systemd1::ManagerProxy<'_>,
    unit: &str,
) -> Result<Vec<String>> {
    let path = manager.load_unit(unit.to_string()).await?;
    let unit = zbus_systemd::systemd1::UnitProxy::builder(conn)
        .path(path)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    Ok(unit.drop_in_paths().await?)
}

/// Replaces `path` with `contents` unless it already holds them; creates the directory
/// (0755) first. True when it wrote.
fn ensure_file(path: &Path, contents: &[u8]) -> Result<bool> {
    if std::fs::read(path).is_ok_and(|c| c == contents) {
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        if !dir.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
            // The agent's UMask=0077 would leave it 0700: systemd reads it as root anyway,
            // but `systemctl cat` for users and tools expect 0755.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("changing mode of {}", dir.display()))?;
        }
    }
    fsutil::replace_file_atomically(path, contents, 0o644)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::Root;

    #[test]
    fn finds_missing_controllers() {
        assert!(missing_controllers("cpuset cpu io memory pids\n").is_empty());
        assert_eq!(missing_controllers("memory pids\n"), ["cpu"]);
        assert_eq!(missing_controllers("\n"), ["cpu", "memory", "pids"]);
        // Not fooled by a longer name.
        assert_eq!(missing_controllers("cpuset memory pids"), ["cpu"]);
    }

    #[test]
    fn verdicts_for_each_hierarchy() {
        let ok = Ok("cpuset cpu io memory pids\n".to_string());
        let all = Ok("cpuset cpu io memory hugetlb pids rdma misc\n".to_string());
        assert_eq!(
            judge_delegation(Hierarchy::Unified, &all, &ok, 1000),
            Ok("user@1000.service has cpuset cpu io memory pids delegated".into())
        );
        let (detail, fixable) =
            judge_delegation(Hierarchy::Unified, &all, &Ok("memory pids\n".into()), 1000).unwrap_err();
        assert!(fixable);
        assert_eq!(
            detail,
            "user@1000.service has memory pids delegated, missing cpu: job containers that set cpu limits \
             fail to start (crun: controller is not available)"
        );
        let (detail, fixable) =
            judge_delegation(Hierarchy::Hybrid, &Ok(String::new()), &Ok(String::new()), 1000).unwrap_err();
        assert!(!fixable);
        assert!(detail.starts_with("cgroup v2 not in use (hybrid"), "{detail}");
        let (detail, _) = judge_delegation(Hierarchy::Legacy, &all, &ok, 1000).unwrap_err();
        assert_eq!(detail, "cgroup v2 not in use: resource limits of jobs are not enforced");
        let gone = Err(io::Error::from(io::ErrorKind::NotFound));
        let (detail, fixable) = judge_delegation(Hierarchy::Unified, &all, &gone, 1000).unwrap_err();
        assert_eq!(
            (detail.as_str(), fixable),
            ("user@1000.service is not running (it has no cgroup)", false)
        );
        // The kernel offers the controllers to v2 at all (a v2 container on a v1 host does not):
        // a drop-in would not help.
        let (detail, fixable) =
            judge_delegation(Hierarchy::Unified, &Ok(String::new()), &Ok(String::new()), 1000).unwrap_err();
        assert!(!fixable);
        assert!(detail.starts_with("cgroup v2 offers no cpu, memory, pids controller"), "{detail}");
    }

    #[test]
    fn controllers_path_follows_the_hierarchy() {
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(
            controllers_file(root, Hierarchy::Unified, 1000),
            Path::new("/sys/fs/cgroup/user.slice/user-1000.slice/user@1000.service/cgroup.controllers")
        );
        assert_eq!(
            controllers_file(root, Hierarchy::Hybrid, 1000),
            Path::new(
                "/sys/fs/cgroup/unified/user.slice/user-1000.slice/user@1000.service/cgroup.controllers"
            )
        );
    }

    #[test]
    fn drop_in_delegates_what_podman_needs() {
        let text = drop_in_contents();
        assert!(text.contains("\n[Service]\nDelegate=cpu cpuset io memory pids\n"), "{text}");
        let delegate = text.lines().find_map(|l| l.strip_prefix("Delegate=")).unwrap();
        assert!(missing_controllers(delegate).is_empty());
        assert!(DROP_IN.starts_with("/etc/systemd/system/user@.service.d/") && DROP_IN.ends_with(".conf"));
    }

    #[test]
    fn drop_in_is_written_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = Root::new(dir.path()).join(DROP_IN);
        assert!(ensure_file(&path, drop_in_contents().as_bytes()).unwrap());
        let md = std::fs::metadata(&path).unwrap();
        assert_eq!(md.mode() & 0o777, 0o644);
        assert_eq!(std::fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777, 0o755);
        assert!(!ensure_file(&path, drop_in_contents().as_bytes()).unwrap());
        let again = std::fs::metadata(&path).unwrap();
        assert_eq!((again.ino(), again.mtime_nsec()), (md.ino(), md.mtime_nsec()));
        std::fs::write(&path, "[Service]\nDelegate=pids\n").unwrap();
        assert!(ensure_file(&path, drop_in_contents().as_bytes()).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), drop_in_contents());
    }

    #[test]
    fn docker_is_found_where_the_user_can_run_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        let miss = find_docker(&root, &DOCKER_DIRS, 1000, 1000).unwrap_err();
        assert!(miss.starts_with("no docker CLI on the runner user's PATH (/usr/local/bin, "), "{miss}");
        std::fs::create_dir_all(dir.path().join("usr/local/bin")).unwrap();
        std::fs::create_dir_all(dir.path().join("usr/bin")).unwrap();
        let local = dir.path().join("usr/local/bin/docker");
        std::fs::write(&local, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o750)).unwrap();
        // Root-owned 0750: the runner user (not in the group) cannot run it.
        if nix::unistd::geteuid().is_root() {
            let miss = find_docker(&root, &DOCKER_DIRS, 1000, 1000).unwrap_err();
            assert!(
                miss.contains("/usr/local/bin/docker is not executable by the runner user (mode 0750)"),
                "{miss}"
            );
        }
        let usr = dir.path().join("usr/bin/docker");
        std::fs::write(&usr, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&usr, std::fs::Permissions::from_mode(0o755)).unwrap();
        let expected =
            if nix::unistd::geteuid().is_root() { "/usr/bin/docker" } else { "/usr/local/bin/docker" };
        assert_eq!(find_docker(&root, &DOCKER_DIRS, 1000, 1000).unwrap(), Path::new(expected));
        std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(find_docker(&root, &DOCKER_DIRS, 1000, 1000).unwrap(), Path::new("/usr/local/bin/docker"));
    }
}
