//! The JSON a client sees: pods and namespaces as kube-apiserver renders them, the tables of
//! server-side printing (what `kubectl get` shows), and the discovery documents.

use serde_json::{json, Value};

use super::status::ApiError;
use super::store::{unix_now, Namespace, Stored};
use super::KubePod;
use crate::assertions::format_rfc3339_utc;
use crate::keys;

/// What `/version` reports: the release the self-tests' `kubectl` (1.32) is made for, so it
/// raises no version-skew warning.
const VERSION: (&str, &str, &str) = ("1", "32", "v1.32.0");

/// The one container of every pod.
const CONTAINER_NAME: &str = "app";
const CONTAINER_IMAGE: &str = "registry.k8s.io/pause:3.10";

pub(super) fn version() -> Value {
    let (major, minor, git_version) = VERSION;
    json!({
        "major": major,
        "minor": minor,
        "gitVersion": git_version,
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2024-12-11T00:00:00Z",
        "goVersion": "go1.23.4",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// The core group's resources the fake serves (pods, namespaces to read, and nodes), with the
/// verbs a real server lists.
pub(super) fn core_v1_resources() -> Value {
    json!({
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            {
                "name": "namespaces",
                "singularName": "namespace",
                "namespaced": false,
                "kind": "Namespace",
                "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                "shortNames": ["ns"],
            },
            {
                "name": "nodes",
                "singularName": "node",
                "namespaced": false,
                "kind": "Node",
                "verbs": ["create", "delete", "deletecollection", "get", "list", "patch",
                          "update", "watch"],
                "shortNames": ["no"],
            },
            {
                "name": "pods",
                "singularName": "pod",
                "namespaced": true,
                "kind": "Pod",
                "verbs": ["create", "delete", "deletecollection", "get", "list", "patch",
                          "update", "watch"],
                "shortNames": ["po"],
                "categories": ["all"],
            },
            {
                "name": "pods/status",
                "singularName": "",
                "namespaced": true,
                "kind": "Pod",
                "verbs": ["get", "patch", "update"],
            },
        ],
    })
}

/// A pod's `metadata`, at `resource_version`.
fn pod_metadata(stored: &Stored, resource_version: u64) -> Value {
    let pod = &stored.pod;
    let mut metadata = json!({
        "name": pod.name,
        "namespace": pod.namespace,
        "uid": pod.uid,
        "resourceVersion": resource_version.to_string(),
        "creationTimestamp": format_rfc3339_utc(stored.created),
    });
    if !pod.labels.is_empty() {
        metadata["labels"] = json!(pod.labels);
    }
    metadata
}

/// The v1 Pod as kube-apiserver serves it; `type_meta` adds `kind` and `apiVersion`, which
/// list items lack.
pub(super) fn pod_object(stored: &Stored, resource_version: u64, type_meta: bool) -> Value {
    let pod = &stored.pod;
    let metadata = pod_metadata(stored, resource_version);
    let mut spec = json!({
        "containers": [{
            "name": CONTAINER_NAME,
            "image": CONTAINER_IMAGE,
            "resources": {},
            "terminationMessagePath": "/dev/termination-log",
            "terminationMessagePolicy": "File",
            "imagePullPolicy": "IfNotPresent",
        }],
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": 30,
        "dnsPolicy": "ClusterFirst",
        "serviceAccountName": pod.service_account,
        "serviceAccount": pod.service_account,
        "securityContext": {},
        "schedulerName": "default-scheduler",
        "priority": 0,
        "enableServiceLinks": true,
        "preemptionPolicy": "PreemptLowerPriority",
    });
    if !pod.node_name.is_empty() {
        spec["nodeName"] = Value::from(pod.node_name.clone());
    }
    // The real server leaves out a false hostNetwork.
    if pod.host_network {
        spec["hostNetwork"] = Value::from(true);
    }
    let mut object = json!({
        "metadata": metadata,
        "spec": spec,
        "status": pod_status(stored),
    });
    if type_meta {
        object["kind"] = Value::from("Pod");
        object["apiVersion"] = Value::from("v1");
    }
    for (pointer, value) in &pod.raw_fields {
        set_at(&mut object, pointer, value.clone());
    }
    object
}

/// Set the field `pointer` names (its parent must be an object) to `value`.
fn set_at(object: &mut Value, pointer: &str, value: Value) {
    let (parent, key) = pointer.rsplit_once('/').unwrap_or(("", pointer));
    let Some(Value::Object(parent)) = object.pointer_mut(parent) else {
        panic!("raw field {pointer}: no object at {parent:?} in the pod");
    };
    parent.insert(key.to_owned(), value);
}

fn pod_status(stored: &Stored) -> Value {
    let pod = &stored.pod;
    let since = format_rfc3339_utc(stored.created);
    let condition = |kind: &str, ok: bool, reason: Option<&str>| {
        let mut c = json!({
            "type": kind,
            "status": if ok { "True" } else { "False" },
            "lastProbeTime": null,
            "lastTransitionTime": since,
        });
        if let Some(reason) = reason.filter(|_| !ok) {
            c["reason"] = Value::from(reason);
        }
        c
    };
    if pod.node_name.is_empty() {
        return json!({
            "phase": pod.phase,
            "conditions": [condition("PodScheduled", false, Some("Unschedulable"))],
            "qosClass": "BestEffort",
        });
    }
    let running = pod.phase == "Running";
    let not_ready = match pod.phase.as_str() {
        "Succeeded" | "Failed" => "PodCompleted",
        _ => "ContainersNotReady",
    };
    let container_id = format!(
        "containerd://{}",
        keys::hex(
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, pod.uid.as_bytes()).as_ref()
        )
    );
    let (state, started) = match pod.phase.as_str() {
        "Running" => (json!({ "running": { "startedAt": since } }), true),
        "Succeeded" | "Failed" => {
            let (code, reason) = if pod.phase == "Succeeded" {
                (0, "Completed")
            } else {
                (1, "Error")
            };
            (
                json!({ "terminated": {
                    "exitCode": code,
                    "reason": reason,
                    "startedAt": since,
                    "finishedAt": since,
                    "containerID": container_id,
                } }),
                false,
            )
        }
        _ => (
            json!({ "waiting": { "reason": "ContainerCreating" } }),
            false,
        ),
    };
    let mut container = json!({
        "name": CONTAINER_NAME,
        "state": state,
        "lastState": {},
        "ready": running,
        "restartCount": 0,
        "image": CONTAINER_IMAGE,
        "imageID": "",
        "started": started,
    });
    if started || pod.phase == "Succeeded" || pod.phase == "Failed" {
        container["containerID"] = Value::from(container_id);
        container["imageID"] = Value::from(format!("{CONTAINER_IMAGE}@sha256:{}", "0".repeat(64)));
    }
    let mut status = json!({
        "phase": pod.phase,
        "conditions": [
            condition("PodReadyToStartContainers", running, None),
            condition("Initialized", true, None),
            condition("Ready", running, Some(not_ready)),
            condition("ContainersReady", running, Some(not_ready)),
            condition("PodScheduled", true, None),
        ],
        "hostIP": pod.host_ip.to_string(),
        "hostIPs": [{ "ip": pod.host_ip.to_string() }],
        "startTime": since,
        "containerStatuses": [container],
        "qosClass": "BestEffort",
    });
    if let Some(ip) = pod.pod_ips.first() {
        status["podIP"] = Value::from(ip.to_string());
        status["podIPs"] = pod
            .pod_ips
            .iter()
            .map(|ip| json!({ "ip": ip.to_string() }))
            .collect();
    }
    status
}

/// What the status column of `kubectl get pods` shows: the phase, or what the container is
/// doing.
fn pod_status_cell(pod: &KubePod) -> &str {
    match pod.phase.as_str() {
        "Pending" if !pod.node_name.is_empty() => "ContainerCreating",
        "Succeeded" => "Completed",
        "Failed" => "Error",
        phase => phase,
    }
}

pub(super) fn pod_columns() -> Value {
    let column = |name: &str, priority: u8, format: &str, description: &str| {
        json!({ "name": name, "type": "string", "format": format,
                "description": description, "priority": priority })
    };
    Value::Array(vec![
        column("Name", 0, "name", "Name must be unique within a namespace."),
        column(
            "Ready",
            0,
            "",
            "The aggregate readiness state of this pod for accepting traffic.",
        ),
        column(
            "Status",
            0,
            "",
            "The aggregate status of the containers in this pod.",
        ),
        column(
            "Restarts",
            0,
            "",
            "The number of times the containers in this pod have been \
            restarted and when the last container in this pod has restarted.",
        ),
        column(
            "Age",
            0,
            "",
            "CreationTimestamp is a timestamp representing the server time \
            when this object was created.",
        ),
        column("IP", 1, "", "podIP address allocated to the pod."),
        column(
            "Node",
            1,
            "",
            "NodeName indicates in which node this pod is scheduled.",
        ),
        column(
            "Nominated Node",
            1,
            "",
            "nominatedNodeName is set only when this pod preempts \
            other pods on the node.",
        ),
        column(
            "Readiness Gates",
            1,
            "",
            "If specified, all readiness gates will be evaluated \
            for pod readiness.",
        ),
    ])
}

/// A row of `kubectl get pods`, with the pod's metadata as the row's object (kubectl takes the
/// namespace column from it).
pub(super) fn pod_row(stored: &Stored, resource_version: u64) -> Value {
    let pod = &stored.pod;
    let none = || "<none>".to_owned();
    json!({
        "cells": [
            pod.name,
            if pod.phase == "Running" { "1/1" } else { "0/1" },
            pod_status_cell(pod),
            0,
            age(stored.created),
            pod.pod_ips.first().map_or_else(none, ToString::to_string),
            if pod.node_name.is_empty() { none() } else { pod.node_name.clone() },
            none(),
            none(),
        ],
        "object": partial_object_metadata(pod_metadata(stored, resource_version)),
    })
}

pub(super) fn partial_object_metadata(metadata: Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
    })
}

/// Server-side printing: a `Table` of `version` (`v1` or `v1beta1`). A watch sends the columns
/// with its first event only (`None` after).
pub(super) fn table(
    version: &str,
    metadata: Value,
    columns: Option<Value>,
    rows: Vec<Value>,
) -> Value {
    json!({
        "kind": "Table",
        "apiVersion": format!("meta.k8s.io/{version}"),
        "metadata": metadata,
        "columnDefinitions": columns,
        "rows": rows,
    })
}

fn namespace_metadata(name: &str, ns: &Namespace) -> Value {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, name.as_bytes());
    let h = keys::hex(&digest.as_ref()[..16]);
    json!({
        "name": name,
        // Stable per name, in the UUID shape.
        "uid": format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..]),
        "resourceVersion": ns.resource_version.to_string(),
        "creationTimestamp": format_rfc3339_utc(ns.created),
        "labels": { "kubernetes.io/metadata.name": name },
    })
}

pub(super) fn namespace_object(name: &str, ns: &Namespace, type_meta: bool) -> Value {
    let mut object = json!({
        "metadata": namespace_metadata(name, ns),
        "spec": { "finalizers": ["kubernetes"] },
        "status": { "phase": "Active" },
    });
    if type_meta {
        object["kind"] = Value::from("Namespace");
        object["apiVersion"] = Value::from("v1");
    }
    object
}

pub(super) fn namespace_columns() -> Value {
    json!([
        { "name": "Name", "type": "string", "format": "name", "priority": 0,
          "description": "Name must be unique within a namespace." },
        { "name": "Status", "type": "string", "format": "", "priority": 0,
          "description": "The status of the namespace" },
        { "name": "Age", "type": "string", "format": "", "priority": 0,
          "description": "CreationTimestamp is a timestamp representing the server time when \
              this object was created." },
    ])
}

pub(super) fn namespace_row(name: &str, ns: &Namespace) -> Value {
    json!({
        "cells": [name, "Active", age(ns.created)],
        "object": partial_object_metadata(namespace_metadata(name, ns)),
    })
}

/// The age column: how long ago `created` was, written as kubectl writes durations
/// (`45s`, `3m20s`, `25m`, `5h3m`, `20h`, `3d4h`, `40d`, `2y30d`).
pub(super) fn age(created: i64) -> String {
    human_duration(unix_now() - created)
}

fn human_duration(seconds: i64) -> String {
    if seconds < 0 {
        return "0s".to_owned();
    }
    let (minutes, hours) = (seconds / 60, seconds / 3600);
    let (days, years) = (hours / 24, hours / 24 / 365);
    let pair = |big: i64, big_unit: &str, small: i64, small_unit: &str| {
        if small == 0 {
            format!("{big}{big_unit}")
        } else {
            format!("{big}{big_unit}{small}{small_unit}")
        }
    };
    match () {
        () if seconds < 120 => format!("{seconds}s"),
        () if minutes < 10 => pair(minutes, "m", seconds % 60, "s"),
        () if minutes < 180 => format!("{minutes}m"),
        () if hours < 8 => pair(hours, "h", minutes % 60, "m"),
        () if hours < 48 => format!("{hours}h"),
        () if hours < 24 * 8 => pair(days, "d", hours % 24, "h"),
        () if hours < 24 * 365 * 2 => format!("{days}d"),
        () if hours < 24 * 365 * 8 => pair(years, "y", days % 365, "d"),
        () => format!("{years}y"),
    }
}

/// How the client asked to see objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Representation {
    /// The objects themselves, as JSON.
    Object,
    /// Server-side printing (what `kubectl get` asks for unless told `-o`), as a
    /// `meta.k8s.io` `Table` of this version.
    Table(&'static str),
}

/// Pick the representation from `Accept`, in the client's order of preference. Only JSON is
/// spoken: a client that accepts neither JSON objects nor JSON tables (protobuf only,
/// `as=PartialObjectMetadata`) gets `406`, as from a server that cannot serve it.
pub(super) fn negotiate(accept: Option<&str>) -> Result<Representation, ApiError> {
    let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
        return Ok(Representation::Object);
    };
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default().to_ascii_lowercase();
        let params: Vec<(&str, &str)> = parts
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        let param = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|&(_, v)| v)
        };
        if param("q").and_then(|q| q.parse::<f32>().ok()) == Some(0.0) {
            continue;
        }
        if !matches!(media.as_str(), "application/json" | "application/*" | "*/*") {
            continue;
        }
        match (param("as"), param("g"), param("v")) {
            (None, _, _) => return Ok(Representation::Object),
            (Some("Table"), Some("meta.k8s.io"), Some("v1")) => {
                return Ok(Representation::Table("v1"))
            }
            (Some("Table"), Some("meta.k8s.io"), Some("v1beta1")) => {
                return Ok(Representation::Table("v1beta1"))
            }
            _ => continue,
        }
    }
    Err(ApiError::new(
        406,
        "NotAcceptable",
        "only the following media types are accepted: application/json",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fakes::kube_api::test_pod;

    #[test]
    fn accept_headers_pick_json_or_a_table() {
        let kubectl = "application/json;as=Table;v=v1;g=meta.k8s.io,\
                       application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
        assert_eq!(
            negotiate(Some(kubectl)).unwrap(),
            Representation::Table("v1")
        );
        assert_eq!(negotiate(None).unwrap(), Representation::Object);
        assert_eq!(
            negotiate(Some("application/json, */*")).unwrap(),
            Representation::Object
        );
        assert_eq!(
            negotiate(Some(
                "application/vnd.kubernetes.protobuf, application/json"
            ))
            .unwrap(),
            Representation::Object
        );
        for refused in [
            "application/vnd.kubernetes.protobuf",
            "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
            "application/json;q=0",
        ] {
            assert_eq!(negotiate(Some(refused)).unwrap_err().code, 406, "{refused}");
        }
    }

    #[test]
    fn ages_read_as_kubectl_writes_them() {
        let hour = 3600;
        let day = 24 * hour;
        for (seconds, text) in [
            (-5, "0s"),
            (45, "45s"),
            (119, "119s"),
            (200, "3m20s"),
            (240, "4m"),
            (1500, "25m"),
            (5 * hour + 180, "5h3m"),
            (20 * hour, "20h"),
            (3 * day + 4 * hour, "3d4h"),
            (40 * day, "40d"),
            (2 * 365 * day + 30 * day, "2y30d"),
            (9 * 365 * day, "9y"),
        ] {
            assert_eq!(human_duration(seconds), text, "{seconds}");
        }
    }

    #[test]
    fn pods_render_as_a_real_server_renders_them() {
        let stored = Stored {
            pod: test_pod("team-a", "web-0", "node-a").host_network(),
            resource_version: 1234,
            created: 0,
        };
        let object = pod_object(&stored, 1234, true);
        assert_eq!(object["kind"], "Pod");
        assert_eq!(object["metadata"]["resourceVersion"], "1234");
        assert_eq!(
            object["metadata"]["creationTimestamp"],
            "1970-01-01T00:00:00Z"
        );
        assert!(
            object["metadata"].get("labels").is_none(),
            "empty maps are left out"
        );
        assert_eq!(object["spec"]["hostNetwork"], true);
        assert_eq!(object["status"]["podIPs"], json!([{ "ip": "127.0.0.1" }]));
        assert_eq!(object["status"]["hostIPs"], json!([{ "ip": "127.0.0.1" }]));
        assert!(pod_object(&stored, 1234, false).get("kind").is_none());

        let pending = Stored {
            pod: KubePod {
                pod_ips: Vec::new(),
                ..test_pod("team-a", "web-1", "node-a").phase("Pending")
            },
            resource_version: 1,
            created: 0,
        };
        let object = pod_object(&pending, 1, true);
        assert!(object["status"].get("podIP").is_none());
        assert_eq!(
            object["status"]["containerStatuses"][0]["state"]["waiting"]["reason"],
            "ContainerCreating"
        );
        let row = pod_row(&pending, 1);
        assert_eq!(row["cells"][2], "ContainerCreating");
        assert_eq!(row["cells"][5], "<none>");
        assert_eq!(row["object"]["metadata"]["namespace"], "team-a");
    }
}
