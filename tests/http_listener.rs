//! The health endpoint against a real TCP listener: methods, bodies, slow and idle clients,
//! the connection bound, and what responses must never contain.

use executor_agent::checks::{CheckSet, Observation, CHECK_NAMES};
use executor_agent::http::{self, AppState, Limits, Snapshot};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    _snapshot: tokio::sync::watch::Sender<Snapshot>,
}

async fn start(limits: Limits) -> Server {
    let mut checks = CheckSet::pending(SystemTime::now());
    checks.record(CHECK_NAMES.iter().map(|&n| Observation::pass(n, "fine")).collect(), SystemTime::now());
    let runner =
        http::Runner { user: "core".into(), uid: 1000, socket: "/run/user/1000/podman/podman.sock".into() };
    let (tx, rx) = tokio::sync::watch::channel(Snapshot::new(checks, Default::default(), &runner));
    let state = Arc::new(AppState {
        snapshot: rx,
        started: Instant::now(),
        liveness_limit: Duration::from_secs(60),
        metrics: Arc::new(executor_agent::metrics::Metrics::new()),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(http::serve(listener, http::app(state), limits, async {
        let _ = stopped.await;
    }));
    Server { addr, stop: Some(stop), task, _snapshot: tx }
}

fn limits() -> Limits {
    Limits {
        max_connections: 8,
        header_read_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(2),
        max_body: 1024,
    }
}

/// Sends raw bytes and reads until the server closes or answers completely.
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status_line(response: &str) -> &str {
    response.lines().next().unwrap_or("")
}

#[tokio::test]
async fn answers_get_and_refuses_other_methods() {
    let server = start(limits()).await;
    let ok = exchange(server.addr, b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status_line(&ok), "HTTP/1.1 200 OK");
    assert!(ok.contains("\"ready\":true"), "{ok}");
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        let request =
            format!("{method} /readyz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        let response = exchange(server.addr, request.as_bytes()).await;
        assert_eq!(status_line(&response), "HTTP/1.1 405 Method Not Allowed", "{method}");
    }
    let head = exchange(server.addr, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status_line(&head), "HTTP/1.1 200 OK");
}

#[tokio::test]
async fn refuses_bodies_over_the_limit_and_chunked_ones() {
    let server = start(limits()).await;
    let big = exchange(
        server.addr,
        b"GET /readyz HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_line(&big), "HTTP/1.1 413 Payload Too Large");
    let chunked = exchange(
        server.addr,
        b"POST /readyz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status_line(&chunked), "HTTP/1.1 413 Payload Too Large");
}

#[tokio::test]
async fn closes_a_slowloris_connection_within_the_header_timeout() {
    let server = start(limits()).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let started = Instant::now();
    // One header byte every 100 ms: never a complete request.
    let closed = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if stream.write_all(b"X").await.is_err() {
            break started.elapsed();
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(1), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break started.elapsed(),
            Ok(Ok(_)) => break started.elapsed(),
            Err(_) => {}
        }
        assert!(started.elapsed() < Duration::from_secs(5), "slow client still connected after 5 s");
    };
    assert!(closed < Duration::from_secs(2), "closed after {closed:?}");
}

#[tokio::test]
async fn drops_idle_connections_and_bounds_concurrent_ones() {
    let server = start(limits()).await;
    // Fill every slot with clients that send nothing.
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(TcpStream::connect(server.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A ninth client is queued, not served, while the slots are taken...
    let started = Instant::now();
    let response =
        exchange(server.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    let waited = started.elapsed();
    assert_eq!(status_line(&response), "HTTP/1.1 200 OK");
    // ...until the idle ones are dropped by the header timeout (0.5 s).
    assert!(waited >= Duration::from_millis(300), "served after {waited:?}: the bound did not hold");
    assert!(waited < Duration::from_secs(3), "served after {waited:?}: idle clients were not dropped");
    for mut stream in idle {
        let mut buf = [0u8; 16];
        let n =
            tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf)).await.unwrap().unwrap_or(0);
        assert_eq!(n, 0, "an idle connection was left open");
    }
}

#[tokio::test]
async fn keep_alive_serves_several_requests() {
    let server = start(limits()).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    for _ in 0..3 {
        stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut buf = vec![0u8; 512];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200 OK"));
    }
}

#[tokio::test]
async fn responses_carry_no_environment_or_secrets() {
    // A value that would only show up if the process environment leaked into a response.
    std::env::set_var("EXECUTOR_AGENT_TEST_CANARY", "canary-4f1e9d2c-secret");
    let server = start(limits()).await;
    for path in ["/healthz", "/readyz", "/status", "/nope"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let response = exchange(server.addr, request.as_bytes()).await;
        assert!(!response.contains("canary-4f1e9d2c"), "{path} leaked the environment");
        assert!(!response.to_lowercase().contains("server: "), "{path} names the server software");
    }
}

#[tokio::test]
async fn shuts_down_gracefully() {
    let mut server = start(limits()).await;
    server.stop.take().unwrap().send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(6), &mut server.task).await.unwrap().unwrap();
    assert!(TcpStream::connect(server.addr).await.is_err());
}
