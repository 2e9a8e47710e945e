//! Logging: the journal (with structured fields and MESSAGE_IDs) under systemd, stderr otherwise.
//!
//! Operators find the agent's events with `journalctl MESSAGE_ID=<id>`; the IDs never change.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

pub use crate::message_ids::*;

/// True when stderr is connected to the journal (systemd sets JOURNAL_STREAM to its dev:inode).
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stat) = nix::sys::stat::fstat(std::io::stderr().as_fd()) else {
        return false;
    };
    stream == format!("{}:{}", stat.st_dev, stat.st_ino)
}

/// Sets up logging; `RUST_LOG` overrides the default level (info).
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if stderr_is_journal() {
        if let Ok(layer) = tracing_journald::layer() {
            // Fields such as message_id become MESSAGE_ID, not F_MESSAGE_ID.
            let layer = layer.with_field_prefix(None).with_syslog_identifier("executor-agent".into());
            tracing_subscriber::registry().with(filter).with(layer).init();
            return;
        }
    }
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .init();
}

/// The longest error chain the agent logs or prints (causes may quote what the runner user
/// controls: Podman's messages, its files' names).
const MAX_CHAIN_CHARS: usize = 2000;

/// `outer -> cause -> root cause`, the one-line chain zincati logs after `error: `; one
/// bounded line whatever the causes hold.
pub fn chain(error: &anyhow::Error) -> String {
    crate::text::one_line(&join_causes(error, " -> "), MAX_CHAIN_CHARS)
}

/// `outer: cause: root cause`, for a check's detail; one bounded line.
pub fn detail(error: &anyhow::Error) -> String {
    crate::text::one_line(&join_causes(error, ": "), MAX_CHAIN_CHARS)
}

/// Joins an error's causes, skipping a cause whose text the previous one already ends with
/// (zbus and std I/O errors often repeat their source in their own message).
fn join_causes(error: &anyhow::Error, separator: &str) -> String {
    let mut text = String::new();
    let mut previous = String::new();
    for cause in error.chain() {
        let part = cause.to_string();
        if !previous.is_empty() && previous.ends_with(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(separator);
        }
        text.push_str(&part);
        previous = part;
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_causes_are_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        let e = anyhow::Error::new(io)
            .context("connecting to /run/user/1000/bus: Connection refused")
            .context("status");
        assert_eq!(chain(&e), "status -> connecting to /run/user/1000/bus: Connection refused");
        assert_eq!(detail(&anyhow::anyhow!("plain")), "plain");
    }
}
