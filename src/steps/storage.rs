//! Storage: the file system under the runner user's Podman graphroot has room (blocks and
//! inodes, against kubelet-like thresholds), and unused images are removed before it fills.

mod gc;
pub mod graphroot;
mod usage;

use anyhow::{bail, Context as _, Result};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{CheckSpec, Context, Inspection, Spec, Step};
use crate::checks::Observation;
use crate::config::Storage as Thresholds;
use usage::{bytes, Usage};

pub const CHECK: &str = "storage";

/// Bytes freed by image GC in this process and not yet taken; see [`take_freed_bytes`].
static FREED_BYTES: AtomicU64 = AtomicU64::new(0);

/// Bytes freed by image GC since the last call, for the counter
/// `executor_agent_image_gc_freed_bytes_total` (add the result with `inc_by`). Counted as the
/// removed images' sizes as the Podman API reports them, like kubelet: layers shared with a
/// kept image stay on disk, so this is an upper bound. One consumer only: taking resets it.
pub fn take_freed_bytes() -> u64 {
    FREED_BYTES.swap(0, Ordering::Relaxed)
}

/// The graphroot and how full the file system under it is.
struct Measured {
    graphroot: graphroot::Graphroot,
    /// What was measured: the graphroot, or its nearest existing ancestor before Podman
    /// first creates it (under `cx.root`), opened without following a link the runner user
    /// could have made (a symlinked graphroot must not lead root's statvfs out of its tree).
    measured: crate::userfs::Dir,
    /// The graphroot itself exists.
    exists: bool,
    usage: Usage,
}

impl Measured {
    fn take(cx: &Context) -> Result<Measured> {
        let graphroot = graphroot::locate(&cx.root, &cx.user)?;
        let full = cx.root.join(&graphroot.path);
        let (measured, exists) = crate::userfs::Dir::open_or_ancestor(&full, None)
            .with_context(|| format!("measuring {}", graphroot.path.display()))?;
        let usage = Usage::of_dir(&measured)?;
        Ok(Measured { graphroot, measured, exists, usage })
    }

    fn again(&self) -> Result<Usage> {
        Usage::of_dir(&self.measured)
    }

    /// `/var/home/core/.local/share/containers/storage`, with where it came from when that
    /// is not obvious.
    fn name(&self, cx: &Context) -> String {
        let mut name = self.graphroot.path.display().to_string();
        if let Some(file) = &self.graphroot.set_by {
            name.push_str(&format!(" (set in {})", file.display()));
        }
        if !self.exists {
            let at = &self.measured.path;
            let shown = at.strip_prefix(cx.root.dir()).map_or(at.clone(), |p| PathBuf::from("/").join(p));
            name.push_str(&format!(" (not created yet; measured {})", shown.display()));
        }
        name
    }
}

/// The verdict on a measurement: the check and, above the GC mark, the plan.
fn judge(name: &str, usage: &Usage, t: &Thresholds) -> Inspection {
    let (blocks, inodes) = (usage.percent(), usage.inode_percent());
    let blocks_full = blocks >= t.not_ready_percent;
    let inodes_full = inodes >= t.inodes_not_ready_percent;
    let mut detail = format!("{name}: {blocks}% of {} used", bytes(usage.total_bytes));
    if blocks_full {
        detail.push_str(&format!(" (not ready at {}%)", t.not_ready_percent));
    } else if blocks >= t.gc_high_percent {
        detail.push_str(&format!(" (unused images are removed from {}%)", t.gc_high_percent));
    }
    detail.push_str(&format!(", {inodes}% of inodes"));
    if inodes_full {
        detail.push_str(&format!(" (not ready at {}%)", t.inodes_not_ready_percent));
    }
    let mut plan = Vec::new();
    if gc::needed(usage, t) {
        let mut goal = format!("{}% used", t.gc_low_percent);
        if inodes_full {
            goal.push_str(&format!(" and below {}% of inodes", t.inodes_not_ready_percent));
        }
        plan.push(format!("remove unused images, oldest first, until {goal}"));
    }
    let observation = Observation { name: CHECK, ok: !blocks_full && !inodes_full, detail };
    Inspection { observations: vec![observation], plan }
}

pub const SPEC: Spec = Spec {
    name: "storage",
    checks: &[CheckSpec::required(CHECK)],
    needs_live_system: true,
    after: &[Step::PodmanSocket],
    requires: &[Step::Linger, Step::PodmanSocket],
    repairs: super::always,
};

pub async fn inspect(cx: &Context) -> Inspection {
    match Measured::take(cx) {
        Ok(m) => judge(&m.name(cx), &m.usage, &cx.settings.storage),
        Err(e) => Inspection {
            observations: vec![Observation::fail(CHECK, crate::journal::detail(&e))],
            plan: Vec::new(),
        },
    }
}

/// Image GC through the user's Podman API when the file system is above the GC mark.
pub async fn converge(cx: &Context) -> Result<Vec<String>> {
    let thresholds = &cx.settings.storage;
    let m = Measured::take(cx)?;
    if !gc::needed(&m.usage, thresholds) {
        return Ok(Vec::new());
    }
    let api = super::podman_socket::client(cx);
    let report = gc::collect(&api, || m.again(), thresholds, &FREED_BYTES).await?;
    let after = report.usage.unwrap_or(m.usage);
    let name = m.graphroot.path.display();
    if !gc::done(&after, thresholds) {
        let why = match &report.stopped_by {
            Some(e) => format!("the Podman API failed: {}", crate::journal::detail(e)),
            None => format!(
                "no unused image left ({} in use by containers, {} refused)",
                report.in_use,
                report.skipped.len()
            ),
        };
        if report.removed.is_empty() {
            bail!("{name} is {}% used and nothing could be removed: {why}", after.percent());
        }
        tracing::warn!(
            step = "storage",
            "{name} is still {}% used after removing {} images ({}): {why}",
            after.percent(),
            report.removed.len(),
            bytes(report.freed_bytes)
        );
    }
    Ok(report.changes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "/var/home/core/.local/share/containers/storage";

    /// A 50 GiB file system with `pct` % of blocks and `inodes` % of inodes used.
    fn at(pct: u64, inodes: u64) -> Usage {
        let gib = 1024 * 1024 * 1024 / 4096;
        let blocks = 50 * gib;
        let free = blocks * (100 - pct) / 100;
        Usage::from_counts(4096, blocks, free, free, 1000, 1000 - inodes * 10)
    }

    #[test]
    fn plenty_of_room_passes_without_a_plan() {
        let i = judge(NAME, &at(42, 3), &Thresholds::default());
        assert_eq!(
            i.observations,
            [Observation::pass(CHECK, format!("{NAME}: 42% of 50 GiB used, 3% of inodes"))]
        );
        assert!(i.plan.is_empty());
    }

    #[test]
    fn above_the_gc_mark_passes_and_plans_a_gc() {
        let i = judge(NAME, &at(87, 3), &Thresholds::default());
        assert!(i.converged());
        assert_eq!(
            i.observations[0].detail,
            format!("{NAME}: 87% of 50 GiB used (unused images are removed from 85%), 3% of inodes")
        );
        assert_eq!(i.plan, ["remove unused images, oldest first, until 80% used"]);
    }

    #[test]
    fn full_blocks_or_inodes_are_not_ready() {
        let i = judge(NAME, &at(91, 3), &Thresholds::default());
        assert_eq!(
            i.observations,
            [Observation::fail(
                CHECK,
                format!("{NAME}: 91% of 50 GiB used (not ready at 90%), 3% of inodes")
            )]
        );
        assert_eq!(i.plan.len(), 1);
        let i = judge(NAME, &at(40, 96), &Thresholds::default());
        assert!(!i.converged());
        assert_eq!(
            i.observations[0].detail,
            format!("{NAME}: 40% of 50 GiB used, 96% of inodes (not ready at 95%)")
        );
        assert_eq!(i.plan, ["remove unused images, oldest first, until 80% used and below 95% of inodes"]);
    }

    #[test]
    fn thresholds_come_from_the_configuration() {
        let t = Thresholds {
            not_ready_percent: 50,
            inodes_not_ready_percent: 60,
            gc_high_percent: 45,
            gc_low_percent: 30,
        };
        assert!(!judge(NAME, &at(50, 0), &t).converged());
        assert_eq!(judge(NAME, &at(46, 0), &t).plan, ["remove unused images, oldest first, until 30% used"]);
        assert!(!judge(NAME, &at(10, 60), &t).converged());
    }

    #[tokio::test]
    async fn inspect_measures_the_parent_of_a_graphroot_not_created_yet() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("home/core")).unwrap();
        let user = crate::runner_user::Account {
            name: "core".into(),
            uid: 1000,
            gid: 1000,
            home: "/home/core".into(),
        };
        let cx = Context::new(crate::paths::Root::new(dir.path()), crate::config::Settings::default(), user);
        let i = inspect(&cx).await;
        let detail = &i.observations[0].detail;
        let prefix = "/home/core/.local/share/containers/storage (not created yet; measured /home/core): ";
        assert!(detail.starts_with(prefix), "{detail}");
        assert!(detail.contains("% of inodes"), "{detail}");

        std::fs::create_dir_all(dir.path().join("etc/containers")).unwrap();
        std::fs::write(dir.path().join("etc/containers/storage.conf"), "[storage\n").unwrap();
        let i = inspect(&cx).await;
        assert!(!i.converged());
        assert!(
            i.observations[0].detail.contains("/etc/containers/storage.conf is not valid TOML"),
            "{:?}",
            i
        );
    }

    #[test]
    fn freed_bytes_are_taken_once() {
        FREED_BYTES.fetch_add(5, Ordering::Relaxed);
        assert!(take_freed_bytes() >= 5);
        // Other tests never add to the process-wide counter (they pass their own).
        assert_eq!(take_freed_bytes(), 0);
    }
}
