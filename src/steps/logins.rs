//! Logins: while the node is drained, new logins of every user but root are refused the way
//! `shutdown` and pam_nologin(8) do it (`/etc/nologin`), so a runner whose acquire heartbeat
//! is an SSH `exit 0` gives the job to another node; otherwise any nologin file fails the
//! `logins` check, because the runner could not reach the node over SSH at all.

use anyhow::{Context as _, Result};
use std::io::Read;
use std::path::Path;

use super::{CheckSpec, Context, Inspection, Spec};
use crate::checks::Observation;
use crate::drain::Drain;
use crate::fsutil;

pub const CHECK: &str = "logins";
/// The file the agent writes while drained. pam_nologin reads it for sshd (and login);
/// systemd-user-sessions.service removes it at boot, so it never outlives a reboot.
pub const NOLOGIN: &str = "/etc/nologin";
/// Written by `shutdown` before a scheduled power-off and by systemd-tmpfiles during boot;
/// never the agent's.
pub const RUN_NOLOGIN: &str = "/run/nologin";
/// The first words of the agent's own file: only a file that starts so is rewritten or removed.
const MARK: &str = "executor-agent: ";
/// What is read of a nologin file (pam_nologin shows it whole; the agent needs one line).
const MAX_READ: u64 = 4096;
/// Most of a nologin file's first line that reaches a check's detail.
const MAX_LINE_CHARS: usize = 120;

pub const SPEC: Spec = Spec {
    name: "logins",
    checks: &[CheckSpec::required(CHECK)],
    needs_live_system: true,
    after: &[],
    requires: &[],
    repairs: super::always,
};

/// What is at a nologin path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Found {
    Absent,
    /// The agent's file, whole.
    Ours(String),
    /// Someone else's (`shutdown`, boot, an operator); its first line, made one safe line.
    Theirs(String),
}

fn look(path: &Path) -> Found {
    let file = match fsutil::open_regular_nofollow(path) {
        Ok(None) => return Found::Absent,
        Ok(Some(file)) => file,
        // A link, a FIFO, a directory: it still makes pam_nologin refuse logins (it checks
        // that the path exists), and it is not the agent's.
        Err(e) => return Found::Theirs(crate::text::one_line(&e.to_string(), MAX_LINE_CHARS)),
    };
    let mut bytes = Vec::new();
    if let Err(e) = file.take(MAX_READ).read_to_end(&mut bytes) {
        return Found::Theirs(crate::text::one_line(&e.to_string(), MAX_LINE_CHARS));
    }
    let text = String::from_utf8_lossy(&bytes).into_owned();
    if text.starts_with(MARK) {
        Found::Ours(text)
    } else {
        let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("(empty)");
        Found::Theirs(crate::text::one_line(first, MAX_LINE_CHARS))
    }
}

/// What the agent's file says for `drain` (shown to a user whose login is refused).
pub fn contents(drain: &Drain) -> String {
    let reason = crate::text::one_line(&drain.reason, 200);
    format!(
        "{MARK}this node is drained ({reason}) and takes no new work; new logins are refused until \
         `executor-agent undrain`.\nDrained since {} by {}.\n",
        drain.since,
        crate::text::one_line(&drain.by, 100),
    )
}

/// The file the agent wants at [`NOLOGIN`], if any: while drained and `[drain] refuse_logins`.
/// An unreadable drain record counts as a drain, as the `drain` check does.
fn wanted(cx: &Context) -> Option<String> {
    if !cx.settings.drain.refuse_logins {
        return None;
    }
    match crate::drain::current(&cx.root) {
        Ok(None) => None,
        Ok(Some(d)) => Some(contents(&d)),
        Err(e) => Some(contents(&Drain {
            reason: format!("the drain record cannot be read: {}", crate::journal::detail(&e)),
            since: "an unknown time".into(),
            by: "executor-agent".into(),
        })),
    }
}

struct Seen {
    wanted: Option<String>,
    etc: Found,
    run: Found,
}

fn see(cx: &Context) -> Seen {
    Seen { wanted: wanted(cx), etc: look(&cx.root.join(NOLOGIN)), run: look(&cx.root.join(RUN_NOLOGIN)) }
}

pub async fn inspect(cx: &Context) -> Inspection {
    judge(&see(cx))
}

fn judge(seen: &Seen) -> Inspection {
    let mut plan = Vec::new();
    let refusing = |path: &str, first: &str| {
        format!(
            "{path} refuses the logins of every user but root, so the runner cannot reach this node \
             over SSH: \"{first}\" (not written by the agent; left alone)"
        )
    };
    let observation = match (&seen.wanted, &seen.etc) {
        (Some(want), Found::Ours(have)) => {
            if have != want {
                plan.push(format!("rewrite {NOLOGIN} with the current drain's reason"));
            }
            Observation::pass(CHECK, format!("new logins of users other than root refused while drained ({NOLOGIN})"))
        }
        (Some(_), Found::Theirs(first)) => Observation::pass(
            CHECK,
            format!("new logins of users other than root refused while drained, by {NOLOGIN} (not the agent's: \"{first}\")"),
        ),
        (Some(_), Found::Absent) => {
            plan.push(format!("write {NOLOGIN}: refuse new logins of users other than root while drained"));
            Observation::fail(CHECK, format!("drained, but new logins are allowed: {NOLOGIN} is missing"))
        }
        (None, Found::Ours(_)) => {
            plan.push(format!("remove {NOLOGIN} (the agent's, from a drain that ended)"));
            Observation::fail(CHECK, format!("{NOLOGIN} from a drain that ended refuses new logins"))
        }
        (None, Found::Theirs(first)) => Observation::fail(CHECK, refusing(NOLOGIN, first)),
        (None, Found::Absent) => match &seen.run {
            Found::Absent => Observation::pass(CHECK, format!("logins allowed (no {NOLOGIN}, no {RUN_NOLOGIN})")),
            Found::Ours(text) | Found::Theirs(text) => {
                let first = crate::text::one_line(text.lines().next().unwrap_or(""), MAX_LINE_CHARS);
                Observation::fail(CHECK, refusing(RUN_NOLOGIN, &first))
            }
        },
    };
    Inspection { observations: vec![observation], plan }
}

/// Writes or removes the agent's own file; anyone else's is left as it is.
pub async fn converge(cx: &Context) -> Result<Vec<String>> {
    let seen = see(cx);
    let path = cx.root.join(NOLOGIN);
    match (&seen.wanted, &seen.etc) {
        (Some(want), Found::Absent) => {
            fsutil::replace_file_atomically(&path, want.as_bytes(), 0o644)
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(vec![format!(
                "wrote {NOLOGIN}: new logins of users other than root are refused while drained"
            )])
        }
        (Some(want), Found::Ours(have)) if have != want => {
            fsutil::replace_file_atomically(&path, want.as_bytes(), 0o644)
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(vec![format!("rewrote {NOLOGIN} with the current drain's reason")])
        }
        (None, Found::Ours(_)) => {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
            }
            Ok(vec![format!("removed {NOLOGIN}: logins are allowed again")])
        }
        _ => Ok(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use crate::paths::Root;
    use crate::runner_user::Account;

    fn context(dir: &Path, refuse: bool) -> Context {
        let mut settings = Settings::default();
        settings.drain.refuse_logins = refuse;
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::create_dir_all(dir.join("run")).unwrap();
        Context::new(
            Root::new(dir),
            settings,
            Account { name: "core".into(), uid: 1000, gid: 1000, home: "/var/home/core".into() },
        )
    }

    fn nologin(dir: &Path) -> Option<String> {
        std::fs::read_to_string(dir.join("etc/nologin")).ok()
    }

    #[tokio::test]
    async fn a_drain_refuses_logins_and_undrain_allows_them_again() {
        let dir = tempfile::tempdir().unwrap();
        let cx = context(dir.path(), true);
        assert!(inspect(&cx).await.converged());
        crate::drain::drain(&cx.root, "scale-in", "uid 0 over the control socket").unwrap();
        let seen = inspect(&cx).await;
        assert!(!seen.converged());
        assert_eq!(
            seen.plan,
            ["write /etc/nologin: refuse new logins of users other than root while drained"]
        );
        assert_eq!(converge(&cx).await.unwrap().len(), 1);
        let text = nologin(dir.path()).unwrap();
        assert!(text.starts_with("executor-agent: this node is drained (scale-in)"), "{text}");
        let seen = inspect(&cx).await;
        assert!(seen.converged() && seen.plan.is_empty(), "{seen:?}");
        // A new reason is written over the agent's own file.
        crate::drain::drain(&cx.root, "spot: terminate at 12:00", "spot").unwrap();
        assert_eq!(inspect(&cx).await.plan, ["rewrite /etc/nologin with the current drain's reason"]);
        converge(&cx).await.unwrap();
        assert!(nologin(dir.path()).unwrap().contains("spot: terminate at 12:00"));
        crate::drain::undrain(&cx.root).unwrap();
        let seen = inspect(&cx).await;
        assert!(!seen.converged());
        assert_eq!(seen.plan, ["remove /etc/nologin (the agent's, from a drain that ended)"]);
        converge(&cx).await.unwrap();
        assert_eq!(nologin(dir.path()), None);
        assert!(inspect(&cx).await.converged());
    }

    #[tokio::test]
    async fn someone_elses_nologin_is_never_touched_and_fails_the_check_when_not_drained() {
        let dir = tempfile::tempdir().unwrap();
        let cx = context(dir.path(), true);
        let theirs = "Maintenance until 14:00\x1b[2J\n";
        std::fs::write(dir.path().join("etc/nologin"), theirs).unwrap();
        let seen = inspect(&cx).await;
        assert!(!seen.converged() && seen.plan.is_empty(), "{seen:?}");
        let detail = &seen.observations[0].detail;
        assert!(
            detail.contains("\"Maintenance until 14:00 [2J\"") && detail.contains("left alone"),
            "{detail}"
        );
        assert!(converge(&cx).await.unwrap().is_empty());
        crate::drain::drain(&cx.root, "scale-in", "test").unwrap();
        assert!(inspect(&cx).await.converged(), "their file refuses logins already");
        assert!(converge(&cx).await.unwrap().is_empty());
        crate::drain::undrain(&cx.root).unwrap();
        assert!(converge(&cx).await.unwrap().is_empty());
        assert_eq!(nologin(dir.path()).unwrap(), theirs);
    }

    #[tokio::test]
    async fn run_nologin_fails_the_check_and_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let cx = context(dir.path(), true);
        std::fs::write(dir.path().join("run/nologin"), "The system is going down for poweroff at 12:00\n")
            .unwrap();
        let seen = inspect(&cx).await;
        assert!(!seen.converged() && seen.plan.is_empty(), "{seen:?}");
        assert!(seen.observations[0].detail.starts_with("/run/nologin refuses"), "{seen:?}");
        assert!(converge(&cx).await.unwrap().is_empty());
        assert!(dir.path().join("run/nologin").exists());
    }

    #[tokio::test]
    async fn a_symlink_at_the_path_is_neither_followed_nor_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let cx = context(dir.path(), true);
        std::fs::write(dir.path().join("target"), "x").unwrap();
        std::os::unix::fs::symlink(dir.path().join("target"), dir.path().join("etc/nologin")).unwrap();
        crate::drain::drain(&cx.root, "scale-in", "test").unwrap();
        assert!(converge(&cx).await.unwrap().is_empty());
        crate::drain::undrain(&cx.root).unwrap();
        assert!(converge(&cx).await.unwrap().is_empty());
        assert!(std::fs::symlink_metadata(dir.path().join("etc/nologin")).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read_to_string(dir.path().join("target")).unwrap(), "x");
    }

    #[tokio::test]
    async fn refuse_logins_off_leaves_logins_open_while_drained() {
        let dir = tempfile::tempdir().unwrap();
        let cx = context(dir.path(), false);
        crate::drain::drain(&cx.root, "scale-in", "test").unwrap();
        assert!(inspect(&cx).await.converged());
        assert!(converge(&cx).await.unwrap().is_empty());
        assert_eq!(nologin(dir.path()), None);
    }
}
