//! What binds a verified token to this node. Since Kubernetes 1.30 a pod-bound token names the
//! node its pod was scheduled to (`kubernetes.io.node.name`, KEP-4193); a token naming another
//! node was copied out of its pod, and is refused here before anything goes upstream.

use crate::defence::{self, Defence};
use crate::token::Identity;

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
}

impl AttestError {
    pub fn code(&self) -> &'static str {
        match self {
            AttestError::WrongNode => "WrongNode",
            AttestError::NodeClaimMissing => "NodeClaimMissing",
        }
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
