//! Launches the real `pod-identity-agent` binary and talks to it.
//!
//! The agent is started on ephemeral ports (`--port 0` etc.) and announces
//! each bound listener with a JSON log line
//! (`"message":"listening","listener":"credentials","address":"127.0.0.1:41234"`),
//! which is how the harness learns its ports. Every line the agent writes is
//! kept, so tests can assert on logs and a failing test prints them.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::time::Instant;

use crate::http::{self, RawRequest, RawResponse};

/// Cluster name the agent is started with; the fake echoes it into role ARNs.
pub const CLUSTER_NAME: &str = "test-cluster";
pub const REGION: &str = "us-west-2";
/// Environment variable naming the agent binary, overriding the default
/// `target/debug/pod-identity-agent`.
pub const AGENT_BIN_ENV: &str = "POD_IDENTITY_AGENT_BIN";
pub const CREDENTIALS_PATH: &str = "/v1/credentials";

/// Bound on start-up (all listeners announced, then `/readyz` 200): a debug
/// build on a loaded two-core machine can take seconds to start.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Which of the agent's listeners a log line announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    Credentials,
    Probe,
    Metrics,
}

impl Listener {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "credentials" => Some(Self::Credentials),
            "probe" => Some(Self::Probe),
            "metrics" => Some(Self::Metrics),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Clone, Debug)]
pub struct LogLine {
    pub stream: Stream,
    pub text: String,
}

type Output = Arc<Mutex<Vec<LogLine>>>;

/// Path to the agent binary: `$POD_IDENTITY_AGENT_BIN`, else
/// `pod-identity-agent` next to the test's own target directory.
pub fn agent_binary() -> PathBuf {
    if let Some(path) = std::env::var_os(AGENT_BIN_ENV) {
        return PathBuf::from(path);
    }
    let bin = target_binary("pod-identity-agent");
    assert_fresh(&bin);
    bin
}

/// `cargo test` does not rebuild another package's binary: refuse to test a stale one.
fn assert_fresh(bin: &std::path::Path) {
    let built = std::fs::metadata(bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run `cargo build -p pod-identity-agent` (or ./scripts/test)",
                bin.display()
            )
        });
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/src");
    let mut stack = vec![src];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t > built)
            {
                panic!(
                    "{} is older than {}; run `cargo build -p pod-identity-agent` (or ./scripts/test)",
                    bin.display(),
                    path.display()
                );
            }
        }
    }
}

/// Environment that keeps a child's AWS SDK from finding anything of the developer's: no
/// shared config or credentials file, no instance metadata.
pub const NO_AMBIENT_AWS: [(&str, &str); 3] = [
    ("AWS_CONFIG_FILE", "/dev/null"),
    ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

/// What an agent started by a test inherits from the test's environment; the rest is cleared.
/// POD_IDENTITY_AGENT_DISABLE_DEFENCE: scripts/check_defences.py runs a test against the
/// debug build with one defence off (agent/src/defence.rs).
const PASSED_THROUGH: [&str; 3] = ["PATH", "RUST_LOG", "POD_IDENTITY_AGENT_DISABLE_DEFENCE"];

fn pass_through_env(cmd: &mut Command) {
    for var in PASSED_THROUGH {
        if let Some(v) = std::env::var_os(var) {
            cmd.env(var, v);
        }
    }
}

/// The agent binary as a plain command with a cleared environment (what [`PASSED_THROUGH`]
/// names aside), for tests that give it arguments the harness would not.
pub fn agent_command() -> Command {
    let mut cmd = Command::new(agent_binary());
    cmd.env_clear().env("AWS_EC2_METADATA_DISABLED", "true");
    pass_through_env(&mut cmd);
    cmd
}

/// A binary built into the same `target/<profile>/` as the running test
/// (whose own executable is `target/<profile>/deps/<name>-<hash>`).
pub fn target_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    let deps = exe.parent().expect("test executable has a directory");
    let profile_dir = if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("deps has a parent")
    } else {
        deps
    };
    profile_dir.join(name)
}

/// Where the agent gets credentials from, and the flags that say so.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The default backend: `--endpoint <url>` is the EKS Auth override.
    EksAuth { endpoint: String },
    /// `--backend sts [--sts-endpoint <url>] [--associations <file>]`, and no
    /// `--endpoint` (an EKS Auth override means nothing to this backend).
    Sts {
        endpoint: Option<String>,
        associations: Option<PathBuf>,
    },
}

impl Backend {
    fn args(&self) -> Vec<OsString> {
        match self {
            Backend::EksAuth { endpoint } => vec!["--endpoint".into(), endpoint.into()],
            Backend::Sts {
                endpoint,
                associations,
            } => {
                let mut args: Vec<OsString> = vec!["--backend".into(), "sts".into()];
                if let Some(endpoint) = endpoint {
                    args.extend(["--sts-endpoint".into(), endpoint.into()]);
                }
                if let Some(path) = associations {
                    args.extend(["--associations".into(), path.into()]);
                }
                args
            }
        }
    }
}

/// How an agent that was expected to refuse its configuration ended.
#[derive(Clone, Debug)]
pub struct Exited {
    /// `None`: killed by a signal, or still running at the deadline (and then killed).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Exited {
    /// The non-blank lines of stderr.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }
}

/// What every builder that ends in a started agent takes from its test: extra server flags,
/// and whether to wait for readiness.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Global flags, given before the `server` subcommand.
    global_args: Vec<OsString>,
    args: Vec<OsString>,
    /// Environment variables of the agent process (its environment is otherwise cleared).
    env: Vec<(OsString, OsString)>,
    wait_ready: bool,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            global_args: Vec::new(),
            args: Vec::new(),
            env: Vec::new(),
            wait_ready: true,
        }
    }
}

/// The builder methods of [`AgentOptions`], for a builder that keeps them in `self.options`.
macro_rules! agent_options_methods {
    () => {
        /// Append a server flag (after the defaults).
        pub fn arg(mut self, arg: impl Into<std::ffi::OsString>) -> Self {
            self.options.push_args([arg]);
            self
        }

        pub fn args<I, S>(mut self, args: I) -> Self
        where
            I: IntoIterator<Item = S>,
            S: Into<std::ffi::OsString>,
        {
            self.options.push_args(args);
            self
        }

        /// Whether `start` also waits for `/readyz` to answer 200 (default: yes).
        pub fn wait_ready(mut self, wait: bool) -> Self {
            self.options.set_wait_ready(wait);
            self
        }

        /// A global flag, placed before the `server` subcommand.
        pub fn global_arg(mut self, arg: impl Into<std::ffi::OsString>) -> Self {
            self.options.push_global_arg(arg.into());
            self
        }

        /// Set an environment variable for the agent process (its environment is otherwise
        /// cleared, see [`crate::agent::AgentBuilder::start`]).
        pub fn env(
            mut self,
            key: impl Into<std::ffi::OsString>,
            value: impl Into<std::ffi::OsString>,
        ) -> Self {
            self.options.push_env(key.into(), value.into());
            self
        }
    };
}
pub(crate) use agent_options_methods;

impl AgentOptions {
    pub(crate) fn push_args<I, S>(&mut self, args: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
    }

    pub(crate) fn set_wait_ready(&mut self, wait: bool) {
        self.wait_ready = wait;
    }

    pub(crate) fn push_global_arg(&mut self, arg: OsString) {
        self.global_args.push(arg);
    }

    pub(crate) fn push_env(&mut self, key: OsString, value: OsString) {
        self.env.push((key, value));
    }
}

/// Configures and starts an [`Agent`].
#[derive(Clone, Debug)]
pub struct AgentBuilder {
    backend: Backend,
    bind_hosts: String,
    options: AgentOptions,
}

impl AgentBuilder {
    /// An agent whose EKS Auth endpoint is `endpoint` (a fake's URL).
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self::with_backend(Backend::EksAuth {
            endpoint: endpoint.into(),
        })
    }

    /// An agent with `--backend sts --sts-endpoint <sts_endpoint>` and no
    /// `--endpoint`. The backend also needs [`AgentBuilder::associations`]
    /// (and a key source) to start.
    pub fn sts(sts_endpoint: impl Into<String>) -> Self {
        Self::with_backend(Backend::Sts {
            endpoint: Some(sts_endpoint.into()),
            associations: None,
        })
    }

    pub fn with_backend(backend: Backend) -> Self {
        Self {
            backend,
            bind_hosts: "127.0.0.1".to_owned(),
            options: AgentOptions::default(),
        }
    }

    /// `--associations <path>` (sts backend only; panics otherwise).
    pub fn associations(mut self, path: impl Into<PathBuf>) -> Self {
        match &mut self.backend {
            Backend::Sts { associations, .. } => *associations = Some(path.into()),
            Backend::EksAuth { .. } => panic!("--associations is a flag of the sts backend"),
        }
        self
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Replace the default `--bind-hosts 127.0.0.1`.
    pub fn bind_hosts(mut self, hosts: impl Into<String>) -> Self {
        self.bind_hosts = hosts.into();
        self
    }

    agent_options_methods!();

    /// Take a test bed's options: its flags after those given so far, and its readiness wait.
    pub fn options(mut self, options: AgentOptions) -> Self {
        self.options.global_args.extend(options.global_args);
        self.options.args.extend(options.args);
        self.options.env.extend(options.env);
        self.options.wait_ready = options.wait_ready;
        self
    }

    /// The full argument list the agent will be started with.
    pub fn command_line(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = self.options.global_args.clone();
        let given = |flag: &str| self.options.args.iter().any(|a| a == flag);
        args.push("server".into());
        // Ephemeral ports unless the test fixes them (agents that share a node share ports).
        for (flag, value) in [
            ("--cluster-name", CLUSTER_NAME),
            ("--port", "0"),
            ("--bind-hosts", &self.bind_hosts),
            ("--probe-port", "0"),
            ("--metrics-address", "127.0.0.1"),
            ("--metrics-port", "0"),
            ("--region", REGION),
            ("--log-format", "json"),
        ] {
            if !given(flag) {
                args.extend([flag.into(), value.into()]);
            }
        }
        args.extend(self.backend.args());
        // The agent refuses a JWKS flag without --issuer; the test keys' tokens carry
        // DEFAULT_ISSUER, so a bed that names keys but no issuer gets that one.
        if (given("--jwks-file") || given("--jwks-url")) && !given("--issuer") {
            args.extend(["--issuer".into(), crate::keys::DEFAULT_ISSUER.into()]);
        }
        args.extend(self.options.args.iter().cloned());
        args
    }

    /// The agent's command, with the environment described at
    /// [`AgentBuilder::start`] and piped output.
    fn command(&self, bin: &std::path::Path) -> Command {
        let mut cmd = Command::new(bin);
        cmd.args(self.command_line())
            .env_clear()
            .env("AWS_ACCESS_KEY_ID", "AKIDTEST")
            .env("AWS_SECRET_ACCESS_KEY", "secret")
            .envs(NO_AMBIENT_AWS)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        pass_through_env(&mut cmd);
        cmd.envs(self.options.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Run an agent that is expected to exit by itself (a configuration it
    /// must refuse) and collect its output. An agent still running after
    /// `timeout` is killed and reported with `code: None`.
    pub async fn run_to_exit(self, timeout: Duration) -> Exited {
        let bin = agent_binary();
        run_within(tokio::process::Command::from(self.command(&bin)), timeout).await
    }

    /// Spawn the agent and wait (bounded) until it has announced its
    /// credentials, probe and metrics listeners and, unless disabled, answers
    /// `/readyz` with 200. Panics with the agent's output if it does not.
    ///
    /// The environment is cleared so nothing from the developer's shell (AWS
    /// profiles, `AWS_REGION`, flags' `env` fallbacks) leaks in; the agent gets
    /// static dummy credentials to sign with, and no config files or IMDS.
    pub async fn start(self) -> Agent {
        let bin = agent_binary();
        assert!(
            bin.is_file(),
            "agent binary not found at {}: build it with `cargo build -p pod-identity-agent` \
             (scripts/test does this) or set {AGENT_BIN_ENV}",
            bin.display()
        );
        let args = self.command_line();
        let mut cmd = self.command(&bin);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));

        let output: Output = Arc::default();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        capture(stdout, Stream::Stdout, output.clone());
        capture(stderr, Stream::Stderr, output.clone());

        let mut agent = Agent {
            child,
            exit: None,
            output,
            args,
            credentials: Vec::new(),
            probe: None,
            metrics: None,
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        agent.wait_for_listeners(deadline).await;
        if self.options.wait_ready {
            agent.wait_for_ready(deadline).await;
        }
        agent
    }
}

/// A running agent process; killed when dropped.
pub struct Agent {
    child: Child,
    exit: Option<ExitStatus>,
    output: Output,
    args: Vec<OsString>,
    credentials: Vec<SocketAddr>,
    probe: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
}

impl Agent {
    pub fn builder(endpoint: impl Into<String>) -> AgentBuilder {
        AgentBuilder::new(endpoint)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first credentials listener (the one for `127.0.0.1` by default).
    pub fn credentials_addr(&self) -> SocketAddr {
        self.credentials[0]
    }

    /// Every credentials listener announced so far.
    pub fn credentials_addrs(&self) -> Vec<SocketAddr> {
        let mut addrs = self.credentials.clone();
        for (listener, addr) in parse_listeners(&self.logs()) {
            if listener == Listener::Credentials && !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
        addrs
    }

    pub fn probe_addr(&self) -> SocketAddr {
        self.probe.expect("probe listener announced at start")
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics.expect("metrics listener announced at start")
    }

    /// `http://127.0.0.1:<port>/v1/credentials`, the value for
    /// `AWS_CONTAINER_CREDENTIALS_FULL_URI`.
    pub fn credentials_url(&self) -> String {
        format!("http://{}{CREDENTIALS_PATH}", self.credentials_addr())
    }

    /// The `Host` value a well-behaved client sends: `127.0.0.1:<port>`.
    pub fn credentials_host(&self) -> String {
        self.credentials_addr().to_string()
    }

    /// Send `method path` to the credentials listener with `headers`. A `Host`
    /// naming the listener and `Connection: close` are added unless given.
    pub async fn try_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<RawResponse> {
        send_to(self.credentials_addr(), method, path, headers).await
    }

    /// [`Agent::try_request`] with `GET`, panicking (with the agent's logs) on
    /// a transport error.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> RawResponse {
        self.request("GET", path, headers).await
    }

    pub async fn request(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> RawResponse {
        match self.try_request(method, path, headers).await {
            Ok(r) => r,
            Err(e) => panic!(
                "{method} {path} to the agent failed: {e}\n{}",
                self.logs_text()
            ),
        }
    }

    /// `GET /v1/credentials` with `Authorization: <token>`, on a connection from `source`
    /// (any address in 127.0.0.0/8: how tests stand in for a pod's IP). Panics with the
    /// agent's logs on a transport error.
    pub async fn fetch_credentials_from(
        &self,
        source: std::net::IpAddr,
        token: &str,
    ) -> RawResponse {
        credentials_from(source, self.credentials_addr(), token)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "GET {CREDENTIALS_PATH} from {source}: {e}\n{}",
                    self.logs_text()
                )
            })
    }

    /// `GET /v1/credentials` with `Authorization: <token>`.
    pub async fn fetch_credentials(&self, token: &str) -> RawResponse {
        self.get(CREDENTIALS_PATH, &[("Authorization", token)])
            .await
    }

    /// `GET path` on the probe listener.
    pub async fn probe(&self, path: &str) -> RawResponse {
        let addr = self.probe_addr();
        send_to(addr, "GET", path, &[])
            .await
            .unwrap_or_else(|e| panic!("GET {path} on probe listener: {e}\n{}", self.logs_text()))
    }

    /// The Prometheus text from `/metrics`.
    pub async fn metrics_text(&self) -> String {
        let addr = self.metrics_addr();
        let r = send_to(addr, "GET", "/metrics", &[])
            .await
            .unwrap_or_else(|e| panic!("GET /metrics: {e}\n{}", self.logs_text()));
        assert_eq!(r.status, 200, "GET /metrics: {r:?}");
        r.text()
    }

    /// Poll `/metrics` until `series` satisfies `ok`, for at most `wait`; its value then.
    /// Panics with the agent's logs if it never does (a missing series reads as NaN).
    pub async fn wait_for_metric(
        &self,
        series: &str,
        ok: impl Fn(f64) -> bool,
        wait: Duration,
    ) -> f64 {
        let deadline = Instant::now() + wait;
        loop {
            let value =
                crate::metrics::value(&self.metrics_text().await, series).unwrap_or(f64::NAN);
            if ok(value) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "{series} is {value} after {wait:?}\n{}",
                self.logs_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Send SIGTERM.
    pub fn sigterm(&self) {
        self.signal(Signal::SIGTERM);
    }

    pub fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits in i32"));
        kill(pid, signal).unwrap_or_else(|e| panic!("kill({pid}, {signal}): {e}"));
    }

    /// Has the process exited? (Reaps it if so.)
    pub fn has_exited(&mut self) -> bool {
        self.poll_exit().is_some()
    }

    fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().expect("try_wait on agent");
        }
        self.exit
    }

    /// Wait up to `timeout` for the process to exit; `None` if still running.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.poll_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Every line written so far to stdout and stderr, in arrival order.
    pub fn logs(&self) -> Vec<String> {
        self.log_lines().into_iter().map(|l| l.text).collect()
    }

    pub fn log_lines(&self) -> Vec<LogLine> {
        self.output
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The lines that parse as JSON objects.
    pub fn log_records(&self) -> Vec<Value> {
        self.logs()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(Value::is_object)
            .collect()
    }

    /// Command line and output, for failure messages.
    pub fn logs_text(&self) -> String {
        let mut out = format!(
            "--- agent: {} {} ---\n",
            agent_binary().display(),
            self.args
                .iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        );
        for line in self.log_lines() {
            let tag = match line.stream {
                Stream::Stdout => "out",
                Stream::Stderr => "err",
            };
            out.push_str(tag);
            out.push_str("| ");
            out.push_str(&line.text);
            out.push('\n');
        }
        out.push_str("--- end of agent output ---");
        out
    }

    /// Print the agent's output to stderr (shown by the test runner on failure).
    pub fn dump_logs(&self) {
        eprintln!("{}", self.logs_text());
    }

    async fn wait_for_listeners(&mut self, deadline: Instant) {
        loop {
            for (listener, addr) in parse_listeners(&self.logs()) {
                match listener {
                    Listener::Credentials if !self.credentials.contains(&addr) => {
                        self.credentials.push(addr)
                    }
                    Listener::Probe => self.probe = self.probe.or(Some(addr)),
                    Listener::Metrics => self.metrics = self.metrics.or(Some(addr)),
                    Listener::Credentials => {}
                }
            }
            if !self.credentials.is_empty() && self.probe.is_some() && self.metrics.is_some() {
                return;
            }
            if let Some(status) = self.poll_exit() {
                panic!(
                    "agent exited ({status}) before announcing its listeners\n{}",
                    self.logs_text()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "agent did not announce credentials, probe and metrics listeners \
                     (a JSON line with \"message\":\"listening\", \"listener\" and \"address\") \
                     within {STARTUP_TIMEOUT:?}; seen: credentials={:?} probe={:?} metrics={:?}\n{}",
                    self.credentials,
                    self.probe,
                    self.metrics,
                    self.logs_text()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Ready as the kubelet would judge it: through the agent's own probe socket when it has
    /// one (the probe port may be another agent's during a handoff), else the probe port.
    async fn wait_for_ready(&mut self, deadline: Instant) {
        let addr = self.probe_addr();
        let socket = self.probe_socket();
        loop {
            let last = match &socket {
                Some(socket) => {
                    let probe = exec_probe(socket, "/readyz").await;
                    if probe.code == Some(0) {
                        return;
                    }
                    format!("{probe:?}")
                }
                None => match send_to(addr, "GET", "/readyz", &[]).await {
                    Ok(r) if r.status == 200 => return,
                    Ok(r) => format!("{r:?}"),
                    Err(e) => e.to_string(),
                },
            };
            if let Some(status) = self.poll_exit() {
                panic!("agent exited ({status}) before ready\n{}", self.logs_text());
            }
            if Instant::now() >= deadline {
                panic!(
                    "agent not ready (/readyz != 200) within {STARTUP_TIMEOUT:?}; last: {last}\n{}",
                    self.logs_text()
                );
            }
            tokio::time::sleep(POLL_INTERVAL * 5).await;
        }
    }
}

impl Agent {
    /// The `--probe-socket` this agent was started with.
    pub fn probe_socket(&self) -> Option<PathBuf> {
        let args = &self.args;
        args.iter()
            .position(|a| a == "--probe-socket")
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from)
    }

    /// The kubelet's exec probe of this agent: `pod-identity-agent probe SOCKET path`.
    pub async fn exec_probe(&self, path: &str) -> Exited {
        let socket = self
            .probe_socket()
            .expect("the agent was started with --probe-socket");
        exec_probe(&socket, path).await
    }
}

/// `pod-identity-agent probe socket path`, as the kubelet runs an exec probe (bounded at 10 s).
pub async fn exec_probe(socket: &std::path::Path, path: &str) -> Exited {
    let mut cmd = tokio::process::Command::new(agent_binary());
    cmd.arg("probe").arg(socket).arg(path).env_clear();
    run_within(cmd, Duration::from_secs(10)).await
}

/// Run `cmd` to its exit and collect its output; a process still running after `timeout` is
/// killed and reported with `code: None`.
async fn run_within(mut cmd: tokio::process::Command, timeout: Duration) -> Exited {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.as_std().get_program()));
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => Exited {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        },
        Ok(Err(e)) => panic!("wait for {:?}: {e}", cmd.as_std().get_program()),
        // Dropping the future drops the child, which kills it.
        Err(_) => Exited {
            code: None,
            stdout: String::new(),
            stderr: format!("(still running after {timeout:?}; killed)"),
        },
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        if self.poll_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `count` requests with `token`, all sent at once to `agent`: the access key id of each, every
/// answer required to be a 200.
pub async fn burst_of_key_ids(agent: &Agent, token: &str, count: usize) -> Vec<String> {
    let tokens = std::iter::repeat_n(token.to_owned(), count);
    let answers = burst(agent.credentials_addr(), tokens).await;
    let key_id = |(response, _): (std::io::Result<RawResponse>, Duration)| {
        let response =
            response.unwrap_or_else(|e| panic!("request failed: {e}\n{}", agent.logs_text()));
        assert_eq!(response.status, 200, "{response:?}");
        response.json_str("AccessKeyId").expect("AccessKeyId")
    };
    answers.into_iter().map(key_id).collect()
}

/// One credentials request per token, all sent at once to `addr`: each answer (or I/O
/// error) with how long it took, in the order they completed.
pub async fn burst<I>(addr: SocketAddr, tokens: I) -> Vec<(std::io::Result<RawResponse>, Duration)>
where
    I: IntoIterator<Item = String>,
{
    burst_from(addr, tokens.into_iter().map(|t| (None, t))).await
}

/// [`burst`], each request from its own loopback address (127.1.x.y), as pods of a node
/// each have their own IP.
pub async fn burst_from_pods<I>(
    addr: SocketAddr,
    tokens: I,
) -> Vec<(std::io::Result<RawResponse>, Duration)>
where
    I: IntoIterator<Item = String>,
{
    let sources = (0u32..).map(|i| {
        std::net::IpAddr::V4(std::net::Ipv4Addr::new(
            127,
            1,
            (i / 250) as u8,
            (i % 250 + 1) as u8,
        ))
    });
    burst_from(addr, sources.zip(tokens).map(|(s, t)| (Some(s), t))).await
}

async fn burst_from<I>(
    addr: SocketAddr,
    requests: I,
) -> Vec<(std::io::Result<RawResponse>, Duration)>
where
    I: IntoIterator<Item = (Option<std::net::IpAddr>, String)>,
{
    let mut tasks = tokio::task::JoinSet::new();
    for (source, token) in requests {
        tasks.spawn(async move {
            let started = Instant::now();
            let response = match source {
                None => send_to(addr, "GET", CREDENTIALS_PATH, &[("Authorization", &token)]).await,
                Some(source) => credentials_from(source, addr, &token).await,
            };
            (response, started.elapsed())
        });
    }
    let mut out = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        out.push(joined.expect("request task"));
    }
    out
}

/// `GET /v1/credentials` to `addr` with `Authorization: <token>`, from `source`.
async fn credentials_from(
    source: std::net::IpAddr,
    addr: SocketAddr,
    token: &str,
) -> std::io::Result<RawResponse> {
    let request = RawRequest::new("GET", CREDENTIALS_PATH)
        .header("Host", addr.to_string())
        .header("Authorization", token);
    http::send_from(source, addr, &request).await
}

/// One request on a fresh connection, with default `Host` and
/// `Connection: close` unless `headers` has them.
pub async fn send_to(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<RawResponse> {
    let mut req = RawRequest::new(method, path);
    let has = |name: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    if !has("host") {
        req = req.header("Host", addr.to_string());
    }
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    if !has("connection") {
        req = req.header("Connection", "close");
    }
    http::send(addr, &req).await
}

fn capture(pipe: impl Read + Send + 'static, stream: Stream, output: Output) {
    std::thread::spawn(move || {
        let reader = BufReader::new(pipe);
        for line in reader.split(b'\n') {
            let Ok(bytes) = line else { break };
            let text = String::from_utf8_lossy(&bytes)
                .trim_end_matches('\r')
                .to_owned();
            output
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(LogLine { stream, text });
        }
    });
}

/// A field of a JSON log record: at the top level (the contract: fields are
/// flattened) or, leniently, under `fields` as tracing's default JSON nests them.
pub fn log_field<'a>(record: &'a Value, name: &str) -> Option<&'a Value> {
    record
        .get(name)
        .or_else(|| record.get("fields").and_then(|f| f.get(name)))
}

/// `(listener, address)` for every "listening" line in `lines`.
pub fn parse_listeners(lines: &[String]) -> Vec<(Listener, SocketAddr)> {
    lines
        .iter()
        .filter_map(|line| {
            let record: Value = serde_json::from_str(line).ok()?;
            if log_field(&record, "message")?.as_str()? != "listening" {
                return None;
            }
            let listener = Listener::parse(log_field(&record, "listener")?.as_str()?)?;
            let address = log_field(&record, "address")?.as_str()?.parse().ok()?;
            Some((listener, address))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_lines_are_parsed() {
        let lines = vec![
            r#"{"timestamp":"x","level":"INFO","message":"listening","listener":"credentials","address":"127.0.0.1:41234"}"#.to_owned(),
            r#"{"message":"listening","listener":"credentials","address":"[::1]:41235"}"#.to_owned(),
            r#"{"fields":{"message":"listening","listener":"probe","address":"127.0.0.1:1"}}"#.to_owned(),
            r#"{"message":"started"}"#.to_owned(),
            "not json".to_owned(),
        ];
        let parsed = parse_listeners(&lines);
        assert_eq!(
            parsed,
            vec![
                (Listener::Credentials, "127.0.0.1:41234".parse().unwrap()),
                (Listener::Credentials, "[::1]:41235".parse().unwrap()),
                (Listener::Probe, "127.0.0.1:1".parse().unwrap()),
            ]
        );
    }

    #[test]
    fn default_command_line() {
        let args = AgentBuilder::new("http://127.0.0.1:9")
            .arg("--cache-scope")
            .arg("association")
            .command_line();
        let args: Vec<_> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(args[0], "server");
        assert!(args
            .windows(2)
            .any(|w| w == ["--endpoint", "http://127.0.0.1:9"]));
        assert_eq!(&args[args.len() - 2..], ["--cache-scope", "association"]);
        assert!(!args.iter().any(|a| a == "--backend"));
    }

    #[test]
    fn sts_command_line_has_no_eks_auth_endpoint() {
        let args: Vec<_> = AgentBuilder::sts("http://127.0.0.1:9")
            .associations("/tmp/a.yaml")
            .arg("--jwks-file")
            .arg("/tmp/jwks.json")
            .command_line()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(!args.iter().any(|a| a == "--endpoint"), "{args:?}");
        for pair in [
            ["--backend", "sts"],
            ["--sts-endpoint", "http://127.0.0.1:9"],
            ["--associations", "/tmp/a.yaml"],
        ] {
            assert!(args.windows(2).any(|w| w == pair), "{pair:?} in {args:?}");
        }
        assert_eq!(&args[args.len() - 2..], ["--jwks-file", "/tmp/jwks.json"]);
    }
}
