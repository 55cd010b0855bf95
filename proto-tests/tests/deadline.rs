//! One deadline for the whole credentials path: whatever is slow (a key reload for an unknown
//! `kid`, a pod lookup, the upstream, or several of them one after the other), a fresh request
//! is answered within the contract's 5 s, with the status of what was still pending (503 or
//! 504) and `Retry-After`. Work that other requests share goes on, so the client's retry is
//! served from it.

use std::net::IpAddr;
use std::time::Duration;

use proto_tests::assertions::{assert_failed_in_time, UPSTREAM_FAILURE_DEADLINE};
use proto_tests::http::RawResponse;
use proto_tests::keys::jwks;
use proto_tests::{Agent, FakeEksAuth, FakeJwks, FakeKubeApi, KubePod, Pod, TestBed, TestKeys};
use tokio::time::Instant;

const NODE: &str = "node-a";

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// Answered in time with `status`, the JSON error body, `code` and `Retry-After`.
fn assert_deadline_answer(response: &RawResponse, took: Duration, status: u16, codes: &[&str]) {
    assert_failed_in_time(response, status..=status, took, "a slow dependency");
    let code = response.json_str("code").unwrap_or_default();
    assert!(codes.contains(&code.as_str()), "{codes:?}: {response:?}");
    assert!(
        response.header("retry-after").is_some(),
        "no Retry-After: {response:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_kid_whose_key_reload_hangs_is_answered_within_5s() {
    let keys = TestKeys::shared();
    let issuer = FakeJwks::start(jwks(&[&keys.rsa])).await;
    let upstream = FakeEksAuth::start().await;
    let agent = Agent::builder(upstream.url())
        .args(["--jwks-url", &issuer.jwks_url()])
        .start()
        .await;
    issuer.set_jwks_delay(Duration::from_secs(120));
    let pod = Pod::new("team-a", "app", "app-0");
    let rotated = pod
        .token()
        .kid("published-after-start")
        .sign(TestKeys::untrusted_rsa());

    let started = Instant::now();
    let response = agent.fetch_credentials(&rotated).await;
    assert_deadline_answer(&response, started.elapsed(), 503, &["KeysUnavailable"]);
    assert_eq!(
        upstream.calls(),
        0,
        "an unverified token never goes upstream"
    );

    // The hanging reload holds up nobody whose key the agent has.
    let started = Instant::now();
    let known = agent.fetch_credentials(&pod.token().sign(&keys.rsa)).await;
    assert_eq!(known.status, 200, "{known:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_pod_lookup_queue_answers_within_5s() {
    let api = FakeKubeApi::start().await;
    let bed = TestBed::attesting(&api, NODE).await;
    // Pods the watch has not delivered, whose lookups the API server takes 30 s to answer:
    // more of them than the agent reads at once, so most queue behind the first few.
    api.set_get_delay(Duration::from_secs(30));
    let pods: Vec<Pod> = (0..12)
        .map(|i| Pod::new("team-a", "app", &format!("late-{i}")))
        .collect();
    for (i, pod) in pods.iter().enumerate() {
        api.add_pod_unannounced(KubePod::of(pod, NODE, ip(20 + i as u8)));
    }
    let asks = pods.iter().enumerate().map(|(i, pod)| {
        let token = bed.token(pod);
        let agent = &bed.agent;
        async move {
            let started = Instant::now();
            let response = agent.fetch_credentials_from(ip(20 + i as u8), &token).await;
            (response, started.elapsed())
        }
    });
    for (response, took) in futures_util::future::join_all(asks).await {
        assert_deadline_answer(
            &response,
            took,
            503,
            &["PodLookupTimeout", "PodLookupLimited"],
        );
    }
    assert_eq!(bed.upstream.calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_lookup_then_a_slow_upstream_share_one_deadline_and_the_retry_is_served() {
    let api = FakeKubeApi::start().await;
    let bed = TestBed::attesting(&api, NODE).await;
    let pod = Pod::new("team-a", "app", "late-0");
    api.add_pod_unannounced(KubePod::of(&pod, NODE, ip(30)));
    // Each within the 5 s on its own (the upstream inside the agent's 2 s attempt timeout);
    // one after the other, not.
    api.set_get_delay(Duration::from_secs(4));
    bed.upstream.set_latency(Duration::from_millis(1500));
    let token = bed.token(&pod);

    let started = Instant::now();
    let response = bed.agent.fetch_credentials_from(ip(30), &token).await;
    assert_deadline_answer(&response, started.elapsed(), 504, &["UpstreamTimeout"]);

    // The lookup and the upstream call went on without the request: the SDK's retry joins
    // the fetch already in flight and gets its answer.
    let retried = Instant::now();
    let response = bed.agent.fetch_credentials_from(ip(30), &token).await;
    assert_eq!(response.status, 200, "{response:?}");
    assert!(
        retried.elapsed() < UPSTREAM_FAILURE_DEADLINE,
        "the retry took {:?}",
        retried.elapsed()
    );
    assert_eq!(
        bed.upstream.calls(),
        1,
        "one upstream call for both requests"
    );
    assert_eq!(api.gets(), 1, "one lookup for both requests");
}
