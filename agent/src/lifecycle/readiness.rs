//! Readiness: whether the agent can answer a pod now, and if not, why. The probes (`/readyz`,
//! the probe socket) report it, and the startup taint waits for it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::identity::keys::KeyStore;
use crate::identity::pods::NodePods;

/// What readiness depends on.
pub struct Readiness {
    pub listeners_bound: AtomicBool,
    pub keys: Option<Arc<KeyStore>>,
    /// `--caller-attestation pod`: the node's pod set.
    pub pods: Option<Arc<NodePods>>,
    /// Set once this agent has handed its listeners to a newer one (`--handoff-socket`).
    pub handed_over: Arc<AtomicBool>,
}

impl Readiness {
    /// `Ok` when the agent can answer a pod, else the reason it cannot.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.handed_over.load(Ordering::Acquire) {
            return Err("handed over to a newer agent; waiting for SIGTERM");
        }
        if !self.listeners_bound.load(Ordering::Acquire) {
            return Err("credential listeners are not bound");
        }
        if self.keys.as_ref().is_some_and(|k| !k.is_loaded()) {
            return Err("verification keys are not loaded");
        }
        if self.pods.as_ref().is_some_and(|p| !p.is_synced()) {
            return Err("this node's pods have not been listed from the Kubernetes API yet (caller attestation)");
        }
        Ok(())
    }
}
