//! `cargo xtask fuzz [--seconds N] [--sanitizer S] [TARGET...]`: run the cargo-fuzz
//! (libFuzzer) targets in `fuzz/`, each for N seconds (default 10, the CI run).
//!
//! Only the stable toolchain is available, and cargo-fuzz passes `-Z` flags, so it runs with
//! `RUSTC_BOOTSTRAP=1`. The committed seeds in `fuzz/corpus/<target>/` are read; what
//! libFuzzer finds goes to `fuzz/target/corpus/<target>/` (kept between runs, not committed);
//! a crashing input goes to `fuzz/artifacts/<target>/` and fails the command.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::harness::host;

/// Pinned so that CI and developers fuzz with the same driver.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
const DEFAULT_SECONDS: u64 = 10;

struct Options {
    seconds: u64,
    /// `none` by default: the targets are safe Rust, and panics, overflow checks and debug
    /// assertions need no sanitizer; `address` instruments every dependency and is slower.
    sanitizer: String,
    targets: Vec<String>,
}

fn parse(args: &[&str]) -> Result<Options> {
    let mut opts = Options { seconds: DEFAULT_SECONDS, sanitizer: "none".into(), targets: Vec::new() };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match *arg {
            "--seconds" => {
                let value = args.next().context("--seconds needs a number")?;
                opts.seconds =
                    value.parse().with_context(|| format!("--seconds {value:?} is not a number"))?;
                if opts.seconds == 0 {
                    bail!("--seconds must be at least 1");
                }
            }
            "--sanitizer" => {
                opts.sanitizer =
                    args.next().context("--sanitizer needs none, address, leak or memory")?.to_string();
            }
            flag if flag.starts_with('-') => bail!("unknown option {flag}"),
            target => opts.targets.push(target.to_string()),
        }
    }
    Ok(opts)
}

/// The `cargo xtask fuzz` entry point; `args` are the words after `fuzz`.
pub fn cmd_fuzz(args: &[&str]) -> Result<()> {
    let opts = parse(args)?;
    ensure_cargo_fuzz()?;
    let fuzz_dir = host::repo_root().join("fuzz");
    let all = list_targets()?;
    let targets = if opts.targets.is_empty() { all.clone() } else { opts.targets.clone() };
    for t in &targets {
        if !all.contains(t) {
            bail!("no fuzz target {t:?}; the targets are {}", all.join(", "));
        }
    }

    eprintln!("==> cargo fuzz build (sanitizer {})", opts.sanitizer);
    let started = Instant::now();
    host::run(cargo_fuzz().args(["build", "--sanitizer", &opts.sanitizer]))
        .context("building the fuzz targets failed")?;
    eprintln!("    built in {:.0?}", started.elapsed());

    let mut results = Vec::new();
    for target in &targets {
        results.push(run_target(&fuzz_dir, target, &opts)?);
    }

    eprintln!();
    eprintln!(
        "{:<16} {:>8} {:>12} {:>10} {:>8}  result",
        "target", "seconds", "executions", "exec/s", "corpus"
    );
    for r in &results {
        eprintln!(
            "{:<16} {:>8} {:>12} {:>10} {:>8}  {}",
            r.target,
            r.seconds,
            r.executions.map_or("?".into(), |n| n.to_string()),
            r.executions.map_or("?".into(), |n| (n / r.seconds.max(1)).to_string()),
            r.corpus,
            match &r.crash {
                None => "ok".to_string(),
                Some(path) => format!(
                    "CRASH, reproduce with: RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer {} {} {}",
                    opts.sanitizer,
                    r.target,
                    path.display()
                ),
            }
        );
    }
    let crashed: Vec<&str> =
        results.iter().filter(|r| r.crash.is_some()).map(|r| r.target.as_str()).collect();
    if !crashed.is_empty() {
        bail!("fuzzing found a crash in {} (inputs under fuzz/artifacts/)", crashed.join(", "));
    }
    eprintln!("fuzz: {} targets, no crash", results.len());
    Ok(())
}

struct Outcome {
    target: String,
    seconds: u64,
    executions: Option<u64>,
    corpus: usize,
    crash: Option<PathBuf>,
}

fn run_target(fuzz_dir: &Path, target: &str, opts: &Options) -> Result<Outcome> {
    let seeds = fuzz_dir.join("corpus").join(target);
    let work = fuzz_dir.join("target/corpus").join(target);
    let artifacts = fuzz_dir.join("artifacts").join(target);
    for dir in [&seeds, &work, &artifacts] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let log_path = fuzz_dir.join("target").join(format!("{target}.log"));
    let log =
        std::fs::File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
    eprintln!("==> fuzzing {target} for {} s (log: {})", opts.seconds, log_path.display());
    // The first corpus directory is where libFuzzer writes what it finds; the seeds stay as
    // committed.
    let mut cmd = cargo_fuzz();
    cmd.args(["run", "--sanitizer", &opts.sanitizer, target])
        .arg(&work)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={}", opts.seconds))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let status = cmd.status().with_context(|| format!("cannot start `{}`", host::show(&cmd)))?;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let crash = text
        .lines()
        .filter_map(|l| l.split_once("Test unit written to ").map(|(_, p)| PathBuf::from(p.trim())))
        .next_back();
    if !status.success() && crash.is_none() {
        let tail: Vec<&str> = text.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
        bail!("fuzzing {target} failed ({status}) without a crash input:\n{}", tail.join("\n"));
    }
    if let Some(path) = &crash {
        eprintln!("    {target}: CRASH, input saved to {}", path.display());
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.contains("panicked at") {
                // The panic message is on the next line.
                eprintln!("    {line} {}", lines.get(i + 1).unwrap_or(&""));
            } else if line.contains("ERROR: libFuzzer") || line.contains("ERROR: AddressSanitizer") {
                eprintln!("    {line}");
            }
        }
    }
    let executions = text
        .lines()
        .filter_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .filter_map(|n| n.trim().parse().ok())
        .next_back();
    let corpus = std::fs::read_dir(&work).map(|d| d.count()).unwrap_or(0)
        + std::fs::read_dir(&seeds).map(|d| d.count()).unwrap_or(0);
    Ok(Outcome { target: target.to_string(), seconds: opts.seconds, executions, corpus, crash })
}

fn cargo_fuzz() -> Command {
    let mut cmd = host::cargo();
    cmd.arg("fuzz");
    // Our own target dir (fuzz/target): its builds are instrumented and must not mix with
    // the workspace's, whatever CARGO_TARGET_DIR says.
    cmd.env("RUSTC_BOOTSTRAP", "1").env_remove("CARGO_TARGET_DIR");
    cmd
}

fn list_targets() -> Result<Vec<String>> {
    let out = host::capture(cargo_fuzz().arg("list"))?;
    if !out.status.success() {
        bail!("`cargo fuzz list` failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// Installs cargo-fuzz from crates.io when `cargo fuzz` is not there (or another version).
fn ensure_cargo_fuzz() -> Result<()> {
    let out = host::cargo().args(["fuzz", "--version"]).stdin(Stdio::null()).output();
    if let Ok(out) = &out {
        if out.status.success() && String::from_utf8_lossy(&out.stdout).contains(CARGO_FUZZ_VERSION) {
            return Ok(());
        }
    }
    eprintln!("==> cargo install cargo-fuzz {CARGO_FUZZ_VERSION}");
    host::run(host::cargo().args(["install", "--locked", "cargo-fuzz", "--version", CARGO_FUZZ_VERSION]))
        .context("installing cargo-fuzz failed")
}
