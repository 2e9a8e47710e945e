//! Provisioning steps. Each one can say what it sees and what it would change (`inspect`)
//! before changing anything (`converge`); the daemon, `apply` and `check` all use them.

pub mod canary;
pub mod drain;
pub mod host_tools;
pub mod id_mapping;
pub mod linger;
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

/// The provisioning steps and checks, in the order they are shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Step {
    Drain,
    SubIds,
    UnprivilegedPorts,
    Linger,
    PodmanConfig,
    PodmanSocket,
    IdMapping,
    Storage,
    HostTools,
    RunnerPrivileges,
    Canary,
}

impl Step {
    pub const ALL: [Step; 11] = [
        Step::Drain,
        Step::SubIds,
        Step::UnprivilegedPorts,
        Step::Linger,
        Step::PodmanConfig,
        Step::PodmanSocket,
        Step::IdMapping,
        Step::Storage,
        Step::HostTools,
        Step::RunnerPrivileges,
        Step::Canary,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Step::Drain => "drain",
            Step::SubIds => "subids",
            Step::UnprivilegedPorts => "unprivileged-ports",
            Step::Linger => "linger",
            Step::PodmanConfig => "podman-config",
            Step::PodmanSocket => "podman-socket",
            Step::IdMapping => "id-mapping",
            Step::Storage => "storage",
            Step::HostTools => "host-tools",
            Step::RunnerPrivileges => "runner-privileges",
            Step::Canary => "canary",
        }
    }

    /// The checks this step reports.
    pub fn checks(self) -> &'static [&'static str] {
        match self {
            Step::Drain => &["drain"],
            Step::SubIds => &["subuid", "subgid"],
            Step::UnprivilegedPorts => &["unprivileged-ports"],
            Step::Linger => &["linger"],
            Step::PodmanConfig => &["podman-config"],
            Step::PodmanSocket => &["podman-socket", "podman-api"],
            Step::IdMapping => &["subuid-mapping", "newuidmap"],
            Step::Storage => &["storage"],
            Step::HostTools => &["cgroup-delegation", "docker-cli"],
            Step::RunnerPrivileges => &["runner-privileges"],
            Step::Canary => &["canary"],
        }
    }

    /// Steps that need the running system (D-Bus, Podman, /proc) rather than files only;
    /// skipped with `--root`.
    pub fn needs_live_system(self) -> bool {
        !matches!(self, Step::SubIds | Step::UnprivilegedPorts | Step::PodmanConfig | Step::RunnerPrivileges)
    }

    /// Steps whose repair must be attempted first in a pass (order only).
    pub fn after(self) -> &'static [Step] {
        match self {
            // The Podman service fixes its user namespace and storage driver when it first
            // starts: give it the subordinate IDs and its configuration first.
            Step::PodmanSocket => &[Step::SubIds, Step::PodmanConfig, Step::Linger],
            Step::IdMapping => &[Step::SubIds, Step::PodmanSocket],
            Step::Storage => &[Step::PodmanSocket],
            // A round proves everything below the API: after whatever can change it.
            Step::Canary => &[Step::PodmanSocket, Step::PodmanConfig, Step::IdMapping, Step::Storage],
            _ => &[],
        }
    }

    /// Steps that must pass before this one can be repaired at all.
    pub fn requires(self) -> &'static [Step] {
        match self {
            // Everything that talks to the user's manager or Podman needs the manager.
            Step::PodmanSocket => &[Step::Linger],
            // A migrate with a broken subuid file would only make things worse.
            Step::IdMapping => &[Step::SubIds, Step::Linger, Step::PodmanSocket],
            Step::Storage | Step::Canary => &[Step::Linger, Step::PodmanSocket],
            _ => &[],
        }
    }

    /// False for steps that only report (a missing tool, a drained node).
    pub fn repairs(self, cx: &Context) -> bool {
        match self {
            Step::Drain => false,
            // Re-running the round is its "repair" in `apply`; the daemon's runner schedules its own.
            Step::Canary => matches!(*cx.canary, crate::canary::Handle::Direct(_)),
            Step::HostTools => cx.settings.cgroups.fix_delegation,
            // Inspect only, unless asked to mask the rootful Docker units.
            Step::RunnerPrivileges => cx.settings.runner_privileges.mask_docker,
            Step::PodmanConfig => cx.settings.podman_config.manage,
            _ => true,
        }
    }

    /// The steps that apply to this root and configuration.
    pub fn for_context(cx: &Context) -> Vec<Step> {
        Step::ALL
            .into_iter()
            .filter(|s| cx.root.is_host() || !s.needs_live_system())
            .filter(|s| *s != Step::Canary || cx.settings.canary.enabled)
            .collect()
    }

    pub async fn inspect(self, cx: &Context) -> Inspection {
        match self {
            Step::Drain => drain::inspect(cx).await,
            Step::SubIds => subids::inspect(cx).await,
            Step::UnprivilegedPorts => unprivileged_ports::inspect(cx).await,
            Step::Linger => linger::inspect(cx).await,
            Step::PodmanConfig => podman_config::inspect(cx).await,
            Step::PodmanSocket => podman_socket::inspect(cx).await,
            Step::IdMapping => id_mapping::inspect(cx).await,
            Step::Storage => storage::inspect(cx).await,
            Step::HostTools => host_tools::inspect(cx).await,
            Step::RunnerPrivileges => runner_privileges::inspect(cx).await,
            Step::Canary => canary::inspect(cx).await,
        }
    }

    /// Makes the node match the configuration; returns what was changed.
    pub async fn converge(self, cx: &Context) -> Result<Repaired> {
        let changes = match self {
            Step::Drain => Ok(Vec::new()),
            Step::Canary => canary::converge(cx).await,
            Step::SubIds => subids::converge(cx).await,
            Step::UnprivilegedPorts => unprivileged_ports::converge(cx).await,
            Step::Linger => linger::converge(cx).await,
            Step::PodmanConfig => podman_config::converge(cx).await,
            Step::PodmanSocket => return podman_socket::converge(cx).await,
            Step::IdMapping => id_mapping::converge(cx).await,
            Step::Storage => storage::converge(cx).await,
            Step::HostTools => host_tools::converge(cx).await,
            Step::RunnerPrivileges => runner_privileges::converge(cx).await,
        };
        changes.map(Repaired::from)
    }
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
