//! The fake Kubernetes API server checked without the agent: the real `kubectl` must read
//! pods from it as from a cluster, and read and taint its nodes, and its wire behaviour (watch
//! replay, compaction, paging, timeouts, outages, lagging watches, node patches and their
//! conflicts) must be what kube-apiserver does. If these fail, agent
//! tests that use the fake say nothing about the agent.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::Request;
use hyper_util::rt::TokioIo;
use proto_tests::fakes::kube_api::{KubeNode, KubeTaint, RequestKind};
use proto_tests::{FakeKubeApi, KubePod, Pod};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::time::{timeout, Instant};
use tokio_rustls::TlsConnector;

/// The longest a kubectl run or an expected event may take: generous for two busy cores, and
/// still short enough that a hang fails the test quickly.
const WAIT: Duration = Duration::from_secs(20);

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 1, 0, last))
}

fn pod_on(node: &str, namespace: &str, name: &str, last: u8) -> KubePod {
    KubePod::of(&Pod::new(namespace, "app", name), node, ip(last))
}

// ---------------------------------------------------------------------------------------------
// kubectl

/// A kubectl command against `kubeconfig`, with an environment of its own: no `KUBECONFIG`
/// from the caller, and a home (for its discovery cache) that goes away with `home`.
fn kubectl(kubeconfig: &Path, home: &Path, args: &[&str]) -> Command {
    let mut command = Command::new("kubectl");
    command
        .env_clear()
        .env("HOME", home)
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--request-timeout=10s")
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

async fn run_kubectl(kubeconfig: &Path, args: &[&str]) -> Output {
    let home = tempfile::tempdir().unwrap();
    let child = kubectl(kubeconfig, home.path(), args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run kubectl ({e}); ./scripts/test installs it"));
    timeout(WAIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("kubectl {args:?} did not finish within {WAIT:?}"))
        .unwrap()
}

fn stdout_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "kubectl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("kubectl prints JSON")
}

fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn kubectl_lists_the_pods_of_one_node() {
    let fake = FakeKubeApi::start().await;
    fake.add_pod(pod_on("node-a", "team-a", "web-0", 10));
    fake.add_pod(pod_on("node-a", "team-b", "worker-0", 11).host_network());
    fake.add_pod(pod_on("node-b", "team-a", "web-1", 12));

    let out = run_kubectl(
        fake.kubeconfig(),
        &[
            "get",
            "pods",
            "-A",
            "--field-selector",
            "spec.nodeName=node-a",
            "-o",
            "json",
        ],
    )
    .await;
    let list = stdout_json(&out);
    assert_eq!(names(&list), ["web-0", "worker-0"], "{list:#}");
    let web = &list["items"][0];
    assert_eq!(web["metadata"]["namespace"], "team-a");
    assert_eq!(web["spec"]["nodeName"], "node-a");
    assert_eq!(web["spec"]["serviceAccountName"], "app");
    assert_eq!(web["status"]["podIP"], "10.1.0.10");
    assert_eq!(web["status"]["phase"], "Running");
    assert!(
        web["spec"].get("hostNetwork").is_none(),
        "false is left out"
    );
    let worker = &list["items"][1];
    assert_eq!(worker["spec"]["hostNetwork"], true);
    assert_eq!(worker["status"]["podIP"], worker["status"]["hostIP"]);

    let lists: Vec<_> = fake
        .call_log()
        .into_iter()
        .filter(|r| r.kind == RequestKind::List)
        .collect();
    assert_eq!(lists.len(), 1, "{:#?}", fake.request_lines());
    assert!(
        lists[0]
            .target
            .contains("fieldSelector=spec.nodeName%3Dnode-a"),
        "{}",
        lists[0].target
    );
    assert!(fake.call_log().iter().all(|r| r.authorized));
}

#[tokio::test]
async fn kubectl_gets_a_pod_and_reports_a_missing_one() {
    let fake = FakeKubeApi::start().await;
    let pod = pod_on("node-a", "team-a", "web-0", 10);
    fake.add_pod(pod.clone());

    let out = run_kubectl(
        fake.kubeconfig(),
        &["get", "pod", "-n", "team-a", "web-0", "-o", "json"],
    )
    .await;
    let got = stdout_json(&out);
    assert_eq!(got["kind"], "Pod");
    assert_eq!(got["apiVersion"], "v1");
    assert_eq!(got["metadata"]["uid"], pod.uid.as_str());
    assert_eq!(got["metadata"]["resourceVersion"], fake.resource_version());
    assert_eq!(fake.calls_for_pod(&pod.uid), 1, "the GET names the pod");

    let out = run_kubectl(
        fake.kubeconfig(),
        &["get", "pod", "-n", "team-a", "web-9", "-o", "json"],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("NotFound") && stderr.contains("pods \"web-9\" not found"),
        "{stderr}"
    );
    assert_eq!(fake.gets(), 2);
}

#[tokio::test]
async fn kubectl_prints_the_server_side_table() {
    let fake = FakeKubeApi::start().await;
    fake.add_pod(pod_on("node-a", "team-a", "web-0", 10));
    fake.add_pod(pod_on("node-a", "team-a", "web-1", 11).phase("Pending"));

    let out = run_kubectl(
        fake.kubeconfig(),
        &["get", "pods", "-n", "team-a", "-o", "wide"],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        [
            "NAME",
            "READY",
            "STATUS",
            "RESTARTS",
            "AGE",
            "IP",
            "NODE",
            "NOMINATED",
            "NODE",
            "READINESS",
            "GATES"
        ],
        "{text}"
    );
    assert_eq!(rows[1][..4], ["web-0", "1/1", "Running", "0"], "{text}");
    assert_eq!(rows[1][5..7], ["10.1.0.10", "node-a"], "{text}");
    assert_eq!(
        rows[2][..3],
        ["web-1", "0/1", "ContainerCreating"],
        "{text}"
    );
    assert!(fake.call_log().iter().any(|r| r.kind == RequestKind::List));
}

#[tokio::test]
async fn kubectl_with_a_wrong_token_is_unauthorized() {
    let fake = FakeKubeApi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("kubeconfig");
    std::fs::write(&wrong, fake.kubeconfig_for("not-the-token")).unwrap();

    let out = run_kubectl(&wrong, &["get", "pods", "-A", "-o", "json"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    // client-go's words for a 401, as against a real cluster with a bad token.
    assert!(
        stderr.contains("error: You must be logged in to the server"),
        "{stderr}"
    );
    assert!(fake.requests() >= 1);
    assert!(fake.call_log().iter().all(|r| !r.authorized));
}

#[tokio::test]
async fn kubectl_watch_prints_a_pod_added_later() {
    let fake = FakeKubeApi::start().await;
    fake.add_pod(pod_on("node-a", "team-a", "web-0", 10));
    let home = tempfile::tempdir().unwrap();
    let mut child = kubectl(
        fake.kubeconfig(),
        home.path(),
        &[
            "get",
            "pods",
            "-A",
            "--field-selector",
            "spec.nodeName=node-a",
            "--watch",
            "--output-watch-events",
            "-o",
            "json",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap_or_else(|e| panic!("run kubectl ({e}); ./scripts/test installs it"));
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();

    assert!(
        fake.wait_for_open_watches(1, WAIT).await,
        "kubectl opened a watch: {:#?}",
        fake.request_lines()
    );
    fake.add_pod(pod_on("node-b", "team-a", "elsewhere", 11));
    fake.add_pod(pod_on("node-a", "team-a", "web-1", 12));

    // kubectl prints each event as indented JSON: collect text until the new pod shows up.
    let mut printed = String::new();
    let deadline = Instant::now() + WAIT;
    while !printed.contains("\"web-1\"") {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("kubectl printed no web-1 in time:\n{printed}"))
            .unwrap()
            .expect("kubectl still running");
        printed.push_str(&line);
        printed.push('\n');
    }
    child.kill().await.unwrap();
    assert!(printed.contains("\"web-0\""), "{printed}");
    assert!(printed.contains("\"ADDED\""), "{printed}");
    assert!(
        !printed.contains("elsewhere"),
        "a pod of another node: {printed}"
    );
}

// ---------------------------------------------------------------------------------------------
// The wire, with a plain HTTP client

/// A bare HTTPS client: one connection per request, so a watch holds its own.
struct Api {
    connector: TlsConnector,
    fake: FakeKubeApi,
    token: String,
}

enum Next {
    Event(Value),
    /// The stream ended cleanly.
    End,
    /// The connection broke mid-stream.
    Broken,
    /// Nothing within the wait.
    Quiet,
}

struct Events {
    body: Incoming,
    pending: Vec<u8>,
}

impl Events {
    async fn next(&mut self, within: Duration) -> Next {
        let deadline = Instant::now() + within;
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                return Next::Event(serde_json::from_slice(&line).expect("one JSON event a line"));
            }
            match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Err(_) => return Next::Quiet,
                Ok(None) => return Next::End,
                Ok(Some(Err(_))) => return Next::Broken,
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.pending.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// The next event, which must come within [`WAIT`].
    async fn event(&mut self) -> Value {
        match self.next(WAIT).await {
            Next::Event(e) => e,
            Next::End => panic!("the watch ended"),
            Next::Broken => panic!("the watch broke"),
            Next::Quiet => panic!("no event within {WAIT:?}"),
        }
    }

    /// The next event that is not a bookmark.
    async fn change(&mut self) -> Value {
        loop {
            let event = self.event().await;
            if event["type"] != "BOOKMARK" {
                return event;
            }
        }
    }
}

impl Api {
    fn new(fake: &FakeKubeApi) -> Api {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(fake.ca_file()).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Api {
            connector: TlsConnector::from(Arc::new(config)),
            fake: fake.clone(),
            token: fake.bearer_token().to_owned(),
        }
    }

    async fn connect(&self) -> std::io::Result<SendRequest<Empty<Bytes>>> {
        let tcp = TcpStream::connect(self.fake.addr()).await?;
        let name = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
        let tls = self.connector.connect(name, tcp).await?;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(connection);
        Ok(sender)
    }

    async fn send(&self, target: &str, token: &str) -> std::io::Result<hyper::Response<Incoming>> {
        let mut sender = self.connect().await?;
        let request = Request::get(target)
            .header("host", self.fake.addr().to_string())
            .header("authorization", format!("Bearer {token}"))
            .header("accept", "application/json")
            .body(Empty::new())
            .unwrap();
        timeout(WAIT, sender.send_request(request))
            .await
            .expect("an answer in time")
            .map_err(std::io::Error::other)
    }

    /// Status and JSON body of a plain request.
    async fn get(&self, target: &str) -> (u16, Value) {
        let response = self.send(target, &self.token).await.unwrap();
        let status = response.status().as_u16();
        assert_eq!(
            response.headers()["content-type"],
            "application/json",
            "{target}"
        );
        let body = timeout(WAIT, response.into_body().collect())
            .await
            .unwrap()
            .unwrap()
            .to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    async fn watch(&self, target: &str) -> Events {
        let response = self.send(target, &self.token).await.unwrap();
        assert_eq!(response.status(), 200, "{target}");
        assert_eq!(response.headers()["content-type"], "application/json");
        assert_eq!(response.headers()["transfer-encoding"], "chunked");
        Events {
            body: response.into_body(),
            pending: Vec::new(),
        }
    }
}

fn event_of(event: &Value) -> (&str, &str) {
    (
        event["type"].as_str().unwrap(),
        event["object"]["metadata"]["name"].as_str().unwrap_or(""),
    )
}

fn rv_of(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn requests_need_the_bearer_token_and_errors_are_status_objects() {
    let fake = FakeKubeApi::start().await;
    let api = Api::new(&fake);
    let response = api.send("/api/v1/pods", "wrong").await.unwrap();
    assert_eq!(response.status(), 401);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let status: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        status,
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": "Unauthorized", "reason": "Unauthorized", "code": 401})
    );

    let (code, status) = api.get("/api/v1/namespaces/team-a/pods/nope").await;
    assert_eq!(code, 404);
    assert_eq!(status["reason"], "NotFound");
    assert_eq!(
        status["details"],
        serde_json::json!({"name": "nope", "kind": "pods"})
    );
    assert_eq!(status["message"], "pods \"nope\" not found");
    let (code, status) = api.get("/api/v1/services").await;
    assert_eq!((code, status["reason"].as_str()), (404, Some("NotFound")));
    let (code, status) = api
        .get("/api/v1/pods?fieldSelector=spec.color%3Dblue")
        .await;
    assert_eq!((code, status["reason"].as_str()), (400, Some("BadRequest")));
    assert_eq!(status["message"], "field label not supported: spec.color");
    let (code, status) = api
        .get("/api/v1/pods?resourceVersionMatch=NotOlderThan")
        .await;
    assert_eq!((code, status["reason"].as_str()), (422, Some("Invalid")));

    let (code, version) = api.get("/version").await;
    assert_eq!(
        (code, version["gitVersion"].as_str()),
        (200, Some("v1.32.0"))
    );
    assert_eq!(fake.requests(), 6);
    assert!(!fake.call_log()[0].authorized);
}

#[tokio::test]
async fn a_watch_from_a_resource_version_replays_what_came_after_it() {
    let fake = FakeKubeApi::start().await;
    fake.add_pod(pod_on("node-a", "team-a", "before", 10));
    let from = fake.resource_version();
    let web = pod_on("node-a", "team-a", "web-0", 11);
    fake.add_pod(web.clone());
    fake.update_pod(web.clone().phase("Succeeded"));
    fake.add_pod(pod_on("node-b", "team-a", "elsewhere", 12));
    fake.delete_pod("team-a", "web-0");

    let api = Api::new(&fake);
    let mut events = api
        .watch(&format!(
            "/api/v1/pods?&watch=true&fieldSelector=spec.nodeName%3Dnode-a&resourceVersion={from}"
        ))
        .await;
    let added = events.event().await;
    let modified = events.event().await;
    let deleted = events.event().await;
    assert_eq!(event_of(&added), ("ADDED", "web-0"));
    assert_eq!(event_of(&modified), ("MODIFIED", "web-0"));
    assert_eq!(modified["object"]["status"]["phase"], "Succeeded");
    assert_eq!(event_of(&deleted), ("DELETED", "web-0"));
    assert_eq!(deleted["object"]["kind"], "Pod");
    assert_eq!(deleted["object"]["apiVersion"], "v1");
    assert_eq!(
        deleted["object"]["status"]["phase"], "Succeeded",
        "the last state"
    );
    let rvs: Vec<u64> = [&added, &modified, &deleted]
        .iter()
        .map(|e| rv_of(&e["object"]))
        .collect();
    assert!(rvs.windows(2).all(|w| w[0] < w[1]), "{rvs:?}");
    assert_eq!(
        rvs[2].to_string(),
        fake.resource_version(),
        "deletion has its own version"
    );

    // Live events follow the replay; a pod that stops matching the selector is deleted for it.
    let moving = pod_on("node-a", "team-b", "mover", 13);
    fake.add_pod(moving.clone());
    assert_eq!(event_of(&events.event().await), ("ADDED", "mover"));
    let mut moved = moving;
    moved.node_name = "node-b".to_owned();
    fake.update_pod(moved);
    let gone = events.event().await;
    assert_eq!(event_of(&gone), ("DELETED", "mover"));
    assert_eq!(gone["object"]["spec"]["nodeName"], "node-a");
    assert!(matches!(
        events.next(Duration::from_millis(200)).await,
        Next::Quiet
    ));

    // Without a resourceVersion, the watch starts with the current state.
    let mut fresh = api.watch("/api/v1/namespaces/team-a/pods?watch=1").await;
    let initial = fresh.event().await;
    assert_eq!(event_of(&initial), ("ADDED", "before"));
    assert_eq!(event_of(&fresh.event().await), ("ADDED", "elsewhere"));
    assert!(matches!(
        fresh.next(Duration::from_millis(200)).await,
        Next::Quiet
    ));
    assert_eq!(fake.watches(), 2);
    assert_eq!(fake.open_watches(), 2);
}

#[tokio::test]
async fn a_streaming_list_ends_its_initial_events_with_a_bookmark() {
    let fake = FakeKubeApi::start().await;
    fake.add_pod(pod_on("node-a", "team-a", "web-0", 10));
    let api = Api::new(&fake);
    let mut events = api
        .watch(
            "/api/v1/pods?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true\
             &sendInitialEvents=true&resourceVersionMatch=NotOlderThan&resourceVersion=0",
        )
        .await;
    assert_eq!(event_of(&events.event().await), ("ADDED", "web-0"));
    let end = events.event().await;
    assert_eq!(end["type"], "BOOKMARK");
    assert_eq!(
        end["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    assert_eq!(end["object"]["kind"], "Pod");
    assert_eq!(rv_of(&end["object"]).to_string(), fake.resource_version());
}

#[tokio::test]
async fn after_compaction_an_old_watch_gets_410_gone() {
    let fake = FakeKubeApi::start().await;
    let old = fake.resource_version();
    fake.add_pod(pod_on("node-a", "team-a", "web-0", 10));
    fake.expire_history();
    let now = fake.resource_version();

    let api = Api::new(&fake);
    let mut events = api
        .watch(&format!("/api/v1/pods?watch=true&resourceVersion={old}"))
        .await;
    let error = events.event().await;
    assert_eq!(error["type"], "ERROR");
    let status = &error["object"];
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["code"], 410);
    assert_eq!(status["reason"], "Expired");
    assert_eq!(
        status["message"],
        format!("too old resource version: {old} ({now})")
    );
    assert!(matches!(events.next(WAIT).await, Next::End));

    // From the current version all is well.
    let mut events = api
        .watch(&format!("/api/v1/pods?watch=true&resourceVersion={now}"))
        .await;
    fake.add_pod(pod_on("node-a", "team-a", "web-1", 11));
    assert_eq!(event_of(&events.event().await), ("ADDED", "web-1"));
}

#[tokio::test]
async fn a_paged_list_walks_every_pod_in_one_snapshot() {
    let fake = FakeKubeApi::start().await;
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        fake.add_pod(pod_on("node-a", "team-a", name, 10 + i as u8));
    }
    fake.add_pod(pod_on("node-b", "team-b", "d", 20));
    let api = Api::new(&fake);

    let mut seen = Vec::new();
    let mut target = "/api/v1/pods?limit=1".to_owned();
    let mut versions = Vec::new();
    for page in 0.. {
        assert!(page < 10, "the pages never end: {seen:?}");
        let (code, list) = api.get(&target).await;
        assert_eq!(code, 200, "{list}");
        assert_eq!(list["kind"], "PodList");
        assert!(
            list["items"][0].get("kind").is_none(),
            "list items have no kind"
        );
        seen.extend(names(&list));
        versions.push(list["metadata"]["resourceVersion"].clone());
        if page == 0 {
            assert_eq!(list["metadata"]["remainingItemCount"], 3);
            // A change between pages is not part of this list.
            fake.add_pod(pod_on("node-a", "team-a", "late", 30));
        }
        match list["metadata"]["continue"].as_str() {
            Some(token) => target = format!("/api/v1/pods?limit=1&continue={token}"),
            None => break,
        }
    }
    assert_eq!(seen, ["a", "b", "c", "d"]);
    assert!(versions.windows(2).all(|w| w[0] == w[1]), "{versions:?}");

    // With a selector, and with a token made too old by compaction.
    let (_, list) = api
        .get("/api/v1/namespaces/team-a/pods?limit=2&fieldSelector=spec.nodeName%3D%3Dnode-a")
        .await;
    assert_eq!(names(&list), ["a", "b"]);
    let token = list["metadata"]["continue"].as_str().unwrap().to_owned();
    assert!(list["metadata"].get("remainingItemCount").is_none());
    fake.add_pod(pod_on("node-a", "team-a", "later", 31));
    fake.expire_history();
    let (code, status) = api
        .get(&format!(
            "/api/v1/namespaces/team-a/pods?limit=2&continue={token}"
        ))
        .await;
    assert_eq!((code, status["reason"].as_str()), (410, Some("Expired")));
    let (code, _) = api
        .get(&format!(
            "/api/v1/namespaces/team-a/pods?limit=2&continue={token}&resourceVersion=5"
        ))
        .await;
    assert_eq!(code, 400, "no resourceVersion with continue");
}

#[tokio::test]
async fn a_watch_ends_at_its_timeout_with_a_bookmark() {
    let fake = FakeKubeApi::start().await;
    let api = Api::new(&fake);
    let started = Instant::now();
    let mut events = api
        .watch("/api/v1/pods?watch=true&timeoutSeconds=1&allowWatchBookmarks=true")
        .await;
    let bookmark = events.event().await;
    assert_eq!(bookmark["type"], "BOOKMARK");
    assert_eq!(bookmark["object"]["kind"], "Pod");
    assert_eq!(
        rv_of(&bookmark["object"]).to_string(),
        fake.resource_version()
    );
    assert!(matches!(events.next(WAIT).await, Next::End));
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(fake.wait_for_open_watches(0, WAIT).await);
}

#[tokio::test]
async fn down_cuts_watches_and_refuses_connections_until_up() {
    let fake = FakeKubeApi::start().await;
    fake.add_pod(pod_on("node-a", "team-a", "web-0", 10));
    let api = Api::new(&fake);
    let mut events = api.watch("/api/v1/pods?watch=true").await;
    assert_eq!(event_of(&events.event().await), ("ADDED", "web-0"));

    fake.set_down(true);
    assert!(matches!(events.next(WAIT).await, Next::Broken | Next::End));
    let refused = TcpStream::connect(fake.addr()).await.unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(api.send("/api/v1/pods", &api.token).await.is_err());
    assert!(fake.wait_for_open_watches(0, WAIT).await);

    fake.set_down(false);
    let (code, list) = api.get("/api/v1/pods").await;
    assert_eq!(code, 200);
    assert_eq!(names(&list), ["web-0"]);
}

#[tokio::test]
async fn dropping_the_fake_closes_its_port_and_its_watches() {
    let fake = FakeKubeApi::start().await;
    let api = Api::new(&fake);
    let mut events = api
        .watch("/api/v1/pods?watch=true&resourceVersion=1000")
        .await;
    let addr = fake.addr();
    drop(api);
    drop(fake);
    assert!(matches!(events.next(WAIT).await, Next::Broken | Next::End));
    let refused = TcpStream::connect(addr).await.unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[tokio::test]
async fn an_unannounced_pod_is_served_but_never_watched() {
    let fake = FakeKubeApi::start().await;
    let api = Api::new(&fake);
    let mut events = api
        .watch(&format!(
            "/api/v1/pods?watch=true&resourceVersion={}",
            fake.resource_version()
        ))
        .await;
    let hidden = pod_on("node-a", "team-a", "hidden", 10);
    fake.add_pod_unannounced(hidden.clone());
    fake.add_pod(pod_on("node-a", "team-a", "shown", 11));
    assert_eq!(event_of(&events.change().await), ("ADDED", "shown"));

    let (code, pod) = api.get("/api/v1/namespaces/team-a/pods/hidden").await;
    assert_eq!(code, 200);
    assert_eq!(pod["metadata"]["uid"], hidden.uid.as_str());
    let (_, list) = api.get("/api/v1/pods").await;
    assert_eq!(names(&list), ["hidden", "shown"]);
    assert!(matches!(
        events.next(Duration::from_millis(300)).await,
        Next::Quiet
    ));
    assert_eq!(fake.calls_for_pod(&hidden.uid), 1);
}

#[tokio::test]
async fn a_lagging_watch_delivers_events_late_and_bookmarks_no_further() {
    let fake = FakeKubeApi::start().await;
    let api = Api::new(&fake);
    let before = fake.resource_version();
    let mut events = api
        .watch(&format!(
            "/api/v1/pods?watch=true&allowWatchBookmarks=true&resourceVersion={before}"
        ))
        .await;
    let lag = Duration::from_millis(1500);
    fake.set_watch_delay(lag);
    let added_at = Instant::now();
    fake.add_pod(pod_on("node-a", "team-a", "web-0", 10));
    let (code, _) = api.get("/api/v1/namespaces/team-a/pods/web-0").await;
    assert_eq!(code, 200, "GETs are not delayed");

    loop {
        let event = events.event().await;
        if event["type"] == "BOOKMARK" {
            assert_eq!(
                rv_of(&event["object"]).to_string(),
                before,
                "a bookmark never passes an event not delivered yet"
            );
            continue;
        }
        assert_eq!(event_of(&event), ("ADDED", "web-0"));
        assert!(
            added_at.elapsed() >= lag,
            "delivered after {:?}",
            added_at.elapsed()
        );
        break;
    }
}

#[tokio::test]
async fn the_service_account_issuer_endpoints_serve_the_keys_set() {
    let fake = FakeKubeApi::start().await;
    let api = Api::new(&fake);
    let (code, _) = api.get("/openid/v1/jwks").await;
    assert_eq!(code, 404, "no keys set yet");
    let jwks = proto_tests::TestKeys::shared().jwks();
    fake.set_jwks("https://issuer.example", jwks.clone());
    let (code, discovery) = api.get("/.well-known/openid-configuration").await;
    assert_eq!(code, 200);
    assert_eq!(discovery["issuer"], "https://issuer.example");
    assert_eq!(
        discovery["jwks_uri"],
        format!("{}/openid/v1/jwks", fake.url())
    );
    let response = api
        .send("/openid/v1/jwks", fake.bearer_token())
        .await
        .unwrap();
    assert_eq!(
        response.headers()["content-type"],
        "application/jwk-set+json"
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), jwks);
}

// ---------------------------------------------------------------------------------------------
// Nodes

const STARTUP_TAINT: &str = "pod-identity-agent/not-ready";

/// A node registered with the startup taint between two others, as Karpenter or
/// `--register-with-taints` leave it.
fn tainted_node(name: &str) -> KubeNode {
    KubeNode::new(name)
        .taint(KubeTaint::new("dedicated", "NoSchedule").value("gpu"))
        .taint(KubeTaint::no_schedule(STARTUP_TAINT))
        .taint(KubeTaint::new("example.com/drain", "NoExecute").time_added("2025-01-02T03:04:05Z"))
}

impl Api {
    /// A request with a body (`PATCH`, `PUT`): status and JSON answer.
    async fn write(
        &self,
        method: &str,
        target: &str,
        content_type: &str,
        body: &Value,
    ) -> (u16, Value) {
        let tcp = TcpStream::connect(self.fake.addr()).await.unwrap();
        let name = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
        let tls = self.connector.connect(name, tcp).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(target)
            .header("host", self.fake.addr().to_string())
            .header("authorization", format!("Bearer {}", self.token))
            .header("accept", "application/json")
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let response = timeout(WAIT, sender.send_request(request))
            .await
            .expect("an answer in time")
            .unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&body).expect("a JSON answer"),
        )
    }
}

fn taint_keys(fake: &FakeKubeApi, node: &str) -> Vec<String> {
    fake.node_taints(node).into_iter().map(|t| t.key).collect()
}

#[tokio::test]
async fn kubectl_taint_removes_one_taint_and_leaves_the_others() {
    let fake = FakeKubeApi::start().await;
    fake.add_node(tainted_node("node-a"));
    fake.add_node(KubeNode::new("node-b").taint(KubeTaint::no_schedule(STARTUP_TAINT)));
    let before = fake.node("node-a").unwrap();

    let removal = format!("{STARTUP_TAINT}-");
    let out = run_kubectl(fake.kubeconfig(), &["taint", "node", "node-a", &removal]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "node/node-a untainted"
    );
    let writes = fake.node_writes();
    // kubectl taint reads the node, then sends a two-way strategic merge patch; taints have
    // no merge key, so the patch carries the whole list left.
    let [write] = writes.as_slice() else {
        panic!("one write: {writes:#?}")
    };
    assert_eq!(write.method, "PATCH");
    assert_eq!(write.content_type, "application/strategic-merge-patch+json");
    assert_eq!(write.status, 200);
    assert_eq!(
        write.json(),
        serde_json::json!({"spec": {"taints": [
            {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"},
            {"key": "example.com/drain", "effect": "NoExecute", "timeAdded": "2025-01-02T03:04:05Z"},
        ]}})
    );
    assert_eq!(fake.node_gets(), 1, "{:#?}", fake.request_lines());
    assert_eq!(fake.node_patches(), 1);

    let out = run_kubectl(fake.kubeconfig(), &["get", "node", "node-a", "-o", "json"]).await;
    let node = stdout_json(&out);
    assert_eq!(node["kind"], "Node");
    assert_eq!(
        node["spec"]["taints"],
        serde_json::json!([
            {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"},
            {"key": "example.com/drain", "effect": "NoExecute", "timeAdded": "2025-01-02T03:04:05Z"},
        ])
    );
    assert_eq!(node["metadata"]["labels"], before["metadata"]["labels"]);
    assert_eq!(node["metadata"]["uid"], before["metadata"]["uid"]);
    assert_eq!(node["status"], before["status"]);
    assert!(
        rv_of(&node) > rv_of(&before),
        "a write bumps the resourceVersion"
    );
    assert_eq!(node["metadata"]["resourceVersion"], fake.resource_version());
    assert_eq!(taint_keys(&fake, "node-b"), [STARTUP_TAINT], "another node");

    // Removing a taint the node does not have changes nothing and kubectl says so.
    let out = run_kubectl(fake.kubeconfig(), &["taint", "node", "node-a", &removal]).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fake.node_writes().len(), 1);

    // The last taint of node-b: what kubectl sends then.
    let out = run_kubectl(fake.kubeconfig(), &["taint", "node", "node-b", &removal]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = fake.node_writes().pop().unwrap();
    assert_eq!(last.json(), serde_json::json!({"spec": {"taints": null}}));
    assert!(fake.node("node-b").unwrap()["spec"].get("taints").is_none());
    assert_eq!(fake.node_taints("node-b"), Vec::<KubeTaint>::new());
}

#[tokio::test]
async fn kubectl_taint_adds_a_taint_and_get_nodes_prints_the_table() {
    let fake = FakeKubeApi::start().await;
    fake.add_node(KubeNode::new("node-a").label("node-role.kubernetes.io/worker", ""));
    fake.add_node(KubeNode::new("node-b").not_ready().unschedulable());

    let taint = format!("{STARTUP_TAINT}=:NoSchedule");
    let out = run_kubectl(fake.kubeconfig(), &["taint", "node", "node-a", &taint]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        fake.node_taints("node-a"),
        [KubeTaint::no_schedule(STARTUP_TAINT)]
    );
    assert_eq!(
        fake.node_writes()[0].json(),
        serde_json::json!({"spec": {"taints": [{"key": STARTUP_TAINT, "effect": "NoSchedule"}]}})
    );

    let out = run_kubectl(fake.kubeconfig(), &["get", "nodes", "-o", "wide"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        [
            "NAME",
            "STATUS",
            "ROLES",
            "AGE",
            "VERSION",
            "INTERNAL-IP",
            "EXTERNAL-IP",
            "OS-IMAGE",
            "KERNEL-VERSION",
            "CONTAINER-RUNTIME"
        ],
        "{text}"
    );
    assert_eq!(rows[1][..3], ["node-a", "Ready", "worker"], "{text}");
    assert_eq!(rows[1][4..7], ["v1.32.0", "127.0.0.1", "<none>"], "{text}");
    assert_eq!(
        rows[2][..3],
        ["node-b", "NotReady,SchedulingDisabled", "<none>"],
        "{text}"
    );
    assert_eq!(fake.requests_of(RequestKind::NodeList), 1);

    let out = run_kubectl(fake.kubeconfig(), &["get", "node", "node-c"]).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nodes \"node-c\" not found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_json_patch_whose_test_fails_is_422_and_changes_nothing() {
    let fake = FakeKubeApi::start().await;
    fake.add_node(tainted_node("node-a"));
    let api = Api::new(&fake);
    let read = fake.node("node-a").unwrap();
    let taints = read["spec"]["taints"].clone();
    let rest: Vec<Value> = taints
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["key"] != STARTUP_TAINT)
        .cloned()
        .collect();
    let removal = serde_json::json!([
        {"op": "test", "path": "/spec/taints", "value": taints},
        {"op": "replace", "path": "/spec/taints", "value": rest},
    ]);

    // Someone adds a taint after the read: the test no longer holds.
    fake.add_node_taint("node-a", KubeTaint::no_schedule("late"));
    let changed = fake.node("node-a").unwrap();
    let target = "/api/v1/nodes/node-a";
    let json_patch = "application/json-patch+json";
    let (code, status) = api.write("PATCH", target, json_patch, &removal).await;
    assert_eq!(code, 422, "{status}");
    // kube-apiserver's answer to any JSON patch that does not apply: no reason given.
    assert_eq!(
        status,
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": "Invalid", "details": {}, "code": 422,
            "message": "the server rejected our request due to an error in our request"})
    );
    assert_eq!(fake.node("node-a").unwrap(), changed, "nothing written");

    // A path that is not there: remove, and replace below a missing parent.
    for op in [
        serde_json::json!([{"op": "remove", "path": "/metadata/labels/nope"}]),
        serde_json::json!([{"op": "replace", "path": "/spec/nope/deeper", "value": 1}]),
        serde_json::json!([{"op": "replace", "path": "/spec/taints/9", "value": {}}]),
    ] {
        let (code, status) = api.write("PATCH", target, json_patch, &op).await;
        assert_eq!(
            (code, status["reason"].as_str()),
            (422, Some("Invalid")),
            "{op}"
        );
    }
    assert_eq!(fake.node("node-a").unwrap(), changed);

    // Read again and retry: the removal applies, and the late taint stays.
    let taints = changed["spec"]["taints"].clone();
    let rest: Vec<Value> = taints
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["key"] != STARTUP_TAINT)
        .cloned()
        .collect();
    let (code, node) = api
        .write(
            "PATCH",
            target,
            json_patch,
            &serde_json::json!([
                {"op": "test", "path": "/spec/taints", "value": taints},
                {"op": "replace", "path": "/spec/taints", "value": rest},
            ]),
        )
        .await;
    assert_eq!(code, 200, "{node}");
    assert_eq!(node["kind"], "Node");
    assert_eq!(
        taint_keys(&fake, "node-a"),
        ["dedicated", "example.com/drain", "late"]
    );
    assert_eq!(
        node,
        fake.node("node-a").unwrap(),
        "the answer is the stored node"
    );
    assert!(rv_of(&node) > rv_of(&changed));

    // The last taint goes with a remove of /spec/taints; a second remove finds nothing.
    fake.set_node_taints("node-a", vec![KubeTaint::no_schedule(STARTUP_TAINT)]);
    let taints = fake.node("node-a").unwrap()["spec"]["taints"].clone();
    let remove = serde_json::json!([
        {"op": "test", "path": "/spec/taints", "value": taints},
        {"op": "remove", "path": "/spec/taints"},
    ]);
    let (code, node) = api.write("PATCH", target, json_patch, &remove).await;
    assert_eq!(code, 200, "{node}");
    assert!(node["spec"].get("taints").is_none());
    let (code, _) = api.write("PATCH", target, json_patch, &remove).await;
    assert_eq!(code, 422);
    let (code, status) = api
        .write("PATCH", target, json_patch, &serde_json::json!({"a": 1}))
        .await;
    assert_eq!((code, status["reason"].as_str()), (400, Some("BadRequest")));
}

#[tokio::test]
async fn a_write_with_a_stale_resource_version_is_409_conflict() {
    let fake = FakeKubeApi::start().await;
    fake.add_node(tainted_node("node-a"));
    let api = Api::new(&fake);
    let read = fake.node("node-a").unwrap();
    let read_version = read["metadata"]["resourceVersion"].clone();
    // The merge patch a client that must not lose others' changes sends.
    let merge = serde_json::json!({
        "metadata": {"resourceVersion": read_version},
        "spec": {"taints": [{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]},
    });

    fake.modify_node("node-a", |node| {
        node["metadata"]["labels"]["team"] = "a".into();
    });
    let target = "/api/v1/nodes/node-a";
    let (code, status) = api
        .write("PATCH", target, "application/merge-patch+json", &merge)
        .await;
    assert_eq!(code, 409, "{status}");
    assert_eq!(
        status,
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": "Conflict", "code": 409,
            "details": {"name": "node-a", "kind": "nodes"},
            "message": "Operation cannot be fulfilled on nodes \"node-a\": the object has been \
                        modified; please apply your changes to the latest version and try again"})
    );
    assert_eq!(taint_keys(&fake, "node-a").len(), 3, "nothing written");

    // The same with the current version applies, and keeps the label written meanwhile.
    let mut current = merge.clone();
    current["metadata"]["resourceVersion"] =
        fake.node("node-a").unwrap()["metadata"]["resourceVersion"].clone();
    let (code, node) = api
        .write("PATCH", target, "application/merge-patch+json", &current)
        .await;
    assert_eq!(code, 200, "{node}");
    assert_eq!(taint_keys(&fake, "node-a"), ["dedicated"]);
    assert_eq!(node["metadata"]["labels"]["team"], "a");
    // The same write again changes nothing: no new resourceVersion.
    let version = fake.resource_version();
    let mut again = current.clone();
    again["metadata"]["resourceVersion"] = node["metadata"]["resourceVersion"].clone();
    let (code, _) = api
        .write("PATCH", target, "application/merge-patch+json", &again)
        .await;
    assert_eq!(code, 200);
    assert_eq!(fake.resource_version(), version);

    // A PUT of the object read before is refused as well; one without a version is not.
    let (code, status) = api.write("PUT", target, "application/json", &read).await;
    assert_eq!((code, status["reason"].as_str()), (409, Some("Conflict")));
    let mut unconditional = fake.node("node-a").unwrap();
    unconditional["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    unconditional["metadata"]["annotations"]["note"] = "put".into();
    let (code, node) = api
        .write("PUT", target, "application/json", &unconditional)
        .await;
    assert_eq!(code, 200, "{node}");
    assert_eq!(node["metadata"]["annotations"]["note"], "put");
    assert_eq!(fake.requests_of(RequestKind::NodeUpdate), 2);

    // Invalid results are refused as kube-apiserver refuses them.
    let (code, status) = api
        .write(
            "PATCH",
            target,
            "application/merge-patch+json",
            &serde_json::json!({"spec": {"taints": [{"key": "x", "effect": "Sometimes"}]}}),
        )
        .await;
    assert_eq!(
        (code, status["reason"].as_str()),
        (422, Some("Invalid")),
        "{status}"
    );
    assert_eq!(
        status["details"]["causes"][0]["field"],
        "spec.taints[0].effect"
    );
    let (code, status) = api
        .write(
            "PATCH",
            target,
            "application/merge-patch+json",
            &serde_json::json!({"metadata": {"name": "node-z"}}),
        )
        .await;
    assert_eq!(
        (code, status["reason"].as_str()),
        (400, Some("BadRequest")),
        "{status}"
    );
    let (code, status) = api
        .write(
            "PATCH",
            target,
            "application/apply-patch+yaml",
            &serde_json::json!({}),
        )
        .await;
    assert_eq!(code, 415, "{status}");
}

#[tokio::test]
async fn node_patches_can_be_refused_and_are_counted_and_authenticated() {
    let fake = FakeKubeApi::start().await;
    fake.add_node(tainted_node("node-a"));
    let api = Api::new(&fake);
    let target = "/api/v1/nodes/node-a";
    let patch = serde_json::json!({"spec": {"taints": null}});
    fake.fail_next_node_patches(2);
    for _ in 0..2 {
        let (code, status) = api
            .write("PATCH", target, "application/merge-patch+json", &patch)
            .await;
        assert_eq!((code, status["reason"].as_str()), (409, Some("Conflict")));
        assert_eq!(taint_keys(&fake, "node-a").len(), 3);
    }
    let (code, node) = api
        .write("PATCH", target, "application/merge-patch+json", &patch)
        .await;
    assert_eq!(code, 200);
    assert!(node["spec"].get("taints").is_none());
    let statuses: Vec<u16> = fake.node_writes().iter().map(|w| w.status).collect();
    assert_eq!(statuses, [409, 409, 200]);
    assert_eq!(fake.node_patches(), 3);

    let (code, node) = api.get(target).await;
    assert_eq!(code, 200);
    assert_eq!(node["metadata"]["name"], "node-a");
    let (code, list) = api.get("/api/v1/nodes").await;
    assert_eq!((code, list["kind"].as_str()), (200, Some("NodeList")));
    assert_eq!(names(&list), ["node-a"]);
    let (code, status) = api.get("/api/v1/nodes/node-b").await;
    assert_eq!(code, 404);
    assert_eq!(status["message"], "nodes \"node-b\" not found");
    assert_eq!(fake.node_gets(), 2);
    assert_eq!(fake.requests_of(RequestKind::NodeList), 1);

    // Without the token: 401, and nothing else is learned or changed.
    let response = api.send(target, "wrong").await.unwrap();
    assert_eq!(response.status(), 401);
    let mut stranger = Api::new(&fake);
    stranger.token = "wrong".to_owned();
    let (code, _) = stranger
        .write(
            "PATCH",
            target,
            "application/merge-patch+json",
            &serde_json::json!({
                "metadata": {"labels": {"owned": "yes"}},
            }),
        )
        .await;
    assert_eq!(code, 401);
    assert!(fake.node("node-a").unwrap()["metadata"]["labels"]
        .get("owned")
        .is_none());
    assert_eq!(fake.node_patches(), 4, "counted on arrival");
    assert_eq!(
        fake.node_writes().len(),
        3,
        "only authorized writes are recorded"
    );
}
