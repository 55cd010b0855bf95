//! Who is asking: JWT verification and the `Identity` it yields, the key sources, the node
//! binding and caller attestation, the node's pod set, and the one Kubernetes client.
//!
//! May import the bottom modules only.

pub mod attest;
pub mod keys;
pub mod kube_api;
pub mod pod_object;
pub mod pods;
pub mod token;
