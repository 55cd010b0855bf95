//! Nodes, as kube-apiserver serves and writes them: `GET /api/v1/nodes/{name}`, the list,
//! and writes with `PATCH` (JSON patch, merge patch, strategic merge patch) and `PUT`.
//!
//! A write goes the way kube-apiserver takes it: the patch is applied to the stored object
//! (a JSON patch that does not apply, a failed `test` among them, is a bare `422`); a
//! `metadata.resourceVersion` in the result other than the stored one is a `409 Conflict`,
//! none at all an unconditional write (nodes allow them); `uid` and `creationTimestamp` stay,
//! `status` stays (it is written through `nodes/status`, which the fake does not serve); the
//! result is validated (taints, label and annotation keys) and stored with the next
//! resourceVersion, shared with pods as etcd's revision is. A write that changes nothing
//! keeps the resourceVersion. What the fake does not do: drop fields Node does not have (it
//! keeps them), server-side apply, `managedFields`, watches of nodes, and selectors or paging
//! on the node list.
//!
//! Tests add nodes ([`FakeKubeApi::add_node`]), change them behind a client's back
//! ([`FakeKubeApi::set_node_taints`], [`FakeKubeApi::modify_node`]), refuse the next patches
//! with `409` ([`FakeKubeApi::fail_next_node_patches`]), and read what clients sent
//! ([`FakeKubeApi::node_writes`]).

use std::collections::BTreeMap;
use std::net::IpAddr;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{HeaderMap, Method, Request, Response};
use serde_json::{json, Map, Value};

use super::objects::{age, negotiate, partial_object_metadata, table, Representation};
use super::patch::{self, ListStrategy, PatchError};
use super::query::Query;
use super::status::ApiError;
use super::store::{unix_now, Store};
use super::{json_response, Body, FakeKubeApi, RequestKind, Route, Shared, DEFAULT_HOST_IP};
use crate::assertions::{format_rfc3339_utc, parse_rfc3339_utc};
use crate::keys::random_uuid;

/// kube-apiserver's `--max-request-body-bytes` default (3 MiB): a larger write is `413`.
const MAX_REQUEST_BODY: usize = 3 * 1024 * 1024;

/// The patch types the fake applies, as kube-apiserver names them in its `415`.
const JSON_PATCH: &str = "application/json-patch+json";
const MERGE_PATCH: &str = "application/merge-patch+json";
const STRATEGIC_MERGE_PATCH: &str = "application/strategic-merge-patch+json";

/// What a node reports: the release `/version` reports, on the tests' machine.
const KUBELET_VERSION: &str = "v1.32.0";

/// The taint effects kube-apiserver accepts, in the order its error message lists them.
const TAINT_EFFECTS: [&str; 3] = ["NoSchedule", "PreferNoSchedule", "NoExecute"];

/// A taint of a node's `spec.taints`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeTaint {
    pub key: String,
    /// Left out of the object when `None` or empty, as the API server leaves it out.
    pub value: Option<String>,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`.
    pub effect: String,
    /// RFC 3339 (`2024-01-01T00:00:00Z`); kubectl sets it on `NoExecute` taints.
    pub time_added: Option<String>,
}

impl KubeTaint {
    pub fn new(key: &str, effect: &str) -> KubeTaint {
        KubeTaint {
            key: key.to_owned(),
            value: None,
            effect: effect.to_owned(),
            time_added: None,
        }
    }

    /// `key:NoSchedule`, the effect of a startup taint.
    pub fn no_schedule(key: &str) -> KubeTaint {
        KubeTaint::new(key, "NoSchedule")
    }

    pub fn value(mut self, value: &str) -> KubeTaint {
        self.value = Some(value.to_owned());
        self
    }

    pub fn time_added(mut self, rfc3339: &str) -> KubeTaint {
        self.time_added = Some(rfc3339.to_owned());
        self
    }

    /// The taint as the API server serves it.
    pub fn to_json(&self) -> Value {
        let mut taint = json!({ "key": self.key, "effect": self.effect });
        if let Some(value) = self.value.as_deref().filter(|v| !v.is_empty()) {
            taint["value"] = Value::from(value);
        }
        if let Some(time) = &self.time_added {
            taint["timeAdded"] = Value::from(time.clone());
        }
        taint
    }

    /// A taint of a served node; `None` for anything that is not one.
    pub fn from_json(taint: &Value) -> Option<KubeTaint> {
        let text = |name: &str| taint.get(name).and_then(Value::as_str).map(str::to_owned);
        Some(KubeTaint {
            key: text("key")?,
            value: text("value"),
            effect: text("effect").unwrap_or_default(),
            time_added: text("timeAdded"),
        })
    }
}

/// A node as a test adds it. The served object has what a kubelet registers: these labels
/// and annotations, `spec.taints`, and a minimal status (the `Ready` condition, addresses,
/// `nodeInfo`, capacity).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeNode {
    pub name: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub taints: Vec<KubeTaint>,
    /// `spec.unschedulable` (a cordoned node).
    pub unschedulable: bool,
    /// The `Ready` condition's status.
    pub ready: bool,
    /// The `InternalIP` address.
    pub internal_ip: IpAddr,
}

impl KubeNode {
    /// A ready Linux node with the labels and annotations a kubelet registers with.
    pub fn new(name: &str) -> KubeNode {
        let labels = [
            ("beta.kubernetes.io/arch", "amd64"),
            ("beta.kubernetes.io/os", "linux"),
            ("kubernetes.io/arch", "amd64"),
            ("kubernetes.io/hostname", name),
            ("kubernetes.io/os", "linux"),
        ];
        let annotations = [
            ("node.alpha.kubernetes.io/ttl", "0"),
            (
                "volumes.kubernetes.io/controller-managed-attach-detach",
                "true",
            ),
        ];
        let map = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        KubeNode {
            name: name.to_owned(),
            uid: random_uuid(),
            labels: map(&labels),
            annotations: map(&annotations),
            taints: Vec::new(),
            unschedulable: false,
            ready: true,
            internal_ip: DEFAULT_HOST_IP,
        }
    }

    pub fn label(mut self, key: &str, value: &str) -> KubeNode {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> KubeNode {
        self.annotations.insert(key.to_owned(), value.to_owned());
        self
    }

    pub fn taint(mut self, taint: KubeTaint) -> KubeNode {
        self.taints.push(taint);
        self
    }

    pub fn unschedulable(mut self) -> KubeNode {
        self.unschedulable = true;
        self
    }

    pub fn not_ready(mut self) -> KubeNode {
        self.ready = false;
        self
    }

    pub fn internal_ip(mut self, ip: IpAddr) -> KubeNode {
        self.internal_ip = ip;
        self
    }

    /// The v1 Node, without its resourceVersion (the store sets it).
    fn object(&self, created: i64) -> Value {
        let since = format_rfc3339_utc(created);
        let mut metadata = json!({
            "name": self.name,
            "uid": self.uid,
            "creationTimestamp": since,
        });
        if !self.labels.is_empty() {
            metadata["labels"] = json!(self.labels);
        }
        if !self.annotations.is_empty() {
            metadata["annotations"] = json!(self.annotations);
        }
        let mut spec = json!({});
        if !self.taints.is_empty() {
            spec["taints"] = self.taints.iter().map(KubeTaint::to_json).collect();
        }
        if self.unschedulable {
            spec["unschedulable"] = Value::from(true);
        }
        let (ready, reason, message) = if self.ready {
            ("True", "KubeletReady", "kubelet is posting ready status")
        } else {
            (
                "False",
                "KubeletNotReady",
                "container runtime network not ready",
            )
        };
        let resources = json!({ "cpu": "2", "memory": "8Gi", "pods": "110" });
        json!({
            "kind": "Node",
            "apiVersion": "v1",
            "metadata": metadata,
            "spec": spec,
            "status": {
                "conditions": [{
                    "type": "Ready",
                    "status": ready,
                    "lastHeartbeatTime": since,
                    "lastTransitionTime": since,
                    "reason": reason,
                    "message": message,
                }],
                "addresses": [
                    { "type": "InternalIP", "address": self.internal_ip.to_string() },
                    { "type": "Hostname", "address": self.name },
                ],
                "capacity": resources.clone(),
                "allocatable": resources,
                "daemonEndpoints": { "kubeletEndpoint": { "Port": 10250 } },
                "nodeInfo": {
                    "machineID": "",
                    "systemUUID": "",
                    "bootID": "",
                    "kernelVersion": "6.1.0-28-amd64",
                    "osImage": "Debian GNU/Linux 12 (bookworm)",
                    "containerRuntimeVersion": "containerd://1.7.24",
                    "kubeletVersion": KUBELET_VERSION,
                    "kubeProxyVersion": KUBELET_VERSION,
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                },
            },
        })
    }
}

/// A write a client sent to a node (`PATCH` or `PUT`), and the status it was answered with.
#[derive(Clone, Debug)]
pub struct NodeWrite {
    pub method: String,
    /// Path and query, e.g. `/api/v1/nodes/node-a?fieldManager=kubectl-taint`.
    pub target: String,
    /// The media type, without parameters.
    pub content_type: String,
    /// The body as sent.
    pub body: String,
    pub status: u16,
}

impl NodeWrite {
    /// The body as JSON (`null` if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// The nodes in the store.
#[derive(Debug, Default)]
pub(super) struct Nodes {
    /// The served objects by name, `kind` and `resourceVersion` included.
    objects: BTreeMap<String, Value>,
    /// Node PATCHes still to refuse with `409` ([`FakeKubeApi::fail_next_node_patches`]).
    conflicts_to_send: usize,
    writes: Vec<NodeWrite>,
}

/// Store `object` as node `name` at the next resourceVersion; returns that version.
fn store_node(store: &mut Store, name: &str, mut object: Value) -> u64 {
    store.resource_version += 1;
    let resource_version = store.resource_version;
    object["metadata"]["resourceVersion"] = Value::from(resource_version.to_string());
    store.nodes.objects.insert(name.to_owned(), object);
    resource_version
}

/// The counter a request to `route` goes to.
pub(super) fn request_kind(route: &Route, method: &Method) -> RequestKind {
    match (route, method) {
        (Route::Nodes, &Method::GET) => RequestKind::NodeList,
        (Route::Node(_), &Method::GET) => RequestKind::NodeGet,
        (Route::Node(_), &Method::PATCH) => RequestKind::NodePatch,
        (Route::Node(_), &Method::PUT) => RequestKind::NodeUpdate,
        _ => RequestKind::Other,
    }
}

/// Answer an authorized request for the nodes collection or one node.
pub(super) async fn serve(
    shared: &Shared,
    route: Route,
    query: &Query,
    req: Request<Incoming>,
) -> Response<Body> {
    let accept = header(req.headers(), "accept");
    let reply = match (req.method().clone(), route) {
        (Method::GET, Route::Nodes) => list(shared, query, accept.as_deref()),
        (Method::GET, Route::Node(name)) => get(shared, &name, accept.as_deref()),
        (method @ (Method::PATCH | Method::PUT), Route::Node(name)) => {
            Ok(write(shared, &method, &name, query, req).await)
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )),
    };
    reply.unwrap_or_else(ApiError::into_response)
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn get(shared: &Shared, name: &str, accept: Option<&str>) -> Result<Response<Body>, ApiError> {
    let representation = negotiate(accept)?;
    let store = shared.store();
    let Some(node) = store.nodes.objects.get(name) else {
        return Err(ApiError::not_found("nodes", name));
    };
    Ok(json_response(&match representation {
        Representation::Object => node.clone(),
        Representation::Table(version) => table(
            version,
            json!({ "resourceVersion": node["metadata"]["resourceVersion"] }),
            Some(node_columns()),
            vec![node_row(node)],
        ),
    }))
}

fn list(shared: &Shared, query: &Query, accept: Option<&str>) -> Result<Response<Body>, ApiError> {
    if query.flag("watch") {
        return Err(ApiError::new(
            405,
            "MethodNotAllowed",
            "the fake API server does not watch nodes",
        ));
    }
    for selector in ["labelSelector", "fieldSelector"] {
        if query.get(selector).is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::bad_request(&format!(
                "the fake API server does not filter nodes ({selector})"
            )));
        }
    }
    let representation = negotiate(accept)?;
    let store = shared.store();
    let limit = query.get("limit").and_then(|l| l.parse::<usize>().ok());
    if limit.is_some_and(|l| l > 0 && l < store.nodes.objects.len()) {
        return Err(ApiError::bad_request(
            "the fake API server does not page nodes: ask for more than it has",
        ));
    }
    let metadata = json!({ "resourceVersion": store.resource_version.to_string() });
    let nodes = store.nodes.objects.values();
    Ok(json_response(&match representation {
        Representation::Object => json!({
            "kind": "NodeList",
            "apiVersion": "v1",
            "metadata": metadata,
            "items": nodes.map(|n| {
                let mut item = n.clone();
                if let Value::Object(fields) = &mut item {
                    fields.remove("kind");
                    fields.remove("apiVersion");
                }
                item
            }).collect::<Vec<_>>(),
        }),
        Representation::Table(version) => table(
            version,
            metadata,
            Some(node_columns()),
            nodes.map(node_row).collect(),
        ),
    }))
}

/// A `PATCH` or `PUT` of node `name`: answered, and recorded with its answer.
async fn write(
    shared: &Shared,
    method: &Method,
    name: &str,
    query: &Query,
    req: Request<Incoming>,
) -> Response<Body> {
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_owned(), |p| p.to_string());
    let content_type = header(req.headers(), CONTENT_TYPE.as_str())
        .map(|t| t.split(';').next().unwrap_or_default().trim().to_owned())
        .unwrap_or_default();
    let body = Limited::new(req.into_body(), MAX_REQUEST_BODY)
        .collect()
        .await
        .ok()
        .map(|b| b.to_bytes());
    let outcome = match &body {
        None => Err(ApiError::new(
            413,
            "RequestEntityTooLarge",
            &format!("Request entity too large: limit is {MAX_REQUEST_BODY}"),
        )),
        Some(body) if *method == Method::PATCH => {
            apply_patch(shared, name, &content_type, query, body)
        }
        Some(body) => update(shared, name, query, body),
    };
    let (response, written) = match outcome {
        Ok((object, written)) => (json_response(&object), written),
        Err(e) => (e.into_response(), None),
    };
    let status = response.status().as_u16();
    let mut store = shared.store();
    store.nodes.writes.push(NodeWrite {
        method: method.to_string(),
        target,
        content_type,
        body: body
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default(),
        status,
    });
    drop(store);
    if let Some(resource_version) = written {
        shared.changed.send_replace(resource_version);
    }
    response
}

/// What a `dryRun` query asks: `All` (validate, answer, store nothing) or nothing.
fn dry_run(query: &Query) -> Result<bool, ApiError> {
    match query.get("dryRun") {
        None | Some("") => Ok(false),
        Some("All") => Ok(true),
        Some(other) => Err(ApiError::new(
            422,
            "Invalid",
            &format!(
                "PatchOptions.meta.k8s.io \"\" is invalid: dryRun: Unsupported value: \
                 [\"{other}\"]: supported values: \"All\""
            ),
        )
        .details(json!({ "group": "meta.k8s.io", "kind": "PatchOptions" }))),
    }
}

/// The answer to a successful write and, when it stored a change, its resourceVersion.
type Written = (Value, Option<u64>);

/// A `PATCH`: applied to the stored node as its media type says, then committed.
fn apply_patch(
    shared: &Shared,
    name: &str,
    content_type: &str,
    query: &Query,
    body: &[u8],
) -> Result<Written, ApiError> {
    let apply: fn(&Value, &[u8]) -> Result<Value, PatchError> = match content_type {
        JSON_PATCH => patch::json_patch,
        MERGE_PATCH => patch::merge_patch,
        STRATEGIC_MERGE_PATCH => |doc, body| patch::strategic_merge_patch(doc, body, node_lists),
        _ => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                &format!(
                    "the body of the request was in an unknown format - accepted media types \
                     include: {JSON_PATCH}, {MERGE_PATCH}, {STRATEGIC_MERGE_PATCH}"
                ),
            ))
        }
    };
    let dry_run = dry_run(query)?;
    let mut store = shared.store();
    let Some(current) = store.nodes.objects.get(name).cloned() else {
        return Err(ApiError::not_found("nodes", name));
    };
    if store.nodes.conflicts_to_send > 0 {
        store.nodes.conflicts_to_send -= 1;
        return Err(conflict(name));
    }
    let patched = apply(&current, body).map_err(|e| match e {
        PatchError::Malformed(patch::Malformed(message)) => ApiError::bad_request(&message),
        // kube-apiserver drops the library's reason (`NewGenericServerResponse` without
        // causes): every JSON patch that does not apply gets this same answer.
        PatchError::NotApplied(_) => ApiError::new(
            422,
            "Invalid",
            "the server rejected our request due to an error in our request",
        )
        .details(json!({})),
    })?;
    commit(&mut store, name, &current, patched, dry_run)
}

/// A `PUT`: the object sent replaces the stored one.
fn update(shared: &Shared, name: &str, query: &Query, body: &[u8]) -> Result<Written, ApiError> {
    let object: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(&format!(
            "the object provided is unrecognized (must be of type Node): {e}"
        ))
    })?;
    let dry_run = dry_run(query)?;
    let mut store = shared.store();
    let Some(current) = store.nodes.objects.get(name).cloned() else {
        return Err(ApiError::not_found("nodes", name));
    };
    commit(&mut store, name, &current, object, dry_run)
}

/// Store `new` as node `name` the way kube-apiserver's registry stores an update.
fn commit(
    store: &mut Store,
    name: &str,
    current: &Value,
    mut new: Value,
    dry_run: bool,
) -> Result<Written, ApiError> {
    if !new.is_object() || !new.get("metadata").is_none_or(Value::is_object) {
        return Err(undecodable(&new, "the patched object is not a Node"));
    }
    let meta = |object: &Value, field: &str| {
        object
            .pointer(&format!("/metadata/{field}"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let new_name = meta(&new, "name");
    if new_name != name {
        return Err(ApiError::bad_request(&format!(
            "the name of the object ({new_name}) does not match the name on the URL ({name})"
        )));
    }
    let stored_version = meta(current, "resourceVersion");
    match meta(&new, "resourceVersion").as_str() {
        // Nodes allow unconditional updates.
        "" => {}
        version if version == stored_version => {}
        version if version.parse::<u64>().is_err() => {
            return Err(ApiError::bad_request(&format!(
                "resourceVersion: Invalid value: \"{version}\": must be a decimal number"
            )))
        }
        _ => return Err(conflict(name)),
    }
    let uid = meta(&new, "uid");
    if !uid.is_empty() && uid != meta(current, "uid") {
        return Err(invalid(
            name,
            vec![FieldError::invalid(
                "metadata.uid",
                &uid,
                "field is immutable",
            )],
        ));
    }
    // What the registry keeps whatever the client sent.
    new["kind"] = Value::from("Node");
    new["apiVersion"] = Value::from("v1");
    new["metadata"]["uid"] = current["metadata"]["uid"].clone();
    new["metadata"]["creationTimestamp"] = current["metadata"]["creationTimestamp"].clone();
    new["metadata"]["resourceVersion"] = Value::from(stored_version);
    new["status"] = current["status"].clone();
    normalize(&mut new);
    let errors = validate(&new);
    if !errors.is_empty() {
        return Err(invalid(name, errors));
    }
    if dry_run || new == *current {
        return Ok((new, None));
    }
    let resource_version = store_node(store, name, new);
    let stored = store.nodes.objects[name].clone();
    Ok((stored, Some(resource_version)))
}

/// The object decoded into a Node and encoded again: `null`s and empty optional fields are
/// gone, a taint has only its four fields.
fn normalize(object: &mut Value) {
    drop_nulls(object);
    if let Some(Value::Array(taints)) = object.pointer_mut("/spec/taints") {
        for taint in taints.iter_mut() {
            if let Value::Object(fields) = taint {
                fields
                    .retain(|k, _| matches!(k.as_str(), "key" | "value" | "effect" | "timeAdded"));
                if fields.get("value").and_then(Value::as_str) == Some("") {
                    fields.remove("value");
                }
            }
        }
    }
    for (parent, field) in [
        ("/metadata", "labels"),
        ("/metadata", "annotations"),
        ("/spec", "taints"),
    ] {
        if let Some(Value::Object(fields)) = object.pointer_mut(parent) {
            let empty = match fields.get(field) {
                Some(Value::Object(map)) => map.is_empty(),
                Some(Value::Array(items)) => items.is_empty(),
                _ => false,
            };
            if empty {
                fields.remove(field);
            }
        }
    }
    if object.pointer("/spec/unschedulable") == Some(&Value::from(false)) {
        if let Some(Value::Object(spec)) = object.pointer_mut("/spec") {
            spec.remove("unschedulable");
        }
    }
    if object.get("spec").is_none() {
        object["spec"] = json!({});
    }
}

fn drop_nulls(value: &mut Value) {
    match value {
        Value::Object(fields) => {
            fields.retain(|_, v| !v.is_null());
            fields.values_mut().for_each(drop_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

/// How the lists of a Node merge in a strategic merge patch (the Go types' `patchStrategy`
/// and `patchMergeKey`). `spec.taints` has none: a patch replaces the list.
fn node_lists(path: &[&str]) -> ListStrategy {
    match path {
        ["metadata", "finalizers"] | ["spec", "podCIDRs"] => ListStrategy::MergeScalars,
        ["metadata", "ownerReferences"] => ListStrategy::MergeByKey("uid"),
        ["status", "conditions" | "addresses"] => ListStrategy::MergeByKey("type"),
        _ => ListStrategy::Replace,
    }
}

fn conflict(name: &str) -> ApiError {
    ApiError::new(
        409,
        "Conflict",
        &format!(
            "Operation cannot be fulfilled on nodes \"{name}\": the object has been modified; \
             please apply your changes to the latest version and try again"
        ),
    )
    .details(json!({ "name": name, "kind": "nodes" }))
}

/// A result that does not decode into a Node (a field of the wrong type).
fn undecodable(object: &Value, why: &str) -> ApiError {
    ApiError::new(
        422,
        "Invalid",
        &format!(
            " \"\" is invalid: patch: Invalid value: {:?}: {why}",
            object.to_string()
        ),
    )
    .details(json!({
        "causes": [{ "reason": "FieldValueInvalid", "message": why, "field": "patch" }],
    }))
}

/// One entry of a validation failure, as `field.Error` renders.
#[derive(Debug)]
struct FieldError {
    field: String,
    /// The cause's `reason` (`FieldValueInvalid`...).
    cause: &'static str,
    /// `Invalid value: "x": why`.
    body: String,
}

impl FieldError {
    fn invalid(field: &str, value: &str, detail: &str) -> FieldError {
        FieldError {
            field: field.to_owned(),
            cause: "FieldValueInvalid",
            body: format!("Invalid value: {value:?}: {detail}"),
        }
    }
}

/// `422 Invalid` naming the Node and every error, as `errors.NewInvalid` does.
fn invalid(name: &str, errors: Vec<FieldError>) -> ApiError {
    let rendered: Vec<String> = errors
        .iter()
        .map(|e| format!("{}: {}", e.field, e.body))
        .collect();
    let aggregate = match rendered.as_slice() {
        [one] => one.clone(),
        many => format!("[{}]", many.join(", ")),
    };
    ApiError::new(
        422,
        "Invalid",
        &format!("Node \"{name}\" is invalid: {aggregate}"),
    )
    .details(json!({
        "name": name,
        "kind": "Node",
        "causes": errors.iter().map(|e| json!({
            "reason": e.cause, "message": e.body, "field": e.field,
        })).collect::<Vec<_>>(),
    }))
}

/// What kube-apiserver's `ValidateNodeUpdate` checks that a test may trip: field types, label
/// and annotation keys and label values, and the taints (key, value, effect, unique by key
/// and effect).
fn validate(node: &Value) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let type_error = |field: &str, expected: &str| FieldError {
        field: field.to_owned(),
        cause: "FieldValueTypeInvalid",
        body: format!("Invalid value: the value must be {expected}"),
    };
    for (field, check_values) in [("labels", true), ("annotations", false)] {
        match node["metadata"].get(field) {
            None => {}
            Some(Value::Object(map)) => {
                for (key, value) in map {
                    let path = format!("metadata.{field}");
                    let lowered = key.to_ascii_lowercase();
                    let checked = if check_values { key } else { &lowered };
                    for why in qualified_name_errors(checked) {
                        errors.push(FieldError::invalid(&path, key, &why));
                    }
                    match value.as_str() {
                        None => errors.push(type_error(&format!("{path}[{key}]"), "a string")),
                        Some(v) if check_values => {
                            for why in label_value_errors(v) {
                                errors.push(FieldError::invalid(&path, v, &why));
                            }
                        }
                        Some(_) => {}
                    }
                }
            }
            Some(_) => errors.push(type_error(&format!("metadata.{field}"), "an object")),
        }
    }
    match node.get("spec") {
        Some(Value::Object(spec)) => {
            if spec.get("unschedulable").is_some_and(|u| !u.is_boolean()) {
                errors.push(type_error("spec.unschedulable", "a boolean"));
            }
            match spec.get("taints") {
                None => {}
                Some(Value::Array(taints)) => validate_taints(taints, &mut errors),
                Some(_) => errors.push(type_error("spec.taints", "a list")),
            }
        }
        _ => errors.push(type_error("spec", "an object")),
    }
    errors
}

fn validate_taints(taints: &[Value], errors: &mut Vec<FieldError>) {
    let mut seen: Vec<(&str, &str)> = Vec::new();
    for (i, taint) in taints.iter().enumerate() {
        let path = format!("spec.taints[{i}]");
        let Value::Object(fields) = taint else {
            errors.push(FieldError {
                field: path,
                cause: "FieldValueTypeInvalid",
                body: "Invalid value: the value must be an object".to_owned(),
            });
            continue;
        };
        let (key, value, effect) = (
            text(fields, "key"),
            text(fields, "value"),
            text(fields, "effect"),
        );
        for why in qualified_name_errors(key) {
            errors.push(FieldError::invalid(&format!("{path}.key"), key, &why));
        }
        for why in label_value_errors(value) {
            errors.push(FieldError::invalid(&format!("{path}.value"), value, &why));
        }
        if effect.is_empty() {
            errors.push(FieldError {
                field: format!("{path}.effect"),
                cause: "FieldValueRequired",
                body: "Required value".to_owned(),
            });
        } else if !TAINT_EFFECTS.contains(&effect) {
            let supported: Vec<String> = TAINT_EFFECTS.iter().map(|e| format!("{e:?}")).collect();
            errors.push(FieldError {
                field: format!("{path}.effect"),
                cause: "FieldValueNotSupported",
                body: format!(
                    "Unsupported value: {effect:?}: supported values: {}",
                    supported.join(", ")
                ),
            });
        }
        if seen.contains(&(key, effect)) {
            errors.push(FieldError {
                field: path,
                cause: "FieldValueDuplicate",
                body: format!(
                    "Duplicate value: {}: taints must be unique by key and effect pair",
                    Value::Object(fields.clone())
                ),
            });
        } else {
            seen.push((key, effect));
        }
    }
}

fn text<'a>(fields: &'a Map<String, Value>, name: &str) -> &'a str {
    fields.get(name).and_then(Value::as_str).unwrap_or_default()
}

const QUALIFIED_NAME_RULE: &str = "must consist of alphanumeric characters, '-', '_' or '.', \
    and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or \
    '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";

/// apimachinery's `IsQualifiedName`: `[prefix/]name`, the prefix a DNS subdomain, the name
/// at most 63 characters of `[-A-Za-z0-9_.]` starting and ending alphanumeric.
fn qualified_name_errors(value: &str) -> Vec<String> {
    let mut errors = Vec::new();
    let parts: Vec<&str> = value.split('/').collect();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() {
                errors.push("prefix part must be non-empty".to_owned());
            } else if !is_dns_subdomain(prefix) {
                errors.push(
                    "prefix part a lowercase RFC 1123 subdomain must consist of lower case \
                     alphanumeric characters, '-' or '.', and must start and end with an \
                     alphanumeric character"
                        .to_owned(),
                );
            }
            *name
        }
        _ => {
            return vec![format!(
                "a qualified name {QUALIFIED_NAME_RULE} with an optional DNS subdomain prefix \
                 and '/' (e.g. 'example.com/MyName')"
            )]
        }
    };
    if name.is_empty() {
        errors.push("name part must be non-empty".to_owned());
    } else if name.len() > 63 {
        errors.push("name part must be no more than 63 characters".to_owned());
    }
    if !is_label_text(name) || name.is_empty() {
        errors.push(format!("name part {QUALIFIED_NAME_RULE}"));
    }
    errors
}

/// apimachinery's `IsValidLabelValue`: empty, or at most 63 characters of `[-A-Za-z0-9_.]`
/// starting and ending alphanumeric.
fn label_value_errors(value: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if value.len() > 63 {
        errors.push("must be no more than 63 characters".to_owned());
    }
    if !value.is_empty() && !is_label_text(value) {
        errors.push(
            "a valid label must be an empty string or consist of alphanumeric characters, '-', \
             '_' or '.', and must start and end with an alphanumeric character"
                .to_owned(),
        );
    }
    errors
}

fn is_label_text(s: &str) -> bool {
    let ends_alphanumeric = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    ends_alphanumeric(s.chars().next())
        && ends_alphanumeric(s.chars().last())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            let ends =
                |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
            ends(label.chars().next())
                && ends(label.chars().last())
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}

// ---------------------------------------------------------------------------------------------
// Server-side printing: what `kubectl get nodes` shows.

fn node_columns() -> Value {
    let column = |name: &str, priority: u8, format: &str, description: &str| {
        json!({ "name": name, "type": "string", "format": format,
                "description": description, "priority": priority })
    };
    Value::Array(vec![
        column("Name", 0, "name", "Name must be unique within a namespace."),
        column("Status", 0, "", "The status of the node"),
        column("Roles", 0, "", "The roles of the node"),
        column(
            "Age",
            0,
            "",
            "CreationTimestamp is a timestamp representing the server time when this object \
             was created.",
        ),
        column("Version", 0, "", "Kubelet Version reported by the node."),
        column(
            "Internal-IP",
            1,
            "",
            "List of addresses reachable to the node.",
        ),
        column(
            "External-IP",
            1,
            "",
            "List of addresses reachable to the node.",
        ),
        column(
            "OS-Image",
            1,
            "",
            "OS Image reported by the node from /etc/os-release.",
        ),
        column(
            "Kernel-Version",
            1,
            "",
            "Kernel Version reported by the node.",
        ),
        column(
            "Container-Runtime",
            1,
            "",
            "ContainerRuntime Version reported by the node through runtime remote API.",
        ),
    ])
}

fn node_row(node: &Value) -> Value {
    let none = || "<none>".to_owned();
    let status = &node["status"];
    let ready = status["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True");
    let mut state = if ready { "Ready" } else { "NotReady" }.to_owned();
    if node.pointer("/spec/unschedulable") == Some(&Value::from(true)) {
        state.push_str(",SchedulingDisabled");
    }
    let labels = node["metadata"]["labels"].as_object();
    let mut roles: Vec<&str> = labels
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| match k.strip_prefix("node-role.kubernetes.io/") {
            Some(role) => Some(role),
            None if k == "kubernetes.io/role" => v.as_str(),
            None => None,
        })
        .filter(|r| !r.is_empty())
        .collect();
    roles.sort_unstable();
    roles.dedup();
    let address = |kind: &str| {
        status["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["type"] == kind)
            .and_then(|a| a["address"].as_str())
            .map_or_else(none, str::to_owned)
    };
    let info = |field: &str| {
        status["nodeInfo"][field]
            .as_str()
            .filter(|s| !s.is_empty())
            .map_or_else(|| "<unknown>".to_owned(), str::to_owned)
    };
    let created = node["metadata"]["creationTimestamp"]
        .as_str()
        .and_then(parse_rfc3339_utc)
        .unwrap_or_else(unix_now);
    json!({
        "cells": [
            node["metadata"]["name"],
            state,
            if roles.is_empty() { none() } else { roles.join(",") },
            age(created),
            info("kubeletVersion"),
            address("InternalIP"),
            address("ExternalIP"),
            info("osImage"),
            info("kernelVersion"),
            info("containerRuntimeVersion"),
        ],
        "object": partial_object_metadata(node["metadata"].clone()),
    })
}

// ---------------------------------------------------------------------------------------------
// The test's side

impl FakeKubeApi {
    /// Add a node (created now, at the next resourceVersion).
    pub fn add_node(&self, node: KubeNode) {
        let resource_version = {
            let mut store = self.shared.store();
            assert!(
                !store.nodes.objects.contains_key(&node.name),
                "the fake API server already has node {}",
                node.name
            );
            store_node(&mut store, &node.name, node.object(unix_now()))
        };
        self.shared.changed.send_replace(resource_version);
    }

    /// The node as a GET serves it, if the fake has it.
    pub fn node(&self, name: &str) -> Option<Value> {
        self.shared.store().nodes.objects.get(name).cloned()
    }

    /// The node's taints, in order. Panics if the fake has no such node.
    pub fn node_taints(&self, name: &str) -> Vec<KubeTaint> {
        let node = self
            .node(name)
            .unwrap_or_else(|| panic!("the fake API server has no node {name}"));
        node.pointer("/spec/taints")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(KubeTaint::from_json)
            .collect()
    }

    /// Change a node as another client would (at the next resourceVersion): a change made
    /// behind the back of a client that read the node before.
    pub fn modify_node(&self, name: &str, change: impl FnOnce(&mut Value)) {
        let resource_version = {
            let mut store = self.shared.store();
            let mut node = store
                .nodes
                .objects
                .get(name)
                .cloned()
                .unwrap_or_else(|| panic!("the fake API server has no node {name}"));
            change(&mut node);
            normalize(&mut node);
            store_node(&mut store, name, node)
        };
        self.shared.changed.send_replace(resource_version);
    }

    /// Replace the node's taints (none: `spec.taints` goes).
    pub fn set_node_taints(&self, name: &str, taints: Vec<KubeTaint>) {
        self.modify_node(name, |node| {
            node["spec"]["taints"] = taints.iter().map(KubeTaint::to_json).collect();
        });
    }

    /// Add a taint at the end of the node's taints.
    pub fn add_node_taint(&self, name: &str, taint: KubeTaint) {
        let mut taints = self.node_taints(name);
        taints.push(taint);
        self.set_node_taints(name, taints);
    }

    /// Answer the next `n` PATCHes of an existing node with `409 Conflict`, as when another
    /// client wrote the node in between; they change nothing.
    pub fn fail_next_node_patches(&self, n: usize) {
        self.shared.store().nodes.conflicts_to_send = n;
    }

    /// Every node PATCH and PUT received (authorized ones), in arrival order, with its answer.
    pub fn node_writes(&self) -> Vec<NodeWrite> {
        self.shared.store().nodes.writes.clone()
    }

    /// GETs of one node received.
    pub fn node_gets(&self) -> usize {
        self.requests_of(RequestKind::NodeGet)
    }

    /// PATCHes of a node received (counted on arrival, authorized or not).
    pub fn node_patches(&self) -> usize {
        self.requests_of(RequestKind::NodePatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_values_are_checked_as_apimachinery_checks_them() {
        for ok in [
            "pod-identity-agent/not-ready",
            "node.kubernetes.io/unreachable",
            "a",
            "A_b.c",
        ] {
            assert!(qualified_name_errors(ok).is_empty(), "{ok}");
        }
        for bad in [
            "",
            "/a",
            "a/",
            "Big.Prefix/a",
            "a/b/c",
            "-a",
            "a b",
            &"x".repeat(64),
        ] {
            assert!(!qualified_name_errors(bad).is_empty(), "{bad:?}");
        }
        assert!(label_value_errors("").is_empty());
        assert!(!label_value_errors("a/b").is_empty());
    }

    #[test]
    fn a_write_is_normalized_and_validated() {
        let mut node = KubeNode::new("n").object(0);
        node["spec"]["taints"] = json!([
            { "key": "a", "value": "", "effect": "NoSchedule", "timeAdded": null, "extra": 1 },
        ]);
        node["metadata"]["labels"] = json!({});
        normalize(&mut node);
        assert_eq!(
            node["spec"]["taints"],
            json!([{ "key": "a", "effect": "NoSchedule" }])
        );
        assert!(node["metadata"].get("labels").is_none());
        assert!(validate(&node).is_empty());

        node["spec"]["taints"] = json!([
            { "key": "a", "effect": "NoSchedule" },
            { "key": "a", "effect": "NoSchedule" },
            { "key": "b", "effect": "Sometimes" },
        ]);
        let errors = validate(&node);
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["spec.taints[1]", "spec.taints[2].effect"],
            "{errors:?}"
        );
        let status = invalid("n", errors).body();
        assert_eq!(status["code"], 422);
        assert_eq!(
            status["details"]["causes"][1]["reason"],
            "FieldValueNotSupported"
        );
        assert!(status["message"]
            .as_str()
            .unwrap()
            .starts_with("Node \"n\" is invalid: [spec.taints[1]: Duplicate value"));
    }
}
