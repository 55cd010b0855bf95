//! The deployment manifests, held to the binary they deploy.
//!
//! `scripts/validate-deploy` checks the manifests on their own terms (YAML
//! lint, Kubernetes schemas, promtool); these tests run it, and then check
//! what only the real agent can answer: every flag a manifest passes is one
//! the agent accepts, every metric a dashboard panel or an alert queries is
//! one the agent exports, and the self-managed overlay's associations file is
//! one the agent loads.
//!
//! YAML is read through the test venv's PyYAML (the venv that
//! `scripts/validate-deploy` maintains) and overlays are rendered with
//! `kubectl kustomize`, as a user would apply them.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use proto_tests::agent::{agent_binary, AgentBuilder};
use proto_tests::clients::python_interpreter;
use proto_tests::keys::write_jwks;
use proto_tests::metrics;
use proto_tests::{Association, FakeKubeApi, KubePod, Pod, StsTestBed, TestBed, TestKeys};
use serde_json::Value;

const OVERLAYS: [&str; 3] = ["eks", "hybrid", "self-managed-sts"];
const AGENT_PREFIX: &str = "pod_identity_agent_";
/// Metrics the rules and the dashboard may use that other exporters provide.
const EXTERNAL_METRICS: [(&str, &str); 2] = [
    ("up", "Prometheus itself"),
    (
        "kube_daemonset_status_number_unavailable",
        "kube-state-metrics",
    ),
];
/// What the kubelet's `$(VAR)` expansion yields for a variable whose value
/// comes from elsewhere (`valueFrom`).
const DUMMY_VALUE: &str = "dummy";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("proto-tests sits in the workspace")
        .to_owned()
}

fn read(relative: &str) -> String {
    let path = repo_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// `scripts/validate-deploy [args]`.
fn run_validate_deploy(args: &[&str]) -> Output {
    Command::new(repo_root().join("scripts/validate-deploy"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/validate-deploy")
}

/// The tools `scripts/validate-deploy` installs (PyYAML in the venv, kubectl, promtool), once
/// per test process; its checks are [`manifests_pass_validate_deploy`]'s alone.
fn deploy_tools() {
    static RUN: OnceLock<()> = OnceLock::new();
    RUN.get_or_init(|| {
        let out = run_validate_deploy(&["--tools-only"]);
        assert!(
            out.status.success(),
            "scripts/validate-deploy --tools-only failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// Every document of a YAML stream, as JSON.
fn yaml_documents(text: &str, source: &str) -> Vec<Value> {
    deploy_tools();
    const YAML_TO_JSON: &str = "import json, sys, yaml\n\
        docs = [d for d in yaml.safe_load_all(sys.stdin) if d is not None]\n\
        json.dump(docs, sys.stdout)\n";
    let mut child = Command::new(python_interpreter())
        .args(["-c", YAML_TO_JSON])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", python_interpreter().display()));
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(text.as_bytes())
        .expect("write YAML to python");
    let out = child.wait_with_output().expect("python exits");
    assert!(
        out.status.success(),
        "{source}: not YAML, or no PyYAML in the venv (scripts/validate-deploy installs it):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout) {
        Ok(Value::Array(docs)) => docs,
        other => panic!("{source}: unexpected conversion result {other:?}"),
    }
}

fn kustomize(relative_dir: &str) -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(repo_root().join(relative_dir))
        .output()
        .expect("run kubectl (scripts/validate-deploy installs it)");
    assert!(
        out.status.success(),
        "kubectl kustomize {relative_dir}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("kustomize prints UTF-8")
}

#[test]
fn manifests_pass_validate_deploy() {
    let out = run_validate_deploy(&[]);
    assert!(
        out.status.success(),
        "scripts/validate-deploy failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// --- flags ---------------------------------------------------------------------

/// A container that runs `pod-identity-agent server`.
#[derive(Clone)]
struct ServerContainer {
    name: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    /// The pod mounts its service-account token (`automountServiceAccountToken` not false):
    /// in the cluster, the agent finds the API server.
    api_server: bool,
    /// Where its volumes are mounted.
    mounts: Vec<String>,
    /// Its probes' exec commands, by probe (`startupProbe`, ...).
    probes: Vec<(String, Vec<String>)>,
}

impl ServerContainer {
    /// Its args and env with every volume's mount path replaced by a directory of `root`
    /// (created), as the kubelet's mounts would make those paths exist.
    fn mounted_under(&self, root: &Path) -> (Vec<String>, BTreeMap<String, String>) {
        let mut mounts = self.mounts.clone();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        let local: Vec<(String, PathBuf)> = mounts
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let dir = root.join(format!("volume-{i}"));
                std::fs::create_dir_all(&dir).unwrap();
                (m.clone(), dir)
            })
            .collect();
        let remap = |value: &str| {
            for (mount, dir) in &local {
                if let Some(rest) = value.strip_prefix(mount.as_str()) {
                    if rest.is_empty() || rest.starts_with('/') {
                        return format!("{}{rest}", dir.display());
                    }
                }
            }
            value.to_owned()
        };
        let env: BTreeMap<String, String> = self
            .env
            .iter()
            .map(|(k, v)| (k.clone(), remap(v)))
            .collect();
        let args = self.args.iter().map(|a| remap(&expand(a, &env))).collect();
        (args, env)
    }

    /// A probe's command with the mount paths remapped as [`Self::mounted_under`] does.
    fn probe_under(&self, command: &[String], root: &Path) -> Vec<String> {
        let probe = ServerContainer {
            args: command.to_vec(),
            ..self.clone()
        };
        probe.mounted_under(root).0
    }
}

fn server_containers(docs: &[Value]) -> Vec<ServerContainer> {
    let mut found = Vec::new();
    for doc in docs {
        let containers = doc
            .pointer("/spec/template/spec/containers")
            .and_then(Value::as_array);
        for container in containers.into_iter().flatten() {
            let image = container["image"].as_str().unwrap_or_default();
            let args: Vec<String> = container["args"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| a.as_str().expect("args are strings").to_owned())
                .collect();
            let image_name = image.rsplit('/').next().unwrap_or(image);
            if !image_name.starts_with("pod-identity-agent")
                || args.first().map(String::as_str) != Some("server")
            {
                continue;
            }
            let env = container["env"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    let name = e["name"].as_str().expect("env name").to_owned();
                    let value = e["value"].as_str().unwrap_or(DUMMY_VALUE).to_owned();
                    (name, value)
                })
                .collect();
            let api_server = doc.pointer("/spec/template/spec/automountServiceAccountToken")
                != Some(&Value::Bool(false));
            let strings = |v: &Value| -> Vec<String> {
                v.as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            };
            let mounts = container["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m["mountPath"].as_str().map(str::to_owned))
                .collect();
            let probes = ["startupProbe", "readinessProbe", "livenessProbe"]
                .into_iter()
                .filter_map(|p| {
                    let command = strings(&container[p]["exec"]["command"]);
                    (!command.is_empty()).then(|| (p.to_owned(), command))
                })
                .collect();
            found.push(ServerContainer {
                api_server,
                name: format!(
                    "{}/{} container {}",
                    doc["kind"].as_str().unwrap_or("?"),
                    doc.pointer("/metadata/name")
                        .and_then(Value::as_str)
                        .unwrap_or("?"),
                    container["name"].as_str().unwrap_or("?")
                ),
                args,
                env,
                mounts,
                probes,
            });
        }
    }
    found
}

/// The kubelet's expansion of `$(VAR)` in args: a defined variable is
/// replaced by its value, `$$` is a literal `$`, anything else stays as written.
fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = tail
            .strip_prefix("$(")
            .and_then(|t| t.split_once(')'))
            .filter(|(name, _)| env.contains_key(*name))
        {
            out.push_str(&env[name]);
            rest = after;
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

#[test]
fn kubelet_expansion_of_args() {
    let env = BTreeMap::from([("A".to_owned(), "x".to_owned())]);
    assert_eq!(expand("$(A)", &env), "x");
    assert_eq!(expand("p-$(A)-$(B)", &env), "p-x-$(B)");
    assert_eq!(expand("$$(A)", &env), "$(A)");
    assert_eq!(expand("plain", &env), "plain");
}

/// Every `server` container of daemonset.yaml and of each rendered overlay
/// starts the real binary with its args (expanded as the kubelet would) and
/// its environment, plus `--dry-run`: the agent checks every flag and value
/// and exits 0 without binding or reading anything. A pod that mounts its
/// service-account token finds the API server in the cluster; here a
/// kubeconfig stands in for the mount, and a temporary directory for each
/// volume mount (the handoff and probe sockets' directories).
#[test]
fn every_manifest_server_command_passes_the_agents_dry_run() {
    let kube_dir = tempfile::tempdir().unwrap();
    let kubeconfig = kube_dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    \
         server: https://127.0.0.1:1\nusers:\n- name: u\n  user:\n    token: t\n\
         contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\n\
         current-context: c\n",
    )
    .unwrap();
    let mut sources = vec![("daemonset.yaml".to_owned(), read("daemonset.yaml"))];
    for overlay in OVERLAYS {
        let dir = format!("deploy/overlays/{overlay}");
        let text = kustomize(&dir);
        sources.push((dir, text));
    }
    let mut failures = Vec::new();
    for (source, text) in &sources {
        let containers = server_containers(&yaml_documents(text, source));
        assert!(
            !containers.is_empty(),
            "{source}: no container runs `pod-identity-agent server`"
        );
        for container in containers {
            let volumes = tempfile::tempdir().unwrap();
            let (mut args, env) = container.mounted_under(volumes.path());
            args.push("--dry-run".to_owned());
            let mut command = Command::new(agent_binary());
            command.args(&args).env_clear().envs(&env);
            if container.api_server {
                command.env("KUBECONFIG", &kubeconfig);
            }
            let out = command
                .stdin(Stdio::null())
                .output()
                .expect("run the agent binary");
            if !out.status.success() {
                failures.push(format!(
                    "{source}: {}: `pod-identity-agent {}` with env {:?} exited {}: {}",
                    container.name,
                    args.join(" "),
                    env,
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every exec probe the manifests declare, run as the kubelet runs it inside the server's
/// container, against a real agent started with that container's probe socket: it passes
/// while the agent serves, and fails once the agent is gone (a socket nobody answers).
#[tokio::test]
async fn every_manifest_exec_probe_asks_the_containers_own_agent() {
    let mut sources = vec![("daemonset.yaml".to_owned(), read("daemonset.yaml"))];
    for overlay in OVERLAYS {
        let dir = format!("deploy/overlays/{overlay}");
        let text = kustomize(&dir);
        sources.push((dir, text));
    }
    let bed = TestBed::start().await;
    for (source, text) in &sources {
        for container in server_containers(&yaml_documents(text, source)) {
            assert_eq!(container.probes.len(), 3, "{source}: {}", container.name);
            let volumes = tempfile::tempdir().unwrap();
            let (args, env) = container.mounted_under(volumes.path());
            let socket = args
                .iter()
                .position(|a| a == "--probe-socket")
                .map(|i| args[i + 1].clone())
                .or_else(|| env.get("POD_IDENTITY_AGENT_PROBE_SOCKET").cloned())
                .unwrap_or_else(|| panic!("{source}: {} has no probe socket", container.name));
            let mut agent = AgentBuilder::new(bed.upstream.url())
                .arg("--jwks-file")
                .arg(bed.jwks_path())
                .args(["--probe-socket", &socket])
                .start()
                .await;
            let run = |command: Vec<String>| async move {
                assert_eq!(command[1], "probe", "{command:?}");
                proto_tests::agent::exec_probe(command[2].as_ref(), &command[3]).await
            };
            for (probe, command) in &container.probes {
                let command = container.probe_under(command, volumes.path());
                assert_eq!(command.len(), 4, "{source}: {probe}: {command:?}");
                let answer = run(command.clone()).await;
                assert_eq!(answer.code, Some(0), "{source}: {probe}: {answer:?}");
            }
            agent.signal(nix::sys::signal::Signal::SIGKILL);
            agent.wait_exit(Duration::from_secs(5)).await;
            for (probe, command) in &container.probes {
                let answer = run(container.probe_under(command, volumes.path())).await;
                assert_eq!(
                    answer.code,
                    Some(1),
                    "{source}: {probe} of a dead agent: {answer:?}"
                );
            }
        }
    }
}

// --- metric names ------------------------------------------------------------

/// Every series name a scrape can produce, from its `# TYPE` lines (a
/// counter `x` is queried as `x_total`, a histogram as `x_bucket`, `x_sum`,
/// `x_count`) and from its sample lines.
fn exposition_names(scrape: &str) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = metrics::samples(scrape)
        .into_iter()
        .map(|(series, _)| series.split('{').next().unwrap_or_default().to_owned())
        .collect();
    for line in scrape.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            "gaugehistogram" => &["_bucket", "_gsum", "_gcount"],
            "summary" => &["", "_sum", "_count"],
            "info" => &["_info"],
            _ => &[""],
        };
        names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
    }
    names
}

/// The metric names a PromQL query selects: identifiers outside strings,
/// label matchers, ranges and grouping clauses that are neither functions,
/// aggregations nor keywords. Grafana's `$variables` sit inside matchers and
/// ranges, so they are skipped with them.
fn metric_names(query: &str) -> BTreeSet<String> {
    const GROUPING: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const KEYWORDS: [&str; 8] = [
        "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan",
    ];
    const AGGREGATIONS: [&str; 13] = [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
    ];
    let chars: Vec<char> = query.chars().collect();
    let skip_string = |mut i: usize| {
        let quote = chars[i];
        i += 1;
        while i < chars.len() && chars[i] != quote {
            i += if chars[i] == '\\' { 2 } else { 1 };
        }
        i + 1
    };
    let skip_until = |mut i: usize, close: char| {
        while i < chars.len() && chars[i] != close {
            i = if matches!(chars[i], '"' | '\'' | '`') {
                skip_string(i)
            } else {
                i + 1
            };
        }
        i + 1
    };
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            i = skip_string(i);
        } else if c == '{' {
            i = skip_until(i, '}');
        } else if c == '[' {
            i = skip_until(i, ']');
        } else if c == '#' {
            i = skip_until(i, '\n');
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            // Numbers and durations (1e3, 0.99, 5m, 1h30m).
            while i < chars.len() && (is_word(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && is_word(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let lower = word.to_ascii_lowercase();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let before_paren = chars.get(next) == Some(&'(');
            if GROUPING.contains(&lower.as_str()) {
                if before_paren {
                    i = skip_until(next, ')');
                }
            } else if !before_paren
                && !KEYWORDS.contains(&lower.as_str())
                && !AGGREGATIONS.contains(&lower.as_str())
            {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn metric_names_are_found_in_promql() {
    let names = |q: &str| metric_names(q).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (le) (rate(a_bucket{job=~"$job", x="}"}[$__rate_interval])))"#
        ),
        ["a_bucket"]
    );
    assert_eq!(
        names("sum without (instance) (rate(b_total[5m] offset 1h)) / on(job) group_left(node) c > bool 0.5"),
        ["b_total", "c"]
    );
    assert_eq!(
        names("d < max_over_time(d[6h]) unless absent(up{job='x'}) or vector(1e3)"),
        ["d", "up"]
    );
    assert_eq!(names("sum (e:recorded) and NaN"), ["e:recorded"]);
}

/// Every query of the dashboard (panels and variables) and of the
/// PrometheusRule, as `(where, PromQL)`.
fn monitoring_queries() -> Vec<(String, String)> {
    let mut queries = Vec::new();
    let dashboard: Value =
        serde_json::from_str(&read("deploy/monitoring/dashboard.json")).expect("dashboard is JSON");
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                queries.push((
                    format!(
                        "dashboard panel {:?} query {}",
                        panel["title"].as_str().unwrap_or_default(),
                        target["refId"].as_str().unwrap_or_default()
                    ),
                    expr.to_owned(),
                ));
            }
        }
    }
    for variable in dashboard
        .pointer("/templating/list")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|v| v["type"] == "query")
    {
        // label_values(<selector>, <label>): only the selector is PromQL.
        let definition = variable["definition"].as_str().unwrap_or_default();
        let selector = definition
            .strip_prefix("label_values(")
            .and_then(|rest| rest.rsplit_once(','))
            .map(|(selector, _)| selector.to_owned())
            .unwrap_or_else(|| {
                panic!(
                    "variable {}: not label_values(..): {definition}",
                    variable["name"]
                )
            });
        queries.push((
            format!(
                "dashboard variable {}",
                variable["name"].as_str().unwrap_or_default()
            ),
            selector,
        ));
    }
    let rules = yaml_documents(
        &read("deploy/monitoring/prometheusrule.yaml"),
        "deploy/monitoring/prometheusrule.yaml",
    );
    for group in rules
        .iter()
        .filter_map(|d| d.pointer("/spec/groups").and_then(Value::as_array))
        .flatten()
    {
        for rule in group["rules"].as_array().into_iter().flatten() {
            let name = rule["alert"]
                .as_str()
                .or(rule["record"].as_str())
                .unwrap_or("?");
            let expr = rule["expr"].as_str().expect("rule expr is a string");
            queries.push((format!("rule {name}"), expr.to_owned()));
        }
    }
    queries
}

/// A real scrape, after one credentials request so the request-path series
/// exist too, of an agent with every feature whose families are exported only
/// when it is on: local verification, caller attestation (against a fake API
/// server) and the sts backend's associations.
async fn scrape_after_one_request() -> String {
    let api = FakeKubeApi::start().await;
    let runtime = tempfile::tempdir().unwrap();
    let pod = Pod::new("team-a", "app", "app-0");
    let pod_ip = IpAddr::from([127, 0, 0, 10]);
    api.add_pod(KubePod::of(&pod, "node-a", pod_ip));
    let bed = StsTestBed::builder()
        .association(Association::new(
            "team-a",
            "app",
            "arn:aws:iam::111122223333:role/app",
        ))
        .args(["--node-name", "node-a", "--caller-attestation", "pod"])
        .args(["--startup-taint", "pod-identity-agent/not-ready"])
        .arg("--handoff-socket")
        .arg(runtime.path().join("handoff.sock"))
        .arg("--audit-log")
        .arg(runtime.path().join("audit.log"))
        .env("KUBECONFIG", api.kubeconfig())
        .start()
        .await;
    let response = bed
        .agent
        .fetch_credentials_from(pod_ip, &bed.token(&pod))
        .await;
    assert_eq!(response.status, 200, "{response:?}");
    bed.agent.metrics_text().await
}

#[tokio::test]
async fn dashboard_and_alerts_query_only_metrics_the_agent_exports() {
    let exported = exposition_names(&scrape_after_one_request().await);
    let queries = monitoring_queries();
    let mut agent_names = BTreeSet::new();
    let mut unknown = Vec::new();
    for (source, query) in &queries {
        for name in metric_names(query) {
            if name.starts_with(AGENT_PREFIX) {
                if !exported.contains(&name) {
                    unknown.push(format!("{source}: {name} is not in the agent's /metrics"));
                }
                agent_names.insert(name);
            } else if !EXTERNAL_METRICS.iter().any(|(n, _)| *n == name) {
                unknown.push(format!(
                    "{source}: {name} is neither an agent metric nor one of {EXTERNAL_METRICS:?}"
                ));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "{}\nexported: {exported:?}",
        unknown.join("\n")
    );
    assert!(
        agent_names.len() >= 20,
        "only {} agent metrics found in {} queries; is the extraction broken? {agent_names:?}",
        agent_names.len(),
        queries.len()
    );
}

/// A metric family the dashboard does not show is one nobody looks at: a new
/// family needs a panel.
#[tokio::test]
async fn dashboard_shows_every_metric_the_agent_exports() {
    let scrape = scrape_after_one_request().await;
    let families: BTreeSet<String> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter(|name| name.starts_with(AGENT_PREFIX))
        .map(str::to_owned)
        .collect();
    let shown: BTreeSet<String> = monitoring_queries()
        .into_iter()
        .filter(|(source, _)| source.starts_with("dashboard"))
        .flat_map(|(_, query)| metric_names(&query))
        .collect();
    let exposition = exposition_names(&scrape);
    let missing: Vec<&String> = families
        .iter()
        .filter(|family| {
            !exposition
                .iter()
                .filter(|n| n.starts_with(family.as_str()))
                .any(|n| shown.contains(n))
        })
        .collect();
    assert!(
        !families.is_empty() && missing.is_empty(),
        "families without a dashboard panel: {missing:?}"
    );
}

// --- the self-managed overlay's associations --------------------------------

#[tokio::test]
async fn self_managed_overlay_associations_load_in_the_agent() {
    let relative = "deploy/overlays/self-managed-sts/associations.yaml";
    let file = yaml_documents(&read(relative), relative);
    let expected = file[0]["associations"]
        .as_array()
        .map(Vec::len)
        .expect("an `associations` list");
    let dir = tempfile::tempdir().expect("temp dir");
    let jwks = dir.path().join("jwks.json");
    write_jwks(&jwks, &[&TestKeys::shared().rsa]).expect("write JWKS");
    // Nothing is called upstream: the agent only has to load the file.
    let agent = AgentBuilder::sts("http://127.0.0.1:9")
        .associations(repo_root().join(relative))
        .arg("--jwks-file")
        .arg(&jwks)
        .start()
        .await;
    let text = agent.metrics_text().await;
    assert_eq!(
        metrics::value(&text, "pod_identity_agent_associations"),
        Some(expected as f64),
        "{text}"
    );
}

/// `promtool`: on the PATH, or where `scripts/validate-deploy` puts it.
fn promtool() -> PathBuf {
    deploy_tools();
    let venv = repo_root().join("proto-tests/clients/.venv/bin/promtool");
    if venv.is_file() {
        return venv;
    }
    PathBuf::from("promtool")
}

/// The credential-lifetime alert, fed what running agents export, through `promtool test
/// rules`: it fires for an agent whose pods hold credentials that expire within 10 minutes,
/// and stays quiet for one serving hour-long credentials.
#[tokio::test]
async fn the_lifetime_alert_fires_on_what_the_agent_exports() {
    const ALERT: &str = "PodIdentityAgentCredentialsExpiring";
    const GAUGE: &str = "pod_identity_agent_cache_min_credential_lifetime_seconds";
    let docs = yaml_documents(
        &read("deploy/monitoring/prometheusrule.yaml"),
        "prometheusrule.yaml",
    );
    let groups = docs
        .iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .map(|d| d["spec"]["groups"].clone())
        .expect("a PrometheusRule");
    let dir = tempfile::tempdir().unwrap();
    // JSON is YAML: promtool reads the operator's groups as a rule file.
    std::fs::write(
        dir.path().join("rules.yaml"),
        serde_json::json!({ "groups": groups }).to_string(),
    )
    .unwrap();
    for (lifetime, fires) in [(300, true), (3600, false)] {
        let bed = TestBed::start().await;
        bed.upstream
            .set_credential_lifetime(std::time::Duration::from_secs(lifetime));
        let token = bed.token(&Pod::new("team-a", "app", "app-0"));
        assert_eq!(bed.agent.fetch_credentials(&token).await.status, 200);
        let text = bed.agent.metrics_text().await;
        let value = metrics::value(&text, GAUGE).expect("the gauge is exported");
        assert!(value.is_finite(), "{GAUGE} {value}\n{text}");
        let labels = r#"job="pod-identity-agent", instance="10.0.0.1:2705", node="node-a""#;
        let expected = if fires {
            serde_json::json!([{
                "labels": format!(
                    r#"ALERTS{{alertname="{ALERT}", alertstate="firing", {labels}, severity="critical"}}"#
                ),
                "value": 1,
            }])
        } else {
            serde_json::json!([])
        };
        let test = serde_json::json!({
            "rule_files": ["rules.yaml"],
            "evaluation_interval": "1m",
            "tests": [{
                "interval": "1m",
                "input_series": [{
                    "series": format!("{GAUGE}{{{labels}}}"),
                    "values": format!("{value}x15"),
                }],
                "promql_expr_test": [{
                    "expr": format!(r#"ALERTS{{alertname="{ALERT}", alertstate="firing"}}"#),
                    "eval_time": "10m",
                    "exp_samples": expected,
                }],
            }],
        });
        std::fs::write(dir.path().join("test.yaml"), test.to_string()).unwrap();
        let out = Command::new(promtool())
            .args(["test", "rules", "test.yaml"])
            .current_dir(dir.path())
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "{lifetime} s credentials ({GAUGE} {value}): the alert should {}fire\n{}{}",
            if fires { "" } else { "not " },
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
