//! Timing policy: when credentials stop being fresh, when an entry is refreshed, how long a
//! request waits, and how failed refreshes back off. Pure functions of times and durations,
//! so the rest of the cache only asks "when".

use std::time::Duration;

use tokio::time::Instant;

use crate::defence::{self, Defence};

/// Credentials are served as fresh only while more than this is left: botocore starts
/// refreshing 15 minutes before expiry, so anything shorter would make every boto3 call come
/// back to the agent.
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(15 * 60);
/// Credentials this close to expiry are never handed out (the SDKs' own refresh buffers are
/// at least 10 s). Until then, credentials in hand are served through any upstream failure.
pub const MIN_SERVABLE_LIFETIME: Duration = Duration::from_secs(15);
/// How long a request waits for a fetch: the upstream call is bounded at 4.5 s, and the
/// contract promises an answer within 5 s.
pub const WAIT_DEADLINE: Duration = Duration::from_millis(4800);
/// With still-valid credentials in hand, a request waits this long for a refetch before
/// taking them: the JS SDK gives up on us after 1 s.
pub const STALE_WAIT: Duration = Duration::from_millis(500);
/// A request-path fetch waits at most this long for an upstream slot, then the client gets
/// 503 with `Retry-After` well inside the SDKs' 1 s (JS) and 2 s (botocore) attempt budgets.
pub const UPSTREAM_QUEUE_WAIT: Duration = Duration::from_millis(500);
/// Refresh jitter: up to a tenth of the time to the refresh point, at most this.
const MAX_REFRESH_JITTER: Duration = Duration::from_secs(5 * 60);
/// Retry backoff after a failed refresh: doubles from the base up to the cap, with jitter.
pub const RETRY_BASE: Duration = Duration::from_secs(2);
pub const RETRY_CAP: Duration = Duration::from_secs(60);
/// How long a refusal about the association is answered from the cache. A pod without an
/// association that keeps asking (SDKs retry, applications poll) would otherwise cost one
/// upstream call per request and could spend the node's EKS Auth quota for every pod; an
/// association created meanwhile is seen at most this much later.
pub const REFUSAL_TTL: Duration = Duration::from_secs(5);

/// A uniformly random fraction in [0, 1).
pub fn random_fraction() -> f64 {
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
/// expiry minus [`EXPIRY_MARGIN`], or minus half the lifetime for short credentials, and
/// never later than [`MIN_SERVABLE_LIFETIME`] before expiry: a fresh entry is served without
/// any other check, so short credentials must stop being fresh where they stop being
/// servable.
pub fn fresh_until(fetched_at: Instant, lifetime: Duration) -> Instant {
    let floor = if defence::on(Defence::ServableMargin) {
        MIN_SERVABLE_LIFETIME
    } else {
        Duration::ZERO
    };
    let margin = EXPIRY_MARGIN.min(lifetime / 2).max(floor);
    later(fetched_at, lifetime.saturating_sub(margin))
}

/// `at + d`, or, where that is past what the clock can represent, `at` plus a century: a
/// configured or upstream-given duration never makes the clock arithmetic panic.
pub fn later(at: Instant, d: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    at.checked_add(d)
        .or_else(|| at.checked_add(CENTURY))
        .unwrap_or(at)
}

/// The last instant credentials expiring at `expires_at` may be handed out.
pub fn servable_until(expires_at: Instant) -> Instant {
    expires_at
        .checked_sub(MIN_SERVABLE_LIFETIME)
        .unwrap_or(expires_at)
}

/// When to refresh: the earlier of the retention limit and `fresh_until`, minus jitter (a
/// fraction in [0, 1) of a window) so entries filled together do not refresh together.
pub fn refresh_point(
    fetched_at: Instant,
    fresh_until: Instant,
    max_retention: Duration,
    jitter: f64,
) -> Instant {
    let point = later(fetched_at, max_retention).min(fresh_until);
    let window = MAX_REFRESH_JITTER.min(point.saturating_duration_since(fetched_at) / 10);
    point
        .checked_sub(window.mul_f64(jitter.clamp(0.0, 1.0)))
        .unwrap_or(point)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_up_to_the_cap() {
        for (failures, max) in [(1, 2), (2, 4), (3, 8), (6, 60), (40, 60)] {
            let d = retry_delay(failures);
            let max = Duration::from_secs(max);
            assert!(d <= max && d >= max / 2, "{failures}: {d:?}");
        }
    }

    #[test]
    fn short_credentials_are_fresh_for_half_their_lifetime() {
        let t = Instant::now();
        assert_eq!(
            fresh_until(t, Duration::from_secs(60)),
            t + Duration::from_secs(30)
        );
        assert_eq!(
            fresh_until(t, Duration::from_secs(6 * 3600)),
            t + Duration::from_secs(6 * 3600) - EXPIRY_MARGIN
        );
    }

    #[test]
    fn short_credentials_stop_being_fresh_where_they_stop_being_servable() {
        let t = Instant::now();
        for secs in [15, 20, 22, 25, 29, 30, 40] {
            let lifetime = Duration::from_secs(secs);
            let fresh = fresh_until(t, lifetime);
            assert!(fresh <= servable_until(t + lifetime), "{secs}s");
        }
    }

    #[test]
    fn durations_past_the_clock_do_not_panic() {
        let t = Instant::now();
        let huge = Duration::from_secs(u64::MAX);
        assert!(fresh_until(t, huge) > t);
        let fresh = t + Duration::from_secs(3600);
        assert!(refresh_point(t, fresh, huge, 0.5) <= fresh);
        assert!(later(t, huge) > t + Duration::from_secs(365 * 24 * 3600));
    }

    #[test]
    fn refresh_point_takes_the_earlier_limit_minus_at_most_a_tenth() {
        let t = Instant::now();
        let fresh = t + Duration::from_secs(5 * 3600);
        let hour = Duration::from_secs(3600);
        assert_eq!(refresh_point(t, fresh, 3 * hour, 0.0), t + 3 * hour);
        let jittered = refresh_point(t, fresh, 3 * hour, 0.999);
        assert!(jittered >= t + 3 * hour - MAX_REFRESH_JITTER);
        assert_eq!(
            refresh_point(t, fresh, 10 * hour, 0.0),
            fresh,
            "never after the fresh period"
        );
        let short = refresh_point(t, fresh, Duration::from_secs(10), 0.999);
        assert!(short >= t + Duration::from_secs(9), "{:?}", short - t);
    }
}
