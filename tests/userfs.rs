//! A hostile runner user's tree, seen by root: the runtime directory and the home belong to
//! a made-up runner UID, which plants symlinks, FIFOs, hard links and foreign sockets where
//! the agent reads. Nothing it plants makes root read, measure or talk to anything else, no
//! read blocks, and no refusal shows what the planted target holds.
//!
//! These tests give files to another UID, so they need root (CI runs as root); without it
//! they are skipped with a message.

use std::fs;
use std::os::unix::fs::{chown, lchown, symlink};
use std::path::{Path, PathBuf};
use std::time::Duration;

use executor_agent::config::Settings;
use executor_agent::paths::Root;
use executor_agent::podman_api::Client;
use executor_agent::runner_user::Account;
use executor_agent::steps::id_mapping::{read_namespace, DirectReader, Namespace};
use executor_agent::steps::{Context, Step};
use executor_agent::userfs::{self, Why};

const UID: u32 = 4242;
const GID: u32 = 4343;
const SECRET: &str = "root:$6$hunter2:19000::::::\n";

/// A node tree with `/etc/shadow`, the user's `/run/user/UID` and home.
struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Option<Node> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to own files as the runner user");
            return None;
        }
        let node = Node { dir: tempfile::tempdir().unwrap() };
        fs::create_dir_all(node.path("/etc")).unwrap();
        fs::write(node.path("/etc/shadow"), SECRET).unwrap();
        node.user_dir("/run/user/4242/libpod/tmp");
        node.user_dir("/run/user/4242/podman");
        node.user_dir("/var/home/core");
        Some(node)
    }

    fn path(&self, absolute: &str) -> PathBuf {
        Root::new(self.dir.path()).join(absolute)
    }

    /// Directories down to `absolute`; those below `/run/user` and `/var/home` are the user's.
    fn user_dir(&self, absolute: &str) -> PathBuf {
        let mut path = self.dir.path().to_path_buf();
        let mut users = false;
        for part in Path::new(absolute).components().skip(1) {
            path.push(part);
            if !path.exists() {
                fs::create_dir(&path).unwrap();
                if users {
                    chown(&path, Some(UID), Some(GID)).unwrap();
                }
            }
            users |= path.ends_with("run/user") || path.ends_with("var/home");
        }
        path
    }

    /// A symlink the user makes.
    fn user_link(&self, target: &Path, absolute: &str) -> PathBuf {
        let link = self.path(absolute);
        symlink(target, &link).unwrap();
        lchown(&link, Some(UID), Some(GID)).unwrap();
        link
    }

    fn context(&self) -> Context {
        let user = Account { name: "core".into(), uid: UID, gid: GID, home: "/var/home/core".into() };
        Context::new(Root::new(self.dir.path()), Settings::default(), user)
    }
}

fn why(e: &anyhow::Error) -> Why {
    userfs::refusal_in(e).unwrap_or_else(|| panic!("not a refusal: {e:#}")).why.clone()
}

async fn namespace(pid_file: &Path) -> anyhow::Result<Namespace> {
    let proc = DirectReader { proc: Path::new("/proc") };
    let no: Option<&DirectReader<'_>> = None;
    tokio::time::timeout(Duration::from_secs(10), read_namespace(pid_file, UID, &proc, no))
        .await
        .expect("reading the pause PID blocked")
}

#[tokio::test]
async fn pause_pid_planted_as_a_link_fifo_or_hard_link_is_refused_and_never_shown() {
    let Some(node) = Node::new() else { return };
    let pid_file = node.path("/run/user/4242/libpod/tmp/pause.pid");

    // The reported attack: pause.pid -> /etc/shadow.
    node.user_link(&node.path("/etc/shadow"), "/run/user/4242/libpod/tmp/pause.pid");
    let err = namespace(&pid_file).await.unwrap_err();
    assert_eq!(why(&err), Why::Symlink);
    assert!(!format!("{err:#}").contains("hunter2"), "{err:#}");
    fs::remove_file(&pid_file).unwrap();

    // A FIFO: fails at once.
    nix::unistd::mkfifo(&pid_file, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    chown(&pid_file, Some(UID), Some(GID)).unwrap();
    let err = namespace(&pid_file).await.unwrap_err();
    assert_eq!(
        format!("{err:#}"),
        format!("refusing {}: it is a FIFO, not a regular file", pid_file.display())
    );
    fs::remove_file(&pid_file).unwrap();

    // A hard link to root's file (protected_hardlinks off).
    fs::hard_link(node.path("/etc/shadow"), &pid_file).unwrap();
    let err = namespace(&pid_file).await.unwrap_err();
    assert_eq!(why(&err), Why::HardLinks(2));
    assert!(!format!("{err:#}").contains("hunter2"), "{err:#}");
    fs::remove_file(&pid_file).unwrap();

    // A directory on the way swapped for a link to /etc.
    fs::remove_dir(node.path("/run/user/4242/libpod/tmp")).unwrap();
    node.user_link(&node.path("/etc"), "/run/user/4242/libpod/tmp");
    let err = namespace(&node.path("/run/user/4242/libpod/tmp/shadow")).await.unwrap_err();
    let refused = userfs::refusal_in(&err).unwrap();
    assert_eq!((&refused.path, &refused.why), (&node.path("/run/user/4242/libpod/tmp"), &Why::Symlink));

    // Another user's file in the user's directory.
    fs::remove_file(node.path("/run/user/4242/libpod/tmp")).unwrap();
    node.user_dir("/run/user/4242/libpod/tmp");
    fs::write(&pid_file, "1").unwrap();
    chown(&pid_file, Some(UID + 1), Some(GID)).unwrap();
    let err = namespace(&pid_file).await.unwrap_err();
    assert_eq!(why(&err), Why::Owner { uid: UID + 1, runner: UID });
}

#[tokio::test]
async fn a_forged_pause_pid_naming_root_init_is_not_read() {
    let Some(node) = Node::new() else { return };
    let pid_file = node.path("/run/user/4242/libpod/tmp/pause.pid");
    fs::write(&pid_file, "1\n").unwrap();
    chown(&pid_file, Some(UID), Some(GID)).unwrap();
    let ns = namespace(&pid_file).await.unwrap();
    let Namespace::None { why } = ns else { panic!("PID 1 taken for the pause process: {ns:?}") };
    assert!(why.contains("PID 1 belongs to UID 0, not the runner user (UID 4242)"), "{why}");
}

#[tokio::test]
async fn the_api_is_not_reached_through_a_planted_link_nor_served_by_another_uid() {
    let Some(node) = Node::new() else { return };
    // Root's own socket elsewhere, as a privileged daemon's would be.
    let roots = node.path("/run/roots.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&roots).unwrap();
    let sock = node.user_link(&roots, "/run/user/4242/podman/podman.sock");
    let client = Client::new(&sock, Duration::from_secs(2)).with_expected_peer(UID);
    let err = client.probe().await.unwrap_err();
    assert_eq!(why(&err), Why::Symlink);
    // Without an expected peer (the canary's client, for now) the link is refused all the same.
    let err = Client::new(&sock, Duration::from_secs(2)).probe().await.unwrap_err();
    assert_eq!(why(&err), Why::Symlink);

    // A real socket at the path, but root listening on it.
    fs::remove_file(&sock).unwrap();
    let _root_listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    chown(&sock, Some(UID), Some(GID)).unwrap();
    let err = client.probe().await.unwrap_err();
    assert!(
        err.to_string()
            .ends_with("the process listening on it runs as UID 0, not the runner user (UID 4242)"),
        "{err:#}"
    );
}

#[tokio::test]
async fn a_symlinked_graphroot_is_not_measured_and_a_planted_storage_conf_not_read() {
    let Some(node) = Node::new() else { return };
    let cx = node.context();
    // Honest: the graphroot's nearest existing directory is measured.
    let i = Step::Storage.inspect(&cx).await;
    assert!(i.observations[0].ok, "{:?}", i.observations);
    assert!(i.observations[0].detail.contains("(not created yet; measured /var/home/core)"), "{i:?}");

    // ~/.local/share/containers -> /etc: root's statvfs must not follow it.
    node.user_dir("/var/home/core/.local/share");
    node.user_link(&node.path("/etc"), "/var/home/core/.local/share/containers");
    let i = Step::Storage.inspect(&cx).await;
    let obs = &i.observations[0];
    assert!(!obs.ok);
    assert!(
        obs.detail.contains(&format!(
            "refusing {}: it is a symlink",
            node.path("/var/home/core/.local/share/containers").display()
        )),
        "{}",
        obs.detail
    );
    fs::remove_file(node.path("/var/home/core/.local/share/containers")).unwrap();

    // storage.conf -> /etc/shadow: not read, not quoted.
    node.user_dir("/var/home/core/.config/containers");
    node.user_link(&node.path("/etc/shadow"), "/var/home/core/.config/containers/storage.conf");
    let i = Step::Storage.inspect(&cx).await;
    let obs = &i.observations[0];
    assert!(!obs.ok);
    assert!(obs.detail.contains("storage.conf: it is a symlink"), "{}", obs.detail);
    assert!(!obs.detail.contains("hunter2"), "{}", obs.detail);

    // A storage.conf of the user's that is not TOML: the place is named, the text is not.
    fs::remove_file(node.path("/var/home/core/.config/containers/storage.conf")).unwrap();
    let conf = node.path("/var/home/core/.config/containers/storage.conf");
    fs::write(&conf, "[storage]\ngraphroot = hunter2\n").unwrap();
    chown(&conf, Some(UID), Some(GID)).unwrap();
    let i = Step::Storage.inspect(&cx).await;
    let obs = &i.observations[0];
    assert!(obs.detail.contains("is not valid TOML (line 2, column"), "{}", obs.detail);
    assert!(!obs.detail.contains("hunter2"), "{}", obs.detail);
}
