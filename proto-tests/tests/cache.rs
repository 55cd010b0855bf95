//! Caching and coalescing: how many EKS Auth calls a workload costs, and
//! which pod's credentials each request gets.

use std::time::Duration;

use proto_tests::agent::{burst_of_key_ids, CREDENTIALS_PATH};
use proto_tests::assertions::{assert_answered_from_cache, assert_credentials, only_issued};
use proto_tests::metrics;
use proto_tests::{Fault, Pod, TestBed, TestKeys};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Concurrent requests of one pod, under the default per-source connection cap (256).
const BURST: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_for_one_token_is_one_upstream_call() {
    let bed = TestBed::start().await;
    bed.upstream.set_latency(Duration::from_millis(200));
    let token = bed.token(&Pod::new("team-a", "worker", "worker-0"));
    let key_ids = burst_of_key_ids(&bed.agent, &token, BURST).await;
    assert_eq!(key_ids.len(), BURST);
    assert_eq!(bed.upstream.calls(), 1, "concurrent requests must coalesce");
    let issued = only_issued(&bed.upstream);
    assert!(
        key_ids.iter().all(|k| *k == issued.access_key_id),
        "every request gets the one issuance"
    );
}

#[tokio::test]
async fn rotated_token_for_the_same_pod_reuses_cached_credentials() {
    let bed = TestBed::start().await;
    let pod = Pod::new("team-a", "app", "app-0");
    let first = bed.token(&pod);
    let response = bed.agent.fetch_credentials(&first).await;
    let issued = only_issued(&bed.upstream);
    assert_credentials(&response, &issued);

    // The kubelet writes a new token for the same pod.
    let rotated = pod.token().sign(&bed.keys.rsa);
    assert_ne!(first, rotated);
    // Rotation must not cost an upstream call.
    assert_answered_from_cache(&bed.agent, &rotated, &bed.upstream, &issued).await;
}

#[tokio::test]
async fn pods_of_one_service_account_get_their_own_credentials_by_default() {
    let bed = TestBed::start().await;
    let a = Pod::new("team-a", "app", "app-a");
    let b = a.sibling("app-b");
    let ra = bed.fetch_as(&a).await;
    let rb = bed.fetch_as(&b).await;
    assert_eq!(bed.upstream.calls(), 2, "one upstream call per pod");
    assert_eq!(bed.upstream.calls_for_pod(&a.uid), 1);
    assert_eq!(bed.upstream.calls_for_pod(&b.uid), 1);
    assert_credentials(&ra, &bed.upstream.issued_for_pod(&a.uid)[0]);
    assert_credentials(&rb, &bed.upstream.issued_for_pod(&b.uid)[0]);
    assert_ne!(ra.json_str("AccessKeyId"), rb.json_str("AccessKeyId"));
    assert!(ra.json_str("SecretAccessKey").unwrap().contains(&a.uid));
    assert!(rb.json_str("SecretAccessKey").unwrap().contains(&b.uid));
}

#[tokio::test]
async fn association_scope_shares_credentials_per_service_account() {
    let bed = TestBed::with_args(["--cache-scope", "association"]).await;
    let a = Pod::new("team-a", "app", "app-a");
    let b = a.sibling("app-b");
    let ra = bed.fetch_as(&a).await;
    let rb = bed.fetch_as(&b).await;
    let issued = only_issued(&bed.upstream);
    assert_credentials(&ra, &issued);
    assert_credentials(&rb, &issued);

    // A different service account is a different association.
    let other = Pod::new("team-a", "other", "other-0");
    let ro = bed.fetch_as(&other).await;
    assert_eq!(ro.status, 200, "{ro:?}");
    assert_eq!(bed.upstream.calls(), 2);
    assert_ne!(ro.json_str("AccessKeyId"), ra.json_str("AccessKeyId"));
}

#[tokio::test]
async fn client_hanging_up_does_not_cancel_the_upstream_fetch() {
    let bed = TestBed::start().await;
    bed.upstream.set_latency(Duration::from_secs(1));
    let addr = bed.agent.credentials_addr();
    let token = bed.token(&Pod::new("team-a", "app", "app-0"));
    {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let request = format!(
            "GET {CREDENTIALS_PATH} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {token}\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        // The upstream call is under way (and takes 1 s) before the client goes.
        assert!(
            bed.upstream.wait_for_calls(1, Duration::from_secs(5)).await,
            "the request never reached EKS Auth"
        );
        // Dropped here: the client gives up mid-request.
    }
    // Let the upstream answer arrive; if the agent cancelled its call the
    // fake may never finish, and the next request shows it.
    bed.upstream
        .wait_for_issued(1, Duration::from_secs(5))
        .await;
    bed.upstream.set_latency(Duration::ZERO);
    let response = bed.agent.fetch_credentials(&token).await;
    assert_eq!(
        bed.upstream.calls(),
        1,
        "the follow-up request must be a cache hit"
    );
    assert_credentials(&response, &only_issued(&bed.upstream));
}

#[tokio::test]
async fn cached_credentials_are_served_through_upstream_failure() {
    let bed = TestBed::start().await;
    let pod = Pod::new("team-a", "app", "app-0");
    let response = bed.fetch_as(&pod).await;
    let issued = only_issued(&bed.upstream);
    assert_credentials(&response, &issued);
    for fault in [Fault::internal(), Fault::throttling(), Fault::Hang] {
        bed.upstream.set_fault(fault.clone());
        let response = bed.fetch_as(&pod).await;
        assert_credentials(&response, &issued);
        assert_eq!(bed.upstream.issued().len(), 1, "{fault:?}");
    }
}

#[tokio::test]
async fn without_a_key_source_tokens_are_not_trusted_for_the_pod_uid() {
    let bed = TestBed::builder().without_key_source().start().await;
    let text = bed.agent.metrics_text().await;
    assert_eq!(
        metrics::sum(&text, "pod_identity_agent_verification_enabled"),
        Some(0.0),
        "verification_enabled must be 0 without a key source:\n{text}"
    );

    let pod = Pod::new("team-a", "app", "app-0");
    let genuine = pod.token().sign(&bed.keys.rsa);
    let response = bed.agent.fetch_credentials(&genuine).await;
    assert_credentials(&response, &only_issued(&bed.upstream));

    // Unverifiable here, this token merely claims the same pod UID: it must
    // not be handed the cached credentials of the first one.
    let claimant = pod.token().sign(TestKeys::untrusted_rsa());
    let response = bed.agent.fetch_credentials(&claimant).await;
    assert_eq!(bed.upstream.calls(), 2, "two tokens, two cache keys");
    let issued = bed.upstream.issued();
    assert_eq!(issued.len(), 2);
    assert_credentials(&response, &issued[1]);
}
