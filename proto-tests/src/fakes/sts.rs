//! A fake AWS STS speaking `AssumeRoleWithWebIdentity` over the Query
//! protocol: a form-urlencoded `POST /` in, XML out.
//!
//! Like the real service it checks the request's shape (action, version,
//! required parameters and their documented constraints) and answers with
//! modeled Query errors, so an agent that sends something STS would refuse
//! fails here too. It trusts the web identity token the way STS would after
//! verifying it: the pod comes from the token's (unverified) `kubernetes.io`
//! claims. Every credential it issues is unique (`ASIA` + a serial number) and
//! embeds the pod UID in its secret parts, so a test can tell which issuance,
//! and which pod's, a client ended up with.
//!
//! The operation is anonymous (`smithy.api#noAuth`): the fake records whether
//! a request carried an `Authorization` header, so tests can assert that the
//! agent sends none.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use serde_json::Value;

use super::recorder::{recorded_fake, RunningUpstream, Upstream};
use crate::assertions::format_rfc3339_utc;
use crate::fakes::eks_auth::{IssuedCredentials, Subject};
use crate::keys;

/// The XML namespace of every STS response.
pub const XMLNS: &str = "https://sts.amazonaws.com/doc/2011-06-15/";
pub const ACTION: &str = "AssumeRoleWithWebIdentity";
pub const API_VERSION: &str = "2011-06-15";

/// STS's own default when `DurationSeconds` is absent.
pub const DEFAULT_DURATION_SECONDS: u64 = 3600;

/// `DurationSeconds` bounds from the STS model (`roleDurationSecondsType`).
pub const MIN_DURATION_SECONDS: u64 = 900;
pub const MAX_DURATION_SECONDS: u64 = 43_200;

/// `RoleSessionName` bounds from the STS model (`roleSessionNameType`).
pub const MIN_SESSION_NAME_LEN: usize = 2;
pub const MAX_SESSION_NAME_LEN: usize = 64;

/// How long `StsFault::Hang` holds a request: far past any deadline the agent
/// should have, yet finite so nothing outlives a test run by much.
const HANG_FOR: Duration = Duration::from_secs(300);

/// Whether `name` is a `RoleSessionName` STS accepts: 2..=64 characters of
/// `[\w+=,.@-]` (ASCII word characters).
pub fn is_valid_session_name(name: &str) -> bool {
    (MIN_SESSION_NAME_LEN..=MAX_SESSION_NAME_LEN).contains(&name.len())
        && name.bytes().all(is_session_name_byte)
}

fn is_session_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"_+=,.@-".contains(&b)
}

/// What the fake answers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum StsFault {
    /// Issue credentials.
    #[default]
    Ok,
    /// A Query-protocol `ErrorResponse` with this status and code.
    Error {
        status: u16,
        code: String,
        message: String,
    },
    /// Accept the request and never answer.
    Hang,
    /// Issue credentials, but name this role in the answer's assumed-role user: a misrouted
    /// or hostile answer.
    AnswerAsRole(String),
}

impl StsFault {
    pub fn error(status: u16, code: &str, message: &str) -> Self {
        StsFault::Error {
            status,
            code: code.to_owned(),
            message: message.to_owned(),
        }
    }

    pub fn invalid_identity_token() -> Self {
        Self::error(
            400,
            "InvalidIdentityToken",
            "No OpenIDConnect provider found in your account for the token's issuer",
        )
    }

    pub fn expired_token() -> Self {
        Self::error(400, "ExpiredTokenException", "Token expired")
    }

    pub fn access_denied() -> Self {
        Self::error(
            403,
            "AccessDenied",
            "Not authorized to perform sts:AssumeRoleWithWebIdentity",
        )
    }

    pub fn idp_rejected_claim() -> Self {
        Self::error(
            403,
            "IDPRejectedClaim",
            "The identity provider rejected the claim",
        )
    }

    pub fn idp_communication_error() -> Self {
        Self::error(
            400,
            "IDPCommunicationError",
            "Couldn't retrieve verification key from your identity provider",
        )
    }

    pub fn region_disabled() -> Self {
        Self::error(
            403,
            "RegionDisabledException",
            "STS is not activated in this region for account:111122223333",
        )
    }

    /// STS throttles with a 400, code `Throttling` (not a 429).
    pub fn throttling() -> Self {
        Self::error(400, "Throttling", "Rate exceeded")
    }

    pub fn internal() -> Self {
        Self::error(500, "InternalFailure", "An internal error occurred")
    }

    pub fn unavailable() -> Self {
        Self::error(503, "ServiceUnavailable", "Service is unavailable")
    }
}

/// One request that reached the fake, whatever it was answered.
#[derive(Clone, Debug)]
pub struct StsCall {
    /// 1-based arrival order.
    pub seq: u64,
    pub method: String,
    pub path: String,
    pub content_type: Option<String>,
    /// The `Authorization` header, if any: the operation is anonymous, so an
    /// agent should never send one.
    pub authorization: Option<String>,
    /// Every form parameter, decoded, in body order.
    pub params: Vec<(String, String)>,
    pub action: Option<String>,
    pub version: Option<String>,
    pub role_arn: Option<String>,
    pub role_session_name: Option<String>,
    /// `DurationSeconds` if present and a number (see `params` for the raw text).
    pub duration_seconds: Option<u64>,
    pub web_identity_token: Option<String>,
    /// From the token's unverified claims.
    pub pod_uid: Option<String>,
}

impl StsCall {
    /// The first value of form parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn has_authorization(&self) -> bool {
        self.authorization.is_some()
    }
}

/// What a test sets through the fake's methods (fields private to the fake); by default no
/// latency and no fault.
#[derive(Default)]
pub struct Settings {
    latency: Duration,
    fault: StsFault,
    /// Faults for the next calls, ahead of `fault`.
    queued: VecDeque<StsFault>,
    /// `None`: credentials live `DurationSeconds`, as from the real service.
    lifetime: Option<Duration>,
}

/// Handle on a running fake STS (its `url()` is the agent's `--sts-endpoint`); clones share it.
#[derive(Clone)]
pub struct FakeSts(RunningUpstream<Settings, StsCall>);

recorded_fake!(FakeSts, Settings, StsCall);

impl FakeSts {
    /// Start on `127.0.0.1:0`, inside a Tokio runtime.
    pub async fn start() -> Self {
        FakeSts(RunningUpstream::start("STS", Settings::default(), handle).await)
    }

    /// Delay every subsequent answer by `latency`.
    pub fn set_latency(&self, latency: Duration) {
        self.settings().latency = latency;
    }

    /// What every call answers from now on (after any queued faults).
    pub fn set_fault(&self, fault: StsFault) {
        self.settings().fault = fault;
    }

    /// Answer the next `times` calls with `fault`, then go back to the
    /// standing fault: a transient failure.
    pub fn fail_next(&self, fault: StsFault, times: usize) {
        let mut state = self.settings();
        state.queued.extend(std::iter::repeat_n(fault, times));
    }

    /// Lifetime of credentials issued from now on, whatever `DurationSeconds`
    /// asked for.
    pub fn set_credential_lifetime(&self, lifetime: Duration) {
        self.settings().lifetime = Some(lifetime);
    }
}

/// A malformed request: answered with a Query error and no credentials.
struct Rejection {
    status: u16,
    code: &'static str,
    message: String,
}

impl Rejection {
    fn missing(param: &str) -> Self {
        Self {
            status: 400,
            code: "MissingParameter",
            message: format!("The request must contain the parameter {param}"),
        }
    }

    /// The shape of STS's own constraint failures.
    fn constraint(value: &str, member: &str, constraint: &str) -> Self {
        Self {
            status: 400,
            code: "ValidationError",
            message: format!(
                "1 validation error detected: Value '{value}' at '{member}' failed to satisfy \
                 constraint: {constraint}"
            ),
        }
    }
}

/// The parameters of a well-formed request.
struct Params<'a> {
    role: RoleArn<'a>,
    session_name: &'a str,
    duration_seconds: u64,
}

fn validate(call: &StsCall) -> Result<Params<'_>, Rejection> {
    let action = call.action.as_deref().ok_or(Rejection::missing("Action"))?;
    let version = call
        .version
        .as_deref()
        .ok_or(Rejection::missing("Version"))?;
    if action != ACTION || version != API_VERSION {
        // STS names the version it was given, or its own when the action alone is wrong.
        let version = if action == ACTION {
            version
        } else {
            API_VERSION
        };
        return Err(Rejection {
            status: 400,
            code: "InvalidAction",
            message: format!("Could not find operation {action} for version {version}"),
        });
    }
    let role_arn = call
        .role_arn
        .as_deref()
        .ok_or(Rejection::missing("RoleArn"))?;
    let session_name = call
        .role_session_name
        .as_deref()
        .ok_or(Rejection::missing("RoleSessionName"))?;
    let token = call
        .web_identity_token
        .as_deref()
        .ok_or(Rejection::missing("WebIdentityToken"))?;
    if !(20..=2048).contains(&role_arn.len()) {
        return Err(Rejection::constraint(
            role_arn,
            "roleArn",
            "Member must have length between 20 and 2048",
        ));
    }
    if !is_valid_session_name(session_name) {
        return Err(Rejection::constraint(
            session_name,
            "roleSessionName",
            "Member must satisfy regular expression pattern: [\\w+=,.@-]* and have length \
             between 2 and 64",
        ));
    }
    if !(4..=20_000).contains(&token.len()) {
        return Err(Rejection::constraint(
            "*** Sensitive Data Redacted ***",
            "webIdentityToken",
            "Member must have length between 4 and 20000",
        ));
    }
    let duration_seconds = match call.param("DurationSeconds") {
        None => DEFAULT_DURATION_SECONDS,
        Some(raw) => match call.duration_seconds {
            Some(d) if (MIN_DURATION_SECONDS..=MAX_DURATION_SECONDS).contains(&d) => d,
            _ => {
                return Err(Rejection::constraint(
                    raw,
                    "durationSeconds",
                    "Member must have value between 900 and 43200",
                ))
            }
        },
    };
    let role = RoleArn::parse(role_arn).ok_or_else(|| Rejection {
        status: 400,
        code: "ValidationError",
        message: format!("{role_arn} is invalid"),
    })?;
    Ok(Params {
        role,
        session_name,
        duration_seconds,
    })
}

async fn handle(
    shared: Arc<Upstream<Settings, StsCall>>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let content_type = header("content-type");
    let authorization = header("authorization");
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error_response(400, "MalformedInput", "unreadable body"),
    };
    let params = parse_form(&body);
    let first = |name: &str| {
        params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let web_identity_token = first("WebIdentityToken");
    let subject = web_identity_token.as_deref().and_then(TokenSubject::parse);

    let call = StsCall {
        seq: 0,
        method: method.to_string(),
        path: path.clone(),
        content_type,
        authorization,
        action: first("Action"),
        version: first("Version"),
        role_arn: first("RoleArn"),
        role_session_name: first("RoleSessionName"),
        duration_seconds: first("DurationSeconds").and_then(|d| d.parse().ok()),
        web_identity_token,
        pod_uid: subject.as_ref().map(|s| s.pod.pod_uid.clone()),
        params,
    };
    let call = shared.recorder.record(|seq| StsCall { seq, ..call });
    let (latency, fault, lifetime) = {
        let mut state = shared.lock();
        let fault = state
            .queued
            .pop_front()
            .unwrap_or_else(|| state.fault.clone());
        (state.latency, fault, state.lifetime)
    };

    if path != "/" {
        return error_response(404, "UnknownOperationException", "unknown path");
    }
    if method != Method::POST {
        return error_response(405, "InvalidAction", "only POST is supported by this fake");
    }
    let is_form = call.content_type.as_deref().is_some_and(|ct| {
        ct.to_ascii_lowercase()
            .starts_with("application/x-www-form-urlencoded")
    });
    if !is_form {
        return error_response(
            400,
            "MalformedInput",
            "Content-Type must be application/x-www-form-urlencoded",
        );
    }
    let params = match validate(&call) {
        Ok(p) => p,
        Err(r) => return error_response(r.status, r.code, &r.message),
    };

    // The latency a test injected (`set_latency`): the behaviour under test, not a wait.
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let mut answer_as = None;
    match fault {
        StsFault::Ok => {}
        StsFault::AnswerAsRole(role) => answer_as = Some(role),
        StsFault::Hang => {
            tokio::time::sleep(HANG_FOR).await;
            return error_response(504, "InternalFailure", "hung");
        }
        StsFault::Error {
            status,
            code,
            message,
        } => return error_response(status, &code, &message),
    }
    let Some(subject) = subject else {
        return error_response(
            400,
            "InvalidIdentityToken",
            "The web identity token is not a Kubernetes service account token",
        );
    };
    let lifetime = lifetime.unwrap_or(Duration::from_secs(params.duration_seconds));

    let issued = shared.recorder.issue(|serial| {
        let mut issued = subject.issue(&params.role, params.session_name, serial, lifetime);
        if let Some(other) = &answer_as {
            let named = format!("assumed-role/{}/", params.role.name);
            issued.role_arn = issued
                .role_arn
                .replace(&named, &format!("assumed-role/{other}/"));
        }
        issued
    });
    success_response(&issued, &subject, params.session_name)
}

/// The parts of an IAM role ARN that an assumed-role ARN is built from.
struct RoleArn<'a> {
    partition: &'a str,
    account: &'a str,
    /// The last segment of the role's path: `role/a/b/name` -> `name`.
    name: &'a str,
}

impl<'a> RoleArn<'a> {
    /// `arn:<partition>:iam::<12 digits>:role/[path/]name`.
    fn parse(arn: &'a str) -> Option<Self> {
        let mut parts = arn.splitn(6, ':');
        let (prefix, partition, service, region, account, resource) = (
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
        );
        let valid = prefix == "arn"
            && !partition.is_empty()
            && service == "iam"
            && region.is_empty()
            && account.len() == 12
            && account.bytes().all(|b| b.is_ascii_digit());
        let name = resource.strip_prefix("role/")?.rsplit('/').next()?;
        (valid && !name.is_empty()).then_some(Self {
            partition,
            account,
            name,
        })
    }
}

/// Who a web identity token speaks for, from its unverified claims.
struct TokenSubject {
    pod: Subject,
    sub: String,
    issuer: String,
    audience: String,
}

impl TokenSubject {
    fn parse(token: &str) -> Option<Self> {
        let claims = keys::unverified_claims(token)?;
        let s = |v: &Value| v.as_str().map(str::to_owned).unwrap_or_default();
        let audience = match &claims["aud"] {
            Value::Array(a) => a.first().map(s).unwrap_or_default(),
            aud => s(aud),
        };
        Some(Self {
            pod: Subject::from_claims(&claims)?,
            sub: s(&claims["sub"]),
            issuer: s(&claims["iss"]),
            audience,
        })
    }

    fn issue(
        &self,
        role: &RoleArn<'_>,
        session_name: &str,
        serial: u64,
        lifetime: Duration,
    ) -> IssuedCredentials {
        let role_arn = format!(
            "arn:{}:sts::{}:assumed-role/{}/{session_name}",
            role.partition, role.account, role.name
        );
        let marks = ["fakeStsSecret", "FwoGZXIvYXdzFAKESTS"];
        self.pod.issue(serial, lifetime, marks, role_arn)
    }
}

fn success_response(
    issued: &IssuedCredentials,
    subject: &TokenSubject,
    session_name: &str,
) -> Response<Full<Bytes>> {
    // Real providers are named without the scheme.
    let provider = subject
        .issuer
        .strip_prefix("https://")
        .unwrap_or(&subject.issuer);
    let role_id = format!("AROAFAKESTS{:09}", issued.serial);
    let body = format!(
        "<AssumeRoleWithWebIdentityResponse xmlns=\"{XMLNS}\">\n\
         \x20 <AssumeRoleWithWebIdentityResult>\n\
         \x20   <Credentials>\n\
         \x20     <AccessKeyId>{}</AccessKeyId>\n\
         \x20     <SecretAccessKey>{}</SecretAccessKey>\n\
         \x20     <SessionToken>{}</SessionToken>\n\
         \x20     <Expiration>{}</Expiration>\n\
         \x20   </Credentials>\n\
         \x20   <SubjectFromWebIdentityToken>{}</SubjectFromWebIdentityToken>\n\
         \x20   <AssumedRoleUser>\n\
         \x20     <AssumedRoleId>{}</AssumedRoleId>\n\
         \x20     <Arn>{}</Arn>\n\
         \x20   </AssumedRoleUser>\n\
         \x20   <Provider>{}</Provider>\n\
         \x20   <Audience>{}</Audience>\n\
         \x20 </AssumeRoleWithWebIdentityResult>\n\
         \x20 <ResponseMetadata>\n\
         \x20   <RequestId>{}</RequestId>\n\
         \x20 </ResponseMetadata>\n\
         </AssumeRoleWithWebIdentityResponse>\n",
        xml_escape(&issued.access_key_id),
        xml_escape(&issued.secret_access_key),
        xml_escape(&issued.session_token),
        format_rfc3339_utc(issued.expiration as i64),
        xml_escape(&subject.sub),
        xml_escape(&format!("{role_id}:{session_name}")),
        xml_escape(&issued.role_arn),
        xml_escape(provider),
        xml_escape(&subject.audience),
        keys::random_uuid(),
    );
    xml_response(200, body)
}

/// A Query-protocol error: `Sender` faults for 4xx, `Receiver` for 5xx.
fn error_response(status: u16, code: &str, message: &str) -> Response<Full<Bytes>> {
    let fault_type = if status >= 500 { "Receiver" } else { "Sender" };
    let body = format!(
        "<ErrorResponse xmlns=\"{XMLNS}\">\n\
         \x20 <Error>\n\
         \x20   <Type>{fault_type}</Type>\n\
         \x20   <Code>{}</Code>\n\
         \x20   <Message>{}</Message>\n\
         \x20 </Error>\n\
         \x20 <RequestId>{}</RequestId>\n\
         </ErrorResponse>\n",
        xml_escape(code),
        xml_escape(message),
        keys::random_uuid(),
    );
    xml_response(status, body)
}

fn xml_response(status: u16, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/xml")
        .header("x-amzn-requestid", keys::random_uuid())
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Decode an `application/x-www-form-urlencoded` body into name/value pairs.
/// Malformed escapes are kept literally, as lenient servers do.
pub fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    body.split(|&b| b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let mut it = pair.splitn(2, |&b| b == b'=');
            let name = it.next().unwrap_or_default();
            let value = it.next().unwrap_or_default();
            (percent_decode(name), percent_decode(value))
        })
        .collect()
}

fn percent_decode(input: &[u8]) -> String {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < input.len() => {
                match (hex_value(input[i + 1]), hex_value(input[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push(h << 4 | l);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{send, RawRequest, RawResponse};
    use crate::keys::{Pod, TestKeys};

    const ROLE: &str = "arn:aws:iam::111122223333:role/team/app";

    fn form(pairs: &[(&str, &str)]) -> String {
        pairs
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect::<Vec<_>>()
            .join("&")
    }

    fn encode(s: &str) -> String {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }

    async fn post(fake: &FakeSts, body: String) -> RawResponse {
        let req = RawRequest::new("POST", "/")
            .header("Host", fake.addr().to_string())
            .header("Content-Type", "application/x-www-form-urlencoded")
            .header("Connection", "close")
            .body(body);
        send(fake.addr(), &req).await.unwrap()
    }

    fn assume(token: &str, session: &str, duration: Option<&str>) -> String {
        let mut pairs = vec![
            ("Action", ACTION),
            ("Version", API_VERSION),
            ("RoleArn", ROLE),
            ("RoleSessionName", session),
            ("WebIdentityToken", token),
        ];
        if let Some(d) = duration {
            pairs.push(("DurationSeconds", d));
        }
        form(&pairs)
    }

    /// The text of the first `<tag>` element.
    fn element<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
        let start = xml.find(&format!("<{tag}>"))? + tag.len() + 2;
        let end = start + xml[start..].find(&format!("</{tag}>"))?;
        Some(&xml[start..end])
    }

    #[test]
    fn form_bodies_decode() {
        assert_eq!(
            parse_form(b"a=1&b=x+y%2Fz&c=&d&e=%zz%4"),
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x y/z".into()),
                ("c".into(), "".into()),
                ("d".into(), "".into()),
                ("e".into(), "%zz%4".into()),
            ]
        );
        assert_eq!(parse_form(b"k=%41%42"), vec![("k".into(), "AB".into())]);
    }

    #[test]
    fn session_names_and_arns() {
        assert!(is_valid_session_name("team-a-app-0_x+=,.@"));
        assert!(!is_valid_session_name("a"));
        assert!(!is_valid_session_name("has space"));
        assert!(!is_valid_session_name(&"a".repeat(65)));
        let role = RoleArn::parse(ROLE).unwrap();
        assert_eq!(
            (role.partition, role.account, role.name),
            ("aws", "111122223333", "app")
        );
        assert!(RoleArn::parse("arn:aws:s3:::bucket").is_none());
        assert!(RoleArn::parse("arn:aws:iam::1111:role/x").is_none());
    }

    #[tokio::test]
    async fn issues_unique_traceable_credentials() {
        let fake = FakeSts::start().await;
        let pod = Pod::new("team-a", "app", "app-7d9f");
        let token = pod.token().sign(&TestKeys::shared().ec);
        let first = post(&fake, assume(&token, "team-a-app-7d9f", Some("7200"))).await;
        let second = post(&fake, assume(&token, "team-a-app-7d9f", None)).await;
        assert_eq!(first.status, 200, "{first:?}");
        let xml = first.text();
        assert!(xml.contains(&format!(
            "<AssumeRoleWithWebIdentityResponse xmlns=\"{XMLNS}\">"
        )));
        assert_eq!(
            element(&xml, "Arn"),
            Some("arn:aws:sts::111122223333:assumed-role/app/team-a-app-7d9f")
        );
        assert!(element(&xml, "SecretAccessKey").unwrap().contains(&pod.uid));
        assert!(element(&xml, "SessionToken").unwrap().contains(&pod.uid));
        assert_eq!(
            element(&xml, "SubjectFromWebIdentityToken"),
            Some(pod.subject().as_str())
        );
        assert_ne!(
            element(&xml, "AccessKeyId"),
            element(&second.text(), "AccessKeyId")
        );
        let issued = fake.issued();
        assert_eq!(issued.len(), 2);
        // Lifetime follows DurationSeconds, 3600 when absent.
        let now = keys::unix_now() as u64;
        assert!(issued[0].expiration.abs_diff(now + 7200) <= 2);
        assert!(issued[1].expiration.abs_diff(now + 3600) <= 2);
        let calls = fake.call_log();
        assert_eq!(calls[0].duration_seconds, Some(7200));
        assert_eq!(calls[1].duration_seconds, None);
        assert_eq!(calls[0].web_identity_token.as_deref(), Some(token.as_str()));
        assert!(!calls[0].has_authorization());
        assert_eq!(fake.calls_for_pod(&pod.uid), 2);
        assert!(fake.wait_for_calls(2, Duration::from_millis(10)).await);
    }

    #[tokio::test]
    async fn malformed_requests_are_query_errors() {
        let fake = FakeSts::start().await;
        let token = Pod::new("a", "b", "c").token().sign(&TestKeys::shared().ec);
        let missing = form(&[
            ("Action", ACTION),
            ("Version", API_VERSION),
            ("RoleArn", ROLE),
        ]);
        let cases = [
            (missing, "MissingParameter"),
            (assume(&token, "x", None), "ValidationError"),
            (assume(&token, "ok-name", Some("899")), "ValidationError"),
            (assume(&token, "ok-name", Some("43201")), "ValidationError"),
            (
                form(&[("Action", "AssumeRole"), ("Version", API_VERSION)]),
                "InvalidAction",
            ),
        ];
        for (body, code) in cases {
            let r = post(&fake, body.clone()).await;
            assert_eq!(r.status, 400, "{body}: {r:?}");
            let xml = r.text();
            assert_eq!(element(&xml, "Code"), Some(code), "{body}: {xml}");
            assert_eq!(element(&xml, "Type"), Some("Sender"));
        }
        assert!(fake.issued().is_empty());
    }

    #[tokio::test]
    async fn queued_faults_come_before_the_standing_one() {
        let fake = FakeSts::start().await;
        let token = Pod::new("a", "b", "c").token().sign(&TestKeys::shared().ec);
        fake.set_fault(StsFault::internal());
        fake.fail_next(StsFault::throttling(), 1);
        let r = post(&fake, assume(&token, "s1", None)).await;
        assert_eq!(
            (r.status, element(&r.text(), "Code")),
            (400, Some("Throttling"))
        );
        let r = post(&fake, assume(&token, "s1", None)).await;
        assert_eq!(r.status, 500);
        assert_eq!(element(&r.text(), "Type"), Some("Receiver"));
    }
}
