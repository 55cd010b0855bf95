//! One whole request, in process: `Agent::start` on 127.0.0.1:0 against the EKS Auth fake,
//! and one keep-alive `GET /v1/credentials` for a pod already cached, per iteration, from a
//! hyper client running as a task on the same runtime. Everything a cache hit costs is in it: hyper on both
//! sides, the route and header checks, verification, the cache, encoding, metrics.
//!
//! `cargo bench -p benches --bench request`

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use benches::client::{header_values, Target};
use benches::fake_upstream::FakeUpstream;
use benches::pods::{Alg, Issuer, Pod, ISSUER};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hyper::StatusCode;
use pod_identity_agent::config::{
    Config, KeySource, ListenConfig, RequestLimits, StaticUpstreamCredentials, UpstreamConfig,
};
use pod_identity_agent::Agent;

/// Bound on the agent becoming ready (keys loaded from the file, first fetch done).
const READY_TIMEOUT: Duration = Duration::from_secs(20);

fn whole_request(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(benches::agent_worker_threads())
        .enable_all()
        .build()
        .expect("tokio runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut group = c.benchmark_group("request");
    group.throughput(Throughput::Elements(1));
    for alg in [Alg::Rs256, Alg::Es256] {
        let issuer = Issuer::generate(alg).expect("signing key");
        let jwks = dir.path().join(format!("jwks-{}.json", alg.name()));
        std::fs::write(&jwks, issuer.jwks()).expect("write JWKS");
        let token = issuer.token(&Pod::numbered("request", 0)).expect("sign");
        let token = header_values(&[token]).expect("header value").remove(0);
        let (agent, _fake, target) = rt.block_on(async {
            let fake = FakeUpstream::start("bench", Duration::ZERO)
                .await
                .expect("EKS Auth fake");
            let config = Config {
                upstream: UpstreamConfig {
                    cluster_name: "bench".into(),
                    endpoint: Some(fake.endpoint()),
                    region: Some("us-west-2".into()),
                    static_upstream_credentials: Some(StaticUpstreamCredentials {
                        access_key_id: "AKIDBENCHFAKE".into(),
                        secret_access_key: "bench-fake-secret".into(),
                    }),
                    ..UpstreamConfig::default()
                },
                listen: ListenConfig {
                    credential_listeners: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 0))],
                    // A benchmark is one caller sending as fast as it can: limits off.
                    limits: RequestLimits {
                        caller_rate: 0.0,
                        caller_burst: 0.0,
                        global_rate: 0.0,
                        global_burst: 0.0,
                    },
                    ..ListenConfig::default()
                },
                key_source: Some(KeySource::File(jwks.clone())),
                issuer: Some(ISSUER.into()),
                ..Config::default()
            };
            let agent = Agent::start(config).await.expect("agent starts");
            let addr = *agent
                .credential_addrs()
                .first()
                .expect("a credentials address");
            (agent, fake, Target::new(addr))
        });
        let conn = rt.block_on(async {
            let until = Instant::now() + READY_TIMEOUT;
            loop {
                let mut conn = target.connect().await.expect("connect");
                let reply = target.get(&mut conn, &token).await.expect("request");
                if reply.status == StatusCode::OK {
                    break conn;
                }
                assert!(Instant::now() < until, "agent not ready: {}", reply.status);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        // The client runs as a task on the agent's runtime, not on the thread that calls
        // `block_on`: a request then costs what it costs a pod, without a hand-off to a
        // thread outside the runtime on every response.
        let mut conn = Some(conn);
        group.bench_function(BenchmarkId::new("credentials_cache_hit", alg.name()), |b| {
            b.iter_custom(|iters| {
                let mut c = conn
                    .take()
                    .expect("connection is returned after each batch");
                let (target, token) = (target.clone(), token.clone());
                let client = rt.spawn(async move {
                    let started = Instant::now();
                    for _ in 0..iters {
                        let reply = target.get(&mut c, &token).await.expect("request");
                        assert_eq!(reply.status, StatusCode::OK);
                    }
                    (c, started.elapsed())
                });
                let (c, spent) = rt.block_on(client).expect("client task");
                conn = Some(c);
                spent
            })
        });
        drop(conn);
        rt.block_on(agent.shutdown(Duration::from_secs(2)));
    }
    group.finish();
}

criterion_group!(request, whole_request);
criterion_main!(request);
