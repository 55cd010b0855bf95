//! EKS Auth `AssumeRoleForPodIdentity`, signed with the node's own AWS credentials.
//!
//! The SDK's retries are turned off and replaced by [`MAX_ATTEMPTS`] explicit attempts inside
//! [`OPERATION_TIMEOUT`]: a pod's SDK gives up on us after 1 s (JS) or 2 s (botocore) per
//! attempt and retries on its own, so the agent must answer within the contract's 5 s even
//! when EKS Auth hangs, and must not multiply a throttled call into more calls.

use std::time::{Duration, SystemTime};

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_eksauth::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_eksauth::operation::assume_role_for_pod_identity::{
    AssumeRoleForPodIdentityError, AssumeRoleForPodIdentityOutput,
};

use super::{
    account_of_arn, Backend, Credentials, FailureKind, FetchFuture, Secret, UpstreamError,
};
use crate::config::Config;
use crate::token::Identity;

/// TCP+TLS connect budget; a healthy regional endpoint connects in tens of milliseconds.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);
/// One attempt; EKS Auth answers in well under a second when healthy.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(2000);
/// Whole call, retries included: below the contract's 5 s for a failing fresh request.
pub const OPERATION_TIMEOUT: Duration = Duration::from_millis(4500);
/// One retry for transient failures (5xx, timeouts, broken connections); never for throttling.
const MAX_ATTEMPTS: u32 = 2;
/// Pause before the retry.
const RETRY_DELAY: Duration = Duration::from_millis(100);
/// Upstream messages are shown to pods; keep them bounded.
const MAX_MESSAGE_LEN: usize = 512;

#[derive(Debug, thiserror::Error)]
#[error("--{flag}: {message}")]
pub struct SetupError {
    pub flag: &'static str,
    pub message: String,
}

pub struct EksAuth {
    client: aws_sdk_eksauth::Client,
    cluster_name: String,
}

impl EksAuth {
    pub async fn new(config: &Config) -> Result<EksAuth, SetupError> {
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .operation_attempt_timeout(ATTEMPT_TIMEOUT)
            .operation_timeout(OPERATION_TIMEOUT)
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .timeout_config(timeouts)
            .retry_config(RetryConfig::disabled());
        if let Some(region) = &config.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(creds) = &config.static_upstream_credentials {
            loader = loader.credentials_provider(aws_sdk_eksauth::config::Credentials::new(
                creds.access_key_id.clone(),
                creds.secret_access_key.clone(),
                None,
                None,
                "pod-identity-agent-dev",
            ));
        }
        let sdk = loader.load().await;
        if sdk.region().is_none() {
            return Err(SetupError {
                flag: "region",
                message: "no AWS region configured (set --region or AWS_REGION)".into(),
            });
        }
        let mut builder = aws_sdk_eksauth::config::Builder::from(&sdk);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint_url(endpoint.clone());
        }
        Ok(EksAuth {
            client: aws_sdk_eksauth::Client::from_conf(builder.build()),
            cluster_name: config.cluster_name.clone(),
        })
    }

    async fn call(&self, identity: &Identity) -> Result<Credentials, UpstreamError> {
        let mut attempt = 1;
        loop {
            let result = self
                .client
                .assume_role_for_pod_identity()
                .cluster_name(&self.cluster_name)
                .token(identity.token.expose())
                .send()
                .await;
            match result {
                Ok(out) => return credentials_from(out),
                Err(e) => {
                    let err = classify(e);
                    if attempt >= MAX_ATTEMPTS || !err.kind.is_transient() {
                        return Err(err);
                    }
                    tracing::debug!(attempt, code = %err.code, "retrying EKS Auth call");
                    attempt += 1;
                    tokio::time::sleep(RETRY_DELAY).await;
                }
            }
        }
    }
}

impl Backend for EksAuth {
    fn fetch<'a>(&'a self, identity: &'a Identity) -> FetchFuture<'a> {
        Box::pin(async move {
            match tokio::time::timeout(OPERATION_TIMEOUT, self.call(identity)).await {
                Ok(result) => result,
                Err(_) => Err(UpstreamError::new(
                    FailureKind::Timeout,
                    "UpstreamTimeout",
                    "EKS Auth did not answer in time",
                )),
            }
        })
    }
}

fn credentials_from(out: AssumeRoleForPodIdentityOutput) -> Result<Credentials, UpstreamError> {
    let invalid = |what: &str| {
        UpstreamError::new(
            FailureKind::InvalidResponse,
            "InvalidUpstreamResponse",
            format!("EKS Auth response {what}"),
        )
    };
    let creds = out
        .credentials()
        .ok_or_else(|| invalid("has no credentials"))?;
    let arn = out
        .assumed_role_user()
        .map(|u| u.arn())
        .ok_or_else(|| invalid("has no assumed role"))?;
    let account_id =
        account_of_arn(arn).ok_or_else(|| invalid("has an assumed role ARN without an account"))?;
    let expiration = SystemTime::try_from(*creds.expiration())
        .map_err(|_| invalid("has an unrepresentable expiration"))?;
    if creds.access_key_id().is_empty()
        || creds.secret_access_key().is_empty()
        || creds.session_token().is_empty()
    {
        return Err(invalid("has empty credential fields"));
    }
    Ok(Credentials {
        access_key_id: creds.access_key_id().to_owned(),
        secret_access_key: Secret::new(creds.secret_access_key()),
        session_token: Secret::new(creds.session_token()),
        account_id: account_id.to_owned(),
        expiration,
    })
}

fn bounded(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(MAX_MESSAGE_LEN)
        .collect()
}

fn classify<R>(err: SdkError<AssumeRoleForPodIdentityError, R>) -> UpstreamError
where
    R: std::fmt::Debug + HasStatus,
{
    match &err {
        SdkError::ServiceError(se) => {
            let status = se.raw().status_code();
            let e = se.err();
            let code = e
                .code()
                .map(bounded)
                .unwrap_or_else(|| "UnknownError".into());
            let message = e.message().map(bounded).unwrap_or_default();
            let kind = if code == "ThrottlingException" || status == 429 {
                FailureKind::Throttled
            } else if status >= 500 {
                FailureKind::Server { status }
            } else if (400..500).contains(&status) {
                FailureKind::Rejected { status }
            } else {
                FailureKind::InvalidResponse
            };
            UpstreamError::new(kind, code, message)
        }
        SdkError::TimeoutError(_) => UpstreamError::new(
            FailureKind::Timeout,
            "UpstreamTimeout",
            "EKS Auth did not answer in time",
        ),
        SdkError::DispatchFailure(d) if d.is_timeout() => UpstreamError::new(
            FailureKind::Timeout,
            "UpstreamTimeout",
            "EKS Auth did not answer in time",
        ),
        SdkError::DispatchFailure(d) if d.is_user() || d.is_other() => UpstreamError::new(
            FailureKind::Internal,
            "UpstreamRequestFailed",
            bounded(&DisplayErrorContext(&err).to_string()),
        ),
        SdkError::DispatchFailure(_) => UpstreamError::new(
            FailureKind::Unreachable,
            "UpstreamUnreachable",
            format!(
                "could not reach EKS Auth: {}",
                bounded(&DisplayErrorContext(&err).to_string())
            ),
        ),
        SdkError::ResponseError(_) => UpstreamError::new(
            FailureKind::InvalidResponse,
            "InvalidUpstreamResponse",
            "EKS Auth sent a response that could not be read",
        ),
        _ => UpstreamError::new(
            FailureKind::Internal,
            "UpstreamRequestFailed",
            bounded(&DisplayErrorContext(&err).to_string()),
        ),
    }
}

/// The raw response's status, abstracted so [`classify`] can be unit-tested.
pub trait HasStatus {
    fn status_code(&self) -> u16;
}

impl HasStatus for aws_sdk_eksauth::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}
