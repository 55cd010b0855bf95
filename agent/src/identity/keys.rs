//! Verification keys: a JWKS from a file, a URL, or the issuer's OIDC discovery document.
//!
//! The last good key set is kept through any failure to reload it: a JWKS endpoint that is
//! down must not turn into every pod being refused. An unknown `kid` triggers one early
//! reload, at most once per [`UNKNOWN_KID_REFRESH_INTERVAL`], so a stream of forged key ids
//! cannot turn into a stream of fetches.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Uri;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::KeySource;
use crate::defence::{self, Defence};
use crate::metrics::Metrics;
use crate::sync;

/// Algorithms a Kubernetes issuer signs with. `none` and every HMAC algorithm are refused:
/// a verifier that accepts HS256 can be fooled with the public key used as the HMAC secret.
pub const ACCEPTED_ALGORITHMS: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::PS256,
];
/// A key file is checked this often for a new modification time or size.
const FILE_POLL_INTERVAL: Duration = Duration::from_secs(2);
/// Issuers rotate keys with overlap measured in hours; five minutes keeps us well inside it.
const URL_POLL_INTERVAL: Duration = Duration::from_secs(300);
/// After a failed load, try again sooner than the normal poll.
const RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// Minimum spacing of reloads caused by tokens with an unknown `kid`.
pub const UNKNOWN_KID_REFRESH_INTERVAL: Duration = Duration::from_secs(10);
/// Bound on one fetch (discovery plus JWKS).
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Real key sets are a few KiB; anything larger is refused rather than parsed.
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;
/// Real key sets hold a handful of keys; verification may try each candidate.
const MAX_KEYS: usize = 64;

#[derive(Debug, Clone, thiserror::Error)]
pub enum KeysError {
    #[error("no verification keys loaded yet")]
    NotLoaded,
    #[error("no key with that key id")]
    UnknownKey,
    #[error("reading {0}: {1}")]
    Read(String, String),
    #[error("fetching {0}: {1}")]
    Fetch(String, String),
    #[error("invalid key set: {0}")]
    Invalid(String),
}

struct VerifyKey {
    kid: Option<String>,
    algorithms: Vec<Algorithm>,
    key: Arc<DecodingKey>,
}

/// A key set as one agent passes it to the next in a handoff.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExportedKeys {
    /// The JWKS document the keys were parsed from.
    pub jwks: String,
    /// The issuer the API server announced, for keys from the Kubernetes API.
    pub discovered_issuer: Option<String>,
    /// How long ago the keys were fetched or confirmed from their source.
    pub age_ms: Option<u64>,
}

/// The reload an unknown `kid` started: when the last one began, and the one running.
#[derive(Default)]
struct OnDemand {
    last: Option<Instant>,
    in_flight: Option<watch::Receiver<bool>>,
}

/// One loaded JWKS.
pub struct KeySet {
    keys: Vec<VerifyKey>,
    /// The document it was parsed from, which is what a handoff passes on.
    document: Box<str>,
}

impl KeySet {
    /// Parse a JWKS document. Keys this agent cannot use (encryption keys, HMAC, unknown types)
    /// are skipped; a set with no usable key is an error.
    pub fn from_jwks(doc: &[u8]) -> Result<KeySet, KeysError> {
        if doc.len() > MAX_DOCUMENT_BYTES {
            return Err(KeysError::Invalid("document is larger than 1 MiB".into()));
        }
        let list = json_field(doc, "JWKS document", "keys array", |mut v| {
            match v.get_mut("keys")?.take() {
                serde_json::Value::Array(list) => Some(list),
                _ => None,
            }
        })?;
        let mut keys = Vec::new();
        for entry in list.iter().take(MAX_KEYS) {
            let Ok(jwk) = serde_json::from_value::<Jwk>(entry.clone()) else {
                continue;
            };
            if let Some(key) = usable_key(&jwk) {
                keys.push(key);
            }
        }
        if keys.is_empty() {
            return Err(KeysError::Invalid(
                "no usable signing key (RSA, P-256 or P-384)".into(),
            ));
        }
        Ok(KeySet {
            keys,
            document: String::from_utf8_lossy(doc).into(),
        })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The algorithms a key may verify: the JWK's own `alg` if it names one, else every accepted
/// algorithm of its type. Pinning this stops a token from choosing how its key is used.
fn usable_key(jwk: &Jwk) -> Option<VerifyKey> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let by_type: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
        ],
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => return None,
        },
        _ => return None,
    };
    let algorithms = match jwk.common.key_algorithm {
        Some(declared) => {
            let alg = match declared {
                KeyAlgorithm::RS256 => Algorithm::RS256,
                KeyAlgorithm::RS384 => Algorithm::RS384,
                KeyAlgorithm::RS512 => Algorithm::RS512,
                KeyAlgorithm::PS256 => Algorithm::PS256,
                KeyAlgorithm::ES256 => Algorithm::ES256,
                KeyAlgorithm::ES384 => Algorithm::ES384,
                _ => return None,
            };
            if !by_type.contains(&alg) || !ACCEPTED_ALGORITHMS.contains(&alg) {
                return None;
            }
            vec![alg]
        }
        None => by_type,
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(VerifyKey {
        kid: jwk.common.key_id.clone(),
        algorithms,
        key: Arc::new(key),
    })
}

/// The current key set of one source, kept fresh in the background.
pub struct KeyStore {
    /// `None` for a fixed store that never reloads.
    source: Option<KeySource>,
    /// Swapped whole on a reload; read by every verification, and cannot poison.
    current: ArcSwapOption<KeySet>,
    /// Serialises on-demand reloads and remembers when the last one ran.
    on_demand: std::sync::Mutex<OnDemand>,
    /// Present for URL and discovery sources.
    http: Option<HttpFetcher>,
    metrics: Metrics,
    loaded_tx: watch::Sender<bool>,
    /// Bumped on every key set installed, so results verified against an older set expire.
    generation: AtomicU64,
    discovered_issuer: ArcSwapOption<String>,
    /// When the keys were last fetched, or (a file) confirmed unchanged.
    confirmed_at: std::sync::Mutex<Option<Instant>>,
    /// A discovery document may point at plain http beyond loopback.
    allow_insecure: bool,
    /// The agent's Kubernetes client ([`KeySource::KubernetesApi`]).
    kube: Option<kube::Client>,
}

impl KeyStore {
    pub fn new(source: KeySource, metrics: Metrics) -> Result<Arc<KeyStore>, KeysError> {
        Self::with_policy(source, metrics, false, None)
    }

    /// [`KeyStore::new`], saying whether a discovered `jwks_uri` may be plain http beyond
    /// loopback (`--allow-insecure-key-source`), with the agent's Kubernetes client for
    /// [`KeySource::KubernetesApi`].
    pub fn with_policy(
        source: KeySource,
        metrics: Metrics,
        allow_insecure: bool,
        kube: Option<kube::Client>,
    ) -> Result<Arc<KeyStore>, KeysError> {
        let http = match &source {
            KeySource::File(_) | KeySource::KubernetesApi => None,
            KeySource::Url(_) | KeySource::Discovery(_) => Some(HttpFetcher::new()?),
        };
        if matches!(source, KeySource::KubernetesApi) && kube.is_none() {
            return Err(KeysError::Invalid(
                "keys from the Kubernetes API need a Kubernetes client".into(),
            ));
        }
        let (loaded_tx, _) = watch::channel(false);
        Ok(Arc::new(KeyStore {
            source: Some(source),
            current: ArcSwapOption::empty(),
            on_demand: std::sync::Mutex::default(),
            http,
            metrics,
            loaded_tx,
            generation: AtomicU64::new(0),
            discovered_issuer: ArcSwapOption::empty(),
            confirmed_at: std::sync::Mutex::new(None),
            allow_insecure,
            kube,
        }))
    }

    /// Time since the keys were last fetched or confirmed from their source.
    pub fn age(&self) -> Option<std::time::Duration> {
        sync::lock(&self.confirmed_at).map(|t| t.elapsed())
    }

    fn confirm(&self) {
        *sync::lock(&self.confirmed_at) = Some(Instant::now());
    }

    /// A store that already holds `set` and never reloads (tests, and the demo's own key).
    pub fn fixed(set: KeySet, metrics: Metrics) -> Arc<KeyStore> {
        let (loaded_tx, _) = watch::channel(true);
        Arc::new(KeyStore {
            source: None,
            current: ArcSwapOption::from_pointee(set),
            on_demand: std::sync::Mutex::default(),
            http: None,
            metrics,
            loaded_tx,
            generation: AtomicU64::new(1),
            discovered_issuer: ArcSwapOption::empty(),
            confirmed_at: std::sync::Mutex::new(Some(Instant::now())),
            allow_insecure: false,
            kube: None,
        })
    }

    /// The key set in hand and how old it is, for the next agent (`None` before the first
    /// load).
    pub fn export(&self) -> Option<ExportedKeys> {
        let current = self.current.load();
        let set = current.as_deref()?;
        Some(ExportedKeys {
            jwks: set.document.to_string(),
            discovered_issuer: self.discovered_issuer(),
            age_ms: self.age().map(|a| a.as_millis() as u64),
        })
    }

    /// Install the key set an earlier agent passed on, as if it had been loaded `age_ms` ago:
    /// the agent is ready with it at once, and the next poll of the source comes when the
    /// earlier agent's would have.
    pub fn import(&self, keys: ExportedKeys) -> Result<usize, KeysError> {
        let set = KeySet::from_jwks(keys.jwks.as_bytes())?;
        let n = set.len();
        if let Some(issuer) = keys.discovered_issuer {
            self.discovered_issuer.store(Some(Arc::new(issuer)));
        }
        self.current.store(Some(Arc::new(set)));
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.loaded_tx.send_replace(true);
        self.metrics.keys_loaded.set(n as i64);
        let age = Duration::from_millis(keys.age_ms.unwrap_or(0));
        *sync::lock(&self.confirmed_at) =
            Some(Instant::now().checked_sub(age).unwrap_or_else(Instant::now));
        Ok(n)
    }

    /// Changes whenever a new key set is installed.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn is_loaded(&self) -> bool {
        self.current.load().is_some()
    }

    /// Resolves once a key set has been loaded.
    pub fn loaded(&self) -> watch::Receiver<bool> {
        self.loaded_tx.subscribe()
    }

    /// Keys that may verify a token with this `kid` and `alg`.
    pub fn candidates(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Vec<Arc<DecodingKey>>, KeysError> {
        let current = self.current.load();
        let set = current.as_deref().ok_or(KeysError::NotLoaded)?;
        let mut kid_seen = false;
        let mut out = Vec::new();
        for k in &set.keys {
            if let Some(kid) = kid {
                if k.kid.as_deref() != Some(kid) {
                    continue;
                }
                kid_seen = true;
            }
            if k.algorithms.contains(&alg) {
                out.push(k.key.clone());
            }
        }
        if kid.is_some() && !kid_seen {
            return Err(KeysError::UnknownKey);
        }
        Ok(out)
    }

    /// Reload now because a token named a key we do not have; rate limited, and shared: a
    /// request that comes while such a reload runs waits for that one. The reload is a task
    /// of its own, so a request that gives up waiting (the edge deadline) does not cancel it.
    pub async fn refresh_for_unknown_key(self: &Arc<Self>) {
        if self.source.is_none() {
            return;
        }
        let mut done = {
            let mut on_demand = sync::lock(&self.on_demand);
            match &on_demand.in_flight {
                Some(done) => done.clone(),
                None => {
                    let pacing = defence::on(Defence::UnknownKidPacing);
                    if pacing
                        && on_demand
                            .last
                            .is_some_and(|t| t.elapsed() < UNKNOWN_KID_REFRESH_INTERVAL)
                    {
                        return;
                    }
                    on_demand.last = Some(Instant::now());
                    let (tx, done) = watch::channel(false);
                    on_demand.in_flight = Some(done.clone());
                    let this = self.clone();
                    tokio::spawn(async move {
                        let _ = this.reload("unknown_kid").await;
                        sync::lock(&this.on_demand).in_flight = None;
                        tx.send_replace(true);
                    });
                    done
                }
            }
        };
        let _ = done.wait_for(|finished| *finished).await;
    }

    /// Load the key set from the source and install it if valid.
    pub async fn reload(&self, reason: &'static str) -> Result<usize, KeysError> {
        let result = match tokio::time::timeout(FETCH_TIMEOUT, self.load()).await {
            Ok(r) => r,
            Err(_) => Err(KeysError::Fetch(self.describe(), "timed out".into())),
        };
        match result {
            Ok(set) => {
                let n = set.len();
                self.current.store(Some(Arc::new(set)));
                self.generation.fetch_add(1, Ordering::AcqRel);
                self.loaded_tx.send_replace(true);
                self.metrics.key_reload("success", reason);
                self.metrics.keys_loaded.set(n as i64);
                self.confirm();
                tracing::info!(source = %self.describe(), keys = n, reason, "verification keys loaded");
                Ok(n)
            }
            Err(e) => {
                self.metrics.key_reload("failure", reason);
                tracing::warn!(source = %self.describe(), reason, error = %e, "verification keys not reloaded; keeping the last good set");
                Err(e)
            }
        }
    }

    fn describe(&self) -> String {
        match &self.source {
            Some(KeySource::File(p)) => p.display().to_string(),
            Some(KeySource::Url(u) | KeySource::Discovery(u)) => u.to_string(),
            Some(KeySource::KubernetesApi) => "the Kubernetes API server's /openid/v1/jwks".into(),
            None => "fixed".into(),
        }
    }

    async fn load(&self) -> Result<KeySet, KeysError> {
        let http = || self.http.as_ref().ok_or(KeysError::NotLoaded);
        match &self.source {
            Some(KeySource::File(path)) => KeySet::from_jwks(&read_bounded(path).await?),
            Some(KeySource::Url(uri)) => KeySet::from_jwks(&http()?.get(uri).await?),
            Some(KeySource::KubernetesApi) => self.load_from_api().await,
            Some(KeySource::Discovery(issuer)) => {
                let jwks_uri = self.discover(http()?, issuer).await?;
                KeySet::from_jwks(&http()?.get(&jwks_uri).await?)
            }
            None => Err(KeysError::NotLoaded),
        }
    }

    /// The API server's own key set, `/openid/v1/jwks`, read through the agent's Kubernetes
    /// client (the credentials and CA it was configured with). The discovery document's
    /// `issuer` becomes the expected `iss` unless `--issuer` is set.
    async fn load_from_api(&self) -> Result<KeySet, KeysError> {
        let client = self.kube.as_ref().ok_or(KeysError::NotLoaded)?;
        let discovery = api_get(client, "/.well-known/openid-configuration").await?;
        let issuer = serde_json::from_slice::<serde_json::Value>(&discovery)
            .ok()
            .and_then(|v| v.get("issuer")?.as_str().map(str::to_owned));
        self.discovered_issuer.store(issuer.map(Arc::new));
        KeySet::from_jwks(&api_get(client, "/openid/v1/jwks").await?)
    }

    /// The issuer the API server announced (in-cluster discovery only).
    pub fn discovered_issuer(&self) -> Option<String> {
        self.discovered_issuer.load().as_deref().cloned()
    }

    /// `<issuer>/.well-known/openid-configuration` -> `jwks_uri`.
    async fn discover(&self, http: &HttpFetcher, issuer: &Uri) -> Result<Uri, KeysError> {
        let base = issuer.to_string();
        let url = format!(
            "{}/.well-known/openid-configuration",
            base.trim_end_matches('/')
        );
        let uri: Uri = url
            .parse()
            .map_err(|e| KeysError::Fetch(url.clone(), format!("{e}")))?;
        let doc = http.get(&uri).await?;
        let jwks_uri = jwks_uri_from_discovery(&doc)?;
        if jwks_uri.scheme_str() == Some("http")
            && !crate::config::is_loopback_host(jwks_uri.host().unwrap_or_default())
            && !self.allow_insecure
            && defence::on(Defence::SecureKeySource)
        {
            return Err(KeysError::Invalid(format!(
                "the discovery document's jwks_uri {jwks_uri} is plain http beyond loopback; \
                 refused (--allow-insecure-key-source accepts it)"
            )));
        }
        Ok(jwks_uri)
    }

    /// Keep the key set fresh until `shutdown` fires.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let Some(source) = self.source.clone() else {
            return;
        };
        let mut file_stamp = None;
        // Keys taken over from an earlier agent: the source is next asked when that agent
        // would have asked it (a file is only read, so it is looked at at once).
        if !matches!(source, KeySource::File(_)) && self.is_loaded() {
            let wait = URL_POLL_INTERVAL.saturating_sub(self.age().unwrap_or_default());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
        loop {
            let wait = match &source {
                KeySource::File(path) => {
                    let stamp = file_stamp_of(path).await;
                    if stamp.is_none() || stamp != file_stamp || !self.is_loaded() {
                        let ok = self
                            .reload(if file_stamp.is_none() {
                                "startup"
                            } else {
                                "changed"
                            })
                            .await
                            .is_ok();
                        // Only remember the stamp of a file we managed to use, so a broken
                        // edit is retried until it is fixed.
                        file_stamp = if ok { stamp } else { None };
                    } else {
                        // Unchanged and readable: the keys in hand are the file's.
                        self.confirm();
                    }
                    FILE_POLL_INTERVAL
                }
                KeySource::Url(_) | KeySource::Discovery(_) | KeySource::KubernetesApi => {
                    let reason = if self.is_loaded() { "poll" } else { "startup" };
                    match self.reload(reason).await {
                        Ok(_) => URL_POLL_INTERVAL,
                        Err(_) => RETRY_INTERVAL,
                    }
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

async fn file_stamp_of(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = tokio::fs::metadata(path).await.ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

async fn read_bounded(path: &Path) -> Result<Vec<u8>, KeysError> {
    let err = |e: String| KeysError::Read(path.display().to_string(), e);
    let meta = tokio::fs::metadata(path)
        .await
        .map_err(|e| err(e.to_string()))?;
    if meta.len() > MAX_DOCUMENT_BYTES as u64 {
        return Err(err("file is larger than 1 MiB".into()));
    }
    tokio::fs::read(path).await.map_err(|e| err(e.to_string()))
}

type Connector = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// Minimal GET client for key documents (HTTPS with the system's roots, or plain HTTP).
struct HttpFetcher {
    client: hyper_util::client::legacy::Client<Connector, Empty<Bytes>>,
}

impl HttpFetcher {
    fn new() -> Result<HttpFetcher, KeysError> {
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| KeysError::Fetch("system trust store".into(), e.to_string()))?;
        Ok(Self::from_connector(
            builder.https_or_http().enable_http1().build(),
        ))
    }

    fn from_connector(connector: Connector) -> HttpFetcher {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(connector);
        HttpFetcher { client }
    }

    async fn get(&self, uri: &Uri) -> Result<Vec<u8>, KeysError> {
        let err = |e: String| KeysError::Fetch(uri.to_string(), e);
        let req = hyper::Request::get(uri.clone())
            .header(hyper::header::ACCEPT, "application/json")
            .body(Empty::new())
            .map_err(|e| err(e.to_string()))?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| err(e.to_string()))?;
        read_document(resp, &uri.to_string()).await
    }
}

/// The body of a 200 answer, at most [`MAX_DOCUMENT_BYTES`].
async fn read_document<B>(resp: hyper::Response<B>, what: &str) -> Result<Vec<u8>, KeysError>
where
    B: hyper::body::Body,
    B::Error: std::fmt::Display + Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let err = |e: String| KeysError::Fetch(what.to_owned(), e);
    if resp.status() != hyper::StatusCode::OK {
        return Err(err(format!("HTTP status {}", resp.status().as_u16())));
    }
    let body = Limited::new(resp.into_body(), MAX_DOCUMENT_BYTES)
        .collect()
        .await
        .map_err(|e| err(format!("reading body: {e}")))?;
    Ok(body.to_bytes().to_vec())
}

/// GET `path` from the API server, at most [`MAX_DOCUMENT_BYTES`].
async fn api_get(client: &kube::Client, path: &str) -> Result<Vec<u8>, KeysError> {
    let err = |e: String| KeysError::Fetch(path.to_owned(), e);
    let req = hyper::Request::get(path)
        .header(hyper::header::ACCEPT, "application/json")
        .body(kube::client::Body::from(Vec::new()))
        .map_err(|e| err(e.to_string()))?;
    let resp = client.send(req).await.map_err(|e| err(e.to_string()))?;
    read_document(resp, path).await
}

/// Key generation and token signing, for the demo and tests. The agent never signs tokens in
/// production; this lives here because it is the mirror image of what the store verifies.
pub mod signing {
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _, RsaKeyPair};
    use base64::Engine as _;

    pub enum SigningKey {
        Es256 { kid: String, pair: EcdsaKeyPair },
        Rs256 { kid: String, pair: RsaKeyPair },
    }

    #[derive(Debug, thiserror::Error)]
    #[error("key generation or signing failed")]
    pub struct SigningError;

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    impl SigningKey {
        pub fn generate_es256(kid: &str) -> Result<SigningKey, SigningError> {
            let pair = EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING)
                .map_err(|_| SigningError)?;
            Ok(SigningKey::Es256 {
                kid: kid.into(),
                pair,
            })
        }

        pub fn generate_rs256(kid: &str) -> Result<SigningKey, SigningError> {
            let pair =
                RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).map_err(|_| SigningError)?;
            Ok(SigningKey::Rs256 {
                kid: kid.into(),
                pair,
            })
        }

        /// The public half as a JWK.
        pub fn jwk(&self) -> serde_json::Value {
            match self {
                SigningKey::Es256 { kid, pair } => {
                    // Uncompressed SEC1 point: 0x04 || X (32 bytes) || Y (32 bytes).
                    let point = pair.public_key().as_ref();
                    let (x, y) = point
                        .get(1..)
                        .unwrap_or_default()
                        .split_at(point.len().saturating_sub(1) / 2);
                    serde_json::json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid, "x": b64(x), "y": b64(y)})
                }
                SigningKey::Rs256 { kid, pair } => {
                    let public = pair.public_key();
                    let n = public.modulus();
                    let e = public.exponent();
                    serde_json::json!({"kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid,
                        "n": b64(n.big_endian_without_leading_zero()), "e": b64(e.big_endian_without_leading_zero())})
                }
            }
        }

        pub fn jwks(&self) -> serde_json::Value {
            serde_json::json!({ "keys": [self.jwk()] })
        }

        /// A compact JWS over `claims`.
        pub fn sign(&self, claims: &serde_json::Value) -> Result<String, SigningError> {
            let (alg, kid) = match self {
                SigningKey::Es256 { kid, .. } => ("ES256", kid),
                SigningKey::Rs256 { kid, .. } => ("RS256", kid),
            };
            let header = serde_json::json!({"alg": alg, "kid": kid, "typ": "JWT"});
            let input = format!(
                "{}.{}",
                b64(header.to_string().as_bytes()),
                b64(claims.to_string().as_bytes())
            );
            let rng = SystemRandom::new();
            let sig = match self {
                SigningKey::Es256 { pair, .. } => pair
                    .sign(&rng, input.as_bytes())
                    .map_err(|_| SigningError)?
                    .as_ref()
                    .to_vec(),
                SigningKey::Rs256 { pair, .. } => {
                    let mut sig = vec![0u8; pair.public_modulus_len()];
                    pair.sign(
                        &signature::RSA_PKCS1_SHA256,
                        &rng,
                        input.as_bytes(),
                        &mut sig,
                    )
                    .map_err(|_| SigningError)?;
                    sig
                }
            };
            Ok(format!("{input}.{}", b64(&sig)))
        }
    }
}

/// What `pick` takes from the JSON document `doc` (a `what`), or an error naming the `field`
/// it lacks.
fn json_field<T>(
    doc: &[u8],
    what: &str,
    field: &str,
    pick: impl FnOnce(serde_json::Value) -> Option<T>,
) -> Result<T, KeysError> {
    let value: serde_json::Value = serde_json::from_slice(doc)
        .map_err(|e| KeysError::Invalid(format!("{what} is not JSON: {e}")))?;
    pick(value).ok_or_else(|| KeysError::Invalid(format!("{what} has no {field}")))
}

/// The `jwks_uri` of an OIDC discovery document: an http(s) URL, or an error saying why not.
pub fn jwks_uri_from_discovery(doc: &[u8]) -> Result<Uri, KeysError> {
    let jwks = json_field(doc, "discovery document", "jwks_uri", |v| {
        v.get("jwks_uri")?.as_str().map(str::to_owned)
    })?;
    let jwks: Uri = jwks
        .parse()
        .map_err(|_| KeysError::Invalid("jwks_uri is not a URL".into()))?;
    if !matches!(jwks.scheme_str(), Some("http") | Some("https")) || jwks.host().is_none() {
        return Err(KeysError::Invalid("jwks_uri is not an http(s) URL".into()));
    }
    Ok(jwks)
}

#[cfg(test)]
pub mod testing {
    use super::signing::SigningKey;
    use super::*;

    pub struct TestKey(SigningKey);

    /// A JWKS file holding `key` in a new temporary directory, and a store loaded from it.
    pub async fn file_store(
        key: &TestKey,
    ) -> (tempfile::TempDir, std::path::PathBuf, Arc<KeyStore>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, key.jwks().to_string()).unwrap();
        let store = KeyStore::new(KeySource::File(path.clone()), Metrics::new()).unwrap();
        store.reload("startup").await.unwrap();
        (dir, path, store)
    }

    impl TestKey {
        pub fn es256(kid: &str) -> TestKey {
            TestKey(SigningKey::generate_es256(kid).unwrap())
        }
        pub fn rs256(kid: &str) -> TestKey {
            TestKey(SigningKey::generate_rs256(kid).unwrap())
        }
        pub fn sign(&self, claims: &serde_json::Value) -> String {
            self.0.sign(claims).unwrap()
        }
        pub fn jwks(&self) -> serde_json::Value {
            self.0.jwks()
        }
        pub fn store(&self) -> Arc<KeyStore> {
            KeyStore::fixed(
                KeySet::from_jwks(self.jwks().to_string().as_bytes()).unwrap(),
                Metrics::new(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::TestKey;
    use super::*;

    #[test]
    fn skips_unusable_keys() {
        let good = TestKey::es256("good").jwks()["keys"][0].clone();
        let doc = serde_json::json!({"keys": [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"kty": "EC", "crv": "P-256", "use": "enc", "kid": "enc", "x": good["x"], "y": good["y"]},
            {"kty": "RSA", "kid": "broken"},
            good,
        ]});
        let set = KeySet::from_jwks(doc.to_string().as_bytes()).unwrap();
        assert_eq!(set.len(), 1);
        assert!(KeySet::from_jwks(br#"{"keys": [{"kty":"oct","k":"c2VjcmV0"}]}"#).is_err());
        assert!(KeySet::from_jwks(b"not json").is_err());
        assert!(KeySet::from_jwks(br#"{"nokeys": 1}"#).is_err());
    }

    #[test]
    fn declared_alg_pins_the_key() {
        let key = TestKey::es256("k");
        let store = key.store();
        assert_eq!(
            store.candidates(Some("k"), Algorithm::ES256).unwrap().len(),
            1
        );
        assert!(store
            .candidates(Some("k"), Algorithm::ES384)
            .unwrap()
            .is_empty());
        assert!(matches!(
            store.candidates(Some("other"), Algorithm::ES256),
            Err(KeysError::UnknownKey)
        ));
    }

    #[tokio::test]
    async fn file_source_reloads_on_change_and_keeps_last_good() {
        let (_dir, path, store) = testing::file_store(&TestKey::es256("one")).await;
        assert!(store.candidates(Some("one"), Algorithm::ES256).is_ok());
        std::fs::write(&path, "{broken").unwrap();
        assert!(store.reload("changed").await.is_err());
        assert!(
            store.candidates(Some("one"), Algorithm::ES256).is_ok(),
            "last good set kept"
        );
        let k2 = TestKey::es256("two");
        std::fs::write(&path, k2.jwks().to_string()).unwrap();
        store.reload("changed").await.unwrap();
        assert!(store.candidates(Some("two"), Algorithm::ES256).is_ok());
        assert!(store.candidates(Some("one"), Algorithm::ES256).is_err());
    }
}
