#!/usr/bin/env python3
"""Checks the deployment manifests beyond what a linter sees.

Run through scripts/validate-deploy, which installs what this imports
(kubernetes-validate, PyYAML, jsonschema) and finds kubectl and promtool.

What it checks, each reported as one line:

- every Kubernetes object (daemonset.yaml, each overlay and deploy/monitoring
  as kustomize renders them, the examples) against the Kubernetes OpenAPI
  schema of each pinned version, strictly (unknown fields fail), with
  kubernetes-validate;
- the Prometheus Operator objects (ServiceMonitor, PodMonitor,
  PrometheusRule), which that schema does not know, against the subset of
  their CRDs these manifests use, also strictly;
- daemonset.yaml and the eks overlay describe the same objects;
- cross-object wiring no schema sees: $(VAR) references, volume mounts,
  probe ports, Service and monitor selectors, capabilities the image needs;
- the rollout: every agent DaemonSet hands over through a handoff socket in
  a hostPath directory its init container prepares for the server's user
  (the audit log's directory too),
  surges (maxSurge 1, maxUnavailable 0), declares no port, and probes its own
  process through a probe socket in an emptyDir (each rule shown to refuse a
  manifest that breaks it);
- the alerting rules with `promtool check rules` and their unit tests with
  `promtool test rules`, every alert being tested firing;
- the Grafana dashboard's structure, and every query in it parsed by
  promtool.
"""

import argparse
import copy
import difflib
import functools
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jsonschema
import kubernetes_validate.utils as kv
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
OVERLAYS = ("eks", "hybrid", "self-managed-sts")
# The oldest Kubernetes minor these manifests claim, and the newest the pinned
# kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.34.0")
AGENT_IMAGE = "pod-identity-agent"
# The file capability the image's binary carries (deploy/Dockerfile): a
# container without it in its bounding set cannot even exec the binary.
IMAGE_FILE_CAPABILITY = "NET_BIND_SERVICE"
# Renders whose server does not run as the nonroot user, and why.
MONITORING_LABEL = ("app.kubernetes.io/name", "pod-identity-agent")

# kubernetes-validate reads each schema file from disk on every call.
kv.schema_contents = functools.lru_cache(maxsize=None)(kv.schema_contents)


class Report:
    def __init__(self):
        self.passed = 0
        self.failures = []

    def check(self, ok, what, detail=""):
        if ok:
            self.passed += 1
        else:
            self.failures.append(f"{what}: {detail}" if detail else what)
            print(f"FAIL {what}" + (f"\n     {detail}" if detail else ""))
        return ok

    def ok(self, what):
        self.passed += 1
        print(f"ok   {what}")


def rel(path):
    return str(Path(path).resolve().relative_to(ROOT))


def load_documents(text, source):
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise SystemExit(f"{source}: not YAML: {e}")


def render(kubectl, directory):
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"kubectl kustomize {rel(directory)} failed:\n{out.stderr}")
    return out.stdout


def name_of(doc):
    meta = doc.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{doc.get('kind')}/{ns + '/' if ns else ''}{meta.get('name')}"


# --- Prometheus Operator objects: the CRD fields these manifests use ---------

DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
}
LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": STRING_MAP,
        "matchExpressions": {"type": "array", "items": {"type": "object"}},
    },
}
NAMESPACE_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "any": {"type": "boolean"},
        "matchNames": {"type": "array", "items": {"type": "string"}},
    },
}
RELABELING = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "sourceLabels": {"type": "array", "items": {"type": "string"}},
        "separator": {"type": "string"},
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "modulus": {"type": "integer"},
        "replacement": {"type": "string"},
        "action": {
            "enum": [
                "replace", "keep", "drop", "hashmod", "labelmap", "labeldrop",
                "labelkeep", "lowercase", "uppercase", "keepequal", "dropequal",
            ]
        },
    },
}
SCRAPE_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "port": {"type": "string"},
        "path": {"type": "string", "pattern": "^/"},
        "scheme": {"enum": ["http", "https"]},
        "interval": DURATION,
        "scrapeTimeout": DURATION,
        "honorLabels": {"type": "boolean"},
        "relabelings": {"type": "array", "items": RELABELING},
        "metricRelabelings": {"type": "array", "items": RELABELING},
    },
}


def monitor_schema(kind, endpoints_field):
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", endpoints_field],
                "properties": {
                    "jobLabel": {"type": "string"},
                    "namespaceSelector": NAMESPACE_SELECTOR,
                    "selector": LABEL_SELECTOR,
                    endpoints_field: {
                        "type": "array",
                        "minItems": 1,
                        "items": SCRAPE_ENDPOINT,
                    },
                },
            },
        },
    }


RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["expr"],
    "properties": {
        "alert": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
        "record": {"type": "string", "pattern": "^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
        "expr": {"type": "string", "minLength": 1},
        "for": DURATION,
        "keep_firing_for": DURATION,
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
}
PROMETHEUS_RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string"},
                            "interval": DURATION,
                            "rules": {"type": "array", "minItems": 1, "items": RULE},
                        },
                    },
                }
            },
        },
    },
}
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): monitor_schema("ServiceMonitor", "endpoints"),
    ("monitoring.coreos.com/v1", "PodMonitor"): monitor_schema("PodMonitor", "podMetricsEndpoints"),
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
}


def validate_objects(report, source, docs):
    """Schema-validate every object of one file or render."""
    failures = len(report.failures)
    for doc in docs:
        what = f"{source}: {name_of(doc)}"
        crd = CRD_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
        if crd is not None:
            errors = sorted(
                jsonschema.Draft202012Validator(crd).iter_errors(doc),
                key=lambda e: list(e.path),
            )
            report.check(
                not errors,
                f"{what} matches the CRD fields this checker knows",
                "; ".join(
                    f"{'.'.join(map(str, e.path)) or '(top)'}: {e.message}" for e in errors
                ),
            )
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kv.validate(doc, version, strict=True)
                report.passed += 1
            except kv.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                report.check(False, f"{what} against Kubernetes {version}", f"{path}: {e.message}")
            except kv.SchemaNotFoundError as e:
                report.check(False, f"{what} against Kubernetes {version}", e.message)
    if len(report.failures) == failures:
        print(f"ok   {source}: {len(docs)} objects against the schemas of Kubernetes "
              f"{', '.join(KUBERNETES_VERSIONS)}")


# --- wiring no schema sees ----------------------------------------------------

VAR_REF = re.compile(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def pod_templates(docs):
    for doc in docs:
        spec = (doc.get("spec") or {}).get("template")
        if doc.get("kind") in ("DaemonSet", "Deployment") and spec:
            yield doc, spec


def is_agent(container):
    image = container.get("image", "")
    return image.split("/")[-1].split(":")[0].split("@")[0] == AGENT_IMAGE


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def server_runs_as_non_root(pod_spec, container):
    """The user a container runs as, from its own securityContext or else the pod's: non-root
    means runAsNonRoot true and a non-zero runAsUser."""
    pod_sc = pod_spec.get("securityContext") or {}
    sc = container.get("securityContext") or {}
    non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
    user = sc.get("runAsUser", pod_sc.get("runAsUser", 0))
    return non_root is True and user != 0


def check_wiring(report, source, docs):
    failures = len(report.failures)
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    for owner, template in pod_templates(docs):
        spec = template["spec"]
        labels = template["metadata"].get("labels", {})
        where = f"{source}: {name_of(owner)}"
        report.check(
            matches(owner["spec"]["selector"].get("matchLabels"), labels),
            f"{where}: selector matches its pod template",
        )
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        configmaps = {d["metadata"]["name"] for d in by_kind.get("ConfigMap", [])}
        for volume in volumes.values():
            if "configMap" in volume:
                report.check(
                    volume["configMap"]["name"] in configmaps,
                    f"{where}: ConfigMap {volume['configMap']['name']} of volume {volume['name']} is in the same render",
                )
        containers = [(c, False) for c in spec.get("initContainers", [])]
        containers += [(c, True) for c in spec.get("containers", [])]
        for container, long_running in containers:
            cwhere = f"{where} container {container['name']}"
            env = {e["name"] for e in container.get("env", [])}
            refs = {
                m for arg in container.get("command", []) + container.get("args", [])
                for m in VAR_REF.findall(str(arg))
            }
            report.check(
                refs <= env,
                f"{cwhere}: every $(VAR) in its args is in its env",
                f"undefined: {sorted(refs - env)} (the kubelet would pass them literally)",
            )
            for mount in container.get("volumeMounts", []):
                report.check(
                    mount["name"] in volumes,
                    f"{cwhere}: volume {mount['name']} exists",
                )
            ports = {p.get("name") for p in container.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = ((container.get(probe) or {}).get("httpGet") or {}).get("port")
                if isinstance(port, str):
                    report.check(port in ports, f"{cwhere}: {probe} port {port} is declared")
            if not is_agent(container):
                continue
            sc = container.get("securityContext", {})
            caps = sc.get("capabilities", {})
            report.check(
                caps.get("drop") == ["ALL"]
                and sc.get("allowPrivilegeEscalation") is False
                and sc.get("readOnlyRootFilesystem") is True
                and (sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault",
                f"{cwhere}: drops all capabilities, no privilege escalation, "
                "read-only root, RuntimeDefault seccomp",
                json.dumps(sc, sort_keys=True),
            )
            report.check(
                IMAGE_FILE_CAPABILITY in caps.get("add", []),
                f"{cwhere}: keeps {IMAGE_FILE_CAPABILITY}, the image binary's file capability",
                "without it in the bounding set the kernel refuses to exec the binary (EPERM)",
            )
            command = (container.get("args") or [None])[0]
            if long_running and command == "server":
                # The pod-facing server never runs as root, on any kind of node.
                report.check(
                    server_runs_as_non_root(spec, container),
                    f"{cwhere}: the credentials server runs as a non-root user",
                    json.dumps(sc, sort_keys=True),
                )
            if long_running and command not in ("server", "copy-credentials"):
                report.check(False, f"{cwhere}: runs a known long-running command", str(command))
            if command == "copy-credentials":
                report.check(
                    not container.get("ports"),
                    f"{cwhere}: the credentials copier listens on nothing",
                )
    pods = [t["metadata"].get("labels", {}) for _, t in pod_templates(docs)]
    for service in by_kind.get("Service", []):
        selector = service["spec"].get("selector")
        report.check(
            any(matches(selector, labels) for labels in pods),
            f"{source}: {name_of(service)} selects the render's pods",
        )
    if len(report.failures) == failures:
        print(f"ok   {source}: selectors, $(VAR)s, volumes, probe ports, capabilities")


def scrapes_metrics_port(endpoint, docs):
    """An endpoint that names no port (the agent declares none): it keeps the server container
    alone and sets the address's port to the server's --metrics-port, for IPv4 and IPv6."""
    ports = {
        flag_value(c, "--metrics-port", "POD_IDENTITY_AGENT_METRICS_PORT")
        for _, t in pod_templates(docs) for c in t["spec"]["containers"]
        if is_agent(c) and (c.get("args") or [None])[0] == "server"
    }
    relabelings = endpoint.get("relabelings", [])
    keeps_server = any(
        r.get("action") == "keep"
        and r.get("sourceLabels") == ["__meta_kubernetes_pod_container_name",
                                      "__meta_kubernetes_pod_container_init"]
        and r.get("regex") == "pod-identity-agent;false"
        for r in relabelings
    )
    replacements = {r.get("replacement") for r in relabelings
                    if r.get("targetLabel") == "__address__"}
    return len(ports) == 1 and keeps_server and all(
        p is not None and {f"$1:{p}", f"[$1]:{p}"} <= replacements for p in ports)


def check_monitors(report, monitoring_docs, renders):
    """The ServiceMonitor and PodMonitor find every overlay's agents."""
    failures = len(report.failures)
    for doc in monitoring_docs:
        kind = doc["kind"]
        if kind not in ("ServiceMonitor", "PodMonitor"):
            continue
        selector = doc["spec"]["selector"]["matchLabels"]
        namespaces = doc["spec"].get("namespaceSelector", {}).get("matchNames")
        endpoints = doc["spec"].get("endpoints") or doc["spec"].get("podMetricsEndpoints")
        job_label = doc["spec"].get("jobLabel")
        for source, docs in renders.items():
            if kind == "ServiceMonitor":
                targets = [
                    (d["metadata"], {p.get("name") for p in d["spec"].get("ports", [])})
                    for d in docs if d["kind"] == "Service"
                ]
            else:
                targets = [
                    (
                        {**t["metadata"], "namespace": owner["metadata"]["namespace"]},
                        {p.get("name") for c in t["spec"]["containers"] for p in c.get("ports", [])},
                    )
                    for owner, t in pod_templates(docs)
                ]
            found = [
                (meta, ports) for meta, ports in targets
                if matches(selector, meta.get("labels", {}))
                and (not namespaces or meta.get("namespace") in namespaces)
            ]
            ok = bool(found) and all(
                all(e["port"] in ports if "port" in e else scrapes_metrics_port(e, docs)
                    for e in endpoints)
                and meta.get("labels", {}).get(job_label) == MONITORING_LABEL[1]
                for meta, ports in found
            )
            report.check(
                ok,
                f"{kind} {doc['metadata']['name']} scrapes {source} with job=\"{MONITORING_LABEL[1]}\"",
                f"selector {selector}, ports {[e.get('port') for e in endpoints]}, found {found}",
            )
    if len(report.failures) == failures:
        print(f"ok   ServiceMonitor and PodMonitor find every render's agents as job=\"{MONITORING_LABEL[1]}\"")


# --- the rollout: surge, handoff, probes of the pod's own agent -----------------

def dockerfile_entrypoint():
    """The image's binary, as deploy/Dockerfile's ENTRYPOINT names it."""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("ENTRYPOINT"):
            return json.loads(line[len("ENTRYPOINT"):].strip())[0]
    return None


def flag_value(container, flag, env_name):
    """A server flag's value from its args (`--flag value` or `--flag=value`) or its env."""
    args = [str(a) for a in container.get("args", [])]
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    for e in container.get("env", []):
        if e.get("name") == env_name and "value" in e:
            return e["value"]
    return None


def mounted_volume(container, volumes, path):
    """The volume (and its mount path) whose mount holds `path` directly in its directory."""
    directory = str(Path(path).parent)
    for mount in container.get("volumeMounts", []):
        if mount.get("mountPath", "").rstrip("/") == directory:
            return volumes.get(mount["name"]), mount["mountPath"]
    return None, None


def rollout_problems(docs):
    """What breaks the rollout rules, as (rule, detail) pairs: an empty list passes.

    Each agent DaemonSet running `server`:
    - `handoff`: sets --handoff-socket, in a hostPath volume mounted in the server;
    - `runtime-dir`: an init container running `initialize` mounts the same volume and
      prepares that directory (--runtime-dir) for the server's uid:gid (--runtime-dir-owner);
    - `audit`: sets --audit-log, in a hostPath volume (the node's log shipper collects it)
      that an `initialize` container prepares for the server's uid:gid as well;
    - `surge`: RollingUpdate with maxSurge 1 and maxUnavailable 0;
    - `no-ports`: in the host network, no container declares a port (each would be a
      hostPort, and the surge pod would never be scheduled beside the old one);
    - `own-probes`: startup, readiness and liveness probes are exec probes running the image's
      binary as `probe SOCKET PATH` on the server's --probe-socket, which lives in an emptyDir
      of the pod (never a port two agents of a node share), /readyz for startup and
      readiness, /healthz for liveness.
    """
    problems = []
    binary = dockerfile_entrypoint()
    for owner, template in pod_templates(docs):
        if owner.get("kind") != "DaemonSet":
            continue
        spec = template["spec"]
        servers = [c for c in spec.get("containers", [])
                   if is_agent(c) and (c.get("args") or [None])[0] == "server"]
        if not servers:
            continue
        where = name_of(owner)
        server = servers[0]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        strategy = owner["spec"].get("updateStrategy") or {}
        rolling = strategy.get("rollingUpdate") or {}
        if not (strategy.get("type") == "RollingUpdate"
                and str(rolling.get("maxSurge")) == "1"
                and str(rolling.get("maxUnavailable")) == "0"):
            problems.append(("surge", f"{where}: updateStrategy {json.dumps(strategy, sort_keys=True)}"))
        if spec.get("hostNetwork"):
            for c in spec.get("initContainers", []) + spec.get("containers", []):
                if c.get("ports"):
                    problems.append(("no-ports", f"{where} container {c['name']} declares {c['ports']}"))
        sc = {**(spec.get("securityContext") or {}), **(server.get("securityContext") or {})}
        owner_ids = f"{sc.get('runAsUser')}:{sc.get('runAsGroup', sc.get('runAsUser'))}"

        def prepared_by_init(volume):
            """An `initialize` container mounts this hostPath and gives it to the server's
            uid:gid (--runtime-dir, --runtime-dir-owner, CHOWN)."""
            for init in spec.get("initContainers", []):
                if (init.get("args") or [None])[0] != "initialize":
                    continue
                init_mount = next((m for m in init.get("volumeMounts", [])
                                   if m["name"] in volumes
                                   and volumes[m["name"]].get("hostPath") == volume["hostPath"]), None)
                dirs = flag_value(init, "--runtime-dir", "POD_IDENTITY_AGENT_RUNTIME_DIR")
                ids = flag_value(init, "--runtime-dir-owner", "POD_IDENTITY_AGENT_RUNTIME_DIR_OWNER")
                if (init_mount and dirs
                        and init_mount["mountPath"].rstrip("/") in [d.rstrip("/") for d in dirs.split(",")]
                        and ids == owner_ids
                        and "CHOWN" in ((init.get("securityContext") or {}).get("capabilities") or {}).get("add", [])):
                    return True
            return False

        # The handoff socket's and the audit log's directories: node directories (hostPath),
        # each prepared for the server's user by the init container.
        for rule, flag, prepared_rule in (("handoff", "--handoff-socket", "runtime-dir"),
                                          ("audit", "--audit-log", "audit")):
            env = "POD_IDENTITY_AGENT_" + flag[2:].upper().replace("-", "_")
            path = flag_value(server, flag, env)
            volume, _ = mounted_volume(server, volumes, path) if path else (None, None)
            if not path or not volume or "hostPath" not in volume:
                problems.append((rule, f"{where}: {flag} {path!r} in volume {volume}"))
            elif not prepared_by_init(volume):
                problems.append((prepared_rule, f"{where}: no initialize container prepares "
                                 f"{volume['hostPath'].get('path')} for {owner_ids} (with CHOWN)"))
        socket = flag_value(server, "--probe-socket", "POD_IDENTITY_AGENT_PROBE_SOCKET")
        probe_volume, _ = mounted_volume(server, volumes, socket) if socket else (None, None)
        if not socket or not probe_volume or "emptyDir" not in probe_volume:
            problems.append(("own-probes", f"{where}: probe socket {socket!r} in volume {probe_volume}"))
        for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"),
                            ("livenessProbe", "/healthz")):
            command = ((server.get(probe) or {}).get("exec") or {}).get("command")
            if command != [binary, "probe", socket, path]:
                problems.append(("own-probes", f"{where}: {probe} is {json.dumps(server.get(probe))}, "
                                 f"not exec {[binary, 'probe', socket, path]}"))
    return problems


def check_rollout(report, source, docs):
    problems = rollout_problems(docs)
    for rule, detail in problems:
        report.check(False, f"{source}: rollout rule {rule}", detail)
    if not problems:
        report.ok(f"{source}: surge rollout with handoff, no ports, probes of the pod's own agent")


def break_rollout(docs, how):
    """A copy of `docs` whose agent DaemonSet breaks one rollout rule."""
    docs = copy.deepcopy(docs)
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    server = spec["containers"][0]
    init = spec["initContainers"][0]
    if how == "surge":
        ds["spec"]["updateStrategy"]["rollingUpdate"] = {"maxUnavailable": "10%", "maxSurge": 0}
    elif how == "no-ports":
        server["ports"] = [{"name": "metrics", "containerPort": 2705, "hostPort": 2705}]
    elif how == "handoff":
        server["env"] = [e for e in server["env"] if e["name"] != "POD_IDENTITY_AGENT_HANDOFF_SOCKET"]
    elif how == "runtime-dir":
        init["args"] = [a.replace("/run/pod-identity-agent,", "") for a in init["args"]]
    elif how == "audit":
        server["env"] = [e for e in server["env"] if e["name"] != "POD_IDENTITY_AGENT_AUDIT_LOG"]
    elif how == "own-probes":
        server["readinessProbe"] = {"httpGet": {"host": "127.0.0.1", "path": "/readyz", "port": 2703}}
    return docs


ROLLOUT_RULES = ("surge", "no-ports", "handoff", "runtime-dir", "audit", "own-probes")


# --- drift between daemonset.yaml and deploy/overlays/eks --------------------

def canonical(docs):
    return json.dumps(sorted(docs, key=name_of), indent=1, sort_keys=True).splitlines()


def check_drift(report, top_level, eks_render):
    a, b = canonical(top_level), canonical(eks_render)
    diff = "\n".join(
        difflib.unified_diff(a, b, "daemonset.yaml", "kubectl kustomize deploy/overlays/eks", lineterm="", n=2)
    )
    if report.check(
        a == b,
        "daemonset.yaml describes the same objects as deploy/overlays/eks",
        "edit both (deploy/base holds the sources); difference:\n" + diff,
    ):
        print("ok   daemonset.yaml and deploy/overlays/eks render the same objects")


# --- alerting rules -----------------------------------------------------------

def run_promtool(promtool, *args, cwd=None):
    out = subprocess.run([promtool, *args], capture_output=True, text=True, cwd=cwd)
    return out.returncode == 0, (out.stdout + out.stderr).strip()


def check_rules(report, promtool, rule_docs, workdir):
    rules = [d for d in rule_docs if d["kind"] == "PrometheusRule"]
    report.check(len(rules) == 1, "deploy/monitoring renders one PrometheusRule")
    if not rules:
        return
    groups = rules[0]["spec"]["groups"]
    alerts = [r for g in groups for r in g["rules"] if "alert" in r]
    names = [a["alert"] for a in alerts]
    report.check(len(names) == len(set(names)), "alert names are unique", str(names))
    for alert in alerts:
        report.check(
            alert.get("labels", {}).get("severity") in ("critical", "warning", "info")
            and {"summary", "description"} <= set(alert.get("annotations", {})),
            f"alert {alert['alert']} has a severity and a summary and description",
        )
    # The operator hands Prometheus exactly this structure as a rule file.
    rules_file = workdir / "pod-identity-agent.rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    ok, output = run_promtool(promtool, "check", "rules", str(rules_file))
    if report.check(ok, "promtool check rules: the PrometheusRule's groups", output):
        print(f"ok   promtool check rules: {len(alerts)} alerts")

    tests = sorted((DEPLOY / "monitoring" / "tests").glob("*.yaml"))
    report.check(bool(tests), "deploy/monitoring/tests has promtool rule tests")
    fired = set()
    for test in tests:
        spec = yaml.safe_load(test.read_text())
        report.check(
            spec.get("rule_files") == [rules_file.name],
            f"{rel(test)}: rule_files is [{rules_file.name}]",
            "the checker writes the PrometheusRule's groups to that file next to the test",
        )
        for case in spec.get("tests", []):
            for t in case.get("alert_rule_test", []):
                if t.get("exp_alerts"):
                    fired.add(t["alertname"])
        copy = workdir / test.name
        shutil.copyfile(test, copy)
        ok, output = run_promtool(promtool, "test", "rules", copy.name, cwd=workdir)
        if report.check(ok, f"promtool test rules {rel(test)}", output):
            print(f"ok   promtool test rules {rel(test)}")
    untested = sorted(set(names) - fired)
    report.check(
        not untested,
        "every alert has a unit test in which it fires",
        f"no firing test for: {', '.join(untested)}",
    )


# --- Grafana dashboard --------------------------------------------------------

GRAFANA_VARIABLE = re.compile(r"\$\{?(\w+)\}?")
PANEL_TYPES = {"row", "timeseries", "stat", "gauge", "table", "bargauge", "text", "heatmap"}


def grafana_to_promql(expr):
    for name in ("$__rate_interval", "$__interval", "$__range"):
        expr = expr.replace(name, "5m")
    return GRAFANA_VARIABLE.sub("x", expr)


def check_dashboard(report, promtool, workdir):
    path = DEPLOY / "monitoring" / "dashboard.json"
    try:
        dash = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        report.check(False, f"{rel(path)} is JSON", str(e))
        return
    report.check(
        isinstance(dash.get("title"), str) and isinstance(dash.get("schemaVersion"), int)
        and isinstance(dash.get("uid"), str) and 0 < len(dash["uid"]) <= 40,
        f"{rel(path)}: title, uid (at most 40 characters) and schemaVersion",
    )
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    report.check(
        variables.get("datasource", {}).get("type") == "datasource"
        and variables["datasource"].get("query") == "prometheus",
        f"{rel(path)}: a Prometheus data source variable named datasource",
    )
    queries = []
    for v in variables.values():
        if v.get("type") == "query":
            q = v.get("definition", "")
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q)
            report.check(bool(m), f"{rel(path)}: variable {v['name']} is label_values(<selector>, <label>)", q)
            if m:
                queries.append((f"variable_{v['name']}", m.group(1)))
    ids = [p.get("id") for p in dash.get("panels", [])]
    report.check(
        len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids),
        f"{rel(path)}: panel ids are unique integers",
    )
    for panel in dash.get("panels", []):
        what = f"{rel(path)}: panel {panel.get('id')} {panel.get('title')!r}"
        pos = panel.get("gridPos", {})
        report.check(
            panel.get("type") in PANEL_TYPES
            and all(isinstance(pos.get(k), int) for k in "hwxy")
            and pos.get("x", 0) + pos.get("w", 0) <= 24,
            f"{what}: known type, grid position within 24 columns",
        )
        if panel.get("type") == "row":
            continue
        targets = panel.get("targets", [])
        refs = [t.get("refId") for t in targets]
        report.check(
            panel.get("datasource", {}).get("uid") == "${datasource}"
            and targets and len(refs) == len(set(refs))
            and all(isinstance(t.get("expr"), str) and t["expr"] for t in targets),
            f"{what}: queries the datasource variable, unique refIds, an expr each",
        )
        for t in targets:
            queries.append((f"panel_{panel['id']}_{t.get('refId')}", t.get("expr", "")))
    # promtool parses PromQL only inside rule files: one recording rule per query.
    rules_file = workdir / "dashboard-queries.rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": [{
        "name": "dashboard",
        "rules": [{"record": f"dashboard:{n}", "expr": grafana_to_promql(q)} for n, q in queries],
    }]}, sort_keys=False))
    ok, output = run_promtool(promtool, "check", "rules", str(rules_file))
    if report.check(ok, f"promtool parses every query of {rel(path)}", output):
        print(f"ok   {rel(path)}: {len(dash.get('panels', []))} panels, {len(queries)} queries parse")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubectl", required=True)
    parser.add_argument("--promtool", required=True)
    parser.add_argument(
        "--root", help="a copy of the repository's daemonset.yaml and deploy/ to check instead"
    )
    args = parser.parse_args()
    if args.root:
        global ROOT, DEPLOY
        ROOT = Path(args.root).resolve()
        DEPLOY = ROOT / "deploy"
    # promtool also runs from a temporary directory.
    args.promtool = str(Path(args.promtool).resolve())
    report = Report()

    renders = {}
    for overlay in OVERLAYS:
        source = f"overlays/{overlay}"
        renders[source] = load_documents(render(args.kubectl, DEPLOY / "overlays" / overlay), source)
    base = load_documents(render(args.kubectl, DEPLOY / "base"), "base")
    monitoring = load_documents(render(args.kubectl, DEPLOY / "monitoring"), "monitoring")
    top_level = load_documents((ROOT / "daemonset.yaml").read_text(), "daemonset.yaml")
    podmonitor = load_documents((DEPLOY / "monitoring" / "podmonitor.yaml").read_text(), "podmonitor")
    examples = {
        rel(p): load_documents(p.read_text(), rel(p))
        for p in sorted((DEPLOY / "examples").glob("*.yaml"))
    }

    for source, docs in [("daemonset.yaml", top_level), ("base", base), *renders.items(),
                         ("monitoring", monitoring), ("monitoring/podmonitor.yaml", podmonitor),
                         *examples.items()]:
        validate_objects(report, source, docs)
    for source, docs in [("daemonset.yaml", top_level), *renders.items(), *examples.items()]:
        check_wiring(report, source, docs)
    # The rule is not vacuous: a server running as root, by its own securityContext or the
    # pod's, or without runAsNonRoot, is refused.
    for pod_sc, sc in [
        ({}, {"runAsUser": 0, "runAsNonRoot": False}),
        ({"runAsUser": 0}, {"runAsNonRoot": True}),
        ({}, {"runAsUser": 65532}),
        ({"runAsNonRoot": True}, {}),
    ]:
        report.check(
            not server_runs_as_non_root({"securityContext": pod_sc}, {"securityContext": sc}),
            f"the non-root rule refuses a server with {pod_sc} / {sc}",
        )
    for source, docs in [("daemonset.yaml", top_level), *renders.items()]:
        check_rollout(report, source, docs)
    # Each rollout rule refuses a manifest that breaks it, and only that rule fires.
    for rule in ROLLOUT_RULES:
        fired = {r for r, _ in rollout_problems(break_rollout(top_level, rule))}
        report.check(fired == {rule}, f"the rollout rule {rule} refuses a manifest that breaks it",
                     f"rules that fired: {sorted(fired)}")
    check_drift(report, top_level, renders["overlays/eks"])
    check_monitors(report, monitoring + podmonitor, {"daemonset.yaml": top_level, **renders})
    with tempfile.TemporaryDirectory(prefix="validate-deploy-") as tmp:
        check_rules(report, args.promtool, monitoring, Path(tmp))
        check_dashboard(report, args.promtool, Path(tmp))

    print()
    total = report.passed + len(report.failures)
    if report.failures:
        print(f"validate-deploy: {len(report.failures)} of {total} checks FAILED")
        return 1
    print(f"validate-deploy: all {total} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
