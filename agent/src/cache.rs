//! The credential cache: one upstream call per key, however many requests arrive.
//!
//! Each key maps to a [`Slot`] in a size-bounded moka cache. A slot holds the last good
//! credentials and, while a fetch runs, the receiving end of a watch channel that every
//! concurrent request for that key waits on. The fetch itself is a spawned task, so a client
//! that hangs up does not cancel it and the next request finds the result cached.
//!
//! Keys come only from verified claims (namespace, service account, pod UID) or, when tokens
//! are not verified locally, from the token's SHA-256 digest, so no token can reach another
//! pod's entry.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use moka::Expiry;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::CacheScope;
use crate::metrics::Metrics;
use crate::token::Identity;
use crate::upstream::{Backend, Credentials, FailureKind, UpstreamError};

/// Credentials are served from the cache only while more than this is left: botocore starts
/// refreshing 15 minutes before expiry, so anything shorter would make every boto3 call come
/// back to the agent.
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(15 * 60);
/// Credentials this close to expiry are not handed out at all (the SDKs' own refresh buffers
/// are at least 10 s).
pub const MIN_SERVABLE_LIFETIME: Duration = Duration::from_secs(15);
/// How long a request waits for a fetch: the upstream call is bounded at 4.5 s, and the
/// contract promises an answer within 5 s.
pub const WAIT_DEADLINE: Duration = Duration::from_millis(4800);
/// A slot without credentials (its first fetch failed) is dropped after this.
const EMPTY_SLOT_TTL: Duration = Duration::from_secs(30);

/// Upstream errors after which an entry's credentials must not be served again: the
/// association or the pod's right to it is gone.
const IRRECOVERABLE_CODES: [&str; 4] = [
    "AccessDeniedException",
    "ResourceNotFoundException",
    "InvalidTokenException",
    "ExpiredTokenException",
];

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CacheKey {
    /// A pod, by UID (or by token digest for a verified token without pod claims).
    Pod {
        namespace: Arc<str>,
        service_account: Arc<str>,
        pod: PodRef,
    },
    /// Every pod of a service account.
    Association {
        namespace: Arc<str>,
        service_account: Arc<str>,
    },
    /// An unverified token, by digest: nothing else about it can be trusted.
    Unverified([u8; 32]),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PodRef {
    Uid(Arc<str>),
    Token([u8; 32]),
}

impl CacheKey {
    pub fn for_identity(identity: &Identity, scope: CacheScope) -> CacheKey {
        let Some(claims) = &identity.verified else {
            return CacheKey::Unverified(identity.token.digest());
        };
        let namespace: Arc<str> = claims.namespace.as_str().into();
        let service_account: Arc<str> = claims.service_account.as_str().into();
        match scope {
            CacheScope::Association => CacheKey::Association {
                namespace,
                service_account,
            },
            CacheScope::Pod => {
                let pod = match &claims.pod_uid {
                    Some(uid) => PodRef::Uid(uid.as_str().into()),
                    None => PodRef::Token(identity.token.digest()),
                };
                CacheKey::Pod {
                    namespace,
                    service_account,
                    pod,
                }
            }
        }
    }

    /// Log-safe description (no token material beyond a digest prefix).
    pub fn describe(&self) -> String {
        let hex = |d: &[u8; 32]| {
            d[..6]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        match self {
            CacheKey::Pod {
                namespace,
                service_account,
                pod: PodRef::Uid(uid),
            } => {
                format!("{namespace}/{service_account}/pod:{uid}")
            }
            CacheKey::Pod {
                namespace,
                service_account,
                pod: PodRef::Token(d),
            } => {
                format!("{namespace}/{service_account}/token:{}", hex(d))
            }
            CacheKey::Association {
                namespace,
                service_account,
            } => format!("{namespace}/{service_account}"),
            CacheKey::Unverified(d) => format!("unverified-token:{}", hex(d)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("timed out waiting for credentials")]
    Timeout,
    #[error("the credential fetch ended without a result")]
    Internal,
}

type FetchOutcome = Result<Arc<Credentials>, UpstreamError>;

struct Cached {
    creds: Arc<Credentials>,
    /// Served as-is until then; afterwards a request fetches anew.
    fresh_until: Instant,
}

#[derive(Default)]
struct SlotState {
    current: Option<Cached>,
    inflight: Option<watch::Receiver<Option<FetchOutcome>>>,
}

/// One cache entry. Refresh-ahead and stale serving build on this state.
#[derive(Default)]
pub struct Slot {
    state: Mutex<SlotState>,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        // A poisoned lock only means a panic elsewhere mid-update; the state is still a
        // valid (if possibly stale) value, so keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long moka keeps the slot: until its credentials are no longer servable.
    fn time_to_live(&self) -> Duration {
        match &self.lock().current {
            Some(c) => c
                .creds
                .remaining(SystemTime::now())
                .saturating_sub(MIN_SERVABLE_LIFETIME),
            None => EMPTY_SLOT_TTL,
        }
    }
}

struct SlotExpiry;

impl Expiry<CacheKey, Arc<Slot>> for SlotExpiry {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        slot: &Arc<Slot>,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        Some(slot.time_to_live())
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        slot: &Arc<Slot>,
        _now: std::time::Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        Some(slot.time_to_live())
    }
}

pub struct CredentialCache {
    entries: moka::future::Cache<CacheKey, Arc<Slot>>,
    backend: Arc<dyn Backend>,
    scope: CacheScope,
    max_retention: Duration,
    metrics: Metrics,
}

impl CredentialCache {
    pub fn new(
        backend: Arc<dyn Backend>,
        scope: CacheScope,
        max_entries: u64,
        max_retention: Duration,
        metrics: Metrics,
    ) -> Arc<CredentialCache> {
        let entries = moka::future::Cache::builder()
            .max_capacity(max_entries)
            .expire_after(SlotExpiry)
            .build();
        Arc::new(CredentialCache {
            entries,
            backend,
            scope,
            max_retention,
            metrics,
        })
    }

    pub fn entry_count(&self) -> u64 {
        self.entries.entry_count()
    }

    /// Credentials for `identity`: from the cache, from a fetch already in flight for the
    /// same key, or from a new fetch.
    pub async fn get(
        self: &Arc<Self>,
        identity: &Identity,
    ) -> Result<Arc<Credentials>, CacheError> {
        let key = CacheKey::for_identity(identity, self.scope);
        let slot = self
            .entries
            .get_with(key.clone(), async { Arc::new(Slot::default()) })
            .await;
        let mut rx = {
            let mut state = slot.lock();
            if let Some(cached) = state
                .current
                .as_ref()
                .filter(|c| c.fresh_until > Instant::now())
            {
                self.metrics.cache_hits.inc();
                tracing::debug!(key = %key.describe(), "cache hit");
                return Ok(cached.creds.clone());
            }
            match &state.inflight {
                Some(rx) => {
                    self.metrics.cache_coalesced.inc();
                    rx.clone()
                }
                None => {
                    self.metrics.cache_misses.inc();
                    let (tx, rx) = watch::channel(None);
                    state.inflight = Some(rx.clone());
                    tokio::spawn(self.clone().fetch(key, slot.clone(), identity.clone(), tx));
                    rx
                }
            }
        };
        let outcome = match tokio::time::timeout(WAIT_DEADLINE, rx.wait_for(Option::is_some)).await
        {
            Ok(Ok(value)) => value.clone(),
            Ok(Err(_)) => return Err(CacheError::Internal),
            Err(_) => return Err(CacheError::Timeout),
        };
        match outcome {
            Some(result) => result.map_err(CacheError::Upstream),
            None => Err(CacheError::Internal),
        }
    }

    /// One upstream call for `key`; its result goes to every waiter and, if good, into the slot.
    async fn fetch(
        self: Arc<Self>,
        key: CacheKey,
        slot: Arc<Slot>,
        identity: Identity,
        tx: watch::Sender<Option<FetchOutcome>>,
    ) {
        let started = Instant::now();
        let result = self.backend.fetch(&identity).await.and_then(|creds| {
            let remaining = creds.remaining(SystemTime::now());
            if remaining < MIN_SERVABLE_LIFETIME {
                Err(UpstreamError::new(
                    FailureKind::InvalidResponse,
                    "CredentialsExpireTooSoon",
                    format!(
                        "the upstream returned credentials that expire in {}s",
                        remaining.as_secs()
                    ),
                ))
            } else {
                Ok(creds)
            }
        });
        let elapsed = started.elapsed();
        let outcome = match &result {
            Ok(_) => "success",
            Err(e) => e.kind.label(),
        };
        self.metrics.upstream_call(outcome, elapsed.as_secs_f64());
        let described = key.describe();
        let outcome: FetchOutcome = match result {
            Ok(creds) => {
                tracing::info!(key = %described, access_key_id = %creds.access_key_id,
                    expires_in_s = creds.remaining(SystemTime::now()).as_secs(),
                    elapsed_ms = elapsed.as_millis() as u64, "fetched credentials");
                Ok(Arc::new(creds))
            }
            Err(e) => {
                tracing::warn!(key = %described, code = %e.code, kind = e.kind.label(), upstream_message = %e.message,
                    elapsed_ms = elapsed.as_millis() as u64, "upstream call failed");
                Err(e)
            }
        };
        let served = {
            let mut state = slot.lock();
            state.inflight = None;
            match &outcome {
                Ok(creds) => {
                    let fresh_for = self.fresh_for(creds.remaining(SystemTime::now()));
                    state.current = Some(Cached {
                        creds: creds.clone(),
                        fresh_until: Instant::now() + fresh_for,
                    });
                    outcome.clone()
                }
                Err(e) if IRRECOVERABLE_CODES.contains(&e.code.as_str()) => {
                    state.current = None;
                    outcome.clone()
                }
                // Static stability: a failed refetch does not take away credentials that still work.
                Err(e) => match state.current.as_ref() {
                    Some(c) if c.creds.remaining(SystemTime::now()) > MIN_SERVABLE_LIFETIME => {
                        tracing::warn!(key = %described, code = %e.code, "serving cached credentials through an upstream failure");
                        Ok(c.creds.clone())
                    }
                    _ => outcome.clone(),
                },
            }
        };
        if outcome.is_ok() {
            // Re-insert so moka recomputes the entry's lifetime from the new credentials.
            self.entries.insert(key, slot).await;
        }
        let _ = tx.send(Some(served));
        self.metrics
            .cache_entries
            .set(self.entries.entry_count() as i64);
    }

    /// How long freshly fetched credentials are served: at most the retention, and never
    /// into the last [`EXPIRY_MARGIN`] (or half the lifetime, for short-lived credentials).
    fn fresh_for(&self, remaining: Duration) -> Duration {
        let margin = EXPIRY_MARGIN.min(remaining / 2);
        self.max_retention.min(remaining.saturating_sub(margin))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::token::{Token, VerifiedClaims};
    use crate::upstream::{FetchFuture, Secret};

    struct FakeBackend {
        calls: AtomicUsize,
        latency: Duration,
        lifetime: Duration,
        fail: Mutex<Option<UpstreamError>>,
    }

    impl FakeBackend {
        fn new(latency: Duration) -> Arc<FakeBackend> {
            Arc::new(FakeBackend {
                calls: 0.into(),
                latency,
                lifetime: Duration::from_secs(3600),
                fail: Mutex::new(None),
            })
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
        fn fail_with(&self, e: Option<UpstreamError>) {
            *self.fail.lock().unwrap() = e;
        }
    }

    impl Backend for FakeBackend {
        fn fetch<'a>(&'a self, _identity: &'a Identity) -> FetchFuture<'a> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(self.latency).await;
                if let Some(e) = self.fail.lock().unwrap().clone() {
                    return Err(e);
                }
                Ok(Credentials {
                    access_key_id: format!("ASIA{n}"),
                    secret_access_key: Secret::new("s"),
                    session_token: Secret::new("t"),
                    account_id: "111122223333".into(),
                    expiration: SystemTime::now() + self.lifetime,
                })
            })
        }
    }

    fn identity(token: &str, sa: &str, uid: Option<&str>) -> Identity {
        Identity {
            token: Token::new(token),
            verified: Some(VerifiedClaims {
                namespace: "ns".into(),
                service_account: sa.into(),
                pod_name: uid.map(|u| format!("pod-{u}")),
                pod_uid: uid.map(Into::into),
            }),
            expires_at: None,
        }
    }

    fn cache(backend: Arc<FakeBackend>, scope: CacheScope) -> Arc<CredentialCache> {
        CredentialCache::new(
            backend,
            scope,
            100,
            Duration::from_secs(3 * 3600),
            Metrics::new(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_misses_make_one_call() {
        let backend = FakeBackend::new(Duration::from_millis(200));
        let cache = cache(backend.clone(), CacheScope::Pod);
        let id = identity("t1", "sa", Some("u1"));
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let (cache, id) = (cache.clone(), id.clone());
                tokio::spawn(async move { cache.get(&id).await.unwrap().access_key_id.clone() })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), "ASIA1");
        }
        assert_eq!(backend.calls(), 1);
        assert_eq!(cache.metrics.cache_misses.get(), 1);
        assert_eq!(
            cache.metrics.cache_coalesced.get() + cache.metrics.cache_hits.get(),
            199
        );
    }

    #[tokio::test(start_paused = true)]
    async fn rotated_token_of_same_pod_is_a_hit_and_pods_are_isolated() {
        let backend = FakeBackend::new(Duration::from_millis(10));
        let cache = cache(backend.clone(), CacheScope::Pod);
        let a = cache.get(&identity("old", "sa", Some("u1"))).await.unwrap();
        let b = cache
            .get(&identity("rotated", "sa", Some("u1")))
            .await
            .unwrap();
        assert_eq!(a.access_key_id, b.access_key_id);
        assert_eq!(backend.calls(), 1);
        let other = cache
            .get(&identity("other", "sa", Some("u2")))
            .await
            .unwrap();
        assert_ne!(other.access_key_id, a.access_key_id);
        assert_eq!(backend.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn association_scope_shares_per_service_account() {
        let backend = FakeBackend::new(Duration::from_millis(10));
        let cache = cache(backend.clone(), CacheScope::Association);
        let a = cache.get(&identity("a", "sa", Some("u1"))).await.unwrap();
        let b = cache.get(&identity("b", "sa", Some("u2"))).await.unwrap();
        assert_eq!(a.access_key_id, b.access_key_id);
        cache
            .get(&identity("c", "other-sa", Some("u3")))
            .await
            .unwrap();
        assert_eq!(backend.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn unverified_tokens_key_by_digest() {
        let backend = FakeBackend::new(Duration::from_millis(10));
        let cache = cache(backend.clone(), CacheScope::Pod);
        let mut a = identity("a", "sa", Some("u1"));
        let mut b = identity("b", "sa", Some("u1"));
        a.verified = None;
        b.verified = None;
        cache.get(&a).await.unwrap();
        cache.get(&b).await.unwrap();
        cache.get(&a).await.unwrap();
        assert_eq!(backend.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_gives_up_does_not_cancel_the_fetch() {
        let backend = FakeBackend::new(Duration::from_secs(1));
        let cache = cache(backend.clone(), CacheScope::Pod);
        let id = identity("t", "sa", Some("u1"));
        let gave_up = tokio::time::timeout(Duration::from_millis(100), cache.get(&id)).await;
        assert!(gave_up.is_err());
        tokio::time::sleep(Duration::from_secs(2)).await;
        cache.get(&id).await.unwrap();
        assert_eq!(backend.calls(), 1);
        assert_eq!(cache.metrics.cache_hits.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn errors_are_shared_but_not_cached() {
        let backend = FakeBackend::new(Duration::from_millis(50));
        backend.fail_with(Some(UpstreamError::new(
            FailureKind::Server { status: 500 },
            "InternalServerException",
            "boom",
        )));
        let cache = cache(backend.clone(), CacheScope::Pod);
        let id = identity("t", "sa", Some("u1"));
        let (a, b) = tokio::join!(cache.get(&id), cache.get(&id));
        assert!(
            matches!(a, Err(CacheError::Upstream(_))) && matches!(b, Err(CacheError::Upstream(_)))
        );
        assert_eq!(backend.calls(), 1);
        backend.fail_with(None);
        cache.get(&id).await.unwrap();
        assert_eq!(backend.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn entries_go_stale_before_credentials_expire() {
        let backend = FakeBackend::new(Duration::from_millis(10));
        let cache = cache(backend.clone(), CacheScope::Pod);
        let id = identity("t", "sa", Some("u1"));
        cache.get(&id).await.unwrap();
        // 1 h credentials: fresh for 45 min (15 min margin), then fetched again.
        tokio::time::advance(Duration::from_secs(44 * 60)).await;
        cache.get(&id).await.unwrap();
        assert_eq!(backend.calls(), 1);
        tokio::time::advance(Duration::from_secs(2 * 60)).await;
        cache.get(&id).await.unwrap();
        assert_eq!(backend.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn still_valid_credentials_survive_a_failed_refetch_but_not_a_revocation() {
        let backend = FakeBackend::new(Duration::from_millis(10));
        let cache = cache(backend.clone(), CacheScope::Pod);
        let id = identity("t", "sa", Some("u1"));
        let first = cache.get(&id).await.unwrap();
        tokio::time::advance(Duration::from_secs(46 * 60)).await;
        backend.fail_with(Some(UpstreamError::new(
            FailureKind::Timeout,
            "UpstreamTimeout",
            "slow",
        )));
        assert_eq!(
            cache.get(&id).await.unwrap().access_key_id,
            first.access_key_id
        );
        backend.fail_with(Some(UpstreamError::new(
            FailureKind::Rejected { status: 404 },
            "ResourceNotFoundException",
            "gone",
        )));
        assert!(cache.get(&id).await.is_err());
        backend.fail_with(Some(UpstreamError::new(
            FailureKind::Timeout,
            "UpstreamTimeout",
            "slow",
        )));
        assert!(
            cache.get(&id).await.is_err(),
            "revoked credentials are not served again"
        );
    }

    #[test]
    fn freshness_leaves_a_margin() {
        let c = cache(FakeBackend::new(Duration::ZERO), CacheScope::Pod);
        assert_eq!(
            c.fresh_for(Duration::from_secs(3600)),
            Duration::from_secs(45 * 60)
        );
        assert_eq!(
            c.fresh_for(Duration::from_secs(12 * 3600)),
            Duration::from_secs(3 * 3600)
        );
        assert_eq!(
            c.fresh_for(Duration::from_secs(60)),
            Duration::from_secs(30)
        );
    }
}
