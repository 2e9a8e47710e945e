//! `cargo xtask bench`: time to ready, probe cost, time to detect and repair drift and
//! footprint of the agent on local nspawn nodes, each figure against a baseline measured in the
//! same invocation; one table on stdout and in docs/performance.md.
//!
//! Phases (each node is a fresh copy of the pristine tree provisioned by the Ignition config):
//! 1. `--boots` rounds of three cold nodes: the agent, the Terraform scenario's shell units, the
//!    lean shell units (the agent taken out of the baselines' copies);
//! 2. one agent node: wrk on `/readyz` and `/status` and on the baseline axum server (same netns);
//! 3. the same node: `--faults` rounds of four faults, a 10 ms prober and the agent's journal;
//! 4. the same node idle, then under a paced 5 req/s, while a lean node without the agent runs
//!    the poll-only shell baseline (10 s interval) through the faults.

mod canary;
mod drift;
mod load;
mod procfs;
mod ready;

use crate::harness::host;
use crate::harness::node::{self, Node, AGENT_PORT};
use anyhow::{bail, Context, Result};
use drift::Fault;
use ready::{Boot, Variant};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub type Json = serde_json::Value;

/// systemd's "unit started" (catalog), used for podman.service activations in core's manager.
const UNIT_STARTED: &str = "39f53479d3a045ac8e11786248231fbf";

/// Beside the agent's 9739 and its FleetLock listener on 9740.
const BASELINE_PORT: u16 = 9741;
const DOCS: &str = "docs/performance.md";
const BEGIN: &str = "<!-- cargo xtask bench: generated from here -->";
const END: &str = "<!-- cargo xtask bench: generated up to here -->";

/// Settings from the command line.
#[derive(Clone, Debug)]
struct Opts {
    boots: usize,
    faults: usize,
    wrk_secs: u32,
    window_secs: u64,
    poller_reps: usize,
    write_docs: bool,
    verbose: bool,
    /// RUST_LOG for the agent (timeline analysis; the figures are then not comparable).
    agent_log: Option<String>,
    /// Only phase 1, with the agent's full journal timeline of every boot.
    ready_only: bool,
    /// With --ready-only: leave the last agent node running (removed by the next bench).
    keep: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            boots: 5,
            faults: 10,
            wrk_secs: 12,
            window_secs: 60,
            poller_reps: 3,
            write_docs: true,
            verbose: true,
            agent_log: None,
            ready_only: false,
            keep: false,
        }
    }
}

const USAGE: &str = "usage: cargo xtask bench [--boots N] [--faults N] [--wrk-secs N] [--window-secs N] \
                     [--poller-reps N] [--quick] [--no-docs] [--quiet] [--agent-log RUST_LOG] [--ready-only [--keep]]";

fn parse(args: &[&str]) -> Result<Opts> {
    let mut o = Opts::default();
    let mut it = args.iter();
    while let Some(&arg) = it.next() {
        let mut num = |name: &str| -> Result<u64> {
            it.next().and_then(|v| v.parse().ok()).with_context(|| format!("{name} needs a number\n{USAGE}"))
        };
        match arg {
            "--boots" => o.boots = num(arg)?.max(1) as usize,
            "--faults" => o.faults = num(arg)?.max(1) as usize,
            "--wrk-secs" => o.wrk_secs = num(arg)?.max(1) as u32,
            "--window-secs" => o.window_secs = num(arg)?.max(1),
            "--poller-reps" => o.poller_reps = num(arg)? as usize,
            "--quick" => {
                o.boots = 1;
                o.faults = 2;
                o.wrk_secs = 5;
                o.window_secs = 10;
                o.poller_reps = 1;
            }
            "--no-docs" => o.write_docs = false,
            "--keep" => o.keep = true,
            "--ready-only" => {
                o.ready_only = true;
                o.write_docs = false;
            }
            "--agent-log" => {
                o.agent_log = Some(it.next().context("--agent-log needs a RUST_LOG value")?.to_string());
                o.write_docs = false;
            }
            "--quiet" => o.verbose = false,
            _ => bail!("unknown argument {arg:?}\n{USAGE}"),
        }
    }
    Ok(o)
}

/// `cargo xtask bench [options]`.
pub fn cmd_bench(args: &[&str]) -> Result<()> {
    let opts = parse(args)?;
    let command =
        std::iter::once("cargo xtask bench").chain(args.iter().copied()).collect::<Vec<_>>().join(" ");
    host::require_root("cargo xtask bench")?;
    host::ensure_packages(&["wrk"])?;
    node::cleanup_leftovers("bench-")?;
    // The bench measures on bookworm (its baselines were taken there).
    let (agent, trees) = node::prepare(&[crate::harness::tree::Os::Bookworm])?;
    let pristine =
        trees.into_iter().next().map(|(_, tree)| tree).expect("prepare returns the tree asked for");
    let baseline_bin = build_baseline()?;
    let started = Instant::now();
    let machine = Machine::now(&command);
    eprintln!("==> bench on {} ({}), load {}", machine.model, machine.kernel, machine.load_start);

    // 1. Time to ready.
    let mut boots: Vec<Boot> = Vec::new();
    let mut failures: Vec<(Variant, String)> = Vec::new();
    let variants = [Variant::Agent, Variant::Lean, Variant::Shell];
    for round in 0..opts.boots {
        // Rotate the order each round: no variant always boots right after another one's cleanup.
        for k in 0..variants.len() {
            let v = variants[(round + k) % variants.len()];
            let name = format!("bench-{}-{}", v.name(), round + 1);
            eprintln!("==> time to ready: {} boot {}/{}", v.name(), round + 1, opts.boots);
            // A failed boot (a baseline's race, say) is reported, not measured; the variant gets
            // another node, at most twice per bench.
            let (mut n, mut b) = loop {
                match ready::boot_one(
                    &name,
                    v,
                    &pristine,
                    &agent,
                    Duration::from_millis(20),
                    opts.agent_log.as_deref(),
                ) {
                    Ok(ok) => break ok,
                    Err(e) if failures.iter().filter(|(fv, _)| *fv == v).count() < 2 => {
                        eprintln!("    FAILED, booting another node: {e:#}");
                        failures.push((v, format!("{e:#}")));
                    }
                    Err(e) => return Err(e),
                }
            };
            eprintln!(
                "    unit start -> ready {:.3} s, nspawn start -> ready {:.3} s{}",
                b.unit_to_ready(),
                b.nspawn_to_ready(),
                b.exec_to_node_ready()
                    .map_or(String::new(), |s| format!(", agent exec -> NODE_READY {s:.3} s"))
            );
            if !opts.ready_only && v != Variant::Shell {
                match ready::first_job(&mut n, b.ready_us) {
                    Ok(secs) => {
                        eprintln!(
                            "    first job's docker run, {:?} after ready: {secs:.3} s",
                            ready::FIRST_JOB_AFTER
                        );
                        b.first_job_s = Some(secs);
                    }
                    Err(e) => eprintln!("    first job FAILED (not measured): {e:#}"),
                }
            }
            if opts.keep && opts.ready_only && v == Variant::Agent && round + 1 == opts.boots {
                let leader = n.leader()?;
                eprintln!("    leaving node {} running (leader PID {leader})", n.name);
                n.detach();
            } else {
                n.destroy()?;
            }
            if let (true, Some((um_start, um_active))) = (opts.ready_only, b.user_manager) {
                let from = b.exec_us.unwrap_or(b.start_us);
                eprintln!(
                    "      user@1000.service: start {:.1} ms, active {:.1} ms after the {}",
                    um_start as f64 / 1000.0 - from as f64 / 1000.0,
                    um_active as f64 / 1000.0 - from as f64 / 1000.0,
                    if b.exec_us.is_some() { "agent's exec" } else { "first unit's start" }
                );
            }
            if opts.ready_only && v == Variant::Agent {
                for (at, msg) in &b.journal {
                    eprintln!("      {:>8.1} ms  {msg}", *at as f64 / 1000.0);
                }
            }
            boots.push(b);
        }
    }
    if opts.ready_only {
        for v in variants {
            let unit: Vec<f64> = boots.iter().filter(|b| b.variant == v).map(|b| b.unit_to_ready()).collect();
            let nspawn: Vec<f64> =
                boots.iter().filter(|b| b.variant == v).map(|b| b.nspawn_to_ready()).collect();
            println!(
                "{:<6} unit start -> ready {}   nspawn start -> ready {}",
                v.name(),
                summary_s(&unit),
                summary_s(&nspawn)
            );
        }
        return Ok(());
    }

    // 2. Probe cost, on a fresh agent node, with the baseline server in its network namespace.
    eprintln!("==> probe cost: a fresh agent node");
    let (mut agent_node, _) = ready::boot_one(
        "bench-agent",
        Variant::Agent,
        &pristine,
        &agent,
        Duration::from_millis(20),
        opts.agent_log.as_deref(),
    )?;
    let leader = agent_node.leader()?;
    let probes = probe_cost(&mut agent_node, leader, &baseline_bin, &opts)?;

    // 2b. The job canary's cost, on the same node (restarted with rounds every 20 s, then off).
    eprintln!("==> canary cost: rounds every 20 s for 60 s, then the canary off for 60 s");
    let canary_cost = canary::cost(&mut agent_node, leader, Duration::from_secs(60))?;
    let leader = agent_node.leader()?;

    // 3. Drift on the same node.
    eprintln!("==> drift: {} rounds of {} faults, 10 ms prober", opts.faults, drift::ALL.len());
    let faults = drift::agent_faults(&mut agent_node, &drift::ALL, opts.faults, opts.verbose)?;

    // 4. Footprint (agent node) while the poll-only baseline runs on a lean node.
    eprintln!("==> poll-only baseline: a fresh lean node without the agent");
    let (mut poll_node, _) = ready::boot_one(
        "bench-poller",
        Variant::Lean,
        &pristine,
        &agent,
        Duration::from_millis(20),
        opts.agent_log.as_deref(),
    )?;
    // The poller cannot see a killed podman.service when the agent does not either (socket
    // activation starts it again on the next request): leave that fault out unless the agent saw it.
    let killed_seen = faults.iter().any(|f| f.fault == Fault::PodmanKilled && f.probe_down.is_some());
    let poll_faults: Vec<Fault> =
        drift::ALL.iter().copied().filter(|f| *f != Fault::PodmanKilled || killed_seen).collect();
    let (poller, footprint) = std::thread::scope(|s| {
        let poller = s.spawn(|| {
            drift::poller_experiment(&mut poll_node, &poll_faults, opts.poller_reps, 3, opts.verbose)
        });
        let footprint = footprint(&mut agent_node, leader, &probes, &opts);
        (poller.join().map_err(|_| anyhow::anyhow!("the poller thread panicked")), footprint)
    });
    let poller = poller??;
    let mut footprint = footprint?;
    footprint.binary_mib = std::fs::metadata(&agent)?.len() as f64 / MIB;
    footprint.baseline_binary_mib = std::fs::metadata(&baseline_bin)?.len() as f64 / MIB;
    let probe_figures = probes.fig.clone();
    drop(probes);
    poll_node.destroy()?;
    agent_node.destroy()?;

    let machine = machine.finish(started.elapsed());
    let report = Report {
        machine,
        opts: opts.clone(),
        boots,
        boot_failures: failures,
        probes: probe_figures,
        canary: canary_cost,
        faults,
        poller,
        footprint,
    };
    let table = report.table();
    println!("\n{}", report.header());
    println!("{table}");
    println!("{}", report.details());
    if opts.write_docs {
        write_docs(&report.markdown())?;
        eprintln!("==> wrote {DOCS}");
    }
    Ok(())
}

/// Builds the baseline server (xtask/src/suites/bench/baseline_server.rs) in release, like the agent.
fn build_baseline() -> Result<PathBuf> {
    eprintln!("==> building bench-baseline (release)");
    host::run(host::cargo().args([
        "build",
        "--release",
        "-p",
        "xtask",
        "--features",
        "bench-baseline",
        "--bin",
        "bench-baseline",
    ]))
    .context("building the baseline server failed")?;
    Ok(host::target_dir().join("release/bench-baseline"))
}

// ---- helpers shared by the phases ----

/// Runs `argv` in the node's namespaces as root (a plain client: reads, D-Bus calls) and
/// returns stdout; fails on a non-zero exit.
pub fn nsenter(leader: i32, argv: &[&str]) -> Result<String> {
    run_out(
        Command::new("nsenter")
            .args(["-t", &leader.to_string(), "-m", "-u", "-i", "-n", "-p", "--"])
            .args(argv),
    )
}

/// The same as core (UID/GID 1000) with the user manager's bus in the environment.
pub fn nsenter_as_core(leader: i32, argv: &[&str]) -> Result<String> {
    run_out(
        Command::new("nsenter")
            .args(["-t", &leader.to_string(), "-m", "-u", "-i", "-n", "-p", "-S", "1000", "-G", "1000", "--"])
            .args([
                "env",
                "-i",
                "PATH=/usr/local/bin:/usr/bin:/bin",
                "HOME=/home/core",
                "XDG_RUNTIME_DIR=/run/user/1000",
            ])
            .arg("DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/1000/bus")
            .args(argv),
    )
}

fn run_out(cmd: &mut Command) -> Result<String> {
    let out = host::capture(&mut *cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}{}",
            host::show(cmd),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn random_u64() -> u64 {
    use std::io::Read as _;
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).is_err() {
        return node::monotonic_us();
    }
    u64::from_le_bytes(b)
}

pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 })
}

/// Nearest-rank 95th percentile.
pub fn p95(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((0.95 * s.len() as f64).ceil() as usize).clamp(1, s.len());
    Some(s[rank - 1])
}

fn min_max(v: &[f64]) -> Option<(f64, f64)> {
    let min = v.iter().copied().reduce(f64::min)?;
    let max = v.iter().copied().reduce(f64::max)?;
    Some((min, max))
}

const MIB: f64 = 1024.0 * 1024.0;

// ---- 2. probe cost ----

struct Probes {
    baseline: load::Baseline,
    fig: ProbeFigures,
}

/// What phase 2 measured (MiB for memory).
#[derive(Clone, Default)]
struct ProbeFigures {
    /// (path, agent, baseline)
    runs: Vec<(String, load::WrkReport, load::WrkReport)>,
    agent_rss_idle: f64,
    watcher_rss_idle: Option<f64>,
    agent_pss_idle: f64,
    watcher_pss_idle: Option<f64>,
    baseline_rss_idle: f64,
    agent_rss_load: f64,
    baseline_rss_load: f64,
}

/// Samples VmRSS of `pid` every 100 ms while `f` runs; returns `f`'s result and the peak (MiB).
fn with_rss_peak<T>(pid: i32, f: impl FnOnce() -> T) -> (T, f64) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak: f64 = 0.0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(v) = procfs::status_mib(pid, "VmRSS") {
                    peak = peak.max(v);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        })
    };
    let out = f();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    (out, sampler.join().unwrap_or(0.0))
}

fn probe_cost(node: &mut Node, leader: i32, baseline_bin: &Path, opts: &Opts) -> Result<Probes> {
    let work = crate::harness::tree::cache_dir().join("bench");
    std::fs::create_dir_all(&work)?;
    let mut routes = Vec::new();
    for path in ["/readyz", "/status"] {
        let (code, body) = node.http_get(AGENT_PORT, path)?;
        if code != 200 {
            bail!("the agent's {path} answered {code} before the load: {body}");
        }
        let file = work.join(format!("{}.json", path.trim_start_matches('/')));
        host::write(&file, body)?;
        routes.push((path, file));
    }
    let baseline = load::Baseline::start(leader, baseline_bin, BASELINE_PORT, &routes)?;
    let agent_pid = procfs::agent_pid(leader)?;
    // Idle memory, after the agent has settled.
    std::thread::sleep(Duration::from_secs(2));
    let watcher = procfs::watcher_pid(leader);
    let mut p = ProbeFigures {
        agent_rss_idle: procfs::status_mib(agent_pid, "VmRSS")?,
        watcher_rss_idle: watcher.and_then(|w| procfs::status_mib(w, "VmRSS").ok()),
        agent_pss_idle: procfs::pss_mib(agent_pid)?,
        watcher_pss_idle: watcher.and_then(|w| procfs::pss_mib(w).ok()),
        baseline_rss_idle: procfs::status_mib(baseline.pid(), "VmRSS")?,
        agent_rss_load: 0.0,
        baseline_rss_load: 0.0,
        runs: Vec::new(),
    };
    for path in ["/readyz", "/status"] {
        eprintln!(
            "==> wrk -t2 -c64 -d{}s --latency {path}: agent, baseline, baseline, agent (ABBA)",
            opts.wrk_secs
        );
        let (mut agent_runs, mut base_runs) = (Vec::new(), Vec::new());
        for agent_turn in [true, false, false, true] {
            let (pid, port) =
                if agent_turn { (agent_pid, AGENT_PORT) } else { (baseline.pid(), BASELINE_PORT) };
            let (r, peak) = with_rss_peak(pid, || {
                load::wrk(leader, &format!("http://127.0.0.1:{port}{path}"), 2, 64, opts.wrk_secs)
            });
            let r = r?;
            eprintln!(
                "    {:<8} {:>7.0} req/s  p50 {:.3} ms  p99 {:.3} ms  socket errors: {}",
                if agent_turn { "agent" } else { "baseline" },
                r.requests_per_s,
                r.p50_ms,
                r.p99_ms,
                r.socket_errors_text
            );
            if agent_turn {
                p.agent_rss_load = p.agent_rss_load.max(peak);
                agent_runs.push(r);
            } else {
                p.baseline_rss_load = p.baseline_rss_load.max(peak);
                base_runs.push(r);
            }
        }
        p.runs.push((path.to_string(), load::combine(&agent_runs), load::combine(&base_runs)));
    }
    Ok(Probes { baseline, fig: p })
}

// ---- 4. footprint ----

#[derive(Default)]
struct Footprint {
    window_s: f64,
    /// Fraction of a core over the idle window: agent (own + waited children), watcher.
    idle_agent: f64,
    idle_agent_own: f64,
    idle_watcher: f64,
    podman_starts_idle: usize,
    /// core's user manager: CPU of children it reaped in the window (podman.service runs).
    idle_user_manager_children: Option<f64>,
    paced_agent: f64,
    paced_baseline: f64,
    paced_sent: (u64, u64),
    paced_ok: (u64, u64),
    binary_mib: f64,
    baseline_binary_mib: f64,
}

fn footprint(node: &mut Node, leader: i32, probes: &Probes, opts: &Opts) -> Result<Footprint> {
    let window = Duration::from_secs(opts.window_secs);
    let agent_pid = procfs::agent_pid(leader)?;
    let mut f = Footprint { window_s: window.as_secs_f64(), ..Footprint::default() };
    // Let the repairs of the drift phase finish.
    node.wait_readyz(true, Duration::from_secs(60), Duration::from_millis(200))?;
    std::thread::sleep(Duration::from_secs(3));
    eprintln!("==> footprint: {} s idle", opts.window_secs);
    let watcher = procfs::watcher_pid(leader);
    let um = procfs::user_manager_pid(leader);
    let (a0, w0, u0, t0) = (
        procfs::cpu(agent_pid)?,
        watcher.and_then(|w| procfs::cpu(w).ok()),
        um.and_then(|u| procfs::cpu(u).ok()),
        node::monotonic_us(),
    );
    std::thread::sleep(window);
    let (a1, w1, u1, t1) = (
        procfs::cpu(agent_pid)?,
        watcher.and_then(|w| procfs::cpu(w).ok()),
        um.and_then(|u| procfs::cpu(u).ok()),
        node::monotonic_us(),
    );
    let span = (t1 - t0) as f64 / 1e6;
    let da = a1.since(&a0);
    f.idle_agent_own = da.own / span;
    f.idle_agent = da.total() / span;
    f.idle_watcher = match (w0, w1) {
        (Some(a), Some(b)) => b.since(&a).total() / span,
        _ => 0.0,
    };
    f.idle_user_manager_children = match (u0, u1) {
        (Some(a), Some(b)) => Some(b.since(&a).children / span),
        _ => None,
    };
    f.podman_starts_idle = nsenter(
        leader,
        &[
            "journalctl",
            "--no-pager",
            "-o",
            "json",
            &format!("MESSAGE_ID={UNIT_STARTED}"),
            "USER_UNIT=podman.service",
        ],
    )
    .map(|out| {
        out.lines()
            .filter_map(|l| serde_json::from_str::<Json>(l).ok())
            .filter(|e| (t0..t1).contains(&ready::mono(e)))
            .count()
    })
    .unwrap_or(0);
    eprintln!(
        "==> footprint: {} s of /readyz at 5 req/s (50 managers every 10 s), agent and baseline",
        opts.window_secs
    );
    let (b0, a0, t0) = (procfs::cpu(probes.baseline.pid())?, procfs::cpu(agent_pid)?, node::monotonic_us());
    let ta = load::paced(leader, AGENT_PORT, "/readyz", 5.0, window);
    let tb = load::paced(leader, BASELINE_PORT, "/readyz", 5.0, window);
    let (ra, rb) = (ta.join().unwrap_or_default(), tb.join().unwrap_or_default());
    let (b1, a1, t1) = (procfs::cpu(probes.baseline.pid())?, procfs::cpu(agent_pid)?, node::monotonic_us());
    let span = (t1 - t0) as f64 / 1e6;
    f.paced_agent = a1.since(&a0).total() / span;
    f.paced_baseline = b1.since(&b0).total() / span;
    f.paced_sent = (ra.sent, rb.sent);
    f.paced_ok = (ra.ok, rb.ok);
    Ok(f)
}

// ---- the report ----

struct Machine {
    nproc: usize,
    model: String,
    kernel: String,
    date: String,
    command: String,
    load_start: String,
    load_end: String,
    wall_s: f64,
}

impl Machine {
    fn now(command: &str) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .and_then(|v| v.split_once(':'))
                    .map(|(_, m)| m.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let date = host::capture(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        Machine {
            nproc: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            model,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            date,
            command: command.to_string(),
            load_start: loadavg(),
            load_end: String::new(),
            wall_s: 0.0,
        }
    }

    fn finish(mut self, wall: Duration) -> Machine {
        self.load_end = loadavg();
        self.wall_s = wall.as_secs_f64();
        self
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

struct Row {
    metric: String,
    agent: String,
    baseline: String,
    ratio: String,
    goal: String,
    met: Option<bool>,
}

fn row(
    metric: impl Into<String>,
    agent: impl Into<String>,
    baseline: impl Into<String>,
    ratio: impl Into<String>,
    goal: impl Into<String>,
    met: Option<bool>,
) -> Row {
    Row {
        metric: metric.into(),
        agent: agent.into(),
        baseline: baseline.into(),
        ratio: ratio.into(),
        goal: goal.into(),
        met,
    }
}

fn s3(v: f64) -> String {
    format!("{v:.3} s")
}

fn s2(v: f64) -> String {
    format!("{v:.2} s")
}

/// "median (min–max, n=N)" in seconds.
fn summary_s(v: &[f64]) -> String {
    match (median(v), min_max(v)) {
        (Some(m), Some((lo, hi))) => format!("{} ({:.3}–{:.3}, n={})", s3(m), lo, hi, v.len()),
        _ => "n/a".into(),
    }
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "–".into()
    }
}

fn pct(v: f64) -> String {
    if v < 0.001 {
        format!("{:.3} %", v * 100.0)
    } else {
        format!("{:.2} %", v * 100.0)
    }
}

struct Report {
    machine: Machine,
    opts: Opts,
    boots: Vec<Boot>,
    /// Boots that did not get ready (not measured; another node was booted instead).
    boot_failures: Vec<(Variant, String)>,
    probes: ProbeFigures,
    canary: canary::Cost,
    faults: Vec<drift::AgentFault>,
    poller: drift::PollerResult,
    footprint: Footprint,
}

impl Report {
    fn of(&self, v: Variant) -> Vec<&Boot> {
        self.boots.iter().filter(|b| b.variant == v).collect()
    }

    fn header(&self) -> String {
        let m = &self.machine;
        format!(
            "Machine: {} CPUs, {}, Linux {}; {}; load average {} at the start, {} at the end; \
             bench wall time {:.0} s.\nCommand: `{}` (as root; {} boots per variant, {} rounds of faults, \
             wrk {} s, {} s windows).",
            m.nproc,
            m.model,
            m.kernel,
            m.date,
            m.load_start,
            m.load_end,
            m.wall_s,
            m.command,
            self.opts.boots,
            self.opts.faults,
            self.opts.wrk_secs,
            self.opts.window_secs
        )
    }

    fn rows(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        // 1. Time to ready.
        let unit = |v: Variant| self.of(v).iter().map(|b| b.unit_to_ready()).collect::<Vec<_>>();
        let nspawn = |v: Variant| self.of(v).iter().map(|b| b.nspawn_to_ready()).collect::<Vec<_>>();
        let (agent, lean, shell) = (unit(Variant::Agent), unit(Variant::Lean), unit(Variant::Shell));
        let (ma, ml, ms) =
            (median(&agent).unwrap_or(0.0), median(&lean).unwrap_or(0.0), median(&shell).unwrap_or(0.0));
        rows.push(row(
            "1. ready, from the start of the unit(s) doing the work (median) vs lean shell units",
            summary_s(&agent),
            summary_s(&lean),
            ratio(ma, ml),
            "≤ 1.0",
            Some(ma / ml <= 1.0),
        ));
        let failed = |v: Variant| self.boot_failures.iter().filter(|(f, _)| *f == v).count();
        if !self.boot_failures.is_empty() {
            rows.push(row(
                "1. boots that failed (replaced by another node; see below the table)",
                format!("{}", failed(Variant::Agent)),
                format!("lean {}, shell {}", failed(Variant::Lean), failed(Variant::Shell)),
                "–",
                "–",
                None,
            ));
        }
        rows.push(row(
            "1. the same vs the Terraform scenario's units (`sleep 2`)",
            s3(ma),
            summary_s(&shell),
            ratio(ma, ms),
            "–",
            None,
        ));
        let (na, nl) = (nspawn(Variant::Agent), nspawn(Variant::Lean));
        let (mna, mnl) = (median(&na).unwrap_or(0.0), median(&nl).unwrap_or(0.0));
        rows.push(row(
            "1. ready, from the nspawn start (instance running) vs lean",
            summary_s(&na),
            summary_s(&nl),
            ratio(mna, mnl),
            "≤ 1.0",
            Some(mna / mnl <= 1.0),
        ));
        let exec: Vec<f64> = self.of(Variant::Agent).iter().filter_map(|b| b.exec_to_node_ready()).collect();
        rows.push(row(
            "1. agent process start → NODE_READY (journal; a canary round included)",
            summary_s(&exec),
            "–",
            "–",
            "–",
            None,
        ));
        let fp: Vec<f64> =
            self.of(Variant::Agent).iter().filter_map(|b| b.first_pass_ms.map(|m| m / 1000.0)).collect();
        rows.push(row(
            "1. agent's own `first pass done after` (READY=1)",
            summary_s(&fp),
            "–",
            "–",
            "–",
            None,
        ));
        let rz: Vec<f64> = self.of(Variant::Agent).iter().filter_map(|b| b.unit_to_readyz()).collect();
        rows.push(row(
            "1. first `/readyz` 200 seen by a 20 ms prober, from the unit start",
            summary_s(&rz),
            "–",
            "–",
            "–",
            None,
        ));

        let job = |v: Variant| self.of(v).iter().filter_map(|b| b.first_job_s).collect::<Vec<_>>();
        let (ja, jl) = (job(Variant::Agent), job(Variant::Lean));
        let (mja, mjl) = (median(&ja).unwrap_or(f64::MAX), median(&jl).unwrap_or(0.0));
        rows.push(row(
            format!(
                "1. a first job's `docker run --rm` {} s after ready (image present) vs lean",
                ready::FIRST_JOB_AFTER.as_secs()
            ),
            summary_s(&ja),
            summary_s(&jl),
            ratio(mja, mjl),
            "≤ 1.0",
            (!ja.is_empty() && !jl.is_empty()).then_some(mja <= mjl),
        ));

        // 2. Probe cost.
        rows.extend(self.probes_rows());

        // 2b. The canary's cost.
        let c = &self.canary;
        rows.push(row(
            "2. canary round wall time (median of the window's rounds, cleanup included)",
            summary_s(&c.round_s),
            "–",
            "–",
            "–",
            None,
        ));
        rows.push(row(
            "2. canary CPU per round (every process of the node, beyond the node idle)",
            format!("{:.3} s", c.cpu_per_round_s),
            format!("{:.3} s with rounds, {:.3} s idle, per {:.0} s", c.cpu_with_s, c.cpu_idle_s, c.window_s),
            "–",
            "–",
            None,
        ));
        rows.push(row(
            "2. canary CPU per hour at the default 5 min interval (12 rounds)",
            format!(
                "{:.2} s ({:.3} % of a core)",
                c.cpu_per_hour_at_default_s(),
                c.cpu_per_hour_at_default_s() / 36.0
            ),
            "–",
            "–",
            "–",
            None,
        ));

        // 3. Drift.
        let model_detect_p95 = 0.95 * drift::POLL_INTERVAL_S as f64;
        let check = self.poller.check_s.unwrap_or(0.0);
        for fault in drift::ALL {
            let runs: Vec<&drift::AgentFault> = self.faults.iter().filter(|f| f.fault == fault).collect();
            let down: Vec<f64> = runs.iter().filter_map(|r| r.probe_down.map(ready::secs)).collect();
            let up: Vec<f64> = runs.iter().filter_map(|r| r.probe_up.map(ready::secs)).collect();
            let jdown: Vec<f64> = runs.iter().filter_map(|r| r.journal_down.map(ready::secs)).collect();
            let jup: Vec<f64> = runs.iter().filter_map(|r| r.journal_up.map(ready::secs)).collect();
            let polled: Vec<&drift::PollerFault> =
                self.poller.faults.iter().filter(|f| f.fault == fault).collect();
            let pdet: Vec<f64> = polled.iter().filter_map(|p| p.detect.map(ready::secs)).collect();
            let prep: Vec<f64> = polled.iter().filter_map(|p| p.repair.map(ready::secs)).collect();
            let repair_cost = median(
                &polled
                    .iter()
                    .filter_map(|p| Some(ready::secs(p.repair?.saturating_sub(p.detect?))))
                    .collect::<Vec<_>>(),
            );
            if down.is_empty() {
                let api_ok = runs.iter().filter(|r| r.api_ok_after == Some(true)).count();
                rows.push(row(
                    format!("3. {}: /readyz 503", fault.name()),
                    format!(
                        "never: stayed 200 in {n}/{n} runs; `GET /_ping` right after answered OK in {api_ok}/{n} \
                         (socket activation starts podman.service again)",
                        n = runs.len()
                    ),
                    "never (same reason)",
                    "–",
                    "≤ 1 s (p95)",
                    None,
                ));
                continue;
            }
            let measured = |v: &[f64]| match median(v) {
                Some(m) => format!("; shell poller measured median {} (n={})", s2(m), v.len()),
                None => String::new(),
            };
            let d95 = p95(&down).unwrap_or(0.0);
            rows.push(row(
                format!("3. {}: /readyz 503 after the fault, p95 (median; journal p95)", fault.name()),
                format!(
                    "{} ({}; {}), {}/{} seen",
                    s3(d95),
                    s3(median(&down).unwrap_or(0.0)),
                    p95(&jdown).map_or("n/a".into(), s3),
                    down.len(),
                    runs.len()
                ),
                format!(
                    "poll 10 s: p95 {:.2} s (mean {:.2} s){}",
                    model_detect_p95 + check,
                    5.0 + check,
                    measured(&pdet)
                ),
                ratio(d95, model_detect_p95 + check),
                "≤ 1 s (p95)",
                Some(d95 <= 1.0 && down.len() == runs.len()),
            ));
            let u95 = p95(&up).unwrap_or(f64::MAX);
            let model_repair = model_detect_p95 + check + repair_cost.unwrap_or(0.0);
            rows.push(row(
                format!("3. {}: /readyz 200 again, p95 (max; journal p95)", fault.name()),
                format!(
                    "{} ({}; {})",
                    s3(u95),
                    s3(min_max(&up).map_or(0.0, |m| m.1)),
                    p95(&jup).map_or("n/a".into(), s3)
                ),
                format!("poll 10 s + repair: p95 {:.2} s{}", model_repair, measured(&prep)),
                ratio(u95, model_repair),
                "≤ 5 s (p95)",
                Some(u95 <= 5.0 && up.len() == runs.len()),
            ));
        }

        // 4. Footprint.
        let f = &self.footprint;
        let p = &self.probes;
        rows.push(row(
            "4. resident memory idle (VmRSS), agent process",
            format!("{:.1} MiB", p.agent_rss_idle),
            format!("{:.1} MiB (axum baseline)", p.baseline_rss_idle),
            ratio(p.agent_rss_idle, p.baseline_rss_idle),
            "≤ 10 MiB",
            Some(p.agent_rss_idle <= 10.0),
        ));
        let pss = p.agent_pss_idle + p.watcher_pss_idle.unwrap_or(0.0);
        rows.push(row(
            "4. resident memory idle, agent + its watcher child (sum of PSS; watcher VmRSS)",
            format!(
                "{:.1} MiB ({})",
                pss,
                p.watcher_rss_idle.map_or("no watcher".into(), |w| format!("{w:.1} MiB"))
            ),
            "–",
            "–",
            "≤ 10 MiB",
            Some(pss <= 10.0),
        ));
        rows.push(row(
            "4. resident memory under the wrk load (VmRSS peak, 100 ms samples)",
            format!("{:.1} MiB", p.agent_rss_load),
            format!("{:.1} MiB", p.baseline_rss_load),
            ratio(p.agent_rss_load, p.baseline_rss_load),
            "–",
            None,
        ));
        rows.push(row(
            format!("4. CPU over {:.0} idle s: agent + waited helpers + watcher (agent alone)", f.window_s),
            format!("{} ({})", pct(f.idle_agent + f.idle_watcher), pct(f.idle_agent_own)),
            match self.poller.idle_cpu {
                Some(c) => format!("{} (shell poller, 10 s)", pct(c)),
                None => "n/a".into(),
            },
            self.poller.idle_cpu.map_or("–".into(), |c| ratio(f.idle_agent + f.idle_watcher, c)),
            "≤ 0.05 %",
            Some(f.idle_agent + f.idle_watcher <= 0.0005),
        ));
        rows.push(row(
            format!(
                "4. induced in the same {:.0} s: podman.service starts (CPU of reaped user-manager children)",
                f.window_s
            ),
            format!(
                "{}{}",
                f.podman_starts_idle,
                f.idle_user_manager_children.map_or(String::new(), |c| format!(" ({})", pct(c)))
            ),
            "–",
            "–",
            "0 (beyond canary rounds)",
            Some(f.podman_starts_idle == 0),
        ));
        rows.push(row(
            "4. release binary size (stripped)",
            format!("{:.2} MiB", f.binary_mib),
            format!("{:.2} MiB (axum baseline)", f.baseline_binary_mib),
            ratio(f.binary_mib, f.baseline_binary_mib),
            "≤ 8 MiB",
            Some(f.binary_mib <= 8.0),
        ));
        rows.push(row(
            format!("4. CPU at 5 req/s /readyz (50 managers every 10 s), {:.0} s", f.window_s),
            format!(
                "{} ({} over idle; {}/{} ok)",
                pct(f.paced_agent),
                pct((f.paced_agent - f.idle_agent).max(0.0)),
                f.paced_ok.0,
                f.paced_sent.0
            ),
            format!("{} ({}/{} ok)", pct(f.paced_baseline), f.paced_ok.1, f.paced_sent.1),
            ratio(f.paced_agent, f.paced_baseline),
            "–",
            None,
        ));
        rows
    }

    fn table(&self) -> String {
        let mut out =
            String::from("| metric | agent | baseline | ratio | goal | met? |\n|---|---|---|---|---|---|\n");
        for r in self.rows() {
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "–",
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {met} |",
                r.metric, r.agent, r.baseline, r.ratio, r.goal
            );
        }
        out
    }

    /// The breakdown of the median agent boot and the fault runs, for reading the table.
    fn details(&self) -> String {
        let mut out = String::new();
        let mut agents = self.of(Variant::Agent);
        agents.sort_by(|a, b| a.unit_to_ready().total_cmp(&b.unit_to_ready()));
        let um = |v: Variant| {
            self.of(v)
                .iter()
                .filter_map(|b| b.user_manager.map(|(s, a)| ready::secs(a.saturating_sub(s))))
                .collect::<Vec<_>>()
        };
        let _ = writeln!(
            out,
            "user@1000.service start → active (median): agent {}, lean {}, shell {}",
            median(&um(Variant::Agent)).map_or("n/a".into(), s3),
            median(&um(Variant::Lean)).map_or("n/a".into(), s3),
            median(&um(Variant::Shell)).map_or("n/a".into(), s3)
        );
        if let Some(b) = agents.get(agents.len() / 2) {
            let _ = writeln!(out, "\nThe median agent boot, its journal from the process start (ms):");
            for (at, msg) in b.journal.iter().take(40) {
                let _ = writeln!(
                    out,
                    "  {:>7.1}  {}",
                    *at as f64 / 1000.0,
                    msg.chars().take(150).collect::<String>()
                );
                if b.node_ready_us.is_some_and(|r| b.exec_us.is_some_and(|e| r.saturating_sub(e) <= *at)) {
                    break;
                }
            }
        }
        for (v, e) in &self.boot_failures {
            let _ = writeln!(out, "\nA {} boot failed and was replaced: {}", v.name(), e);
        }
        let failed: Vec<&drift::AgentFault> =
            self.faults.iter().filter(|f| !f.repair_failures.is_empty()).collect();
        if !failed.is_empty() {
            let _ = writeln!(
                out,
                "\nFault runs in which an agent repair failed (then retried after its backoff):"
            );
            for f in failed {
                let _ = writeln!(
                    out,
                    "  {} (ready again after {}):",
                    f.fault.name(),
                    f.probe_up.map_or("-".into(), |u| s3(ready::secs(u)))
                );
                for (at, msg) in &f.repair_failures {
                    let _ = writeln!(
                        out,
                        "    +{:.0} ms {}",
                        *at as f64 / 1000.0,
                        msg.chars().take(300).collect::<String>()
                    );
                }
            }
        }
        let inject: Vec<f64> = self.faults.iter().map(|f| f.inject_us as f64 / 1000.0).collect();
        let _ = writeln!(
            out,
            "\nFault injection took {:.1} ms at the median (times are counted from its start).",
            median(&inject).unwrap_or(0.0)
        );
        if let Some(c) = self.poller.check_s {
            let _ = writeln!(
                out,
                "One round of the shell poller's checks took {:.3} s (median of quiet rounds).",
                c
            );
        }
        out
    }

    fn markdown(&self) -> String {
        format!("{BEGIN}\n\n{}\n\n{}\n```text\n{}```\n\n{END}\n", self.header(), self.table(), self.details())
    }
}

impl Report {
    fn probes_rows(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        for (path, a, b) in &self.probes.runs {
            rows.push(row(
                format!(
                    "2. {path} throughput (wrk -t2 -c64 -d{}s, loopback in the node; median of 2 runs, ABBA)",
                    self.opts.wrk_secs
                ),
                format!("{:.0} req/s", a.requests_per_s),
                format!("{:.0} req/s (axum constant)", b.requests_per_s),
                format!("{:.0} %", 100.0 * a.requests_per_s / b.requests_per_s),
                "≥ 80 %",
                Some(a.requests_per_s >= 0.8 * b.requests_per_s),
            ));
            rows.push(row(
                format!("2. {path} latency p50"),
                format!("{:.3} ms", a.p50_ms),
                format!("{:.3} ms", b.p50_ms),
                ratio(a.p50_ms, b.p50_ms),
                "–",
                None,
            ));
            rows.push(row(
                format!("2. {path} latency p99"),
                format!("{:.3} ms", a.p99_ms),
                format!("{:.3} ms", b.p99_ms),
                ratio(a.p99_ms, b.p99_ms),
                "≤ baseline",
                Some(a.p99_ms <= b.p99_ms),
            ));
            rows.push(row(
                format!("2. {path} wrk socket errors; non-2xx"),
                format!(
                    "{} of {} requests (per run: {}); {}",
                    a.socket_errors, a.requests, a.socket_errors_text, a.non_2xx
                ),
                format!(
                    "{} of {} (per run: {}); {}",
                    b.socket_errors, b.requests, b.socket_errors_text, b.non_2xx
                ),
                "–",
                "–",
                None,
            ));
        }
        rows
    }
}

fn write_docs(generated: &str) -> Result<()> {
    let path = host::repo_root().join(DOCS);
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    host::write(&path, splice(&old, generated))
}

/// `old` with the generated block replaced (the hand-written text around it kept).
fn splice(old: &str, generated: &str) -> String {
    match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if e > b => {
            format!("{}{}{}", &old[..b], generated.trim_end(), &old[e + END.len()..])
        }
        _ => {
            format!("# Performance\n\n`cargo xtask bench` (root) measures the figures below.\n\n{generated}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_percentiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(p95(&v), Some(10.0));
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(p95(&v), Some(19.0));
        assert_eq!(min_max(&[2.0, 5.0, 1.0]), Some((1.0, 5.0)));
    }

    #[test]
    fn options() {
        let o = parse(&["--boots", "3", "--no-docs"]).unwrap();
        assert_eq!((o.boots, o.write_docs), (3, false));
        let q = parse(&["--quick"]).unwrap();
        assert_eq!((q.boots, q.faults, q.window_secs), (1, 2, 10));
        assert!(parse(&["--nope"]).is_err());
        assert!(parse(&["--boots"]).is_err());
    }

    #[test]
    fn docs_block_is_replaced_between_the_markers() {
        let old = format!("# T\n\nintro\n\n{BEGIN}\nold table\n{END}\n\nnotes\n");
        let new = splice(&old, &format!("{BEGIN}\nnew table\n{END}\n"));
        assert_eq!(new, format!("# T\n\nintro\n\n{BEGIN}\nnew table\n{END}\n\nnotes\n"));
        assert!(splice("", "G\n").ends_with("G\n"));
    }
}
