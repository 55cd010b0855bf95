//! No flag value, however large or small, panics the agent or makes it answer 500: every
//! numeric and duration flag either starts the agent, which then serves, or exits 64 with one
//! line naming the flag.
//!
//! Values come from the extremes that broke agents before (`300000000000y`, a QPS of `1e-30`,
//! `u64::MAX`), from each flag's edges, and from proptest's random draws. A value that
//! `--dry-run` accepts is then started for real and asked for credentials twice (a fetch and
//! a cache hit).

use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};

use proto_tests::agent::{AgentBuilder, Exited};
use proto_tests::keys::{write_jwks, Pod, TestKeys};
use proto_tests::FakeEksAuth;

/// What a flag's value is.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// An unsigned count (`u64` or `usize`).
    Count,
    /// A rate or a burst (`f64`).
    Number,
    /// A humantime duration.
    Duration,
    /// A port: only values that are refused are drawn (an accepted one would be a fixed port
    /// that tests running side by side could collide on), and `0`.
    Port,
}

/// Every numeric and duration flag of `server`.
const FLAGS: &[(&str, Kind)] = &[
    ("--port", Kind::Port),
    ("--probe-port", Kind::Port),
    ("--metrics-port", Kind::Port),
    ("--max-cache-size", Kind::Count),
    ("--max-credential-retention-before-renewal", Kind::Duration),
    ("--max-service-qps", Kind::Number),
    ("--max-upstream-concurrency", Kind::Count),
    ("--caller-rate-limit", Kind::Number),
    ("--caller-burst", Kind::Number),
    ("--global-rate-limit", Kind::Number),
    ("--global-burst", Kind::Number),
    ("--max-connections", Kind::Count),
    ("--max-connections-per-source", Kind::Count),
    ("--idle-timeout", Kind::Duration),
    ("--send-timeout", Kind::Duration),
    ("--pod-watch-timeout", Kind::Duration),
    ("--rotate-credentials-interval", Kind::Duration),
];

/// The values every flag of its kind is tried with.
fn extremes(kind: Kind) -> Vec<String> {
    let fixed: &[&str] = match kind {
        Kind::Count => &[
            "0",
            "1",
            "2",
            "4096",
            "1000000",
            "1000001",
            "4294967296",
            "18446744073709551615",
            "18446744073709551616",
            "-1",
        ],
        Kind::Number => &[
            "0", "-0", "1e-30", "1e-19", "0.01", "1", "1000", "1e6", "1e308", "-1", "NaN", "inf",
        ],
        Kind::Duration => &[
            "0s",
            "1ns",
            "999ms",
            "1s",
            "10m",
            "1h",
            "24h",
            "25h",
            "300000000000y",
            "18446744073709551615s",
        ],
        Kind::Port => &["0", "65536", "-1", "99999999999"],
    };
    fixed.iter().map(|s| s.to_string()).collect()
}

/// Random values of a flag's kind.
fn random(kind: Kind) -> BoxedStrategy<String> {
    match kind {
        Kind::Count => prop_oneof![
            (0u64..5000).prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
        ]
        .boxed(),
        Kind::Number => prop_oneof![
            (0.0f64..10_000.0).prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|n| format!("{n:e}")),
            (-40i32..40).prop_map(|e| format!("1e{e}")),
        ]
        .boxed(),
        Kind::Duration => (
            prop_oneof![0u64..100, any::<u64>()],
            prop::sample::select(&["ns", "us", "ms", "s", "m", "h", "d", "w", "M", "y"][..]),
        )
            .prop_map(|(n, unit)| format!("{n}{unit}"))
            .boxed(),
        Kind::Port => (65536u64..u64::MAX).prop_map(|n| n.to_string()).boxed(),
    }
}

/// Everything a case needs besides the flag: a fake EKS Auth and trusted keys.
struct Bed {
    upstream: FakeEksAuth,
    dir: tempfile::TempDir,
}

impl Bed {
    async fn start() -> Bed {
        let dir = tempfile::tempdir().unwrap();
        write_jwks(&dir.path().join("jwks.json"), &[&TestKeys::shared().rsa]).unwrap();
        Bed {
            upstream: FakeEksAuth::start().await,
            dir,
        }
    }

    fn agent(&self, flag: &str, value: &str) -> AgentBuilder {
        AgentBuilder::new(self.upstream.url())
            .arg("--jwks-file")
            .arg(self.dir.path().join("jwks.json"))
            // `=` so that a value starting with `-` is the flag's value, not another flag.
            .arg(format!("{flag}={value}"))
    }

    /// `flag=value` either exits 64 naming the flag or starts and serves credentials twice.
    async fn check(&self, flag: &str, value: &str) -> Result<(), String> {
        let dry = self
            .agent(flag, value)
            .arg("--dry-run")
            .run_to_exit(Duration::from_secs(20))
            .await;
        match dry.code {
            Some(0) => {}
            Some(64) => return refused_naming(&dry, flag, value),
            _ => return Err(format!("{flag}={value}: --dry-run ended {dry:?}")),
        }
        let agent = self.agent(flag, value).start().await;
        let pod = Pod::new("flags", "app", &format!("pod-{}", value.len()));
        let token = pod.token().sign(&TestKeys::shared().rsa);
        for ask in ["first", "second"] {
            let mut response = agent.fetch_credentials(&token).await;
            // With a cap of one connection per source, the previous request's connection may
            // not have been seen closed yet: the agent says so (503, Retry-After), and an SDK
            // retries, as this does, bounded.
            for _ in 0..40 {
                if response.status != 503
                    || response.json_str("code").as_deref() != Some("TooManyConnections")
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                response = agent.fetch_credentials(&token).await;
            }
            if response.status != 200 {
                return Err(format!(
                    "{flag}={value}: the {ask} request got {} {}\n{}",
                    response.status,
                    response.text(),
                    agent.logs_text()
                ));
            }
        }
        let logs = agent.logs_text();
        if logs.contains("panicked") {
            return Err(format!("{flag}={value}: the agent panicked\n{logs}"));
        }
        Ok(())
    }
}

fn refused_naming(exited: &Exited, flag: &str, value: &str) -> Result<(), String> {
    let lines = exited.stderr_lines();
    match lines.as_slice() {
        [line] if line.contains(flag) && !line.contains("panicked") => Ok(()),
        _ => Err(format!(
            "{flag}={value}: exit 64 must come with one line naming the flag, got {:?}",
            exited.stderr
        )),
    }
}

#[tokio::test]
async fn every_extreme_value_of_every_flag_starts_and_serves_or_exits_64_naming_it() {
    let bed = Bed::start().await;
    let mut failures = Vec::new();
    let mut checked = 0;
    for (flag, kind) in FLAGS {
        for value in extremes(*kind) {
            checked += 1;
            if let Err(e) = bed.check(flag, &value).await {
                failures.push(e);
            }
        }
    }
    assert!(checked > 100, "only {checked} values");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn random_values_of_every_flag_start_and_serve_or_exit_64_naming_it() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let bed = runtime.block_on(Bed::start());
    let strategy =
        prop::sample::select(FLAGS).prop_flat_map(|(flag, kind)| (Just(flag), random(kind)));
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&strategy, |(flag, value)| {
            runtime
                .block_on(bed.check(flag, &value))
                .map_err(TestCaseError::fail)
        })
        .unwrap();
}

#[tokio::test]
async fn copy_credentials_interval_is_bounded_too() {
    let dir = tempfile::tempdir().unwrap();
    for value in ["0s", "99ms", "300000000000y", "2h"] {
        let out = proto_tests::agent::agent_command()
            .args(["copy-credentials", "--from"])
            .arg(dir.path())
            .arg("--to")
            .arg(dir.path().join("copy"))
            .arg(format!("--interval={value}"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "--interval={value}: {stderr}");
        assert!(stderr.contains("--interval"), "{stderr}");
    }
}
