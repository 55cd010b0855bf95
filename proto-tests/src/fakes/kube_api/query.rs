//! A pod list's or watch's query: parameters decoded and checked as kube-apiserver checks
//! them, and the field and label selectors it filters by.

use std::collections::BTreeMap;
use std::time::Duration;

use super::status::ApiError;
use super::KubePod;

/// The query parameters of a pod list or watch, checked as kube-apiserver checks them.
#[derive(Debug, Default)]
pub(super) struct ListOptions {
    pub(super) watch: bool,
    fields: FieldSelector,
    labels: LabelSelector,
    /// `None` when absent or empty.
    pub(super) resource_version: Option<String>,
    pub(super) resource_version_match: Option<String>,
    /// `None` for no limit (absent or 0).
    pub(super) limit: Option<usize>,
    pub(super) continue_token: Option<String>,
    pub(super) timeout: Option<Duration>,
    pub(super) bookmarks: bool,
    pub(super) send_initial_events: Option<bool>,
}

impl ListOptions {
    pub(super) fn parse(query: &Query, watch_path: bool) -> Result<ListOptions, ApiError> {
        let nonempty = |name: &str| query.get(name).filter(|v| !v.is_empty()).map(str::to_owned);
        let number = |name: &str| -> Result<Option<i64>, ApiError> {
            nonempty(name)
                .map(|v| {
                    v.parse::<i64>().map_err(|_| {
                        ApiError::bad_request(&format!("invalid value for {name}: {v:?}"))
                    })
                })
                .transpose()
        };
        let timeout = match number("timeoutSeconds")? {
            Some(s) if s < 0 => {
                return Err(ApiError::bad_request("timeoutSeconds must not be negative"))
            }
            Some(0) | None => None,
            Some(s) => Some(Duration::from_secs(s as u64)),
        };
        let limit = match number("limit")? {
            Some(n) if n > 0 => Some(n as usize),
            _ => None,
        };
        Ok(ListOptions {
            watch: watch_path || query.flag("watch"),
            fields: FieldSelector::parse(query.get("fieldSelector").unwrap_or_default())?,
            labels: LabelSelector::parse(query.get("labelSelector").unwrap_or_default())?,
            resource_version: nonempty("resourceVersion"),
            resource_version_match: nonempty("resourceVersionMatch"),
            limit,
            continue_token: nonempty("continue"),
            timeout,
            bookmarks: query.flag("allowWatchBookmarks"),
            send_initial_events: query
                .get("sendInitialEvents")
                .map(|_| query.flag("sendInitialEvents")),
        })
    }

    /// kube-apiserver's `ValidateListOptions` for a list.
    pub(super) fn validate_list(&self) -> Result<(), ApiError> {
        if let Some(rv_match) = &self.resource_version_match {
            if self.resource_version.is_none() {
                return Err(ApiError::invalid(
                    "resourceVersionMatch",
                    "Forbidden: resourceVersionMatch is forbidden unless resourceVersion is \
                     provided",
                ));
            }
            if self.continue_token.is_some() {
                return Err(ApiError::invalid(
                    "resourceVersionMatch",
                    "Forbidden: resourceVersionMatch is forbidden when continue is provided",
                ));
            }
            match rv_match.as_str() {
                "Exact" if self.resource_version.as_deref() == Some("0") => {
                    return Err(ApiError::invalid(
                        "resourceVersionMatch",
                        "Forbidden: resourceVersionMatch \"exact\" is forbidden for \
                         resourceVersion \"0\"",
                    ))
                }
                "Exact" | "NotOlderThan" => {}
                other => {
                    return Err(ApiError::invalid(
                        "resourceVersionMatch",
                        &format!(
                            "Unsupported value: \"{other}\": supported values: \"Exact\", \
                             \"NotOlderThan\""
                        ),
                    ))
                }
            }
        }
        if self.send_initial_events.is_some() {
            return Err(ApiError::invalid(
                "sendInitialEvents",
                "Forbidden: sendInitialEvents is forbidden for list",
            ));
        }
        Ok(())
    }

    /// kube-apiserver's `ValidateListOptions` for a watch.
    pub(super) fn validate_watch(&self) -> Result<(), ApiError> {
        let not_older_than = self.resource_version_match.as_deref() == Some("NotOlderThan");
        if let Some(send) = self.send_initial_events {
            if !not_older_than {
                return Err(ApiError::invalid(
                    "resourceVersionMatch",
                    "Forbidden: sendInitialEvents requires setting resourceVersionMatch to \
                     NotOlderThan",
                ));
            }
            if send && !self.bookmarks {
                return Err(ApiError::invalid(
                    "allowWatchBookmarks",
                    "Forbidden: allowWatchBookmarks must be set to true when \
                     sendInitialEvents is true",
                ));
            }
        } else if let Some(rv_match) = &self.resource_version_match {
            let message = if not_older_than {
                "Forbidden: resourceVersionMatch is forbidden for watch unless \
                 sendInitialEvents is provided"
                    .to_owned()
            } else {
                format!("Unsupported value: \"{rv_match}\": supported values: \"NotOlderThan\"")
            };
            return Err(ApiError::invalid("resourceVersionMatch", &message));
        }
        Ok(())
    }

    pub(super) fn matches(&self, namespace: Option<&str>, pod: &KubePod) -> bool {
        namespace.is_none_or(|ns| pod.namespace == ns)
            && self.fields.matches(pod)
            && self.labels.matches(pod)
    }

    pub(super) fn has_selectors(&self) -> bool {
        !self.fields.is_empty() || !self.labels.is_empty()
    }
}

pub(super) fn parse_resource_version(rv: &str) -> Result<u64, ApiError> {
    rv.parse()
        .map_err(|_| ApiError::bad_request(&format!("invalid resource version: {rv:?}")))
}

/// A query string's parameters, decoded; empty pairs (kube-client sends `?&watch=true`) are
/// skipped.
pub(super) struct Query(Vec<(String, String)>);

impl Query {
    pub(super) fn parse(query: Option<&str>) -> Query {
        Query(
            query
                .unwrap_or_default()
                .split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                    (percent_decode(name), percent_decode(value))
                })
                .collect(),
        )
    }

    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// A boolean parameter as kube-apiserver converts it: present and not `0`, `f` or
    /// `false` (any case) is true.
    pub(super) fn flag(&self, name: &str) -> bool {
        self.get(name).is_some_and(|v| {
            !(v == "0" || v.eq_ignore_ascii_case("f") || v.eq_ignore_ascii_case("false"))
        })
    }
}

/// `application/x-www-form-urlencoded` decoding; a malformed escape is kept as written.
pub(super) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let escaped = bytes
                    .get(i + 1..i + 3)
                    .and_then(|hex| std::str::from_utf8(hex).ok())
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok());
                match escaped {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A field selector: conjunctions of `field=value`, `field==value` and `field!=value` over
/// the fields kube-apiserver can select pods by.
#[derive(Debug, Default)]
struct FieldSelector(Vec<(String, bool, String)>);

/// The pod fields kube-apiserver accepts in a field selector.
const POD_FIELDS: [&str; 10] = [
    "metadata.name",
    "metadata.namespace",
    "spec.nodeName",
    "spec.serviceAccountName",
    "spec.hostNetwork",
    "spec.restartPolicy",
    "spec.schedulerName",
    "status.phase",
    "status.podIP",
    "status.nominatedNodeName",
];

/// A pod's value for one of [`POD_FIELDS`].
fn pod_field(pod: &KubePod, field: &str) -> Option<String> {
    Some(match field {
        "metadata.name" => pod.name.clone(),
        "metadata.namespace" => pod.namespace.clone(),
        "spec.nodeName" => pod.node_name.clone(),
        "spec.serviceAccountName" => pod.service_account.clone(),
        "spec.hostNetwork" => pod.host_network.to_string(),
        "spec.restartPolicy" => "Always".to_owned(),
        "spec.schedulerName" => "default-scheduler".to_owned(),
        "status.phase" => pod.phase.clone(),
        "status.podIP" => pod
            .pod_ips
            .first()
            .map(ToString::to_string)
            .unwrap_or_default(),
        "status.nominatedNodeName" => String::new(),
        _ => return None,
    })
}

impl FieldSelector {
    pub(super) fn parse(selector: &str) -> Result<FieldSelector, ApiError> {
        let mut terms = Vec::new();
        for term in split_unescaped(selector, ',') {
            if term.is_empty() {
                continue;
            }
            let Some((field, equal, value)) = split_field_term(&term) else {
                return Err(ApiError::bad_request(&format!(
                    "invalid selector: '{selector}'; can't understand '{term}'"
                )));
            };
            if !POD_FIELDS.contains(&field.as_str()) {
                return Err(ApiError::bad_request(&format!(
                    "field label not supported: {field}"
                )));
            }
            terms.push((field, equal, value));
        }
        Ok(FieldSelector(terms))
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(super) fn matches(&self, pod: &KubePod) -> bool {
        self.0.iter().all(|(field, equal, value)| {
            (pod_field(pod, field).as_deref() == Some(value.as_str())) == *equal
        })
    }
}

/// Split on `sep` where it is not escaped with a backslash; escapes are kept.
fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut escaped = false;
    for c in s.chars() {
        let part = parts.last_mut().expect("parts is never empty");
        if escaped {
            part.push(c);
            escaped = false;
        } else if c == '\\' {
            part.push(c);
            escaped = true;
        } else if c == sep {
            parts.push(String::new());
        } else {
            part.push(c);
        }
    }
    parts
}

/// `field!=value`, `field==value` or `field=value` (the first unescaped operator), with the
/// value's escapes (`\,`, `\=`, `\\`) removed.
fn split_field_term(term: &str) -> Option<(String, bool, String)> {
    let mut escaped = false;
    for (i, c) in term.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        if c == '\\' {
            escaped = true;
            continue;
        }
        let rest = &term[i..];
        let (operator, equal) = if rest.starts_with("!=") {
            ("!=", false)
        } else if rest.starts_with("==") {
            ("==", true)
        } else if rest.starts_with('=') {
            ("=", true)
        } else {
            continue;
        };
        let field = term[..i].trim();
        if field.is_empty() {
            return None;
        }
        let value = unescape(&rest[operator.len()..]);
        return Some((field.to_owned(), equal, value));
    }
    None
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A label selector: `key`, `!key`, `key=value` (`==`), `key!=value`, `key in (a,b)`,
/// `key notin (a,b)`, `key>n`, `key<n`, joined by commas.
#[derive(Debug, Default)]
struct LabelSelector(Vec<LabelRequirement>);

#[derive(Debug)]
enum LabelRequirement {
    Exists(String),
    Absent(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    GreaterThan(String, i64),
    LessThan(String, i64),
}

impl LabelSelector {
    pub(super) fn parse(selector: &str) -> Result<LabelSelector, ApiError> {
        let selector = selector.trim();
        if selector.is_empty() {
            return Ok(LabelSelector::default());
        }
        let mut terms = Vec::new();
        let mut depth = 0usize;
        let mut term = String::new();
        for c in selector.chars() {
            match c {
                '(' => depth += 1,
                ')' => depth = depth.saturating_sub(1),
                ',' if depth == 0 => {
                    terms.push(std::mem::take(&mut term));
                    continue;
                }
                _ => {}
            }
            term.push(c);
        }
        terms.push(term);
        terms
            .iter()
            .map(|t| LabelRequirement::parse(t.trim()))
            .collect::<Option<Vec<_>>>()
            .map(LabelSelector)
            .ok_or_else(|| {
                ApiError::bad_request(&format!(
                    "unable to parse requirement: found '{selector}', expected: a valid label \
                     selector"
                ))
            })
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(super) fn matches(&self, pod: &KubePod) -> bool {
        self.0.iter().all(|r| r.matches(&pod.labels))
    }
}

impl LabelRequirement {
    pub(super) fn parse(term: &str) -> Option<LabelRequirement> {
        let key = |k: &str| {
            let k = k.trim();
            (!k.is_empty() && k.len() <= 316 && k.chars().all(label_char_or_slash))
                .then(|| k.to_owned())
        };
        let value = |v: &str| {
            let v = v.trim();
            (v.len() <= 63 && v.chars().all(label_char)).then(|| v.to_owned())
        };
        if let Some(k) = term.strip_prefix('!') {
            return Some(LabelRequirement::Absent(key(k)?));
        }
        if let Some((k, rest)) = term.split_once('(') {
            let values = rest.strip_suffix(')')?;
            let values = values.split(',').map(value).collect::<Option<Vec<_>>>()?;
            let k = k.trim_end();
            if let Some(k) = k.strip_suffix(" notin") {
                return Some(LabelRequirement::NotIn(key(k)?, values));
            }
            return Some(LabelRequirement::In(key(k.strip_suffix(" in")?)?, values));
        }
        for (operator, equal) in [("!=", false), ("==", true), ("=", true)] {
            if let Some((k, v)) = term.split_once(operator) {
                let (k, v) = (key(k)?, vec![value(v)?]);
                return Some(if equal {
                    LabelRequirement::In(k, v)
                } else {
                    LabelRequirement::NotIn(k, v)
                });
            }
        }
        if let Some((k, n)) = term.split_once('>') {
            return Some(LabelRequirement::GreaterThan(
                key(k)?,
                n.trim().parse().ok()?,
            ));
        }
        if let Some((k, n)) = term.split_once('<') {
            return Some(LabelRequirement::LessThan(key(k)?, n.trim().parse().ok()?));
        }
        Some(LabelRequirement::Exists(key(term)?))
    }

    pub(super) fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let number = |k: &String| labels.get(k).and_then(|v| v.parse::<i64>().ok());
        match self {
            LabelRequirement::Exists(k) => labels.contains_key(k),
            LabelRequirement::Absent(k) => !labels.contains_key(k),
            LabelRequirement::In(k, values) => labels.get(k).is_some_and(|v| values.contains(v)),
            LabelRequirement::NotIn(k, values) => labels.get(k).is_none_or(|v| !values.contains(v)),
            LabelRequirement::GreaterThan(k, n) => number(k).is_some_and(|v| v > *n),
            LabelRequirement::LessThan(k, n) => number(k).is_some_and(|v| v < *n),
        }
    }
}

fn label_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

fn label_char_or_slash(c: char) -> bool {
    label_char(c) || c == '/'
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fakes::kube_api::test_pod;

    #[test]
    fn query_parameters_decode_as_kube_apiserver_reads_them() {
        let q = Query::parse(Some(
            "&watch=true&fieldSelector=spec.nodeName%3Dnode-a%2Cmetadata.name!%3Dx&limit=1+0",
        ));
        assert!(q.flag("watch"));
        assert_eq!(
            q.get("fieldSelector"),
            Some("spec.nodeName=node-a,metadata.name!=x")
        );
        assert_eq!(q.get("limit"), Some("1 0"));
        for (raw, on) in [("watch", true), ("watch=1", true), ("watch=0", false)] {
            assert_eq!(Query::parse(Some(raw)).flag("watch"), on, "{raw}");
        }
        assert!(!Query::parse(Some("watch=False")).flag("watch"));
        assert!(!Query::parse(None).flag("watch"));
        assert_eq!(percent_decode("a%2"), "a%2", "a broken escape is kept");
    }

    #[test]
    fn field_selectors() {
        let web = test_pod("team-a", "web-0", "node-a");
        let matches = |s: &str| FieldSelector::parse(s).unwrap().matches(&web);
        assert!(matches(""));
        assert!(matches("spec.nodeName=node-a"));
        assert!(matches("spec.nodeName==node-a,metadata.namespace=team-a"));
        assert!(matches("spec.nodeName!=node-b"));
        assert!(!matches("spec.nodeName!=node-a"));
        assert!(!matches("spec.nodeName=node-a,metadata.name=web-1"));
        assert!(matches("status.phase=Running,spec.hostNetwork=false"));
        assert!(matches("status.podIP=10.1.0.1"));
        let comma = KubePod {
            name: "a,b".to_owned(),
            ..web.clone()
        };
        assert!(FieldSelector::parse("metadata.name=a\\,b")
            .unwrap()
            .matches(&comma));
        let unsupported = FieldSelector::parse("spec.color=blue").unwrap_err();
        assert_eq!(
            (unsupported.code, unsupported.message.as_str()),
            (400, "field label not supported: spec.color")
        );
        assert_eq!(FieldSelector::parse("nonsense").unwrap_err().code, 400);
    }

    #[test]
    fn label_selectors() {
        let web = test_pod("team-a", "web-0", "node-a")
            .label("app", "web")
            .label("tier", "front")
            .label("replicas", "3");
        let matches = |s: &str| LabelSelector::parse(s).unwrap().matches(&web);
        assert!(matches(""));
        assert!(matches("app=web,tier!=db"));
        assert!(matches("app==web"));
        assert!(matches("app in (web, api),tier notin (db)"));
        assert!(matches("app,!legacy"));
        assert!(matches("replicas>2,replicas<4"));
        assert!(!matches("app=api"));
        assert!(!matches("legacy"));
        assert!(!matches("app notin (web)"));
        assert!(
            matches("example.com/owner!=me"),
            "a missing label is not equal"
        );
        for bad in ["a=b=c", "app in (web", "=web", "a b"] {
            assert_eq!(LabelSelector::parse(bad).unwrap_err().code, 400, "{bad}");
        }
    }
}
