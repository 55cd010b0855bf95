//! The per-request work of a cache hit, piece by piece, through the agent library's public
//! API: token verification, caller attestation, the cache lookup, and encoding the response.
//!
//! `cargo bench -p benches --bench hot_paths`
//!
//! Verification is measured two ways. "cold": a different token every iteration (a pool of
//! 256 cycled), the cost of a token the verifier has not seen; the verifier remembers the
//! tokens it verified (by digest), so it is replaced, untimed, after every pass over the pool.
//! "repeat": the same token every time, which is what a pod's SDK sends until kubelet
//! rotates it, and what that memory is for.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use benches::fake_upstream::fake_credentials;
use benches::pods::{Alg, Issuer, Pod, ISSUER};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kube::runtime::watcher::Event;
use pod_identity_agent::config::{AuditConfig, CacheScope, DEFAULT_AUDIENCE};
use pod_identity_agent::credentials::cache::{CacheSettings, CredentialCache};
use pod_identity_agent::credentials::upstream::{Backend, Credentials, FetchFuture};
use pod_identity_agent::edge::http::credentials_response;
use pod_identity_agent::identity::attest::{Attestation, NodeBinding};
use pod_identity_agent::identity::keys::{KeySet, KeyStore};
use pod_identity_agent::identity::pod_object::PodObject;
use pod_identity_agent::identity::pods::NodePods;
use pod_identity_agent::identity::token::{Identity, Token, VerifiedClaims, Verifier};
use pod_identity_agent::lifecycle::audit::AuditLog;
use pod_identity_agent::metrics::Metrics;
use std::hint::black_box;

/// Distinct tokens of the "cold" case: enough that the CPU caches do not keep them all hot,
/// few enough to sign quickly.
const COLD_POOL: usize = 256;
/// Pods in the larger cache of the lookup bench: the agent's default `--max-cache-size`.
const CACHED_PODS: usize = 2000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn verifier_for(issuer: &Issuer) -> Verifier {
    let set = KeySet::from_jwks(issuer.jwks().as_bytes()).expect("issuer JWKS parses");
    Verifier::new(
        Some(KeyStore::fixed(set, Metrics::new())),
        Some(ISSUER.into()),
        vec![DEFAULT_AUDIENCE.into()],
    )
}

fn verify(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("verify");
    group.throughput(Throughput::Elements(1));
    for alg in [Alg::Rs256, Alg::Es256] {
        let issuer = Issuer::generate(alg).expect("signing key");
        let pool: Vec<String> = (0..COLD_POOL)
            .map(|i| issuer.token(&Pod::numbered("verify", i)).expect("sign"))
            .collect();
        let check = verifier_for(&issuer);
        for token in &pool {
            rt.block_on(check.verify(token))
                .expect("pool tokens verify");
        }
        // A verifier sees each pool token once: after a pass over the pool it is replaced,
        // outside the timed region, so no token is ever found among its verified ones.
        let mut verifier = verifier_for(&issuer);
        let mut next = 0;
        group.bench_function(BenchmarkId::new("cold", alg.name()), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        if next == COLD_POOL {
                            verifier = verifier_for(&issuer);
                            next = 0;
                        }
                        let token = &pool[next];
                        next += 1;
                        let started = Instant::now();
                        let _ = black_box(verifier.verify(token).await);
                        spent += started.elapsed();
                    }
                    spent
                })
            })
        });
        let token = &pool[0];
        group.bench_function(BenchmarkId::new("repeat", alg.name()), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let started = Instant::now();
                    for _ in 0..iters {
                        let _ = black_box(verifier.verify(black_box(token)).await);
                    }
                    started.elapsed()
                })
            })
        });
    }
    group.finish();
}

/// Always the same credentials, at once: the cache's own cost is all that is measured.
struct FixedBackend(Credentials);

impl Backend for FixedBackend {
    fn fetch<'a>(&'a self, _identity: &'a Identity) -> FetchFuture<'a> {
        Box::pin(async move { Ok(self.0.clone()) })
    }
}

/// A verified identity of `pod`, as the verifier would have produced it.
fn identity(issuer: &Issuer, pod: &Pod) -> Identity {
    let raw = issuer.token(pod).expect("sign");
    Identity {
        token: Token::new(&raw),
        verified: Some(std::sync::Arc::new(VerifiedClaims {
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
            pod_name: Some(pod.name.clone()),
            pod_uid: Some(pod.uid.clone()),
            node_name: None,
            audiences: vec![DEFAULT_AUDIENCE.into()],
        })),
        expires_at: Some(SystemTime::now() + Duration::from_secs(24 * 3600)),
    }
}

/// A pod-scoped cache whose backend answers at once.
fn bench_cache() -> Arc<CredentialCache> {
    let creds = fake_credentials(1, SystemTime::now() + Duration::from_secs(3600));
    CredentialCache::new(
        Arc::new(FixedBackend(creds)),
        CacheSettings {
            scope: CacheScope::Pod,
            max_entries: 20_000,
            max_retention: Duration::from_secs(3 * 3600),
            max_service_qps: 3.0,
            max_upstream_concurrency: 32,
        },
        Metrics::new(),
    )
}

fn cache_hit(c: &mut Criterion) {
    let rt = runtime();
    // ES256 only to sign the 2,000 tokens quickly; the cache never looks at the signature.
    let issuer = Issuer::generate(Alg::Es256).expect("signing key");
    let cache = bench_cache();
    let identities: Vec<Identity> = (0..CACHED_PODS)
        .map(|i| identity(&issuer, &Pod::numbered("cache", i)))
        .collect();
    rt.block_on(async {
        for id in &identities {
            cache.get(id).await.expect("first fetch fills the cache");
        }
    });
    let mut group = c.benchmark_group("cache_get_hit");
    group.throughput(Throughput::Elements(1));
    group.bench_function("one_pod", |b| {
        let id = &identities[0];
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    let _ = black_box(cache.get(black_box(id)).await);
                }
                started.elapsed()
            })
        })
    });
    group.bench_function(BenchmarkId::new("cycling_pods", CACHED_PODS), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for i in 0..iters as usize {
                    let _ = black_box(cache.get(&identities[i % CACHED_PODS]).await);
                }
                started.elapsed()
            })
        })
    });
    group.finish();
}

/// The cache-hit path with the audit log on and off (`--audit-log`): a hit whose delivery was
/// recorded already does one more check, the extra cost of the audit log on every request
/// but a pod's first one for a key.
fn audit_hit(c: &mut Criterion) {
    let rt = runtime();
    let issuer = Issuer::generate(Alg::Es256).expect("signing key");
    let cache = bench_cache();
    let identities: Vec<Identity> = (0..CACHED_PODS)
        .map(|i| identity(&issuer, &Pod::numbered("audit", i)))
        .collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let audit = AuditLog::start(
        &AuditConfig {
            path: dir.path().join("audit.log"),
            max_size: 1 << 30,
            max_files: 1,
        },
        CacheScope::Pod,
        Some("node-bench".into()),
        Metrics::new(),
    );
    rt.block_on(async {
        for (i, id) in identities.iter().enumerate() {
            let (creds, delivery) = cache
                .serve(id, None)
                .await
                .expect("first fetch fills the cache");
            audit
                .deliver(id, &creds, delivery, pod_ip(i))
                .await
                .expect("first delivery recorded");
        }
    });
    let mut group = c.benchmark_group("cache_hit_audit");
    group.throughput(Throughput::Elements(1));
    for (name, pods) in [("one_pod", 1), ("cycling_pods_2000", CACHED_PODS)] {
        group.bench_function(BenchmarkId::new("off", name), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let started = Instant::now();
                    for i in 0..iters as usize {
                        let id = &identities[i % pods];
                        let _ = black_box(cache.serve(black_box(id), None).await);
                    }
                    started.elapsed()
                })
            })
        });
        group.bench_function(BenchmarkId::new("on", name), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let started = Instant::now();
                    for i in 0..iters as usize {
                        let id = &identities[i % pods];
                        // As the request path does it: the claim, and a record only for a
                        // first delivery (none here: every pod's was recorded above).
                        if let Ok((creds, delivery)) = cache.serve(black_box(id), None).await {
                            if let Some(claimed) = audit.claim(id, &creds) {
                                let source = pod_ip(i % pods);
                                let recorded = audit.record(claimed, &creds, delivery, source);
                                let _ = black_box(recorded.await);
                            }
                        }
                    }
                    started.elapsed()
                })
            })
        });
    }
    group.finish();
    // Criterion times "off" and "on" minutes apart, and on a shared machine the drift between
    // them can exceed the difference sought: here the two take turns in short rounds, and the
    // median of the per-round differences is the audit log's cost of a recorded hit.
    for (name, pods) in [("one_pod", 1), ("cycling_pods_2000", CACHED_PODS)] {
        const ROUNDS: usize = 41;
        const PER_ROUND: usize = 20_000;
        let mut off = Vec::with_capacity(ROUNDS);
        let mut on = Vec::with_capacity(ROUNDS);
        rt.block_on(async {
            for _ in 0..ROUNDS {
                let started = Instant::now();
                for i in 0..PER_ROUND {
                    let _ = black_box(cache.serve(black_box(&identities[i % pods]), None).await);
                }
                off.push(started.elapsed().as_nanos() as f64 / PER_ROUND as f64);
                let started = Instant::now();
                for i in 0..PER_ROUND {
                    let id = &identities[i % pods];
                    if let Ok((creds, delivery)) = cache.serve(black_box(id), None).await {
                        if let Some(claimed) = audit.claim(id, &creds) {
                            let source = pod_ip(i % pods);
                            let _ =
                                black_box(audit.record(claimed, &creds, delivery, source).await);
                        }
                    }
                }
                on.push(started.elapsed().as_nanos() as f64 / PER_ROUND as f64);
            }
        });
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let mut extra: Vec<f64> = on.iter().zip(&off).map(|(a, b)| a - b).collect();
        println!(
            "cache_hit_audit {name}: off {:.1} ns, on {:.1} ns, extra {:.1} ns (medians of {ROUNDS} alternating rounds)",
            median(&mut off),
            median(&mut on),
            median(&mut extra)
        );
    }
    let written = std::fs::read_to_string(dir.path().join("audit.log")).unwrap_or_default();
    assert_eq!(
        written.lines().count(),
        CACHED_PODS,
        "only first deliveries were recorded"
    );
    println!(
        "audit log: {} records, {} bytes each on average",
        CACHED_PODS,
        written.len() / CACHED_PODS
    );
}

/// Pod `i`'s address: 10.x.y.1, one per pod.
fn pod_ip(i: usize) -> IpAddr {
    IpAddr::from([10, (i / 256) as u8, (i % 256) as u8, 1])
}

/// `--node-name node-a --caller-attestation pod`, its pod set filled as a first list of
/// `pods` would fill it (no API server behind it: nothing here makes a request).
fn attestation_for(pods: &[Pod]) -> Attestation {
    let client = kube::Client::try_from(kube::Config::new(
        "https://127.0.0.1:9".parse().expect("static URL"),
    ))
    .expect("client");
    let set = NodePods::new(
        "node-a".into(),
        client,
        Arc::default(),
        Metrics::new(),
        tokio::sync::mpsc::unbounded_channel().0,
    );
    set.apply(Event::Init);
    for (i, pod) in pods.iter().enumerate() {
        let object: PodObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": pod.name, "namespace": pod.namespace, "uid": pod.uid},
            "spec": {"nodeName": "node-a", "serviceAccountName": pod.service_account,
                     "containers": [{"name": "app"}]},
            "status": {"phase": "Running", "podIPs": [{"ip": pod_ip(i).to_string()}]},
        }))
        .expect("pod object");
        set.apply(Event::InitApply(object));
    }
    set.apply(Event::InitDone);
    Attestation {
        node: NodeBinding::new(Some("node-a".into()), false),
        pods: Some(set),
    }
}

/// Caller attestation's cost per request (a read-locked hash lookup and an address compare),
/// alone and on top of a cache hit: `attested/*` against `cache_get_hit/*` is the overhead.
fn attest(c: &mut Criterion) {
    let rt = runtime();
    let issuer = Issuer::generate(Alg::Es256).expect("signing key");
    let pods: Vec<Pod> = (0..CACHED_PODS)
        .map(|i| Pod::numbered("attest", i))
        .collect();
    let identities: Vec<Identity> = pods.iter().map(|p| identity(&issuer, p)).collect();
    let attestation = rt.block_on(async { attestation_for(&pods) });
    let cache = rt.block_on(async {
        let cache = bench_cache();
        for id in &identities {
            cache.get(id).await.expect("first fetch fills the cache");
        }
        cache
    });
    let mut group = c.benchmark_group("attest");
    group.throughput(Throughput::Elements(1));
    group.bench_function(BenchmarkId::new("known_pod", CACHED_PODS), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for i in 0..iters as usize {
                    let n = i % CACHED_PODS;
                    let _ = black_box(attestation.check(&identities[n], pod_ip(n)).await);
                }
                started.elapsed()
            })
        })
    });
    group.finish();
    let mut group = c.benchmark_group("cache_get_hit");
    group.throughput(Throughput::Elements(1));
    group.bench_function(
        BenchmarkId::new("attested_cycling_pods", CACHED_PODS),
        |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let started = Instant::now();
                    for i in 0..iters as usize {
                        let n = i % CACHED_PODS;
                        attestation
                            .check(&identities[n], pod_ip(n))
                            .await
                            .expect("the pod's own address");
                        let _ = black_box(cache.get(&identities[n]).await);
                    }
                    started.elapsed()
                })
            })
        },
    );
    group.finish();
}

fn encode(c: &mut Criterion) {
    let creds = fake_credentials(1, SystemTime::now() + Duration::from_secs(3600));
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("credentials_response", |b| {
        b.iter(|| black_box(credentials_response(black_box(&creds))))
    });
    group.finish();
}

criterion_group!(hot_paths, verify, cache_hit, audit_hit, attest, encode);
criterion_main!(hot_paths);
