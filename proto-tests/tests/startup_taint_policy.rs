//! The manifests' least privilege for the startup taint, held to what kube-apiserver would
//! decide: every render (daemonset.yaml, deploy/base and each overlay) grants `get` and
//! `patch` on nodes and no more, tolerates the taint it removes, and ships a
//! ValidatingAdmissionPolicy that lets its agent remove that taint from its own node and
//! nothing else. The policy's CEL (matchConditions, variables, validations) is evaluated with
//! cel-python (`proto-tests/clients/python/admission_policy.py`) against admission requests
//! built as kube-apiserver builds them for the agent's PATCH, for writes it must refuse, and
//! for other users it must leave alone.
//!
//! YAML is read with the test venv's PyYAML and overlays are rendered with `kubectl
//! kustomize`, as in tests/deploy.rs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use proto_tests::clients::python_interpreter;
use serde_json::{json, Value};

const OVERLAYS: [&str; 3] = ["eks", "hybrid", "self-managed-sts"];
const STARTUP_TAINT_ENV: &str = "POD_IDENTITY_AGENT_STARTUP_TAINT";
/// The node the agent's token was issued on, and another.
const NODE: &str = "ip-10-0-1-23.us-west-2.compute.internal";
const OTHER_NODE: &str = "ip-10-0-2-45.us-west-2.compute.internal";
/// Where a pod-bound service-account token (Kubernetes 1.30+) names its node.
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("proto-tests sits in the workspace")
        .to_owned()
}

/// `program` run by the venv's Python with `stdin`; its stdout as JSON.
fn python(args: &[&str], stdin: &[u8], what: &str) -> Value {
    let python = python_interpreter();
    let mut child = Command::new(&python)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "start {} ({e}): run scripts/test, which creates the venv",
                python.display()
            )
        });
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(stdin)
        .expect("write to python");
    let out = child.wait_with_output().expect("python exits");
    assert!(
        out.status.success(),
        "{what} failed (scripts/test installs proto-tests/clients/python/requirements.txt, \
         cel-python and PyYAML among them):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{what}: not JSON: {e}"))
}

fn yaml_documents(text: &str, source: &str) -> Vec<Value> {
    const YAML_TO_JSON: &str = "import json, sys, yaml\n\
        json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)\n";
    match python(&["-c", YAML_TO_JSON], text.as_bytes(), source) {
        Value::Array(docs) => docs,
        other => panic!("{source}: unexpected conversion result {other}"),
    }
}

fn kustomize(relative_dir: &str) -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(repo_root().join(relative_dir))
        .output()
        .expect("run kubectl (scripts/test installs it)");
    assert!(
        out.status.success(),
        "kubectl kustomize {relative_dir}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("kustomize prints UTF-8")
}

/// Every render a user may apply, and the base they are built from.
fn renders() -> Vec<(String, Vec<Value>)> {
    let top = std::fs::read_to_string(repo_root().join("daemonset.yaml")).unwrap();
    let mut renders = vec![(
        "daemonset.yaml".to_owned(),
        yaml_documents(&top, "daemonset.yaml"),
    )];
    for dir in std::iter::once("deploy/base".to_owned())
        .chain(OVERLAYS.iter().map(|o| format!("deploy/overlays/{o}")))
    {
        let docs = yaml_documents(&kustomize(&dir), &dir);
        renders.push((dir, docs));
    }
    renders
}

fn one<'a>(docs: &'a [Value], kind: &str, source: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "{source}: one {kind}");
    found[0]
}

/// What a render says about its agent: the service account's user name and the taint key.
struct Agent {
    username: String,
    taint_key: String,
}

fn agent_of(docs: &[Value], source: &str) -> Agent {
    let daemonset = one(docs, "DaemonSet", source);
    let pod = &daemonset["spec"]["template"]["spec"];
    let namespace = daemonset["metadata"]["namespace"].as_str().unwrap();
    let account = pod["serviceAccountName"].as_str().unwrap();
    let server = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["args"][0] == "server")
        .unwrap_or_else(|| panic!("{source}: a server container"));
    let taint_key = server["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == STARTUP_TAINT_ENV)
        .and_then(|e| e["value"].as_str())
        .unwrap_or_else(|| panic!("{source}: the server sets {STARTUP_TAINT_ENV}"))
        .to_owned();
    let tolerated = pod["tolerations"].as_array().unwrap().iter().any(|t| {
        t["key"] == taint_key.as_str() && t["operator"] == "Exists" && t.get("effect").is_none()
    });
    assert!(tolerated, "{source}: the DaemonSet tolerates {taint_key}");
    Agent {
        username: format!("system:serviceaccount:{namespace}:{account}"),
        taint_key,
    }
}

/// The rules of the ClusterRoles bound to the agent's service account.
fn agent_rules<'a>(docs: &'a [Value], username: &str) -> Vec<&'a Value> {
    let bound: Vec<&str> = docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRoleBinding")
        .filter(|b| {
            b["subjects"].as_array().into_iter().flatten().any(|s| {
                s["kind"] == "ServiceAccount"
                    && format!(
                        "system:serviceaccount:{}:{}",
                        s["namespace"].as_str().unwrap_or_default(),
                        s["name"].as_str().unwrap_or_default()
                    ) == username
            })
        })
        .map(|b| b["roleRef"]["name"].as_str().unwrap())
        .collect();
    docs.iter()
        .filter(|d| d["kind"] == "ClusterRole")
        .filter(|r| bound.contains(&r["metadata"]["name"].as_str().unwrap()))
        .flat_map(|r| r["rules"].as_array().unwrap())
        .collect()
}

#[test]
fn the_agent_may_get_and_patch_nodes_and_nothing_more() {
    for (source, docs) in renders() {
        let agent = agent_of(&docs, &source);
        let rules = agent_rules(&docs, &agent.username);
        assert!(
            !rules.is_empty(),
            "{source}: a ClusterRole bound to the agent"
        );
        let on_nodes: Vec<&&Value> = rules
            .iter()
            .filter(|r| {
                r["resources"].as_array().into_iter().flatten().any(|res| {
                    res.as_str()
                        .is_some_and(|s| s == "*" || s.starts_with("nodes"))
                })
            })
            .collect();
        assert_eq!(
            on_nodes.len(),
            1,
            "{source}: one rule on nodes: {on_nodes:?}"
        );
        let rule = on_nodes[0];
        assert_eq!(rule["apiGroups"], json!([""]), "{source}");
        assert_eq!(
            rule["resources"],
            json!(["nodes"]),
            "{source}: not nodes/status"
        );
        assert_eq!(rule["verbs"], json!(["get", "patch"]), "{source}");
        assert!(
            rule.get("resourceNames").is_none(),
            "{source}: a DaemonSet's agents share the role; the policy names the node"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The policy's decisions

/// A node as kube-apiserver hands it to admission: what a kubelet registered, with the
/// startup taint between two others, and the server's managedFields.
fn node(name: &str, taint_key: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "uid": "5b0e6d1e-8c6a-4a2f-9d0c-1f2e3d4c5b6a",
            "resourceVersion": "48213",
            "creationTimestamp": "2025-03-01T10:00:00Z",
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "node.kubernetes.io/instance-type": "m6i.large",
                "topology.kubernetes.io/zone": "us-west-2a",
            },
            "annotations": {
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true",
            },
            "managedFields": [{
                "manager": "kubelet",
                "operation": "Update",
                "apiVersion": "v1",
                "time": "2025-03-01T10:00:00Z",
                "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:labels": {}}},
            }],
        },
        "spec": {
            "podCIDR": "10.0.1.0/24",
            "podCIDRs": ["10.0.1.0/24"],
            "taints": [
                {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"},
                {"key": taint_key, "effect": "NoSchedule"},
                {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute",
                 "timeAdded": "2025-03-01T10:00:05Z"},
            ],
        },
        "status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
            "nodeInfo": {"kubeletVersion": "v1.32.0"},
        },
    })
}

/// What the agent's patch makes of `old`: the taints without `key`, and the API server's
/// managedFields entry for the write.
fn without_taint(old: &Value, key: &str) -> Value {
    let mut new = old.clone();
    let kept: Vec<Value> = old["spec"]["taints"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["key"] != key)
        .cloned()
        .collect();
    if kept.is_empty() {
        new["spec"].as_object_mut().unwrap().remove("taints");
    } else {
        new["spec"]["taints"] = Value::Array(kept);
    }
    new["metadata"]["managedFields"]
        .as_array_mut()
        .unwrap()
        .push(json!({
            "manager": "pod-identity-agent",
            "operation": "Update",
            "apiVersion": "v1",
            "time": "2025-03-01T10:00:09Z",
            "fieldsType": "FieldsV1",
            "fieldsV1": {"f:spec": {"f:taints": {}}},
        }));
    new
}

/// The user info of a pod-bound service-account token issued on `node` (`None`: a token
/// without the node claims, from before Kubernetes 1.30 or not bound to a pod).
fn service_account(username: &str, node: Option<&str>) -> Value {
    let namespace = username.split(':').nth(2).unwrap_or_default();
    let mut extra = json!({
        "authentication.kubernetes.io/credential-id": ["JTI=2a4c6e8f-0b1d-4f3a-8c5e-7d9f1b3d5f7a"],
        "authentication.kubernetes.io/pod-name": ["pod-identity-agent-x7k2p"],
        "authentication.kubernetes.io/pod-uid": ["0c9e8d7f-6a5b-4c3d-2e1f-0a9b8c7d6e5f"],
    });
    if let Some(node) = node {
        extra[NODE_NAME_EXTRA] = json!([node]);
        extra["authentication.kubernetes.io/node-uid"] =
            json!(["5b0e6d1e-8c6a-4a2f-9d0c-1f2e3d4c5b6a"]);
    }
    json!({
        "username": username,
        "uid": "e1f2a3b4-c5d6-4e7f-8a9b-0c1d2e3f4a5b",
        "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{namespace}"),
                   "system:authenticated"],
        "extra": extra,
    })
}

/// The admission request of a write to node `name` (a PATCH is admitted as UPDATE).
fn request(operation: &str, name: &str, user: Value) -> Value {
    let kind = json!({"group": "", "version": "v1", "kind": "Node"});
    let resource = json!({"group": "", "version": "v1", "resource": "nodes"});
    json!({
        "uid": "8d1c3f5e-7a9b-4c2d-9e0f-1a2b3c4d5e6f",
        "kind": kind,
        "resource": resource,
        "requestKind": kind,
        "requestResource": resource,
        "name": name,
        "operation": operation,
        "userInfo": user,
        "dryRun": false,
        "options": {"kind": "PatchOptions", "apiVersion": "meta.k8s.io/v1"},
    })
}

/// What the policy must decide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Matched, and every validation holds.
    Allowed,
    /// Matched, and refused by exactly these validations (indices into `validations`).
    Denied(&'static [usize]),
    /// Not the policy's business: the request is admitted by it.
    NotMatched,
}

/// The policy's validations, by what each guards (the order in the manifests).
const OWN_NODE: usize = 0;
const METADATA: usize = 1;
const SPEC: usize = 2;
const TAINTS: usize = 3;

struct Case {
    name: &'static str,
    request: Value,
    object: Value,
    old_object: Value,
    expect: Expect,
}

fn cases(agent: &Agent) -> Vec<Case> {
    let key = agent.taint_key.as_str();
    let old = node(NODE, key);
    let removed = without_taint(&old, key);
    let agent_on =
        |node: Option<&str>| request("UPDATE", NODE, service_account(&agent.username, node));
    let own = || agent_on(Some(NODE));
    let case = |name, request: Value, object: Value, expect| Case {
        name,
        request,
        object,
        old_object: old.clone(),
        expect,
    };
    let edited = |edit: &dyn Fn(&mut Value)| {
        let mut new = removed.clone();
        edit(&mut new);
        new
    };

    let only_taint = {
        let mut old = old.clone();
        old["spec"]["taints"] = json!([{"key": key, "effect": "NoSchedule"}]);
        old
    };
    let twice = {
        let mut old = old.clone();
        old["spec"]["taints"]
            .as_array_mut()
            .unwrap()
            .push(json!({"key": key, "effect": "NoExecute"}));
        old
    };
    let one_of_two = {
        let mut new = twice.clone();
        new["spec"]["taints"].as_array_mut().unwrap().remove(1);
        new
    };

    let mut cases = vec![
        case(
            "the agent removes its taint from its own node",
            own(),
            removed.clone(),
            Expect::Allowed,
        ),
        Case {
            name: "the agent removes its taint, the node's last, from its own node",
            request: own(),
            object: without_taint(&only_taint, key),
            old_object: only_taint,
            expect: Expect::Allowed,
        },
        Case {
            name: "the agent removes both taints with its key",
            request: own(),
            object: without_taint(&twice, key),
            old_object: twice.clone(),
            expect: Expect::Allowed,
        },
        Case {
            name: "the agent removes one of two taints with its key",
            request: own(),
            object: one_of_two,
            old_object: twice,
            expect: Expect::Denied(&[TAINTS]),
        },
        case(
            "the same removal on another node",
            agent_on(Some(OTHER_NODE)),
            removed.clone(),
            Expect::Denied(&[OWN_NODE]),
        ),
        case(
            "a token that names no node",
            agent_on(None),
            removed.clone(),
            Expect::Denied(&[OWN_NODE]),
        ),
        case(
            "a token without extra user info",
            request("UPDATE", NODE, {
                let mut user = service_account(&agent.username, None);
                user.as_object_mut().unwrap().remove("extra");
                user
            }),
            removed.clone(),
            Expect::Denied(&[OWN_NODE]),
        ),
        case(
            "the agent removes another taint",
            own(),
            without_taint(&old, "dedicated"),
            Expect::Denied(&[TAINTS]),
        ),
        case(
            "the agent removes its taint and another",
            own(),
            without_taint(&removed, "node.kubernetes.io/unreachable"),
            Expect::Denied(&[TAINTS]),
        ),
        case(
            "the agent adds a taint",
            own(),
            edited(&|n| {
                n["spec"]["taints"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"key": "evil", "effect": "NoSchedule"}));
            }),
            Expect::Denied(&[TAINTS]),
        ),
        case(
            "the agent changes another taint's effect",
            own(),
            edited(&|n| n["spec"]["taints"][0]["effect"] = json!("PreferNoSchedule")),
            Expect::Denied(&[TAINTS]),
        ),
        case(
            "the agent reorders the other taints",
            own(),
            edited(&|n| n["spec"]["taints"].as_array_mut().unwrap().reverse()),
            Expect::Denied(&[TAINTS]),
        ),
        case(
            "the agent changes a label",
            own(),
            edited(&|n| {
                n["metadata"]["labels"]["topology.kubernetes.io/zone"] = json!("us-west-2b")
            }),
            Expect::Denied(&[METADATA]),
        ),
        case(
            "the agent adds a label",
            own(),
            edited(&|n| {
                n["metadata"]["labels"]["node-role.kubernetes.io/control-plane"] = json!("")
            }),
            Expect::Denied(&[METADATA]),
        ),
        case(
            "the agent changes an annotation",
            own(),
            edited(&|n| n["metadata"]["annotations"]["node.alpha.kubernetes.io/ttl"] = json!("30")),
            Expect::Denied(&[METADATA]),
        ),
        case(
            "the agent removes the annotations",
            own(),
            edited(&|n| {
                n["metadata"].as_object_mut().unwrap().remove("annotations");
            }),
            Expect::Denied(&[METADATA]),
        ),
        case(
            "the agent cordons the node",
            own(),
            edited(&|n| n["spec"]["unschedulable"] = json!(true)),
            Expect::Denied(&[SPEC]),
        ),
        case(
            "the agent sets a spec field the node had not",
            own(),
            edited(&|n| n["spec"]["providerID"] = json!("aws:///us-west-2a/i-0123456789abcdef0")),
            Expect::Denied(&[SPEC]),
        ),
        case(
            "the agent removes a spec field",
            own(),
            edited(&|n| {
                n["spec"].as_object_mut().unwrap().remove("podCIDR");
            }),
            Expect::Denied(&[SPEC]),
        ),
        case(
            "the agent relabels another node it is not on",
            agent_on(Some(OTHER_NODE)),
            edited(&|n| n["metadata"]["labels"]["evil"] = json!("yes")),
            Expect::Denied(&[OWN_NODE, METADATA]),
        ),
        // Other users and operations are not the policy's business.
        case(
            "the kubelet labels its node",
            request(
                "UPDATE",
                NODE,
                json!({
                    "username": format!("system:node:{NODE}"),
                    "groups": ["system:nodes", "system:authenticated"],
                }),
            ),
            edited(&|n| n["metadata"]["labels"]["x"] = json!("y")),
            Expect::NotMatched,
        ),
        case(
            "an administrator removes another taint",
            request(
                "UPDATE",
                NODE,
                json!({
                    "username": "kubernetes-admin",
                    "groups": ["system:masters", "system:authenticated"],
                }),
            ),
            without_taint(&old, "dedicated"),
            Expect::NotMatched,
        ),
        case(
            "a service account of the same name in another namespace",
            request(
                "UPDATE",
                NODE,
                service_account(
                    &agent.username.replace(":kube-system:", ":default:"),
                    Some(NODE),
                ),
            ),
            without_taint(&old, "dedicated"),
            Expect::NotMatched,
        ),
    ];
    // Only UPDATE is matched (RBAC gives the agent no other write).
    for operation in ["CREATE", "DELETE"] {
        cases.push(case(
            if operation == "CREATE" {
                "the agent creates a node"
            } else {
                "the agent deletes a node"
            },
            request(
                operation,
                NODE,
                service_account(&agent.username, Some(NODE)),
            ),
            removed.clone(),
            Expect::NotMatched,
        ));
    }
    cases
}

#[test]
fn the_policy_lets_the_agent_remove_only_its_taint_from_only_its_node() {
    let script = repo_root().join("proto-tests/clients/python/admission_policy.py");
    for (source, docs) in renders() {
        let agent = agent_of(&docs, &source);
        let policy = one(&docs, "ValidatingAdmissionPolicy", &source);
        let binding = one(&docs, "ValidatingAdmissionPolicyBinding", &source);
        let messages: Vec<&str> = policy["spec"]["validations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["message"].as_str().unwrap())
            .collect();
        // The indices the cases name, by what each validation says it guards.
        let guards = [
            "node it runs on",
            "labels, annotations",
            "only a node's taints",
            "only remove taints",
        ];
        assert_eq!(messages.len(), guards.len(), "{source}: {messages:?}");
        for (message, guard) in messages.iter().zip(guards) {
            assert!(
                message.contains(guard),
                "{source}: {message:?} guards {guard:?}"
            );
        }
        assert!(
            messages[TAINTS].contains(&agent.taint_key),
            "{source}: the policy's taint is the DaemonSet's {}",
            agent.taint_key
        );

        let cases = cases(&agent);
        let input = json!({
            "policy": policy,
            "binding": binding,
            "cases": cases.iter().map(|c| json!({
                "name": c.name,
                "request": c.request,
                "object": c.object,
                "oldObject": c.old_object,
            })).collect::<Vec<_>>(),
        });
        let results = python(
            &[script.to_str().unwrap()],
            input.to_string().as_bytes(),
            "admission_policy.py",
        );
        let results = results.as_array().expect("one result a case");
        assert_eq!(results.len(), cases.len());
        let mut wrong = Vec::new();
        for (case, result) in cases.iter().zip(results) {
            assert_eq!(result["name"], case.name);
            let errors: Vec<&Value> = result["denials"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d.get("error").is_some())
                .collect();
            let denied: Vec<usize> = result["denials"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|d| {
                    d["check"]
                        .as_str()?
                        .strip_prefix("validations[")?
                        .strip_suffix(']')?
                        .parse()
                        .ok()
                })
                .collect();
            let got = match (result["matched"].as_bool(), result["allowed"].as_bool()) {
                (Some(false), Some(true)) => Some(Expect::NotMatched),
                (Some(true), Some(true)) => Some(Expect::Allowed),
                _ => None,
            };
            let ok = errors.is_empty()
                && match case.expect {
                    Expect::Denied(expected) => result["matched"] == true && denied == expected,
                    expected => got == Some(expected),
                };
            if !ok {
                wrong.push(format!(
                    "{source}: {}: expected {:?}, got {result}",
                    case.name, case.expect
                ));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }
}
