//! The three patch types kube-apiserver applies to a built-in object, each as it applies them:
//! JSON patch (RFC 6902) with the semantics of the `gopkg.in/evanphx/json-patch.v4` library
//! the server uses, JSON merge patch (RFC 7386), and strategic merge patch, whose lists merge
//! by the strategy the object's Go type declares for them (`patchStrategy`, `patchMergeKey`).
//!
//! These work on JSON values only; the caller decides what a failure answers (kube-apiserver
//! answers a JSON patch that does not apply with a bare `422`, whatever the reason).

use serde_json::{Map, Value};

/// A patch that is not well-formed (`400` on the wire).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Malformed(pub(super) String);

/// A well-formed patch that does not apply to the document (`422` for a JSON patch). The text
/// is the library's, for the fake's log: the server does not send it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct NotApplied(pub(super) String);

#[derive(Debug, PartialEq, Eq)]
pub(super) enum PatchError {
    Malformed(Malformed),
    NotApplied(NotApplied),
}

fn malformed(message: impl Into<String>) -> PatchError {
    PatchError::Malformed(Malformed(message.into()))
}

fn not_applied(message: impl Into<String>) -> PatchError {
    PatchError::NotApplied(NotApplied(message.into()))
}

// ---------------------------------------------------------------------------------------------
// JSON patch

/// Apply an RFC 6902 patch as json-patch v4.12 does, quirks included: `replace` of a key an
/// object lacks adds it (only a missing parent or array index fails), a `test` of a missing
/// key passes for `null`, negative array indices count from the end, and an operation without
/// `value` uses `null`.
pub(super) fn json_patch(doc: &Value, patch: &[u8]) -> Result<Value, PatchError> {
    let ops: Vec<Map<String, Value>> =
        serde_json::from_slice(patch).map_err(|e| malformed(e.to_string()))?;
    let mut doc = doc.clone();
    for op in &ops {
        let kind = op.get("op").and_then(Value::as_str).unwrap_or("unknown");
        let target = op.get("path").and_then(Value::as_str);
        let value = op.get("value").cloned().unwrap_or(Value::Null);
        let path = || target.ok_or_else(|| not_applied(format!("{kind} operation: missing path")));
        match kind {
            "add" => add(&mut doc, path()?, value)?,
            "remove" => {
                remove(&mut doc, path()?)?;
            }
            "replace" => replace(&mut doc, path()?, value)?,
            "test" => test(&doc, path()?, &value)?,
            "move" => {
                let from = from_of(op, kind)?;
                let moved = get(&doc, from)?;
                remove(&mut doc, from)?;
                add(&mut doc, path()?, moved)?;
            }
            "copy" => {
                let copied = get(&doc, from_of(op, kind)?)?;
                add(&mut doc, path()?, copied)?;
            }
            other => return Err(not_applied(format!("Unexpected kind: {other}"))),
        }
    }
    Ok(doc)
}

fn from_of<'a>(op: &'a Map<String, Value>, kind: &str) -> Result<&'a str, PatchError> {
    op.get("from")
        .and_then(Value::as_str)
        .ok_or_else(|| not_applied(format!("{kind} operation: missing from")))
}

/// `~1` is `/` and `~0` is `~` in a pointer's segment (RFC 6901).
fn decode_segment(segment: &str) -> String {
    segment.replace("~1", "/").replace("~0", "~")
}

/// The library's `findObject`: the container the path's last segment is in, and that segment.
/// Every segment before the last splits on `/` after the first, so a path without a leading
/// `/` names a key of the root.
fn parent<'a>(doc: &'a mut Value, path: &str) -> Option<(&'a mut Value, String)> {
    let segments: Vec<&str> = path.split('/').collect();
    if segments.len() < 2 {
        return None;
    }
    let mut node = doc;
    for segment in &segments[1..segments.len() - 1] {
        let key = decode_segment(segment);
        node = match node {
            Value::Object(map) => map.get_mut(&key)?,
            Value::Array(items) => {
                let len = items.len();
                let index = array_index(&key, len).ok()?;
                items.get_mut(index)?
            }
            _ => return None,
        };
        if !(node.is_object() || node.is_array()) {
            return None;
        }
    }
    let last = decode_segment(segments[segments.len() - 1]);
    Some((node, last))
}

/// An existing index of an array of `len`, negative ones counting from the end.
fn array_index(key: &str, len: usize) -> Result<usize, PatchError> {
    let index: i64 = key
        .parse()
        .map_err(|_| not_applied(format!("strconv.Atoi: parsing {key:?}: invalid syntax")))?;
    let resolved = if index < 0 { index + len as i64 } else { index };
    if resolved < 0 || resolved >= len as i64 {
        return Err(not_applied(format!(
            "Unable to access invalid index: {index}: invalid index referenced"
        )));
    }
    Ok(resolved as usize)
}

fn missing_path(kind: &str, path: &str) -> PatchError {
    not_applied(format!(
        "{kind} operation does not apply: doc is missing path: {path}: missing value"
    ))
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), PatchError> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (container, key) = parent(doc, path).ok_or_else(|| missing_path("add", path))?;
    match container {
        Value::Object(map) => {
            map.insert(key, value);
        }
        Value::Array(items) => {
            if key == "-" {
                items.push(value);
                return Ok(());
            }
            let index: i64 = key
                .parse()
                .map_err(|_| not_applied(format!("value was not a proper array index: '{key}'")))?;
            // Inserting into an array of len + 1 places.
            let slots = items.len() as i64 + 1;
            let resolved = if index < 0 { index + slots } else { index };
            if resolved < 0 || resolved >= slots {
                return Err(not_applied(format!(
                    "error in add for path: '{path}': Unable to access invalid index: {index}"
                )));
            }
            items.insert(resolved as usize, value);
        }
        _ => return Err(missing_path("add", path)),
    }
    Ok(())
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, PatchError> {
    let (container, key) = parent(doc, path).ok_or_else(|| missing_path("remove", path))?;
    match container {
        Value::Object(map) => map.remove(&key).ok_or_else(|| {
            not_applied(format!(
                "error in remove for path: '{path}': Unable to remove nonexistent key: {key}: \
                 missing value"
            ))
        }),
        Value::Array(items) => {
            let index = array_index(&key, items.len())?;
            Ok(items.remove(index))
        }
        _ => Err(missing_path("remove", path)),
    }
}

fn replace(doc: &mut Value, path: &str, value: Value) -> Result<(), PatchError> {
    if path.is_empty() {
        if !(value.is_object() || value.is_array()) {
            return Err(not_applied(
                "replace operation value must be object or array",
            ));
        }
        *doc = value;
        return Ok(());
    }
    let (container, key) = parent(doc, path).ok_or_else(|| missing_path("replace", path))?;
    match container {
        // v4 checks only that getting the key does not fail, which for an object it never
        // does: a missing key is added.
        Value::Object(map) => {
            map.insert(key, value);
        }
        Value::Array(items) => {
            let index = array_index(&key, items.len()).map_err(|_| {
                not_applied(format!(
                    "replace operation does not apply: doc is missing key: {path}: missing value"
                ))
            })?;
            items[index] = value;
        }
        _ => return Err(missing_path("replace", path)),
    }
    Ok(())
}

/// The value at `path` (`null` for a missing key of an existing object, as the library reads
/// it), for `move` and `copy`.
fn get(doc: &Value, path: &str) -> Result<Value, PatchError> {
    let mut doc = doc.clone();
    let (container, key) = parent(&mut doc, path).ok_or_else(|| missing_path("get", path))?;
    match container {
        Value::Object(map) => Ok(map.get(&key).cloned().unwrap_or(Value::Null)),
        Value::Array(items) => Ok(items[array_index(&key, items.len())?].clone()),
        _ => Err(missing_path("get", path)),
    }
}

fn test(doc: &Value, path: &str, expected: &Value) -> Result<(), PatchError> {
    let failed = || not_applied(format!("testing value {path} failed: test failed"));
    if path.is_empty() {
        return if doc == expected {
            Ok(())
        } else {
            Err(failed())
        };
    }
    let mut copy = doc.clone();
    let (container, key) = parent(&mut copy, path).ok_or_else(|| {
        not_applied(format!(
            "test operation does not apply: is missing path: {path}: missing value"
        ))
    })?;
    let actual = match container {
        Value::Object(map) => map.get(&key).cloned().unwrap_or(Value::Null),
        Value::Array(items) => items[array_index(&key, items.len())?].clone(),
        _ => return Err(failed()),
    };
    // Structural equality, as the library's: key order never matters, array order does.
    if actual == *expected {
        Ok(())
    } else {
        Err(failed())
    }
}

// ---------------------------------------------------------------------------------------------
// JSON merge patch

/// RFC 7386: objects merge key by key, `null` deletes, anything else replaces.
pub(super) fn merge_patch(doc: &Value, patch: &[u8]) -> Result<Value, PatchError> {
    let patch: Value =
        serde_json::from_slice(patch).map_err(|_| malformed("Invalid JSON Patch"))?;
    if patch.is_null() {
        return Err(malformed("Invalid JSON Patch"));
    }
    Ok(merge(doc.clone(), &patch))
}

fn merge(doc: Value, patch: &Value) -> Value {
    let Value::Object(patch) = patch else {
        return patch.clone();
    };
    let mut doc = match doc {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    for (key, value) in patch {
        if value.is_null() {
            doc.remove(key);
        } else {
            let merged = merge(doc.remove(key).unwrap_or(Value::Null), value);
            doc.insert(key.clone(), merged);
        }
    }
    Value::Object(doc)
}

// ---------------------------------------------------------------------------------------------
// Strategic merge patch

/// How a list of the object's type merges, from its field's `patchStrategy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ListStrategy {
    /// No strategy: the patch's list replaces the list (`spec.taints` of a Node).
    Replace,
    /// `patchStrategy:"merge"` on a list of scalars: the union, existing order first.
    MergeScalars,
    /// `patchStrategy:"merge"` with `patchMergeKey`: elements merge by that key.
    MergeByKey(&'static str),
}

/// A strategic merge patch, with `strategy` naming each list field's strategy by its path
/// from the root (`["status", "conditions"]`). Supports the directives kubectl and
/// client-go's two-way patches send: `$patch` (`merge`, `replace`, `delete`), `$retainKeys`,
/// `$deleteFromPrimitiveList/<field>` and `$setElementOrder/<field>` (accepted; the fake
/// keeps the merged order).
pub(super) fn strategic_merge_patch(
    doc: &Value,
    patch: &[u8],
    strategy: fn(&[&str]) -> ListStrategy,
) -> Result<Value, PatchError> {
    let patch: Value = serde_json::from_slice(patch).map_err(|e| malformed(e.to_string()))?;
    let Value::Object(patch) = patch else {
        return Err(malformed(
            "json: cannot unmarshal a patch that is not an object into Go value of type \
             map[string]interface {}",
        ));
    };
    let Value::Object(doc) = doc.clone() else {
        return Err(not_applied("the document is not an object"));
    };
    let mut path = Vec::new();
    match merge_map(doc, &patch, &mut path, strategy)? {
        Some(merged) => Ok(Value::Object(merged)),
        None => Ok(Value::Object(Map::new())),
    }
}

const DIRECTIVE: &str = "$patch";
const RETAIN_KEYS: &str = "$retainKeys";
const DELETE_FROM_PRIMITIVE_LIST: &str = "$deleteFromPrimitiveList/";
const SET_ELEMENT_ORDER: &str = "$setElementOrder/";

/// Merge `patch` into `doc`; `None` when the patch deletes the map (`$patch: delete`).
fn merge_map<'p>(
    mut doc: Map<String, Value>,
    patch: &'p Map<String, Value>,
    path: &mut Vec<&'p str>,
    strategy: fn(&[&str]) -> ListStrategy,
) -> Result<Option<Map<String, Value>>, PatchError> {
    match patch.get(DIRECTIVE).map(|d| d.as_str()) {
        None | Some(Some("merge")) => {}
        Some(Some("delete")) => return Ok(None),
        Some(Some("replace")) => {
            return Ok(Some(strip_directives(patch)));
        }
        Some(other) => {
            return Err(malformed(format!(
                "Unknown patch type: {}",
                other.unwrap_or("(not a string)")
            )))
        }
    }
    for (key, value) in patch {
        if key == DIRECTIVE || key == RETAIN_KEYS || key.starts_with(SET_ELEMENT_ORDER) {
            continue;
        }
        if let Some(field) = key.strip_prefix(DELETE_FROM_PRIMITIVE_LIST) {
            let Value::Array(gone) = value else {
                return Err(malformed(format!("{key} must be a list")));
            };
            if let Some(Value::Array(items)) = doc.get_mut(field) {
                items.retain(|item| !gone.contains(item));
            }
            continue;
        }
        path.push(key);
        let merged = match (doc.remove(key), value) {
            (_, Value::Null) => None,
            (Some(Value::Object(old)), Value::Object(new)) => {
                merge_map(old, new, path, strategy)?.map(Value::Object)
            }
            (None, Value::Object(new)) => {
                merge_map(Map::new(), new, path, strategy)?.map(Value::Object)
            }
            (Some(Value::Array(old)), Value::Array(new)) => {
                Some(Value::Array(merge_list(old, new, path, strategy)?))
            }
            (None, Value::Array(new)) => {
                Some(Value::Array(merge_list(Vec::new(), new, path, strategy)?))
            }
            (_, other) => Some(other.clone()),
        };
        path.pop();
        if let Some(merged) = merged {
            doc.insert(key.clone(), merged);
        }
    }
    if let Some(retain) = patch.get(RETAIN_KEYS) {
        let Value::Array(retain) = retain else {
            return Err(malformed("$retainKeys must be a list of strings"));
        };
        doc.retain(|key, _| retain.iter().any(|k| k.as_str() == Some(key)));
    }
    Ok(Some(doc))
}

fn strip_directives(map: &Map<String, Value>) -> Map<String, Value> {
    map.iter()
        .filter(|(k, _)| !k.starts_with('$'))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn merge_list<'p>(
    mut doc: Vec<Value>,
    patch: &'p [Value],
    path: &mut Vec<&'p str>,
    strategy: fn(&[&str]) -> ListStrategy,
) -> Result<Vec<Value>, PatchError> {
    match strategy(path) {
        ListStrategy::Replace => Ok(patch
            .iter()
            .filter(|item| item.get(DIRECTIVE).is_none())
            .cloned()
            .collect()),
        ListStrategy::MergeScalars => {
            for item in patch {
                if !doc.contains(item) {
                    doc.push(item.clone());
                }
            }
            Ok(doc)
        }
        ListStrategy::MergeByKey(merge_key) => {
            // `[{"$patch": "replace"}, ...]`: the rest of the list replaces it.
            if patch
                .iter()
                .any(|item| item.get(DIRECTIVE).and_then(Value::as_str) == Some("replace"))
            {
                return Ok(patch
                    .iter()
                    .filter(|item| item.get(DIRECTIVE).is_none())
                    .cloned()
                    .collect());
            }
            for item in patch {
                let Value::Object(fields) = item else {
                    return Err(malformed(format!(
                        "a list with merge key {merge_key} has an element that is not an object"
                    )));
                };
                let Some(key) = fields.get(merge_key) else {
                    return Err(malformed(format!(
                        "map: {item} does not contain declared merge key: {merge_key}"
                    )));
                };
                let at = doc.iter().position(|d| d.get(merge_key) == Some(key));
                let delete = fields.get(DIRECTIVE).and_then(Value::as_str) == Some("delete");
                match (at, delete) {
                    (Some(at), true) => {
                        doc.remove(at);
                    }
                    (None, true) => {}
                    (Some(at), false) => {
                        let Value::Object(old) = doc.remove(at) else {
                            return Err(malformed("a merged list element is not an object"));
                        };
                        if let Some(merged) = merge_map(old, fields, path, strategy)? {
                            doc.insert(at, Value::Object(merged));
                        }
                    }
                    (None, false) => doc.push(Value::Object(strip_directives(fields))),
                }
            }
            Ok(doc)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn jp(doc: Value, patch: Value) -> Result<Value, PatchError> {
        json_patch(&doc, patch.to_string().as_bytes())
    }

    #[test]
    fn json_patch_applies_as_json_patch_v4_does() {
        let doc = json!({"spec": {"taints": [{"key": "a"}, {"key": "b"}]}, "metadata": {}});
        let taints = json!([{"key": "a"}, {"key": "b"}]);
        let patched = jp(
            doc.clone(),
            json!([
                {"op": "test", "path": "/spec/taints", "value": taints},
                {"op": "replace", "path": "/spec/taints", "value": [{"key": "b"}]},
            ]),
        )
        .unwrap();
        assert_eq!(patched["spec"]["taints"], json!([{"key": "b"}]));

        let failed = jp(
            doc.clone(),
            json!([{"op": "test", "path": "/spec/taints", "value": []}]),
        );
        assert!(
            matches!(failed, Err(PatchError::NotApplied(_))),
            "{failed:?}"
        );
        // Key order does not matter to `test`; a missing key equals only null.
        jp(
            json!({"a": {"x": 1, "y": 2}}),
            json!([{"op": "test", "path": "/a", "value": {"y": 2, "x": 1}},
                   {"op": "test", "path": "/b", "value": null}]),
        )
        .unwrap();

        // remove of a missing key fails; replace of one adds it (v4), unless its parent is
        // missing.
        assert!(jp(doc.clone(), json!([{"op": "remove", "path": "/spec/nope"}])).is_err());
        let added = jp(
            doc.clone(),
            json!([{"op": "replace", "path": "/spec/nope", "value": 1}]),
        )
        .unwrap();
        assert_eq!(added["spec"]["nope"], 1);
        assert!(jp(
            doc.clone(),
            json!([{"op": "replace", "path": "/nope/x", "value": 1}])
        )
        .is_err());
        assert!(jp(
            doc.clone(),
            json!([{"op": "replace", "path": "/spec/taints/2", "value": 1}])
        )
        .is_err());

        let removed = jp(
            doc.clone(),
            json!([{"op": "remove", "path": "/spec/taints/-1"},
                   {"op": "add", "path": "/spec/taints/0", "value": {"key": "z"}},
                   {"op": "add", "path": "/spec/taints/-", "value": {"key": "end"}},
                   {"op": "add", "path": "/metadata/labels", "value": {"a~b/c": "1"}},
                   {"op": "copy", "from": "/metadata/labels/a~0b~1c", "path": "/metadata/x"},
                   {"op": "move", "from": "/metadata/x", "path": "/metadata/y"}]),
        )
        .unwrap();
        assert_eq!(
            removed["spec"]["taints"],
            json!([{"key": "z"}, {"key": "a"}, {"key": "end"}])
        );
        assert_eq!(removed["metadata"]["y"], "1");
        assert!(removed["metadata"].get("x").is_none());
        assert!(matches!(
            json_patch(&doc, b"{not json"),
            Err(PatchError::Malformed(_))
        ));
        assert!(jp(doc, json!([{"op": "frobnicate", "path": "/a"}])).is_err());
    }

    #[test]
    fn merge_patch_is_rfc_7386() {
        let doc = json!({"a": {"b": 1, "c": [1, 2]}, "d": 1});
        let patched =
            merge_patch(&doc, br#"{"a": {"b": null, "c": [3]}, "e": {"f": null}}"#).unwrap();
        assert_eq!(patched, json!({"a": {"c": [3]}, "d": 1, "e": {}}));
        assert!(matches!(
            merge_patch(&doc, b"null"),
            Err(PatchError::Malformed(_))
        ));
    }

    fn node_strategy(path: &[&str]) -> ListStrategy {
        match path {
            ["status", "conditions"] => ListStrategy::MergeByKey("type"),
            ["metadata", "finalizers"] => ListStrategy::MergeScalars,
            _ => ListStrategy::Replace,
        }
    }

    #[test]
    fn strategic_merge_patch_merges_lists_by_their_strategy() {
        let doc = json!({
            "metadata": {"labels": {"a": "1", "b": "2"}, "finalizers": ["x"]},
            "spec": {"taints": [{"key": "t1", "effect": "NoSchedule"},
                                {"key": "t2", "effect": "NoSchedule"}]},
            "status": {"conditions": [{"type": "Ready", "status": "True"},
                                      {"type": "MemoryPressure", "status": "False"}]},
        });
        let smp = |patch: Value| {
            strategic_merge_patch(&doc, patch.to_string().as_bytes(), node_strategy).unwrap()
        };
        // What `kubectl taint` sends: taints have no strategy, the list is replaced.
        let patched = smp(json!({"spec": {"taints": [{"key": "t2", "effect": "NoSchedule"}]}}));
        assert_eq!(
            patched["spec"]["taints"],
            json!([{"key": "t2", "effect": "NoSchedule"}])
        );
        assert!(smp(json!({"spec": {"taints": null}}))["spec"]
            .get("taints")
            .is_none());
        let patched = smp(json!({
            "metadata": {"labels": {"a": null, "c": "3"}, "finalizers": ["y"]},
            "status": {"conditions": [{"type": "Ready", "status": "False"},
                                      {"type": "MemoryPressure", "$patch": "delete"}],
                       "$setElementOrder/conditions": [{"type": "Ready"}]},
        }));
        assert_eq!(patched["metadata"]["labels"], json!({"b": "2", "c": "3"}));
        assert_eq!(patched["metadata"]["finalizers"], json!(["x", "y"]));
        assert_eq!(
            patched["status"]["conditions"],
            json!([{"type": "Ready", "status": "False"}])
        );
        let patched = smp(json!({
            "metadata": {"labels": {"$patch": "replace", "z": "9"},
                         "$deleteFromPrimitiveList/finalizers": ["x"]},
        }));
        assert_eq!(patched["metadata"]["labels"], json!({"z": "9"}));
        assert_eq!(patched["metadata"]["finalizers"], json!([]));
        assert!(matches!(
            strategic_merge_patch(&doc, br#"{"$patch": "sideways"}"#, node_strategy),
            Err(PatchError::Malformed(_))
        ));
    }
}
