//! `--startup-taint KEY`: a node registered with a taint of this key gets no workload pods
//! until the agent can serve them; once the agent is ready (what `/readyz` 200 means), it
//! removes every taint with that key from its own node, and nothing else.
//!
//! The write is a merge patch of `spec.taints` that carries the `resourceVersion` the agent
//! read, so the API server applies it only to the node as read: a taint someone added
//! meanwhile is never dropped, the write is refused (409) and the agent reads again. Conflicts
//! and API errors are retried with capped, jittered backoff until it is done; a node without
//! the taint gets no write at all. This runs once per process.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Taint};
use kube::api::{Api, Patch, PatchParams};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::identity::kube_api::error_text;
use crate::lifecycle::readiness::Readiness;
use crate::metrics::Metrics;

/// How often readiness is looked at while waiting for it: a node's pods wait on this, so a
/// short period, and the check itself is a few atomic loads.
const READY_POLL: Duration = Duration::from_millis(100);
/// Backoff after a failed attempt: doubling from the base to the cap, with jitter in [d/2, d].
const RETRY_BASE: Duration = Duration::from_millis(200);
const RETRY_CAP: Duration = Duration::from_secs(30);

/// What one attempt found.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The node had taints with the key; the patch removed them.
    Removed(usize),
    /// The node has no taint with the key: nothing to write.
    Absent,
}

/// Why an attempt failed (each is retried).
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("the node changed since it was read (409)")]
    Conflict,
    #[error("{0}")]
    Api(String),
}

impl AttemptError {
    fn label(&self) -> &'static str {
        match self {
            AttemptError::Conflict => "conflict",
            AttemptError::Api(_) => "error",
        }
    }
}

/// The removal, ready to run once the agent is ready.
pub struct StartupTaint {
    pub key: String,
    pub node: String,
    pub client: kube::Client,
    pub metrics: Metrics,
    /// When the agent started: the removal's time is measured from here.
    pub started: Instant,
}

impl StartupTaint {
    /// Wait until `readiness` holds, then remove the taint, retrying until it is done or
    /// `shutdown` fires.
    pub async fn run(self, readiness: Arc<Readiness>, mut shutdown: watch::Receiver<bool>) {
        loop {
            if readiness.check().is_ok() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(READY_POLL) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
        let api: Api<Node> = Api::all(self.client.clone());
        let mut failures: u32 = 0;
        loop {
            match self.attempt(&api).await {
                Ok(outcome) => {
                    let elapsed = self.started.elapsed();
                    match outcome {
                        Outcome::Removed(n) => {
                            self.metrics.startup_taint_attempt("removed");
                            self.metrics
                                .startup_taint_removal_seconds
                                .set(Some(elapsed));
                            tracing::info!(
                                node = %self.node,
                                key = %self.key,
                                taints = n,
                                after_ms = elapsed.as_millis() as u64,
                                attempts = failures + 1,
                                "startup taint removed: workload pods may be scheduled here now"
                            );
                        }
                        Outcome::Absent => {
                            self.metrics.startup_taint_attempt("absent");
                            tracing::info!(
                                node = %self.node,
                                key = %self.key,
                                "no startup taint on this node: nothing to remove"
                            );
                        }
                    }
                    return;
                }
                Err(e) => {
                    self.metrics.startup_taint_attempt(e.label());
                    failures = failures.saturating_add(1);
                    let wait = backoff(failures);
                    tracing::warn!(
                        node = %self.node,
                        key = %self.key,
                        error = %e,
                        retry_in_ms = wait.as_millis() as u64,
                        "startup taint not removed yet; retrying"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.wait_for(|stop| *stop) => return,
                    }
                }
            }
        }
    }

    /// Read the node; if it has taints with the key, write the rest back, conditional on the
    /// resourceVersion read.
    async fn attempt(&self, api: &Api<Node>) -> Result<Outcome, AttemptError> {
        let node = api
            .get(&self.node)
            .await
            .map_err(|e| AttemptError::Api(error_text(&e)))?;
        let taints: Vec<Taint> = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        let (ours, rest): (Vec<Taint>, Vec<Taint>) =
            taints.into_iter().partition(|t| t.key == self.key);
        if ours.is_empty() {
            return Ok(Outcome::Absent);
        }
        let Some(version) = node.metadata.resource_version.clone() else {
            return Err(AttemptError::Api(
                "the node was read without a resourceVersion".into(),
            ));
        };
        let patch = serde_json::json!({
            "metadata": { "resourceVersion": version },
            // Null deletes the field (RFC 7386) when no taint is left, as kubectl leaves it.
            "spec": { "taints": if rest.is_empty() { serde_json::Value::Null } else { serde_json::json!(rest) } },
        });
        match api
            .patch(&self.node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(Outcome::Removed(ours.len())),
            Err(kube::Error::Api(status)) if status.code == 409 => Err(AttemptError::Conflict),
            Err(e) => Err(AttemptError::Api(error_text(&e))),
        }
    }
}

/// Capped exponential backoff with jitter in [d/2, d] for the `failures`-th failure.
fn backoff(failures: u32) -> Duration {
    let d = RETRY_BASE
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(RETRY_CAP);
    d.mul_f64(0.5 + crate::credentials::cache::random_fraction() / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        for (failures, max) in [(1, 200), (2, 400), (5, 3200), (20, 30_000)] {
            let d = backoff(failures);
            let max = Duration::from_millis(max);
            assert!(d <= max && d >= max / 2, "{failures}: {d:?}");
        }
    }
}
