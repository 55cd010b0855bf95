//! Every metric family the agent exports, registered in one place.
//!
//! Labels take values from small fixed sets (route, status class, outcome, reason); nothing
//! derived from a pod, a token or an upstream message becomes a label, so the series count is
//! bounded whatever pods do.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

pub const PREFIX: &str = "pod_identity_agent";

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];

/// Register `metric` under `name` and hand it back (every metric is a shared handle).
fn registered<M>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M
where
    M: prometheus_client::registry::Metric + Clone,
{
    registry.register(name, help, metric.clone());
    metric
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~6.5 s: cache hits sit at the bottom, upstream calls and timeouts at the top.
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

/// Handle to the metric families; cheap to clone (every field is shared).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    requests: Family<Labels2, Counter>,
    request_duration: Family<Labels1, Histogram>,
    /// The series every cache hit touches, resolved once: a hit does no family lookup.
    credentials_ok: Counter,
    credentials_duration: Histogram,
    upstream_calls: Family<Labels1, Counter>,
    upstream_duration: Histogram,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_coalesced: Counter,
    pub cache_entries: Gauge,
    cache_entries_by_state: Family<Labels1, Gauge>,
    pub stale_serves: Counter,
    evictions: Family<Labels1, Counter>,
    refreshes: Family<Labels1, Counter>,
    pub refresh_budget: Gauge<f64, AtomicU64>,
    pub min_credential_lifetime: Gauge<f64, AtomicU64>,
    pub upstream_busy: Counter,
    pub open_connections: Gauge,
    pub connections_refused: Counter,
    rate_limited: Family<Labels1, Counter>,
    pub associations: Gauge,
    association_reloads: Family<Labels1, Counter>,
    token_rejections: Family<Labels1, Counter>,
    key_reloads: Family<Labels2, Counter>,
    pub keys_loaded: Gauge,
    pub verification_enabled: Gauge,
    pub key_set_age: Gauge<f64, AtomicU64>,
    pub insecure_key_source: Gauge,
    pub pods_known: Gauge,
    pub pod_watch_synced: Gauge,
    pub pod_watch_staleness: Gauge<f64, AtomicU64>,
    pub pod_watch_errors: Counter,
    pod_lookups: Family<Labels1, Counter>,
    kubernetes_requests: Family<Labels1, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix(PREFIX);
        let requests = registered(
            &mut registry,
            "requests",
            "Credential-port requests by route and status class",
            Family::<Labels2, Counter>::default(),
        );
        let request_duration = registered(
            &mut registry,
            "request_duration_seconds",
            "Credential-port request latency by route",
            Family::<Labels1, Histogram>::new_with_constructor(
                latency_histogram as fn() -> Histogram,
            ),
        );
        let upstream_calls = registered(
            &mut registry,
            "upstream_calls",
            "Upstream credential calls by outcome",
            Family::<Labels1, Counter>::default(),
        );
        let upstream_duration = registered(
            &mut registry,
            "upstream_duration_seconds",
            "Upstream credential call latency",
            latency_histogram(),
        );
        let cache_hits = registered(
            &mut registry,
            "cache_hits",
            "Requests answered from the cache",
            Counter::default(),
        );
        let cache_misses = registered(
            &mut registry,
            "cache_misses",
            "Requests that started an upstream fetch",
            Counter::default(),
        );
        let cache_coalesced = registered(
            &mut registry,
            "cache_coalesced",
            "Requests that joined a fetch already in flight",
            Counter::default(),
        );
        let cache_entries = registered(
            &mut registry,
            "cache_entries",
            "Entries in the credential cache",
            Gauge::default(),
        );
        let cache_entries_by_state = registered(&mut registry, "cache_entries_by_state", "Entries with credentials, by state: fresh, refreshing, stale (past their refresh point)", Family::<Labels1, Gauge>::default());
        let stale_serves = registered(
            &mut registry,
            "stale_serves",
            "Requests answered with still-valid credentials because a refresh failed or was slow",
            Counter::default(),
        );
        let evictions = registered(
            &mut registry,
            "cache_evictions",
            "Entries removed, by reason: idle, revoked, token_expired, expired, size",
            Family::<Labels1, Counter>::default(),
        );
        let refreshes = registered(&mut registry, "refreshes", "Background refreshes by outcome: success, failed_kept (old credentials kept), failed, revoked", Family::<Labels1, Counter>::default());
        let refresh_budget = registered(
            &mut registry,
            "refresh_budget_qps",
            "Current background refresh budget in calls per second (halved on throttling)",
            Gauge::<f64, AtomicU64>::default(),
        );
        let min_credential_lifetime = Gauge::<f64, AtomicU64>::default();
        min_credential_lifetime.set(f64::NAN);
        registry.register(
            "cache_min_credential_lifetime_seconds",
            "Smallest remaining lifetime of any cached credentials (NaN when the cache is empty)",
            min_credential_lifetime.clone(),
        );
        let open_connections = registered(
            &mut registry,
            "open_connections",
            "Open connections on the credentials listeners",
            Gauge::default(),
        );
        let connections_refused = registered(
            &mut registry,
            "connections_refused",
            "Connections answered with 503 and closed because --max-connections were open",
            Counter::default(),
        );
        let upstream_busy = registered(
            &mut registry,
            "upstream_busy",
            "Request-path fetches refused with 503 because every upstream slot stayed busy",
            Counter::default(),
        );
        let rate_limited = registered(
            &mut registry,
            "rate_limited",
            "Requests refused with 429 by the agent's own limits, by scope",
            Family::<Labels1, Counter>::default(),
        );
        let associations = registered(
            &mut registry,
            "associations",
            "Associations loaded from --associations (sts backend)",
            Gauge::default(),
        );
        let association_reloads = registered(
            &mut registry,
            "association_reloads",
            "Loads of the associations file by outcome (a failure keeps the last good set)",
            Family::<Labels1, Counter>::default(),
        );
        let token_rejections = registered(
            &mut registry,
            "token_rejections",
            "Tokens refused before any upstream call, by reason",
            Family::<Labels1, Counter>::default(),
        );
        let key_reloads = registered(
            &mut registry,
            "key_reloads",
            "Verification key set loads by outcome and reason",
            Family::<Labels2, Counter>::default(),
        );
        let keys_loaded = registered(
            &mut registry,
            "keys_loaded",
            "Keys in the current verification key set",
            Gauge::default(),
        );
        let verification_enabled = registered(
            &mut registry,
            "verification_enabled",
            "1 when pod tokens are verified locally, 0 when they go upstream unverified",
            Gauge::default(),
        );
        let key_set_age = Gauge::<f64, AtomicU64>::default();
        key_set_age.set(f64::NAN);
        registry.register(
            "key_set_age_seconds",
            "Seconds since the verification keys were last fetched or confirmed from their source (NaN before the first)",
            key_set_age.clone(),
        );
        let insecure_key_source = registered(&mut registry, "insecure_key_source", "1 when --allow-insecure-key-source lets keys come over plain http from beyond loopback", Gauge::default());
        let pods_known = registered(
            &mut registry,
            "pods_known",
            "Running pods of this node known to caller attestation (--caller-attestation pod)",
            Gauge::default(),
        );
        let pod_watch_synced = registered(
            &mut registry,
            "pod_watch_synced",
            "1 once the node's pods have been listed; before that, credential requests get 503",
            Gauge::default(),
        );
        let pod_watch_staleness = Gauge::<f64, AtomicU64>::default();
        pod_watch_staleness.set(f64::NAN);
        registry.register(
            "pod_watch_staleness_seconds",
            "Seconds since the Kubernetes API server last sent the agent anything (list page, watch event or bookmark); NaN before the first",
            pod_watch_staleness.clone(),
        );
        let pod_watch_errors = registered(
            &mut registry,
            "pod_watch_errors",
            "Errors of the node's pod watch (each is retried with backoff)",
            Counter::default(),
        );
        let pod_lookups = registered(
            &mut registry,
            "pod_lookups",
            "Single-pod reads for pods the watch had not delivered, by result",
            Family::<Labels1, Counter>::default(),
        );
        let kubernetes_requests = registered(
            &mut registry,
            "kubernetes_requests",
            "Requests to the Kubernetes API server by kind (list, watch, get, keys, other)",
            Family::<Labels1, Counter>::default(),
        );
        let credentials_ok = requests
            .get_or_create(&[("route", "credentials"), ("status_class", "2xx")])
            .clone();
        let credentials_duration = request_duration
            .get_or_create(&[("route", "credentials")])
            .clone();
        let build_info = Family::<Labels1, Gauge>::default();
        registry.register("build_info", "Agent version", build_info.clone());
        build_info
            .get_or_create(&[("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        Metrics {
            registry: Arc::new(registry),
            requests,
            request_duration,
            credentials_ok,
            credentials_duration,
            upstream_calls,
            upstream_duration,
            cache_hits,
            cache_misses,
            cache_coalesced,
            cache_entries,
            cache_entries_by_state,
            stale_serves,
            evictions,
            refreshes,
            refresh_budget,
            min_credential_lifetime,
            upstream_busy,
            open_connections,
            connections_refused,
            rate_limited,
            associations,
            association_reloads,
            token_rejections,
            key_reloads,
            keys_loaded,
            verification_enabled,
            key_set_age,
            insecure_key_source,
            pods_known,
            pod_watch_synced,
            pod_watch_staleness,
            pod_watch_errors,
            pod_lookups,
            kubernetes_requests,
        }
    }

    pub fn request(&self, route: &'static str, status: u16, seconds: f64) {
        if route == "credentials" && (200..300).contains(&status) {
            self.credentials_ok.inc();
            self.credentials_duration.observe(seconds);
            return;
        }
        let class = match status {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.requests
            .get_or_create(&[("route", route), ("status_class", class)])
            .inc();
        self.request_duration
            .get_or_create(&[("route", route)])
            .observe(seconds);
    }

    pub fn upstream_call(&self, outcome: &'static str, seconds: f64) {
        self.upstream_calls
            .get_or_create(&[("outcome", outcome)])
            .inc();
        self.upstream_duration.observe(seconds);
    }

    pub fn token_rejected(&self, reason: &'static str) {
        self.token_rejections
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    pub fn pod_lookup(&self, result: &'static str) {
        self.pod_lookups.get_or_create(&[("result", result)]).inc();
    }

    pub fn kubernetes_request(&self, kind: &'static str) {
        self.kubernetes_requests
            .get_or_create(&[("kind", kind)])
            .inc();
    }

    pub fn eviction(&self, reason: &'static str) {
        self.evictions.get_or_create(&[("reason", reason)]).inc();
    }

    pub fn refresh(&self, outcome: &'static str) {
        self.refreshes.get_or_create(&[("outcome", outcome)]).inc();
    }

    pub fn rate_limited(&self, scope: &'static str) {
        self.rate_limited.get_or_create(&[("scope", scope)]).inc();
    }

    pub fn association_reload(&self, outcome: &'static str) {
        self.association_reloads
            .get_or_create(&[("outcome", outcome)])
            .inc();
    }

    pub fn set_entries_by_state(&self, fresh: i64, refreshing: i64, stale: i64, idle: i64) {
        for (state, n) in [
            ("fresh", fresh),
            ("refreshing", refreshing),
            ("stale", stale),
            ("idle", idle),
        ] {
            self.cache_entries_by_state
                .get_or_create(&[("state", state)])
                .set(n);
        }
    }

    pub fn key_reload(&self, outcome: &'static str, reason: &'static str) {
        self.key_reloads
            .get_or_create(&[("outcome", outcome), ("reason", reason)])
            .inc();
    }

    /// Prometheus text exposition (OpenMetrics flavour, as prometheus-client writes it).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_prefixed_families() {
        let m = Metrics::new();
        m.request("credentials", 200, 0.001);
        m.upstream_call("success", 0.05);
        m.cache_hits.inc();
        m.verification_enabled.set(1);
        let text = m.encode();
        for needle in [
            "pod_identity_agent_requests_total{route=\"credentials\",status_class=\"2xx\"} 1",
            "pod_identity_agent_upstream_calls_total{outcome=\"success\"} 1",
            "pod_identity_agent_cache_hits_total 1",
            "pod_identity_agent_verification_enabled 1",
            "pod_identity_agent_request_duration_seconds_bucket",
            "pod_identity_agent_build_info{version=",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
