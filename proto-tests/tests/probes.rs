//! Probe and metrics listeners.

use std::net::IpAddr;
use std::time::Duration;

use proto_tests::assertions::only_issued;
use proto_tests::metrics;
use proto_tests::{FakeKubeApi, KubePod, Pod, TestBed};

#[tokio::test]
async fn probes_answer_200_once_started() {
    let bed = TestBed::start().await;
    for path in ["/healthz", "/readyz"] {
        let response = bed.agent.probe(path).await;
        assert_eq!(response.status, 200, "{path}: {response:?}");
    }
}

#[tokio::test]
async fn metrics_expose_request_and_cache_families() {
    let bed = TestBed::start().await;
    let token = bed.token(&Pod::new("team-a", "app", "app-0"));
    assert_eq!(bed.agent.fetch_credentials(&token).await.status, 200); // miss
    assert_eq!(bed.agent.fetch_credentials(&token).await.status, 200); // hit
    only_issued(&bed.upstream);

    let text = bed.agent.metrics_text().await;
    for name in [
        "pod_identity_agent_requests_total",
        "pod_identity_agent_upstream_calls_total",
        "pod_identity_agent_cache_hits_total",
        "pod_identity_agent_cache_misses_total",
        "pod_identity_agent_cache_coalesced_total",
    ] {
        assert!(metrics::has_metric(&text, name), "{name} missing:\n{text}");
    }
    let sum = |name: &str| metrics::sum(&text, name).unwrap_or(0.0);
    assert!(sum("pod_identity_agent_requests_total") >= 2.0, "{text}");
    assert_eq!(
        sum("pod_identity_agent_upstream_calls_total"),
        1.0,
        "{text}"
    );
    assert!(
        sum("pod_identity_agent_cache_misses_total") >= 1.0,
        "{text}"
    );
    assert!(sum("pod_identity_agent_cache_hits_total") >= 1.0, "{text}");
    assert_eq!(
        metrics::sum(&text, "pod_identity_agent_verification_enabled"),
        Some(1.0),
        "verification is enabled with --jwks-file:\n{text}"
    );
}

/// Families of the pod watch (caller attestation), of the Kubernetes client and of the sts
/// backend's associations.
const ATTESTATION_FAMILIES: [&str; 6] = [
    "pod_identity_agent_pods_known",
    "pod_identity_agent_pod_watch_synced",
    "pod_identity_agent_pod_watch_staleness_seconds",
    "pod_identity_agent_pod_watch_errors",
    "pod_identity_agent_pod_lookups",
    "pod_identity_agent_kubernetes_requests",
];
const ASSOCIATION_FAMILIES: [&str; 2] = [
    "pod_identity_agent_associations",
    "pod_identity_agent_association_reloads",
];

/// No sample of `text` is NaN: an unknown value is left out, never exported as NaN.
fn assert_no_nan(text: &str) {
    let nan: Vec<String> = metrics::samples(text)
        .into_iter()
        .filter(|(_, value)| value.is_nan())
        .map(|(series, _)| series)
        .collect();
    assert!(nan.is_empty(), "NaN samples {nan:?} in\n{text}");
}

/// Every sample of family `name` (any labels, any suffix), with its value.
fn family_samples(text: &str, name: &str) -> Vec<(String, f64)> {
    metrics::samples(text)
        .into_iter()
        .filter(|(series, _)| series.starts_with(name))
        .collect()
}

/// An agent without caller attestation (and with the eks-auth backend) exports no pod-watch,
/// Kubernetes-client or associations family at all, not a zero that the pod-watch alert
/// (`pod_watch_synced == 0`) would fire on, and no NaN: neither with an empty cache (the
/// shortest-lifetime gauge has no sample then) nor with an entry in it.
#[tokio::test]
async fn an_agent_without_caller_attestation_exports_no_pod_watch_family_and_no_nan() {
    let bed = TestBed::start().await;
    let lifetime = "pod_identity_agent_cache_min_credential_lifetime_seconds";
    let empty = bed.agent.metrics_text().await;
    assert_no_nan(&empty);
    assert_eq!(metrics::value(&empty, lifetime), None, "{empty}");
    for family in ATTESTATION_FAMILIES.iter().chain(&ASSOCIATION_FAMILIES) {
        assert!(
            !metrics::has_metric(&empty, family) && family_samples(&empty, family).is_empty(),
            "{family} is exported with its feature off:\n{empty}"
        );
    }
    let age = metrics::value(&empty, "pod_identity_agent_key_set_age_seconds");
    assert!(
        age.is_some_and(f64::is_finite),
        "local verification is on: its key set age is known once ready\n{empty}"
    );

    let token = bed.token(&Pod::new("team-a", "app", "app-0"));
    assert_eq!(bed.agent.fetch_credentials(&token).await.status, 200);
    let cached = bed.agent.metrics_text().await;
    assert_no_nan(&cached);
    assert!(
        metrics::value(&cached, lifetime).is_some_and(|v| v.is_finite() && v > 0.0),
        "{cached}"
    );
}

/// With `--caller-attestation pod` the pod-watch families are there, with finite values
/// once the node's pods are listed, and still no NaN anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attesting_agent_exports_its_pod_watch_families_with_finite_values() {
    let api = FakeKubeApi::start().await;
    let pod = Pod::new("team-a", "app", "app-0");
    let pod_ip = IpAddr::from([127, 0, 0, 10]);
    api.add_pod(KubePod::of(&pod, "node-a", pod_ip));
    let bed = TestBed::builder()
        .args(["--node-name", "node-a", "--caller-attestation", "pod"])
        .env("KUBECONFIG", api.kubeconfig())
        .start()
        .await;
    bed.agent
        .wait_for_metric(
            "pod_identity_agent_pod_watch_synced",
            |v| v == 1.0,
            Duration::from_secs(20),
        )
        .await;
    let response = bed
        .agent
        .fetch_credentials_from(pod_ip, &bed.token(&pod))
        .await;
    assert_eq!(response.status, 200, "{response:?}");
    let text = bed.agent.metrics_text().await;
    assert_no_nan(&text);
    for family in ATTESTATION_FAMILIES {
        assert!(
            metrics::has_metric(&text, family),
            "{family} missing:\n{text}"
        );
    }
    let staleness = metrics::value(&text, "pod_identity_agent_pod_watch_staleness_seconds");
    assert!(
        staleness.is_some_and(|s| s.is_finite() && s >= 0.0),
        "staleness {staleness:?} after the first list:\n{text}"
    );
    assert_eq!(
        metrics::value(&text, "pod_identity_agent_pods_known"),
        Some(1.0),
        "{text}"
    );
    for family in ASSOCIATION_FAMILIES {
        assert!(!metrics::has_metric(&text, family), "{family}:\n{text}");
    }
}
