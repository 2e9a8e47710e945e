//! What the bench reads about a node's processes from the host's /proc: the processes of a node
//! (descendants of its PID 1), CPU time (utime+stime, and of waited-for children), memory.

use anyhow::{anyhow, Context, Result};

/// Every descendant of `pid` (the node's PID 1 sees all of the node's processes as descendants).
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut pending = vec![pid];
    while let Some(p) = pending.pop() {
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for task in tasks.flatten() {
                let text = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
                for child in text.split_whitespace().filter_map(|c| c.parse::<i32>().ok()) {
                    out.push(child);
                    pending.push(child);
                }
            }
        }
    }
    out
}

/// A process's argv.
pub fn cmdline(pid: i32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    raw.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The first descendant of `leader` whose argv satisfies `want`.
pub fn find(leader: i32, want: impl Fn(&[String]) -> bool) -> Option<i32> {
    descendants(leader).into_iter().find(|p| want(&cmdline(*p)))
}

/// The agent daemon (`/usr/local/bin/executor-agent run`) of a node.
pub fn agent_pid(leader: i32) -> Result<i32> {
    find(leader, |a| a.len() == 2 && a[0].ends_with("executor-agent") && a[1] == "run")
        .ok_or_else(|| anyhow!("no `executor-agent run` process on the node"))
}

/// The agent's child `executor-agent user-manager watch ...` (runs as the runner user).
pub fn watcher_pid(leader: i32) -> Option<i32> {
    find(leader, |a| {
        a.first().is_some_and(|p| p.ends_with("executor-agent"))
            && a.get(1).is_some_and(|s| s == "user-manager")
            && a.get(2).is_some_and(|s| s == "watch")
    })
}

/// core's user manager (`systemd --user`, UID 1000).
pub fn user_manager_pid(leader: i32) -> Option<i32> {
    descendants(leader).into_iter().find(|p| {
        let a = cmdline(*p);
        a.first().is_some_and(|x| x.ends_with("/systemd"))
            && a.get(1).is_some_and(|x| x == "--user")
            && uid(*p) == Some(1000)
    })
}

fn uid(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// CPU time of a process in seconds: its own (utime+stime, all threads, also exited ones) and
/// that of its children it has waited for (cutime+cstime).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    pub own: f64,
    pub children: f64,
}

impl Cpu {
    pub fn total(&self) -> f64 {
        self.own + self.children
    }

    pub fn since(&self, earlier: &Cpu) -> Cpu {
        Cpu { own: self.own - earlier.own, children: self.children - earlier.children }
    }
}

pub fn cpu(pid: i32) -> Result<Cpu> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("malformed /proc/PID/stat")?;
    // After the comm: state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17).
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| -> Result<f64> {
        f.get(i).and_then(|v| v.parse::<f64>().ok()).context("malformed /proc/PID/stat")
    };
    let hz = clock_ticks();
    Ok(Cpu { own: (num(11)? + num(12)?) / hz, children: (num(13)? + num(14)?) / hz })
}

/// A `kB` field of /proc/PID/status (VmRSS, VmHWM) in MiB.
pub fn status_mib(pid: i32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    kib_field(&status, field).map(|k| k / 1024.0).with_context(|| format!("no {field} for {pid}"))
}

/// Proportional set size (shared pages split between the processes that map them) in MiB.
pub fn pss_mib(pid: i32) -> Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("process {pid} is gone"))?;
    kib_field(&text, "Pss").map(|k| k / 1024.0).context("no Pss in smaps_rollup")
}

fn kib_field(text: &str, field: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        (name == field).then(|| value.split_whitespace().next()?.parse::<f64>().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_process() {
        let me = std::process::id() as i32;
        assert!(cpu(me).unwrap().own >= 0.0);
        assert!(status_mib(me, "VmRSS").unwrap() > 0.0);
        assert!(kib_field("VmRSS:\t  5120 kB\n", "VmRSS") == Some(5120.0));
        assert!(!cmdline(me).is_empty());
    }
}
