//! The health endpoint's listener. Under systemd it comes from `executor-agent.socket` (socket
//! activation, sd_listen_fds(3)): systemd binds the port at boot and holds it across agent
//! restarts, crashes and watchdog kills, so the runner user can never bind it in between and
//! answer probes itself (the port is unprivileged, and the agent lowers
//! `net.ipv4.ip_unprivileged_port_start` besides). A connection made while no agent runs
//! waits in the socket's queue and is answered by the next agent. Without `LISTEN_FDS` for
//! this process (tests, `--root`, a hand run) the agent binds `http.listen` itself.
//!
//! The socket unit's address wins over `http.listen`; a difference is said in the journal.

use anyhow::{bail, Context as _, Result};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, OnceLock};

/// The socket unit that holds the health port (`systemd/executor-agent.socket`).
pub const SOCKET_UNIT: &str = "executor-agent.socket";
/// `SD_LISTEN_FDS_START`: the first descriptor systemd passes.
pub const FIRST_FD: RawFd = 3;
/// More descriptors than any socket unit of ours passes: a sign of a broken environment.
const MAX_FDS: u32 = 64;
const VARIABLES: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

/// What the service manager passed to this process.
#[derive(Debug)]
pub enum Passed {
    /// No socket activation: no `LISTEN_PID`, or it names another process (an inherited
    /// environment), or `LISTEN_FDS` is 0 or missing.
    Nothing,
    /// Descriptors 3, 4, ... with their `LISTEN_FDNAMES` names ("" when not given).
    Fds(Vec<(OwnedFd, String)>),
    /// The variables are for this process but unusable.
    Invalid(String),
}

/// How many descriptors `LISTEN_PID`/`LISTEN_FDS` pass to process `pid`, as sd_listen_fds(3)
/// reads them: none unless `LISTEN_PID` is `pid`.
pub fn count_from(listen_pid: Option<&str>, listen_fds: Option<&str>, pid: u32) -> Result<u32, String> {
    let Some(listen_pid) = listen_pid else { return Ok(0) };
    let for_pid: u32 =
        listen_pid.trim().parse().map_err(|_| format!("LISTEN_PID={listen_pid:?} is not a process ID"))?;
    if for_pid != pid {
        return Ok(0);
    }
    let Some(listen_fds) = listen_fds else { return Ok(0) };
    let count: u32 =
        listen_fds.trim().parse().map_err(|_| format!("LISTEN_FDS={listen_fds:?} is not a count"))?;
    if count > MAX_FDS {
        return Err(format!("LISTEN_FDS={count} is more descriptors than a socket unit passes"));
    }
    Ok(count)
}

/// Reads and clears `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` (so no child inherits
/// them), verifies `LISTEN_PID` is this process, and takes ownership of the descriptors from
/// 3 on, marked close-on-exec (the helpers the agent runs as the runner user must never get
/// the listener). The variables are cleared whatever they say, as `sd_listen_fds(1)` does.
///
/// Changing the environment is only safe while no other thread may read it: call it (through
/// [`adopt`]) before the runtime starts.
pub fn take_from_environment() -> Passed {
    let [pid, fds, names] = VARIABLES.map(|v| std::env::var(v).ok());
    for v in VARIABLES {
        std::env::remove_var(v);
    }
    let count = match count_from(pid.as_deref(), fds.as_deref(), std::process::id()) {
        Ok(0) => return Passed::Nothing,
        Ok(n) => n,
        Err(why) => return Passed::Invalid(why),
    };
    let names: Vec<&str> = names.as_deref().map(|n| n.split(':').collect()).unwrap_or_default();
    let mut taken = Vec::new();
    for i in 0..count {
        let fd = FIRST_FD + i as RawFd;
        // SAFETY: F_GETFD/F_SETFD on a descriptor number touch no memory; an fd that is not
        // open fails with EBADF and is never wrapped.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
            return Passed::Invalid(format!(
                "LISTEN_FDS={count} but descriptor {fd} is not open: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: systemd passed the descriptor to this process (LISTEN_PID is ours) and
        // nothing else in it owns or closes it: this is the only place that takes fds 3.. .
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        taken.push((owned, names.get(i as usize).copied().unwrap_or_default().to_string()));
    }
    Passed::Fds(taken)
}

static PASSED: OnceLock<Mutex<Option<Passed>>> = OnceLock::new();

/// Takes what systemd passed, once per process; `main` calls it before any thread starts.
pub fn adopt() {
    PASSED.get_or_init(|| Mutex::new(Some(take_from_environment())));
}

/// What was passed and not yet used (the first call after [`adopt`] gets it).
fn passed() -> Passed {
    adopt();
    let slot = PASSED.get().expect("adopt() initialised it");
    slot.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or(Passed::Nothing)
}

/// How the socket unit's address relates to `http.listen`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fit {
    Same,
    /// `[::]:P` accepting IPv4 too serves what `0.0.0.0:P` would, and IPv6 besides.
    Covers,
    Differs,
}

/// Compares the socket's address (and whether an IPv6 socket takes IPv4 too) to `http.listen`.
pub fn fit(configured: SocketAddr, actual: SocketAddr, dual_stack: bool) -> Fit {
    if configured == actual {
        return Fit::Same;
    }
    let wildcard_v4 = configured.is_ipv4() && configured.ip().is_unspecified();
    let wildcard_v6 = actual.is_ipv6() && actual.ip().is_unspecified();
    if wildcard_v4 && wildcard_v6 && dual_stack && configured.port() == actual.port() {
        Fit::Covers
    } else {
        Fit::Differs
    }
}

fn sockopt_int(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int) -> std::io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and len point to live locals of the sizes given.
    let rc = unsafe {
        libc::getsockopt(fd.as_raw_fd(), level, name, (&mut value as *mut libc::c_int).cast(), &mut len)
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value)
}

/// A passed descriptor as a listening TCP socket, with whether it is a dual-stack `[::]`.
fn as_tcp_listener(fd: OwnedFd) -> Result<(std::net::TcpListener, SocketAddr, bool), String> {
    let kind = sockopt_int(fd.as_fd(), libc::SOL_SOCKET, libc::SO_TYPE)
        .map_err(|e| format!("not a socket ({e})"))?;
    if kind != libc::SOCK_STREAM {
        return Err("not a stream socket".into());
    }
    if sockopt_int(fd.as_fd(), libc::SOL_SOCKET, libc::SO_ACCEPTCONN).map_err(|e| e.to_string())? == 0 {
        return Err("not listening".into());
    }
    let listener = std::net::TcpListener::from(fd);
    let addr = listener.local_addr().map_err(|e| format!("not a TCP socket ({e})"))?;
    let dual_stack = addr.is_ipv6()
        && sockopt_int(listener.as_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY).is_ok_and(|v| v == 0);
    Ok((listener, addr, dual_stack))
}

fn describe(addr: SocketAddr, dual_stack: bool) -> String {
    if dual_stack {
        format!("{addr} (IPv6 and IPv4)")
    } else {
        addr.to_string()
    }
}

/// The health endpoint's listener: the one systemd passed (from [`SOCKET_UNIT`]), else
/// `configured` (`http.listen`) bound here.
pub async fn http_listener(configured: SocketAddr) -> Result<tokio::net::TcpListener> {
    match passed() {
        Passed::Nothing => tokio::net::TcpListener::bind(configured)
            .await
            .with_context(|| format!("listening on {configured} (http.listen)")),
        Passed::Invalid(why) => bail!("socket activation by {SOCKET_UNIT}: {why}"),
        Passed::Fds(fds) => {
            let mut chosen = None;
            for (i, (fd, name)) in fds.into_iter().enumerate() {
                let number = FIRST_FD + i as RawFd;
                let name = if name.is_empty() { String::new() } else { format!(" ({name})") };
                match as_tcp_listener(fd) {
                    Ok(found) if chosen.is_none() => chosen = Some(found),
                    Ok((_, addr, _)) => tracing::warn!(
                        "socket activation: ignoring descriptor {number}{name} on {addr}: the health \
                         endpoint serves one address (one ListenStream= in {SOCKET_UNIT})"
                    ),
                    Err(why) => {
                        tracing::warn!("socket activation: ignoring descriptor {number}{name}: {why}")
                    }
                }
            }
            let (listener, actual, dual_stack) = chosen.with_context(|| {
                format!("socket activation by {SOCKET_UNIT}: no listening TCP socket passed")
            })?;
            let at = describe(actual, dual_stack);
            match fit(configured, actual, dual_stack) {
                Fit::Same | Fit::Covers => {
                    tracing::info!(listen = %actual, "listening on {at}, held by {SOCKET_UNIT} (socket activation)")
                }
                Fit::Differs => tracing::warn!(
                    listen = %actual,
                    "http.listen is {configured} but {SOCKET_UNIT} holds {at}: serving there, the socket \
                     unit decides the address. To move it, set ListenStream= in a drop-in \
                     /etc/systemd/system/{SOCKET_UNIT}.d/ (an empty ListenStream= first, then the \
                     address) and keep http.listen equal for `wait-ready`"
                ),
            }
            listener.set_nonblocking(true).context("making the passed listener non-blocking")?;
            tokio::net::TcpListener::from_std(listener).context("registering the passed listener")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_descriptors_meant_for_this_process() {
        assert_eq!(count_from(None, Some("1"), 42), Ok(0));
        assert_eq!(count_from(Some("41"), Some("1"), 42), Ok(0), "another process's variables");
        assert_eq!(count_from(Some("42"), None, 42), Ok(0));
        assert_eq!(count_from(Some("42"), Some("0"), 42), Ok(0));
        assert_eq!(count_from(Some("42"), Some("2"), 42), Ok(2));
        assert!(count_from(Some("x"), Some("1"), 42).unwrap_err().contains("LISTEN_PID"));
        assert!(count_from(Some("42"), Some("-1"), 42).unwrap_err().contains("LISTEN_FDS"));
        assert!(count_from(Some("42"), Some("100000"), 42).is_err());
    }

    /// `KEY=value` lines of a unit file, comments left out.
    fn unit_settings(text: &str) -> Vec<(&str, &str)> {
        text.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split_once('=')).collect()
    }

    #[test]
    fn the_shipped_socket_unit_holds_the_default_port_for_the_service() {
        let socket = unit_settings(include_str!("../../systemd/executor-agent.socket"));
        let default = crate::config::Settings::default().http.listen;
        assert!(socket.contains(&("ListenStream", default.port().to_string().as_str())), "{socket:?}");
        // A dual-stack wildcard: the IPv4 wildcard of http.listen's default is covered.
        assert!(default.ip().is_unspecified());
        for setting in [("BindIPv6Only", "both"), ("FreeBind", "yes"), ("Service", "executor-agent.service")]
        {
            assert!(socket.contains(&setting), "{setting:?} missing: {socket:?}");
        }
        assert!(socket.contains(&("WantedBy", "sockets.target")));
        let service = unit_settings(include_str!("../../systemd/executor-agent.service"));
        for setting in [("Sockets", SOCKET_UNIT), ("Requires", SOCKET_UNIT), ("After", SOCKET_UNIT)] {
            assert!(service.contains(&setting), "{setting:?} missing: {service:?}");
        }
    }

    #[test]
    fn a_dual_stack_wildcard_covers_the_ipv4_wildcard_only() {
        let v4 = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(fit(v4("0.0.0.0:9739"), v4("0.0.0.0:9739"), false), Fit::Same);
        assert_eq!(fit(v4("0.0.0.0:9739"), v4("[::]:9739"), true), Fit::Covers);
        assert_eq!(fit(v4("0.0.0.0:9739"), v4("[::]:9739"), false), Fit::Differs, "IPv6 only");
        assert_eq!(fit(v4("0.0.0.0:9739"), v4("[::]:9740"), true), Fit::Differs);
        // Configured to stay local, but the socket unit listens everywhere: said loudly.
        assert_eq!(fit(v4("127.0.0.1:9739"), v4("[::]:9739"), true), Fit::Differs);
    }
}
