//! The cgroup delegation drop-in against the systemd double: written once, systemd reloaded
//! once, the user manager never restarted.

mod dbus_doubles;

use dbus_doubles::{Doubles, Unit};
use executor_agent::config::Settings;
use executor_agent::paths::Root;
use executor_agent::runner_user::Account;
use executor_agent::steps::host_tools::{drop_in_contents, write_drop_in, DROP_IN};
use executor_agent::steps::{Context, SystemBus};
use std::os::unix::fs::MetadataExt;

#[tokio::test]
async fn the_delegation_drop_in_is_written_and_loaded_once() {
    let d = Doubles::without_logind().await;
    d.add_unit("user@1000.service", Unit::loaded("static", "active", "running"));
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::default();
    settings.cgroups.fix_delegation = true;
    let user = Account { name: "core".into(), uid: 1000, gid: 1000, home: "/var/home/core".into() };
    let cx = Context {
        system_bus: SystemBus::with_connection(d.client().await),
        ..Context::new(Root::new(dir.path()), settings, user)
    };

    let changes = write_drop_in(&cx).await.unwrap();
    assert_eq!(
        changes,
        [
            format!(
                "wrote {DROP_IN}: takes effect when user@1000.service restarts (not restarted: that would stop running jobs)"
            ),
            "reloaded systemd".to_string(),
        ]
    );
    let path = Root::new(dir.path()).join(DROP_IN);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), drop_in_contents());
    let calls = d.calls();
    assert_eq!(calls.iter().filter(|c| *c == "Reload").count(), 1, "{calls:?}");
    assert!(!calls.iter().any(|c| c.contains("Restart") || c.contains("Stop")), "{calls:?}");

    // Nothing to write the second time, and no second reload.
    let before = std::fs::metadata(&path).unwrap();
    assert!(write_drop_in(&cx).await.unwrap().is_empty());
    let after = std::fs::metadata(&path).unwrap();
    assert_eq!((after.ino(), after.mtime_nsec()), (before.ino(), before.mtime_nsec()));
    assert_eq!(d.calls().iter().filter(|c| *c == "Reload").count(), 1, "{:?}", d.calls());
}
