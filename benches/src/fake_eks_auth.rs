//! A wire-level EKS Auth fake: `AssumeRoleForPodIdentity` over real HTTP on loopback, in the
//! restJson1 format the AWS SDK parses (`shared/docs/CONTRACT.md`, "EKS Auth wire format").
//!
//! It counts calls (the load tool's "upstream calls" column), answers after a configurable
//! latency (a cold burst is only interesting when the upstream takes time), and issues
//! credentials that live one hour, like EKS Auth's. It trusts the token it is sent: the pod
//! in the response comes from the token's claims, decoded without checking the signature,
//! because the agent has already verified it.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use pod_identity_agent::config::DEFAULT_AUDIENCE;
use pod_identity_agent::upstream::{Credentials, Secret};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// EKS Auth issues credentials for one hour.
pub const CREDENTIAL_LIFETIME: Duration = Duration::from_secs(3600);
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
    Credentials {
        access_key_id: format!("ASIAFAKE{:012X}", serial & 0xffff_ffff_ffff),
        secret_access_key: Secret::new(format!("fake/secret/access/key/{filler}x")),
        session_token: Secret::new(session),
        account_id: ACCOUNT_ID.into(),
        expiration,
    }
}

struct State {
    path: String,
    calls: AtomicU64,
    latency_us: AtomicU64,
}

/// A running fake; stops when dropped.
pub struct FakeEksAuth {
    addr: SocketAddr,
    state: Arc<State>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl FakeEksAuth {
    /// Serve `POST /clusters/{cluster}/assume-role-for-pod-identity` on 127.0.0.1, port 0.
    pub async fn start(cluster: &str, latency: Duration) -> std::io::Result<FakeEksAuth> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            path: format!("/clusters/{cluster}/assume-role-for-pod-identity"),
            calls: AtomicU64::new(0),
            latency_us: AtomicU64::new(latency.as_micros() as u64),
        });
        let (stop, stop_rx) = watch::channel(false);
        let handler_state = state.clone();
        let task = tokio::spawn(crate::server::serve(listener, stop_rx, move |req| {
            handle(handler_state.clone(), req)
        }));
        Ok(FakeEksAuth {
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
}

impl Drop for FakeEksAuth {
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
    })
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::POST || req.uri().path() != state.path {
        return error(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            "unknown operation",
        );
    }
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
    let pod = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            v.get("token")
                .and_then(|t| t.as_str())
                .and_then(pod_of_token)
        });
    let Some(pod) = pod else {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidTokenException",
            "the token is not a pod token",
        );
    };
    let latency = Duration::from_micros(state.latency_us.load(Ordering::Relaxed));
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let expiration = SystemTime::now() + CREDENTIAL_LIFETIME;
    let creds = fake_credentials(serial, expiration);
    let session = format!("eks-load-{}", pod.pod_name);
    let doc = serde_json::json!({
        "subject": {"namespace": pod.namespace, "serviceAccount": pod.service_account},
        "audience": DEFAULT_AUDIENCE,
        "podIdentityAssociation": {
            "associationArn": format!("arn:aws:eks:us-west-2:{ACCOUNT_ID}:podidentityassociation/load/a-{serial:012}"),
            "associationId": format!("a-{serial:012}"),
        },
        "assumedRoleUser": {
            "arn": format!("arn:aws:sts::{ACCOUNT_ID}:assumed-role/{}-{}/{session}", pod.namespace, pod.service_account),
            "assumeRoleId": format!("AROAFAKE{serial:012X}:{session}"),
        },
        "credentials": {
            "accessKeyId": creds.access_key_id,
            "secretAccessKey": creds.secret_access_key.expose(),
            "sessionToken": creds.session_token.expose(),
            "expiration": expiration.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        },
    });
    json(StatusCode::OK, doc.to_string())
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
        assert_eq!(a.secret_access_key.expose().len(), 40);
        assert_eq!(
            a.secret_access_key.expose().len(),
            b.secret_access_key.expose().len()
        );
        assert_eq!(a.session_token.expose().len(), SESSION_TOKEN_LEN);
        assert_eq!(b.session_token.expose().len(), SESSION_TOKEN_LEN);
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
