//! Listener machinery shared by every server of the agent (the credentials port, the probe
//! and metrics ports, the demo's stand-in): binding, the accept loop, connection limits,
//! hyper's per-connection settings, and the graceful drain at shutdown. It knows nothing of
//! routes; each server passes its handler.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::config::{DEFAULT_IDLE_TIMEOUT, DEFAULT_SEND_TIMEOUT};
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
    /// Open connections at once; `None` for the demo's stand-in.
    pub max_connections: Option<usize>,
    /// Open connections from one source address at once, so one pod cannot take every slot.
    pub max_per_source: Option<usize>,
    /// hyper's header read timeout. It runs from the moment hyper waits for a request head,
    /// so it bounds a slow client mid-request and an idle keep-alive connection alike.
    pub idle_timeout: Duration,
    /// How long a response may wait to be taken by the client: a client that pipelines
    /// requests and never reads the answers is disconnected after this.
    pub send_timeout: Duration,
    /// Where open and refused connections are counted (the credentials listeners).
    pub metrics: Option<Metrics>,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: None,
            max_per_source: None,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            send_timeout: DEFAULT_SEND_TIMEOUT,
            metrics: None,
        }
    }
}

/// Open connections per source address, for [`ConnectionLimits::max_per_source`].
#[derive(Default)]
struct PerSource {
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerSource {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Count a new connection from `ip`, unless it already has `max` open.
    fn admit(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<SourceSlot> {
        let mut open = self.lock();
        let n = open.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            sources: self.clone(),
            ip,
        })
    }
}

/// One connection's place in its source's count, given back when the connection ends.
struct SourceSlot {
    sources: Arc<PerSource>,
    ip: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self.sources.lock();
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// One accepted connection: holds its slots and keeps the open-connections gauge right
/// however the connection task ends.
struct OpenConnection {
    _slot: Option<OwnedSemaphorePermit>,
    _source: Option<SourceSlot>,
    metrics: Option<Metrics>,
}

impl OpenConnection {
    fn new(
        slot: Option<OwnedSemaphorePermit>,
        source: Option<SourceSlot>,
        metrics: Option<Metrics>,
    ) -> Self {
        if let Some(m) = &metrics {
            m.open_connections.inc();
        }
        OpenConnection {
            _slot: slot,
            _source: source,
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

/// A connection whose writes fail once one has waited `limit` for the client to take data:
/// hyper then drops the connection. Reads are untouched (hyper's header timeout bounds them).
struct SendTimeout<T> {
    inner: T,
    limit: Duration,
    /// Armed while a write is pending.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> SendTimeout<T> {
    fn new(inner: T, limit: Duration) -> Self {
        SendTimeout {
            inner,
            limit,
            deadline: None,
        }
    }

    /// After the inner write returned `Pending`: fail if the client has kept us waiting too
    /// long, otherwise make sure a wake-up comes at the deadline.
    fn check_stalled(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let limit = self.limit;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client did not take its response in time",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SendTimeout<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SendTimeout<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending => self.check_stalled(cx).map(|r| r.map(|()| 0)),
            ready => {
                self.deadline = None;
                ready
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.check_stalled(cx),
            ready => {
                self.deadline = None;
                ready
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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
    let per_source = limits
        .max_per_source
        .filter(|_| defence::on(Defence::PerSourceLimit))
        .map(|max| (Arc::new(PerSource::default()), max));
    let send_timeout = if defence::on(Defence::SendTimeout) {
        limits.send_timeout
    } else {
        Duration::from_secs(24 * 3600)
    };
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
                // The source's own cap first: a source at its cap takes no global slot.
                let source = match &per_source {
                    Some((sources, max)) => sources.admit(peer.ip(), *max),
                    None => None,
                };
                let over_source_cap = per_source.is_some() && source.is_none();
                let slot = match &slots {
                    _ if over_source_cap => None,
                    Some(slots) => slots.clone().try_acquire_owned().ok(),
                    None => None,
                };
                if over_source_cap || (slots.is_some() && slot.is_none()) {
                    if let Some(m) = &limits.metrics {
                        m.connections_refused.inc();
                    }
                    // Debug, not warn: a flood must not become a log flood; the counter is
                    // the signal.
                    tracing::debug!(peer = %peer, per_source = over_source_cap, "connection refused: too many open connections");
                    refuse(stream, &refusals, refusal.clone());
                    continue;
                }
                let open = OpenConnection::new(slot, source, limits.metrics.clone());
                let _ = stream.set_nodelay(true);
                let handler = handler.clone();
                let service = hyper::service::service_fn(move |req| {
                    let fut = handler(req, peer);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let stream = SendTimeout::new(stream, send_timeout);
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
