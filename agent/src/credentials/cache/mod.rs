//! The credential cache: one upstream call per key, however many requests arrive, and
//! credentials that outlive their upstream.
//!
//! Each key maps to a slot (`slot.rs`): the last good credentials, the newest token seen
//! for the key, and, while a fetch runs, the receiving end of a watch channel every
//! concurrent request for that key waits on. Fetches are spawned tasks, so a client that
//! hangs up does not cancel one.
//!
//! Lifecycle of an entry (all times on tokio's clock, so tests pause and advance it; the
//! numbers are in `policy.rs`):
//! - fetched: served at once until `fresh_until` (expiry minus 15 minutes, or half the
//!   lifetime for short credentials), so no SDK gets credentials it would consider due;
//! - refresh point (the earlier of `--max-credential-retention-before-renewal` and
//!   `fresh_until`, minus jitter): if a client asked since the last fetch, a background
//!   refresh runs, paced by the [`RefreshBudget`]. If not, the entry goes dormant: it is not
//!   refreshed (a pod that is gone costs no upstream calls), but it keeps its credentials;
//! - a request for a dormant or stale entry starts a fetch and waits for it at most
//!   [`STALE_WAIT`]; if the upstream fails or is slow, the request gets the credentials in
//!   hand at once and a background retry with backoff goes on. SDKs that ask only near
//!   expiry (hours apart) therefore ride through an upstream outage;
//! - credentials within [`MIN_SERVABLE_LIFETIME`] of expiry are never served; the entry is
//!   dropped then;
//! - irrecoverable failures (association deleted, access denied, token invalid or expired,
//!   as classified by `upstream`) drop the entry at once.
//!
//! The map holds at most `--max-cache-size` entries at any time: a new key over the bound
//! evicts first an entry with nothing to serve, then a dormant one, then the least recently
//! asked for. `--max-cache-size 0` or a retention of 0 turns caching off: every request is an
//! upstream call, but concurrent requests for one key still share it.
//!
//! Keys come only from verified claims (namespace, service account, pod UID) or, when tokens
//! are not verified locally, from the token's SHA-256 digest, so no token can reach another
//! pod's entry.

mod export;
mod policy;
mod refresh;
mod slot;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

pub use export::ExportedEntry;
use policy::RETRY_CAP;
pub use policy::{
    random_fraction, retry_delay, EXPIRY_MARGIN, MIN_SERVABLE_LIFETIME, REFUSAL_TTL, STALE_WAIT,
    UPSTREAM_QUEUE_WAIT, WAIT_DEADLINE,
};
use refresh::{Due, Timers};
use slot::{Cached, Dormancy, FetchOutcome, Origin, Outcome, Slot};

use crate::config::CacheScope;
use crate::credentials::upstream::{Backend, Credentials, FailureKind, UpstreamError};
use crate::defence::{self, Defence};
use crate::identity::token::Identity;
use crate::limits::RefreshBudget;
use crate::metrics::Metrics;

/// How a request's credentials reached it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The request waited for the upstream call that fetched them.
    Fetched,
    /// They were in the cache: fetched for an earlier request, shared by the pods of an
    /// association, refreshed in the background, or taken over from an earlier agent.
    Cached,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CacheKey {
    /// A pod, by UID (or by token digest for a verified token without pod claims).
    Pod {
        namespace: Arc<str>,
        service_account: Arc<str>,
        pod: PodRef,
        /// What the backend's answer depends on besides the token (the STS backend's role).
        role: Option<Arc<str>>,
    },
    /// Every pod of a service account.
    Association {
        namespace: Arc<str>,
        service_account: Arc<str>,
        role: Option<Arc<str>>,
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
    pub fn for_identity(
        identity: &Identity,
        scope: CacheScope,
        role: Option<Arc<str>>,
    ) -> CacheKey {
        let Some(claims) = &identity.verified else {
            return CacheKey::Unverified(identity.token.digest());
        };
        let namespace: Arc<str> = claims.namespace.as_str().into();
        let service_account: Arc<str> = claims.service_account.as_str().into();
        match scope {
            CacheScope::Association => CacheKey::Association {
                namespace,
                service_account,
                role,
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
                    role,
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
                ..
            } => {
                format!("{namespace}/{service_account}/pod:{uid}")
            }
            CacheKey::Pod {
                namespace,
                service_account,
                pod: PodRef::Token(d),
                ..
            } => {
                format!("{namespace}/{service_account}/token:{}", hex(d))
            }
            CacheKey::Association {
                namespace,
                service_account,
                ..
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

/// Cache settings from the configuration.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub scope: CacheScope,
    /// 0: no caching (concurrent requests for a key still share one call).
    pub max_entries: u64,
    /// 0: no caching.
    pub max_retention: Duration,
    pub max_service_qps: f64,
    pub max_upstream_concurrency: usize,
}

impl CacheSettings {
    /// Whether credentials are kept at all (upstream's meaning of the two `0` values).
    pub fn caching(&self) -> bool {
        self.max_entries > 0 && !self.max_retention.is_zero()
    }
}

/// Entry counts by state, and the shortest remaining lifetime among entries in use.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CacheStats {
    pub fresh: i64,
    pub refreshing: i64,
    /// In use, past the fresh period or with failing refreshes: the upstream is not keeping up.
    pub stale: i64,
    /// Dormant: past the refresh point with nobody asking (or no valid token to refresh with).
    pub idle: i64,
    /// Over entries that are not idle; `None` when there are none.
    pub min_lifetime: Option<Duration>,
}

pub struct CredentialCache {
    /// Lock order: this map, then a slot. Never the other way round.
    entries: Mutex<HashMap<CacheKey, Arc<Slot>>>,
    backend: Arc<dyn Backend>,
    settings: CacheSettings,
    metrics: Metrics,
    budget: RefreshBudget,
    upstream: Arc<Semaphore>,
    /// Keys whose revocation was logged recently: logged once, not once per request.
    revocations_logged: moka::future::Cache<CacheKey, ()>,
    timers: Arc<Timers>,
    this: Weak<CredentialCache>,
    /// Set once the entries went to the next agent: no more background refreshes.
    retired: std::sync::atomic::AtomicBool,
}

/// How often an irrecoverable error of one key is logged at warn.
const REVOCATION_LOG_INTERVAL: Duration = Duration::from_secs(600);

impl Drop for CredentialCache {
    fn drop(&mut self) {
        self.timers.shut_down();
    }
}

impl CredentialCache {
    pub fn new(
        backend: Arc<dyn Backend>,
        settings: CacheSettings,
        metrics: Metrics,
    ) -> Arc<CredentialCache> {
        let revocations_logged = moka::future::Cache::builder()
            .max_capacity(settings.max_entries.max(1))
            .time_to_live(REVOCATION_LOG_INTERVAL)
            .build();
        metrics.refresh_budget_qps.set(settings.max_service_qps);
        Arc::new_cyclic(|this| CredentialCache {
            entries: Mutex::new(HashMap::new()),
            backend,
            budget: RefreshBudget::new(settings.max_service_qps),
            upstream: Arc::new(Semaphore::new(settings.max_upstream_concurrency.max(1))),
            settings,
            metrics,
            revocations_logged,
            timers: Arc::default(),
            this: this.clone(),
            retired: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn lock_entries(&self) -> MutexGuard<'_, HashMap<CacheKey, Arc<Slot>>> {
        crate::sync::lock(&self.entries)
    }

    pub fn entry_count(&self) -> u64 {
        self.lock_entries().len() as u64
    }

    /// Credentials for `identity`: from the cache, from a fetch already in flight for the
    /// same key, or from a new fetch.
    /// For a backend whose answer depends on the token alone (no role to key by): benches and
    /// tests; the request path admits first, then calls [`Self::serve`] with the role.
    pub async fn get(
        self: &Arc<Self>,
        identity: &Identity,
    ) -> Result<Arc<Credentials>, CacheError> {
        self.serve(identity, None).await.map(|(creds, _)| creds)
    }

    /// Credentials for `identity`, admitted by the backend with `role` (what its answer
    /// depends on besides the token: the STS backend's associated role, part of the key), and
    /// whether the request waited for the upstream call that fetched them (the audit log's
    /// `origin`).
    pub async fn serve(
        self: &Arc<Self>,
        identity: &Identity,
        role: Option<Arc<str>>,
    ) -> Result<(Arc<Credentials>, Delivery), CacheError> {
        let key = CacheKey::for_identity(identity, self.settings.scope, role);
        let now = Instant::now();
        let slot = self.slot_for(&key, now);
        let (mut rx, stale) = {
            let mut state = slot.lock();
            state.last_access = now;
            state.remember(identity);
            let stale = match &state.current {
                Some(c) if now < c.fresh_until && state.dormant.is_none() => {
                    self.metrics.cache_hits.inc();
                    tracing::debug!(key = %key.describe(), "cache hit");
                    return Ok((c.creds.clone(), Delivery::Cached));
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
                    return Ok((creds.clone(), Delivery::Cached));
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
                    return Ok((creds, Delivery::Cached));
                }
                None => return Err(CacheError::Timeout),
            },
        };
        match outcome {
            Some(result) => result
                .map(|creds| (creds, Delivery::Fetched))
                .map_err(CacheError::Upstream),
            None => Err(CacheError::Internal),
        }
    }

    /// The slot of `key`, created if missing. Creating one over `--max-cache-size` evicts
    /// another first, so the bound holds whenever a request is answered.
    fn slot_for(&self, key: &CacheKey, now: Instant) -> Arc<Slot> {
        let mut entries = self.lock_entries();
        if let Some(slot) = entries.get(key) {
            return slot.clone();
        }
        if self.settings.caching() {
            let limit = usize::try_from(self.settings.max_entries).unwrap_or(usize::MAX);
            while entries.len() >= limit {
                let victim = entries
                    .iter()
                    .min_by_key(|(_, slot)| slot.lock().eviction_rank(now))
                    .map(|(k, _)| k.clone());
                let Some(victim) = victim else { break };
                entries.remove(&victim);
                self.metrics.eviction("size");
                tracing::debug!(key = %victim.describe(), "evicted: the cache is full");
            }
        }
        let slot = Arc::new(Slot::new(now));
        entries.insert(key.clone(), slot.clone());
        self.metrics.cache_entries.set(entries.len() as i64);
        slot
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
            self.complete(key, slot, Err(busy), tx, origin);
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
        let origin_label = origin.label();
        match &result {
            Ok(creds) => {
                tracing::info!(key = %key.describe(), origin = origin_label, access_key_id = %creds.access_key_id,
                expires_in_s = creds.remaining(SystemTime::now()).as_secs(), elapsed_ms = elapsed.as_millis() as u64,
                "fetched credentials")
            }
            Err(e) if e.kind.is_irrecoverable() => {
                let first = !self.revocations_logged.contains_key(&key);
                if first {
                    self.revocations_logged.insert(key.clone(), ()).await;
                    tracing::warn!(key = %key.describe(), origin = origin_label, code = %e.code, upstream_message = %e.log_text(),
                        "upstream refused credentials for this key; dropping its cached credentials");
                } else {
                    tracing::debug!(key = %key.describe(), code = %e.code, "upstream refused credentials again");
                }
            }
            Err(e) => {
                tracing::warn!(key = %key.describe(), origin = origin_label, code = %e.code, kind = e.kind.label(),
                upstream_message = %e.log_text(), elapsed_ms = elapsed.as_millis() as u64, "upstream call failed")
            }
        }
        self.complete(key, slot, result.map(Arc::new), tx, origin);
    }

    /// Record a fetch's result in the slot, tell the waiters, and set the entry's next timer.
    fn complete(
        &self,
        key: CacheKey,
        slot: Arc<Slot>,
        result: FetchOutcome,
        tx: watch::Sender<Option<FetchOutcome>>,
        origin: Origin,
    ) {
        let now = Instant::now();
        let throttled = matches!(&result, Err(e) if e.kind == FailureKind::Throttled);
        let caching = self.settings.caching();
        let (served, next, outcome, generation) = {
            let mut state = slot.lock();
            state.inflight = None;
            state.refreshing = false;
            state.generation += 1;
            let generation = state.generation;
            let (served, next, outcome) = match result {
                Ok(creds) if caching => {
                    let cached = Cached::new(creds.clone(), now, self.settings.max_retention);
                    let at = cached.refresh_at;
                    state.current = Some(cached);
                    state.dormant = None;
                    state.failures = 0;
                    state.retry_at = None;
                    state.refused = None;
                    (Ok(creds), Some(at), Outcome::Success)
                }
                Ok(creds) => (Ok(creds), None, Outcome::Success),
                Err(e) if e.kind.is_irrecoverable() => {
                    let had_credentials = state.current.take().is_some();
                    state.dormant = None;
                    let mut next = None;
                    if e.kind.is_association_refusal()
                        && caching
                        && defence::on(Defence::RefusalCache)
                    {
                        state.refused = Some((e.clone(), now + REFUSAL_TTL));
                        next = Some(now + REFUSAL_TTL);
                    }
                    let outcome = if had_credentials {
                        Outcome::Revoked
                    } else {
                        Outcome::Refused
                    };
                    (Err(e), next, outcome)
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
                        (Ok(creds), Some(at), Outcome::FailedKept)
                    }
                    None => {
                        state.current = None;
                        let next = state.refused.as_ref().map(|(_, until)| *until);
                        (Err(e), next, Outcome::Failed)
                    }
                },
            };
            (served, next, outcome, generation)
        };
        let _ = tx.send(Some(served));
        if origin == Origin::Refresh {
            self.metrics.refresh(outcome.label());
        }
        // Any call the upstream answered with credentials, on the request path or in the
        // background, says it has room again: otherwise a budget throttled down while clients
        // do the refetching would stay at its floor for good.
        if outcome == Outcome::Success {
            self.metrics
                .refresh_budget_qps
                .set(self.budget.on_success());
        }
        if throttled {
            self.metrics
                .refresh_budget_qps
                .set(self.budget.on_throttled());
        }
        if outcome == Outcome::Revoked {
            self.metrics.eviction("revoked");
        }
        match next {
            Some(at) => self.timers.schedule(&self.this, key, &slot, at, generation),
            // Nothing to keep: drop the slot without counting an eviction.
            None => self.remove(&key, &slot, None),
        }
    }

    /// The entries went to the next agent: no background refresh runs from now on (requests
    /// still in flight are answered).
    pub fn retire(&self) {
        self.retired
            .store(true, std::sync::atomic::Ordering::Release);
        self.timers.shut_down();
    }

    fn is_retired(&self) -> bool {
        self.retired.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A timer of the entry came due: refresh it, let it go dormant, or drop it.
    fn on_timer(self: &Arc<Self>, due: Due) {
        if self.is_retired() {
            return;
        }
        enum Next {
            Nothing,
            Sleep(Instant),
            Remove(&'static str),
            Refresh(Identity),
        }
        let Some(slot) = due.slot.upgrade() else {
            return;
        };
        // An evicted slot is finished: its timers do nothing.
        if !self
            .lock_entries()
            .get(&due.key)
            .is_some_and(|s| Arc::ptr_eq(s, &slot))
        {
            return;
        }
        let now = Instant::now();
        let next = {
            let mut state = slot.lock();
            if state.generation != due.generation || state.inflight.is_some() || state.refreshing {
                Next::Nothing
            } else {
                let wanted = state.wanted();
                match &state.current {
                    None => match &state.refused {
                        Some((_, until)) if now < *until => Next::Sleep(*until),
                        _ => Next::Remove("expired"),
                    },
                    Some(c) => {
                        let servable = c.servable(now);
                        let until = c.servable_until();
                        let token = if wanted { state.refresh_token() } else { None };
                        match token {
                            // In use: refreshed even if its credentials just stopped being
                            // servable (short sessions reach both points together).
                            Some(identity) => {
                                state.refreshing = true;
                                Next::Refresh(identity)
                            }
                            None if !servable => {
                                Next::Remove(state.dormant.map_or("expired", Dormancy::label))
                            }
                            None => {
                                state.dormant = Some(if wanted {
                                    Dormancy::TokenExpired
                                } else {
                                    Dormancy::Idle
                                });
                                Next::Sleep(until)
                            }
                        }
                    }
                }
            }
        };
        match next {
            Next::Nothing => {}
            Next::Sleep(at) => self
                .timers
                .schedule(&self.this, due.key, &slot, at, due.generation),
            Next::Remove(reason) => {
                tracing::debug!(key = %due.key.describe(), reason, "entry dropped");
                let counted = if slot.lock().current.is_some() {
                    Some(reason)
                } else {
                    None
                };
                self.remove(&due.key, &slot, counted);
            }
            Next::Refresh(identity) => {
                tokio::spawn(
                    self.clone()
                        .refresh(due.key, slot, due.generation, identity),
                );
            }
        }
    }

    /// Background refresh of one entry that clients still ask for.
    async fn refresh(
        self: Arc<Self>,
        key: CacheKey,
        slot: Arc<Slot>,
        generation: u64,
        identity: Identity,
    ) {
        let started = Instant::now();
        // Wait for budget while the credentials are still fresh; a retry of stale ones waits at
        // most one backoff step. Past that, give up: requests refetch on their own (they do
        // not need budget), so a long throttle cannot build a queue of waiting refreshes.
        let (deadline, servable_until) = {
            let state = slot.lock();
            match &state.current {
                Some(c) if started < c.fresh_until => (c.fresh_until, c.servable_until()),
                Some(c) => (started + RETRY_CAP, c.servable_until()),
                None => (started, started),
            }
        };
        let waited = tokio::time::timeout_at(deadline, self.budget.acquire())
            .await
            .is_ok();
        let tx = {
            let mut state = slot.lock();
            if !waited
                || self.is_retired()
                || state.generation != generation
                || state.inflight.is_some()
            {
                state.refreshing = false;
                None
            } else {
                let (tx, rx) = watch::channel(None);
                state.inflight = Some(rx);
                Some(tx)
            }
        };
        let Some(tx) = tx else {
            if !waited {
                self.metrics.refresh("skipped");
                tracing::debug!(key = %key.describe(), "no refresh budget in time; requests refetch on their own");
                // Still drop the entry when its credentials run out (at once if they have).
                if Instant::now() < servable_until {
                    self.timers
                        .schedule(&self.this, key, &slot, servable_until, generation);
                } else {
                    self.remove(&key, &slot, Some("expired"));
                }
            }
            return;
        };
        tracing::debug!(key = %key.describe(), waited_ms = started.elapsed().as_millis() as u64, "refreshing");
        self.run_fetch(key, slot, identity, tx, Origin::Refresh)
            .await;
    }

    /// Drop every entry of the pod with `uid` at once (it was deleted or has terminated): its
    /// credentials are never served or refreshed again. Entries shared by an association
    /// (`--cache-scope association`) serve the association's other pods and stay.
    /// Drop the entries of every pod `gone` names, until the pod set that sends them is gone.
    pub async fn forget_gone(
        self: Arc<Self>,
        mut gone: tokio::sync::mpsc::UnboundedReceiver<Box<str>>,
    ) {
        while let Some(uid) = gone.recv().await {
            self.forget_pod(&uid);
        }
    }

    pub fn forget_pod(&self, uid: &str) -> usize {
        if !defence::on(Defence::PodDeletionForgets) {
            return 0;
        }
        let mut entries = self.lock_entries();
        let before = entries.len();
        entries.retain(
            |key, _| !matches!(key, CacheKey::Pod { pod: PodRef::Uid(u), .. } if &**u == uid),
        );
        let dropped = before - entries.len();
        for _ in 0..dropped {
            self.metrics.eviction("pod_gone");
        }
        self.metrics.cache_entries.set(entries.len() as i64);
        dropped
    }

    /// Remove `key` if it still maps to `slot` (a newer slot for the key is left alone).
    fn remove(&self, key: &CacheKey, slot: &Arc<Slot>, reason: Option<&'static str>) {
        let mut entries = self.lock_entries();
        if entries.get(key).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            entries.remove(key);
            if let Some(reason) = reason {
                self.metrics.eviction(reason);
            }
        }
        self.metrics.cache_entries.set(entries.len() as i64);
    }

    /// Entry counts by state and the shortest lifetime in use, read now.
    pub fn stats(&self) -> CacheStats {
        let now = Instant::now();
        let slots: Vec<Arc<Slot>> = self.lock_entries().values().cloned().collect();
        let mut stats = CacheStats::default();
        for slot in slots {
            let state = slot.lock();
            let Some(c) = &state.current else { continue };
            if state.dormant.is_some() {
                stats.idle += 1;
                continue;
            }
            if state.refreshing || state.inflight.is_some() {
                stats.refreshing += 1;
            } else if state.failures > 0 || now >= c.fresh_until {
                stats.stale += 1;
            } else {
                stats.fresh += 1;
            }
            let left = c.expires_at.saturating_duration_since(now);
            stats.min_lifetime = Some(stats.min_lifetime.map_or(left, |m| m.min(left)));
        }
        stats
    }

    /// Update the gauges that describe the whole cache (called at scrape time).
    pub fn observe(&self) {
        let stats = self.stats();
        self.metrics
            .set_entries_by_state(stats.fresh, stats.refreshing, stats.stale, stats.idle);
        self.metrics.cache_entries.set(self.entry_count() as i64);
        self.metrics
            .cache_min_credential_lifetime_seconds
            .set(stats.min_lifetime);
    }
}
