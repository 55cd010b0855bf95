//! Unix sockets the agent listens on (the handoff socket, the probe socket): only the agent's
//! own user may connect.

use tokio::net::UnixListener;

/// A Unix socket at `path` that only this process's user may connect to (mode 0600; created
/// under a umask that never lets it be wider, even for an instant). A file left there by a
/// process that is gone is replaced.
pub fn bind_owner_only(path: &std::path::Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}
