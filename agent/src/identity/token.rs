//! Pod token verification: the projected service-account JWT a pod sends in `Authorization`.
//!
//! A token is checked locally before anything is sent upstream, so a forged or expired token
//! costs the agent one signature check and never an EKS Auth call. The result is an
//! [`Identity`], whose fields come only from verified claims; without a key source the
//! identity carries nothing but the token and its digest, and the cache keys on the digest.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;

use crate::defence::{self, Defence};
use crate::identity::keys::{KeyStore, KeysError, ACCEPTED_ALGORITHMS};

/// Clock skew tolerated on `exp`, `nbf` and `iat`: node clocks are NTP-synced, but the API
/// server's and the node's may still differ by a few seconds.
pub const LEEWAY: Duration = Duration::from_secs(30);
/// Longest lifetime (`exp - iat`) of a token accepted. Projected service-account tokens live
/// hours to a day (EKS Pod Identity's are 24 h, and the kubelet refreshes them at 80 %); twice
/// that leaves room for a cluster's own setting, while a token minted for months, which no
/// kubelet asks for, is refused.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(48 * 3600);
/// Larger tokens are not Kubernetes tokens (which are about 1 KiB); the HTTP layer bounds the
/// header anyway, this bounds the work done on a value that reached us.
const MAX_TOKEN_LEN: usize = 16 * 1024;

/// A pod's raw token. Its `Debug` and `Display` show a digest prefix, never the token.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    raw: Arc<str>,
    digest: [u8; 32],
}

impl Token {
    pub fn new(raw: &str) -> Self {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, raw.as_bytes());
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(digest.as_ref());
        Token {
            raw: raw.into(),
            digest: bytes,
        }
    }

    /// The token itself, for the upstream request body only.
    pub fn expose(&self) -> &str {
        &self.raw
    }

    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// Short, log-safe identifier: the first 6 bytes of the SHA-256 digest, in hex.
    pub fn fingerprint(&self) -> String {
        self.digest[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(sha256:{})", self.fingerprint())
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.fingerprint())
    }
}

/// Who is asking, as far as the agent could prove it.
#[derive(Debug, Clone)]
pub struct Identity {
    pub token: Token,
    /// Present only when the token's signature and claims were verified.
    /// Shared: a request answered from the verifier's memory clones a pointer, not strings.
    pub verified: Option<Arc<VerifiedClaims>>,
    /// `exp` of the token (verified or not), used to prefer the newest token of a pod.
    pub expires_at: Option<SystemTime>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VerifiedClaims {
    /// `kubernetes.io.namespace`: the pod's namespace.
    pub namespace: String,
    /// `kubernetes.io.serviceaccount.name`: the pod's service account.
    pub service_account: String,
    /// `kubernetes.io.pod.name`, absent from tokens not bound to a pod.
    pub pod_name: Option<String>,
    /// `kubernetes.io.pod.uid`, absent from tokens not bound to a pod.
    pub pod_uid: Option<String>,
    /// `kubernetes.io.node.name`: the node the pod was bound to (Kubernetes 1.30 and later).
    pub node_name: Option<String>,
    /// The token's `aud` values (the STS backend checks an association's audience).
    pub audiences: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("no token in the Authorization header")]
    Missing,
    #[error("token is not a JWT: {0}")]
    Malformed(String),
    #[error("token algorithm {0} is not accepted")]
    Algorithm(String),
    #[error("token is signed with an unknown key")]
    UnknownKey,
    #[error("token signature does not verify")]
    Signature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token audience is not one of the accepted audiences")]
    Audience,
    #[error("token issuer is not the expected issuer")]
    Issuer,
    #[error("token claims are not acceptable: {0}")]
    Claims(String),
    #[error("verification keys are not available: {0}")]
    KeysUnavailable(String),
}

impl TokenError {
    /// Bounded label for metrics and the error `code`.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Missing => "MissingToken",
            TokenError::Malformed(_) => "MalformedToken",
            TokenError::Algorithm(_) => "UnsupportedAlgorithm",
            TokenError::UnknownKey => "UnknownSigningKey",
            TokenError::Signature => "InvalidSignature",
            TokenError::Expired => "ExpiredToken",
            TokenError::NotYetValid => "TokenNotYetValid",
            TokenError::Audience => "InvalidAudience",
            TokenError::Issuer => "InvalidIssuer",
            TokenError::Claims(_) => "InvalidClaims",
            TokenError::KeysUnavailable(_) => "KeysUnavailable",
        }
    }
}

#[derive(Deserialize)]
struct RawHeader {
    alg: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    aud: Option<Audience>,
    exp: Option<u64>,
    nbf: Option<u64>,
    /// Read as any JSON value so that a token whose `iss` is not a string is refused as not
    /// acceptable rather than parsed leniently (RFC 7519 makes it one string).
    iss: Option<serde_json::Value>,
    iat: Option<serde_json::Value>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Deserialize)]
struct KubernetesClaims {
    namespace: Option<String>,
    pod: Option<NameUid>,
    serviceaccount: Option<NameUid>,
    node: Option<NameUid>,
}

#[derive(Deserialize)]
struct NameUid {
    name: Option<String>,
    uid: Option<String>,
}

/// Tokens verified recently, by SHA-256 digest: an SDK presents the same token on every
/// request until the kubelet rotates it, and a signature check costs far more than a lookup.
const VERIFIED_CACHE_SIZE: u64 = 10_000;
/// A verified result is reused at most this long (and never past the token's `exp`, nor
/// across a key set change).
const VERIFIED_TTL: Duration = Duration::from_secs(300);

#[derive(Clone)]
struct Verified {
    identity: Identity,
    key_generation: u64,
}

/// Checks tokens against a key store, issuer and audiences.
pub struct Verifier {
    keys: Option<Arc<KeyStore>>,
    issuer: Option<String>,
    audiences: Vec<String>,
    verified: moka::sync::Cache<[u8; 32], Verified>,
}

impl Verifier {
    pub fn new(
        keys: Option<Arc<KeyStore>>,
        issuer: Option<String>,
        audiences: Vec<String>,
    ) -> Self {
        let verified = moka::sync::Cache::builder()
            .max_capacity(VERIFIED_CACHE_SIZE)
            .time_to_live(VERIFIED_TTL)
            .build();
        Verifier {
            keys,
            issuer,
            audiences,
            verified,
        }
    }

    /// A previous verification of exactly these bytes, if still valid.
    fn recall(&self, token: &Token, keys: &KeyStore) -> Option<Identity> {
        let hit = self.verified.get(&token.digest())?;
        let fresh = hit.key_generation == keys.generation()
            && hit
                .identity
                .expires_at
                .is_none_or(|exp| exp + LEEWAY > SystemTime::now());
        fresh.then_some(hit.identity)
    }

    pub fn enabled(&self) -> bool {
        self.keys.is_some()
    }

    /// Verify `raw` and return who it proves the caller is.
    pub async fn verify(&self, raw: &str) -> Result<Identity, TokenError> {
        if raw.is_empty() {
            return Err(TokenError::Missing);
        }
        if raw.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed("token is too long".into()));
        }
        let token = Token::new(raw);
        if let Some(keys) = &self.keys {
            if let Some(identity) = self.recall(&token, keys) {
                return Ok(identity);
            }
        }
        let (alg, claims) = parse_unverified(raw)?;
        // Checked: `exp` is attacker-chosen and read before the signature is, and an `exp`
        // past what `SystemTime` holds (found by fuzzing: u64::MAX) must not panic.
        let expires_at = match claims.exp {
            Some(s) => Some(
                UNIX_EPOCH
                    .checked_add(Duration::from_secs(s))
                    .ok_or_else(|| TokenError::Malformed("exp is out of range".into()))?,
            ),
            None => None,
        };
        let Some(keys) = &self.keys else {
            // Unverified mode: the upstream checks the signature. Still refuse what would
            // certainly fail there, so it costs no upstream call.
            check_times(&claims, now_secs())?;
            return Ok(Identity {
                token,
                verified: None,
                expires_at,
            });
        };
        let kid = jsonwebtoken::decode_header(raw).ok().and_then(|h| h.kid);
        let candidates = match keys.candidates(kid.as_deref(), alg) {
            Ok(found) if !found.is_empty() => found,
            Ok(_) | Err(KeysError::UnknownKey) => {
                // A key rotation may have published a key we have not fetched yet.
                keys.refresh_for_unknown_key().await;
                match keys.candidates(kid.as_deref(), alg) {
                    Ok(found) if !found.is_empty() => found,
                    Ok(_) | Err(KeysError::UnknownKey) => return Err(TokenError::UnknownKey),
                    Err(e) => return Err(TokenError::KeysUnavailable(e.to_string())),
                }
            }
            Err(e) => return Err(TokenError::KeysUnavailable(e.to_string())),
        };
        let key_generation = keys.generation();
        let validation = self.validation(alg, keys.discovered_issuer());
        let mut last_err = TokenError::Signature;
        for key in candidates.iter() {
            match jsonwebtoken::decode::<Claims>(raw, key, &validation) {
                Ok(data) => {
                    let verified = kubernetes_identity(&data.claims)?;
                    let identity = Identity {
                        token,
                        verified: Some(Arc::new(verified)),
                        expires_at,
                    };
                    self.verified.insert(
                        identity.token.digest(),
                        Verified {
                            identity: identity.clone(),
                            key_generation,
                        },
                    );
                    return Ok(identity);
                }
                Err(e) => {
                    last_err = map_jwt_error(e);
                    if !matches!(last_err, TokenError::Signature) {
                        break;
                    }
                }
            }
        }
        Err(last_err)
    }

    fn validation(&self, alg: Algorithm, discovered_issuer: Option<String>) -> Validation {
        let mut v = Validation::new(alg);
        v.leeway = LEEWAY.as_secs();
        v.validate_exp = true;
        v.validate_nbf = true;
        v.set_audience(&self.audiences);
        let mut required = vec!["exp", "aud", "sub"];
        if let Some(iss) = self.issuer.clone().or(discovered_issuer) {
            v.set_issuer(&[iss]);
            required.push("iss");
        }
        v.set_required_spec_claims(&required);
        v
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Header `alg` and claims, without checking the signature; the structural checks here
/// decide between "malformed" (400) and "not acceptable" (401/403).
fn parse_unverified(raw: &str) -> Result<(Algorithm, Claims), TokenError> {
    let mut parts = raw.split('.');
    let (Some(header), Some(payload), Some(_sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed(
            "expected three dot-separated parts".into(),
        ));
    };
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64
        .decode(header.trim_end_matches('='))
        .map_err(|_| TokenError::Malformed("header is not base64url".into()))?;
    let header: RawHeader = serde_json::from_slice(&header)
        .map_err(|_| TokenError::Malformed("header is not a JSON object".into()))?;
    let payload = b64
        .decode(payload.trim_end_matches('='))
        .map_err(|_| TokenError::Malformed("payload is not base64url".into()))?;
    let claims: Claims = serde_json::from_slice(&payload)
        .map_err(|_| TokenError::Malformed("payload is not a JSON claims object".into()))?;
    let alg_name = header.alg.unwrap_or_default();
    let alg = match alg_name.as_str() {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "PS256" => Algorithm::PS256,
        _ => return Err(TokenError::Algorithm(sanitize(&alg_name))),
    };
    debug_assert!(ACCEPTED_ALGORITHMS.contains(&alg));
    Ok((alg, claims))
}

/// Keep attacker-chosen text short and printable before it goes into a message.
fn sanitize(s: &str) -> String {
    let clean: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(16)
        .collect();
    if clean.is_empty() {
        "(missing)".into()
    } else {
        clean
    }
}

fn check_times(claims: &Claims, now: u64) -> Result<(), TokenError> {
    let leeway = LEEWAY.as_secs();
    if claims
        .exp
        .is_some_and(|exp| exp.saturating_add(leeway) < now)
    {
        return Err(TokenError::Expired);
    }
    if claims
        .nbf
        .is_some_and(|nbf| nbf > now.saturating_add(leeway))
    {
        return Err(TokenError::NotYetValid);
    }
    Ok(())
}

fn map_jwt_error(e: jsonwebtoken::errors::Error) -> TokenError {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidSignature | K::InvalidEcdsaKey | K::InvalidRsaKey(_) | K::InvalidKeyFormat => {
            TokenError::Signature
        }
        K::ExpiredSignature => TokenError::Expired,
        K::ImmatureSignature => TokenError::NotYetValid,
        K::InvalidAudience => TokenError::Audience,
        K::InvalidIssuer => TokenError::Issuer,
        K::InvalidAlgorithm | K::MissingAlgorithm => TokenError::Algorithm("mismatch".into()),
        K::MissingRequiredClaim(c) => TokenError::Claims(format!("missing claim {}", sanitize(c))),
        K::InvalidClaimFormat(c) => {
            TokenError::Claims(format!("claim {} has the wrong type", sanitize(c)))
        }
        K::InvalidSubject => TokenError::Claims("subject".into()),
        _ => TokenError::Malformed("token could not be decoded".into()),
    }
}

/// The pod behind a verified token. `sub` must agree with the `kubernetes.io` claims, or a
/// token minted for one service account could be presented as another's.
/// What RFC 7519 and the agent's own bounds say of `iss`, `iat` and the lifetime, beyond the
/// checks of the JWT library.
fn strict_claims(claims: &Claims, now: u64) -> Result<(), TokenError> {
    if !defence::on(Defence::StrictClaims) {
        return Ok(());
    }
    if claims.iss.as_ref().is_some_and(|iss| !iss.is_string()) {
        return Err(TokenError::Claims("iss is not a string".into()));
    }
    let iat = match &claims.iat {
        None => None,
        Some(v) => Some(
            v.as_f64()
                .filter(|t| t.is_finite() && *t >= 0.0)
                .ok_or_else(|| TokenError::Claims("iat is not a time".into()))?,
        ),
    };
    let leeway = LEEWAY.as_secs_f64();
    if iat.is_some_and(|iat| iat > now as f64 + leeway) {
        return Err(TokenError::NotYetValid);
    }
    // Without iat, the lifetime left is what is bounded.
    let start = iat.unwrap_or(now as f64);
    if claims
        .exp
        .is_some_and(|exp| exp as f64 - start > MAX_TOKEN_LIFETIME.as_secs_f64() + leeway)
    {
        return Err(TokenError::Claims(format!(
            "the token lives longer than {}",
            humantime::format_duration(MAX_TOKEN_LIFETIME)
        )));
    }
    Ok(())
}

fn kubernetes_identity(claims: &Claims) -> Result<VerifiedClaims, TokenError> {
    strict_claims(claims, now_secs())?;
    let k8s = claims
        .kubernetes
        .as_ref()
        .ok_or_else(|| TokenError::Claims("missing kubernetes.io claims".into()))?;
    let namespace = k8s.namespace.clone().filter(|s| !s.is_empty());
    let service_account = k8s
        .serviceaccount
        .as_ref()
        .and_then(|s| s.name.clone())
        .filter(|s| !s.is_empty());
    let (Some(namespace), Some(service_account)) = (namespace, service_account) else {
        return Err(TokenError::Claims(
            "missing kubernetes.io namespace or service account".into(),
        ));
    };
    let expected = format!("system:serviceaccount:{namespace}:{service_account}");
    if claims.sub.as_deref() != Some(expected.as_str()) {
        return Err(TokenError::Claims(
            "sub does not match the kubernetes.io claims".into(),
        ));
    }
    let pod = k8s.pod.as_ref();
    Ok(VerifiedClaims {
        namespace,
        service_account,
        pod_name: pod.and_then(|p| p.name.clone()).filter(|s| !s.is_empty()),
        pod_uid: pod.and_then(|p| p.uid.clone()).filter(|s| !s.is_empty()),
        node_name: k8s
            .node
            .as_ref()
            .and_then(|n| n.name.clone())
            .filter(|s| !s.is_empty()),
        audiences: match &claims.aud {
            Some(Audience::One(a)) => vec![a.clone()],
            Some(Audience::Many(list)) => list.clone(),
            None => Vec::new(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::keys::testing::TestKey;

    fn claims(ns: &str, sa: &str, uid: &str) -> serde_json::Value {
        let now = now_secs();
        serde_json::json!({
            "iss": "https://issuer.test",
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "aud": ["pods.eks.amazonaws.com"],
            "exp": now + 3600, "iat": now, "nbf": now,
            "kubernetes.io": {"namespace": ns, "pod": {"name": "p", "uid": uid}, "serviceaccount": {"name": sa, "uid": "sa-uid"}},
        })
    }

    fn verifier(key: &TestKey) -> Verifier {
        Verifier::new(
            Some(key.store()),
            Some("https://issuer.test".into()),
            vec!["pods.eks.amazonaws.com".into()],
        )
    }

    #[tokio::test]
    async fn accepts_a_good_token_and_extracts_the_pod() {
        for key in [TestKey::es256("k1"), TestKey::rs256("k2")] {
            let id = verifier(&key)
                .verify(&key.sign(&claims("ns", "sa", "u1")))
                .await
                .unwrap();
            let v = id.verified.unwrap();
            assert_eq!(
                (v.namespace.as_str(), v.service_account.as_str()),
                ("ns", "sa")
            );
            assert_eq!(v.pod_uid.as_deref(), Some("u1"));
        }
    }

    #[tokio::test]
    async fn rejects_bad_tokens_with_the_right_error() {
        let key = TestKey::es256("k1");
        let other = TestKey::es256("k1");
        let v = verifier(&key);
        let mut c = claims("ns", "sa", "u");
        let ok = key.sign(&c);
        assert!(matches!(
            v.verify(&other.sign(&c)).await,
            Err(TokenError::Signature)
        ));
        assert!(matches!(v.verify("").await, Err(TokenError::Missing)));
        assert!(matches!(
            v.verify("abc").await,
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            v.verify(&format!("{ok}.x")).await,
            Err(TokenError::Malformed(_))
        ));
        c["exp"] = serde_json::json!(now_secs() - 3600);
        assert!(matches!(
            v.verify(&key.sign(&c)).await,
            Err(TokenError::Expired)
        ));
        let mut c = claims("ns", "sa", "u");
        c["nbf"] = serde_json::json!(now_secs() + 3600);
        assert!(matches!(
            v.verify(&key.sign(&c)).await,
            Err(TokenError::NotYetValid)
        ));
        let mut c = claims("ns", "sa", "u");
        c["aud"] = serde_json::json!(["sts.amazonaws.com"]);
        assert!(matches!(
            v.verify(&key.sign(&c)).await,
            Err(TokenError::Audience)
        ));
        let mut c = claims("ns", "sa", "u");
        c["iss"] = serde_json::json!("https://evil.test");
        assert!(matches!(
            v.verify(&key.sign(&c)).await,
            Err(TokenError::Issuer)
        ));
        let mut c = claims("ns", "sa", "u");
        c["sub"] = serde_json::json!("system:serviceaccount:kube-system:admin");
        assert!(matches!(
            v.verify(&key.sign(&c)).await,
            Err(TokenError::Claims(_))
        ));
        let mut c = claims("ns", "sa", "u");
        c.as_object_mut().unwrap().remove("kubernetes.io");
        assert!(matches!(
            v.verify(&key.sign(&c)).await,
            Err(TokenError::Claims(_))
        ));
    }

    #[tokio::test]
    async fn refuses_none_and_hmac() {
        let key = TestKey::rs256("k1");
        let v = verifier(&key);
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let payload = b64.encode(claims("ns", "sa", "u").to_string());
        for alg in ["none", "HS256", "HS512", "EdDSA"] {
            let header = b64.encode(format!(r#"{{"alg":"{alg}","kid":"k1"}}"#));
            let tok = format!("{header}.{payload}.c2ln");
            assert!(
                matches!(v.verify(&tok).await, Err(TokenError::Algorithm(_))),
                "{alg}"
            );
        }
    }

    #[tokio::test]
    async fn alg_must_match_the_key() {
        // An RS256 key must not verify a token that claims ES256, even if the kid matches.
        let rsa = TestKey::rs256("k1");
        let ec = TestKey::es256("k1");
        let tok = ec.sign(&claims("ns", "sa", "u"));
        assert!(verifier(&rsa).verify(&tok).await.is_err());
    }

    #[tokio::test]
    async fn unverified_mode_keeps_only_the_digest() {
        let key = TestKey::es256("k1");
        let v = Verifier::new(None, None, vec!["pods.eks.amazonaws.com".into()]);
        let id = v.verify(&key.sign(&claims("ns", "sa", "u"))).await.unwrap();
        assert!(id.verified.is_none());
        let mut c = claims("ns", "sa", "u");
        c["exp"] = serde_json::json!(now_secs() - 3600);
        assert!(matches!(
            v.verify(&key.sign(&c)).await,
            Err(TokenError::Expired)
        ));
    }

    #[tokio::test]
    async fn verified_results_are_reused_until_the_keys_change() {
        let key = TestKey::es256("k1");
        let (_dir, path, store) = crate::identity::keys::testing::file_store(&key).await;
        let v = Verifier::new(
            Some(store.clone()),
            None,
            vec!["pods.eks.amazonaws.com".into()],
        );
        let tok = key.sign(&claims("ns", "sa", "u1"));
        v.verify(&tok).await.unwrap();
        assert!(
            v.recall(&Token::new(&tok), &store).is_some(),
            "second presentation skips the signature check"
        );
        // The key is rotated out: the same token must be checked again, and now fails.
        std::fs::write(&path, TestKey::es256("k2").jwks().to_string()).unwrap();
        store.reload("changed").await.unwrap();
        assert!(v.recall(&Token::new(&tok), &store).is_none());
        assert!(matches!(v.verify(&tok).await, Err(TokenError::UnknownKey)));
    }

    #[tokio::test]
    async fn an_exp_beyond_the_clock_range_is_malformed_not_a_panic() {
        // Regression (fuzz corpus `token/huge_exp`): `exp` = u64::MAX overflowed SystemTime.
        let key = TestKey::es256("k1");
        let mut c = claims("ns", "sa", "u");
        c["exp"] = serde_json::json!(u64::MAX);
        let tok = key.sign(&c);
        assert!(matches!(
            verifier(&key).verify(&tok).await,
            Err(TokenError::Malformed(_))
        ));
        let unverified = Verifier::new(None, None, vec!["pods.eks.amazonaws.com".into()]);
        assert!(matches!(
            unverified.verify(&tok).await,
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn token_debug_is_redacted() {
        let t = Token::new("eyJhbGciOiJSUzI1NiJ9.secret-claims.signature");
        assert!(!format!("{t:?}").contains("secret"));
        assert!(!format!("{t}").contains("secret"));
        assert_eq!(t.fingerprint().len(), 12);
    }
}
