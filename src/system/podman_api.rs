//! The Docker-compatible Podman API over its Unix socket: [`Client`] (on the project's HTTP
//! client, `crate::http_client`), proof that the API answers (`probe`), and typed calls for
//! images and containers ([`objects`]).

pub mod objects;

pub use crate::http_client::{get, request, request_with_body, RequestBody};

use anyhow::{anyhow, bail, Context, Result};
use hyper::body::Bytes;
pub use hyper::Method;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The most of an engine's error message that a check's detail carries.
pub const MAX_MESSAGE_CHARS: usize = 300;
/// Largest body [`Client`] reads: `/images/json` of a CI node with hundreds of tagged images
/// is a few hundred KiB, so this leaves room without letting a broken peer fill memory.
pub const MAX_LIST_BODY: usize = 16 * 1024 * 1024;

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
///
/// The socket lives in the runner user's `/run/user/UID`, so its path is untrusted: it is
/// opened through [`crate::userfs`] (no symlink the user could have made, anywhere on the
/// way; the final entry must be a socket) and connected to through `/proc/self/fd/N`, so the
/// connection reaches exactly the inode that was checked. With an expected peer, the
/// listener's credentials (`SO_PEERCRED`) must be that UID's before a byte is sent.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
    expected_peer: Option<u32>,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        Client { socket: socket.into(), timeout, expected_peer: None }
    }

    /// Talks only to a listener running as `uid` (the runner user), and only through a socket
    /// and directories owned by `uid` or root.
    pub fn with_expected_peer(mut self, uid: u32) -> Self {
        self.expected_peer = Some(uid);
        self
    }

    pub fn expected_peer(&self) -> Option<u32> {
        self.expected_peer
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A connection to the socket, checked as the type says.
    pub async fn connect(&self) -> Result<tokio::net::UnixStream> {
        let shown = self.socket.display();
        let found = crate::userfs::open_socket(&self.socket, self.expected_peer)
            .with_context(|| format!("connecting to {shown}"))?
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOENT))
            .with_context(|| format!("connecting to {shown}"))?;
        // The O_PATH descriptor names the checked inode; the path may have changed since.
        let stream = tokio::net::UnixStream::connect(crate::userfs::proc_path(&found))
            .await
            .with_context(|| format!("connecting to {shown}"))?;
        drop(found);
        if let Some(uid) = self.expected_peer {
            let peer = stream.peer_cred().with_context(|| format!("asking who listens on {shown}"))?;
            if peer.uid() != uid {
                bail!(
                    "refusing {shown}: the process listening on it runs as UID {}, not the runner user (UID {uid})",
                    peer.uid()
                );
            }
        }
        Ok(stream)
    }

    /// Pings the API and reads its version, each request bounded by the timeout.
    pub async fn probe(&self) -> Result<EngineVersion> {
        let (status, body) = self.send(Method::GET, "/_ping", None).await?;
        if status != 200 || body.as_ref() != b"OK" {
            bail!(
                "GET /_ping answered {status} {:?}, not 200 \"OK\"",
                crate::text::one_line(&String::from_utf8_lossy(&body), 100)
            );
        }
        let (status, body) = self.send(Method::GET, "/version", None).await?;
        if status != 200 {
            bail!("GET /version answered {status}");
        }
        serde_json::from_slice(&body)
            .context("GET /version: the answer is not the Docker API's version document")
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
            let stream = self.connect().await?;
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

/// Pings the API and reads its version, each request bounded by `timeout` ([`Client::probe`]
/// without an expected peer).
pub async fn probe(socket: &Path, timeout: Duration) -> Result<EngineVersion> {
    Client::new(socket, timeout).probe().await
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

    fn ok_router() -> axum::Router {
        axum::Router::new().route("/_ping", route(|| async { "OK" })).route(
            "/version",
            route(|| async { axum::Json(serde_json::json!({"Version": "4.3.1", "ApiVersion": "1.41"})) }),
        )
    }

    fn me() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    use crate::userfs::test_support::users_symlink;

    #[tokio::test]
    async fn a_symlinked_socket_or_directory_is_never_connected_through() {
        let (dir, real) = serve(ok_router()).await;
        // The real socket answers, with or without an expected peer of our own UID.
        probe(&real, Duration::from_secs(2)).await.unwrap();
        Client::new(&real, Duration::from_secs(2)).with_expected_peer(me()).probe().await.unwrap();

        let link = dir.path().join("link.sock");
        users_symlink(&real, &link);
        let err = probe(&link, Duration::from_secs(2)).await.unwrap_err();
        let link = link.display();
        assert_eq!(
            format!("{err:#}"),
            format!(
                "connecting to {link}: refusing {link}: it is a symlink (root follows no link the runner user \
                 could have made)"
            )
        );
        assert_eq!(crate::userfs::refusal_in(&err).map(|r| r.why.clone()), Some(crate::userfs::Why::Symlink));

        // A symlinked directory on the way (podman -> elsewhere) likewise.
        let podman = dir.path().join("podman");
        users_symlink(dir.path(), &podman);
        let err = probe(&podman.join("podman.sock"), Duration::from_secs(2)).await.unwrap_err();
        let refused = crate::userfs::refusal_in(&err).expect("a refusal").clone();
        assert_eq!((refused.path, refused.why), (podman, crate::userfs::Why::Symlink));

        // Something else at the socket's path.
        let file = dir.path().join("file.sock");
        std::fs::write(&file, "").unwrap();
        let err = probe(&file, Duration::from_secs(2)).await.unwrap_err();
        assert!(format!("{err:#}").ends_with("it is a regular file, not a socket"), "{err:#}");
    }

    #[tokio::test]
    async fn a_listener_of_another_uid_is_refused() {
        let (_dir, sock) = serve(ok_router()).await;
        let other = me() + 4242;
        let err =
            Client::new(&sock, Duration::from_secs(2)).with_expected_peer(other).probe().await.unwrap_err();
        assert!(
            err.to_string().ends_with(&format!(
                "refusing {}: the process listening on it runs as UID {}, not the runner user (UID {other})",
                sock.display(),
                me()
            )),
            "{err:#}"
        );
    }

    /// The listener's UID is what is checked, not the socket file's owner: a socket root
    /// bound and another UID listens on (as when a process of the user's listens).
    #[tokio::test]
    async fn the_peer_is_the_process_that_listens() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to listen as another user");
            return;
        }
        const LISTENER: u32 = 4242;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("podman.sock");
        // SAFETY: plain socket calls on a descriptor this test owns; the sockaddr is built
        // before fork, and the child only makes raw system calls (no allocation, no locks)
        // until it is killed.
        let child = unsafe {
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0);
            let mut addr: libc::sockaddr_un = std::mem::zeroed();
            addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
            let bytes = sock.as_os_str().as_encoded_bytes();
            for (i, b) in bytes.iter().enumerate() {
                addr.sun_path[i] = *b as libc::c_char;
            }
            let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
            assert_eq!(libc::bind(fd, std::ptr::addr_of!(addr).cast(), len as libc::socklen_t), 0);
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                // SO_PEERCRED reports who called listen().
                libc::syscall(libc::SYS_setgid, LISTENER);
                libc::syscall(libc::SYS_setuid, LISTENER);
                libc::listen(fd, 8);
                loop {
                    libc::pause();
                }
            }
            libc::close(fd);
            pid
        };
        // Wait until the child listens.
        let client = Client::new(&sock, Duration::from_millis(300));
        let mut outcome = client.clone().with_expected_peer(0).connect().await;
        for _ in 0..100 {
            if outcome.is_ok() || !format!("{:#}", outcome.as_ref().unwrap_err()).contains("refused") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            outcome = client.clone().with_expected_peer(0).connect().await;
        }
        let right = client.clone().with_expected_peer(LISTENER).connect().await;
        // SAFETY: the child is ours.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, std::ptr::null_mut(), 0);
        }
        let err = outcome.expect_err("root is not the listener");
        assert_eq!(
            err.to_string(),
            format!(
                "refusing {}: the process listening on it runs as UID {LISTENER}, not the runner user (UID 0)",
                sock.display()
            )
        );
        right.expect("the listener's own UID is accepted");
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
