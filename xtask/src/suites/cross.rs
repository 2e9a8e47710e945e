//! Other architectures: the aarch64 (ARM64/Graviton) release build with Debian's cross linker,
//! and `cargo xtask cross-test`, which runs the agent's unit tests and the release binary
//! under qemu-user (binfmt_misc is not mounted here, so cargo gets an explicit runner).

use crate::harness::host;
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The build machine's own target.
pub const X86_64: &str = "x86_64-unknown-linux-gnu";
/// ARM64 (Graviton) nodes. glibc, like x86_64: the job canary copies the agent's binary with
/// the shared libraries it has mapped and runs them through the dynamic loader.
pub const AARCH64: &str = "aarch64-unknown-linux-gnu";

/// Debian packages for the aarch64 build and its tests: the linker named in .cargo/config.toml,
/// the aarch64 glibc to link against (and to run with, under /usr/aarch64-linux-gnu), qemu-user.
pub const HOST_PACKAGES: &[&str] = &["gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross", "qemu-user-static"];

/// qemu-user for aarch64 (Debian's qemu-user-static).
const QEMU: &str = "/usr/bin/qemu-aarch64-static";
/// The aarch64 glibc and loader from libc6-arm64-cross: qemu's `-L` prefix.
const SYSROOT: &str = "/usr/aarch64-linux-gnu";

/// Lib tests that cannot pass under qemu-user, each with the reason; passed to libtest as
/// `--skip NAME --exact`, so every other test runs and a renamed one fails loudly here.
const EXCLUDED: &[(&str, &str)] = &[];

/// The ELF `e_machine` of each target, to prove a build produced what it claims.
fn elf_machine(target: &str) -> Option<u16> {
    match target {
        X86_64 => Some(0x3e),
        AARCH64 => Some(0xb7),
        _ => None,
    }
}

/// Checks that `data` is a 64-bit little-endian ELF executable for `target`.
pub fn check_elf(data: &[u8], target: &str) -> Result<()> {
    let want = elf_machine(target).with_context(|| format!("no ELF machine known for {target}"))?;
    if data.len() < 20 || &data[..4] != b"\x7fELF" || data[4] != 2 || data[5] != 1 {
        bail!("not a 64-bit little-endian ELF file");
    }
    let machine = u16::from_le_bytes([data[18], data[19]]);
    if machine != want {
        bail!("ELF machine {machine:#x}, not {want:#x} ({target})");
    }
    Ok(())
}

/// Installs what a build for `target` needs: nothing for the host's own, else the Debian
/// packages and the Rust standard library for the target (`rustup target add`).
pub fn ensure_toolchain(target: &str) -> Result<()> {
    if target == X86_64 {
        return Ok(());
    }
    host::ensure_packages(HOST_PACKAGES)?;
    let installed =
        host::capture(host::cmd("rustup", ["target", "list", "--installed"]).current_dir(host::repo_root()))
            .context("rustup is needed to add the aarch64 standard library")?;
    if !installed.status.success() {
        bail!("`rustup target list --installed` failed: {}", String::from_utf8_lossy(&installed.stderr));
    }
    if !String::from_utf8_lossy(&installed.stdout).lines().any(|l| l.trim() == target) {
        eprintln!("==> rustup target add {target}");
        host::run(host::cmd("rustup", ["target", "add", target]).current_dir(host::repo_root()))?;
    }
    Ok(())
}

/// Builds the agent (release) for `target` and returns the binary's path, checked to be an
/// executable for that target. The host's own target is the plain `cargo build --release`
/// (target/release, shared with the node commands); others go to target/<triple>/release.
pub fn build_release(target: &str) -> Result<PathBuf> {
    build_release_logged(target, &Log::Console)
}

fn build_release_logged(target: &str, log: &Log) -> Result<PathBuf> {
    ensure_toolchain(target)?;
    let bin = if target == X86_64 {
        if std::env::consts::ARCH != "x86_64" {
            bail!("the x86_64 binary is built natively; this host is {}", std::env::consts::ARCH);
        }
        host::build_agent()?
    } else {
        log.say(&format!("==> building executor-agent (release, {target})"));
        let mut cmd = host::cargo();
        cmd.args(["build", "--release", "-p", "executor-agent", "--target", target]);
        log.attach(&mut cmd, false)?;
        host::run(cmd).with_context(|| format!("building the agent for {target} failed"))?;
        host::target_dir().join(target).join("release/executor-agent")
    };
    let data = host::read(&bin)?;
    check_elf(&data, target).with_context(|| format!("{} is not a {target} binary", bin.display()))?;
    Ok(bin)
}

/// The unit tests' runner: qemu-user without `-L`. With `-L`, qemu serves every absolute
/// path that also exists below the prefix from there, `/` included: the tests that walk from
/// `/` one `openat` at a time (src/base/userfs.rs) would then walk /usr/aarch64-linux-gnu and find
/// nothing. The test binaries name the sysroot's loader and libraries themselves instead
/// ([`test_rustflags`]).
fn runner() -> String {
    QEMU.to_string()
}

/// Link flags for the unit-test binaries only: the aarch64 loader and glibc of the sysroot by
/// absolute path, so that they run under a plain qemu-user. The release binary keeps the
/// standard `/lib/ld-linux-aarch64.so.1` of a real node.
fn test_rustflags() -> String {
    format!(
        "-C link-arg=-Wl,--dynamic-linker={SYSROOT}/lib/ld-linux-aarch64.so.1 -C link-arg=-Wl,-rpath={SYSROOT}/lib"
    )
}

fn qemu(binary: &Path) -> Command {
    let mut cmd = Command::new(QEMU);
    cmd.args(["-L", SYSROOT]).arg(binary).current_dir(host::repo_root());
    cmd
}

/// Where `cross-test` writes: the terminal, or a file (when it runs beside other work in
/// `cargo xtask test`, so that the two outputs do not interleave).
enum Log {
    Console,
    File(File),
}

impl Log {
    fn say(&self, line: &str) {
        match self {
            Log::Console => eprintln!("{line}"),
            Log::File(f) => {
                let mut f: &File = f;
                let _ = writeln!(f, "{line}");
            }
        }
    }

    /// Points a command's stderr (and stdout unless `piped_stdout`) at the log.
    fn attach(&self, cmd: &mut Command, piped_stdout: bool) -> Result<()> {
        if let Log::File(f) = self {
            cmd.stderr(f.try_clone()?);
            if !piped_stdout {
                cmd.stdout(f.try_clone()?);
            }
        }
        if piped_stdout {
            cmd.stdout(Stdio::piped());
        }
        Ok(())
    }
}

/// What `cross-test` ran.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub passed: usize,
    pub failed: usize,
    pub ignored: usize,
    pub excluded: usize,
}

/// Sums libtest's `test result: ok. 3 passed; 0 failed; 1 ignored; ...` lines.
fn add_result_line(line: &str, sum: &mut Summary) -> bool {
    let Some(rest) = line.strip_prefix("test result: ") else {
        return false;
    };
    for part in rest.split(';') {
        let mut words = part.split_whitespace().rev();
        let (Some(what), Some(n)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<usize>() else {
            continue;
        };
        match what {
            "passed" => sum.passed += n,
            "failed" => sum.failed += n,
            "ignored" => sum.ignored += n,
            _ => {}
        }
    }
    true
}

/// `cargo xtask cross-test`: the aarch64 release build, the root crate's unit tests built for
/// aarch64 and run under qemu-user, and the release binary's `--version` and `config` under
/// qemu-user. One cargo invocation for the tests; prints the time of each part.
/// With `log`, everything goes to that file and only the closing summary line to stderr.
pub fn run(log: Option<&Path>) -> Result<Summary> {
    let log = match log {
        Some(path) => {
            Log::File(File::create(path).with_context(|| format!("cannot create {}", path.display()))?)
        }
        None => Log::Console,
    };
    let start = Instant::now();
    ensure_toolchain(AARCH64)?;
    let t = Instant::now();
    let bin = build_release_logged(AARCH64, &log)?;
    let build_secs = t.elapsed().as_secs_f64();

    log.say(&format!("==> smoke test under qemu-user: {} --version, config", bin.display()));
    let version = host::capture(qemu(&bin).arg("--version"))?;
    let want = format!("executor-agent {}", env!("CARGO_PKG_VERSION"));
    if !version.status.success() || String::from_utf8_lossy(&version.stdout).trim() != want {
        bail!(
            "the aarch64 `executor-agent --version` under qemu-user said {:?} ({}), not {want:?}: {}",
            String::from_utf8_lossy(&version.stdout),
            version.status,
            String::from_utf8_lossy(&version.stderr)
        );
    }
    // The shipped configuration (ignition/config.toml, what the Ignition config installs).
    let config = host::capture(
        qemu(&bin).arg("--config").arg(crate::render::ignition::config_toml_path()).arg("config"),
    )?;
    let printed = String::from_utf8_lossy(&config.stdout);
    if !config.status.success() || !printed.contains("user = \"core\"") {
        bail!(
            "the aarch64 `executor-agent config` under qemu-user failed ({}):\n{printed}{}",
            config.status,
            String::from_utf8_lossy(&config.stderr)
        );
    }
    log.say(&format!("ok: {want} under qemu-user prints the shipped configuration"));

    let t = Instant::now();
    let mut args: Vec<String> = ["test", "-p", "executor-agent", "--lib", "--target", AARCH64]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if !EXCLUDED.is_empty() {
        args.push("--".into());
        for (name, _) in EXCLUDED {
            args.extend(["--skip".into(), name.to_string()]);
        }
        args.push("--exact".into());
    }
    log.say(&format!("==> cargo {} (runner: {}, rustflags: {})", args.join(" "), runner(), test_rustflags()));
    for (name, why) in EXCLUDED {
        log.say(&format!("    excluded under qemu-user: {name}: {why}"));
    }
    let mut cmd = host::cargo();
    let target_env = AARCH64.to_uppercase().replace('-', "_");
    cmd.args(&args)
        .env(format!("CARGO_TARGET_{target_env}_RUNNER"), runner())
        .env(format!("CARGO_TARGET_{target_env}_RUSTFLAGS"), test_rustflags());
    log.attach(&mut cmd, true)?;
    let mut child = cmd.spawn().with_context(|| format!("cannot start `{}`", host::show(&cmd)))?;
    let mut sum = Summary { excluded: EXCLUDED.len(), ..Summary::default() };
    let mut results = 0;
    for line in BufReader::new(child.stdout.take().expect("stdout is piped")).lines() {
        let line = line.context("reading cargo test's output")?;
        match &log {
            Log::Console => println!("{line}"),
            Log::File(_) => log.say(&line),
        }
        if add_result_line(&line, &mut sum) {
            results += 1;
        }
    }
    let status = child.wait()?;
    let test_secs = t.elapsed().as_secs_f64();
    let summary = format!(
        "cross-test (aarch64 under qemu-user): {} passed, {} failed, {} ignored, {} excluded; \
         release build {build_secs:.0} s, unit tests (build and run) {test_secs:.0} s, {:.0} s in all",
        sum.passed,
        sum.failed,
        sum.ignored,
        sum.excluded,
        start.elapsed().as_secs_f64()
    );
    log.say(&summary);
    if let Log::File(_) = log {
        eprintln!("{summary}");
    }
    if !status.success() || results == 0 || sum.failed > 0 {
        bail!("the aarch64 unit tests under qemu-user failed (`{}`: {status})", host::show(&cmd));
    }
    Ok(sum)
}

/// `cargo xtask cross-test`.
pub fn cmd_cross_test() -> Result<()> {
    run(None).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_libtest_result_lines() {
        let mut sum = Summary::default();
        assert!(add_result_line(
            "test result: ok. 412 passed; 0 failed; 3 ignored; 0 measured; 0 filtered out; finished in 9.01s",
            &mut sum
        ));
        assert!(add_result_line(
            "test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 5 filtered out",
            &mut sum
        ));
        assert!(!add_result_line("test a::b ... ok", &mut sum));
        assert_eq!(sum, Summary { passed: 413, failed: 2, ignored: 3, excluded: 0 });
    }

    #[test]
    fn elf_machine_is_checked() {
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[18] = 0xb7;
        assert!(check_elf(&elf, AARCH64).is_ok());
        assert!(check_elf(&elf, X86_64).is_err());
        elf[18] = 0x3e;
        assert!(check_elf(&elf, X86_64).is_ok());
        assert!(check_elf(b"#!/bin/sh\n", X86_64).is_err());
    }

    #[test]
    fn exclusions_say_why() {
        for (name, why) in EXCLUDED {
            assert!(name.contains("::") && why.len() > 20, "{name}: give the full test path and the reason");
        }
    }
}
