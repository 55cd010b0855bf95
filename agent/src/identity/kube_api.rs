//! The one way the agent reaches the Kubernetes API server: a `kube` client found as
//! `kube::Config::infer` finds it (`KUBECONFIG` first, then the pod's mounted service
//! account), with a layer that counts every request by kind, stamps every answer, so the
//! pod watch's staleness is "time since the API server last said anything", bookmarks and
//! list pages included, and bounds every answer's body.
//!
//! The bound is here, under the client, because the `kube` crate reads whatever it is sent:
//! a single object or a list page whole into memory, a watch line by line with no limit on a
//! line. An answer past its bound is cut off with an error, as a malformed answer: the
//! watcher backs off and watches or lists again, a lookup fails.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};
use hyper::{Request, Response};

use crate::defence::{self, Defence};
use crate::metrics::Metrics;

/// How long connecting to the API server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One object: a single-object GET (a pod, the discovery document, the JWKS), and each line
/// of a watch (one event, which carries one object). etcd stores no object over 1.5 MiB
/// (its default `--max-request-bytes`, which every write through kube-apiserver meets); the
/// JSON the API server renders is larger than the stored protobuf (field names, quoted
/// numbers, base64 of byte fields) and an event adds its envelope, so 4 MiB leaves the
/// largest pod more than twice its stored size.
pub const MAX_OBJECT_BYTES: usize = 4 << 20;
/// One page of a list, which kube-apiserver sends as one JSON document on one line, so it is
/// bounded in all rather than per line. The pod watch asks for 500 pods a page
/// (kube-runtime's default): at 128 KiB a pod, several times a heavy one (many containers,
/// long environment lists and managedFields come to 20 to 50 KiB), a full page is 62.5 MiB.
pub const MAX_LIST_PAGE_BYTES: usize = 64 << 20;
/// An error answer: a `Status` is a few hundred bytes, a few KiB with its causes.
const MAX_ERROR_BYTES: usize = 64 << 10;
/// Text from the API server that goes into the agent's own log lines (an error's message)
/// keeps at most this many characters: enough for any `Status` message kube-apiserver writes.
const MAX_LOGGED_ERROR_CHARS: usize = 512;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// When the API server last answered (a response head or a body frame); shared by the
/// client's layer and whoever reports staleness.
#[derive(Debug)]
pub struct LastContact {
    origin: Instant,
    /// Milliseconds after `origin`, plus one; 0 = never.
    at_ms: AtomicU64,
}

impl Default for LastContact {
    fn default() -> Self {
        LastContact {
            origin: Instant::now(),
            at_ms: AtomicU64::new(0),
        }
    }
}

impl LastContact {
    pub fn stamp(&self) {
        let ms = self.origin.elapsed().as_millis() as u64 + 1;
        self.at_ms.fetch_max(ms, Ordering::AcqRel);
    }

    /// Record an answer that came `ago` before now (taken over from an earlier agent).
    pub fn stamp_ago(&self, ago: Duration) {
        let ms = self.origin.elapsed().saturating_sub(ago).as_millis() as u64 + 1;
        self.at_ms.fetch_max(ms, Ordering::AcqRel);
    }

    /// Time since the last answer, or `None` before the first.
    pub fn age(&self) -> Option<Duration> {
        match self.at_ms.load(Ordering::Acquire) {
            0 => None,
            ms => Some(
                self.origin
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms - 1)),
            ),
        }
    }
}

/// A client for the API server the environment names, or why there is none.
pub async fn connect(metrics: Metrics, contact: Arc<LastContact>) -> Result<kube::Client, String> {
    let mut config = kube::Config::infer().await.map_err(|e| {
        format!("no Kubernetes API server found (KUBECONFIG or an in-cluster service account): {e}")
    })?;
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    let builder = kube::client::ClientBuilder::try_from(config)
        .map_err(|e| format!("cannot build a Kubernetes client: {e}"))?;
    Ok(builder
        .with_layer(&ObserveLayer { metrics, contact })
        .build())
}

/// What an error from the API server or the client says, fit for a log line: control
/// characters dropped, at most `MAX_LOGGED_ERROR_CHARS` characters (the message of an error answer is
/// the server's own text).
pub fn error_text(error: &dyn std::fmt::Display) -> String {
    let text = error.to_string();
    let mut chars = text.chars().filter(|c| !c.is_control());
    let mut out: String = chars.by_ref().take(MAX_LOGGED_ERROR_CHARS).collect();
    if chars.next().is_some() {
        out.push_str(" [...]");
    }
    out
}

/// Counts requests, stamps answers, bounds bodies.
#[derive(Clone)]
struct ObserveLayer {
    metrics: Metrics,
    contact: Arc<LastContact>,
}

impl<S> tower_layer::Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            metrics: self.metrics.clone(),
            contact: self.contact.clone(),
        }
    }
}

#[derive(Clone)]
struct Observe<S> {
    inner: S,
    metrics: Metrics,
    contact: Arc<LastContact>,
}

/// What a request to the API server is, for the request counter.
fn kind_of<B>(req: &Request<B>) -> &'static str {
    let path = req.uri().path();
    let query = req.uri().query().unwrap_or_default();
    if path.starts_with("/openid/") || path.starts_with("/.well-known/") {
        "keys"
    } else if !path.contains("/pods") {
        "other"
    } else if query
        .split('&')
        .any(|p| p == "watch=true" || p == "watch=1")
    {
        "watch"
    } else if path.ends_with("/pods") {
        "list"
    } else {
        "get"
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower_service::Service<Request<kube::client::Body>> for Observe<S>
where
    S: tower_service::Service<Request<kube::client::Body>, Response = Response<B>>,
    S::Future: Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<BoundedBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<kube::client::Body>) -> Self::Future {
        let kind = kind_of(&req);
        self.metrics.kubernetes_request(kind);
        let answer = self.inner.call(req);
        let contact = self.contact.clone();
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let response = answer.await?;
            let ok = response.status().is_success();
            if ok {
                contact.stamp();
            }
            let bound = bound_for(kind, ok);
            Ok(response.map(move |body| BoundedBody {
                inner: Some(body.map_err(Into::into).boxed_unsync()),
                budget: Budget::new(bound),
                kind,
                metrics,
                contact: ok.then_some(contact),
            }))
        })
    }
}

/// How much of an answer's body is read before it is cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bound {
    /// The whole body: a list page, one object, an error.
    Total(usize),
    /// Each newline-delimited line: a watch sends one event a line, for as long as it runs.
    Line(usize),
}

/// The bound of an answer to a request of `kind`, successful or not.
fn bound_for(kind: &'static str, ok: bool) -> Bound {
    if !defence::on(Defence::KubeBodyBound) {
        return Bound::Total(usize::MAX);
    }
    match (ok, kind) {
        (false, _) => Bound::Total(MAX_ERROR_BYTES),
        (true, "watch") => Bound::Line(MAX_OBJECT_BYTES),
        (true, "list") => Bound::Total(MAX_LIST_PAGE_BYTES),
        (true, _) => Bound::Total(MAX_OBJECT_BYTES),
    }
}

/// Bytes counted against a [`Bound`].
#[derive(Debug)]
struct Budget {
    bound: Bound,
    /// All bytes so far, or those since the last newline.
    counted: usize,
}

impl Budget {
    fn new(bound: Bound) -> Budget {
        Budget { bound, counted: 0 }
    }

    /// Count `data`; false once the bound is passed.
    fn take(&mut self, data: &[u8]) -> bool {
        match self.bound {
            Bound::Total(max) => {
                self.counted = self.counted.saturating_add(data.len());
                self.counted <= max
            }
            Bound::Line(max) => {
                let mut rest = data;
                while let Some(end) = memchr::memchr(b'\n', rest) {
                    if self.counted.saturating_add(end) > max {
                        return false;
                    }
                    self.counted = 0;
                    rest = &rest[end + 1..];
                }
                self.counted = self.counted.saturating_add(rest.len());
                self.counted <= max
            }
        }
    }

    fn limit(&self) -> usize {
        match self.bound {
            Bound::Total(max) | Bound::Line(max) => max,
        }
    }
}

/// An answer cut off at its bound.
#[derive(Debug, thiserror::Error)]
#[error("the Kubernetes API server's answer to a {kind} request passed {limit} bytes{per_line}; dropped as malformed")]
struct OversizedAnswer {
    kind: &'static str,
    limit: usize,
    per_line: &'static str,
}

/// A body of the API server: stamps the contact on every frame of a successful answer, and
/// ends with [`OversizedAnswer`] once its [`Budget`] is spent, dropping the rest (and with
/// it the connection) unread.
struct BoundedBody {
    inner: Option<UnsyncBoxBody<Bytes, BoxError>>,
    budget: Budget,
    kind: &'static str,
    metrics: Metrics,
    contact: Option<Arc<LastContact>>,
}

impl hyper::body::Body for BoundedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = match std::task::ready!(Pin::new(inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            other => return Poll::Ready(other),
        };
        if let Some(contact) = &this.contact {
            contact.stamp();
        }
        if frame.data_ref().is_none_or(|data| this.budget.take(data)) {
            return Poll::Ready(Some(Ok(frame)));
        }
        this.inner = None;
        this.metrics.kubernetes_oversized_answer(this.kind);
        let error = OversizedAnswer {
            kind: this.kind,
            limit: this.budget.limit(),
            per_line: match this.budget.bound {
                Bound::Line(_) => " in one line",
                Bound::Total(_) => "",
            },
        };
        tracing::warn!(error = %error, "Kubernetes API answer too large");
        Poll::Ready(Some(Err(Box::new(error))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_kind() {
        let kind = |uri: &str| kind_of(&Request::get(uri).body(()).unwrap());
        assert_eq!(
            kind("/api/v1/pods?fieldSelector=spec.nodeName%3Dn&limit=500"),
            "list"
        );
        assert_eq!(
            kind("/api/v1/pods?fieldSelector=spec.nodeName%3Dn&watch=true&resourceVersion=5"),
            "watch"
        );
        assert_eq!(kind("/api/v1/namespaces/a/pods/b"), "get");
        assert_eq!(kind("/openid/v1/jwks"), "keys");
        assert_eq!(kind("/.well-known/openid-configuration"), "keys");
        assert_eq!(kind("/version"), "other");
    }

    #[test]
    fn a_total_bound_counts_every_byte() {
        let mut budget = Budget::new(Bound::Total(10));
        assert!(budget.take(b"12345\n"));
        assert!(budget.take(b"6789"));
        assert!(!budget.take(b"ab"), "11 bytes");
    }

    #[test]
    fn a_line_bound_counts_each_line_across_chunks() {
        let mut budget = Budget::new(Bound::Line(4));
        assert!(budget.take(b"1234\n12"));
        assert!(budget.take(b"34\n1234\n"), "lines of 4 across chunks");
        assert!(budget.take(b""));
        let mut long_inside = Budget::new(Bound::Line(4));
        assert!(
            !long_inside.take(b"12\n12345\n12"),
            "a long line between two newlines of one chunk"
        );
        let mut unterminated = Budget::new(Bound::Line(4));
        assert!(unterminated.take(b"123"));
        assert!(!unterminated.take(b"45"), "no newline in 5 bytes");
    }

    #[test]
    fn watches_are_bounded_per_line_and_the_rest_in_all() {
        assert_eq!(bound_for("watch", true), Bound::Line(MAX_OBJECT_BYTES));
        assert_eq!(bound_for("list", true), Bound::Total(MAX_LIST_PAGE_BYTES));
        assert_eq!(bound_for("get", true), Bound::Total(MAX_OBJECT_BYTES));
        assert_eq!(bound_for("keys", true), Bound::Total(MAX_OBJECT_BYTES));
        assert_eq!(bound_for("watch", false), Bound::Total(MAX_ERROR_BYTES));
    }

    #[test]
    fn error_text_is_bounded_and_has_no_control_characters() {
        let long = format!("a\nb{}", "x".repeat(10_000));
        let text = error_text(&long);
        assert!(text.starts_with("ab"), "{text}");
        assert!(text.chars().count() <= MAX_LOGGED_ERROR_CHARS + 6, "{text}");
        assert_eq!(error_text(&"short"), "short");
    }

    #[test]
    fn contact_age_starts_unknown_then_counts_from_the_last_stamp() {
        let c = LastContact::default();
        assert_eq!(c.age(), None);
        c.stamp();
        assert!(c.age().unwrap() < Duration::from_secs(1));
    }
}
