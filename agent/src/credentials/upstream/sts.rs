//! STS `AssumeRoleWithWebIdentity` for clusters outside EKS: the pod's verified token is
//! exchanged directly, unsigned (the agent needs no AWS credentials of its own), for the role
//! its service account is associated with in the associations file.

use aws_sdk_sts::operation::assume_role_with_web_identity::AssumeRoleWithWebIdentityOutput;
use std::sync::Arc;

use super::{
    account_of_arn, checked_credentials, classify, invalid_response, sdk_config, with_retries,
    Backend, CodePolicy, ConfigError, Credentials, FailureKind, FetchFuture, ResponseSizeLimit,
    SharedHttpClient, UpstreamError,
};
use crate::config::UpstreamConfig;
use crate::credentials::associations::{Association, AssociationStore};
use crate::defence::{self, Defence};
use crate::identity::token::Identity;

const SERVICE: &str = "STS";

/// STS says `Throttling`; `IDPCommunicationError` means STS could not reach the issuer's keys,
/// which a retry often fixes (the Rust SDK treats it as transient too).
const POLICY: CodePolicy = CodePolicy {
    service: SERVICE,
    other_codes: &[
        "MalformedPolicyDocument",
        "PackedPolicyTooLarge",
        "RegionDisabledException",
        "InvalidParameterValue",
        "ServiceUnavailable",
        "InternalFailure",
    ],
    throttling: &["Throttling", "ThrottlingException"],
    transient: &["IDPCommunicationError"],
    association_refusals: &["AccessDenied"],
    token_refusals: &[
        "InvalidIdentityToken",
        "IDPRejectedClaim",
        "ExpiredTokenException",
    ],
};

/// Regions whose STS calls go to `sts.amazonaws.com` when `AWS_STS_REGIONAL_ENDPOINTS=legacy`.
const LEGACY_GLOBAL_REGIONS: [&str; 16] = [
    "ap-northeast-1",
    "ap-south-1",
    "ap-southeast-1",
    "ap-southeast-2",
    "aws-global",
    "ca-central-1",
    "eu-central-1",
    "eu-north-1",
    "eu-west-1",
    "eu-west-2",
    "eu-west-3",
    "sa-east-1",
    "us-east-1",
    "us-east-2",
    "us-west-1",
    "us-west-2",
];
const GLOBAL_ENDPOINT: &str = "https://sts.amazonaws.com";
/// STS `RoleSessionName`: 2-64 characters of `[\w+=,.@-]`.
const MAX_SESSION_NAME: usize = 64;
/// Hex digits of the pod UID's digest that make a session name unique per pod.
const SESSION_SUFFIX_LEN: usize = 8;

pub struct Sts {
    client: aws_sdk_sts::Client,
    associations: Arc<AssociationStore>,
}

impl Sts {
    pub async fn new(
        config: &UpstreamConfig,
        associations: Arc<AssociationStore>,
    ) -> Result<Sts, ConfigError> {
        Self::build(config, associations, None).await
    }

    /// The same backend sending its calls through `http_client` (tests, fuzzing).
    pub async fn with_http_client(
        config: &UpstreamConfig,
        associations: Arc<AssociationStore>,
        http_client: SharedHttpClient,
    ) -> Result<Sts, ConfigError> {
        Self::build(config, associations, Some(http_client)).await
    }

    async fn build(
        config: &UpstreamConfig,
        associations: Arc<AssociationStore>,
        http_client: Option<SharedHttpClient>,
    ) -> Result<Sts, ConfigError> {
        let sdk = sdk_config(config, true, http_client).await?;
        let mut builder = aws_sdk_sts::config::Builder::from(&sdk).interceptor(ResponseSizeLimit);
        let region = sdk
            .region()
            .map(|r| r.as_ref().to_owned())
            .unwrap_or_default();
        let legacy = std::env::var("AWS_STS_REGIONAL_ENDPOINTS")
            .is_ok_and(|v| v.eq_ignore_ascii_case("legacy"));
        let endpoint = match &config.sts_endpoint {
            Some(e) => Some(e.clone()),
            None if legacy && LEGACY_GLOBAL_REGIONS.contains(&region.as_str()) => {
                Some(GLOBAL_ENDPOINT.to_owned())
            }
            // The SDK's default: the regional endpoint, sts.<region>.amazonaws.com.
            None => None,
        };
        tracing::info!(
            region,
            endpoint = endpoint.as_deref().unwrap_or("regional"),
            "STS backend"
        );
        if let Some(e) = endpoint {
            builder = builder.endpoint_url(e);
        }
        Ok(Sts {
            client: aws_sdk_sts::Client::from_conf(builder.build()),
            associations,
        })
    }

    fn association(&self, identity: &Identity) -> Result<Arc<Association>, UpstreamError> {
        let refuse = |kind, code: &str, message: String| UpstreamError::new(kind, code, message);
        let Some(claims) = &identity.verified else {
            return Err(refuse(
                FailureKind::Rejected { status: 403 },
                "VerificationRequired",
                "the sts backend serves verified tokens only".into(),
            ));
        };
        let association = self
            .associations
            .get(&claims.namespace, &claims.service_account)
            .ok_or_else(|| {
                refuse(
                    FailureKind::AssociationRefused { status: 403 },
                    "NoAssociation",
                    format!(
                        "no role is associated with service account {}/{}",
                        claims.namespace, claims.service_account
                    ),
                )
            })?;
        if let Some(audience) = &association.audience {
            if !claims.audiences.iter().any(|a| a == audience) {
                return Err(refuse(
                    FailureKind::TokenRefused { status: 403 },
                    "AudienceNotAccepted",
                    format!("the association requires a token for audience {audience}"),
                ));
            }
        }
        Ok(association)
    }
}

impl Backend for Sts {
    fn admit(&self, identity: &Identity) -> Result<Option<Arc<str>>, UpstreamError> {
        self.association(identity)
            .map(|a| Some(Arc::<str>::from(a.role_arn.as_str())))
    }

    fn fetch<'a>(&'a self, identity: &'a Identity) -> FetchFuture<'a> {
        Box::pin(async move {
            let association = self.association(identity)?;
            let session = session_name(identity);
            let duration = i32::try_from(association.session_duration.as_secs()).unwrap_or(3600);
            with_retries(SERVICE, || async {
                let out = self
                    .client
                    .assume_role_with_web_identity()
                    .role_arn(&association.role_arn)
                    .role_session_name(&session)
                    .web_identity_token(identity.token.expose())
                    .duration_seconds(duration)
                    .send()
                    .await
                    .map_err(|e| classify(e, &POLICY))?;
                credentials_from(out, &association.role_arn)
            })
            .await
        })
    }
}

/// `<namespace>-<pod name>` (or the service account without pod claims), cut to fit and made
/// unique per pod with a digest of the pod UID (or of the token), in STS's character set.
pub fn session_name(identity: &Identity) -> String {
    let (base, unique) = match &identity.verified {
        Some(c) => (
            format!(
                "{}-{}",
                c.namespace,
                c.pod_name.as_deref().unwrap_or(&c.service_account)
            ),
            c.pod_uid
                .clone()
                .unwrap_or_else(|| identity.token.fingerprint()),
        ),
        None => ("pod".to_owned(), identity.token.fingerprint()),
    };
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, unique.as_bytes());
    let suffix: String = digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()[..SESSION_SUFFIX_LEN]
        .to_owned();
    let clean: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(MAX_SESSION_NAME - SESSION_SUFFIX_LEN - 1)
        .collect();
    format!("{clean}-{suffix}")
}

fn credentials_from(
    out: AssumeRoleWithWebIdentityOutput,
    role_arn: &str,
) -> Result<Credentials, UpstreamError> {
    let invalid = |what: &str| invalid_response(SERVICE, what);
    let creds = out
        .credentials()
        .ok_or_else(|| invalid("has no credentials"))?;
    // The account is the associated role's. An assumed-role user in another account means
    // the answer is not for the role this pod is associated with.
    let account_id =
        account_of_arn(role_arn).ok_or_else(|| invalid("has a role ARN without an account"))?;
    if let Some(user) = out.assumed_role_user() {
        if account_of_arn(user.arn()) != Some(account_id) {
            return Err(invalid(
                "names an assumed role outside the associated role's account",
            ));
        }
        // `arn:aws:sts::<account>:assumed-role/<role name>/<session>` must name the role
        // associated with the pod (`arn:aws:iam::<account>:role/<path>/<role name>`).
        let assumed = user
            .arn()
            .split(':')
            .nth(5)
            .and_then(|r| r.strip_prefix("assumed-role/")?.split('/').next());
        let associated = role_arn.rsplit('/').next();
        if assumed != associated && defence::on(Defence::StsRoleNameCheck) {
            return Err(invalid("names another role than the associated one"));
        }
    }
    let assumed = out
        .assumed_role_user()
        .map(|u| u.arn().to_owned())
        .unwrap_or_default();
    Ok(checked_credentials(SERVICE, creds, account_id)?.issued_for(assumed, None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::token::{Token, VerifiedClaims};

    fn identity(ns: &str, pod: Option<&str>, uid: Option<&str>) -> Identity {
        Identity {
            token: Token::new("a.b.c"),
            verified: Some(std::sync::Arc::new(VerifiedClaims {
                namespace: ns.into(),
                service_account: "sa".into(),
                pod_name: pod.map(Into::into),
                pod_uid: uid.map(Into::into),
                node_name: None,
                audiences: vec!["sts.amazonaws.com".into()],
            })),
            expires_at: None,
        }
    }

    fn valid(name: &str) -> bool {
        (2..=64).contains(&name.len())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c))
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn claims() -> impl Strategy<Value = (String, Option<String>, Option<String>)> {
            (
                any::<String>(),
                proptest::option::of(any::<String>()),
                proptest::option::of(any::<String>()),
            )
        }

        proptest! {
            #[test]
            fn session_names_are_always_valid((ns, pod, uid) in claims(), verified in any::<bool>()) {
                let mut id = identity(&ns, pod.as_deref(), uid.as_deref());
                if !verified {
                    id.verified = None;
                }
                let name = session_name(&id);
                prop_assert!(valid(&name), "{:?}", name);
            }

            #[test]
            fn different_pod_uids_give_different_names(
                (ns, pod, _) in claims(),
                a in any::<String>(),
                b in any::<String>(),
            ) {
                prop_assume!(a != b);
                let name_a = session_name(&identity(&ns, pod.as_deref(), Some(&a)));
                let name_b = session_name(&identity(&ns, pod.as_deref(), Some(&b)));
                prop_assert_ne!(name_a, name_b);
            }
        }
    }

    #[test]
    fn session_names_are_valid_readable_and_unique_per_pod() {
        let a = session_name(&identity("team-a", Some("web-0"), Some("uid-1")));
        let b = session_name(&identity("team-a", Some("web-0"), Some("uid-2")));
        assert!(a.starts_with("team-a-web-0-") && valid(&a), "{a}");
        assert_ne!(
            a, b,
            "a recreated pod with the same name gets a new session name"
        );
        let long = session_name(&identity(
            &"n".repeat(63),
            Some(&"p".repeat(253)),
            Some("u"),
        ));
        assert!(valid(&long) && long.len() == 64, "{long}");
        let odd = session_name(&identity("ns", Some("p/ä:x y"), Some("u")));
        assert!(valid(&odd) && odd.starts_with("ns-p---x-y-"), "{odd}");
        let no_pod = session_name(&identity("ns", None, None));
        assert!(valid(&no_pod) && no_pod.starts_with("ns-sa-"), "{no_pod}");
    }
}
