//! The system's interfaces: systemd and the runner's user manager over D-Bus, the runner
//! account, the one HTTP client and the Podman API on it, the journal and its MESSAGE_IDs,
//! Afterburn's identity, the drain record, and what runs on the node.

pub mod drain;
pub mod eviction;
pub mod http_client;
pub mod identity;
pub mod jobs;
pub mod journal;
pub mod message_ids;
pub mod podman_api;
pub mod runner_user;
pub mod state_file;
pub mod systemd;
pub mod user_manager;
