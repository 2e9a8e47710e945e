//! Proof that the Docker-compatible Podman API answers: `GET /_ping` and `GET /version` over
//! the Unix socket, plus the small HTTP GET client that `wait-ready` shares.

use anyhow::{anyhow, bail, Context, Result};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use serde::Deserialize;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// Largest response body we read; `/version` is about 1 KiB.
const MAX_BODY: usize = 64 * 1024;

/// One GET request on an already connected stream; returns status and body.
pub async fn get<S>(stream: S, host: &str, path: &str) -> Result<(u16, Bytes)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    let driver = tokio::spawn(conn);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::USER_AGENT, concat!("executor-agent/", env!("CARGO_PKG_VERSION")))
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| anyhow!("reading the response body: {e}"))?
        .to_bytes();
    driver.abort();
    Ok((status, body))
}

/// What `GET /version` tells about the engine.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EngineVersion {
    pub version: String,
    pub api_version: String,
}

/// Pings the API and reads its version, each request bounded by `timeout`.
pub async fn probe(socket: &Path, timeout: Duration) -> Result<EngineVersion> {
    let request = |path: &'static str| async move {
        tokio::time::timeout(timeout, async {
            let stream = tokio::net::UnixStream::connect(socket)
                .await
                .with_context(|| format!("connecting to {}", socket.display()))?;
            get(stream, "d", path).await.with_context(|| format!("GET {path}"))
        })
        .await
        .map_err(|_| anyhow!("GET {path}: no answer within {}", humantime::format_duration(timeout)))?
    };
    let (status, body) = request("/_ping").await?;
    if status != 200 || body.as_ref() != b"OK" {
        bail!("GET /_ping answered {status} {:?}, not 200 \"OK\"", String::from_utf8_lossy(&body));
    }
    let (status, body) = request("/version").await?;
    if status != 200 {
        bail!("GET /version answered {status}");
    }
    serde_json::from_slice(&body).context("GET /version: the answer is not the Docker API's version document")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get as route;

    async fn serve(router: axum::Router) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("podman.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        (dir, path)
    }

    #[tokio::test]
    async fn healthy_api_reports_its_version() {
        let router = axum::Router::new().route("/_ping", route(|| async { "OK" })).route(
            "/version",
            route(|| async {
                axum::Json(serde_json::json!({"Version": "4.3.1", "ApiVersion": "1.41", "Os": "linux"}))
            }),
        );
        let (_dir, sock) = serve(router).await;
        let v = probe(&sock, Duration::from_secs(2)).await.unwrap();
        assert_eq!(v, EngineVersion { version: "4.3.1".into(), api_version: "1.41".into() });
    }

    #[tokio::test]
    async fn wrong_ping_body_is_an_error() {
        let router = axum::Router::new().route("/_ping", route(|| async { "NOPE" }));
        let (_dir, sock) = serve(router).await;
        let err = probe(&sock, Duration::from_secs(2)).await.unwrap_err();
        assert!(format!("{err:#}").contains("\"NOPE\""), "{err:#}");
    }

    #[tokio::test]
    async fn hanging_api_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("podman.sock");
        // Accepts connections (the kernel backlog does) but never answers.
        let _listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let started = std::time::Instant::now();
        let err = probe(&sock, Duration::from_millis(200)).await.unwrap_err();
        assert!(err.to_string().contains("no answer within 200ms"), "{err:#}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn missing_socket_names_the_path() {
        let err = probe(Path::new("/nonexistent/podman.sock"), Duration::from_secs(1)).await.unwrap_err();
        assert!(format!("{err:#}").contains("connecting to /nonexistent/podman.sock"), "{err:#}");
    }
}
