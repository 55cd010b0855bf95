//! `--startup-taint`: the node's startup taint stays while the agent cannot serve, and goes,
//! alone, once it can; against the fake API server, which kubectl also drives
//! (tests/fakes_kube.rs).

use std::time::Duration;

use proto_tests::agent::AgentBuilder;
use proto_tests::assertions::wait_until;
use proto_tests::fakes::kube_api::{KubeNode, KubeTaint};
use proto_tests::keys::write_jwks;
use proto_tests::{FakeEksAuth, FakeKubeApi, KubePod, Pod, TestBed, TestKeys};
use tokio::time::Instant;

const NODE: &str = "node-a";
const KEY: &str = "pod-identity-agent/not-ready";
/// Bound of every wait in this file.
const WAIT: Duration = Duration::from_secs(20);
/// How long a test watches for a write that must not come.
const QUIET: Duration = Duration::from_secs(2);

fn keys_of(api: &FakeKubeApi) -> Vec<String> {
    api.node_taints(NODE).into_iter().map(|t| t.key).collect()
}

async fn removal_seconds(agent: &proto_tests::Agent) -> f64 {
    agent
        .wait_for_metric(
            "pod_identity_agent_startup_taint_removal_seconds",
            |v| v.is_finite(),
            WAIT,
        )
        .await
}

async fn attempts(agent: &proto_tests::Agent, result: &str) -> f64 {
    let text = agent.metrics_text().await;
    proto_tests::metrics::value(
        &text,
        &format!("pod_identity_agent_startup_taint_attempts_total{{result=\"{result}\"}}"),
    )
    .unwrap_or(0.0)
}

/// Keys missing at start (the JWKS file is written later) and pods not listed yet (the API
/// server is down at start): the taint stays, and so do the node's other taints, one of them
/// added while the agent starts; once both are in, the startup taint goes within seconds,
/// alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_taint_stays_until_the_agent_is_ready_then_goes_alone() {
    let api = FakeKubeApi::start().await;
    api.add_node(
        KubeNode::new(NODE)
            .taint(KubeTaint::no_schedule(KEY))
            .taint(KubeTaint::no_schedule("dedicated").value("gpu"))
            .label("team", "a"),
    );
    let pod = Pod::new("team-a", "app", "app-0");
    api.add_pod(KubePod::of(&pod, NODE, "127.0.0.10".parse().unwrap()));
    api.set_down(true);
    let upstream = FakeEksAuth::start().await;
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    let started = Instant::now();
    let agent = AgentBuilder::new(upstream.url())
        .args(["--jwks-file", jwks.to_str().unwrap()])
        .args(["--node-name", NODE, "--caller-attestation", "pod"])
        .args(["--startup-taint", KEY])
        .env("KUBECONFIG", api.kubeconfig())
        .wait_ready(false)
        .start()
        .await;
    // Someone else taints the node while the agent starts.
    api.add_node_taint(NODE, KubeTaint::new("maintenance", "NoExecute"));
    tokio::time::sleep(QUIET).await;
    assert_eq!(agent.probe("/readyz").await.status, 503);
    assert!(
        keys_of(&api).contains(&KEY.to_owned()),
        "removed before ready"
    );
    assert_eq!(api.node_patches(), 0);

    // The API server comes back: pods listed, but keys still missing.
    api.set_down(false);
    agent
        .wait_for_metric("pod_identity_agent_pod_watch_synced", |v| v == 1.0, WAIT)
        .await;
    tokio::time::sleep(QUIET).await;
    assert!(
        keys_of(&api).contains(&KEY.to_owned()),
        "removed without keys"
    );
    assert_eq!(api.node_patches(), 0);

    // The keys arrive: ready, and the taint goes.
    write_jwks(&jwks, &[&TestKeys::shared().rsa]).unwrap();
    let ready_at = Instant::now();
    wait_until("the startup taint to be removed", WAIT, || {
        !keys_of(&api).contains(&KEY.to_owned())
    })
    .await;
    let after_ready = ready_at.elapsed();
    let mut rest = keys_of(&api);
    rest.sort();
    assert_eq!(
        rest,
        ["dedicated", "maintenance"],
        "only the startup taint goes"
    );
    assert_eq!(
        api.node(NODE).unwrap()["metadata"]["labels"]["team"],
        "a",
        "labels stay"
    );
    let seconds = removal_seconds(&agent).await;
    eprintln!(
        "startup taint removed {seconds:.2} s after the agent started ({:?} after the test \
         started it, {after_ready:?} after the keys were written); node GETs {}, PATCHes {}",
        started.elapsed(),
        api.node_gets(),
        api.node_patches()
    );
    assert_eq!(api.node_patches(), 1, "one write");
    assert_eq!(attempts(&agent, "removed").await, 1.0);
    assert_eq!(agent.probe("/readyz").await.status, 200);
}

/// The first write meets a node changed since it was read (409): the agent reads again and
/// the second write succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_first_write_is_retried() {
    let api = FakeKubeApi::start().await;
    api.add_node(KubeNode::new(NODE).taint(KubeTaint::no_schedule(KEY)));
    api.fail_next_node_patches(1);
    let bed = TestBed::builder()
        .args(["--node-name", NODE, "--startup-taint", KEY])
        .env("KUBECONFIG", api.kubeconfig())
        .start()
        .await;
    let seconds = removal_seconds(&bed.agent).await;
    eprintln!(
        "ready at start, first write 409: removed {seconds:.2} s after the agent started; \
         node GETs {}, PATCHes {}",
        api.node_gets(),
        api.node_patches()
    );
    assert!(keys_of(&api).is_empty());
    assert_eq!(api.node_patches(), 2);
    assert_eq!(attempts(&bed.agent, "conflict").await, 1.0);
    assert_eq!(attempts(&bed.agent, "removed").await, 1.0);
}

/// A node that registered without the taint: the agent reads it and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_taint_gets_no_write() {
    let api = FakeKubeApi::start().await;
    api.add_node(KubeNode::new(NODE).taint(KubeTaint::no_schedule("dedicated")));
    let bed = TestBed::builder()
        .args(["--node-name", NODE, "--startup-taint", KEY])
        .env("KUBECONFIG", api.kubeconfig())
        .start()
        .await;
    bed.agent
        .wait_for_metric(
            "pod_identity_agent_startup_taint_attempts_total{result=\"absent\"}",
            |v| v == 1.0,
            WAIT,
        )
        .await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(api.node_patches(), 0);
    assert_eq!(api.node_gets(), 1);
    assert_eq!(keys_of(&api), ["dedicated"]);
}

/// Without `--node-name` (or a Kubernetes API server) the flag is refused: exit 64, naming it.
#[tokio::test]
async fn startup_taint_without_a_node_name_exits_64() {
    let api = FakeKubeApi::start().await;
    let upstream = FakeEksAuth::start().await;
    for (args, with_api) in [
        (vec!["--startup-taint", KEY], true),
        (vec!["--startup-taint", KEY, "--node-name", NODE], false),
    ] {
        let mut builder = AgentBuilder::new(upstream.url()).args(args.clone());
        if with_api {
            builder = builder.env("KUBECONFIG", api.kubeconfig());
        }
        let exited = builder.run_to_exit(WAIT).await;
        assert_eq!(exited.code, Some(64), "{args:?}: {exited:?}");
        let lines = exited.stderr_lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("--startup-taint"), "{lines:?}");
    }
}
