//! EKS Auth `AssumeRoleForPodIdentity`, signed with the node's own AWS credentials.

use aws_sdk_eksauth::operation::assume_role_for_pod_identity::AssumeRoleForPodIdentityOutput;

use super::{
    account_of_arn, checked_credentials, classify, invalid_response, sdk_config, with_retries,
    Backend, CodePolicy, ConfigError, Credentials, FetchFuture, ResponseSizeLimit,
    SharedHttpClient, UpstreamError,
};
use crate::config::UpstreamConfig;
use crate::defence::{self, Defence};
use crate::identity::token::Identity;

const SERVICE: &str = "EKS Auth";

const POLICY: CodePolicy = CodePolicy {
    service: SERVICE,
    other_codes: &[
        "InternalServerException",
        "InvalidParameterException",
        "InvalidRequestException",
        "ServiceUnavailableException",
    ],
    throttling: &["ThrottlingException"],
    transient: &[],
    association_refusals: &["AccessDeniedException", "ResourceNotFoundException"],
    token_refusals: &["InvalidTokenException", "ExpiredTokenException"],
};

pub struct EksAuth {
    client: aws_sdk_eksauth::Client,
    cluster_name: String,
}

impl EksAuth {
    pub async fn new(config: &UpstreamConfig) -> Result<EksAuth, ConfigError> {
        Self::build(config, None).await
    }

    /// The same backend sending its calls through `http_client` (tests, fuzzing).
    pub async fn with_http_client(
        config: &UpstreamConfig,
        http_client: SharedHttpClient,
    ) -> Result<EksAuth, ConfigError> {
        Self::build(config, Some(http_client)).await
    }

    async fn build(
        config: &UpstreamConfig,
        http_client: Option<SharedHttpClient>,
    ) -> Result<EksAuth, ConfigError> {
        let sdk = sdk_config(config, false, http_client).await?;
        let mut builder =
            aws_sdk_eksauth::config::Builder::from(&sdk).interceptor(ResponseSizeLimit);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint_url(endpoint.clone());
        }
        Ok(EksAuth {
            client: aws_sdk_eksauth::Client::from_conf(builder.build()),
            cluster_name: config.cluster_name.clone(),
        })
    }
}

impl Backend for EksAuth {
    fn fetch<'a>(&'a self, identity: &'a Identity) -> FetchFuture<'a> {
        Box::pin(with_retries(SERVICE, move || async move {
            let out = self
                .client
                .assume_role_for_pod_identity()
                .cluster_name(&self.cluster_name)
                .token(identity.token.expose())
                .send()
                .await
                .map_err(|e| classify(e, &POLICY))?;
            credentials_from(out, identity)
        }))
    }
}

fn credentials_from(
    out: AssumeRoleForPodIdentityOutput,
    identity: &Identity,
) -> Result<Credentials, UpstreamError> {
    let invalid = |what: &str| invalid_response(SERVICE, what);
    // EKS Auth names the service account it issued for. For a verified token that must be
    // the token's own: anything else is a response to some other request, and serving it
    // would hand this pod another workload's role.
    let subject = out.subject().ok_or_else(|| invalid("has no subject"))?;
    if let Some(claims) = identity
        .verified
        .as_ref()
        .filter(|_| defence::on(Defence::EksAuthIdentityCheck))
    {
        if subject.namespace() != claims.namespace
            || subject.service_account() != claims.service_account
        {
            return Err(invalid("names a different service account than the token"));
        }
    }
    let creds = out
        .credentials()
        .ok_or_else(|| invalid("has no credentials"))?;
    let arn = out
        .assumed_role_user()
        .map(|u| u.arn())
        .ok_or_else(|| invalid("has no assumed role"))?;
    let account_id =
        account_of_arn(arn).ok_or_else(|| invalid("has an assumed role ARN without an account"))?;
    let association_id = out
        .pod_identity_association()
        .map(|a| a.association_id().to_owned())
        .filter(|id| !id.is_empty());
    Ok(checked_credentials(SERVICE, creds, account_id)?.issued_for(arn, association_id))
}
