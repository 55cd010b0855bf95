//! Pods and their projected service-account tokens, signed with a key the agent is told to
//! trust through its `--jwks-file`.
//!
//! Tokens look like the ones kubelet projects for EKS Pod Identity: RS256 by default (what
//! EKS issuers sign with), the `pods.eks.amazonaws.com` audience, a 24 h lifetime, and the
//! `kubernetes.io` claims the agent derives its cache key from. Every token carries its own
//! `jti`, so signing twice for one pod gives two different tokens even with RS256, whose
//! signatures are deterministic: that is what a kubelet rotation looks like to the agent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use pod_identity_agent::config::DEFAULT_AUDIENCE;
use pod_identity_agent::identity::keys::signing::{SigningError, SigningKey};

/// Issuer named in every token (the agent is not given `--issuer`, so it is not checked,
/// but a real token always has one).
pub const ISSUER: &str = "https://oidc.load.pod-identity-agent.invalid";
/// A projected token's lifetime under EKS Pod Identity; nothing expires during a run.
const TOKEN_LIFETIME_SECS: u64 = 24 * 3600;
/// Pods are spread over this many namespaces and service accounts per namespace, so cache
/// keys differ in every part, as on a real node.
const NAMESPACES: usize = 16;
const SERVICE_ACCOUNTS: usize = 4;
/// How many (namespace, service account) pairs the pods are spread over.
pub const SERVICE_ACCOUNT_COUNT: usize = NAMESPACES * SERVICE_ACCOUNTS;

/// Service account `index` (of [`SERVICE_ACCOUNT_COUNT`]) as `(namespace, name)`: the pair
/// every pod numbered `index` (modulo the count) runs as.
pub fn service_account(index: usize) -> (String, String) {
    let ns = index % NAMESPACES;
    let sa = (index / NAMESPACES) % SERVICE_ACCOUNTS;
    (format!("team-{ns:02}"), format!("app-{sa}"))
}

/// Signature algorithm of the issuer's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    /// RSA 2048 with SHA-256: what EKS and most Kubernetes issuers sign with.
    Rs256,
    /// ECDSA P-256.
    Es256,
}

impl Alg {
    pub fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
        }
    }
}

/// One pod, as its token describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub service_account: String,
    pub name: String,
    pub uid: String,
}

impl Pod {
    /// Pod `index` of `batch`. Pods of different batches never share a UID, so a scenario
    /// that wants new pods names a new batch.
    pub fn numbered(batch: &str, index: usize) -> Pod {
        let (namespace, service_account) = service_account(index);
        // UUID-shaped (36 characters) like a real pod UID; the batch goes into the first
        // group through a small stable hash so UIDs stay the same length.
        let batch_tag = batch.bytes().fold(0x811c_9dc5u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        Pod {
            namespace,
            service_account,
            name: format!("{batch}-{index:05}"),
            uid: format!(
                "{batch_tag:08x}-0000-4000-8000-{:012x}",
                index as u64 & 0xffff_ffff_ffff
            ),
        }
    }

    /// `count` pods of `batch`.
    pub fn batch(batch: &str, count: usize) -> Vec<Pod> {
        (0..count).map(|i| Pod::numbered(batch, i)).collect()
    }
}

/// The cluster's token issuer: a signing key and a counter for `jti`.
pub struct Issuer {
    key: SigningKey,
    alg: Alg,
    signed: AtomicU64,
    /// Distinguishes this run's `jti`s from another run's.
    run: u64,
}

impl Issuer {
    pub fn generate(alg: Alg) -> Result<Issuer, SigningError> {
        let key = match alg {
            Alg::Rs256 => SigningKey::generate_rs256("load-rs256")?,
            Alg::Es256 => SigningKey::generate_es256("load-es256")?,
        };
        Ok(Issuer {
            key,
            alg,
            signed: AtomicU64::new(0),
            run: now_secs() ^ (u64::from(std::process::id()) << 32),
        })
    }

    pub fn alg(&self) -> Alg {
        self.alg
    }

    /// The public key as a JWKS document, for the agent's `--jwks-file`.
    pub fn jwks(&self) -> String {
        self.key.jwks().to_string()
    }

    /// The claims of a fresh token for `pod`.
    pub fn claims(&self, pod: &Pod) -> serde_json::Value {
        let now = now_secs();
        let n = self.signed.fetch_add(1, Ordering::Relaxed);
        serde_json::json!({
            "iss": ISSUER,
            "sub": format!("system:serviceaccount:{}:{}", pod.namespace, pod.service_account),
            "aud": [DEFAULT_AUDIENCE],
            "iat": now,
            "nbf": now,
            "exp": now + TOKEN_LIFETIME_SECS,
            "jti": format!("{:016x}-{n}", self.run),
            "kubernetes.io": {
                "namespace": pod.namespace,
                "pod": {"name": pod.name, "uid": pod.uid},
                "serviceaccount": {"name": pod.service_account, "uid": "00000000-0000-4000-8000-00000000a11d"},
            },
        })
    }

    /// A freshly signed token for `pod`; never equal to an earlier one.
    pub fn token(&self, pod: &Pod) -> Result<String, SigningError> {
        self.key.sign(&self.claims(pod))
    }

    /// One fresh token per pod, signed on every core (an RSA signature costs about a
    /// millisecond; ten thousand of them are worth spreading).
    pub async fn tokens(self: &Arc<Self>, pods: &[Pod]) -> Result<Vec<String>, SigningError> {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let chunk = pods.len().div_ceil(threads).max(1);
        let mut handles = Vec::new();
        for part in pods.chunks(chunk) {
            let issuer = self.clone();
            let part = part.to_vec();
            handles.push(tokio::task::spawn_blocking(move || {
                part.iter()
                    .map(|p| issuer.token(p))
                    .collect::<Result<Vec<_>, _>>()
            }));
        }
        let mut out = Vec::with_capacity(pods.len());
        for handle in handles {
            out.extend(handle.await.map_err(|_| SigningError)??);
        }
        Ok(out)
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_of_a_batch_are_distinct_and_uids_are_uuid_shaped() {
        let pods = Pod::batch("fleet", 2000);
        let uids: std::collections::HashSet<_> = pods.iter().map(|p| p.uid.clone()).collect();
        assert_eq!(uids.len(), 2000);
        assert!(pods.iter().all(|p| p.uid.len() == 36));
        assert_ne!(Pod::numbered("a", 1).uid, Pod::numbered("b", 1).uid);
    }

    #[tokio::test]
    async fn every_token_is_new_even_for_the_same_pod() {
        let issuer = Arc::new(Issuer::generate(Alg::Rs256).unwrap());
        let pod = Pod::numbered("x", 0);
        let tokens = issuer.tokens(&[pod.clone(), pod]).await.unwrap();
        assert_ne!(tokens[0], tokens[1]);
    }
}
