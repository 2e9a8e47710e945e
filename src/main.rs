//! executor-agent: keeps a Fedora CoreOS node ready for rootless Podman CI jobs.

use clap::Parser;
use executor_agent::cli::{Cli, Command};
use executor_agent::{commands, journal};
use std::process::ExitCode;

enum CommandKind {
    Daemon,
    OneShot,
}

fn main() -> ExitCode {
    // Inside a canary container: the payload only, before anything reads the node.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(executor_agent::canary::payload::ARG) {
        return ExitCode::from(executor_agent::canary::payload::main(&args[1..]) as u8);
    }
    let cli = Cli::parse();
    let command_kind =
        if matches!(cli.command, Command::Run) { CommandKind::Daemon } else { CommandKind::OneShot };
    journal::init();
    if matches!(command_kind, CommandKind::Daemon) {
        // The health port from executor-agent.socket: LISTEN_FDS is read and cleared while
        // this is the only thread.
        executor_agent::listen::adopt();
    }
    if let Err(e) = commands::check_privileges(&cli) {
        eprintln!("error: {e:#}");
        return ExitCode::from(2);
    }
    // Two worker threads are plenty: the work is waiting on D-Bus, files and sockets.
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime -> {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::main(cli)) {
        Ok(code) => code,
        Err(e) => {
            let chain = journal::chain(&e);
            if matches!(command_kind, CommandKind::Daemon) {
                tracing::error!("error: {chain}");
            } else {
                eprintln!("error: {chain}");
            }
            if std::env::var_os("NOTIFY_SOCKET").is_some() {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&format!("failed: {chain}"))]);
            }
            // EX_CONFIG: the unit's RestartPreventExitStatus keeps systemd from restarting
            // into the same bad configuration; the status line says what to fix.
            if e.chain().any(|cause| cause.is::<executor_agent::config::ConfigError>()) {
                ExitCode::from(78)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
