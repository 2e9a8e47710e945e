//! `cargo xtask`: the project's tasks around a real node (Ignition config, local node, end-to-end tests).

mod bench;
mod butane;
mod e2e;
mod faults;
mod fuzz;
mod gojson;
mod gzip;
mod host;
mod ignition;
mod node;
mod tree;
mod yaml;

use anyhow::{bail, Result};

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  ignition [--check]   render ignition/executor-agent.bu to ignition/executor-agent.ign
                       (--check: fail when the committed .ign is stale); runs ignition-validate
  dist [--url-base U]  build the release binary into target/dist, record its URL and sha512 in
                       ignition/release.toml and the .bu, re-render the .ign
  node                 (root) boot a local throwaway node provisioned by the Ignition config with
                       the freshly built agent, wait until it is ready and show it
  node --shell         (root) open a root shell on the running node
  node --rm            (root) power the node off and delete it
  e2e                  (root) run the end-to-end scenarios, each on a fresh node
  fuzz [--seconds N] [TARGET...]  run the cargo-fuzz targets in fuzz/ for N s each (default 10);
                       fails on a crash and prints the input's path under fuzz/artifacts/
  faults [CASE...]     (root) issue 4's faults, hardened unit and load cases, each on a fresh node
                       (--list names them)
  bench [OPTIONS]      (root) time to ready, probe cost, drift and footprint, each against a
                       baseline in the same run; writes docs/performance.md
  test                 (root) everything CI runs: host packages, cargo test, ignition --check,
                       ignition-validate, e2e
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
        ["node"] => node::cmd_node(),
        ["node", "--shell"] => node::cmd_shell(),
        ["node", "--rm"] => node::cmd_rm(),
        ["e2e"] => e2e::cmd_e2e(),
        ["test"] => cmd_test(),
        ["fuzz", rest @ ..] => fuzz::cmd_fuzz(rest),
        ["faults", cases @ ..] => faults::cmd_faults(cases),
        ["bench", rest @ ..] => bench::cmd_bench(rest),
        [] | ["help"] | ["--help"] | ["-h"] => {
            print!("{USAGE}");
            Ok(())
        }
        _ => bail!("unknown arguments {args:?}\n{USAGE}"),
    }
}

/// `cargo xtask test`: what `.ci/run` runs. The node tree is built (or found in the cache)
/// while cargo compiles; the end-to-end scenarios run last, so their summary line closes the log.
fn cmd_test() -> Result<()> {
    host::require_root("cargo xtask test")?;
    host::ensure_packages(host::NODE_HOST_PACKAGES)?;
    host::ensure_packages(host::TEST_HOST_PACKAGES)?;
    std::thread::scope(|s| {
        let tree = s.spawn(tree::ensure);
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
        let pristine = tree.join().map_err(|_| anyhow::anyhow!("building the node tree panicked"))??;
        let agent = checks?;
        eprintln!("==> cargo xtask e2e");
        let e2e = e2e::run(agent.clone(), pristine.clone());
        eprintln!("==> cargo xtask faults");
        let faults = faults::run(agent, pristine, &[]);
        e2e.and(faults)
    })
}
