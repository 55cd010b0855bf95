//! Black-box test harness for `pod-identity-agent`.
//!
//! The tests in `tests/` start the real agent binary on ephemeral loopback
//! ports and point it at wire-level fakes of the services it talks to:
//!
//! - [`fakes::eks_auth`]: EKS Auth `AssumeRoleForPodIdentity` (restJson1), with
//!   call counters, injectable latency and faults;
//! - [`fakes::jwks`]: a JWKS document and OIDC discovery endpoint.
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
pub mod clients;
pub mod fakes;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod testbed;

pub use agent::{Agent, AgentBuilder};
pub use fakes::eks_auth::{FakeEksAuth, Fault, IssuedCredentials};
pub use fakes::jwks::FakeJwks;
pub use keys::{Pod, SigningKey, TestKeys, TokenBuilder};
pub use testbed::TestBed;
