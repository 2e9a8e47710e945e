//! Images and containers through the Docker-compatible API: list, remove, create. Only the
//! fields the agent uses are decoded; Podman 4.3 and Docker both send them.

use anyhow::{Context as _, Result};
use serde::Deserialize;

use super::{Client, Method};

/// One entry of `GET /images/json`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageSummary {
    /// `sha256:<hex>`.
    pub id: String,
    /// Unix seconds.
    #[serde(default)]
    pub created: i64,
    #[serde(default)]
    pub size: i64,
    /// Containers using the image as Podman counts them; Docker sends -1 when it did not count.
    #[serde(default)]
    pub containers: i64,
    /// Docker sends `null` for an untagged image.
    #[serde(default)]
    pub repo_tags: Option<Vec<String>>,
}

impl ImageSummary {
    /// The first tag, or the short ID for an untagged image: how an operator names it.
    pub fn name(&self) -> String {
        self.repo_tags
            .as_deref()
            .and_then(|tags| tags.iter().find(|t| t.as_str() != "<none>:<none>"))
            .cloned()
            .unwrap_or_else(|| short_id(&self.id).to_string())
    }
}

/// One entry of `GET /containers/json`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ContainerSummary {
    #[serde(rename = "Id")]
    pub id: String,
    /// The image's ID; `sha256:<hex>` or bare hex depending on the engine.
    #[serde(rename = "ImageID", default)]
    pub image_id: String,
    /// The image as the container was created from it (name or ID).
    #[serde(rename = "Image", default)]
    pub image: String,
    /// Unix seconds.
    #[serde(rename = "Created", default)]
    pub created: i64,
    /// `null` in the Docker API when a container has none.
    #[serde(rename = "Labels", default)]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
}

/// The ID without its `sha256:` prefix, so IDs from different fields compare equal.
pub fn bare_id(id: &str) -> &str {
    id.strip_prefix("sha256:").unwrap_or(id)
}

/// The first 12 hex digits, as `podman images` shows them.
pub fn short_id(id: &str) -> &str {
    let bare = bare_id(id);
    bare.get(..12).unwrap_or(bare)
}

/// Percent-encodes a query value (RFC 3986 unreserved characters stay as they are).
fn query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A path segment from an ID or name: only characters that cannot change the request's path.
fn path_segment(id: &str) -> Result<&str> {
    let ok = !id.is_empty()
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._:@".contains(&b))
        && id != "."
        && id != "..";
    anyhow::ensure!(ok, "{id:?} is not an image or container ID");
    Ok(id)
}

/// An image `[registry/]repo:tag` as a path: [`path_segment`] plus `/` between parts.
fn image_reference(reference: &str) -> Result<&str> {
    for part in reference.split('/') {
        path_segment(part)?;
    }
    Ok(reference)
}

impl Client {
    /// Top-level images (`all=false`: no intermediate layers of builds).
    pub async fn list_images(&self) -> Result<Vec<ImageSummary>> {
        self.call_json(Method::GET, "/images/json?all=false", None).await
    }

    /// Every container, running or not, optionally only those with a label (`key=value`).
    pub async fn list_containers(&self, label: Option<&str>) -> Result<Vec<ContainerSummary>> {
        let mut path = "/containers/json?all=true".to_string();
        if let Some(label) = label {
            let filters = serde_json::json!({ "label": [label] }).to_string();
            path.push_str(&format!("&filters={}", query_value(&filters)));
        }
        self.call_json(Method::GET, &path, None).await
    }

    /// The running containers (`all=false`), with their labels.
    pub async fn list_running_containers(&self) -> Result<Vec<ContainerSummary>> {
        self.call_json(Method::GET, "/containers/json?all=false", None).await
    }

    /// Removes an image by ID without force: the engine refuses (409) an image that a
    /// container uses or that other images depend on, which is what keeps a racing job safe.
    pub async fn remove_image(&self, id: &str) -> Result<()> {
        // Always `sha256:<hex>`: Podman 4.3 resolves it and answers 404 once the image is
        // gone, while a bare 64-hex ID of a missing image fails as a bad name with a 500.
        let path = format!("/images/sha256:{}", path_segment(bare_id(id))?);
        self.call(Method::DELETE, &path, None).await.map(drop)
    }

    /// Creates (does not start) a container from `body` (the Docker create document);
    /// returns its ID. The engine never pulls here: a missing image answers 404.
    pub async fn create_container(&self, body: &serde_json::Value) -> Result<String> {
        #[derive(Deserialize)]
        struct Created {
            #[serde(rename = "Id")]
            id: String,
        }
        let created: Created = self.call_json(Method::POST, "/containers/create", Some(body)).await?;
        Ok(created.id)
    }

    /// Removes a container; `force` also stops a running one.
    pub async fn remove_container(&self, id: &str, force: bool) -> Result<()> {
        let path = format!("/containers/{}?force={force}", path_segment(id)?);
        self.call(Method::DELETE, &path, None)
            .await
            .map(drop)
            .with_context(|| format!("removing container {}", short_id(id)))
    }
}

/// What [`Client::list_labelled`] returns for containers, networks and volumes alike.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Labelled {
    /// The container's ID, or the network's or volume's name.
    pub id: String,
    /// The value of the label asked for.
    pub value: String,
}

/// The kinds of objects a label filter lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Container,
    Network,
    Volume,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Container => "container",
            Kind::Network => "network",
            Kind::Volume => "volume",
        }
    }
}

impl Client {
    /// Containers (running or not), networks or volumes that carry the label `key`, with
    /// its value.
    pub async fn list_labelled(&self, kind: Kind, key: &str) -> Result<Vec<Labelled>> {
        let filters = query_value(&serde_json::json!({ "label": [key] }).to_string());
        let path = match kind {
            Kind::Container => format!("/containers/json?all=true&filters={filters}"),
            Kind::Network => format!("/networks?filters={filters}"),
            Kind::Volume => format!("/volumes?filters={filters}"),
        };
        let body: serde_json::Value = self.call_json(Method::GET, &path, None).await?;
        // Volumes come wrapped ({"Volumes": [...]}); containers and networks as a list.
        let list = match kind {
            Kind::Volume => body.get("Volumes").cloned().unwrap_or(serde_json::Value::Null),
            _ => body,
        };
        let id_field = match kind {
            Kind::Container => "Id",
            Kind::Network | Kind::Volume => "Name",
        };
        let mut out = Vec::new();
        for item in list.as_array().map(Vec::as_slice).unwrap_or_default() {
            let (Some(id), Some(value)) =
                (item[id_field].as_str(), item["Labels"].get(key).and_then(|v| v.as_str()))
            else {
                continue;
            };
            out.push(Labelled { id: id.to_string(), value: value.to_string() });
        }
        Ok(out)
    }

    /// Removes a container, network or volume (forced: stopped, disconnected, unused).
    pub async fn remove(&self, kind: Kind, id: &str) -> Result<()> {
        let id = path_segment(id)?;
        let path = match kind {
            Kind::Container => format!("/containers/{id}?force=true&v=true"),
            Kind::Network => format!("/networks/{id}"),
            Kind::Volume => format!("/volumes/{id}?force=true"),
        };
        self.call(Method::DELETE, &path, None)
            .await
            .map(drop)
            .with_context(|| format!("removing {} {id}", kind.name()))
    }

    /// Creates a network (the Docker document: `Name`, `Labels`, ...).
    pub async fn create_network(&self, body: &serde_json::Value) -> Result<()> {
        self.call(Method::POST, "/networks/create", Some(body)).await.map(drop)
    }

    /// Creates a named volume.
    pub async fn create_volume(&self, body: &serde_json::Value) -> Result<()> {
        self.call(Method::POST, "/volumes/create", Some(body)).await.map(drop)
    }

    /// [`Client::create_container`] with a name.
    pub async fn create_named_container(&self, name: &str, body: &serde_json::Value) -> Result<String> {
        #[derive(Deserialize)]
        struct Created {
            #[serde(rename = "Id")]
            id: String,
        }
        let path = format!("/containers/create?name={}", query_value(name));
        let created: Created = self.call_json(Method::POST, &path, Some(body)).await?;
        Ok(created.id)
    }

    pub async fn start_container(&self, id: &str) -> Result<()> {
        let path = format!("/containers/{}/start", path_segment(id)?);
        self.call(Method::POST, &path, None).await.map(drop)
    }

    /// Waits until the container exits; returns its exit code.
    pub async fn wait_container(&self, id: &str) -> Result<i64> {
        #[derive(Deserialize)]
        struct Waited {
            #[serde(rename = "StatusCode")]
            status_code: i64,
        }
        let path = format!("/containers/{}/wait", path_segment(id)?);
        let waited: Waited = self.call_json(Method::POST, &path, None).await?;
        Ok(waited.status_code)
    }

    /// The container's output so far (stdout and stderr, at most `max` bytes of each frame's
    /// payload kept), as text with the stream framing removed.
    pub async fn container_logs(&self, id: &str, max: usize) -> Result<String> {
        let path = format!("/containers/{}/logs?stdout=true&stderr=true", path_segment(id)?);
        let body = self.call(Method::GET, &path, None).await?;
        let mut text = demultiplex(&body);
        text.truncate(text.floor_char_boundary(max));
        Ok(text)
    }

    /// The host port a container's `container_port/tcp` is published on.
    pub async fn published_port(&self, id: &str, container_port: u16) -> Result<u16> {
        let path = format!("/containers/{}/json", path_segment(id)?);
        let inspect: serde_json::Value = self.call_json(Method::GET, &path, None).await?;
        let key = format!("{container_port}/tcp");
        let bindings = &inspect["NetworkSettings"]["Ports"][&key];
        bindings
            .as_array()
            .and_then(|b| b.iter().find_map(|b| b["HostPort"].as_str()?.parse::<u16>().ok()))
            .filter(|port| *port != 0)
            .with_context(|| format!("container {} has no host port for {key}", short_id(id)))
    }

    /// Whether an image of that name (`repo:tag`) is present.
    pub async fn image_exists(&self, reference: &str) -> Result<bool> {
        let path = format!("/images/{}/json", image_reference(reference)?);
        let (status, body) = self.send(Method::GET, &path, None).await?;
        match status {
            200 => Ok(true),
            404 => Ok(false),
            _ => Err(super::ApiError::new(Method::GET, &path, status, &body).into()),
        }
    }

    /// Imports a root file system tar as an image (`docker import`) and tags it
    /// `repo:tag`, with `labels`. Returns the image ID.
    pub async fn import_image(
        &self,
        tar: Vec<u8>,
        reference: &str,
        labels: &[(&str, &str)],
    ) -> Result<String> {
        let (repo, tag) = reference.rsplit_once(':').context("an image reference without a tag")?;
        let mut path = "/images/create?fromSrc=-".to_string();
        for (key, value) in labels {
            path.push_str(&format!("&changes={}", query_value(&format!("LABEL {key}={value}"))));
        }
        let body = super::RequestBody { content_type: "application/x-tar", bytes: tar.into() };
        let answer = self.call_body(Method::POST, &path, body).await?;
        // A stream of JSON progress documents; the last one names the image, or the error.
        let mut id = None;
        for doc in serde_json::Deserializer::from_slice(&answer).into_iter::<serde_json::Value>() {
            let doc = doc.context("POST /images/create: unexpected answer")?;
            if let Some(error) = doc["error"].as_str().or(doc["errorDetail"]["message"].as_str()) {
                anyhow::bail!(
                    "POST /images/create: {}",
                    crate::text::one_line(error, super::MAX_MESSAGE_CHARS)
                );
            }
            if let Some(found) =
                doc["id"].as_str().or(doc["status"].as_str().filter(|s| s.starts_with("sha256:")))
            {
                id = Some(found.to_string());
            }
        }
        let id = id.context("POST /images/create answered without an image ID")?;
        // Tagged separately: Podman 4.3 ignores `tag` on an import (it tags `:latest`).
        let path = format!(
            "/images/{}/tag?repo={}&tag={}",
            path_segment(bare_id(&id))?,
            query_value(repo),
            query_value(tag)
        );
        self.call(Method::POST, &path, None).await?;
        Ok(id)
    }

    /// Images whose name is in `repository`, with their tags.
    pub async fn images_of(&self, repository: &str) -> Result<Vec<ImageSummary>> {
        let filters = query_value(&serde_json::json!({ "reference": [repository] }).to_string());
        self.call_json(Method::GET, &format!("/images/json?filters={filters}"), None).await
    }
}

/// The text of a non-TTY container's log stream: frames of an 8-byte header (stream, 0 0 0,
/// big-endian length) and a payload. A stream without that framing is returned as it is.
fn demultiplex(body: &[u8]) -> String {
    let mut out = Vec::with_capacity(body.len());
    let mut rest = body;
    while rest.len() >= 8 && matches!(rest[0], 0..=2) && rest[1..4] == [0, 0, 0] {
        let len = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
        let end = (8 + len).min(rest.len());
        out.extend_from_slice(&rest[8..end]);
        rest = &rest[end..];
    }
    out.extend_from_slice(rest);
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::podman_api::ApiError;
    use axum::extract::{Path, RawQuery};
    use axum::http::StatusCode;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    type Log = Arc<Mutex<Vec<String>>>;

    async fn serve(router: axum::Router) -> (tempfile::TempDir, Client) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("podman.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        (dir, Client::new(path, Duration::from_secs(2)))
    }

    #[tokio::test]
    async fn decodes_podman_4_3_listings() {
        // Shapes as Podman 4.3.1's compat API sends them (trimmed).
        let router = axum::Router::new()
            .route(
                "/images/json",
                axum::routing::get(|q: RawQuery| async move {
                    assert_eq!(q.0.as_deref(), Some("all=false"));
                    axum::Json(serde_json::json!([
                        {"Id": "sha256:aaaa111122223333", "ParentId": "", "RepoTags": ["docker.io/library/busybox:latest"],
                         "Created": 1700000000, "Size": 4261550, "SharedSize": 0, "VirtualSize": 4261550,
                         "Labels": null, "Containers": 2},
                        {"Id": "sha256:bbbb", "RepoTags": null, "Created": 1600000000, "Size": 10}
                    ]))
                }),
            )
            .route(
                "/containers/json",
                axum::routing::get(|q: RawQuery| async move {
                    let q = q.0.unwrap_or_default();
                    assert_eq!(
                        q,
                        "all=true&filters=%7B%22label%22%3A%5B%22io.executor-agent.canary%3D1%22%5D%7D"
                    );
                    axum::Json(serde_json::json!([
                        {"Id": "c1", "Image": "docker.io/library/busybox:latest",
                         "ImageID": "sha256:aaaa111122223333", "State": "created", "Created": 1700000100}
                    ]))
                }),
            );
        let (_dir, client) = serve(router).await;
        let images = client.list_images().await.unwrap();
        assert_eq!(images.len(), 2);
        assert_eq!((images[0].created, images[0].size, images[0].containers), (1700000000, 4261550, 2));
        assert_eq!(images[0].name(), "docker.io/library/busybox:latest");
        assert_eq!((images[1].containers, images[1].name().as_str()), (0, "bbbb"));
        let containers = client.list_containers(Some("io.executor-agent.canary=1")).await.unwrap();
        assert_eq!(containers[0].image_id, "sha256:aaaa111122223333");
        assert_eq!(containers[0].created, 1700000100);
        assert_eq!(bare_id(&images[0].id), bare_id(&containers[0].image_id));
    }

    #[tokio::test]
    async fn removes_by_full_id_without_force_and_reports_conflicts() {
        let log: Log = Arc::default();
        let seen = log.clone();
        let router = axum::Router::new().route(
            "/images/{id}",
            axum::routing::delete(move |Path(id): Path<String>, q: RawQuery| async move {
                seen.lock().unwrap().push(format!("{id} {:?}", q.0));
                if id == "sha256:busy" {
                    let msg = "image used by c1: image is in use by a container";
                    return (StatusCode::CONFLICT, axum::Json(serde_json::json!({"message": msg})));
                }
                (StatusCode::OK, axum::Json(serde_json::json!([{"Deleted": id}])))
            }),
        );
        let (_dir, client) = serve(router).await;
        client.remove_image("sha256:abcd").await.unwrap();
        let err = client.remove_image("busy").await.unwrap_err();
        assert_eq!(ApiError::status_of(&err), Some(409));
        assert!(err.to_string().contains("in use by a container"), "{err:#}");
        assert_eq!(*log.lock().unwrap(), ["sha256:abcd None", "sha256:busy None"]);
        assert!(client.remove_image("../containers/x").await.is_err());
        assert_eq!(log.lock().unwrap().len(), 2, "a bad ID must not reach the API");
    }

    #[tokio::test]
    async fn creates_and_force_removes_containers() {
        let log: Log = Arc::default();
        let (created, removed) = (log.clone(), log.clone());
        let router = axum::Router::new()
            .route(
                "/containers/create",
                axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| async move {
                    created.lock().unwrap().push(format!("create {}", body["Image"]));
                    (StatusCode::CREATED, axum::Json(serde_json::json!({"Id": "c0ffee", "Warnings": []})))
                }),
            )
            .route(
                "/containers/{id}",
                axum::routing::delete(move |Path(id): Path<String>, q: RawQuery| async move {
                    removed.lock().unwrap().push(format!("delete {id} {}", q.0.unwrap_or_default()));
                    StatusCode::NO_CONTENT
                }),
            );
        let (_dir, client) = serve(router).await;
        let id = client.create_container(&serde_json::json!({"Image": "busybox"})).await.unwrap();
        assert_eq!(id, "c0ffee");
        client.remove_container(&id, true).await.unwrap();
        assert_eq!(*log.lock().unwrap(), [r#"create "busybox""#, "delete c0ffee force=true"]);
    }
}
