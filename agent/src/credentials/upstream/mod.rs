//! Where credentials come from: the [`Backend`] trait and the types every backend returns.
//!
//! The cache talks to `dyn Backend` only, so the EKS Auth and STS implementations can differ
//! in wire format while sharing single-flight, caching and error handling.

pub mod eks_auth;
pub mod sts;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::credentials::deliveries::Deliveries;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_eksauth::config::http::HttpResponse;
use aws_sdk_eksauth::config::interceptors::BeforeDeserializationInterceptorContextMut;
use aws_sdk_eksauth::config::{ConfigBag, Intercept, RuntimeComponents, SharedHttpClient};
use aws_sdk_eksauth::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_smithy_types::body::SdkBody;
use bytes::Bytes;

use crate::config::{ConfigError, UpstreamConfig};
use crate::defence::{self, Defence};
use crate::identity::token::Identity;

// The SDKs' own retries are turned off and replaced by MAX_ATTEMPTS explicit attempts inside
// OPERATION_TIMEOUT: a pod's SDK gives up on us after 1 s (JS) or 2 s (botocore) per attempt
// and retries on its own, so the agent must answer within the contract's 5 s even when the
// upstream hangs, and must not multiply a throttled call into more calls.

/// TCP+TLS connect budget; a healthy regional endpoint connects in tens of milliseconds.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);
/// One attempt; EKS Auth and STS answer in well under a second when healthy.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(2000);
/// Whole call, retries included: below the contract's 5 s for a failing fresh request.
pub const OPERATION_TIMEOUT: Duration = Duration::from_millis(4500);
/// One retry for transient failures (5xx, timeouts, broken connections); never for throttling.
const MAX_ATTEMPTS: u32 = 2;
/// Pause before the retry.
const RETRY_DELAY: Duration = Duration::from_millis(100);
/// Upstream messages are shown to pods; keep them bounded.
const MAX_MESSAGE_LEN: usize = 512;
/// Largest upstream response body read. A real answer is 2-4 KiB; anything past this is a
/// broken or hostile upstream, and reading it would cost memory per in-flight call.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Furthest expiration accepted: STS role sessions last at most 12 h and EKS Auth's 6 h, so
/// twice the longest leaves room for clock skew and nothing for an absurd date, which would
/// keep a pod on credentials that stop working long before the date it was told.
pub const MAX_CREDENTIAL_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Access key IDs: 16-128 word characters (IAM's own bounds).
const ACCESS_KEY_ID_LEN: std::ops::RangeInclusive<usize> = 16..=128;
/// Secret access keys are 40 characters; allow some room, no more.
const MAX_SECRET_LEN: usize = 256;

/// The AWS SDK configuration both backends start from: explicit timeouts, no SDK retries,
/// the region from `--region` or the SDK's chain.
async fn sdk_config(
    config: &UpstreamConfig,
    anonymous: bool,
    http_client: Option<SharedHttpClient>,
) -> Result<aws_config::SdkConfig, ConfigError> {
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .operation_attempt_timeout(ATTEMPT_TIMEOUT)
        .operation_timeout(OPERATION_TIMEOUT)
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .timeout_config(timeouts)
        .retry_config(RetryConfig::disabled())
        .http_client(http_client.unwrap_or_else(http_client_with_proxy_from_env));
    if let Some(region) = &config.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if anonymous {
        loader = loader.no_credentials();
    } else if let Some(interval) = config.rotate_credentials {
        loader = loader.credentials_provider(RotatingSharedFile { interval });
    } else if let Some(creds) = &config.static_upstream_credentials {
        loader = loader.credentials_provider(aws_sdk_eksauth::config::Credentials::new(
            creds.access_key_id.clone(),
            creds.secret_access_key.clone(),
            None,
            None,
            "pod-identity-agent-dev",
        ));
    }
    let sdk = loader.load().await;
    if sdk.region().is_none() {
        return Err(ConfigError::new(
            "region",
            "no AWS region configured (set --region or AWS_REGION)",
        ));
    }
    Ok(sdk)
}

/// The SDK's default HTTPS client, plus `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` from the
/// environment: nodes in private subnets often reach AWS only through a proxy, and the SDK's
/// default client ignores those variables.
fn http_client_with_proxy_from_env() -> SharedHttpClient {
    use aws_smithy_http_client::{proxy::ProxyConfig, tls, Connector};
    aws_smithy_http_client::Builder::new().build_with_connector_fn(|settings, components| {
        let mut builder = Connector::builder().proxy_config(ProxyConfig::from_env());
        if let Some(settings) = settings {
            builder = builder.connector_settings(settings.clone());
        }
        if let Some(sleep) = components.and_then(|c| c.sleep_impl()) {
            builder = builder.sleep_impl(sleep);
        }
        builder
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::AwsLc,
            ))
            .build()
    })
}

/// `--rotate-credentials`: the node's own credentials come from the shared credentials file
/// (profile `default`, or `AWS_PROFILE`), re-read every `interval`. On hybrid nodes IAM Roles
/// Anywhere or SSM rewrites that file, and static credentials would otherwise be cached by
/// the SDK for ever.
#[derive(Debug)]
struct RotatingSharedFile {
    interval: Duration,
}

impl aws_credential_types::provider::ProvideCredentials for RotatingSharedFile {
    fn provide_credentials<'a>(
        &'a self,
    ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        aws_credential_types::provider::future::ProvideCredentials::new(async move {
            // A new provider reads the file anew.
            let creds = aws_config::profile::ProfileFileCredentialsProvider::builder()
                .build()
                .provide_credentials()
                .await?;
            tracing::debug!(access_key_id = %creds.access_key_id(), "read the shared credentials file");
            // Expire soon so the SDK's identity cache comes back for the file's next version.
            Ok(aws_credential_types::Credentials::new(
                creds.access_key_id(),
                creds.secret_access_key(),
                creds.session_token().map(str::to_owned),
                Some(SystemTime::now() + self.interval),
                "rotating-shared-credentials-file",
            ))
        })
    }
}

/// Caps every upstream response body at [`MAX_RESPONSE_BYTES`]: the SDK reads a body whole
/// before parsing it, so without this a hostile or broken endpoint could make each in-flight
/// call hold as much memory as it cares to send within the attempt timeout. A longer body
/// fails the read, which [`classify`] reports as an invalid response.
#[derive(Debug)]
struct ResponseSizeLimit;

impl Intercept for ResponseSizeLimit {
    fn name(&self) -> &'static str {
        "ResponseSizeLimit"
    }

    fn modify_before_deserialization(
        &self,
        context: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), aws_sdk_eksauth::error::BoxError> {
        let body = context.response_mut().body_mut();
        let inner = std::mem::replace(body, SdkBody::taken());
        *body = if defence::on(Defence::ResponseSizeCap) {
            SdkBody::from_body_1_x(http_body_util::Limited::new(inner, MAX_RESPONSE_BYTES))
        } else {
            inner
        };
        Ok(())
    }
}

/// Run `attempt` up to [`MAX_ATTEMPTS`] times for transient failures, all within
/// [`OPERATION_TIMEOUT`].
async fn with_retries<F, Fut>(
    service: &'static str,
    mut attempt: F,
) -> Result<Credentials, UpstreamError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Credentials, UpstreamError>>,
{
    let calls = async {
        let mut n = 1;
        loop {
            match attempt().await {
                Ok(creds) => return Ok(creds),
                Err(err) if n < MAX_ATTEMPTS && err.kind.is_transient() => {
                    tracing::debug!(attempt = n, service, code = %err.code, "retrying upstream call");
                    n += 1;
                    tokio::time::sleep(RETRY_DELAY).await;
                }
                Err(err) => return Err(err),
            }
        }
    };
    match tokio::time::timeout(OPERATION_TIMEOUT, calls).await {
        Ok(result) => result,
        Err(_) => Err(UpstreamError::new(
            FailureKind::Timeout,
            "UpstreamTimeout",
            format!("{service} did not answer in time"),
        )),
    }
}

fn bounded(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(MAX_MESSAGE_LEN)
        .collect()
}

/// Which error codes of a service mean what.
struct CodePolicy {
    service: &'static str,
    /// The service's other modeled error codes. A code in none of these lists reaches the pod
    /// as a generic code for its status: what an upstream (or whatever answers in its place)
    /// puts in its error type is not passed on verbatim.
    other_codes: &'static [&'static str],
    throttling: &'static [&'static str],
    /// Modeled errors worth one retry (besides 5xx and transport failures).
    transient: &'static [&'static str],
    /// Codes that refuse the association itself ([`FailureKind::AssociationRefused`]).
    association_refusals: &'static [&'static str],
    /// Codes that refuse the token presented ([`FailureKind::TokenRefused`]).
    token_refusals: &'static [&'static str],
}

/// Classify an SDK error once, for both the status a pod sees and the cache's decisions.
fn classify<E>(err: SdkError<E, HttpResponse>, policy: &CodePolicy) -> UpstreamError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let service = policy.service;
    match &err {
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let e = se.err();
            let raw_code = e.code().unwrap_or_default();
            let code = if policy.knows(raw_code) || !defence::on(Defence::ClosedErrorCodes) {
                raw_code.to_owned()
            } else {
                generic_code(status).to_owned()
            };
            let message = format!(
                "error type {}: {}",
                escaped(raw_code),
                e.message().map(bounded).unwrap_or_default()
            );
            let kind = if policy.throttling.contains(&code.as_str()) || status == 429 {
                FailureKind::Throttled
            } else if policy.association_refusals.contains(&code.as_str()) {
                FailureKind::AssociationRefused { status }
            } else if policy.token_refusals.contains(&code.as_str()) {
                FailureKind::TokenRefused { status }
            } else if policy.transient.contains(&code.as_str()) {
                // The upstream's own dependency failed (e.g. STS reaching the IdP): a gateway error.
                FailureKind::Server { status: 502 }
            } else if status >= 500 {
                FailureKind::Server { status }
            } else if (400..500).contains(&status) {
                FailureKind::Rejected { status }
            } else {
                FailureKind::InvalidResponse
            };
            UpstreamError::from_upstream(kind, code, message)
        }
        SdkError::TimeoutError(_) => UpstreamError::new(
            FailureKind::Timeout,
            "UpstreamTimeout",
            format!("{service} did not answer in time"),
        ),
        SdkError::DispatchFailure(d) if d.is_timeout() => UpstreamError::new(
            FailureKind::Timeout,
            "UpstreamTimeout",
            format!("{service} did not answer in time"),
        ),
        SdkError::DispatchFailure(d) if d.is_user() => UpstreamError::from_upstream(
            FailureKind::Internal,
            "UpstreamRequestFailed",
            bounded(&DisplayErrorContext(&err).to_string()),
        ),
        // The connection failed in a way the client cannot name (closed without an answer,
        // a status line that is not HTTP): the upstream's side, a gateway error worth the
        // one retry.
        SdkError::DispatchFailure(_) if !is_unreachable(&err) => UpstreamError::from_upstream(
            FailureKind::Server { status: 502 },
            "UpstreamRequestFailed",
            bounded(&DisplayErrorContext(&err).to_string()),
        ),
        SdkError::DispatchFailure(_) => UpstreamError::from_upstream(
            FailureKind::Unreachable,
            "UpstreamUnreachable",
            format!(
                "could not reach {service}: {}",
                bounded(&DisplayErrorContext(&err).to_string())
            ),
        ),
        SdkError::ResponseError(_) => UpstreamError::new(
            FailureKind::InvalidResponse,
            "InvalidUpstreamResponse",
            format!("{service} sent a response that could not be read"),
        ),
        _ => UpstreamError::from_upstream(
            FailureKind::Server { status: 502 },
            "UpstreamRequestFailed",
            bounded(&DisplayErrorContext(&err).to_string()),
        ),
    }
}

/// A dispatch failure that never reached the upstream (refused, unresolvable, TLS): 503.
fn is_unreachable<E>(err: &SdkError<E, HttpResponse>) -> bool {
    matches!(err, SdkError::DispatchFailure(d) if d.is_io())
}

impl CodePolicy {
    /// Whether `code` is one the service's model defines.
    fn knows(&self, code: &str) -> bool {
        [
            self.throttling,
            self.transient,
            self.association_refusals,
            self.token_refusals,
            self.other_codes,
        ]
        .iter()
        .any(|codes| codes.contains(&code))
    }
}

/// The code a pod is told for an error type the service does not define.
fn generic_code(status: u16) -> &'static str {
    match status {
        429 => "TooManyRequests",
        400..=499 => "UpstreamRejected",
        500..=599 => "UpstreamServerError",
        _ => "InvalidUpstreamResponse",
    }
}

/// `s` for the log: at most [`MAX_MESSAGE_LEN`] characters, each control or formatting
/// character (a right-to-left override, say) escaped, so a hostile value can neither flood
/// nor disguise the log line.
fn escaped(s: &str) -> String {
    s.chars()
        .take(MAX_MESSAGE_LEN)
        .flat_map(char::escape_debug)
        .collect()
}

/// The credential fields both services answer with, under the same names in both SDKs.
trait IssuedFields {
    fn key_id(&self) -> &str;
    fn secret(&self) -> &str;
    fn token(&self) -> &str;
    fn expires(&self) -> aws_smithy_types::DateTime;
}

macro_rules! issued_fields {
    ($($ty:ty),*) => {$(
        impl IssuedFields for $ty {
            fn key_id(&self) -> &str {
                self.access_key_id()
            }
            fn secret(&self) -> &str {
                self.secret_access_key()
            }
            fn token(&self) -> &str {
                self.session_token()
            }
            fn expires(&self) -> aws_smithy_types::DateTime {
                *self.expiration()
            }
        }
    )*};
}

issued_fields!(
    aws_sdk_eksauth::types::Credentials,
    aws_sdk_sts::types::Credentials
);

/// Credentials from a 200 response of either service, checked as untrusted input: key
/// fields present, of the right shape and size (they end up in the pod's HTTP headers), and
/// an expiration no further away than any real session lasts. Too soon is the cache's call
/// (`MIN_SERVABLE_LIFETIME`).
fn checked_credentials(
    service: &str,
    issued: &impl IssuedFields,
    account_id: &str,
) -> Result<Credentials, UpstreamError> {
    let (access_key_id, secret_access_key, session_token) =
        (issued.key_id(), issued.secret(), issued.token());
    let expiration = issued.expires();
    let invalid = |what: &str| invalid_response(service, what);
    let expiration = SystemTime::try_from(expiration)
        .map_err(|_| invalid("has an unrepresentable expiration"))?;
    if access_key_id.is_empty() || secret_access_key.is_empty() || session_token.is_empty() {
        return Err(invalid("has empty credential fields"));
    }
    if !ACCESS_KEY_ID_LEN.contains(&access_key_id.len())
        || !access_key_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(invalid("has a malformed access key ID"));
    }
    if secret_access_key.len() > MAX_SECRET_LEN || !is_visible_ascii(secret_access_key) {
        return Err(invalid("has a malformed secret access key"));
    }
    if !is_visible_ascii(session_token) {
        return Err(invalid("has a malformed session token"));
    }
    let now = SystemTime::now();
    if expiration <= now {
        return Err(invalid("has credentials that have already expired"));
    }
    if expiration > now + MAX_CREDENTIAL_LIFETIME {
        return Err(invalid("has an expiration more than 24 h away"));
    }
    Ok(Credentials::new(
        access_key_id,
        Secret::new(secret_access_key),
        Secret::new(session_token),
        account_id,
        expiration,
    ))
}

/// Printable ASCII without spaces: what a header value built from it can carry as is.
fn is_visible_ascii(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_graphic())
}

/// An unusable 200 from `service`.
fn invalid_response(service: &str, what: &str) -> UpstreamError {
    UpstreamError::new(
        FailureKind::InvalidResponse,
        "InvalidUpstreamResponse",
        format!("{service} response {what}"),
    )
}

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
///
/// The body a pod gets (`{AccessKeyId, SecretAccessKey, Token, AccountId, Expiration}`) is
/// encoded once, when the credentials arrive, and every request they answer shares it (a
/// reference count, no copy). The secret key and the session token are held only inside that
/// body, so a cache entry keeps one copy of them, not two.
#[derive(Clone)]
pub struct Credentials {
    pub access_key_id: String,
    pub account_id: String,
    pub expiration: SystemTime,
    /// The role session the key belongs to (`assumed-role/<role>/<session>`), as the upstream
    /// named it; empty when it did not (the audit log records it).
    pub assumed_role_arn: String,
    /// EKS Auth's pod identity association behind the key (STS has none).
    pub association_id: Option<String>,
    /// The pods this key was recorded as delivered to (`--audit-log`).
    pub deliveries: Deliveries,
    body: Bytes,
    secret_access_key: Held,
    session_token: Held,
}

/// Where a secret is: a byte range of the body, or (when JSON had to escape it, which real
/// credentials never need) a copy of its own.
#[derive(Clone)]
enum Held {
    InBody(u32, u32),
    Own(Secret),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"** redacted **")
            .field("session_token", &"** redacted **")
            .field("account_id", &self.account_id)
            .field("expiration", &self.expiration)
            .finish()
    }
}

/// Append `value` as a JSON string; its byte range in `body` when it needed no escaping.
fn push_json_str(body: &mut Vec<u8>, value: &str) -> Option<(u32, u32)> {
    let start = body.len();
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *body, value);
    let end = body.len();
    let plain = end - start == value.len() + 2;
    (plain && end <= u32::MAX as usize).then(|| ((start + 1) as u32, (end - 1) as u32))
}

impl Credentials {
    pub fn new(
        access_key_id: impl Into<String>,
        secret_access_key: Secret,
        session_token: Secret,
        account_id: impl Into<String>,
        expiration: SystemTime,
    ) -> Credentials {
        let access_key_id = access_key_id.into();
        let account_id = account_id.into();
        let (secret, token) = (secret_access_key.expose(), session_token.expose());
        let mut body = Vec::with_capacity(
            120 + access_key_id.len() + secret.len() + token.len() + account_id.len(),
        );
        body.extend_from_slice(b"{\"AccessKeyId\":");
        push_json_str(&mut body, &access_key_id);
        body.extend_from_slice(b",\"SecretAccessKey\":");
        let secret_at = push_json_str(&mut body, secret);
        body.extend_from_slice(b",\"Token\":");
        let token_at = push_json_str(&mut body, token);
        body.extend_from_slice(b",\"AccountId\":");
        push_json_str(&mut body, &account_id);
        // RFC 3339 UTC with `Z`, which the Rust and JS SDKs require.
        body.extend_from_slice(b",\"Expiration\":");
        push_json_str(
            &mut body,
            &humantime::format_rfc3339_seconds(expiration).to_string(),
        );
        body.push(b'}');
        body.shrink_to_fit();
        let held = |at: Option<(u32, u32)>, own: Secret| match at {
            Some((from, to)) => Held::InBody(from, to),
            None => Held::Own(own),
        };
        Credentials {
            access_key_id,
            account_id,
            expiration,
            assumed_role_arn: String::new(),
            association_id: None,
            deliveries: Deliveries::default(),
            body: Bytes::from(body),
            secret_access_key: held(secret_at, secret_access_key),
            session_token: held(token_at, session_token),
        }
    }

    /// The same credentials, with the role session and the association they were issued
    /// for (what the audit log says of a key besides the key itself).
    pub fn issued_for(
        mut self,
        assumed_role_arn: impl Into<String>,
        association_id: Option<String>,
    ) -> Credentials {
        self.assumed_role_arn = assumed_role_arn.into();
        self.association_id = association_id;
        self
    }

    /// The JSON body a pod gets for these credentials.
    pub fn body(&self) -> Bytes {
        self.body.clone()
    }

    pub fn secret_access_key(&self) -> &str {
        self.held(&self.secret_access_key)
    }

    pub fn session_token(&self) -> &str {
        self.held(&self.session_token)
    }

    fn held<'a>(&'a self, held: &'a Held) -> &'a str {
        match held {
            Held::InBody(from, to) => {
                std::str::from_utf8(&self.body[*from as usize..*to as usize]).unwrap_or_default()
            }
            Held::Own(secret) => secret.expose(),
        }
    }

    /// Time left before these credentials expire (zero if they already have).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.expiration
            .duration_since(now)
            .unwrap_or(Duration::ZERO)
    }
}

/// How an upstream failure is classified; decides the status a client sees and, through the
/// cache's refresh policy, whether cached credentials survive it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The upstream throttled us (`ThrottlingException`).
    Throttled,
    /// The upstream refused this request (4xx other than throttling and the refusals
    /// below); `status` is its status.
    Rejected { status: u16 },
    /// The upstream refused the association itself (deleted, or the role is not allowed):
    /// any token of the key gets the same answer, so cached credentials are dropped and the
    /// refusal may be remembered for a few seconds.
    AssociationRefused { status: u16 },
    /// The upstream refused the token presented (invalid, expired, claims rejected): cached
    /// credentials are dropped, but the pod's next token may fare better.
    TokenRefused { status: u16 },
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
            FailureKind::Rejected { .. }
            | FailureKind::AssociationRefused { .. }
            | FailureKind::TokenRefused { .. } => "rejected",
            FailureKind::Server { .. } => "server_error",
            FailureKind::Timeout => "timeout",
            FailureKind::Unreachable => "unreachable",
            FailureKind::InvalidResponse => "invalid_response",
            FailureKind::Busy => "busy",
            FailureKind::Internal => "internal",
        }
    }

    /// After this, credentials cached for the key must not be served again: the association
    /// or the pod's right to it is gone.
    pub fn is_irrecoverable(&self) -> bool {
        matches!(
            self,
            FailureKind::AssociationRefused { .. } | FailureKind::TokenRefused { .. }
        )
    }

    pub fn is_association_refusal(&self) -> bool {
        matches!(self, FailureKind::AssociationRefused { .. })
    }

    /// The HTTP status the upstream answered with, for a refusal.
    pub fn refusal_status(&self) -> Option<u16> {
        match self {
            FailureKind::Rejected { status }
            | FailureKind::AssociationRefused { status }
            | FailureKind::TokenRefused { status } => Some(*status),
            _ => None,
        }
    }

    /// The fixed text a pod is told for an upstream failure of this kind.
    pub fn pod_message(&self) -> &'static str {
        match self {
            FailureKind::Throttled => "the upstream is throttling credential requests; retry shortly",
            FailureKind::Rejected { .. } => "the upstream refused the credential request",
            FailureKind::AssociationRefused { .. } => {
                "the upstream refused this service account's association (none exists, or its role does not allow it)"
            }
            FailureKind::TokenRefused { .. } => "the upstream refused the pod's token",
            FailureKind::Server { .. } => "the upstream failed to issue credentials",
            FailureKind::Timeout => "the upstream did not answer in time",
            FailureKind::Unreachable => "the upstream could not be reached",
            FailureKind::InvalidResponse => "the upstream sent a response that could not be used",
            FailureKind::Busy => "too many credential fetches in flight; retry shortly",
            FailureKind::Internal => "the credential request could not be made",
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
/// what its model defines, or a generic name), `message` is safe to show to the pod, and
/// `detail` is what the upstream or the connection said, for the agent's log only.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct UpstreamError {
    pub kind: FailureKind,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
}

impl UpstreamError {
    /// An error in the agent's own words.
    pub fn new(kind: FailureKind, code: impl Into<String>, message: impl Into<String>) -> Self {
        UpstreamError {
            kind,
            code: code.into(),
            message: message.into(),
            detail: None,
        }
    }

    /// An error whose text came from outside the agent (the upstream's message, a TLS or
    /// connection error naming internal endpoints): the pod is told a fixed text for its kind,
    /// the text itself goes to the log.
    pub fn from_upstream(kind: FailureKind, code: impl Into<String>, detail: String) -> Self {
        let message = if defence::on(Defence::GenericUpstreamMessages) {
            kind.pod_message().to_owned()
        } else {
            detail.clone()
        };
        UpstreamError {
            kind,
            code: code.into(),
            message,
            detail: Some(detail),
        }
    }

    /// What to log: the upstream's own text when there is one.
    pub fn log_text(&self) -> &str {
        self.detail.as_deref().unwrap_or(&self.message)
    }
}

pub type FetchFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Credentials, UpstreamError>> + Send + 'a>>;

/// A source of role credentials for a pod's identity.
pub trait Backend: Send + Sync + 'static {
    /// Refuse, before any cache or upstream work, an identity this backend will never serve
    /// (the STS backend: no association for its service account). What it returns becomes
    /// part of the cache key: the STS backend names the associated role, so a changed role is
    /// a new entry at the next request instead of the old role's credentials until a refresh.
    fn admit(&self, _identity: &Identity) -> Result<Option<Arc<str>>, UpstreamError> {
        Ok(None)
    }

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
    fn the_body_is_the_served_json_and_holds_the_only_copy_of_the_secrets() {
        let with = |secret: &str, token: &str| {
            let expiration = std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
            let (secret, token) = (Secret::new(secret), Secret::new(token));
            Credentials::new("ASIAEXAMPLE", secret, token, "111122223333", expiration)
        };
        let c = with("wJalr/XUtn+FEMI=", "IQoJb3JpZ2luX2Vj");
        let json: serde_json::Value = serde_json::from_slice(&c.body()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "AccessKeyId": "ASIAEXAMPLE",
                "SecretAccessKey": "wJalr/XUtn+FEMI=",
                "Token": "IQoJb3JpZ2luX2Vj",
                "AccountId": "111122223333",
                "Expiration": "2027-01-15T08:00:00Z",
            })
        );
        assert_eq!(c.secret_access_key(), "wJalr/XUtn+FEMI=");
        assert_eq!(c.session_token(), "IQoJb3JpZ2luX2Vj");
        assert!(matches!(c.secret_access_key, Held::InBody(..)));
        assert_eq!(c.body().as_ptr(), c.body().as_ptr(), "shared, not copied");
        // A value JSON must escape still reads back as given.
        let odd = with("a\"b\\c", "t");
        assert_eq!(odd.secret_access_key(), "a\"b\\c");
        let json: serde_json::Value = serde_json::from_slice(&odd.body()).unwrap();
        assert_eq!(json["SecretAccessKey"], "a\"b\\c");
    }

    #[test]
    fn secrets_are_redacted() {
        let c = Credentials::new(
            "ASIAEXAMPLE",
            Secret::new("wJalrXUtnFEMI"),
            Secret::new("IQoJb3JpZ2luX2Vj"),
            "111122223333",
            SystemTime::now(),
        );
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("wJalrXUtnFEMI") && !shown.contains("IQoJb3JpZ2luX2Vj"),
            "{shown}"
        );
    }
}
