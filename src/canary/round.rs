//! One canary round through the Docker-compatible API, as GitLab Runner's docker executor
//! runs a job with a service: a per-round bridge network with DNS, a "service" container
//! with a network alias and a published port, a "job" container that resolves the service,
//! talks to it and uses a named volume, and the published port reached from the host side.
//! Everything the round creates carries the owner label and is removed at the end.

use anyhow::{anyhow, Context as _, Result};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use super::image::{self, Layout};
use super::payload;
use super::{Owner, Stage};
use crate::config::Canary as Settings;
use crate::podman_api::objects::Kind;
use crate::podman_api::{ApiError, Client};

/// The label every canary object carries; its value is the owning process ([`Owner`]).
pub const LABEL_KEY: &str = "io.executor-agent.canary";
/// A second label that says what the object is, for whoever lists it.
const PURPOSE_KEY: &str = "io.executor-agent.purpose";
const PURPOSE: &str = "readiness canary of executor-agent, removed after each round";
/// The network alias the job resolves, as a runner service's alias.
pub const SERVICE_ALIAS: &str = "canary-service";
/// The port the service listens on inside its container.
pub const SERVICE_PORT: u16 = 8080;
/// Limits that keep a round from disturbing jobs.
const MEMORY_BYTES: i64 = 64 * 1024 * 1024;
const NANO_CPUS: i64 = 500_000_000;
const PIDS: i64 = 32;
/// Bound on the cleanup after a round, which runs even when the round timed out.
const CLEANUP_LIMIT: Duration = Duration::from_secs(20);
/// How long the host side keeps trying the published port (the port forwarder may start a
/// moment after the container).
const PUBLISH_PATIENCE: Duration = Duration::from_secs(5);
/// The most of a failing job's output a detail carries.
const MAX_LOG: usize = 4096;

/// What a round did: each stage's time, and the failing stage with its reason.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub stages: Vec<(Stage, Duration)>,
    pub total: Duration,
    pub failure: Option<(Stage, String)>,
    /// Objects of dead owners removed before the round.
    pub leftovers_removed: usize,
    /// The image was imported in this round.
    pub imported: bool,
}

/// The image reference once it is known to be present, so later rounds skip building it.
#[derive(Default)]
pub struct ImageCache {
    present: Mutex<Option<Layout>>,
}

static ROUND: AtomicU64 = AtomicU64::new(0);

/// Runs one round within `settings.timeout`, then cleans up (within its own bound).
pub async fn run(api: &Client, settings: &Settings, owner: &Owner, cache: &ImageCache) -> Report {
    let started = Instant::now();
    let n = ROUND.fetch_add(1, Ordering::Relaxed) + 1;
    let names = Names::new(owner, n);
    let current = AtomicUsize::new(0);
    let mut stages = Vec::new();
    let mut imported = false;
    let work = stages_of_a_round(api, owner, cache, &names, &current, &mut stages, &mut imported);
    let outcome = match tokio::time::timeout(settings.timeout, work).await {
        Ok(outcome) => outcome,
        Err(_) => {
            let stage = Stage::ALL[current.load(Ordering::Relaxed)];
            Err((
                stage,
                format!(
                    "no progress within {} (canary.timeout)",
                    humantime::format_duration(settings.timeout)
                ),
            ))
        }
    };
    let cleanup_started = Instant::now();
    let cleanup = match tokio::time::timeout(CLEANUP_LIMIT, remove_round(api, &names)).await {
        Ok(result) => result,
        Err(_) => Err(anyhow!("no answer within {}", humantime::format_duration(CLEANUP_LIMIT))),
    };
    stages.push((Stage::Cleanup, cleanup_started.elapsed()));
    let mut failure = outcome.err();
    if let (None, Err(e)) = (&failure, cleanup) {
        failure = Some((Stage::Cleanup, detail(&e)));
    }
    Report { stages, total: started.elapsed(), failure, leftovers_removed: names.leftovers(), imported }
}

/// The names of one round's objects.
struct Names {
    network: String,
    volume: String,
    service: String,
    job: String,
    nonce: String,
    owner: String,
    leftovers: AtomicUsize,
}

impl Names {
    fn new(owner: &Owner, n: u64) -> Self {
        let base = format!("executor-agent-canary-{}-{n}", owner.pid);
        Names {
            network: base.clone(),
            volume: base.clone(),
            service: format!("{base}-service"),
            job: format!("{base}-job"),
            nonce: format!("{}-{}-{n}", owner.pid, owner.start_ticks),
            owner: owner.label(),
            leftovers: AtomicUsize::new(0),
        }
    }

    fn leftovers(&self) -> usize {
        self.leftovers.load(Ordering::Relaxed)
    }

    fn labels(&self) -> serde_json::Value {
        serde_json::json!({ LABEL_KEY: self.owner, PURPOSE_KEY: PURPOSE })
    }
}

type StageResult<T> = std::result::Result<T, (Stage, String)>;

/// Times one stage and tags its error with the stage.
async fn stage<T>(
    which: Stage,
    current: &AtomicUsize,
    stages: &mut Vec<(Stage, Duration)>,
    work: impl std::future::Future<Output = Result<T>>,
) -> StageResult<T> {
    current.store(Stage::ALL.iter().position(|s| *s == which).unwrap_or(0), Ordering::Relaxed);
    let started = Instant::now();
    let outcome = work.await;
    stages.push((which, started.elapsed()));
    outcome.map_err(|e| {
        let why = detail(&e);
        (attribute(which, &why), why)
    })
}

/// The stage a start failure really belongs to: the network is set up, and the port
/// published, when a container starts, so Podman's error names the part that failed.
fn attribute(which: Stage, why: &str) -> Stage {
    if !matches!(which, Stage::ServiceStart | Stage::JobStart) {
        return which;
    }
    let why = why.to_ascii_lowercase();
    if [
        "rootlessport",
        "port is already allocated",
        "address already in use",
        "cannot expose privileged port",
    ]
    .iter()
    .any(|k| why.contains(k))
    {
        Stage::PortPublish
    } else if ["netavark", "aardvark", "slirp4netns", "pasta", "rootless netns", "rootless-netns", "cni"]
        .iter()
        .any(|k| why.contains(k))
    {
        Stage::Network
    } else {
        which
    }
}

fn detail(e: &anyhow::Error) -> String {
    crate::text::one_line(&crate::journal::detail(e), 600)
}

async fn stages_of_a_round(
    api: &Client,
    owner: &Owner,
    cache: &ImageCache,
    names: &Names,
    current: &AtomicUsize,
    stages: &mut Vec<(Stage, Duration)>,
    imported: &mut bool,
) -> StageResult<()> {
    let layout = stage(Stage::Image, current, stages, ensure_image(api, cache, imported)).await?;
    let removed = stage(Stage::Leftovers, current, stages, remove_leftovers(api, owner)).await?;
    names.leftovers.store(removed, Ordering::Relaxed);

    stage(Stage::Network, current, stages, async {
        let body = serde_json::json!({
            "Name": names.network, "Driver": "bridge", "CheckDuplicate": true, "Labels": names.labels(),
        });
        api.create_network(&body).await.context("creating the per-round bridge network")
    })
    .await?;
    stage(Stage::Volume, current, stages, async {
        let body = serde_json::json!({ "Name": names.volume, "Labels": names.labels() });
        api.create_volume(&body).await.context("creating the named volume")
    })
    .await?;

    let service = stage(Stage::ServiceStart, current, stages, async {
        let body = container_spec(
            &layout,
            names,
            &["service".to_string(), SERVICE_PORT.to_string()],
            serde_json::json!({
                "PortBindings": { port_key(): [{ "HostIp": "127.0.0.1", "HostPort": "" }] },
            }),
            Some(SERVICE_ALIAS),
        );
        let id = api
            .create_named_container(&names.service, &body)
            .await
            .context("creating the service container")?;
        api.start_container(&id).await.context("starting the service container")?;
        Ok(id)
    })
    .await?;

    let job = stage(Stage::JobStart, current, stages, async {
        let args =
            ["job".to_string(), SERVICE_ALIAS.to_string(), SERVICE_PORT.to_string(), names.nonce.clone()];
        let body = container_spec(
            &layout,
            names,
            &args,
            serde_json::json!({ "Binds": [format!("{}:{}", names.volume, payload::VOLUME_MOUNT)] }),
            None,
        );
        let id = api.create_named_container(&names.job, &body).await.context("creating the job container")?;
        api.start_container(&id).await.context("starting the job container")?;
        Ok(id)
    })
    .await?;
    // The job proves DNS, the exchange with the service and the volume, in that order; its
    // exit code names the first that failed.
    let exit = stage(Stage::Job, current, stages, async {
        api.wait_container(&job).await.context("waiting for the job container")
    })
    .await?;
    if exit != 0 {
        let logs = api.container_logs(&job, MAX_LOG).await.unwrap_or_default();
        let said = crate::text::one_line(&logs, 400);
        let (which, what) = match exit as i32 {
            payload::EXIT_DNS => (Stage::Dns, "the job could not resolve the service by its network alias"),
            payload::EXIT_EXCHANGE => (Stage::ServiceExchange, "the job could not talk to the service"),
            payload::EXIT_VOLUME => (Stage::Volume, "the job could not write and read its named volume"),
            _ => (Stage::Job, "the job container failed"),
        };
        return Err((which, format!("{what} (exit code {exit}): {said}")));
    }

    stage(Stage::PortPublish, current, stages, async {
        let port = api.published_port(&service, SERVICE_PORT).await?;
        reach_published(port, &names.nonce)
            .await
            .with_context(|| format!("127.0.0.1:{port} (published {})", port_key()))
    })
    .await?;
    Ok(())
}

fn port_key() -> String {
    format!("{SERVICE_PORT}/tcp")
}

/// The Docker create document of a canary container.
fn container_spec(
    layout: &Layout,
    names: &Names,
    args: &[String],
    host_config: serde_json::Value,
    alias: Option<&str>,
) -> serde_json::Value {
    let mut cmd = vec![payload::ARG.to_string()];
    cmd.extend(args.iter().cloned());
    let mut host = serde_json::json!({
        "NetworkMode": names.network,
        "Memory": MEMORY_BYTES,
        "NanoCpus": NANO_CPUS,
        "PidsLimit": PIDS,
        "AutoRemove": false,
    });
    if let (Some(host), Some(extra)) = (host.as_object_mut(), host_config.as_object()) {
        host.extend(extra.clone());
    }
    let mut endpoint = serde_json::json!({});
    if let Some(alias) = alias {
        endpoint["Aliases"] = serde_json::json!([alias]);
    }
    let mut spec = serde_json::json!({
        // The payload is PID 1 without a SIGTERM handler: a forced removal would otherwise
        // wait out the stop timeout (10 s on Podman 5) before the SIGKILL.
        "StopSignal": "SIGKILL",
        "StopTimeout": 1,
        "Image": layout.reference,
        "Entrypoint": layout.entrypoint,
        "Cmd": cmd,
        "Labels": names.labels(),
        "HostConfig": host,
        "NetworkingConfig": { "EndpointsConfig": { names.network.clone(): endpoint } },
    });
    if alias.is_some() {
        spec["ExposedPorts"] = serde_json::json!({ port_key(): {} });
    }
    spec
}

/// The image, imported when this agent's tag is missing; older tags of the canary removed.
async fn ensure_image(api: &Client, cache: &ImageCache, imported: &mut bool) -> Result<Layout> {
    let known = cache.present.lock().unwrap().clone();
    if let Some(layout) = &known {
        if api.image_exists(&layout.reference).await? {
            return Ok(layout.clone());
        }
    }
    // Built on a blocking thread: reading ~10 MiB of binaries must not stall the loop.
    let built = tokio::task::spawn_blocking(image::build).await.context("building the canary image")??;
    let layout = built.layout.clone();
    if !api.image_exists(&layout.reference).await? {
        api.import_image(built.tar, &layout.reference, &[(LABEL_KEY, "image"), (PURPOSE_KEY, PURPOSE)])
            .await
            .context("importing the canary image (built from the agent's own binary; never pulled)")?;
        *imported = true;
    }
    drop_other_tags(api, &layout.reference).await;
    *cache.present.lock().unwrap() = Some(layout.clone());
    Ok(layout)
}

/// Removes canary images of other agent versions; a failure only waits for the next import.
async fn drop_other_tags(api: &Client, keep: &str) {
    let Ok(images) = api.images_of(image::REPOSITORY).await else { return };
    for img in images {
        let tags = img.repo_tags.clone().unwrap_or_default();
        if !tags.iter().any(|t| t == keep) && tags.iter().all(|t| t.starts_with(image::REPOSITORY)) {
            if let Err(e) = api.remove_image(&img.id).await {
                tracing::debug!("keeping an old canary image {}: {}", img.name(), detail(&e));
            }
        }
    }
}

/// Removes canary objects whose owner is gone (a crashed or killed agent, a reboot); returns
/// how many. Objects of a live other process (a `check` beside the daemon) are left alone.
async fn remove_leftovers(api: &Client, owner: &Owner) -> Result<usize> {
    let mut removed = 0;
    // Containers first: a network or volume in use cannot go.
    for kind in [Kind::Container, Kind::Network, Kind::Volume] {
        for object in api.list_labelled(kind, LABEL_KEY).await? {
            if !owner.is_leftover(&object.value) {
                continue;
            }
            match api.remove(kind, &object.id).await {
                Ok(()) => removed += 1,
                Err(e) if ApiError::status_of(&e) == Some(404) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

/// Removes this round's objects, whatever got created; a missing one is fine.
async fn remove_round(api: &Client, names: &Names) -> Result<()> {
    let mut first_error = None;
    for (kind, name) in [
        (Kind::Container, &names.job),
        (Kind::Container, &names.service),
        (Kind::Volume, &names.volume),
        (Kind::Network, &names.network),
    ] {
        match api.remove(kind, name).await {
            Ok(()) => {}
            Err(e) if ApiError::status_of(&e) == Some(404) => {}
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Talks to the service through its published port from the host, as a Testcontainers test
/// reaches the container it started.
async fn reach_published(port: u16, nonce: &str) -> Result<()> {
    let deadline = Instant::now() + PUBLISH_PATIENCE;
    loop {
        let attempt = tokio::time::timeout(Duration::from_secs(3), async {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            stream.write_all(format!("{nonce}\n").as_bytes()).await?;
            let mut line = String::new();
            let mut reader = tokio::io::BufReader::new(stream).take(256);
            reader.read_line(&mut line).await?;
            anyhow::Ok(line)
        })
        .await
        .unwrap_or_else(|_| Err(anyhow!("no answer within 3s")));
        match attempt {
            Ok(line) if line == payload::answer(nonce) => return Ok(()),
            Ok(line) if !line.is_empty() => {
                anyhow::bail!("another program answered: {}", crate::text::one_line(&line, 80))
            }
            // Empty: the forwarder accepted before the service listened.
            Ok(_) if Instant::now() < deadline => {}
            Err(_) if Instant::now() < deadline => {}
            Ok(_) => anyhow::bail!("the connection closed without an answer"),
            Err(e) => return Err(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_failures_are_attributed_to_the_network_or_the_port() {
        let nft = "POST /containers/x/start answered 500: netavark (exit code 1): nftables error: unable to execute nft";
        assert_eq!(attribute(Stage::ServiceStart, nft), Stage::Network);
        let netns =
            "answered 500: failed to mount runtime directory for rootless netns: no such file or directory";
        assert_eq!(attribute(Stage::JobStart, netns), Stage::Network);
        let port = "rootlessport cannot expose privileged port 80, you can add 'net.ipv4.ip_unprivileged_port_start=80'";
        assert_eq!(attribute(Stage::ServiceStart, port), Stage::PortPublish);
        let runtime = "answered 500: crun: executable file not found in $PATH: OCI runtime attempted to invoke a command";
        assert_eq!(attribute(Stage::ServiceStart, runtime), Stage::ServiceStart);
        assert_eq!(attribute(Stage::Image, nft), Stage::Image, "only start failures are re-attributed");
    }
}
