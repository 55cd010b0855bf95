//! What an upstream that answers badly, or a token signed by the real key with odd claims,
//! can still get out of the agent: a 5xx of the contract's kinds (never 500), a closed set of
//! error codes, and claims read as RFC 7519 writes them.

use std::time::Duration;

use proto_tests::assertions::{assert_failed_in_time, assert_token_rejected};
use proto_tests::keys::unix_now;
use proto_tests::{Agent, Fault, Pod, TestBed, TestKeys};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;

/// An "EKS Auth" on loopback that reads each request and then does `answer` with the
/// connection: it stands for a proxy or a middlebox in the upstream's place.
async fn raw_upstream(answer: &'static [u8]) -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        // Bounded: a test makes a handful of calls (one retry each).
        for _ in 0..64 {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let _ = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
                let _ = stream.write_all(answer).await;
                // Dropping the stream closes it.
            });
        }
    });
    (url, task)
}

/// An upstream that closes without answering, or answers with something that is not an HTTP
/// status line: the pod gets 502, 503 or 504 in time, never 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_breaks_the_protocol_gets_a_gateway_error_not_500() {
    for (what, answer) in [
        ("closed without an answer", &b""[..]),
        ("a malformed status line", &b"HTTP/1.1 abc OK\r\n\r\n"[..]),
        ("not HTTP at all", &b"SSH-2.0-OpenSSH_9.6\r\n"[..]),
    ] {
        let (url, upstream) = raw_upstream(answer).await;
        let dir = tempfile::tempdir().unwrap();
        let jwks = dir.path().join("jwks.json");
        proto_tests::keys::write_jwks(&jwks, &[&TestKeys::shared().rsa]).unwrap();
        let agent = Agent::builder(url)
            .arg("--jwks-file")
            .arg(&jwks)
            .start()
            .await;
        let token = Pod::new("team-a", "app", "app-0")
            .token()
            .sign(&TestKeys::shared().rsa);
        let started = Instant::now();
        let response = agent.fetch_credentials(&token).await;
        assert_failed_in_time(&response, 502..=504, started.elapsed(), what);
        upstream.abort();
    }
}

/// The upstream's error type reaches the pod only when the service's model defines it;
/// anything else (8,000 characters, a right-to-left override, nothing) becomes a generic
/// code, and the log carries the raw value bounded and escaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstreams_error_type_reaches_the_pod_only_from_a_closed_set() {
    let bed = TestBed::start().await;
    let long = "X".repeat(8000);
    let rtl = "Access\u{202e}DeniedException";
    let cases: [(&str, u16, &str); 4] = [
        (&long, 400, "UpstreamRejected"),
        (rtl, 400, "UpstreamRejected"),
        ("", 500, "UpstreamServerError"),
        ("AccessDeniedException", 403, "AccessDeniedException"),
    ];
    for (i, (error_type, status, expected)) in cases.iter().enumerate() {
        bed.upstream
            .set_fault(Fault::error(*status, error_type, "no such thing"));
        let pod = Pod::new("team-a", "app", &format!("codes-{i}"));
        let response = bed.fetch_as(&pod).await;
        assert_eq!(
            response.json_str("code").as_deref(),
            Some(*expected),
            "error type of {} characters: {response:?}",
            error_type.chars().count()
        );
    }
    let logs = bed.agent.logs_text();
    assert!(
        !logs.contains('\u{202e}'),
        "a raw right-to-left override reached the log"
    );
    assert!(
        logs.contains("\\u{202e}"),
        "the escaped value is logged:\n{logs}"
    );
    let longest = logs.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 4096, "a log line of {longest} bytes");
}

/// Claims a lenient reader accepts and RFC 7519 or a kubelet never would, each in a token
/// signed by the real key: `iss` as a list, `iat` in the far future, a lifetime of 200 days.
#[tokio::test]
async fn lenient_claims_are_refused_even_when_signed_by_the_real_key() {
    let bed = TestBed::start().await;
    let keys = TestKeys::shared();
    let pod = Pod::new("team-a", "app", "claims");
    let now = unix_now();
    let with = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut claims = pod.token().claims();
        edit(&mut claims);
        keys.rsa.sign(Some(keys.rsa.kid()), &claims)
    };
    let issuer = proto_tests::keys::DEFAULT_ISSUER;
    for (what, token) in [
        (
            "iss as a list",
            with(&|c| c["iss"] = serde_json::json!([issuer])),
        ),
        (
            "iat in the far future",
            with(&|c| c["iat"] = serde_json::json!(1e15)),
        ),
        (
            "iat a day ahead",
            with(&|c| c["iat"] = serde_json::json!(now + 86_400)),
        ),
        (
            "a lifetime of 200 days",
            with(&|c| c["exp"] = serde_json::json!(now + 200 * 86_400)),
        ),
    ] {
        assert_token_rejected(&bed.agent.fetch_credentials(&token).await, what);
    }
    assert_eq!(
        bed.upstream.calls(),
        0,
        "a refused token never goes upstream"
    );
    // A kubelet's token (24 h) is served.
    let response = bed.fetch_as(&pod).await;
    assert_eq!(response.status, 200, "{response:?}");
}
