//! The runner user's own Podman configuration: `storage.conf` (native rootless overlay
//! rather than vfs), `containers.conf` (systemd cgroup manager, events to the journal, the
//! rootless network command), registry credential helpers in `auth.json`, and an optional
//! `/var/run/docker.sock` link for tools that hard-code it.
//!
//! Only our keys are changed; every other key, comment and the layout stay. A file is
//! rewritten only when one of our keys differs, so a converged node is never written.
//!
//! Security: root writes into a directory tree the runner user controls. Every directory
//! from the home down is opened relative to its parent with `O_NOFOLLOW` and must belong to
//! the user (or root); files are read with `O_NOFOLLOW`, must be regular, single-linked
//! and belong to the user (or root); new contents go to an `O_EXCL` temporary file in the
//! same opened directory, chowned to the user, then `renameat` over the name. A symlink
//! planted anywhere below the home therefore makes the step fail, never makes root read
//! or write elsewhere; a file swapped in while we edit is detected and left alone.

use anyhow::{anyhow, bail, Context as _, Result};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use super::{CheckSpec, Context, Inspection, Spec};
use crate::checks::Observation;
use crate::config::PodmanConfig;
use crate::fsutil;
use crate::idmap::executable_by;
use crate::podman_conf::*;

pub const CHECK: &str = "podman-config";
pub use crate::podman_conf::DOCKER_SOCK;
/// Makes the link at boot (and now, through a transient systemd-tmpfiles run).
pub const TMPFILES: &str = "/etc/tmpfiles.d/executor-agent-docker-sock.conf";
/// The user manager's PATH, where Podman looks for `docker-credential-*`.
pub const HELPER_DIRS: [&str; 6] =
    ["/usr/local/bin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/sbin", "/sbin"];

fn storage_settings(cfg: &PodmanConfig) -> Vec<Setting> {
    vec![Setting { table: "storage", key: "driver", value: cfg.storage_driver.clone().into() }]
}

fn containers_settings(cfg: &PodmanConfig) -> Vec<Setting> {
    let mut settings = vec![
        Setting { table: "engine", key: "cgroup_manager", value: "systemd".into() },
        Setting { table: "engine", key: "events_logger", value: "journald".into() },
    ];
    if cfg.keep_api_service {
        // `podman system service --time` defaults to this: 0 never exits when idle.
        settings.push(Setting { table: "engine", key: "service_timeout", value: Scalar::Int(0) });
    }
    if !cfg.network_cmd.is_empty() {
        settings.push(Setting {
            table: "network",
            key: "default_rootless_network_cmd",
            value: cfg.network_cmd.clone().into(),
        });
    }
    settings
}

// ------------------------------------------------------------------------------------------------
// Anchored access to the user's directories: crate::userfs (also used by the other steps that
// read what the runner user controls).

pub use crate::userfs::{Dir, Owner, UserFile};

// ------------------------------------------------------------------------------------------------
// What the step sees.

/// Everything read for one pass: files as found, and the decisions.
struct Seen {
    /// What makes the check fail and the repair cannot change.
    problems: Vec<String>,
    facts: Vec<String>,
    writes: Vec<PlannedWrite>,
    link: LinkAction,
}

struct PlannedWrite {
    name: &'static str,
    contents: String,
    prior: Option<UserFile>,
    new_mode: u32,
    changes: Vec<Change>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum LinkAction {
    None,
    /// Write (or replace) our tmpfiles.d file, then make the link now (live only).
    Ensure {
        write_tmpfiles: bool,
        link_now: bool,
    },
    /// docker_socket_link is off: remove our tmpfiles.d file.
    RemoveTmpfiles,
}

fn home_of(cx: &Context) -> PathBuf {
    cx.root.join(&cx.user.home)
}

fn owner(cx: &Context) -> Owner {
    Owner { uid: cx.user.uid, gid: cx.user.gid }
}

fn config_dir_path(cx: &Context) -> PathBuf {
    home_of(cx).join(".config/containers")
}

/// `~/.config/containers`, opened anchored, or `None` when some part is missing.
fn open_config_dir(cx: &Context) -> io::Result<Option<Dir>> {
    let owner = owner(cx);
    let Some(home) = Dir::open_home(&home_of(cx), owner)? else {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{}'s home {} does not exist", cx.user.name, home_of(cx).display()),
        ));
    };
    let Some(config) = home.child(".config", owner)? else { return Ok(None) };
    config.child("containers", owner)
}

/// Where the user's images live: `[storage] graphroot` of the user's storage.conf, else
/// `rootless_storage_path` of the system's, else `~/.local/share/containers/storage`.
fn graphroot(cx: &Context, user_storage_conf: Option<&str>) -> PathBuf {
    use crate::steps::storage::graphroot;
    let user_conf = cx.user.home.join(".config/containers/storage.conf");
    // Unreadable or invalid storage.conf files are the storage check's to report; here the
    // driver decision only needs where layers would be, so the default stands in.
    let system = graphroot::system_conf(&cx.root).ok().flatten();
    let found = graphroot::resolve(
        &cx.user,
        user_storage_conf.map(|t| (user_conf.as_path(), t)),
        system.as_ref().map(|(f, t)| (f.as_path(), t.as_str())),
    );
    match found {
        Ok(g) => cx.root.join(g.path),
        Err(_) => home_of(cx).join(".local/share/containers/storage"),
    }
}

/// Drivers that have a layer store under `graphroot` (c/storage's `<driver>-layers`). The
/// graphroot is the user's to name and to make: it is opened without following a link the
/// user could have made (see [`crate::userfs`]), so its names are never another directory's.
pub fn drivers_in_use(graphroot: &Path) -> io::Result<Vec<String>> {
    let Some(dir) = Dir::open(graphroot, None)? else { return Ok(Vec::new()) };
    let mut drivers: Vec<String> = dir
        .names()?
        .into_iter()
        .filter(|name| dir.is_dir_at(name))
        .filter_map(|name| name.to_str()?.strip_suffix("-layers").map(str::to_string))
        .filter(|d| !d.is_empty())
        .collect();
    drivers.sort();
    Ok(drivers)
}

fn find_helper_binary(cx: &Context, helper: &str) -> Result<PathBuf, String> {
    let name = format!("docker-credential-{helper}");
    for dir in HELPER_DIRS {
        let shown = Path::new(dir).join(&name);
        if let Ok(md) = std::fs::metadata(cx.root.join(&shown)) {
            use std::os::unix::fs::MetadataExt;
            if md.is_file() && executable_by(md.mode(), md.uid(), md.gid(), cx.user.uid, cx.user.gid) {
                return Ok(shown);
            }
        }
    }
    Err(format!("{name} is not on {}'s PATH ({})", cx.user.name, HELPER_DIRS.join(", ")))
}

/// A TOML file of ours: read it, and plan the edit.
fn plan_toml(
    dir: Option<&Dir>,
    name: &'static str,
    settings: &[Setting],
    owner: Owner,
    seen: &mut Seen,
) -> Option<UserFile> {
    let file = match dir.map(|d| d.read(name, owner)).transpose() {
        Ok(f) => f.flatten(),
        Err(e) => {
            seen.problems.push(e.to_string());
            return None;
        }
    };
    let text = file.as_ref().map_or("", |f| f.text.as_str());
    match edit_toml(text, settings) {
        Err(e) => seen.problems.push(format!("{name}: {e}; not rewritten")),
        Ok(None) => {}
        Ok(Some((contents, changes))) => {
            seen.writes.push(PlannedWrite { name, contents, prior: file.clone(), new_mode: 0o644, changes })
        }
    }
    file
}

/// User drop-ins (`containers.conf.d/*.conf`, read after containers.conf) that set one of
/// our keys to something else.
fn drop_in_overrides(dir: Option<&Dir>, settings: &[Setting], owner: Owner) -> Vec<String> {
    let Some(dir) = dir else { return Vec::new() };
    let d = match dir.child("containers.conf.d", owner) {
        Ok(Some(d)) => d,
        Ok(None) => return Vec::new(),
        Err(e) => return vec![e.to_string()],
    };
    let mut found = Vec::new();
    for name in d.names().unwrap_or_default() {
        let Some(name) = name.to_str().filter(|n| n.ends_with(".conf")) else { continue };
        let file = match d.read(name, owner) {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(e) => {
                found.push(e.to_string());
                continue;
            }
        };
        for s in settings {
            if let Some(v) = toml_raw(&file.text, s.table, s.key) {
                if !s.value.matches(&v) {
                    // Only the type and our value are shown: the text is the user's.
                    found.push(format!(
                        "{}/{name} sets [{}] {} (type {}), which overrides {:?}",
                        d.path.display(),
                        s.table,
                        s.key,
                        v.type_name(),
                        s.value.to_string()
                    ));
                }
            }
        }
    }
    found
}

fn see(cx: &Context) -> Seen {
    let cfg = &cx.settings.podman_config;
    let owner = owner(cx);
    let mut seen =
        Seen { problems: Vec::new(), facts: Vec::new(), writes: Vec::new(), link: LinkAction::None };
    let dir = match open_config_dir(cx) {
        Ok(dir) => dir,
        Err(e) => {
            seen.problems.push(e.to_string());
            return seen;
        }
    };
    let dir = dir.as_ref();

    // storage.conf, unless that would switch the driver under existing storage.
    let storage = storage_settings(cfg);
    let before = seen.writes.len();
    let file = plan_toml(dir, "storage.conf", &storage, owner, &mut seen);
    let text = file.as_ref().map(|f| f.text.as_str());
    let configured = text.and_then(|t| toml_value(t, "storage", "driver").ok().flatten());
    let root = graphroot(cx, text);
    let decision = match drivers_in_use(&root) {
        Ok(in_use) => decide_driver(&cfg.storage_driver, configured.as_deref(), &in_use, &root),
        // Storage that cannot be looked at safely is not switched either.
        Err(e) => DriverDecision::Conflict(format!("{e}; the storage driver is left as it is")),
    };
    match decision {
        DriverDecision::Conflict(why) => {
            seen.writes.truncate(before);
            seen.problems.push(why);
        }
        DriverDecision::Keep | DriverDecision::Set => {
            seen.facts.push(format!("storage driver {}", cfg.storage_driver));
        }
    }

    // containers.conf, and user drop-ins that would override it.
    let containers = containers_settings(cfg);
    plan_toml(dir, "containers.conf", &containers, owner, &mut seen);
    seen.problems.extend(drop_in_overrides(dir, &containers, owner));
    seen.facts.push("cgroup_manager systemd, events to the journal".into());
    if cfg.keep_api_service {
        seen.facts.push("API service kept running".into());
    }
    if !cfg.network_cmd.is_empty() {
        seen.facts.push(format!("network {}", cfg.network_cmd));
    }

    // Credential helpers.
    if !cfg.cred_helpers.is_empty() {
        let mut wanted = BTreeMap::new();
        for (registry, helper) in &cfg.cred_helpers {
            if !valid_registry(registry) || !valid_helper_name(helper) {
                seen.problems
                    .push(format!("credential helper {helper:?} for {registry:?} is not a valid name"));
                continue;
            }
            if let Err(e) = find_helper_binary(cx, helper) {
                seen.problems.push(format!("{e}: pulls from {registry} fail"));
            }
            wanted.insert(registry.clone(), helper.clone());
        }
        match dir.map(|d| d.read("auth.json", owner)).transpose() {
            Err(e) => seen.problems.push(e.to_string()),
            Ok(file) => {
                let file = file.flatten();
                match merge_cred_helpers(file.as_ref().map(|f| f.text.as_str()), &wanted) {
                    Err(e) => seen.problems.push(format!("auth.json: {e}; not rewritten")),
                    Ok(None) => {}
                    // auth.json may hold secrets (`auths`): a new one is 0600 as Podman makes it.
                    Ok(Some((contents, changes))) => seen.writes.push(PlannedWrite {
                        name: "auth.json",
                        contents,
                        prior: file,
                        new_mode: 0o600,
                        changes,
                    }),
                }
            }
        }
        let names: Vec<&str> = cfg.cred_helpers.values().map(String::as_str).collect();
        seen.facts.push(format!("credential helpers {}", names.join(", ")));
    }

    see_docker_link(cx, &mut seen);
    seen
}

fn see_docker_link(cx: &Context, seen: &mut Seen) {
    let target = format!("/run/user/{}/podman/podman.sock", cx.user.uid);
    let tmpfiles = cx.root.join(TMPFILES);
    let ours = std::fs::read_to_string(&tmpfiles).ok();
    let live = if cx.root.is_host() { Some(std::fs::read_link(DOCKER_SOCK)) } else { None };
    if cx.settings.podman_config.docker_socket_link {
        let write_tmpfiles = ours.as_deref() != Some(tmpfiles_contents(cx.user.uid, &cx.user.name).as_str());
        let link_now = match &live {
            None => false,
            Some(Ok(t)) if t == Path::new(&target) => false,
            Some(Err(e)) if e.kind() == io::ErrorKind::NotFound => {
                // A dangling symlink reads fine; a missing path is what we create.
                std::fs::symlink_metadata(DOCKER_SOCK).is_err()
            }
            Some(Ok(t)) => {
                seen.problems
                    .push(format!("{DOCKER_SOCK} links to {}, not {target}; left alone", t.display()));
                false
            }
            Some(Err(_)) => {
                seen.problems.push(if fsutil::is_socket(Path::new(DOCKER_SOCK)) {
                    // FCOS's docker.socket listens there for a rootful dockerd.
                    format!(
                        "{DOCKER_SOCK} is a socket, not a link to {target} (FCOS's rootful \
                         docker.socket listens there; [runner_privileges] mask_docker = true masks it \
                         and removes the socket); left alone"
                    )
                } else {
                    format!("{DOCKER_SOCK} exists and is not a link to {target}; left alone")
                });
                false
            }
        };
        if write_tmpfiles || link_now {
            seen.link = LinkAction::Ensure { write_tmpfiles, link_now };
        }
        seen.facts.push(format!("/var/run/docker.sock -> {target}"));
    } else {
        if ours.is_some() {
            seen.link = LinkAction::RemoveTmpfiles;
        }
        match live {
            Some(Ok(t)) => seen.facts.push(format!(
                "/var/run/docker.sock -> {} (left alone: docker_socket_link is off)",
                t.display()
            )),
            _ => seen.facts.push("no docker.sock link".into()),
        }
    }
}

fn plan_lines(cx: &Context, seen: &Seen) -> Vec<String> {
    let dir = config_dir_path(cx);
    let mut plan: Vec<String> = seen
        .writes
        .iter()
        .map(|w| {
            let verb = if w.prior.is_some() { "set" } else { "create with" };
            let changes: Vec<String> = w.changes.iter().map(|c| c.to_string()).collect();
            format!("{verb} {} in {}", changes.join(", "), dir.join(w.name).display())
        })
        .collect();
    match &seen.link {
        LinkAction::None => {}
        LinkAction::Ensure { write_tmpfiles, link_now } => {
            if *write_tmpfiles {
                plan.push(format!("write {TMPFILES}"));
            }
            if *link_now {
                plan.push(format!(
                    "link /var/run/docker.sock to /run/user/{}/podman/podman.sock",
                    cx.user.uid
                ));
            }
        }
        LinkAction::RemoveTmpfiles => plan.push(format!("remove {TMPFILES} (docker_socket_link is off)")),
    }
    plan
}

/// Why running Podman as the runner user now would hang or fail, if so: root refused one of
/// the user's containers files (a FIFO Podman would block on, a link out of the user's tree).
pub fn user_config_refused(cx: &Context) -> Option<String> {
    if !cx.root.is_host() {
        return None;
    }
    see(cx).problems.into_iter().find(|p| p.contains("refusing"))
}

/// Why Podman must not be started yet, if so: the runner user's storage.conf is not as
/// configured, and Podman's first start would create the user's storage with another driver
/// (vfs), which is never switched afterwards.
pub fn storage_not_ready(cx: &Context) -> Option<String> {
    if !cx.settings.podman_config.manage {
        return None;
    }
    let seen = see(cx);
    if seen.writes.iter().any(|w| w.name == "storage.conf") {
        return Some(format!(
            "{}'s storage.conf does not name the storage driver {} yet",
            cx.user.name, cx.settings.podman_config.storage_driver
        ));
    }
    seen.problems.iter().find(|p| p.contains("storage") || p.contains(".config")).cloned()
}

pub const SPEC: Spec = Spec {
    name: "podman-config",
    checks: &[CheckSpec::required(CHECK)],
    needs_live_system: false,
    after: &[],
    requires: &[],
    repairs: |cx| cx.settings.podman_config.manage,
};

pub async fn inspect(cx: &Context) -> Inspection {
    if !cx.settings.podman_config.manage {
        return Inspection {
            observations: vec![Observation::pass(CHECK, "not managed ([podman_config] manage = false)")],
            plan: Vec::new(),
        };
    }
    let seen = see(cx);
    let plan = plan_lines(cx, &seen);
    let observation = if !seen.problems.is_empty() {
        Observation::fail(CHECK, seen.problems.join("; "))
    } else if !plan.is_empty() {
        Observation::fail(
            CHECK,
            format!("{}'s Podman configuration differs: {}", cx.user.name, plan.join("; ")),
        )
    } else {
        Observation::pass(CHECK, seen.facts.join(", "))
    };
    Inspection { observations: vec![observation], plan }
}

pub async fn converge(cx: &Context) -> Result<Vec<String>> {
    if !cx.settings.podman_config.manage {
        return Ok(Vec::new());
    }
    let seen = see(cx);
    let owner = owner(cx);
    let mut changes = Vec::new();
    if !seen.writes.is_empty() {
        let home = Dir::open_home(&home_of(cx), owner)?
            .ok_or_else(|| anyhow!("{}'s home {} does not exist", cx.user.name, home_of(cx).display()))?;
        // As Podman makes them: private to the user.
        let (config, made) = home.child_or_create(".config", 0o700, owner)?;
        if made {
            changes.push(format!("created {}", config.path.display()));
        }
        let (dir, made) = config.child_or_create("containers", 0o700, owner)?;
        if made {
            changes.push(format!("created {}", dir.path.display()));
        }
        for w in &seen.writes {
            dir.replace(w.name, w.contents.as_bytes(), w.prior.as_ref(), w.new_mode, owner)?;
            let what: Vec<String> = w.changes.iter().map(|c| c.to_string()).collect();
            changes.push(format!("set {} in {}", what.join(", "), dir.path.join(w.name).display()));
        }
    }
    match seen.link {
        LinkAction::None => {}
        LinkAction::RemoveTmpfiles => {
            std::fs::remove_file(cx.root.join(TMPFILES)).with_context(|| format!("removing {TMPFILES}"))?;
            changes.push(format!("removed {TMPFILES} (the live link, if any, is left alone)"));
        }
        LinkAction::Ensure { write_tmpfiles, link_now } => {
            if write_tmpfiles {
                let path = cx.root.join(TMPFILES);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)
                        .with_context(|| format!("creating {}", parent.display()))?;
                }
                fsutil::replace_file_atomically(
                    &path,
                    tmpfiles_contents(cx.user.uid, &cx.user.name).as_bytes(),
                    0o644,
                )
                .with_context(|| format!("writing {TMPFILES}"))?;
                changes.push(format!("wrote {TMPFILES}"));
            }
            if link_now && cx.root.is_host() {
                link_docker_socket(cx).await?;
                changes.push(format!(
                    "linked /var/run/docker.sock to /run/user/{}/podman/podman.sock",
                    cx.user.uid
                ));
            }
        }
    }
    if !seen.problems.is_empty() {
        if !changes.is_empty() {
            tracing::info!(step = CHECK, "changed: {}", changes.join("; "));
        }
        bail!("{}", seen.problems.join("; "));
    }
    Ok(changes)
}

/// `/run` is read-only in the agent's sandbox: systemd-tmpfiles makes the link, as a
/// transient unit of the system manager (as it does at boot).
async fn link_docker_socket(cx: &Context) -> Result<()> {
    let tmpfiles = ["/usr/bin/systemd-tmpfiles", "/bin/systemd-tmpfiles"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .context("systemd-tmpfiles is not installed")?;
    let conn = cx.system_bus.get().await?;
    let argv = [tmpfiles.to_string(), "--create".into(), TMPFILES.into()];
    crate::user_manager::run_transient(
        &conn,
        "executor-agent-docker-sock.service",
        &argv,
        cx.settings.linger.user_manager_timeout,
    )
    .await
    .with_context(|| format!("linking {DOCKER_SOCK}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(table: &'static str, key: &'static str, value: &str) -> Setting {
        Setting { table, key, value: value.into() }
    }

    #[test]
    fn integer_keys_are_written_and_compared_as_integers() {
        let timeout = Setting { table: "engine", key: "service_timeout", value: Scalar::Int(0) };
        let (text, changes) = edit_toml("", std::slice::from_ref(&timeout)).unwrap().unwrap();
        assert_eq!(text, "[engine]\nservice_timeout = 0\n");
        assert_eq!(changes[0].to_string(), "[engine] service_timeout = 0");
        assert_eq!(edit_toml(&text, std::slice::from_ref(&timeout)).unwrap(), None);
        // A string "0" is not Podman's integer: replaced, comment kept.
        let (text, changes) =
            edit_toml("[engine]\nservice_timeout = \"0\" # mine\n", std::slice::from_ref(&timeout))
                .unwrap()
                .unwrap();
        assert_eq!(text, "[engine]\nservice_timeout = 0 # mine\n");
        assert_eq!(changes[0].from.as_deref(), Some("\"0\""));
        let (text, _) =
            edit_toml("[engine]\nservice_timeout = 5\n", std::slice::from_ref(&timeout)).unwrap().unwrap();
        assert_eq!(text, "[engine]\nservice_timeout = 0\n");
    }

    #[test]
    fn a_drop_in_overriding_our_keys_is_named_by_type_not_by_its_text() {
        let home = tempfile::tempdir().unwrap();
        let dropins = home.path().join("containers.conf.d");
        std::fs::create_dir(&dropins).unwrap();
        std::fs::write(
            dropins.join("90-mine.conf"),
            "[engine]\nservice_timeout = 5\ncgroup_manager = \"secret\\nMAINPID=1\"\nevents_logger = \"journald\"\n",
        )
        .unwrap();
        let dir = Dir::open(home.path(), None).unwrap().unwrap();
        let owner = Owner { uid: 0, gid: 0 };
        let found = drop_in_overrides(Some(&dir), &containers_settings(&PodmanConfig::default()), owner);
        let path = dropins.join("90-mine.conf");
        assert_eq!(
            found,
            vec![
                format!(
                    "{} sets [engine] cgroup_manager (type string), which overrides \"systemd\"",
                    path.display()
                ),
                format!(
                    "{} sets [engine] service_timeout (type integer), which overrides \"0\"",
                    path.display()
                ),
            ]
        );
    }

    #[test]
    fn keep_api_service_owns_the_service_timeout() {
        let mut cfg = PodmanConfig::default();
        let timeout = Setting { table: "engine", key: "service_timeout", value: Scalar::Int(0) };
        assert!(containers_settings(&cfg).contains(&timeout));
        cfg.keep_api_service = false;
        assert!(!containers_settings(&cfg).iter().any(|s| s.key == "service_timeout"));
    }

    #[test]
    fn adds_our_keys_to_an_empty_file() {
        let (text, changes) = edit_toml("", &[s("storage", "driver", "overlay")]).unwrap().unwrap();
        assert_eq!(text, "[storage]\ndriver = \"overlay\"\n");
        assert_eq!(
            changes,
            [Change { what: "[storage] driver".into(), from: None, to: "\"overlay\"".into() }]
        );
        assert_eq!(toml_value(&text, "storage", "driver").unwrap().as_deref(), Some("overlay"));
    }

    #[test]
    fn keeps_comments_and_other_keys() {
        let before = "# my storage\n[storage]\ndriver = \"vfs\" # slow but safe\nrunroot = \"/run/x\"\n\n\
                      [storage.options]\nmount_program = \"/usr/bin/fuse-overlayfs\"\n";
        let (after, changes) = edit_toml(before, &[s("storage", "driver", "overlay")]).unwrap().unwrap();
        assert_eq!(
            after,
            "# my storage\n[storage]\ndriver = \"overlay\" # slow but safe\nrunroot = \"/run/x\"\n\n\
             [storage.options]\nmount_program = \"/usr/bin/fuse-overlayfs\"\n"
        );
        assert_eq!(changes[0].to_string(), "[storage] driver = \"overlay\" (was \"vfs\")");
        // Nothing to do the second time.
        assert_eq!(edit_toml(&after, &[s("storage", "driver", "overlay")]).unwrap(), None);
    }

    #[test]
    fn adds_to_existing_tables_dotted_keys_and_implicit_tables() {
        let before = "[engine]\nenv = [\"A=1\"]\n\n[network]\nnetwork_backend = \"netavark\"\n";
        let settings = [
            s("engine", "cgroup_manager", "systemd"),
            s("engine", "events_logger", "journald"),
            s("network", "default_rootless_network_cmd", "pasta"),
        ];
        let (after, changes) = edit_toml(before, &settings).unwrap().unwrap();
        assert_eq!(changes.len(), 3);
        for setting in &settings {
            assert_eq!(
                toml_value(&after, setting.table, setting.key).unwrap().as_deref(),
                Some(setting.value.to_string().as_str())
            );
        }
        assert!(
            after.contains("env = [\"A=1\"]") && after.contains("network_backend = \"netavark\""),
            "{after}"
        );

        let dotted = "engine.cgroup_manager = \"cgroupfs\"\n";
        let (after, _) = edit_toml(dotted, &settings[..1]).unwrap().unwrap();
        assert_eq!(toml_value(&after, "engine", "cgroup_manager").unwrap().as_deref(), Some("systemd"));

        let implicit = "[engine.service_destinations.x]\nuri = \"unix:///x\"\n";
        let (after, _) = edit_toml(implicit, &settings[..1]).unwrap().unwrap();
        assert_eq!(toml_value(&after, "engine", "cgroup_manager").unwrap().as_deref(), Some("systemd"));
        assert!(after.contains("uri = \"unix:///x\""), "{after}");
        // The result is valid TOML to a strict reader too.
        let parsed: toml::Table = after.parse().unwrap();
        assert_eq!(parsed["engine"]["cgroup_manager"].as_str(), Some("systemd"));
    }

    #[test]
    fn refuses_files_it_cannot_edit_safely() {
        assert!(edit_toml("storage = 3\n", &[s("storage", "driver", "overlay")])
            .unwrap_err()
            .contains("not a table"));
        assert!(edit_toml("[storage]\ndriver = 1\n", &[s("storage", "driver", "overlay")]).is_ok());
        assert!(edit_toml("[storage]\ndriver = {a = 1}\n", &[s("storage", "driver", "overlay")]).is_ok());
        let broken = "[storage]\ndriver = \"overlay\"\nsecret = hunter2\n";
        let err = edit_toml(broken, &[s("storage", "driver", "overlay")]).unwrap_err();
        assert!(err.starts_with("line 3, column"), "{err}");
        assert!(!err.contains("hunter2"), "the file's text must not leak into the detail: {err}");
    }

    #[test]
    fn merges_credential_helpers_and_keeps_secrets() {
        let mut wanted = BTreeMap::new();
        wanted.insert("123.dkr.ecr.eu-west-1.amazonaws.com".to_string(), "ecr-login".to_string());
        let before = r#"{"auths":{"quay.io":{"auth":"c2VjcmV0"}},"credHelpers":{"gcr.io":"gcloud"}}"#;
        let (after, changes) = merge_cred_helpers(Some(before), &wanted).unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_str(&after).unwrap();
        assert_eq!(v["auths"]["quay.io"]["auth"], "c2VjcmV0");
        assert_eq!(v["credHelpers"]["gcr.io"], "gcloud");
        assert_eq!(v["credHelpers"]["123.dkr.ecr.eu-west-1.amazonaws.com"], "ecr-login");
        assert_eq!(changes.len(), 1);
        assert!(after.contains("\n\t\"auths\""), "tab-indented like Podman: {after}");
        assert_eq!(merge_cred_helpers(Some(&after), &wanted).unwrap(), None);
        // A different helper for a configured registry is replaced.
        let other = r#"{"credHelpers":{"123.dkr.ecr.eu-west-1.amazonaws.com":"pass"}}"#;
        let (_, changes) = merge_cred_helpers(Some(other), &wanted).unwrap().unwrap();
        assert_eq!(changes[0].from.as_deref(), Some("\"pass\""));
        // New file.
        let (fresh, _) = merge_cred_helpers(None, &wanted).unwrap().unwrap();
        assert_eq!(
            fresh,
            "{\n\t\"credHelpers\": {\n\t\t\"123.dkr.ecr.eu-west-1.amazonaws.com\": \"ecr-login\"\n\t}\n}\n"
        );
        assert!(merge_cred_helpers(Some("[1]"), &wanted).unwrap_err().contains("not a JSON object"));
        assert!(merge_cred_helpers(Some("{\"a\": secret}"), &wanted).unwrap_err().starts_with("line 1"));
        assert!(merge_cred_helpers(Some(r#"{"credHelpers":[]}"#), &wanted).is_err());
    }

    #[test]
    fn helper_and_registry_names() {
        assert!(valid_helper_name("ecr-login") && valid_helper_name("gcloud") && valid_helper_name("pass"));
        for bad in ["", "../../bin/sh", "a b", ".hidden", "x/y"] {
            assert!(!valid_helper_name(bad), "{bad}");
        }
        assert!(valid_registry("123.dkr.ecr.eu-west-1.amazonaws.com") && valid_registry("registry:5000/ns"));
        assert!(!valid_registry("") && !valid_registry("a b") && !valid_registry("a\nb"));
    }

    #[test]
    fn driver_decisions() {
        let root = Path::new("/home/core/.local/share/containers/storage");
        let d = |configured: Option<&str>, in_use: &[&str]| {
            let in_use: Vec<String> = in_use.iter().map(|s| s.to_string()).collect();
            decide_driver("overlay", configured, &in_use, root)
        };
        assert_eq!(d(None, &[]), DriverDecision::Set);
        assert_eq!(d(Some("vfs"), &[]), DriverDecision::Set);
        assert_eq!(d(None, &["overlay"]), DriverDecision::Set);
        assert_eq!(d(Some("overlay"), &["overlay"]), DriverDecision::Keep);
        assert_eq!(d(Some("overlay"), &[]), DriverDecision::Keep);
        // The fault: storage made with vfs (Podman's fallback) must not be switched.
        let DriverDecision::Conflict(why) = d(None, &["vfs"]) else { panic!() };
        assert!(why.contains("created with the vfs driver") && why.contains("podman system reset"), "{why}");
        assert!(why.contains("storage_driver = \"vfs\""), "{why}");
        assert!(matches!(d(Some("vfs"), &["vfs"]), DriverDecision::Conflict(_)));
        assert!(matches!(d(None, &["overlay", "vfs"]), DriverDecision::Conflict(_)));
        // Configured by hand over vfs storage: already broken, say so.
        assert!(matches!(d(Some("overlay"), &["vfs"]), DriverDecision::Conflict(_)));
    }

    #[test]
    fn tmpfiles_line_links_the_docker_path() {
        let text = tmpfiles_contents(1000, "core");
        assert!(text.ends_with("\nL /run/docker.sock - - - - /run/user/1000/podman/podman.sock\n"), "{text}");
    }

    #[test]
    fn toml_error_positions() {
        let text = "a = 1\nb = = 2\n";
        let e = text.parse::<toml_edit::DocumentMut>().unwrap_err();
        assert!(toml_error(text, &e).starts_with("line 2, column "), "{}", toml_error(text, &e));
    }
}
