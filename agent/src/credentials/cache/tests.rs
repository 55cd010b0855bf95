//! The cache's behaviour under a paused clock: single flight, refresh ahead, dormant entries,
//! static stability, revocation, the size bound, and a simulated day of real SDK access.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::policy::{fresh_until, refresh_point, RETRY_BASE};
use super::*;
use crate::credentials::upstream::{FetchFuture, Secret};
use crate::identity::token::{Token, VerifiedClaims};

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
        FakeBackend::with_lifetime(latency, HOUR)
    }
    /// A backend whose credentials live `lifetime`.
    fn with_lifetime(latency: Duration, lifetime: Duration) -> Arc<FakeBackend> {
        Arc::new(FakeBackend {
            calls: 0.into(),
            call_times: Mutex::new(Vec::new()),
            latency,
            lifetime,
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
    /// Fail every call from now on with `kind` and `code`.
    fn fail(&self, kind: FailureKind, code: &str) {
        self.fail_with(Some(UpstreamError::new(kind, code, code)));
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
            Ok(Credentials::new(
                format!("ASIA{n}"),
                Secret::new("s"),
                Secret::new("t"),
                "111122223333",
                SystemTime::now() + self.lifetime,
            ))
        })
    }
}

fn identity(token: &str, sa: &str, uid: Option<&str>) -> Identity {
    Identity {
        token: Token::new(token),
        verified: Some(std::sync::Arc::new(VerifiedClaims {
            namespace: "ns".into(),
            service_account: sa.into(),
            pod_name: uid.map(|u| format!("pod-{u}")),
            pod_uid: uid.map(Into::into),
            node_name: None,
            audiences: vec!["pods.eks.amazonaws.com".into()],
        })),
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

/// The pod most tests ask for.
fn the_pod() -> Identity {
    identity("t", "sa", Some("u1"))
}

/// A backend answering after `latency`, a pod-scoped cache with the default settings, and
/// [`the_pod`].
fn bed_for_one_pod(latency: Duration) -> (Arc<FakeBackend>, Arc<CredentialCache>, Identity) {
    let (backend, cache) = bed_with(latency, 10_000, 3 * HOUR);
    (backend, cache, the_pod())
}

/// [`bed_for_one_pod`], with a backend that fails every call with `kind` and `code`.
fn failing_bed(
    kind: FailureKind,
    code: &str,
) -> (Arc<FakeBackend>, Arc<CredentialCache>, Identity) {
    let (backend, cache, id) = bed_for_one_pod(Duration::from_millis(10));
    backend.fail(kind, code);
    (backend, cache, id)
}

/// A fast backend and a pod-scoped cache with the default settings.
fn bed() -> (Arc<FakeBackend>, Arc<CredentialCache>) {
    bed_with(Duration::from_millis(10), 10_000, 3 * HOUR)
}

/// The access key a request with `token` of pod `uid` (service account `sa`) gets.
async fn key_of(cache: &Arc<CredentialCache>, token: &str, sa: &str, uid: &str) -> String {
    let creds = cache.get(&identity(token, sa, Some(uid))).await.unwrap();
    creds.access_key_id.clone()
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
    let (backend, cache) = bed_with(Duration::from_millis(200), 10_000, 3 * HOUR);
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
    let (backend, cache) = bed();
    let first = key_of(&cache, "old", "sa", "u1").await;
    assert_eq!(key_of(&cache, "rotated", "sa", "u1").await, first);
    assert_eq!(backend.calls(), 1);
    assert_ne!(key_of(&cache, "other", "sa", "u2").await, first);
    assert_eq!(backend.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn association_scope_shares_per_service_account() {
    let backend = FakeBackend::new(Duration::from_millis(10));
    let cache = cache(backend.clone(), CacheScope::Association);
    let first = key_of(&cache, "a", "sa", "u1").await;
    assert_eq!(key_of(&cache, "b", "sa", "u2").await, first);
    assert_ne!(key_of(&cache, "c", "other-sa", "u3").await, first);
    assert_eq!(backend.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn unverified_tokens_key_by_digest() {
    let (backend, cache) = bed();
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
    let (backend, cache, id) = bed_for_one_pod(Duration::from_secs(1));
    let gave_up = tokio::time::timeout(Duration::from_millis(100), cache.get(&id)).await;
    assert!(gave_up.is_err());
    tokio::time::sleep(Duration::from_secs(2)).await;
    cache.get(&id).await.unwrap();
    assert_eq!(backend.calls(), 1);
    assert_eq!(cache.metrics.cache_hits.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn errors_are_shared_but_not_cached() {
    let (backend, cache) = bed_with(Duration::from_millis(50), 10_000, 3 * HOUR);
    backend.fail_with(Some(server_error()));
    let id = the_pod();
    let (a, b) = tokio::join!(cache.get(&id), cache.get(&id));
    assert!(matches!(a, Err(CacheError::Upstream(_))) && matches!(b, Err(CacheError::Upstream(_))));
    assert_eq!(backend.calls(), 1);
    backend.fail_with(None);
    cache.get(&id).await.unwrap();
    assert_eq!(backend.calls(), 2);
}

/// A client polling every minute for six hours: every answer has more than the margin
/// left, and after the first miss every fetch happens in the background.
#[tokio::test(start_paused = true)]
async fn refreshes_ahead_so_clients_never_get_credentials_inside_the_margin() {
    let (backend, cache, id) = bed_for_one_pod(Duration::from_millis(50));
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
    let (backend, cache) = bed_with(Duration::ZERO, 10_000, 3 * HOUR);
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
async fn failed_refreshes_keep_credentials_and_back_off() {
    let (backend, cache) = bed();
    let id = the_pod();
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
    let (backend, cache) = bed();
    let id = the_pod();
    in_use(&cache, &id).await;
    backend.fail(FailureKind::Throttled, "ThrottlingException");
    tokio::time::sleep(46 * MINUTE).await;
    assert!(
        cache.metrics.refresh_budget_qps.get() < 3.0,
        "{}",
        cache.metrics.refresh_budget_qps.get()
    );
}

#[tokio::test(start_paused = true)]
async fn refreshes_do_not_pile_up_behind_a_throttled_budget() {
    // 100 pods on 10-minute credentials need a refresh every 3 s; a budget throttled to
    // its floor grants one every 5.3 s. Clients keep asking, so the request path refetches
    // what the background cannot. Waiting refreshes must stay bounded by the entries.
    let backend = FakeBackend::with_lifetime(Duration::from_millis(10), 10 * MINUTE);
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
    let timers = cache.timers.len();
    assert!(timers <= 300, "{timers} timers for 100 entries");
    assert!(cache.metrics.encode().contains("outcome=\"skipped\""));
}

/// EKS Auth's deleted association, STS's lost role, and a refused token: each drops cached
/// credentials at the refresh that meets it.
#[tokio::test(start_paused = true)]
async fn revocation_on_refresh_drops_the_entry_at_once() {
    for (kind, code) in [
        (
            FailureKind::AssociationRefused { status: 404 },
            "ResourceNotFoundException",
        ),
        (
            FailureKind::AssociationRefused { status: 403 },
            "AccessDenied",
        ),
        (
            FailureKind::TokenRefused { status: 400 },
            "InvalidTokenException",
        ),
    ] {
        let (backend, cache) = bed();
        let id = the_pod();
        in_use(&cache, &id).await;
        backend.fail(kind, code);
        tokio::time::sleep(46 * MINUTE).await;
        assert!(
            cache.metrics.encode().contains("reason=\"revoked\"} 1"),
            "{code}"
        );
        let calls = backend.calls();
        assert!(
            cache.get(&id).await.is_err(),
            "{code}: revoked credentials are not served again"
        );
        assert_eq!(backend.calls(), calls + 1, "{code}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_refused_association_is_answered_from_the_cache_for_a_while() {
    let (backend, cache, id) = failing_bed(
        FailureKind::AssociationRefused { status: 404 },
        "ResourceNotFoundException",
    );
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
    let (backend, cache, id) = failing_bed(
        FailureKind::TokenRefused { status: 400 },
        "InvalidTokenException",
    );
    for _ in 0..3 {
        assert!(cache.get(&id).await.is_err());
    }
    assert_eq!(backend.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn an_expired_newest_token_is_not_used_for_a_refresh() {
    let (backend, cache) = bed();
    let mut id = the_pod();
    id.expires_at = Some(SystemTime::now() - Duration::from_secs(1));
    in_use(&cache, &id).await;
    tokio::time::sleep(46 * MINUTE).await;
    assert_eq!(backend.calls(), 1, "no refresh with an expired token");
    assert_eq!(cache.stats().idle, 1, "kept, dormant");
    tokio::time::sleep(HOUR).await;
    assert_eq!(backend.calls(), 1);
    assert_eq!(
        cache.entry_count(),
        0,
        "dropped when its credentials ran out"
    );
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

    fn verified(token: &str, ns: &str, sa: &str, uid: Option<&str>, verified: bool) -> Identity {
        let mut id = identity(token, sa, uid);
        match (&mut id.verified, verified) {
            (Some(c), true) => std::sync::Arc::make_mut(c).namespace = ns.into(),
            (v, _) => *v = None,
        }
        id
    }

    /// (token, namespace, service account, pod uid, verified): small alphabets so that
    /// equal fields are common and the interesting collisions get tried.
    fn identity_parts() -> impl Strategy<Value = (String, String, String, Option<String>, bool)> {
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
            let ka = CacheKey::for_identity(&ia, CacheScope::Pod, None);
            let kb = CacheKey::for_identity(&ib, CacheScope::Pod, None);
            if ia.verified.is_some() != ib.verified.is_some() {
                prop_assert_ne!(&ka, &kb, "verified and unverified share a key");
            }
            for scope in [CacheScope::Pod, CacheScope::Association] {
                let (sa, sb) = (CacheKey::for_identity(&ia, scope, None), CacheKey::for_identity(&ib, scope, None));
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

fn settings_with(max_entries: u64, max_retention: Duration) -> CacheSettings {
    CacheSettings {
        max_entries,
        max_retention,
        ..settings(CacheScope::Pod)
    }
}

/// A backend answering after `latency`, and a pod-scoped cache with these limits.
fn bed_with(
    latency: Duration,
    max_entries: u64,
    max_retention: Duration,
) -> (Arc<FakeBackend>, Arc<CredentialCache>) {
    let backend = FakeBackend::new(latency);
    let settings = settings_with(max_entries, max_retention);
    (
        backend.clone(),
        CredentialCache::new(backend, settings, Metrics::new()),
    )
}

/// The way SDKs ask: once, then nothing until near expiry. The entry is not refreshed while
/// nobody asks, but its credentials stay until they are no longer servable.
#[tokio::test(start_paused = true)]
async fn idle_entries_keep_their_credentials_without_refreshes() {
    let (backend, cache) = bed();
    let quiet = identity("q", "sa", Some("quiet"));
    let first = cache.get(&quiet).await.unwrap();
    // Past the refresh point (at most 45 min for 1 h credentials): not refreshed, kept.
    tokio::time::sleep(50 * MINUTE).await;
    assert_eq!(backend.calls(), 1, "nobody asked: no refresh");
    assert_eq!(cache.entry_count(), 1);
    let stats = cache.stats();
    assert_eq!((stats.idle, stats.min_lifetime), (1, None), "{stats:?}");
    // The pod asks again; the upstream is down: the credentials in hand, at once.
    backend.fail_with(Some(server_error()));
    let started = Instant::now();
    let again = cache.get(&quiet).await.unwrap();
    assert_eq!(again.access_key_id, first.access_key_id);
    assert!(started.elapsed() <= STALE_WAIT, "{:?}", started.elapsed());
    assert_eq!(backend.calls(), 2, "the request tried the upstream once");
    // Until 15 s before expiry, and never after.
    tokio::time::sleep(9 * MINUTE + Duration::from_secs(40)).await;
    assert_eq!(
        cache.get(&quiet).await.unwrap().access_key_id,
        first.access_key_id
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(matches!(
        cache.get(&quiet).await,
        Err(CacheError::Upstream(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn a_request_after_the_refresh_point_waits_at_most_the_stale_wait() {
    // Hanging upstream: the old credentials after STALE_WAIT.
    let (_backend, cache) = bed_with(Duration::from_secs(30), 100, Duration::from_secs(60));
    let id = the_pod();
    let first = tokio::time::timeout(Duration::from_secs(31), cache.get(&id)).await;
    assert!(first.is_ok(), "the first fetch waits for the slow upstream");
    let first = first.unwrap().ok();
    assert!(first.is_none(), "30 s is past the request deadline");
    // The fetch completed in the background and filled the entry.
    tokio::time::sleep(Duration::from_secs(30)).await;
    tokio::time::sleep(2 * MINUTE).await;
    let started = Instant::now();
    let stale = cache.get(&id).await.unwrap();
    assert_eq!(started.elapsed(), STALE_WAIT);
    assert_eq!(stale.access_key_id, "ASIA1");
    assert!(cache.metrics.stale_serves.get() >= 1);
}

#[tokio::test(start_paused = true)]
async fn a_healthy_upstream_gives_a_dormant_entry_new_credentials() {
    let (backend, cache) = bed_with(Duration::from_millis(50), 100, Duration::from_secs(60));
    let id = the_pod();
    assert_eq!(cache.get(&id).await.unwrap().access_key_id, "ASIA1");
    tokio::time::sleep(5 * MINUTE).await;
    assert_eq!(backend.calls(), 1, "dormant, not refreshed");
    assert_eq!(cache.get(&id).await.unwrap().access_key_id, "ASIA2");
    assert_eq!(cache.get(&id).await.unwrap().access_key_id, "ASIA2");
}

#[tokio::test(start_paused = true)]
async fn the_size_bound_holds_and_dormant_entries_go_first() {
    let (backend, cache) = bed_with(Duration::from_millis(10), 2, Duration::from_secs(60));
    let (a, b, c) = (
        identity("a", "sa", Some("a")),
        identity("b", "sa", Some("b")),
        identity("c", "sa", Some("c")),
    );
    cache.get(&a).await.unwrap();
    cache.get(&b).await.unwrap();
    // `b` stays in use (asked after its fetch); `a` goes dormant at its refresh point.
    tokio::time::sleep(Duration::from_secs(10)).await;
    cache.get(&b).await.unwrap();
    tokio::time::sleep(Duration::from_secs(55)).await;
    cache.get(&b).await.unwrap();
    let calls = backend.calls();
    cache.get(&c).await.unwrap();
    assert_eq!(cache.entry_count(), 2, "the bound holds at once");
    cache.get(&b).await.unwrap();
    assert_eq!(backend.calls(), calls + 1, "b was kept");
    cache.get(&a).await.unwrap();
    assert_eq!(
        backend.calls(),
        calls + 2,
        "a, dormant, was the one evicted"
    );
    assert!(cache.entry_count() <= 2);
    assert!(cache
        .metrics
        .encode()
        .contains("pod_identity_agent_cache_evictions_total{reason=\"size\"} 2"));
}

#[tokio::test(start_paused = true)]
async fn caching_off_calls_every_time_but_still_coalesces() {
    for settings in [
        settings_with(0, 3 * HOUR),
        settings_with(2000, Duration::ZERO),
    ] {
        let backend = FakeBackend::new(Duration::from_millis(100));
        let cache = CredentialCache::new(backend.clone(), settings, Metrics::new());
        let id = the_pod();
        let (x, y) = tokio::join!(cache.get(&id), cache.get(&id));
        assert_eq!(x.unwrap().access_key_id, y.unwrap().access_key_id);
        assert_eq!(backend.calls(), 1, "concurrent requests share one call");
        cache.get(&id).await.unwrap();
        cache.get(&id).await.unwrap();
        assert_eq!(backend.calls(), 3, "nothing is kept");
        assert_eq!(cache.entry_count(), 0);
    }
}

#[tokio::test(start_paused = true)]
async fn stats_keep_dormant_entries_out_of_the_alerting_gauges() {
    let (_backend, cache) = bed_with(Duration::from_millis(10), 100, Duration::from_secs(60));
    let busy = identity("b", "sa", Some("busy"));
    cache
        .get(&identity("q", "sa", Some("quiet")))
        .await
        .unwrap();
    cache.get(&busy).await.unwrap();
    let stats = cache.stats();
    assert_eq!((stats.fresh, stats.idle), (2, 0));
    assert!(stats.min_lifetime.unwrap() > 59 * MINUTE);
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(30)).await;
        cache.get(&busy).await.unwrap();
    }
    let stats = cache.stats();
    assert_eq!(
        (stats.fresh, stats.idle, stats.stale),
        (1, 1, 0),
        "{stats:?}"
    );
    cache.observe();
    let text = cache.metrics.encode();
    assert!(
        text.contains("pod_identity_agent_cache_entries_by_state{state=\"idle\"} 1"),
        "{text}"
    );
    assert!(!text.contains("pod_identity_agent_cache_min_credential_lifetime_seconds NaN"));
}

/// Pods that ask the way SDKs do, 100 of them, each every 5 hours, for a day (after a day of
/// warm-up), against 6-hour credentials and the default 3-hour retention. Returns the
/// upstream calls of the measured day and the failed requests. `outage` makes the upstream
/// answer 500 for 2 hours from that offset into the measured day.
async fn sdk_day(outage: Option<Duration>) -> (usize, usize) {
    const PODS: usize = 100;
    const EVERY: Duration = Duration::from_secs(5 * 3600);
    const DAY: Duration = Duration::from_secs(24 * 3600);
    let backend = FakeBackend::with_lifetime(Duration::from_millis(50), 6 * HOUR);
    let cache = cache(backend.clone(), CacheScope::Pod);
    let start = Instant::now();
    let measured = start + DAY;
    if let Some(offset) = outage {
        let backend = backend.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(measured + offset).await;
            backend.fail_with(Some(server_error()));
            tokio::time::sleep(2 * HOUR).await;
            backend.fail_with(None);
        });
    }
    let mut pods = tokio::task::JoinSet::new();
    for i in 0..PODS {
        let cache = cache.clone();
        // Tokens live 24 h and the kubelet rotates them: each ask presents a current one.
        pods.spawn(async move {
            let mut failed = 0;
            let mut at = start + EVERY.mul_f64(i as f64 / PODS as f64);
            while at < measured + DAY {
                tokio::time::sleep_until(at).await;
                let id = identity(
                    &format!("t{i}-{}", at.elapsed().as_nanos()),
                    "sa",
                    Some(&format!("pod-{i}")),
                );
                if cache.get(&id).await.is_err() && at >= measured {
                    failed += 1;
                }
                at += EVERY;
            }
            failed
        });
    }
    let mut failed = 0;
    while let Some(n) = pods.join_next().await {
        failed += n.unwrap();
    }
    let calls = backend
        .call_times()
        .iter()
        .filter(|t| **t >= measured)
        .count();
    (calls, failed)
}

#[tokio::test(start_paused = true)]
async fn a_day_of_sdk_access_costs_one_call_per_ask_and_survives_any_two_hour_outage() {
    let (calls, failed) = sdk_day(None).await;
    eprintln!("sdk day: {calls} upstream calls for 100 pods asking every 5 h");
    assert_eq!(failed, 0);
    // Each ask comes after the previous fetch's refresh point (3 h), so it refetches: 4 or
    // 5 asks per pod in the day; nothing in between, because nobody asks in between. A
    // policy that refreshes every entry at its refresh point would make 8 per pod.
    assert!((400..=500).contains(&calls), "{calls}");
    for hour in 0..23 {
        let (_, failed) = sdk_day(Some(HOUR * hour)).await;
        assert_eq!(
            failed, 0,
            "a 2-hour outage from hour {hour} failed {failed} requests"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn pod_churn_past_the_size_bound_keeps_the_timers_bounded_by_the_cache() {
    // 500 entries at most; 6 rounds of 2,000 new pods each, as a node with heavy churn sees.
    // Every evicted entry leaves a timer behind, due hours later: the heap must drop them,
    // not keep one per pod ever seen (12,000 here).
    let (_backend, cache) = bed_with(Duration::ZERO, 500, 3 * HOUR);
    let mut most = 0;
    for round in 0..6 {
        for i in 0..2_000 {
            let uid = format!("r{round}-p{i}");
            cache
                .get(&identity(&format!("t-{uid}"), "sa", Some(&uid)))
                .await
                .unwrap();
        }
        most = most.max(cache.timers.len());
    }
    assert!(cache.entry_count() <= 500);
    assert!(most <= 4 * 1024, "{most} timers for at most 500 entries");
}
