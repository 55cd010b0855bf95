//! Listener machinery shared by every server of the agent (the credentials port, the probe
//! and metrics ports, the demo's stand-in): binding, the accept loop, connection limits,
//! hyper's per-connection settings, and the graceful drain at shutdown. It knows nothing of
//! routes; each server passes its handler.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::{DEFAULT_IDLE_TIMEOUT, DEFAULT_SEND_TIMEOUT};
use crate::defence::{self, Defence};
use crate::metrics::Metrics;

/// Header section limit: a pod token is about 1 KiB; hyper answers 431 above this.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Header fields per request: an SDK sends fewer than ten; hyper answers 431 above this.
pub const MAX_HEADER_COUNT: usize = 100;
/// Bound on draining in-flight requests at shutdown (the contract allows 10 s in all).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(8);
/// What a refused connection is told to wait; the SDKs retry after about 1 s anyway.
const RETRY_AFTER_SECS: &str = "1";
/// Refused connections being answered by a task that waits for the client to take the 503;
/// beyond this a refused connection is answered only with what the kernel takes at once, so
/// a connection flood cannot grow the number of tasks.
const MAX_REFUSALS_IN_FLIGHT: usize = 64;
/// How long a refused connection gets to take its 503 before it is closed anyway.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);

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
    _source: Option<SourceSlot>,
    metrics: Option<Metrics>,
}

impl OpenConnection {
    fn new(source: Option<SourceSlot>, metrics: Option<Metrics>) -> Self {
        if let Some(m) = &metrics {
            m.open_connections.inc();
        }
        OpenConnection {
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

/// What the accept loop knows of each open connection, so that under pressure it can close
/// an idle one for a new client instead of refusing the newcomer.
struct Tracked {
    source: IpAddr,
    /// Requests being answered on it: a connection with one is never chosen.
    busy: AtomicUsize,
    /// When its last answer went out (or it was accepted), in ms since the registry began.
    idle_since: AtomicU64,
    /// Its place in the listener's connection limit, until it is reclaimed.
    slot: Mutex<Option<OwnedSemaphorePermit>>,
    /// Told to close once its request in flight, if any, is answered.
    close: Notify,
}

impl Tracked {
    fn started_request(&self) {
        self.busy.fetch_add(1, Ordering::AcqRel);
    }

    fn finished_request(&self, now_ms: u64) {
        self.idle_since.store(now_ms, Ordering::Release);
        self.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Every open connection of one listener.
struct Registry {
    open: Mutex<HashMap<u64, Arc<Tracked>>>,
    next_id: AtomicU64,
    epoch: Instant,
    /// Notified whenever a connection ends (the drain waits for the last).
    ended: Notify,
}

impl Registry {
    fn new() -> Arc<Registry> {
        Arc::new(Registry {
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            epoch: Instant::now(),
            ended: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Tracked>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn insert(&self, source: IpAddr, slot: Option<OwnedSemaphorePermit>) -> (u64, Arc<Tracked>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let tracked = Arc::new(Tracked {
            source,
            busy: AtomicUsize::new(0),
            idle_since: AtomicU64::new(self.now_ms()),
            slot: Mutex::new(slot),
            close: Notify::new(),
        });
        self.lock().insert(id, tracked.clone());
        (id, tracked)
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
        self.ended.notify_waiters();
    }

    /// A slot for a newcomer, taken from the connection that is fairest to close: one with
    /// no request in flight, of the source holding the most connections, idle the longest
    /// (an idle keep-alive connection, or one that has not finished its headers). The
    /// chosen connection is told to close; its slot passes to the newcomer at once.
    fn reclaim(&self) -> Option<OwnedSemaphorePermit> {
        let open = self.lock();
        let mut per_source: HashMap<IpAddr, usize> = HashMap::new();
        for t in open.values() {
            *per_source.entry(t.source).or_default() += 1;
        }
        let victim = open
            .values()
            .filter(|t| t.busy.load(Ordering::Acquire) == 0)
            .max_by_key(|t| {
                let held = per_source.get(&t.source).copied().unwrap_or(0);
                let idle_since = t.idle_since.load(Ordering::Acquire);
                (held, std::cmp::Reverse(idle_since))
            })?;
        let slot = victim
            .slot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        victim.close.notify_one();
        Some(slot)
    }

    /// Ask every connection to close once its request in flight is answered.
    fn close_all(&self) {
        for t in self.lock().values() {
            t.close.notify_one();
        }
    }

    /// Wait until no connection is open.
    async fn drained(&self) {
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.lock().is_empty() {
                return;
            }
            ended.await;
        }
    }
}

/// What hyper's parser lets through and the agent refuses, found on the bytes of each
/// connection before hyper reads them:
/// - a fragment (`#...`) in a request line: the target is parsed without it, so
///   `GET /v1/credentials#x` would pass as the exact route; RFC 9112's origin-form has no
///   fragment. The request is marked with [`FragmentInTarget`] for the handler to refuse.
/// - an HTTP/2 prior-knowledge preface: answered with an HTTP/2 GOAWAY
///   (`HTTP_1_1_REQUIRED`), which tells an h2 client why, instead of a bare close.
struct Wire {
    inner: TcpStream,
    /// Nothing read yet: the next bytes may be an HTTP/2 preface.
    first_read: bool,
    /// The next byte starts a request line (the connection's start, or after a head ended).
    in_request_line: bool,
    /// Bytes of the current line so far (to find the blank line that ends a head).
    line_len: usize,
    /// Request lines seen on this connection.
    requests: u64,
    marks: Arc<FragmentMarks>,
}

/// The request lines (by their index on the connection) that carried a fragment.
#[derive(Default)]
struct FragmentMarks {
    any: AtomicBool,
    indices: Mutex<Vec<u64>>,
    /// Requests handed to the handler so far: the index of the next one.
    handled: AtomicU64,
}

impl FragmentMarks {
    fn mark(&self, index: u64) {
        let mut indices = self.indices.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: one connection's hostile requests can add at most this many marks
        // before hyper's pipelining limit and the handler take them.
        if indices.len() < 64 {
            indices.push(index);
        }
        self.any.store(true, Ordering::Release);
    }

    /// Whether the next request handed to the handler carried a fragment (two atomic
    /// operations when none ever did).
    fn take_next(&self) -> bool {
        let index = self.handled.fetch_add(1, Ordering::Relaxed);
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        let mut indices = self.indices.lock().unwrap_or_else(|p| p.into_inner());
        match indices.iter().position(|&i| i == index) {
            Some(at) => {
                indices.swap_remove(at);
                true
            }
            None => false,
        }
    }
}

/// Set on a request whose request line had a fragment (`#`), which the connection's reader
/// (`Wire`) notices before hyper drops it.
#[derive(Debug, Clone, Copy)]
pub struct FragmentInTarget;

/// A server's connection preface (an empty SETTINGS frame), then GOAWAY with last stream 0
/// and `HTTP_1_1_REQUIRED` (0xd): RFC 9113 sections 3.4, 6.8 and 7.
const H2_GOAWAY: [u8; 26] = [
    0, 0, 0, 0x4, 0, 0, 0, 0, 0, // SETTINGS, empty
    0, 0, 8, 0x7, 0, 0, 0, 0, 0, // GOAWAY, 8 bytes
    0, 0, 0, 0, // last stream id
    0, 0, 0, 0xd, // HTTP_1_1_REQUIRED
];
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

impl Wire {
    fn new(inner: TcpStream, marks: Arc<FragmentMarks>) -> Wire {
        Wire {
            inner,
            first_read: true,
            in_request_line: true,
            line_len: 0,
            requests: 0,
            marks,
        }
    }

    /// Follow request lines through `bytes`, newly read.
    fn scan(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            let (line, ended) = match memchr::memchr(b'\n', rest) {
                Some(i) => (&rest[..i], true),
                None => (rest, false),
            };
            if self.in_request_line && memchr::memchr(b'#', line).is_some() {
                self.marks.mark(self.requests);
            }
            self.line_len += line.len();
            if !ended {
                return;
            }
            rest = &rest[line.len() + 1..];
            let blank = self.line_len == 0 || (self.line_len == 1 && line.last() == Some(&b'\r'));
            self.line_len = 0;
            if self.in_request_line {
                // Empty lines before a request line are allowed (RFC 9112 section 2.2).
                if !blank {
                    self.in_request_line = false;
                    self.requests += 1;
                }
            } else if blank {
                self.in_request_line = true;
            }
        }
    }
}

impl AsyncRead for Wire {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if polled.is_ready() {
            let this = &mut *self;
            if std::mem::take(&mut this.first_read)
                && buf.filled()[before..].starts_with(H2_PREFACE)
            {
                // The send buffer of a new connection takes 26 bytes at once; then the
                // end of input lets hyper close the connection without a word of HTTP/1.
                let _ = this.inner.try_write(&H2_GOAWAY);
                buf.set_filled(before);
                return Poll::Ready(Ok(()));
            }
            this.scan(&buf.filled()[before..]);
        }
        polled
    }
}

impl AsyncWrite for Wire {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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
        refuse_at_once(stream, &response);
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

/// With no refusal task to spare: the 503 without waiting for anything. The answer is a few
/// hundred bytes, which an empty send buffer always takes; what the client has sent so far is
/// read first, and the close is a half-close, so the kernel has no unread data to answer
/// with a reset that would discard the 503 at the client.
fn refuse_at_once(stream: TcpStream, response: &[u8]) {
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < MAX_HEADER_BYTES {
        match stream.try_read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
    let _ = stream.try_write(response);
    if let Ok(stream) = stream.into_std() {
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
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
    let registry = Registry::new();
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
    builder.max_headers(MAX_HEADER_COUNT);
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
                    // Under pressure, an idle connection gives its slot to the newcomer: a
                    // few sources holding idle or unfinished connections cannot lock out
                    // another.
                    Some(slots) => slots.clone().try_acquire_owned().ok().or_else(|| {
                        let reclaimed = defence::on(Defence::ConnectionReclaim)
                            .then(|| registry.reclaim())
                            .flatten();
                        if let (Some(_), Some(m)) = (&reclaimed, &limits.metrics) {
                            m.connections_reclaimed.inc();
                        }
                        reclaimed
                    }),
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
                let (id, tracked) = registry.insert(peer.ip(), slot);
                let open = OpenConnection::new(source, limits.metrics.clone());
                let _ = stream.set_nodelay(true);
                let handler = handler.clone();
                let in_service = tracked.clone();
                let clock = registry.clone();
                let marks = Arc::new(FragmentMarks::default());
                let marked = marks.clone();
                let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    in_service.started_request();
                    if marked.take_next() {
                        req.extensions_mut().insert(FragmentInTarget);
                    }
                    let fut = handler(req, peer);
                    let done = in_service.clone();
                    let clock = clock.clone();
                    async move {
                        let response = fut.await;
                        done.finished_request(clock.now_ms());
                        Ok::<_, Infallible>(response)
                    }
                });
                let stream = SendTimeout::new(Wire::new(stream, marks), send_timeout);
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                let registry = registry.clone();
                tokio::spawn(async move {
                    let _open = open;
                    let mut conn = std::pin::pin!(conn);
                    let result = tokio::select! {
                        result = conn.as_mut() => result,
                        _ = tracked.close.notified() => {
                            // Reclaimed, or the listener is draining: answer what is in
                            // flight, then close.
                            conn.as_mut().graceful_shutdown();
                            conn.await
                        }
                    };
                    if let Err(e) = result {
                        tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
                    }
                    drop(tracked);
                    registry.remove(id);
                });
            }
            _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break,
        }
    }
    drop(listener);
    registry.close_all();
    if tokio::time::timeout(DRAIN_TIMEOUT, registry.drained())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish within the drain timeout");
    }
}
