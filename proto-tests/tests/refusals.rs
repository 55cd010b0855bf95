//! A connection over its source's cap is refused with a 503 the client can read, `Retry-After`
//! included, however many refused connections are still open: a refused client is told to
//! come back, never cut off with a bare close or a reset.

use std::net::IpAddr;

use proto_tests::http::{connect_from, send_from, RawRequest};
use proto_tests::{Pod, TestBed};

/// Refused connections a client leaves open each round, more than the agent's refusal tasks
/// (64), so that every round's request comes while all of them are busy.
const HELD_PER_ROUND: usize = 80;
const ROUNDS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refused_connection_gets_its_503_while_refusals_pile_up() {
    let bed = TestBed::with_args(["--max-connections-per-source", "4"]).await;
    let addr = bed.agent.credentials_addr();
    let source: IpAddr = "127.0.0.7".parse().unwrap();
    let request = RawRequest::get("/v1/credentials")
        .header("Host", bed.agent.credentials_host())
        .header(
            "Authorization",
            bed.token(&Pod::new("team-a", "app", "app-0")),
        );
    // The source's own slots, held open and idle.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_from(source, addr).await.unwrap());
    }
    for round in 0..ROUNDS {
        // Refused connections that never read their 503 nor close.
        for _ in 0..HELD_PER_ROUND {
            held.push(connect_from(source, addr).await.unwrap());
        }
        let response = send_from(source, addr, &request).await.unwrap_or_else(|e| {
            panic!(
                "round {round}: a refused connection got no answer: {e}\n{}",
                bed.agent.logs_text()
            )
        });
        assert_eq!(response.status, 503, "round {round}: {response:?}");
        assert_eq!(
            response.json_str("code").as_deref(),
            Some("TooManyConnections"),
            "{response:?}"
        );
        assert_eq!(response.header("retry-after"), Some("1"), "{response:?}");
    }
    // Another source is served throughout.
    let other: IpAddr = "127.0.0.8".parse().unwrap();
    let response = send_from(other, addr, &request).await.unwrap();
    assert_eq!(response.status, 200, "{response:?}");
    drop(held);
}
