//! What the agent takes from the Kubernetes API server, when the server (or whatever sits
//! between) is broken or hostile: answers that never end, a pod that does not parse, and a
//! validly signed token that pairs one pod's UID with another identity. An attesting agent
//! (`--caller-attestation pod`) against the fake API server; pod IPs are source addresses in
//! 127.0.0.0/8, as in `attestation.rs`.

use std::net::IpAddr;
use std::time::Duration;

use proto_tests::fakes::kube_api::RequestKind;
use proto_tests::http::RawResponse;
use proto_tests::{metrics, Agent, FakeKubeApi, GetAnswer, KubePod, Pod, TestBed};
use serde_json::json;
use tokio::time::Instant;

const NODE: &str = "node-a";
/// Bound of every wait in this file.
const WAIT: Duration = Duration::from_secs(20);
/// The agent's bound on one object from the API server: a watch event line or a GET body
/// (`agent/src/kube_api.rs::MAX_OBJECT_BYTES`).
const OBJECT_BOUND_MIB: f64 = 4.0;
/// How much the agent's resident memory may grow while it reads a hostile answer: the
/// buffer filled up to the bound, grown by doubling to twice it, and slack for the
/// allocator and the connection's own buffers.
const GROWTH_ALLOWED_MIB: f64 = 2.0 * OBJECT_BOUND_MIB + 16.0;
/// What the hostile watch event sends: many times the bound, so an agent that buffers it
/// whole shows it, yet little enough to stream through TLS on loopback in seconds.
const HOSTILE_EVENT_BYTES: usize = 64 << 20;
/// A log line longer than this is a flood of its own (`agent/src/logging.rs::MAX_LINE_BYTES`).
const MAX_LOG_LINE: usize = 4096;

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

async fn assert_served(bed: &TestBed, source: IpAddr, token: &str) {
    let response = bed.agent.fetch_credentials_from(source, token).await;
    assert_eq!(response.status, 200, "from {source}: {response:?}");
}

fn assert_refused(response: &RawResponse, status: u16, code: &str) {
    assert_eq!(response.status, status, "{response:?}");
    assert_eq!(
        response.json_str("code").as_deref(),
        Some(code),
        "{response:?}"
    );
}

async fn metric(bed: &TestBed, series: &str) -> f64 {
    metrics::value(&bed.agent.metrics_text().await, series).unwrap_or(0.0)
}

/// The agent's resident memory, from `/proc/<pid>/status`.
struct Memory {
    pid: u32,
}

impl Memory {
    fn of(agent: &Agent) -> Memory {
        Memory { pid: agent.pid() }
    }

    fn field_mib(&self, field: &str) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .expect("read the agent's /proc status");
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in {status}"));
        kib / 1024.0
    }

    fn rss_mib(&self) -> f64 {
        self.field_mib("VmRSS:")
    }

    /// The peak since [`reset_peak`](Self::reset_peak).
    fn peak_mib(&self) -> f64 {
        self.field_mib("VmHWM:")
    }

    /// Start the peak (`VmHWM`) again from the current RSS (`clear_refs`, Linux 4.0+), so
    /// what the agent did at start does not count.
    fn reset_peak(&self) {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid), "5")
            .expect("reset the agent's peak RSS");
    }
}

/// The longest line the agent has logged, and its start.
fn longest_log_line(agent: &Agent) -> (usize, String) {
    agent
        .logs()
        .into_iter()
        .map(|l| (l.len(), l.chars().take(300).collect::<String>()))
        .max_by_key(|(n, _)| *n)
        .unwrap_or_default()
}

/// A watch event that never ends its line: the agent drops the stream at its bound (and
/// counts it) instead of buffering it, keeps serving the pods it knew, and watches again, so
/// a pod added afterwards arrives by the watch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unterminated_watch_event_is_dropped_and_memory_stays_bounded() {
    let api = FakeKubeApi::start().await;
    let app = Pod::new("team-a", "app", "app-0");
    let web = Pod::new("team-a", "web", "web-0");
    api.add_pod(KubePod::of(&app, NODE, ip(10)));
    api.add_pod(KubePod::of(&web, NODE, ip(11)));
    let bed = TestBed::attesting(&api, NODE).await;
    assert_served(&bed, ip(10), &bed.token(&app)).await;
    assert!(
        api.wait_for_open_watches(1, WAIT).await,
        "the agent watches"
    );
    let watches = api.watches();

    let memory = Memory::of(&bed.agent);
    let before = memory.rss_mib();
    memory.reset_peak();
    api.send_unterminated_watch_event(HOSTILE_EVENT_BYTES);
    assert!(
        api.wait_for_requests(RequestKind::Watch, watches + 1, WAIT)
            .await,
        "the agent watches again: {:?}",
        api.request_lines()
    );
    let peak = memory.peak_mib();
    eprintln!(
        "an unterminated watch event of {} MiB: agent RSS {before:.1} MiB before, peak {peak:.1} MiB, {:.1} MiB after",
        HOSTILE_EVENT_BYTES >> 20,
        memory.rss_mib()
    );
    assert!(
        peak - before < GROWTH_ALLOWED_MIB,
        "RSS grew from {before:.1} to {peak:.1} MiB reading one watch event"
    );
    assert!(
        metric(
            &bed,
            "pod_identity_agent_kubernetes_oversized_answers_total{kind=\"watch\"}"
        )
        .await
            >= 1.0
    );

    // The pods it knew are served, one of them for the first time (no cache entry).
    assert_served(&bed, ip(11), &bed.token(&web)).await;
    // It recovered: a pod added now arrives by the watch, not by a lookup.
    let new = Pod::new("team-a", "app", "app-new");
    api.add_pod(KubePod::of(&new, NODE, ip(12)));
    bed.agent
        .wait_for_metric("pod_identity_agent_pods_known", |v| v == 3.0, WAIT)
        .await;
    assert_served(&bed, ip(12), &bed.token(&new)).await;
    assert_eq!(api.gets(), 0, "{:?}", api.request_lines());
}

/// A pod lookup answered with a body that never ends: the lookup fails at the bound, the
/// request gets 503 `PodLookupFailed` within the contract's 5 s (not the deadline's
/// `PodLookupTimeout`), memory stays bounded, and the retry against a sane answer is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_pod_lookup_answer_is_503_within_5s_and_memory_stays_bounded() {
    let api = FakeKubeApi::start().await;
    let bed = TestBed::attesting(&api, NODE).await;
    let new = Pod::new("team-a", "app", "app-new");
    api.add_pod_unannounced(KubePod::of(&new, NODE, ip(30)));
    api.set_get_answer(GetAnswer::Endless);
    let token = bed.token(&new);

    let memory = Memory::of(&bed.agent);
    let before = memory.rss_mib();
    memory.reset_peak();
    let started = Instant::now();
    let response = bed.agent.fetch_credentials_from(ip(30), &token).await;
    let took = started.elapsed();
    let peak = memory.peak_mib();
    eprintln!(
        "an endless pod lookup answer: {} after {took:?}; agent RSS {before:.1} MiB before, peak {peak:.1} MiB",
        response.status
    );
    assert_refused(&response, 503, "PodLookupFailed");
    assert!(took < Duration::from_secs(5), "answered after {took:?}");
    assert!(
        peak - before < GROWTH_ALLOWED_MIB,
        "RSS grew from {before:.1} to {peak:.1} MiB reading one pod"
    );
    assert_eq!(
        metric(
            &bed,
            "pod_identity_agent_kubernetes_oversized_answers_total{kind=\"get\"}"
        )
        .await,
        1.0
    );
    assert_eq!(bed.upstream.calls(), 0);

    api.set_get_answer(GetAnswer::Pod);
    assert_served(&bed, ip(30), &token).await;
}

/// One pod with a field of the wrong type (`"hostNetwork": "yes"`) among good ones, in the
/// list, later in a watch event and in a lookup's answer: the agent becomes ready, serves
/// the good pods, counts the bad one and refuses its token (without a lookup when the list
/// or the watch said so), and logs no line of the list's size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_pod_is_skipped_and_the_others_are_served() {
    let api = FakeKubeApi::start().await;
    let good: Vec<Pod> = (0..40)
        .map(|i| Pod::new("team-a", "app", &format!("app-{i}")))
        .collect();
    for (i, pod) in good.iter().enumerate() {
        api.add_pod(KubePod::of(pod, NODE, ip(10 + i as u8)));
    }
    let broken = Pod::new("team-b", "batch", "broken-0");
    api.add_pod(KubePod::of(&broken, NODE, ip(60)).raw_field("/spec/hostNetwork", json!("yes")));
    let bed = TestBed::builder()
        .args(["--node-name", NODE, "--caller-attestation", "pod"])
        .env("KUBECONFIG", api.kubeconfig())
        .wait_ready(false)
        .start()
        .await;
    let deadline = Instant::now() + WAIT;
    loop {
        let ready = bed.agent.probe("/readyz").await;
        if ready.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never ready: {ready:?}; longest log line {:?}",
            longest_log_line(&bed.agent)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_served(&bed, ip(10), &bed.token(&good[0])).await;
    assert_served(&bed, ip(49), &bed.token(&good[39])).await;
    assert_refused(
        &bed.agent
            .fetch_credentials_from(ip(60), &bed.token(&broken))
            .await,
        403,
        "PodMalformed",
    );
    assert_eq!(
        metric(
            &bed,
            "pod_identity_agent_malformed_pods_total{source=\"list\"}"
        )
        .await,
        1.0
    );
    assert_eq!(api.gets(), 0, "remembered as malformed: no lookup");
    assert_eq!(bed.upstream.calls(), 2);

    // A watch event that breaks a known pod: refused until a good version arrives.
    let changed = &good[1];
    let token = bed.token(changed);
    assert_served(&bed, ip(11), &token).await;
    api.update_pod(KubePod::of(changed, NODE, ip(11)).raw_field("/spec/hostNetwork", json!(1)));
    bed.agent
        .wait_for_metric(
            "pod_identity_agent_malformed_pods_total{source=\"watch\"}",
            |v| v == 1.0,
            WAIT,
        )
        .await;
    assert_refused(
        &bed.agent.fetch_credentials_from(ip(11), &token).await,
        403,
        "PodMalformed",
    );
    api.update_pod(KubePod::of(changed, NODE, ip(11)));
    bed.agent
        .wait_for_metric("pod_identity_agent_pods_known", |v| v == 40.0, WAIT)
        .await;
    assert_served(&bed, ip(11), &token).await;

    // A pod the watch never delivered, read by a lookup that does not parse: refused, and
    // remembered, so its next request costs no read.
    let late = Pod::new("team-b", "batch", "late-0");
    api.add_pod_unannounced(
        KubePod::of(&late, NODE, ip(61)).raw_field("/status/podIPs", json!("x")),
    );
    for _ in 0..2 {
        assert_refused(
            &bed.agent
                .fetch_credentials_from(ip(61), &bed.token(&late))
                .await,
            403,
            "PodMalformed",
        );
    }
    assert_eq!(api.gets(), 1);
    assert_eq!(
        metric(
            &bed,
            "pod_identity_agent_pod_lookups_total{result=\"malformed\"}"
        )
        .await,
        1.0
    );
    assert_eq!(bed.upstream.calls(), 3);

    let (longest, start) = longest_log_line(&bed.agent);
    assert!(
        longest <= MAX_LOG_LINE,
        "a log line of {longest} bytes: {start}"
    );
}

/// A pod lookup answered with a large body that is not JSON: the lookup fails (503), and
/// the answer reaches the log only shortened, although the Kubernetes client logs the whole
/// body it could not parse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_answer_that_is_not_json_reaches_the_log_shortened() {
    let api = FakeKubeApi::start().await;
    let bed = TestBed::attesting(&api, NODE).await;
    let new = Pod::new("team-a", "app", "app-new");
    api.add_pod_unannounced(KubePod::of(&new, NODE, ip(30)));
    api.set_get_answer(GetAnswer::NotJson(256 * 1024));
    let response = bed
        .agent
        .fetch_credentials_from(ip(30), &bed.token(&new))
        .await;
    assert_refused(&response, 503, "PodLookupFailed");
    let deadline = Instant::now() + WAIT;
    while !bed.agent.logs_text().contains("pod lookup failed") {
        assert!(Instant::now() < deadline, "{}", bed.agent.logs_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (longest, start) = longest_log_line(&bed.agent);
    assert!(
        longest <= MAX_LOG_LINE,
        "a log line of {longest} bytes: {start}"
    );
    assert!(
        bed.agent
            .log_records()
            .iter()
            .all(|r| r.is_object() && r.get("level").is_some()),
        "shortened lines are still JSON objects"
    );
    assert!(
        bed.agent.logs_text().contains("this is not JSON"),
        "the start of the answer is still logged"
    );
}

/// A validly signed token that carries pod A's UID with another namespace, service account
/// or pod name, sent from A's IP, is refused: the watched pod's identity must be the token's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_pairing_a_pods_uid_with_another_identity_is_refused() {
    let api = FakeKubeApi::start().await;
    let app = Pod::new("team-a", "app", "app-0");
    api.add_pod(KubePod::of(&app, NODE, ip(10)));
    let bed = TestBed::attesting(&api, NODE).await;
    let forged = [
        Pod {
            namespace: "team-b".into(),
            ..app.clone()
        },
        Pod {
            service_account: "admin".into(),
            ..app.clone()
        },
        Pod {
            name: "app-1".into(),
            ..app.clone()
        },
    ];
    for pod in &forged {
        let response = bed
            .agent
            .fetch_credentials_from(ip(10), &bed.token(pod))
            .await;
        assert_refused(&response, 403, "PodMismatch");
    }
    assert_eq!(bed.upstream.calls(), 0, "no upstream call for a refusal");
    assert_eq!(api.gets(), 0);
    assert_eq!(
        metric(
            &bed,
            "pod_identity_agent_token_rejections_total{reason=\"PodMismatch\"}"
        )
        .await,
        3.0
    );
    assert_served(&bed, ip(10), &bed.token(&app)).await;
    assert_eq!(bed.upstream.calls(), 1);
}
