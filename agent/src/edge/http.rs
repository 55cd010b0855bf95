//! The credentials port: the one route, the Host allow-list, request limits, and the single
//! place where every error becomes a status and a JSON body. The listeners themselves are
//! [`crate::edge::server`]'s.
//!
//! A request goes, top to bottom: route and method -> Host -> Authorization -> token
//! verification -> cache -> JSON.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use serde::Serialize;
use tokio::time::Instant;

use crate::credentials::cache::{CacheError, CredentialCache};
use crate::credentials::upstream::{Backend, Credentials, FailureKind};
use crate::defence::{self, Defence};
use crate::edge::server::FragmentInTarget;
use crate::identity::attest::{AttestError, Attestation};
use crate::identity::token::{TokenError, Verifier};
use crate::lifecycle::audit::AuditLog;
use crate::limits::{Limited, LogDecision, LogLimiter, RequestLimiter};
use crate::metrics::Metrics;

/// The only route on the credentials port.
pub const CREDENTIALS_PATH: &str = "/v1/credentials";
/// What a throttled client is told to wait; the SDKs retry after about 1 s anyway.
const RETRY_AFTER_SECS: &str = "1";
/// One deadline for the whole credentials path: keys (an unknown `kid`'s reload), the pod
/// lookup, the cache and the upstream call share it, so their own bounds cannot add up past
/// the contract's 5 s for a failed fresh request. The 200 ms left are for writing the answer.
pub const REQUEST_DEADLINE: Duration = Duration::from_millis(4800);

/// What a request was waiting for when [`REQUEST_DEADLINE`] passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    /// The verification keys (a reload for a key id the agent does not have yet).
    Keys,
    /// The caller check (a lookup of a pod the watch has not delivered yet).
    Caller,
    /// The credentials (an upstream call).
    Credentials,
}

impl Pending {
    const ALL: [Pending; 3] = [Pending::Keys, Pending::Caller, Pending::Credentials];

    fn code(self) -> &'static str {
        match self {
            Pending::Keys => "KeysUnavailable",
            Pending::Caller => "PodLookupTimeout",
            Pending::Credentials => "UpstreamTimeout",
        }
    }
}

/// Where a request is on its way, readable after its future was dropped at the deadline.
struct Progress(AtomicU8);

impl Progress {
    fn new() -> Progress {
        Progress(AtomicU8::new(0))
    }

    fn set(&self, pending: Pending) {
        self.0.store(pending as u8, Ordering::Relaxed);
    }

    fn get(&self) -> Pending {
        let at = usize::from(self.0.load(Ordering::Relaxed));
        Pending::ALL
            .get(at)
            .copied()
            .unwrap_or(Pending::Credentials)
    }
}

/// `Retry-After` for a limiter wait, in whole seconds (at least 1).
fn retry_after_value(secs: u64) -> &'static str {
    match secs {
        0 | 1 => "1",
        2 => "2",
        3..=5 => "5",
        _ => "10",
    }
}

/// Shared state of the credential listeners.
pub struct AppState {
    pub verifier: Verifier,
    /// The upstream, asked to admit a request before the cache is (the cache calls it too,
    /// to fetch).
    pub backend: Arc<dyn Backend>,
    pub cache: Arc<CredentialCache>,
    pub metrics: Metrics,
    pub hosts: HostAllowList,
    pub limiter: RequestLimiter,
    /// Refusal log lines, limited per reason.
    pub refusal_logs: LogLimiter,
    /// `--node-name` and `--caller-attestation`: tokens bound to another node, and callers
    /// that are not the token's pod, are refused.
    pub attest: Attestation,
    /// `--audit-log`: first deliveries of a key to a pod, recorded before the answer.
    pub audit: Option<AuditLog>,
}

/// Addresses the agent is bound to, as the Host header may name them.
#[derive(Debug, Clone, Default)]
pub struct HostAllowList {
    bound: Vec<SocketAddr>,
}

impl HostAllowList {
    pub fn new(bound: Vec<SocketAddr>) -> Self {
        HostAllowList { bound }
    }

    /// True when `host` is a bound IP literal (IPv6 in brackets), optionally with the port
    /// of a listener on that IP. Names, even `localhost`, are refused: a DNS-rebinding page
    /// in a browser on the node would send its own name.
    pub fn allows(&self, host: &str) -> bool {
        let Some((ip, port)) = parse_host(host) else {
            return false;
        };
        self.bound
            .iter()
            .any(|a| a.ip() == ip && port.is_none_or(|p| p == a.port()))
    }
}

fn parse_host(host: &str) -> Option<(IpAddr, Option<u16>)> {
    let (ip, rest) = if let Some(inner) = host.strip_prefix('[') {
        let (addr, rest) = inner.split_once(']')?;
        (IpAddr::V6(addr.parse::<Ipv6Addr>().ok()?), rest)
    } else {
        let (addr, rest) = match host.find(':') {
            Some(i) => host.split_at(i),
            None => (host, ""),
        };
        (IpAddr::V4(addr.parse::<Ipv4Addr>().ok()?), rest)
    };
    let port = match rest {
        "" => None,
        _ => {
            let digits = rest.strip_prefix(':')?;
            if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|b| b.is_ascii_digit())
            {
                return None;
            }
            Some(digits.parse::<u16>().ok()?)
        }
    };
    Some((ip, port))
}

/// Every way a request can fail, classified once.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no such route")]
    NotFound,
    #[error("only GET is supported")]
    MethodNotAllowed,
    #[error("{1}")]
    BadRequest(&'static str, String),
    #[error("the agent must be called through one of its bound addresses")]
    HostNotAllowed,
    #[error("too many requests ({} limit); retry after {retry_after_secs}s", .limited.scope())]
    RateLimited {
        limited: Limited,
        retry_after_secs: u64,
    },
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Attest(#[from] AttestError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("no answer within the request deadline (waiting for {0:?})")]
    Deadline(Pending),
}

impl ApiError {
    /// Status, error code and optional `Retry-After` for this error.
    fn classify(&self) -> (StatusCode, String, Option<&'static str>) {
        use StatusCode as S;
        match self {
            ApiError::NotFound => (S::NOT_FOUND, "NotFound".into(), None),
            ApiError::MethodNotAllowed => (S::METHOD_NOT_ALLOWED, "MethodNotAllowed".into(), None),
            ApiError::BadRequest(code, _) => (S::BAD_REQUEST, (*code).into(), None),
            ApiError::HostNotAllowed => (S::FORBIDDEN, "HostNotAllowed".into(), None),
            ApiError::Attest(e) if e.is_transient() => (
                S::SERVICE_UNAVAILABLE,
                e.code().into(),
                Some(RETRY_AFTER_SECS),
            ),
            ApiError::Attest(e) => (S::FORBIDDEN, e.code().into(), None),
            ApiError::RateLimited {
                retry_after_secs, ..
            } => (
                S::TOO_MANY_REQUESTS,
                "TooManyRequests".into(),
                Some(retry_after_value(*retry_after_secs)),
            ),
            ApiError::Token(e) => {
                let status = match e {
                    TokenError::Missing | TokenError::Malformed(_) => S::BAD_REQUEST,
                    TokenError::Algorithm(_)
                    | TokenError::UnknownKey
                    | TokenError::Signature
                    | TokenError::Expired
                    | TokenError::NotYetValid => S::UNAUTHORIZED,
                    TokenError::Audience | TokenError::Issuer | TokenError::Claims(_) => {
                        S::FORBIDDEN
                    }
                    TokenError::KeysUnavailable(_) => {
                        return (
                            S::SERVICE_UNAVAILABLE,
                            e.code().into(),
                            Some(RETRY_AFTER_SECS),
                        )
                    }
                };
                (status, e.code().into(), None)
            }
            ApiError::Cache(CacheError::Upstream(e)) => {
                let status = match e.kind {
                    FailureKind::Throttled => {
                        return (S::TOO_MANY_REQUESTS, e.code.clone(), Some(RETRY_AFTER_SECS))
                    }
                    // Pass the upstream's own 4xx through (404 for a missing association),
                    // but never let it pose as our rate limit.
                    kind @ (FailureKind::Rejected { .. }
                    | FailureKind::AssociationRefused { .. }
                    | FailureKind::TokenRefused { .. }) => match kind.refusal_status() {
                        Some(status) if (400..500).contains(&status) && status != 429 => {
                            S::from_u16(status).unwrap_or(S::BAD_REQUEST)
                        }
                        _ => S::BAD_REQUEST,
                    },
                    FailureKind::Busy => {
                        return (
                            S::SERVICE_UNAVAILABLE,
                            e.code.clone(),
                            Some(RETRY_AFTER_SECS),
                        )
                    }
                    FailureKind::Server { status: 503 } | FailureKind::Unreachable => {
                        S::SERVICE_UNAVAILABLE
                    }
                    FailureKind::Server { .. } | FailureKind::InvalidResponse => S::BAD_GATEWAY,
                    FailureKind::Timeout => S::GATEWAY_TIMEOUT,
                    FailureKind::Internal => S::INTERNAL_SERVER_ERROR,
                };
                (status, e.code.clone(), None)
            }
            ApiError::Cache(CacheError::Timeout) => {
                (S::GATEWAY_TIMEOUT, "UpstreamTimeout".into(), None)
            }
            ApiError::Cache(CacheError::Internal) => {
                (S::INTERNAL_SERVER_ERROR, "InternalError".into(), None)
            }
            ApiError::Deadline(pending) => {
                let status = match pending {
                    Pending::Keys | Pending::Caller => S::SERVICE_UNAVAILABLE,
                    Pending::Credentials => S::GATEWAY_TIMEOUT,
                };
                (status, pending.code().into(), Some(RETRY_AFTER_SECS))
            }
        }
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        let (status, code, retry_after) = self.classify();
        let message = match &self {
            ApiError::Cache(CacheError::Upstream(e)) if e.message.is_empty() => {
                format!("upstream error {}", e.code)
            }
            ApiError::Cache(CacheError::Upstream(e)) => e.message.clone(),
            other => other.to_string(),
        };
        let mut resp = json_response(
            status,
            &ErrorBody {
                code: &code,
                message: &message,
            },
        );
        if let Some(secs) = retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(secs));
        }
        resp
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
}

fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    // Serialising these plain structs of strings cannot fail.
    with_json_headers(
        status,
        Bytes::from(serde_json::to_vec(body).unwrap_or_default()),
    )
}

fn with_json_headers(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The credentials as the SDKs expect them: the body prepared when they were fetched
/// ([`Credentials::body`]), shared by every hit.
pub fn credentials_response(creds: &Credentials) -> Response<Full<Bytes>> {
    with_json_headers(StatusCode::OK, creds.body())
}

/// Handle one request on the credentials port.
pub async fn handle(
    state: Arc<AppState>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let route = if req.uri().path() == CREDENTIALS_PATH {
        "credentials"
    } else {
        "other"
    };
    let response = match credentials(&state, &req, peer, started).await {
        Ok(creds) => credentials_response(&creds),
        Err(err) => {
            let (status, code, _) = err.classify();
            match &err {
                ApiError::Token(e) => state.metrics.token_rejected(e.code()),
                ApiError::Attest(e) => state.metrics.token_rejected(e.code()),
                ApiError::RateLimited { limited, .. } => {
                    state.metrics.rate_limited(limited.scope())
                }
                _ => {}
            }
            let decision = if defence::on(Defence::RefusalLogLimit) {
                state.refusal_logs.check(&code, started)
            } else {
                LogDecision::Log { suppressed: 0 }
            };
            if let LogDecision::Log { suppressed } = decision {
                if suppressed > 0 {
                    tracing::warn!(code = %code, suppressed, interval_s = state.refusal_logs.interval().as_secs(),
                        "refused requests not logged in the last interval (counted in the metrics)");
                }
                if status.is_server_error() {
                    tracing::warn!(peer = %peer.ip(), status = status.as_u16(), code = %code, error = %err, "request failed");
                } else {
                    tracing::info!(peer = %peer.ip(), status = status.as_u16(), code = %code, error = %err, "request refused");
                }
            }
            err.into_response()
        }
    };
    state.metrics.request(
        route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

async fn credentials(
    state: &AppState,
    req: &Request<Incoming>,
    peer: SocketAddr,
    started: Instant,
) -> Result<Arc<Credentials>, ApiError> {
    // A fragment is no part of an HTTP request target (RFC 9112's origin-form), and the
    // parser would drop it: refused rather than served as the exact route.
    if req.extensions().get::<FragmentInTarget>().is_some() && defence::on(Defence::FragmentTarget)
    {
        return Err(ApiError::BadRequest(
            "BadRequestTarget",
            "a request target has no fragment (#)".into(),
        ));
    }
    // No normalisation: `/v1/credentials/`, `//v1/credentials` and percent-encodings are 404.
    if req.uri().path() != CREDENTIALS_PATH {
        return Err(ApiError::NotFound);
    }
    if req.method() != Method::GET {
        return Err(ApiError::MethodNotAllowed);
    }
    // Before any parsing or crypto: a flood costs one bucket check per request.
    if let Err(limited) = state.limiter.check(peer.ip()) {
        let retry_after_secs = limited.retry_after().as_secs_f64().ceil() as u64;
        return Err(ApiError::RateLimited {
            limited,
            retry_after_secs,
        });
    }
    if req.uri().authority().is_some() {
        return Err(ApiError::BadRequest(
            "BadRequestTarget",
            "absolute-form request targets are not accepted".into(),
        ));
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (Some(h), None) => h.to_str().map_err(|_| ApiError::HostNotAllowed)?,
        (None, _) if !defence::on(Defence::HostRequired) => "127.0.0.1",
        (None, _) if req.version() == Version::HTTP_10 => {
            return Err(ApiError::BadRequest(
                "MissingHost",
                "HTTP/1.0 requests must carry a Host header".into(),
            ))
        }
        (None, _) => {
            return Err(ApiError::BadRequest(
                "MissingHost",
                "the request has no Host header".into(),
            ))
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "DuplicateHost",
                "the request has more than one Host header".into(),
            ))
        }
    };
    if !state.hosts.allows(host) {
        return Err(ApiError::HostNotAllowed);
    }
    let mut auth = req.headers().get_all(header::AUTHORIZATION).iter();
    let token = match (auth.next(), auth.next()) {
        (Some(v), None) => v.to_str().map_err(|_| {
            if !defence::on(Defence::NonAsciiAuthorization) {
                panic!("non-ASCII Authorization with its defence switched off");
            }
            TokenError::Malformed("token has non-ASCII bytes".into())
        })?,
        (Some(v), Some(_)) if !defence::on(Defence::SingleAuthorization) => {
            v.to_str().unwrap_or_default()
        }
        (None, _) => return Err(TokenError::Missing.into()),
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "DuplicateAuthorization",
                "the request has more than one Authorization header".into(),
            ))
        }
    };
    // Dropping this future at the deadline cancels only the request's own waiting: what
    // other requests share (a key reload, a pod lookup, an upstream fetch) runs in tasks of
    // its own and goes on.
    let progress = Progress::new();
    let answer = async {
        progress.set(Pending::Keys);
        let identity = state.verifier.verify(token).await?;
        progress.set(Pending::Caller);
        state.attest.check(&identity, peer.ip()).await?;
        progress.set(Pending::Credentials);
        // Before the cache: what the backend would refuse (the STS backend: no association
        // for this service account, as of the file's last reload) is never served from it,
        // so removing an association stops a pod's cached credentials at once. The role it
        // names is part of the cache key, so a moved association fetches anew.
        let role = if defence::on(Defence::AssociationAdmission) {
            state
                .backend
                .admit(&identity)
                .map_err(CacheError::Upstream)?
        } else {
            None
        };
        let role = role.filter(|_| defence::on(Defence::RoleInCacheKey));
        let (creds, delivery) = state.cache.serve(&identity, role).await?;
        // A hit recorded already costs the claim's one check; the record's future is built
        // only for a first delivery. The pod gets its credentials whatever became of the
        // record: a failure is counted (and alerted on), and logged here at most a few times
        // a minute.
        if let Some(audit) = &state.audit {
            if let Some(claimed) = audit.claim(&identity, &creds) {
                let recorded = audit.record(claimed, &creds, delivery, peer.ip());
                if let Err(e) = recorded.await {
                    if let LogDecision::Log { suppressed } =
                        state.refusal_logs.check("AuditWriteFailed", Instant::now())
                    {
                        tracing::error!(error = %e, suppressed, "audit record not written; the request is served");
                    }
                }
            }
        }
        Ok(creds)
    };
    if !defence::on(Defence::EdgeDeadline) {
        return answer.await;
    }
    match tokio::time::timeout_at(started + REQUEST_DEADLINE, answer).await {
        Ok(answer) => answer,
        Err(_) => Err(ApiError::Deadline(progress.get())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_allow_list_accepts_bound_literals_only() {
        let list = HostAllowList::new(vec![
            "169.254.170.23:80".parse().unwrap(),
            "[fd00:ec2::23]:80".parse().unwrap(),
        ]);
        for ok in [
            "169.254.170.23",
            "169.254.170.23:80",
            "[fd00:ec2::23]",
            "[fd00:ec2::23]:80",
            "[FD00:EC2::23]",
            "[fd00:ec2:0::23]:80",
        ] {
            assert!(list.allows(ok), "{ok}");
        }
        for bad in [
            "localhost",
            "localhost:80",
            "169.254.170.23:81",
            "169.254.170.23:",
            "169.254.170.23:+80",
            "169.254.170.023",
            "169.254.170.2",
            "fd00:ec2::23",
            "[fd00:ec2::23",
            "[fd00:ec2::23]x",
            "[::ffff:169.254.170.23]",
            "evil.example",
            "",
            "169.254.170.23:80:80",
            "[fd00:ec2::23]:99999",
        ] {
            assert!(!list.allows(bad), "{bad}");
        }
    }

    mod host_properties {
        use super::*;
        use proptest::prelude::*;

        /// What `allows` must answer, by the standard library's own parsers: a bound socket
        /// address, or a bound IP alone (IPv6 in brackets).
        fn oracle(bound: &[SocketAddr], host: &str) -> bool {
            // Stricter than std on purpose: no IPv6 zone ids, and at most 5 port digits.
            if host.contains('%') {
                return false;
            }
            if let Ok(sa) = host.parse::<SocketAddr>() {
                let long_port = host.rsplit_once(':').is_some_and(|(_, p)| p.len() > 5);
                return !long_port && bound.contains(&sa);
            }
            let ip = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
                Some(inner) => inner.parse::<Ipv6Addr>().ok().map(IpAddr::V6),
                None => host.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
            };
            ip.is_some_and(|ip| bound.iter().any(|a| a.ip() == ip))
        }

        /// Every way a client may write `ip` in a Host header (without the port).
        fn spellings(ip: IpAddr, upper: bool) -> Vec<String> {
            match ip {
                IpAddr::V4(v4) => vec![v4.to_string()],
                IpAddr::V6(v6) => {
                    let s = v6.segments();
                    let case = |t: String| if upper { t.to_uppercase() } else { t };
                    let full = s.map(|g| format!("{g:x}")).join(":");
                    let padded = s.map(|g| format!("{g:04x}")).join(":");
                    [v6.to_string(), full, padded]
                        .into_iter()
                        .map(|t| format!("[{}]", case(t)))
                        .collect()
                }
            }
        }

        fn bound() -> impl Strategy<Value = (Ipv4Addr, Ipv6Addr, u16)> {
            (
                any::<[u8; 4]>().prop_map(Ipv4Addr::from),
                // Few distinct groups, so zero runs (compression) are common.
                proptest::array::uniform8(prop_oneof![Just(0u16), Just(0xec2), any::<u16>()])
                    .prop_map(Ipv6Addr::from),
                1u16..,
            )
        }

        proptest! {
            #[test]
            fn bound_addresses_are_allowed_in_every_spelling(
                (v4, v6, port) in bound(),
                upper in any::<bool>(),
            ) {
                let bound = vec![SocketAddr::new(v4.into(), port), SocketAddr::new(v6.into(), port)];
                let list = HostAllowList::new(bound.clone());
                for ip in [IpAddr::V4(v4), IpAddr::V6(v6)] {
                    for host in spellings(ip, upper) {
                        prop_assert!(list.allows(&host), "{}", host);
                        let with_port = format!("{host}:{port}");
                        prop_assert!(list.allows(&with_port), "{}", with_port);
                        let other = port.wrapping_add(1).max(1);
                        if other != port {
                            let other_port = format!("{host}:{other}");
                            prop_assert!(!list.allows(&other_port), "{}", other_port);
                        }
                    }
                }
            }

            #[test]
            fn other_addresses_are_refused(
                (v4, v6, port) in bound(),
                (o4, o6, _) in bound(),
                upper in any::<bool>(),
            ) {
                let list = HostAllowList::new(vec![
                    SocketAddr::new(v4.into(), port),
                    SocketAddr::new(v6.into(), port),
                ]);
                let others = [
                    (o4 != v4).then_some(IpAddr::V4(o4)),
                    (o6 != v6).then_some(IpAddr::V6(o6)),
                    // The IPv4 address mapped into IPv6 is a different literal.
                    Some(IpAddr::V6(v4.to_ipv6_mapped())),
                ];
                for ip in others.into_iter().flatten() {
                    for host in spellings(ip, upper) {
                        prop_assert!(!list.allows(&host), "{}", host);
                        let with_port = format!("{host}:{port}");
                        prop_assert!(!list.allows(&with_port), "{}", with_port);
                    }
                }
                // An unbracketed IPv6 literal is ambiguous with a port and never accepted.
                prop_assert!(!list.allows(&v6.to_string()));
            }

            #[test]
            fn arbitrary_strings_are_allowed_only_if_they_name_a_bound_address(
                (v4, v6, port) in bound(),
                host in prop_oneof![
                    any::<String>(),
                    "[0-9a-fA-F:.\\[\\]%+ -]{0,48}",
                    "[a-z0-9.-]{1,30}(:[0-9]{1,6})?",
                ],
            ) {
                let bound = vec![SocketAddr::new(v4.into(), port), SocketAddr::new(v6.into(), port)];
                let list = HostAllowList::new(bound.clone());
                prop_assert_eq!(list.allows(&host), oracle(&bound, &host), "{:?}", host);
            }

            #[test]
            fn near_misses_of_a_bound_address_follow_the_oracle(
                (v4, v6, port) in bound(),
                pick_v6 in any::<bool>(),
                upper in any::<bool>(),
                prefix in "[ \\[a-z0-9:.]{0,2}",
                suffix in "[ \\]a-z0-9:.%]{0,3}",
            ) {
                let bound = vec![SocketAddr::new(v4.into(), port), SocketAddr::new(v6.into(), port)];
                let list = HostAllowList::new(bound.clone());
                let ip = if pick_v6 { IpAddr::V6(v6) } else { IpAddr::V4(v4) };
                for base in spellings(ip, upper) {
                    for host in [format!("{prefix}{base}{suffix}"), format!("{base}:{port}{suffix}")] {
                        prop_assert_eq!(list.allows(&host), oracle(&bound, &host), "{:?}", host);
                    }
                }
            }
        }

        #[test]
        fn names_are_refused() {
            let list = HostAllowList::new(vec!["127.0.0.1:80".parse().unwrap()]);
            for name in [
                "localhost",
                "localhost:80",
                "127.0.0.1.nip.io",
                "LOCALHOST",
                "0x7f000001",
                "2130706433",
            ] {
                assert!(!list.allows(name), "{name}");
            }
        }
    }

    #[test]
    fn errors_map_to_the_contract_statuses() {
        use crate::credentials::upstream::UpstreamError;
        let up = |kind, code: &str| {
            ApiError::Cache(CacheError::Upstream(UpstreamError::new(kind, code, "m")))
        };
        let cases: Vec<(ApiError, u16)> = vec![
            (ApiError::Token(TokenError::Missing), 400),
            (ApiError::Token(TokenError::Malformed("x".into())), 400),
            (ApiError::Token(TokenError::Signature), 401),
            (ApiError::Token(TokenError::Expired), 401),
            (ApiError::Token(TokenError::Audience), 403),
            (ApiError::Token(TokenError::Claims("x".into())), 403),
            (ApiError::HostNotAllowed, 403),
            (ApiError::NotFound, 404),
            (ApiError::MethodNotAllowed, 405),
            (up(FailureKind::Throttled, "Throttling"), 429),
            (
                up(FailureKind::AssociationRefused { status: 404 }, "NotFound"),
                404,
            ),
            (
                up(FailureKind::TokenRefused { status: 400 }, "InvalidToken"),
                400,
            ),
            (
                up(FailureKind::Rejected { status: 400 }, "AccessDenied"),
                400,
            ),
            (up(FailureKind::Rejected { status: 429 }, "Odd"), 400),
            (up(FailureKind::Server { status: 500 }, "Internal"), 502),
            (up(FailureKind::Server { status: 503 }, "Unavailable"), 503),
            (up(FailureKind::Timeout, "UpstreamTimeout"), 504),
            (up(FailureKind::Unreachable, "UpstreamUnreachable"), 503),
        ];
        for (err, status) in cases {
            let resp = err.into_response();
            assert_eq!(resp.status().as_u16(), status);
            assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
            assert_eq!(
                resp.headers().contains_key(header::RETRY_AFTER),
                status == 429
            );
        }
    }
}
