//! The edge: where requests arrive and answers leave. Listeners (bound, or taken over in a
//! handoff), the accept loop and its connection limits, the credentials route with its Host
//! allow-list and its one deadline, every error mapped to a status and a JSON body; the probe
//! and metrics endpoints, and the probe socket.
//!
//! May import every layer below it: lifecycle (the audit log), credentials, identity, and the
//! bottom modules. Nothing below imports it.

pub mod admin;
pub mod http;
pub mod probe;
pub mod server;
