//! Listener machinery shared by every server of the agent (the credentials port, the probe
//! and metrics ports, the demo's stand-in): binding, the accept loop, connection limits,
//! hyper's per-connection settings, and the graceful drain at shutdown. It knows nothing of
//! routes; each server passes its handler.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::config::DEFAULT_IDLE_TIMEOUT;
use crate::defence::{self, Defence};
use crate::metrics::Metrics;

/// Header section limit: a pod token is about 1 KiB; hyper answers 431 above this.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Bound on draining in-flight requests at shutdown (the contract allows 10 s in all).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(8);
/// What a refused connection is told to wait; the SDKs retry after about 1 s anyway.
const RETRY_AFTER_SECS: &str = "1";
/// Refused connections being answered at once; beyond this a refused connection is closed
/// without a response, so a connection flood cannot grow the number of tasks.
const MAX_REFUSALS_IN_FLIGHT: usize = 64;
/// How long a refused connection gets to take its 503 before it is closed anyway.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);

/// Bind every address; an address that cannot be bound (say, IPv6 on a node without it) is
/// logged and skipped, as long as one binds.
pub async fn bind_all(addrs: &[SocketAddr], listener_name: &'static str) -> Vec<TcpListener> {
    let mut bound = Vec::new();
    for addr in addrs {
        match TcpListener::bind(addr).await {
            Ok(l) => bound.push(l),
            Err(e) => {
                tracing::warn!(listener = listener_name, address = %addr, error = %e, "could not bind; skipping this address")
            }
        }
    }
    bound
}

/// Connection-level limits of one listener.
#[derive(Clone)]
pub struct ConnectionLimits {
    /// Open connections at once; `None` for the admin listeners and the demo's stand-in.
    pub max_connections: Option<usize>,
    /// hyper's header read timeout. It runs from the moment hyper waits for a request head,
    /// so it bounds a slow client mid-request and an idle keep-alive connection alike.
    pub idle_timeout: Duration,
    /// Where open and refused connections are counted (the credentials listeners).
    pub metrics: Option<Metrics>,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: None,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            metrics: None,
        }
    }
}

/// One accepted connection: holds its slot and keeps the open-connections gauge right
/// however the connection task ends.
struct OpenConnection {
    _slot: Option<OwnedSemaphorePermit>,
    metrics: Option<Metrics>,
}

impl OpenConnection {
    fn new(slot: Option<OwnedSemaphorePermit>, metrics: Option<Metrics>) -> Self {
        if let Some(m) = &metrics {
            m.open_connections.inc();
        }
        OpenConnection {
            _slot: slot,
            metrics,
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if let Some(m) = &self.metrics {
            m.open_connections.dec();
        }
    }
}

/// The whole answer to a connection over the limit: written by hand because hyper never
/// sees the connection.
fn too_many_connections_response() -> Vec<u8> {
    let body = serde_json::json!({
        "code": "TooManyConnections",
        "message": "the agent has too many open connections; retry shortly",
    })
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         cache-control: no-store\r\nretry-after: {RETRY_AFTER_SECS}\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Answer a connection over the limit with 503 and close it, in a task bounded in time and
/// in number. What the client already sent is read and dropped before the close, so the
/// close does not reset the connection under the 503.
fn refuse(mut stream: TcpStream, refusals: &Arc<Semaphore>, response: Arc<[u8]>) {
    let Ok(permit) = refusals.clone().try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        let _permit = permit;
        let _ = tokio::time::timeout(REFUSAL_TIMEOUT, async {
            stream.write_all(&response).await?;
            stream.shutdown().await?;
            let mut sink = [0u8; 4096];
            let mut drained = 0;
            while drained < MAX_HEADER_BYTES {
                match stream.read(&mut sink).await? {
                    0 => break,
                    n => drained += n,
                }
            }
            Ok::<_, std::io::Error>(())
        })
        .await;
    });
}

/// Serve HTTP/1.1 on `listener` until `shutdown` flips to true, then drain in-flight requests
/// for at most [`DRAIN_TIMEOUT`]. No connection limit: for the admin listeners and the demo.
pub async fn serve<H, F>(listener: TcpListener, shutdown: watch::Receiver<bool>, handler: H)
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    serve_with_limits(listener, shutdown, ConnectionLimits::default(), handler).await
}

/// [`serve`], with at most `limits.max_connections` open at once: a connection over the limit
/// gets an immediate 503 (`TooManyConnections`, `Retry-After: 1`) and is closed.
pub async fn serve_with_limits<H, F>(
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
    limits: ConnectionLimits,
    handler: H,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .keep_alive(defence::on(Defence::Pipelining));
    if defence::on(Defence::IdleTimeout) {
        builder.header_read_timeout(limits.idle_timeout);
    } else {
        builder.header_read_timeout(Duration::from_secs(3600));
    }
    if defence::on(Defence::HeadSizeLimit) {
        builder.max_buf_size(MAX_HEADER_BYTES);
    }
    let slots = limits
        .max_connections
        .filter(|_| defence::on(Defence::ConnectionLimit))
        .map(|n| Arc::new(Semaphore::new(n)));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT));
    let refusal: Arc<[u8]> = too_many_connections_response().into();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let slot = match &slots {
                    Some(slots) => match slots.clone().try_acquire_owned() {
                        Ok(slot) => Some(slot),
                        Err(_) => {
                            if let Some(m) = &limits.metrics {
                                m.connections_refused.inc();
                            }
                            // Debug, not warn: a flood must not become a log flood; the
                            // counter is the signal.
                            tracing::debug!(peer = %peer, "connection refused: too many open connections");
                            refuse(stream, &refusals, refusal.clone());
                            continue;
                        }
                    },
                    None => None,
                };
                let open = OpenConnection::new(slot, limits.metrics.clone());
                let _ = stream.set_nodelay(true);
                let handler = handler.clone();
                let service = hyper::service::service_fn(move |req| {
                    let fut = handler(req, peer);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                let watched = graceful.watch(conn);
                tokio::spawn(async move {
                    let _open = open;
                    if let Err(e) = watched.await {
                        tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
                    }
                });
            }
            _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish within the drain timeout");
    }
}
