//! One cache entry: the last good credentials, the newest token seen for the key, the fetch
//! in flight, and what the refresh schedule knows about it.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;

use super::policy::{fresh_until, random_fraction, refresh_point, servable_until};
use crate::credentials::upstream::{Credentials, UpstreamError};
use crate::identity::token::Identity;

pub(super) type FetchOutcome = Result<Arc<Credentials>, UpstreamError>;

/// Credentials in hand and the instants that govern them (tokio's clock).
pub(super) struct Cached {
    pub creds: Arc<Credentials>,
    pub fetched_at: Instant,
    pub expires_at: Instant,
    pub fresh_until: Instant,
    pub refresh_at: Instant,
}

impl Cached {
    pub fn new(creds: Arc<Credentials>, now: Instant, max_retention: Duration) -> Cached {
        let lifetime = creds.remaining(SystemTime::now());
        let fresh_until = fresh_until(now, lifetime);
        Cached {
            creds,
            fetched_at: now,
            expires_at: super::policy::later(now, lifetime),
            fresh_until,
            refresh_at: refresh_point(now, fresh_until, max_retention, random_fraction()),
        }
    }

    /// Still far enough from expiry to hand out.
    pub fn servable(&self, now: Instant) -> bool {
        now < self.servable_until()
    }

    pub fn servable_until(&self) -> Instant {
        servable_until(self.expires_at)
    }
}

/// Why an entry past its refresh point was left alone instead of refreshed. Its credentials
/// are still served (and the next request refetches them) until they are no longer servable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dormancy {
    /// Nobody asked for it since its last fetch: the pod is gone or asks only near expiry.
    Idle,
    /// The newest token seen for it has expired, so there is nothing to refresh with.
    TokenExpired,
}

impl Dormancy {
    /// The eviction reason when a dormant entry's credentials run out.
    pub fn label(self) -> &'static str {
        match self {
            Dormancy::Idle => "idle",
            Dormancy::TokenExpired => "token_expired",
        }
    }
}

pub(super) struct SlotState {
    pub current: Option<Cached>,
    pub inflight: Option<watch::Receiver<Option<FetchOutcome>>>,
    /// The newest token seen for this key: what a background refresh presents.
    pub identity: Option<Identity>,
    pub last_access: Instant,
    /// Bumped whenever a fetch completes, so a superseded timer does nothing.
    pub generation: u64,
    pub failures: u32,
    /// After a failed refresh: no request-path upstream call before this.
    pub retry_at: Option<Instant>,
    /// A background refresh is waiting for budget or running.
    pub refreshing: bool,
    /// Set when the refresh point passed without a refresh.
    pub dormant: Option<Dormancy>,
    /// The upstream's last refusal of the association, answered until the instant.
    pub refused: Option<(UpstreamError, Instant)>,
}

impl SlotState {
    pub fn remember(&mut self, identity: &Identity) {
        // Cheap on the hit path: the same token again (the common case) is not cloned.
        let newer = match &self.identity {
            None => true,
            Some(old) => identity.expires_at > old.expires_at,
        };
        if newer {
            self.identity = Some(identity.clone());
        }
    }

    /// Some client asked for this entry since its credentials were fetched.
    pub fn wanted(&self) -> bool {
        self.current
            .as_ref()
            .is_some_and(|c| self.last_access >= c.fetched_at)
    }

    /// The token a refresh would present, if it is still valid.
    pub fn refresh_token(&self) -> Option<Identity> {
        self.identity
            .as_ref()
            .filter(|id| id.expires_at.is_none_or(|exp| exp > SystemTime::now()))
            .cloned()
    }

    /// Order of eviction when the cache is full, lowest first: entries with nothing to serve,
    /// then dormant ones, then the rest, each least recently asked for first. A fetch in
    /// flight goes last: its waiters still get their answer, but a new request for the key
    /// would call the upstream again.
    pub fn eviction_rank(&self, now: Instant) -> (u8, Instant) {
        let class = match &self.current {
            _ if self.inflight.is_some() => 3,
            Some(c) if c.servable(now) && self.dormant.is_none() => 2,
            Some(c) if c.servable(now) => 1,
            _ => 0,
        };
        (class, self.last_access)
    }
}

/// One cache entry.
pub struct Slot {
    state: Mutex<SlotState>,
}

impl Slot {
    pub(super) fn new(now: Instant) -> Slot {
        Slot {
            state: Mutex::new(SlotState {
                current: None,
                inflight: None,
                identity: None,
                last_access: now,
                generation: 0,
                failures: 0,
                retry_at: None,
                refreshing: false,
                dormant: None,
                refused: None,
            }),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, SlotState> {
        crate::sync::lock(&self.state)
    }
}

/// Where a fetch came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    Request,
    Refresh,
}

impl Origin {
    pub fn label(self) -> &'static str {
        match self {
            Origin::Request => "request",
            Origin::Refresh => "refresh",
        }
    }
}

/// What a completed fetch did to its entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// New credentials are in the entry.
    Success,
    /// The fetch failed, and the entry keeps serving the credentials it had.
    FailedKept,
    /// The fetch failed with nothing to fall back on.
    Failed,
    /// The upstream refused the key, and the entry's credentials were dropped.
    Revoked,
    /// The upstream refused the key, which had no credentials.
    Refused,
}

impl Outcome {
    /// `pod_identity_agent_refreshes_total{outcome}`.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::FailedKept => "failed_kept",
            Outcome::Failed => "failed",
            Outcome::Revoked => "revoked",
            Outcome::Refused => "refused",
        }
    }
}
