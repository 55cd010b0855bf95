//! The way SDKs really ask: once, then nothing until their credentials near expiry (hours
//! later with real sessions). The agent's retention is shortened to 2 s here, so "idle past
//! the refresh point" takes seconds; the fake's credentials live an hour unless a test says
//! otherwise.

use std::time::Duration;

use proto_tests::assertions::wait_until;
use proto_tests::http::RawResponse;
use proto_tests::{metrics, Fault, Pod, TestBed};
use tokio::time::Instant;

/// The refresh point comes at most 2 s after a fetch (minus up to a tenth as jitter).
const RETENTION: &str = "2s";
/// Bounds the waits for the agent's timers (2 s, or 5 s for short credentials) to fire.
const TIMER_WAIT: Duration = Duration::from_secs(15);
/// Bounds the wait for a line to reach the test's log reader.
const LOG_WAIT: Duration = Duration::from_secs(5);

async fn fetched_then_idle(lifetime: Option<Duration>) -> (TestBed, String, String) {
    let bed = TestBed::with_args(["--max-credential-retention-before-renewal", RETENTION]).await;
    if let Some(lifetime) = lifetime {
        bed.upstream.set_credential_lifetime(lifetime);
    }
    let token = bed.token(&Pod::new("team-a", "app", "app-0"));
    let first = bed.agent.fetch_credentials(&token).await;
    assert_eq!(first.status, 200, "{first:?}");
    let key = first.json_str("AccessKeyId").expect("AccessKeyId");
    // Silent, as an SDK is, until the agent reaches the refresh point and, nobody having asked,
    // lets the entry go dormant (kept, not refreshed).
    bed.agent
        .wait_for_metric(
            "pod_identity_agent_cache_entries_by_state{state=\"idle\"}",
            |idle| idle == 1.0,
            TIMER_WAIT,
        )
        .await;
    assert_eq!(
        bed.upstream.calls(),
        1,
        "nobody asked after the fetch: no background refresh"
    );
    (bed, token, key)
}

async fn timed_fetch(bed: &TestBed, token: &str) -> (RawResponse, Duration) {
    let started = Instant::now();
    let response = bed.agent.fetch_credentials(token).await;
    (response, started.elapsed())
}

async fn outage_after_idleness(fault: Fault) {
    let (bed, token, key) = fetched_then_idle(None).await;
    bed.upstream.set_fault(fault.clone());
    let (response, took) = timed_fetch(&bed, &token).await;
    assert_eq!(
        response.status,
        200,
        "{fault:?}: {response:?}\n{}",
        bed.agent.logs_text()
    );
    assert_eq!(
        response.json_str("AccessKeyId").as_deref(),
        Some(key.as_str())
    );
    assert!(
        took < Duration::from_secs(1),
        "{fault:?}: answered in {took:?}"
    );
    assert!(bed.upstream.calls() >= 2, "the request tried the upstream");
    let text = bed.agent.metrics_text().await;
    assert!(
        metrics::sum(&text, "pod_identity_agent_stale_serves_total").unwrap_or(0.0) >= 1.0,
        "{text}"
    );
}

#[tokio::test]
async fn idle_past_the_refresh_point_then_upstream_500_serves_the_same_credentials() {
    outage_after_idleness(Fault::internal()).await;
}

#[tokio::test]
async fn idle_past_the_refresh_point_then_upstream_503_serves_the_same_credentials() {
    outage_after_idleness(Fault::error(
        503,
        "ServiceUnavailableException",
        "Service unavailable",
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_past_the_refresh_point_then_hanging_upstream_serves_the_same_credentials() {
    outage_after_idleness(Fault::Hang).await;
}

#[tokio::test]
async fn idle_past_the_refresh_point_then_healthy_upstream_serves_new_credentials() {
    let (bed, token, key) = fetched_then_idle(None).await;
    let (response, _) = timed_fetch(&bed, &token).await;
    assert_eq!(response.status, 200, "{response:?}");
    let new_key = response.json_str("AccessKeyId").expect("AccessKeyId");
    assert_ne!(new_key, key, "the request refetched");
    assert_eq!(bed.upstream.calls(), 2);
    // And the new credentials are a cache hit from now on.
    let again = bed.agent.fetch_credentials(&token).await;
    assert_eq!(again.json_str("AccessKeyId"), Some(new_key));
    assert_eq!(bed.upstream.calls(), 2);
}

#[tokio::test]
async fn credentials_inside_the_expiry_margin_are_never_served() {
    // 20 s credentials may be handed out until 15 s before expiry: 5 s after the fetch. The
    // agent drops the dormant entry then.
    let (bed, token, key) = fetched_then_idle(Some(Duration::from_secs(20))).await;
    bed.agent
        .wait_for_metric("pod_identity_agent_cache_entries", |n| n == 0.0, TIMER_WAIT)
        .await;
    bed.upstream.set_fault(Fault::internal());
    let (response, _) = timed_fetch(&bed, &token).await;
    assert_eq!(response.status, 502, "{response:?}");
    assert!(
        !response.text().contains(&key),
        "expiring credentials leaked: {response:?}"
    );
}

#[tokio::test]
async fn the_cache_size_bound_holds_at_every_answer() {
    let bed = TestBed::with_args(["--max-cache-size", "2"]).await;
    let pods: Vec<Pod> = ["a", "b", "c"]
        .iter()
        .map(|n| Pod::new("team-a", "app", &format!("app-{n}")))
        .collect();
    for pod in pods.iter().chain([&pods[0]]) {
        let response = bed.fetch_as(pod).await;
        assert_eq!(response.status, 200, "{response:?}");
        let text = bed.agent.metrics_text().await;
        let entries = metrics::value(&text, "pod_identity_agent_cache_entries").unwrap();
        assert!(entries <= 2.0, "{entries} entries in a 2-entry cache");
    }
    assert_eq!(
        bed.upstream.calls(),
        4,
        "the first pod was evicted when the third arrived, and fetched again"
    );
    let text = bed.agent.metrics_text().await;
    assert_eq!(
        metrics::value(
            &text,
            "pod_identity_agent_cache_evictions_total{reason=\"size\"}"
        ),
        Some(2.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_size_or_retention_turns_caching_off_but_keeps_coalescing() {
    for flags in [
        ["--max-cache-size", "0"],
        ["--max-credential-retention-before-renewal", "0"],
    ] {
        let bed = TestBed::builder().args(flags).start().await;
        let token = bed.token(&Pod::new("team-a", "app", "app-0"));
        for _ in 0..2 {
            let response = bed.agent.fetch_credentials(&token).await;
            assert_eq!(response.status, 200, "{flags:?}: {response:?}");
        }
        assert_eq!(
            bed.upstream.calls(),
            2,
            "{flags:?}: every request is a call"
        );
        bed.upstream.set_latency(Duration::from_millis(800));
        let addr = bed.agent.credentials_addr();
        let answers = proto_tests::agent::burst(addr, std::iter::repeat_n(token, 20)).await;
        for (response, _) in answers {
            assert_eq!(response.expect("answered").status, 200);
        }
        let calls = bed.upstream.calls() - 2;
        assert!(
            calls <= 2,
            "{flags:?}: 20 concurrent requests made {calls} calls"
        );
    }
}

#[tokio::test]
async fn gauges_are_finite_after_traffic() {
    let bed = TestBed::start().await;
    let token = bed.token(&Pod::new("team-a", "app", "app-0"));
    assert_eq!(bed.agent.fetch_credentials(&token).await.status, 200);
    let text = bed.agent.metrics_text().await;
    let lifetime = metrics::value(
        &text,
        "pod_identity_agent_cache_min_credential_lifetime_seconds",
    )
    .expect("exported");
    assert!(
        lifetime.is_finite() && lifetime > 3500.0 && lifetime <= 3600.0,
        "{lifetime}\n{text}"
    );
    assert_eq!(
        metrics::value(
            &text,
            "pod_identity_agent_cache_entries_by_state{state=\"fresh\"}"
        ),
        Some(1.0),
        "{text}"
    );
}

/// `-v/--verbosity` reaches the log filter, before or after the subcommand.
#[tokio::test]
async fn verbosity_sets_the_log_level_either_side_of_the_subcommand() {
    for (global, args) in [(Some("debug"), None), (None, Some(["-v", "debug"]))] {
        let mut builder = TestBed::builder();
        if let Some(level) = global {
            builder = builder.global_arg("-v").global_arg(level);
        }
        if let Some(args) = args {
            builder = builder.args(args);
        }
        let bed = builder.start().await;
        let token = bed.token(&Pod::new("team-a", "app", "app-0"));
        for _ in 0..2 {
            assert_eq!(bed.agent.fetch_credentials(&token).await.status, 200);
        }
        wait_until("a \"cache hit\" line at -v debug", LOG_WAIT, || {
            bed.agent.logs_text().contains("\"cache hit\"")
        })
        .await;
    }
    // And the default, info, has no per-hit line. A refused request afterwards logs at info;
    // the log is one stream, so once that line is in, a hit's line would be too.
    let bed = TestBed::start().await;
    let token = bed.token(&Pod::new("team-a", "app", "app-0"));
    for _ in 0..2 {
        assert_eq!(bed.agent.fetch_credentials(&token).await.status, 200);
    }
    let refused = bed.agent.fetch_credentials("not-a-token").await;
    assert!(matches!(refused.status, 400 | 401), "{refused:?}");
    wait_until(
        "the refused request's \"request refused\" line",
        LOG_WAIT,
        || bed.agent.logs_text().contains("\"request refused\""),
    )
    .await;
    assert!(!bed.agent.logs_text().contains("\"cache hit\""));
}
