//! What each fuzz target does with its input, shared with the agent's corpus regression test
//! (`agent/tests/fuzz_corpus.rs` includes this file), so a crash found by the fuzzer and
//! saved into `corpus/<target>/` is replayed by `cargo test` with the very same calls.
//!
//! Every function takes untrusted bytes and must return without panicking, whatever they are.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use pod_identity_agent::http::HostAllowList;
use pod_identity_agent::keys::{KeySet, KeyStore};
use pod_identity_agent::metrics::Metrics;
use pod_identity_agent::token::Verifier;

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
        let _ = pod_identity_agent::associations::parse(text, "fuzz.yaml");
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

/// A fuzz target: takes any bytes, must not panic.
pub type Target = fn(&[u8]);

/// Every target by name, for the corpus replay.
pub const TARGETS: [(&str, Target); 4] = [
    ("token", token),
    ("jwks", jwks),
    ("associations", associations),
    ("host", host),
];
