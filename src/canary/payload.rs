//! What runs inside the canary's containers: the agent's own binary, started as
//! `executor-agent canary-payload service PORT` (the "service" a job talks to) or
//! `executor-agent canary-payload job HOST PORT NONCE` (the "job"). Plain blocking std code:
//! no runtime, no configuration, nothing read from the node.
//!
//! The job exits with a code per stage so the agent can name what failed without parsing
//! text; its one line on stderr says why.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// The first argument that selects the payload instead of the agent's command line.
pub const ARG: &str = "canary-payload";
/// Where the job mounts the round's named volume.
pub const VOLUME_MOUNT: &str = "/data";

/// Exit codes of the job, one per stage it proves.
pub const EXIT_DNS: i32 = 21;
pub const EXIT_EXCHANGE: i32 = 22;
pub const EXIT_VOLUME: i32 = 23;
pub const EXIT_USAGE: i32 = 2;

/// How long the job keeps trying to resolve and reach the service (aardvark-dns and the
/// service's listener may come up a moment after the job starts).
const JOB_PATIENCE: Duration = Duration::from_secs(10);
/// A request or answer line is at most this long.
const MAX_LINE: u64 = 256;

/// The service's answer to a line: what the job and the agent expect back.
pub fn answer(line: &str) -> String {
    format!("canary-service {line}\n")
}

/// Runs the payload named by `args` (after `canary-payload`); returns the exit code.
pub fn main(args: &[String]) -> i32 {
    match args {
        [mode, port] if mode == "service" => match port.parse::<u16>() {
            Ok(port) => service(port),
            Err(_) => usage(),
        },
        [mode, host, port, nonce] if mode == "job" => match port.parse::<u16>() {
            Ok(port) => job(host, port, nonce, JOB_PATIENCE),
            Err(_) => usage(),
        },
        _ => usage(),
    }
}

fn usage() -> i32 {
    eprintln!("usage: executor-agent canary-payload service PORT | job HOST PORT NONCE");
    EXIT_USAGE
}

/// Answers each connection's first line until killed (the agent removes the container).
fn service(port: u16) -> i32 {
    let listener = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("service: cannot listen on port {port}: {e}");
            return 1;
        }
    };
    for stream in listener.incoming().flatten() {
        // One at a time is enough: the job and the agent's probe, a few times a round.
        let _ = serve_one(stream);
    }
    1
}

fn serve_one(stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_LINE)).read_line(&mut line)?;
    (&stream).write_all(answer(line.trim_end()).as_bytes())
}

/// Resolves the service by its network alias, exchanges a line with it, then writes and
/// reads back a file on the volume.
fn job(host: &str, port: u16, nonce: &str, patience: Duration) -> i32 {
    let deadline = Instant::now() + patience;
    let addrs = loop {
        match (host, port).to_socket_addrs() {
            Ok(addrs) => {
                let addrs: Vec<_> = addrs.collect();
                if !addrs.is_empty() {
                    break addrs;
                }
                if Instant::now() >= deadline {
                    eprintln!("dns: {host} resolved to no address");
                    return EXIT_DNS;
                }
            }
            Err(e) if Instant::now() >= deadline => {
                eprintln!("dns: cannot resolve the service alias {host}: {e}");
                return EXIT_DNS;
            }
            Err(_) => {}
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let reply = loop {
        match exchange(&addrs, nonce) {
            Ok(reply) => break reply,
            Err(e) if Instant::now() >= deadline => {
                eprintln!("exchange: {host}:{port} ({}): {e}", addrs[0].ip());
                return EXIT_EXCHANGE;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    if reply != answer(nonce) {
        eprintln!("exchange: {host}:{port} answered something else than the canary service");
        return EXIT_EXCHANGE;
    }
    match volume_round_trip(nonce) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("volume: {VOLUME_MOUNT}: {e}");
            EXIT_VOLUME
        }
    }
}

fn exchange(addrs: &[std::net::SocketAddr], nonce: &str) -> std::io::Result<String> {
    let stream = TcpStream::connect_timeout(&addrs[0], Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    (&stream).write_all(format!("{nonce}\n").as_bytes())?;
    let mut reply = String::new();
    BufReader::new((&stream).take(MAX_LINE)).read_line(&mut reply)?;
    Ok(reply)
}

fn volume_round_trip(nonce: &str) -> std::io::Result<()> {
    let path = std::path::Path::new(VOLUME_MOUNT).join("canary");
    {
        let mut file = std::fs::File::create(&path)?;
        file.write_all(nonce.as_bytes())?;
        file.sync_all()?;
    }
    let back = std::fs::read(&path)?;
    if back != nonce.as_bytes() {
        return Err(std::io::Error::other("read back other bytes than written"));
    }
    std::fs::remove_file(&path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_answers_the_line_it_was_sent() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                let _ = serve_one(s);
            }
        });
        assert_eq!(exchange(&[addr], "n0nce").unwrap(), answer("n0nce"));
    }

    #[test]
    fn an_unresolvable_service_is_a_dns_failure() {
        // `.invalid` never resolves (RFC 6761); the job gives up after its patience.
        let patience = Duration::from_millis(300);
        let started = Instant::now();
        assert_eq!(job("no-such-service.invalid", 1, "x", patience), EXIT_DNS);
        assert!(started.elapsed() >= patience);
    }

    #[test]
    fn bad_arguments_are_a_usage_error() {
        assert_eq!(main(&["job".into(), "h".into()]), EXIT_USAGE);
        assert_eq!(main(&["service".into(), "x".into()]), EXIT_USAGE);
    }
}
