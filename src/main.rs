//! executor-agent: keeps a Fedora CoreOS node ready for rootless Podman CI jobs.

use clap::Parser;
use executor_agent::{cli::Cli, commands, journal};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    journal::init();
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
            tracing::error!("error: {chain}");
            if std::env::var_os("NOTIFY_SOCKET").is_some() {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&format!("failed: {chain}"))]);
            }
            ExitCode::FAILURE
        }
    }
}
