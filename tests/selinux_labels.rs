//! SELinux labels of what the file steps write, on a file system that keeps `security.selinux`
//! (SELinux itself cannot be booted here; docs/selinux.md says what is proven where).
//!
//! On FCOS a file keeps the label it was created with. The agent creates every file as a
//! temporary file in the target's own directory and renames it over the target, so a new file
//! gets its directory's label from the policy (type inheritance), exactly as if it had been
//! written in place, and a replaced file gets the label the old one had, copied explicitly
//! (shadow-utils does the same; an unlabelled /etc/subuid breaks newuidmap under enforcing).
//! These tests label an FCOS-shaped tree as fedora's policy does, converge every file step
//! on it (`apply --root`), and check each file's label afterwards.
//!
//! They chown to a made-up runner UID and write `security.*` attributes, so they need root
//! (CI runs as root); without it they are skipped with a message.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use executor_agent::config::Settings;
use executor_agent::paths::Root;
use executor_agent::runner_user::Account;
use executor_agent::steps::{Context, Step};

const UID: u32 = 4242;
const GID: u32 = 4343;
const ETC: &str = "system_u:object_r:etc_t:s0";
const SYSTEM_CONF: &str = "system_u:object_r:system_conf_t:s0";
/// `HOME_DIR/\.config(/.*)?` in fedora's policy; container-selinux adds nothing for
/// `~/.config/containers`, so it is the same.
const CONFIG_HOME: &str = "unconfined_u:object_r:config_home_t:s0";

fn label_of(path: &Path) -> Option<String> {
    let name = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: a NUL-terminated path, a buffer of the length given; lgetxattr does not follow
    // a final symlink.
    let n = unsafe {
        libc::lgetxattr(name.as_ptr(), c"security.selinux".as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    };
    if n < 0 {
        return None;
    }
    buf.truncate(n as usize);
    Some(String::from_utf8_lossy(&buf).trim_end_matches('\0').to_string())
}

fn set_label(path: &Path, label: &str) {
    let name = CString::new(path.as_os_str().as_bytes()).unwrap();
    let value = format!("{label}\0");
    // SAFETY: as above; the value's length is given.
    let rc = unsafe {
        libc::lsetxattr(name.as_ptr(), c"security.selinux".as_ptr(), value.as_ptr().cast(), value.len(), 0)
    };
    assert_eq!(rc, 0, "labelling {}: {}", path.display(), std::io::Error::last_os_error());
}

/// An FCOS-shaped tree, labelled as fedora's policy labels it, or None without root or on a
/// file system that does not keep `security.selinux`.
struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Option<Node> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to own files as the runner user and to label them");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let node = Node { dir };
        fs::create_dir_all(node.path("etc/sysctl.d")).unwrap();
        fs::create_dir_all(node.path("etc/tmpfiles.d")).unwrap();
        fs::write(node.path("etc/subuid"), "other:100000:65536\n").unwrap();
        fs::write(node.path("etc/subgid"), "other:100000:65536\n").unwrap();
        fs::write(node.path("etc/login.defs"), "SUB_UID_MIN 524288\nSUB_GID_MIN 524288\n").unwrap();
        let home = node.path("var/home/core");
        fs::create_dir_all(home.join(".config/containers")).unwrap();
        fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).unwrap();
        for dir in [&home, &home.join(".config"), &home.join(".config/containers")] {
            std::os::unix::fs::chown(dir, Some(UID), Some(GID)).unwrap();
        }
        // The user's own storage.conf, which the agent edits in place.
        let storage = home.join(".config/containers/storage.conf");
        fs::write(&storage, "[storage]\ndriver = \"vfs\"\n").unwrap();
        std::os::unix::fs::chown(&storage, Some(UID), Some(GID)).unwrap();

        let probe = node.path("etc/subuid");
        let name = CString::new(probe.as_os_str().as_bytes()).unwrap();
        let value = format!("{ETC}\0");
        // SAFETY: as in set_label.
        let rc = unsafe {
            libc::lsetxattr(
                name.as_ptr(),
                c"security.selinux".as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if rc != 0 {
            eprintln!("skipped: this file system does not keep security.selinux");
            return None;
        }
        for (path, label) in [
            ("etc", ETC),
            ("etc/subgid", ETC),
            ("etc/login.defs", ETC),
            ("etc/sysctl.d", SYSTEM_CONF),
            ("etc/tmpfiles.d", ETC),
            ("var/home/core/.config", CONFIG_HOME),
            ("var/home/core/.config/containers", CONFIG_HOME),
            ("var/home/core/.config/containers/storage.conf", CONFIG_HOME),
        ] {
            set_label(&node.path(path), label);
        }
        Some(node)
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    fn context(&self) -> Context {
        let mut settings = Settings::default();
        settings.podman_config.network_cmd = "pasta".into();
        settings.podman_config.docker_socket_link = true;
        let user = Account { name: "core".into(), uid: UID, gid: GID, home: "/var/home/core".into() };
        Context::new(Root::new(self.dir.path()), settings, user)
    }

    /// Every file and directory below the root, with its label.
    fn labels(&self) -> BTreeMap<String, Option<String>> {
        let mut out = BTreeMap::new();
        let mut todo = vec![self.dir.path().to_path_buf()];
        while let Some(dir) = todo.pop() {
            for entry in fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let relative = path.strip_prefix(self.dir.path()).unwrap().to_string_lossy().into_owned();
                if fs::symlink_metadata(&path).unwrap().is_dir() {
                    todo.push(path.clone());
                }
                out.insert(relative, label_of(&path));
            }
        }
        out
    }
}

async fn apply(cx: &Context) -> Vec<String> {
    let steps = Step::for_context(cx);
    let seen = executor_agent::steps::inspect_all(cx, &steps).await;
    let pass = executor_agent::pass::repair_pass(cx, &steps, seen, &mut HashMap::new()).await;
    assert!(
        pass.errors.is_empty(),
        "{:?}",
        pass.errors.iter().map(|(s, e)| (s, e.to_string())).collect::<Vec<_>>()
    );
    pass.changes.into_iter().map(|(s, c)| format!("{}: {c}", s.name())).collect()
}

#[tokio::test]
async fn every_file_the_steps_write_carries_the_label_fcos_gives_it() {
    let Some(node) = Node::new() else { return };
    let before = node.labels();
    let changes = apply(&node.context()).await;
    let after = node.labels();

    // What was there keeps its label, rewritten or not.
    for (path, label) in &before {
        assert_eq!(after.get(path), Some(label), "{path} changed its label");
    }
    // Rewritten in place: the label of the file replaced.
    for (path, want) in [
        ("etc/subuid", ETC),
        ("etc/subgid", ETC),
        ("var/home/core/.config/containers/storage.conf", CONFIG_HOME),
    ] {
        assert_eq!(after[path].as_deref(), Some(want), "{path}");
    }
    // New files: a backup carries the label of what it backs up (its path's label in the
    // policy too); anything else carries none of its own, so the policy's inheritance from
    // the directory decides, as for a file created in place.
    let new: BTreeMap<&str, Option<&str>> = after
        .iter()
        .filter(|(p, _)| !before.contains_key(*p))
        .map(|(p, l)| (p.as_str(), l.as_deref()))
        .collect();
    let expected = BTreeMap::from([
        ("etc/subuid-", Some(ETC)),
        ("etc/subgid-", Some(ETC)),
        // shadow-utils' lock file (fedora labels it shadow_t; on FCOS useradd made it already).
        ("etc/.pwd.lock", None),
        ("etc/sysctl.d/90-executor-agent.conf", None),
        ("etc/tmpfiles.d/executor-agent-docker-sock.conf", None),
        ("var/home/core/.config/containers/containers.conf", None),
    ]);
    assert_eq!(new, expected, "new files and their labels (changes: {changes:#?})");
}

#[tokio::test]
async fn a_converged_tree_is_not_rewritten_and_keeps_every_label() {
    let Some(node) = Node::new() else { return };
    let cx = node.context();
    apply(&cx).await;
    let once = node.labels();
    let inodes = |p: &str| std::os::unix::fs::MetadataExt::ino(&fs::metadata(node.path(p)).unwrap());
    let subuid = inodes("etc/subuid");
    assert_eq!(apply(&cx).await, Vec::<String>::new(), "a second apply changed something");
    assert_eq!(node.labels(), once);
    assert_eq!(inodes("etc/subuid"), subuid, "/etc/subuid was replaced again");
}
