//! `--handoff-socket`: a new agent takes over the running one's listeners and state, so an
//! upgrade leaves no gap and no cold cache.
//!
//! Every agent here listens on the same fixed ports (picked free per test), as two
//! versions of the DaemonSet's pod do on one node.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use proto_tests::agent::{send_to, CREDENTIALS_PATH};
use proto_tests::assertions::wait_until;
use proto_tests::{Agent, AgentBuilder, FakeKubeApi, Fault, KubePod, Pod, TestBed};
use tempfile::TempDir;
use tokio::time::Instant;

const NODE: &str = "node-handoff";

/// Free ports for the credentials, probe and metrics listeners, and the socket's directory.
struct Node {
    ports: [u16; 3],
    dir: TempDir,
    /// Agents started on this node so far: each gets its own probe socket, as each pod has
    /// its own emptyDir.
    agents: std::sync::atomic::AtomicUsize,
}

impl Node {
    fn new() -> Node {
        let listeners: Vec<TcpListener> = (0..3)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
            .collect();
        let ports = [0, 1, 2].map(|i| listeners[i].local_addr().unwrap().port());
        let dir = tempfile::tempdir().expect("temp dir");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        Node {
            ports,
            dir,
            agents: Default::default(),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("handoff.sock")
    }

    /// `--probe-socket` for the next agent of this node: a path of its own.
    fn probe_socket_args(&self) -> [String; 2] {
        let n = self.agents.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.path().join(format!("probe-{n}.sock"));
        ["--probe-socket".into(), path.display().to_string()]
    }

    fn credentials(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports[0]))
    }

    /// The flags every agent of this node gets.
    fn args(&self, handoff: bool) -> Vec<String> {
        let mut args: Vec<String> = [
            "--port",
            &self.ports[0].to_string(),
            "--probe-port",
            &self.ports[1].to_string(),
            "--metrics-port",
            &self.ports[2].to_string(),
        ]
        .map(str::to_owned)
        .to_vec();
        if handoff {
            args.extend([
                "--handoff-socket".into(),
                self.socket().display().to_string(),
            ]);
        }
        args
    }
}

/// An agent of `node` against `bed`'s upstream and keys (a newer version, as far as the
/// node can tell).
fn next_agent(bed: &TestBed, node: &Node, handoff: bool) -> AgentBuilder {
    AgentBuilder::new(bed.upstream.url())
        .arg("--jwks-file")
        .arg(bed.jwks_path())
        .args(node.args(handoff))
        .args(node.probe_socket_args())
}

async fn first_agent(node: &Node) -> TestBed {
    TestBed::builder()
        .args(node.args(true))
        .args(node.probe_socket_args())
        .start()
        .await
}

/// What a client saw over a run: answers by kind.
#[derive(Default, Debug, Clone)]
struct Tally {
    ok: usize,
    refused: usize,
    failed: usize,
    /// A 200 with keys other than the pod's cached ones: fetched anew, or another pod's.
    other_keys: usize,
    /// Keep-alive: the connection was closed while idle, and the retry on a new one worked.
    closed_idle_retried: usize,
}

/// Requests from `pods` in turn, each on a new connection, every few milliseconds until
/// `stop`; each answer must carry the pod's own access key.
fn new_connection_client(
    addr: SocketAddr,
    pods: Vec<(String, String)>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Tally> {
    tokio::spawn(async move {
        let mut tally = Tally::default();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut i = 0;
        while !stop.load(Ordering::Acquire) && Instant::now() < deadline {
            let (token, key) = &pods[i % pods.len()];
            i += 1;
            let answer = tokio::time::timeout(
                Duration::from_secs(5),
                send_to(addr, "GET", CREDENTIALS_PATH, &[("Authorization", token)]),
            )
            .await;
            match answer {
                Ok(Ok(r)) if r.status == 200 => {
                    if r.json_str("AccessKeyId").as_deref() == Some(key.as_str()) {
                        tally.ok += 1
                    } else {
                        tally.other_keys += 1
                    }
                }
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    tally.refused += 1
                }
                _ => tally.failed += 1,
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        tally
    })
}

/// One keep-alive connection, reused as an SDK's pool does; a connection closed while idle
/// is retried once on a new one.
fn keep_alive_client(
    addr: SocketAddr,
    token: String,
    key: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Tally> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tokio::spawn(async move {
        let mut tally = Tally::default();
        let request = format!(
            "GET {CREDENTIALS_PATH} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {token}\r\n\r\n"
        );
        let mut conn: Option<tokio::net::TcpStream> = None;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut retrying = false;
        while !stop.load(Ordering::Acquire) && Instant::now() < deadline {
            let stream = match conn.as_mut() {
                Some(s) => s,
                None => match tokio::net::TcpStream::connect(addr).await {
                    Ok(s) => conn.insert(s),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        tally.refused += 1;
                        tokio::time::sleep(Duration::from_millis(3)).await;
                        continue;
                    }
                    Err(_) => {
                        tally.failed += 1;
                        continue;
                    }
                },
            };
            let mut answer = Vec::new();
            let exchange = async {
                stream.write_all(request.as_bytes()).await?;
                // One response: headers, then a Content-Length body.
                let mut buf = [0u8; 8192];
                loop {
                    let n = stream.read(&mut buf).await?;
                    if n == 0 {
                        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
                    }
                    answer.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&answer);
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            return Ok(text.contains(&key) && head.starts_with("HTTP/1.1 200"));
                        }
                    }
                }
            };
            match tokio::time::timeout(Duration::from_secs(5), exchange).await {
                Ok(Ok(true)) => {
                    tally.ok += 1;
                    if retrying {
                        tally.closed_idle_retried += 1;
                        retrying = false;
                    }
                }
                Ok(Ok(false)) => tally.other_keys += 1,
                Ok(Err(_)) if answer.is_empty() && !retrying => {
                    // Closed while idle: what SDKs retry on a new connection.
                    conn = None;
                    retrying = true;
                    continue;
                }
                _ => {
                    tally.failed += 1;
                    conn = None;
                    retrying = false;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tally
    })
}

/// Pods with cached credentials on `bed`'s agent: (token, access key) each.
async fn warm(bed: &TestBed, n: usize) -> Vec<(String, String)> {
    let mut pods = Vec::new();
    for i in 0..n {
        let pod = Pod::new("team-a", "app", &format!("app-{i}"));
        let token = bed.token(&pod);
        let r = bed.agent.fetch_credentials(&token).await;
        assert_eq!(r.status, 200, "{}", bed.agent.logs_text());
        pods.push((token, r.json_str("AccessKeyId").unwrap()));
    }
    pods
}

/// The value of `series` in `agent`'s metrics (0 for a series with no sample yet).
async fn metric(agent: &Agent, series: &str) -> f64 {
    proto_tests::metrics::value(&agent.metrics_text().await, series).unwrap_or(0.0)
}

fn assert_no_secrets(bed: &TestBed, agents: &[&Agent]) {
    for agent in agents {
        let logs = agent.logs_text();
        for issued in bed.upstream.issued() {
            assert!(
                !logs.contains(&issued.secret_access_key) && !logs.contains(&issued.session_token),
                "a secret of {} is in the logs:\n{logs}",
                issued.access_key_id
            );
        }
        for token in bed.upstream.tokens() {
            let signature = token.rsplit('.').next().unwrap_or_default();
            assert!(
                !logs.contains(signature),
                "a pod token is in the logs:\n{logs}"
            );
        }
    }
}

#[tokio::test]
async fn zero_gap_the_new_agent_takes_listeners_and_cache_then_the_old_one_is_killed() {
    let node = Node::new();
    let mut bed = first_agent(&node).await;
    let pods = warm(&bed, 20).await;
    let calls_before = bed.upstream.calls();

    let stop = Arc::new(AtomicBool::new(false));
    let fresh = new_connection_client(node.credentials(), pods.clone(), stop.clone());
    let pooled = keep_alive_client(
        node.credentials(),
        pods[0].0.clone(),
        pods[0].1.clone(),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let b = next_agent(&bed, &node, true).start().await;
    let first_answer = started.elapsed();
    // The old agent stops on its own; SIGKILL is what a hard stop of its pod looks like.
    bed.agent.signal(Signal::SIGKILL);
    bed.agent.wait_exit(Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Release);
    let fresh = fresh.await.unwrap();
    let pooled = pooled.await.unwrap();
    eprintln!("new connections: {fresh:?}; keep-alive: {pooled:?}; new agent ready after {first_answer:?}");

    assert!(fresh.ok > 50, "{fresh:?}");
    assert_eq!(
        (fresh.refused, fresh.failed, fresh.other_keys),
        (0, 0, 0),
        "{fresh:?}\n{}",
        b.logs_text()
    );
    assert_eq!(
        (pooled.refused, pooled.failed, pooled.other_keys),
        (0, 0, 0),
        "{pooled:?}"
    );
    assert!(pooled.ok > 20, "{pooled:?}");
    assert_eq!(
        bed.upstream.calls(),
        calls_before,
        "the new agent served every pod from the cache it took"
    );
    assert_eq!(
        metric(
            &b,
            "pod_identity_agent_handoffs_taken_total{result=\"taken\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            &b,
            "pod_identity_agent_handoff_entries_total{direction=\"taken\",kind=\"credentials\"}"
        )
        .await,
        20.0
    );
    assert_no_secrets(&bed, &[&bed.agent, &b]);
}

/// 2,000 cached entries (the default `--max-cache-size`): how long the new agent takes from
/// its start to its first answer, and what the state weighs per entry.
#[tokio::test]
async fn two_thousand_cached_entries_pass_in_one_handoff() {
    const ENTRIES: usize = 2000;
    let node = Node::new();
    // Every pod here calls from 127.0.0.1: the per-caller limit would be the node's.
    let bed = TestBed::builder()
        .args(node.args(true))
        .args(["--caller-rate-limit", "100000", "--caller-burst", "100000"])
        .start()
        .await;
    let addr = node.credentials();
    let tokens: Vec<String> = (0..ENTRIES)
        .map(|i| bed.token(&Pod::new("team-a", "app", &format!("app-{i}"))))
        .collect();
    for chunk in tokens.chunks(50) {
        let mut set = tokio::task::JoinSet::new();
        for token in chunk {
            let token = token.clone();
            set.spawn(async move {
                send_to(addr, "GET", CREDENTIALS_PATH, &[("Authorization", &token)]).await
            });
        }
        while let Some(r) = set.join_next().await {
            assert_eq!(r.unwrap().unwrap().status, 200);
        }
    }
    let calls = bed.upstream.calls();
    let started = Instant::now();
    let b = next_agent(&bed, &node, true).start().await;
    let r = b.fetch_credentials(&tokens[ENTRIES - 1]).await;
    let first_answer = started.elapsed();
    assert_eq!(r.status, 200);
    assert_eq!(bed.upstream.calls(), calls, "served from the state taken");
    let given = bed
        .agent
        .log_records()
        .into_iter()
        .find(|r| {
            proto_tests::agent::log_field(r, "message")
                .and_then(|m| m.as_str())
                .is_some_and(|m| m.starts_with("handed over to the next agent"))
        })
        .expect("the old agent logged its handoff");
    let bytes = proto_tests::agent::log_field(&given, "state_bytes")
        .and_then(|v| v.as_u64())
        .unwrap();
    let credentials = proto_tests::agent::log_field(&given, "credentials")
        .and_then(|v| v.as_u64())
        .unwrap();
    assert_eq!(credentials, ENTRIES as u64);
    eprintln!(
        "{ENTRIES} entries: first answer {:?} after the new agent's start; state {bytes} bytes, {} bytes an entry",
        first_answer,
        bytes / ENTRIES as u64
    );
    assert_eq!(
        metric(
            &b,
            "pod_identity_agent_handoff_entries_total{direction=\"taken\",kind=\"credentials\"}"
        )
        .await,
        ENTRIES as f64
    );
}

/// The two rollouts kubelet can run on a node, measured the same way.
#[tokio::test]
async fn rollout_stop_then_start_has_a_gap_and_surge_with_handoff_has_none() {
    async fn rollout(surge: bool) -> Tally {
        let node = Node::new();
        let mut bed = first_agent(&node).await;
        let pods = warm(&bed, 5).await;
        let stop = Arc::new(AtomicBool::new(false));
        let client = new_connection_client(node.credentials(), pods, stop.clone());
        tokio::time::sleep(Duration::from_millis(200)).await;
        let b = if surge {
            // Start the new one, wait for its probe, then SIGTERM the old one.
            let b = next_agent(&bed, &node, true).start().await;
            bed.agent.sigterm();
            b
        } else {
            // maxUnavailable: the old one stops, then the new one starts.
            bed.agent.sigterm();
            bed.agent.wait_exit(Duration::from_secs(10)).await;
            next_agent(&bed, &node, true).start().await
        };
        bed.agent.wait_exit(Duration::from_secs(10)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::Release);
        let tally = client.await.unwrap();
        drop(b);
        tally
    }
    let stop_start = rollout(false).await;
    let surge = rollout(true).await;
    eprintln!("stop, then start: {stop_start:?}\nsurge with handoff: {surge:?}");
    assert!(
        stop_start.refused + stop_start.failed > 0,
        "stopping first leaves a gap: {stop_start:?}"
    );
    assert_eq!(
        (surge.refused, surge.failed, surge.other_keys),
        (0, 0, 0),
        "{surge:?}"
    );
}

#[tokio::test]
async fn upgrade_during_an_outage_of_eks_auth_and_the_api_server() {
    let node = Node::new();
    let api = FakeKubeApi::start().await;
    let pods: Vec<Pod> = (0..5)
        .map(|i| Pod::new("team-a", "app", &format!("app-{i}")))
        .collect();
    for p in &pods {
        api.add_pod(KubePod::of(p, NODE, "127.0.0.1".parse().unwrap()));
    }
    let attesting = |args: Vec<String>| {
        let mut a = args;
        a.extend(["--node-name", NODE, "--caller-attestation", "pod"].map(str::to_owned));
        a
    };
    let bed = TestBed::builder()
        .args(attesting(node.args(true)))
        .env("KUBECONFIG", api.kubeconfig())
        .start()
        .await;
    let mut keys = HashMap::new();
    for p in &pods {
        let r = bed.fetch_as(p).await;
        assert_eq!(r.status, 200, "{}", bed.agent.logs_text());
        keys.insert(p.uid.clone(), r.json_str("AccessKeyId").unwrap());
    }
    bed.upstream.set_fault(Fault::internal());
    api.set_down(true);
    let (calls, api_requests) = (bed.upstream.calls(), api.requests());

    let b = next_agent(&bed, &node, true)
        .args(attesting(Vec::new()))
        .env("KUBECONFIG", api.kubeconfig())
        .start()
        .await;
    assert_eq!(b.probe("/readyz").await.status, 200, "ready at once");
    for p in &pods {
        let r = b.fetch_credentials(&bed.token(p)).await;
        assert_eq!(r.status, 200, "{}", b.logs_text());
        assert_eq!(r.json_str("AccessKeyId").as_ref(), keys.get(&p.uid));
    }
    assert_eq!(bed.upstream.calls(), calls, "no upstream call");
    let while_down = api.requests() - api_requests;
    // A down API server answers nothing: any attempt the watch makes is refused there.
    eprintln!("API-server requests answered while down: {while_down}");

    // The API server returns: the new agent's watch resumes and sees a new pod.
    api.set_down(false);
    let newcomer = Pod::new("team-a", "app", "newcomer");
    api.add_pod(KubePod::of(&newcomer, NODE, "127.0.0.1".parse().unwrap()));
    assert!(
        api.wait_for_open_watches(1, Duration::from_secs(20)).await,
        "the watch resumed\n{}",
        b.logs_text()
    );
    bed.upstream.set_fault(Fault::Ok);
    let r = b.fetch_credentials(&bed.token(&newcomer)).await;
    assert_eq!(r.status, 200, "{}", b.logs_text());
}

#[tokio::test]
async fn a_chain_of_three_agents_each_takes_over_from_the_one_before() {
    let node = Node::new();
    let mut bed = first_agent(&node).await;
    let pods = warm(&bed, 3).await;
    let calls = bed.upstream.calls();
    let mut b = next_agent(&bed, &node, true).start().await;
    bed.agent.sigterm();
    assert_eq!(
        bed.agent
            .wait_exit(Duration::from_secs(10))
            .await
            .and_then(|s| s.code()),
        Some(0),
        "the old agent exits 0 on SIGTERM"
    );
    let c = next_agent(&bed, &node, true).start().await;
    b.sigterm();
    b.wait_exit(Duration::from_secs(10)).await;
    for (token, key) in &pods {
        let r = c.fetch_credentials(token).await;
        assert_eq!(r.json_str("AccessKeyId").as_ref(), Some(key));
    }
    assert_eq!(bed.upstream.calls(), calls, "C served what A fetched");
    assert_eq!(
        metric(
            &b,
            "pod_identity_agent_handoffs_given_total{result=\"given\"}"
        )
        .await,
        0.0,
        "B's metrics port is C's now"
    );
    assert_eq!(
        metric(
            &c,
            "pod_identity_agent_handoffs_taken_total{result=\"taken\"}"
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn a_request_in_flight_on_the_old_agent_gets_its_answer() {
    let node = Node::new();
    let bed = first_agent(&node).await;
    bed.upstream.set_latency(Duration::from_millis(1500));
    let pod = Pod::new("team-a", "app", "slow");
    let token = bed.token(&pod);
    let addr = node.credentials();
    let in_flight = tokio::spawn(async move {
        send_to(addr, "GET", CREDENTIALS_PATH, &[("Authorization", &token)]).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = next_agent(&bed, &node, true).start().await;
    let r = in_flight.await.unwrap().expect("an answer");
    assert_eq!(
        r.status,
        200,
        "{}\n{}",
        bed.agent.logs_text(),
        b.logs_text()
    );
}

#[tokio::test]
async fn a_peer_of_another_uid_receives_nothing() {
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to act as another uid");
        return;
    }
    let node = Node::new();
    let bed = first_agent(&node).await;
    // Open the directory and socket to everyone, as a misconfigured node would: the peer
    // check still keeps the state to the agent's own uid.
    std::fs::set_permissions(node.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mode = std::fs::metadata(node.socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the socket is created 0600");
    std::fs::set_permissions(node.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    // A peer of another uid: a process run as nobody that connects, says hello and reads.
    let script = format!(
        "import socket\ns=socket.socket(socket.AF_UNIX)\ns.settimeout(3)\ns.connect({:?})\ngot=b''\n\
         try:\n    s.sendall(b'PIAH\\x00\\x01\\x01\\x00\\x00\\x00\\x02{{}}')\n\
         \x20   while True:\n        d=s.recv(65536)\n        if not d: break\n        got+=d\n\
         except OSError as e: print('closed:', e)\nprint(len(got))\n",
        node.socket().display().to_string()
    );
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .uid(65534)
            .gid(65534)
            .output(),
    )
    .await
    .expect("the peer finishes")
    .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let got: usize = stdout
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "peer output: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert_eq!(got, 0, "the peer received {got} bytes");
    bed.agent
        .wait_for_metric(
            "pod_identity_agent_handoffs_given_total{result=\"refused_peer\"}",
            |v| v == 1.0,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(
        bed.agent.probe("/readyz").await.status,
        200,
        "still serving"
    );
}

#[tokio::test]
async fn a_stale_socket_is_replaced_and_the_agent_starts_afresh() {
    let node = Node::new();
    drop(std::os::unix::net::UnixListener::bind(node.socket()).unwrap());
    assert!(node.socket().exists(), "a dead agent's socket file");
    let bed = first_agent(&node).await;
    assert!(bed
        .agent
        .logs_text()
        .contains("no earlier agent to take over from"));
    let pods = warm(&bed, 1).await;
    // It listens there now: a next agent takes over from it.
    let b = next_agent(&bed, &node, true).start().await;
    let r = b.fetch_credentials(&pods[0].0).await;
    assert_eq!(r.json_str("AccessKeyId"), Some(pods[0].1.clone()));
}

/// An old agent that speaks the protocol but sends a state of a version this agent does not
/// read: the new one takes the listener, refuses the state whole, and serves.
#[tokio::test]
async fn a_state_of_another_version_is_refused_and_the_listeners_still_taken() {
    use std::io::{IoSlice, Read, Write};
    use std::mem::MaybeUninit;
    use std::os::fd::AsFd;
    let node = Node::new();
    let listener = TcpListener::bind(node.credentials()).unwrap();
    let unix = std::os::unix::net::UnixListener::bind(node.socket()).unwrap();
    let old = std::thread::spawn(move || {
        let (mut stream, _) = unix.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut head = [0u8; 11];
        stream.read_exact(&mut head).unwrap();
        let len = u32::from_be_bytes(head[7..11].try_into().unwrap()) as usize;
        let mut hello = vec![0u8; len];
        stream.read_exact(&mut hello).unwrap();
        let described = format!(r#"[{{"address":"{}"}}]"#, listener.local_addr().unwrap());
        let frame = |kind: u8, payload: &[u8]| {
            let mut f = b"PIAH\x00\x01".to_vec();
            f.push(kind);
            f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            f.extend_from_slice(payload);
            f
        };
        let listeners = frame(2, described.as_bytes());
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
        let fds = [listener.as_fd()];
        assert!(control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds)));
        let sent = rustix::net::sendmsg(
            &stream,
            &[IoSlice::new(&listeners)],
            &mut control,
            rustix::net::SendFlags::empty(),
        )
        .unwrap();
        stream.write_all(&listeners[sent..]).unwrap();
        let mut state = 999u32.to_be_bytes().to_vec();
        state.extend_from_slice(br#"{"somethingNew":[1,2,3]}"#);
        stream.write_all(&frame(3, &state)).unwrap();
        let mut taken = [0u8; 11];
        stream.read_exact(&mut taken).unwrap();
        taken[6]
    });
    let keys = proto_tests::TestKeys::shared();
    let upstream = proto_tests::FakeEksAuth::start().await;
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    proto_tests::keys::write_jwks(&jwks, &[&keys.rsa]).unwrap();
    let b = AgentBuilder::new(upstream.url())
        .arg("--jwks-file")
        .arg(&jwks)
        .args(node.args(true))
        .start()
        .await;
    assert_eq!(
        old.join().unwrap(),
        4,
        "the old agent was told the new one serves"
    );
    let pod = Pod::new("team-a", "app", "app-0");
    let r = b.fetch_credentials(&pod.token().sign(&keys.rsa)).await;
    assert_eq!(r.status, 200, "{}", b.logs_text());
    assert!(
        b.logs_text()
            .contains("of a version this agent does not read"),
        "{}",
        b.logs_text()
    );
    assert_eq!(
        metric(
            &b,
            "pod_identity_agent_handoffs_taken_total{result=\"listeners_only\"}"
        )
        .await,
        1.0
    );
}

/// A new agent that cannot start (here: a flag it refuses) leaves the old one serving.
#[tokio::test]
async fn a_new_agent_that_fails_to_start_leaves_the_old_one_serving() {
    let node = Node::new();
    let bed = first_agent(&node).await;
    let pods = warm(&bed, 1).await;
    let exited = next_agent(&bed, &node, true)
        .args(["--max-cache-size", "18446744073709551615"])
        .run_to_exit(Duration::from_secs(10))
        .await;
    assert_eq!(exited.code, Some(64), "{}", exited.stderr);
    let r = send_to(
        node.credentials(),
        "GET",
        CREDENTIALS_PATH,
        &[("Authorization", &pods[0].0)],
    )
    .await
    .expect("the old agent still accepts");
    assert_eq!(r.status, 200);
    assert_eq!(bed.agent.probe("/readyz").await.status, 200);
}

/// The kubelet's exec probe asks its own container's agent, through the probe socket in its
/// pod: a new agent that could not start fails its probe although the old one, which holds
/// the shared probe port, answers that port with 200. After a handoff the old agent is alive
/// but not ready, and the new one is ready.
#[tokio::test]
async fn the_exec_probe_asks_its_own_agent_not_whichever_holds_the_probe_port() {
    let node = Node::new();
    let bed = first_agent(&node).await;
    let pods = warm(&bed, 1).await;
    assert_eq!(bed.agent.exec_probe("/readyz").await.code, Some(0));

    // A new version that cannot start: its own probe fails, the shared port says ready.
    let [flag, failed_socket] = node.probe_socket_args();
    let exited = next_agent(&bed, &node, true)
        .args([flag.as_str(), failed_socket.as_str()])
        .args(["--max-cache-size", "18446744073709551615"])
        .run_to_exit(Duration::from_secs(10))
        .await;
    assert_eq!(exited.code, Some(64), "{}", exited.stderr);
    let probe = proto_tests::agent::exec_probe(failed_socket.as_ref(), "/readyz").await;
    assert_eq!(probe.code, Some(1), "{probe:?}");
    assert!(probe.stdout.contains("cannot connect"), "{probe:?}");
    assert_eq!(
        bed.agent.probe("/readyz").await.status,
        200,
        "a probe of the shared port is answered by the old agent"
    );

    // A new version that takes over: it is ready, the old one alive and not ready.
    let b = next_agent(&bed, &node, true).start().await;
    wait_until_handed_over(&bed.agent).await;
    let old_ready = bed.agent.exec_probe("/readyz").await;
    assert_eq!(old_ready.code, Some(1), "{old_ready:?}");
    assert!(old_ready.stdout.contains("handed over"), "{old_ready:?}");
    assert_eq!(bed.agent.exec_probe("/healthz").await.code, Some(0));
    let new_ready = b.exec_probe("/readyz").await;
    assert_eq!(new_ready.code, Some(0), "{new_ready:?}");
    assert_eq!(
        b.fetch_credentials(&pods[0].0).await.status,
        200,
        "the new agent serves the pod"
    );
}

/// Until the old agent logs that it has handed over (bounded). Its metrics port is the new
/// agent's by then.
async fn wait_until_handed_over(agent: &Agent) {
    wait_until("the old agent's handoff", Duration::from_secs(10), || {
        agent.logs_text().contains("handed over to the next agent")
    })
    .await;
}
