//! `copy-credentials`: keep copies of the node's AWS shared credentials and config files where
//! the non-root server can read them.
//!
//! On EKS hybrid nodes, nodeadm's credential helpers write `/eks-hybrid/.aws/credentials` for
//! root, mode 0600, and rewrite it as the credentials rotate. Rather than run the pod-facing
//! server as root beside that file, the hybrid overlay runs this command in a sidecar that has
//! no port and no capability: it runs as uid 0 (to read the file) with gid 65532, and writes
//! each changed file into a volume shared with the server as root:65532, mode 0640, by an
//! atomic rename. The server (uid 65532, gid 65532) reads the copy and re-reads it as it
//! changes (`--rotate-credentials`).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

/// Larger files are not AWS shared credentials or config files.
const MAX_FILE_BYTES: u64 = 64 * 1024;
/// Readable by the owner and the group the server runs in, nobody else.
const COPY_MODE: u32 = 0o640;

/// Copy each of `names` from `from` to `to` if its content changed. Returns the names copied.
/// A missing source file is skipped (the helper may not have written it yet).
pub fn copy_changed(from: &Path, to: &Path, names: &[String]) -> std::io::Result<Vec<String>> {
    let mut copied = Vec::new();
    for name in names {
        let source = from.join(name);
        let meta = match fs::metadata(&source) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if meta.len() > MAX_FILE_BYTES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is larger than 64 KiB", source.display()),
            ));
        }
        let data = fs::read(&source)?;
        let target = to.join(name);
        if fs::read(&target).is_ok_and(|old| old == data) {
            continue;
        }
        let staging = to.join(format!(".{name}.copying"));
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(COPY_MODE)
            .open(&staging)?;
        file.write_all(&data)?;
        file.sync_all()?;
        // The umask may have narrowed the mode; say it exactly.
        fs::set_permissions(&staging, fs::Permissions::from_mode(COPY_MODE))?;
        fs::rename(&staging, &target)?;
        copied.push(name.clone());
    }
    Ok(copied)
}

/// Copy at once, then every `interval`, until the process is told to stop.
pub async fn run(
    from: &Path,
    to: &Path,
    names: &[String],
    interval: Duration,
) -> std::io::Result<()> {
    loop {
        // The copy is std::fs (open with a mode, fsync, rename) and may wait on a slow volume:
        // off the runtime's thread, so the signal that stops the command is still heard.
        let (from_dir, to_dir, files) = (from.to_owned(), to.to_owned(), names.to_vec());
        let round = tokio::task::spawn_blocking(move || copy_changed(&from_dir, &to_dir, &files))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match round {
            Ok(copied) if !copied.is_empty() => {
                tracing::info!(files = ?copied, to = %to.display(), "copied changed credential files")
            }
            Ok(_) => {}
            // Keep going: the next round may succeed, and the copies in place stay valid.
            Err(e) => {
                tracing::warn!(from = %from.display(), error = %e, "could not copy the credential files")
            }
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_changed_files_only_with_mode_0640() {
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        let names = vec!["credentials".to_owned(), "config".to_owned()];
        fs::write(from.path().join("credentials"), "[default]\nk=1\n").unwrap();
        let copied = copy_changed(from.path(), to.path(), &names).unwrap();
        assert_eq!(copied, ["credentials"], "config is missing: skipped");
        let target = to.path().join("credentials");
        assert_eq!(fs::read_to_string(&target).unwrap(), "[default]\nk=1\n");
        assert_eq!(
            fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert!(copy_changed(from.path(), to.path(), &names)
            .unwrap()
            .is_empty());
        fs::write(from.path().join("credentials"), "[default]\nk=2\n").unwrap();
        assert_eq!(
            copy_changed(from.path(), to.path(), &names).unwrap(),
            ["credentials"]
        );
        assert_eq!(fs::read_to_string(&target).unwrap(), "[default]\nk=2\n");
    }
}
