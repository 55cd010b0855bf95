//! Watches: one task per watch sends its events, as JSON lines, into the response body.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Frame;
use hyper::Response;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};

use super::objects::{pod_columns, pod_object, pod_row, table, Representation};
use super::query::{parse_resource_version, ListOptions};
use super::status::{too_large_resource_version, ApiError};
use super::store::{Change, Stored};
use super::{
    connection_cut, filler_chunks, set_common_headers, wait_for_resource_version, Body, Shared,
};

/// How often a watch that allows bookmarks gets one. kube-apiserver sends one about every
/// minute; a second keeps a test that waits for one short.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// The longest a watch stays open, and its length when the client names none.
/// kube-apiserver picks 30 to 60 minutes; clients ask for less (kube-runtime 290 s), and
/// nothing in a test should need a watch open longer.
const MAX_WATCH: Duration = Duration::from_secs(300);

/// Watch events buffered for a client that reads slowly; past this the watch waits for it.
const WATCH_BUFFER: usize = 64;

/// How long past its deadline a watch waits for a client that stopped reading.
const SLOW_READER_GRACE: Duration = Duration::from_secs(1);

/// The body of a watch response: one JSON event per chunk, for as long as the watch's task
/// sends them. An error ends the connection mid-body, as a server that goes away does.
struct WatchBody {
    events: mpsc::Receiver<io::Result<Bytes>>,
}

impl hyper::body::Body for WatchBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        self.get_mut()
            .events
            .poll_recv(cx)
            .map(|event| event.map(|r| r.map(Frame::data)))
    }
}

/// Where a watch starts.
#[derive(Debug)]
enum WatchStart {
    /// Synthetic `ADDED` events for the current state first (resourceVersion unset or "0",
    /// or `sendInitialEvents=true`), then a bookmark marking their end if asked for; not
    /// before the store reached `not_before`.
    State { not_before: u64, end_bookmark: bool },
    /// Only changes after the latest resourceVersion (`sendInitialEvents=false`).
    Now,
    /// Changes after this resourceVersion.
    After(u64),
}

pub(super) fn watch(
    shared: &Arc<Shared>,
    namespace: Option<String>,
    options: ListOptions,
    representation: Representation,
) -> Result<Response<Body>, ApiError> {
    options.validate_watch()?;
    let requested = match options.resource_version.as_deref() {
        None | Some("0") => 0,
        Some(rv) => parse_resource_version(rv)?,
    };
    let start = match options.send_initial_events {
        Some(true) => WatchStart::State {
            not_before: requested,
            end_bookmark: true,
        },
        Some(false) if requested == 0 => WatchStart::Now,
        None if requested == 0 => WatchStart::State {
            not_before: 0,
            end_bookmark: false,
        },
        Some(false) | None => WatchStart::After(requested),
    };
    let length = options.timeout.map_or(MAX_WATCH, |t| t.min(MAX_WATCH));
    let (events, body) = mpsc::channel(WATCH_BUFFER);
    // Subscribed before the watch counts as open, so a test that saw it open and then asks
    // for an unterminated event reaches it.
    let unterminated = shared.unterminated_event.subscribe();
    let watch = Watch {
        unterminated,
        shared: shared.clone(),
        namespace,
        options,
        representation,
        columns_sent: AtomicBool::new(false),
        events,
        deadline: Instant::now() + length,
    };
    tokio::spawn(watch.run(start));
    let mut response = Response::new(WatchBody { events: body }.boxed());
    set_common_headers(&mut response, "application/json");
    Ok(response)
}

/// One open watch: its task sends the events, the connection's body carries them.
struct Watch {
    shared: Arc<Shared>,
    namespace: Option<String>,
    options: ListOptions,
    representation: Representation,
    /// A watch of tables sends the column definitions with its first event only.
    columns_sent: AtomicBool,
    events: mpsc::Sender<io::Result<Bytes>>,
    deadline: Instant,
    /// Tells the watch to send an event that never ends its line
    /// ([`super::FakeKubeApi::send_unterminated_watch_event`]).
    unterminated: watch::Receiver<(u64, usize)>,
}

/// Counts a watch as open while it lives.
struct OpenWatch<'a>(&'a watch::Sender<usize>);

impl<'a> OpenWatch<'a> {
    fn new(open: &'a watch::Sender<usize>) -> Self {
        open.send_modify(|n| *n += 1);
        OpenWatch(open)
    }
}

impl Drop for OpenWatch<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// The client went away or the server went down: nothing more to send.
struct Gone;

impl Watch {
    /// Every wait is bounded by the watch's deadline and ends when the client goes away
    /// (the connection closed, or aborted with the fake) or the server goes down.
    async fn run(self, start: WatchStart) {
        let shared = self.shared.clone();
        let _open = OpenWatch::new(&shared.open_watches);
        let _ = self.stream(start).await;
    }

    async fn stream(&self, start: WatchStart) -> Result<(), Gone> {
        let mut cursor = match start {
            WatchStart::After(rv) => {
                let compacted = self.shared.store().compacted;
                if rv < compacted {
                    let status =
                        ApiError::expired(&format!("too old resource version: {rv} ({compacted})"));
                    return self.send_event("ERROR", status.body()).await;
                }
                if !self.reached(rv).await? {
                    let current = self.shared.store().resource_version;
                    let status = too_large_resource_version(rv, current);
                    return self.send_event("ERROR", status.body()).await;
                }
                rv
            }
            WatchStart::Now => self.shared.store().resource_version,
            WatchStart::State {
                not_before,
                end_bookmark,
            } => {
                if !self.reached(not_before).await? {
                    let current = self.shared.store().resource_version;
                    let status = too_large_resource_version(not_before, current);
                    return self.send_event("ERROR", status.body()).await;
                }
                let (at, pods) = {
                    let store = self.shared.store();
                    (store.resource_version, store.pods.clone())
                };
                for stored in pods.values() {
                    if self.options.matches(self.namespace.as_deref(), &stored.pod) {
                        let object = self.render(stored, stored.resource_version);
                        self.send_event("ADDED", object).await?;
                    }
                }
                if end_bookmark {
                    self.send_event("BOOKMARK", bookmark(at, true)).await?;
                }
                at
            }
        };

        let mut changed = self.shared.changed.subscribe();
        let mut down = self.shared.down.subscribe();
        let mut unterminated = self.unterminated.clone();
        let mut next_bookmark = Instant::now() + BOOKMARK_INTERVAL;
        loop {
            let (due, next_due, bookmark_at) =
                self.shared.store().due_after(cursor, Instant::now());
            for change in due {
                cursor = change.resource_version;
                if let Some((kind, object)) = self.event_for(&change) {
                    self.send_event(kind, object).await?;
                }
            }
            let far = self.deadline + Duration::from_secs(1);
            tokio::select! {
                biased;
                _ = self.events.closed() => return Err(Gone),
                () = went_down(&mut down) => {
                    let _ = self.events.send(Err(connection_cut())).await;
                    return Err(Gone);
                }
                _ = sleep_until(self.deadline) => {
                    if self.options.bookmarks {
                        self.send_event("BOOKMARK", bookmark(bookmark_at, false)).await?;
                    }
                    return Ok(());
                }
                _ = changed.changed() => {}
                _ = unterminated.changed() => {
                    let bytes = unterminated.borrow_and_update().1;
                    return self.send_unterminated(bytes).await;
                }
                _ = sleep_until(next_due.unwrap_or(far)) => {}
                _ = sleep_until(next_bookmark), if self.options.bookmarks => {
                    next_bookmark = Instant::now() + BOOKMARK_INTERVAL;
                    self.send_event("BOOKMARK", bookmark(bookmark_at, false)).await?;
                }
            }
        }
    }

    /// Wait (bounded) until the store reached `rv`; false if it did not in time.
    async fn reached(&self, rv: u64) -> Result<bool, Gone> {
        if rv == 0 {
            return Ok(true);
        }
        tokio::select! {
            reached = wait_for_resource_version(&self.shared, rv) => Ok(reached.is_ok()),
            _ = self.events.closed() => Err(Gone),
        }
    }

    /// What this watch's client sees of a change: the selector decides whether the object
    /// appears, changes or disappears for it, as in kube-apiserver's watch cache.
    fn event_for(&self, change: &Change) -> Option<(&'static str, Value)> {
        if !change.announced {
            return None;
        }
        let matches = |s: &&Arc<Stored>| self.options.matches(self.namespace.as_deref(), &s.pod);
        match (
            change.before.as_ref().filter(matches),
            change.after.as_ref().filter(matches),
        ) {
            (None, Some(after)) => Some(("ADDED", self.render(after, after.resource_version))),
            (Some(_), Some(after)) => {
                Some(("MODIFIED", self.render(after, after.resource_version)))
            }
            (Some(before), None) => Some(("DELETED", self.render(before, change.resource_version))),
            (None, None) => None,
        }
    }

    /// An event's object: the pod, or a one-row table of it.
    fn render(&self, stored: &Stored, resource_version: u64) -> Value {
        match self.representation {
            Representation::Object => pod_object(stored, resource_version, true),
            Representation::Table(version) => {
                let first = !self.columns_sent.swap(true, Ordering::Relaxed);
                table(
                    version,
                    json!({ "resourceVersion": resource_version.to_string() }),
                    first.then(pod_columns),
                    vec![pod_row(stored, resource_version)],
                )
            }
        }
    }

    async fn send_event(&self, kind: &str, object: Value) -> Result<(), Gone> {
        let mut line = json!({ "type": kind, "object": object }).to_string();
        line.push('\n');
        self.send_chunk(Bytes::from(line)).await
    }

    /// `{"type":"ADDED","object":` and a pod whose name never ends, `bytes` in all; no
    /// newline. The response then ends.
    async fn send_unterminated(&self, bytes: usize) -> Result<(), Gone> {
        let mut left = bytes;
        self.send_chunk(Bytes::from_static(br#"{"type":"ADDED","object":"#))
            .await?;
        for chunk in filler_chunks() {
            if left == 0 {
                break;
            }
            let chunk = chunk.slice(..chunk.len().min(left));
            left -= chunk.len();
            self.send_chunk(chunk).await?;
        }
        Ok(())
    }

    async fn send_chunk(&self, chunk: Bytes) -> Result<(), Gone> {
        // A client that stops reading holds the watch past its deadline only briefly.
        tokio::select! {
            biased;
            sent = self.events.send(Ok(chunk)) => sent.map_err(|_| Gone),
            _ = sleep_until(self.deadline + SLOW_READER_GRACE) => Err(Gone),
        }
    }
}

async fn went_down(down: &mut watch::Receiver<bool>) {
    // The `Ref` it returns must not live across the caller's next await.
    let _ = down.wait_for(|&down| down).await;
}

/// A bookmark: an empty Pod carrying only a resourceVersion (and the annotation closing the
/// initial events of `sendInitialEvents`).
fn bookmark(resource_version: u64, initial_events_end: bool) -> Value {
    let mut metadata = json!({
        "resourceVersion": resource_version.to_string(),
        "creationTimestamp": null,
    });
    if initial_events_end {
        metadata["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
    }
    json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": metadata,
        "spec": { "containers": null },
        "status": {},
    })
}
