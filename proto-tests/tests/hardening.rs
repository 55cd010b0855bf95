//! What an attacker who controls a dependency (the upstream's answers, the Kubernetes API's),
//! or a few pods, could still do, each as a black-box check that the agent no longer lets it.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use proto_tests::http::{connect_from, read_response, send_bytes, send_from, RawRequest};
use proto_tests::{Fault, Pod, TestBed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Bound of every wait in this file.
const WAIT: Duration = Duration::from_secs(20);

/// The contract's margin: credentials this close to expiry are never handed out.
const MIN_SERVABLE: Duration = Duration::from_secs(15);

/// Short credentials (20 s, where half the lifetime is inside the margin) and then a failing
/// upstream: the cached key is served only
/// while more than 15 s are left, never inside the margin, whatever the lifetime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_credentials_are_never_served_inside_the_15s_margin() {
    for lifetime in [Duration::from_secs(20)] {
        let bed = TestBed::start().await;
        bed.upstream.set_credential_lifetime(lifetime);
        let pod = Pod::new("team-a", "app", "short-lived");
        let fetched = Instant::now();
        let first = bed.fetch_as(&pod).await;
        assert_eq!(first.status, 200, "{first:?}");
        let key = first.json_str("AccessKeyId");
        bed.upstream.set_fault(Fault::internal());
        // Ask once a second until the answer is no longer that key; note how much of the
        // credentials' life was left at the last time it was.
        let mut served_with_left = None;
        while fetched.elapsed() < lifetime {
            let response = bed.fetch_as(&pod).await;
            if response.status == 200 && response.json_str("AccessKeyId") == key {
                served_with_left = Some(lifetime.saturating_sub(fetched.elapsed()));
            } else {
                assert!(response.status >= 500, "{response:?}");
            }
            // Pacing: the credentials age in real time, as a pod's would.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let left = served_with_left.expect("the key was served at least once");
        assert!(
            // The upstream gives expiry in whole seconds: up to one second either way.
            left > MIN_SERVABLE - Duration::from_secs(1),
            "{lifetime:?} credentials were served with only {left:?} left"
        );
    }
}

/// The listener's limit and each source's, so that eight sources fill it.
const SLOTS: usize = 64;
const PER_SOURCE: usize = 8;

fn source(i: u8) -> IpAddr {
    IpAddr::from([127, 2, 0, i])
}

/// Connections from sources 1 to 8, each having sent `first` (and read its answer if
/// `answered`), held open.
async fn fill_from_eight_sources(addr: SocketAddr, first: &[u8], answered: bool) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for i in 1..=8 {
        for _ in 0..PER_SOURCE {
            let mut stream = connect_from(source(i), addr).await.unwrap();
            stream.write_all(first).await.unwrap();
            if answered {
                let deadline = tokio::time::Instant::now() + WAIT;
                let response = read_response(&mut stream, false, deadline).await.unwrap();
                assert_eq!(response.status, 400, "{response:?}");
            }
            held.push(stream);
        }
    }
    held
}

/// Eight sources (8 pods, or one hostNetwork pod with 8 addresses) hold every slot of the
/// listener, with idle keep-alive connections or with headers they never finish: a ninth
/// source is still served, because under pressure the agent closes the idle connection of
/// the source holding the most, instead of refusing the newcomer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_few_sources_cannot_lock_out_another() {
    let bed = TestBed::builder()
        .args(["--max-connections", &SLOTS.to_string()])
        .args(["--max-connections-per-source", &PER_SOURCE.to_string()])
        .start()
        .await;
    let addr = bed.agent.credentials_addr();
    let host = bed.agent.credentials_host();
    let request = RawRequest::get("/v1/credentials")
        .header("Host", &host)
        .header("Connection", "close")
        .header(
            "Authorization",
            bed.token(&Pod::new("team-a", "app", "ninth")),
        );
    // One bare request each (no token: 400), then idle keep-alive.
    let bare = format!("GET /v1/credentials HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let idle = fill_from_eight_sources(addr, bare.as_bytes(), true).await;
    bed.agent
        .wait_for_metric(
            "pod_identity_agent_open_connections",
            |n| n >= SLOTS as f64,
            WAIT,
        )
        .await;
    for round in 0..3 {
        let started = Instant::now();
        let response = send_from(source(9), addr, &request).await.unwrap();
        assert_eq!(response.status, 200, "round {round}: {response:?}");
        eprintln!(
            "{SLOTS} idle connections from 8 sources: a ninth source answered in {:?}",
            started.elapsed()
        );
    }
    drop(idle);
    bed.agent
        .wait_for_metric("pod_identity_agent_open_connections", |n| n == 0.0, WAIT)
        .await;
    // Headers never finished.
    let unfinished =
        fill_from_eight_sources(addr, b"GET /v1/credentials HTTP/1.1\r\nHost:", false).await;
    bed.agent
        .wait_for_metric(
            "pod_identity_agent_open_connections",
            |n| n >= SLOTS as f64,
            WAIT,
        )
        .await;
    let response = send_from(source(9), addr, &request).await.unwrap();
    assert_eq!(
        response.status, 200,
        "behind unfinished headers: {response:?}"
    );
    let reclaimed = bed
        .agent
        .wait_for_metric(
            "pod_identity_agent_connections_reclaimed_total",
            |n| n >= 2.0,
            WAIT,
        )
        .await;
    eprintln!("{reclaimed} connections reclaimed");
    drop(unfinished);
}

/// A connection with a request in flight is never closed for a newcomer: with every slot
/// answering a request, the newcomer is refused (503 `TooManyConnections`) and every request
/// in flight is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_with_a_request_in_flight_are_kept() {
    let bed = TestBed::builder()
        .args(["--max-connections", &SLOTS.to_string()])
        .args(["--max-connections-per-source", &PER_SOURCE.to_string()])
        .start()
        .await;
    bed.upstream.set_latency(Duration::from_millis(1500));
    let addr = bed.agent.credentials_addr();
    let host = bed.agent.credentials_host();
    let token = bed.token(&Pod::new("team-a", "app", "in-flight"));
    let ask = format!(
        "GET /v1/credentials HTTP/1.1\r\nHost: {host}\r\nAuthorization: {token}\r\nConnection: close\r\n\r\n"
    );
    let mut in_flight = fill_from_eight_sources(addr, ask.as_bytes(), false).await;
    // Every request has joined the one upstream call (the first made it).
    bed.agent
        .wait_for_metric(
            "pod_identity_agent_cache_coalesced_total",
            |n| n >= (SLOTS - 1) as f64,
            WAIT,
        )
        .await;
    let request = RawRequest::get("/v1/credentials")
        .header("Host", &host)
        .header("Connection", "close")
        .header("Authorization", &token);
    let newcomer = send_from(source(9), addr, &request).await.unwrap();
    assert_eq!(newcomer.status, 503, "{newcomer:?}");
    assert_eq!(
        newcomer.json_str("code").as_deref(),
        Some("TooManyConnections")
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    for stream in &mut in_flight {
        let response = read_response(stream, false, deadline).await.unwrap();
        assert_eq!(response.status, 200, "{response:?}");
    }
}

/// The route is exact: a fragment in the target (which the HTTP parser drops) is refused,
/// alone or between good requests on one connection, never served as `/v1/credentials`.
#[tokio::test]
async fn a_fragment_in_the_target_is_refused() {
    let bed = TestBed::start().await;
    let addr = bed.agent.credentials_addr();
    let host = bed.agent.credentials_host();
    let token = bed.token(&Pod::new("team-a", "app", "fragments"));
    let ask = |target: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {token}\r\n\r\n")
    };
    for target in [
        "/v1/credentials#x",
        "/v1/credentials?a=b#",
        "/v1/credentials#/../v1/credentials",
    ] {
        let response = send_bytes(addr, ask(target).as_bytes(), false, WAIT)
            .await
            .unwrap();
        assert_eq!(response.status, 400, "{target}: {response:?}");
        assert_eq!(
            response.json_str("code").as_deref(),
            Some("BadRequestTarget"),
            "{target}"
        );
    }
    // Pipelined on one connection: each answer is for its own request line.
    let mut stream = connect_from("127.0.0.1".parse().unwrap(), addr)
        .await
        .unwrap();
    let last = format!(
        "GET /v1/credentials HTTP/1.1\r\nHost: {host}\r\nAuthorization: {token}\r\nConnection: close\r\n\r\n"
    );
    let pipelined = [ask("/v1/credentials"), ask("/v1/credentials#x"), last].concat();
    stream.write_all(pipelined.as_bytes()).await.unwrap();
    let mut answers = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answers))
        .await
        .expect("answered and closed in time")
        .unwrap();
    let answers = String::from_utf8_lossy(&answers);
    let got: Vec<&str> = answers
        .match_indices("HTTP/1.1 ")
        .map(|(at, _)| &answers[at + 9..at + 12])
        .collect();
    assert_eq!(got, ["200", "400", "200"], "{answers}");
}

/// An HTTP/2 client with prior knowledge is told, in HTTP/2, to use HTTP/1.1: a SETTINGS
/// frame and a GOAWAY with `HTTP_1_1_REQUIRED` (0xd), then the close.
#[tokio::test]
async fn an_http2_preface_gets_a_goaway_saying_http11_is_required() {
    let bed = TestBed::start().await;
    let mut stream = TcpStream::connect(bed.agent.credentials_addr())
        .await
        .unwrap();
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .expect("closed in time")
        .unwrap();
    // Frame header: 24-bit length, type, flags, 31-bit stream id.
    let frame = |at: usize| {
        (
            answer.get(at + 3).copied(),
            answer.get(at..at + 3).map(|l| l.to_vec()),
        )
    };
    assert_eq!(
        frame(0),
        (Some(0x4), Some(vec![0, 0, 0])),
        "SETTINGS first: {answer:?}"
    );
    assert_eq!(
        frame(9),
        (Some(0x7), Some(vec![0, 0, 8])),
        "then GOAWAY: {answer:?}"
    );
    assert_eq!(
        &answer[22..26],
        &[0, 0, 0, 0xd],
        "HTTP_1_1_REQUIRED: {answer:?}"
    );
    // The agent still serves HTTP/1.1.
    let response = bed.fetch_as(&Pod::new("team-a", "app", "after-h2")).await;
    assert_eq!(response.status, 200, "{response:?}");
}

/// Too many header fields, each tiny (about 3 KiB in all, under the size limit), get 431.
#[tokio::test]
async fn too_many_header_fields_get_431() {
    let bed = TestBed::start().await;
    let host = bed.agent.credentials_host();
    let mut request = format!("GET /v1/credentials HTTP/1.1\r\nHost: {host}\r\n");
    for i in 0..200 {
        request.push_str(&format!("x-{i}: y\r\n"));
    }
    request.push_str("\r\n");
    let response = send_bytes(
        bed.agent.credentials_addr(),
        request.as_bytes(),
        false,
        WAIT,
    )
    .await
    .unwrap();
    assert_eq!(response.status, 431, "{response:?}");
}
