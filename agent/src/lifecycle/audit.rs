//! The audit log (`--audit-log`): one JSON line for each first delivery of an access key to a
//! pod, so that an access key seen in CloudTrail leads to the pods that held it, with their
//! node and source address. `pod-identity-agent audit PATH ...` reads it back.
//!
//! - **When.** A delivery is recorded before its response is sent; the record of a key already
//!   recorded for that pod is not written again ([`crate::credentials::deliveries`] keeps that with the
//!   key, so a recorded hit costs one comparison). A refresh that no pod has received yet
//!   writes nothing: the record is written when a pod first receives the new key.
//! - **Never a secret.** A record names the key by its ID only: no secret key, session token
//!   or pod token is ever part of one.
//! - **Off the hot path.** One thread owns the file; requests hand it their line over a
//!   bounded channel and wait for it to be written. Lines that arrive together are written
//!   with one `write`. A failed write is logged and counted, and the request is served
//!   anyway: the agent's job is credentials, and an alert (`PodIdentityAgentAuditWriteFailing`)
//!   says the trail has a hole.
//! - **Rotation.** Past `--audit-log-max-size` the file becomes `PATH.1`, `PATH.1` becomes
//!   `PATH.2` and so on to `--audit-log-max-files`, the oldest dropped. Files are created mode
//!   0600 and never opened through a symlink. If the file is moved or removed by someone
//!   else (logrotate, an operator), the next record goes to a new file at PATH. No crate:
//!   `file-rotate`, the candidate, splits a write across files when it cuts at a size, and
//!   brings `chrono` and `flate2` for features this does not use; the rotation here is a few
//!   renames.

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::config::{AuditConfig, CacheScope};
use crate::credentials::cache::Delivery;
use crate::credentials::deliveries::Claim;
use crate::credentials::upstream::Credentials;
use crate::identity::token::{Identity, VerifiedClaims};
use crate::metrics::Metrics;

/// Records waiting for the writer thread. A request that finds it full waits (within its own
/// deadline) rather than being answered without its record.
const QUEUE: usize = 1024;
/// Records written with one `write` at most.
const BATCH: usize = 256;

/// One first delivery of an access key to a pod. Field names are the contract's.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// When the key was delivered (RFC 3339, UTC).
    pub time: String,
    /// This node (`--node-name`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The pod's namespace, from its verified token.
    pub namespace: String,
    /// The pod's service account.
    pub service_account: String,
    /// The pod's name (null for a token not bound to a pod).
    pub pod_name: Option<String>,
    /// The pod's UID (null for a token not bound to a pod).
    pub pod_uid: Option<String>,
    /// The address the request came from.
    pub source_ip: String,
    /// The role session the key belongs to.
    pub assumed_role_arn: String,
    /// EKS Auth's pod identity association, when the upstream named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub association_id: Option<String>,
    /// The key's ID, as CloudTrail shows it.
    pub access_key_id: String,
    /// When the key expires (RFC 3339, UTC).
    pub expiration: String,
    /// `upstream`: the request waited for the call that fetched the key; `cache`: it was
    /// fetched earlier (for another request, another pod of the association, in the
    /// background, or by the agent this one took over from).
    pub origin: String,
}

/// Why a record was not written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The file could not be opened or written.
    #[error("cannot write the audit log {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    /// The writer thread is gone (the agent is stopping).
    #[error("the audit log writer has stopped")]
    Stopped,
}

/// A delivery [`AuditLog::claim`] reserved for recording.
pub struct Claimed<'a> {
    /// What the verified token says of the pod.
    claims: &'a VerifiedClaims,
    /// The pod it is recorded for: its UID, or its token's fingerprint for a token of no pod.
    pod: Cow<'a, str>,
    /// The key remembers the pod (it had room): the write's outcome settles it.
    remembered: bool,
}

struct Job {
    line: Vec<u8>,
    done: oneshot::Sender<Result<(), AuditError>>,
}

/// The audit log of a running agent.
pub struct AuditLog {
    queue: mpsc::Sender<Job>,
    /// `--cache-scope association`: a key may reach several pods.
    shared: bool,
    node: Option<String>,
    metrics: Metrics,
}

impl AuditLog {
    /// Start the writer thread for `config`. The file is opened now if it can be; if it
    /// cannot, that is logged, and every record tries again (and is counted as failed until
    /// it works): credentials are served either way.
    pub fn start(
        config: &AuditConfig,
        scope: CacheScope,
        node: Option<String>,
        metrics: Metrics,
    ) -> AuditLog {
        let (queue, jobs) = mpsc::channel(QUEUE);
        let mut writer = Writer {
            path: config.path.clone(),
            max_size: config.max_size,
            max_files: config.max_files,
            file: None,
            metrics: metrics.clone(),
        };
        if let Err(e) = writer.current() {
            tracing::warn!(error = %e, "the audit log cannot be opened; records will fail until it can");
        }
        let spawned = std::thread::Builder::new()
            .name("audit-log".into())
            .spawn(move || writer.run(jobs));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the audit log writer; no record will be written");
        }
        AuditLog {
            queue,
            shared: scope == CacheScope::Association,
            node,
            metrics,
        }
    }

    /// Record that `creds` reached `identity`'s pod from `source`, unless that was recorded
    /// already. Returns once the record is written (or its write failed: logged by the
    /// caller, counted here).
    pub async fn deliver(
        &self,
        identity: &Identity,
        creds: &Credentials,
        delivery: Delivery,
        source: IpAddr,
    ) -> Result<(), AuditError> {
        match self.claim(identity, creds) {
            Some(claimed) => self.record(claimed, creds, delivery, source).await,
            None => Ok(()),
        }
    }

    /// Whether this delivery must be recorded: `None` when it was already (the hit path's
    /// whole cost, kept out of [`Self::record`]'s future), else the reservation to write it.
    pub fn claim<'a>(&self, identity: &'a Identity, creds: &Credentials) -> Option<Claimed<'a>> {
        // The configuration refuses --audit-log without local verification.
        let claims = identity.verified.as_ref()?;
        let pod = match &claims.pod_uid {
            Some(uid) => Cow::Borrowed(uid.as_str()),
            None => Cow::Owned(format!("token:{}", identity.token.fingerprint())),
        };
        match creds.deliveries.claim(&pod, self.shared) {
            Claim::Recorded => None,
            claim => Some(Claimed {
                claims,
                pod,
                remembered: claim == Claim::Write,
            }),
        }
    }

    /// Write the record `claimed` reserved, and settle the reservation.
    pub async fn record(
        &self,
        claimed: Claimed<'_>,
        creds: &Credentials,
        delivery: Delivery,
        source: IpAddr,
    ) -> Result<(), AuditError> {
        let claims = claimed.claims;
        let origin = match delivery {
            Delivery::Fetched => "upstream",
            Delivery::Cached => "cache",
        };
        let record = Record {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            node: self.node.clone(),
            namespace: claims.namespace.clone(),
            service_account: claims.service_account.clone(),
            pod_name: claims.pod_name.clone(),
            pod_uid: claims.pod_uid.clone(),
            source_ip: source.to_canonical().to_string(),
            assumed_role_arn: creds.assumed_role_arn.clone(),
            association_id: creds.association_id.clone(),
            access_key_id: creds.access_key_id.clone(),
            expiration: humantime::format_rfc3339_seconds(creds.expiration).to_string(),
            origin: origin.into(),
        };
        let result = self.write(&record).await;
        if claimed.remembered {
            match &result {
                Ok(()) => creds.deliveries.written(&claimed.pod),
                Err(_) => creds.deliveries.failed(&claimed.pod),
            }
        }
        match &result {
            Ok(()) => self.metrics.audit_record(origin),
            Err(_) => {
                self.metrics.audit_write_failures.inc();
            }
        }
        result
    }

    async fn write(&self, record: &Record) -> Result<(), AuditError> {
        let mut line = serde_json::to_vec(record).map_err(|e| AuditError::Write {
            path: String::new(),
            source: std::io::Error::other(e),
        })?;
        line.push(b'\n');
        let (done, written) = oneshot::channel();
        self.queue
            .send(Job { line, done })
            .await
            .map_err(|_| AuditError::Stopped)?;
        written.await.map_err(|_| AuditError::Stopped)?
    }
}

/// The writer thread's side: the open file and its rotation.
struct Writer {
    path: PathBuf,
    max_size: u64,
    max_files: u32,
    /// The open file and its size, while it is still the file at `path`.
    file: Option<(File, u64)>,
    metrics: Metrics,
}

impl Writer {
    fn run(mut self, mut jobs: mpsc::Receiver<Job>) {
        let mut batch = Vec::with_capacity(BATCH);
        while let Some(job) = jobs.blocking_recv() {
            batch.push(job);
            while batch.len() < BATCH {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            self.write_batch(&mut batch);
        }
    }

    /// Write `batch` (rotating first where a line would take the file past its size), and
    /// tell each job how its line fared.
    fn write_batch(&mut self, batch: &mut Vec<Job>) {
        let mut pending: Vec<Job> = Vec::new();
        let mut bytes: Vec<u8> = Vec::new();
        // The file's size as the batch starts (one look at the file per batch, not per line),
        // and again after each rotation.
        let mut size = self.current().map(|(_, size)| *size).unwrap_or(0);
        for job in batch.drain(..) {
            let after = size + bytes.len() as u64 + job.line.len() as u64;
            if after > self.max_size && size + bytes.len() as u64 > 0 {
                self.flush(&mut pending, &mut bytes);
                self.rotate();
                size = self.current().map(|(_, size)| *size).unwrap_or(0);
            }
            bytes.extend_from_slice(&job.line);
            pending.push(job);
        }
        self.flush(&mut pending, &mut bytes);
    }

    fn flush(&mut self, pending: &mut Vec<Job>, bytes: &mut Vec<u8>) {
        if pending.is_empty() {
            return;
        }
        let result = self.current().and_then(|(file, size)| {
            file.write_all(bytes)?;
            *size += bytes.len() as u64;
            Ok(())
        });
        if result.is_err() {
            // The next batch opens the file anew.
            self.file = None;
        }
        for job in pending.drain(..) {
            let answer = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(AuditError::Write {
                    path: self.path.display().to_string(),
                    source: std::io::Error::new(e.kind(), e.to_string()),
                }),
            };
            let _ = job.done.send(answer);
        }
        bytes.clear();
    }

    /// The file at `path`, opened (or reopened, if it was moved or removed meanwhile) for
    /// appending, with its size.
    fn current(&mut self) -> std::io::Result<(&mut File, &mut u64)> {
        let moved = match (&self.file, std::fs::symlink_metadata(&self.path)) {
            (Some((file, _)), Ok(at_path)) => file
                .metadata()
                .map(|open| (open.dev(), open.ino()) != (at_path.dev(), at_path.ino()))
                .unwrap_or(true),
            (Some(_), Err(_)) => true,
            (None, _) => true,
        };
        if moved {
            self.file = None;
            let file = open_append(&self.path)?;
            let size = file.metadata()?.len();
            self.file = Some((file, size));
        }
        match &mut self.file {
            Some((file, size)) => Ok((file, size)),
            None => Err(std::io::Error::other("the audit log is not open")),
        }
    }

    /// `PATH.{n-1}` -> `PATH.{n}` down to `PATH` -> `PATH.1`; the oldest is overwritten.
    fn rotate(&mut self) {
        self.file = None;
        for n in (1..self.max_files).rev() {
            let from = rotated(&self.path, n);
            if from.exists() {
                if let Err(e) = std::fs::rename(&from, rotated(&self.path, n + 1)) {
                    tracing::warn!(file = %from.display(), error = %e, "audit log rotation: cannot rename");
                }
            }
        }
        match std::fs::rename(&self.path, rotated(&self.path, 1)) {
            Ok(()) => {
                self.metrics.audit_rotations.inc();
            }
            Err(e) => {
                tracing::warn!(error = %e, "audit log rotation failed; writing on past the size")
            }
        }
    }
}

/// `PATH.n`.
fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Open `path` for appending: created mode 0600, never through a symlink, and made 0600 if
/// it was wider.
fn open_append(path: &Path) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits() | nix::fcntl::OFlag::O_CLOEXEC.bits())
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if meta.mode() & 0o777 != 0o600 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(file)
}

/// What `pod-identity-agent audit` looks for; every field given must match.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub access_key_id: Option<String>,
    pub pod_uid: Option<String>,
    pub namespace: Option<String>,
}

impl Filter {
    fn matches(&self, r: &Record) -> bool {
        self.access_key_id
            .as_ref()
            .is_none_or(|k| *k == r.access_key_id)
            && self
                .pod_uid
                .as_ref()
                .is_none_or(|u| Some(u) == r.pod_uid.as_ref())
            && self.namespace.as_ref().is_none_or(|n| *n == r.namespace)
    }
}

/// What a search found.
#[derive(Debug, Default)]
pub struct Found {
    /// Matching lines, oldest first, as written.
    pub lines: Vec<String>,
    /// Files read (`PATH.N` ... `PATH.1`, `PATH`, those that exist).
    pub files: usize,
    /// Lines that are not records (a torn line of a full disk, say), skipped.
    pub unreadable: usize,
}

/// The records of `path` and its rotated files matching `filter`, oldest first.
pub fn search(path: &Path, filter: &Filter) -> std::io::Result<Found> {
    let mut found = Found::default();
    let mut files: Vec<PathBuf> = (1..=MAX_ROTATED_SEARCHED)
        .map(|n| rotated(path, n))
        .take_while(|p| p.exists())
        .collect();
    files.reverse();
    files.push(path.to_owned());
    let mut last_error = None;
    for file in files {
        let reader = match File::open(&file) {
            Ok(f) => BufReader::new(f),
            Err(e) => {
                last_error = Some(e);
                continue;
            }
        };
        found.files += 1;
        for line in reader.split(b'\n') {
            let line = line?;
            if line.is_empty() {
                continue;
            }
            match serde_json::from_slice::<Record>(&line) {
                Ok(r) if filter.matches(&r) => found
                    .lines
                    .push(String::from_utf8_lossy(&line).into_owned()),
                Ok(_) => {}
                Err(_) => found.unreadable += 1,
            }
        }
    }
    match (found.files, last_error) {
        (0, Some(e)) => Err(e),
        _ => Ok(found),
    }
}

/// Rotated files looked for, at most: `--audit-log-max-files`' own bound.
const MAX_ROTATED_SEARCHED: u32 = 1000;

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, uid: &str) -> Record {
        Record {
            time: "2026-12-06T00:00:00.000Z".into(),
            node: Some("node-a".into()),
            namespace: "team-a".into(),
            service_account: "app".into(),
            pod_name: Some("app-0".into()),
            pod_uid: Some(uid.into()),
            source_ip: "10.0.0.1".into(),
            assumed_role_arn: "arn:aws:sts::111122223333:assumed-role/app/s".into(),
            association_id: None,
            access_key_id: key.into(),
            expiration: "2026-12-06T06:00:00Z".into(),
            origin: "upstream".into(),
        }
    }

    fn line(r: &Record) -> Vec<u8> {
        let mut l = serde_json::to_vec(r).unwrap();
        l.push(b'\n');
        l
    }

    fn job(r: &Record) -> (Job, oneshot::Receiver<Result<(), AuditError>>) {
        let (done, rx) = oneshot::channel();
        (
            Job {
                line: line(r),
                done,
            },
            rx,
        )
    }

    #[test]
    fn rotates_at_the_size_keeps_n_files_and_search_reads_them_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let one = line(&record("ASIA0", "uid-0")).len() as u64;
        let mut w = Writer {
            path: path.clone(),
            max_size: one * 2,
            max_files: 2,
            file: None,
            metrics: Metrics::new(),
        };
        for i in 0..7 {
            let (j, mut rx) = job(&record(&format!("ASIA{i}"), &format!("uid-{i}")));
            w.write_batch(&mut vec![j]);
            rx.try_recv().unwrap().unwrap();
        }
        // 7 records, two a file: PATH has 1 (ASIA6), PATH.1 has 2, PATH.2 has 2; the
        // oldest two were dropped.
        let all = search(&path, &Filter::default()).unwrap();
        let keys: Vec<String> = all
            .lines
            .iter()
            .map(|l| serde_json::from_str::<Record>(l).unwrap().access_key_id)
            .collect();
        assert_eq!(keys, ["ASIA2", "ASIA3", "ASIA4", "ASIA5", "ASIA6"]);
        assert_eq!(all.files, 3);
        assert!(!rotated(&path, 3).exists());
        for p in [path.clone(), rotated(&path, 1), rotated(&path, 2)] {
            let mode = std::fs::metadata(&p).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
        let by_key = search(
            &path,
            &Filter {
                access_key_id: Some("ASIA3".into()),
                ..Filter::default()
            },
        )
        .unwrap();
        assert_eq!(by_key.lines.len(), 1);
        assert!(by_key.lines[0].contains("\"podUid\":\"uid-3\""));
    }

    #[test]
    fn a_moved_file_is_followed_by_a_new_one_and_a_symlink_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut w = Writer {
            path: path.clone(),
            max_size: 1 << 20,
            max_files: 1,
            file: None,
            metrics: Metrics::new(),
        };
        let (j, _rx) = job(&record("ASIA0", "uid-0"));
        w.write_batch(&mut vec![j]);
        std::fs::rename(&path, dir.path().join("moved")).unwrap();
        let (j, mut rx) = job(&record("ASIA1", "uid-1"));
        w.write_batch(&mut vec![j]);
        rx.try_recv().unwrap().unwrap();
        let now = std::fs::read_to_string(&path).unwrap();
        assert!(now.contains("ASIA1") && !now.contains("ASIA0"), "{now}");

        let link = dir.path().join("link.log");
        std::os::unix::fs::symlink(dir.path().join("moved"), &link).unwrap();
        w.path = link;
        w.file = None;
        let (j, mut rx) = job(&record("ASIA2", "uid-2"));
        w.write_batch(&mut vec![j]);
        assert!(
            rx.try_recv().unwrap().is_err(),
            "never written through a symlink"
        );
    }

    #[test]
    fn a_line_that_is_not_a_record_is_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut text = line(&record("ASIA0", "uid-0"));
        text.extend_from_slice(b"{\"time\":\"torn\n");
        text.extend_from_slice(&line(&record("ASIA1", "uid-1")));
        std::fs::write(&path, text).unwrap();
        let found = search(
            &path,
            &Filter {
                namespace: Some("team-a".into()),
                ..Filter::default()
            },
        )
        .unwrap();
        assert_eq!((found.lines.len(), found.unreadable), (2, 1));
        assert!(search(&dir.path().join("missing"), &Filter::default()).is_err());
    }
}
