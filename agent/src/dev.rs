//! `pod-identity-agent dev`: the whole request path on one machine, with nothing but the
//! binary. It generates a signing key, writes its JWKS and a pod token into a temp directory,
//! serves an EKS Auth stand-in over real HTTP on loopback (so the real SDK client, signing
//! and error mapping run), and starts the agent with local verification on.
//!
//! The stand-in's credentials are visibly fake (`ASIADEVFAKE…`, `DEV-FAKE-…`): they are for
//! seeing the agent work, and would be refused by AWS.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tokio::sync::watch;

use crate::config::{
    Config, KeySource, ListenConfig, StaticUpstreamCredentials, UpstreamConfig, DEFAULT_AUDIENCE,
};
use crate::identity::keys::signing::SigningKey;
use crate::Agent;

const DEV_ISSUER: &str = "https://dev.pod-identity-agent.invalid";
const DEV_CLUSTER: &str = "dev";
const DEV_NAMESPACE: &str = "default";
const DEV_SERVICE_ACCOUNT: &str = "demo";
const DEV_POD: &str = "demo-pod";
/// Like the EKS Pod Identity webhook's projected token.
const TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Like the credentials EKS Auth issues.
const CREDENTIAL_LIFETIME: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("writing demo files in {0}: {1}")]
    Files(PathBuf, std::io::Error),
    #[error("generating the demo signing key failed")]
    Key,
    #[error("starting the EKS Auth stand-in: {0}")]
    StandIn(std::io::Error),
    #[error(transparent)]
    Start(#[from] crate::StartError),
    #[error("waiting for a signal: {0}")]
    Signal(std::io::Error),
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    // The system RNG does not fail on Linux; a zeroed buffer would still be a valid demo value.
    let _ = aws_lc_rs::rand::fill(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_private(path: &Path, contents: &str) -> Result<(), DevError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| DevError::Files(path.to_owned(), e))?;
    f.write_all(contents.as_bytes())
        .map_err(|e| DevError::Files(path.to_owned(), e))
}

/// The demo pod's token claims, shaped like a projected service-account token.
fn pod_claims(pod_uid: &str) -> serde_json::Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    serde_json::json!({
        "iss": DEV_ISSUER,
        "sub": format!("system:serviceaccount:{DEV_NAMESPACE}:{DEV_SERVICE_ACCOUNT}"),
        "aud": [DEFAULT_AUDIENCE],
        "iat": now,
        "nbf": now,
        "exp": now + TOKEN_LIFETIME.as_secs(),
        "kubernetes.io": {
            "namespace": DEV_NAMESPACE,
            "pod": {"name": DEV_POD, "uid": pod_uid},
            "serviceaccount": {"name": DEV_SERVICE_ACCOUNT, "uid": random_hex(8)},
        },
    })
}

/// Run the demo until SIGINT/SIGTERM.
pub async fn run(port: u16) -> Result<(), DevError> {
    let dir = std::env::temp_dir().join(format!("pod-identity-agent-dev-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| DevError::Files(dir.clone(), e))?;
    let key = SigningKey::generate_es256("dev-key-1").map_err(|_| DevError::Key)?;
    let jwks_path = dir.join("jwks.json");
    let token_path = dir.join("token");
    write_private(&jwks_path, &key.jwks().to_string())?;
    let token = key
        .sign(&pod_claims(&random_hex(16)))
        .map_err(|_| DevError::Key)?;
    write_private(&token_path, &token)?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let stand_in = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .map_err(DevError::StandIn)?;
    let stand_in_addr = stand_in.local_addr().map_err(DevError::StandIn)?;
    let issued = Arc::new(AtomicU64::new(0));
    let server = tokio::spawn(crate::edge::server::serve(
        stand_in,
        stop_rx,
        move |req, _peer| stand_in_handle(issued.clone(), req),
    ));

    let config = Config {
        upstream: UpstreamConfig {
            cluster_name: DEV_CLUSTER.into(),
            endpoint: Some(format!("http://{stand_in_addr}")),
            region: Some("us-east-1".into()),
            static_upstream_credentials: Some(StaticUpstreamCredentials {
                access_key_id: "AKIDDEVFAKENODEROLE".into(),
                secret_access_key: "dev-fake-node-role-secret".into(),
            }),
            ..UpstreamConfig::default()
        },
        listen: ListenConfig {
            credential_listeners: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, port))],
            ..ListenConfig::default()
        },
        key_source: Some(KeySource::File(jwks_path.clone())),
        issuer: Some(DEV_ISSUER.into()),
        ..Config::default()
    };
    let agent = Agent::start(config).await?;
    let url = match agent.credential_addrs().first() {
        Some(addr) => format!("http://{addr}/v1/credentials"),
        None => {
            return Err(DevError::Start(crate::StartError::Bind(
                "no credentials listener".into(),
            )))
        }
    };
    println!(
        "# pod-identity-agent dev: a demo agent with its own signing key and a fake EKS Auth."
    );
    println!("# Paste these into a shell, then use any AWS SDK; the credentials are fake.");
    println!("export AWS_CONTAINER_CREDENTIALS_FULL_URI={url}");
    println!(
        "export AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE={}",
        token_path.display()
    );
    println!(
        "curl -s -H \"Authorization: $(cat {})\" {url}",
        token_path.display()
    );
    println!(
        "# metrics: curl -s http://{}/metrics   (Ctrl-C to stop)",
        agent.metrics_addr()
    );

    let signal = crate::lifecycle::shutdown::wait_for_signal()
        .await
        .map_err(DevError::Signal)?;
    tracing::info!(signal, "demo stopping");
    agent.shutdown(crate::edge::server::DRAIN_TIMEOUT).await;
    stop_tx.send_replace(true);
    let _ = server.await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The stand-in: `POST /clusters/dev/assume-role-for-pod-identity` with `{"token": ...}`,
/// answered in the EKS Auth wire format. It trusts the agent, which has verified the token.
async fn stand_in_handle(issued: Arc<AtomicU64>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let expected = format!("/clusters/{DEV_CLUSTER}/assume-role-for-pod-identity");
    if req.method() != hyper::Method::POST || req.uri().path() != expected {
        return stand_in_error(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            "unknown operation",
        );
    }
    let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return stand_in_error(
                StatusCode::BAD_REQUEST,
                "InvalidRequestException",
                "unreadable body",
            )
        }
    };
    let has_token = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            v.get("token")
                .and_then(|t| t.as_str())
                .map(|t| !t.is_empty())
        })
        .unwrap_or(false);
    if !has_token {
        return stand_in_error(
            StatusCode::BAD_REQUEST,
            "InvalidTokenException",
            "missing token",
        );
    }
    let n = issued.fetch_add(1, Ordering::Relaxed) + 1;
    let expiration = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + CREDENTIAL_LIFETIME.as_secs();
    let session = format!("eks-{DEV_CLUSTER}-{DEV_POD}-{n}");
    let doc = serde_json::json!({
        "subject": {"namespace": DEV_NAMESPACE, "serviceAccount": DEV_SERVICE_ACCOUNT},
        "audience": DEFAULT_AUDIENCE,
        "podIdentityAssociation": {
            "associationArn": format!("arn:aws:eks:us-east-1:000000000000:podidentityassociation/{DEV_CLUSTER}/a-devfake"),
            "associationId": "a-devfake",
        },
        "assumedRoleUser": {
            "arn": format!("arn:aws:sts::000000000000:assumed-role/dev-fake-role/{session}"),
            "assumeRoleId": format!("AROADEVFAKE:{session}"),
        },
        "credentials": {
            "accessKeyId": format!("ASIADEVFAKE{}", random_hex(4).to_uppercase()),
            "secretAccessKey": format!("DEV-FAKE-SECRET-{}", random_hex(12)),
            "sessionToken": format!("DEV-FAKE-SESSION-TOKEN-{}", random_hex(24)),
            "expiration": expiration,
        },
    });
    let mut resp = Response::new(Full::new(Bytes::from(doc.to_string())));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn stand_in_error(status: StatusCode, kind: &'static str, message: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(
        serde_json::json!({ "message": message }).to_string(),
    )));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        "x-amzn-errortype",
        hyper::header::HeaderValue::from_static(kind),
    );
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}
