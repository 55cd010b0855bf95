//! The cache's entries as one agent passes them to the next in a handoff.
//!
//! Every instant is written as milliseconds relative to the moment of export (signed where it
//! may lie ahead), so the two agents' monotonic clocks never meet. None of these types has
//! `Debug`: they hold secret keys, session tokens and pod tokens.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::slot::{Cached, Dormancy, Slot};
use super::{CacheKey, CredentialCache, PodRef};
use crate::credentials::upstream::{Credentials, Secret};
use crate::identity::token::{Identity, Token, VerifiedClaims};

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExportedEntry {
    key: ExportedKey,
    credentials: ExportedCredentials,
    fetched_age_ms: u64,
    /// To the end of the fresh period (negative: it has passed).
    fresh_in_ms: i64,
    /// To the refresh point (negative: it has passed).
    refresh_in_ms: i64,
    last_access_age_ms: u64,
    dormant: Option<ExportedDormancy>,
    /// The newest token seen for the key and what it proved: what a refresh presents.
    identity: Option<ExportedIdentity>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "scope", deny_unknown_fields)]
enum ExportedKey {
    #[serde(rename_all = "camelCase")]
    Pod {
        namespace: String,
        service_account: String,
        pod_uid: Option<String>,
        token_digest: Option<String>,
        role: Option<String>,
    },
    #[serde(rename_all = "camelCase")]
    Association {
        namespace: String,
        service_account: String,
        role: Option<String>,
    },
    #[serde(rename_all = "camelCase")]
    Unverified { token_digest: String },
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ExportedCredentials {
    access_key_id: String,
    secret_access_key: String,
    session_token: String,
    account_id: String,
    /// Unix seconds.
    expiration: u64,
    /// What the audit log records of the key; absent from a state written before it was.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    assumed_role_arn: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    association_id: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ExportedDormancy {
    Idle,
    TokenExpired,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ExportedIdentity {
    token: String,
    verified: Option<VerifiedClaims>,
    /// Unix seconds.
    expires_at: Option<u64>,
}

fn hex(d: &[u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    let bytes = s.as_bytes();
    if bytes.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in bytes.chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
    }
    Some(out)
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn from_unix_secs(s: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_secs(s))
        .unwrap_or(UNIX_EPOCH)
}

/// Signed milliseconds from `now` to `at`.
fn offset_ms(now: Instant, at: Instant) -> i64 {
    if at >= now {
        i64::try_from(at.duration_since(now).as_millis()).unwrap_or(i64::MAX)
    } else {
        -i64::try_from(now.duration_since(at).as_millis()).unwrap_or(i64::MAX)
    }
}

fn at_offset(now: Instant, ms: i64) -> Instant {
    let d = Duration::from_millis(ms.unsigned_abs());
    if ms >= 0 {
        super::policy::later(now, d)
    } else {
        now.checked_sub(d).unwrap_or(now)
    }
}

fn age(now: Instant, at: Instant) -> u64 {
    now.saturating_duration_since(at).as_millis() as u64
}

impl ExportedKey {
    fn of(key: &CacheKey) -> ExportedKey {
        let text = |s: &Arc<str>| s.to_string();
        match key {
            CacheKey::Pod {
                namespace,
                service_account,
                pod,
                role,
            } => {
                let (pod_uid, token_digest) = match pod {
                    PodRef::Uid(uid) => (Some(uid.to_string()), None),
                    PodRef::Token(d) => (None, Some(hex(d))),
                };
                ExportedKey::Pod {
                    namespace: text(namespace),
                    service_account: text(service_account),
                    pod_uid,
                    token_digest,
                    role: role.as_ref().map(text),
                }
            }
            CacheKey::Association {
                namespace,
                service_account,
                role,
            } => ExportedKey::Association {
                namespace: text(namespace),
                service_account: text(service_account),
                role: role.as_ref().map(text),
            },
            CacheKey::Unverified(d) => ExportedKey::Unverified {
                token_digest: hex(d),
            },
        }
    }

    fn key(self) -> Option<CacheKey> {
        Some(match self {
            ExportedKey::Pod {
                namespace,
                service_account,
                pod_uid,
                token_digest,
                role,
            } => CacheKey::Pod {
                namespace: namespace.into(),
                service_account: service_account.into(),
                pod: match (pod_uid, token_digest) {
                    (Some(uid), None) => PodRef::Uid(uid.into()),
                    (None, Some(d)) => PodRef::Token(unhex(&d)?),
                    _ => return None,
                },
                role: role.map(Into::into),
            },
            ExportedKey::Association {
                namespace,
                service_account,
                role,
            } => CacheKey::Association {
                namespace: namespace.into(),
                service_account: service_account.into(),
                role: role.map(Into::into),
            },
            ExportedKey::Unverified { token_digest } => CacheKey::Unverified(unhex(&token_digest)?),
        })
    }
}

impl CredentialCache {
    /// Every entry with credentials still worth serving, for the next agent.
    pub fn export(&self) -> Vec<ExportedEntry> {
        let now = Instant::now();
        let slots: Vec<(CacheKey, Arc<Slot>)> = self
            .lock_entries()
            .iter()
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        slots
            .into_iter()
            .filter_map(|(key, slot)| {
                let state = slot.lock();
                let c = state.current.as_ref().filter(|c| c.servable(now))?;
                Some(ExportedEntry {
                    key: ExportedKey::of(&key),
                    credentials: ExportedCredentials {
                        access_key_id: c.creds.access_key_id.clone(),
                        secret_access_key: c.creds.secret_access_key().to_owned(),
                        session_token: c.creds.session_token().to_owned(),
                        account_id: c.creds.account_id.clone(),
                        expiration: unix_secs(c.creds.expiration),
                        assumed_role_arn: c.creds.assumed_role_arn.clone(),
                        association_id: c.creds.association_id.clone(),
                    },
                    fetched_age_ms: age(now, c.fetched_at),
                    fresh_in_ms: offset_ms(now, c.fresh_until),
                    refresh_in_ms: offset_ms(now, c.refresh_at),
                    last_access_age_ms: age(now, state.last_access),
                    dormant: state.dormant.map(|d| match d {
                        Dormancy::Idle => ExportedDormancy::Idle,
                        Dormancy::TokenExpired => ExportedDormancy::TokenExpired,
                    }),
                    identity: state.identity.as_ref().map(|id| ExportedIdentity {
                        token: id.token.expose().to_owned(),
                        verified: id.verified.as_deref().cloned(),
                        expires_at: id.expires_at.map(unix_secs),
                    }),
                })
            })
            .collect()
    }

    /// Take the entries an earlier agent passed on, the most recently asked for first, up to
    /// `--max-cache-size`; each keeps its timing, and its next timer is set. Entries whose
    /// credentials are no longer servable, or whose key does not parse, are left out. Returns
    /// the number taken.
    pub fn import(&self, mut entries: Vec<ExportedEntry>) -> usize {
        if !self.settings.caching() {
            return 0;
        }
        let now = Instant::now();
        let limit = usize::try_from(self.settings.max_entries).unwrap_or(usize::MAX);
        entries.sort_by_key(|e| e.last_access_age_ms);
        let mut taken = Vec::new();
        {
            let mut map = self.lock_entries();
            for e in entries {
                if map.len() >= limit {
                    break;
                }
                let Some(key) = e.key.key() else { continue };
                if map.contains_key(&key) {
                    continue;
                }
                let c = e.credentials;
                // A taken key has been delivered to no pod by this agent: its first delivery
                // here is recorded (`origin: cache`).
                let creds = Arc::new(
                    Credentials::new(
                        c.access_key_id,
                        Secret::new(c.secret_access_key),
                        Secret::new(c.session_token),
                        c.account_id,
                        from_unix_secs(c.expiration),
                    )
                    .issued_for(c.assumed_role_arn, c.association_id),
                );
                let lifetime = creds.remaining(SystemTime::now());
                let cached = Cached {
                    creds,
                    fetched_at: now
                        .checked_sub(Duration::from_millis(e.fetched_age_ms))
                        .unwrap_or(now),
                    expires_at: super::policy::later(now, lifetime),
                    fresh_until: at_offset(now, e.fresh_in_ms),
                    refresh_at: at_offset(now, e.refresh_in_ms),
                };
                if !cached.servable(now) {
                    continue;
                }
                let next = match e.dormant {
                    Some(_) => cached.servable_until(),
                    None => cached.refresh_at.max(now),
                };
                let slot = Arc::new(Slot::new(
                    now.checked_sub(Duration::from_millis(e.last_access_age_ms))
                        .unwrap_or(now),
                ));
                {
                    let mut state = slot.lock();
                    state.current = Some(cached);
                    state.dormant = e.dormant.map(|d| match d {
                        ExportedDormancy::Idle => Dormancy::Idle,
                        ExportedDormancy::TokenExpired => Dormancy::TokenExpired,
                    });
                    state.identity = e.identity.map(|id| Identity {
                        token: Token::new(&id.token),
                        verified: id.verified.map(Arc::new),
                        expires_at: id.expires_at.map(from_unix_secs),
                    });
                }
                map.insert(key.clone(), slot.clone());
                taken.push((key, slot, next));
            }
            self.metrics.cache_entries.set(map.len() as i64);
        }
        let n = taken.len();
        for (key, slot, at) in taken {
            self.timers.schedule(&self.this, key, &slot, at, 0);
        }
        n
    }
}
