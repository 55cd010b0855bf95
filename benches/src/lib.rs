//! Speed and load measurements for `pod-identity-agent`, kept out of its tests on purpose: a
//! benchmark reports a number, it does not pass or fail on wall time.
//!
//! - `benches/hot_paths.rs`, `benches/request.rs`: criterion benches of the library's hot
//!   paths (`cargo bench -p benches`).
//! - `src/bin/load.rs`: the load tool. It drives the real agent binary and a minimal hyper
//!   server (the baseline) with the same client and prints one table per scenario.
//!
//! The modules here are what both share: pods and their signed tokens ([`pods`]), a
//! wire-level EKS Auth and STS fake ([`fake_upstream`]), a bare HTTP/1.1 server loop ([`server`]) and
//! the baseline built on it ([`baseline`]), a keep-alive client ([`client`]), the load
//! patterns ([`drive`]), child processes ([`process`]) and the result table ([`report`]).

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
#![forbid(unsafe_code)]

pub mod baseline;
pub mod client;
pub mod drive;
pub mod fake_upstream;
pub mod pods;
pub mod process;
pub mod report;
pub mod server;

/// Worker threads of the agent's runtime: `min(cores, 4)`, as `agent/src/main.rs` sets it.
/// The baseline and the in-process bench use the same number so the comparison is fair.
pub const AGENT_MAX_WORKER_THREADS: usize = 4;

/// The agent's runtime size on this machine.
pub fn agent_worker_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .min(AGENT_MAX_WORKER_THREADS)
}
