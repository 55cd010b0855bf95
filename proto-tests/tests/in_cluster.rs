//! In-cluster key discovery: with no key flag, an agent running in a pod reads the service
//! account issuer's keys from the API server (`/.well-known/openid-configuration` and
//! `/openid/v1/jwks`) with its mounted service-account token, over TLS checked against the
//! mounted CA, and verifies pod tokens with them, issuer included.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use proto_tests::assertions::assert_token_rejected;
use proto_tests::keys::{jwks, DEFAULT_ISSUER};
use proto_tests::{Agent, FakeEksAuth, Pod, TestKeys};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

const SA_TOKEN: &str = "agent-service-account-token";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/in-cluster")
        .join(name)
}

/// A TLS "API server" serving the discovery document and the JWKS to bearers of `SA_TOKEN`.
struct FakeApiServer {
    port: u16,
    requests: Arc<AtomicUsize>,
    bearers: Arc<Mutex<Vec<String>>>,
}

async fn start_api_server(jwks: String) -> FakeApiServer {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(fixture("server.crt"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(fixture("server.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let requests = Arc::new(AtomicUsize::new(0));
    let bearers = Arc::new(Mutex::new(Vec::new()));
    let (req_count, seen) = (requests.clone(), bearers.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, jwks, req_count, seen) = (
                acceptor.clone(),
                jwks.clone(),
                req_count.clone(),
                seen.clone(),
            );
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(
                    move |req: Request<hyper::body::Incoming>| {
                        req_count.fetch_add(1, Ordering::SeqCst);
                        let bearer = req
                            .headers()
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.strip_prefix("Bearer "))
                            .unwrap_or_default()
                            .to_owned();
                        seen.lock().unwrap().push(bearer.clone());
                        let (status, body) = if bearer != SA_TOKEN {
                            (StatusCode::UNAUTHORIZED, "{}".to_owned())
                        } else {
                            match req.uri().path() {
                            "/.well-known/openid-configuration" => (
                                StatusCode::OK,
                                serde_json::json!({"issuer": DEFAULT_ISSUER, "jwks_uri": "https://kubernetes.default.svc/openid/v1/jwks"})
                                    .to_string(),
                            ),
                            "/openid/v1/jwks" => (StatusCode::OK, jwks.clone()),
                            _ => (StatusCode::NOT_FOUND, "{}".to_owned()),
                        }
                        };
                        let mut resp = Response::new(Full::new(Bytes::from(body)));
                        *resp.status_mut() = status;
                        async move { Ok::<_, Infallible>(resp) }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    FakeApiServer {
        port,
        requests,
        bearers,
    }
}

#[tokio::test]
async fn keys_come_from_the_api_server_when_running_in_a_pod() {
    let keys = TestKeys::shared();
    let api = start_api_server(jwks(&[&keys.rsa]).to_string()).await;
    let sa_dir = tempfile::tempdir().unwrap();
    std::fs::write(sa_dir.path().join("token"), SA_TOKEN).unwrap();
    std::fs::copy(fixture("ca.crt"), sa_dir.path().join("ca.crt")).unwrap();

    let upstream = FakeEksAuth::start().await;
    let agent = Agent::builder(upstream.url())
        .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        .env("KUBERNETES_SERVICE_PORT", api.port.to_string())
        .env("POD_IDENTITY_AGENT_SERVICE_ACCOUNT_DIR", sa_dir.path())
        .start()
        .await;

    let text = agent.metrics_text().await;
    assert!(
        text.contains("pod_identity_agent_verification_enabled 1"),
        "{text}"
    );
    assert!(
        api.requests.load(Ordering::SeqCst) >= 2,
        "discovery document and JWKS were fetched"
    );
    assert!(api.bearers.lock().unwrap().iter().all(|b| b == SA_TOKEN));

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
