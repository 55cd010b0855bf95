//! What each fuzz target does with its input, shared with the agent's corpus regression test
//! (`agent/tests/fuzz_corpus.rs` includes this file), so a crash found by the fuzzer and
//! saved into `corpus/<target>/` is replayed by `cargo test` with the very same calls.
//!
//! Every function takes untrusted bytes and must return without panicking, whatever they are.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient,
    SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_runtime_api::http::StatusCode;
use pod_identity_agent::config::{StaticUpstreamCredentials, UpstreamConfig};
use pod_identity_agent::credentials::associations::AssociationStore;
use pod_identity_agent::credentials::upstream::eks_auth::EksAuth;
use pod_identity_agent::credentials::upstream::sts::Sts;
use pod_identity_agent::credentials::upstream::{Backend, Credentials, UpstreamError};
use pod_identity_agent::edge::http::HostAllowList;
use pod_identity_agent::identity::keys::{KeySet, KeyStore};
use pod_identity_agent::identity::token::{Identity, Token, VerifiedClaims, Verifier};
use pod_identity_agent::metrics::Metrics;

/// The public half of the key that signed the seed tokens in `corpus/token/`.
pub const JWKS: &str = include_str!("jwks.json");
pub const ISSUER: &str = "https://oidc.fuzz.test";
pub const AUDIENCE: &str = "pods.eks.amazonaws.com";

struct TokenTarget {
    runtime: tokio::runtime::Runtime,
    verifier: Verifier,
}

fn token_target() -> &'static TokenTarget {
    static TARGET: OnceLock<TokenTarget> = OnceLock::new();
    TARGET.get_or_init(|| {
        let set = KeySet::from_jwks(JWKS.as_bytes()).expect("the embedded JWKS is valid");
        let keys: Arc<KeyStore> = KeyStore::fixed(set, Metrics::new());
        TokenTarget {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime"),
            verifier: Verifier::new(Some(keys), Some(ISSUER.into()), vec![AUDIENCE.into()]),
        }
    })
}

/// `Authorization` value -> token verification, as the credentials route does it. Non-UTF-8
/// input is replaced lossily: hyper hands the route only visible ASCII, but the verifier must
/// not care.
pub fn token(data: &[u8]) {
    let target = token_target();
    let raw = String::from_utf8_lossy(data);
    let _ = target.runtime.block_on(target.verifier.verify(&raw));
}

/// A JWKS document, from a file, a URL or OIDC discovery.
pub fn jwks(data: &[u8]) {
    if let Ok(set) = KeySet::from_jwks(data) {
        assert!(!set.is_empty(), "an accepted key set has a usable key");
    }
}

/// An associations file (sts backend).
pub fn associations(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = pod_identity_agent::credentials::associations::parse(text, "fuzz.yaml");
    }
}

fn host_list() -> &'static HostAllowList {
    static LIST: OnceLock<HostAllowList> = OnceLock::new();
    LIST.get_or_init(|| {
        let bound: Vec<SocketAddr> = ["169.254.170.23:80", "[fd00:ec2::23]:80", "127.0.0.1:2703"]
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        HostAllowList::new(bound)
    })
}

/// A `Host` header value. Whatever is accepted must name a bound address.
pub fn host(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if host_list().allows(text) {
        let plain = text.trim_start_matches('[');
        assert!(
            plain.starts_with("169.254.170.23")
                || plain.starts_with("127.0.0.1")
                || plain.to_ascii_lowercase().starts_with("fd00:"),
            "accepted {text:?}"
        );
    }
}

/// An OIDC discovery document (`--issuer`): whatever `jwks_uri` is accepted is an http(s) URL.
pub fn discovery(data: &[u8]) {
    if let Ok(uri) = pod_identity_agent::identity::keys::jwks_uri_from_discovery(data) {
        assert!(matches!(uri.scheme_str(), Some("http" | "https")), "{uri}");
    }
}

/// An upstream that answers every call with one response held in memory: the SDK parses it
/// exactly as it would a response off the wire, then the backend checks what it got.
#[derive(Debug, Clone, Default)]
pub struct CannedUpstream {
    next: Arc<std::sync::Mutex<(u16, Vec<u8>)>>,
}

impl CannedUpstream {
    pub fn set(&self, status: u16, body: &[u8]) {
        if let Ok(mut next) = self.next.lock() {
            *next = (status, body.to_vec());
        }
    }

    pub fn client(&self) -> SharedHttpClient {
        SharedHttpClient::new(self.clone())
    }
}

impl HttpConnector for CannedUpstream {
    fn call(&self, _request: HttpRequest) -> HttpConnectorFuture {
        let (status, body) = self.next.lock().map(|n| n.clone()).unwrap_or_default();
        let status = StatusCode::try_from(status)
            .or_else(|_| StatusCode::try_from(500))
            .expect("500 is a status");
        let mut response = HttpResponse::new(status, body.into());
        response
            .headers_mut()
            .insert("content-type", "application/json");
        HttpConnectorFuture::ready(Ok(response))
    }
}

impl HttpClient for CannedUpstream {
    fn http_connector(
        &self,
        _settings: &HttpConnectorSettings,
        _components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        SharedHttpConnector::new(self.clone())
    }
}

/// Both backends behind one canned upstream, and the pod identity they are asked for.
pub struct Upstreams {
    runtime: tokio::runtime::Runtime,
    canned: CannedUpstream,
    eks_auth: EksAuth,
    sts: Sts,
    identity: Identity,
    _dir: std::path::PathBuf,
}

/// The associated role of the STS backend's one association (`team-a/app`).
pub const ROLE_ARN: &str = "arn:aws:iam::111122223333:role/app";

impl Upstreams {
    pub fn new() -> Upstreams {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime");
        let canned = CannedUpstream::default();
        let config = UpstreamConfig {
            region: Some("us-west-2".into()),
            static_upstream_credentials: Some(StaticUpstreamCredentials {
                access_key_id: "AKIDFUZZ".into(),
                secret_access_key: "fuzz-secret".into(),
            }),
            ..UpstreamConfig::default()
        };
        let dir = std::env::temp_dir().join(format!(
            "pod-identity-agent-fuzz-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).expect("a temporary folder");
        let file = dir.join("associations.yaml");
        std::fs::write(
            &file,
            format!("- namespace: team-a\n  serviceAccount: app\n  roleArn: {ROLE_ARN}\n"),
        )
        .expect("write the associations file");
        let (eks_auth, sts) = runtime.block_on(async {
            let store = AssociationStore::load(&file, Metrics::new())
                .await
                .expect("a valid file");
            (
                EksAuth::with_http_client(&config, canned.client())
                    .await
                    .expect("an EKS Auth backend"),
                Sts::with_http_client(&config, store, canned.client())
                    .await
                    .expect("an STS backend"),
            )
        });
        let identity = Identity {
            token: Token::new("header.claims.signature"),
            verified: Some(std::sync::Arc::new(VerifiedClaims {
                namespace: "team-a".into(),
                service_account: "app".into(),
                pod_name: Some("app-0".into()),
                pod_uid: Some("0b7f6c1e-3c55-4a44-9d0e-8a1f2b3c4d5e".into()),
                node_name: None,
                audiences: vec![AUDIENCE.into(), "sts.amazonaws.com".into()],
            })),
            expires_at: None,
        };
        Upstreams {
            runtime,
            canned,
            eks_auth,
            sts,
            identity,
            _dir: dir,
        }
    }

    /// What the EKS Auth backend makes of this answer.
    pub fn eks_auth(&self, status: u16, body: &[u8]) -> Result<Credentials, UpstreamError> {
        self.canned.set(status, body);
        self.runtime.block_on(self.eks_auth.fetch(&self.identity))
    }

    /// What the STS backend makes of this answer.
    pub fn sts(&self, status: u16, body: &[u8]) -> Result<Credentials, UpstreamError> {
        self.canned.set(status, body);
        self.runtime.block_on(self.sts.fetch(&self.identity))
    }
}

impl Default for Upstreams {
    fn default() -> Self {
        Upstreams::new()
    }
}

fn upstreams() -> &'static Upstreams {
    static UPSTREAMS: OnceLock<Upstreams> = OnceLock::new();
    UPSTREAMS.get_or_init(Upstreams::new)
}

/// Statuses a fuzzed answer comes with: its first byte picks one. No 5xx: a server error is
/// retried after a 100 ms pause, which would slow the fuzzer to a crawl, and its body goes
/// through the same error parser as a 4xx.
const STATUSES: [u16; 6] = [200, 200, 400, 403, 404, 429];

fn split_status(data: &[u8]) -> (u16, &[u8]) {
    match data.split_first() {
        Some((first, rest)) => (STATUSES[usize::from(*first) % STATUSES.len()], rest),
        None => (200, data),
    }
}

/// Whatever the backends accept is credentials a pod can use as they are.
fn check_accepted(result: Result<Credentials, UpstreamError>) {
    let Ok(creds) = result else { return };
    assert!((16..=128).contains(&creds.access_key_id.len()));
    assert!(creds
        .access_key_id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_'));
    for secret in [creds.secret_access_key(), creds.session_token()] {
        assert!(!secret.is_empty());
        assert!(secret.bytes().all(|b| b.is_ascii_graphic()));
    }
    assert_eq!(creds.account_id.len(), 12);
    let horizon = std::time::SystemTime::now()
        + pod_identity_agent::credentials::upstream::MAX_CREDENTIAL_LIFETIME
        + std::time::Duration::from_secs(60);
    assert!(creds.expiration <= horizon);
}

/// An EKS Auth answer (restJson1): first byte the status, the rest the body.
pub fn eks_auth_response(data: &[u8]) {
    let (status, body) = split_status(data);
    check_accepted(upstreams().eks_auth(status, body));
}

/// An STS answer (awsQuery XML): first byte the status, the rest the body.
pub fn sts_response(data: &[u8]) {
    let (status, body) = split_status(data);
    check_accepted(upstreams().sts(status, body));
}

/// A fuzz target: takes any bytes, must not panic.
pub type Target = fn(&[u8]);

/// Every target by name, for the corpus replay.
pub const TARGETS: [(&str, Target); 7] = [
    ("token", token),
    ("jwks", jwks),
    ("associations", associations),
    ("host", host),
    ("discovery", discovery),
    ("eks_auth_response", eks_auth_response),
    ("sts_response", sts_response),
];
