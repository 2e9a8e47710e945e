//! Traffic inside a node's network namespace: wrk (run through nsenter) and its parsed report,
//! and a paced client (one new connection per request, like a health checker). The `/readyz`
//! prober is the harness's (`Pace::FixedRate`, states stamped with CLOCK_MONOTONIC).

use crate::harness::node;
use anyhow::{bail, Context, Result};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What wrk reported.
#[derive(Clone, Debug, Default)]
pub struct WrkReport {
    pub requests_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub requests: u64,
    pub socket_errors: u64,
    /// `connect N, read N, write N, timeout N`, as wrk printed it.
    pub socket_errors_text: String,
    pub non_2xx: u64,
}

/// Runs wrk inside the node's network namespace (`nsenter -n`: only the network namespace, so
/// the host's wrk binary is used) against `url`.
pub fn wrk(leader: i32, url: &str, threads: u32, connections: u32, seconds: u32) -> Result<WrkReport> {
    let out = Command::new("nsenter")
        .args(["-t", &leader.to_string(), "-n", "--", "wrk"])
        .args([format!("-t{threads}"), format!("-c{connections}"), format!("-d{seconds}s")])
        .args(["--latency", url])
        .stdin(Stdio::null())
        .output()
        .context("cannot run wrk")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("wrk failed ({}): {text}{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    parse_wrk(&text).with_context(|| format!("cannot read wrk's report:\n{text}"))
}

/// Several runs of the same test: medians of the rates and latencies, sums of the counts.
pub fn combine(runs: &[WrkReport]) -> WrkReport {
    let med =
        |f: fn(&WrkReport) -> f64| super::median(&runs.iter().map(f).collect::<Vec<_>>()).unwrap_or(0.0);
    WrkReport {
        requests_per_s: med(|r| r.requests_per_s),
        p50_ms: med(|r| r.p50_ms),
        p99_ms: med(|r| r.p99_ms),
        requests: runs.iter().map(|r| r.requests).sum(),
        socket_errors: runs.iter().map(|r| r.socket_errors).sum(),
        socket_errors_text: runs
            .iter()
            .map(|r| r.socket_errors_text.as_str())
            .collect::<Vec<_>>()
            .join(" / "),
        non_2xx: runs.iter().map(|r| r.non_2xx).sum(),
    }
}

fn duration_ms(text: &str) -> Option<f64> {
    let text = text.trim();
    let (num, unit) = text.split_at(text.find(|c: char| c.is_ascii_alphabetic())?);
    let v: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => v / 1000.0,
        "ms" => v,
        "s" => v * 1000.0,
        "m" => v * 60_000.0,
        _ => return None,
    })
}

pub fn parse_wrk(text: &str) -> Result<WrkReport> {
    let mut r = WrkReport::default();
    let mut seen_rps = false;
    for line in text.lines() {
        let line = line.trim();
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            r.requests_per_s = v.trim().parse().context("Requests/sec")?;
            seen_rps = true;
        } else if let Some(v) = line.strip_prefix("50%") {
            r.p50_ms = duration_ms(v).context("50% latency")?;
        } else if let Some(v) = line.strip_prefix("99%") {
            r.p99_ms = duration_ms(v).context("99% latency")?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            r.socket_errors_text = v.trim().to_string();
            r.socket_errors =
                v.split(',').filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok()).sum();
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = v.trim().parse().unwrap_or(0);
        } else if line.contains(" requests in ") {
            r.requests = line.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
        }
    }
    if !seen_rps {
        bail!("no Requests/sec line");
    }
    if r.socket_errors_text.is_empty() {
        r.socket_errors_text = "none".into();
    }
    Ok(r)
}

/// Result of a paced run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Paced {
    pub sent: u64,
    pub ok: u64,
}

/// Sends `GET path` to 127.0.0.1:`port` in the node's network namespace at a fixed rate, each on a
/// new connection (`Connection: close`), for `duration`. Runs on the calling thread's own thread.
pub fn paced(
    leader: i32,
    port: u16,
    path: &str,
    per_second: f64,
    duration: Duration,
) -> std::thread::JoinHandle<Paced> {
    let path = path.to_string();
    std::thread::spawn(move || {
        let mut result = Paced::default();
        if node::enter_netns(leader).is_err() {
            return result;
        }
        let start = Instant::now();
        let period = Duration::from_secs_f64(1.0 / per_second);
        let mut k: u32 = 0;
        loop {
            let due = start + period * k;
            if due >= start + duration {
                break;
            }
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            result.sent += 1;
            if matches!(node::get_local(port, &path), Ok((200 | 503, _))) {
                result.ok += 1;
            }
            k += 1;
        }
        result
    })
}

/// The baseline server running in the node's network namespace (host binary, `nsenter -n`).
pub struct Baseline {
    pub child: std::process::Child,
}

impl Baseline {
    pub fn start(
        leader: i32,
        binary: &std::path::Path,
        port: u16,
        routes: &[(&str, std::path::PathBuf)],
    ) -> Result<Baseline> {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &leader.to_string(), "-n", "--"]).arg(binary).arg(format!("127.0.0.1:{port}"));
        for (path, file) in routes {
            cmd.arg(format!("{path}={}", file.display()));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start the baseline server")?;
        let mut server = Baseline { child };
        // nsenter without -p execs the server in place: the child's PID is the server's.
        let path = routes.first().map(|r| r.0).unwrap_or("/").to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = std::thread::spawn({
                let path = path.clone();
                move || {
                    node::enter_netns(leader).is_ok() && matches!(node::get_local(port, &path), Ok((200, _)))
                }
            })
            .join()
            .unwrap_or(false);
            if ok {
                return Ok(server);
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                bail!("the baseline server exited: {status}");
            }
            if Instant::now() >= deadline {
                bail!("the baseline server did not answer on port {port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_wrk_report() {
        let text = "Running 15s test @ http://127.0.0.1:9739/readyz
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.23ms  456.00us  12.00ms   90.00%
    Req/Sec    25.00k     1.00k   30.00k    70.00%
  Latency Distribution
     50%  612.00us
     75%    1.50ms
     90%    2.00ms
     99%    3.10ms
  750000 requests in 15.00s, 100.00MB read
  Socket errors: connect 0, read 12, write 1, timeout 0
  Non-2xx or 3xx responses: 5
Requests/sec:  50000.50
Transfer/sec:      6.67MB
";
        let r = parse_wrk(text).unwrap();
        assert_eq!(r.requests_per_s, 50000.5);
        assert!((r.p50_ms - 0.612).abs() < 1e-9);
        assert_eq!(r.p99_ms, 3.1);
        assert_eq!(r.socket_errors, 13);
        assert_eq!(r.non_2xx, 5);
        assert_eq!(r.requests, 750000);
        assert_eq!(duration_ms("1.5s"), Some(1500.0));
    }
}
