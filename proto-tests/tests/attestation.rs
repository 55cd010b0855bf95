//! Caller attestation (`--caller-attestation pod`): a token is served only to its own pod, a
//! running pod of this node calling from one of its IPs, as a fake Kubernetes API server
//! (TLS, kubeconfig with a bearer token) reports the node's pods. Pod IPs are simulated with
//! source addresses in 127.0.0.0/8; the host's own address is 127.0.0.1. Every refusal is
//! checked to cost no upstream call.

use std::net::IpAddr;
use std::time::Duration;

use proto_tests::http::RawResponse;
use proto_tests::metrics;
use proto_tests::{AgentBuilder, FakeKubeApi, KubePod, Pod, TestBed};
use tokio::time::Instant;

const NODE: &str = "node-a";
/// Bound of every wait in this file.
const WAIT: Duration = Duration::from_secs(20);

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// The host's own address, as a hostNetwork caller's source.
fn host() -> IpAddr {
    ip(1)
}

/// A credentials request from `source` with `token` is answered 200.
async fn assert_served(bed: &TestBed, source: IpAddr, token: &str) {
    let response = bed.agent.fetch_credentials_from(source, token).await;
    assert_eq!(response.status, 200, "from {source}: {response:?}");
}

/// Wait (at most [`WAIT`]) until the agent's `pod_identity_agent_<gauge>` reads `value`.
async fn wait_until(bed: &TestBed, gauge: &str, value: f64) {
    let series = format!("pod_identity_agent_{gauge}");
    bed.agent
        .wait_for_metric(&series, |v| v == value, WAIT)
        .await;
}

fn assert_refused(response: &RawResponse, status: u16, code: &str) {
    assert_eq!(response.status, status, "{response:?}");
    assert_eq!(
        response.json_str("code").as_deref(),
        Some(code),
        "{response:?}"
    );
}

async fn rejections(bed: &TestBed, code: &str) -> f64 {
    let text = bed.agent.metrics_text().await;
    metrics::value(
        &text,
        &format!("pod_identity_agent_token_rejections_total{{reason=\"{code}\"}}"),
    )
    .unwrap_or(0.0)
}

/// A pod's token is answered from the pod's own IP, and refused from another pod's IP and
/// from the host (which may present only a hostNetwork pod's token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_token_is_served_only_to_that_pod() {
    let api = FakeKubeApi::start().await;
    let app = Pod::new("team-a", "app", "app-0");
    let other = Pod::new("team-b", "web", "web-0");
    api.add_pod(KubePod::of(&app, NODE, ip(10)));
    api.add_pod(KubePod::of(&other, NODE, ip(11)));
    let bed = TestBed::attesting(&api, NODE).await;
    let token = bed.token(&app);

    let own = bed.agent.fetch_credentials_from(ip(10), &token).await;
    assert_eq!(own.status, 200, "{own:?}");
    assert_eq!(bed.upstream.calls(), 1);

    let from_other_pod = bed.agent.fetch_credentials_from(ip(11), &token).await;
    assert_refused(&from_other_pod, 403, "CallerNotPod");
    let from_host = bed.agent.fetch_credentials_from(host(), &token).await;
    assert_refused(&from_host, 403, "HostNetworkOnly");
    let from_nowhere = bed.agent.fetch_credentials_from(ip(99), &token).await;
    assert_refused(&from_nowhere, 403, "CallerNotPod");
    assert_eq!(bed.upstream.calls(), 1, "no upstream call for a refusal");
    assert_eq!(rejections(&bed, "CallerNotPod").await, 2.0);
    assert_eq!(rejections(&bed, "HostNetworkOnly").await, 1.0);

    // The other pod is served from its own address.
    let theirs = bed
        .agent
        .fetch_credentials_from(ip(11), &bed.token(&other))
        .await;
    assert_eq!(theirs.status, 200, "{theirs:?}");
}

/// A hostNetwork pod shares the host's addresses: its token is answered from the host, and
/// refused from a pod IP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_network_pods_token_is_served_to_the_host_only() {
    let api = FakeKubeApi::start().await;
    let daemon = Pod::new("kube-system", "node-daemon", "node-daemon-x");
    api.add_pod(
        KubePod::of(&daemon, NODE, ip(10))
            .host_ip(host())
            .host_network(),
    );
    let bed = TestBed::attesting(&api, NODE).await;
    let token = bed.token(&daemon);
    let from_host = bed.agent.fetch_credentials_from(host(), &token).await;
    assert_eq!(from_host.status, 200, "{from_host:?}");
    let from_pod_ip = bed.agent.fetch_credentials_from(ip(10), &token).await;
    assert_refused(&from_pod_ip, 403, "CallerNotPod");
    assert_eq!(bed.upstream.calls(), 1);
}

/// Tokens of pods on another node: refused by the node claim when the token has one, and by
/// the API server's answer when it has none; one GET at most, however often it is replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_another_node_is_refused() {
    let api = FakeKubeApi::start().await;
    let elsewhere = Pod::new("team-a", "app", "app-on-b");
    api.add_pod(KubePod::of(&elsewhere, "node-b", ip(20)));
    let bed = TestBed::attesting(&api, NODE).await;

    let claimed = elsewhere.token().node("node-b").sign(&bed.keys.rsa);
    assert_refused(
        &bed.agent.fetch_credentials_from(ip(20), &claimed).await,
        403,
        "WrongNode",
    );
    assert_eq!(api.gets(), 0, "the node claim alone decides");

    let unclaimed = bed.token(&elsewhere);
    for _ in 0..5 {
        assert_refused(
            &bed.agent.fetch_credentials_from(ip(20), &unclaimed).await,
            403,
            "UnknownPod",
        );
    }
    assert_eq!(api.gets(), 1, "one read, then remembered");
    assert_eq!(bed.upstream.calls(), 0);
}

/// A pod that asks before the watch has delivered it is read once with a GET, then served
/// from the pod set; a flood of tokens of pods that do not exist is bounded in API reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_added_without_a_watch_event_is_read_once() {
    let api = FakeKubeApi::start().await;
    let bed = TestBed::attesting(&api, NODE).await;
    let new = Pod::new("team-a", "app", "app-new");
    api.add_pod_unannounced(KubePod::of(&new, NODE, ip(30)));
    let token = bed.token(&new);
    for _ in 0..3 {
        let response = bed.agent.fetch_credentials_from(ip(30), &token).await;
        assert_eq!(response.status, 200, "{response:?}");
    }
    assert_eq!(api.gets(), 1);
    assert_eq!(bed.upstream.calls(), 1);
    // Still the caller check: from another address it is refused.
    assert_refused(
        &bed.agent.fetch_credentials_from(ip(31), &token).await,
        403,
        "CallerNotPod",
    );

    // 60 tokens of pods the API server has never heard of, at once.
    let gets_before = api.gets();
    let tokens: Vec<String> = (0..60)
        .map(|i| bed.token(&Pod::new("team-a", "app", &format!("ghost-{i}"))))
        .collect();
    let flood_started = Instant::now();
    let answers = futures_util::future::join_all(
        tokens
            .iter()
            .map(|t| bed.agent.fetch_credentials_from(ip(40), t)),
    )
    .await;
    let flood_took = flood_started.elapsed();
    for a in &answers {
        assert!(
            (a.status == 403 && a.json_str("code").as_deref() == Some("UnknownPod"))
                || (a.status == 503 && a.json_str("code").as_deref() == Some("PodLookupLimited")),
            "{a:?}"
        );
    }
    // The budget: bursts of 20, then 5 a second, over however long the flood took here.
    let reads = api.gets() - gets_before;
    let budget = 20.0 + 5.0 * flood_took.as_secs_f64().ceil();
    assert!(
        reads as f64 <= budget,
        "{reads} API reads for 60 unknown tokens in {flood_took:?}"
    );
    if budget < 60.0 {
        assert!(
            answers.iter().any(|a| a.status == 503),
            "the lookup budget was reached"
        );
    }
    assert_eq!(bed.upstream.calls(), 1);
}

/// A pod deleted while its credentials are cached: its entry is dropped at once (not at the
/// next refresh), its token is refused, and nothing goes upstream for it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_pods_cached_credentials_are_dropped_at_once() {
    let api = FakeKubeApi::start().await;
    let app = Pod::new("team-a", "app", "app-0");
    api.add_pod(KubePod::of(&app, NODE, ip(10)));
    let bed = TestBed::attesting(&api, NODE).await;
    let token = bed.token(&app);
    assert_served(&bed, ip(10), &token).await;
    wait_until(&bed, "cache_entries", 1.0).await;

    api.delete_pod("team-a", "app-0");
    wait_until(&bed, "cache_entries", 0.0).await;
    assert_refused(
        &bed.agent.fetch_credentials_from(ip(10), &token).await,
        403,
        "PodNotRunning",
    );
    assert_eq!(bed.upstream.calls(), 1);
    assert_eq!(api.gets(), 0, "the watch said so; no read needed");

    // A new pod that gets the old pod's IP never receives the old pod's credentials: the
    // token's UID decides.
    let successor = Pod::new("team-a", "app", "app-0");
    api.add_pod(KubePod::of(&successor, NODE, ip(10)));
    assert_refused(
        &bed.agent.fetch_credentials_from(ip(10), &token).await,
        403,
        "PodNotRunning",
    );
    let fresh = bed
        .agent
        .fetch_credentials_from(ip(10), &bed.token(&successor))
        .await;
    assert_eq!(fresh.status, 200, "{fresh:?}");
    assert_eq!(bed.upstream.calls(), 2, "the new pod's own credentials");

    // A pod that terminates (phase Succeeded) is treated the same way.
    let job = Pod::new("team-a", "job", "job-0");
    api.add_pod(KubePod::of(&job, NODE, ip(12)));
    let job_token = bed.token(&job);
    assert_served(&bed, ip(12), &job_token).await;
    api.update_pod(KubePod::of(&job, NODE, ip(12)).phase("Succeeded"));
    bed.agent
        .wait_for_metric(
            "pod_identity_agent_cache_evictions_total{reason=\"pod_gone\"}",
            |v| v == 2.0,
            WAIT,
        )
        .await;
    assert_refused(
        &bed.agent.fetch_credentials_from(ip(12), &job_token).await,
        403,
        "PodNotRunning",
    );
}

/// With the API server down at start, credential requests get 503 with `Retry-After` and
/// `/readyz` says why, until the first list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_down_at_start_means_503_until_the_first_list() {
    let api = FakeKubeApi::start().await;
    let app = Pod::new("team-a", "app", "app-0");
    api.add_pod(KubePod::of(&app, NODE, ip(10)));
    api.set_down(true);
    let bed = TestBed::builder()
        .args(["--node-name", NODE, "--caller-attestation", "pod"])
        .env("KUBECONFIG", api.kubeconfig())
        .wait_ready(false)
        .start()
        .await;
    let token = bed.token(&app);
    // The keys (a file) load within milliseconds; until they do, the answer is 503
    // KeysUnavailable instead. What is tested here is the pod set, so wait for the keys.
    bed.agent
        .wait_for_metric("pod_identity_agent_keys_loaded", |v| v >= 1.0, WAIT)
        .await;
    let early = bed.agent.fetch_credentials_from(ip(10), &token).await;
    assert_refused(&early, 503, "PodsNotSynced");
    assert!(early.header("retry-after").is_some(), "{early:?}");
    let ready = bed.agent.probe("/readyz").await;
    assert_eq!(ready.status, 503);
    assert!(ready.text().contains("pods"), "{ready:?}");
    assert_eq!(bed.upstream.calls(), 0);

    api.set_down(false);
    let deadline = Instant::now() + WAIT;
    while bed.agent.probe("/readyz").await.status != 200 {
        assert!(Instant::now() < deadline, "{}", bed.agent.logs_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let served = bed.agent.fetch_credentials_from(ip(10), &token).await;
    assert_eq!(served.status, 200, "{served:?}");
}

/// An API server that goes down later: the last known pods stay in force (running pods keep
/// getting credentials, cached or fresh), the staleness gauge grows, and it recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_outage_keeps_the_last_known_pods() {
    let api = FakeKubeApi::start().await;
    let app = Pod::new("team-a", "app", "app-0");
    let web = Pod::new("team-a", "web", "web-0");
    api.add_pod(KubePod::of(&app, NODE, ip(10)));
    api.add_pod(KubePod::of(&web, NODE, ip(11)));
    let bed = TestBed::attesting(&api, NODE).await;
    assert_served(&bed, ip(10), &bed.token(&app)).await;
    let staleness = "pod_identity_agent_pod_watch_staleness_seconds";
    bed.agent
        .wait_for_metric(staleness, |v| v < 2.0, WAIT)
        .await;

    api.set_down(true);
    let cached = bed
        .agent
        .fetch_credentials_from(ip(10), &bed.token(&app))
        .await;
    assert_eq!(cached.status, 200, "{cached:?}");
    let fresh = bed
        .agent
        .fetch_credentials_from(ip(11), &bed.token(&web))
        .await;
    assert_eq!(fresh.status, 200, "a known pod's first request: {fresh:?}");
    assert_refused(
        &bed.agent
            .fetch_credentials_from(ip(11), &bed.token(&app))
            .await,
        403,
        "CallerNotPod",
    );
    bed.agent
        .wait_for_metric(staleness, |v| v >= 3.0, WAIT)
        .await;
    assert!(
        metrics::value(
            &bed.agent.metrics_text().await,
            "pod_identity_agent_pod_watch_errors_total"
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    assert_eq!(bed.agent.probe("/readyz").await.status, 200, "still ready");

    api.set_down(false);
    bed.agent
        .wait_for_metric(staleness, |v| v < 2.0, WAIT)
        .await;
    // Changes made after the outage arrive through the resumed watch.
    api.delete_pod("team-a", "web-0");
    wait_until(&bed, "pods_known", 1.0).await;
    assert_refused(
        &bed.agent
            .fetch_credentials_from(ip(11), &bed.token(&web))
            .await,
        403,
        "PodNotRunning",
    );
}

/// A watch that lags behind the API server: a pod created in the lag is read directly and
/// served; once the lagging events arrive nothing changes for it, and a deletion takes
/// effect when its event arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_watch_still_serves_new_pods() {
    let api = FakeKubeApi::start().await;
    let bed = TestBed::attesting(&api, NODE).await;
    api.set_watch_delay(Duration::from_secs(2));
    let app = Pod::new("team-a", "app", "app-0");
    api.add_pod(KubePod::of(&app, NODE, ip(10)));
    let token = bed.token(&app);
    let first = bed.agent.fetch_credentials_from(ip(10), &token).await;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(
        api.gets(),
        1,
        "read directly: the watch had not delivered it"
    );
    wait_until(&bed, "pods_known", 1.0).await;
    // The watch delivers in order, so once a pod added after `app-0` is known, `app-0`'s own
    // lagging event has arrived too.
    let marker = Pod::new("team-a", "marker", "marker-0");
    api.add_pod(KubePod::of(&marker, NODE, ip(20)));
    wait_until(&bed, "pods_known", 2.0).await;
    assert_served(&bed, ip(10), &token).await;
    assert_eq!(api.gets(), 1);

    api.delete_pod("team-a", "app-0");
    wait_until(&bed, "pods_known", 1.0).await;
    assert_refused(
        &bed.agent.fetch_credentials_from(ip(10), &token).await,
        403,
        "PodNotRunning",
    );
    assert_eq!(bed.upstream.calls(), 1);
}

/// What a 100-pod node costs the API server in an hour. The watch is renewed every second
/// (`--pod-watch-timeout 1s`) instead of every 290 s, so 12.4 s of this test stand for an hour
/// of renewals, while every pod keeps asking: one list, one watch per renewal, no single-pod
/// reads. Printed for the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hour_of_a_hundred_pod_node_costs_one_list_and_a_watch_per_renewal() {
    const HOUR_OF_RENEWALS: Duration = Duration::from_millis(3600 * 1000 / 290);
    let api = FakeKubeApi::start().await;
    let pods: Vec<Pod> = (0..100)
        .map(|i| Pod::new("team-a", "app", &format!("app-{i}")))
        .collect();
    for (i, pod) in pods.iter().enumerate() {
        api.add_pod(KubePod::of(pod, NODE, ip(10 + i as u8)));
    }
    let bed = TestBed::builder()
        .args(["--node-name", NODE, "--caller-attestation", "pod"])
        .args(["--pod-watch-timeout", "1s"])
        .env("KUBECONFIG", api.kubeconfig())
        .start()
        .await;
    let tokens: Vec<String> = pods.iter().map(|p| bed.token(p)).collect();
    let started = Instant::now();
    let mut asked = 0;
    // Bounded: at most 1,000 rounds, and the simulated hour.
    for _ in 0..1000 {
        if started.elapsed() >= HOUR_OF_RENEWALS {
            break;
        }
        for (i, token) in tokens.iter().enumerate() {
            let response = bed
                .agent
                .fetch_credentials_from(ip(10 + i as u8), token)
                .await;
            assert_eq!(response.status, 200, "pod {i}: {response:?}");
            asked += 1;
        }
        // Pacing, not synchronisation: every pod asks again 200 ms later.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = bed.agent.metrics_text().await;
    let count = |kind: &str| {
        metrics::value(
            &text,
            &format!("pod_identity_agent_kubernetes_requests_total{{kind=\"{kind}\"}}"),
        )
        .unwrap_or(0.0)
    };
    eprintln!(
        "a simulated hour of a 100-pod node ({asked} credential requests): the API server saw {} pod requests \
         (lists {}, watches {}, gets {}); the agent counted list {} watch {} get {}",
        api.lists() + api.watches() + api.gets(),
        api.lists(),
        api.watches(),
        api.gets(),
        count("list"),
        count("watch"),
        count("get"),
    );
    assert_eq!(api.lists(), 1, "{:?}", api.request_lines());
    assert_eq!(api.gets(), 0);
    assert!(
        (8..=16).contains(&api.watches()),
        "one watch per renewal, about 13: {:?}",
        api.request_lines()
    );
    assert_eq!(count("list"), 1.0);
    assert_eq!(bed.upstream.calls(), 100);
}

/// `--caller-attestation pod` without a node name, or without any API server to reach, is a
/// configuration error naming the flag.
#[tokio::test]
async fn caller_attestation_needs_a_node_name_and_an_api_server() {
    for args in [
        vec!["--caller-attestation", "pod"],
        vec!["--caller-attestation", "pod", "--node-name", NODE],
    ] {
        let exited = AgentBuilder::new("http://127.0.0.1:9")
            .args(args.clone())
            .run_to_exit(WAIT)
            .await;
        assert_eq!(exited.code, Some(64), "{args:?}: {exited:?}");
        assert!(
            exited.stderr.contains("caller-attestation"),
            "{args:?}: {exited:?}"
        );
    }
}
