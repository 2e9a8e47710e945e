//! The project's HTTP/1 client: one request per connection on a stream the caller opened
//! (the Podman API's Unix socket, the agent's own control socket or health endpoint), the
//! response body read within a bound.

use anyhow::{anyhow, Result};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
pub use hyper::Method;
use tokio::io::{AsyncRead, AsyncWrite};

/// Largest response body `get` reads; `/version` is about 1 KiB.
const MAX_BODY: usize = 64 * 1024;
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
    request_with_headers(stream, host, method, path, &[], body, max_body).await
}

/// [`request_with_body`] with extra request headers (IMDSv2's token, for one).
pub async fn request_with_headers<S>(
    stream: S,
    host: &str,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
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
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
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
