//! The health endpoint: `/healthz` (liveness), `/readyz` (readiness), `/status` (everything).
//! Probes answer from the latest results and never wait on Podman or D-Bus.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

use crate::checks::{Check, CheckSet};
use crate::metrics::Metrics;
pub use crate::serve::{serve, Limits};
use std::collections::BTreeMap;

/// Who the node serves: fixed for the agent's life, part of `/status`.
#[derive(Clone, Debug)]
pub struct Runner {
    pub user: String,
    pub uid: u32,
    pub socket: String,
}

/// What the main loop publishes after every pass.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub checks: CheckSet,
    pub heartbeat: Instant,
    /// Afterburn's instance attributes (`aws_instance_id`, ...), empty off-cloud.
    pub instance: BTreeMap<String, String>,
    /// What runs on the node as of the latest pass; `None` while the API cannot be asked.
    pub jobs: Option<crate::jobs::Jobs>,
    /// The probe bodies, serialised once here rather than once per request: a fleet's load
    /// balancers and managers ask many times between two changes.
    bodies: Arc<Bodies>,
}

#[derive(Debug)]
struct Bodies {
    ready: bool,
    readyz: Bytes,
    /// `/status` without `uptime_seconds` (the one field that changes between publishes):
    /// a JSON object, completed per request by [`Bodies::status`].
    status_rest: Bytes,
}

impl Snapshot {
    pub fn new(checks: CheckSet, instance: BTreeMap<String, String>, runner: &Runner) -> Self {
        Self::with_jobs(checks, instance, None, runner)
    }

    pub fn with_jobs(
        checks: CheckSet,
        instance: BTreeMap<String, String>,
        jobs: Option<crate::jobs::Jobs>,
        runner: &Runner,
    ) -> Self {
        let ready = checks.ready();
        let status = checks.status_line();
        let readyz = serde_json::to_vec(&Readiness { ready, status: &status, checks: checks.checks() });
        let status_rest = serde_json::to_vec(&Status {
            version: env!("CARGO_PKG_VERSION"),
            ready,
            status: &status,
            user: &runner.user,
            uid: runner.uid,
            socket: &runner.socket,
            docker_host: format!("unix://{}", runner.socket),
            instance: &instance,
            jobs: jobs.as_ref(),
            checks: checks.checks(),
        });
        // The types above always serialise; a failure would be a bug worth a loud body.
        let bytes = |r: serde_json::Result<Vec<u8>>| {
            Bytes::from(r.unwrap_or_else(|e| format!("{{\"error\":\"serialising: {e}\"}}").into_bytes()))
        };
        let bodies = Bodies { ready, readyz: bytes(readyz), status_rest: bytes(status_rest) };
        Snapshot { checks, heartbeat: Instant::now(), instance, jobs, bodies: Arc::new(bodies) }
    }
}

impl Bodies {
    /// `{"uptime_seconds":N,` followed by the rest of the serialised object.
    fn status(&self, uptime_seconds: u64) -> Vec<u8> {
        let rest = self.status_rest.strip_prefix(b"{").unwrap_or(&self.status_rest);
        let mut body = Vec::with_capacity(rest.len() + 40);
        body.extend_from_slice(b"{\"uptime_seconds\":");
        body.extend_from_slice(uptime_seconds.to_string().as_bytes());
        if rest != b"}" {
            body.push(b',');
        }
        body.extend_from_slice(rest);
        body
    }
}

/// Shared with every request.
pub struct AppState {
    pub snapshot: watch::Receiver<Snapshot>,
    pub started: Instant,
    /// The main loop must have ticked within this long for `/healthz` to say it is alive.
    pub liveness_limit: Duration,
    pub metrics: Arc<Metrics>,
}

#[derive(Serialize)]
struct Readiness<'a> {
    ready: bool,
    status: &'a str,
    checks: &'a [Check],
}

#[derive(Serialize)]
struct Status<'a> {
    version: &'static str,
    ready: bool,
    status: &'a str,
    user: &'a str,
    uid: u32,
    socket: &'a str,
    docker_host: String,
    /// Afterburn's attributes of this instance, so a manager can match probe and instance.
    instance: &'a BTreeMap<String, String>,
    /// Running containers that are not the agent's, and their GitLab jobs; null while the
    /// API cannot be asked.
    jobs: Option<&'a crate::jobs::Jobs>,
    checks: &'a [Check],
}

pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    let age = state.snapshot.borrow().heartbeat.elapsed();
    if age < state.liveness_limit {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("main loop has not run for {}s\n", age.as_secs()))
            .into_response()
    }
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let bodies = state.snapshot.borrow().bodies.clone();
    let code = if bodies.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    json_response(code, bodies.readyz.clone())
}

async fn status(State(state): State<Arc<AppState>>) -> Response {
    let bodies = state.snapshot.borrow().bodies.clone();
    json_response(StatusCode::OK, Bytes::from(bodies.status(state.started.elapsed().as_secs())))
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.metrics.render(),
    )
        .into_response()
}

fn json_response(code: StatusCode, body: Bytes) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::{Observation, CHECK_NAMES};
    use axum::body::Body;
    use axum::http::{Method, Request};
    use http_body_util::BodyExt;
    use std::time::SystemTime;
    use tower::ServiceExt;

    const LIVENESS_LIMIT: Duration = Duration::from_secs(30);

    fn state(checks: CheckSet, heartbeat: Instant) -> (watch::Sender<Snapshot>, Arc<AppState>) {
        let (tx, rx) = watch::channel(Snapshot { heartbeat, ..snapshot(checks) });
        let state = AppState {
            snapshot: rx,
            started: Instant::now(),
            liveness_limit: LIVENESS_LIMIT,
            metrics: Arc::new(Metrics::new()),
        };
        (tx, Arc::new(state))
    }

    fn snapshot(checks: CheckSet) -> Snapshot {
        let runner =
            Runner { user: "core".into(), uid: 1000, socket: "/run/user/1000/podman/podman.sock".into() };
        Snapshot::new(checks, BTreeMap::new(), &runner)
    }

    async fn call(state: &Arc<AppState>, method: Method, uri: &str) -> (StatusCode, serde_json::Value) {
        let request = Request::builder().method(method).uri(uri).body(Body::empty()).unwrap();
        let response = app(state.clone()).oneshot(request).await.unwrap();
        let code = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes)
            .unwrap_or(serde_json::Value::String(String::from_utf8_lossy(&bytes).into()));
        (code, json)
    }

    fn all_passing() -> CheckSet {
        let mut set = CheckSet::pending(SystemTime::UNIX_EPOCH);
        set.record(
            CHECK_NAMES.iter().map(|&n| Observation::pass(n, "fine")).collect(),
            SystemTime::UNIX_EPOCH,
        );
        set
    }

    #[tokio::test]
    async fn readyz_is_503_before_the_first_pass_and_lists_every_check() {
        let (_tx, st) = state(CheckSet::pending(SystemTime::UNIX_EPOCH), Instant::now());
        let (code, body) = call(&st, Method::GET, "/readyz").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["ready"], false);
        assert_eq!(body["checks"].as_array().unwrap().len(), 6);
        assert_eq!(body["checks"][0]["name"], "subuid");
        assert_eq!(body["checks"][0]["detail"], "not checked yet");
        assert_eq!(body["checks"][0]["since"], "1970-01-01T00:00:00Z");
    }

    #[tokio::test]
    async fn readyz_follows_the_latest_snapshot() {
        let (tx, st) = state(all_passing(), Instant::now());
        assert_eq!(call(&st, Method::GET, "/readyz").await.0, StatusCode::OK);
        let mut checks = all_passing();
        checks.record(vec![Observation::fail("podman-api", "connection refused")], SystemTime::now());
        tx.send(snapshot(checks)).unwrap();
        let (code, body) = call(&st, Method::GET, "/readyz").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["status"], "not ready: podman-api: connection refused");
    }

    #[tokio::test]
    async fn healthz_fails_when_the_loop_stalls() {
        let (_tx, st) = state(all_passing(), Instant::now());
        assert_eq!(call(&st, Method::GET, "/healthz").await.0, StatusCode::OK);
        let stalled = Instant::now().checked_sub(LIVENESS_LIMIT + Duration::from_secs(1)).unwrap();
        let (_tx, st) = state(all_passing(), stalled);
        assert_eq!(call(&st, Method::GET, "/healthz").await.0, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn status_names_user_socket_and_version() {
        let (_tx, st) = state(all_passing(), Instant::now());
        let (code, body) = call(&st, Method::GET, "/status").await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(body["user"], "core");
        assert_eq!(body["uid"], 1000);
        assert_eq!(body["docker_host"], "unix:///run/user/1000/podman/podman.sock");
        assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(body["status"], "ready: 6/6 checks pass");
    }

    #[tokio::test]
    async fn status_is_the_published_object_with_the_uptime_of_the_request() {
        let (_tx, st) = state(all_passing(), Instant::now());
        let (_, body) = call(&st, Method::GET, "/status").await;
        let keys: Vec<&str> = body.as_object().unwrap().keys().map(String::as_str).collect();
        let mut want = vec![
            "uptime_seconds",
            "version",
            "ready",
            "status",
            "user",
            "uid",
            "socket",
            "docker_host",
            "instance",
            "jobs",
            "checks",
        ];
        let mut got = keys.clone();
        got.sort();
        want.sort();
        assert_eq!(got, want);
        assert_eq!(body["uptime_seconds"], 0);
        assert_eq!(body["checks"].as_array().unwrap().len(), 6);
        assert!(body["jobs"].is_null(), "not known until a pass could ask the API");

        let bodies = Bodies { ready: false, readyz: Bytes::new(), status_rest: Bytes::from_static(b"{}") };
        assert_eq!(bodies.status(7), b"{\"uptime_seconds\":7}");
        let bodies = Bodies { status_rest: Bytes::from_static(b"{\"a\":1}"), ..bodies };
        assert_eq!(bodies.status(12), b"{\"uptime_seconds\":12,\"a\":1}");
    }

    #[tokio::test]
    async fn a_heartbeat_keeps_the_bodies_a_publish_replaces_them() {
        let (tx, st) = state(all_passing(), Instant::now());
        let before = st.snapshot.borrow().bodies.clone();
        tx.send_modify(|s| s.heartbeat = Instant::now());
        assert!(Arc::ptr_eq(&before, &st.snapshot.borrow().bodies));
        let mut checks = all_passing();
        checks.record(vec![Observation::fail("linger", "off")], SystemTime::now());
        tx.send(snapshot(checks)).unwrap();
        assert!(!st.snapshot.borrow().bodies.ready);
        assert_eq!(call(&st, Method::GET, "/readyz").await.1["status"], "not ready: linger: off");
    }

    #[tokio::test]
    async fn other_methods_are_refused() {
        let (_tx, st) = state(all_passing(), Instant::now());
        for method in [Method::POST, Method::PUT, Method::DELETE] {
            assert_eq!(call(&st, method, "/readyz").await.0, StatusCode::METHOD_NOT_ALLOWED);
        }
        assert_eq!(call(&st, Method::GET, "/nope").await.0, StatusCode::NOT_FOUND);
    }
}
