//! Signing keys and Kubernetes projected service-account tokens for tests.
//!
//! Keys are generated at run time with aws-lc-rs (nothing secret is checked
//! in) and tokens are signed with `jsonwebtoken`, i.e. an implementation
//! independent of whatever the agent verifies with. The attacks that no honest
//! library will produce (`alg: none`, HS256 keyed with the RSA public key) are
//! assembled by hand.

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::digest;
use aws_lc_rs::encoding::{AsDer, PublicKeyX509Der};
use aws_lc_rs::hmac;
use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize, PublicKeyComponents};
use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// The audience EKS puts on Pod Identity tokens, and the agent's default.
pub const DEFAULT_AUDIENCE: &str = "pods.eks.amazonaws.com";

/// Issuer used on test tokens; shaped like an EKS cluster's OIDC issuer.
pub const DEFAULT_ISSUER: &str =
    "https://oidc.eks.us-west-2.amazonaws.com/id/0123456789ABCDEF0123456789ABCDEF";

/// Lifetime of a default test token; Pod Identity tokens live 24 h.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// An asymmetric signing key with its public JWK.
pub struct SigningKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
    public_key_pem: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A fresh RSA 2048 key for RS256.
    pub fn rsa() -> Self {
        let pair = RsaKeyPair::generate(KeySize::Rsa2048).expect("generate RSA key");
        let pkcs8 = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair).expect("RSA PKCS#8");
        // jsonwebtoken wants PKCS#1 DER for RSA; its PEM reader unwraps PKCS#8.
        let encoding = EncodingKey::from_rsa_pem(pem("PRIVATE KEY", pkcs8.as_ref()).as_bytes())
            .expect("RSA key loads into jsonwebtoken");
        let public = pair.public_key();
        let spki = AsDer::<PublicKeyX509Der>::as_der(public).expect("RSA SPKI");
        let components = PublicKeyComponents::<Vec<u8>>::from(public);
        let kid = key_id(spki.as_ref());
        let jwk = json!({
            "kty": "RSA",
            "alg": "RS256",
            "use": "sig",
            "kid": kid,
            "n": URL_SAFE_NO_PAD.encode(strip_leading_zeros(&components.n)),
            "e": URL_SAFE_NO_PAD.encode(strip_leading_zeros(&components.e)),
        });
        Self {
            kid,
            alg: Algorithm::RS256,
            encoding,
            jwk,
            public_key_pem: pem("PUBLIC KEY", spki.as_ref()),
        }
    }

    /// A fresh P-256 key for ES256.
    pub fn ec() -> Self {
        let pair =
            EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("generate P-256 key");
        let pkcs8 = pair.to_pkcs8v1().expect("P-256 PKCS#8");
        let encoding = EncodingKey::from_ec_der(pkcs8.as_ref());
        let public = pair.public_key();
        let spki = AsDer::<PublicKeyX509Der>::as_der(public).expect("P-256 SPKI");
        // Uncompressed SEC1 point: 0x04 || x (32 bytes) || y (32 bytes).
        let point = public.as_ref();
        assert_eq!(point.len(), 65, "uncompressed P-256 point");
        let kid = key_id(spki.as_ref());
        let jwk = json!({
            "kty": "EC",
            "alg": "ES256",
            "use": "sig",
            "kid": kid,
            "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        });
        Self {
            kid,
            alg: Algorithm::ES256,
            encoding,
            jwk,
            public_key_pem: pem("PUBLIC KEY", spki.as_ref()),
        }
    }

    /// 40 lowercase hex characters, the shape Kubernetes key IDs take.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// The public key as a JWK (`kid`, `kty`, `alg`, `use`, and `n`/`e` or `crv`/`x`/`y`).
    pub fn jwk(&self) -> Value {
        self.jwk.clone()
    }

    /// The public key as an SPKI PEM document.
    pub fn public_key_pem(&self) -> &str {
        &self.public_key_pem
    }

    /// Sign `claims` with this key, naming `kid` in the header.
    pub fn sign(&self, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.typ = Some("JWT".to_owned());
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("sign token")
    }
}

/// The keys a test bed trusts: one RSA and one EC key, generated once per test
/// process because RSA key generation is slow in a debug build.
#[derive(Debug)]
pub struct TestKeys {
    pub rsa: SigningKey,
    pub ec: SigningKey,
}

impl TestKeys {
    pub fn shared() -> &'static TestKeys {
        static KEYS: OnceLock<TestKeys> = OnceLock::new();
        KEYS.get_or_init(|| TestKeys {
            rsa: SigningKey::rsa(),
            ec: SigningKey::ec(),
        })
    }

    /// An RSA key no test bed trusts, for "wrong key" forgeries.
    pub fn untrusted_rsa() -> &'static SigningKey {
        static KEY: OnceLock<SigningKey> = OnceLock::new();
        KEY.get_or_init(SigningKey::rsa)
    }

    pub fn jwks(&self) -> Value {
        jwks(&[&self.rsa, &self.ec])
    }
}

/// A JWKS document (`{"keys": [...]}`) with the public halves of `keys`.
pub fn jwks(keys: &[&SigningKey]) -> Value {
    json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() })
}

/// Write a JWKS document to `path` (atomically, so an agent watching the file
/// never reads half of it).
pub fn write_jwks(path: &Path, keys: &[&SigningKey]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&jwks(keys))?)?;
    std::fs::rename(tmp, path)
}

/// The identity a token speaks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub service_account: String,
    pub service_account_uid: String,
    pub name: String,
    pub uid: String,
}

impl Pod {
    /// A pod with fresh random UIDs for itself and its service account.
    pub fn new(namespace: &str, service_account: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            service_account_uid: random_uuid(),
            name: name.to_owned(),
            uid: random_uuid(),
        }
    }

    /// Another pod running as the same service account.
    pub fn sibling(&self, name: &str) -> Self {
        Self {
            name: name.to_owned(),
            uid: random_uuid(),
            ..self.clone()
        }
    }

    /// `system:serviceaccount:<namespace>:<name>`.
    pub fn subject(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }

    pub fn token(&self) -> TokenBuilder {
        TokenBuilder::new(self)
    }
}

/// Builds projected service-account token claims, with a knob to break each
/// property the agent must check.
#[derive(Clone, Debug)]
pub struct TokenBuilder {
    pod: Pod,
    issuer: String,
    audience: Vec<String>,
    issued_at: i64,
    not_before: i64,
    expires_at: i64,
    subject: Option<String>,
    kubernetes_claims: bool,
    /// `kubernetes.io.node.name`, as Kubernetes 1.30 and later put in pod-bound tokens.
    node: Option<String>,
    kid: Option<Option<String>>,
    jti: String,
}

impl TokenBuilder {
    pub fn new(pod: &Pod) -> Self {
        let now = unix_now();
        Self {
            pod: pod.clone(),
            issuer: DEFAULT_ISSUER.to_owned(),
            audience: vec![DEFAULT_AUDIENCE.to_owned()],
            issued_at: now,
            not_before: now,
            expires_at: now + DEFAULT_TOKEN_LIFETIME.as_secs() as i64,
            subject: None,
            kubernetes_claims: true,
            node: None,
            kid: None,
            // Unique per token, so two tokens for one pod always differ.
            jti: random_uuid(),
        }
    }

    pub fn issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuer = issuer.into();
        self
    }

    pub fn audience<I, S>(mut self, audience: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.audience = audience.into_iter().map(Into::into).collect();
        self
    }

    /// Issued 25 h ago, expired an hour ago.
    pub fn expired(mut self) -> Self {
        let now = unix_now();
        self.issued_at = now - 25 * 3600;
        self.not_before = self.issued_at;
        self.expires_at = now - 3600;
        self
    }

    /// `nbf` an hour in the future.
    pub fn not_yet_valid(mut self) -> Self {
        self.not_before = unix_now() + 3600;
        self
    }

    /// Valid from now for `lifetime`.
    pub fn lifetime(mut self, lifetime: Duration) -> Self {
        self.expires_at = self.issued_at + lifetime.as_secs() as i64;
        self
    }

    /// Override `sub` (by default derived from the pod).
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    /// Drop the `kubernetes.io` claim entirely.
    pub fn without_kubernetes_claims(mut self) -> Self {
        self.kubernetes_claims = false;
        self
    }

    /// Bind the token to a node (`kubernetes.io.node`), as Kubernetes 1.30 and later do.
    pub fn node(mut self, name: impl Into<String>) -> Self {
        self.node = Some(name.into());
        self
    }

    /// Put this `kid` in the header instead of the signing key's.
    pub fn kid(mut self, kid: impl Into<String>) -> Self {
        self.kid = Some(Some(kid.into()));
        self
    }

    /// Send no `kid` header at all.
    pub fn without_kid(mut self) -> Self {
        self.kid = Some(None);
        self
    }

    pub fn claims(&self) -> Value {
        let mut claims = json!({
            "iss": self.issuer,
            "sub": self.subject.clone().unwrap_or_else(|| self.pod.subject()),
            "aud": self.audience,
            "exp": self.expires_at,
            "iat": self.issued_at,
            "nbf": self.not_before,
            "jti": self.jti,
        });
        if self.kubernetes_claims {
            claims["kubernetes.io"] = json!({
                "namespace": self.pod.namespace,
                "pod": { "name": self.pod.name, "uid": self.pod.uid },
                "serviceaccount": {
                    "name": self.pod.service_account,
                    "uid": self.pod.service_account_uid,
                },
            });
            if let Some(node) = &self.node {
                claims["kubernetes.io"]["node"] = json!({
                    "name": node,
                    "uid": format!("node-uid-{node}"),
                });
            }
        }
        claims
    }

    fn header_kid<'a>(&'a self, key: &'a SigningKey) -> Option<&'a str> {
        match &self.kid {
            None => Some(key.kid()),
            Some(kid) => kid.as_deref(),
        }
    }

    /// A properly signed token.
    pub fn sign(&self, key: &SigningKey) -> String {
        key.sign(self.header_kid(key), &self.claims())
    }

    /// An unsigned token: `{"alg":"none"}` header and an empty signature,
    /// naming `key`'s `kid` so only the algorithm gives it away.
    pub fn sign_alg_none(&self, key: &SigningKey) -> String {
        let mut header = json!({ "alg": "none", "typ": "JWT" });
        if let Some(kid) = self.header_kid(key) {
            header["kid"] = json!(kid);
        }
        format!("{}.", self.signing_input(&header))
    }

    /// The algorithm-confusion attack: an HS256 token whose HMAC key is the
    /// trusted RSA key's public PEM, which a verifier that lets the token pick
    /// the algorithm would accept.
    pub fn sign_hs256_with_public_key(&self, key: &SigningKey) -> String {
        let mut header = json!({ "alg": "HS256", "typ": "JWT" });
        if let Some(kid) = self.header_kid(key) {
            header["kid"] = json!(kid);
        }
        let input = self.signing_input(&header);
        let mac_key = hmac::Key::new(hmac::HMAC_SHA256, key.public_key_pem().as_bytes());
        let tag = hmac::sign(&mac_key, input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    fn signing_input(&self, header: &Value) -> String {
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(self.claims().to_string())
        )
    }
}

/// The claims of a JWT, decoded without checking anything.
pub fn unverified_claims(token: &str) -> Option<Value> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// A random RFC 4122 version-4 UUID string.
pub fn random_uuid() -> String {
    let mut b = random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    aws_lc_rs::rand::fill(&mut b).expect("system randomness");
    b
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn key_id(spki: &[u8]) -> String {
    let d = digest::digest(&digest::SHA256, spki);
    hex(&d.as_ref()[..20])
}

fn strip_leading_zeros(b: &[u8]) -> &[u8] {
    let first = b
        .iter()
        .position(|&x| x != 0)
        .unwrap_or(b.len().saturating_sub(1));
    &b[first..]
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    fn validation(alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.set_audience(&[DEFAULT_AUDIENCE]);
        v.set_issuer(&[DEFAULT_ISSUER]);
        v
    }

    #[test]
    fn rsa_token_verifies_against_its_jwk() {
        let keys = TestKeys::shared();
        let pod = Pod::new("team-a", "app", "app-1");
        let token = pod.token().sign(&keys.rsa);
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(keys.rsa.jwk()).unwrap();
        let key = DecodingKey::from_jwk(&jwk).unwrap();
        let data = jsonwebtoken::decode::<Value>(&token, &key, &validation(Algorithm::RS256))
            .expect("valid RS256 token");
        assert_eq!(data.header.kid.as_deref(), Some(keys.rsa.kid()));
        assert_eq!(data.claims["kubernetes.io"]["pod"]["uid"], pod.uid.as_str());
        assert_eq!(keys.rsa.kid().len(), 40);
    }

    #[test]
    fn ec_token_verifies_against_its_jwk() {
        let keys = TestKeys::shared();
        let pod = Pod::new("team-a", "app", "app-1");
        let token = pod.token().sign(&keys.ec);
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(keys.ec.jwk()).unwrap();
        let key = DecodingKey::from_jwk(&jwk).unwrap();
        jsonwebtoken::decode::<Value>(&token, &key, &validation(Algorithm::ES256))
            .expect("valid ES256 token");
    }

    #[test]
    fn forgeries_do_not_verify() {
        let keys = TestKeys::shared();
        let pod = Pod::new("team-a", "app", "app-1");
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(keys.rsa.jwk()).unwrap();
        let key = DecodingKey::from_jwk(&jwk).unwrap();
        let wrong_key = pod
            .token()
            .kid(keys.rsa.kid())
            .sign(TestKeys::untrusted_rsa());
        assert!(
            jsonwebtoken::decode::<Value>(&wrong_key, &key, &validation(Algorithm::RS256)).is_err()
        );
        let none = pod.token().sign_alg_none(&keys.rsa);
        assert!(none.ends_with('.'));
        assert!(jsonwebtoken::decode::<Value>(&none, &key, &validation(Algorithm::RS256)).is_err());
        // The HS256 forgery is a valid HMAC under the public PEM, i.e. exactly
        // what a confused verifier would compute.
        let hs = pod.token().sign_hs256_with_public_key(&keys.rsa);
        let confused = DecodingKey::from_secret(keys.rsa.public_key_pem().as_bytes());
        let mut v = validation(Algorithm::HS256);
        v.algorithms = vec![Algorithm::HS256];
        jsonwebtoken::decode::<Value>(&hs, &confused, &v).expect("HMAC under the public PEM");
    }

    #[test]
    fn claims_have_kubernetes_shape() {
        let pod = Pod::new("ns", "sa", "p");
        let c = pod.token().claims();
        assert_eq!(c["sub"], "system:serviceaccount:ns:sa");
        assert_eq!(c["aud"], json!(["pods.eks.amazonaws.com"]));
        assert_eq!(c["kubernetes.io"]["serviceaccount"]["name"], "sa");
        assert!(pod
            .token()
            .without_kubernetes_claims()
            .claims()
            .get("kubernetes.io")
            .is_none());
        let expired = pod.token().expired().claims();
        assert!(expired["exp"].as_i64().unwrap() < unix_now());
        let t = pod.token().sign(&TestKeys::shared().rsa);
        assert_eq!(unverified_claims(&t).unwrap()["sub"], c["sub"]);
    }

    #[test]
    fn uuids_are_v4() {
        let u = random_uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
    }
}
