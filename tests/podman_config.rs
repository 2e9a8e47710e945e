//! The podman-config step on a node tree (`--root`): what it plans, what converge writes,
//! that a second converge writes nothing, and that nothing the runner user plants in its
//! home (symlinks, hard links, foreign files) makes root read or write elsewhere.
//!
//! These tests chown files to a made-up runner UID, so they need root (CI runs as root);
//! without it they are skipped with a message.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use executor_agent::checks::Observation;
use executor_agent::config::Settings;
use executor_agent::paths::Root;
use executor_agent::runner_user::Account;
use executor_agent::steps::podman_config::{Dir, Owner, TMPFILES};
use executor_agent::steps::{Context, Inspection, Step};

const UID: u32 = 4242;
const GID: u32 = 4343;

struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Option<Node> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to own files as the runner user");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("var/home/core");
        fs::create_dir_all(&home).unwrap();
        fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&home, Some(UID), Some(GID)).unwrap();
        Some(Node { dir })
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn home(&self) -> PathBuf {
        self.root().join("var/home/core")
    }

    fn conf(&self, name: &str) -> PathBuf {
        self.home().join(".config/containers").join(name)
    }

    /// `~/.config/containers` as the user would have made it.
    fn user_dir(&self, relative: &str) -> PathBuf {
        let mut path = self.home();
        for part in Path::new(relative).components() {
            path.push(part);
            if !path.exists() {
                fs::create_dir(&path).unwrap();
                std::os::unix::fs::chown(&path, Some(UID), Some(GID)).unwrap();
            }
        }
        path
    }

    fn user_file(&self, relative: &str, text: &str) -> PathBuf {
        let path = self.home().join(relative);
        self.user_dir(path.parent().unwrap().strip_prefix(self.home()).unwrap().to_str().unwrap());
        fs::write(&path, text).unwrap();
        std::os::unix::fs::chown(&path, Some(UID), Some(GID)).unwrap();
        path
    }

    fn context(&self, edit: impl FnOnce(&mut Settings)) -> Context {
        let mut settings = Settings::default();
        edit(&mut settings);
        let user = Account { name: "core".into(), uid: UID, gid: GID, home: "/var/home/core".into() };
        Context::new(Root::new(self.root()), settings, user)
    }
}

fn observation(inspection: &Inspection) -> &Observation {
    assert_eq!(inspection.observations.len(), 1, "{inspection:?}");
    &inspection.observations[0]
}

fn stamp(path: &Path) -> (u64, i64, i64) {
    let md = fs::metadata(path).unwrap();
    (md.ino(), md.mtime(), md.mtime_nsec())
}

fn owner_mode(path: &Path) -> (u32, u32, u32) {
    let md = fs::symlink_metadata(path).unwrap();
    (md.uid(), md.gid(), md.mode() & 0o7777)
}

#[tokio::test]
async fn a_fresh_home_is_configured_once() {
    let Some(node) = Node::new() else { return };
    let cx = node.context(|s| s.podman_config.network_cmd = "pasta".into());

    let before = Step::PodmanConfig.inspect(&cx).await;
    assert!(!observation(&before).ok);
    let storage = node.conf("storage.conf");
    assert_eq!(
        before.plan,
        [
            format!("create with [storage] driver = \"overlay\" in {}", storage.display()),
            format!(
                "create with [engine] cgroup_manager = \"systemd\", [engine] events_logger = \"journald\", \
                 [engine] service_timeout = 0, [network] default_rootless_network_cmd = \"pasta\" in {}",
                node.conf("containers.conf").display()
            ),
        ]
    );

    let changes = Step::PodmanConfig.converge(&cx).await.map(|r| r.changes).unwrap();
    assert_eq!(changes.len(), 4, "{changes:?}");
    assert_eq!(fs::read_to_string(&storage).unwrap(), "[storage]\ndriver = \"overlay\"\n");
    let containers = fs::read_to_string(node.conf("containers.conf")).unwrap();
    let parsed: toml::Table = containers.parse().unwrap();
    assert_eq!(parsed["engine"]["cgroup_manager"].as_str(), Some("systemd"));
    assert_eq!(parsed["engine"]["events_logger"].as_str(), Some("journald"));
    assert_eq!(parsed["network"]["default_rootless_network_cmd"].as_str(), Some("pasta"));
    // An integer, as Podman reads it: a string would fail its parse.
    assert_eq!(parsed["engine"]["service_timeout"].as_integer(), Some(0));
    // Owned by the user, as Podman would have made them.
    assert_eq!(owner_mode(&storage), (UID, GID, 0o644));
    assert_eq!(owner_mode(&node.conf("containers.conf")), (UID, GID, 0o644));
    assert_eq!(owner_mode(&node.home().join(".config")), (UID, GID, 0o700));
    assert_eq!(owner_mode(&node.home().join(".config/containers")), (UID, GID, 0o700));
    let no_temps: Vec<_> = fs::read_dir(node.home().join(".config/containers"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(no_temps.len(), 2, "{no_temps:?}");

    let after = Step::PodmanConfig.inspect(&cx).await;
    assert!(observation(&after).ok, "{after:?}");
    assert!(after.plan.is_empty());
    assert_eq!(observation(&after).detail, "storage driver overlay, cgroup_manager systemd, events to the journal, API service kept running, network pasta, no docker.sock link");

    // A second converge changes nothing, not even the files' inodes or times.
    let stamps = (stamp(&storage), stamp(&node.conf("containers.conf")));
    assert!(Step::PodmanConfig.converge(&cx).await.map(|r| r.changes).unwrap().is_empty());
    assert_eq!((stamp(&storage), stamp(&node.conf("containers.conf"))), stamps);
}

#[tokio::test]
async fn the_users_keys_and_comments_stay() {
    let Some(node) = Node::new() else { return };
    let before = "# tuned by hand\n[storage]\ndriver = \"vfs\"  # first try\n\n[storage.options]\nmount_program = \"/usr/bin/fuse-overlayfs\"\n";
    let storage = node.user_file(".config/containers/storage.conf", before);
    fs::set_permissions(&storage, fs::Permissions::from_mode(0o600)).unwrap();
    node.user_file(".config/containers/containers.conf", "[engine]\ncgroup_manager = \"systemd\"\nevents_logger = \"journald\"\nservice_timeout = 0\n[containers]\npids_limit = 4096\n");
    let containers_stamp = stamp(&node.conf("containers.conf"));
    let cx = node.context(|_| {});

    let inspection = Step::PodmanConfig.inspect(&cx).await;
    assert_eq!(
        inspection.plan,
        [format!("set [storage] driver = \"overlay\" (was \"vfs\") in {}", storage.display())]
    );
    Step::PodmanConfig.converge(&cx).await.map(|r| r.changes).unwrap();
    assert_eq!(
        fs::read_to_string(&storage).unwrap(),
        "# tuned by hand\n[storage]\ndriver = \"overlay\"  # first try\n\n[storage.options]\nmount_program = \"/usr/bin/fuse-overlayfs\"\n"
    );
    // The user's mode stays; containers.conf already had our keys and was not touched.
    assert_eq!(owner_mode(&storage), (UID, GID, 0o600));
    assert_eq!(stamp(&node.conf("containers.conf")), containers_stamp);
    assert!(observation(&Step::PodmanConfig.inspect(&cx).await).ok);
}

#[tokio::test]
async fn storage_made_with_vfs_is_not_switched() {
    let Some(node) = Node::new() else { return };
    // Podman fell back to vfs before we configured anything.
    node.user_dir(".local/share/containers/storage/vfs-layers");
    node.user_dir(".local/share/containers/storage/overlay");
    let cx = node.context(|_| {});

    let inspection = Step::PodmanConfig.inspect(&cx).await;
    let obs = observation(&inspection);
    assert!(!obs.ok);
    assert!(obs.detail.contains("was created with the vfs driver"), "{}", obs.detail);
    assert!(obs.detail.contains("podman system reset"), "{}", obs.detail);
    assert!(!inspection.plan.iter().any(|p| p.contains("storage.conf")), "{:?}", inspection.plan);

    let err = Step::PodmanConfig.converge(&cx).await.map(|r| r.changes).unwrap_err();
    assert!(err.to_string().contains("vfs"), "{err}");
    assert!(!node.conf("storage.conf").exists(), "the driver must not be switched");
    // The rest is still configured.
    assert!(node.conf("containers.conf").exists());
}

#[tokio::test]
async fn a_symlinked_directory_does_not_lead_root_elsewhere() {
    let Some(node) = Node::new() else { return };
    let elsewhere = node.root().join("etc");
    fs::create_dir_all(&elsewhere).unwrap();
    fs::write(elsewhere.join("storage.conf"), "root's\n").unwrap();
    node.user_dir(".config");
    symlink(&elsewhere, node.home().join(".config/containers")).unwrap();
    let cx = node.context(|_| {});

    let obs = observation(&Step::PodmanConfig.inspect(&cx).await).clone();
    assert!(!obs.ok);
    assert!(obs.detail.contains("it is a symlink"), "{}", obs.detail);
    let err = Step::PodmanConfig.converge(&cx).await.map(|r| r.changes).unwrap_err();
    assert!(err.to_string().contains("symlink"), "{err}");
    assert_eq!(fs::read_to_string(elsewhere.join("storage.conf")).unwrap(), "root's\n");
    let names: Vec<_> = fs::read_dir(&elsewhere).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["storage.conf"]);
    assert!(fs::symlink_metadata(node.home().join(".config/containers")).unwrap().file_type().is_symlink());

    // The same one level up.
    let node = Node::new().unwrap();
    symlink(&elsewhere, node.home().join(".config")).unwrap();
    let cx = node.context(|_| {});
    assert!(Step::PodmanConfig.converge(&cx).await.map(|r| r.changes).is_err());
    assert!(!elsewhere.join("containers").exists());
}

#[tokio::test]
async fn a_symlinked_or_hard_linked_file_is_neither_read_nor_replaced() {
    let Some(node) = Node::new() else { return };
    let secret = node.root().join("shadow");
    fs::write(&secret, "root:$6$secret:19000::::::\n").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    node.user_dir(".config/containers");
    symlink(&secret, node.conf("storage.conf")).unwrap();
    let cx = node.context(|_| {});

    let obs = observation(&Step::PodmanConfig.inspect(&cx).await).clone();
    assert!(!obs.ok);
    assert!(obs.detail.contains("storage.conf: it is a symlink"), "{}", obs.detail);
    assert!(!obs.detail.contains("secret"), "{}", obs.detail);
    assert!(Step::PodmanConfig.converge(&cx).await.map(|r| r.changes).is_err());
    assert_eq!(fs::read_to_string(&secret).unwrap(), "root:$6$secret:19000::::::\n");
    assert_eq!(owner_mode(&secret), (0, 0, 0o600));

    // A hard link to a root file (protected_hardlinks off, or made by root by mistake).
    fs::remove_file(node.conf("storage.conf")).unwrap();
    fs::hard_link(&secret, node.conf("storage.conf")).unwrap();
    let obs = observation(&Step::PodmanConfig.inspect(&cx).await).clone();
    assert!(obs.detail.contains("hard links"), "{}", obs.detail);
    assert!(!obs.detail.contains("secret"), "{}", obs.detail);
    assert!(Step::PodmanConfig.converge(&cx).await.map(|r| r.changes).is_err());
    assert_eq!(fs::read_to_string(&secret).unwrap(), "root:$6$secret:19000::::::\n");
    assert_eq!(owner_mode(&secret), (0, 0, 0o600));
}

#[tokio::test]
async fn another_users_file_or_directory_is_refused() {
    let Some(node) = Node::new() else { return };
    let path = node.user_file(".config/containers/containers.conf", "[engine]\n");
    std::os::unix::fs::chown(&path, Some(UID + 1), Some(GID)).unwrap();
    let cx = node.context(|_| {});
    let obs = observation(&Step::PodmanConfig.inspect(&cx).await).clone();
    assert!(obs.detail.contains("owned by UID 4243, not the runner user"), "{}", obs.detail);
    assert!(Step::PodmanConfig.converge(&cx).await.map(|r| r.changes).is_err());
    assert_eq!(fs::read_to_string(&path).unwrap(), "[engine]\n");

    std::os::unix::fs::chown(&path, Some(UID), Some(GID)).unwrap();
    std::os::unix::fs::chown(node.home().join(".config"), Some(UID + 1), Some(GID)).unwrap();
    let obs = observation(&Step::PodmanConfig.inspect(&cx).await).clone();
    assert!(obs.detail.contains(".config: owned by UID 4243"), "{}", obs.detail);
}

#[tokio::test]
async fn a_broken_file_is_reported_and_left_alone() {
    let Some(node) = Node::new() else { return };
    let text = "[storage]\ndriver = \"vfs\"\ntoken = s3cr3t\n";
    let path = node.user_file(".config/containers/storage.conf", text);
    let cx = node.context(|_| {});
    let obs = observation(&Step::PodmanConfig.inspect(&cx).await).clone();
    assert!(obs.detail.starts_with("storage.conf: line 3, column"), "{}", obs.detail);
    assert!(!obs.detail.contains("s3cr3t"), "{}", obs.detail);
    assert!(Step::PodmanConfig.converge(&cx).await.map(|r| r.changes).is_err());
    assert_eq!(fs::read_to_string(&path).unwrap(), text);
}

fn install_helper(node: &Node, name: &str) {
    let dir = node.root().join("usr/bin");
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    fs::write(&path, "#!/bin/sh\n").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
}

#[tokio::test]
async fn credential_helpers_are_merged_and_their_binaries_checked() {
    let Some(node) = Node::new() else { return };
    let registry = "123456789012.dkr.ecr.eu-west-1.amazonaws.com";
    let auth =
        node.user_file(".config/containers/auth.json", r#"{"auths":{"quay.io":{"auth":"dXNlcjpwYXNz"}}}"#);
    fs::set_permissions(&auth, fs::Permissions::from_mode(0o600)).unwrap();
    let cx = node.context(|s| {
        s.podman_config.cred_helpers = BTreeMap::from([(registry.to_string(), "ecr-login".to_string())])
    });

    let inspection = Step::PodmanConfig.inspect(&cx).await;
    let obs = observation(&inspection);
    assert!(!obs.ok);
    assert!(
        obs.detail.contains("docker-credential-ecr-login is not on core's PATH")
            && obs.detail.contains(registry),
        "{}",
        obs.detail
    );
    assert!(
        inspection.plan.iter().any(|p| p.contains("credHelpers") && p.contains("auth.json")),
        "{:?}",
        inspection.plan
    );

    // The file is written even though the helper is missing; the check keeps failing.
    assert!(Step::PodmanConfig.converge(&cx).await.map(|r| r.changes).is_err());
    let v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&auth).unwrap()).unwrap();
    assert_eq!(v["auths"]["quay.io"]["auth"], "dXNlcjpwYXNz");
    assert_eq!(v["credHelpers"][registry], "ecr-login");
    assert_eq!(owner_mode(&auth), (UID, GID, 0o600));

    install_helper(&node, "docker-credential-ecr-login");
    let after = Step::PodmanConfig.inspect(&cx).await;
    assert!(observation(&after).ok, "{after:?}");
    assert!(observation(&after).detail.contains("credential helpers ecr-login"));
    let before = stamp(&auth);
    assert!(Step::PodmanConfig.converge(&cx).await.map(|r| r.changes).unwrap().is_empty());
    assert_eq!(stamp(&auth), before);
}

#[tokio::test]
async fn a_new_auth_file_is_private() {
    let Some(node) = Node::new() else { return };
    install_helper(&node, "docker-credential-ecr-login");
    let cx = node.context(|s| {
        s.podman_config.cred_helpers = BTreeMap::from([("r.example".to_string(), "ecr-login".to_string())])
    });
    Step::PodmanConfig.converge(&cx).await.map(|r| r.changes).unwrap();
    assert_eq!(owner_mode(&node.conf("auth.json")), (UID, GID, 0o600));
}

#[tokio::test]
async fn a_user_drop_in_that_overrides_our_keys_is_reported() {
    let Some(node) = Node::new() else { return };
    node.user_file(
        ".config/containers/containers.conf.d/99-mine.conf",
        "[engine]\nevents_logger = \"file\"\n",
    );
    let cx = node.context(|_| {});
    Step::PodmanConfig.converge(&cx).await.map(|r| r.changes).unwrap_err();
    let obs = observation(&Step::PodmanConfig.inspect(&cx).await).clone();
    assert!(!obs.ok);
    // Named by key and type: the drop-in's text is the user's and is not echoed.
    assert!(
        obs.detail
            .contains("99-mine.conf sets [engine] events_logger (type string), which overrides \"journald\""),
        "{}",
        obs.detail
    );
    assert!(!obs.detail.contains("\"file\""), "{}", obs.detail);
}

#[tokio::test]
async fn the_docker_socket_link_is_a_tmpfiles_entry() {
    let Some(node) = Node::new() else { return };
    let on = node.context(|s| s.podman_config.docker_socket_link = true);
    let inspection = Step::PodmanConfig.inspect(&on).await;
    assert!(inspection.plan.contains(&format!("write {TMPFILES}")), "{:?}", inspection.plan);
    Step::PodmanConfig.converge(&on).await.unwrap();
    let tmpfiles = node.root().join(TMPFILES.trim_start_matches('/'));
    let text = fs::read_to_string(&tmpfiles).unwrap();
    assert!(text.ends_with("L /run/docker.sock - - - - /run/user/4242/podman/podman.sock\n"), "{text}");
    assert_eq!(owner_mode(&tmpfiles), (0, 0, 0o644));
    assert!(observation(&Step::PodmanConfig.inspect(&on).await).ok);

    // Turned off: our entry goes, so the link is not made again at boot.
    let off = node.context(|_| {});
    assert_eq!(
        Step::PodmanConfig.inspect(&off).await.plan,
        [format!("remove {TMPFILES} (docker_socket_link is off)")]
    );
    Step::PodmanConfig.converge(&off).await.unwrap();
    assert!(!tmpfiles.exists());
}

#[tokio::test]
async fn unmanaged_means_untouched() {
    let Some(node) = Node::new() else { return };
    let cx = node.context(|s| s.podman_config.manage = false);
    let inspection = Step::PodmanConfig.inspect(&cx).await;
    assert!(observation(&inspection).ok);
    assert!(Step::PodmanConfig.converge(&cx).await.map(|r| r.changes).unwrap().is_empty());
    assert!(!node.home().join(".config").exists());
}

#[test]
fn a_file_changed_after_reading_is_not_overwritten() {
    let Some(node) = Node::new() else { return };
    node.user_file(".config/containers/storage.conf", "[storage]\n");
    let owner = Owner { uid: UID, gid: GID };
    let home = Dir::open_home(&node.home(), owner).unwrap().unwrap();
    let dir = home.child(".config", owner).unwrap().unwrap().child("containers", owner).unwrap().unwrap();
    let prior = dir.read("storage.conf", owner).unwrap().unwrap();
    // The user edits it in between.
    std::thread::sleep(std::time::Duration::from_millis(5));
    fs::write(node.conf("storage.conf"), "[storage]\ndriver = \"btrfs\"\n").unwrap();
    let err = dir
        .replace("storage.conf", b"[storage]\ndriver = \"overlay\"\n", Some(&prior), 0o644, owner)
        .unwrap_err();
    assert!(err.to_string().contains("changed while it was being edited"), "{err}");
    assert_eq!(fs::read_to_string(node.conf("storage.conf")).unwrap(), "[storage]\ndriver = \"btrfs\"\n");
    // A file that appeared after we saw none is left alone too.
    let err = dir.replace("auth.json", b"{}", None, 0o600, owner);
    assert!(err.is_ok());
    let err = dir.replace("auth.json", b"{}", None, 0o600, owner).unwrap_err();
    assert!(err.to_string().contains("changed while"), "{err}");
}
