//! The sts backend (`--backend sts`): a pod's verified token exchanged with STS
//! `AssumeRoleWithWebIdentity` for the role its service account is associated
//! with in `--associations`. Driven with the real SDK clients, against the
//! wire-level fake and against moto; plus the associations file's validation
//! and reloads, STS error mapping and single flight.

use std::time::{Duration, Instant};

use aws_sdk_sts::config::retry::RetryConfig;
use aws_sdk_sts::config::{BehaviorVersion, Credentials, Region};
use proto_tests::agent::{burst_of_key_ids, log_field, Exited};
use proto_tests::assertions::{
    assert_answered_from_cache, assert_credentials, assert_error_body, assert_failed_in_time,
    assert_sdk_got, assert_throttled_with_retry_after, only_issued, parse_rfc3339_utc,
};
use proto_tests::associations::Format;
use proto_tests::clients::{fetch_credentials_with_token, Sdk};
use proto_tests::fakes::sts::{is_valid_session_name, StsCall, ACTION, API_VERSION};
use proto_tests::http::RawResponse;
use proto_tests::keys::unix_now;
use proto_tests::metrics;
use proto_tests::{Association, Moto, Pod, StsFault, StsTestBed};

const APP_ROLE: &str = "arn:aws:iam::111122223333:role/app";
const APP_ACCOUNT: &str = "111122223333";
/// The agent polls the associations file every 2 s; a debug build on a busy
/// machine gets several polls' slack.
const RELOAD_DEADLINE: Duration = Duration::from_secs(10);
/// An agent refusing its configuration exits long before this.
const EXIT_DEADLINE: Duration = Duration::from_secs(20);

fn app() -> Association {
    Association::new("team-a", "app", APP_ROLE)
}

/// The only STS call made for `pod`.
fn only_call_for(bed: &StsTestBed, pod: &Pod) -> StsCall {
    let calls = bed.sts.calls_for(&pod.uid);
    assert_eq!(
        calls.len(),
        1,
        "expected one STS call for {}: {calls:#?}\n{}",
        pod.name,
        bed.agent.logs_text()
    );
    calls.into_iter().next().expect("one call")
}

/// The request the contract describes: unsigned, form-encoded, the pod's own
/// token, the association's role, a session name derived from the pod.
fn assert_call_shape(call: &StsCall, pod: &Pod, token: &str, role_arn: &str) {
    assert_eq!((call.method.as_str(), call.path.as_str()), ("POST", "/"));
    assert!(
        call.content_type
            .as_deref()
            .is_some_and(|ct| ct.starts_with("application/x-www-form-urlencoded")),
        "{call:?}"
    );
    assert_eq!(call.action.as_deref(), Some(ACTION));
    assert_eq!(call.version.as_deref(), Some(API_VERSION));
    assert_eq!(call.role_arn.as_deref(), Some(role_arn));
    assert_eq!(
        call.web_identity_token.as_deref(),
        Some(token),
        "the pod's token is forwarded verbatim"
    );
    assert!(
        !call.has_authorization(),
        "AssumeRoleWithWebIdentity is anonymous; the agent signed it: {:?}",
        call.authorization
    );
    let session = call.role_session_name.as_deref().expect("RoleSessionName");
    assert_session_name(session, pod);
}

/// 2..=64 characters of STS's set, starting with `<namespace>-<pod name>`
/// (these tests' pods have names that need no sanitizing and fit).
fn assert_session_name(session: &str, pod: &Pod) {
    assert!(
        is_valid_session_name(session),
        "RoleSessionName {session:?} is not 2..64 chars of [A-Za-z0-9_+=,.@-]"
    );
    let prefix = format!("{}-{}", pod.namespace, pod.name);
    assert!(
        session.starts_with(&prefix),
        "RoleSessionName {session:?} does not start with {prefix:?}"
    );
}

/// Requests for fresh pods of `namespace/service_account` until one gets
/// `status` or `RELOAD_DEADLINE` passes; returns the last pod and response.
async fn poll_until_status(
    bed: &StsTestBed,
    namespace: &str,
    service_account: &str,
    status: u16,
) -> (Pod, RawResponse) {
    let deadline = Instant::now() + RELOAD_DEADLINE;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let pod = Pod::new(
            namespace,
            service_account,
            &format!("{service_account}-{attempt}"),
        );
        let response = bed.fetch_as(&pod).await;
        if response.status == status || Instant::now() >= deadline {
            return (pod, response);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn assert_no_association(response: &RawResponse) {
    assert_eq!(response.status, 403, "{response:?}");
    assert_eq!(assert_error_body(response), "NoAssociation", "{response:?}");
}

// --- (a) credentials through the SDKs, with the fake ---

async fn sdk_gets_sts_credentials(sdk: Sdk) {
    let bed = StsTestBed::start(&[app().session_duration("2h")]).await;
    let pod = Pod::new("team-a", "app", &format!("app-{sdk:?}").to_lowercase());
    let token = bed.token(&pod);
    let url = bed.agent.credentials_url();
    let got = fetch_credentials_with_token(sdk, &url, bed.dir.path(), &token)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", bed.agent.logs_text()));
    assert_sdk_got(&got, sdk, &only_issued(&bed.sts), &pod.uid, APP_ACCOUNT);
    let call = only_call_for(&bed, &pod);
    assert_call_shape(&call, &pod, &token, APP_ROLE);
    assert_eq!(call.duration_seconds, Some(7200), "sessionDuration: 2h");
}

proto_tests::for_each_sdk!(sdk_gets_sts_credentials:
    botocore_gets_credentials_from_sts => Sdk::Python,
    rust_sdk_gets_credentials_from_sts => Sdk::Rust,
    js_v3_gets_credentials_from_sts => Sdk::JavaScript,
);

#[tokio::test]
async fn sts_credentials_have_the_contract_shape_and_are_cached() {
    let bed = StsTestBed::start(&[app()]).await;
    let pod = Pod::new("team-a", "app", "app-7d9f");
    let token = bed.token(&pod);
    let response = bed.agent.fetch_credentials(&token).await;
    let issued = only_issued(&bed.sts);
    assert_credentials(&response, &issued);
    assert_eq!(response.json_str("AccountId").as_deref(), Some(APP_ACCOUNT));
    assert!(
        issued.secret_access_key.contains(&pod.uid),
        "the pod got its own STS credentials"
    );

    assert_answered_from_cache(&bed.agent, &token, &bed.sts, &issued).await;
}

#[tokio::test]
async fn duration_seconds_follow_the_association() {
    // (service account, sessionDuration, DurationSeconds STS must see)
    let cases: [(&str, Option<Association>, u64); 6] = [
        ("default", None, 3600),
        ("hours", Some(app().session_duration("2h")), 7200),
        ("minutes", Some(app().session_duration("90m")), 5400),
        ("seconds", Some(app().session_duration_secs(1800)), 1800),
        ("short", Some(app().session_duration_secs(100)), 900),
        ("long", Some(app().session_duration("24h")), 43_200),
    ];
    let associations = cases.iter().map(|(sa, base, _)| {
        let mut a = base.clone().unwrap_or_else(app);
        a.service_account = (*sa).to_owned();
        a
    });
    let bed = StsTestBed::builder()
        .associations(associations)
        .start()
        .await;
    for (sa, _, expected) in cases {
        let pod = Pod::new("team-a", sa, &format!("{sa}-0"));
        let response = bed.fetch_as(&pod).await;
        assert_eq!(response.status, 200, "{sa}: {response:?}");
        let call = only_call_for(&bed, &pod);
        assert_eq!(
            call.duration_seconds,
            Some(expected),
            "{sa}: DurationSeconds {:?}",
            call.param("DurationSeconds")
        );
    }
}

#[tokio::test]
async fn every_file_format_is_accepted() {
    for format in [Format::Json, Format::Yaml, Format::YamlList] {
        let bed = StsTestBed::builder()
            .association(app())
            .association(Association::new(
                "team-b",
                "job",
                "arn:aws:iam::444455556666:role/batch/job",
            ))
            .format(format)
            .start()
            .await;
        let pod = Pod::new("team-b", "job", "job-0");
        let response = bed.fetch_as(&pod).await;
        assert_eq!(response.status, 200, "{format:?}: {response:?}");
        assert_eq!(
            response.json_str("AccountId").as_deref(),
            Some("444455556666")
        );
        let call = only_call_for(&bed, &pod);
        assert_eq!(
            call.role_arn.as_deref(),
            Some("arn:aws:iam::444455556666:role/batch/job")
        );
        let text = bed.agent.metrics_text().await;
        assert_eq!(
            metrics::value(&text, "pod_identity_agent_associations"),
            Some(2.0),
            "{format:?}\n{text}"
        );
    }
}

#[tokio::test]
async fn association_audience_is_required_of_the_token() {
    let bed = StsTestBed::builder()
        .association(app().audience("sts.amazonaws.com"))
        .args(["--audience", "pods.eks.amazonaws.com,sts.amazonaws.com"])
        .start()
        .await;
    let pod = Pod::new("team-a", "app", "app-0");
    let sts_token = pod
        .token()
        .audience(["sts.amazonaws.com"])
        .sign(&bed.keys.rsa);
    let response = bed.agent.fetch_credentials(&sts_token).await;
    assert_eq!(response.status, 200, "{response:?}");

    let other = Pod::new("team-a", "app", "app-1");
    let response = bed.fetch_as(&other).await;
    assert!(
        matches!(response.status, 400 | 401 | 403),
        "a token without the association's audience: {response:?}"
    );
    assert_error_body(&response);
    assert_eq!(bed.sts.calls_for_pod(&other.uid), 0);
}

// --- session names ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_for_one_pod_are_one_sts_call() {
    const BURST: usize = 200;
    let bed = StsTestBed::start(&[app()]).await;
    bed.sts.set_latency(Duration::from_millis(300));
    let token = bed.token(&Pod::new("team-a", "app", "app-burst"));
    let key_ids = burst_of_key_ids(&bed.agent, &token, BURST).await;
    assert_eq!(bed.sts.calls(), 1, "concurrent requests must coalesce");
    let issued = only_issued(&bed.sts);
    assert!(key_ids.iter().all(|k| *k == issued.access_key_id));
}

#[tokio::test]
async fn pods_of_one_service_account_get_their_own_sessions() {
    let bed = StsTestBed::start(&[app()]).await;
    let a = Pod::new("team-a", "app", "app-a");
    let b = a.sibling("app-b");
    // Same name, new UID: a recreated pod (e.g. a StatefulSet member).
    let a2 = a.sibling("app-a");
    let mut sessions = Vec::new();
    for pod in [&a, &b, &a2] {
        let token = bed.token(pod);
        let response = bed.agent.fetch_credentials(&token).await;
        assert_eq!(response.status, 200, "{response:?}");
        let call = only_call_for(&bed, pod);
        assert_call_shape(&call, pod, &token, APP_ROLE);
        sessions.push(call.role_session_name.expect("session name"));
        assert!(response
            .json_str("SecretAccessKey")
            .unwrap()
            .contains(&pod.uid));
    }
    assert_ne!(sessions[0], sessions[1], "two pods, two sessions");
    assert_ne!(
        sessions[0], sessions[2],
        "a recreated pod of the same name is another session (suffix from the UID)"
    );
}

#[tokio::test]
async fn long_and_odd_pod_names_give_valid_unique_session_names() {
    let bed = StsTestBed::start(&[app()]).await;
    let long_name = format!("{}-worker", "x".repeat(100));
    let long_a = Pod::new("team-a", "app", &format!("{long_name}-a"));
    let long_b = long_a.sibling(&format!("{long_name}-b"));
    let odd = long_a.sibling("web:front/0 ü");
    let mut sessions = Vec::new();
    for pod in [&long_a, &long_b, &odd] {
        let response = bed.fetch_as(pod).await;
        assert_eq!(response.status, 200, "{}: {response:?}", pod.name);
        let session = only_call_for(&bed, pod)
            .role_session_name
            .expect("session name");
        assert!(
            is_valid_session_name(&session),
            "{:?} -> {session:?} is not a valid RoleSessionName",
            pod.name
        );
        assert!(session.starts_with("team-a-"), "{session:?}");
        sessions.push(session);
    }
    // Cut to fit, yet still readable: most of `<ns>-<pod>` survives.
    let full = format!("team-a-{}", long_a.name);
    assert!(
        sessions[0].starts_with(&full[..32]),
        "{:?} keeps little of {full:?}",
        sessions[0]
    );
    assert_ne!(
        sessions[0], sessions[1],
        "names that differ only past the cut still give distinct sessions"
    );
}

// --- (b) the same against moto ---

/// Who moto says these credentials belong to (`GetCallerIdentity`, signed
/// with them): proof that they are moto's, and of the session they name.
async fn moto_caller_arn(moto: &Moto, access_key: &str, secret: &str, token: &str) -> String {
    let config = aws_sdk_sts::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-west-2"))
        .endpoint_url(moto.url())
        .retry_config(RetryConfig::disabled())
        .credentials_provider(Credentials::new(
            access_key,
            secret,
            Some(token.to_owned()),
            None,
            "agent",
        ))
        .build();
    let who = aws_sdk_sts::Client::from_conf(config)
        .get_caller_identity()
        .send()
        .await
        .unwrap_or_else(|e| panic!("moto GetCallerIdentity: {e:?}\n{}", moto.logs_text()));
    who.arn().expect("caller ARN").to_owned()
}

const MOTO_ROLE: &str = "arn:aws:iam::444455556666:role/moto-app";

async fn moto_bed(moto: &Moto) -> StsTestBed {
    StsTestBed::builder()
        .association(Association::new("team-a", "app", MOTO_ROLE).session_duration("2h"))
        .sts_endpoint(moto.url())
        .start()
        .await
}

#[tokio::test]
async fn moto_credentials_reach_the_pod() {
    let moto = Moto::start().await;
    let bed = moto_bed(&moto).await;
    let pod = Pod::new("team-a", "app", "app-moto");
    let response = bed.fetch_as(&pod).await;
    assert_eq!(
        response.status,
        200,
        "{response:?}\n{}\n{}",
        bed.agent.logs_text(),
        moto.logs_text()
    );
    let field = |name: &str| {
        response
            .json_str(name)
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| panic!("{name} missing or empty: {response:?}"))
    };
    let (access_key, secret, token) = (
        field("AccessKeyId"),
        field("SecretAccessKey"),
        field("Token"),
    );
    assert_eq!(field("AccountId"), "444455556666");
    let expiration = field("Expiration");
    assert!(expiration.ends_with('Z'), "{expiration}");
    let expires = parse_rfc3339_utc(&expiration)
        .unwrap_or_else(|| panic!("Expiration {expiration:?} is not RFC 3339 UTC"));
    // moto honours DurationSeconds: sessionDuration 2h.
    let expected = unix_now() + 7200;
    assert!(
        (expires - expected).abs() < 120,
        "Expiration {expiration} is not about 2 h away"
    );
    assert_eq!(bed.sts.calls(), 0, "the agent called moto, not the fake");

    let arn = moto_caller_arn(&moto, &access_key, &secret, &token).await;
    let prefix = "arn:aws:sts::444455556666:assumed-role/moto-app/";
    let session = arn
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("{arn} is not a session of {MOTO_ROLE}"));
    assert_session_name(session, &pod);
}

async fn sdk_gets_moto_credentials(sdk: Sdk) {
    let moto = Moto::start().await;
    let bed = moto_bed(&moto).await;
    let pod = Pod::new("team-a", "app", &format!("app-moto-{sdk:?}").to_lowercase());
    let url = bed.agent.credentials_url();
    let got = fetch_credentials_with_token(sdk, &url, bed.dir.path(), &bed.token(&pod))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", bed.agent.logs_text(), moto.logs_text()));
    assert!(!got.access_key.is_empty() && !got.secret_key.is_empty());
    let token = got.token.clone().filter(|t| !t.is_empty()).expect("token");
    assert_eq!(got.account_id.as_deref(), Some("444455556666"));
    let arn = moto_caller_arn(&moto, &got.access_key, &got.secret_key, &token).await;
    let session = arn
        .strip_prefix("arn:aws:sts::444455556666:assumed-role/moto-app/")
        .unwrap_or_else(|| panic!("{arn} is not a session of {MOTO_ROLE}"));
    assert_session_name(session, &pod);
}

proto_tests::for_each_sdk!(sdk_gets_moto_credentials:
    botocore_gets_moto_credentials => Sdk::Python,
    rust_sdk_gets_moto_credentials => Sdk::Rust,
);

// --- (c) no association ---

#[tokio::test]
async fn service_account_without_association_is_403_without_an_sts_call() {
    let bed = StsTestBed::start(&[app()]).await;
    for pod in [
        Pod::new("team-a", "other", "other-0"),
        // Same service account name, another namespace.
        Pod::new("team-b", "app", "app-0"),
    ] {
        let response = bed.fetch_as(&pod).await;
        assert_no_association(&response);
    }
    assert_eq!(bed.sts.calls(), 0, "{:#?}", bed.sts.call_log());
    // The association that does exist still works.
    let response = bed.fetch_as(&Pod::new("team-a", "app", "app-0")).await;
    assert_eq!(response.status, 200, "{response:?}");
}

// --- (d) invalid configuration ---

/// Exit 64 with one stderr line containing every one of `needles`.
fn assert_refused(exited: &Exited, needles: &[&str], what: &str) -> String {
    assert_eq!(exited.code, Some(64), "{what}: {exited:#?}");
    let lines = exited.stderr_lines();
    assert_eq!(
        lines.len(),
        1,
        "{what}: one stderr line expected: {exited:#?}"
    );
    for needle in needles {
        assert!(
            lines[0].contains(needle),
            "{what}: no {needle:?} in {:?}",
            lines[0]
        );
    }
    lines[0].to_owned()
}

/// The number after `line ` in `message`.
fn line_number(message: &str) -> Option<usize> {
    let at = message.find("line ")? + "line ".len();
    let digits: String = message[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[tokio::test]
async fn malformed_associations_file_exits_64_naming_the_line() {
    let ok = "arn:aws:iam::111122223333:role/app";
    // (what, format, text, lines of the offending entry)
    let cases: Vec<(&str, Format, String, std::ops::RangeInclusive<usize>)> = vec![
        (
            "unknown field",
            Format::Yaml,
            format!(
                "associations:\n\
                 \x20 - namespace: team-a\n\
                 \x20   serviceAccount: app\n\
                 \x20   roleArn: {ok}\n\
                 \x20 - namespace: team-b\n\
                 \x20   serviceAccount: app\n\
                 \x20   roleArn: {ok}\n\
                 \x20   colour: red\n"
            ),
            5..=8,
        ),
        (
            "unknown field (JSON)",
            Format::Json,
            format!(
                "{{\n\
                 \x20 \"associations\": [\n\
                 \x20   {{\n\
                 \x20     \"namespace\": \"team-a\",\n\
                 \x20     \"serviceAccount\": \"app\",\n\
                 \x20     \"roleArn\": \"{ok}\",\n\
                 \x20     \"role\": \"admin\"\n\
                 \x20   }}\n\
                 \x20 ]\n\
                 }}\n"
            ),
            3..=8,
        ),
        (
            "duplicate service account",
            Format::Yaml,
            format!(
                "associations:\n\
                 \x20 - namespace: team-a\n\
                 \x20   serviceAccount: app\n\
                 \x20   roleArn: {ok}\n\
                 \x20 - namespace: team-a\n\
                 \x20   serviceAccount: app\n\
                 \x20   roleArn: arn:aws:iam::111122223333:role/other\n"
            ),
            2..=7,
        ),
        (
            "bad role ARN",
            Format::YamlList,
            format!(
                "- namespace: team-a\n\
                 \x20 serviceAccount: app\n\
                 \x20 roleArn: {ok}\n\
                 - namespace: team-b\n\
                 \x20 serviceAccount: job\n\
                 \x20 roleArn: arn:aws:s3:::my-bucket\n"
            ),
            4..=6,
        ),
        (
            "bad sessionDuration",
            Format::Yaml,
            format!(
                "associations:\n\
                 \x20 - namespace: team-a\n\
                 \x20   serviceAccount: app\n\
                 \x20   roleArn: {ok}\n\
                 \x20   sessionDuration: forever\n"
            ),
            2..=5,
        ),
        (
            "bad YAML",
            Format::Yaml,
            "associations:\n\
             \x20 - namespace: team-a\n\
             \x20   serviceAccount: [app\n\
             \x20   roleArn: x\n"
                .to_owned(),
            1..=5,
        ),
    ];
    for (what, format, text, lines) in cases {
        let exited = StsTestBed::builder()
            .format(format)
            .raw_associations(text.clone())
            .run_to_exit(EXIT_DEADLINE)
            .await;
        let message = assert_refused(&exited, &["--associations", "line "], what);
        let line = line_number(&message)
            .unwrap_or_else(|| panic!("{what}: no line number in {message:?}"));
        assert!(
            lines.contains(&line),
            "{what}: line {line} is outside the offending entry (lines {lines:?}):\n\
             {message}\n{text}"
        );
    }
}

#[tokio::test]
async fn sts_backend_requires_associations_and_a_key_source() {
    let exited = StsTestBed::builder()
        .association(app())
        .without_associations_flag()
        .run_to_exit(EXIT_DEADLINE)
        .await;
    assert_refused(&exited, &["--associations"], "no --associations");

    let exited = StsTestBed::builder()
        .without_associations_flag()
        .args(["--associations", "/nonexistent/associations.yaml"])
        .run_to_exit(EXIT_DEADLINE)
        .await;
    assert_refused(&exited, &["--associations"], "missing file");

    let exited = StsTestBed::builder()
        .association(app())
        .without_key_source()
        .run_to_exit(EXIT_DEADLINE)
        .await;
    let message = assert_refused(&exited, &[], "no key source");
    assert!(
        ["--jwks-file", "--jwks-url", "--issuer"]
            .iter()
            .any(|flag| message.contains(flag)),
        "no key source: {message:?} names none of the key source flags"
    );
}

// --- (e) reloads ---

async fn metric(bed: &StsTestBed, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = bed.agent.metrics_text().await;
    metrics::sum_where(&text, name, labels).unwrap_or(0.0)
}

const RELOADS: &str = "pod_identity_agent_association_reloads_total";
const LOADED: &str = "pod_identity_agent_associations";

fn warnings_about_associations(bed: &StsTestBed) -> usize {
    bed.agent
        .log_records()
        .iter()
        .filter(|r| {
            log_field(r, "level")
                .and_then(|l| l.as_str())
                .is_some_and(|l| l.eq_ignore_ascii_case("warn"))
        })
        .filter(|r| r.to_string().to_ascii_lowercase().contains("associations"))
        .count()
}

#[tokio::test]
async fn associations_file_reloads_keep_the_last_good_set() {
    let worker = Association::new("team-a", "worker", "arn:aws:iam::111122223333:role/worker");
    let bed = StsTestBed::start(&[app()]).await;
    assert_eq!(metric(&bed, LOADED, &[]).await, 1.0);
    let first = Pod::new("team-a", "app", "app-first");
    let response = bed.fetch_as(&first).await;
    assert_eq!(response.status, 200, "{response:?}");
    let unassociated = Pod::new("team-a", "worker", "worker-0");
    assert_no_association(&bed.fetch_as(&unassociated).await);

    // A bad edit that would also add `worker`: nothing of it may take effect.
    let failures_before = metric(&bed, RELOADS, &[("outcome", "failure")]).await;
    let warnings_before = warnings_about_associations(&bed);
    let mut bad = proto_tests::associations::render(&[app(), worker.clone()], Format::Yaml);
    bad.push_str("    colour: red\n");
    bed.associations.write_raw(&bad);
    let deadline = Instant::now() + RELOAD_DEADLINE;
    while metric(&bed, RELOADS, &[("outcome", "failure")]).await <= failures_before {
        assert!(
            Instant::now() < deadline,
            "no failed reload counted within {RELOAD_DEADLINE:?}\n{}\n{}",
            bed.agent.metrics_text().await,
            bed.agent.logs_text()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The counter moves before the warning line reaches the test's log reader.
    while warnings_about_associations(&bed) <= warnings_before {
        assert!(
            Instant::now() < deadline,
            "a failed reload logs a warning\n{}",
            bed.agent.logs_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric(&bed, LOADED, &[]).await, 1.0, "the last good set");
    let fresh = Pod::new("team-a", "app", "app-after-bad-edit");
    let response = bed.fetch_as(&fresh).await;
    assert_eq!(response.status, 200, "still serving: {response:?}");
    assert_no_association(&bed.fetch_as(&unassociated.sibling("worker-1")).await);

    // A good edit adding `worker` makes it work.
    bed.associations.write(&[app(), worker.clone()]);
    let (pod, response) = poll_until_status(&bed, "team-a", "worker", 200).await;
    assert_eq!(
        response.status,
        200,
        "the new association did not take effect within {RELOAD_DEADLINE:?}: {response:?}\n{}",
        bed.agent.logs_text()
    );
    assert_eq!(
        only_call_for(&bed, &pod).role_arn.as_deref(),
        Some(worker.role_arn.as_str())
    );
    assert_eq!(metric(&bed, LOADED, &[]).await, 2.0);

    // Removing `app` refuses new pods of it, and a pod already served stops
    // getting its cached credentials as soon as the file is reloaded.
    let cached = bed.token(&first);
    assert_eq!(bed.agent.fetch_credentials(&cached).await.status, 200);
    bed.associations.write(std::slice::from_ref(&worker));
    let (_, response) = poll_until_status(&bed, "team-a", "app", 403).await;
    assert_no_association(&response);
    assert_eq!(metric(&bed, LOADED, &[]).await, 1.0);
    assert_no_association(&bed.agent.fetch_credentials(&cached).await);
}

// --- (f) STS errors ---

/// A fresh pod's request while STS answers `fault`: the response and how long
/// it took.
async fn answer_to(fault: StsFault) -> (StsTestBed, RawResponse, Duration) {
    let bed = StsTestBed::start(&[app()]).await;
    bed.sts.set_fault(fault);
    let token = bed.token(&Pod::new("team-a", "app", "app-0"));
    let started = Instant::now();
    let response = bed.agent.fetch_credentials(&token).await;
    (bed, response, started.elapsed())
}

#[tokio::test]
async fn sts_client_errors_pass_through_with_their_code() {
    let cases = [
        (StsFault::invalid_identity_token(), 400),
        (StsFault::expired_token(), 400),
        (StsFault::access_denied(), 403),
        (StsFault::idp_rejected_claim(), 403),
        (StsFault::region_disabled(), 403),
    ];
    let bed = StsTestBed::start(&[app()]).await;
    for (i, (fault, status)) in cases.into_iter().enumerate() {
        let StsFault::Error { code, .. } = &fault else {
            unreachable!("error faults only")
        };
        let code = code.clone();
        bed.sts.set_fault(fault);
        let pod = Pod::new("team-a", "app", &format!("app-{i}"));
        let response = bed.fetch_as(&pod).await;
        assert_eq!(response.status, status, "{code}: {response:?}");
        assert_eq!(assert_error_body(&response), code, "{response:?}");
    }
}

#[tokio::test]
async fn sts_throttling_is_429_with_retry_after() {
    let (_bed, response, _) = answer_to(StsFault::throttling()).await;
    assert_throttled_with_retry_after(&response);
}

#[tokio::test]
async fn sts_server_errors_are_5xx_within_5s() {
    // A 500 is the upstream's fault: 502. CONTRACT.md allows 502/503/504 for
    // upstream 5xx in general, so an unavailable STS may also be a 503.
    for (fault, allowed) in [
        (StsFault::internal(), 502..=502),
        (StsFault::unavailable(), 502..=504),
    ] {
        let (_bed, response, took) = answer_to(fault.clone()).await;
        assert_failed_in_time(&response, allowed, took, &format!("{fault:?}"));
    }
}

#[tokio::test]
async fn hanging_sts_fails_the_request_within_5s() {
    let (bed, response, took) = answer_to(StsFault::Hang).await;
    assert_failed_in_time(&response, 502..=504, took, "hanging STS");
    assert!(bed.sts.calls() >= 1, "STS was asked");
}

#[tokio::test]
async fn idp_communication_error_is_retried_once() {
    // Transient: the retry succeeds.
    let bed = StsTestBed::start(&[app()]).await;
    bed.sts.fail_next(StsFault::idp_communication_error(), 1);
    let pod = Pod::new("team-a", "app", "app-0");
    let response = bed.fetch_as(&pod).await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(bed.sts.calls_for_pod(&pod.uid), 2, "one retry");

    // Persistent: one retry, then an error.
    let (bed, response, took) = answer_to(StsFault::idp_communication_error()).await;
    assert!(
        matches!(response.status, 400 | 502),
        "expected 400 or 502: {response:?}"
    );
    assert_failed_in_time(&response, 400..=502, took, "IDPCommunicationError");
    assert_eq!(bed.sts.calls(), 2, "retried exactly once");
}

// --- secrets ---

#[tokio::test]
async fn no_sts_secret_or_token_reaches_the_logs() {
    let mut bed = StsTestBed::start(&[app()]).await;
    let mut tokens = Vec::new();
    for name in ["app-a", "app-b"] {
        let token = bed.token(&Pod::new("team-a", "app", name));
        assert_eq!(bed.agent.fetch_credentials(&token).await.status, 200);
        tokens.push(token);
    }
    let unassociated = bed.token(&Pod::new("team-b", "app", "app-0"));
    bed.agent.fetch_credentials(&unassociated).await;
    tokens.push(unassociated);
    bed.sts.set_fault(StsFault::access_denied());
    let denied = bed.token(&Pod::new("team-a", "app", "app-c"));
    bed.agent.fetch_credentials(&denied).await;
    tokens.push(denied);
    bed.agent.sigterm();
    bed.agent.wait_exit(Duration::from_secs(10)).await;

    let logs = bed.agent.logs().join("\n");
    assert!(!logs.is_empty(), "no log output captured");
    let issued = bed.sts.issued();
    assert_eq!(issued.len(), 2);
    for secret in issued
        .iter()
        .flat_map(|c| [&c.secret_access_key, &c.session_token])
        .chain(&tokens)
    {
        assert!(
            !logs.contains(secret.as_str()),
            "a secret reached the logs: {secret}"
        );
    }
}

/// Moving an association to another role takes effect at the next request after the reload,
/// for a pod whose credentials for the old role are cached.
#[tokio::test]
async fn a_changed_role_takes_effect_at_the_next_request() {
    const NEW_ROLE: &str = "arn:aws:iam::111122223333:role/app-v2";
    let bed = StsTestBed::start(&[app()]).await;
    let pod = Pod::new("team-a", "app", "app-0");
    let token = bed.token(&pod);
    let first = bed.agent.fetch_credentials(&token).await;
    assert_eq!(first.status, 200, "{first:?}");
    let reloads = metric(&bed, RELOADS, &[("outcome", "success")]).await;
    bed.associations
        .write(&[Association::new("team-a", "app", NEW_ROLE)]);
    let deadline = Instant::now() + RELOAD_DEADLINE;
    while metric(&bed, RELOADS, &[("outcome", "success")]).await <= reloads {
        assert!(
            Instant::now() < deadline,
            "no reload\n{}",
            bed.agent.logs_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = bed.agent.fetch_credentials(&token).await;
    assert_eq!(second.status, 200, "{second:?}");
    let key = second.json_str("AccessKeyId").unwrap();
    let issued = bed.sts.find_issued(&key).expect("issued by the fake");
    assert!(
        issued.role_arn.contains("assumed-role/app-v2/"),
        "credentials of {} after the role moved to {NEW_ROLE}",
        issued.role_arn
    );
    let calls = bed.sts.calls_for(&pod.uid);
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].role_arn.as_deref(), Some(NEW_ROLE));
}

/// An STS answer whose assumed role is not the associated one (same account) is not served.
#[tokio::test]
async fn an_answer_for_another_role_is_refused() {
    let bed = StsTestBed::start(&[app()]).await;
    bed.sts
        .set_fault(StsFault::AnswerAsRole("admin".to_owned()));
    let response = bed.fetch_as(&Pod::new("team-a", "app", "app-0")).await;
    assert_eq!(response.status, 502, "{response:?}");
    assert_eq!(
        response.json_str("code").as_deref(),
        Some("InvalidUpstreamResponse")
    );
    let issued = only_issued(&bed.sts);
    assert!(!response.text().contains(&issued.access_key_id));
}
