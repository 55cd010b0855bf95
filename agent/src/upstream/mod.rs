//! Where credentials come from: the [`Backend`] trait and the types every backend returns.
//!
//! The cache talks to `dyn Backend` only, so the EKS Auth and STS implementations can differ
//! in wire format while sharing single-flight, caching and error handling.

pub mod eks_auth;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::token::Identity;

/// A secret string (secret access key, session token). `Debug`/`Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(s: impl Into<Arc<str>>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("** redacted **")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("** redacted **")
    }
}

/// Role credentials as the agent serves them.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Secret,
    pub account_id: String,
    pub expiration: SystemTime,
}

impl Credentials {
    /// Time left before these credentials expire (zero if they already have).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.expiration
            .duration_since(now)
            .unwrap_or(Duration::ZERO)
    }
}

/// How an upstream failure is classified; decides the status a client sees and, with the
/// next issue's refresh logic, whether cached credentials survive it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The upstream throttled us (`ThrottlingException`).
    Throttled,
    /// The upstream refused this request (4xx other than throttling); `status` is its status.
    Rejected { status: u16 },
    /// The upstream failed (5xx).
    Server { status: u16 },
    /// No answer within the deadline.
    Timeout,
    /// Could not connect or the connection broke.
    Unreachable,
    /// A 200 whose body is unusable.
    InvalidResponse,
    /// The agent's own bound on concurrent upstream calls was reached (no call was made).
    Busy,
    /// The request could not be built or signed (e.g. the agent has no AWS credentials).
    Internal,
}

impl FailureKind {
    /// Bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            FailureKind::Throttled => "throttled",
            FailureKind::Rejected { .. } => "rejected",
            FailureKind::Server { .. } => "server_error",
            FailureKind::Timeout => "timeout",
            FailureKind::Unreachable => "unreachable",
            FailureKind::InvalidResponse => "invalid_response",
            FailureKind::Busy => "busy",
            FailureKind::Internal => "internal",
        }
    }

    /// Worth another attempt within the same request.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            FailureKind::Server { .. } | FailureKind::Timeout | FailureKind::Unreachable
        )
    }
}

/// A failed upstream call. `code` is the upstream's error code when it sent one (bounded to
/// what its model defines, or a generic name), `message` is safe to show to the pod.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct UpstreamError {
    pub kind: FailureKind,
    pub code: String,
    pub message: String,
}

impl UpstreamError {
    pub fn new(kind: FailureKind, code: impl Into<String>, message: impl Into<String>) -> Self {
        UpstreamError {
            kind,
            code: code.into(),
            message: message.into(),
        }
    }
}

pub type FetchFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Credentials, UpstreamError>> + Send + 'a>>;

/// A source of role credentials for a pod's identity.
pub trait Backend: Send + Sync + 'static {
    /// Exchange the identity's token for credentials. Implementations bound their own time
    /// (the caller adds an outer deadline as well).
    fn fetch<'a>(&'a self, identity: &'a Identity) -> FetchFuture<'a>;
}

/// The account of an ARN (`arn:partition:service:region:account:resource`).
pub fn account_of_arn(arn: &str) -> Option<&str> {
    let mut parts = arn.splitn(6, ':');
    let (Some("arn"), Some(_), Some(_), Some(_), Some(account), Some(_)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    (account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit())).then_some(account)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_from_role_arn() {
        assert_eq!(
            account_of_arn("arn:aws:sts::111122223333:assumed-role/r/s"),
            Some("111122223333")
        );
        assert_eq!(
            account_of_arn("arn:aws-cn:sts::123456789012:assumed-role/r/s:x"),
            Some("123456789012")
        );
        assert_eq!(account_of_arn("arn:aws:sts::1111:assumed-role/r/s"), None);
        assert_eq!(account_of_arn("not-an-arn"), None);
        assert_eq!(account_of_arn("arn:aws:sts::111122223333"), None);
    }

    #[test]
    fn secrets_are_redacted() {
        let c = Credentials {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: Secret::new("wJalrXUtnFEMI"),
            session_token: Secret::new("IQoJb3JpZ2luX2Vj"),
            account_id: "111122223333".into(),
            expiration: SystemTime::now(),
        };
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("wJalrXUtnFEMI") && !shown.contains("IQoJb3JpZ2luX2Vj"),
            "{shown}"
        );
    }
}
