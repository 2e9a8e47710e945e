//! Provisioning steps. Each one can say what it sees and what it would change (`inspect`)
//! before changing anything (`converge`); the daemon, `apply` and `check` all use them.

pub mod linger;
pub mod podman_socket;
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
}

impl Context {
    pub fn new(root: Root, settings: Settings, user: Account) -> Self {
        Context { root, settings, user, system_bus: SystemBus::default() }
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
}

/// The provisioning steps, in dependency order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Step {
    SubIds,
    UnprivilegedPorts,
    Linger,
    PodmanSocket,
}

impl Step {
    pub const ALL: [Step; 4] = [Step::SubIds, Step::UnprivilegedPorts, Step::Linger, Step::PodmanSocket];

    pub fn name(self) -> &'static str {
        match self {
            Step::SubIds => "subids",
            Step::UnprivilegedPorts => "unprivileged-ports",
            Step::Linger => "linger",
            Step::PodmanSocket => "podman-socket",
        }
    }

    /// Steps that act on the running system (D-Bus) rather than on files; skipped with `--root`.
    pub fn needs_live_system(self) -> bool {
        matches!(self, Step::Linger | Step::PodmanSocket)
    }

    /// The step that must have converged before this one can.
    pub fn depends_on(self) -> Option<Step> {
        match self {
            // The Podman service fixes its user namespace when it starts: give it the
            // subordinate IDs and the user manager first.
            Step::PodmanSocket => Some(Step::Linger),
            _ => None,
        }
    }

    /// The steps that apply to this root.
    pub fn for_root(root: &Root) -> Vec<Step> {
        Step::ALL.into_iter().filter(|s| root.is_host() || !s.needs_live_system()).collect()
    }

    pub async fn inspect(self, cx: &Context) -> Inspection {
        match self {
            Step::SubIds => subids::inspect(cx).await,
            Step::UnprivilegedPorts => unprivileged_ports::inspect(cx).await,
            Step::Linger => linger::inspect(cx).await,
            Step::PodmanSocket => podman_socket::inspect(cx).await,
        }
    }

    /// Makes the node match the configuration; returns what was changed.
    pub async fn converge(self, cx: &Context) -> Result<Vec<String>> {
        let result = match self {
            Step::SubIds => subids::converge(cx).await,
            Step::UnprivilegedPorts => unprivileged_ports::converge(cx).await,
            Step::Linger => linger::converge(cx).await,
            Step::PodmanSocket => podman_socket::converge(cx).await,
        };
        if result.is_err() && self == Step::Linger {
            cx.system_bus.reset().await;
        }
        result
    }
}

/// Inspects the given steps concurrently, returning them in order.
pub async fn inspect_all(cx: &Context, steps: &[Step]) -> Vec<(Step, Inspection)> {
    let inspections = futures_util::future::join_all(steps.iter().map(|&s| async move {
        let started = std::time::Instant::now();
        let inspection = s.inspect(cx).await;
        tracing::debug!(
            step = s.name(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "inspected {} in {:?}",
            s.name(),
            started.elapsed()
        );
        inspection
    }))
    .await;
    steps.iter().copied().zip(inspections).collect()
}
