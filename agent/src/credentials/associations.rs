//! The associations file of the STS backend: which role each namespace/service account may
//! assume. It plays the part EKS Pod Identity associations play in EKS.
//!
//! The file is YAML or JSON: `{"associations": [...]}` or a top-level list of
//! `{namespace, serviceAccount, roleArn, sessionDuration?, audience?}`. It is validated
//! whole at start (exit 64 naming the line) and re-read when it changes; a reload that fails
//! validation keeps the last good set, so a typo in a ConfigMap cannot take pods' credentials
//! away.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use serde::Deserialize;
use tokio::sync::watch;

use crate::metrics::Metrics;

/// Checked for a new modification time or size this often.
const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// An associations file is a few KiB even for large clusters.
const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// STS `DurationSeconds` bounds; the default is what EKS Pod Identity issues.
pub const MIN_SESSION: Duration = Duration::from_secs(900);
pub const MAX_SESSION: Duration = Duration::from_secs(43_200);
pub const DEFAULT_SESSION: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Association {
    pub namespace: String,
    pub service_account: String,
    pub role_arn: String,
    /// Clamped to STS's 900..43200 s.
    pub session_duration: Duration,
    /// When set, the token must carry this audience (on top of `--audience`).
    pub audience: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct AssociationsError {
    pub path: String,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wrapped {
    associations: Vec<RawAssociation>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawAssociation {
    namespace: String,
    service_account: String,
    role_arn: String,
    #[serde(default)]
    session_duration: Option<DurationValue>,
    #[serde(default)]
    audience: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum DurationValue {
    Seconds(u64),
    Text(String),
}

/// The line (1-based) of the `n`-th occurrence of `needle` in `text`, to point at an entry
/// after parsing (YAML and JSON parsers do not keep positions for values).
fn line_of(text: &str, needle: &str, n: usize) -> Option<usize> {
    let at = text.match_indices(needle).nth(n)?.0;
    Some(text[..at].matches('\n').count() + 1)
}

/// Kubernetes names: DNS labels (namespace) or subdomains (service account).
fn valid_k8s_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.as_bytes()
            .first()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && s.as_bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric())
}

/// `arn:<partition>:iam::<12 digits>:role/<path/name>`, 20-2048 characters.
fn valid_role_arn(arn: &str) -> bool {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    matches!(parts.as_slice(), ["arn", partition, "iam", "", account, resource]
        if partition.starts_with("aws")
            && account.len() == 12
            && account.bytes().all(|b| b.is_ascii_digit())
            && resource.strip_prefix("role/").is_some_and(|name| !name.is_empty() && !name.ends_with('/')))
        && (20..=2048).contains(&arn.len())
}

/// Parse and validate a whole associations document.
pub fn parse(text: &str, path: &str) -> Result<Vec<Association>, AssociationsError> {
    let err = |message: String| AssociationsError {
        path: path.to_owned(),
        message,
    };
    // JSON is YAML, so one parser serves both; its errors carry the line. The document's
    // shape is read first so an error names the field, not "no variant matched".
    let yaml_err = |e: serde_yaml_ng::Error| {
        let line = e
            .location()
            .map(|l| format!("line {}: ", l.line()))
            .unwrap_or_default();
        err(format!("{line}{}", strip_location(&e.to_string())))
    };
    let raw = match serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text).map_err(yaml_err)? {
        serde_yaml_ng::Value::Mapping(_) => {
            serde_yaml_ng::from_str::<Wrapped>(text)
                .map_err(yaml_err)?
                .associations
        }
        serde_yaml_ng::Value::Sequence(_) => {
            serde_yaml_ng::from_str::<Vec<RawAssociation>>(text).map_err(yaml_err)?
        }
        _ => {
            return Err(err(
                "expected {\"associations\": [...]} or a list of associations".into(),
            ))
        }
    };
    let mut out = Vec::with_capacity(raw.len());
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    let mut arn_seen: HashMap<String, usize> = HashMap::new();
    for r in raw {
        let nth = *arn_seen
            .entry(r.role_arn.clone())
            .and_modify(|n| *n += 1)
            .or_insert(0);
        let line = line_of(text, &r.role_arn, nth)
            .map(|l| format!("line {l}: "))
            .unwrap_or_default();
        let at = |m: String| err(format!("{line}{m}"));
        if !valid_k8s_name(&r.namespace, 63) {
            return Err(at(format!(
                "namespace '{}' is not a Kubernetes namespace name",
                r.namespace
            )));
        }
        if !valid_k8s_name(&r.service_account, 253) {
            return Err(at(format!(
                "serviceAccount '{}' is not a Kubernetes service account name",
                r.service_account
            )));
        }
        if !valid_role_arn(&r.role_arn) {
            return Err(at(format!(
                "roleArn '{}' is not an IAM role ARN",
                r.role_arn
            )));
        }
        let session_duration = match r.session_duration {
            None => DEFAULT_SESSION,
            Some(DurationValue::Seconds(s)) => Duration::from_secs(s),
            Some(DurationValue::Text(t)) => humantime::parse_duration(&t)
                .map_err(|e| at(format!("sessionDuration '{t}': {e}")))?,
        }
        .clamp(MIN_SESSION, MAX_SESSION);
        if r.audience.as_deref().is_some_and(str::is_empty) {
            return Err(at("audience must not be empty".into()));
        }
        let key = (r.namespace.clone(), r.service_account.clone());
        if let Some(first) = seen.get(&key) {
            return Err(at(format!(
                "{}/{} is already associated by entry {} (one role per service account)",
                r.namespace,
                r.service_account,
                first + 1
            )));
        }
        seen.insert(key, out.len());
        out.push(Association {
            namespace: r.namespace,
            service_account: r.service_account,
            role_arn: r.role_arn,
            session_duration,
            audience: r.audience,
        });
    }
    Ok(out)
}

fn strip_location(msg: &str) -> String {
    // serde_yaml_ng appends " at line N column M"; the line is already in front.
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}

type Table = HashMap<(String, String), Arc<Association>>;

/// The current associations, kept in step with the file.
pub struct AssociationStore {
    path: PathBuf,
    /// Swapped whole on a good reload; read by every request, and cannot poison.
    table: ArcSwap<Table>,
    metrics: Metrics,
}

impl AssociationStore {
    /// Load the file; an invalid file is a configuration error.
    pub async fn load(
        path: &Path,
        metrics: Metrics,
    ) -> Result<Arc<AssociationStore>, AssociationsError> {
        let table = read_table(path).await?;
        metrics.associations.set(table.len() as i64);
        metrics.association_reload("success");
        Ok(Arc::new(AssociationStore {
            path: path.to_owned(),
            table: ArcSwap::from_pointee(table),
            metrics,
        }))
    }

    pub fn get(&self, namespace: &str, service_account: &str) -> Option<Arc<Association>> {
        self.table
            .load()
            .get(&(namespace.to_owned(), service_account.to_owned()))
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.table.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Re-read the file when it changes, until `shutdown`.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut stamp = stamp_of(&self.path).await;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
                _ = shutdown.changed() => return,
            }
            let now = stamp_of(&self.path).await;
            if now == stamp {
                continue;
            }
            stamp = now;
            // A failure is counted and logged here; the last good set stays in place.
            let _ = self.reload().await;
        }
    }

    /// Read the file and install its table if it is valid; otherwise keep the current one.
    async fn reload(&self) -> Result<usize, AssociationsError> {
        match read_table(&self.path).await {
            Ok(table) => {
                let n = table.len();
                self.table.store(Arc::new(table));
                self.metrics.associations.set(n as i64);
                self.metrics.association_reload("success");
                tracing::info!(path = %self.path.display(), associations = n, "associations reloaded");
                Ok(n)
            }
            Err(e) => {
                self.metrics.association_reload("failure");
                tracing::warn!(error = %e, "associations file not reloaded; keeping the last good set");
                Err(e)
            }
        }
    }
}

// tokio::fs, not std::fs: the reload runs on the runtime's workers, beside the requests, and
// a file on a slow volume must not stall them.
async fn stamp_of(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = tokio::fs::metadata(path).await.ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

async fn read_table(path: &Path) -> Result<Table, AssociationsError> {
    let shown = path.display().to_string();
    let err = |message: String| AssociationsError {
        path: shown.clone(),
        message,
    };
    let meta = tokio::fs::metadata(path)
        .await
        .map_err(|e| err(e.to_string()))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(err("file is larger than 4 MiB".into()));
    }
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| err(e.to_string()))?;
    let list = parse(&text, &shown)?;
    Ok(list
        .into_iter()
        .map(|a| {
            (
                (a.namespace.clone(), a.service_account.clone()),
                Arc::new(a),
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARN: &str = "arn:aws:iam::111122223333:role/app";

    #[test]
    fn yaml_json_and_list_forms() {
        let yaml = format!(
            "associations:\n  - namespace: team-a\n    serviceAccount: app\n    roleArn: {ARN}\n    sessionDuration: 2h\n    audience: sts.amazonaws.com\n"
        );
        let a = parse(&yaml, "f").unwrap();
        assert_eq!(a[0].session_duration, Duration::from_secs(7200));
        assert_eq!(a[0].audience.as_deref(), Some("sts.amazonaws.com"));
        let json = format!(
            r#"{{"associations": [{{"namespace": "team-a", "serviceAccount": "app", "roleArn": "{ARN}", "sessionDuration": 100}}]}}"#
        );
        assert_eq!(
            parse(&json, "f").unwrap()[0].session_duration,
            MIN_SESSION,
            "clamped up to 900 s"
        );
        let list = format!(
            "- namespace: b\n  serviceAccount: s\n  roleArn: {ARN}\n  sessionDuration: 99999\n"
        );
        let a = parse(&list, "f").unwrap();
        assert_eq!(
            (a[0].session_duration, a[0].audience.clone()),
            (MAX_SESSION, None)
        );
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            (format!("associations:\n  - namespace: a\n    serviceAccount: s\n    rolearn: {ARN}\n"), "line 4", "rolearn"),
            (
                format!("associations:\n  - namespace: a\n    serviceAccount: s\n    roleArn: {ARN}\n  - namespace: a\n    serviceAccount: s\n    roleArn: {ARN}\n"),
                "line 7",
                "already associated",
            ),
            ("associations:\n  - namespace: a\n    serviceAccount: s\n    roleArn: arn:aws:s3:::bucket\n".to_owned(), "line 4", "IAM role ARN"),
            (format!("associations:\n  - namespace: Bad_NS\n    serviceAccount: s\n    roleArn: {ARN}\n"), "line 4", "namespace"),
            ("associations: [\n".to_owned(), "line", ""),
            (format!("associations:\n  - namespace: a\n    serviceAccount: s\n    roleArn: {ARN}\n    sessionDuration: soon\n"), "line 4", "sessionDuration"),
        ];
        for (text, line, what) in cases {
            let e = parse(&text, "assoc.yaml").unwrap_err().to_string();
            assert!(e.contains(line) && e.contains(what), "{e}\n---\n{text}");
            assert!(e.starts_with("assoc.yaml: "), "{e}");
        }
    }

    #[test]
    fn role_arn_shapes() {
        assert!(valid_role_arn(ARN));
        assert!(valid_role_arn(
            "arn:aws-cn:iam::111122223333:role/path/to/r"
        ));
        for bad in [
            "arn:aws:iam::1111:role/x",
            "arn:aws:iam::111122223333:user/x",
            "arn:aws:iam::111122223333:role/",
            "role/x",
        ] {
            assert!(!valid_role_arn(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn bad_reload_keeps_the_last_good_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.yaml");
        std::fs::write(
            &path,
            format!("- namespace: a\n  serviceAccount: s\n  roleArn: {ARN}\n"),
        )
        .unwrap();
        let metrics = Metrics::new();
        let store = AssociationStore::load(&path, metrics.clone())
            .await
            .unwrap();
        assert!(store.get("a", "s").is_some());
        std::fs::write(&path, "- namespace: [").unwrap();
        assert!(store.reload().await.is_err());
        assert!(
            store.get("a", "s").is_some(),
            "the store only changes on a good reload"
        );
        assert!(metrics
            .encode()
            .contains("pod_identity_agent_association_reloads_total{outcome=\"failure\"} 1"));
    }

    #[tokio::test]
    async fn a_good_reload_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.yaml");
        let entry =
            |ns: &str| format!("- namespace: {ns}\n  serviceAccount: s\n  roleArn: {ARN}\n");
        std::fs::write(&path, entry("a")).unwrap();
        let store = AssociationStore::load(&path, Metrics::new()).await.unwrap();
        std::fs::write(&path, entry("b") + &entry("c")).unwrap();
        assert_eq!(store.reload().await.unwrap(), 2);
        assert!(store.get("a", "s").is_none(), "the old table is replaced");
        assert!(store.get("b", "s").is_some() && store.get("c", "s").is_some());
        assert_eq!(store.len(), 2);
    }
}
