//! A fake Kubernetes API server: the pods of a cluster listed, watched and read over TLS with a
//! bearer token, the way kube-apiserver serves them to the `kube` crate (`Api::<Pod>` and
//! kube-runtime's `watcher`) and to `kubectl`.
//!
//! Every change to a pod is kept in a log numbered by one global resourceVersion, as etcd
//! numbers its revisions. The log is what gives a watch its replay from a resourceVersion, a
//! paged list its consistent snapshot, and compaction ([`FakeKubeApi::expire_history`]) its
//! `410 Gone`. The faults a node agent has to live through are switches on the fake: the server
//! going away (its port refusing connections, open watches cut), a watch that lags, and a pod
//! the watch never announces. So are the answers of a broken or hostile server, which
//! kube-apiserver itself never sends: a watch event that never ends its line, a GET whose
//! body never ends or is not JSON, and a pod with a field of the wrong type.
//!
//! This file has the server (TLS, the port, routing) and the switches; `store` keeps the change
//! log, `query` reads a list's or watch's parameters and selectors, `list` and `watch` serve
//! them, `objects` renders what clients see and `status` the failures. `nodes` serves the
//! nodes and their writes, applying patches with `patch`.

mod list;
mod nodes;
mod objects;
mod patch;
mod query;
mod status;
mod store;
mod watch;

use std::collections::BTreeMap;
use std::future::{poll_fn, Future};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch as channel, Notify};
use tokio::task::JoinSet;
use tokio::time::{sleep, timeout};
use tokio_rustls::TlsAcceptor;

pub use nodes::{KubeNode, KubeTaint, NodeWrite};

use super::recorder::{recorded_fake, Recorder};
use super::ServerGuard;
use crate::keys::{self, random_bytes, random_uuid};
use objects::{
    core_v1_resources, namespace_columns, namespace_object, namespace_row, negotiate, pod_columns,
    pod_object, pod_row, table, version, Representation,
};
use query::{parse_resource_version, percent_decode, ListOptions, Query};
use status::{too_large_resource_version, ApiError};
use store::{Store, FIRST_RESOURCE_VERSION};

/// How long a request for a resourceVersion the server has not reached waits for it before
/// failing with `504` ("Too large resource version"), as kube-apiserver's watch cache does.
const FUTURE_RESOURCE_VERSION_WAIT: Duration = Duration::from_secs(3);

/// A TLS handshake not done by then is abandoned: no client of the fake is that slow, and a
/// half-open connection must not hold a task until the fake is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The host IP of a pod unless a test names one: the tests' node is this machine.
pub const DEFAULT_HOST_IP: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Where the service-account issuer's keys are served, as on kube-apiserver.
pub const JWKS_PATH: &str = "/openid/v1/jwks";
pub const OIDC_DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

/// The names in the fake's kubeconfig (cluster, user and context).
const KUBECONFIG_NAME: &str = "fake-kube-api";

/// A pod as the fake stores it. The fields are what a node agent reads; everything else in the
/// served object (containers, conditions, QoS class) is filled in as a real pod would have it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubePod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
    /// `spec.nodeName`; empty for a pod not scheduled yet.
    pub node_name: String,
    /// `status.podIPs`, the first one also `status.podIP`; empty before the pod has a sandbox.
    pub pod_ips: Vec<IpAddr>,
    pub host_ip: IpAddr,
    pub host_network: bool,
    /// `status.phase`: `Pending`, `Running`, `Succeeded`, `Failed` or `Unknown`.
    pub phase: String,
    pub labels: BTreeMap<String, String>,
    /// Fields served as given, whatever the schema says (JSON pointer, value), set on the
    /// rendered object last: what a broken or hostile API server sends.
    pub raw_fields: Vec<(String, Value)>,
}

impl KubePod {
    /// The pod a harness token names ([`crate::keys::Pod`]), running on `node` with `ip`.
    pub fn of(pod: &keys::Pod, node: &str, ip: IpAddr) -> KubePod {
        KubePod {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            uid: pod.uid.clone(),
            service_account: pod.service_account.clone(),
            node_name: node.to_owned(),
            pod_ips: vec![ip],
            host_ip: DEFAULT_HOST_IP,
            host_network: false,
            phase: "Running".to_owned(),
            labels: BTreeMap::new(),
            raw_fields: Vec::new(),
        }
    }

    /// `hostNetwork: true`: the pod has its node's address.
    pub fn host_network(mut self) -> KubePod {
        self.host_network = true;
        self.pod_ips = vec![self.host_ip];
        self
    }

    /// The node's address (and the pod's, for a host-network pod).
    pub fn host_ip(mut self, ip: IpAddr) -> KubePod {
        self.host_ip = ip;
        if self.host_network {
            self.pod_ips = vec![ip];
        }
        self
    }

    pub fn phase(mut self, phase: &str) -> KubePod {
        self.phase = phase.to_owned();
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> KubePod {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Serve the field at `pointer` (e.g. `/spec/hostNetwork`; its parent must exist) as
    /// `value`, in lists, watch events and GETs alike, even where the schema forbids it (a
    /// string where a bool belongs): a pod kube-apiserver would never serve.
    pub fn raw_field(mut self, pointer: &str, value: Value) -> KubePod {
        self.raw_fields.push((pointer.to_owned(), value));
        self
    }

    /// `namespace/name`: the pod's key, ordered as etcd orders its keys.
    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// How a single-pod GET is answered ([`FakeKubeApi::set_get_answer`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GetAnswer {
    /// The pod, as kube-apiserver serves it.
    #[default]
    Pod,
    /// `200`, and a chunked body that starts like a pod and never ends: filler until the
    /// client hangs up.
    Endless,
    /// `200` with `application/json`, and a body of this many bytes that is not JSON.
    NotJson(usize),
}

/// What a request asked for, for the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// A list of pods (cluster-wide or in a namespace).
    List,
    /// A watch of pods.
    Watch,
    /// One pod by name.
    Get,
    /// `/version`, `/api`, `/apis` and below: what kubectl reads before anything else.
    Discovery,
    /// The service-account issuer's discovery document or keys.
    Oidc,
    /// A list of nodes.
    NodeList,
    /// One node by name.
    NodeGet,
    /// A PATCH of a node.
    NodePatch,
    /// A PUT of a node.
    NodeUpdate,
    /// Anything else (namespaces, health endpoints, unknown paths, methods the fake refuses).
    Other,
}

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct KubeRequest {
    pub method: String,
    /// Path and query as sent, e.g. `/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-a`.
    pub target: String,
    pub kind: RequestKind,
    /// Whether it carried the fake's bearer token.
    pub authorized: bool,
    pub user_agent: Option<String>,
    /// For a GET of a pod the fake has: that pod's UID.
    pub pod_uid: Option<String>,
}

impl KubeRequest {
    /// `METHOD target`, for assertion messages.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.target)
    }
}

/// The listening socket, or while the server is down a socket that only holds its port.
///
/// Both are bound with `SO_REUSEADDR` and `SO_REUSEPORT`, so the placeholder can take the port
/// before the listener lets go of it and the listener can come back while the placeholder
/// holds it: the port is never free for another process to take. A port that is bound but not
/// listening answers a connection attempt with a reset: "connection refused", as from a
/// stopped API server.
struct Port {
    listener: Option<TcpListener>,
    placeholder: Option<TcpSocket>,
}

struct Shared {
    addr: SocketAddr,
    token: String,
    store: Mutex<Store>,
    /// The latest resourceVersion, to wake watches.
    changed: channel::Sender<u64>,
    down: channel::Sender<bool>,
    port: Mutex<Port>,
    /// Wakes the accept loop when the listener is swapped.
    port_changed: Notify,
    /// `(issuer, JWKS)` for the service-account issuer endpoints.
    oidc: Mutex<Option<(String, Value)>>,
    open_watches: channel::Sender<usize>,
    /// Bumped by [`FakeKubeApi::send_unterminated_watch_event`]: (generation, bytes).
    unterminated_event: channel::Sender<(u64, usize)>,
    recorder: Recorder<KubeRequest>,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        // A panicking test thread must not poison the fake for the others.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn port(&self) -> MutexGuard<'_, Port> {
        self.port.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_down(&self) -> bool {
        *self.down.borrow()
    }

    fn change(&self, key: String, after: Option<KubePod>, announced: bool) {
        let resource_version = {
            let mut store = self.store();
            store.change(key, after, announced);
            store.resource_version
        };
        self.changed.send_replace(resource_version);
    }
}

/// Handle on a running fake API server; clones share it. The server stops when the last
/// handle is dropped.
#[derive(Clone)]
pub struct FakeKubeApi {
    shared: Arc<Shared>,
    kubeconfig: PathBuf,
    _dir: Arc<TempDir>,
    _running: Arc<Running>,
}

/// Stops the server when dropped: the port closes at once (refusing connections rather than
/// leaving them in a backlog nobody accepts), open watches are cut, and the accept loop goes,
/// taking its connections with it.
struct Running {
    shared: Arc<Shared>,
    _accept_loop: ServerGuard,
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut port = self.shared.port();
        port.listener = None;
        port.placeholder = None;
        drop(port);
        self.shared.down.send_replace(true);
    }
}

recorded_fake!(FakeKubeApi, KubeRequest);

impl FakeKubeApi {
    /// Start on `127.0.0.1:0` with no pods. Must be called inside a Tokio runtime, and so must
    /// [`set_down`](Self::set_down).
    pub async fn start() -> FakeKubeApi {
        let listener = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .expect("bind the fake API server on 127.0.0.1");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let shared = Arc::new(Shared {
            addr,
            token: keys::hex(&random_bytes::<24>()),
            store: Mutex::new(Store::new()),
            changed: channel::Sender::new(FIRST_RESOURCE_VERSION),
            down: channel::Sender::new(false),
            port: Mutex::new(Port {
                listener: Some(listener),
                placeholder: None,
            }),
            port_changed: Notify::new(),
            oidc: Mutex::new(None),
            open_watches: channel::Sender::new(0),
            unterminated_event: channel::Sender::new((0, 0)),
            recorder: Recorder::default(),
        });
        let acceptor = TlsAcceptor::from(Arc::new(tls_config()));
        let task = tokio::spawn(accept_loop(shared.clone(), acceptor));
        let running = Running {
            shared: shared.clone(),
            _accept_loop: ServerGuard {
                accept_loop: task.abort_handle(),
            },
        };
        let dir = tempfile::tempdir().expect("temporary directory for the kubeconfig");
        let kubeconfig = dir.path().join("kubeconfig");
        let fake = FakeKubeApi {
            shared,
            kubeconfig,
            _dir: Arc::new(dir),
            _running: Arc::new(running),
        };
        std::fs::write(&fake.kubeconfig, fake.kubeconfig_for(fake.bearer_token()))
            .expect("write the kubeconfig");
        fake
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.shared.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// A kubeconfig file naming this server, its CA and the bearer token, as the current
    /// context: what `KUBECONFIG` or `kubectl --kubeconfig` takes.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The text of a kubeconfig like [`kubeconfig`](Self::kubeconfig)'s with another token.
    pub fn kubeconfig_for(&self, token: &str) -> String {
        let ca = std::fs::read(self.ca_file()).expect("read the fixture CA certificate");
        // A JSON string is a YAML double-quoted scalar: any token is written safely.
        let token = Value::from(token);
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: {KUBECONFIG_NAME}\n  \
               cluster:\n    \
                 server: {url}\n    \
                 certificate-authority-data: {ca}\n\
             users:\n\
             - name: {KUBECONFIG_NAME}\n  \
               user:\n    \
                 token: {token}\n\
             contexts:\n\
             - name: {KUBECONFIG_NAME}\n  \
               context:\n    \
                 cluster: {KUBECONFIG_NAME}\n    \
                 user: {KUBECONFIG_NAME}\n\
             current-context: {KUBECONFIG_NAME}\n",
            url = self.url(),
            ca = STANDARD.encode(ca),
        )
    }

    /// The token every request must carry; random per fake.
    pub fn bearer_token(&self) -> &str {
        &self.shared.token
    }

    /// The CA certificate (PEM) the server's certificate chains to.
    pub fn ca_file(&self) -> PathBuf {
        fixture("ca.crt")
    }

    /// Add a pod: a new resourceVersion and an `ADDED` event to the watches it matches.
    ///
    /// Panics if the pod exists: a test adding a pod twice has lost track of its cluster.
    pub fn add_pod(&self, pod: KubePod) {
        self.add(pod, true);
    }

    /// Add a pod that lists and GETs see but that no watch, open or opened later from an
    /// older resourceVersion, is told about: a pod the agent's watch has not delivered yet.
    pub fn add_pod_unannounced(&self, pod: KubePod) {
        self.add(pod, false);
    }

    fn add(&self, pod: KubePod, announced: bool) {
        let key = pod.key();
        assert!(
            !self.shared.store().pods.contains_key(&key),
            "the fake API server already has pod {key}"
        );
        self.shared.change(key, Some(pod), announced);
    }

    /// Replace a pod (found by namespace and name): a `MODIFIED` event, or `ADDED`/`DELETED`
    /// for a watch whose selector the pod starts or stops matching.
    pub fn update_pod(&self, pod: KubePod) {
        let key = pod.key();
        assert!(
            self.shared.store().pods.contains_key(&key),
            "the fake API server has no pod {key} to update"
        );
        self.shared.change(key, Some(pod), true);
    }

    /// Delete a pod at once (as with a zero grace period): a `DELETED` event carrying its last
    /// state at the deletion's resourceVersion.
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        let key = format!("{namespace}/{name}");
        assert!(
            self.shared.store().pods.contains_key(&key),
            "the fake API server has no pod {key} to delete"
        );
        self.shared.change(key, None, true);
    }

    /// The pod as stored, if any.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<KubePod> {
        let key = format!("{namespace}/{name}");
        self.shared.store().pods.get(&key).map(|s| s.pod.clone())
    }

    /// The latest resourceVersion, as the wire carries it.
    pub fn resource_version(&self) -> String {
        self.shared.store().resource_version.to_string()
    }

    /// Down: the port refuses connections, open connections (watches among them) are cut, and
    /// a request already in flight gets its connection closed instead of an answer. Up again:
    /// the same port listens and serves the same state.
    ///
    /// Takes effect before returning (the sockets are swapped here, not in the background).
    pub fn set_down(&self, down: bool) {
        let shared = &self.shared;
        let mut port = shared.port();
        if down && port.listener.is_some() {
            // Take the port before letting go of it.
            port.placeholder = Some(
                reusable_socket(shared.addr).expect("hold the fake API server's port while down"),
            );
            port.listener = None;
        } else if !down && port.listener.is_none() {
            port.listener =
                Some(listen(shared.addr).expect("listen again on the fake API server's port"));
            port.placeholder = None;
        }
        shared.down.send_replace(down);
        drop(port);
        shared.port_changed.notify_one();
    }

    /// Events reach open watches only `delay` after the change (changes made from now on): a
    /// watch cache that lags behind storage. Lists and GETs are not delayed.
    pub fn set_watch_delay(&self, delay: Duration) {
        self.shared.store().watch_delay = delay;
    }

    /// Single-pod GETs answer only `delay` after they arrive: an API server under load.
    pub fn set_get_delay(&self, delay: Duration) {
        self.shared.store().get_delay = delay;
    }

    /// How single-pod GETs of a pod the fake has are answered from now on.
    pub fn set_get_answer(&self, answer: GetAnswer) {
        self.shared.store().get_answer = answer;
    }

    /// Every open watch sends one event that never ends its line, `bytes` long in all (sent
    /// in chunks, from one buffer: the test does not hold `bytes` of memory), then ends its
    /// response. Watches opened later are served as usual.
    pub fn send_unterminated_watch_event(&self, bytes: usize) {
        self.shared
            .unterminated_event
            .send_modify(|(generation, size)| {
                *generation += 1;
                *size = bytes;
            });
    }

    /// Compaction: history up to now is gone. A watch from an older resourceVersion gets a
    /// `410 Expired` error event, and so does a list continued with an older token (a `410`
    /// answer), which forces a client to list again. Open watches are not affected.
    pub fn expire_history(&self) {
        let mut store = self.shared.store();
        store.compacted = store.resource_version;
    }

    /// Serve the service-account issuer's discovery document (naming `issuer`) and `jwks`.
    pub fn set_jwks(&self, issuer: &str, jwks: Value) {
        *self.shared.oidc.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((issuer.to_owned(), jwks));
    }

    /// Requests received, of any kind (counted on arrival, authorized or not).
    pub fn requests(&self) -> usize {
        self.calls() as usize
    }

    /// Requests of one kind received.
    pub fn requests_of(&self, kind: RequestKind) -> usize {
        self.call_log().iter().filter(|r| r.kind == kind).count()
    }

    pub fn lists(&self) -> usize {
        self.requests_of(RequestKind::List)
    }

    pub fn watches(&self) -> usize {
        self.requests_of(RequestKind::Watch)
    }

    pub fn gets(&self) -> usize {
        self.requests_of(RequestKind::Get)
    }

    /// `METHOD target` of every request, in arrival order.
    pub fn request_lines(&self) -> Vec<String> {
        self.call_log().iter().map(KubeRequest::line).collect()
    }

    /// Wait until `n` requests of `kind` have been received; false on timeout.
    pub async fn wait_for_requests(&self, kind: RequestKind, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |calls| {
            calls.iter().filter(|r| r.kind == kind).count() >= n
        })
        .await
    }

    /// Watches streaming right now.
    pub fn open_watches(&self) -> usize {
        *self.shared.open_watches.borrow()
    }

    /// Wait until exactly `n` watches are open; false on timeout.
    pub async fn wait_for_open_watches(&self, n: usize, timeout: Duration) -> bool {
        let mut open = self.shared.open_watches.subscribe();
        tokio::time::timeout(timeout, open.wait_for(|&open| open == n))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/in-cluster")
        .join(name)
}

/// The fixture certificate (for `127.0.0.1` and `kubernetes.default.svc`), HTTP/1.1 only.
fn tls_config() -> rustls::ServerConfig {
    let certs = CertificateDer::pem_file_iter(fixture("server.crt"))
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .expect("read the fixture server certificate");
    let key =
        PrivateKeyDer::from_pem_file(fixture("server.key")).expect("read the fixture server key");
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("the default provider supports the default versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("the fixture key matches its certificate");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

fn reusable_socket(addr: SocketAddr) -> io::Result<TcpSocket> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    reusable_socket(addr)?.listen(1024)
}

/// Accept connections on whatever listener [`Port`] holds, and cut every connection when the
/// server goes down. Connections live in a `JoinSet` owned here, so aborting this task (the
/// fake dropped) ends them too, and with them their watches.
async fn accept_loop(shared: Arc<Shared>, acceptor: TlsAcceptor) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let port_changed = shared.port_changed.notified();
        tokio::pin!(port_changed);
        // The listener is polled under the lock, never held across an await, so `set_down`
        // can close it from another task at any moment.
        let accepted = poll_fn(|cx| {
            if port_changed.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            match &shared.port().listener {
                Some(listener) => listener.poll_accept(cx).map(Some),
                None => Poll::Pending,
            }
        })
        .await;
        match accepted {
            None => {
                if shared.is_down() {
                    connections.abort_all();
                }
            }
            Some(Ok((tcp, _peer))) => {
                connections.spawn(serve_connection(shared.clone(), acceptor.clone(), tcp));
            }
            // Out of file descriptors or the like: try again shortly rather than spin.
            Some(Err(_)) => sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn serve_connection(shared: Arc<Shared>, acceptor: TlsAcceptor, tcp: TcpStream) {
    if shared.is_down() {
        return;
    }
    let Ok(Ok(tls)) = timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await else {
        return;
    };
    let service = service_fn(move |req| {
        let shared = shared.clone();
        async move { handle(&shared, req).await }
    });
    // A peer that hangs up mid-exchange is not an error for a fake.
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(tls), service)
        .await;
}

type Body = BoxBody<Bytes, io::Error>;

/// Where a request goes, from its path.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Version,
    ApiVersions,
    CoreV1,
    ApiGroups,
    Health,
    OidcDiscovery,
    Jwks,
    /// The pods collection, cluster-wide or in a namespace; `watch_path` for the deprecated
    /// `/api/v1/watch/...` form.
    Pods {
        namespace: Option<String>,
        watch_path: bool,
    },
    Pod {
        namespace: String,
        name: String,
    },
    Namespaces,
    Namespace(String),
    Nodes,
    Node(String),
    NotFound,
}

impl Route {
    fn of(path: &str) -> Route {
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
        let named = |s: &str| !s.is_empty();
        match segments.as_slice() {
            ["version"] => Route::Version,
            ["api"] => Route::ApiVersions,
            ["api", "v1"] => Route::CoreV1,
            ["apis"] => Route::ApiGroups,
            ["healthz" | "livez" | "readyz"] => Route::Health,
            [".well-known", "openid-configuration"] => Route::OidcDiscovery,
            ["openid", "v1", "jwks"] => Route::Jwks,
            ["api", "v1", "pods"] => Route::Pods {
                namespace: None,
                watch_path: false,
            },
            ["api", "v1", "watch", "pods"] => Route::Pods {
                namespace: None,
                watch_path: true,
            },
            ["api", "v1", "namespaces", ns, "pods"] if named(ns) => Route::Pods {
                namespace: Some(percent_decode(ns)),
                watch_path: false,
            },
            ["api", "v1", "watch", "namespaces", ns, "pods"] if named(ns) => Route::Pods {
                namespace: Some(percent_decode(ns)),
                watch_path: true,
            },
            ["api", "v1", "namespaces"] => Route::Namespaces,
            ["api", "v1", "namespaces", ns] if named(ns) => Route::Namespace(percent_decode(ns)),
            ["api", "v1", "nodes"] => Route::Nodes,
            ["api", "v1", "nodes", name] if named(name) => Route::Node(percent_decode(name)),
            // The status subresource reads as the pod itself.
            ["api", "v1", "namespaces", ns, "pods", name]
            | ["api", "v1", "namespaces", ns, "pods", name, "status"]
                if named(ns) && named(name) =>
            {
                Route::Pod {
                    namespace: percent_decode(ns),
                    name: percent_decode(name),
                }
            }
            _ => Route::NotFound,
        }
    }

    fn kind(&self, method: &Method, query: &Query) -> RequestKind {
        match self {
            Route::Nodes | Route::Node(_) => nodes::request_kind(self, method),
            Route::Version | Route::ApiVersions | Route::CoreV1 | Route::ApiGroups => {
                RequestKind::Discovery
            }
            Route::OidcDiscovery | Route::Jwks => RequestKind::Oidc,
            Route::Pods { watch_path, .. } if *watch_path || query.flag("watch") => {
                RequestKind::Watch
            }
            Route::Pods { .. } => RequestKind::List,
            Route::Pod { .. } => RequestKind::Get,
            Route::Namespaces | Route::Namespace(_) | Route::Health | Route::NotFound => {
                RequestKind::Other
            }
        }
    }
}

/// The connection is closed instead of answered: the server is down.
fn connection_cut() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "the API server is down")
}

async fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> io::Result<Response<Body>> {
    if shared.is_down() {
        return Err(connection_cut());
    }
    let route = Route::of(req.uri().path());
    let query = Query::parse(req.uri().query());
    let kind = route.kind(req.method(), &query);
    let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    let authorized = header("authorization")
        .and_then(|v| v.split_once(' '))
        .is_some_and(|(scheme, token)| {
            scheme.eq_ignore_ascii_case("bearer") && token.trim() == shared.token
        });
    let pod_uid = match &route {
        Route::Pod { namespace, name } => shared
            .store()
            .pods
            .get(&format!("{namespace}/{name}"))
            .map(|s| s.pod.uid.clone()),
        _ => None,
    };
    shared.recorder.record(|_| KubeRequest {
        method: req.method().to_string(),
        target: req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_owned(), |p| p.to_string()),
        kind,
        authorized,
        user_agent: header("user-agent").map(str::to_owned),
        pod_uid,
    });
    // Authentication comes before routing: a stranger learns nothing, not even a 404.
    if !authorized {
        return Ok(ApiError::new(401, "Unauthorized", "Unauthorized").into_response());
    }
    if let Route::Nodes | Route::Node(_) = route {
        return Ok(nodes::serve(shared, route, &query, req).await);
    }
    let reply = match (req.method(), route) {
        (&Method::GET, route) => get(shared, route, &query, header("accept")).await,
        (method, Route::Pods { namespace, .. }) => Err(forbidden(method, namespace)),
        (method, Route::Pod { namespace, .. }) => Err(forbidden(method, Some(namespace))),
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )),
    };
    Ok(reply.unwrap_or_else(ApiError::into_response))
}

async fn get(
    shared: &Arc<Shared>,
    route: Route,
    query: &Query,
    accept: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    match route {
        Route::Version => Ok(json_response(&version())),
        Route::ApiVersions => Ok(json_response(&json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [
                { "clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr.to_string() }
            ],
        }))),
        Route::CoreV1 => Ok(json_response(&core_v1_resources())),
        Route::ApiGroups => Ok(json_response(&json!({
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [],
        }))),
        Route::Health => Ok(response(StatusCode::OK, "text/plain; charset=utf-8", "ok")),
        Route::OidcDiscovery | Route::Jwks => oidc(shared, &route),
        Route::Pods {
            namespace,
            watch_path,
        } => {
            let options = ListOptions::parse(query, watch_path)?;
            let representation = negotiate(accept)?;
            if options.watch {
                watch::watch(shared, namespace, options, representation)
            } else {
                list::list(shared, namespace.as_deref(), &options, representation).await
            }
        }
        Route::Namespaces => {
            let representation = negotiate(accept)?;
            if query.flag("watch") {
                return Err(ApiError::new(
                    405,
                    "MethodNotAllowed",
                    "the fake API server does not watch namespaces",
                ));
            }
            let store = shared.store();
            let metadata = json!({ "resourceVersion": store.resource_version.to_string() });
            let namespaces = store.namespaces.iter();
            Ok(json_response(&match representation {
                Representation::Object => json!({
                    "kind": "NamespaceList",
                    "apiVersion": "v1",
                    "metadata": metadata,
                    "items": namespaces.map(|(name, ns)| namespace_object(name, ns, false))
                        .collect::<Vec<_>>(),
                }),
                Representation::Table(version) => table(
                    version,
                    metadata,
                    Some(namespace_columns()),
                    namespaces
                        .map(|(name, ns)| namespace_row(name, ns))
                        .collect(),
                ),
            }))
        }
        Route::Namespace(name) => {
            let representation = negotiate(accept)?;
            let store = shared.store();
            let Some(ns) = store.namespaces.get(&name) else {
                return Err(ApiError::not_found("namespaces", &name));
            };
            Ok(json_response(&match representation {
                Representation::Object => namespace_object(&name, ns, true),
                Representation::Table(version) => table(
                    version,
                    json!({ "resourceVersion": ns.resource_version.to_string() }),
                    Some(namespace_columns()),
                    vec![namespace_row(&name, ns)],
                ),
            }))
        }
        Route::Pod { namespace, name } => {
            let delay = shared.store().get_delay;
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let representation = negotiate(accept)?;
            if let Some(rv) = query.get("resourceVersion").filter(|rv| !rv.is_empty()) {
                let rv = parse_resource_version(rv)?;
                if rv > 0 {
                    wait_for_resource_version(shared, rv).await?;
                }
            }
            let key = format!("{namespace}/{name}");
            let store = shared.store();
            let Some(stored) = store.pods.get(&key) else {
                return Err(ApiError::not_found("pods", &name));
            };
            match store.get_answer {
                GetAnswer::Pod => {}
                GetAnswer::Endless => return Ok(endless_response()),
                GetAnswer::NotJson(bytes) => {
                    let text: String = "this is not JSON ".chars().cycle().take(bytes).collect();
                    return Ok(response(StatusCode::OK, "application/json", text));
                }
            }
            Ok(json_response(&match representation {
                Representation::Object => pod_object(stored, stored.resource_version, true),
                Representation::Table(version) => table(
                    version,
                    json!({ "resourceVersion": stored.resource_version.to_string() }),
                    Some(pod_columns()),
                    vec![pod_row(stored, stored.resource_version)],
                ),
            }))
        }
        // Nodes never get here: `nodes::serve` answers them.
        Route::NotFound | Route::Nodes | Route::Node(_) => Err(ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
        .details(json!({}))),
    }
}

/// What RBAC tells a read-only client that tries to write.
fn forbidden(method: &Method, namespace: Option<String>) -> ApiError {
    let verb = match *method {
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "get",
    };
    let scope = match namespace {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_owned(),
    };
    ApiError::new(
        403,
        "Forbidden",
        &format!(
            "pods is forbidden: User \"{KUBECONFIG_NAME}\" cannot {verb} resource \"pods\" \
             in API group \"\" {scope}"
        ),
    )
    .details(json!({ "kind": "pods" }))
}

fn oidc(shared: &Shared, route: &Route) -> Result<Response<Body>, ApiError> {
    let Some((issuer, jwks)) = shared
        .oidc
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
    else {
        return Err(ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ));
    };
    let (body, content_type) = if *route == Route::Jwks {
        (jwks, "application/jwk-set+json")
    } else {
        let mut algorithms: Vec<&str> = jwks["keys"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|k| k["alg"].as_str())
            .collect();
        algorithms.sort_unstable();
        algorithms.dedup();
        if algorithms.is_empty() {
            algorithms.push("RS256");
        }
        (
            json!({
                "issuer": issuer,
                // kube-apiserver's default without --service-account-jwks-uri: its own address.
                "jwks_uri": format!("https://{}{JWKS_PATH}", shared.addr),
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": algorithms,
            }),
            "application/json",
        )
    };
    let mut response = response(StatusCode::OK, content_type, body.to_string());
    response.headers_mut().insert(
        "cache-control",
        HeaderValue::from_static("public, max-age=3600"),
    );
    Ok(response)
}

/// Wait (bounded) until the store has reached `rv`.
async fn wait_for_resource_version(shared: &Shared, rv: u64) -> Result<(), ApiError> {
    let mut changed = shared.changed.subscribe();
    let reached = timeout(
        FUTURE_RESOURCE_VERSION_WAIT,
        changed.wait_for(|&current| current >= rv),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    if reached {
        Ok(())
    } else {
        Err(too_large_resource_version(rv, *changed.borrow()))
    }
}

/// Filler for the hostile answers: one buffer, sent again and again.
const FILLER_CHUNK: usize = 64 * 1024;

/// The start of a pod object, then filler that never ends: no closing quote, no newline.
pub(super) fn filler_chunks() -> impl Iterator<Item = Bytes> {
    let head = Bytes::from_static(br#"{"kind":"Pod","apiVersion":"v1","metadata":{"name":""#);
    let filler = Bytes::from(vec![b'a'; FILLER_CHUNK]);
    std::iter::once(head).chain(std::iter::repeat(filler))
}

/// A `200` whose chunked body never ends ([`GetAnswer::Endless`]); hyper writes it only as
/// fast as the client reads, and stops when the client hangs up.
fn endless_response() -> Response<Body> {
    let frames = futures_util::stream::iter(filler_chunks().map(|b| Ok(Frame::data(b))));
    let mut response = Response::new(StreamBody::new(frames).boxed());
    set_common_headers(&mut response, "application/json");
    response
}

fn json_response(body: &Value) -> Response<Body> {
    response(StatusCode::OK, "application/json", body.to_string())
}

fn response(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let body = Full::new(body.into())
        .map_err(|never| match never {})
        .boxed();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    set_common_headers(&mut response, content_type);
    response
}

/// What kube-apiserver puts on every answer.
fn set_common_headers(response: &mut Response<Body>, content_type: &str) {
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(content_type) {
        headers.insert(CONTENT_TYPE, value);
    }
    headers.insert(
        "cache-control",
        HeaderValue::from_static("no-cache, private"),
    );
    if let Ok(id) = HeaderValue::from_str(&random_uuid()) {
        headers.insert("audit-id", id);
    }
}

/// A pod on `node` for the unit tests.
#[cfg(test)]
fn test_pod(namespace: &str, name: &str, node: &str) -> KubePod {
    KubePod::of(
        &keys::Pod::new(namespace, "app", name),
        node,
        IpAddr::V4(Ipv4Addr::new(10, 1, 0, 1)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let pod_route = |ns: &str, name: &str| Route::Pod {
            namespace: ns.to_owned(),
            name: name.to_owned(),
        };
        assert_eq!(
            Route::of("/api/v1/namespaces/a/pods/b"),
            pod_route("a", "b")
        );
        assert_eq!(
            Route::of("/api/v1/namespaces/a/pods/b/status"),
            pod_route("a", "b")
        );
        assert_eq!(
            Route::of("/api/v1/watch/namespaces/a/pods"),
            Route::Pods {
                namespace: Some("a".to_owned()),
                watch_path: true
            }
        );
        assert_eq!(Route::of("/api/v1/namespaces//pods"), Route::NotFound);
        assert_eq!(
            Route::of("/api/v1/namespaces/a/pods/b/log"),
            Route::NotFound
        );
        assert_eq!(Route::of("/"), Route::NotFound);
    }
}
