//! Command-line interface.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "executor-agent",
    version,
    about = "Keeps a Fedora CoreOS node ready for rootless Podman CI jobs"
)]
pub struct Cli {
    /// Work on the node tree under DIR (subuid, subgid, login.defs, sysctl.d, config) instead
    /// of /, as `useradd --root` does; steps that need the running system are skipped.
    #[arg(long, global = true, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Main configuration file [default: /etc/executor-agent/config.toml]; drop-ins still apply.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: converge, then keep the node converged and report its health.
    Run,
    /// Converge once; exit 0 only when the node is ready.
    Apply,
    /// Print every check and what would change; exit 0 only when the node is ready.
    Check {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Wait until the local agent reports ready (GitLab Runner's instance_ready_command).
    WaitReady {
        /// Give up after this long, e.g. 90s or 5m; then print the failing checks and exit 1.
        #[arg(long, default_value = "5m")]
        timeout: humantime::Duration,
        /// The agent's address [default: from http.listen, 0.0.0.0 becomes 127.0.0.1].
        #[arg(long, value_name = "HOST:PORT")]
        address: Option<String>,
    },
    /// Print the effective configuration (defaults merged with every file).
    Config,
    /// Mark the node not ready with a reason (before scale-in or an update); survives restarts.
    Drain {
        /// Shown in every output, e.g. "scale-in" or "kernel update".
        #[arg(long)]
        reason: String,
        /// Then wait until no job runs (exit 0), for an ASG lifecycle hook or a shutdown script.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long, naming the jobs still running (exit 1).
        #[arg(long, default_value = "1h", requires = "wait")]
        timeout: humantime::Duration,
    },
    /// End a drain.
    Undrain,
    /// Internal: talk to the runner user's systemd manager, run as that user by the agent.
    #[command(subcommand, hide = true)]
    UserManager(UserManagerCommand),
}

#[derive(Debug, Subcommand)]
pub enum UserManagerCommand {
    /// Print a unit's state as JSON.
    Status { unit: String },
    /// Enable and start a socket unit; with --restart, restart it and its service.
    Ensure {
        unit: String,
        #[arg(long)]
        restart: bool,
        #[arg(long, default_value = "30s")]
        timeout: humantime::Duration,
    },
    /// Print the units' states as JSON lines whenever they change.
    Watch { units: Vec<String> },
    /// Remove a rootless network namespace whose holder (slirp4netns, pasta) is dead.
    ResetRootlessNetns,
    /// Run `podman system migrate` as a transient service of the user's manager.
    Migrate {
        #[arg(long, default_value = "2m")]
        timeout: humantime::Duration,
    },
}
