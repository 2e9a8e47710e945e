//! Canary: a container can really be created and removed from a locally present image
//! through the Docker-compatible API, as a job would; at most once per interval, bounded in
//! time, never pulling.

use anyhow::{anyhow, Result};
use std::sync::LazyLock;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

use super::{Context, Inspection};
use crate::checks::Observation;
use crate::config::Canary as Settings;
use crate::podman_api::{ApiError, Client};

const CHECK: &str = "canary";
/// Marks canary containers, so one left by a run that timed out or crashed is found again.
pub const LABEL_KEY: &str = "io.executor-agent.canary";
const LABEL: &str = "io.executor-agent.canary=1";

/// The last run's verdict, reported again until the interval has passed.
#[derive(Clone, Debug)]
struct LastRun {
    image: String,
    at: Instant,
    ok: bool,
    detail: String,
}

/// One canary per process: the daemon's passes share it, so the engine sees at most one
/// canary per interval however often the node is inspected.
static LAST: LazyLock<Mutex<Option<LastRun>>> = LazyLock::new(|| Mutex::new(None));

pub async fn inspect(cx: &Context) -> Inspection {
    let settings = &cx.settings.canary;
    let api = Client::new(super::podman_socket::socket_path(cx), settings.timeout);
    let observation = observe(&LAST, &api, settings, Instant::now()).await;
    Inspection { observations: vec![observation], plan: Vec::new() }
}

/// The last result while it is younger than the interval, else a new run.
async fn observe(
    last: &Mutex<Option<LastRun>>,
    api: &Client,
    settings: &Settings,
    now: Instant,
) -> Observation {
    // Held across the run: a concurrent inspection waits and then reuses this run's result
    // instead of starting a second canary.
    let mut last = last.lock().await;
    if let Some(run) = last.as_ref() {
        let age = now.saturating_duration_since(run.at);
        if run.image == settings.image && age < settings.interval {
            let age = humantime::format_duration(Duration::from_secs(age.as_secs()));
            let detail = format!("{} (checked {age} ago)", run.detail);
            return Observation { name: CHECK, ok: run.ok, detail };
        }
    }
    let outcome = match tokio::time::timeout(settings.timeout, run(api, settings)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(anyhow!(
            "no answer within {} (canary.timeout); a container left behind is removed on the next run",
            humantime::format_duration(settings.timeout)
        )),
    };
    let (ok, detail) = match outcome {
        Ok(detail) => (true, detail),
        Err(e) => (false, crate::journal::detail(&e)),
    };
    *last = Some(LastRun { image: settings.image.clone(), at: now, ok, detail: detail.clone() });
    Observation { name: CHECK, ok, detail }
}

/// Removes leftovers, then creates and removes one container; returns the detail.
async fn run(api: &Client, settings: &Settings) -> Result<String> {
    let image = settings.image.as_str();
    // Only containers older than a whole run: a younger one may belong to a canary running
    // right now in another process (`executor-agent check` beside the daemon).
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
    let stale_before = now - settings.timeout.as_secs().max(1) as i64;
    let leftovers: Vec<_> =
        api.list_containers(Some(LABEL)).await?.into_iter().filter(|c| c.created < stale_before).collect();
    for container in &leftovers {
        match api.remove_container(&container.id, true).await {
            // Gone already: another cleanup was quicker.
            Err(e) if ApiError::status_of(&e) != Some(404) => return Err(e),
            _ => {}
        }
    }
    let started = Instant::now();
    let spec = serde_json::json!({
        "Image": image,
        "Cmd": ["true"],
        "HostConfig": {"AutoRemove": false},
        "Labels": {LABEL_KEY: "1"},
    });
    let id = api.create_container(&spec).await.map_err(|e| match ApiError::status_of(&e) {
        Some(404) => anyhow!("image {image} is not present on the node (the canary never pulls)"),
        _ => e.context(format!("creating a container from {image}")),
    })?;
    let created = started.elapsed();
    api.remove_container(&id, true).await?;
    let total = started.elapsed();
    let mut detail = format!(
        "created and removed a container from {image} in {} ms (create {} ms, remove {} ms)",
        total.as_millis(),
        created.as_millis(),
        (total - created).as_millis()
    );
    if !leftovers.is_empty() {
        detail.push_str(&format!("; removed {} leftover canary container(s)", leftovers.len()));
    }
    Ok(detail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::{Path, RawQuery};
    use axum::http::StatusCode;
    use std::sync::{Arc, Mutex as StdMutex};

    type Log = Arc<StdMutex<Vec<String>>>;

    fn now_unix() -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
    }

    /// A Docker API double that knows the image `localhost/busybox`, lists an old leftover
    /// canary container and one another process's canary has just created, and records
    /// every request.
    async fn fake_api(log: Log, hang: bool) -> (tempfile::TempDir, Client) {
        let (l1, l2, l3) = (log.clone(), log.clone(), log.clone());
        let router = axum::Router::new()
            .route(
                "/containers/json",
                axum::routing::get(move |q: RawQuery| async move {
                    l1.lock().unwrap().push(format!("list {}", q.0.unwrap_or_default()));
                    axum::Json(
                        serde_json::json!([
                        {"Id": "leftover", "ImageID": "x", "Image": "localhost/busybox", "Created": 1700000000},
                        {"Id": "running-now", "ImageID": "x", "Image": "localhost/busybox", "Created": now_unix()},
                    ]),
                    )
                }),
            )
            .route(
                "/containers/create",
                axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| async move {
                    l2.lock().unwrap().push(format!("create {body}"));
                    if hang {
                        std::future::pending::<()>().await;
                    }
                    if body["Image"] != "localhost/busybox" {
                        let msg = format!("no such image: {}: image not known", body["Image"]);
                        return (StatusCode::NOT_FOUND, axum::Json(serde_json::json!({"message": msg})));
                    }
                    (StatusCode::CREATED, axum::Json(serde_json::json!({"Id": "new", "Warnings": []})))
                }),
            )
            .route(
                "/containers/{id}",
                axum::routing::delete(move |Path(id): Path<String>, q: RawQuery| async move {
                    l3.lock().unwrap().push(format!("delete {id} {}", q.0.unwrap_or_default()));
                    StatusCode::NO_CONTENT
                }),
            );
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("podman.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        (dir, Client::new(sock, Duration::from_secs(5)))
    }

    fn settings(image: &str, timeout: Duration) -> Settings {
        Settings { image: image.into(), interval: Duration::from_secs(300), timeout }
    }

    #[tokio::test]
    async fn creates_and_removes_a_container_after_clearing_leftovers() {
        let log = Log::default();
        let (_dir, api) = fake_api(log.clone(), false).await;
        let slot = Mutex::new(None);
        let obs =
            observe(&slot, &api, &settings("localhost/busybox", Duration::from_secs(5)), Instant::now())
                .await;
        assert!(obs.ok, "{obs:?}");
        assert!(
            obs.detail.starts_with("created and removed a container from localhost/busybox in "),
            "{}",
            obs.detail
        );
        assert!(obs.detail.ends_with("; removed 1 leftover canary container(s)"), "{}", obs.detail);
        let log = log.lock().unwrap();
        assert_eq!(
            log[0],
            "list all=true&filters=%7B%22label%22%3A%5B%22io.executor-agent.canary%3D1%22%5D%7D"
        );
        assert_eq!(log[1], "delete leftover force=true");
        let created: serde_json::Value =
            serde_json::from_str(log[2].strip_prefix("create ").unwrap()).unwrap();
        assert_eq!(
            created,
            serde_json::json!({"Image": "localhost/busybox", "Cmd": ["true"], "HostConfig": {"AutoRemove": false},
                               "Labels": {"io.executor-agent.canary": "1"}})
        );
        assert_eq!(log[3], "delete new force=true");
        assert_eq!(log.len(), 4);
    }

    #[tokio::test]
    async fn a_missing_image_fails_clearly_without_a_pull() {
        let log = Log::default();
        let (_dir, api) = fake_api(log.clone(), false).await;
        let obs = observe(
            &Mutex::new(None),
            &api,
            &settings("quay.io/nope", Duration::from_secs(5)),
            Instant::now(),
        )
        .await;
        assert_eq!(
            obs,
            Observation::fail(
                CHECK,
                "image quay.io/nope is not present on the node (the canary never pulls)"
            )
        );
        assert!(!log.lock().unwrap().iter().any(|r| r.contains("pull")));
    }

    #[tokio::test]
    async fn a_hanging_api_fails_within_the_timeout() {
        let log = Log::default();
        let (_dir, api) = fake_api(log, true).await;
        let started = Instant::now();
        let obs = observe(
            &Mutex::new(None),
            &api,
            &settings("localhost/busybox", Duration::from_millis(300)),
            Instant::now(),
        )
        .await;
        assert!(!obs.ok);
        assert!(obs.detail.contains("within 300ms"), "{}", obs.detail);
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test]
    async fn runs_at_most_once_per_interval_and_reports_the_age() {
        let log = Log::default();
        let (_dir, api) = fake_api(log.clone(), false).await;
        let slot = Mutex::new(None);
        let s = settings("localhost/busybox", Duration::from_secs(5));
        let t0 = Instant::now();
        let first = observe(&slot, &api, &s, t0).await;
        let requests = log.lock().unwrap().len();
        let second = observe(&slot, &api, &s, t0 + Duration::from_secs(125)).await;
        assert_eq!(log.lock().unwrap().len(), requests, "a second run within the interval reached the API");
        assert!(second.ok);
        assert_eq!(second.detail, format!("{} (checked 2m 5s ago)", first.detail));
        // Another image, or the interval over: a new run.
        let other = settings("quay.io/nope", Duration::from_secs(5));
        assert!(!observe(&slot, &api, &other, t0 + Duration::from_secs(126)).await.ok);
        assert!(log.lock().unwrap().len() > requests);
        let requests = log.lock().unwrap().len();
        observe(&slot, &api, &other, t0 + Duration::from_secs(126 + 300)).await;
        assert!(log.lock().unwrap().len() > requests);
    }
}
