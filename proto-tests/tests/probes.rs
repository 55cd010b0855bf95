//! Probe and metrics listeners.

use proto_tests::assertions::only_issued;
use proto_tests::metrics;
use proto_tests::{Pod, TestBed};

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
