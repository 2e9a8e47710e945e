//! What each CLI command does.

use anyhow::{bail, Context as _, Result};
use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use crate::checks::Check;
use crate::cli::{Cli, Command};
use crate::config::{self, Settings};
use crate::control;
use crate::daemon;
use crate::http_client;
use crate::journal;
use crate::paths::Root;
use crate::runner_user::Account;
use crate::steps::{self, Context, Step};

pub async fn main(cli: Cli) -> Result<ExitCode> {
    let root = cli.root.clone().map(Root::new).unwrap_or_else(Root::host);
    let config_file = cli.config.clone();
    let load = |root: &Root| {
        config::load(root, config_file.as_deref(), &crate::steps::check_names())
            .context("invalid configuration, refusing to start")
    };
    match cli.command {
        Command::UserManager(command) => {
            crate::user_manager::helper_main(command).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Drain { reason, wait, timeout } => {
            let settings = load(&root)?;
            let body = serde_json::json!({ "reason": reason });
            let answer =
                control::client(&settings.control.socket, http_client::Method::POST, "/drain", Some(body))
                    .await?;
            let d = &answer["drain"];
            println!(
                "drained since {}: {}",
                d["since"].as_str().unwrap_or("?"),
                d["reason"].as_str().unwrap_or("?")
            );
            if !wait {
                return Ok(ExitCode::SUCCESS);
            }
            wait_for_no_job(&settings.control.socket, timeout.into()).await
        }
        Command::Undrain => {
            let settings = load(&root)?;
            let answer =
                control::client(&settings.control.socket, http_client::Method::POST, "/undrain", None)
                    .await?;
            match answer["ended"]["reason"].as_str() {
                Some(reason) => println!("undrained (was: {reason})"),
                None => println!("was not drained"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Config => {
            print!("{}", load(&root)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::WaitReady { timeout, address } => {
            let settings = load(&root)?;
            wait_ready(&settings, address, timeout.into()).await
        }
        Command::Run => {
            let cx = context(root.clone(), load(&root)?)?;
            tracing::info!(
                message_id = journal::AGENT_LIFECYCLE,
                user = cx.user.name.as_str(),
                listen = %cx.settings.http.listen,
                "executor-agent {} starting for user {} (uid {})",
                env!("CARGO_PKG_VERSION"),
                cx.user.name,
                cx.user.uid
            );
            daemon::run(cx).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Apply => {
            let cx = context(root.clone(), load(&root)?)?;
            let steps = Step::for_context(&cx);
            let seen = steps::inspect_all(&cx, &steps).await;
            let pass = crate::pass::repair_pass(&cx, &steps, seen, &mut HashMap::new()).await;
            for (step, change) in &pass.changes {
                println!(
                    "changed ({}): {}",
                    step.name(),
                    crate::text::one_line(change, crate::checks::MAX_DETAIL_CHARS)
                );
            }
            for (step, error) in &pass.errors {
                eprintln!("error: {} -> {}", step.name(), journal::chain(error));
            }
            let mut set = daemon::pending_checks(&cx, &steps);
            set.record(crate::pass::observations(&pass), SystemTime::now());
            print_table(set.checks());
            println!("{}", set.status_line());
            Ok(exit(set.ready()))
        }
        Command::Check { json } => {
            let cx = context(root.clone(), load(&root)?)?;
            let steps = Step::for_context(&cx);
            let inspections = steps::inspect_all(&cx, &steps).await;
            let mut set = daemon::pending_checks(&cx, &steps);
            set.record(
                inspections.iter().flat_map(|(_, i)| i.observations.clone()).collect(),
                SystemTime::now(),
            );
            let plan: Vec<&String> = inspections.iter().flat_map(|(_, i)| &i.plan).collect();
            let jobs = current_jobs(&cx).await;
            if json {
                let doc = serde_json::json!({
                    "ready": set.ready(), "status": set.status_line(), "checks": set.checks(), "would_change": plan,
                    "jobs": jobs.as_ref().ok(),
                });
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                print_table(set.checks());
                for change in &plan {
                    println!("would change: {change}");
                }
                match &jobs {
                    Ok(jobs) => println!("jobs: {}", jobs.describe()),
                    Err(why) => println!("jobs: unknown ({why})"),
                }
                println!("{}", set.status_line());
            }
            Ok(exit(set.ready()))
        }
    }
}

/// What runs on the node, for `check`; why not known otherwise (`--root`, no API).
async fn current_jobs(cx: &Context) -> Result<crate::jobs::Jobs, String> {
    let api = daemon::jobs_api(cx).ok_or("not asked with --root")?;
    crate::jobs::running(&api).await.map_err(|e| journal::detail(&e))
}

fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn context(root: Root, settings: Settings) -> Result<Context> {
    let user = Account::lookup(&root, &settings.runner.user).map_err(|e| {
        config::ConfigError::NotOnThisNode { key: "runner.user".into(), message: journal::detail(&e) }
    })?;
    Ok(Context::new(root, settings, user))
}

fn print_table(checks: &[Check]) {
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(5).max(5);
    println!("{:width$}  {:4}  DETAIL", "CHECK", "OK");
    for c in checks {
        println!("{:width$}  {:4}  {}", c.name, if c.ok { "yes" } else { "NO" }, c.detail);
    }
}

/// The address `wait-ready` asks: the configured one, with a wildcard made local.
fn local_address(settings: &Settings) -> String {
    let mut addr = settings.http.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            [127, 0, 0, 1].into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    addr.to_string()
}

async fn wait_ready(settings: &Settings, address: Option<String>, timeout: Duration) -> Result<ExitCode> {
    let address = address.unwrap_or_else(|| local_address(settings));
    let deadline = Instant::now() + timeout;
    let mut last_problem;
    loop {
        let attempt = async {
            let stream = tokio::net::TcpStream::connect(&address).await?;
            http_client::get(stream, &address, "/readyz").await
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok((200, body))) => {
                let doc: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                println!("{}", doc["status"].as_str().unwrap_or("ready"));
                return Ok(ExitCode::SUCCESS);
            }
            Ok(Ok((code, body))) => {
                let doc: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let failing: Vec<String> = doc["checks"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|c| c["ok"] == false)
                    .map(|c| {
                        format!(
                            "  {}: {}",
                            c["name"].as_str().unwrap_or("?"),
                            c["detail"].as_str().unwrap_or("")
                        )
                    })
                    .collect();
                last_problem = format!(
                    "{} (HTTP {code})\n{}",
                    doc["status"].as_str().unwrap_or("not ready"),
                    failing.join("\n")
                );
            }
            Ok(Err(e)) => {
                last_problem =
                    format!("executor-agent is not answering on {address}: {}", journal::detail(&e))
            }
            Err(_) => last_problem = format!("executor-agent on {address} did not answer within 2s"),
        }
        if Instant::now() >= deadline {
            eprintln!("not ready after {}: {}", humantime::format_duration(timeout), last_problem.trim_end());
            return Ok(ExitCode::FAILURE);
        }
        tokio::time::sleep(
            Duration::from_millis(250).min(deadline.saturating_duration_since(Instant::now())),
        )
        .await;
    }
}

/// `drain --wait`: asks the agent what runs every 2 s until nothing does (exit 0) or the
/// timeout, when it names what still runs (exit 1). An agent that cannot tell is not an idle
/// node: containers outlive their API service.
async fn wait_for_no_job(socket: &std::path::Path, timeout: Duration) -> Result<ExitCode> {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut last = String::new();
    loop {
        let seen = match control::client(socket, http_client::Method::GET, "/jobs", None).await {
            Ok(answer) if answer["running"] == false => {
                println!("no job runs (waited {})", humantime::format_duration(seconds(started.elapsed())));
                return Ok(ExitCode::SUCCESS);
            }
            Ok(answer) => answer["summary"].as_str().unwrap_or("jobs run").to_string(),
            Err(e) => format!("unknown: {}", journal::detail(&e)),
        };
        if seen != last {
            println!("waiting: {seen}");
            last = seen;
        }
        if Instant::now() >= deadline {
            eprintln!("still running after {}: {last}", humantime::format_duration(timeout));
            return Ok(ExitCode::FAILURE);
        }
        tokio::time::sleep(Duration::from_secs(2).min(deadline.saturating_duration_since(Instant::now())))
            .await;
    }
}

/// Whole seconds, for messages.
fn seconds(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

/// Errors for unusable arguments that clap cannot see.
pub fn check_privileges(cli: &Cli) -> Result<()> {
    let needs_root = matches!(cli.command, Command::Run | Command::Apply) && cli.root.is_none();
    if needs_root && !nix::unistd::geteuid().is_root() {
        bail!("this command changes the node and must run as root (or with --root DIR on a tree you own)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_listen_becomes_loopback() {
        let mut s = Settings::default();
        assert_eq!(local_address(&s), "127.0.0.1:9739");
        s.http.listen = "[::]:80".parse().unwrap();
        assert_eq!(local_address(&s), "[::1]:80");
        s.http.listen = "10.0.0.5:9739".parse().unwrap();
        assert_eq!(local_address(&s), "10.0.0.5:9739");
    }
}
