//! The STS stand-ins checked against the real `aws-sdk-sts`, without the
//! agent: the fake must be understood by the SDK (success XML and Query
//! errors), and moto must be reachable and answer the operation the agent
//! uses. If these fail, sts-backend test failures say nothing about the agent.

use std::time::Duration;

use aws_sdk_sts::config::retry::RetryConfig;
use aws_sdk_sts::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sts::error::ProvideErrorMetadata;
use proto_tests::assertions::assert_parsed_the_only_issuance;
use proto_tests::fakes::sts::{ACTION, API_VERSION};
use proto_tests::{FakeSts, Moto, Pod, StsFault, TestKeys};

const ROLE_ARN: &str = "arn:aws:iam::111122223333:role/team/app";

fn sts_client(endpoint: &str, credentials: Option<Credentials>) -> aws_sdk_sts::Client {
    let mut config = aws_sdk_sts::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-west-2"))
        .endpoint_url(endpoint)
        .retry_config(RetryConfig::disabled());
    if let Some(credentials) = credentials {
        config = config.credentials_provider(credentials);
    }
    aws_sdk_sts::Client::from_conf(config.build())
}

fn pod_token(pod: &Pod) -> String {
    pod.token().sign(&TestKeys::shared().rsa)
}

#[tokio::test]
async fn sts_fake_speaks_the_sdk_wire_format() {
    let fake = FakeSts::start().await;
    let pod = Pod::new("team-a", "app", "app-0");
    let token = pod_token(&pod);
    let out = sts_client(&fake.url(), None)
        .assume_role_with_web_identity()
        .role_arn(ROLE_ARN)
        .role_session_name("team-a-app-0")
        .web_identity_token(&token)
        .duration_seconds(7200)
        .send()
        .await
        .expect("SDK parses the fake's success response");

    let creds = out.credentials().expect("credentials");
    let parsed = [
        creds.access_key_id(),
        creds.secret_access_key(),
        creds.session_token(),
    ];
    assert_parsed_the_only_issuance(&fake, parsed, creds.expiration().secs());
    assert!(creds.secret_access_key().contains(&pod.uid));
    assert!(creds.session_token().contains(&pod.uid));
    let user = out.assumed_role_user().expect("assumed role user");
    assert_eq!(
        user.arn(),
        "arn:aws:sts::111122223333:assumed-role/app/team-a-app-0"
    );
    assert!(user.assumed_role_id().ends_with(":team-a-app-0"));
    assert_eq!(
        out.subject_from_web_identity_token(),
        Some(pod.subject().as_str())
    );
    assert_eq!(out.audience(), Some("pods.eks.amazonaws.com"));
    assert!(out.provider().is_some_and(|p| p.starts_with("oidc.eks.")));

    let calls = fake.call_log();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!((call.method.as_str(), call.path.as_str()), ("POST", "/"));
    assert_eq!(call.action.as_deref(), Some(ACTION));
    assert_eq!(call.version.as_deref(), Some(API_VERSION));
    assert_eq!(call.role_arn.as_deref(), Some(ROLE_ARN));
    assert_eq!(call.role_session_name.as_deref(), Some("team-a-app-0"));
    assert_eq!(call.duration_seconds, Some(7200));
    assert_eq!(call.web_identity_token.as_deref(), Some(token.as_str()));
    assert_eq!(call.pod_uid.as_deref(), Some(pod.uid.as_str()));
    assert!(
        !call.has_authorization(),
        "the SDK sends AssumeRoleWithWebIdentity unsigned: {call:?}"
    );
    assert_eq!(fake.calls_for_pod(&pod.uid), 1);
}

#[tokio::test]
async fn sts_fake_errors_parse_into_their_codes() {
    let fake = FakeSts::start().await;
    let client = sts_client(&fake.url(), None);
    let token = pod_token(&Pod::new("a", "b", "c"));
    for fault in [
        StsFault::invalid_identity_token(),
        StsFault::expired_token(),
        StsFault::access_denied(),
        StsFault::idp_rejected_claim(),
        StsFault::idp_communication_error(),
        StsFault::region_disabled(),
        StsFault::throttling(),
        StsFault::internal(),
    ] {
        let StsFault::Error {
            status,
            code,
            message,
        } = fault.clone()
        else {
            unreachable!("error faults only")
        };
        fake.set_fault(fault);
        let err = client
            .assume_role_with_web_identity()
            .role_arn(ROLE_ARN)
            .role_session_name("s-1")
            .web_identity_token(&token)
            .send()
            .await
            .expect_err("fault configured");
        let raw_status = err.raw_response().map(|r| r.status().as_u16());
        assert_eq!(raw_status, Some(status), "{code}");
        let service = err.into_service_error();
        assert_eq!(service.code(), Some(code.as_str()), "{service:?}");
        assert_eq!(service.message(), Some(message.as_str()));
        match code.as_str() {
            "InvalidIdentityToken" => assert!(service.is_invalid_identity_token_exception()),
            "ExpiredTokenException" => assert!(service.is_expired_token_exception()),
            "IDPRejectedClaim" => assert!(service.is_idp_rejected_claim_exception()),
            "IDPCommunicationError" => assert!(service.is_idp_communication_error_exception()),
            "RegionDisabledException" => assert!(service.is_region_disabled_exception()),
            _ => {}
        }
    }
    assert!(fake.issued().is_empty());
}

#[tokio::test]
async fn sts_fake_hang_and_transient_faults() {
    let fake = FakeSts::start().await;
    let client = sts_client(&fake.url(), None);
    let token = pod_token(&Pod::new("a", "b", "c"));
    let call = || {
        client
            .assume_role_with_web_identity()
            .role_arn(ROLE_ARN)
            .role_session_name("s-1")
            .web_identity_token(&token)
            .send()
    };
    fake.fail_next(StsFault::idp_communication_error(), 1);
    assert!(call().await.is_err(), "the first call fails");
    assert!(call().await.is_ok(), "the second succeeds");

    fake.set_fault(StsFault::Hang);
    assert!(tokio::time::timeout(Duration::from_millis(500), call())
        .await
        .is_err());
    assert!(fake.wait_for_calls(3, Duration::from_secs(1)).await);
    assert!(!fake.wait_for_calls(4, Duration::from_millis(50)).await);
}

#[tokio::test]
async fn moto_answers_assume_role_with_web_identity() {
    let moto = Moto::start().await;
    let role = "arn:aws:iam::444455556666:role/moto-app";
    let out = sts_client(&moto.url(), None)
        .assume_role_with_web_identity()
        .role_arn(role)
        .role_session_name("team-a-app-0")
        .web_identity_token(pod_token(&Pod::new("team-a", "app", "app-0")))
        .duration_seconds(900)
        .send()
        .await
        .unwrap_or_else(|e| panic!("moto: {e:?}\n{}", moto.logs_text()));
    let creds = out.credentials().expect("credentials").clone();
    assert!(!creds.access_key_id().is_empty());
    assert!(!creds.secret_access_key().is_empty());
    assert!(!creds.session_token().is_empty());
    let arn = out.assumed_role_user().expect("assumed role user").arn();
    assert_eq!(
        arn,
        "arn:aws:sts::444455556666:assumed-role/moto-app/team-a-app-0"
    );

    // moto remembers whose credentials these are: the way sts.rs tells that
    // what a pod got through the agent came from moto.
    let who = sts_client(
        &moto.url(),
        Some(Credentials::new(
            creds.access_key_id(),
            creds.secret_access_key(),
            Some(creds.session_token().to_owned()),
            None,
            "moto",
        )),
    )
    .get_caller_identity()
    .send()
    .await
    .unwrap_or_else(|e| panic!("moto GetCallerIdentity: {e:?}\n{}", moto.logs_text()));
    assert_eq!(who.arn(), Some(arn));
    assert_eq!(who.account(), Some("444455556666"));
}
