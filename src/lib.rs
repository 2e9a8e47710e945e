//! executor-agent: the root service that turns a Fedora CoreOS node into one ready for
//! rootless Podman CI jobs, keeps it that way, and says so.

pub mod canary;
pub mod checks;
pub mod cli;
pub mod commands;
pub mod config;
pub mod control;
pub mod daemon;
pub mod drain;
pub mod fleet_lock;
pub mod fsutil;
pub mod http;
pub mod http_client;
pub mod identity;
pub mod idmap;
pub mod jobs;
pub mod journal;
pub mod listen;
pub mod message_ids;
pub mod metrics;
pub mod pass;
pub mod paths;
pub mod podman_api;
pub mod podman_conf;
pub mod runner_user;
pub mod serve;
pub mod spot;
pub mod steps;
pub mod subid;
pub mod systemd;
pub mod text;
pub mod user_manager;
pub mod userfs;
pub mod watch;
