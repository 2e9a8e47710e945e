//! EC2 Spot: on AWS, watches the instance metadata service (IMDSv2) for an interruption
//! notice and a rebalance recommendation, and drains the node by itself with the notice as the
//! reason, as aws-node-termination-handler's IMDS monitor cordons a Kubernetes node. Nothing
//! of this runs off AWS; requests are bounded in time and size, spaced by the poll interval,
//! and back off when IMDS fails.

use anyhow::{bail, Context as _, Result};
use serde::Deserialize;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::config::Spot as SpotSettings;
use crate::http_client::{self, Method};
use crate::journal;
use crate::paths::Root;

/// IMDSv2 session tokens live up to six hours; one is asked again well before.
const TOKEN_TTL_SECONDS: u64 = 21600;
const TOKEN_REUSE: Duration = Duration::from_secs(TOKEN_TTL_SECONDS / 2);
/// One IMDS request, connecting included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// IMDS answers are tiny; anything bigger is not IMDS.
const MAX_BODY: usize = 4096;
/// The longest wait between two rounds while IMDS fails.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Who a drain record names.
pub const BY: &str = "EC2 instance metadata (IMDSv2)";

pub const INSTANCE_ACTION: &str = "/latest/meta-data/spot/instance-action";
pub const REBALANCE: &str = "/latest/meta-data/events/recommendations/rebalance";

/// What IMDS announced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// `{"action": "terminate"|"stop"|"hibernate", "time": "..."}`, two minutes ahead.
    Interruption { action: String, time: String },
    /// `{"noticeTime": "..."}`.
    Rebalance { notice_time: String },
}

impl Notice {
    /// The drain reason.
    pub fn reason(&self) -> String {
        match self {
            Notice::Interruption { action, time } => {
                format!("EC2 Spot interruption notice: {action} at {time}")
            }
            Notice::Rebalance { notice_time } => {
                format!("EC2 rebalance recommendation at {notice_time}")
            }
        }
    }
}

/// Whether this instance is on AWS, by Afterburn's attributes.
pub fn on_aws(instance: &std::collections::BTreeMap<String, String>) -> bool {
    instance.contains_key("aws_instance_id")
}

/// IMDS's own text as one short line of printable characters (it reaches the drain record).
fn field(text: &str) -> String {
    crate::text::one_line(text, 64)
}

fn parse_interruption(body: &[u8]) -> Result<Notice> {
    #[derive(Deserialize)]
    struct Action {
        action: String,
        time: String,
    }
    let a: Action = serde_json::from_slice(body).context("an instance-action that is not IMDS's JSON")?;
    Ok(Notice::Interruption { action: field(&a.action), time: field(&a.time) })
}

fn parse_rebalance(body: &[u8]) -> Result<Notice> {
    #[derive(Deserialize)]
    struct Rebalance {
        #[serde(rename = "noticeTime")]
        notice_time: String,
    }
    let r: Rebalance =
        serde_json::from_slice(body).context("a rebalance recommendation that is not IMDS's JSON")?;
    Ok(Notice::Rebalance { notice_time: field(&r.notice_time) })
}

/// An IMDSv2 client: a session token, renewed before it expires or when IMDS refuses it.
pub struct Imds {
    address: SocketAddr,
    token: Option<(String, Instant)>,
}

impl Imds {
    pub fn new(address: SocketAddr) -> Self {
        Imds { address, token: None }
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(u16, hyper::body::Bytes)> {
        let host = self.address.to_string();
        let attempt = async {
            let stream = tokio::net::TcpStream::connect(self.address).await?;
            http_client::request_with_headers(stream, &host, method, path, headers, None, MAX_BODY).await
        };
        tokio::time::timeout(REQUEST_TIMEOUT, attempt)
            .await
            .map_err(|_| anyhow::anyhow!("no answer from IMDS at {host} within 2s"))?
    }

    async fn token(&mut self) -> Result<String> {
        if let Some((token, at)) = &self.token {
            if at.elapsed() < TOKEN_REUSE {
                return Ok(token.clone());
            }
        }
        let ttl = TOKEN_TTL_SECONDS.to_string();
        let (status, body) = self
            .exchange(Method::PUT, "/latest/api/token", &[("X-aws-ec2-metadata-token-ttl-seconds", &ttl)])
            .await?;
        if status != 200 {
            bail!("IMDS refused a session token: {status}");
        }
        let token = String::from_utf8_lossy(&body).trim().to_string();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            bail!("IMDS sent a session token that is not one");
        }
        self.token = Some((token.clone(), Instant::now()));
        Ok(token)
    }

    /// `GET path` with the token: the body, or None for 404 (nothing announced).
    pub async fn get(&mut self, path: &str) -> Result<Option<hyper::body::Bytes>> {
        for _ in 0..2 {
            let token = self.token().await?;
            let (status, body) =
                self.exchange(Method::GET, path, &[("X-aws-ec2-metadata-token", &token)]).await?;
            match status {
                200 => return Ok(Some(body)),
                404 => return Ok(None),
                // Expired or revoked: ask for a new one, once.
                401 => self.token = None,
                other => bail!("GET {path} answered {other}"),
            }
        }
        bail!("IMDS refused two fresh session tokens for {path}")
    }

    /// What IMDS announces now: an interruption before a rebalance recommendation.
    pub async fn notice(&mut self, rebalance: bool) -> Result<Option<Notice>> {
        if let Some(body) = self.get(INSTANCE_ACTION).await? {
            return parse_interruption(&body).map(Some);
        }
        if rebalance {
            if let Some(body) = self.get(REBALANCE).await? {
                return parse_rebalance(&body).map(Some);
            }
        }
        Ok(None)
    }
}

/// What a notice did to the drain record.
#[derive(Debug, PartialEq, Eq)]
pub enum Acted {
    Drained,
    /// Drained already (by an operator, or by an earlier notice): their reason stays.
    AlreadyDrained,
}

/// Drains for `notice` unless the node is drained already.
pub fn act(root: &Root, notice: &Notice) -> Result<Acted> {
    if crate::drain::current(root).ok().flatten().is_some() {
        return Ok(Acted::AlreadyDrained);
    }
    crate::drain::drain(root, &notice.reason(), BY)?;
    Ok(Acted::Drained)
}

/// Polls until the process ends: every `poll_interval`, doubling up to a minute while IMDS
/// fails; each new notice is journalled and drains the node (the loop is woken to show it).
pub async fn watch(settings: SpotSettings, root: Root, wake: std::sync::Arc<tokio::sync::Notify>) {
    let mut imds = Imds::new(settings.imds_address);
    let mut delay = settings.poll_interval;
    let mut last: Option<Notice> = None;
    let mut failing = false;
    loop {
        match imds.notice(settings.drain_on_rebalance).await {
            Ok(notice) => {
                if failing {
                    tracing::info!("IMDS answers again");
                    failing = false;
                }
                delay = settings.poll_interval;
                if let Some(notice) = notice.filter(|n| last.as_ref() != Some(n)) {
                    match act(&root, &notice) {
                        Ok(acted) => {
                            tracing::warn!(
                                message_id = journal::NODE_CHANGED,
                                by = BY,
                                drained = acted == Acted::Drained,
                                "{}{}",
                                notice.reason(),
                                if acted == Acted::Drained { ": drained" } else { " (drained already)" }
                            );
                            wake.notify_one();
                        }
                        Err(e) => tracing::error!(
                            "error: draining for {} -> {}",
                            notice.reason(),
                            journal::chain(&e)
                        ),
                    }
                    last = Some(notice);
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!("error: asking IMDS -> {}; retrying with backoff", journal::chain(&e));
                    failing = true;
                }
                delay = (delay * 2).min(MAX_BACKOFF);
            }
        }
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::{get, put};
    use std::sync::{Arc, Mutex};

    /// A fake IMDSv2: tokens, the two notices (absent until set), and a log of requests.
    #[derive(Clone, Default)]
    struct Fake {
        action: Arc<Mutex<Option<&'static str>>>,
        rebalance: Arc<Mutex<Option<&'static str>>>,
        tokens: Arc<Mutex<u32>>,
        revoke: Arc<Mutex<bool>>,
    }

    async fn serve(fake: Fake) -> SocketAddr {
        let with_token = |fake: Fake, slot: fn(&Fake) -> &Arc<Mutex<Option<&'static str>>>| {
            move |headers: HeaderMap| {
                let fake = fake.clone();
                async move {
                    let token = headers.get("x-aws-ec2-metadata-token").and_then(|v| v.to_str().ok());
                    let revoked = std::mem::take(&mut *fake.revoke.lock().unwrap());
                    if revoked || token != Some("tok") {
                        return (StatusCode::UNAUTHORIZED, String::new());
                    }
                    match *slot(&fake).lock().unwrap() {
                        Some(body) => (StatusCode::OK, body.to_string()),
                        None => (StatusCode::NOT_FOUND, String::new()),
                    }
                }
            }
        };
        let tokens = fake.clone();
        let app = axum::Router::new()
            .route(
                "/latest/api/token",
                put(move |headers: HeaderMap| {
                    let tokens = tokens.clone();
                    async move {
                        assert_eq!(headers["x-aws-ec2-metadata-token-ttl-seconds"], "21600");
                        *tokens.tokens.lock().unwrap() += 1;
                        "tok"
                    }
                }),
            )
            .route(INSTANCE_ACTION, get(with_token(fake.clone(), |f| &f.action)))
            .route(REBALANCE, get(with_token(fake.clone(), |f| &f.rebalance)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    }

    #[tokio::test]
    async fn a_notice_is_read_with_one_token_and_a_revoked_token_is_renewed() {
        let fake = Fake::default();
        let mut imds = Imds::new(serve(fake.clone()).await);
        assert_eq!(imds.notice(true).await.unwrap(), None);
        *fake.rebalance.lock().unwrap() = Some(r#"{"noticeTime": "2026-12-01T17:00:00Z"}"#);
        let rebalance = imds.notice(true).await.unwrap().unwrap();
        assert_eq!(rebalance.reason(), "EC2 rebalance recommendation at 2026-12-01T17:00:00Z");
        assert_eq!(imds.notice(false).await.unwrap(), None, "rebalance not watched");
        *fake.action.lock().unwrap() = Some(r#"{"action": "terminate", "time": "2026-12-01T17:02:00Z"}"#);
        let interruption = imds.notice(true).await.unwrap().unwrap();
        assert_eq!(interruption.reason(), "EC2 Spot interruption notice: terminate at 2026-12-01T17:02:00Z");
        assert_eq!(*fake.tokens.lock().unwrap(), 1, "one token for every request");

        *fake.revoke.lock().unwrap() = true;
        assert!(imds.notice(true).await.unwrap().is_some());
        assert_eq!(*fake.tokens.lock().unwrap(), 2, "a refused token is asked again, once");
    }

    #[tokio::test]
    async fn imds_text_is_bounded_and_anything_else_is_an_error() {
        let fake = Fake::default();
        *fake.action.lock().unwrap() =
            Some("{\"action\": \"terminate\\u001b[2J\", \"time\": \"2026-12-01T17:02:00Z and a great deal more text than any time stamp has\"}");
        let mut imds = Imds::new(serve(fake.clone()).await);
        let reason = imds.notice(true).await.unwrap().unwrap().reason();
        assert!(!reason.chars().any(char::is_control), "{reason:?}");
        assert!(reason.len() < 200, "{reason}");
        *fake.action.lock().unwrap() = Some("<html>not imds</html>");
        assert!(imds.notice(true).await.is_err());
        // Nothing listens here: an error within the request timeout, not a hang.
        let mut nowhere = Imds::new("127.0.0.1:9".parse().unwrap());
        let started = Instant::now();
        assert!(nowhere.notice(true).await.is_err());
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_notice_drains_once_and_never_replaces_an_operators_drain() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        let notice = Notice::Interruption { action: "terminate".into(), time: "T".into() };
        assert_eq!(act(&root, &notice).unwrap(), Acted::Drained);
        let record = crate::drain::current(&root).unwrap().unwrap();
        assert_eq!(
            (record.reason.as_str(), record.by.as_str()),
            ("EC2 Spot interruption notice: terminate at T", BY)
        );
        assert_eq!(act(&root, &notice).unwrap(), Acted::AlreadyDrained);

        crate::drain::undrain(&root).unwrap();
        crate::drain::drain(&root, "kernel update", "root over the control socket").unwrap();
        assert_eq!(act(&root, &notice).unwrap(), Acted::AlreadyDrained);
        assert_eq!(crate::drain::current(&root).unwrap().unwrap().reason, "kernel update");
    }

    #[tokio::test]
    async fn the_watcher_drains_within_a_poll_of_the_notice() {
        let fake = Fake::default();
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        let settings = SpotSettings {
            imds_address: serve(fake.clone()).await,
            poll_interval: Duration::from_millis(50),
            ..SpotSettings::default()
        };
        let wake = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(watch(settings, root.clone(), wake.clone()));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(crate::drain::current(&root).unwrap(), None);
        *fake.action.lock().unwrap() = Some(r#"{"action": "stop", "time": "2026-12-01T17:02:00Z"}"#);
        tokio::time::timeout(Duration::from_secs(5), wake.notified()).await.expect("no drain");
        let record = crate::drain::current(&root).unwrap().unwrap();
        assert_eq!(record.reason, "EC2 Spot interruption notice: stop at 2026-12-01T17:02:00Z");
        task.abort();
    }
}
