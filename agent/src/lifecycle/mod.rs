//! What happens around serving rather than in it: handing the listeners and the state to the
//! next agent, removing the node's startup taint once ready, recording first deliveries of
//! credentials to pods, and signals.
//!
//! May import credentials, identity and the bottom modules; the edge calls into it.

pub mod audit;
pub mod handoff;
pub mod readiness;
pub mod shutdown;
pub mod startup_taint;
