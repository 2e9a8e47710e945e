//! Wake-ups for the main loop from the file system (inotify), the system bus (unit and logind
//! signals) and the user manager, so drift is seen within moments without tight polling.

use anyhow::Result;
use futures_util::StreamExt;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use crate::runner_user::Account;
use crate::steps::SystemBus;
use crate::systemd;
use crate::user_manager;

/// A directory to watch and the entry names in it that matter (empty: any entry).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchedDir {
    pub dir: PathBuf,
    pub names: Vec<OsString>,
}

struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// What every watch asks for: changes of entries, the directory itself going away, and
/// neither following a final symlink nor watching anything but a directory.
fn watch_flags() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_DONT_FOLLOW
        | AddWatchFlags::IN_ONLYDIR
}

/// Inotify on the directories that hold what the steps manage. Directories that do not exist
/// yet (the socket's, before podman.socket first starts) are added by `arm` on a later pass.
pub struct FileWatcher {
    fd: AsyncFd<InotifyFd>,
    watched: Mutex<HashMap<WatchDescriptor, WatchedDir>>,
}

impl FileWatcher {
    pub fn new() -> Result<Arc<Self>> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        // SAFETY: the Inotify owns its descriptor for as long as the AsyncFd holds it.
        let fd =
            unsafe { AsyncFd::register_with_interest(InotifyFd(inotify), tokio::io::Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("registering inotify: {e}"))?;
        Ok(Arc::new(FileWatcher { fd, watched: Mutex::new(HashMap::new()) }))
    }

    /// (Re-)adds watches; adding an existing watch is a cheap no-op for the kernel.
    ///
    /// Some watched directories are the runner user's (`/run/user/UID/podman`,
    /// `~/.config/containers`): `IN_DONT_FOLLOW` and `IN_ONLYDIR` make a name the user replaced
    /// with a symlink (to a directory of root's, say) fail to be watched instead of watching
    /// where it points. The next `arm` after the user puts a directory back watches it again.
    pub fn arm(&self, dirs: &[WatchedDir]) {
        let mut watched = self.watched.lock().unwrap();
        for dir in dirs {
            if let Ok(wd) = self.fd.get_ref().0.add_watch(&dir.dir, watch_flags()) {
                watched.insert(wd, dir.clone());
            }
        }
    }

    /// Calls `wake` for every event on a watched name, until the descriptor fails.
    pub async fn run(self: Arc<Self>, wake: Arc<Notify>) {
        loop {
            let Ok(mut guard) = self.fd.readable().await else {
                return;
            };
            let events = match guard.try_io(|fd| fd.get_ref().0.read_events().map_err(std::io::Error::from)) {
                Ok(Ok(events)) => events,
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Ok(Err(_)) => return,
                Err(_would_block) => continue,
            };
            let mut relevant = false;
            {
                let mut watched = self.watched.lock().unwrap();
                for event in events {
                    if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                        watched.remove(&event.wd);
                        relevant = true;
                        continue;
                    }
                    let Some(dir) = watched.get(&event.wd) else {
                        continue;
                    };
                    let name_matches = match &event.name {
                        None => true,
                        Some(name) => dir.names.is_empty() || dir.names.iter().any(|n| n == name),
                    };
                    relevant |= name_matches;
                }
            }
            if relevant {
                wake.notify_one();
            }
        }
    }
}

/// Wakes the loop on changes of the user manager's unit, logind's users, and restarts of
/// logind, systemd or the bus itself.
pub async fn watch_system_bus(bus: SystemBus, user: Account, wake: Arc<Notify>) {
    const FIRST_RETRY: Duration = Duration::from_millis(250);
    let mut delay = FIRST_RETRY;
    loop {
        let mut connected = false;
        if let Err(e) = watch_system_bus_once(&bus, &user, &wake, &mut connected).await {
            tracing::debug!("system bus watch ended: {}", crate::journal::detail(&e));
        }
        if connected {
            delay = FIRST_RETRY;
        }
        bus.reset().await;
        wake.notify_one();
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

async fn watch_system_bus_once(
    bus: &SystemBus,
    user: &Account,
    wake: &Notify,
    connected: &mut bool,
) -> Result<()> {
    let conn = bus.get().await?;
    systemd::subscribe(&systemd::manager(&conn).await?).await?;
    // The bus is (back) up: what failed while it was away can be repaired now.
    *connected = true;
    wake.notify_one();
    let unit_path = systemd::unit_object_path(&user.manager_unit());
    let rules = [
        zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .sender("org.freedesktop.systemd1")
            .path(unit_path)
            .build()?,
        zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .sender("org.freedesktop.login1")
            .interface("org.freedesktop.login1.Manager")
            .build()?,
        zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .sender("org.freedesktop.DBus")
            .member("NameOwnerChanged")
            .build()?,
    ];
    let mut streams = Vec::new();
    for rule in rules {
        streams
            .push(zbus::MessageStream::for_match_rule(rule, &conn, std::num::NonZeroUsize::new(64)).await?);
    }
    let mut all = futures_util::stream::select_all(streams);
    while let Some(message) = all.next().await {
        let message = message?;
        let header = message.header();
        if header.member().is_some_and(|m| m.as_str() == "NameOwnerChanged") {
            let Ok((name, _, _)) = message.body().deserialize::<(String, String, String)>() else {
                continue;
            };
            if name != "org.freedesktop.login1" && name != "org.freedesktop.systemd1" {
                continue;
            }
        }
        wake.notify_one();
    }
    anyhow::bail!("system bus closed")
}

/// Keeps a `user-manager watch` helper running while the user manager is up.
#[derive(Default)]
pub struct UserWatch {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl UserWatch {
    /// Starts the helper if it is not running; call when the user manager is active.
    pub fn ensure_running(&mut self, user: &Account, units: &[&str], wake: &Arc<Notify>) {
        if self.task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        match user_manager::Watcher::spawn(user, units) {
            Ok(mut watcher) => {
                let wake = wake.clone();
                self.task = Some(tokio::spawn(async move {
                    loop {
                        match watcher.next().await {
                            Ok(Some(_)) => wake.notify_one(),
                            Ok(None) => break,
                            // Too long a line: the helper is stopped; the next pass starts another.
                            Err(e) => {
                                tracing::warn!("user manager watcher: {}", crate::journal::detail(&e));
                                break;
                            }
                        }
                    }
                    wake.notify_one();
                }));
            }
            Err(e) => tracing::warn!("cannot watch the user manager: {}", crate::journal::detail(&e)),
        }
    }

    pub fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for UserWatch {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_symlink_or_a_file_in_place_of_a_watched_directory_is_not_watched() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = dir.path().join("podman");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let watched = |dir: &std::path::Path| WatchedDir { dir: dir.to_path_buf(), names: vec![] };

        let files = FileWatcher::new().unwrap();
        files.arm(&[watched(&link), watched(&file)]);
        assert!(files.watched.lock().unwrap().is_empty(), "a link or a file was watched");
        files.arm(&[watched(&real)]);
        assert_eq!(
            files.watched.lock().unwrap().values().map(|w| w.dir.clone()).collect::<Vec<_>>(),
            std::slice::from_ref(&real)
        );

        // Changes in the real directory wake the loop.
        let wake = Arc::new(Notify::new());
        tokio::spawn(files.clone().run(wake.clone()));
        std::fs::write(real.join("podman.sock"), "").unwrap();
        tokio::time::timeout(Duration::from_secs(5), wake.notified()).await.expect("no wake-up");
    }
}
