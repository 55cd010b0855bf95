//! The credential cache: one upstream call per key, however many requests arrive, and
//! credentials that outlive their upstream.
//!
//! Each key maps to a [`Slot`] in a size-bounded moka cache. A slot holds the last good
//! credentials, the newest token seen for the key, and, while a fetch runs, the receiving end
//! of a watch channel every concurrent request for that key waits on. Fetches are spawned
//! tasks, so a client that hangs up does not cancel one.
//!
//! Lifecycle of an entry (all times on tokio's clock, so tests pause and advance it):
//! - fetched: served as fresh until `fresh_until` = expiry minus [`EXPIRY_MARGIN`] (or half
//!   the lifetime, for short credentials), so no SDK ever gets credentials it would consider
//!   due for refresh;
//! - refresh point: the earlier of `fetched + --max-credential-retention-before-renewal` and
//!   `fresh_until`, minus random jitter. If a client asked since the last fetch, a background
//!   refresh runs, paced by the [`RefreshBudget`]; if not, the entry is idle and dropped;
//! - refresh fails: recoverable failures (5xx, timeout, unreachable, throttling) keep the old
//!   credentials, served until they expire, with retries on a capped exponential backoff;
//!   irrecoverable ones (association deleted, access denied, token invalid or expired) drop
//!   the entry at once.
//!
//! Keys come only from verified claims (namespace, service account, pod UID) or, when tokens
//! are not verified locally, from the token's SHA-256 digest, so no token can reach another
//! pod's entry.

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use moka::notification::RemovalCause;
use moka::Expiry;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use crate::config::CacheScope;
use crate::defence::{self, Defence};
use crate::limits::RefreshBudget;
use crate::metrics::Metrics;
use crate::token::Identity;
use crate::upstream::{Backend, Credentials, FailureKind, UpstreamError};

/// Credentials are served as fresh only while more than this is left: botocore starts
/// refreshing 15 minutes before expiry, so anything shorter would make every boto3 call come
/// back to the agent.
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(15 * 60);
/// Credentials this close to expiry are not handed out at all (the SDKs' own refresh buffers
/// are at least 10 s).
pub const MIN_SERVABLE_LIFETIME: Duration = Duration::from_secs(15);
/// How long a request waits for a fetch: the upstream call is bounded at 4.5 s, and the
/// contract promises an answer within 5 s.
pub const WAIT_DEADLINE: Duration = Duration::from_millis(4800);
/// With still-valid (stale) credentials in hand, a request waits this long for a refetch
/// before taking them: JS SDKs give up on us after 1 s.
pub const STALE_WAIT: Duration = Duration::from_millis(500);
/// A request-path fetch waits at most this long for an upstream slot, then the client gets
/// 503 with `Retry-After` well inside the SDKs' 1 s (JS) and 2 s (botocore) attempt budgets.
pub const UPSTREAM_QUEUE_WAIT: Duration = Duration::from_millis(500);
/// A slot without credentials (its first fetch failed) is dropped after this.
const EMPTY_SLOT_TTL: Duration = Duration::from_secs(30);
/// Refresh jitter: up to a tenth of the time to the refresh point, at most this.
const MAX_REFRESH_JITTER: Duration = Duration::from_secs(5 * 60);
/// Retry backoff after a failed refresh: doubles from the base up to the cap, with jitter.
const RETRY_BASE: Duration = Duration::from_secs(2);
const RETRY_CAP: Duration = Duration::from_secs(60);

/// Upstream errors after which an entry's credentials must not be served again: the
/// association or the pod's right to it is gone. EKS Auth's codes, then STS's, then the STS
/// backend's own.
const IRRECOVERABLE_CODES: [&str; 9] = [
    "AccessDeniedException",
    "ResourceNotFoundException",
    "InvalidTokenException",
    "ExpiredTokenException",
    "AccessDenied",
    "InvalidIdentityToken",
    "IDPRejectedClaim",
    // The STS backend's own refusals (its associations file), met by a background refresh.
    "NoAssociation",
    "AudienceNotAccepted",
];

/// The irrecoverable errors that are about the association, not the token presented: any
/// token of the key would get the same answer, so the answer is remembered for
/// [`REFUSAL_TTL`] instead of asking again for every request.
const ASSOCIATION_REFUSAL_CODES: [&str; 3] = [
    "AccessDeniedException",
    "ResourceNotFoundException",
    "AccessDenied",
];

/// How long a refusal about the association is answered from the cache. A pod without an
/// association that keeps asking (SDKs retry, applications poll) would otherwise cost one
/// upstream call per request and could spend the node's EKS Auth quota for every pod; an
/// association created meanwhile is seen at most this much later.
pub const REFUSAL_TTL: Duration = Duration::from_secs(5);

fn is_irrecoverable(e: &UpstreamError) -> bool {
    IRRECOVERABLE_CODES.contains(&e.code.as_str())
}

/// A uniformly random fraction in [0, 1).
fn random_fraction() -> f64 {
    let mut b = [0u8; 8];
    // The system RNG does not fail on Linux; zero jitter would still be correct, only less spread.
    let _ = aws_lc_rs::rand::fill(&mut b);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// Capped exponential backoff with jitter in [d/2, d] for the `failures`-th failure.
pub fn retry_delay(failures: u32) -> Duration {
    let exp = RETRY_BASE.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let d = exp.min(RETRY_CAP);
    d.mul_f64(0.5 + random_fraction() / 2.0)
}

/// The end of the fresh period of credentials fetched at `fetched_at` with `lifetime` left:
/// expiry minus [`EXPIRY_MARGIN`], or minus half the lifetime for short credentials.
pub(crate) fn fresh_until(fetched_at: Instant, lifetime: Duration) -> Instant {
    let margin = EXPIRY_MARGIN.min(lifetime / 2);
    fetched_at + lifetime.saturating_sub(margin)
}

/// When to refresh: the earlier of the retention limit and `fresh_until`, minus jitter (a
/// fraction in [0, 1) of a window) so entries filled together do not refresh together.
pub(crate) fn refresh_point(
    fetched_at: Instant,
    fresh_until: Instant,
    max_retention: Duration,
    jitter: f64,
) -> Instant {
    let point = (fetched_at + max_retention).min(fresh_until);
    let window = MAX_REFRESH_JITTER.min(point.saturating_duration_since(fetched_at) / 10);
    point - window.mul_f64(jitter.clamp(0.0, 1.0))
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Request,
    Refresh,
}

struct Cached {
    creds: Arc<Credentials>,
    fetched_at: Instant,
    expires_at: Instant,
    fresh_until: Instant,
}

impl Cached {
    fn servable(&self, now: Instant) -> bool {
        now + MIN_SERVABLE_LIFETIME < self.expires_at
    }
}

struct SlotState {
    current: Option<Cached>,
    inflight: Option<watch::Receiver<Option<FetchOutcome>>>,
    /// The newest token seen for this key: what a background refresh presents.
    identity: Option<Identity>,
    last_access: Instant,
    /// Bumped whenever a fetch completes, so a superseded refresh timer does nothing.
    generation: u64,
    failures: u32,
    /// After a failed refresh: no request-path upstream call before this.
    retry_at: Option<Instant>,
    /// A background refresh is waiting for budget or running.
    refreshing: bool,
    /// The upstream's last refusal of the association, answered until the instant.
    refused: Option<(UpstreamError, Instant)>,
}

impl SlotState {
    fn remember(&mut self, identity: &Identity) {
        // Cheap on the hit path: the same token again (the common case) is not cloned.
        let newer = match &self.identity {
            None => true,
            Some(old) => identity.expires_at > old.expires_at,
        };
        if newer {
            self.identity = Some(identity.clone());
        }
    }
}

/// One cache entry.
pub struct Slot {
    state: Mutex<SlotState>,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            state: Mutex::new(SlotState {
                current: None,
                inflight: None,
                identity: None,
                last_access: Instant::now(),
                generation: 0,
                failures: 0,
                retry_at: None,
                refreshing: false,
                refused: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        // A poisoned lock only means a panic elsewhere mid-update; the state is still a
        // valid (if possibly stale) value, so keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long moka keeps the slot: until its credentials are no longer servable.
    fn time_to_live(&self) -> Duration {
        match &self.lock().current {
            Some(c) => c
                .expires_at
                .saturating_duration_since(Instant::now() + MIN_SERVABLE_LIFETIME),
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

/// Cache settings from the configuration.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub scope: CacheScope,
    pub max_entries: u64,
    pub max_retention: Duration,
    pub max_service_qps: f64,
    pub max_upstream_concurrency: usize,
}

pub struct CredentialCache {
    entries: moka::future::Cache<CacheKey, Arc<Slot>>,
    backend: Arc<dyn Backend>,
    settings: CacheSettings,
    metrics: Metrics,
    budget: RefreshBudget,
    upstream: Arc<Semaphore>,
    /// Keys whose revocation was logged recently: logged once, not once per request.
    revocations_logged: moka::future::Cache<CacheKey, ()>,
    this: Weak<CredentialCache>,
}

/// How often an irrecoverable error of one key is logged at warn.
const REVOCATION_LOG_INTERVAL: Duration = Duration::from_secs(600);

impl CredentialCache {
    pub fn new(
        backend: Arc<dyn Backend>,
        settings: CacheSettings,
        metrics: Metrics,
    ) -> Arc<CredentialCache> {
        let evictions = metrics.clone();
        let entries = moka::future::Cache::builder()
            .max_capacity(settings.max_entries)
            .expire_after(SlotExpiry)
            .eviction_listener(move |_key, _slot, cause| match cause {
                RemovalCause::Expired => evictions.eviction("expired"),
                RemovalCause::Size => evictions.eviction("size"),
                // Explicit removals are counted with their reason where they happen.
                RemovalCause::Explicit | RemovalCause::Replaced => {}
            })
            .build();
        let revocations_logged = moka::future::Cache::builder()
            .max_capacity(settings.max_entries)
            .time_to_live(REVOCATION_LOG_INTERVAL)
            .build();
        metrics.refresh_budget.set(settings.max_service_qps);
        Arc::new_cyclic(|this| CredentialCache {
            entries,
            backend,
            budget: RefreshBudget::new(settings.max_service_qps),
            upstream: Arc::new(Semaphore::new(settings.max_upstream_concurrency.max(1))),
            settings,
            metrics,
            revocations_logged,
            this: this.clone(),
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
        // Before the cache: what the backend would refuse (the STS backend: no association
        // for this service account, as of the file's last reload) is never served from it,
        // so removing an association stops a pod's cached credentials at once.
        if defence::on(Defence::AssociationAdmission) {
            self.backend.admit(identity)?;
        }
        let key = CacheKey::for_identity(identity, self.settings.scope);
        let slot = self
            .entries
            .get_with(key.clone(), async { Arc::new(Slot::new()) })
            .await;
        let now = Instant::now();
        let (mut rx, stale) = {
            let mut state = slot.lock();
            state.last_access = now;
            state.remember(identity);
            let stale = match &state.current {
                Some(c) if now < c.fresh_until => {
                    self.metrics.cache_hits.inc();
                    tracing::debug!(key = %key.describe(), "cache hit");
                    return Ok(c.creds.clone());
                }
                Some(c) if c.servable(now) => Some(c.creds.clone()),
                _ => None,
            };
            if let (None, Some((refusal, until))) = (&stale, &state.refused) {
                if now < *until {
                    tracing::debug!(key = %key.describe(), code = %refusal.code, "refusal answered from the cache");
                    return Err(CacheError::Upstream(refusal.clone()));
                }
            }
            // While refreshes are failing, requests do not add upstream calls: they get the
            // credentials that still work, and the retry schedule does the calling.
            if let (Some(creds), Some(retry_at)) = (&stale, state.retry_at) {
                if now < retry_at {
                    self.metrics.stale_serves.inc();
                    return Ok(creds.clone());
                }
            }
            let rx = match &state.inflight {
                Some(rx) => {
                    self.metrics.cache_coalesced.inc();
                    rx.clone()
                }
                None => {
                    self.metrics.cache_misses.inc();
                    let (tx, rx) = watch::channel(None);
                    state.inflight = Some(rx.clone());
                    tokio::spawn(self.clone().run_fetch(
                        key,
                        slot.clone(),
                        identity.clone(),
                        tx,
                        Origin::Request,
                    ));
                    rx
                }
            };
            (rx, stale)
        };
        let deadline = if stale.is_some() {
            STALE_WAIT
        } else {
            WAIT_DEADLINE
        };
        let outcome = match tokio::time::timeout(deadline, rx.wait_for(Option::is_some)).await {
            Ok(Ok(value)) => value.clone(),
            Ok(Err(_)) => return Err(CacheError::Internal),
            Err(_) => match stale {
                Some(creds) => {
                    self.metrics.stale_serves.inc();
                    return Ok(creds);
                }
                None => return Err(CacheError::Timeout),
            },
        };
        match outcome {
            Some(result) => result.map_err(CacheError::Upstream),
            None => Err(CacheError::Internal),
        }
    }

    /// One upstream call for `key`; its result goes to every waiter and, if good, into the slot.
    async fn run_fetch(
        self: Arc<Self>,
        key: CacheKey,
        slot: Arc<Slot>,
        identity: Identity,
        tx: watch::Sender<Option<FetchOutcome>>,
        origin: Origin,
    ) {
        // Request-path fetches wait a bounded time for an upstream slot; refreshes wait their turn.
        let permit = match origin {
            Origin::Request => {
                tokio::time::timeout(UPSTREAM_QUEUE_WAIT, self.upstream.clone().acquire_owned())
                    .await
                    .ok()
            }
            Origin::Refresh => Some(self.upstream.clone().acquire_owned().await),
        };
        let Some(Ok(permit)) = permit else {
            self.metrics.upstream_busy.inc();
            let busy = UpstreamError::new(
                FailureKind::Busy,
                "UpstreamBusy",
                "too many credential fetches in flight; retry shortly",
            );
            self.complete(key, slot, Err(busy), tx, origin).await;
            return;
        };
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
        drop(permit);
        let elapsed = started.elapsed();
        self.metrics.upstream_call(
            match &result {
                Ok(_) => "success",
                Err(e) => e.kind.label(),
            },
            elapsed.as_secs_f64(),
        );
        let origin_label = match origin {
            Origin::Request => "request",
            Origin::Refresh => "refresh",
        };
        match &result {
            Ok(creds) => {
                tracing::info!(key = %key.describe(), origin = origin_label, access_key_id = %creds.access_key_id,
                expires_in_s = creds.remaining(SystemTime::now()).as_secs(), elapsed_ms = elapsed.as_millis() as u64,
                "fetched credentials")
            }
            Err(e) if is_irrecoverable(e) => {
                let first = !self.revocations_logged.contains_key(&key);
                if first {
                    self.revocations_logged.insert(key.clone(), ()).await;
                    tracing::warn!(key = %key.describe(), origin = origin_label, code = %e.code, upstream_message = %e.message,
                        "upstream refused credentials for this key; dropping its cached credentials");
                } else {
                    tracing::debug!(key = %key.describe(), code = %e.code, "upstream refused credentials again");
                }
            }
            Err(e) => {
                tracing::warn!(key = %key.describe(), origin = origin_label, code = %e.code, kind = e.kind.label(),
                upstream_message = %e.message, elapsed_ms = elapsed.as_millis() as u64, "upstream call failed")
            }
        }
        self.complete(key, slot, result.map(Arc::new), tx, origin)
            .await;
    }

    /// Record a fetch's result in the slot, tell the waiters, and schedule what comes next.
    async fn complete(
        self: Arc<Self>,
        key: CacheKey,
        slot: Arc<Slot>,
        result: FetchOutcome,
        tx: watch::Sender<Option<FetchOutcome>>,
        origin: Origin,
    ) {
        let now = Instant::now();
        let throttled = matches!(&result, Err(e) if e.kind == FailureKind::Throttled);
        let (served, next, outcome) = {
            let mut state = slot.lock();
            state.inflight = None;
            state.refreshing = false;
            state.generation += 1;
            let generation = state.generation;
            match result {
                Ok(creds) => {
                    let cached = self.cache_entry(creds.clone(), now);
                    let at = self.refresh_at(&cached);
                    state.current = Some(cached);
                    state.failures = 0;
                    state.retry_at = None;
                    state.refused = None;
                    (Ok(creds), Some((at, generation)), "success")
                }
                Err(e) if is_irrecoverable(&e) => {
                    let had_credentials = state.current.take().is_some();
                    if ASSOCIATION_REFUSAL_CODES.contains(&e.code.as_str())
                        && defence::on(Defence::RefusalCache)
                    {
                        state.refused = Some((e.clone(), now + REFUSAL_TTL));
                    }
                    (
                        Err(e),
                        None,
                        if had_credentials {
                            "revoked"
                        } else {
                            "refused"
                        },
                    )
                }
                Err(e) => match state
                    .current
                    .as_ref()
                    .filter(|c| c.servable(now))
                    .map(|c| c.creds.clone())
                {
                    // Static stability: a failed refetch does not take away credentials that
                    // still work; retry on a backoff while clients still want them.
                    Some(creds) => {
                        state.failures += 1;
                        let at = now + retry_delay(state.failures);
                        state.retry_at = Some(at);
                        self.metrics.stale_serves.inc();
                        tracing::debug!(code = %e.code, failures = state.failures, "keeping cached credentials");
                        (Ok(creds), Some((at, generation)), "failed_kept")
                    }
                    None => (Err(e), None, "failed"),
                },
            }
        };
        let _ = tx.send(Some(served));
        if origin == Origin::Refresh {
            self.metrics.refresh(outcome);
        }
        // Any call the upstream answered with credentials, on the request path or in the
        // background, says it has room again: otherwise a budget throttled down while clients
        // do the refetching would stay at its floor for good.
        if outcome == "success" {
            self.metrics.refresh_budget.set(self.budget.on_success());
        }
        if throttled {
            self.metrics.refresh_budget.set(self.budget.on_throttled());
        }
        if outcome == "revoked" {
            // The credentials were dropped above; count that even if moka has already expired
            // the entry.
            self.metrics.eviction("revoked");
        }
        if outcome == "revoked" || outcome == "refused" {
            let remembered = slot.lock().refused.is_some();
            if remembered {
                // Keep the (now empty) slot while it answers the refusal; moka drops it after
                // its empty-slot lifetime.
                self.entries.insert(key.clone(), slot.clone()).await;
            } else {
                // Nothing to keep; drop the slot without counting an eviction.
                self.remove(&key, &slot, None).await;
            }
        } else if let Some((at, generation)) = next {
            // Re-insert so moka recomputes the entry's lifetime from the new credentials.
            self.entries.insert(key.clone(), slot.clone()).await;
            self.schedule(key, &slot, at, generation);
        }
        self.metrics
            .cache_entries
            .set(self.entries.entry_count() as i64);
    }

    fn cache_entry(&self, creds: Arc<Credentials>, now: Instant) -> Cached {
        let lifetime = creds.remaining(SystemTime::now());
        Cached {
            creds,
            fetched_at: now,
            expires_at: now + lifetime,
            fresh_until: fresh_until(now, lifetime),
        }
    }

    fn refresh_at(&self, cached: &Cached) -> Instant {
        refresh_point(
            cached.fetched_at,
            cached.fresh_until,
            self.settings.max_retention,
            random_fraction(),
        )
    }

    fn schedule(&self, key: CacheKey, slot: &Arc<Slot>, at: Instant, generation: u64) {
        let cache = self.this.clone();
        let slot = Arc::downgrade(slot);
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            if let (Some(cache), Some(slot)) = (cache.upgrade(), slot.upgrade()) {
                // Boxed so the task that sleeps for most of an entry's life stays small: the
                // refresh's state (a few KiB) is allocated only when it runs.
                Box::pin(cache.refresh(key, slot, generation)).await;
            }
        });
    }

    /// Background refresh of one entry, if a client still wants it.
    async fn refresh(self: Arc<Self>, key: CacheKey, slot: Arc<Slot>, generation: u64) {
        enum Decision {
            Refresh(Identity),
            Drop(&'static str),
            Nothing,
        }
        let now = Instant::now();
        let decision = {
            let mut state = slot.lock();
            match &state.current {
                _ if state.generation != generation || state.inflight.is_some() => {
                    Decision::Nothing
                }
                None => Decision::Nothing,
                // Nobody asked since the last fetch: the pod is likely gone; stop here.
                Some(current) if state.last_access < current.fetched_at => Decision::Drop("idle"),
                Some(_) => match state.identity.clone() {
                    Some(id) if id.expires_at.is_none_or(|exp| exp > SystemTime::now()) => {
                        state.refreshing = true;
                        Decision::Refresh(id)
                    }
                    _ => Decision::Drop("token_expired"),
                },
            }
        };
        let identity = match decision {
            Decision::Refresh(identity) => identity,
            Decision::Drop(reason) => {
                tracing::debug!(key = %key.describe(), reason, "entry dropped at its refresh point");
                self.remove(&key, &slot, Some(reason)).await;
                return;
            }
            Decision::Nothing => return,
        };
        // Wait for budget at most until the credentials stop being fresh: from then on the
        // next request refetches anyway, and a refresh still queued would only hold memory
        // (an upstream that throttles for long would otherwise grow the queue without end).
        let fresh_until = slot.lock().current.as_ref().map(|c| c.fresh_until);
        let waited = match fresh_until {
            Some(until) => tokio::time::timeout_at(until, self.budget.acquire())
                .await
                .is_ok(),
            None => false,
        };
        if !waited {
            slot.lock().refreshing = false;
            self.metrics.refresh("skipped");
            tracing::debug!(key = %key.describe(), "no refresh budget before the credentials went stale; the next request refetches");
            return;
        }
        let tx = {
            let mut state = slot.lock();
            if state.generation != generation || state.inflight.is_some() {
                state.refreshing = false;
                return;
            }
            let (tx, rx) = watch::channel(None);
            state.inflight = Some(rx);
            tx
        };
        tracing::debug!(key = %key.describe(), waited_ms = now.elapsed().as_millis() as u64, "refreshing");
        self.run_fetch(key, slot, identity, tx, Origin::Refresh)
            .await;
    }

    /// Remove `key` if it still maps to `slot` (a newer slot for the key is left alone).
    async fn remove(&self, key: &CacheKey, slot: &Arc<Slot>, reason: Option<&'static str>) {
        if let Some(current) = self.entries.get(key).await {
            if Arc::ptr_eq(&current, slot) {
                self.entries.invalidate(key).await;
                if let Some(reason) = reason {
                    self.metrics.eviction(reason);
                }
            }
        }
    }

    /// Update the gauges that describe the whole cache (called at scrape time).
    pub fn observe(&self) {
        let now = Instant::now();
        let (mut fresh, mut refreshing, mut stale) = (0i64, 0i64, 0i64);
        let mut min_left: Option<Duration> = None;
        for (_key, slot) in self.entries.iter() {
            let state = slot.lock();
            let Some(c) = &state.current else { continue };
            if state.refreshing || state.inflight.is_some() {
                refreshing += 1;
            } else if now < c.fresh_until {
                fresh += 1;
            } else {
                stale += 1;
            }
            let left = c.expires_at.saturating_duration_since(now);
            min_left = Some(min_left.map_or(left, |m| m.min(left)));
        }
        self.metrics.set_entries_by_state(fresh, refreshing, stale);
        self.metrics
            .cache_entries
            .set(self.entries.entry_count() as i64);
        self.metrics
            .min_credential_lifetime
            .set(min_left.map_or(f64::NAN, |d| d.as_secs_f64()));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::token::{Token, VerifiedClaims};
    use crate::upstream::{FetchFuture, Secret};

    const HOUR: Duration = Duration::from_secs(3600);
    const MINUTE: Duration = Duration::from_secs(60);

    struct FakeBackend {
        calls: AtomicUsize,
        call_times: Mutex<Vec<Instant>>,
        latency: Duration,
        lifetime: Duration,
        fail: Mutex<Option<UpstreamError>>,
    }

    impl FakeBackend {
        fn new(latency: Duration) -> Arc<FakeBackend> {
            Arc::new(FakeBackend {
                calls: 0.into(),
                call_times: Mutex::new(Vec::new()),
                latency,
                lifetime: HOUR,
                fail: Mutex::new(None),
            })
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
        fn call_times(&self) -> Vec<Instant> {
            self.call_times.lock().unwrap().clone()
        }
        fn fail_with(&self, e: Option<UpstreamError>) {
            *self.fail.lock().unwrap() = e;
        }
    }

    impl Backend for FakeBackend {
        fn fetch<'a>(&'a self, _identity: &'a Identity) -> FetchFuture<'a> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
                self.call_times.lock().unwrap().push(Instant::now());
                tokio::time::sleep(self.latency).await;
                if let Some(e) = self.fail.lock().unwrap().clone() {
                    return Err(e);
                }
                // The wall clock does not move under a paused tokio clock, so "now + lifetime"
                // is the lifetime as of the fetch, which is what the cache measures.
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
                audiences: vec!["pods.eks.amazonaws.com".into()],
            }),
            expires_at: Some(SystemTime::now() + 24 * HOUR),
        }
    }

    fn settings(scope: CacheScope) -> CacheSettings {
        CacheSettings {
            scope,
            max_entries: 10_000,
            max_retention: 3 * HOUR,
            max_service_qps: 3.0,
            max_upstream_concurrency: 32,
        }
    }

    fn cache(backend: Arc<FakeBackend>, scope: CacheScope) -> Arc<CredentialCache> {
        CredentialCache::new(backend, settings(scope), Metrics::new())
    }

    /// Fetch, then ask again a minute later: the entry is in use, so it will be refreshed.
    async fn in_use(cache: &Arc<CredentialCache>, id: &Identity) -> Arc<Credentials> {
        let creds = cache.get(id).await.unwrap();
        tokio::time::sleep(MINUTE).await;
        cache.get(id).await.unwrap();
        creds
    }

    fn server_error() -> UpstreamError {
        UpstreamError::new(
            FailureKind::Server { status: 500 },
            "InternalServerException",
            "boom",
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
        backend.fail_with(Some(server_error()));
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

    /// A client polling every minute for six hours: every answer has more than the margin
    /// left, and after the first miss every fetch happens in the background.
    #[tokio::test(start_paused = true)]
    async fn refreshes_ahead_so_clients_never_get_credentials_inside_the_margin() {
        let backend = FakeBackend::new(Duration::from_millis(50));
        let cache = cache(backend.clone(), CacheScope::Pod);
        let id = identity("t", "sa", Some("u1"));
        for _ in 0..(6 * 60) {
            let creds = cache.get(&id).await.unwrap();
            let n: usize = creds
                .access_key_id
                .trim_start_matches("ASIA")
                .parse()
                .unwrap();
            let fetched = backend.call_times()[n - 1];
            let left = (fetched + HOUR).saturating_duration_since(Instant::now());
            assert!(
                left > EXPIRY_MARGIN,
                "served {} with {left:?} left",
                creds.access_key_id
            );
            tokio::time::sleep(MINUTE).await;
        }
        assert_eq!(
            cache.metrics.cache_misses.get(),
            1,
            "refreshes ran in the background"
        );
        // 1 h credentials are refreshed every 40.5 to 45 minutes.
        let calls = backend.calls();
        assert!((8..=10).contains(&calls), "{calls} calls in 6 h");
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_spreads_refreshes_and_never_passes_the_refresh_point() {
        let backend = FakeBackend::new(Duration::ZERO);
        let cache = cache(backend.clone(), CacheScope::Pod);
        let start = Instant::now();
        let ids: Vec<Identity> = (0..50)
            .map(|i| identity(&format!("t{i}"), "sa", Some(&format!("u{i}"))))
            .collect();
        for id in &ids {
            cache.get(id).await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        for id in &ids {
            cache.get(id).await.unwrap();
        }
        tokio::time::sleep(46 * MINUTE).await;
        let refreshes: Vec<Duration> = backend.call_times()[50..]
            .iter()
            .map(|t| t.duration_since(start))
            .collect();
        assert_eq!(refreshes.len(), 50);
        for r in &refreshes {
            // Refresh point 45 min; jitter window 4.5 min; the budget (3/s) adds at most ~17 s.
            assert!(
                *r >= 40 * MINUTE + Duration::from_secs(30)
                    && *r <= 45 * MINUTE + Duration::from_secs(20),
                "{r:?}"
            );
        }
        let mut secs: Vec<u64> = refreshes.iter().map(|d| d.as_secs()).collect();
        secs.sort();
        secs.dedup();
        assert!(secs.len() > 25, "refreshes bunched together: {secs:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_entries_are_dropped_at_their_refresh_point() {
        let backend = FakeBackend::new(Duration::from_millis(10));
        let cache = cache(backend.clone(), CacheScope::Pod);
        cache.get(&identity("t", "sa", Some("gone"))).await.unwrap();
        let busy = identity("b", "sa", Some("busy"));
        cache.get(&busy).await.unwrap();
        for _ in 0..3 {
            tokio::time::sleep(20 * MINUTE).await;
            cache.get(&busy).await.unwrap();
        }
        tokio::time::sleep(2 * HOUR).await;
        cache.entries.run_pending_tasks().await;
        // The pod nobody asked for: one call and gone. The busy pod (asked at 0, 20, 40 and
        // 60 min): fetched, refreshed at ~43 min and ~86 min because it was asked for in
        // between, then dropped at the next refresh point with nobody asking.
        assert_eq!(backend.calls(), 4);
        assert_eq!(cache.entry_count(), 0);
        let text = cache.metrics.encode();
        assert!(
            text.contains("pod_identity_agent_cache_evictions_total{reason=\"idle\"} 2"),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failed_refreshes_keep_credentials_and_back_off() {
        let backend = FakeBackend::new(Duration::from_millis(10));
        let cache = cache(backend.clone(), CacheScope::Pod);
        let id = identity("t", "sa", Some("u1"));
        let first = in_use(&cache, &id).await;
        backend.fail_with(Some(server_error()));
        tokio::time::sleep(39 * MINUTE).await;
        // Poll every 10 s through the outage: always the old credentials, always at once.
        for _ in 0..(14 * 6) {
            tokio::time::sleep(Duration::from_secs(10)).await;
            let before = Instant::now();
            let creds = cache.get(&id).await.unwrap();
            assert_eq!(creds.access_key_id, first.access_key_id);
            assert!(before.elapsed() <= STALE_WAIT);
        }
        assert!(cache.metrics.stale_serves.get() > 0);
        let times = backend.call_times();
        let gaps: Vec<Duration> = times.windows(2).skip(1).map(|w| w[1] - w[0]).collect();
        assert!(gaps.len() >= 5, "{gaps:?}");
        for (i, gap) in gaps.iter().enumerate() {
            let cap = RETRY_BASE.saturating_mul(1 << i.min(16)).min(RETRY_CAP);
            // [d/2, d] jitter plus up to 10 s for the next poll and the budget.
            assert!(
                *gap >= cap / 2 && *gap <= cap + Duration::from_secs(11),
                "gap {i}: {gap:?} (cap {cap:?})"
            );
        }
        // Past the servable lifetime, the client gets the upstream error.
        tokio::time::sleep(HOUR).await;
        assert!(cache.get(&id).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn throttled_refreshes_shrink_the_budget() {
        let backend = FakeBackend::new(Duration::from_millis(10));
        let cache = cache(backend.clone(), CacheScope::Pod);
        let id = identity("t", "sa", Some("u1"));
        in_use(&cache, &id).await;
        backend.fail_with(Some(UpstreamError::new(
            FailureKind::Throttled,
            "ThrottlingException",
            "slow down",
        )));
        tokio::time::sleep(46 * MINUTE).await;
        assert!(
            cache.metrics.refresh_budget.get() < 3.0,
            "{}",
            cache.metrics.refresh_budget.get()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refreshes_do_not_pile_up_behind_a_throttled_budget() {
        // 100 pods on 10-minute credentials need a refresh every 3 s; a budget throttled to
        // its floor grants one every 5.3 s. Clients keep asking, so the request path refetches
        // what the background cannot. Waiting refreshes must stay bounded by the entries.
        let backend = Arc::new(FakeBackend {
            calls: 0.into(),
            call_times: Mutex::new(Vec::new()),
            latency: Duration::from_millis(10),
            lifetime: 10 * MINUTE,
            fail: Mutex::new(None),
        });
        let cache = cache(backend.clone(), CacheScope::Pod);
        let ids: Vec<Identity> = (0..100)
            .map(|i| identity(&format!("t{i}"), "sa", Some(&format!("u{i}"))))
            .collect();
        let tasks = || {
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
        };
        let mut most = 0;
        for _minute in 0..60 {
            // The upstream keeps throttling background refreshes.
            for _ in 0..10 {
                cache.budget.on_throttled();
            }
            for id in &ids {
                cache.get(id).await.unwrap();
            }
            tokio::time::sleep(MINUTE).await;
            most = most.max(tasks());
        }
        assert!(most < 300, "{most} tasks alive for 100 entries");
        assert!(cache.metrics.encode().contains("outcome=\"skipped\""));
    }

    #[tokio::test(start_paused = true)]
    async fn revocation_on_refresh_drops_the_entry_at_once() {
        let backend = FakeBackend::new(Duration::from_millis(10));
        let cache = cache(backend.clone(), CacheScope::Pod);
        let id = identity("t", "sa", Some("u1"));
        in_use(&cache, &id).await;
        backend.fail_with(Some(UpstreamError::new(
            FailureKind::Rejected { status: 404 },
            "ResourceNotFoundException",
            "association deleted",
        )));
        tokio::time::sleep(46 * MINUTE).await;
        assert!(cache.metrics.encode().contains("reason=\"revoked\"} 1"));
        let calls = backend.calls();
        assert!(
            cache.get(&id).await.is_err(),
            "revoked credentials are not served again"
        );
        assert_eq!(backend.calls(), calls + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_association_is_answered_from_the_cache_for_a_while() {
        let backend = FakeBackend::new(Duration::from_millis(10));
        let cache = cache(backend.clone(), CacheScope::Pod);
        backend.fail_with(Some(UpstreamError::new(
            FailureKind::Rejected { status: 404 },
            "ResourceNotFoundException",
            "no association",
        )));
        let id = identity("t", "sa", Some("u1"));
        let other_pod = identity("t2", "sa", Some("u2"));
        for _ in 0..20 {
            let e = cache.get(&id).await.unwrap_err();
            assert!(
                matches!(e, CacheError::Upstream(ref u) if u.code == "ResourceNotFoundException"),
                "{e:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            backend.calls(),
            1,
            "one upstream call for 20 requests in 2 s"
        );
        // Another pod is its own key and asks for itself.
        assert!(cache.get(&other_pod).await.is_err());
        assert_eq!(backend.calls(), 2);
        // Once the association exists, the pod gets credentials within REFUSAL_TTL.
        backend.fail_with(None);
        tokio::time::sleep(REFUSAL_TTL).await;
        assert!(cache.get(&id).await.is_ok());
        assert_eq!(backend.calls(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn token_refusals_are_not_remembered() {
        // A refused token says nothing about the pod's next token: ask again.
        let backend = FakeBackend::new(Duration::from_millis(10));
        let cache = cache(backend.clone(), CacheScope::Pod);
        backend.fail_with(Some(UpstreamError::new(
            FailureKind::Rejected { status: 400 },
            "InvalidTokenException",
            "bad token",
        )));
        let id = identity("t", "sa", Some("u1"));
        for _ in 0..3 {
            assert!(cache.get(&id).await.is_err());
        }
        assert_eq!(backend.calls(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn sts_revocation_on_refresh_drops_the_entry() {
        let backend = FakeBackend::new(Duration::from_millis(10));
        let cache = cache(backend.clone(), CacheScope::Pod);
        let id = identity("t", "sa", Some("u1"));
        in_use(&cache, &id).await;
        backend.fail_with(Some(UpstreamError::new(
            FailureKind::Rejected { status: 403 },
            "AccessDenied",
            "not authorized to perform sts:AssumeRoleWithWebIdentity",
        )));
        tokio::time::sleep(46 * MINUTE).await;
        assert!(
            cache.get(&id).await.is_err(),
            "credentials of a role the pod lost are not served"
        );
        assert!(cache.metrics.encode().contains("reason=\"revoked\"} 1"));
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_newest_token_is_not_used_for_a_refresh() {
        let backend = FakeBackend::new(Duration::from_millis(10));
        let cache = cache(backend.clone(), CacheScope::Pod);
        let mut id = identity("t", "sa", Some("u1"));
        id.expires_at = Some(SystemTime::now() - Duration::from_secs(1));
        in_use(&cache, &id).await;
        tokio::time::sleep(46 * MINUTE).await;
        assert_eq!(backend.calls(), 1);
        assert!(cache
            .metrics
            .encode()
            .contains("reason=\"token_expired\"} 1"));
    }

    #[tokio::test(start_paused = true)]
    async fn cold_burst_is_bounded_and_answers_in_time() {
        let backend = FakeBackend::new(Duration::from_secs(1));
        let mut s = settings(CacheScope::Pod);
        s.max_upstream_concurrency = 4;
        let cache = CredentialCache::new(backend.clone(), s, Metrics::new());
        let start = Instant::now();
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let cache = cache.clone();
                let id = identity(&format!("t{i}"), "sa", Some(&format!("u{i}")));
                tokio::spawn(async move { (cache.get(&id).await, start.elapsed()) })
            })
            .collect();
        let (mut ok, mut busy) = (0, 0);
        for t in tasks {
            let (result, took) = t.await.unwrap();
            assert!(took <= Duration::from_millis(1100), "{took:?}");
            match result {
                Ok(_) => ok += 1,
                Err(CacheError::Upstream(e)) if e.kind == FailureKind::Busy => busy += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!((ok, busy), (4, 16));
        assert_eq!(
            backend.calls(),
            4,
            "no pod was called twice and the bound held"
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn verified(
            token: &str,
            ns: &str,
            sa: &str,
            uid: Option<&str>,
            verified: bool,
        ) -> Identity {
            let mut id = identity(token, sa, uid);
            match (&mut id.verified, verified) {
                (Some(c), true) => c.namespace = ns.into(),
                (v, _) => *v = None,
            }
            id
        }

        /// (token, namespace, service account, pod uid, verified): small alphabets so that
        /// equal fields are common and the interesting collisions get tried.
        fn identity_parts() -> impl Strategy<Value = (String, String, String, Option<String>, bool)>
        {
            (
                "[ab]{1,2}",
                "[a:/-]{0,3}",
                "[a:/-]{0,3}",
                proptest::option::of("[a1]{0,2}"),
                any::<bool>(),
            )
        }

        proptest! {
            #[test]
            fn refresh_point_lies_between_fetch_and_fresh_until(
                lifetime in 60u64..=24 * 3600,
                retention in 60u64..=12 * 3600,
                jitter in 0.0f64..1.0,
            ) {
                let fetched = Instant::now();
                let fresh = fresh_until(fetched, Duration::from_secs(lifetime));
                let at = refresh_point(fetched, fresh, Duration::from_secs(retention), jitter);
                prop_assert!(fresh <= fetched + Duration::from_secs(lifetime));
                prop_assert!(at <= fresh, "refresh after fresh_until");
                prop_assert!(at >= fetched, "refresh before the fetch");
                prop_assert!(at <= fetched + Duration::from_secs(retention));
            }

            #[test]
            fn pod_scope_keys_never_collide_across_pods(
                a in identity_parts(),
                b in identity_parts(),
            ) {
                let ia = verified(&a.0, &a.1, &a.2, a.3.as_deref(), a.4);
                let ib = verified(&b.0, &b.1, &b.2, b.3.as_deref(), b.4);
                let ka = CacheKey::for_identity(&ia, CacheScope::Pod);
                let kb = CacheKey::for_identity(&ib, CacheScope::Pod);
                if ia.verified.is_some() != ib.verified.is_some() {
                    prop_assert_ne!(&ka, &kb, "verified and unverified share a key");
                }
                for scope in [CacheScope::Pod, CacheScope::Association] {
                    let (sa, sb) = (CacheKey::for_identity(&ia, scope), CacheKey::for_identity(&ib, scope));
                    if ia.verified.is_none() != ib.verified.is_none() {
                        prop_assert_ne!(sa, sb);
                    }
                }
                if let (Some(ca), Some(cb)) = (&ia.verified, &ib.verified) {
                    let pod_a = (&ca.namespace, &ca.service_account, &ca.pod_uid);
                    let pod_b = (&cb.namespace, &cb.service_account, &cb.pod_uid);
                    if pod_a != pod_b {
                        prop_assert_ne!(&ka, &kb, "{:?} and {:?}", pod_a, pod_b);
                    }
                }
                if ia.verified.is_none() && ib.verified.is_none() && a.0 != b.0 {
                    prop_assert_ne!(&ka, &kb, "unverified tokens share a key");
                }
            }
        }
    }

    #[test]
    fn retry_delay_doubles_up_to_the_cap() {
        for failures in 1..10u32 {
            let d = retry_delay(failures);
            let cap = RETRY_BASE
                .saturating_mul(1 << (failures - 1))
                .min(RETRY_CAP);
            assert!(d >= cap / 2 && d <= cap, "{failures}: {d:?}");
        }
    }
}
