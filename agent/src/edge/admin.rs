//! The admin listeners: `/healthz` and `/readyz` on the probe port, `/metrics` on the metrics
//! port (each listener answers all three, so one port can serve both roles).
//!
//! Probes answer from in-process state only. They never call the credentials port over the
//! link-local address: a slow network path must not get a healthy agent restarted.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};

use crate::credentials::cache::CredentialCache;
use crate::lifecycle::readiness::Readiness;
use crate::metrics::Metrics;

pub struct AdminState {
    pub readiness: Arc<Readiness>,
    pub metrics: Metrics,
    pub cache: Arc<CredentialCache>,
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

pub async fn handle(
    state: Arc<AdminState>,
    req: Request<Incoming>,
    _peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if let Some(answer) = probe(&state.readiness, path) {
        return answer;
    }
    match path {
        "/metrics" => {
            // The whole-cache gauges (entries by state, shortest lifetime in use) are read
            // at scrape time, so alerts see the cache as it is now.
            state.cache.observe();
            // The gauges of a feature that is off are not registered (metrics::Features).
            if let Some(keys) = &state.readiness.keys {
                state.metrics.key_set_age_seconds.set(keys.age());
            }
            if let Some(pods) = &state.readiness.pods {
                let metrics = &state.metrics;
                metrics.pod_watch_staleness_seconds.set(pods.staleness());
                metrics.pods_known.set(pods.live_count() as i64);
                metrics.pod_watch_synced.set(i64::from(pods.is_synced()));
            }
            text(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                state.metrics.encode(),
            )
        }
        _ => not_found(),
    }
}

/// The answer to a probe (`/healthz`, `/readyz`) from this process's own state, or `None`
/// for another path. The probe port and the probe socket both answer through it.
pub fn probe(readiness: &Readiness, path: &str) -> Option<Response<Full<Bytes>>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    Some(match path {
        "/healthz" => text(StatusCode::OK, PLAIN, "ok\n".into()),
        "/readyz" => match readiness.check() {
            Ok(()) => text(StatusCode::OK, PLAIN, "ready\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                PLAIN,
                format!("not ready: {why}\n"),
            ),
        },
        _ => return None,
    })
}

/// 404 for a path no admin listener serves.
pub fn not_found() -> Response<Full<Bytes>> {
    text(
        StatusCode::NOT_FOUND,
        "text/plain; charset=utf-8",
        "not found\n".into(),
    )
}
