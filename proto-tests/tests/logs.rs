//! Logs: JSON lines, and never a secret. Every token sent and every secret
//! issued during a mixed run of good and bad requests is searched for in
//! everything the agent wrote: its log and its audit log.

use std::time::Duration;

use proto_tests::agent::CREDENTIALS_PATH;
use proto_tests::{Fault, Pod, TestBed, TestKeys};

#[tokio::test]
async fn no_secret_or_token_reaches_the_logs() {
    let audit = tempfile::tempdir().unwrap();
    let audit_log = audit.path().join("audit.log");
    let mut bed = TestBed::builder()
        .arg("--audit-log")
        .arg(&audit_log)
        .start()
        .await;
    let keys = bed.keys;
    let a = Pod::new("team-a", "app", "app-a");
    let b = a.sibling("app-b");
    let denied = Pod::new("team-b", "nobody", "nobody-0");

    let mut sent = vec![
        bed.token(&a),
        a.token().sign(&keys.rsa), // rotation
        b.token().sign(&keys.ec),
        a.token()
            .kid(keys.rsa.kid())
            .sign(TestKeys::untrusted_rsa()),
        a.token().expired().sign(&keys.rsa),
        a.token().sign_alg_none(&keys.rsa),
        a.token().sign_hs256_with_public_key(&keys.rsa),
        a.token().audience(["sts.amazonaws.com"]).sign(&keys.rsa),
        "garbage.token.value".to_owned(),
    ];
    for token in &sent {
        bed.agent.fetch_credentials(token).await;
    }
    // Upstream failures log too.
    bed.upstream.set_fault(Fault::access_denied());
    let denied_token = bed.token(&denied);
    bed.agent.fetch_credentials(&denied_token).await;
    sent.push(denied_token);
    bed.upstream.set_fault(Fault::Ok);
    // And a request with a spoofed Host.
    let spoofed = b.token().sign(&keys.rsa);
    bed.agent
        .get(
            CREDENTIALS_PATH,
            &[("Host", "evil.example"), ("Authorization", &spoofed)],
        )
        .await;
    sent.push(spoofed);

    assert!(
        bed.upstream.issued().len() >= 2,
        "the run issued credentials"
    );
    bed.agent.sigterm();
    bed.agent.wait_exit(Duration::from_secs(10)).await;

    let mut logs = bed.agent.logs();
    assert!(!logs.is_empty(), "no log output captured");
    let audited = std::fs::read_to_string(&audit_log).unwrap_or_default();
    assert!(
        audited.lines().count() >= 2,
        "the audit log recorded the deliveries:\n{audited}"
    );
    logs.extend(audited.lines().map(str::to_owned));
    let mut leaks = Vec::new();
    for issued in bed.upstream.issued() {
        for (what, secret) in [
            ("secret access key", &issued.secret_access_key),
            ("session token", &issued.session_token),
        ] {
            if let Some(line) = logs.iter().find(|l| l.contains(secret.as_str())) {
                leaks.push(format!("{what} of {}: {line}", issued.access_key_id));
            }
        }
    }
    for token in &sent {
        // The whole token, or its signature alone, is enough to replay it.
        let signature = token.rsplit('.').next().unwrap_or_default();
        for (what, needle) in [("token", token.as_str()), ("token signature", signature)] {
            if needle.len() < 16 {
                continue;
            }
            if let Some(line) = logs.iter().find(|l| l.contains(needle)) {
                leaks.push(format!("{what}: {line}"));
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "secrets in the logs:\n{}",
        leaks.join("\n")
    );
}

/// Top-level keys of a JSON object, in order and with repeats (a `Value`
/// would silently keep only the last of two equal keys).
struct ObjectKeys(Vec<String>);

impl<'de> serde::Deserialize<'de> for ObjectKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = ObjectKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<ObjectKeys, A::Error> {
                let mut keys = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    keys.push(key);
                }
                Ok(ObjectKeys(keys))
            }
        }
        d.deserialize_map(Keys)
    }
}

#[tokio::test]
async fn every_log_line_is_a_json_object_with_unique_keys() {
    let mut bed = TestBed::start().await;
    let pod = Pod::new("team-a", "app", "app-0");
    bed.fetch_as(&pod).await;
    bed.agent.fetch_credentials("not-a-token").await;
    // Upstream errors carry a message of their own; it must not clobber the
    // log line's `message`.
    bed.upstream.set_fault(Fault::access_denied());
    bed.fetch_as(&Pod::new("team-b", "other", "other-0")).await;
    bed.agent.sigterm();
    bed.agent.wait_exit(Duration::from_secs(10)).await;
    let mut bad = Vec::new();
    for line in bed.agent.logs() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<ObjectKeys>(&line) {
            Err(e) => bad.push(format!("not a JSON object ({e}): {line}")),
            Ok(ObjectKeys(keys)) => {
                let mut seen = std::collections::HashSet::new();
                if let Some(dup) = keys.iter().find(|k| !seen.insert(k.as_str())) {
                    bad.push(format!("duplicate key {dup:?}: {line}"));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "--log-format json wants one JSON object per line:\n{}",
        bad.join("\n")
    );
}
