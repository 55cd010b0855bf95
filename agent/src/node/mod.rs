//! Node set-up, the subcommands that are not the server: `initialize` (the link-local link and
//! addresses, and the server's directories on the node) and the hybrid nodes' credentials
//! copier.
//!
//! May import the bottom modules only.

pub mod copy;
pub mod netlink;
pub mod runtime_dir;
