//! Token buckets: per caller and global request limits, and the adaptive budget that paces
//! background refreshes to the upstream.
//!
//! Time is `tokio::time::Instant`, so tests drive hours of traffic with a paused clock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::sync;

/// Per-caller state is bounded: past this many tracked callers, full (idle) buckets are
/// dropped, and if none is idle a new caller is let through on the global limit alone.
const MAX_TRACKED_CALLERS: usize = 4096;
/// Idle buckets are swept at most this often.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// A classic token bucket: `rate` tokens per second, at most `burst` stored.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        let burst = burst.max(1.0);
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }

    /// Take one token, or say how long until one is available.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else if self.rate <= 0.0 {
            Err(Duration::from_secs(1))
        } else {
            // Configured rates are bounded, but a wait past what a Duration holds must not
            // panic: it is as good as "not for a long while".
            let wait = (1.0 - self.tokens) / self.rate;
            Err(Duration::try_from_secs_f64(wait).unwrap_or(Duration::from_secs(3600)))
        }
    }

    /// Full again: nothing is owed, so the bucket can be forgotten.
    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }

    pub fn set_rate(&mut self, rate: f64, now: Instant) {
        self.refill(now);
        self.rate = rate;
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    Caller(Duration),
    Global(Duration),
}

impl Limited {
    pub fn retry_after(&self) -> Duration {
        match self {
            Limited::Caller(d) | Limited::Global(d) => *d,
        }
    }
    pub fn scope(&self) -> &'static str {
        match self {
            Limited::Caller(_) => "caller",
            Limited::Global(_) => "global",
        }
    }
}

/// Refusal log lines are rate limited per reason: one pod sending garbage must not push real
/// events out of the kubelet's rotated logs or spend the container's CPU on stderr. The first
/// few refusals of each reason in an interval are logged; the rest are counted and reported
/// in one summary line with the next refusal of that reason after the interval. The metrics
/// keep the exact counts.
pub struct LogLimiter {
    windows: Mutex<HashMap<String, LogWindow>>,
}

/// Refusals of one reason logged per interval before the rest are only counted.
const LOGGED_PER_INTERVAL: u32 = 5;
const LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Reasons tracked at once (error codes are a bounded set; a hostile upstream's made-up codes
/// share the last slot).
const MAX_LOG_REASONS: usize = 64;
const OTHER_REASON: &str = "other";

struct LogWindow {
    started: Instant,
    logged: u32,
    suppressed: u64,
}

/// What to do with one refusal's log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogDecision {
    /// Log it; `suppressed` refusals of the same reason went unlogged in the interval before.
    Log { suppressed: u64 },
    /// Count it only.
    Suppress,
}

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter {
            windows: Mutex::new(HashMap::new()),
        }
    }
}

impl LogLimiter {
    pub fn check(&self, reason: &str, now: Instant) -> LogDecision {
        let mut windows = sync::lock(&self.windows);
        let key = if windows.contains_key(reason) || windows.len() < MAX_LOG_REASONS - 1 {
            reason
        } else {
            OTHER_REASON
        };
        let window = windows.entry(key.to_owned()).or_insert(LogWindow {
            started: now,
            logged: 0,
            suppressed: 0,
        });
        let mut suppressed = 0;
        if now.saturating_duration_since(window.started) >= LOG_INTERVAL {
            suppressed = std::mem::take(&mut window.suppressed);
            window.started = now;
            window.logged = 0;
        }
        if window.logged < LOGGED_PER_INTERVAL {
            window.logged += 1;
            LogDecision::Log { suppressed }
        } else {
            window.suppressed += 1;
            LogDecision::Suppress
        }
    }

    pub fn interval(&self) -> Duration {
        LOG_INTERVAL
    }
}

/// Limits for the credentials port: one bucket per client IP, one for everyone. A rate of
/// zero turns that limit off.
pub struct RequestLimiter {
    caller_rate: f64,
    caller_burst: f64,
    global: Option<Mutex<TokenBucket>>,
    callers: Mutex<Callers>,
}

struct Callers {
    buckets: HashMap<IpAddr, TokenBucket>,
    last_sweep: Instant,
}

impl RequestLimiter {
    pub fn new(caller_rate: f64, caller_burst: f64, global_rate: f64, global_burst: f64) -> Self {
        let now = Instant::now();
        RequestLimiter {
            caller_rate,
            caller_burst,
            global: (global_rate > 0.0)
                .then(|| Mutex::new(TokenBucket::new(global_rate, global_burst, now))),
            callers: Mutex::new(Callers {
                buckets: HashMap::new(),
                last_sweep: now,
            }),
        }
    }

    /// Admit one request from `ip`, or say which limit refused it and for how long.
    pub fn check(&self, ip: IpAddr) -> Result<(), Limited> {
        let now = Instant::now();
        if self.caller_rate > 0.0 {
            let mut callers = sync::lock(&self.callers);
            if now.saturating_duration_since(callers.last_sweep) >= SWEEP_INTERVAL
                || (callers.buckets.len() >= MAX_TRACKED_CALLERS
                    && !callers.buckets.contains_key(&ip))
            {
                callers.buckets.retain(|_, b| !b.is_full(now));
                callers.last_sweep = now;
            }
            let tracked = callers.buckets.len();
            match callers.buckets.get_mut(&ip) {
                Some(bucket) => bucket.try_take(now).map_err(Limited::Caller)?,
                None if tracked < MAX_TRACKED_CALLERS => {
                    let mut bucket = TokenBucket::new(self.caller_rate, self.caller_burst, now);
                    bucket.try_take(now).map_err(Limited::Caller)?;
                    callers.buckets.insert(ip, bucket);
                }
                // Every tracked caller is active: the global bucket still bounds the load.
                None => {}
            }
        }
        if let Some(global) = &self.global {
            sync::lock(global).try_take(now).map_err(Limited::Global)?;
        }
        Ok(())
    }

    pub fn tracked_callers(&self) -> usize {
        sync::lock(&self.callers).buckets.len()
    }
}

/// The background refresh budget: a token bucket whose rate backs off when the upstream
/// throttles (halved, down to a floor) and recovers additively with each success.
///
/// Refreshes queue for tokens in order (tokio's mutex is fair) and may sleep while holding
/// the bucket; the rate lives apart, behind a plain mutex, so a rate change never waits behind
/// that queue: were the two one lock, a throttled upstream would leave the rate at its floor
/// with every `on_success` stuck behind the sleepers, and the queue, with the memory of its
/// waiting refreshes, would grow for as long as the agent ran.
pub struct RefreshBudget {
    max_rate: f64,
    rate: std::sync::Mutex<f64>,
    bucket: tokio::sync::Mutex<TokenBucket>,
}

/// The budget never drops below this share of its configured rate.
const MIN_RATE_FRACTION: f64 = 1.0 / 16.0;
/// Each successful upstream call gives back this share of the configured rate.
const RECOVERY_FRACTION: f64 = 1.0 / 20.0;
/// A sleeping waiter looks at the rate again at least this often, so a recovery is felt soon.
const RATE_RECHECK: Duration = Duration::from_secs(1);

impl RefreshBudget {
    pub fn new(max_rate: f64) -> Self {
        // Burst of one second's worth: a refresh wave is spread over time, not fired at once.
        RefreshBudget {
            max_rate,
            rate: std::sync::Mutex::new(max_rate),
            bucket: tokio::sync::Mutex::new(TokenBucket::new(max_rate, max_rate, Instant::now())),
        }
    }

    /// The current rate (tokens per second).
    pub fn rate(&self) -> f64 {
        *sync::lock(&self.rate)
    }

    /// Wait for a token. Waiters queue in order; a caller that stops waiting (its future is
    /// dropped) leaves the queue.
    pub async fn acquire(&self) {
        let mut bucket = self.bucket.lock().await;
        loop {
            let now = Instant::now();
            let rate = self.rate();
            if rate != bucket.rate() {
                bucket.set_rate(rate, now);
            }
            match bucket.try_take(now) {
                Ok(()) => return,
                Err(wait) => {
                    let wait = wait.clamp(Duration::from_millis(1), RATE_RECHECK);
                    tokio::time::sleep(wait).await
                }
            }
        }
    }

    pub fn on_throttled(&self) -> f64 {
        self.adjust(|rate| (rate / 2.0).max(self.max_rate * MIN_RATE_FRACTION))
    }

    pub fn on_success(&self) -> f64 {
        self.adjust(|rate| (rate + self.max_rate * RECOVERY_FRACTION).min(self.max_rate))
    }

    fn adjust(&self, f: impl FnOnce(f64) -> f64) -> f64 {
        let mut rate = sync::lock(&self.rate);
        *rate = f(*rate);
        *rate
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bucket_refills_at_its_rate() {
        let now = Instant::now();
        let mut b = TokenBucket::new(2.0, 4.0, now);
        for _ in 0..4 {
            b.try_take(now).unwrap();
        }
        let wait = b.try_take(now).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert!(b.try_take(now + Duration::from_millis(500)).is_ok());
        assert!(b.try_take(now + Duration::from_millis(600)).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn callers_are_limited_separately_and_globally() {
        let limiter = RequestLimiter::new(1.0, 3.0, 100.0, 5.0);
        let a = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let b = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        for _ in 0..3 {
            limiter.check(a).unwrap();
        }
        assert!(matches!(limiter.check(a), Err(Limited::Caller(_))));
        limiter.check(b).unwrap();
        limiter.check(b).unwrap();
        assert!(
            matches!(limiter.check(b), Err(Limited::Global(_))),
            "global burst of 5 used up"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        limiter.check(a).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn caller_state_is_bounded_and_idle_buckets_dropped() {
        let limiter = RequestLimiter::new(10.0, 10.0, 0.0, 0.0);
        for i in 0..(MAX_TRACKED_CALLERS as u32 + 100) {
            limiter
                .check(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)))
                .unwrap();
        }
        assert!(limiter.tracked_callers() <= MAX_TRACKED_CALLERS);
        tokio::time::advance(SWEEP_INTERVAL).await;
        limiter.check(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        assert_eq!(limiter.tracked_callers(), 1, "idle callers forgotten");
    }

    /// A panic while a limiter's lock is held (a bug) must not turn into refusing, or
    /// miscounting, every request after it.
    #[tokio::test(start_paused = true)]
    async fn a_poisoned_limiter_keeps_limiting() {
        let limiter = RequestLimiter::new(1.0, 2.0, 100.0, 100.0);
        let a = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        limiter.check(a).unwrap();
        sync::poison(&limiter.callers);
        if let Some(global) = &limiter.global {
            sync::poison(global);
        }
        assert_eq!(
            limiter.tracked_callers(),
            1,
            "the callers are still counted"
        );
        limiter.check(a).unwrap();
        assert!(
            matches!(limiter.check(a), Err(Limited::Caller(_))),
            "and still limited: the bucket kept its state"
        );
        limiter
            .check(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)))
            .unwrap();

        let budget = RefreshBudget::new(4.0);
        sync::poison(&budget.rate);
        assert_eq!(budget.on_throttled(), 2.0);
        assert_eq!(budget.rate(), 2.0);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_backs_off_and_recovers() {
        let budget = RefreshBudget::new(4.0);
        assert_eq!(budget.on_throttled(), 2.0);
        assert_eq!(budget.on_throttled(), 1.0);
        for _ in 0..10 {
            budget.on_throttled();
        }
        assert_eq!(
            budget.on_throttled(),
            0.25,
            "floor at 1/16 of the configured rate"
        );
        let mut rate = 0.0;
        for _ in 0..20 {
            rate = budget.on_success();
        }
        assert_eq!(rate, 4.0, "additive recovery back to the configured rate");
    }

    #[tokio::test(start_paused = true)]
    async fn recovery_is_not_held_up_by_queued_waiters() {
        let budget = std::sync::Arc::new(RefreshBudget::new(2.0));
        for _ in 0..10 {
            budget.on_throttled();
        }
        assert_eq!(budget.rate(), 0.125);
        let mut waiters = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let budget = budget.clone();
            waiters.spawn(async move { budget.acquire().await });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        // The upstream answers again: the rate comes back at once, with waiters queued...
        for _ in 0..20 {
            budget.on_success();
        }
        assert_eq!(budget.rate(), 2.0);
        // ...and the queue drains at the new rate (20 at 0.125/s would take 160 s).
        let start = Instant::now();
        while waiters.join_next().await.is_some() {}
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn budget_paces_acquisitions() {
        let budget = RefreshBudget::new(2.0);
        let start = Instant::now();
        for _ in 0..6 {
            budget.acquire().await;
        }
        // Two at once (the burst), then one every 500 ms.
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    #[test]
    fn refusal_logs_are_limited_per_reason_and_summed_up() {
        let logs = LogLimiter::default();
        let t = Instant::now();
        let logged = (0..100)
            .filter(|_| logs.check("NotFound", t) != LogDecision::Suppress)
            .count();
        assert_eq!(logged, LOGGED_PER_INTERVAL as usize);
        assert_eq!(
            logs.check("MethodNotAllowed", t),
            LogDecision::Log { suppressed: 0 },
            "reasons are counted apart"
        );
        assert_eq!(
            logs.check("NotFound", t + LOG_INTERVAL),
            LogDecision::Log { suppressed: 95 }
        );
        for i in 0..200 {
            logs.check(&format!("Made-up-{i}"), t);
        }
        assert!(logs.windows.lock().unwrap().len() <= MAX_LOG_REASONS);
    }
}
