//! The Docker-compatible Podman API over its Unix socket: a small HTTP/1 client (`get`,
//! `request`, [`Client`]), proof that the API answers (`probe`), and typed calls for images
//! and containers ([`objects`]). `wait-ready` shares `get` over TCP.

pub mod objects;

use anyhow::{anyhow, bail, Context, Result};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
pub use hyper::Method;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// The most of an engine's error message that a check's detail carries.
pub const MAX_MESSAGE_CHARS: usize = 300;
/// Largest response body `get` reads; `/version` is about 1 KiB.
const MAX_BODY: usize = 64 * 1024;
/// Largest body [`Client`] reads: `/images/json` of a CI node with hundreds of tagged images
/// is a few hundred KiB, so this leaves room without letting a broken peer fill memory.
pub const MAX_LIST_BODY: usize = 16 * 1024 * 1024;

/// One GET request on an already connected stream; returns status and body.
pub async fn get<S>(stream: S, host: &str, path: &str) -> Result<(u16, Bytes)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    request(stream, host, Method::GET, path, None, MAX_BODY).await
}

/// One request on an already connected stream, with an optional JSON body; returns status
/// and body (at most `max_body` bytes, else an error).
pub async fn request<S>(
    stream: S,
    host: &str,
    method: Method,
    path: &str,
    json: Option<&serde_json::Value>,
    max_body: usize,
) -> Result<(u16, Bytes)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let body = match json {
        Some(value) => {
            Some(RequestBody { content_type: "application/json", bytes: serde_json::to_vec(value)?.into() })
        }
        None => None,
    };
    request_with_body(stream, host, method, path, body, max_body).await
}

/// A request body with its media type (JSON documents, or a tar for an image import).
#[derive(Clone, Debug)]
pub struct RequestBody {
    pub content_type: &'static str,
    pub bytes: Bytes,
}

/// [`request`] with any body.
pub async fn request_with_body<S>(
    stream: S,
    host: &str,
    method: Method,
    path: &str,
    body: Option<RequestBody>,
    max_body: usize,
) -> Result<(u16, Bytes)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    let driver = tokio::spawn(conn);
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::USER_AGENT, concat!("executor-agent/", env!("CARGO_PKG_VERSION")));
    let body = match body {
        Some(body) => {
            builder = builder.header(hyper::header::CONTENT_TYPE, body.content_type);
            body.bytes
        }
        None => Bytes::new(),
    };
    let response = sender.send_request(builder.body(Full::new(body))?).await?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), max_body)
        .collect()
        .await
        .map_err(|e| anyhow!("reading the response body: {e}"))?
        .to_bytes();
    driver.abort();
    Ok((status, body))
}

/// A non-2xx answer, with the engine's own message (`{"message": ...}` in the Docker API).
/// Callers tell cases apart by `status` (404 no such object, 409 conflict such as in use).
#[derive(Debug, thiserror::Error)]
#[error("{method} {path} answered {status}: {message}")]
pub struct ApiError {
    pub method: Method,
    pub path: String,
    pub status: u16,
    pub message: String,
}

impl ApiError {
    /// The status of an [`ApiError`] anywhere in an error's chain.
    pub fn status_of(err: &anyhow::Error) -> Option<u16> {
        err.chain().find_map(|e| e.downcast_ref::<ApiError>()).map(|e| e.status)
    }

    pub(crate) fn new(method: Method, path: &str, status: u16, body: &[u8]) -> Self {
        #[derive(Deserialize)]
        struct Message {
            message: String,
        }
        // The engine's text is the runner user's to shape (its Podman, its images): one
        // bounded line, whatever it sent. A whole HTML page or a stack trace would drown
        // the check's detail.
        let message = match serde_json::from_slice::<Message>(body) {
            Ok(m) => crate::text::one_line(&m.message, MAX_MESSAGE_CHARS),
            Err(_) => crate::text::one_line(&String::from_utf8_lossy(body), MAX_MESSAGE_CHARS),
        };
        ApiError { method, path: path.to_string(), status, message }
    }
}

/// The API at a Unix socket. Each request opens its own connection and is bounded by
/// `timeout`, connecting included: a hung engine must not hang the caller.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        Client { socket: socket.into(), timeout }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// One request; the answer whatever its status.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        json: Option<&serde_json::Value>,
    ) -> Result<(u16, Bytes)> {
        let body = match json {
            Some(value) => Some(RequestBody {
                content_type: "application/json",
                bytes: serde_json::to_vec(value)?.into(),
            }),
            None => None,
        };
        self.send_body(method, path, body).await
    }

    /// [`Client::send`] with any body.
    pub async fn send_body(
        &self,
        method: Method,
        path: &str,
        body: Option<RequestBody>,
    ) -> Result<(u16, Bytes)> {
        let what = format!("{method} {path}");
        tokio::time::timeout(self.timeout, async {
            let stream = tokio::net::UnixStream::connect(&self.socket)
                .await
                .with_context(|| format!("connecting to {}", self.socket.display()))?;
            request_with_body(stream, "d", method, path, body, MAX_LIST_BODY)
                .await
                .with_context(|| what.clone())
        })
        .await
        .map_err(|_| anyhow!("{what}: no answer within {}", humantime::format_duration(self.timeout)))?
    }

    /// One request that must answer 2xx; otherwise an [`ApiError`].
    pub async fn call(&self, method: Method, path: &str, json: Option<&serde_json::Value>) -> Result<Bytes> {
        let (status, body) = self.send(method.clone(), path, json).await?;
        if !(200..300).contains(&status) {
            return Err(ApiError::new(method, path, status, &body).into());
        }
        Ok(body)
    }

    /// [`Client::call`] with any body.
    pub async fn call_body(&self, method: Method, path: &str, body: RequestBody) -> Result<Bytes> {
        let (status, body) = self.send_body(method.clone(), path, Some(body)).await?;
        if !(200..300).contains(&status) {
            return Err(ApiError::new(method, path, status, &body).into());
        }
        Ok(body)
    }

    /// [`Client::call`], with the answer decoded from JSON.
    pub async fn call_json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        json: Option<&serde_json::Value>,
    ) -> Result<T> {
        let body = self.call(method.clone(), path, json).await?;
        serde_json::from_slice(&body).with_context(|| format!("{method} {path}: unexpected answer"))
    }
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
    let client = Client::new(socket, timeout);
    let (status, body) = client.send(Method::GET, "/_ping", None).await?;
    if status != 200 || body.as_ref() != b"OK" {
        bail!(
            "GET /_ping answered {status} {:?}, not 200 \"OK\"",
            crate::text::one_line(&String::from_utf8_lossy(&body), 100)
        );
    }
    let (status, body) = client.send(Method::GET, "/version", None).await?;
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

    #[tokio::test]
    async fn json_body_is_sent_and_errors_carry_the_engines_message() {
        let router = axum::Router::new()
            .route(
                "/echo",
                axum::routing::post(|headers: axum::http::HeaderMap, body: axum::body::Bytes| async move {
                    let kind = headers.get("content-type").map(|v| v.to_str().unwrap().to_string());
                    axum::Json(serde_json::json!({"type": kind, "body": String::from_utf8_lossy(&body)}))
                }),
            )
            .route(
                "/gone",
                axum::routing::delete(|| async {
                    (
                        axum::http::StatusCode::NOT_FOUND,
                        axum::Json(
                            serde_json::json!({"cause": "x", "message": "no such image", "response": 404}),
                        ),
                    )
                }),
            );
        let (_dir, sock) = serve(router).await;
        let client = Client::new(&sock, Duration::from_secs(2));
        let echoed: serde_json::Value =
            client.call_json(Method::POST, "/echo", Some(&serde_json::json!({"Image": "a"}))).await.unwrap();
        assert_eq!(echoed, serde_json::json!({"type": "application/json", "body": r#"{"Image":"a"}"#}));

        let err = client.call(Method::DELETE, "/gone", None).await.unwrap_err();
        assert_eq!(ApiError::status_of(&err), Some(404));
        assert_eq!(err.to_string(), "DELETE /gone answered 404: no such image");
    }

    #[tokio::test]
    async fn answers_larger_than_the_limit_are_refused() {
        let router = axum::Router::new().route("/big", route(|| async { "x".repeat(100) }));
        let (_dir, sock) = serve(router).await;
        let connect = || tokio::net::UnixStream::connect(&sock);
        let (status, body) =
            request(connect().await.unwrap(), "d", Method::GET, "/big", None, 100).await.unwrap();
        assert_eq!((status, body.len()), (200, 100));
        let err = request(connect().await.unwrap(), "d", Method::GET, "/big", None, 99).await.unwrap_err();
        assert!(err.to_string().contains("reading the response body"), "{err:#}");
    }
}
