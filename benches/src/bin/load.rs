//! `load`: the agent binary under load, next to a minimal hyper server driven by the same
//! client, with one result table per scenario.
//!
//! ```sh
//! cargo build --release -p pod-identity-agent -p benches
//! cargo run --release -p benches --bin load -- --duration 10s --connections 64 --scenario all
//! ```
//!
//! Pinned mode (the default with two or more CPUs; `--pin off` for the old way): the client
//! and the EKS Auth fake run on one CPU, the agent and the baseline each on the other, taking
//! turns, so the two sides never compete for a core. The last line is `ratio=<agent/baseline>`
//! of the steady scenario's cache-hit throughput.
//!
//! One run starts an EKS Auth fake in this process, the agent binary found next to this
//! executable as a child process (a fresh one per scenario, so scenarios do not see each
//! other's cache), and, for the steady scenarios, the baseline as a second child. Every loop
//! is bounded in time and count; all traffic stays on 127.0.0.1; the children are stopped
//! on every way out.
//!
//! Scenarios:
//! 1. `steady`: cache hits for one pod's token over N keep-alive connections, the agent and
//!    the baseline taking turns in two rounds.
//! 2. `steady-2000`: the same across 2,000 pods' tokens, after warming all 2,000.
//! 3. `cold-burst`: 1,000 new pods at once, one connection each, with the upstream taking
//!    `--upstream-latency`; time until every pod has credentials, and the upstream calls.
//! 4. `rotation`: 2,000 warm pods each present a newly signed token (same pod UID); under
//!    the default pod cache scope that must cost no upstream call.
//! 5. `memory`: the agent's RSS after 10,000 pods are cached (`--max-cache-size 20000`).

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
#![forbid(unsafe_code)]

use std::fmt::Display;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use benches::baseline;
use benches::client::{header_values, Reply, Target};
use benches::drive::{self, Stats, SteadyPlan, SweepPlan};
use benches::fake_upstream::FakeUpstream;
use benches::pods::{Alg, Issuer, Pod};
use benches::process::{self, ChildProcess};
use benches::report::{self, Row};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use hyper::header::HeaderValue;
use hyper::StatusCode;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Cluster name the agent is started with and the fake serves.
const CLUSTER: &str = "load";
/// Pods of each scenario.
const FLEET_PODS: usize = 2_000;
const BURST_PODS: usize = 1_000;
const MEMORY_PODS: usize = 10_000;
/// The memory scenario's cache must hold all its pods with room to spare.
const MEMORY_CACHE_SIZE: &str = "20000";
/// Connections that fill the cache before a measurement: the agent's default upstream
/// concurrency, so no fetch waits for a slot.
const WARM_CONNECTIONS: usize = 32;
/// A pod whose SDK is told `Retry-After` retries; botocore does up to 3 retries, JS 3,
/// and the load tool is a little more patient so a slow run still completes.
const BURST_ATTEMPTS: u32 = 10;
const STORM_ATTEMPTS: u32 = 3;
/// Bound on any one sweep (the largest, 10,000 fetches from a fast fake, takes seconds).
const SWEEP_DEADLINE: Duration = Duration::from_secs(120);
/// Bound on an agent's start: keys loaded and a first request answered.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// The same under `--agent-wrapper`: a profiler slows the agent down many times over.
const WRAPPED_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Time a wrapped agent gets to exit after SIGTERM, so a profiler can write its data.
const WRAPPED_GRACE: Duration = Duration::from_secs(60);
/// Steady runs warm up for a fifth of their duration, at most this, before measuring.
const MAX_WARMUP: Duration = Duration::from_secs(2);
/// Agent and baseline take turns this many times within one steady scenario.
const STEADY_ROUNDS: u32 = 2;
/// Lets the cache finish its bookkeeping before RSS is read.
const SETTLE: Duration = Duration::from_millis(500);
/// Targets the results are reported against (benchmarks, not assertions).
const TARGET_THROUGHPUT_RATIO: f64 = 0.9;
const TARGET_P99: Duration = Duration::from_millis(1);
const TARGET_RSS_KIB: u64 = 25 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    All,
    Steady,
    #[value(name = "steady-2000")]
    Steady2000,
    ColdBurst,
    Rotation,
    Memory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PinArg {
    /// Pinned when this process may use two or more CPUs.
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AlgArg {
    Rs256,
    Es256,
}

#[derive(Debug, Parser)]
#[command(
    name = "load",
    about = "Drive the pod-identity-agent binary and a minimal hyper baseline with the same client"
)]
struct Args {
    /// Measured time of each steady run, split over two rounds that alternate agent and
    /// baseline (each round starts with an unmeasured warm-up of a fifth of it, at most 2 s).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Keep-alive connections of the steady runs and the rotation storm.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Which scenario to run.
    #[arg(long, value_enum, default_value = "all")]
    scenario: Scenario,
    /// Client on one CPU, the server under test on another (see the module docs).
    #[arg(long, value_enum, default_value = "auto")]
    pin: PinArg,
    /// Latency of the EKS Auth fake during the cold burst (cache fills run without it).
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    upstream_latency: Duration,
    /// Signature algorithm of the pods' tokens (EKS issuers sign RS256).
    #[arg(long, value_enum, default_value = "rs256")]
    alg: AlgArg,
    /// The agent binary (default: `pod-identity-agent` next to this executable).
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// Run the agent under this command, split on spaces (for profiling, e.g.
    /// "valgrind --tool=callgrind --callgrind-out-file=/tmp/callgrind.out.%p").
    #[arg(long)]
    agent_wrapper: Option<String>,
    /// Run the agent with `--audit-log` at this path (the cost of the audit log under load).
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// Internal: run as the baseline server, answering every request with this file.
    #[arg(long, hide = true)]
    serve_baseline: Option<PathBuf>,
}

impl Args {
    fn validate(&self) -> Result<(), String> {
        if !(1..=1000).contains(&self.connections) {
            return Err("--connections: must be between 1 and 1000".into());
        }
        if self.duration < Duration::from_secs(1) || self.duration > Duration::from_secs(600) {
            return Err("--duration: must be between 1s and 10m".into());
        }
        // The agent gives an upstream attempt 2 s; beyond 1 s the burst measures timeouts.
        if self.upstream_latency > Duration::from_secs(1) {
            return Err("--upstream-latency: must be at most 1s".into());
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(path) = &args.serve_baseline {
        let served = std::fs::read(path).map(Bytes::from).and_then(baseline::run);
        return match served {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("load --serve-baseline: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Err(message) = args.validate() {
        eprintln!("load: {message}");
        return ExitCode::from(64);
    }
    process::kill_children_on_panic();
    let pinning = match (args.pin, process::Pinning::detect()) {
        (PinArg::Off, _) => None,
        (_, Some(p)) => Some(p),
        (PinArg::On, None) => {
            eprintln!("load: --pin on needs two CPUs this process may run on");
            return ExitCode::from(64);
        }
        (PinArg::Auto, None) => None,
    };
    if let Some(p) = pinning {
        // Before the runtime: its worker threads inherit the client CPU.
        if let Err(e) = p.pin_client() {
            eprintln!("load: cannot pin to CPU {}: {e}", p.client_cpu);
            return ExitCode::FAILURE;
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("load: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, pinning)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("load: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args, pinning: Option<process::Pinning>) -> Result<(), BoxError> {
    let agent_bin = locate_agent(&args)?;
    let scenarios: Vec<Scenario> = match args.scenario {
        Scenario::All => vec![
            Scenario::Steady,
            Scenario::Steady2000,
            Scenario::ColdBurst,
            Scenario::Rotation,
            Scenario::Memory,
        ],
        one => vec![one],
    };
    let mut lab = Lab::new(args, agent_bin, pinning).await?;
    lab.print_header();
    let mut rows: Vec<Row> = Vec::new();
    let work = async {
        for scenario in scenarios {
            let found = lab.run(scenario).await?;
            println!("\n{}", report::table(&found));
            rows.extend(found);
        }
        Ok::<_, BoxError>(())
    };
    tokio::select! {
        done = work => done?,
        _ = tokio::signal::ctrl_c() => return Err("interrupted".into()),
    }
    print_summary(&rows, lab.args.connections);
    Ok(())
}

/// `--agent-bin`, or the agent built next to this executable by the same cargo profile.
fn locate_agent(args: &Args) -> Result<PathBuf, BoxError> {
    Ok(process::locate_agent(args.agent_bin.as_deref())?)
}

/// An agent child process and how to reach it.
struct RunningAgent {
    process: ChildProcess,
    target: Target,
}

/// The baseline child process.
struct Baseline {
    process: ChildProcess,
    target: Target,
}

/// Everything one load run shares: the fake, the issuer and its JWKS file, the baseline.
struct Lab {
    args: Args,
    agent_bin: PathBuf,
    dir: tempfile::TempDir,
    jwks: PathBuf,
    issuer: Arc<Issuer>,
    fake: FakeUpstream,
    baseline: Option<Baseline>,
    started: Instant,
    pinning: Option<process::Pinning>,
}

impl Lab {
    async fn new(
        args: Args,
        agent_bin: PathBuf,
        pinning: Option<process::Pinning>,
    ) -> Result<Lab, BoxError> {
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("pod-identity-agent-load-")
            .tempdir()?;
        let alg = match args.alg {
            AlgArg::Rs256 => Alg::Rs256,
            AlgArg::Es256 => Alg::Es256,
        };
        let issuer = Arc::new(Issuer::generate(alg)?);
        let jwks = dir.path().join("jwks.json");
        std::fs::write(&jwks, issuer.jwks())?;
        let fake = FakeUpstream::start(CLUSTER, args.upstream_latency).await?;
        Ok(Lab {
            args,
            agent_bin,
            dir,
            jwks,
            issuer,
            fake,
            baseline: None,
            started,
            pinning,
        })
    }

    fn progress(&self, scenario: &str, message: impl Display) {
        eprintln!(
            "[{:>6.1}s] {scenario}: {message}",
            self.started.elapsed().as_secs_f64()
        );
    }

    fn print_header(&self) {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0);
        let age = std::fs::metadata(&self.agent_bin)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .map(|d| {
                format!(
                    "built {} ago",
                    humantime::format_duration(Duration::from_secs(d.as_secs()))
                )
            })
            .unwrap_or_else(|| "build time unknown".into());
        println!("pod-identity-agent load run");
        println!("load average before: {}", process::loadavg());
        println!(
            "machine: {cores} cores; agent and baseline runtimes: {} worker threads; client and EKS Auth fake: this process",
            benches::agent_worker_threads()
        );
        match &self.pinning {
            Some(p) => println!(
                "pinned: client and EKS Auth fake on CPU {}, agent and baseline (taking turns) on CPU {}",
                p.client_cpu, p.server_cpu
            ),
            None => println!("not pinned: client, agent and baseline share every CPU"),
        }
        println!("agent: {} ({age})", self.agent_bin.display());
        if let Some(wrapper) = &self.args.agent_wrapper {
            println!(
                "agent wrapper: {wrapper} (the agent's numbers are the wrapper's, not its own)"
            );
        }
        println!(
            "tokens: {}; steady runs: {} measured per server in {STEADY_ROUNDS} alternating rounds, each after {} warm-up, {} connections; cold burst upstream latency: {}",
            self.issuer.alg().name(),
            humantime::format_duration(self.args.duration),
            humantime::format_duration(self.warmup()),
            self.args.connections,
            humantime::format_duration(self.args.upstream_latency),
        );
    }

    fn warmup(&self) -> Duration {
        (self.args.duration / 5).min(MAX_WARMUP)
    }

    async fn run(&mut self, scenario: Scenario) -> Result<Vec<Row>, BoxError> {
        match scenario {
            Scenario::Steady => self.steady().await,
            Scenario::Steady2000 => self.steady_fleet().await,
            Scenario::ColdBurst => self.cold_burst().await,
            Scenario::Rotation => self.rotation().await,
            Scenario::Memory => self.memory().await,
            Scenario::All => Ok(Vec::new()),
        }
    }

    /// Fresh tokens for `pods`, as header values.
    async fn sign(&self, scenario: &str, pods: &[Pod]) -> Result<Arc<[HeaderValue]>, BoxError> {
        let started = Instant::now();
        let tokens = self.issuer.tokens(pods).await?;
        if pods.len() > 1 {
            self.progress(
                scenario,
                format!(
                    "signed {} {} tokens in {:.1}s",
                    report::thousands(pods.len() as u64),
                    self.issuer.alg().name(),
                    started.elapsed().as_secs_f64()
                ),
            );
        }
        Ok(header_values(&tokens)?.into())
    }

    /// Start an agent (the brief's flags plus `extra`) on a port picked here.
    fn start_agent(&self, scenario: &str, extra: &[&str]) -> Result<RunningAgent, BoxError> {
        let port = process::free_port()?;
        let endpoint = self.fake.endpoint();
        let mut cmd = process::wrapped_command(&self.agent_bin, self.args.agent_wrapper.as_deref());
        cmd.arg("server")
            .args(["--cluster-name", CLUSTER, "--bind-hosts", "127.0.0.1"])
            .args(["--port", &port.to_string()])
            .args([
                "--probe-port",
                "0",
                "--metrics-address",
                "127.0.0.1",
                "--metrics-port",
                "0",
            ])
            .args(["--endpoint", &endpoint, "--region", "us-west-2"])
            .arg("--jwks-file")
            .arg(&self.jwks)
            .args(["--issuer", benches::pods::ISSUER])
            .args(["--caller-rate-limit", "0", "--global-rate-limit", "0"])
            // Every simulated pod connects from 127.0.0.1, where real pods have addresses of
            // their own: the per-source cap would refuse the burst's 1,000 connections.
            .args(["--max-connections-per-source", "4096"])
            .args(["--log-format", "json", "--log-level", "warn"])
            .args(extra);
        if let Some(audit_log) = &self.args.audit_log {
            cmd.arg("--audit-log").arg(audit_log);
        }
        process::isolate_agent(&mut cmd);
        let mut process = self.spawn("agent", cmd)?;
        if self.args.agent_wrapper.is_some() {
            process.set_grace(WRAPPED_GRACE);
        }
        let flags = if extra.is_empty() {
            String::new()
        } else {
            format!(", {}", extra.join(" "))
        };
        self.progress(
            scenario,
            format!(
                "agent started (pid {}, port {port}{flags}); load average {}",
                process.pid(),
                process::loadavg()
            ),
        );
        Ok(RunningAgent {
            process,
            target: Target::new(SocketAddr::from((Ipv4Addr::LOCALHOST, port))),
        })
    }

    /// Wait until `agent` answers `token` with credentials (keys loaded, listener up).
    async fn wait_ready(
        &self,
        agent: &mut RunningAgent,
        token: &HeaderValue,
    ) -> Result<Reply, BoxError> {
        let limit = match self.args.agent_wrapper {
            Some(_) => WRAPPED_READY_TIMEOUT,
            None => READY_TIMEOUT,
        };
        let until = Instant::now() + limit;
        let mut last = String::from("no answer");
        while Instant::now() < until {
            if let Some(status) = agent.process.exited() {
                return Err(child_failure(&agent.process, &format!("exited ({status})")).into());
            }
            if let Ok(mut conn) = agent.target.connect().await {
                match agent.target.get(&mut conn, token).await {
                    Ok(reply) if reply.status == StatusCode::OK => return Ok(reply),
                    Ok(reply) => {
                        last = format!("{} {}", reply.status, String::from_utf8_lossy(&reply.body))
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(child_failure(&agent.process, &format!("not ready in {limit:?}: {last}")).into())
    }

    /// Fill the agent's cache with `tokens` (fake without latency), failing on any error.
    async fn warm(
        &self,
        scenario: &str,
        agent: &RunningAgent,
        tokens: &Arc<[HeaderValue]>,
    ) -> Result<Stats, BoxError> {
        self.fake.set_latency(Duration::ZERO);
        let stats = drive::sweep(
            &agent.target,
            tokens.clone(),
            SweepPlan {
                connections: WARM_CONNECTIONS,
                max_attempts: BURST_ATTEMPTS,
                deadline: SWEEP_DEADLINE,
            },
        )
        .await;
        self.fake.set_latency(self.args.upstream_latency);
        let stats = stats?;
        if stats.errors > 0 {
            return Err(child_failure(
                &agent.process,
                &format!("filling the cache failed: {:?}", stats.failures),
            )
            .into());
        }
        self.progress(
            scenario,
            format!(
                "cache filled with {} pods in {:.1}s",
                report::thousands(stats.ok),
                stats.elapsed.as_secs_f64()
            ),
        );
        Ok(stats)
    }

    /// Start the baseline once, serving `body` (the agent's own response).
    async fn ensure_baseline(&mut self, scenario: &str, body: &Bytes) -> Result<(), BoxError> {
        if self.baseline.is_some() {
            return Ok(());
        }
        let body_file = self.dir.path().join("baseline-body.json");
        std::fs::write(&body_file, body)?;
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("--serve-baseline")
            .arg(&body_file)
            // Its stdin is our pipe: when this process ends, the baseline sees EOF and exits.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut process = self.spawn("baseline", cmd)?;
        let stdout = process.take_stdout().ok_or("baseline has no stdout")?;
        let line = tokio::task::spawn_blocking(move || {
            process::wait_for_line(stdout, baseline::LISTENING_PREFIX, READY_TIMEOUT)
        })
        .await?;
        let addr: SocketAddr = match line {
            Some(l) => l.parse()?,
            None => return Err(child_failure(&process, "baseline did not start").into()),
        };
        self.progress(
            scenario,
            format!(
                "baseline started (pid {}, {addr}), body {} bytes",
                process.pid(),
                body.len()
            ),
        );
        self.baseline = Some(Baseline {
            process,
            target: Target::new(addr),
        });
        Ok(())
    }

    /// Start a server under test: on the server CPU when pinned.
    fn spawn(&self, name: &'static str, cmd: Command) -> std::io::Result<ChildProcess> {
        match &self.pinning {
            Some(p) => p.spawn_on_server(name, cmd),
            None => ChildProcess::spawn(name, cmd),
        }
    }

    fn steady_plan(&self) -> SteadyPlan {
        SteadyPlan {
            connections: self.args.connections,
            warmup: self.warmup(),
            duration: self.args.duration,
        }
    }

    /// Steady runs against the agent and the baseline, alternating in [`STEADY_ROUNDS`]
    /// rounds that share the measured time, so a change in what else the machine is doing
    /// falls on both alike.
    async fn steady_pair(
        &mut self,
        scenario: &'static str,
        agent: &RunningAgent,
        tokens: &Arc<[HeaderValue]>,
        upstream_since: u64,
        distinct_keys: u64,
    ) -> Result<Vec<Row>, BoxError> {
        let mut plan = self.steady_plan();
        plan.duration /= STEADY_ROUNDS;
        let mut on_agent = Stats::empty();
        let mut on_baseline = Stats::empty();
        for round in 1..=STEADY_ROUNDS {
            self.progress(
                scenario,
                format!(
                    "round {round}/{STEADY_ROUNDS}: agent, {} connections for {}",
                    plan.connections,
                    humantime::format_duration(plan.duration)
                ),
            );
            on_agent.absorb(&drive::steady(&agent.target, tokens.clone(), plan).await?);
            if let Some(baseline) = &self.baseline {
                self.progress(
                    scenario,
                    format!(
                        "round {round}/{STEADY_ROUNDS}: baseline, {} connections for {}",
                        plan.connections,
                        humantime::format_duration(plan.duration)
                    ),
                );
                on_baseline.absorb(&drive::steady(&baseline.target, tokens.clone(), plan).await?);
            }
        }
        let mut agent_row = Row::from_stats(scenario, "agent", plan.connections, &on_agent);
        agent_row.upstream = Some((self.fake.calls() - upstream_since, distinct_keys));
        agent_row.rss_kib = agent.process.rss_kib();
        agent_row.note = with_failures(
            format!(
                "{} token(s), cache hits",
                report::thousands(tokens.len() as u64)
            ),
            &on_agent,
        );
        let Some(baseline) = &self.baseline else {
            return Ok(vec![agent_row]);
        };
        let mut base_row = Row::from_stats(scenario, "baseline", plan.connections, &on_baseline);
        base_row.rss_kib = baseline.process.rss_kib();
        base_row.note = with_failures("fixed body".into(), &on_baseline);
        Ok(vec![agent_row, base_row])
    }

    /// (1) Cache hits for one pod.
    async fn steady(&mut self) -> Result<Vec<Row>, BoxError> {
        const NAME: &str = "steady";
        let tokens = self.sign(NAME, &Pod::batch("steady", 1)).await?;
        let since = self.fake.calls();
        let mut agent = self.start_agent(NAME, &[])?;
        let first = self.wait_ready(&mut agent, &tokens[0]).await?;
        self.ensure_baseline(NAME, &first.body).await?;
        self.steady_pair(NAME, &agent, &tokens, since, 1).await
    }

    /// (2) Cache hits across 2,000 pods.
    async fn steady_fleet(&mut self) -> Result<Vec<Row>, BoxError> {
        const NAME: &str = "steady-2000";
        let tokens = self.sign(NAME, &Pod::batch("fleet", FLEET_PODS)).await?;
        let since = self.fake.calls();
        let mut agent = self.start_agent(NAME, &[])?;
        let first = self.wait_ready(&mut agent, &tokens[0]).await?;
        self.ensure_baseline(NAME, &first.body).await?;
        self.warm(NAME, &agent, &tokens).await?;
        self.steady_pair(NAME, &agent, &tokens, since, FLEET_PODS as u64)
            .await
    }

    /// (3) 1,000 new pods at once, each on its own connection, with a slow upstream.
    async fn cold_burst(&mut self) -> Result<Vec<Row>, BoxError> {
        const NAME: &str = "cold-burst";
        let tokens = self.sign(NAME, &Pod::batch("burst", BURST_PODS)).await?;
        let probe = self.sign(NAME, &[Pod::numbered("burst-probe", 0)]).await?;
        let mut agent = self.start_agent(NAME, &[])?;
        self.wait_ready(&mut agent, &probe[0]).await?;
        self.fake.set_latency(self.args.upstream_latency);
        let since = self.fake.calls();
        self.progress(
            NAME,
            format!(
                "{} pods at once, upstream latency {}",
                report::thousands(BURST_PODS as u64),
                humantime::format_duration(self.args.upstream_latency)
            ),
        );
        let stats = drive::sweep(
            &agent.target,
            tokens.clone(),
            SweepPlan {
                connections: BURST_PODS,
                max_attempts: BURST_ATTEMPTS,
                deadline: SWEEP_DEADLINE,
            },
        )
        .await?;
        let mut row = Row::from_stats(NAME, "agent", BURST_PODS, &stats);
        row.upstream = Some((self.fake.calls() - since, BURST_PODS as u64));
        row.rss_kib = agent.process.rss_kib();
        row.note = with_failures(
            format!(
                "all served in {:.2}s; {} retries after Retry-After; latency = first try to 200",
                stats.elapsed.as_secs_f64(),
                report::thousands(stats.retried)
            ),
            &stats,
        );
        self.agent_log_note(NAME, &agent);
        Ok(vec![row])
    }

    /// (4) Every warm pod presents a newly signed token for the same pod UID.
    async fn rotation(&mut self) -> Result<Vec<Row>, BoxError> {
        const NAME: &str = "rotation";
        let pods = Pod::batch("rotation", FLEET_PODS);
        let before = self.sign(NAME, &pods).await?;
        let after = self.sign(NAME, &pods).await?;
        let mut agent = self.start_agent(NAME, &[])?;
        self.wait_ready(&mut agent, &before[0]).await?;
        self.warm(NAME, &agent, &before).await?;
        let since = self.fake.calls();
        self.progress(
            NAME,
            format!(
                "storm: {} rotated tokens over {} connections",
                report::thousands(after.len() as u64),
                self.args.connections
            ),
        );
        let stats = drive::sweep(
            &agent.target,
            after.clone(),
            SweepPlan {
                connections: self.args.connections,
                max_attempts: STORM_ATTEMPTS,
                deadline: SWEEP_DEADLINE,
            },
        )
        .await?;
        let mut row = Row::from_stats(NAME, "agent", self.args.connections, &stats);
        row.upstream = Some((self.fake.calls() - since, 0));
        row.rss_kib = agent.process.rss_kib();
        row.note = with_failures(
            format!(
                "each pod's new token once, done in {:.2}s; upstream counted in the storm only",
                stats.elapsed.as_secs_f64()
            ),
            &stats,
        );
        Ok(vec![row])
    }

    /// (5) RSS with 10,000 cached pods.
    async fn memory(&mut self) -> Result<Vec<Row>, BoxError> {
        const NAME: &str = "memory";
        let tokens = self.sign(NAME, &Pod::batch("memory", MEMORY_PODS)).await?;
        let probe = self.sign(NAME, &[Pod::numbered("memory-probe", 0)]).await?;
        let mut agent = self.start_agent(NAME, &["--max-cache-size", MEMORY_CACHE_SIZE])?;
        self.wait_ready(&mut agent, &probe[0]).await?;
        tokio::time::sleep(SETTLE).await;
        let idle = agent.process.rss_kib().unwrap_or(0);
        let since = self.fake.calls();
        let stats = self.warm(NAME, &agent, &tokens).await?;
        tokio::time::sleep(SETTLE).await;
        let full = agent.process.rss_kib().unwrap_or(0);
        let mut row = Row::from_stats(NAME, "agent", WARM_CONNECTIONS, &stats);
        row.upstream = Some((self.fake.calls() - since, MEMORY_PODS as u64));
        row.rss_kib = Some(full);
        row.note = format!(
            "RSS {} MiB with 1 entry -> {} MiB with {} ({:.1} KiB/entry); rate = cache fill",
            report::mib(idle),
            report::mib(full),
            report::thousands(MEMORY_PODS as u64 + 1),
            full.saturating_sub(idle) as f64 / MEMORY_PODS as f64
        );
        Ok(vec![row])
    }

    /// Say how much the agent logged (at warn) during a scenario, with its last line.
    fn agent_log_note(&self, scenario: &str, agent: &RunningAgent) {
        let (lines, tail) = agent.process.log();
        if lines > 0 {
            self.progress(
                scenario,
                format!(
                    "agent wrote {lines} log line(s) at warn or above; last: {}",
                    tail.last().map(String::as_str).unwrap_or("")
                ),
            );
        }
    }
}

/// A child's failure, with what it last wrote to stderr.
fn child_failure(process: &ChildProcess, what: &str) -> String {
    let (_, tail) = process.log();
    let mut msg = format!("{} (pid {}): {what}", process.name(), process.pid());
    for line in tail {
        msg.push_str("\n  ");
        msg.push_str(&line);
    }
    msg
}

/// `note`, plus why requests failed, if any did.
fn with_failures(note: String, stats: &Stats) -> String {
    if stats.failures.is_empty() {
        return note;
    }
    let why: Vec<String> = stats
        .failures
        .iter()
        .map(|(k, v)| format!("{v} x {k}"))
        .collect();
    format!("{note}; failures: {}", why.join(", "))
}

fn row<'a>(rows: &'a [Row], scenario: &str, server: &str) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.scenario == scenario && r.server == server)
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

/// Every row, each target with its verdict, and last the steady throughput ratio.
fn print_summary(rows: &[Row], connections: usize) {
    println!("\n== all scenarios ==\n{}", report::table(rows));
    println!("load average after: {}", process::loadavg());
    println!("targets (benchmarks, not assertions):");
    let agent = row(rows, "steady", "agent");
    let base = row(rows, "steady", "baseline");
    let ratio = match (agent, base) {
        (Some(a), Some(b)) if b.per_second > 0.0 => Some(a.per_second / b.per_second),
        _ => None,
    };
    if let Some(r) = ratio {
        println!(
            "  steady cache-hit throughput >= {TARGET_THROUGHPUT_RATIO}x baseline: {r:.2}x -> {}",
            verdict(r >= TARGET_THROUGHPUT_RATIO)
        );
    }
    for scenario in ["steady", "steady-2000"] {
        if let Some(a) = row(rows, scenario, "agent") {
            println!(
                "  {scenario} p99 < {} at {connections} connections: {} -> {}",
                report::latency(TARGET_P99),
                report::latency(a.p99),
                verdict(a.p99 < TARGET_P99)
            );
        }
    }
    for r in rows.iter().filter(|r| r.scenario != "rotation") {
        if let Some((seen, expected)) = r.upstream {
            println!(
                "  {} upstream calls = distinct keys: {}/{} -> {}",
                r.scenario,
                report::thousands(seen),
                report::thousands(expected),
                verdict(seen == expected)
            );
        }
    }
    if let Some((seen, _)) = row(rows, "rotation", "agent").and_then(|r| r.upstream) {
        println!(
            "  rotation storm: 0 upstream calls: {seen} -> {}",
            verdict(seen == 0)
        );
    }
    if let Some(rss) = row(rows, "memory", "agent").and_then(|r| r.rss_kib) {
        println!(
            "  RSS with {} entries < {} MiB: {} MiB -> {}",
            report::thousands(MEMORY_PODS as u64),
            TARGET_RSS_KIB / 1024,
            report::mib(rss),
            verdict(rss < TARGET_RSS_KIB)
        );
    }
    match (ratio, agent, base) {
        (Some(r), Some(a), Some(b)) => println!(
            "steady cache-hit throughput agent/baseline: {r:.2} ({} / {} req/s at {connections} connections)",
            report::thousands(a.per_second.round() as u64),
            report::thousands(b.per_second.round() as u64),
        ),
        _ => println!("steady cache-hit throughput agent/baseline: n/a (the steady scenario did not run)"),
    }
    // Machine-readable, last: what scripts/perf-guard reads.
    if let Some(rss) = row(rows, "memory", "agent").and_then(|r| r.rss_kib) {
        println!("memory_rss_kib={rss}");
    }
    if let Some(r) = ratio {
        println!("ratio={r:.3}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_checked() {
        let parse = |args: &[&str]| {
            let mut argv = vec!["load"];
            argv.extend_from_slice(args);
            Args::try_parse_from(argv)
                .map_err(|e| e.to_string())?
                .validate()
        };
        assert!(parse(&[]).is_ok());
        assert!(parse(&["--scenario", "steady-2000", "--duration", "3s"]).is_ok());
        assert!(parse(&["--scenario", "cold-burst"]).is_ok());
        assert!(parse(&["--connections", "0"]).is_err());
        assert!(parse(&["--duration", "1h"]).is_err());
        assert!(parse(&["--upstream-latency", "5s"]).is_err());
        assert!(parse(&["--scenario", "nope"]).is_err());
    }

    #[test]
    fn locates_a_given_agent_binary() {
        let args = Args::try_parse_from(["load", "--agent-bin", "/nonexistent/agent"]).unwrap();
        let err = locate_agent(&args).unwrap_err().to_string();
        assert!(
            err.contains("cargo build --release -p pod-identity-agent"),
            "{err}"
        );
    }
}
