//! Provisioning steps. Each one can say what it sees and what it would change (`inspect`)
//! before changing anything (`converge`); the daemon, `apply` and `check` all use them.

pub mod canary;
pub mod drain;
pub mod host_tools;
pub mod id_mapping;
pub mod linger;
pub mod logins;
pub mod podman_config;
pub mod podman_socket;
pub mod runner_privileges;
pub mod storage;
pub mod subids;
pub mod unprivileged_ports;

use anyhow::Result;
use std::sync::Arc;
use tokio::sync::Mutex;

use crate::checks::Observation;
use crate::config::Settings;
use crate::paths::Root;
use crate::runner_user::Account;

/// Everything a step needs: where files are, what is wanted, for whom, and the system bus.
pub struct Context {
    pub root: Root,
    pub settings: Settings,
    pub user: Account,
    pub system_bus: SystemBus,
    /// Where the canary's result comes from: a round in place, or the daemon's runner.
    pub canary: Arc<crate::canary::Handle>,
}

impl Context {
    pub fn new(root: Root, settings: Settings, user: Account) -> Self {
        Context { root, settings, user, system_bus: SystemBus::default(), canary: Arc::default() }
    }
}

/// A shared, lazily (re)connected system bus connection: D-Bus may not be up yet when the
/// agent starts, and dbus-daemon may restart under it.
#[derive(Clone, Default)]
pub struct SystemBus {
    connection: Arc<Mutex<Option<zbus::Connection>>>,
    /// A connection given by the caller is kept: reconnecting would reach another bus.
    given: bool,
}

impl SystemBus {
    /// A bus given by a test or a caller (a private bus with test doubles).
    pub fn with_connection(connection: zbus::Connection) -> Self {
        SystemBus { connection: Arc::new(Mutex::new(Some(connection))), given: true }
    }

    pub async fn get(&self) -> Result<zbus::Connection> {
        let mut slot = self.connection.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let conn =
            zbus::Connection::system().await.map_err(|e| anyhow::anyhow!("system bus not reachable: {e}"))?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Drops the connection after an error so the next use reconnects.
    pub async fn reset(&self) {
        if self.given {
            return;
        }
        self.connection.lock().await.take();
    }
}

/// What a step sees: its checks, and the changes `converge` would make (empty when converged).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inspection {
    pub observations: Vec<Observation>,
    pub plan: Vec<String>,
}

impl Inspection {
    pub fn converged(&self) -> bool {
        self.observations.iter().all(|o| o.ok)
    }

    /// Whether `converge` has work: a failing check, or a plan made while passing (storage
    /// above the image-GC mark but below not-ready).
    pub fn wants_repair(&self) -> bool {
        !self.converged() || !self.plan.is_empty()
    }
}

/// What a repair changed, and what it saw when done if that already proves the result (so
/// the pass need not inspect the step again).
#[derive(Debug, Default)]
pub struct Repaired {
    pub changes: Vec<String>,
    pub proof: Option<Inspection>,
}

impl From<Vec<String>> for Repaired {
    fn from(changes: Vec<String>) -> Self {
        Repaired { changes, proof: None }
    }
}

/// A check a step reports. An advisory check warns without deciding readiness unless the
/// configuration makes it required (`[checks.NAME] required`).
#[derive(Debug, PartialEq, Eq)]
pub struct CheckSpec {
    pub name: &'static str,
    pub advisory: bool,
}

impl CheckSpec {
    pub const fn required(name: &'static str) -> CheckSpec {
        CheckSpec { name, advisory: false }
    }

    pub const fn advisory(name: &'static str) -> CheckSpec {
        CheckSpec { name, advisory: true }
    }
}

/// What the pass engine, the check lists and `--root` know about a step, declared as `SPEC`
/// next to the step's `inspect` and `converge`.
pub struct Spec {
    pub name: &'static str,
    /// In the order they are shown.
    pub checks: &'static [CheckSpec],
    /// Needs the running system (D-Bus, Podman, /proc) rather than files only: skipped with
    /// `--root`.
    pub needs_live_system: bool,
    /// Steps whose repair is attempted first in a pass (order only).
    pub after: &'static [Step],
    /// Steps that must pass before this one is repaired at all.
    pub requires: &'static [Step],
    /// Whether `converge` may run under this configuration; false for steps that only report.
    pub repairs: fn(&Context) -> bool,
}

/// `Spec::repairs` of a step that always repairs.
pub fn always(_: &Context) -> bool {
    true
}

/// `Spec::repairs` of a step that only reports.
pub fn never(_: &Context) -> bool {
    false
}

/// Declares the steps: the enum, their order, and the dispatch to each module's `SPEC`,
/// `inspect(cx) -> Inspection` and `converge(cx) -> Result<Vec<String>> | Result<Repaired>`.
macro_rules! steps {
    ($($variant:ident => $module:ident),+ $(,)?) => {
        /// The provisioning steps and checks, in the order they are shown.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Step {
            $($variant),+
        }

        impl Step {
            pub const ALL: &'static [Step] = &[$(Step::$variant),+];

            pub fn spec(self) -> &'static Spec {
                match self {
                    $(Step::$variant => &$module::SPEC),+
                }
            }

            pub async fn inspect(self, cx: &Context) -> Inspection {
                match self {
                    $(Step::$variant => $module::inspect(cx).await),+
                }
            }

            /// Makes the node match the configuration; returns what was changed.
            pub async fn converge(self, cx: &Context) -> Result<Repaired> {
                match self {
                    $(Step::$variant => $module::converge(cx).await.map(Repaired::from)),+
                }
            }
        }
    };
}

// To add a step: write its module (SPEC, inspect, converge) and add one line here, where its
// checks are to be shown.
steps! {
    Drain => drain,
    Logins => logins,
    SubIds => subids,
    Linger => linger,
    PodmanSocket => podman_socket,
    UnprivilegedPorts => unprivileged_ports,
    IdMapping => id_mapping,
    Storage => storage,
    PodmanConfig => podman_config,
    HostTools => host_tools,
    RunnerPrivileges => runner_privileges,
    Canary => canary,
}

impl Step {
    pub fn name(self) -> &'static str {
        self.spec().name
    }

    /// The names of the checks this step reports.
    pub fn checks(self) -> impl Iterator<Item = &'static str> {
        self.spec().checks.iter().map(|c| c.name)
    }

    /// Whether `check` is one of this step's checks.
    pub fn reports(self, check: &str) -> bool {
        self.checks().any(|n| n == check)
    }

    pub fn needs_live_system(self) -> bool {
        self.spec().needs_live_system
    }

    pub fn after(self) -> &'static [Step] {
        self.spec().after
    }

    pub fn requires(self) -> &'static [Step] {
        self.spec().requires
    }

    pub fn repairs(self, cx: &Context) -> bool {
        (self.spec().repairs)(cx)
    }

    /// The steps that apply to this root and configuration.
    pub fn for_context(cx: &Context) -> Vec<Step> {
        Step::ALL
            .iter()
            .copied()
            .filter(|s| cx.root.is_host() || !s.needs_live_system())
            .filter(|s| *s != Step::Canary || cx.settings.canary.enabled)
            .collect()
    }
}

/// Every check the agent knows, in the order they are shown.
pub fn all_checks() -> impl Iterator<Item = &'static CheckSpec> {
    Step::ALL.iter().flat_map(|s| s.spec().checks)
}

/// The names of every check, in the order they are shown (what `[checks.NAME]` accepts).
pub fn check_names() -> Vec<&'static str> {
    all_checks().map(|c| c.name).collect()
}

/// The check called `name`, if the agent has one.
pub fn check_spec(name: &str) -> Option<&'static CheckSpec> {
    all_checks().find(|c| c.name == name)
}

/// Where `name` is shown among all checks (unknown names last).
pub fn check_position(name: &str) -> usize {
    all_checks().position(|c| c.name == name).unwrap_or(usize::MAX)
}

/// Runs one step's inspection or repair, logging how long it took (debug level).
pub async fn timed<T>(step: Step, what: &str, work: impl std::future::Future<Output = T>) -> T {
    let started = std::time::Instant::now();
    let outcome = work.await;
    let elapsed = started.elapsed();
    tracing::debug!(
        step = step.name(),
        elapsed_ms = elapsed.as_millis() as u64,
        "{what} {} in {elapsed:?}",
        step.name()
    );
    outcome
}

/// Inspects the given steps concurrently, returning them in order.
pub async fn inspect_all(cx: &Context, steps: &[Step]) -> Vec<(Step, Inspection)> {
    let inspections =
        futures_util::future::join_all(steps.iter().map(|&s| timed(s, "inspected", s.inspect(cx)))).await;
    steps.iter().copied().zip(inspections).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn step_and_check_names_are_unique_and_shown_in_the_documented_order() {
        let steps: HashSet<_> = Step::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(steps.len(), Step::ALL.len(), "two steps share a name");
        let checks: Vec<_> = all_checks().map(|c| c.name).collect();
        assert_eq!(checks.iter().collect::<HashSet<_>>().len(), checks.len(), "two checks share a name");
        // The order of /readyz, `check` and the README's check table.
        assert_eq!(
            checks,
            [
                "drain",
                "logins",
                "subuid",
                "subgid",
                "linger",
                "podman-socket",
                "podman-api",
                "unprivileged-ports",
                "subuid-mapping",
                "newuidmap",
                "storage",
                "podman-config",
                "cgroup-delegation",
                "docker-cli",
                "runner-privileges",
                "canary",
            ]
        );
        let advisory: Vec<_> = all_checks().filter(|c| c.advisory).map(|c| c.name).collect();
        assert_eq!(advisory, ["cgroup-delegation", "docker-cli", "runner-privileges"]);
        assert_eq!(check_position("subgid"), 3);
        assert_eq!(check_position("no-such-check"), usize::MAX);
    }

    #[test]
    fn order_constraints_have_no_cycle() {
        // Two steps each after (or requiring) the other would both wait for ever.
        fn reaches(from: Step, to: Step, depth: usize) -> bool {
            depth < Step::ALL.len()
                && from.after().iter().chain(from.requires()).any(|&d| d == to || reaches(d, to, depth + 1))
        }
        for &step in Step::ALL {
            assert!(!reaches(step, step, 0), "{step:?} waits for itself");
        }
    }

    #[test]
    fn a_step_that_works_on_files_only_needs_no_live_step() {
        // With --root only file steps run: none of them may wait on a live one.
        for &step in Step::ALL.iter().filter(|s| !s.needs_live_system()) {
            assert!(
                step.requires().iter().all(|r| !r.needs_live_system()),
                "{step:?} requires a step skipped with --root"
            );
        }
    }
}
