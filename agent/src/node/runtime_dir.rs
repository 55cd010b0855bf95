//! `initialize --runtime-dir`: the node directories the server needs, prepared by the init
//! container (root) for the server's user (not root).
//!
//! The handoff socket lives in a hostPath directory that both the old and the new agent of a
//! node mount, and it carries every pod's credentials: only the agent's uid may enter it. The
//! kubelet creates a `DirectoryOrCreate` hostPath as root, mode 0755, so the init container
//! hands it over. Paths are examined without following a final symlink, and a directory that
//! is already right is left untouched, so running it again changes nothing.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

/// Only the owner may list, enter or create files in it.
pub const MODE: u32 = 0o700;

/// What [`prepare`] did to one directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prepared {
    /// It did not exist and was created.
    pub created: bool,
    /// Its owner or group changed.
    pub chowned: bool,
    /// Its mode changed.
    pub chmodded: bool,
}

/// Why a directory could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeDirError {
    /// The path exists and is not a directory (a symlink is refused, not followed).
    #[error("{0} exists and is not a directory")]
    NotADirectory(String),
    /// A file-system call failed.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RuntimeDirError {
    let path = path.display().to_string();
    move |source| RuntimeDirError::Io { what, path, source }
}

/// `dir` exists, is a directory (not a symlink to one), belongs to `uid:gid` and has mode
/// 0700. The mode is set before the owner, while the directory is still root's: root without
/// `CAP_FOWNER` may change the mode of its own files only.
pub fn prepare(dir: &Path, (uid, gid): (u32, u32)) -> Result<Prepared, RuntimeDirError> {
    let mut done = Prepared {
        created: false,
        chowned: false,
        chmodded: false,
    };
    match std::fs::DirBuilder::new().mode(MODE).create(dir) {
        Ok(()) => done.created = true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("cannot create", dir)(e)),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(io("cannot examine", dir))?;
    if !meta.file_type().is_dir() {
        return Err(RuntimeDirError::NotADirectory(dir.display().to_string()));
    }
    if meta.mode() & 0o7777 != MODE {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(MODE))
            .map_err(io("cannot set the mode of", dir))?;
        done.chmodded = true;
    }
    if (meta.uid(), meta.gid()) != (uid, gid) {
        std::os::unix::fs::lchown(dir, Some(uid), Some(gid))
            .map_err(io("cannot change the owner of", dir))?;
        done.chowned = true;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own() -> (u32, u32) {
        (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        )
    }

    #[test]
    fn creates_a_missing_directory_for_its_owner_alone_then_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        let first = prepare(&dir, own()).unwrap();
        assert!(first.created);
        let meta = std::fs::symlink_metadata(&dir).unwrap();
        assert_eq!(meta.mode() & 0o7777, MODE);
        assert_eq!((meta.uid(), meta.gid()), own());
        let again = prepare(&dir, own()).unwrap();
        assert_eq!(
            again,
            Prepared {
                created: false,
                chowned: false,
                chmodded: false
            }
        );
    }

    #[test]
    fn an_open_directory_is_closed_to_others() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let done = prepare(&dir, own()).unwrap();
        assert!(done.chmodded && !done.created);
        let meta = std::fs::symlink_metadata(&dir).unwrap();
        assert_eq!(meta.mode() & 0o7777, MODE);
    }

    /// As the init container runs it: root hands the directory to the server's user. Root
    /// only (the test command runs as root).
    #[test]
    fn root_gives_the_directory_to_the_servers_user() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("not root: chown to another user cannot be tried");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        std::fs::create_dir(&dir).unwrap();
        let done = prepare(&dir, (65532, 65532)).unwrap();
        assert!(done.chowned);
        let meta = std::fs::symlink_metadata(&dir).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (65532, 65532, MODE)
        );
        assert!(!prepare(&dir, (65532, 65532)).unwrap().chowned);
    }

    #[test]
    fn a_symlink_or_a_file_is_refused_and_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("elsewhere");
        std::fs::create_dir(&target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = tmp.path().join("run");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(
            prepare(&link, own()),
            Err(RuntimeDirError::NotADirectory(_))
        ));
        let meta = std::fs::metadata(&target).unwrap();
        assert_eq!(
            meta.mode() & 0o7777,
            0o755,
            "the link's target is untouched"
        );
        let file = tmp.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(
            prepare(&file, own()),
            Err(RuntimeDirError::NotADirectory(_))
        ));
    }
}
