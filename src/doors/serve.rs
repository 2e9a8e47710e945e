//! One HTTP/1 server for every listener the agent has (the TCP health endpoint, the
//! root-only control socket): bounded connections, header and request timeouts, a bound on
//! request bodies, the peer of each connection on each request (for layers that refuse by
//! peer), and a stop that lets requests in flight finish.

use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

/// Bounds that keep a slow or hostile client from tying a listener up.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// A client must send its request headers within this long (slowloris).
    pub header_read_timeout: Duration,
    /// A request that takes longer is answered 408.
    pub request_timeout: Duration,
    /// Largest request body accepted (the health endpoints take none, a drain request ~200 bytes).
    pub max_body: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            header_read_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(10),
            max_body: 1024,
        }
    }
}

/// Who is at the other end of a connection; every request carries it as an extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Tcp(SocketAddr),
    /// `SO_PEERCRED` of a Unix socket connection (None when the kernel gave none).
    Unix {
        uid: Option<u32>,
    },
}

/// A listener `serve` accepts connections from.
pub trait Listener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&mut self) -> impl Future<Output = std::io::Result<(Self::Io, Peer)>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&mut self) -> std::io::Result<(Self::Io, Peer)> {
        let (stream, addr) = tokio::net::TcpListener::accept(self).await?;
        Ok((stream, Peer::Tcp(addr)))
    }
}

impl Listener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&mut self) -> std::io::Result<(Self::Io, Peer)> {
        let (stream, _) = tokio::net::UnixListener::accept(self).await?;
        let uid = stream.peer_cred().ok().map(|c| c.uid());
        Ok((stream, Peer::Unix { uid }))
    }
}

/// A layer for routes only root may use: the request's peer must be a Unix socket
/// connection from uid 0.
pub async fn only_root(request: Request, next: Next) -> Response {
    match request.extensions().get::<Peer>() {
        Some(Peer::Unix { uid: Some(0) }) => next.run(request).await,
        peer => {
            let who = match peer {
                Some(Peer::Unix { uid: Some(uid) }) => format!("uid {uid}"),
                Some(Peer::Tcp(addr)) => format!("TCP peer {addr}"),
                _ => "a peer without credentials".to_string(),
            };
            tracing::warn!("refused a control request from {who}");
            (StatusCode::FORBIDDEN, "only root may use this socket\n").into_response()
        }
    }
}

/// Refuses a body over `max` bytes, or of unknown length, before anything else reads it.
async fn refuse_bodies(max: u64, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let length = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let chunked = headers.contains_key(header::TRANSFER_ENCODING);
    if chunked || length.is_some_and(|l| l > max) {
        return (StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n").into_response();
    }
    next.run(request).await
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets open requests finish.
pub async fn serve<L: Listener>(
    mut listener: L,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let (stopping_tx, stopping) = watch::channel(false);
    let max_body = limits.max_body;
    let app = app
        .layer(axum::middleware::from_fn(move |request: Request, next: Next| {
            refuse_bodies(max_body, request, next)
        }))
        .layer(
            tower::ServiceBuilder::new()
                .layer(axum::error_handling::HandleErrorLayer::new(|_: tower::BoxError| async {
                    (StatusCode::REQUEST_TIMEOUT, "request timed out\n")
                }))
                .timeout(limits.request_timeout),
        );
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).max_buf_size(16 * 1024);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let app = app.clone();
        let service =
            hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(peer);
                tower::ServiceExt::oneshot(app.clone(), request)
            });
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let mut stopping = stopping.clone();
        connections.spawn(async move {
            tokio::pin!(connection);
            // Idle keep-alive connections are closed by the header read timeout; a stopping
            // server lets the request in flight finish.
            let finished = tokio::select! {
                _ = connection.as_mut() => true,
                _ = stopping.wait_for(|s| *s) => false,
            };
            if !finished {
                connection.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(Duration::from_secs(1), connection).await;
            }
            drop(slot);
        });
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = stopping_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test]
    async fn only_root_admits_a_unix_peer_of_uid_0_and_nobody_else() {
        let app = Router::new()
            .route("/drain", axum::routing::get(|| async { "drained\n" }))
            .layer(axum::middleware::from_fn(only_root));
        let status = |peer: Option<Peer>| {
            let app = app.clone();
            async move {
                let mut request = Request::get("/drain").body(axum::body::Body::empty()).unwrap();
                if let Some(peer) = peer {
                    request.extensions_mut().insert(peer);
                }
                app.oneshot(request).await.unwrap().status()
            }
        };
        assert_eq!(status(Some(Peer::Unix { uid: Some(0) })).await, StatusCode::OK);
        assert_eq!(status(Some(Peer::Unix { uid: Some(1000) })).await, StatusCode::FORBIDDEN);
        assert_eq!(status(Some(Peer::Unix { uid: None })).await, StatusCode::FORBIDDEN);
        assert_eq!(status(Some(Peer::Tcp("127.0.0.1:1".parse().unwrap()))).await, StatusCode::FORBIDDEN);
        assert_eq!(status(None).await, StatusCode::FORBIDDEN, "a request that came some other way");
    }

    #[tokio::test]
    async fn every_request_carries_its_connections_peer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let app = Router::new().route(
            "/who",
            axum::routing::get(
                |axum::Extension(peer): axum::Extension<Peer>| async move { format!("{peer:?}") },
            ),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, app, Limits::default(), async {
            let _ = stopped.await;
        }));
        let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
        let (status, body) = crate::http_client::get(stream, "x", "/who").await.unwrap();
        assert_eq!(status, 200);
        let uid = nix::unistd::geteuid().as_raw();
        assert_eq!(String::from_utf8_lossy(&body), format!("Unix {{ uid: Some({uid}) }}"));
        stop.send(()).unwrap();
        server.await.unwrap();
    }
}
