//! `cargo xtask vm`: what only a real kernel on the unified cgroup hierarchy can show, in ONE
//! qemu boot of a Debian 13 node provisioned by the same Ignition config as the nspawn nodes:
//! the agent gets ready, `cgroup-delegation` reads what user@1000.service really has (with
//! `[cgroups] fix_delegation` off and on, narrowed and repaired by the agent's drop-in), a job
//! container's `--memory`/`--cpus` land in its cgroup and bite, and the canary passes.

use super::runner::{self, indent, Table, Tally};
use crate::harness::node;
use crate::harness::probe::{check, passing_canary};
use crate::harness::tree::{self, Os};
use crate::harness::vm::{self, Vm, VM_NAME};
use crate::render::butane::{File, NodeFields, Resource};
use crate::render::ignition::Extras;
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::path::Path;
use std::time::{Duration, Instant};

/// The OS of the VM (its node tree and the Podman 5 / systemd 257 it brings).
pub const OS: Os = Os::Trixie;
/// A TCG boot: kernel, initramfs, systemd and the agent's first canary round, all emulated,
/// beside the e2e scenarios in `cargo xtask test` (291 s to ready seen on a busy machine).
const SSH_TIMEOUT: Duration = Duration::from_secs(600);
const READY_TIMEOUT: Duration = Duration::from_secs(600);
/// The agent re-inspects on D-Bus signals of the user manager, at the latest every
/// `repair.resync_interval` (30 s); plus the emulation's slowness.
const CHECK_TIMEOUT: Duration = Duration::from_secs(240);
/// What the agent needs delegated (src/steps/host_tools.rs `NEEDED`).
const NEEDED: [&str; 3] = ["cpu", "memory", "pids"];
/// The agent's own drop-in (src/steps/host_tools.rs `DROP_IN`).
const AGENT_DROP_IN: &str = "/etc/systemd/system/user@.service.d/50-executor-agent-delegate.conf";
/// The narrowing drop-in of the test: `Delegate=` lists add up across drop-ins, so it resets
/// the list first; its name sorts before the agent's so that the agent's list adds to it.
const NARROW_DROP_IN: &str = "/etc/systemd/system/user@.service.d/10-vm-narrow.conf";
const CONFIG_DROP_IN: &str = "/etc/executor-agent/config.d/50-vm.toml";
const USER_MANAGER_CGROUP: &str = "/sys/fs/cgroup/user.slice/user-1000.slice/user@1000.service";
const DOCKER: &str = "DOCKER_HOST=unix:///run/user/1000/podman/podman.sock docker";
/// 64 MiB, as `--memory 64m` asks.
const MEMORY_LIMIT: u64 = 64 * 1024 * 1024;
/// Doubles a string to 128 MiB (busybox has no allocator tool, but its awk holds strings).
const ALLOCATE_128M: &str =
    "busybox awk 'BEGIN { s = \"x\"; for (i = 0; i < 27; i++) s = s s; print length(s) }'";

/// The one configuration change for the VM, through Ignition like an operator's: under TCG
/// (and a build machine busy with other work) Podman's first answer after socket activation
/// takes longer than the 5 s the agent gives a request on hardware, and a canary round (image
/// build, two containers, a network) longer than its 30 s. Nothing of the cgroup checks
/// depends on these.
const TCG_CONFIG_PATH: &str = "/etc/executor-agent/config.d/40-vm-tcg.toml";
const TCG_CONFIG: &str = "# The VM tier runs under TCG emulation: some ten times slower than hardware.\n\
                          [podman]\napi_timeout = \"30s\"\n\n[canary]\ntimeout = \"150s\"\n";

fn tcg_extras() -> Extras {
    Extras {
        files: vec![File {
            node: NodeFields { path: TCG_CONFIG_PATH.into(), overwrite: Some(true), ..NodeFields::default() },
            mode: Some(0o644),
            contents: Some(Resource { inline: Some(TCG_CONFIG.into()), ..Resource::default() }),
        }],
        ..Extras::default()
    }
}

/// The run's shared state: the VM, the figures and notes, shown as the other suites show theirs.
struct Checks {
    vm: Vm,
    figures: Vec<(&'static str, String, String)>,
    notes: Vec<String>,
    /// user@1000.service's cgroup.controllers before the test narrowed them.
    delegated: String,
}

impl Checks {
    fn fig(&mut self, case: &'static str, what: impl Into<String>, value: impl Into<String>) {
        let (what, value) = (what.into(), value.into());
        eprintln!("    {what}: {value}");
        self.figures.push((case, what, value));
    }

    fn secs(&mut self, case: &'static str, what: impl Into<String>, took: Duration) {
        self.fig(case, what, format!("{:.1} s", took.as_secs_f64()));
    }

    fn note(&mut self, text: impl Into<String>) {
        let text = text.into();
        eprintln!("    NOTE: {text}");
        self.notes.push(text);
    }
}

type Check = fn(&mut Checks) -> Result<()>;

const CHECKS: &[(&str, Check)] = &[
    ("boots on cgroup v2 only; /readyz 200; cgroup-delegation ok", ready_on_cgroup_v2),
    ("canary: a job with a service, network, volume and port passes", canary_passes),
    ("job limits: --memory 64m --cpus 0.5 set memory.max and cpu.max", limits_in_the_cgroup),
    ("job limits bite: past 64m is OOM-killed, 0.5 CPU is throttled", limits_bite),
    ("delegation narrowed to pids: the check names what is missing", narrowed_delegation_fails),
    ("fix_delegation = true writes its drop-in; user@1000 restarted: ok", fix_repairs_narrowed),
    ("fix_delegation = true on full delegation: ok, nothing written", fix_on_full_delegation),
];

/// `cargo xtask vm`.
pub fn cmd_vm() -> Result<()> {
    let (agent, trees) = node::prepare(&[OS])?;
    let pristine = &trees.first().context("prepare returns the tree asked for")?.1;
    run(&agent, pristine)?.close("VM check(s)")
}

/// Builds the image, boots it once and runs every check on it in order (each builds on the
/// state the ones before left); returns the count (the caller prints the closing line).
/// Fails only when the VM could not be set up at all.
pub fn run(agent: &Path, pristine: &Path) -> Result<Tally> {
    let started = Instant::now();
    eprintln!("\n==> vm [{VM_NAME}]: qemu, kernel tree, image");
    let t = Instant::now();
    let qemu = vm::ensure_qemu()?;
    let qemu_took = t.elapsed();
    let (kernel_tree, kernel_built) = vm::ensure_kernel_tree(pristine)?;
    let (image, image_times) = vm::build_image(&kernel_tree, agent, &tcg_extras())?;
    node::finish_deletions();
    let mut setup = vec![(format!("qemu-system-x86 {} unpacked/checked", qemu.version), qemu_took)];
    setup.push(match kernel_built {
        Some(took) => ("kernel tree built (linux-image-amd64, initramfs-tools)".to_string(), took),
        None => ("kernel tree (cached)".to_string(), Duration::ZERO),
    });
    setup.extend(image_times);
    eprintln!(
        "==> booting {VM_NAME} (TCG; console log {})",
        vm::vm_dir().join(format!("{VM_NAME}.log")).display()
    );
    let vm = Vm::boot(&qemu, image)?;
    let mut checks = Checks { vm, figures: Vec::new(), notes: Vec::new(), delegated: String::new() };
    let image_total: Duration = setup.iter().map(|(_, d)| *d).sum();
    for (what, took) in setup {
        checks.secs("image", what, took);
    }
    checks.secs("image", "image build time, all of the above", image_total);
    checks.note(format!(
        "{TCG_CONFIG_PATH} (Ignition): [podman] api_timeout = \"30s\", [canary] timeout = \"150s\" for TCG"
    ));

    let mut tally = Tally::default();
    let mut ready = true;
    for (label, check) in CHECKS {
        eprintln!("\n==> vm [{VM_NAME}]: {label}");
        let t = Instant::now();
        if !ready {
            tally.failed += 1;
            println!("FAIL  [{VM_NAME}] {label} (0.0 s): not run: the VM did not get ready");
            continue;
        }
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&mut checks)))
            .unwrap_or_else(|_| Err(anyhow!("the check panicked")));
        match outcome {
            Ok(()) => {
                tally.passed += 1;
                println!("PASS  [{VM_NAME}] {label} ({:.1} s)", t.elapsed().as_secs_f64());
            }
            Err(e) => {
                tally.failed += 1;
                println!("FAIL  [{VM_NAME}] {label} ({:.1} s): {e:#}", t.elapsed().as_secs_f64());
                println!(
                    "  last console lines of {}:\n{}",
                    checks.vm.console.display(),
                    indent(&checks.vm.console_tail(30))
                );
                if let Ok(journal) =
                    checks.vm.run("journalctl -u executor-agent --no-pager -o short-monotonic -n 30")
                {
                    println!("  the agent's last journal lines:\n{}", indent(&journal));
                }
                ready &= *label != CHECKS[0].0;
            }
        }
    }
    checks.vm.stop();
    print!("{}", report(&checks.figures, &checks.notes));
    println!();
    println!(
        "vm wall time on {OS}: {:.1} s ({} of {} checks passed)",
        started.elapsed().as_secs_f64(),
        tally.passed,
        tally.passed + tally.failed
    );
    Ok(tally)
}

/// The figure table (the runner's layout, with the VM's widths), then the notes.
fn report(figures: &[(&'static str, String, String)], notes: &[String]) -> String {
    const LAYOUT: Table = Table { case: 12, figure: 64, value: 12, value_title: "value", rule: 100 };
    let rows = figures.iter().map(|(case, what, value)| [VM_NAME, *case, what.as_str(), value.as_str()]);
    let notes: Vec<String> = notes.iter().map(|n| format!("[{VM_NAME}] {n}")).collect();
    runner::table(["vm", "check", "figure"], &LAYOUT, rows, &notes)
}

// ---- the checks ----

fn ready_on_cgroup_v2(c: &mut Checks) -> Result<()> {
    const CASE: &str = "boot";
    let boot = c.vm.boot_started;
    let ssh = c.vm.wait_ssh(SSH_TIMEOUT)?;
    c.secs(CASE, "boot to first SSH login (root)", ssh - boot);
    let state = c.vm.wait_systemd()?;
    c.secs(CASE, "boot to systemd running", boot.elapsed());
    c.fig(CASE, "systemctl is-system-running", state);
    let (ready_at, json) = c.vm.wait_readyz(true, READY_TIMEOUT)?;
    c.secs(CASE, "boot to /readyz 200", ready_at - boot);
    let fs = c.vm.run("stat -fc %T /sys/fs/cgroup")?;
    ensure!(fs.trim() == "cgroup2fs", "/sys/fs/cgroup is {} in the VM, not cgroup2fs", fs.trim());
    ensure!(
        c.vm.run("test -e /sys/fs/cgroup/unified && echo hybrid || echo unified")?.trim() == "unified",
        "the VM mounts a hybrid hierarchy"
    );
    let root = c.vm.run("cat /sys/fs/cgroup/cgroup.controllers")?;
    c.fig(CASE, "kernel's cgroup v2 controllers", root.trim());
    let kernel = c.vm.run("uname -r")?;
    c.fig(CASE, "kernel", kernel.trim());
    let status = c.vm.run("systemctl show -p StatusText --value executor-agent")?;
    eprintln!("    StatusText: {}", status.trim());
    c.delegated = user_manager_controllers(&mut c.vm)?;
    let detail = passing_delegation(&json, &c.delegated)?;
    c.fig(CASE, "user@1000.service cgroup.controllers", c.delegated.clone());
    eprintln!("    cgroup-delegation: {detail}");
    Ok(())
}

fn canary_passes(c: &mut Checks) -> Result<()> {
    const CASE: &str = "canary";
    let (detail, round) = passing_canary(&c.vm.readyz()?.1)?;
    eprintln!("    canary: {detail}");
    if let Some(round) = round {
        c.secs(CASE, "last canary round (TCG)", round);
    }
    Ok(())
}

fn limits_in_the_cgroup(c: &mut Checks) -> Result<()> {
    const CASE: &str = "limits";
    let t = Instant::now();
    c.vm.run_as_core(&format!("podman import --quiet {} localhost/busybox >/dev/null", tree::IMAGE_TAR))
        .context("importing the test image as core")?;
    c.secs(CASE, "podman import of the test image", t.elapsed());
    let t = Instant::now();
    let id =
        c.vm.run_as_core(&format!("{DOCKER} run -d --memory 64m --cpus 0.5 localhost/busybox sleep 300"))?;
    let id = id.trim().to_string();
    ensure!(
        id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "docker run -d printed {id:?}, not an ID"
    );
    c.secs(CASE, "docker run -d through the socket", t.elapsed());
    let cgroup = container_cgroup(&mut c.vm, &id)?;
    eprintln!("    the container's process is in {cgroup}");
    let limits = limits_along(&mut c.vm, &cgroup)?;
    for (dir, memory, cpu) in &limits {
        eprintln!("      {dir}: memory.max {memory}, cpu.max {cpu}");
    }
    let (mem_dir, memory) = effective(&limits, |(_, m, _)| parse_memory_max(m).ok().flatten())
        .context("no cgroup from the container up to user@1000.service has a memory.max")?;
    ensure!(memory == MEMORY_LIMIT, "memory.max is {memory} in {mem_dir}, not {MEMORY_LIMIT}");
    let (cpu_dir, cpu) = effective(&limits, |(_, _, c)| match parse_cpu_max(c) {
        Ok((Some(quota), period)) => Some((quota, period)),
        _ => None,
    })
    .context("no cgroup from the container up to user@1000.service has a cpu.max quota")?;
    ensure!(cpu == (50_000, 100_000), "cpu.max is {cpu:?} in {cpu_dir}, not \"50000 100000\"");
    ensure!(
        mem_dir.contains(&id[..12]) && cpu_dir.contains(&id[..12]),
        "the limits are not on the container's own cgroup ({mem_dir}, {cpu_dir})"
    );
    c.fig(CASE, format!("memory.max of {}", short(&mem_dir)), memory.to_string());
    c.fig(CASE, format!("cpu.max of {}", short(&cpu_dir)), format!("{} {}", cpu.0, cpu.1));
    c.vm.run_as_core(&format!("{DOCKER} rm -f {id} >/dev/null"))?;
    Ok(())
}

fn limits_bite(c: &mut Checks) -> Result<()> {
    const CASE: &str = "limits";
    let t = Instant::now();
    let tight =
        c.vm.as_core(&format!("{DOCKER} run --name vm-oom --memory 64m localhost/busybox {ALLOCATE_128M}"))?;
    let state = c.vm.run_as_core(&format!(
        "{DOCKER} inspect --format '{{{{.State.OOMKilled}}}} {{{{.State.ExitCode}}}}' vm-oom"
    ))?;
    c.vm.run_as_core(&format!("{DOCKER} rm -f vm-oom >/dev/null"))?;
    ensure!(
        tight.status.code() == Some(137),
        "128 MiB under --memory 64m was not killed: exit {:?}, printed {:?}, state {}",
        tight.status.code(),
        String::from_utf8_lossy(&tight.stdout).trim(),
        state.trim()
    );
    // The kernel names a memory cgroup OOM (not a VM-wide one) and the job's UID.
    let kernel = c.vm.run("dmesg | grep -i 'memory cgroup out of memory' | tail -n 1")?;
    ensure!(!kernel.trim().is_empty(), "exit 137 but the kernel logged no memory cgroup OOM kill");
    ensure!(kernel.contains("UID:1000"), "the memory cgroup OOM kill was not core's job: {}", kernel.trim());
    c.secs(CASE, "128 MiB under --memory 64m: exit 137 (OOM kill)", t.elapsed());
    c.fig(CASE, "docker inspect: OOMKilled ExitCode", state.trim());
    eprintln!("    kernel: {}", kernel.trim());
    if !state.trim().starts_with("true") {
        c.note(format!(
            "Podman's State.OOMKilled says {:?} though the kernel killed the job for its cgroup",
            state.trim()
        ));
    }

    let id = c
        .vm
        .run_as_core(&format!("{DOCKER} run -d --cpus 0.5 localhost/busybox sh -c 'while :; do :; done'"))?;
    let id = id.trim().to_string();
    let cgroup = container_cgroup(&mut c.vm, &id)?;
    let dir = format!("/sys/fs/cgroup{cgroup}");
    // Two readings 3 s apart, after a second to get going.
    let text = c.vm.run(&format!(
        "sleep 1; cat {dir}/cpu.stat; echo ---; date +%s%N; sleep 3; date +%s%N; echo ---; cat {dir}/cpu.stat"
    ))?;
    c.vm.run_as_core(&format!("{DOCKER} rm -f {id} >/dev/null"))?;
    let parts: Vec<&str> = text.split("---\n").collect();
    ensure!(parts.len() == 3, "unexpected cpu.stat readings: {text}");
    let (before, after) = (parse_cpu_stat(parts[0]), parse_cpu_stat(parts[2]));
    let clock: Vec<u64> = parts[1].lines().filter_map(|l| l.trim().parse().ok()).collect();
    ensure!(clock.len() == 2, "unexpected clock readings: {}", parts[1]);
    let wall_us = (clock[1] - clock[0]) as f64 / 1000.0;
    let get = |m: &std::collections::BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
    let used = (get(&after, "usage_usec") - get(&before, "usage_usec")) as f64 / wall_us;
    let throttled = get(&after, "nr_throttled") - get(&before, "nr_throttled");
    c.fig(CASE, "busy loop under --cpus 0.5: CPUs used", format!("{used:.2}"));
    c.fig(CASE, "busy loop under --cpus 0.5: periods throttled in 3 s", throttled.to_string());
    ensure!(throttled > 0, "the busy loop was never throttled: cpu.stat {before:?} -> {after:?}");
    // TCG's clock makes the reading noisy (0.54-0.59 seen); unthrottled it would be near 1.
    ensure!(used < 0.75, "the busy loop used {used:.2} CPUs under --cpus 0.5");
    Ok(())
}

fn narrowed_delegation_fails(c: &mut Checks) -> Result<()> {
    const CASE: &str = "delegation";
    // fix_delegation is false here (the default of ignition/config.toml).
    let t = Instant::now();
    c.vm.run(&format!(
        "mkdir -p /etc/systemd/system/user@.service.d && \
         printf '[Service]\\nDelegate=\\nDelegate=pids\\n' >{NARROW_DROP_IN} && \
         systemctl daemon-reload && systemctl restart user@1000.service"
    ))?;
    let now = user_manager_controllers(&mut c.vm)?;
    let missing: Vec<&str> = NEEDED.iter().copied().filter(|n| !now.split(' ').any(|x| x == *n)).collect();
    ensure!(
        !missing.is_empty(),
        "Delegate=pids did not narrow user@1000.service: its cgroup.controllers still says {now:?}"
    );
    c.fig(CASE, "user@1000.service cgroup.controllers, narrowed", now.clone());
    let want = format!(
        "user@1000.service has {now} delegated, missing {}: job containers that set {} limits fail to \
         start (crun: controller is not available); [cgroups] fix_delegation = true adds a Delegate= drop-in",
        missing.join(" "),
        missing.join(", ")
    );
    let check = wait_delegation(&mut c.vm, |ch| ch["ok"] == false)?;
    c.secs(CASE, "narrowed + user@1000 restarted to the check failing", t.elapsed());
    let detail = check["detail"].as_str().unwrap_or_default();
    eprintln!("    cgroup-delegation: {detail}");
    ensure!(check["required"] == false, "cgroup-delegation is not advisory: {check}");
    ensure!(detail == want, "the failing check says\n  {detail}\nnot\n  {want}");
    // What a job with limits meets on this node (what the check's words say), once the agent
    // has the socket back after the user manager's restart.
    wait_check(&mut c.vm, "podman-api", |ch| ch["ok"] == true)?;
    // Detached: the attached CLI only says "unable to upgrade to tcp, received 500".
    let job = c.vm.as_core(&format!("{DOCKER} run -d --name vm-cpus --cpus 0.5 localhost/busybox true"))?;
    c.vm.run_as_core(&format!("{DOCKER} rm -f vm-cpus >/dev/null 2>&1 || true"))?;
    let said = String::from_utf8_lossy(&job.stderr).into_owned();
    let said = said.trim().replace('\n', " | ");
    c.fig(CASE, "docker run --cpus 0.5, cpu not delegated: exit", format!("{:?}", job.status.code()));
    eprintln!("    docker run --cpus 0.5 said: {said}");
    if missing.contains(&"cpu") {
        ensure!(
            !job.status.success() && said.contains("is not available"),
            "with cpu not delegated, docker run --cpus 0.5 did not fail as the check says (exit {:?}): {said}",
            job.status.code()
        );
    }
    let canary = check_of(&mut c.vm, "canary")?;
    eprintln!("    canary now: {canary}");
    Ok(())
}

fn fix_repairs_narrowed(c: &mut Checks) -> Result<()> {
    const CASE: &str = "delegation";
    let t = Instant::now();
    set_fix_delegation(&mut c.vm, true)?;
    let check = wait_delegation(&mut c.vm, |ch| {
        ch["detail"].as_str().is_some_and(|d| d.contains("is in place and takes effect"))
    })?;
    c.secs(CASE, "fix_delegation = true (agent restarted) to the drop-in in place", t.elapsed());
    let detail = check["detail"].as_str().unwrap_or_default().to_string();
    eprintln!("    cgroup-delegation: {detail}");
    ensure!(check["ok"] == false, "the check passes before user@1000 restarted: {check}");
    ensure!(
        detail.ends_with(&format!(
            "; {AGENT_DROP_IN} is in place and takes effect when user@1000.service restarts \
             (the agent does not restart it: that would stop running jobs)"
        )),
        "unexpected detail: {detail}"
    );
    let text = c.vm.run(&format!(
        "cat {AGENT_DROP_IN}; stat -c '%a %U' {AGENT_DROP_IN} /etc/systemd/system/user@.service.d"
    ))?;
    ensure!(
        text.contains("\n[Service]\nDelegate=cpu cpuset io memory pids\n"),
        "{AGENT_DROP_IN} does not delegate what it should:\n{text}"
    );
    ensure!(
        text.contains("644 root\n755 root"),
        "{AGENT_DROP_IN} or its folder has unexpected modes:\n{text}"
    );
    let loaded = c.vm.run("systemctl show -p DropInPaths --value user@1000.service")?;
    ensure!(loaded.contains(AGENT_DROP_IN), "systemd has not loaded {AGENT_DROP_IN} (no reload?): {loaded}");
    let journal = c.vm.run("journalctl -u executor-agent --no-pager -o cat")?;
    ensure!(
        journal.contains(&format!("wrote {AGENT_DROP_IN}")),
        "the agent's journal does not say it wrote {AGENT_DROP_IN}"
    );
    let t = Instant::now();
    c.vm.run("systemctl restart user@1000.service")?;
    let now = user_manager_controllers(&mut c.vm)?;
    c.fig(CASE, "user@1000.service cgroup.controllers, repaired", now.clone());
    let check = wait_delegation(&mut c.vm, |ch| ch["ok"] == true)?;
    c.secs(CASE, "user@1000 restarted to the check ok", t.elapsed());
    let detail = check["detail"].as_str().unwrap_or_default();
    eprintln!("    cgroup-delegation: {detail}");
    ensure!(detail == format!("user@1000.service has {now} delegated"), "the passing check says {detail:?}");
    Ok(())
}

fn fix_on_full_delegation(c: &mut Checks) -> Result<()> {
    const CASE: &str = "delegation";
    // Back to Debian's own delegation (user@.service's Delegate=), fix_delegation still true.
    let count =
        format!("journalctl -u executor-agent --no-pager -o cat | grep -c 'wrote {AGENT_DROP_IN}' || true");
    let writes_before = c.vm.run(&count)?;
    let t = Instant::now();
    c.vm.run(&format!(
        "rm -f {NARROW_DROP_IN} {AGENT_DROP_IN} && systemctl daemon-reload && systemctl restart user@1000.service"
    ))?;
    let now = user_manager_controllers(&mut c.vm)?;
    ensure!(
        now == c.delegated,
        "user@1000.service has {now:?} after the drop-ins went, not {:?} as at boot",
        c.delegated
    );
    // The check passed before too (with the agent's fuller list): wait for the new words.
    let want = format!("user@1000.service has {now} delegated");
    let check = wait_delegation(&mut c.vm, |ch| ch["ok"] == true && ch["detail"] == want.as_str())?;
    c.secs(CASE, "drop-ins removed + user@1000 restarted to the check ok", t.elapsed());
    let passing = passing_delegation(&serde_json::json!({ "checks": [check] }), &now)?;
    eprintln!("    cgroup-delegation: {passing}");
    // A resync pass (every 30 s) besides the one the restart caused: neither may write.
    c.vm.wait_readyz(true, READY_TIMEOUT)?;
    c.secs(CASE, "drop-ins removed to /readyz 200", t.elapsed());
    let until = t + Duration::from_secs(35);
    if let Some(rest) = until.checked_duration_since(Instant::now()) {
        std::thread::sleep(rest);
    }
    let json = c.vm.readyz()?.1;
    passing_delegation(&json, &now)?;
    let there = c.vm.exec("root", &format!("test -e {AGENT_DROP_IN}"))?;
    ensure!(!there.status.success(), "the agent wrote {AGENT_DROP_IN} though nothing was missing");
    let writes = c.vm.run(&count)?;
    ensure!(
        writes.trim() == writes_before.trim(),
        "the agent's journal says it wrote its drop-in again ({} times before, {} now)",
        writes_before.trim(),
        writes.trim()
    );
    Ok(())
}

// ---- helpers ----

/// A check of a `/readyz` answer by name.
/// `cgroup-delegation` passes and says exactly what `controllers` (user@1000.service's
/// cgroup.controllers) holds, the needed ones among them.
fn passing_delegation(json: &serde_json::Value, controllers: &str) -> Result<String> {
    let c = check(json, "cgroup-delegation")?;
    let detail = c["detail"].as_str().unwrap_or_default().to_string();
    ensure!(c["ok"] == true, "cgroup-delegation fails on cgroup v2: {detail}");
    ensure!(
        detail == format!("user@1000.service has {controllers} delegated"),
        "cgroup-delegation says {detail:?}; user@1000.service's cgroup.controllers is {controllers:?}"
    );
    for needed in NEEDED {
        ensure!(controllers.split(' ').any(|x| x == needed), "{needed} is not delegated: {controllers}");
    }
    Ok(detail)
}

/// user@1000.service's cgroup.controllers, one line.
fn user_manager_controllers(vm: &mut Vm) -> Result<String> {
    Ok(vm.run(&format!("cat {USER_MANAGER_CGROUP}/cgroup.controllers"))?.trim().to_string())
}

/// Check `name` of the current `/readyz` answer (200 or 503).
fn check_of(vm: &mut Vm, name: &str) -> Result<serde_json::Value> {
    check(&vm.readyz()?.1, name)
}

/// Polls `/readyz` (200 or 503) until check `name` satisfies `want`.
fn wait_check(
    vm: &mut Vm,
    name: &str,
    want: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let deadline = Instant::now() + CHECK_TIMEOUT;
    loop {
        let last = match check_of(vm, name) {
            Ok(c) if want(&c) => return Ok(c),
            Ok(c) => c.to_string(),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!("{name} did not change as expected within {CHECK_TIMEOUT:?}; last: {last}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn wait_delegation(vm: &mut Vm, want: impl Fn(&serde_json::Value) -> bool) -> Result<serde_json::Value> {
    wait_check(vm, "cgroup-delegation", want)
}

/// Sets `[cgroups] fix_delegation` with a config drop-in and restarts the agent, without
/// waiting for READY=1 (that comes after a canary round, a minute under TCG): the callers
/// wait for what the new process says.
fn set_fix_delegation(vm: &mut Vm, on: bool) -> Result<()> {
    vm.run(&format!(
        "mkdir -p /etc/executor-agent/config.d && printf '[cgroups]\\nfix_delegation = {on}\\n' >{CONFIG_DROP_IN} \
         && systemctl restart --no-block executor-agent"
    ))?;
    Ok(())
}

/// The cgroup (below /sys/fs/cgroup) of a container's main process.
fn container_cgroup(vm: &mut Vm, id: &str) -> Result<String> {
    let pid = vm.run_as_core(&format!("podman inspect --format '{{{{.State.Pid}}}}' {id}"))?;
    let pid = pid.trim();
    ensure!(pid.parse::<u32>().is_ok_and(|p| p > 0), "podman inspect gave PID {pid:?} for {id}");
    let text = vm.run(&format!("cat /proc/{pid}/cgroup"))?;
    parse_proc_cgroup(&text).with_context(|| format!("/proc/{pid}/cgroup has no cgroup v2 line: {text}"))
}

/// memory.max and cpu.max of `cgroup` and each parent up to user@1000.service.
fn limits_along(vm: &mut Vm, cgroup: &str) -> Result<Vec<(String, String, String)>> {
    let stop = USER_MANAGER_CGROUP.trim_start_matches("/sys/fs/cgroup");
    let dirs = ancestors(cgroup, stop);
    ensure!(!dirs.is_empty(), "{cgroup} is not below {stop}");
    let script: Vec<String> = dirs
        .iter()
        .map(|d| format!("echo \"$(cat /sys/fs/cgroup{d}/memory.max)|$(cat /sys/fs/cgroup{d}/cpu.max)\""))
        .collect();
    let out = vm.run(&script.join("; "))?;
    let lines: Vec<&str> = out.lines().collect();
    ensure!(lines.len() == dirs.len(), "unexpected memory.max/cpu.max readings:\n{out}");
    Ok(dirs
        .into_iter()
        .zip(lines)
        .map(|(d, l)| {
            let (m, c) = l.split_once('|').unwrap_or((l, ""));
            (d, m.to_string(), c.to_string())
        })
        .collect())
}

/// The innermost cgroup of `limits` (innermost first) with a limit `get` finds; the limit that
/// binds when only one level sets it, as Podman does.
fn effective<T>(
    limits: &[(String, String, String)],
    get: impl Fn(&(String, String, String)) -> Option<T>,
) -> Option<(String, T)> {
    limits.iter().find_map(|l| get(l).map(|v| (l.0.clone(), v)))
}

/// `cgroup` and its parents, innermost first, down to (not including) `stop`; empty when
/// `cgroup` is not below `stop`.
pub fn ancestors(cgroup: &str, stop: &str) -> Vec<String> {
    let stop = stop.trim_end_matches('/');
    let mut out = Vec::new();
    let mut path = cgroup.trim_end_matches('/');
    while path.len() > stop.len() && path.starts_with(&format!("{stop}/")) {
        out.push(path.to_string());
        path = path.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
    }
    if path != stop {
        return Vec::new();
    }
    out
}

/// The path of the cgroup v2 line (`0::/path`) of a /proc/PID/cgroup text.
pub fn parse_proc_cgroup(text: &str) -> Option<String> {
    text.lines().find_map(|l| l.strip_prefix("0::")).map(|p| p.trim().to_string())
}

/// memory.max: bytes, or None for `max`.
pub fn parse_memory_max(text: &str) -> Result<Option<u64>> {
    match text.trim() {
        "max" => Ok(None),
        t => t.parse().map(Some).with_context(|| format!("memory.max is {t:?}")),
    }
}

/// cpu.max: (quota in µs or None for `max`, period in µs).
pub fn parse_cpu_max(text: &str) -> Result<(Option<u64>, u64)> {
    let mut words = text.split_whitespace();
    let (Some(quota), Some(period), None) = (words.next(), words.next(), words.next()) else {
        bail!("cpu.max is {text:?}, not \"QUOTA PERIOD\"");
    };
    let period = period.parse().with_context(|| format!("cpu.max period {period:?}"))?;
    let quota = match quota {
        "max" => None,
        q => Some(q.parse().with_context(|| format!("cpu.max quota {q:?}"))?),
    };
    Ok((quota, period))
}

/// cpu.stat's `key value` lines.
pub fn parse_cpu_stat(text: &str) -> std::collections::BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// A cgroup path without the user manager's prefix, for the figure table.
fn short(cgroup: &str) -> String {
    let stop = USER_MANAGER_CGROUP.trim_start_matches("/sys/fs/cgroup");
    let rest = cgroup.strip_prefix(stop).unwrap_or(cgroup);
    // libpod-<64 hex>.scope: the first 12 are enough to name it.
    match rest.find("libpod-") {
        Some(i) if rest.len() >= i + 7 + 64 => {
            let (id, tail) = rest[i + 7..].split_at(64);
            format!("{}libpod-{}…{tail}", &rest[..i], &id[..12])
        }
        _ => rest.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_lays_out_its_figures_and_names_the_vm_in_its_notes() {
        let figures = [("limits", "memory.max".to_string(), "67108864".to_string())];
        let text = report(&figures, &["slow".to_string()]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], format!("{:<9} {:<12} {:<64} {:>12}", "vm", "check", "figure", "value"));
        assert_eq!(lines[2].len(), 100);
        assert_eq!(
            lines[3],
            format!("{VM_NAME:<9} {:<12} {:<64} {:>12}", "limits", "memory.max", "67108864")
        );
        assert_eq!(&lines[4..], ["", "notes:", &format!("  - [{VM_NAME}] slow")]);
    }

    #[test]
    fn parses_memory_max_and_cpu_max() {
        assert_eq!(parse_memory_max("67108864\n").unwrap(), Some(67_108_864));
        assert_eq!(parse_memory_max("max\n").unwrap(), None);
        assert!(parse_memory_max("64M").is_err());
        assert_eq!(parse_cpu_max("50000 100000\n").unwrap(), (Some(50_000), 100_000));
        assert_eq!(parse_cpu_max("max 100000").unwrap(), (None, 100_000));
        assert!(parse_cpu_max("50000").is_err());
        assert!(parse_cpu_max("50000 100000 7").is_err());
        assert!(parse_cpu_max("half 100000").is_err());
    }

    #[test]
    fn finds_the_v2_line_and_walks_up_to_the_user_manager() {
        let text = "0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-ab.scope/container\n";
        let cgroup = parse_proc_cgroup(text).unwrap();
        assert!(parse_proc_cgroup("1:name=systemd:/x\n").is_none());
        let stop = "/user.slice/user-1000.slice/user@1000.service";
        assert_eq!(
            ancestors(&cgroup, stop),
            [
                "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-ab.scope/container",
                "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-ab.scope",
                "/user.slice/user-1000.slice/user@1000.service/user.slice",
            ]
        );
        assert!(ancestors("/system.slice/x.service", stop).is_empty());
        assert!(ancestors("/user.slice/user-1000.slice/user@1000.serviceX/y", stop).is_empty());
        let limits = vec![
            ("/a/b/c".to_string(), "max".to_string(), "max 100000".to_string()),
            ("/a/b".to_string(), "67108864".to_string(), "50000 100000".to_string()),
        ];
        let mem = effective(&limits, |(_, m, _)| parse_memory_max(m).ok().flatten());
        assert_eq!(mem, Some(("/a/b".to_string(), 67_108_864)));
    }

    #[test]
    fn parses_cpu_stat() {
        let stat = parse_cpu_stat("usage_usec 1500\nuser_usec 1000\nnr_throttled 7\nthrottled_usec 20\n");
        assert_eq!(stat.get("nr_throttled"), Some(&7));
        assert_eq!(stat.get("usage_usec"), Some(&1500));
    }

    #[test]
    fn shortens_the_container_cgroup() {
        let id = "0123456789abcdef".repeat(4);
        let path = format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{id}.scope");
        assert_eq!(short(&path), "/user.slice/libpod-0123456789ab….scope");
        let inner = format!("{path}/container");
        assert_eq!(short(&inner), "/user.slice/libpod-0123456789ab….scope/container");
    }

    #[test]
    fn the_checks_have_unique_labels() {
        let mut labels: Vec<_> = CHECKS.iter().map(|c| c.0).collect();
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), CHECKS.len());
    }
}
