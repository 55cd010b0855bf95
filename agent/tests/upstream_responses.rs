//! Hostile and broken 200 answers from EKS Auth and STS, parsed by the SDK exactly as off the
//! wire (the fuzz harness's in-memory upstream): the backend hands a pod only credentials of
//! the right shape, for the right service account or account, with a believable expiration,
//! from a body of bounded size.

#[path = "../../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod harness;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use harness::Upstreams;
use pod_identity_agent::credentials::upstream::{
    Credentials, FailureKind, UpstreamError, MAX_CREDENTIAL_LIFETIME, MAX_RESPONSE_BYTES,
};
use serde_json::{json, Value};

const KEY_ID: &str = "ASIAHOSTILEEXAMPLE01";
const SECRET: &str = "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY";
const TOKEN: &str = "IQoJb3JpZ2luX2VjEHostileExampleToken";

fn in_an_hour() -> u64 {
    (SystemTime::now() + Duration::from_secs(3600))
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A well-formed EKS Auth answer for team-a/app, with `edit` applied.
fn eks_body(edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut doc = json!({
        "subject": {"namespace": "team-a", "serviceAccount": "app"},
        "audience": "pods.eks.amazonaws.com",
        "podIdentityAssociation": {
            "associationArn": "arn:aws:eks:us-west-2:111122223333:podidentityassociation/c/a-1",
            "associationId": "a-1"
        },
        "assumedRoleUser": {
            "arn": "arn:aws:sts::111122223333:assumed-role/app/s",
            "assumedRoleId": "AROAEXAMPLE:s"
        },
        "credentials": {
            "accessKeyId": KEY_ID,
            "secretAccessKey": SECRET,
            "sessionToken": TOKEN,
            "expiration": in_an_hour()
        }
    });
    edit(&mut doc);
    doc.to_string().into_bytes()
}

/// A well-formed STS answer, with the given credential fields and assumed-role ARN.
fn sts_body(key_id: &str, token: &str, expiration: &str, arn: &str, padding: &str) -> Vec<u8> {
    format!(
        "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
         <AssumeRoleWithWebIdentityResult><Credentials>\
         <AccessKeyId>{key_id}</AccessKeyId><SecretAccessKey>{SECRET}</SecretAccessKey>\
         <SessionToken>{token}</SessionToken><Expiration>{expiration}</Expiration>\
         </Credentials><AssumedRoleUser><AssumedRoleId>AROAEXAMPLE:s</AssumedRoleId>\
         <Arn>{arn}</Arn></AssumedRoleUser><Provider>{padding}</Provider>\
         </AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>"
    )
    .into_bytes()
}

const SESSION_ARN: &str = "arn:aws:sts::111122223333:assumed-role/app/s";

fn iso_in(seconds: u64) -> String {
    let t = SystemTime::now() + Duration::from_secs(seconds);
    aws_smithy_types::DateTime::from(t)
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap()
}

fn sts_valid(padding: &str) -> Vec<u8> {
    sts_body(KEY_ID, TOKEN, &iso_in(3600), SESSION_ARN, padding)
}

fn invalid(result: Result<Credentials, UpstreamError>, what: &str) -> UpstreamError {
    match result {
        Ok(c) => panic!("{what}: accepted as {}", c.access_key_id),
        Err(e) => {
            assert_eq!(e.kind, FailureKind::InvalidResponse, "{what}: {e:?}");
            e
        }
    }
}

#[test]
fn a_well_formed_eks_auth_answer_is_accepted() {
    let up = Upstreams::new();
    let creds = up.eks_auth(200, &eks_body(|_| {})).expect("accepted");
    assert_eq!(creds.access_key_id, KEY_ID);
    assert_eq!(creds.secret_access_key(), SECRET);
    assert_eq!(creds.session_token(), TOKEN);
    assert_eq!(creds.account_id, "111122223333");
}

#[test]
fn an_eks_auth_answer_for_another_service_account_is_refused() {
    let up = Upstreams::new();
    for (ns, sa) in [("team-b", "app"), ("team-a", "admin")] {
        let body = eks_body(|d| d["subject"] = json!({"namespace": ns, "serviceAccount": sa}));
        let e = invalid(up.eks_auth(200, &body), "another subject");
        assert!(e.message.contains("different service account"), "{e:?}");
    }
    let body = eks_body(|d| {
        d.as_object_mut().unwrap().remove("subject");
    });
    invalid(up.eks_auth(200, &body), "no subject");
}

#[test]
fn eks_auth_credentials_of_the_wrong_shape_are_refused() {
    let up = Upstreams::new();
    let cases: [(&str, &str, Value); 8] = [
        (
            "header injection in the token",
            "sessionToken",
            json!("abc\r\nX-Injected: 1"),
        ),
        (
            "a space in the secret",
            "secretAccessKey",
            json!("wJalr XUtn"),
        ),
        (
            "non-ASCII secret",
            "secretAccessKey",
            json!("s\u{e9}cret-key-value"),
        ),
        ("a short key id", "accessKeyId", json!("ASIA")),
        (
            "a key id with punctuation",
            "accessKeyId",
            json!("ASIA/../../EXAMPLE"),
        ),
        ("an oversized key id", "accessKeyId", json!("A".repeat(129))),
        ("an empty token", "sessionToken", json!("")),
        (
            "an oversized secret",
            "secretAccessKey",
            json!("s".repeat(257)),
        ),
    ];
    for (what, field, value) in cases {
        let body = eks_body(|d| d["credentials"][field] = value);
        invalid(up.eks_auth(200, &body), what);
    }
}

#[test]
fn an_expiration_beyond_any_real_session_is_refused() {
    let up = Upstreams::new();
    let too_far = SystemTime::now() + MAX_CREDENTIAL_LIFETIME + Duration::from_secs(3600);
    let secs = too_far.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let e = invalid(
        up.eks_auth(
            200,
            &eks_body(|d| d["credentials"]["expiration"] = json!(secs)),
        ),
        "a day and more away",
    );
    assert!(e.message.contains("expiration"), "{e:?}");
    for absurd in [json!(1e300), json!(-1e12), json!("soon"), json!(null)] {
        let body = eks_body(|d| d["credentials"]["expiration"] = absurd.clone());
        invalid(up.eks_auth(200, &body), &format!("expiration {absurd}"));
    }
    // 12 h, the longest real session, passes.
    let twelve = in_an_hour() + 11 * 3600;
    up.eks_auth(
        200,
        &eks_body(|d| d["credentials"]["expiration"] = json!(twelve)),
    )
    .expect("a 12 h session");
}

#[test]
fn eks_auth_bodies_past_the_size_cap_are_refused_and_just_under_it_read() {
    let up = Upstreams::new();
    // Unknown members are skipped by the parser, so padding keeps the answer valid.
    let under = eks_body(|d| d["padding"] = json!("x".repeat(MAX_RESPONSE_BYTES - 2048)));
    assert!(under.len() < MAX_RESPONSE_BYTES);
    up.eks_auth(200, &under).expect("a body under the cap");
    let over = eks_body(|d| d["padding"] = json!("x".repeat(MAX_RESPONSE_BYTES)));
    invalid(up.eks_auth(200, &over), "a body over the cap");
    let huge = eks_body(|d| d["padding"] = json!("x".repeat(16 << 20)));
    invalid(up.eks_auth(200, &huge), "a 16 MiB body");
}

#[test]
fn unparseable_eks_auth_bodies_are_invalid_responses() {
    let up = Upstreams::new();
    let full = eks_body(|_| {});
    let bodies: [&[u8]; 5] = [
        b"",
        b"<html>502 proxy error</html>",
        &full[..full.len() / 2],
        b"{\"credentials\": []}",
        b"null",
    ];
    for body in bodies {
        invalid(
            up.eks_auth(200, body),
            &String::from_utf8_lossy(&body[..body.len().min(40)]),
        );
    }
}

#[test]
fn a_well_formed_sts_answer_is_accepted() {
    let up = Upstreams::new();
    let creds = up.sts(200, &sts_valid("")).expect("accepted");
    assert_eq!(creds.access_key_id, KEY_ID);
    assert_eq!(creds.session_token(), TOKEN);
    assert_eq!(creds.account_id, "111122223333");
}

#[test]
fn an_sts_answer_for_a_role_in_another_account_is_refused() {
    let up = Upstreams::new();
    let body = sts_body(
        KEY_ID,
        TOKEN,
        &iso_in(3600),
        "arn:aws:sts::999988887777:assumed-role/app/s",
        "",
    );
    let e = invalid(up.sts(200, &body), "another account");
    assert!(e.message.contains("account"), "{e:?}");
}

#[test]
fn hostile_sts_answers_are_refused() {
    let up = Upstreams::new();
    let far = iso_in(MAX_CREDENTIAL_LIFETIME.as_secs() + 3600);
    invalid(
        up.sts(200, &sts_body(KEY_ID, TOKEN, &far, SESSION_ARN, "")),
        "far expiration",
    );
    invalid(
        up.sts(200, &sts_body(KEY_ID, TOKEN, "tomorrow", SESSION_ARN, "")),
        "unparseable expiration",
    );
    invalid(
        up.sts(
            200,
            &sts_body(
                KEY_ID,
                "abc&#10;X-Injected: 1",
                &iso_in(3600),
                SESSION_ARN,
                "",
            ),
        ),
        "an entity-encoded newline in the token",
    );
    invalid(
        up.sts(200, &sts_body("", TOKEN, &iso_in(3600), SESSION_ARN, "")),
        "an empty key id",
    );
    let over = sts_valid(&"x".repeat(MAX_RESPONSE_BYTES));
    invalid(up.sts(200, &over), "a body over the cap");
    let under = sts_valid(&"x".repeat(MAX_RESPONSE_BYTES - 2048));
    up.sts(200, &under).expect("a body under the cap");
    invalid(up.sts(200, b"{\"Credentials\":{}}"), "JSON instead of XML");
}

#[test]
fn hostile_discovery_documents_name_no_key_url() {
    use pod_identity_agent::identity::keys::jwks_uri_from_discovery;
    let ok = jwks_uri_from_discovery(br#"{"jwks_uri":"https://oidc.test/keys"}"#).unwrap();
    assert_eq!(ok.to_string(), "https://oidc.test/keys");
    for doc in [
        &br#"{"jwks_uri":"file:///etc/shadow"}"#[..],
        br#"{"jwks_uri":"/keys"}"#,
        br#"{"jwks_uri":"https://"}"#,
        br#"{"jwks_uri":7}"#,
        br#"{}"#,
        b"<html/>",
    ] {
        assert!(
            jwks_uri_from_discovery(doc).is_err(),
            "{}",
            String::from_utf8_lossy(doc)
        );
    }
}
