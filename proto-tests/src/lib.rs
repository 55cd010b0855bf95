//! Black-box test harness for `pod-identity-agent`.
//!
//! The tests in `tests/` start the real agent binary on ephemeral loopback
//! ports and point it at wire-level fakes of the services it talks to:
//!
//! - [`fakes::eks_auth`]: EKS Auth `AssumeRoleForPodIdentity` (restJson1), with
//!   call counters, injectable latency and faults;
//! - [`fakes::sts`]: STS `AssumeRoleWithWebIdentity` (Query protocol, XML),
//!   for the agent's sts backend, with the same counters and faults;
//! - [`fakes::moto`]: moto's standalone server, a third-party STS emulator;
//! - [`fakes::jwks`]: a JWKS document and OIDC discovery endpoint;
//! - [`fakes::kube_api`]: a Kubernetes API server (TLS, bearer token, kubeconfig) serving
//!   pods to list, watch and GET the way kube-apiserver does, with outages, lagging
//!   watches and compaction as switches.
//!
//! The sts backend reads an associations file, written by [`associations`].
//!
//! Tokens are minted by [`keys`] with keys generated at run time, requests are
//! sent with the byte-exact client in [`http`] (so tests can send what a real
//! client never would), and [`clients`] runs the real AWS SDKs (Rust, Python,
//! JavaScript) against the agent.
//!
//! Everything listens on and talks to `127.0.0.1` only, and every wait is
//! bounded in time so a misbehaving agent fails a test instead of hanging it.

#![forbid(unsafe_code)]

pub mod agent;
pub mod assertions;
pub mod associations;
pub mod clients;
pub mod fakes;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod testbed;

pub use agent::{Agent, AgentBuilder};
pub use associations::Association;
pub use fakes::eks_auth::{FakeEksAuth, Fault, IssuedCredentials};
pub use fakes::jwks::FakeJwks;
pub use fakes::kube_api::{FakeKubeApi, GetAnswer, KubePod};
pub use fakes::moto::Moto;
pub use fakes::sts::{FakeSts, StsFault};
pub use keys::{Pod, SigningKey, TestKeys, TokenBuilder};
pub use testbed::{StsTestBed, TestBed};
