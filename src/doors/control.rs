//! Controls that change the node (drain, undrain). Never on the open health endpoint: on a
//! root-only Unix socket (peer credentials checked), or over HTTP with a bearer token read
//! from a root-only file when the operator configures one.

use anyhow::{bail, Context as _, Result};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use tokio::sync::Notify;

use crate::drain;
use crate::journal;
use crate::paths::Root;

/// Longest drain reason kept; it is shown in every output.
const MAX_REASON: usize = 200;

#[derive(Clone)]
pub struct ControlState {
    pub root: Root,
    /// Wakes the main loop so the drain shows at once.
    pub wake: Arc<Notify>,
    /// Who is asking, for the record: the socket or the token.
    pub by: &'static str,
    /// Lists the runner user's containers for `GET /jobs` (None with `--root`).
    pub jobs_api: Option<crate::podman_api::Client>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DrainRequest {
    reason: String,
}

/// The control routes, for the Unix socket and (behind the token) for HTTP.
pub fn router(state: ControlState) -> Router {
    Router::new()
        .route("/drain", get(show).post(start_drain))
        .route("/undrain", post(end_drain))
        .route("/jobs", get(jobs))
        .with_state(state)
}

/// A handler's failure: a status and a message, as in axum's anyhow-error-response example.
/// Internal errors carry their chain, one line.
pub struct AppError {
    status: StatusCode,
    message: String,
}

impl AppError {
    fn bad_request(message: String) -> Self {
        AppError { status: StatusCode::BAD_REQUEST, message }
    }
}

impl<E: Into<anyhow::Error>> From<E> for AppError {
    fn from(e: E) -> Self {
        AppError { status: StatusCode::INTERNAL_SERVER_ERROR, message: journal::detail(&e.into()) }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        (self.status, format!("{}\n", self.message)).into_response()
    }
}

type Answer = Result<Json<serde_json::Value>, AppError>;

async fn show(State(state): State<ControlState>) -> Answer {
    let d = drain::current(&state.root)?;
    Ok(Json(serde_json::json!({ "drained": d.is_some(), "drain": d })))
}

async fn start_drain(State(state): State<ControlState>, Json(request): Json<DrainRequest>) -> Answer {
    let reason = request.reason.trim();
    if reason.is_empty() || reason.len() > MAX_REASON || reason.chars().any(char::is_control) {
        return Err(AppError::bad_request(format!("reason must be 1 to {MAX_REASON} printable characters")));
    }
    let record = drain::drain(&state.root, reason, state.by)?;
    tracing::warn!(message_id = journal::NODE_CHANGED, reason, by = state.by, "drained: {reason}");
    state.wake.notify_one();
    Ok(Json(serde_json::json!({ "drained": true, "drain": record })))
}

/// What runs now, asked of the engine at once (`drain --wait` polls it). 503 when the engine
/// cannot be asked: containers outlive their API service, so "unknown" is never "idle".
async fn jobs(State(state): State<ControlState>) -> Answer {
    let Some(api) = &state.jobs_api else {
        return Err(AppError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "no Podman API here".into(),
        });
    };
    match crate::jobs::running(api).await {
        Ok(jobs) => {
            Ok(Json(serde_json::json!({ "running": jobs.any(), "summary": jobs.describe(), "jobs": jobs })))
        }
        Err(e) => Err(AppError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!("cannot list the runner user's containers: {}", journal::detail(&e)),
        }),
    }
}

async fn end_drain(State(state): State<ControlState>) -> Answer {
    let ended = drain::undrain(&state.root)?;
    if ended.is_some() {
        tracing::info!(message_id = journal::NODE_CHANGED, by = state.by, "undrained");
    }
    state.wake.notify_one();
    Ok(Json(serde_json::json!({ "drained": false, "ended": ended })))
}

/// Serves the control routes on a Unix socket that only root may use: the socket is 0600,
/// and every request's peer UID is checked as well (`serve::only_root`). (Its directory stays readable: the
/// runtime configuration drop-ins live beside it.)
pub async fn serve_socket(
    path: &Path,
    state: ControlState,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing the old {}", path.display())),
    }
    // Bind under a umask that leaves no window in which the socket is open to others.
    let old_umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = tokio::net::UnixListener::bind(path);
    nix::sys::stat::umask(old_umask);
    let listener = bound.with_context(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    // The socket's mode already keeps others out; the peer check holds even for a
    // connection passed on by a process that could open it.
    let app = router(state).layer(axum::middleware::from_fn(crate::serve::only_root));
    crate::serve::serve(listener, app, crate::serve::Limits::default(), shutdown).await;
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// Reads the HTTP control token; the file must be root's and unreadable by anyone else.
pub fn read_token(path: &Path) -> Result<String> {
    let meta =
        std::fs::symlink_metadata(path).with_context(|| format!("control.token_file {}", path.display()))?;
    if !meta.file_type().is_file() || meta.uid() != 0 || meta.mode() & 0o077 != 0 {
        bail!(
            "control.token_file {}: must be a regular file owned by root with mode 0600 or stricter",
            path.display()
        );
    }
    let token = std::fs::read_to_string(path)?.trim().to_string();
    if token.len() < 32 {
        bail!("control.token_file {}: the token must be at least 32 characters", path.display());
    }
    Ok(token)
}

/// The control routes over HTTP, each request checked against the token.
pub fn token_router(token: String, state: ControlState) -> Router {
    let token = Arc::new(token);
    router(state).layer(axum::middleware::from_fn(
        move |headers: HeaderMap, request, next: axum::middleware::Next| {
            let token = token.clone();
            async move {
                let presented = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .unwrap_or("");
                if constant_time_eq(presented.as_bytes(), token.as_bytes()) {
                    next.run(request).await
                } else {
                    (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], "unauthorized\n")
                        .into_response()
                }
            }
        },
    ))
}

/// Compares without an early exit, so timing does not tell how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `executor-agent drain` / `undrain`: one request on the control socket.
pub async fn client(
    socket: &Path,
    method: crate::http_client::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value> {
    const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
    let exchange = async {
        let stream = tokio::net::UnixStream::connect(socket).await.with_context(|| {
            format!("connecting to {} (is the agent running, and are you root?)", socket.display())
        })?;
        crate::http_client::request(stream, "executor-agent", method, path, body.as_ref(), 64 * 1024).await
    };
    let (status, answer) = tokio::time::timeout(ANSWER_TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from the agent within 10s"))??;
    let text = String::from_utf8_lossy(&answer);
    if status != 200 {
        bail!("the agent answered {status}: {}", text.trim());
    }
    serde_json::from_str(text.trim()).context("parsing the agent's answer")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_tokens_exactly() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[test]
    fn token_file_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "0123456789abcdef0123456789abcdef\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_token(&path).unwrap_err().to_string().contains("mode 0600"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        if nix::unistd::geteuid().is_root() {
            assert_eq!(read_token(&path).unwrap(), "0123456789abcdef0123456789abcdef");
        }
        std::fs::write(&path, "short").unwrap();
        if nix::unistd::geteuid().is_root() {
            assert!(read_token(&path).unwrap_err().to_string().contains("at least 32"));
        }
    }

    #[tokio::test]
    async fn jobs_are_asked_of_the_engine_at_once_and_unknown_is_not_idle() {
        use tower::ServiceExt;
        let dir = tempfile::tempdir().unwrap();
        let api_socket = dir.path().join("podman.sock");
        let running = Arc::new(std::sync::Mutex::new(serde_json::json!([
            {"Id": "a", "Labels": {"com.gitlab.gitlab-runner.job.id": "42"}},
            {"Id": "b", "Labels": {"io.executor-agent.canary": "1-2"}},
        ])));
        let listed = running.clone();
        let fake = Router::new().route(
            "/containers/json",
            get(move || {
                let listed = listed.clone();
                async move { Json(listed.lock().unwrap().clone()) }
            }),
        );
        let listener = tokio::net::UnixListener::bind(&api_socket).unwrap();
        tokio::spawn(async move { axum::serve(listener, fake).await.unwrap() });
        let state = |api: Option<crate::podman_api::Client>| ControlState {
            root: Root::new(dir.path()),
            wake: Arc::new(Notify::new()),
            by: "test",
            jobs_api: api,
        };
        let ask = |app: Router| async move {
            let response = app
                .oneshot(axum::http::Request::get("/jobs").body(axum::body::Body::empty()).unwrap())
                .await
                .unwrap();
            let status = response.status();
            let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
            (status, String::from_utf8_lossy(&body).into_owned())
        };
        let api = crate::podman_api::Client::new(&api_socket, std::time::Duration::from_secs(2));
        let app = router(state(Some(api)));

        let (status, body) = ask(app.clone()).await;
        assert_eq!(status, StatusCode::OK);
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (doc["running"].clone(), doc["summary"].clone()),
            (true.into(), "GitLab job 42 (1 container)".into())
        );

        running.lock().unwrap().as_array_mut().unwrap().remove(0);
        let doc: serde_json::Value = serde_json::from_str(&ask(app).await.1).unwrap();
        assert_eq!(doc["running"], false, "only the canary's container is left");

        let gone = crate::podman_api::Client::new(
            dir.path().join("nothing.sock"),
            std::time::Duration::from_secs(2),
        );
        let (status, body) = ask(router(state(Some(gone)))).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.starts_with("cannot list the runner user's containers"), "{body}");
    }

    #[tokio::test]
    async fn drain_and_undrain_over_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path().join("root"));
        let socket = dir.path().join("run/control.sock");
        let wake = Arc::new(Notify::new());
        let state = ControlState { root: root.clone(), wake: wake.clone(), by: "test", jobs_api: None };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn({
            let socket = socket.clone();
            async move {
                serve_socket(&socket, state, async {
                    let _ = stopped.await;
                })
                .await
            }
        });
        for _ in 0..100 {
            if socket.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let answer = client(
            &socket,
            crate::http_client::Method::POST,
            "/drain",
            Some(serde_json::json!({"reason": "scale-in"})),
        )
        .await
        .unwrap();
        assert_eq!(answer["drain"]["reason"], "scale-in");
        tokio::time::timeout(std::time::Duration::from_secs(1), wake.notified()).await.unwrap();
        assert_eq!(drain::current(&root).unwrap().unwrap().by, "test");
        let err = client(
            &socket,
            crate::http_client::Method::POST,
            "/drain",
            Some(serde_json::json!({"reason": ""})),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("400"), "{err}");
        let answer = client(&socket, crate::http_client::Method::POST, "/undrain", None).await.unwrap();
        assert_eq!(answer["ended"]["reason"], "scale-in");
        assert_eq!(drain::current(&root).unwrap(), None);
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
        assert!(!socket.exists());
    }

    #[tokio::test]
    async fn http_control_needs_the_token() {
        use tower::ServiceExt;
        let dir = tempfile::tempdir().unwrap();
        let state = ControlState {
            root: Root::new(dir.path()),
            wake: Arc::new(Notify::new()),
            by: "token over HTTP",
            jobs_api: None,
        };
        let app = token_router("t".repeat(40), state);
        let request = |auth: Option<String>| {
            let mut b = axum::http::Request::post("/drain").header("content-type", "application/json");
            if let Some(a) = auth {
                b = b.header("authorization", a);
            }
            b.body(axum::body::Body::from(r#"{"reason":"update"}"#)).unwrap()
        };
        assert_eq!(app.clone().oneshot(request(None)).await.unwrap().status(), StatusCode::UNAUTHORIZED);
        let wrong = Some(format!("Bearer {}", "x".repeat(40)));
        assert_eq!(app.clone().oneshot(request(wrong)).await.unwrap().status(), StatusCode::UNAUTHORIZED);
        let right = Some(format!("Bearer {}", "t".repeat(40)));
        assert_eq!(app.oneshot(request(right)).await.unwrap().status(), StatusCode::OK);
        assert_eq!(drain::current(&Root::new(dir.path())).unwrap().unwrap().reason, "update");
    }
}
