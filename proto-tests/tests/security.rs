//! Hostile input: forged tokens, spoofed Host headers, path tricks and
//! malformed HTTP. Every rejected token must cost zero upstream calls, and the
//! process must survive everything.

use std::net::SocketAddr;
use std::time::Duration;

use proto_tests::agent::{burst, CREDENTIALS_PATH};
use proto_tests::assertions::{
    assert_credentials, assert_error_body, assert_token_rejected, only_issued, wait_until,
};
use proto_tests::http::{self, RawRequest};
use proto_tests::keys::{jwks, write_jwks, DEFAULT_ISSUER};
use proto_tests::{Agent, FakeEksAuth, FakeJwks, Pod, TestBed, TestKeys};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long key-source changes (JWKS re-fetch on unknown `kid`, file re-read)
/// may take to become visible; the contract gives no number, so this only
/// bounds the wait.
const KEY_RELOAD_WAIT: Duration = Duration::from_secs(15);

fn pod() -> Pod {
    Pod::new("team-a", "app", "app-1")
}

/// Every kind of forged or unfit token, over one agent: each is rejected with 400/401/403 and
/// costs no upstream call, and after each a valid token of the same pod is served, proving the
/// rejection was the forgery's doing and not a broken setup. (One agent serves them all: no
/// case changes the agent's state, and a case that did would show in the next control.)
#[tokio::test]
async fn forged_and_unfit_tokens_are_rejected_without_an_upstream_call() {
    let bed = TestBed::start().await;
    let keys = &bed.keys;
    let pod = pod();
    let cases = [
        (
            "wrong signing key (the trusted key's kid, signed by another key)",
            pod.token()
                .kid(keys.rsa.kid())
                .sign(TestKeys::untrusted_rsa()),
        ),
        ("unknown kid", pod.token().sign(TestKeys::untrusted_rsa())),
        ("alg none", pod.token().sign_alg_none(&keys.rsa)),
        (
            "HS256 keyed with the RSA public key",
            pod.token().sign_hs256_with_public_key(&keys.rsa),
        ),
        ("expired", pod.token().expired().sign(&keys.rsa)),
        (
            "nbf in the future",
            pod.token().not_yet_valid().sign(&keys.rsa),
        ),
        (
            "another audience",
            pod.token().audience(["sts.amazonaws.com"]).sign(&keys.rsa),
        ),
        (
            "another issuer",
            pod.token()
                .issuer("https://oidc.eks.us-west-2.amazonaws.com/id/SOMEOTHERCLUSTER")
                .sign(&keys.rsa),
        ),
        (
            "sub disagreeing with the kubernetes.io claims",
            pod.token()
                .subject("system:serviceaccount:kube-system:admin")
                .sign(&keys.rsa),
        ),
        (
            "no kubernetes.io claims",
            pod.token().without_kubernetes_claims().sign(&keys.rsa),
        ),
        ("Bearer prefix", format!("Bearer {}", bed.token(&pod))),
    ];
    for (what, token) in &cases {
        let calls = bed.upstream.calls();
        let response = bed.agent.fetch_credentials(token).await;
        assert_token_rejected(&response, what);
        assert_eq!(
            bed.upstream.calls(),
            calls,
            "{what}: a rejected token must not reach EKS Auth"
        );
        let control = bed.fetch_as(&pod).await;
        assert_credentials(&control, &only_issued(&bed.upstream));
    }
}

#[tokio::test]
async fn missing_empty_or_garbage_authorization_is_400() {
    let bed = TestBed::start().await;
    let cases: [(&str, &[(&str, &str)]); 4] = [
        ("missing", &[]),
        ("empty", &[("Authorization", "")]),
        ("garbage", &[("Authorization", "abc")]),
        ("three garbage parts", &[("Authorization", "a.b.c")]),
    ];
    for (what, headers) in cases {
        let response = bed.agent.get(CREDENTIALS_PATH, headers).await;
        assert_eq!(response.status, 400, "{what} Authorization: {response:?}");
        assert_error_body(&response);
    }
    assert_eq!(bed.upstream.calls(), 0);
}

#[tokio::test]
async fn host_header_must_name_a_bound_address() {
    let bed = TestBed::start().await;
    let pod = pod();
    let token = bed.token(&pod);
    let port = bed.agent.credentials_addr().port();
    let rejected = [
        "localhost".to_owned(),
        format!("localhost:{port}"),
        "evil.example".to_owned(),
        format!("evil.example:{port}"),
        "127.0.0.2".to_owned(),
        format!("127.0.0.2:{port}"),
        "169.254.170.23".to_owned(),
        "[::1]".to_owned(),
        "127.0.0.1.nip.io".to_owned(),
    ];
    let with_host = |host: String| {
        let token = token.clone();
        let agent = &bed.agent;
        async move {
            let headers = [("Host", host.as_str()), ("Authorization", token.as_str())];
            (agent.get(CREDENTIALS_PATH, &headers).await, host)
        }
    };
    for host in rejected {
        let (response, host) = with_host(host).await;
        assert_eq!(response.status, 403, "Host: {host}: {response:?}");
        assert_error_body(&response);
    }
    assert_eq!(
        bed.upstream.calls(),
        0,
        "a spoofed Host must not reach EKS Auth"
    );
    for host in ["127.0.0.1".to_owned(), format!("127.0.0.1:{port}")] {
        let (response, host) = with_host(host).await;
        assert_eq!(response.status, 200, "Host: {host}: {response:?}");
    }
}

#[tokio::test]
async fn ipv6_listener_accepts_its_bracketed_host() {
    if let Err(e) = std::net::TcpListener::bind("[::1]:0") {
        panic!(
            "no IPv6 loopback here (binding [::1]:0: {e}); this test needs one \
             (CI has it: enable IPv6 on lo)"
        );
    }
    let upstream = FakeEksAuth::start().await;
    let dir = tempfile::tempdir().unwrap();
    let jwks_path = dir.path().join("jwks.json");
    let keys = TestKeys::shared();
    write_jwks(&jwks_path, &[&keys.rsa]).unwrap();
    let agent = Agent::builder(upstream.url())
        .bind_hosts("127.0.0.1,[::1]")
        .arg("--jwks-file")
        .arg(&jwks_path)
        .start()
        .await;
    let v6: SocketAddr = agent
        .credentials_addrs()
        .into_iter()
        .find(SocketAddr::is_ipv6)
        .unwrap_or_else(|| panic!("no [::1] listener announced\n{}", agent.logs_text()));
    let token = Pod::new("ns", "sa", "p").token().sign(&keys.rsa);
    for (host, status) in [
        (format!("[::1]:{}", v6.port()), 200),
        ("[::1]".to_owned(), 200),
        ("[0:0:0:0:0:0:0:2]".to_owned(), 403),
    ] {
        let response = proto_tests::agent::send_to(
            v6,
            "GET",
            CREDENTIALS_PATH,
            &[("Host", host.as_str()), ("Authorization", &token)],
        )
        .await
        .unwrap();
        assert_eq!(response.status, status, "Host: {host}: {response:?}");
    }
}

#[tokio::test]
async fn only_the_exact_route_exists() {
    let bed = TestBed::start().await;
    let token = bed.token(&pod());
    for path in [
        "/v1/credentials/",
        "//v1/credentials",
        "/v1/%63redentials",
        "/V1/credentials",
        "/v1/credentials/../credentials",
        "/v1/./credentials",
        "/",
    ] {
        let response = bed.agent.get(path, &[("Authorization", &token)]).await;
        assert_eq!(response.status, 404, "{path}: {response:?}");
    }
    for method in ["POST", "PUT", "DELETE"] {
        let response = bed
            .agent
            .request(method, CREDENTIALS_PATH, &[("Authorization", &token)])
            .await;
        assert_eq!(response.status, 405, "{method}: {response:?}");
    }
    assert_eq!(bed.upstream.calls(), 0);
    let response = bed
        .agent
        .get("/v1/credentials?foo=bar&x", &[("Authorization", &token)])
        .await;
    assert_credentials(&response, &only_issued(&bed.upstream));
}

#[tokio::test]
async fn oversized_header_is_refused_and_the_agent_survives() {
    let bed = TestBed::start().await;
    let pod = pod();
    let addr = bed.agent.credentials_addr();
    let request = RawRequest::get(CREDENTIALS_PATH)
        .header("Host", addr.to_string())
        .header("Authorization", bed.token(&pod))
        .header("X-Padding", "a".repeat(20 * 1024))
        .header("Connection", "close");
    let response = http::send(addr, &request)
        .await
        .unwrap_or_else(|e| panic!("no response to a 20 KiB header: {e}"));
    assert!(
        matches!(response.status, 431 | 400),
        "expected 431 or 400: {response:?}"
    );
    assert_eq!(bed.upstream.calls(), 0);
    let control = bed.fetch_as(&pod).await;
    assert_eq!(control.status, 200, "{control:?}");
}

/// Opens a connection and sends an unfinished header section.
async fn start_slow_request(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!("GET {CREDENTIALS_PATH} HTTP/1.1\r\nHost: {addr}\r\nX-Slow: ").as_bytes(),
        )
        .await
        .expect("write partial header");
    stream
}

#[tokio::test]
async fn slow_clients_do_not_block_others() {
    let bed = TestBed::start().await;
    let addr = bed.agent.credentials_addr();
    let mut slow = Vec::new();
    for _ in 0..16 {
        slow.push(start_slow_request(addr).await);
    }
    let response = bed.fetch_as(&pod()).await;
    assert_credentials(&response, &only_issued(&bed.upstream));
    drop(slow);
}

#[tokio::test]
async fn client_that_never_finishes_its_headers_is_disconnected() {
    // The contract's 30 s, shortened by its flag so the test does not wait half a minute
    // (the default itself is checked where the flags are parsed).
    let bed = TestBed::with_args(["--idle-timeout", "2s"]).await;
    let mut stream = start_slow_request(bed.agent.credentials_addr()).await;
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        // Bounded: a 408 body and the close arrive in a few reads.
        for _ in 0..64 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(
        outcome.is_ok(),
        "a connection with unfinished headers was still open after 10 s"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "disconnected after {:?}, before the 2 s timeout",
        started.elapsed()
    );
}

#[tokio::test]
async fn two_authorization_headers_are_400() {
    let bed = TestBed::start().await;
    let pod = pod();
    let token = bed.token(&pod);
    let response = bed
        .agent
        .get(
            CREDENTIALS_PATH,
            &[("Authorization", &token), ("Authorization", &token)],
        )
        .await;
    assert_eq!(response.status, 400, "{response:?}");
    assert_error_body(&response);
    let other = pod.token().sign(&bed.keys.ec);
    let response = bed
        .agent
        .get(
            CREDENTIALS_PATH,
            &[("Authorization", &token), ("Authorization", &other)],
        )
        .await;
    assert_eq!(response.status, 400, "{response:?}");
    assert_eq!(bed.upstream.calls(), 0);
}

#[tokio::test]
async fn http10_without_host_is_400() {
    let bed = TestBed::start().await;
    let request = RawRequest::get(CREDENTIALS_PATH)
        .version("HTTP/1.0")
        .header("Authorization", bed.token(&pod()));
    let response = http::send(bed.agent.credentials_addr(), &request)
        .await
        .expect("a response");
    assert_eq!(response.status, 400, "{response:?}");
    assert_eq!(bed.upstream.calls(), 0);
}

/// An agent reading its keys from a JWKS URL that serves the shared RSA key.
async fn with_jwks_url() -> (&'static TestKeys, FakeJwks, FakeEksAuth, Agent) {
    let keys = TestKeys::shared();
    let issuer = FakeJwks::start(jwks(&[&keys.rsa])).await;
    let upstream = FakeEksAuth::start().await;
    let agent = Agent::builder(upstream.url())
        .args(["--jwks-url", &issuer.jwks_url()])
        .start()
        .await;
    (keys, issuer, upstream, agent)
}

#[tokio::test]
async fn jwks_url_is_a_key_source() {
    let (keys, issuer, upstream, agent) = with_jwks_url().await;
    assert!(issuer.jwks_fetches() >= 1, "the JWKS URL was never fetched");
    let pod = pod();
    let forged = pod
        .token()
        .kid(keys.rsa.kid())
        .sign(TestKeys::untrusted_rsa());
    assert_token_rejected(
        &agent.fetch_credentials(&forged).await,
        "wrong key via --jwks-url",
    );
    assert_eq!(upstream.calls(), 0);
    let response = agent.fetch_credentials(&pod.token().sign(&keys.rsa)).await;
    assert_credentials(&response, &only_issued(&upstream));
}

#[tokio::test]
async fn issuer_alone_discovers_keys() {
    let keys = TestKeys::shared();
    let issuer = FakeJwks::start(jwks(&[&keys.rsa])).await;
    let upstream = FakeEksAuth::start().await;
    let agent = Agent::builder(upstream.url())
        .args(["--issuer", &issuer.issuer()])
        .start()
        .await;
    assert!(
        issuer.discovery_fetches() >= 1,
        "discovery document never fetched"
    );
    assert!(issuer.jwks_fetches() >= 1, "jwks_uri never fetched");
    let pod = pod();
    let wrong_iss = pod.token().sign(&keys.rsa); // DEFAULT_ISSUER, not this issuer
    assert_token_rejected(&agent.fetch_credentials(&wrong_iss).await, "wrong issuer");
    assert_eq!(upstream.calls(), 0);
    let good = pod.token().issuer(issuer.issuer()).sign(&keys.rsa);
    assert_credentials(
        &agent.fetch_credentials(&good).await,
        &only_issued(&upstream),
    );
}

/// Retry `token` until it is accepted or `KEY_RELOAD_WAIT` passes.
async fn accepted_eventually(agent: &Agent, token: &str) -> proto_tests::http::RawResponse {
    let deadline = tokio::time::Instant::now() + KEY_RELOAD_WAIT;
    loop {
        let response = agent.fetch_credentials(token).await;
        if response.status == 200 || tokio::time::Instant::now() >= deadline {
            return response;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn unknown_kid_triggers_a_jwks_refetch() {
    let (keys, issuer, upstream, agent) = with_jwks_url().await;
    let before = issuer.jwks_fetches();
    // The signer rotates to a new key; the agent has not seen it yet.
    issuer.set_jwks(jwks(&[&keys.rsa, &keys.ec]));
    let token = pod().token().sign(&keys.ec);
    let response = accepted_eventually(&agent, &token).await;
    assert_credentials(&response, &only_issued(&upstream));
    assert!(issuer.jwks_fetches() > before, "JWKS was not re-fetched");
}

/// A stream of tokens naming key ids the agent has never seen must not turn into a stream of
/// JWKS fetches (the issuer would rate-limit the node, or the agent would amplify a flood).
#[tokio::test]
async fn unknown_kid_floods_cause_at_most_one_jwks_refetch_per_interval() {
    let (keys, issuer, upstream, agent) = with_jwks_url().await;
    let before = issuer.jwks_fetches();
    let pod = pod();
    let forged: Vec<String> = (0..200)
        .map(|i| {
            pod.token()
                .kid(format!("never-seen-{i}"))
                .sign(TestKeys::untrusted_rsa())
        })
        .collect();
    // Two waves, 1 s apart, both well inside the 10 s pacing interval. A request waits for the
    // refetch its kid triggers, so once a wave is answered its fetches are counted.
    let addr = agent.credentials_addr();
    for (i, wave) in forged.chunks(100).enumerate() {
        if i > 0 {
            // Not synchronisation: the second wave comes after the first one's refetch is
            // over, as a flood that keeps going does.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        for (response, _) in burst(addr, wave.iter().cloned()).await {
            let response = response.expect("a response");
            assert_token_rejected(&response, "unknown kid");
        }
    }
    let refetches = issuer.jwks_fetches() - before;
    assert!(
        refetches <= 1,
        "{refetches} JWKS fetches for 200 unknown-kid tokens in two waves 1 s apart"
    );
    assert_eq!(upstream.calls(), 0);
    // The agent still serves tokens signed with the key it has.
    assert_credentials(
        &agent.fetch_credentials(&pod.token().sign(&keys.rsa)).await,
        &only_issued(&upstream),
    );
}

#[tokio::test]
async fn jwks_file_is_reread_on_change() {
    let keys = TestKeys::shared();
    let upstream = FakeEksAuth::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    write_jwks(&path, &[&keys.rsa]).unwrap();
    let agent = Agent::builder(upstream.url())
        .arg("--jwks-file")
        .arg(&path)
        .start()
        .await;
    let token = pod().token().sign(&keys.ec);
    assert_token_rejected(
        &agent.fetch_credentials(&token).await,
        "key not in the file yet",
    );
    write_jwks(&path, &[&keys.rsa, &keys.ec]).unwrap();
    let response = accepted_eventually(&agent, &token).await;
    assert_credentials(&response, &only_issued(&upstream));
}

/// An address of this machine that is not loopback: the source the kernel would use towards
/// a private network (a UDP "connect" sends nothing). Traffic to it stays on this machine.
fn own_non_loopback_ip() -> std::net::IpAddr {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp socket");
    socket
        .connect("10.255.255.1:9")
        .expect("a route to a private network");
    let ip = socket.local_addr().expect("local address").ip();
    assert!(!ip.is_loopback(), "{ip}");
    ip
}

/// Keys decide every pod's identity, so they come only over https or from this machine:
/// plain http beyond loopback is refused as a flag (exit 64, naming it) and as a discovery
/// document's `jwks_uri` (keys never load; no token is accepted; nothing goes upstream).
#[tokio::test]
async fn keys_come_only_over_https_or_from_loopback() {
    let own = own_non_loopback_ip();
    let upstream = FakeEksAuth::start().await;
    for (args, flag) in [
        (
            vec![
                "--jwks-url".to_owned(),
                format!("http://{own}:1/jwks"),
                "--issuer".to_owned(),
                DEFAULT_ISSUER.to_owned(),
            ],
            "--jwks-url",
        ),
        (
            vec!["--issuer".to_owned(), format!("http://{own}:1")],
            "--issuer",
        ),
    ] {
        let exited = Agent::builder(upstream.url())
            .args(&args)
            .run_to_exit(Duration::from_secs(10))
            .await;
        assert_eq!(exited.code, Some(64), "{args:?}: {exited:?}");
        let lines = exited.stderr_lines();
        assert!(
            lines.len() == 1 && lines[0].contains(flag) && lines[0].contains("http"),
            "{args:?}: {lines:?}"
        );
    }

    let keys = TestKeys::shared();
    let issuer = FakeJwks::start(jwks(&[&keys.rsa])).await;
    issuer.set_jwks_uri(format!("http://{own}:1/jwks"));
    let agent = Agent::builder(upstream.url())
        .args(["--issuer", &issuer.issuer()])
        .wait_ready(false)
        .start()
        .await;
    wait_until(
        "the log line refusing the insecure jwks_uri (\"plain http beyond loopback\")",
        Duration::from_secs(10),
        || agent.logs_text().contains("plain http beyond loopback"),
    )
    .await;
    assert_eq!(agent.probe("/readyz").await.status, 503);
    let token = pod().token().issuer(issuer.issuer()).sign(&keys.rsa);
    let response = agent.fetch_credentials(&token).await;
    assert_eq!(response.status, 503, "{response:?}");
    assert_eq!(upstream.calls(), 0);
}

#[tokio::test]
async fn the_key_set_age_is_exported() {
    let bed = TestBed::start().await;
    let text = bed.agent.metrics_text().await;
    let age = proto_tests::metrics::value(&text, "pod_identity_agent_key_set_age_seconds")
        .expect("exported");
    assert!((0.0..60.0).contains(&age), "{age}\n{text}");
    assert_eq!(
        proto_tests::metrics::value(&text, "pod_identity_agent_insecure_key_source"),
        Some(0.0)
    );
}

/// A token names the node its pod runs on (Kubernetes 1.30+): presented to another node's
/// agent, it was copied out of its pod, and is refused with no upstream call. Tokens without
/// the claim (older clusters) pass unless `--require-node-claim`.
#[tokio::test]
async fn tokens_bound_to_another_node_are_refused() {
    let bed = TestBed::with_args(["--node-name", "node-a"]).await;
    let pod = pod();
    let here = bed
        .agent
        .fetch_credentials(&pod.token().node("node-a").sign(&bed.keys.rsa))
        .await;
    assert_eq!(here.status, 200, "{here:?}");
    let calls = bed.upstream.calls();
    let elsewhere = bed
        .agent
        .fetch_credentials(&pod.token().node("node-b").sign(&bed.keys.rsa))
        .await;
    assert_eq!(elsewhere.status, 403, "{elsewhere:?}");
    assert_eq!(elsewhere.json_str("code").as_deref(), Some("WrongNode"));
    assert_eq!(bed.upstream.calls(), calls, "no upstream call");
    let unbound = bed
        .agent
        .fetch_credentials(&pod.token().sign(&bed.keys.rsa))
        .await;
    assert_eq!(
        unbound.status, 200,
        "no node claim, not required: {unbound:?}"
    );
    let text = bed.agent.metrics_text().await;
    assert_eq!(
        proto_tests::metrics::value(
            &text,
            "pod_identity_agent_token_rejections_total{reason=\"WrongNode\"}"
        ),
        Some(1.0),
        "{text}"
    );

    let strict = TestBed::with_args(["--node-name", "node-a", "--require-node-claim"]).await;
    let unbound = strict
        .agent
        .fetch_credentials(&pod.token().sign(&strict.keys.rsa))
        .await;
    assert_eq!(unbound.status, 403, "{unbound:?}");
    assert_eq!(
        unbound.json_str("code").as_deref(),
        Some("NodeClaimMissing")
    );
    assert_eq!(strict.upstream.calls(), 0);
}
