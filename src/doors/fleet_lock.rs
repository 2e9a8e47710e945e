//! zincati's FleetLock protocol (coreos/zincati docs/development/fleetlock/protocol.md), served
//! on loopback for this node's own zincati: the first `pre-reboot` drains the node, the
//! reboot lock is granted (200) only once no job runs, and `steady-state` after the reboot
//! releases it and ends the drain it started. Only root on the node may take or release the
//! lock: the runner user must not be able to drain its own node this way, so the owner of the
//! connection's other end is looked up in /proc/net/tcp.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::{Mutex, Notify};

use crate::paths::Root;
use crate::serve::Peer;

/// Who a drain record names.
pub const BY: &str = "zincati (FleetLock)";
/// Where the lock's holder is kept, so that it survives the reboot it is for.
pub const STATE_FILE: &str = "/var/lib/executor-agent/fleet-lock.json";
pub const DRAIN_REASON: &str = "OS update: zincati asks to reboot (FleetLock)";

#[derive(Clone)]
pub struct LockState {
    pub root: Root,
    pub wake: Arc<Notify>,
    /// Asks what runs before granting the lock (None: cannot ask, never granted).
    pub jobs_api: Option<crate::podman_api::Client>,
    /// The listener's own address, to find the peer's socket in /proc/net/tcp.
    pub local: SocketAddr,
    /// One request at a time: the state file and the drain change together.
    pub busy: Arc<Mutex<()>>,
}

#[derive(Debug, Deserialize)]
struct Body {
    client_params: ClientParams,
}

#[derive(Debug, Deserialize)]
struct ClientParams {
    id: String,
    group: String,
}

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Holder {
    id: String,
    group: String,
    since: String,
}

/// A FleetLock error: a small set of kinds, and a description (protocol: `kind`, `value`).
struct LockError {
    status: StatusCode,
    kind: &'static str,
    value: String,
}

impl IntoResponse for LockError {
    fn into_response(self) -> Response {
        (self.status, Json(serde_json::json!({ "kind": self.kind, "value": self.value }))).into_response()
    }
}

fn error(status: StatusCode, kind: &'static str, value: impl Into<String>) -> LockError {
    LockError { status, kind, value: value.into() }
}

impl<E: Into<anyhow::Error>> From<E> for LockError {
    fn from(e: E) -> Self {
        error(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", crate::journal::detail(&e.into()))
    }
}

pub fn router(state: LockState) -> Router {
    Router::new()
        .route("/v1/pre-reboot", post(pre_reboot))
        .route("/v1/steady-state", post(steady_state))
        .layer(axum::middleware::from_fn_with_state(state.clone(), only_root_peer))
        .with_state(state)
}

/// The uid owning the local TCP socket at `peer` whose other end is `local` (ours).
pub fn tcp_peer_uid(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    let table = if peer.is_ipv4() { procfs::net::tcp() } else { procfs::net::tcp6() };
    table.ok()?.into_iter().find(|e| e.local_address == peer && e.remote_address == local).map(|e| e.uid)
}

async fn only_root_peer(State(state): State<LockState>, request: Request, next: Next) -> Response {
    let peer = match request.extensions().get::<Peer>() {
        Some(Peer::Tcp(addr)) => *addr,
        _ => {
            return error(StatusCode::FORBIDDEN, "not_root", "only root on this node may take the lock")
                .into_response()
        }
    };
    match tcp_peer_uid(peer, state.local) {
        Some(0) => next.run(request).await,
        owner => {
            let who = owner.map_or("an unknown user".to_string(), |uid| format!("uid {uid}"));
            tracing::warn!("FleetLock: refused a request from {who} ({peer})");
            error(StatusCode::FORBIDDEN, "not_root", format!("only root may take the lock, not {who}"))
                .into_response()
        }
    }
}

/// The protocol's header and body, checked.
fn client(headers: &HeaderMap, body: &[u8]) -> Result<ClientParams, LockError> {
    if headers.get("fleet-lock-protocol").and_then(|v| v.to_str().ok()) != Some("true") {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "missing_header",
            "fleet-lock-protocol: true is required",
        ));
    }
    let body: Body = serde_json::from_slice(body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, "bad_body", format!("not a FleetLock body: {e}")))?;
    let p = body.client_params;
    let group_ok =
        !p.group.is_empty() && p.group.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    if p.id.is_empty() || p.id.len() > 128 || !p.id.bytes().all(|b| b.is_ascii_graphic()) || !group_ok {
        return Err(error(StatusCode::BAD_REQUEST, "bad_body", "client id or group is not valid"));
    }
    Ok(p)
}

fn state_file(root: &Root) -> PathBuf {
    root.join(STATE_FILE)
}

fn holder(root: &Root) -> anyhow::Result<Option<Holder>> {
    match std::fs::read(state_file(root)) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// `RecursiveLock`: drains first; grants once nothing runs; a lock already held by this
/// client is granted again.
async fn pre_reboot(
    State(state): State<LockState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, LockError> {
    let client = client(&headers, &body)?;
    let _one = state.busy.lock().await;
    match holder(&state.root)? {
        Some(h) if h.id == client.id => return Ok(StatusCode::OK.into_response()),
        Some(h) => {
            return Err(error(
                StatusCode::CONFLICT,
                "failed_lock_semaphore_full",
                format!("held by {} since {}", h.id, h.since),
            ));
        }
        None => {}
    }
    if crate::drain::current(&state.root).ok().flatten().is_none() {
        crate::drain::drain(&state.root, DRAIN_REASON, BY)?;
        tracing::warn!(message_id = crate::journal::NODE_CHANGED, by = BY, "drained: {DRAIN_REASON}");
        state.wake.notify_one();
    }
    let jobs = match &state.jobs_api {
        Some(api) => crate::jobs::running(api).await.map_err(|e| {
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "failed_lock_jobs_unknown",
                format!("cannot tell whether jobs run: {}", crate::journal::detail(&e)),
            )
        })?,
        None => {
            return Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "failed_lock_jobs_unknown",
                "no Podman API here",
            ))
        }
    };
    if jobs.any() {
        return Err(error(
            StatusCode::CONFLICT,
            "failed_lock_jobs_running",
            format!("waiting for {} to finish", jobs.describe()),
        ));
    }
    let record = Holder {
        id: client.id,
        group: client.group,
        since: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    };
    let mut bytes = serde_json::to_vec_pretty(&record)?;
    bytes.push(b'\n');
    let path = state_file(&state.root);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::fsutil::replace_file_atomically(&path, &bytes, 0o600)?;
    tracing::warn!(
        message_id = crate::journal::NODE_CHANGED,
        by = BY,
        "reboot lock granted to {}: no job runs",
        record.id
    );
    Ok(StatusCode::OK.into_response())
}

/// `UnlockIfHeld`: releases the lock if this client holds it (else nothing to do), and ends
/// a drain that FleetLock started. zincati calls it at every start, so a drain left by a
/// `pre-reboot` whose reboot never came ends too.
async fn steady_state(
    State(state): State<LockState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, LockError> {
    let client = client(&headers, &body)?;
    let _one = state.busy.lock().await;
    match holder(&state.root)? {
        Some(h) if h.id != client.id => return Ok(StatusCode::OK.into_response()),
        Some(_) => {
            std::fs::remove_file(state_file(&state.root))?;
            tracing::info!(
                message_id = crate::journal::NODE_CHANGED,
                by = BY,
                "reboot lock released by {}",
                client.id
            );
        }
        None => {}
    }
    if crate::drain::current(&state.root).ok().flatten().is_some_and(|d| d.by == BY) {
        crate::drain::undrain(&state.root)?;
        tracing::info!(message_id = crate::journal::NODE_CHANGED, by = BY, "undrained: the update is done");
        state.wake.notify_one();
    }
    Ok(StatusCode::OK.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    fn state(dir: &std::path::Path, api: Option<crate::podman_api::Client>) -> LockState {
        LockState {
            root: Root::new(dir),
            wake: Arc::new(Notify::new()),
            jobs_api: api,
            local: "127.0.0.1:9740".parse().unwrap(),
            busy: Arc::default(),
        }
    }

    /// The handlers without the peer layer (tested on a real socket below).
    fn handlers(state: LockState) -> Router {
        Router::new()
            .route("/v1/pre-reboot", post(pre_reboot))
            .route("/v1/steady-state", post(steady_state))
            .with_state(state)
    }

    async fn call(app: &Router, path: &str, id: &str, header: bool) -> (StatusCode, serde_json::Value) {
        let mut request = axum::http::Request::post(path);
        if header {
            request = request.header("fleet-lock-protocol", "true");
        }
        let body = serde_json::json!({"client_params": {"id": id, "group": "default"}}).to_string();
        let response =
            app.clone().oneshot(request.body(axum::body::Body::from(body)).unwrap()).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap_or_default())
    }

    /// A fake Podman API whose running containers the test sets.
    async fn fake_api(
        dir: &std::path::Path,
    ) -> (crate::podman_api::Client, Arc<std::sync::Mutex<serde_json::Value>>) {
        let path = dir.join("podman.sock");
        let listed = Arc::new(std::sync::Mutex::new(serde_json::json!([])));
        let shared = listed.clone();
        let app = Router::new().route(
            "/containers/json",
            axum::routing::get(move || {
                let shared = shared.clone();
                async move { Json(shared.lock().unwrap().clone()) }
            }),
        );
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (crate::podman_api::Client::new(path, std::time::Duration::from_secs(2)), listed)
    }

    #[tokio::test]
    async fn pre_reboot_drains_and_waits_for_jobs_then_steady_state_undrains() {
        let dir = tempfile::tempdir().unwrap();
        let (api, running) = fake_api(dir.path()).await;
        *running.lock().unwrap() =
            serde_json::json!([{"Id": "a", "Labels": {"com.gitlab.gitlab-runner.job.id": "42"}}]);
        let st = state(dir.path(), Some(api));
        let app = handlers(st.clone());

        let (status, body) = call(&app, "/v1/pre-reboot", "node-1", false).await;
        assert_eq!((status, body["kind"].as_str()), (StatusCode::BAD_REQUEST, Some("missing_header")));

        let (status, body) = call(&app, "/v1/pre-reboot", "node-1", true).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(body["kind"], "failed_lock_jobs_running");
        assert_eq!(body["value"], "waiting for GitLab job 42 (1 container) to finish");
        let drain = crate::drain::current(&st.root).unwrap().unwrap();
        assert_eq!((drain.reason.as_str(), drain.by.as_str()), (DRAIN_REASON, BY));

        *running.lock().unwrap() = serde_json::json!([]);
        assert_eq!(call(&app, "/v1/pre-reboot", "node-1", true).await.0, StatusCode::OK);
        assert_eq!(call(&app, "/v1/pre-reboot", "node-1", true).await.0, StatusCode::OK, "recursive");
        let (status, body) = call(&app, "/v1/pre-reboot", "node-2", true).await;
        assert_eq!(
            (status, body["kind"].as_str()),
            (StatusCode::CONFLICT, Some("failed_lock_semaphore_full"))
        );

        // After the reboot: another client's unlock changes nothing, the holder's ends it all.
        assert_eq!(call(&app, "/v1/steady-state", "node-2", true).await.0, StatusCode::OK);
        assert!(holder(&st.root).unwrap().is_some());
        assert_eq!(call(&app, "/v1/steady-state", "node-1", true).await.0, StatusCode::OK);
        assert_eq!(holder(&st.root).unwrap(), None);
        assert_eq!(crate::drain::current(&st.root).unwrap(), None);
    }

    #[tokio::test]
    async fn an_operators_drain_is_left_alone_and_unknown_jobs_never_grant() {
        let dir = tempfile::tempdir().unwrap();
        let st = state(dir.path(), None);
        crate::drain::drain(&st.root, "scale-in", "root over the control socket").unwrap();
        let app = handlers(st.clone());
        let (status, body) = call(&app, "/v1/pre-reboot", "node-1", true).await;
        assert_eq!(
            (status, body["kind"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("failed_lock_jobs_unknown"))
        );
        assert_eq!(call(&app, "/v1/steady-state", "node-1", true).await.0, StatusCode::OK);
        assert_eq!(crate::drain::current(&st.root).unwrap().unwrap().reason, "scale-in");
    }

    #[tokio::test]
    async fn only_a_root_peer_gets_past_the_layer() {
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local = listener.local_addr().unwrap();
        let st = LockState { local, ..state(dir.path(), None) };
        tokio::spawn(crate::serve::serve(
            listener,
            router(st),
            crate::serve::Limits::default(),
            std::future::pending(),
        ));
        let stream = tokio::net::TcpStream::connect(local).await.unwrap();
        let body = serde_json::json!({"client_params": {"id": "n", "group": "default"}});
        let (status, answer) = crate::http_client::request_with_headers(
            stream,
            "localhost",
            crate::http_client::Method::POST,
            "/v1/steady-state",
            &[("fleet-lock-protocol", "true")],
            Some(crate::http_client::RequestBody {
                content_type: "application/json",
                bytes: body.to_string().into(),
            }),
            4096,
        )
        .await
        .unwrap();
        let me = nix::unistd::geteuid().as_raw();
        if me == 0 {
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
        } else {
            assert_eq!(status, 403);
            assert!(String::from_utf8_lossy(&answer).contains(&format!("not uid {me}")));
        }
    }

    #[test]
    fn the_peer_of_a_loopback_connection_is_found_with_its_owner() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let uid = tcp_peer_uid(stream.local_addr().unwrap(), listener.local_addr().unwrap());
        assert_eq!(uid, Some(nix::unistd::geteuid().as_raw()));
        assert_eq!(tcp_peer_uid("127.0.0.1:1".parse().unwrap(), listener.local_addr().unwrap()), None);
    }
}
