//! Key discovery from the Kubernetes API: with no key flag and an API server in the
//! environment (`KUBECONFIG`, or a pod's service account), the agent reads the service
//! account issuer's keys (`/.well-known/openid-configuration` and `/openid/v1/jwks`) through
//! the same Kubernetes client as its pod watch (TLS checked against the kubeconfig's CA, the
//! kubeconfig's bearer token), and verifies pod tokens with them, issuer included.

use proto_tests::assertions::assert_token_rejected;
use proto_tests::fakes::kube_api::RequestKind;
use proto_tests::keys::{jwks, DEFAULT_ISSUER};
use proto_tests::{Agent, FakeEksAuth, FakeKubeApi, Pod, TestKeys};

#[tokio::test]
async fn keys_come_from_the_kubernetes_api_server() {
    let keys = TestKeys::shared();
    let api = FakeKubeApi::start().await;
    api.set_jwks(DEFAULT_ISSUER, jwks(&[&keys.rsa]));

    let upstream = FakeEksAuth::start().await;
    let agent = Agent::builder(upstream.url())
        .env("KUBECONFIG", api.kubeconfig())
        .start()
        .await;

    let text = agent.metrics_text().await;
    assert!(
        text.contains("pod_identity_agent_verification_enabled 1"),
        "{text}"
    );
    assert!(
        api.requests_of(RequestKind::Oidc) >= 2,
        "discovery document and JWKS were fetched: {:?}",
        api.request_lines()
    );
    assert!(
        text.contains("pod_identity_agent_kubernetes_requests_total{kind=\"keys\"}"),
        "{text}"
    );

    let pod = Pod::new("team-a", "app", "app-0");
    let forged = pod.token().sign(TestKeys::untrusted_rsa());
    assert_token_rejected(
        &agent.fetch_credentials(&forged).await,
        "signed by a key the API server does not publish",
    );
    let other_issuer = pod.token().issuer("https://evil.example").sign(&keys.rsa);
    assert_token_rejected(
        &agent.fetch_credentials(&other_issuer).await,
        "issuer other than the discovered one",
    );
    assert_eq!(
        upstream.calls(),
        0,
        "rejected tokens never reach the upstream"
    );
    let good = pod.token().sign(&keys.rsa);
    assert_eq!(
        agent.fetch_credentials(&good).await.status,
        200,
        "{}",
        agent.logs_text()
    );
}

/// A kubeconfig whose token the API server refuses: the keys never load, the agent is not
/// ready and pods get 503, not a verification bypass.
#[tokio::test]
async fn a_refused_api_token_leaves_the_agent_unready() {
    let keys = TestKeys::shared();
    let api = FakeKubeApi::start().await;
    api.set_jwks(DEFAULT_ISSUER, jwks(&[&keys.rsa]));
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("kubeconfig");
    std::fs::write(&bad, api.kubeconfig_for("not-the-token")).unwrap();

    let upstream = FakeEksAuth::start().await;
    let agent = Agent::builder(upstream.url())
        .env("KUBECONFIG", &bad)
        .wait_ready(false)
        .start()
        .await;
    let ready = agent.probe("/readyz").await;
    assert_eq!(ready.status, 503, "{ready:?}");
    let pod = Pod::new("team-a", "app", "app-0");
    let response = agent.fetch_credentials(&pod.token().sign(&keys.rsa)).await;
    assert_eq!(response.status, 503, "{response:?}");
    assert_eq!(upstream.calls(), 0);
}
