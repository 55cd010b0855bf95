//! The sts backend's associations file: which IAM role a service account
//! assumes. Tests write it as JSON or YAML (both forms the agent accepts),
//! atomically, and rewrite it while the agent runs to exercise reloads.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::keys;

/// `sessionDuration`: a humantime string (`"2h"`) or whole seconds (`100`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionDuration {
    Text(String),
    Seconds(u64),
}

/// One entry of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Association {
    pub namespace: String,
    pub service_account: String,
    pub role_arn: String,
    pub session_duration: Option<SessionDuration>,
    pub audience: Option<String>,
}

impl Association {
    pub fn new(namespace: &str, service_account: &str, role_arn: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            role_arn: role_arn.to_owned(),
            session_duration: None,
            audience: None,
        }
    }

    /// `sessionDuration: "<text>"`, e.g. `"2h"`.
    pub fn session_duration(mut self, text: &str) -> Self {
        self.session_duration = Some(SessionDuration::Text(text.to_owned()));
        self
    }

    /// `sessionDuration: <seconds>`, an integer.
    pub fn session_duration_secs(mut self, seconds: u64) -> Self {
        self.session_duration = Some(SessionDuration::Seconds(seconds));
        self
    }

    pub fn audience(mut self, audience: &str) -> Self {
        self.audience = Some(audience.to_owned());
        self
    }

    /// The account field of the role ARN (`arn:aws:iam::<account>:role/...`).
    pub fn account_id(&self) -> &str {
        self.role_arn.split(':').nth(4).unwrap_or_default()
    }

    /// The last segment of the role ARN's path: `role/a/name` -> `name`.
    pub fn role_name(&self) -> &str {
        self.role_arn.rsplit('/').next().unwrap_or_default()
    }

    /// The entry's fields in the order the file lists them.
    pub fn fields(&self) -> Vec<(&'static str, Value)> {
        let mut fields = vec![
            ("namespace", json!(self.namespace)),
            ("serviceAccount", json!(self.service_account)),
            ("roleArn", json!(self.role_arn)),
        ];
        match &self.session_duration {
            Some(SessionDuration::Text(t)) => fields.push(("sessionDuration", json!(t))),
            Some(SessionDuration::Seconds(s)) => fields.push(("sessionDuration", json!(s))),
            None => {}
        }
        if let Some(a) = &self.audience {
            fields.push(("audience", json!(a)));
        }
        fields
    }

    pub fn to_json(&self) -> Value {
        Value::Object(
            self.fields()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        )
    }
}

/// How the file is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `{"associations": [...]}`, pretty-printed.
    Json,
    /// `associations:` followed by a block list.
    Yaml,
    /// A top-level YAML block list of the same objects.
    YamlList,
}

impl Format {
    pub fn extension(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Yaml | Format::YamlList => "yaml",
        }
    }
}

/// The text of an associations file in `format`.
pub fn render(associations: &[Association], format: Format) -> String {
    match format {
        Format::Json => {
            let doc = json!({
                "associations": associations.iter().map(Association::to_json).collect::<Vec<_>>(),
            });
            let mut text = serde_json::to_string_pretty(&doc).expect("JSON value serialises");
            text.push('\n');
            text
        }
        Format::Yaml if associations.is_empty() => "associations: []\n".to_owned(),
        Format::Yaml => format!("associations:\n{}", yaml_list(associations, "  ")),
        Format::YamlList if associations.is_empty() => "[]\n".to_owned(),
        Format::YamlList => yaml_list(associations, ""),
    }
}

/// A block list, one `key: value` per line. Strings are written as JSON
/// strings, which are valid YAML double-quoted scalars.
fn yaml_list(associations: &[Association], indent: &str) -> String {
    let mut out = String::new();
    for a in associations {
        for (i, (key, value)) in a.fields().iter().enumerate() {
            let lead = if i == 0 { "- " } else { "  " };
            // Writing to a String cannot fail.
            let _ = writeln!(out, "{indent}{lead}{key}: {value}");
        }
    }
    out
}

/// An associations file in a test's temp dir.
#[derive(Clone, Debug)]
pub struct AssociationsFile {
    path: PathBuf,
    format: Format,
}

impl AssociationsFile {
    /// `<dir>/associations.<json|yaml>`; nothing is written yet.
    pub fn new(dir: &Path, format: Format) -> Self {
        Self {
            path: dir.join(format!("associations.{}", format.extension())),
            format,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Replace the file's content with `associations`.
    pub fn write(&self, associations: &[Association]) {
        self.write_raw(&render(associations, self.format));
    }

    /// Replace the file's content with `text` verbatim (for malformed files).
    ///
    /// Written to a temporary file in the same directory and renamed over the
    /// old one, so the agent never reads half a file.
    pub fn write_raw(&self, text: &str) {
        let name = self
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("associations file name is UTF-8");
        let tmp = self.path.with_file_name(format!(
            ".{name}.{}.tmp",
            keys::hex(&keys::random_bytes::<6>())
        ));
        std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
        std::fs::rename(&tmp, &self.path).unwrap_or_else(|e| {
            panic!("rename {} over {}: {e}", tmp.display(), self.path.display())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Association> {
        vec![
            Association::new("team-a", "app", "arn:aws:iam::111122223333:role/app")
                .session_duration("2h"),
            Association::new("team-b", "job", "arn:aws:iam::444455556666:role/path/job")
                .session_duration_secs(100)
                .audience("sts.amazonaws.com"),
        ]
    }

    #[test]
    fn json_shape() {
        let text = render(&sample(), Format::Json);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["associations"][0]["serviceAccount"], "app");
        assert_eq!(v["associations"][0]["sessionDuration"], "2h");
        assert_eq!(v["associations"][1]["sessionDuration"], 100);
        assert_eq!(v["associations"][1]["audience"], "sts.amazonaws.com");
        assert!(v["associations"][0].get("audience").is_none());
    }

    #[test]
    fn yaml_shape() {
        let text = render(&sample(), Format::Yaml);
        let expected = "associations:\n\
            \x20 - namespace: \"team-a\"\n\
            \x20   serviceAccount: \"app\"\n\
            \x20   roleArn: \"arn:aws:iam::111122223333:role/app\"\n\
            \x20   sessionDuration: \"2h\"\n\
            \x20 - namespace: \"team-b\"\n\
            \x20   serviceAccount: \"job\"\n\
            \x20   roleArn: \"arn:aws:iam::444455556666:role/path/job\"\n\
            \x20   sessionDuration: 100\n\
            \x20   audience: \"sts.amazonaws.com\"\n";
        assert_eq!(text, expected);
        assert!(render(&sample(), Format::YamlList).starts_with("- namespace: \"team-a\"\n"));
        assert_eq!(sample()[1].account_id(), "444455556666");
        assert_eq!(sample()[1].role_name(), "job");
    }

    #[test]
    fn writes_replace_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let file = AssociationsFile::new(dir.path(), Format::Yaml);
        file.write(&sample());
        file.write_raw("associations: []\n");
        assert_eq!(
            std::fs::read_to_string(file.path()).unwrap(),
            "associations: []\n"
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["associations.yaml"], "no temporary file left");
    }
}
