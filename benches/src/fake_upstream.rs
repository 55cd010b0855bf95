//! A wire-level fake of both upstreams, over real HTTP on loopback: EKS Auth
//! `AssumeRoleForPodIdentity` in restJson1 and STS `AssumeRoleWithWebIdentity` in the awsQuery
//! XML the AWS SDKs parse, the same shapes as the black-box tests' fakes in
//! `proto-tests/src/fakes/` (which check them against the SDKs and moto).
//!
//! It counts calls (the load tool's "upstream calls" column), answers after a configurable
//! latency, and issues credentials that live one hour unless told otherwise. The soak tool
//! also uses its [`Fault`] modes (errors, hangs, throttling), its removed service accounts
//! (answered as revoked) and its ledger of which pod each access key was issued to, which is
//! how a client proves it got its own pod's credentials. It trusts the token it is sent: the
//! pod comes from the token's claims, decoded without checking the signature, because the
//! agent has already verified it.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use pod_identity_agent::config::DEFAULT_AUDIENCE;
use pod_identity_agent::credentials::upstream::{Credentials, Secret};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// EKS Auth issues credentials for one hour.
pub const CREDENTIAL_LIFETIME: Duration = Duration::from_secs(3600);
/// How long [`Fault::Hang`] holds a call: far past the agent's 4.5 s budget, yet bounded.
const HANG_FOR: Duration = Duration::from_secs(60);
/// The STS XML namespace.
const STS_XMLNS: &str = "https://sts.amazonaws.com/doc/2011-06-15/";
/// Real STS session tokens run to about a kilobyte; their size is most of the agent's
/// response body, so the fake's are that long too.
const SESSION_TOKEN_LEN: usize = 1024;
/// Account of every role the fake hands out.
const ACCOUNT_ID: &str = "111122223333";
/// Request bodies are `{"token": "<1 KiB JWT>"}`; anything far larger is not from the agent.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Credentials of the fake's `serial`-th issue, expiring at `expiration`. Every field has a
/// fixed length, so every response the agent builds from them has the same size.
pub fn fake_credentials(serial: u64, expiration: SystemTime) -> Credentials {
    let filler = format!("{serial:016X}");
    let mut session = String::with_capacity(SESSION_TOKEN_LEN);
    session.push_str("FAKE/SESSION/TOKEN/");
    while session.len() < SESSION_TOKEN_LEN {
        session.push_str(&filler);
    }
    session.truncate(SESSION_TOKEN_LEN);
    Credentials::new(
        format!("ASIAFAKE{:012X}", serial & 0xffff_ffff_ffff),
        Secret::new(format!("fake/secret/access/key/{filler}x")),
        Secret::new(session),
        ACCOUNT_ID,
        expiration,
    )
}

/// How the fake answers calls that arrive while it is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Issue credentials.
    Healthy,
    /// 500 `InternalServerException` (STS: `InternalFailure`).
    ServerError,
    /// Never answer (until [`HANG_FOR`] has passed).
    Hang,
    /// 429 `ThrottlingException` (STS: 400 `Throttling`).
    Throttle,
}

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::Healthy => "healthy",
            Fault::ServerError => "5xx",
            Fault::Hang => "hang",
            Fault::Throttle => "throttle",
        }
    }

    fn from_u8(v: u8) -> Fault {
        match v {
            1 => Fault::ServerError,
            2 => Fault::Hang,
            3 => Fault::Throttle,
            _ => Fault::Healthy,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Fault::Healthy => 0,
            Fault::ServerError => 1,
            Fault::Hang => 2,
            Fault::Throttle => 3,
        }
    }
}

/// The pod an access key was issued to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedTo {
    pub pod_uid: String,
}

struct State {
    path: String,
    calls: AtomicU64,
    latency_us: AtomicU64,
    lifetime_secs: AtomicU64,
    fault: AtomicU8,
    /// `namespace/service-account` pairs whose association is gone.
    removed: Mutex<HashSet<String>>,
    /// Access key ID -> pod, when the ledger is on (the soak tool; the load tool leaves it
    /// off so the fake's own cost stays flat).
    ledger: Option<Mutex<HashMap<String, IssuedTo>>>,
}

/// A running fake; stops when dropped.
pub struct FakeUpstream {
    addr: SocketAddr,
    state: Arc<State>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl FakeUpstream {
    /// Serve `POST /clusters/{cluster}/assume-role-for-pod-identity` (EKS Auth) and `POST /`
    /// (STS) on 127.0.0.1, port 0.
    pub async fn start(cluster: &str, latency: Duration) -> std::io::Result<FakeUpstream> {
        Self::start_with(cluster, latency, false).await
    }

    /// The same, recording which pod every access key goes to (see [`FakeUpstream::issued_to`]).
    pub async fn start_with_ledger(
        cluster: &str,
        latency: Duration,
    ) -> std::io::Result<FakeUpstream> {
        Self::start_with(cluster, latency, true).await
    }

    async fn start_with(
        cluster: &str,
        latency: Duration,
        ledger: bool,
    ) -> std::io::Result<FakeUpstream> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            path: format!("/clusters/{cluster}/assume-role-for-pod-identity"),
            calls: AtomicU64::new(0),
            latency_us: AtomicU64::new(latency.as_micros() as u64),
            lifetime_secs: AtomicU64::new(CREDENTIAL_LIFETIME.as_secs()),
            fault: AtomicU8::new(Fault::Healthy.to_u8()),
            removed: Mutex::new(HashSet::new()),
            ledger: ledger.then(|| Mutex::new(HashMap::new())),
        });
        let (stop, stop_rx) = watch::channel(false);
        let handler_state = state.clone();
        let task = tokio::spawn(crate::server::serve(listener, stop_rx, move |req| {
            handle(handler_state.clone(), req)
        }));
        Ok(FakeUpstream {
            addr,
            state,
            stop,
            task,
        })
    }

    /// The URL to pass as the agent's `--endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `AssumeRoleForPodIdentity` calls received so far (answered or not yet).
    pub fn calls(&self) -> u64 {
        self.state.calls.load(Ordering::Relaxed)
    }

    /// Change the latency of calls that arrive from now on.
    pub fn set_latency(&self, latency: Duration) {
        self.state
            .latency_us
            .store(latency.as_micros() as u64, Ordering::Relaxed);
    }

    /// Lifetime of credentials issued from now on.
    pub fn set_lifetime(&self, lifetime: Duration) {
        self.state
            .lifetime_secs
            .store(lifetime.as_secs(), Ordering::Relaxed);
    }

    /// How calls arriving from now on are answered.
    pub fn set_fault(&self, fault: Fault) {
        self.state.fault.store(fault.to_u8(), Ordering::Relaxed);
    }

    /// The current fault mode.
    pub fn fault(&self) -> Fault {
        Fault::from_u8(self.state.fault.load(Ordering::Relaxed))
    }

    /// From now on, calls for this service account are refused as revoked (EKS Auth
    /// `ResourceNotFoundException`, STS `AccessDenied`), as after its association is deleted.
    pub fn remove_association(&self, namespace: &str, service_account: &str) {
        if let Ok(mut removed) = self.state.removed.lock() {
            removed.insert(format!("{namespace}/{service_account}"));
        }
    }

    /// The pod `access_key_id` was issued to, if the ledger is on and the key is the fake's.
    pub fn issued_to(&self, access_key_id: &str) -> Option<IssuedTo> {
        let ledger = self.state.ledger.as_ref()?.lock().ok()?;
        ledger.get(access_key_id).cloned()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        self.task.abort();
    }
}

/// What the fake needs from a token: who the pod is.
struct PodClaims {
    namespace: String,
    service_account: String,
    pod_name: String,
    pod_uid: String,
}

/// The pod named by the token's `kubernetes.io` claims, signature unchecked.
fn pod_of_token(token: &str) -> Option<PodClaims> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let k8s = claims.get("kubernetes.io")?;
    let text = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).map(str::to_owned);
    Some(PodClaims {
        namespace: text(k8s.get("namespace"))?,
        service_account: text(k8s.pointer("/serviceaccount/name"))?,
        pod_name: text(k8s.pointer("/pod/name"))?,
        pod_uid: text(k8s.pointer("/pod/uid")).unwrap_or_default(),
    })
}

/// Which of the two services a call is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Service {
    EksAuth,
    Sts,
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let service = match (req.method(), req.uri().path()) {
        (&Method::POST, path) if path == state.path => Service::EksAuth,
        (&Method::POST, "/") => Service::Sts,
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                "ResourceNotFoundException",
                "unknown operation",
            )
        }
    };
    let serial = state.calls.fetch_add(1, Ordering::Relaxed) + 1;
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "InvalidRequestException",
                "unreadable body",
            )
        }
    };
    let token = match service {
        Service::EksAuth => serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("token")?.as_str().map(str::to_owned)),
        Service::Sts => form_value(&body, "WebIdentityToken"),
    };
    let Some(pod) = token.as_deref().and_then(pod_of_token) else {
        return match service {
            Service::EksAuth => error(
                StatusCode::BAD_REQUEST,
                "InvalidTokenException",
                "the token is not a pod token",
            ),
            Service::Sts => sts_error(StatusCode::BAD_REQUEST, "InvalidIdentityToken"),
        };
    };
    let latency = Duration::from_micros(state.latency_us.load(Ordering::Relaxed));
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match Fault::from_u8(state.fault.load(Ordering::Relaxed)) {
        Fault::Healthy => {}
        Fault::Hang => {
            tokio::time::sleep(HANG_FOR).await;
            return error(
                StatusCode::GATEWAY_TIMEOUT,
                "InternalServerException",
                "hung",
            );
        }
        Fault::ServerError => {
            return match service {
                Service::EksAuth => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalServerException",
                    "injected failure",
                ),
                Service::Sts => sts_error(StatusCode::INTERNAL_SERVER_ERROR, "InternalFailure"),
            }
        }
        Fault::Throttle => {
            return match service {
                Service::EksAuth => error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "ThrottlingException",
                    "rate exceeded",
                ),
                Service::Sts => sts_error(StatusCode::BAD_REQUEST, "Throttling"),
            }
        }
    }
    let association = format!("{}/{}", pod.namespace, pod.service_account);
    if state
        .removed
        .lock()
        .is_ok_and(|removed| removed.contains(&association))
    {
        return match service {
            Service::EksAuth => error(
                StatusCode::NOT_FOUND,
                "ResourceNotFoundException",
                "no pod identity association for this service account",
            ),
            Service::Sts => sts_error(StatusCode::FORBIDDEN, "AccessDenied"),
        };
    }
    let lifetime = Duration::from_secs(state.lifetime_secs.load(Ordering::Relaxed));
    let expiration = SystemTime::now() + lifetime;
    let creds = fake_credentials(serial, expiration);
    if let Some(ledger) = &state.ledger {
        if let Ok(mut ledger) = ledger.lock() {
            ledger.insert(
                creds.access_key_id.clone(),
                IssuedTo {
                    pod_uid: pod.pod_uid.clone(),
                },
            );
        }
    }
    let session = format!("eks-load-{}", pod.pod_name);
    let role = format!("{}-{}", pod.namespace, pod.service_account);
    let expires_secs = expiration
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match service {
        Service::EksAuth => {
            let doc = serde_json::json!({
                "subject": {"namespace": pod.namespace, "serviceAccount": pod.service_account},
                "audience": DEFAULT_AUDIENCE,
                "podIdentityAssociation": {
                    "associationArn": format!("arn:aws:eks:us-west-2:{ACCOUNT_ID}:podidentityassociation/load/a-{serial:012}"),
                    "associationId": format!("a-{serial:012}"),
                },
                "assumedRoleUser": {
                    "arn": format!("arn:aws:sts::{ACCOUNT_ID}:assumed-role/{role}/{session}"),
                    "assumedRoleId": format!("AROAFAKE{serial:012X}:{session}"),
                },
                "credentials": {
                    "accessKeyId": creds.access_key_id,
                    "secretAccessKey": creds.secret_access_key(),
                    "sessionToken": creds.session_token(),
                    "expiration": expires_secs,
                },
            });
            json(StatusCode::OK, doc.to_string())
        }
        Service::Sts => {
            let expiration = aws_smithy_types::DateTime::from_secs(expires_secs as i64)
                .fmt(aws_smithy_types::date_time::Format::DateTime)
                .unwrap_or_default();
            let body = format!(
                "<AssumeRoleWithWebIdentityResponse xmlns=\"{STS_XMLNS}\">\
                 <AssumeRoleWithWebIdentityResult><Credentials>\
                 <AccessKeyId>{}</AccessKeyId><SecretAccessKey>{}</SecretAccessKey>\
                 <SessionToken>{}</SessionToken><Expiration>{expiration}</Expiration>\
                 </Credentials><AssumedRoleUser><AssumedRoleId>AROAFAKE{serial:012X}:{session}</AssumedRoleId>\
                 <Arn>arn:aws:sts::{ACCOUNT_ID}:assumed-role/{role}/{session}</Arn></AssumedRoleUser>\
                 </AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>",
                creds.access_key_id,
                creds.secret_access_key(),
                creds.session_token(),
            );
            xml(StatusCode::OK, body)
        }
    }
}

/// A value of an `application/x-www-form-urlencoded` body.
fn form_value(body: &[u8], name: &str) -> Option<String> {
    form_urlencoded::parse(body)
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn xml(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/xml"));
    resp
}

/// An awsQuery error document.
fn sts_error(status: StatusCode, code: &str) -> Response<Full<Bytes>> {
    let fault = if status.is_server_error() {
        "Receiver"
    } else {
        "Sender"
    };
    xml(
        status,
        format!(
            "<ErrorResponse xmlns=\"{STS_XMLNS}\"><Error><Type>{fault}</Type>\
             <Code>{code}</Code><Message>injected {code}</Message></Error>\
             <RequestId>00000000-0000-4000-8000-000000000000</RequestId></ErrorResponse>"
        ),
    )
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A restJson1 error: the type in `x-amzn-errortype`, the message in the body.
fn error(status: StatusCode, kind: &'static str, message: &str) -> Response<Full<Bytes>> {
    let mut resp = json(
        status,
        serde_json::json!({ "message": message }).to_string(),
    );
    resp.headers_mut()
        .insert("x-amzn-errortype", HeaderValue::from_static(kind));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_have_fixed_sizes() {
        let now = SystemTime::now();
        let a = fake_credentials(1, now);
        let b = fake_credentials(u64::MAX, now);
        assert_eq!(a.access_key_id.len(), 20);
        assert_eq!(a.access_key_id.len(), b.access_key_id.len());
        assert_eq!(a.secret_access_key().len(), 40);
        assert_eq!(a.secret_access_key().len(), b.secret_access_key().len());
        assert_eq!(a.session_token().len(), SESSION_TOKEN_LEN);
        assert_eq!(b.session_token().len(), SESSION_TOKEN_LEN);
    }

    #[test]
    fn reads_the_pod_from_a_token() {
        let issuer = crate::pods::Issuer::generate(crate::pods::Alg::Es256).unwrap();
        let pod = crate::pods::Pod::numbered("t", 7);
        let found = pod_of_token(&issuer.token(&pod).unwrap()).unwrap();
        assert_eq!(found.namespace, pod.namespace);
        assert_eq!(found.service_account, pod.service_account);
        assert_eq!(found.pod_name, pod.name);
        assert!(pod_of_token("a.b.c").is_none());
    }
}
