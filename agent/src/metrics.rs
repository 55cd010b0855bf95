//! Every metric family the agent exports, declared in one place.
//!
//! Labels take values from small fixed sets (route, status class, outcome, reason); nothing
//! derived from a pod, a token or an upstream message becomes a label, so the series count is
//! bounded whatever pods do.
//!
//! Two rules keep every value a scrape shows meaningful. A family that belongs to a feature
//! that can be off ([`Features`]) is registered only when it is on, so an agent without caller
//! attestation has no pod-watch family at all, rather than a `pod_watch_synced 0` that fires
//! the pod-watch alert on every such node. And a value that is not known (no credentials in
//! use, keys never loaded) is no sample ([`Seconds`]), never NaN, which every comparison in an
//! alert silently reads as false and every sum turns into NaN.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

pub const PREFIX: &str = "pod_identity_agent";

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];
/// Counters by one label (the names Prometheus' Go client gives these families).
type CounterVec = Family<Labels1, Counter>;
/// Counters by two labels.
type CounterVec2 = Family<Labels2, Counter>;
/// Gauges by one label.
type GaugeVec = Family<Labels1, Gauge>;
/// Latency histograms by one label.
type HistogramVec = Family<Labels1, Histogram>;
/// A gauge of seconds or calls per second.
type Real = Gauge<f64, AtomicU64>;

/// A gauge of seconds that may not be known yet, or at the moment (see the module's rules):
/// while unknown the family has no sample, so alerts and dashboards see "no data", not NaN.
#[derive(Clone, Debug)]
pub struct Seconds(Real);

impl Default for Seconds {
    fn default() -> Self {
        let gauge = Real::default();
        gauge.set(f64::NAN);
        Seconds(gauge)
    }
}

impl Seconds {
    /// The value, or `None` for "not known": the sample is left out of the next scrape.
    pub fn set(&self, value: Option<Duration>) {
        self.0.set(value.map_or(f64::NAN, |d| d.as_secs_f64()));
    }
}

impl EncodeMetric for Seconds {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        if self.0.get().is_nan() {
            return Ok(());
        }
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

/// The parts of the agent that can be off, and so the families that are registered: those
/// marked `#[only(feature)]` below are left out of `/metrics` while their feature is off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    /// Tokens verified locally against a key source: key reloads, keys loaded, key set age.
    pub local_verification: bool,
    /// `--caller-attestation pod`: the node's pod watch and single-pod lookups.
    pub pod_watch: bool,
    /// A Kubernetes client (the pod watch, or keys from the API server): its requests.
    pub kubernetes_api: bool,
    /// The sts backend's associations file.
    pub associations: bool,
    /// `--startup-taint`: its removal from the node.
    pub startup_taint: bool,
    /// `--handoff-socket`: listeners and state passed between agents.
    pub handoff: bool,
    /// `--audit-log`: first deliveries of keys to pods, recorded.
    pub audit: bool,
}

impl Features {
    /// Every feature on, every family registered (unit tests, benches, the fuzz harness).
    pub const ALL: Features = Features {
        local_verification: true,
        pod_watch: true,
        kubernetes_api: true,
        associations: true,
        startup_taint: true,
        handoff: true,
        audit: true,
    };
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~6.5 s: cache hits sit at the bottom, upstream calls and timeouts at the top.
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

fn latency_by_label() -> HistogramVec {
    Family::new_with_constructor(latency_histogram as fn() -> Histogram)
}

/// Declares the families once, as a struct: each field is named as the family is exported
/// (less the prefix, and the `_total` a counter gets), its doc comment is the exported help,
/// `#[only(feature)]` names the [`Features`] field without which it is not registered, and
/// `= expr` says how it starts where the type's default does not do. The struct and the
/// registration are both written from this one list. A family that is not registered still
/// has its field, so the code that counts need not ask; nothing it counts is exported.
macro_rules! families {
    ($(#[doc = $help:literal] $(#[only($feature:ident)])? $name:ident: $ty:ty $(= $start:expr)?,)*) => {
        /// Handle to the metric families; cheap to clone (every field is shared).
        #[derive(Clone)]
        pub struct Metrics {
            registry: Arc<Registry>,
            /// The series every cache hit touches, resolved once: a hit does no family lookup.
            credentials_ok: Counter,
            credentials_duration: Histogram,
            $(#[doc = $help] pub(crate) $name: $ty,)*
        }

        impl Metrics {
            /// Every family of the `features` that are on, registered under its name, with no
            /// series yet.
            fn registered(features: Features) -> Metrics {
                let mut registry = Registry::with_prefix(PREFIX);
                $(
                    let $name: $ty = families!(@start $($start)?);
                    if families!(@on features $($feature)?) {
                        registry.register(stringify!($name), $help.trim(), $name.clone());
                    }
                )*
                let build_info = Family::<Labels1, Gauge>::default();
                registry.register("build_info", "Agent version", build_info.clone());
                build_info.get_or_create(&[("version", env!("CARGO_PKG_VERSION"))]).set(1);
                Metrics {
                    registry: Arc::new(registry),
                    credentials_ok: Counter::default(),
                    credentials_duration: latency_histogram(),
                    $($name,)*
                }
            }
        }
    };
    (@start) => {
        Default::default()
    };
    (@start $start:expr) => {
        $start
    };
    (@on $features:ident) => {
        true
    };
    (@on $features:ident $feature:ident) => {
        $features.$feature
    };
}

families! {
    /// Credential-port request latency by route
    request_duration_seconds: HistogramVec = latency_by_label(),
    /// Upstream credential call latency
    upstream_duration_seconds: Histogram = latency_histogram(),
    /// Credential-port requests by route and status class
    requests: CounterVec2,
    /// Upstream credential calls by outcome
    upstream_calls: CounterVec,
    /// Requests answered from the cache
    cache_hits: Counter,
    /// Requests that started an upstream fetch
    cache_misses: Counter,
    /// Requests that joined a fetch already in flight
    cache_coalesced: Counter,
    /// Entries in the credential cache
    cache_entries: Gauge,
    /// Entries with credentials, by state: fresh, refreshing, stale, idle
    cache_entries_by_state: GaugeVec,
    /// Requests answered with still-valid credentials because a refresh failed or was slow
    stale_serves: Counter,
    /// Entries removed, by reason: idle, revoked, token_expired, expired, size, pod_gone
    cache_evictions: CounterVec,
    /// Background refreshes by outcome: success, failed_kept, failed, revoked
    refreshes: CounterVec,
    /// Current background refresh budget in calls per second (halved on throttling)
    refresh_budget_qps: Real,
    /// Smallest remaining lifetime of any credentials in use (no sample when there are none)
    cache_min_credential_lifetime_seconds: Seconds,
    /// Open connections on the credentials listeners
    open_connections: Gauge,
    /// Connections answered with 503 and closed because --max-connections were open
    connections_refused: Counter,
    /// Idle or unfinished connections closed to make room for a new client when every slot was taken
    connections_reclaimed: Counter,
    /// Request-path fetches refused with 503 because every upstream slot stayed busy
    upstream_busy: Counter,
    /// Requests refused with 429 by the agent's own limits, by scope
    rate_limited: CounterVec,
    /// Associations loaded from --associations (sts backend)
    #[only(associations)]
    associations: Gauge,
    /// Loads of the associations file by outcome (a failure keeps the last good set)
    #[only(associations)]
    association_reloads: CounterVec,
    /// Tokens refused before any upstream call, by reason
    token_rejections: CounterVec,
    /// Verification key set loads by outcome and reason
    #[only(local_verification)]
    key_reloads: CounterVec2,
    /// Keys in the current verification key set
    #[only(local_verification)]
    keys_loaded: Gauge,
    /// 1 when pod tokens are verified locally, 0 when they go upstream unverified
    verification_enabled: Gauge,
    /// Seconds since the keys were last fetched or confirmed (no sample before the first)
    #[only(local_verification)]
    key_set_age_seconds: Seconds,
    /// 1 when --allow-insecure-key-source lets keys come over plain http from beyond loopback
    insecure_key_source: Gauge,
    /// Running pods of this node known to caller attestation (--caller-attestation pod)
    #[only(pod_watch)]
    pods_known: Gauge,
    /// 1 once the node's pods have been listed; before that, credential requests get 503
    #[only(pod_watch)]
    pod_watch_synced: Gauge,
    /// Seconds since the Kubernetes API server last sent anything (no sample before the first)
    #[only(pod_watch)]
    pod_watch_staleness_seconds: Seconds,
    /// Errors of the node's pod watch (each is retried with backoff)
    #[only(pod_watch)]
    pod_watch_errors: Counter,
    /// Single-pod reads for pods the watch had not delivered, by result
    #[only(pod_watch)]
    pod_lookups: CounterVec,
    /// Pods from the Kubernetes API server that did not parse, by source (list, watch, get): skipped, their tokens refused
    #[only(pod_watch)]
    malformed_pods: CounterVec,
    /// Requests to the Kubernetes API server by kind (list, watch, get, keys, other)
    #[only(kubernetes_api)]
    kubernetes_requests: CounterVec,
    /// Seconds from the agent's start to the removal of --startup-taint from its node (no sample until then)
    #[only(startup_taint)]
    startup_taint_removal_seconds: Seconds,
    /// Attempts to remove --startup-taint by result: removed, absent, conflict, error
    #[only(startup_taint)]
    startup_taint_attempts: CounterVec,
    /// Handoffs to a newer agent by result: given, failed (the peer went away or was too slow), refused_peer (another uid)
    #[only(handoff)]
    handoffs_given: CounterVec,
    /// Takeovers at start by result: taken, listeners_only (no usable state), none (no agent answered), refused
    #[only(handoff)]
    handoffs_taken: CounterVec,
    /// Entries passed in handoffs by direction (given, taken) and kind (credentials, pods, gone_pods, keys)
    #[only(handoff)]
    handoff_entries: CounterVec2,
    /// Seconds a handoff took, by direction: given (from the peer's hello to its confirmation), taken (from connecting to serving)
    #[only(handoff)]
    handoff_duration_seconds: HistogramVec = latency_by_label(),
    /// Answers of the Kubernetes API server cut off at their size bound (a watch line, a list page, an object), by request kind
    #[only(kubernetes_api)]
    kubernetes_oversized_answers: CounterVec,
    /// Audit records written (first deliveries of an access key to a pod), by origin: upstream, cache
    #[only(audit)]
    audit_records: CounterVec,
    /// Audit records that could not be written (the request was still served)
    #[only(audit)]
    audit_write_failures: Counter,
    /// Audit log rotations
    #[only(audit)]
    audit_rotations: Counter,
}

/// Counters of one label: the method that counts, the label's name, and the family.
macro_rules! counted_by_label {
    ($($method:ident($label:literal) => $family:ident;)*) => {
        impl Metrics {
            $(pub fn $method(&self, value: &'static str) {
                self.$family.get_or_create(&[($label, value)]).inc();
            })*
        }
    };
}

counted_by_label! {
    token_rejected("reason") => token_rejections;
    pod_lookup("result") => pod_lookups;
    malformed_pod("source") => malformed_pods;
    kubernetes_request("kind") => kubernetes_requests;
    kubernetes_oversized_answer("kind") => kubernetes_oversized_answers;
    eviction("reason") => cache_evictions;
    refresh("outcome") => refreshes;
    rate_limited("scope") => rate_limited;
    association_reload("outcome") => association_reloads;
    startup_taint_attempt("result") => startup_taint_attempts;
    handoff_given("result") => handoffs_given;
    handoff_taken("result") => handoffs_taken;
    audit_record("origin") => audit_records;
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every family registered ([`Features::ALL`]).
    pub fn new() -> Metrics {
        Metrics::with_features(Features::ALL)
    }

    /// The families of the agent's `features`, and no others.
    pub fn with_features(features: Features) -> Metrics {
        let mut metrics = Metrics::registered(features);
        metrics.credentials_ok = metrics
            .requests
            .get_or_create(&[("route", "credentials"), ("status_class", "2xx")])
            .clone();
        metrics.credentials_duration = metrics
            .request_duration_seconds
            .get_or_create(&[("route", "credentials")])
            .clone();
        metrics
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
        self.request_duration_seconds
            .get_or_create(&[("route", route)])
            .observe(seconds);
    }

    pub fn upstream_call(&self, outcome: &'static str, seconds: f64) {
        self.upstream_calls
            .get_or_create(&[("outcome", outcome)])
            .inc();
        self.upstream_duration_seconds.observe(seconds);
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

    /// A handoff's entries of one kind, given or taken.
    pub fn handoff_entries(&self, direction: &'static str, kind: &'static str, n: usize) {
        self.handoff_entries
            .get_or_create(&[("direction", direction), ("kind", kind)])
            .inc_by(n as u64);
    }

    pub fn handoff_duration(&self, direction: &'static str, seconds: f64) {
        self.handoff_duration_seconds
            .get_or_create(&[("direction", direction)])
            .observe(seconds);
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

    #[test]
    fn families_of_features_that_are_off_are_not_exported() {
        let off = Metrics::with_features(Features {
            local_verification: false,
            pod_watch: false,
            kubernetes_api: false,
            associations: false,
            startup_taint: false,
            handoff: false,
            audit: false,
        });
        // Counting into a family that is not registered is harmless and invisible.
        off.pod_watch_synced.set(0);
        off.pod_watch_staleness_seconds
            .set(Some(Duration::from_secs(3)));
        off.association_reload("success");
        let text = off.encode();
        for family in [
            "key_reloads",
            "keys_loaded",
            "key_set_age_seconds",
            "pods_known",
            "pod_watch_synced",
            "pod_watch_staleness_seconds",
            "pod_watch_errors",
            "startup_taint_attempts",
            "startup_taint_removal_seconds",
            "handoffs_given",
            "handoffs_taken",
            "handoff_entries",
            "handoff_duration_seconds",
            "audit_records",
            "audit_write_failures",
            "pod_lookups",
            "malformed_pods",
            "kubernetes_requests",
            "kubernetes_oversized_answers",
            "associations",
            "association_reloads",
        ] {
            assert!(
                !text.contains(&format!("{PREFIX}_{family} ")),
                "{family} in\n{text}"
            );
        }
        assert!(text.contains("pod_identity_agent_verification_enabled 0"));
        let all = Metrics::new().encode();
        assert!(all.contains("# TYPE pod_identity_agent_pod_watch_synced gauge"));
    }

    #[test]
    fn an_unknown_value_is_no_sample_not_nan() {
        let m = Metrics::new();
        let series = "pod_identity_agent_pod_watch_staleness_seconds";
        let sample = |text: &str| {
            text.lines()
                .find(|l| l.starts_with(series))
                .map(str::to_owned)
        };
        let text = m.encode();
        assert!(!text.contains("NaN"), "{text}");
        assert!(text.contains(&format!("# TYPE {series} gauge")), "{text}");
        assert_eq!(sample(&text), None, "{text}");
        m.pod_watch_staleness_seconds
            .set(Some(Duration::from_millis(1500)));
        assert_eq!(sample(&m.encode()), Some(format!("{series} 1.5")));
        m.pod_watch_staleness_seconds.set(None);
        assert_eq!(sample(&m.encode()), None);
    }
}
