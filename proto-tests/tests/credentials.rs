//! The credentials endpoint: what a pod gets for a valid token, through the
//! real SDKs and on the wire, and what it gets when EKS Auth fails.

use std::time::{Duration, Instant};

use proto_tests::agent::CLUSTER_NAME;
use proto_tests::assertions::{
    assert_credentials, assert_error_body, assert_failed_in_time, assert_sdk_got,
    assert_throttled_with_retry_after, only_issued,
};
use proto_tests::clients::{fetch_credentials_with_token, Sdk};
use proto_tests::fakes::eks_auth::ACCOUNT_ID;
use proto_tests::{Fault, Pod, TestBed};

#[tokio::test]
async fn valid_rs256_token_gets_the_issued_credentials() {
    let bed = TestBed::start().await;
    let pod = Pod::new("team-a", "app", "app-7d9f");
    let token = bed.token(&pod);
    let response = bed.agent.fetch_credentials(&token).await;
    let issued = only_issued(&bed.upstream);
    assert_credentials(&response, &issued);
    assert_eq!(issued.pod_uid, pod.uid);

    let calls = bed.upstream.call_log();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].cluster_name, CLUSTER_NAME);
    assert_eq!(
        calls[0].token.as_deref(),
        Some(token.as_str()),
        "the pod's token is forwarded verbatim"
    );
    assert!(calls[0].sigv4_signed, "EKS Auth requests are SigV4-signed");
}

#[tokio::test]
async fn valid_es256_token_gets_the_issued_credentials() {
    let bed = TestBed::start().await;
    let pod = Pod::new("team-a", "app", "app-es");
    let response = bed
        .agent
        .fetch_credentials(&pod.token().sign(&bed.keys.ec))
        .await;
    assert_credentials(&response, &only_issued(&bed.upstream));
}

async fn sdk_gets_issued_credentials(sdk: Sdk) {
    let bed = TestBed::start().await;
    let pod = Pod::new("team-a", "app", &format!("app-{sdk:?}").to_lowercase());
    let url = bed.agent.credentials_url();
    let got = fetch_credentials_with_token(sdk, &url, bed.dir.path(), &bed.token(&pod))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", bed.agent.logs_text()));
    assert_sdk_got(&got, sdk, &only_issued(&bed.upstream), &pod.uid, ACCOUNT_ID);
}

proto_tests::for_each_sdk!(sdk_gets_issued_credentials:
    rust_sdk_ecs_provider_gets_issued_credentials => Sdk::Rust,
    botocore_gets_issued_credentials => Sdk::Python,
    js_v3_from_http_gets_issued_credentials => Sdk::JavaScript,
);

#[tokio::test]
async fn upstream_throttling_is_429_with_retry_after_and_not_retried() {
    let bed = TestBed::start().await;
    bed.upstream.set_fault(Fault::throttling());
    let response = bed.fetch_as(&Pod::new("ns", "sa", "p")).await;
    assert_throttled_with_retry_after(&response);
    assert_eq!(
        bed.upstream.calls(),
        1,
        "a ThrottlingException is not retried inside the request (the SDK client retries)"
    );
}

#[tokio::test]
async fn upstream_resource_not_found_is_404_with_its_code() {
    let bed = TestBed::start().await;
    bed.upstream.set_fault(Fault::resource_not_found());
    let response = bed.fetch_as(&Pod::new("ns", "sa", "p")).await;
    assert_eq!(response.status, 404, "{response:?}");
    assert_eq!(assert_error_body(&response), "ResourceNotFoundException");
}

#[tokio::test]
async fn a_pod_without_an_association_does_not_cost_an_upstream_call_per_request() {
    let bed = TestBed::start().await;
    bed.upstream.set_fault(Fault::resource_not_found());
    let pod = Pod::new("ns", "unassociated", "p");
    let token = bed.token(&pod);
    for _ in 0..20 {
        let response = bed.agent.fetch_credentials(&token).await;
        assert_eq!(response.status, 404, "{response:?}");
        assert_eq!(assert_error_body(&response), "ResourceNotFoundException");
    }
    assert_eq!(
        bed.upstream.calls_for_pod(&pod.uid),
        1,
        "the refusal is remembered for a few seconds"
    );
    // Once the association exists, the pod gets credentials within the refusal's lifetime.
    bed.upstream.set_fault(Fault::Ok);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    loop {
        let response = bed.agent.fetch_credentials(&token).await;
        if response.status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still refused 8 s after the association appeared: {response:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn upstream_access_denied_passes_its_code() {
    let bed = TestBed::start().await;
    bed.upstream.set_fault(Fault::access_denied());
    let response = bed.fetch_as(&Pod::new("ns", "sa", "p")).await;
    assert!(
        matches!(response.status, 400 | 403),
        "expected 400 or 403: {response:?}"
    );
    assert_eq!(assert_error_body(&response), "AccessDeniedException");
}

#[tokio::test]
async fn upstream_internal_error_is_502() {
    let bed = TestBed::start().await;
    bed.upstream.set_fault(Fault::internal());
    let started = Instant::now();
    let response = bed.fetch_as(&Pod::new("ns", "sa", "p")).await;
    assert_failed_in_time(
        &response,
        502..=502,
        started.elapsed(),
        "InternalServerException",
    );
}

#[tokio::test]
async fn hanging_upstream_fails_the_request_within_5s() {
    let bed = TestBed::start().await;
    bed.upstream.set_fault(Fault::Hang);
    let started = Instant::now();
    let response = bed.fetch_as(&Pod::new("ns", "sa", "p")).await;
    assert_failed_in_time(&response, 502..=504, started.elapsed(), "hanging upstream");
    assert!(bed.upstream.calls() >= 1, "the upstream was asked");
}
