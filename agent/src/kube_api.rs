//! The one way the agent reaches the Kubernetes API server: a `kube` client found as
//! `kube::Config::infer` finds it (`KUBECONFIG` first, then the pod's mounted service
//! account), with a layer that counts every request by kind and stamps every answer, so the
//! pod watch's staleness is "time since the API server last said anything", bookmarks and
//! list pages included.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::{Request, Response};

use crate::metrics::Metrics;

/// How long connecting to the API server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Counts requests and stamps answers.
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
{
    type Response = Response<UnsyncBoxBody<Bytes, B::Error>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<kube::client::Body>) -> Self::Future {
        self.metrics.kubernetes_request(kind_of(&req));
        let answer = self.inner.call(req);
        let contact = self.contact.clone();
        Box::pin(async move {
            let response = answer.await?;
            let ok = response.status().is_success();
            if ok {
                contact.stamp();
            }
            Ok(response.map(move |body| {
                body.map_frame(move |frame| {
                    if ok {
                        contact.stamp();
                    }
                    frame
                })
                .boxed_unsync()
            }))
        })
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
    fn contact_age_starts_unknown_then_counts_from_the_last_stamp() {
        let c = LastContact::default();
        assert_eq!(c.age(), None);
        c.stamp();
        assert!(c.age().unwrap() < Duration::from_secs(1));
    }
}
