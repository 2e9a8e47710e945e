//! Image garbage collection through the Podman API, as kubelet does it: unused images,
//! oldest first, never one a container uses, until the file system is back at the low mark.

use anyhow::Result;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

use super::usage::{bytes, Usage};
use crate::config::Storage as Thresholds;
use crate::podman_api::objects::{bare_id, short_id, ContainerSummary, ImageSummary};
use crate::podman_api::{ApiError, Client};

/// Images a GC may remove, oldest first: not counted as used by the engine, and not the
/// image of any container, running or stopped (a stopped job container can be restarted or
/// its logs read; its image must stay).
pub fn unused_oldest_first(images: Vec<ImageSummary>, containers: &[ContainerSummary]) -> Vec<ImageSummary> {
    let used_ids: HashSet<&str> =
        containers.iter().map(|c| bare_id(&c.image_id)).filter(|id| !id.is_empty()).collect();
    let used_names: HashSet<&str> = containers.iter().map(|c| c.image.as_str()).collect();
    let mut unused: Vec<ImageSummary> = images
        .into_iter()
        .filter(|i| i.containers <= 0)
        .filter(|i| !used_ids.contains(bare_id(&i.id)))
        // Engines that leave ImageID empty still name the image the container came from.
        .filter(|i| !used_names.contains(bare_id(&i.id)) && !used_names.contains(short_id(&i.id)))
        .filter(|i| !i.repo_tags.iter().flatten().any(|t| used_names.contains(t.as_str())))
        // The canary's cached image is needed by the next round; old tags go with the import.
        .filter(|i| !i.repo_tags.iter().flatten().any(|t| t.starts_with(crate::canary::image::REPOSITORY)))
        .collect();
    unused.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
    unused
}

/// Whether the file system is full enough to start a GC: blocks at the high mark, or inodes
/// at the not-ready mark (image layers hold most of the files too).
pub fn needed(usage: &Usage, t: &Thresholds) -> bool {
    usage.percent() >= t.gc_high_percent || usage.inode_percent() >= t.inodes_not_ready_percent
}

/// Whether a GC has freed enough: blocks at the low mark and inodes below not-ready.
pub fn done(usage: &Usage, t: &Thresholds) -> bool {
    usage.percent() <= t.gc_low_percent && usage.inode_percent() < t.inodes_not_ready_percent
}

/// What one GC did.
#[derive(Debug, Default)]
pub struct Report {
    pub removed: Vec<ImageSummary>,
    /// Images the engine refused or no longer had (a job started using one meanwhile).
    pub skipped: Vec<(ImageSummary, String)>,
    /// Images left that containers use.
    pub in_use: usize,
    /// The sum of the removed images' sizes as the API reported them.
    pub freed_bytes: u64,
    /// The last measurement.
    pub usage: Option<Usage>,
    /// Why the GC stopped before reaching the low mark, if the API failed.
    pub stopped_by: Option<anyhow::Error>,
}

impl Report {
    /// One line per removed image, as repair changes.
    pub fn changes(&self) -> Vec<String> {
        self.removed
            .iter()
            .map(|i| {
                let created = std::time::UNIX_EPOCH + std::time::Duration::from_secs(i.created.max(0) as u64);
                let day = humantime::format_rfc3339_seconds(created).to_string();
                format!(
                    "removed image {} (sha256:{}, created {}, {}) to free space",
                    i.name(),
                    short_id(&i.id),
                    &day[..10],
                    bytes(i.size.max(0) as u64)
                )
            })
            .collect()
    }
}

/// Removes unused images one at a time (never forced), measuring after each, until `done`.
/// `freed` counts the removed images' sizes: an upper bound of the space really freed, as
/// kubelet counts it, since layers shared with kept images stay.
pub async fn collect(
    api: &Client,
    mut measure: impl FnMut() -> Result<Usage>,
    thresholds: &Thresholds,
    freed: &AtomicU64,
) -> Result<Report> {
    let images = api.list_images().await?;
    let containers = api.list_containers(None).await?;
    let total = images.len();
    let candidates = unused_oldest_first(images, &containers);
    let mut report = Report { in_use: total - candidates.len(), ..Report::default() };
    let mut usage = measure()?;
    for image in candidates {
        if done(&usage, thresholds) {
            break;
        }
        match api.remove_image(&image.id).await {
            Ok(()) => {
                let size = image.size.max(0) as u64;
                report.freed_bytes += size;
                freed.fetch_add(size, Ordering::Relaxed);
                report.removed.push(image);
                usage = measure()?;
            }
            // 409: a job started using it, or images built on it remain; 404: removed
            // meanwhile. Either way the next image may still go.
            Err(e) if matches!(ApiError::status_of(&e), Some(404 | 409)) => {
                report.skipped.push((image, crate::journal::detail(&e)));
            }
            Err(e) => {
                report.stopped_by = Some(e);
                break;
            }
        }
    }
    report.usage = Some(usage);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::Path;
    use axum::http::StatusCode;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    fn image(id: &str, created: i64, size: i64, containers: i64) -> ImageSummary {
        ImageSummary {
            id: format!("sha256:{id}"),
            created,
            size,
            containers,
            repo_tags: Some(vec![format!("localhost/{id}:latest")]),
        }
    }

    fn container(image_id: &str, image: &str) -> ContainerSummary {
        ContainerSummary {
            id: "c".into(),
            image_id: image_id.into(),
            image: image.into(),
            created: 0,
            labels: None,
        }
    }

    fn ids(images: &[ImageSummary]) -> Vec<&str> {
        images.iter().map(|i| bare_id(&i.id)).collect()
    }

    #[test]
    fn selects_unused_images_oldest_first_and_never_one_in_use() {
        let images = vec![
            image("new", 300, 1, 0),
            image("counted", 50, 1, 1),
            image("old", 100, 1, 0),
            image("byid", 10, 1, 0),
            image("bareid", 20, 1, 0),
            image("byname", 30, 1, 0),
            image("mid", 200, 1, -1),
        ];
        let containers = [
            container("sha256:byid", "whatever"),
            container("bareid", ""),
            container("", "localhost/byname:latest"),
        ];
        assert_eq!(ids(&unused_oldest_first(images.clone(), &containers)), ["old", "mid", "new"]);
        let mut with_canary = images;
        let mut canary = image("canary", 1, 10, 0);
        canary.repo_tags = Some(vec!["localhost/executor-agent-canary:0.1.0-00ff".into()]);
        with_canary.push(canary);
        assert_eq!(
            ids(&unused_oldest_first(with_canary, &containers)),
            ["old", "mid", "new"],
            "the canary image is kept"
        );
    }

    #[test]
    fn gc_starts_at_the_high_mark_and_ends_at_the_low_mark() {
        let t = Thresholds::default();
        let at = |pct: u64, inodes: u64| Usage::from_counts(1, 100, 100 - pct, 100 - pct, 100, 100 - inodes);
        assert!(!needed(&at(84, 0), &t));
        assert!(needed(&at(85, 0), &t));
        assert!(needed(&at(10, 95), &t), "inode pressure starts a GC too");
        assert!(!done(&at(81, 0), &t));
        assert!(done(&at(80, 0), &t));
        assert!(!done(&at(50, 95), &t));
    }

    /// A Docker API double: fixed listings; records DELETEs; `busy` answers 409.
    async fn fake_api(
        images: Vec<ImageSummary>,
        containers: Vec<ContainerSummary>,
    ) -> (tempfile::TempDir, Client, Arc<Mutex<Vec<String>>>) {
        let to_json = |i: &ImageSummary| serde_json::json!({"Id": i.id, "Created": i.created, "Size": i.size, "Containers": i.containers, "RepoTags": i.repo_tags});
        let images: Vec<_> = images.iter().map(to_json).collect();
        let containers: Vec<_> = containers
            .iter()
            .map(|c| serde_json::json!({"Id": c.id, "ImageID": c.image_id, "Image": c.image}))
            .collect();
        let deleted = Arc::new(Mutex::new(Vec::new()));
        let log = deleted.clone();
        let router = axum::Router::new()
            .route("/images/json", axum::routing::get(move || async move { axum::Json(images) }))
            .route("/containers/json", axum::routing::get(move || async move { axum::Json(containers) }))
            .route(
                "/images/{id}",
                axum::routing::delete(move |Path(id): Path<String>| async move {
                    let id = id.strip_prefix("sha256:").expect("removal by full ID").to_string();
                    log.lock().unwrap().push(id.clone());
                    if id == "busy" {
                        return (
                            StatusCode::CONFLICT,
                            axum::Json(serde_json::json!({"message": "image is in use by a container"})),
                        );
                    }
                    (StatusCode::OK, axum::Json(serde_json::json!([{"Deleted": id}])))
                }),
            );
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("podman.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        (dir, Client::new(sock, Duration::from_secs(2)), deleted)
    }

    #[tokio::test]
    async fn removes_oldest_unused_images_until_the_low_mark() {
        // 100-byte file system at 90%; each image holds its size in bytes.
        let images = vec![
            image("c", 30, 4, 0),
            image("a", 10, 6, 0),
            image("busy", 15, 50, 0),
            image("used", 5, 20, 0),
            image("b", 20, 3, 0),
        ];
        let (_dir, api, deleted) = fake_api(images.clone(), vec![container("sha256:used", "")]).await;
        let sizes: std::collections::HashMap<String, u64> =
            images.iter().map(|i| (bare_id(&i.id).to_string(), i.size as u64)).collect();
        let log = deleted.clone();
        let measure = move || {
            let gone: u64 = log.lock().unwrap().iter().filter(|id| *id != "busy").map(|id| sizes[id]).sum();
            let used = 90 - gone;
            Ok(Usage::from_counts(1, 100, 100 - used, 100 - used, 0, 0))
        };
        let freed = AtomicU64::new(0);
        let report = collect(&api, measure, &Thresholds::default(), &freed).await.unwrap();
        // a (90 -> 84), busy refused, b (84 -> 81), c (81 -> 77): stop; never `used`.
        assert_eq!(*deleted.lock().unwrap(), ["a", "busy", "b", "c"]);
        assert_eq!(ids(&report.removed), ["a", "b", "c"]);
        assert_eq!(report.skipped.len(), 1);
        assert!(report.skipped[0].1.contains("in use"), "{:?}", report.skipped);
        assert_eq!(report.usage.unwrap().percent(), 77);
        assert_eq!((report.freed_bytes, freed.load(Ordering::Relaxed)), (13, 13));
        assert_eq!(report.in_use, 1);
        assert_eq!(
            report.changes()[0],
            "removed image localhost/a:latest (sha256:a, created 1970-01-01, 6 B) to free space"
        );
    }

    #[tokio::test]
    async fn below_the_low_mark_nothing_is_removed() {
        let (_dir, api, deleted) = fake_api(vec![image("a", 1, 1, 0)], vec![]).await;
        let at_low = || Ok(Usage::from_counts(1, 100, 20, 20, 0, 0));
        let report = collect(&api, at_low, &Thresholds::default(), &AtomicU64::new(0)).await.unwrap();
        assert!(report.removed.is_empty());
        assert!(deleted.lock().unwrap().is_empty());
    }
}
