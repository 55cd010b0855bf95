//! The two load patterns, bounded in time and in count:
//!
//! - [`steady`]: N keep-alive connections send back to back for a fixed time, after a warm-up
//!   that is not measured; throughput and latency of a server that is already warm.
//! - [`sweep`]: every token is sent once (retried on `Retry-After`, as an SDK would), spread
//!   over N connections opened at the start; how long a given amount of work takes, e.g.
//!   1,000 pods starting at once with one connection each.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use hyper::header::HeaderValue;
use hyper::StatusCode;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::client::{ClientError, Connection, Target};

/// Per-connection request cap in a steady run: far above what a loopback connection does in
/// the longest allowed run, it only makes the loop bounded by count as well as time.
const MAX_REQUESTS_PER_CONNECTION: u64 = 50_000_000;
/// Latencies are recorded in microseconds, from 1 µs to a minute, to 3 significant digits.
const LATENCY_MAX_US: u64 = 60_000_000;
/// Bound on re-opening a connection the server closed during a steady run.
const MAX_RECONNECTS: u32 = 3;

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Requests answered 200 (in the measured window).
    pub ok: u64,
    /// Requests that failed in the end: a non-200 status after retries, or a transport error.
    pub errors: u64,
    /// Responses that asked to be retried (429/503 with `Retry-After`) and were.
    pub retried: u64,
    /// The measured window (steady), or the time until the last token was answered (sweep).
    pub elapsed: Duration,
    /// Latency of the answered requests, µs; for a sweep, from first attempt to the 200.
    pub latency_us: Histogram<u64>,
    /// Why requests failed, e.g. "503 UpstreamBusy" or "transport: ...", with counts.
    pub failures: BTreeMap<String, u64>,
}

impl Stats {
    /// Nothing measured yet.
    pub fn empty() -> Stats {
        Stats::new()
    }

    /// Add `other`, a run measured after this one: counts, latencies and time add up.
    pub fn absorb(&mut self, other: &Stats) {
        self.merge(other);
        self.elapsed += other.elapsed;
    }

    fn new() -> Stats {
        Stats {
            ok: 0,
            errors: 0,
            retried: 0,
            elapsed: Duration::ZERO,
            latency_us: new_histogram(),
            failures: BTreeMap::new(),
        }
    }

    fn merge(&mut self, other: &Stats) {
        self.ok += other.ok;
        self.errors += other.errors;
        self.retried += other.retried;
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.latency_us.add(&other.latency_us);
        for (k, v) in &other.failures {
            *self.failures.entry(k.clone()).or_default() += v;
        }
    }

    fn fail(&mut self, why: String) {
        self.errors += 1;
        *self.failures.entry(why).or_default() += 1;
    }

    fn record(&mut self, latency: Duration) {
        let us = (latency.as_micros() as u64).clamp(1, LATENCY_MAX_US);
        // Clamped into the histogram's range above, so recording cannot fail.
        let _ = self.latency_us.record(us);
    }

    /// Answered requests per second.
    pub fn per_second(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.ok as f64 / secs
        } else {
            0.0
        }
    }

    /// Latency at quantile `q` (0..=1); zero when nothing was answered.
    pub fn latency(&self, q: f64) -> Duration {
        if self.latency_us.is_empty() {
            return Duration::ZERO;
        }
        Duration::from_micros(self.latency_us.value_at_quantile(q))
    }
}

#[allow(clippy::expect_used)]
fn new_histogram() -> Histogram<u64> {
    // Constant, valid bounds (low >= 1, high >= 2 * low, sigfig <= 5): this cannot fail.
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).expect("constant histogram bounds")
}

/// Why a response is not a success, in a form worth counting.
fn failure_of(status: StatusCode, body: &[u8]) -> String {
    let code = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("code").and_then(|c| c.as_str()).map(str::to_owned))
        .unwrap_or_default();
    format!("{} {code}", status.as_u16()).trim_end().to_owned()
}

/// Shape of a steady run.
#[derive(Debug, Clone, Copy)]
pub struct SteadyPlan {
    pub connections: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

/// `plan.connections` connections send back to back until the window closes. Connection `c`
/// starts at token `c * len / connections` and walks the list, so every token is in use.
pub async fn steady(
    target: &Target,
    tokens: Arc<[HeaderValue]>,
    plan: SteadyPlan,
) -> Result<Stats, ClientError> {
    if tokens.is_empty() || plan.connections == 0 {
        return Ok(Stats::new());
    }
    // Open everything first: connection setup is not what a steady run measures.
    let mut conns = Vec::with_capacity(plan.connections);
    for _ in 0..plan.connections {
        conns.push(target.connect().await?);
    }
    let measure_from = Instant::now() + plan.warmup;
    let until = measure_from + plan.duration;
    let mut tasks = JoinSet::new();
    for (c, conn) in conns.into_iter().enumerate() {
        let target = target.clone();
        let tokens = tokens.clone();
        let first = c * tokens.len() / plan.connections;
        tasks.spawn(steady_connection(
            target,
            conn,
            tokens,
            first,
            measure_from,
            until,
        ));
    }
    let mut total = Stats::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(stats) => total.merge(&stats),
            Err(e) => total.fail(format!("client task: {e}")),
        }
    }
    total.elapsed = plan.duration;
    Ok(total)
}

async fn steady_connection(
    target: Target,
    mut conn: Connection,
    tokens: Arc<[HeaderValue]>,
    first: usize,
    measure_from: Instant,
    until: Instant,
) -> Stats {
    let mut stats = Stats::new();
    let mut next = first;
    let mut reconnects = 0;
    for _ in 0..MAX_REQUESTS_PER_CONNECTION {
        let started = Instant::now();
        if started >= until {
            break;
        }
        let measured = started >= measure_from;
        let token = &tokens[next % tokens.len()];
        next = next.wrapping_add(1);
        match target.get(&mut conn, token).await {
            Ok(reply) if reply.status == StatusCode::OK => {
                if measured {
                    stats.ok += 1;
                    stats.record(started.elapsed());
                }
            }
            Ok(reply) => {
                if measured {
                    stats.fail(failure_of(reply.status, &reply.body));
                }
            }
            Err(e) => {
                if measured {
                    stats.fail(format!("transport: {e}"));
                }
                if reconnects >= MAX_RECONNECTS {
                    break;
                }
                reconnects += 1;
                match target.connect().await {
                    Ok(fresh) => conn = fresh,
                    Err(e) => {
                        stats.fail(format!("transport: {e}"));
                        break;
                    }
                }
            }
        }
    }
    stats
}

/// Shape of a sweep.
#[derive(Debug, Clone, Copy)]
pub struct SweepPlan {
    /// Connections opened at once; with as many connections as tokens, one pod per connection.
    pub connections: usize,
    /// Attempts per token, the first included.
    pub max_attempts: u32,
    /// The whole sweep is abandoned after this; unanswered tokens count as errors.
    pub deadline: Duration,
}

/// Send every token once (retrying when told to), each connection taking every
/// `connections`-th token. Returns when all are answered or the deadline passes.
pub async fn sweep(
    target: &Target,
    tokens: Arc<[HeaderValue]>,
    plan: SweepPlan,
) -> Result<Stats, ClientError> {
    let connections = plan.connections.clamp(1, tokens.len().max(1));
    let started = Instant::now();
    let deadline = started + plan.deadline;
    let mut tasks = JoinSet::new();
    for c in 0..connections {
        let target = target.clone();
        let tokens = tokens.clone();
        tasks.spawn(async move {
            let mine: Vec<usize> = (c..tokens.len()).step_by(connections).collect();
            let mut stats = Stats::new();
            let run = sweep_connection(&target, &tokens, &mine, plan.max_attempts, &mut stats);
            if tokio::time::timeout_at(deadline, run).await.is_err() {
                stats.fail("deadline".into());
            }
            stats
        });
    }
    let mut total = Stats::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(stats) => total.merge(&stats),
            Err(e) => total.fail(format!("client task: {e}")),
        }
    }
    total.elapsed = started.elapsed();
    Ok(total)
}

async fn sweep_connection(
    target: &Target,
    tokens: &[HeaderValue],
    mine: &[usize],
    max_attempts: u32,
    stats: &mut Stats,
) {
    let mut conn = match target.connect().await {
        Ok(c) => c,
        Err(e) => {
            for _ in mine {
                stats.fail(format!("transport: {e}"));
            }
            return;
        }
    };
    for (n, &i) in mine.iter().enumerate() {
        let first_attempt = Instant::now();
        for attempt in 1..=max_attempts.max(1) {
            match target.get(&mut conn, &tokens[i]).await {
                Ok(reply) if reply.status == StatusCode::OK => {
                    stats.ok += 1;
                    stats.record(first_attempt.elapsed());
                    break;
                }
                Ok(reply) => match reply.retry_after {
                    Some(wait) if attempt < max_attempts => {
                        stats.retried += 1;
                        tokio::time::sleep(wait).await;
                    }
                    _ => {
                        stats.fail(failure_of(reply.status, &reply.body));
                        break;
                    }
                },
                Err(e) => {
                    stats.fail(format!("transport: {e}"));
                    // The connection is gone; the next token gets a new one.
                    match target.connect().await {
                        Ok(fresh) => conn = fresh,
                        Err(e) => {
                            for _ in n + 1..mine.len() {
                                stats.fail(format!("transport: {e}"));
                            }
                            return;
                        }
                    }
                    break;
                }
            }
        }
    }
}
