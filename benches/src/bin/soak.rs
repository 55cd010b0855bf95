//! The soak tool: the release agent under sustained load for minutes, while its upstream
//! fails on a schedule, pods rotate their tokens and come and go, and associations are
//! removed. It reports what a node would have seen and fails (exit 1) on what must never
//! happen:
//!
//! - a client got credentials issued to another pod (the fake's ledger says whose each key is);
//! - a request took longer than the agent's 5 s budget (plus scheduling slack), or hung;
//! - credentials were served already expired, or for a removed association after its grace;
//! - the agent's anonymous memory (heap and stacks, `RssAnon`) kept growing: the peak of the
//!   last quarter is over 120 % (+ 5 MiB) of the peak of the second quarter. Total RSS is
//!   reported too, but it also counts the binary's pages, which grow as more code runs;
//! - the agent exited.
//!
//! ```text
//! cargo build --release -p pod-identity-agent -p benches
//! cargo run --release -p benches --bin soak -- --duration 10m
//! ```
//!
//! Faults cycle through healthy, 5xx, healthy, hang, healthy, throttle, healthy, slow (1.5 s),
//! each `--phase` long. Credentials live `--credential-lifetime` (default 5 min, so the
//! agent refreshes them during the run and must ride out every outage on what it has).

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use benches::client::{Connection, Target};
use benches::fake_upstream::{FakeUpstream, Fault};
use benches::pods::{service_account, Alg, Issuer, Pod, SERVICE_ACCOUNT_COUNT};
use benches::process::{self, ChildProcess};
use benches::report::thousands;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use hyper::header::HeaderValue;
use hyper::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const CLUSTER: &str = "soak";
/// The agent answers within 5 s by contract; a loaded 2-core machine gets one more second.
const DEADLINE: Duration = Duration::from_secs(6);
/// Latency of the "slow" phase: under the agent's 2 s attempt timeout.
const SLOW_LATENCY: Duration = Duration::from_millis(1500);
/// After an association is removed, the agent may serve what it has until its next refresh
/// (EKS Auth) or not at all (STS, which re-reads the file within seconds).
const REMOVAL_GRACE_STS: Duration = Duration::from_secs(10);
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Under a profiler the agent starts (and stops) far more slowly.
const WRAPPED_READY_TIMEOUT: Duration = Duration::from_secs(120);
const WRAPPED_GRACE: Duration = Duration::from_secs(60);
const RSS_GROWTH_RATIO: f64 = 1.2;
const RSS_GROWTH_SLACK_KIB: u64 = 5 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backend {
    EksAuth,
    Sts,
}

#[derive(Debug, Parser)]
#[command(about = "Soak the agent: load, upstream faults, token rotation, pod churn, removals")]
struct Args {
    /// How long to run (at most 2h).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Pods on the node at any time.
    #[arg(long, default_value_t = 300)]
    pods: usize,
    /// Requests per second over all pods.
    #[arg(long, default_value_t = 400)]
    rate: u32,
    /// Concurrent client connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Which upstream the agent talks to.
    #[arg(long, value_enum, default_value = "eks-auth")]
    backend: Backend,
    /// Lifetime of the credentials the fake issues.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    credential_lifetime: Duration,
    /// Length of each fault phase.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    phase: Duration,
    /// Every pod's token is re-signed this often (kubelet rotation).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    rotate_every: Duration,
    /// Share of the pods replaced by new pods every minute.
    #[arg(long, default_value_t = 0.1)]
    churn: f64,
    /// Service accounts whose association is removed at half time (of 64).
    #[arg(long, default_value_t = 6)]
    remove: usize,
    /// RSS sampling interval.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    sample_every: Duration,
    /// The agent binary (default: next to this executable).
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// Run the agent under this command, split on spaces (for profiling, e.g.
    /// "valgrind --tool=massif --massif-out-file=/tmp/massif.soak.%p").
    #[arg(long)]
    agent_wrapper: Option<String>,
}

impl Args {
    fn validate(&self) -> Result<(), String> {
        if self.duration < Duration::from_secs(10) || self.duration > Duration::from_secs(7200) {
            return Err("--duration: must be between 10s and 2h".into());
        }
        if self.pods == 0 || self.pods > 20_000 {
            return Err("--pods: must be between 1 and 20000".into());
        }
        if self.connections == 0 || self.connections > 1000 {
            return Err("--connections: must be between 1 and 1000".into());
        }
        if self.rate == 0 {
            return Err("--rate: must be positive".into());
        }
        if self.credential_lifetime < Duration::from_secs(60) {
            return Err("--credential-lifetime: must be at least 60s".into());
        }
        if !(0.0..=1.0).contains(&self.churn) {
            return Err("--churn: must be between 0 and 1".into());
        }
        if self.remove > SERVICE_ACCOUNT_COUNT {
            return Err(format!(
                "--remove: there are {SERVICE_ACCOUNT_COUNT} service accounts"
            ));
        }
        Ok(())
    }
}

/// One slot of the node: the pod in it now and its current token.
struct Slot {
    pod: Pod,
    token: HeaderValue,
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    by_status: BTreeMap<u16, u64>,
    transport_errors: u64,
    over_deadline: u64,
    cross_pod: u64,
    unknown_keys: u64,
    expired_served: u64,
    served_after_removal: u64,
    examples: Vec<String>,
}

impl Tally {
    fn example(&mut self, what: String) {
        if self.examples.len() < 10 {
            self.examples.push(what);
        }
    }
}

/// Service accounts (namespace, name) whose association was removed, and when.
type Removal = (Vec<(String, String)>, Instant);

struct Shared {
    fake: FakeUpstream,
    slots: Vec<RwLock<Slot>>,
    tally: Mutex<Tally>,
    latency: Mutex<Histogram<u64>>,
    /// Service accounts removed, and when.
    removed: RwLock<Option<Removal>>,
    removal_grace: Duration,
    stop: AtomicBool,
    next_slot: AtomicU64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = args.validate() {
        eprintln!("{e}");
        return ExitCode::from(64);
    }
    process::kill_children_on_panic();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("soak: {e}");
            return ExitCode::from(70);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("soak: {e}");
            ExitCode::from(70)
        }
    }
}

/// The associations file for the STS backend: every service account, minus `removed`.
fn associations_yaml(removed: &[(String, String)]) -> String {
    let mut out = String::from("associations:\n");
    for (ns, sa) in (0..SERVICE_ACCOUNT_COUNT).map(service_account) {
        if removed.iter().any(|(n, s)| *n == ns && *s == sa) {
            continue;
        }
        out.push_str(&format!(
            "  - namespace: {ns}\n    serviceAccount: {sa}\n    roleArn: arn:aws:iam::111122223333:role/{ns}-{sa}\n"
        ));
    }
    out
}

async fn run(args: Args) -> Result<bool, BoxError> {
    let agent_bin = process::locate_agent(args.agent_bin.as_deref())?;
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("pod-identity-agent-soak-")
        .tempdir()?;
    let issuer = Arc::new(Issuer::generate(Alg::Es256)?);
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, issuer.jwks())?;
    let associations = dir.path().join("associations.yaml");
    std::fs::write(&associations, associations_yaml(&[]))?;
    let fake = FakeUpstream::start_with_ledger(CLUSTER, Duration::ZERO).await?;
    fake.set_lifetime(args.credential_lifetime);

    let port = process::free_port()?;
    let metrics_port = process::free_port()?;
    let mut cmd = process::wrapped_command(&agent_bin, args.agent_wrapper.as_deref());
    cmd.arg("server")
        .args(["--cluster-name", CLUSTER, "--bind-hosts", "127.0.0.1"])
        .args(["--port", &port.to_string(), "--probe-port", "0"])
        .args(["--metrics-address", "127.0.0.1"])
        .args(["--metrics-port", &metrics_port.to_string()])
        .args(["--region", "us-west-2"])
        .arg("--jwks-file")
        .arg(&jwks)
        .args(["--issuer", benches::pods::ISSUER])
        .args(["--caller-rate-limit", "0", "--global-rate-limit", "0"])
        .args(["--log-format", "json", "--log-level", "warn"]);
    process::isolate_agent(&mut cmd);
    match args.backend {
        Backend::EksAuth => {
            cmd.args(["--endpoint", &fake.endpoint()]);
        }
        Backend::Sts => {
            cmd.args(["--backend", "sts", "--sts-endpoint", &fake.endpoint()])
                .arg("--associations")
                .arg(&associations);
        }
    }
    let mut agent = ChildProcess::spawn("agent", cmd)?;
    let ready_timeout = if args.agent_wrapper.is_some() {
        agent.set_grace(WRAPPED_GRACE);
        WRAPPED_READY_TIMEOUT
    } else {
        READY_TIMEOUT
    };
    let target = Target::new(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));

    // Pods and their first tokens.
    let mut generation = 0u64;
    let pods: Vec<Pod> = Pod::batch("soak-0", args.pods);
    let tokens = issuer.tokens(&pods).await?;
    let slots = pods
        .into_iter()
        .zip(tokens)
        .map(|(pod, token)| {
            Ok(RwLock::new(Slot {
                pod,
                token: HeaderValue::from_str(&token)?,
            }))
        })
        .collect::<Result<Vec<_>, BoxError>>()?;
    let removal_grace = match args.backend {
        // The agent drops a revoked entry at its next refresh, at most half a lifetime away
        // (plus the refresh jitter and one refresh-retry backoff).
        Backend::EksAuth => args.credential_lifetime / 2 + Duration::from_secs(60),
        Backend::Sts => REMOVAL_GRACE_STS,
    };
    let shared = Arc::new(Shared {
        fake,
        slots,
        tally: Mutex::new(Tally::default()),
        latency: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
        removed: RwLock::new(None),
        removal_grace,
        stop: AtomicBool::new(false),
        next_slot: AtomicU64::new(0),
    });

    wait_ready(&mut agent, &target, &shared, ready_timeout).await?;
    eprintln!(
        "[{:>6.1}s] agent up (pid {}), {:?} backend, {} pods, {} req/s over {} connections, \
         credentials live {:?}, {:?} phases",
        started.elapsed().as_secs_f64(),
        agent.pid(),
        args.backend,
        args.pods,
        args.rate,
        args.connections,
        args.credential_lifetime,
        args.phase
    );

    // Clients.
    let mut clients = tokio::task::JoinSet::new();
    let per_client = Duration::from_secs_f64(args.connections as f64 / f64::from(args.rate));
    for _ in 0..args.connections {
        clients.spawn(client(shared.clone(), target.clone(), per_client));
    }

    // The schedule: faults, rotations, churn, removal, RSS samples.
    let schedule = [
        Fault::Healthy,
        Fault::ServerError,
        Fault::Healthy,
        Fault::Hang,
        Fault::Healthy,
        Fault::Throttle,
        Fault::Healthy,
        Fault::Healthy, // slow
    ];
    // (elapsed, RSS KiB, anonymous RSS KiB)
    let mut rss: Vec<(Duration, u64, u64)> = Vec::new();
    let mut phase_index = usize::MAX;
    let mut last_rotation = Instant::now();
    let mut last_churn = Instant::now();
    let mut last_sample = Instant::now() - args.sample_every;
    let mut fault_seconds: BTreeMap<&'static str, f64> = BTreeMap::new();
    let begin = Instant::now();
    let mut agent_died = None;
    let tick = Duration::from_millis(250);
    while begin.elapsed() < args.duration {
        let elapsed = begin.elapsed();
        let index = (elapsed.as_secs_f64() / args.phase.as_secs_f64()) as usize % schedule.len();
        if index != phase_index {
            phase_index = index;
            let fault = schedule[index];
            shared.fake.set_fault(fault);
            let slow = index == schedule.len() - 1;
            shared
                .fake
                .set_latency(if slow { SLOW_LATENCY } else { Duration::ZERO });
            eprintln!(
                "[{:>6.1}s] phase: {}",
                started.elapsed().as_secs_f64(),
                if slow { "slow" } else { fault.name() }
            );
        }
        let name = if phase_index == schedule.len() - 1 {
            "slow"
        } else {
            schedule[phase_index].name()
        };
        *fault_seconds.entry(name).or_default() += tick.as_secs_f64();

        if last_rotation.elapsed() >= args.rotate_every {
            last_rotation = Instant::now();
            rotate_tokens(&shared, &issuer).await?;
        }
        if last_churn.elapsed() >= Duration::from_secs(60) {
            last_churn = Instant::now();
            generation += 1;
            churn(&shared, &issuer, args.churn, generation).await?;
        }
        if elapsed >= args.duration / 2 && shared.removed.read().is_ok_and(|r| r.is_none()) {
            let removed: Vec<(String, String)> = (0..args.remove).map(service_account).collect();
            for (ns, sa) in &removed {
                shared.fake.remove_association(ns, sa);
            }
            if args.backend == Backend::Sts {
                std::fs::write(&associations, associations_yaml(&removed))?;
            }
            eprintln!(
                "[{:>6.1}s] removed {} associations",
                started.elapsed().as_secs_f64(),
                removed.len()
            );
            if let Ok(mut slot) = shared.removed.write() {
                *slot = Some((removed, Instant::now()));
            }
        }
        if last_sample.elapsed() >= args.sample_every {
            last_sample = Instant::now();
            if let (Some(total), Some(anon)) = (agent.rss_kib(), agent.anon_rss_kib()) {
                rss.push((elapsed, total, anon));
            }
        }
        if let Some(status) = agent.exited() {
            agent_died = Some(status.to_string());
            break;
        }
        tokio::time::sleep(tick).await;
    }
    shared.fake.set_fault(Fault::Healthy);
    shared.fake.set_latency(Duration::ZERO);
    shared.stop.store(true, Ordering::Relaxed);
    while let Some(joined) = clients.join_next().await {
        joined?;
    }
    if let (Some(total), Some(anon)) = (agent.rss_kib(), agent.anon_rss_kib()) {
        rss.push((begin.elapsed(), total, anon));
    }
    let metrics = scrape(metrics_port).await.unwrap_or_default();
    agent.stop();

    Ok(report(
        &args,
        &shared,
        &rss,
        &metrics,
        &fault_seconds,
        agent_died,
        begin.elapsed(),
    ))
}

async fn wait_ready(
    agent: &mut ChildProcess,
    target: &Target,
    shared: &Shared,
    limit: Duration,
) -> Result<(), BoxError> {
    let token = shared.slots[0]
        .read()
        .map_err(|_| "poisoned")?
        .token
        .clone();
    let until = Instant::now() + limit;
    let mut last = String::from("no answer");
    while Instant::now() < until {
        if let Some(status) = agent.exited() {
            return Err(format!("agent exited ({status}): {:?}", agent.log().1).into());
        }
        if let Ok(mut conn) = target.connect().await {
            match target.get(&mut conn, &token).await {
                Ok(reply) if reply.status == StatusCode::OK => return Ok(()),
                Ok(reply) => {
                    last = format!("{} {}", reply.status, String::from_utf8_lossy(&reply.body))
                }
                Err(e) => last = e.to_string(),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("agent not ready in {limit:?}: {last}; {:?}", agent.log().1).into())
}

/// Re-sign every pod's token (same pod, new `jti`, `iat`, `exp`).
async fn rotate_tokens(shared: &Shared, issuer: &Arc<Issuer>) -> Result<(), BoxError> {
    let pods: Vec<Pod> = shared
        .slots
        .iter()
        .filter_map(|s| s.read().ok().map(|s| s.pod.clone()))
        .collect();
    let tokens = issuer.tokens(&pods).await?;
    for (slot, token) in shared.slots.iter().zip(tokens) {
        if let Ok(mut slot) = slot.write() {
            slot.token = HeaderValue::from_str(&token)?;
        }
    }
    Ok(())
}

/// Replace `share` of the pods with new ones (new names and UIDs, same service accounts).
async fn churn(
    shared: &Shared,
    issuer: &Arc<Issuer>,
    share: f64,
    generation: u64,
) -> Result<(), BoxError> {
    let count = (shared.slots.len() as f64 * share).round() as usize;
    let offset = (generation as usize * count) % shared.slots.len().max(1);
    let batch = format!("soak-{generation}");
    for i in 0..count {
        let index = (offset + i) % shared.slots.len();
        let pod = Pod::numbered(&batch, index);
        let token = HeaderValue::from_str(&issuer.token(&pod)?)?;
        if let Ok(mut slot) = shared.slots[index].write() {
            *slot = Slot { pod, token };
        }
    }
    Ok(())
}

/// One client connection: round-robin over the pods at its share of the rate.
async fn client(shared: Arc<Shared>, target: Target, interval: Duration) {
    let mut conn: Option<Connection> = None;
    let mut next = tokio::time::Instant::now();
    while !shared.stop.load(Ordering::Relaxed) {
        next += interval;
        tokio::time::sleep_until(next).await;
        let index = shared.next_slot.fetch_add(1, Ordering::Relaxed) as usize % shared.slots.len();
        let Some((pod, token)) = shared.slots[index]
            .read()
            .ok()
            .map(|s| (s.pod.clone(), s.token.clone()))
        else {
            continue;
        };
        if conn.is_none() {
            conn = target.connect().await.ok();
        }
        let Some(c) = conn.as_mut() else {
            record_transport_error(&shared, "connect failed".into());
            continue;
        };
        let sent = Instant::now();
        let reply = target.get(c, &token).await;
        let took = sent.elapsed();
        if let Ok(mut h) = shared.latency.lock() {
            let _ = h.record(took.as_micros().max(1) as u64);
        }
        match reply {
            Ok(reply) => check_reply(&shared, &pod, reply.status, &reply.body, took),
            Err(e) => {
                conn = None;
                record_transport_error(&shared, e.to_string());
                if took >= DEADLINE {
                    if let Ok(mut t) = shared.tally.lock() {
                        t.over_deadline += 1;
                        t.example(format!("{}: no answer after {took:?}", pod.name));
                    }
                }
            }
        }
    }
}

fn record_transport_error(shared: &Shared, what: String) {
    if let Ok(mut t) = shared.tally.lock() {
        t.transport_errors += 1;
        t.example(format!("transport: {what}"));
    }
}

fn check_reply(shared: &Shared, pod: &Pod, status: StatusCode, body: &[u8], took: Duration) {
    let Ok(mut t) = shared.tally.lock() else {
        return;
    };
    *t.by_status.entry(status.as_u16()).or_default() += 1;
    if took >= DEADLINE {
        t.over_deadline += 1;
        t.example(format!("{}: {status} after {took:?}", pod.name));
    }
    if status != StatusCode::OK {
        return;
    }
    let doc: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let key = doc["AccessKeyId"].as_str().unwrap_or_default();
    match shared.fake.issued_to(key) {
        Some(issued) if issued.pod_uid == pod.uid => {}
        Some(issued) => {
            t.cross_pod += 1;
            t.example(format!(
                "CROSS-POD: {} (uid {}) got {key}, issued to uid {}",
                pod.name, pod.uid, issued.pod_uid
            ));
        }
        None => {
            t.unknown_keys += 1;
            t.example(format!(
                "{}: got a key the upstream never issued: {key:?}",
                pod.name
            ));
        }
    }
    let expired = doc["Expiration"]
        .as_str()
        .and_then(|e| {
            aws_smithy_types::DateTime::from_str(e, aws_smithy_types::date_time::Format::DateTime)
                .ok()
        })
        .and_then(|e| SystemTime::try_from(e).ok())
        .is_none_or(|e| e <= SystemTime::now());
    if expired {
        t.expired_served += 1;
        t.example(format!(
            "{}: expired or unreadable Expiration {:?}",
            pod.name, doc["Expiration"]
        ));
    }
    if let Ok(removed) = shared.removed.read() {
        if let Some((list, at)) = removed.as_ref() {
            let gone = list
                .iter()
                .any(|(ns, sa)| *ns == pod.namespace && *sa == pod.service_account);
            if gone && at.elapsed() > shared.removal_grace {
                t.served_after_removal += 1;
                t.example(format!(
                    "{}: served {:?} after its association was removed",
                    pod.name,
                    at.elapsed()
                ));
            }
        }
    }
}

/// `GET /metrics` from the agent's metrics listener.
async fn scrape(port: u16) -> Result<String, BoxError> {
    let mut stream = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)),
    )
    .await??;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Sum of every sample of `name` (any labels), and per label set.
fn metric(metrics: &str, name: &str) -> (f64, Vec<(String, f64)>) {
    let mut total = 0.0;
    let mut parts = Vec::new();
    for line in metrics.lines().filter(|l| l.starts_with(name)) {
        let (series, value) = match line.rsplit_once(' ') {
            Some(p) => p,
            None => continue,
        };
        let rest = &series[name.len()..];
        if !(rest.is_empty() || rest.starts_with('{')) {
            continue;
        }
        if let Ok(v) = value.parse::<f64>() {
            total += v;
            parts.push((rest.to_owned(), v));
        }
    }
    (total, parts)
}

fn report(
    args: &Args,
    shared: &Shared,
    rss: &[(Duration, u64, u64)],
    metrics: &str,
    fault_seconds: &BTreeMap<&'static str, f64>,
    agent_died: Option<String>,
    ran: Duration,
) -> bool {
    let Ok(t) = shared.tally.lock() else {
        return false;
    };
    let answered: u64 = t.by_status.values().sum();
    println!(
        "\n== soak: {:?} backend, {:.0} s",
        args.backend,
        ran.as_secs_f64()
    );
    println!(
        "requests: {} answered ({:.0}/s), {} transport errors",
        thousands(answered),
        answered as f64 / ran.as_secs_f64(),
        t.transport_errors
    );
    for (status, n) in &t.by_status {
        println!(
            "  status {status}: {:>9} ({:.3} %)",
            thousands(*n),
            100.0 * *n as f64 / answered.max(1) as f64
        );
    }
    if let Ok(h) = shared.latency.lock() {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "latency: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.1} ms",
            ms(0.5),
            ms(0.99),
            ms(0.999),
            h.max() as f64 / 1000.0
        );
    }
    let phases: Vec<String> = fault_seconds
        .iter()
        .map(|(k, v)| format!("{k} {v:.0} s"))
        .collect();
    println!("upstream phases: {}", phases.join(", "));
    println!(
        "upstream calls received by the fake: {}",
        thousands(shared.fake.calls())
    );
    for (name, label) in [
        (
            "pod_identity_agent_upstream_calls_total",
            "agent upstream calls",
        ),
        ("pod_identity_agent_refreshes_total", "background refreshes"),
        ("pod_identity_agent_stale_serves_total", "stale serves"),
        ("pod_identity_agent_cache_evictions_total", "evictions"),
        ("pod_identity_agent_upstream_busy_total", "upstream busy"),
        (
            "pod_identity_agent_cache_entries",
            "cache entries at the end",
        ),
        ("pod_identity_agent_cache_hits_total", "cache hits"),
        (
            "pod_identity_agent_cache_misses_total",
            "request-path fetches",
        ),
        (
            "pod_identity_agent_refresh_budget_qps",
            "refresh budget at the end",
        ),
    ] {
        let (total, parts) = metric(metrics, name);
        let detail: Vec<String> = parts
            .iter()
            .filter(|(l, _)| !l.is_empty())
            .map(|(l, v)| format!("{l} {v}"))
            .collect();
        println!("{label}: {total}  {}", detail.join(" "));
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    let series: Vec<String> = rss
        .iter()
        .map(|(at, total, anon)| {
            format!(
                "{:.0}s={:.1}/{:.1}",
                at.as_secs_f64(),
                mib(*total),
                mib(*anon)
            )
        })
        .collect();
    println!("RSS/anonymous MiB over time: {}", series.join(" "));

    let mut failures = Vec::new();
    let quarter = |from: f64, to: f64| {
        rss.iter()
            .filter(|(at, _, _)| {
                let f = at.as_secs_f64() / ran.as_secs_f64().max(1.0);
                f >= from && f <= to
            })
            .map(|(_, _, anon)| *anon)
            .max()
    };
    if let (Some(second), Some(last)) = (quarter(0.25, 0.5), quarter(0.75, 1.0)) {
        let limit = (second as f64 * RSS_GROWTH_RATIO) as u64 + RSS_GROWTH_SLACK_KIB;
        println!(
            "anonymous memory peak: second quarter {:.1} MiB, last quarter {:.1} MiB (limit {:.1} MiB)",
            mib(second),
            mib(last),
            mib(limit)
        );
        if last > limit {
            failures.push(format!(
                "anonymous memory grew: {:.1} MiB at the end against {:.1} MiB in the second quarter",
                mib(last),
                mib(second)
            ));
        }
    }
    if let Some(died) = agent_died {
        failures.push(format!("the agent exited: {died}"));
    }
    for (n, what) in [
        (t.cross_pod, "answers carried another pod's credentials"),
        (
            t.unknown_keys,
            "answers carried keys the upstream never issued",
        ),
        (t.over_deadline, "requests took longer than 6 s"),
        (t.expired_served, "answers carried expired credentials"),
        (
            t.served_after_removal,
            "answers served a removed association past its grace",
        ),
    ] {
        println!("{what}: {n}");
        if n > 0 {
            failures.push(format!("{n} {what}"));
        }
    }
    for e in &t.examples {
        println!("  e.g. {e}");
    }
    if failures.is_empty() {
        println!("soak: PASSED");
        true
    } else {
        for f in &failures {
            println!("soak: FAILED: {f}");
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_checked() {
        let parse = |a: &[&str]| {
            let mut argv = vec!["soak"];
            argv.extend_from_slice(a);
            Args::try_parse_from(argv)
                .map_err(|e| e.to_string())
                .and_then(|a| a.validate().map(|_| a))
        };
        assert!(parse(&[]).is_ok());
        assert!(parse(&["--duration", "3h"]).is_err());
        assert!(parse(&["--credential-lifetime", "10s"]).is_err());
        assert!(parse(&["--churn", "2"]).is_err());
        assert!(parse(&["--backend", "sts", "--duration", "1m"]).is_ok());
    }

    #[test]
    fn associations_file_leaves_out_removed_service_accounts() {
        let all = associations_yaml(&[]);
        let parsed = pod_identity_agent::credentials::associations::parse(&all, "a.yaml").unwrap();
        assert_eq!(parsed.len(), SERVICE_ACCOUNT_COUNT);
        let some = associations_yaml(&[("team-00".into(), "app-0".into())]);
        let parsed = pod_identity_agent::credentials::associations::parse(&some, "a.yaml").unwrap();
        assert_eq!(parsed.len(), SERVICE_ACCOUNT_COUNT - 1);
    }

    #[test]
    fn metrics_are_summed_by_name() {
        let text = "a_total{x=\"1\"} 2\na_total{x=\"2\"} 3\na_total_other 7\n# HELP a\n";
        let (total, parts) = metric(text, "a_total");
        assert_eq!(total, 5.0);
        assert_eq!(parts.len(), 2);
    }
}
