//! Lists of pods: a consistent snapshot served in pages, as etcd serves them.

use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hyper::Response;
use serde_json::{json, Value};

use super::objects::{pod_columns, pod_object, pod_row, table, Representation};
use super::query::{parse_resource_version, ListOptions};
use super::status::ApiError;
use super::store::Stored;
use super::{json_response, wait_for_resource_version, Body, Shared};

pub(super) async fn list(
    shared: &Shared,
    namespace: Option<&str>,
    options: &ListOptions,
    representation: Representation,
) -> Result<Response<Body>, ApiError> {
    options.validate_list()?;
    let (at, start) = match &options.continue_token {
        Some(token) => {
            if options
                .resource_version
                .as_deref()
                .is_some_and(|rv| rv != "0")
            {
                return Err(ApiError::bad_request(
                    "specifying resource version is not allowed when using continue",
                ));
            }
            let token = ContinueToken::decode(token)?;
            let store = shared.store();
            let at = match u64::try_from(token.resource_version) {
                // The token of a `410` answer: go on from the current state.
                Err(_) => store.resource_version,
                Ok(rv) if rv < store.compacted => {
                    return Err(ApiError::expired(CONTINUE_EXPIRED).continue_token(
                        &ContinueToken {
                            resource_version: -1,
                            start: token.start,
                        }
                        .encode(),
                    ))
                }
                Ok(rv) => rv,
            };
            (at, Some(token.start))
        }
        None => {
            let requested = match options.resource_version.as_deref() {
                None | Some("0") => 0,
                Some(rv) => parse_resource_version(rv)?,
            };
            if requested > 0 {
                wait_for_resource_version(shared, requested).await?;
            }
            let store = shared.store();
            if options.resource_version_match.as_deref() == Some("Exact") {
                if requested < store.compacted {
                    return Err(ApiError::expired(
                        "The resourceVersion for the provided list is too old.",
                    ));
                }
                (requested, None)
            } else {
                (store.resource_version, None)
            }
        }
    };
    let pods = shared.store().snapshot_at(at);
    // Keys are relative to the collection, as in kube-apiserver's continue tokens.
    let prefix = namespace.map_or_else(String::new, |ns| format!("{ns}/"));
    let in_collection: Vec<(&str, &Arc<Stored>)> = pods
        .iter()
        .filter_map(|(key, stored)| Some((key.strip_prefix(&prefix)?, stored)))
        .filter(|(relative, _)| start.as_deref().is_none_or(|s| *relative >= s))
        .collect();
    let mut items = Vec::new();
    let mut last = None;
    let mut scanned = 0;
    for (relative, stored) in &in_collection {
        if options.limit.is_some_and(|limit| items.len() >= limit) {
            break;
        }
        scanned += 1;
        if options.matches(namespace, &stored.pod) {
            items.push(*stored);
            last = Some(*relative);
        }
    }
    // A full page with keys after it: the client has to come back for them.
    let remaining = in_collection.len() - scanned;
    let mut metadata = json!({ "resourceVersion": at.to_string() });
    if let (true, Some(last)) = (remaining > 0, last) {
        metadata["continue"] = Value::from(
            ContinueToken {
                resource_version: at as i64,
                start: format!("{last}\u{0}"),
            }
            .encode(),
        );
        // etcd can count what is left only when every key counts.
        if !options.has_selectors() {
            metadata["remainingItemCount"] = Value::from(remaining);
        }
    }
    Ok(json_response(&match representation {
        Representation::Object => json!({
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": metadata,
            "items": items
                .iter()
                .map(|s| pod_object(s, s.resource_version, false))
                .collect::<Vec<_>>(),
        }),
        Representation::Table(version) => table(
            version,
            metadata,
            Some(pod_columns()),
            items
                .iter()
                .map(|s| pod_row(s, s.resource_version))
                .collect(),
        ),
    }))
}

const CONTINUE_EXPIRED: &str = "The provided continue parameter is too old to display a \
consistent list result. You can start a new list without the continue parameter, or use the \
continue token in this response to retrieve the remainder of the results. Continuing with the \
provided token results in an inconsistent list - objects that were created, modified, or \
deleted between the time the first chunk was returned and now may show up in the list.";

/// The opaque `continue` of a paged list: kube-apiserver's shape, base64url JSON naming the
/// snapshot's resourceVersion (-1: none, go on from the latest) and the key to start from.
#[derive(Debug)]
struct ContinueToken {
    resource_version: i64,
    start: String,
}

impl ContinueToken {
    fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(
            json!({ "v": "meta.k8s.io/v1", "rv": self.resource_version, "start": self.start })
                .to_string(),
        )
    }

    fn decode(token: &str) -> Result<ContinueToken, ApiError> {
        let invalid =
            |why: &str| ApiError::bad_request(&format!("continue key is not valid: {why}"));
        let bytes = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| invalid("not base64url"))?;
        let value: Value = serde_json::from_slice(&bytes).map_err(|_| invalid("not JSON"))?;
        if value["v"] != "meta.k8s.io/v1" {
            return Err(invalid(
                "incorrect encoded start resourceVersion (version meta.k8s.io/v1)",
            ));
        }
        let (Some(resource_version), Some(start)) = (value["rv"].as_i64(), value["start"].as_str())
        else {
            return Err(invalid("missing rv or start"));
        };
        if start.is_empty() || resource_version == 0 {
            return Err(invalid("incorrect encoded start resourceVersion"));
        }
        Ok(ContinueToken {
            resource_version,
            start: start.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continue_tokens_round_trip_and_reject_garbage() {
        let token = ContinueToken {
            resource_version: 1005,
            start: "team-a/web-0\u{0}".to_owned(),
        }
        .encode();
        let back = ContinueToken::decode(&token).unwrap();
        assert_eq!(
            (back.resource_version, back.start.as_str()),
            (1005, "team-a/web-0\u{0}")
        );
        for bad in ["", "!!", &URL_SAFE_NO_PAD.encode("{}")] {
            assert_eq!(ContinueToken::decode(bad).unwrap_err().code, 400, "{bad}");
        }
    }
}
