//! EKS Auth `AssumeRoleForPodIdentity`, signed with the node's own AWS credentials.

use std::time::SystemTime;

use aws_sdk_eksauth::operation::assume_role_for_pod_identity::AssumeRoleForPodIdentityOutput;

use super::{
    account_of_arn, classify, invalid_response, sdk_config, with_retries, Backend, CodePolicy,
    Credentials, FetchFuture, Secret, SetupError, UpstreamError,
};
use crate::config::Config;
use crate::token::Identity;

const SERVICE: &str = "EKS Auth";

const POLICY: CodePolicy = CodePolicy {
    service: SERVICE,
    throttling: &["ThrottlingException"],
    transient: &[],
};

pub struct EksAuth {
    client: aws_sdk_eksauth::Client,
    cluster_name: String,
}

impl EksAuth {
    pub async fn new(config: &Config) -> Result<EksAuth, SetupError> {
        let sdk = sdk_config(config, false).await?;
        let mut builder = aws_sdk_eksauth::config::Builder::from(&sdk);
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
            credentials_from(out)
        }))
    }
}

fn credentials_from(out: AssumeRoleForPodIdentityOutput) -> Result<Credentials, UpstreamError> {
    let invalid = |what: &str| invalid_response(SERVICE, what);
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
