//! The build machine: root check, Debian packages via apt-get, running commands, building the agent.

use anyhow::{bail, Context, Result};
use std::borrow::BorrowMut;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The repository root (the parent of `xtask/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask/ has a parent directory").to_path_buf()
}

/// Cargo's target directory for this workspace: `$CARGO_TARGET_DIR` or `<repo>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                repo_root().join(dir)
            }
        }
        _ => repo_root().join("target"),
    }
}

/// The cargo that runs this xtask (cargo sets `$CARGO`), else `cargo` from PATH.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(repo_root());
    cmd
}

/// Fails unless this process runs as root (debootstrap, nspawn and Ignition need it).
pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("`{what}` needs root (debootstrap, systemd-nspawn and Ignition write a root file system); run it as root");
    }
    Ok(())
}

/// A command line as a shell would show it, for messages.
pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        let arg = arg.to_string_lossy();
        if arg.is_empty() || arg.contains(|c: char| c.is_whitespace() || "'\"$\\;&|<>()*?".contains(c)) {
            s.push('\'');
            s.push_str(&arg.replace('\'', "'\\''"));
            s.push('\'');
        } else {
            s.push_str(&arg);
        }
    }
    s
}

/// Runs a command with inherited stdio; fails on a non-zero exit.
pub fn run(mut cmd: impl BorrowMut<Command>) -> Result<()> {
    let cmd = cmd.borrow_mut();
    let status = cmd.status().with_context(|| format!("cannot start `{}`", show(cmd)))?;
    if !status.success() {
        bail!("`{}` failed: {status}", show(cmd));
    }
    Ok(())
}

/// Runs a command with stdin closed and captures stdout and stderr, whatever the exit status.
pub fn capture(mut cmd: impl BorrowMut<Command>) -> Result<Output> {
    let cmd = cmd.borrow_mut();
    cmd.stdin(Stdio::null()).output().with_context(|| format!("cannot start `{}`", show(cmd)))
}

/// True when a Debian package is installed.
fn installed(package: &str) -> Result<bool> {
    let out = capture(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))?;
    Ok(out.status.success() && String::from_utf8_lossy(&out.stdout).ends_with("install ok installed"))
}

/// Installs the Debian packages that are missing (`apt-get update` first, only when one is missing).
pub fn ensure_packages(packages: &[&str]) -> Result<()> {
    let mut missing = Vec::new();
    for package in packages {
        if !installed(package).with_context(|| format!("cannot ask dpkg whether {package} is installed"))? {
            missing.push(*package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    require_root("apt-get install")?;
    eprintln!("==> installing host packages: {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-q"]).env("DEBIAN_FRONTEND", "noninteractive"))
        .context("apt-get update failed")?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| format!("cannot install {}", missing.join(" ")))
}

/// What the unit and integration tests need on the host: a private bus for the D-Bus
/// doubles, shadow's useradd for the lock races, systemd-analyze for the unit's exposure.
pub const TEST_HOST_PACKAGES: &[&str] = &["dbus-daemon", "passwd", "systemd"];

/// Runs a command appending its output to `log`; on failure the error quotes the log's tail.
pub fn run_logged(cmd: &mut Command, log: &Path) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .with_context(|| format!("cannot start `{}`", show(cmd)))?;
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        bail!(
            "`{}` failed ({status}); {}:\n{}",
            show(cmd),
            log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(())
}

/// The ssh client options of a non-interactive session to a throwaway node: no prompt, no
/// host key kept, only errors printed. Callers add their key, port and timeouts.
pub const BATCH_SSH_OPTIONS: &[&str] = &[
    "-o",
    "BatchMode=yes",
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "LogLevel=ERROR",
];

/// The packages every node command needs on the host.
pub const NODE_HOST_PACKAGES: &[&str] = &[
    "debootstrap",
    "systemd-container",
    "ignition",
    "util-linux",
    "tar",
    "gzip",
    "ca-certificates",
    "libcap2-bin",
];

/// The real Ignition binary shipped by Debian's `ignition` package (the initramfs one).
pub const IGNITION_BIN: &str = "/usr/lib/dracut/modules.d/30ignition/ignition";

/// `ignition-validate` from Debian's `ignition` package.
pub const IGNITION_VALIDATE: &str = "/usr/bin/ignition-validate";

/// Builds the agent (release) and returns the binary's path.
pub fn build_agent() -> Result<PathBuf> {
    eprintln!("==> building executor-agent (release)");
    run(cargo().args(["build", "--release", "-p", "executor-agent"])).context("building the agent failed")?;
    let bin = target_dir().join("release/executor-agent");
    if !bin.is_file() {
        bail!("cargo built the agent but {} does not exist", bin.display());
    }
    Ok(bin)
}

/// Reads a file with the path in the error.
pub fn read(path: impl AsRef<Path>) -> Result<Vec<u8>> {
    let path = path.as_ref();
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Reads a UTF-8 file with the path in the error.
pub fn read_string(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Writes a file (creating its parent directory) with the path in the error.
pub fn write(path: impl AsRef<Path>, contents: impl AsRef<[u8]>) -> Result<()> {
    let path = path.as_ref();
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::write(path, contents).with_context(|| format!("cannot write {}", path.display()))
}

/// `Command::new` for a program with arguments.
pub fn cmd<S: AsRef<OsStr>>(program: &str, args: impl IntoIterator<Item = S>) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}
