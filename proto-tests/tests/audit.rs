//! `--audit-log`: one JSON line for each first delivery of an access key to a pod, and
//! `pod-identity-agent audit` to read them back, as an investigator starting from an access
//! key seen in CloudTrail would.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use proto_tests::agent::agent_binary;
use proto_tests::assertions::{parse_rfc3339_utc, wait_until};
use proto_tests::{Pod, TestBed};
use serde_json::Value;
use tempfile::TempDir;

const NODE: &str = "node-audit";

/// The records of `path` (the live file only), parsed.
fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// `pod-identity-agent audit path args...`: its exit code and the records it printed.
fn audit(path: &Path, args: &[&str]) -> (Option<i32>, Vec<Value>) {
    let out = Command::new(agent_binary())
        .arg("audit")
        .arg(path)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run pod-identity-agent audit");
    let printed = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    (out.status.code(), printed)
}

struct Audited {
    bed: TestBed,
    dir: TempDir,
}

impl Audited {
    async fn start(extra: &[&str]) -> Audited {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.log");
        let bed = TestBed::builder()
            .args(["--node-name", NODE])
            .arg("--audit-log")
            .arg(&log)
            .args(extra.iter().copied())
            .start()
            .await;
        Audited { bed, dir }
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("audit.log")
    }

    /// `pod`'s request from `source`: its access key.
    async fn ask(&self, pod: &Pod, source: [u8; 4]) -> String {
        let r = self
            .bed
            .agent
            .fetch_credentials_from(IpAddr::from(source), &self.bed.token(pod))
            .await;
        assert_eq!(r.status, 200, "{r:?}\n{}", self.bed.agent.logs_text());
        r.json_str("AccessKeyId").unwrap()
    }
}

fn field<'a>(record: &'a Value, name: &str) -> &'a str {
    record[name]
        .as_str()
        .unwrap_or_else(|| panic!("{name} in {record}"))
}

#[tokio::test]
async fn pod_scope_one_record_per_pod_with_its_own_values_and_nothing_for_a_hit() {
    let a = Audited::start(&[]).await;
    let app = Pod::new("team-a", "app", "app-0");
    let web = Pod::new("team-b", "web", "web-0");
    let app_key = a.ask(&app, [127, 0, 0, 11]).await;
    let web_key = a.ask(&web, [127, 0, 0, 12]).await;
    for _ in 0..5 {
        assert_eq!(a.ask(&app, [127, 0, 0, 11]).await, app_key);
    }
    let records = records(&a.log());
    assert_eq!(records.len(), 2, "{records:#?}");
    let issued = a.bed.upstream.issued();
    for (record, pod, key, ip) in [
        (&records[0], &app, &app_key, "127.0.0.11"),
        (&records[1], &web, &web_key, "127.0.0.12"),
    ] {
        let creds = issued
            .iter()
            .find(|c| &c.access_key_id == key)
            .expect("issued by the fake");
        assert_eq!(field(record, "namespace"), pod.namespace);
        assert_eq!(field(record, "serviceAccount"), pod.service_account);
        assert_eq!(field(record, "podName"), pod.name);
        assert_eq!(field(record, "podUid"), pod.uid);
        assert_eq!(field(record, "sourceIp"), ip);
        assert_eq!(field(record, "node"), NODE);
        assert_eq!(field(record, "accessKeyId"), key.as_str());
        assert_eq!(field(record, "assumedRoleArn"), creds.role_arn);
        assert_eq!(field(record, "origin"), "upstream");
        assert!(field(record, "associationId").starts_with("a-"), "{record}");
        assert_eq!(
            parse_rfc3339_utc(field(record, "expiration")),
            Some(creds.expiration as i64),
            "{record}"
        );
        assert!(field(record, "time").ends_with('Z'), "{record}");
    }
    assert_eq!(
        a.bed
            .agent
            .metrics_text()
            .await
            .lines()
            .find(|l| l.starts_with("pod_identity_agent_audit_records_total{origin=\"upstream\"}"))
            .map(str::to_owned),
        Some("pod_identity_agent_audit_records_total{origin=\"upstream\"} 2".to_owned())
    );
    let mode = std::fs::metadata(a.log()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[tokio::test]
async fn association_scope_one_key_one_record_per_pod_that_received_it() {
    let a = Audited::start(&["--cache-scope", "association"]).await;
    let first = Pod::new("team-a", "app", "app-0");
    let second = first.sibling("app-1");
    let third = first.sibling("app-2");
    let key = a.ask(&first, [127, 0, 0, 21]).await;
    for pod in [&second, &third, &first, &second] {
        assert_eq!(a.ask(pod, [127, 0, 0, 22]).await, key, "one shared key");
    }
    let records = records(&a.log());
    let seen: Vec<(&str, &str, &str)> = records
        .iter()
        .map(|r| {
            (
                field(r, "podUid"),
                field(r, "accessKeyId"),
                field(r, "origin"),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (first.uid.as_str(), key.as_str(), "upstream"),
            (second.uid.as_str(), key.as_str(), "cache"),
            (third.uid.as_str(), key.as_str(), "cache"),
        ]
    );
    assert_eq!(a.bed.upstream.calls(), 1);
}

/// A background refresh fetches a new key that no pod has yet: nothing is written until a
/// pod receives it, then one record, `origin: cache`.
#[tokio::test]
async fn a_refreshed_key_is_recorded_when_a_pod_first_receives_it() {
    let a = Audited::start(&["--max-credential-retention-before-renewal", "1s"]).await;
    let pod = Pod::new("team-a", "app", "app-0");
    let first = a.ask(&pod, [127, 0, 0, 31]).await;
    // Asked again within the retention: in use, so the refresh point renews it.
    assert_eq!(a.ask(&pod, [127, 0, 0, 31]).await, first);
    wait_until("a background refresh", Duration::from_secs(10), || {
        a.bed.upstream.calls() >= 2
    })
    .await;
    assert_eq!(
        records(&a.log()).len(),
        1,
        "a refresh nobody received is not recorded"
    );
    let second = a.ask(&pod, [127, 0, 0, 31]).await;
    assert_ne!(second, first);
    let records = records(&a.log());
    let seen: Vec<(&str, &str)> = records
        .iter()
        .map(|r| (field(r, "accessKeyId"), field(r, "origin")))
        .collect();
    assert_eq!(
        seen,
        [(first.as_str(), "upstream"), (second.as_str(), "cache")]
    );
}

/// Past `--audit-log-max-size` the file rotates; `audit` finds a record in a rotated file,
/// and every file is mode 0600.
#[tokio::test]
async fn rotation_at_the_size_and_audit_finds_a_record_in_a_rotated_file() {
    let a = Audited::start(&["--audit-log-max-size", "4KiB", "--audit-log-max-files", "3"]).await;
    let pods: Vec<Pod> = (0..24)
        .map(|i| Pod::new("team-a", "app", &format!("app-{i}")))
        .collect();
    let mut keys = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        keys.push(a.ask(pod, [127, 0, 1, i as u8 + 1]).await);
    }
    let rotated: Vec<PathBuf> = (1..=4)
        .map(|n| a.dir.path().join(format!("audit.log.{n}")))
        .collect();
    assert!(rotated[0].exists(), "rotated at least once");
    assert!(!rotated[3].exists(), "at most 3 rotated files are kept");
    for file in std::iter::once(a.log()).chain(rotated.iter().filter(|p| p.exists()).cloned()) {
        let meta = std::fs::metadata(&file).unwrap();
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o600,
            "{}",
            file.display()
        );
        assert!(
            meta.len() <= 4096,
            "{} is {} bytes",
            file.display(),
            meta.len()
        );
    }
    // The live file no longer has the oldest record kept; `audit` finds it in a rotated one.
    let live = records(&a.log());
    let (code, all) = audit(&a.log(), &[]);
    assert_eq!(code, Some(0));
    assert!(all.len() > live.len(), "rotated files are read too");
    let oldest = &all[0];
    let uid = field(oldest, "podUid").to_owned();
    assert!(
        !live.iter().any(|r| field(r, "podUid") == uid),
        "the oldest kept record is in a rotated file"
    );
    let (code, by_pod) = audit(&a.log(), &["--pod-uid", &uid]);
    assert_eq!(code, Some(0));
    assert_eq!(by_pod.len(), 1);
    let key = field(&by_pod[0], "accessKeyId").to_owned();
    let (_, by_key) = audit(&a.log(), &["--access-key-id", &key]);
    assert_eq!(by_key, by_pod);
    // Oldest first, over all files.
    let order: Vec<usize> = all
        .iter()
        .map(|r| {
            keys.iter()
                .position(|k| k == field(r, "accessKeyId"))
                .unwrap()
        })
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
    assert_eq!(*order.last().unwrap(), keys.len() - 1);
    let (code, none) = audit(&a.log(), &["--namespace", "no-such-namespace"]);
    assert_eq!((code, none.len()), (Some(1), 0));
    let (code, _) = audit(&a.dir.path().join("missing.log"), &[]);
    assert_eq!(code, Some(2));
}

/// A full file system: the pod is served anyway, the failure is counted and logged, and
/// the record is tried again at the next delivery. The audit log is on a 4 KiB tmpfs,
/// filled, in a mount namespace of this test's own (root only: `scripts/test` runs as root).
#[tokio::test(flavor = "current_thread")]
async fn a_write_failure_is_counted_and_the_request_still_served() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test mounts a tmpfs in a mount namespace of its own: run it as root"
    );
    // This thread (the runtime's only one) and the agent it spawns get a private copy of
    // the mount table: the tmpfs is never visible to the rest of the machine.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare the mount namespace");
    let run = |args: &[&str]| {
        let status = Command::new(args[0]).args(&args[1..]).status().unwrap();
        assert!(status.success(), "{args:?}: {status}");
    };
    run(&["mount", "--make-rprivate", "/"]);
    let full = tempfile::tempdir().unwrap();
    let dir = full.path().display().to_string();
    run(&[
        "mount",
        "-t",
        "tmpfs",
        "-o",
        "size=4k,mode=0700",
        "tmpfs",
        &dir,
    ]);
    let filler = full.path().join("filler");
    let written = std::fs::write(&filler, vec![0u8; 64 * 1024]);
    assert!(written.is_err(), "the tmpfs is full");

    let log = full.path().join("audit.log");
    let bed = TestBed::builder()
        .arg("--audit-log")
        .arg(&log)
        .start()
        .await;
    let pod = Pod::new("team-a", "app", "app-0");
    for _ in 0..2 {
        let r = bed.agent.fetch_credentials(&bed.token(&pod)).await;
        assert_eq!(
            r.status, 200,
            "served although the record could not be written"
        );
    }
    let metrics = bed.agent.metrics_text().await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "pod_identity_agent_audit_write_failures_total 2"),
        "each delivery tried and failed:\n{metrics}"
    );
    assert!(
        bed.agent.logs_text().contains("audit record not written"),
        "{}",
        bed.agent.logs_text()
    );
    // Room again: the next delivery is recorded.
    std::fs::remove_file(&filler).unwrap();
    let r = bed.agent.fetch_credentials(&bed.token(&pod)).await;
    assert_eq!(r.status, 200);
    let records = records(&log);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(field(&records[0], "podUid"), pod.uid);
    drop(bed);
    run(&["umount", &dir]);
}

/// Records keep flowing through a handoff: the new agent takes the cache, and records each
/// key at its first delivery from it, `origin: cache` (the old agent's record says
/// `upstream`), into the same file.
#[tokio::test]
async fn after_a_handoff_the_new_agent_records_a_taken_key_at_its_first_delivery() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let log = dir.path().join("audit.log");
    let ports: Vec<String> = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect::<Vec<_>>()
        .iter()
        .map(|l| l.local_addr().unwrap().port().to_string())
        .collect();
    let socket = dir.path().join("handoff.sock").display().to_string();
    let log_arg = log.display().to_string();
    let common = [
        "--port",
        &ports[0],
        "--probe-port",
        &ports[1],
        "--metrics-port",
        &ports[2],
        "--handoff-socket",
        &socket,
        "--audit-log",
        &log_arg,
        "--node-name",
        NODE,
    ];
    let bed = TestBed::builder().args(common).start().await;
    let pod = Pod::new("team-a", "app", "app-0");
    let token = bed.token(&pod);
    let first = bed.agent.fetch_credentials(&token).await;
    assert_eq!(first.status, 200);
    let key = first.json_str("AccessKeyId").unwrap();

    let b = proto_tests::AgentBuilder::new(bed.upstream.url())
        .arg("--jwks-file")
        .arg(bed.jwks_path())
        .args(common)
        .start()
        .await;
    wait_until("the old agent's handoff", Duration::from_secs(10), || {
        bed.agent
            .logs_text()
            .contains("handed over to the next agent")
    })
    .await;
    for _ in 0..3 {
        let r = b.fetch_credentials(&token).await;
        assert_eq!(r.status, 200, "{}", b.logs_text());
        assert_eq!(r.json_str("AccessKeyId").unwrap(), key, "the taken key");
    }
    assert_eq!(bed.upstream.calls(), 1, "served from the state taken");
    let records = records(&log);
    let seen: Vec<(&str, &str)> = records
        .iter()
        .map(|r| (field(r, "accessKeyId"), field(r, "origin")))
        .collect();
    assert_eq!(seen, [(key.as_str(), "upstream"), (key.as_str(), "cache")]);
    assert_eq!(field(&records[1], "podUid"), pod.uid);
}
