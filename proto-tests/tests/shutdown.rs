//! SIGTERM: stop accepting, finish what is in flight, exit 0 within 10 s.

use std::time::Duration;

use proto_tests::agent::{send_to, CREDENTIALS_PATH};
use proto_tests::assertions::{assert_credentials, only_issued};
use proto_tests::http::RawResponse;
use proto_tests::{Pod, TestBed};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

const EXIT_DEADLINE: Duration = Duration::from_secs(10);

/// The agent exits 0 within [`EXIT_DEADLINE`].
async fn assert_exits_zero(bed: &mut TestBed) {
    let status = bed.agent.wait_exit(EXIT_DEADLINE).await;
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "expected exit 0 within {EXIT_DEADLINE:?}, got {status:?}\n{}",
        bed.agent.logs_text()
    );
}

/// An agent whose upstream answers after 1 s (shorter than the agent's upstream deadline, long
/// enough to drain), with one request waiting on it.
async fn a_request_in_flight() -> (TestBed, JoinHandle<std::io::Result<RawResponse>>) {
    let bed = TestBed::start().await;
    bed.upstream.set_latency(Duration::from_secs(1));
    let addr = bed.agent.credentials_addr();
    let token = bed.token(&Pod::new("team-a", "app", "app-0"));
    let in_flight = tokio::spawn(async move {
        send_to(addr, "GET", CREDENTIALS_PATH, &[("Authorization", &token)]).await
    });
    assert!(
        bed.upstream.wait_for_calls(1, Duration::from_secs(5)).await,
        "request never reached EKS Auth\n{}",
        bed.agent.logs_text()
    );
    (bed, in_flight)
}

#[tokio::test]
async fn sigterm_finishes_the_in_flight_request_and_exits_zero() {
    let (mut bed, in_flight) = a_request_in_flight().await;
    bed.agent.sigterm();
    let response = in_flight
        .await
        .expect("request task")
        .unwrap_or_else(|e| panic!("in-flight request failed: {e}\n{}", bed.agent.logs_text()));
    assert_credentials(&response, &only_issued(&bed.upstream));
    assert_exits_zero(&mut bed).await;
}

#[tokio::test]
async fn sigterm_stops_accepting_while_draining() {
    let (mut bed, in_flight) = a_request_in_flight().await;
    let addr = bed.agent.credentials_addr();
    bed.agent.sigterm();
    // Bounded by the drain itself: the refusal must come while the request
    // is still in flight, i.e. before the process simply went away.
    let mut refused_while_draining = false;
    for _ in 0..200 {
        if in_flight.is_finished() {
            break;
        }
        match TcpStream::connect(addr).await {
            Err(_) => {
                refused_while_draining = !in_flight.is_finished();
                break;
            }
            Ok(stream) => drop(stream),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        refused_while_draining,
        "new connections were still accepted while the in-flight request drained"
    );
    let response = in_flight.await.expect("task").expect("in-flight request");
    assert_eq!(response.status, 200, "{response:?}");
    assert_exits_zero(&mut bed).await;
}

#[tokio::test]
async fn sigterm_when_idle_exits_zero() {
    let mut bed = TestBed::start().await;
    bed.agent.sigterm();
    assert_exits_zero(&mut bed).await;
}
