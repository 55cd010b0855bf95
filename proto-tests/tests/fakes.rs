//! The harness checked against the real SDKs, without the agent: the fake EKS
//! Auth must be understood by `aws-sdk-eksauth` (what the agent uses), and a
//! response in the contract's shape must be accepted by all three SDK clients.
//! If these fail, agent test failures say nothing about the agent.

use std::time::Duration;

use aws_sdk_eksauth::config::retry::RetryConfig;
use aws_sdk_eksauth::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_eksauth::error::ProvideErrorMetadata;
use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use proto_tests::assertions::{assert_parsed_the_only_issuance, format_rfc3339_utc};
use proto_tests::clients::{fetch_credentials, Sdk};
use proto_tests::fakes::eks_auth::ACCOUNT_ID;
use proto_tests::fakes::serve_loopback;
use proto_tests::keys::unix_now;
use proto_tests::{FakeEksAuth, Fault, Pod, TestKeys};
use serde_json::json;

fn eks_auth_client(fake: &FakeEksAuth) -> aws_sdk_eksauth::Client {
    let config = aws_sdk_eksauth::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-west-2"))
        .endpoint_url(fake.url())
        .credentials_provider(Credentials::new("AKIDTEST", "secret", None, None, "test"))
        .retry_config(RetryConfig::disabled())
        .build();
    aws_sdk_eksauth::Client::from_conf(config)
}

#[tokio::test]
async fn eks_auth_fake_speaks_the_sdk_wire_format() {
    let fake = FakeEksAuth::start().await;
    let pod = Pod::new("team-a", "app", "app-0");
    let token = pod.token().sign(&TestKeys::shared().rsa);
    let out = eks_auth_client(&fake)
        .assume_role_for_pod_identity()
        .cluster_name("c1")
        .token(&token)
        .send()
        .await
        .expect("SDK parses the fake's success response");
    let creds = out.credentials().expect("credentials");
    let parsed = [
        creds.access_key_id(),
        creds.secret_access_key(),
        creds.session_token(),
    ];
    assert_parsed_the_only_issuance(&fake, parsed, creds.expiration().secs());
    assert_eq!(out.subject().unwrap().service_account(), "app");
    assert_eq!(out.audience(), "pods.eks.amazonaws.com");
    assert!(out
        .assumed_role_user()
        .unwrap()
        .arn()
        .starts_with(&format!("arn:aws:sts::{ACCOUNT_ID}:assumed-role/app-role/")));
    let call = &fake.call_log()[0];
    assert_eq!(call.cluster_name, "c1");
    assert!(call.sigv4_signed, "the SDK signs with SigV4");
    assert_eq!(call.token.as_deref(), Some(token.as_str()));
}

#[tokio::test]
async fn eks_auth_fake_errors_map_to_modeled_exceptions() {
    let fake = FakeEksAuth::start().await;
    let client = eks_auth_client(&fake);
    let token = Pod::new("a", "b", "c").token().sign(&TestKeys::shared().ec);
    for (fault, code) in [
        (Fault::throttling(), "ThrottlingException"),
        (Fault::access_denied(), "AccessDeniedException"),
        (Fault::resource_not_found(), "ResourceNotFoundException"),
        (Fault::internal(), "InternalServerException"),
    ] {
        fake.set_fault(fault);
        let err = client
            .assume_role_for_pod_identity()
            .cluster_name("c1")
            .token(&token)
            .send()
            .await
            .expect_err("fault configured");
        let service = err.into_service_error();
        assert_eq!(service.code(), Some(code), "{service:?}");
    }
}

#[tokio::test]
async fn eks_auth_fake_hang_and_latency() {
    let fake = FakeEksAuth::start().await;
    fake.set_fault(Fault::Hang);
    let token = Pod::new("a", "b", "c").token().sign(&TestKeys::shared().ec);
    let client = eks_auth_client(&fake);
    let call = client
        .assume_role_for_pod_identity()
        .cluster_name("c1")
        .token(&token)
        .send();
    assert!(tokio::time::timeout(Duration::from_millis(500), call)
        .await
        .is_err());
    assert!(fake.wait_for_calls(1, Duration::from_secs(1)).await);
    assert!(!fake.wait_for_calls(2, Duration::from_millis(50)).await);
}

/// A stand-in for the agent that answers one fixed, contract-shaped response
/// to the expected token.
async fn contract_stub(token: String) -> (std::net::SocketAddr, proto_tests::fakes::ServerGuard) {
    let body = json!({
        "AccessKeyId": "ASIASTUB000000000001",
        "SecretAccessKey": "stubSecret",
        "Token": "stubSessionToken",
        "AccountId": ACCOUNT_ID,
        "Expiration": format_rfc3339_utc(unix_now() + 3600),
    })
    .to_string();
    serve_loopback(move |req| {
        let ok = req
            .headers()
            .get("authorization")
            .is_some_and(|v| v.as_bytes() == token.as_bytes());
        let body = body.clone();
        async move {
            let (status, body) = if ok {
                (200, body)
            } else {
                (401, r#"{"code":"InvalidToken","message":"no"}"#.to_owned())
            };
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .unwrap()
        }
    })
    .await
    .unwrap()
}

async fn sdk_accepts_contract_response(sdk: Sdk) {
    let token = Pod::new("a", "b", "c")
        .token()
        .sign(&TestKeys::shared().rsa);
    let (addr, _guard) = contract_stub(token.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &token).unwrap();
    let creds = fetch_credentials(sdk, &format!("http://{addr}/v1/credentials"), &token_file)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(creds.access_key, "ASIASTUB000000000001");
    assert_eq!(creds.secret_key, "stubSecret");
    assert_eq!(creds.token.as_deref(), Some("stubSessionToken"));
    if sdk != Sdk::JavaScript {
        // fromHttp does not read AccountId; the other two do.
        assert_eq!(creds.account_id.as_deref(), Some(ACCOUNT_ID));
    }
}

proto_tests::for_each_sdk!(sdk_accepts_contract_response:
    rust_sdk_client_accepts_contract_response => Sdk::Rust,
    python_sdk_client_accepts_contract_response => Sdk::Python,
    js_sdk_client_accepts_contract_response => Sdk::JavaScript,
);
