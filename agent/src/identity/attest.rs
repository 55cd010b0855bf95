//! What binds a verified token to this node and to its caller, checked before anything goes
//! upstream.
//!
//! - Node: since Kubernetes 1.30 a pod-bound token names the node its pod was scheduled to
//!   (`kubernetes.io.node.name`, KEP-4193); a token naming another node was copied out of its
//!   pod.
//! - Caller (`--caller-attestation pod`): the token's pod is a live pod of this node, with
//!   the token's namespace, service account and pod name, and the connection comes from one
//!   of its IPs ([`crate::identity::pods`]).

use std::net::IpAddr;
use std::sync::Arc;

use crate::defence::{self, Defence};
use crate::identity::pods::{NodePods, Refusal, TokenPod};
use crate::identity::token::Identity;

/// `--node-name` and `--require-node-claim`.
#[derive(Debug, Clone, Default)]
pub struct NodeBinding {
    node_name: Option<String>,
    require_claim: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error("the token is bound to a pod on another node")]
    WrongNode,
    #[error("the token names no node, and this agent requires it to (--require-node-claim)")]
    NodeClaimMissing,
    #[error("the token names no pod, and this agent serves only callers it can match to a pod")]
    PodClaimMissing,
    #[error(transparent)]
    Caller(#[from] Refusal),
}

impl AttestError {
    pub fn code(&self) -> &'static str {
        match self {
            AttestError::WrongNode => "WrongNode",
            AttestError::NodeClaimMissing => "NodeClaimMissing",
            AttestError::PodClaimMissing => "PodClaimMissing",
            AttestError::Caller(r) => r.code(),
        }
    }

    /// Refusals that go away by themselves (503 with `Retry-After`, not 403).
    pub fn is_transient(&self) -> bool {
        matches!(self, AttestError::Caller(r) if r.is_transient())
    }
}

/// Every check of this module, in order: node, then caller.
#[derive(Default)]
pub struct Attestation {
    pub node: NodeBinding,
    /// `--caller-attestation pod`: the node's pods.
    pub pods: Option<Arc<NodePods>>,
}

impl Attestation {
    pub async fn check(&self, identity: &Identity, peer: IpAddr) -> Result<(), AttestError> {
        self.node.check(identity)?;
        let Some(pods) = &self.pods else {
            return Ok(());
        };
        if !defence::on(Defence::CallerAttestation) {
            return Ok(());
        }
        // Only verified claims name a pod the agent can trust; without local verification
        // the configuration refuses this mode.
        let Some(claims) = &identity.verified else {
            return Err(AttestError::PodClaimMissing);
        };
        let Some(uid) = &claims.pod_uid else {
            return Err(AttestError::PodClaimMissing);
        };
        let pod = TokenPod {
            uid,
            namespace: &claims.namespace,
            service_account: &claims.service_account,
            name: claims.pod_name.as_deref(),
        };
        pods.check(pod, peer).await?;
        Ok(())
    }
}

impl NodeBinding {
    pub fn new(node_name: Option<String>, require_claim: bool) -> Self {
        NodeBinding {
            node_name,
            require_claim,
        }
    }

    /// Refuse a verified token bound to another node, or (with `--require-node-claim`) one
    /// bound to none. Unverified tokens are left to the upstream: their claims prove nothing.
    pub fn check(&self, identity: &Identity) -> Result<(), AttestError> {
        let (Some(node), Some(claims)) = (&self.node_name, &identity.verified) else {
            return Ok(());
        };
        match &claims.node_name {
            Some(named) if named != node && defence::on(Defence::NodeBinding) => {
                Err(AttestError::WrongNode)
            }
            None if self.require_claim => Err(AttestError::NodeClaimMissing),
            _ => Ok(()),
        }
    }
}
