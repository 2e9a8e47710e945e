//! executor-agent: the root service that turns a Fedora CoreOS node into one ready for
//! rootless Podman CI jobs, keeps it that way, and says so.
//!
//! The folders are the layers, bottom up (docs/architecture.md): `base`, `formats`, `system`,
//! `steps` (with the job `canary`), `engine`, `doors`; the drivers (`daemon`, `commands`,
//! `cli`) sit on top.

pub mod base;
pub mod canary;
pub mod cli;
pub mod commands;
pub mod daemon;
pub mod doors;
pub mod engine;
pub mod formats;
pub mod steps;
pub mod system;

// Every module is also reachable by its short name (`crate::config`, `executor_agent::http`).
pub use base::{fsutil, paths, text, userfs};
pub use doors::{control, fleet_lock, http, listen, serve, spot, watch};
pub use engine::{checks, metrics, pass};
pub use formats::{config, idmap, podman_conf, subid};
pub use system::{
    drain, http_client, identity, jobs, journal, message_ids, podman_api, runner_user, systemd, user_manager,
};
