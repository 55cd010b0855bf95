//! A fake EKS Auth service speaking `AssumeRoleForPodIdentity` over restJson1.
//!
//! It trusts the token the way the real service would after verifying it: the
//! subject comes from the token's (unverified) `kubernetes.io` claims. Every
//! credential it issues is unique (`ASIA` + a serial number) and embeds the pod
//! UID in its secret parts, so a test can tell exactly which issuance, and
//! which pod's, a client ended up with. SigV4 headers are recorded, not checked.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use serde_json::{json, Value};

use super::json_response;
use super::recorder::{recorded_fake, RunningUpstream, Upstream};
use crate::keys::{self, DEFAULT_AUDIENCE};

/// The account in every ARN the fake returns.
pub const ACCOUNT_ID: &str = "111122223333";

/// Lifetime of issued credentials unless a test changes it; what users report
/// EKS Auth returning.
pub const DEFAULT_CREDENTIAL_LIFETIME: Duration = Duration::from_secs(3600);

/// How long `Fault::Hang` holds a request: far past any deadline the agent
/// should have, yet finite so nothing outlives a test run by much.
const HANG_FOR: Duration = Duration::from_secs(300);

/// What the fake answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Issue credentials.
    Ok,
    /// A restJson1 error: `x-amzn-errortype: <error_type>` and `{"message": ...}`.
    Error {
        status: u16,
        error_type: String,
        message: String,
    },
    /// Accept the request and never answer.
    Hang,
    /// Answer with exactly this status and body (`application/json`): a broken or hostile
    /// upstream.
    Raw { status: u16, body: Bytes },
}

impl Fault {
    pub fn error(status: u16, error_type: &str, message: &str) -> Self {
        Fault::Error {
            status,
            error_type: error_type.to_owned(),
            message: message.to_owned(),
        }
    }

    pub fn throttling() -> Self {
        Self::error(429, "ThrottlingException", "Rate exceeded")
    }

    /// EKS Auth models AccessDenied as a 400, not a 403.
    pub fn access_denied() -> Self {
        Self::error(
            400,
            "AccessDeniedException",
            "The caller is not authorized to perform eks-auth:AssumeRoleForPodIdentity",
        )
    }

    pub fn resource_not_found() -> Self {
        Self::error(
            404,
            "ResourceNotFoundException",
            "No Pod Identity Association found for the service account",
        )
    }

    pub fn internal() -> Self {
        Self::error(500, "InternalServerException", "Internal failure")
    }
}

/// One request that reached the fake's operation route.
#[derive(Clone, Debug)]
pub struct UpstreamCall {
    pub cluster_name: String,
    /// The `token` member of the body, if there was one.
    pub token: Option<String>,
    /// Whether the request carried a SigV4 `Authorization` header.
    pub sigv4_signed: bool,
    /// The access key id the request was signed with (`Credential=<id>/...`).
    pub signing_key_id: Option<String>,
    pub pod_uid: Option<String>,
}

/// One set of credentials the fake handed out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedCredentials {
    pub serial: u64,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    /// Epoch seconds, as sent on the wire.
    pub expiration: u64,
    pub role_arn: String,
    pub namespace: String,
    pub service_account: String,
    pub pod_name: String,
    pub pod_uid: String,
}

/// What a test sets through the fake's methods (fields private to the fake).
pub struct Settings {
    latency: Duration,
    fault: Fault,
    lifetime: Duration,
}

type Shared = Upstream<Settings, UpstreamCall>;

/// Handle on a running fake; clones share the same server and state.
#[derive(Clone)]
pub struct FakeEksAuth(RunningUpstream<Settings, UpstreamCall>);

recorded_fake!(FakeEksAuth, Settings, UpstreamCall);

impl FakeEksAuth {
    /// Start on `127.0.0.1:0`. Must be called inside a Tokio runtime; the
    /// server lives until the last handle is dropped. Its `url()` is the agent's `--endpoint`.
    pub async fn start() -> Self {
        let settings = Settings {
            latency: Duration::ZERO,
            fault: Fault::Ok,
            lifetime: DEFAULT_CREDENTIAL_LIFETIME,
        };
        FakeEksAuth(RunningUpstream::start("EKS Auth", settings, handle).await)
    }

    /// Every token received, in arrival order.
    pub fn tokens(&self) -> Vec<String> {
        self.call_log()
            .into_iter()
            .filter_map(|c| c.token)
            .collect()
    }

    /// Delay every subsequent answer by `latency`.
    pub fn set_latency(&self, latency: Duration) {
        self.settings().latency = latency;
    }

    pub fn set_fault(&self, fault: Fault) {
        self.settings().fault = fault;
    }

    /// Lifetime of credentials issued from now on.
    pub fn set_credential_lifetime(&self, lifetime: Duration) {
        self.settings().lifetime = lifetime;
    }
}

/// `/clusters/{clusterName}/assume-role-for-pod-identity` -> cluster name.
fn operation_cluster(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/clusters/")?;
    let (cluster, op) = rest.split_once('/')?;
    (op == "assume-role-for-pod-identity" && !cluster.is_empty()).then_some(cluster)
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let Some(cluster) = operation_cluster(req.uri().path()).map(str::to_owned) else {
        return error(404, "UnknownOperationException", "unknown operation");
    };
    if req.method() != Method::POST {
        return error(405, "UnknownOperationException", "method not allowed");
    }
    let authorization = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let sigv4_signed = authorization.starts_with("AWS4-HMAC-SHA256 ");
    let signing_key_id = authorization
        .split("Credential=")
        .nth(1)
        .and_then(|c| c.split('/').next())
        .map(str::to_owned);
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(400, "SerializationException", "unreadable body"),
    };
    let token = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("token")?.as_str().map(str::to_owned));
    let subject = token.as_deref().and_then(Subject::from_token);

    shared.recorder.record(|_| UpstreamCall {
        cluster_name: cluster.clone(),
        token: token.clone(),
        sigv4_signed,
        signing_key_id,
        pod_uid: subject.as_ref().map(|s| s.pod_uid.clone()),
    });
    let (latency, fault, lifetime) = {
        let state = shared.lock();
        (state.latency, state.fault.clone(), state.lifetime)
    };

    // The latency a test injected (`set_latency`): the behaviour under test, not a wait.
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match fault {
        Fault::Ok => {}
        Fault::Hang => {
            tokio::time::sleep(HANG_FOR).await;
            return error(504, "InternalServerException", "hung");
        }
        Fault::Error {
            status,
            error_type,
            message,
        } => return error(status, &error_type, &message),
        Fault::Raw { status, body } => {
            let mut response = Response::new(Full::new(body));
            *response.status_mut() =
                hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            return response;
        }
    }
    let Some(subject) = subject else {
        return error(
            400,
            "InvalidTokenException",
            "The token is not a service account token",
        );
    };
    let audience = token
        .as_deref()
        .and_then(keys::unverified_claims)
        .and_then(|c| match &c["aud"] {
            Value::String(s) => Some(s.clone()),
            Value::Array(a) => a.first().and_then(Value::as_str).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_else(|| DEFAULT_AUDIENCE.to_owned());

    let issued = shared.recorder.issue(|serial| {
        let role_arn = format!(
            "arn:aws:sts::{ACCOUNT_ID}:assumed-role/{}-role/eks-{cluster}-{}-{serial}",
            subject.service_account, subject.pod_name
        );
        subject.issue(
            serial,
            lifetime,
            ["fakeSecret", "IQoJb3JpZ2luX2VjFAKE"],
            role_arn,
        )
    });
    let association_id = association_id(&subject.namespace, &subject.service_account);
    let session = issued.role_arn.rsplit('/').next().unwrap_or_default();
    json_response(
        200,
        &json!({
            "subject": {
                "namespace": subject.namespace,
                "serviceAccount": subject.service_account,
            },
            "audience": audience,
            "podIdentityAssociation": {
                "associationArn": format!(
                    "arn:aws:eks:us-west-2:{ACCOUNT_ID}:podidentityassociation/{cluster}/{association_id}"
                ),
                "associationId": association_id,
            },
            "assumedRoleUser": {
                "arn": issued.role_arn,
                "assumeRoleId": format!("AROAFAKEROLEID{:08}:{session}", issued.serial),
            },
            "credentials": {
                "sessionToken": issued.session_token,
                "secretAccessKey": issued.secret_access_key,
                "accessKeyId": issued.access_key_id,
                "expiration": issued.expiration,
            },
        }),
    )
}

/// The pod a token speaks for, from its unverified `kubernetes.io` claims (the fakes trust a
/// token as their real services do after verifying it).
pub(crate) struct Subject {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: String,
    pub pod_uid: String,
}

impl Subject {
    fn from_token(token: &str) -> Option<Self> {
        Self::from_claims(&keys::unverified_claims(token)?)
    }

    pub(crate) fn from_claims(claims: &Value) -> Option<Self> {
        let k8s = claims.get("kubernetes.io")?;
        let s = |v: &Value| v.as_str().map(str::to_owned);
        Some(Self {
            namespace: s(&k8s["namespace"])?,
            service_account: s(&k8s["serviceaccount"]["name"])?,
            pod_name: s(&k8s["pod"]["name"])?,
            pod_uid: s(&k8s["pod"]["uid"])?,
        })
    }

    /// Credentials unique to this issuance (`ASIA` + the serial) and traceable to the pod
    /// (its UID inside the secret parts). `marks` starts the secret key and the session token,
    /// so that a test can also tell which fake issued them.
    pub(crate) fn issue(
        &self,
        serial: u64,
        lifetime: Duration,
        marks: [&str; 2],
        role_arn: String,
    ) -> IssuedCredentials {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs();
        let noise = URL_SAFE_NO_PAD.encode(keys::random_bytes::<24>());
        let [secret, token] = marks;
        IssuedCredentials {
            serial,
            access_key_id: format!("ASIA{serial:016}"),
            secret_access_key: format!("{secret}/{}/{}", self.pod_uid, &noise[..16]),
            session_token: format!("{token}{noise}.pod.{}.serial.{serial}", self.pod_uid),
            expiration: now + lifetime.as_secs(),
            role_arn,
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
            pod_name: self.pod_name.clone(),
            pod_uid: self.pod_uid.clone(),
        }
    }
}

/// Stable per service account, like a real association.
fn association_id(namespace: &str, service_account: &str) -> String {
    let d = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        format!("{namespace}/{service_account}").as_bytes(),
    );
    format!("a-{}", &keys::hex(d.as_ref())[..17])
}

fn error(status: u16, error_type: &str, message: &str) -> Response<Full<Bytes>> {
    let mut response = json_response(status, &json!({ "message": message }));
    let headers = response.headers_mut();
    headers.insert(
        "x-amzn-errortype",
        error_type.parse().expect("error type is a header value"),
    );
    headers.insert(
        "x-amzn-requestid",
        keys::random_uuid().parse().expect("uuid is a header value"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{send, RawRequest};
    use crate::keys::{Pod, TestKeys};

    fn call(fake: &FakeEksAuth, token: &str) -> RawRequest {
        RawRequest::new("POST", "/clusters/c1/assume-role-for-pod-identity")
            .header("Host", fake.addr().to_string())
            .header("Content-Type", "application/json")
            .header("Connection", "close")
            .body(json!({ "token": token }).to_string())
    }

    #[tokio::test]
    async fn issues_unique_traceable_credentials() {
        let fake = FakeEksAuth::start().await;
        let pod = Pod::new("team-a", "app", "app-7d9f");
        let token = pod.token().sign(&TestKeys::shared().ec);
        let first = send(fake.addr(), &call(&fake, &token)).await.unwrap();
        let second = send(fake.addr(), &call(&fake, &token)).await.unwrap();
        assert_eq!(first.status, 200, "{first:?}");
        let body = first.json();
        assert_eq!(body["subject"]["serviceAccount"], "app");
        assert_eq!(body["subject"]["namespace"], "team-a");
        assert_eq!(
            body["assumedRoleUser"]["arn"],
            "arn:aws:sts::111122223333:assumed-role/app-role/eks-c1-app-7d9f-1"
        );
        assert!(body["credentials"]["expiration"].is_u64());
        let secret = body["credentials"]["secretAccessKey"].as_str().unwrap();
        assert!(secret.contains(&pod.uid));
        assert_ne!(
            body["credentials"]["accessKeyId"],
            second.json()["credentials"]["accessKeyId"]
        );
        assert_eq!(fake.calls(), 2);
        assert_eq!(fake.calls_for_pod(&pod.uid), 2);
        assert_eq!(fake.tokens(), vec![token.clone(), token]);
        assert!(fake.wait_for_calls(2, Duration::from_millis(10)).await);
    }

    #[tokio::test]
    async fn faults_are_restjson_errors() {
        let fake = FakeEksAuth::start().await;
        fake.set_fault(Fault::throttling());
        let token = Pod::new("a", "b", "c").token().sign(&TestKeys::shared().ec);
        let r = send(fake.addr(), &call(&fake, &token)).await.unwrap();
        assert_eq!(r.status, 429);
        assert_eq!(r.header("x-amzn-errortype"), Some("ThrottlingException"));
        assert_eq!(r.json()["message"], "Rate exceeded");
        assert!(fake.issued().is_empty());
    }
}
