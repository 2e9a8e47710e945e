//! `cargo xtask`: the project's tasks around a real node (Ignition config, local node, end-to-end tests).

mod harness;
/// The agent's journal MESSAGE_IDs, the agent's own file (xtask does not depend on the agent).
#[path = "../../src/system/message_ids.rs"]
#[allow(dead_code)] // xtask looks for some of them only
mod message_ids;
mod render;
mod suites;

use anyhow::{bail, Context, Result};
use harness::tree::{self, Os};
use harness::{host, node};
use render::ignition;
use suites::runner::Tally;
use suites::{bench, cross, e2e, faults, fuzz, vm};

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  ignition [--check]   render ignition/executor-agent.bu to ignition/executor-agent.ign, write
                       the aarch64 variant (executor-agent-aarch64.bu) from it and render it
                       (--check: fail when a committed file is stale); runs ignition-validate
  dist [--url-base U]  build the release binaries (x86_64, aarch64) into target/dist, record
                       their URLs and sha512s in ignition/release.toml and the .bu files,
                       re-render the .ign files
  node [--os OS]       (root) boot a local throwaway node (OS: bookworm, the default, trixie or fcos-like)
                       provisioned by the Ignition config with the freshly built agent, wait
                       until it is ready and show it; it replaces a running one
  node --shell         (root) open a root shell on the running node
  node --rm            (root) power the node off and delete it
  e2e [--os OS|all]    (root) run the end-to-end scenarios, each on a fresh node, on each OS in
                       turn (default all: bookworm, trixie, then fcos-like with the scenarios
                       its layout changes)
  fuzz [--seconds N] [TARGET...]  run the cargo-fuzz targets in fuzz/ for N s each (default 10);
                       fails on a crash and prints the input's path under fuzz/artifacts/
  faults [--os OS|all] [CASE...]  (root) the fault, hardened-unit and load cases, each on
                       a fresh node, on each OS in turn (default bookworm and trixie; --list
                       names them)
  bench [OPTIONS]      (root) time to ready, probe cost, drift and footprint, each against a
                       baseline in the same run; writes docs/performance.md
  vm                   (root) one qemu (TCG) boot of a Debian 13 node provisioned by the Ignition
                       config, on a unified cgroup v2 hierarchy: readiness, cgroup-delegation
                       (fix_delegation off and on, narrowed and repaired), job --memory/--cpus
                       limits in the container's cgroup and enforced, the canary
  cross-test           the aarch64 release build, the unit tests built for aarch64 and run
                       under qemu-user, and the aarch64 binary's --version and config
  test                 (root) everything CI runs: host packages, cargo test, ignition --check,
                       ignition-validate, cross-test, e2e on bookworm, trixie and fcos-like,
                       vm beside the e2e, faults on bookworm (and the D-Bus ones on trixie)

OS: bookworm (debian12, 12), trixie (debian13, 13) or fcos-like (fcos: Debian 13 in Fedora
CoreOS's layout); e2e and faults also take `all` or a comma list.

";

fn main() {
    if let Err(err) = real_main() {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["ignition"] => ignition::cmd_ignition(false),
        ["ignition", "--check"] => ignition::cmd_ignition(true),
        ["dist"] => ignition::cmd_dist(None),
        ["dist", "--url-base", url] => ignition::cmd_dist(Some(url.to_string())),
        ["node", "--shell"] => node::cmd_shell(),
        ["node", "--rm"] => node::cmd_rm(),
        ["node", rest @ ..] => {
            let (oses, rest) = take_os(rest, &[Os::Bookworm])?;
            match (oses.as_slice(), rest.as_slice()) {
                ([os], []) => node::cmd_node(*os),
                ([_, _, ..], _) => bail!("`cargo xtask node` boots one node: give one --os\n{USAGE}"),
                _ => bail!("unknown arguments {args:?}\n{USAGE}"),
            }
        }
        ["e2e", rest @ ..] => {
            let (oses, rest) = take_os(rest, Os::ALL)?;
            if !rest.is_empty() {
                bail!("unknown arguments {rest:?}\n{USAGE}");
            }
            e2e::cmd_e2e(&oses)
        }
        ["test"] => cmd_test(),
        ["cross-test"] => cross::cmd_cross_test(),
        ["fuzz", rest @ ..] => fuzz::cmd_fuzz(rest),
        ["faults", rest @ ..] => {
            let (oses, cases) = take_os(rest, Os::DEBIAN)?;
            faults::cmd_faults(&oses, &cases)
        }
        ["bench", rest @ ..] => bench::cmd_bench(rest),
        ["vm"] => vm::cmd_vm(),
        [] | ["help"] | ["--help"] | ["-h"] => {
            print!("{USAGE}");
            Ok(())
        }
        _ => bail!("unknown arguments {args:?}\n{USAGE}"),
    }
}

/// Takes `--os OS` (or `--os=OS`; `all` for every OS, a comma list for several) out of `args`;
/// `default` when there is none. Returns the OSes and the other arguments.
fn take_os<'a>(args: &[&'a str], default: &[Os]) -> Result<(Vec<Os>, Vec<&'a str>)> {
    let mut oses = None;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(&arg) = it.next() {
        let value = if arg == "--os" {
            Some(*it.next().context("--os needs a value: bookworm, trixie or all")?)
        } else {
            arg.strip_prefix("--os=")
        };
        match value {
            Some(v) => {
                if oses.is_some() {
                    bail!("--os given twice");
                }
                oses = Some(Os::parse_list(v)?);
            }
            None => rest.push(arg),
        }
    }
    Ok((oses.unwrap_or_else(|| default.to_vec()), rest))
}

/// `cargo xtask test`: what `.ci/run` runs. The node trees of both OSes are built (or found in
/// the cache) while cargo compiles; the end-to-end scenarios and the fault cases run last on each
/// OS, and one `N passed, N failed` line over all of them closes the log.
fn cmd_test() -> Result<()> {
    host::require_root("cargo xtask test")?;
    host::ensure_packages(host::NODE_HOST_PACKAGES)?;
    host::ensure_packages(host::TEST_HOST_PACKAGES)?;
    cross::ensure_toolchain(cross::AARCH64)?;
    let cross_log = host::target_dir().join("cross-test.log");
    std::thread::scope(|s| {
        let trees = s.spawn(|| tree::ensure_all(Os::ALL));
        // aarch64: the release build and the unit tests under qemu-user, beside the rest (it
        // overlaps the tree build's downloads and the one-at-a-time tests), logged to a file so
        // the outputs do not interleave; joined before any node boots.
        eprintln!("==> cargo xtask cross-test, beside the checks (log: {})", cross_log.display());
        let cross = s.spawn(|| cross::run(Some(&cross_log)));
        let checks = (|| {
            // With fail points: the SIGKILL-at-every-step tests need them (release builds have none).
            // One test at a time: the file-fault tests mount tiny file systems and race real
            // useradd runs, which tests running beside them can disturb.
            eprintln!("==> cargo test --workspace --features executor-agent/failpoints -- --test-threads=1");
            host::run(host::cargo().args([
                "test",
                "--workspace",
                "--features",
                "executor-agent/failpoints",
                "--",
                "--test-threads=1",
            ]))?;
            eprintln!("==> cargo xtask fuzz (10 s per target)");
            fuzz::cmd_fuzz(&[])?;
            eprintln!("==> cargo xtask ignition --check (and ignition-validate)");
            ignition::cmd_ignition(true)?;
            host::build_agent()
        })();
        let trees = trees.join().map_err(|_| anyhow::anyhow!("building the node trees panicked"))??;
        let agent = checks?;
        let waited = std::time::Instant::now();
        let cross = cross.join().map_err(|_| anyhow::anyhow!("cross-test panicked"))?;
        eprintln!(
            "==> cross-test (aarch64): waited {:.0} s for it after the checks",
            waited.elapsed().as_secs_f64()
        );
        if let Err(e) = cross {
            let log = std::fs::read_to_string(&cross_log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            return Err(e.context(format!("cross-test failed (whole log: {})", cross_log.display())));
        }
        let mut tally = Tally::default();
        // The cgroup v2 VM, as a child `cargo xtask vm` logging to a file, beside the e2e
        // scenarios: those mostly wait on their nodes, the TCG guest mostly computes.
        let vm_log = host::target_dir().join("vm.log");
        eprintln!("==> cargo xtask vm, beside the e2e scenarios (log: {})", vm_log.display());
        let vm_child = spawn_logged(&["vm"], &vm_log);
        eprintln!("==> cargo xtask e2e --os all");
        let e2e = e2e::run(&agent, &trees);
        let waited = std::time::Instant::now();
        let vm = vm_child.and_then(|child| finish_logged(child, &vm_log));
        eprintln!("==> vm: waited {:.0} s for it after the e2e scenarios", waited.elapsed().as_secs_f64());
        // Every fault case on Debian 12; on Debian 13 the ones where its systemd differs (logind
        // 257 stays off the bus after a D-Bus restart, which the agent repairs): the whole set
        // there would cost CI about 8 more minutes (`cargo xtask faults --os trixie` runs it).
        let tree_of = |want: Os| trees.iter().filter(|(os, _)| *os == want).cloned().collect::<Vec<_>>();
        eprintln!("==> cargo xtask faults --os bookworm");
        let faults = faults::run(&agent, &tree_of(Os::Bookworm), &[]);
        eprintln!("==> cargo xtask faults --os trixie {}", faults::BUS_CASES.join(" "));
        let bus_faults = faults::run(&agent, &tree_of(Os::Trixie), faults::BUS_CASES);
        // A suite that could not run at all counts as one failure, so the closing line never
        // says "0 failed" for it.
        for (suite, result) in
            [("e2e", e2e), ("faults", faults), ("faults (trixie)", bus_faults), ("vm (cgroup v2)", vm)]
        {
            match result {
                Ok(t) => tally.add(t),
                Err(e) => {
                    println!("FAIL  {suite} could not run: {e:#}");
                    tally.failed += 1;
                }
            }
        }
        tally.close("end-to-end scenario(s) and fault case(s)")
    })
}

/// This xtask with `args` in the background, its stdout and stderr into `log`.
fn spawn_logged(args: &[&str], log: &std::path::Path) -> Result<std::process::Child> {
    let file = std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    std::process::Command::new(std::env::current_exe().context("cannot find this xtask binary")?)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .context("cannot start the child xtask")
}

/// Waits for a [`spawn_logged`] suite, prints its PASS/FAIL lines and report from the log, and
/// returns its count from the closing `N passed, N failed` line (an error when it has none).
fn finish_logged(mut child: std::process::Child, log: &std::path::Path) -> Result<Tally> {
    let status = child.wait().context("waiting for the child xtask")?;
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let (shown, tally) = suite_summary(&text);
    print!("{shown}");
    tally.with_context(|| format!("it ended ({status}) without its count; whole log: {}", log.display()))
}

/// From a suite's log: everything from its first PASS/FAIL line on (its live `==>` progress
/// lines left out) and the count of its closing line.
fn suite_summary(text: &str) -> (String, Option<Tally>) {
    let mut shown = String::new();
    let mut started = false;
    let mut tally = None;
    for line in text.lines() {
        started |= line.starts_with("PASS  [") || line.starts_with("FAIL  [");
        if started && !line.starts_with("==> ") {
            shown += line;
            shown += "\n";
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        if let [passed, "passed,", failed, "failed"] = words.as_slice() {
            if let (Ok(passed), Ok(failed)) = (passed.parse(), failed.parse()) {
                tally = Some(Tally { passed, failed });
            }
        }
    }
    (shown, tally)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_suites_log_gives_its_lines_and_count() {
        let log = "==> vm [vm-trixie]: image\n    image: 2 s\nPASS  [vm-trixie] boots (3.0 s)\n\
                   ==> vm [vm-trixie]: limits\nFAIL  [vm-trixie] limits (1.0 s): no\nos  check\n\
                   1 passed, 1 failed\nerror: 1 VM check(s) failed\n";
        let (shown, tally) = suite_summary(log);
        assert_eq!(tally, Some(Tally { passed: 1, failed: 1 }));
        assert!(shown.starts_with("PASS  [vm-trixie] boots"), "{shown}");
        assert!(!shown.contains("==> "), "{shown}");
        assert!(shown.contains("FAIL  [vm-trixie] limits (1.0 s): no\nos  check\n"), "{shown}");
        assert_eq!(suite_summary("error: no qemu\n").1, None);
    }

    #[test]
    fn takes_the_os_out_of_the_arguments() {
        let (oses, rest) = take_os(&["--os", "trixie", "load"], Os::ALL).unwrap();
        assert_eq!((oses, rest), (vec![Os::Trixie], vec!["load"]));
        let (oses, rest) = take_os(&["watchdog", "--os=12"], Os::ALL).unwrap();
        assert_eq!((oses, rest), (vec![Os::Bookworm], vec!["watchdog"]));
        let (oses, rest) = take_os(&[], Os::ALL).unwrap();
        assert_eq!((oses, rest), (Os::ALL.to_vec(), vec![]));
        assert_eq!(take_os(&["--os", "all"], &[Os::Bookworm]).unwrap().0, Os::ALL);
        assert!(take_os(&["--os"], Os::ALL).is_err());
        assert!(take_os(&["--os", "sid"], Os::ALL).is_err());
    }
}
