//! Command line and environment, parsed once into a typed [`Config`].
//!
//! Every flag can also be set from an environment variable (`POD_IDENTITY_AGENT_<FLAG>`),
//! which is how a DaemonSet usually passes settings. Anything clap cannot check by type is
//! validated in [`ServerArgs::into_config`], so a bad value is reported before any socket is
//! opened, as one line naming the flag, with exit code 64 (`EX_USAGE`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use hyper::Uri;

use crate::defence::{self, Defence};

/// Audience the EKS Pod Identity webhook projects into pod tokens.
pub const DEFAULT_AUDIENCE: &str = "pods.eks.amazonaws.com";
/// The link-local addresses every SDK allow-lists for plain-HTTP container credentials.
pub const DEFAULT_BIND_HOSTS: &str = "169.254.170.23,[fd00:ec2::23]";
/// Exit code for invalid configuration (`EX_USAGE` from sysexits.h).
pub const EXIT_USAGE: i32 = 64;
/// A flag's environment variable is this prefix and the flag's name in upper snake case,
/// unless its attribute names a conventional variable of its own (`NODE_NAME`, `AWS_REGION`,
/// `RUST_LOG`) or it is one of the command-line-only flags (`COMMAND_LINE_ONLY`). The rule is applied once, in
/// [`Cli::try_parse_with_env`], instead of being spelled out on every flag.
pub const ENV_PREFIX: &str = "POD_IDENTITY_AGENT_";
/// Flags read from the command line only, by subcommand: a one-off check (`--dry-run`) must
/// not become a setting a DaemonSet leaves behind, and the demo's and the copier's names would
/// be ambiguous as variables.
const COMMAND_LINE_ONLY: &[(&str, &str)] = &[
    ("server", "dry_run"),
    ("dev", "port"),
    ("copy-credentials", "file"),
    ("copy-credentials", "interval"),
    ("audit", "access_key_id"),
    ("audit", "pod_uid"),
    ("audit", "namespace"),
];

// Defaults that are also read outside the command line (`Config::default` for tests and the
// demo, `RequestLimits::default`, the listeners' own defaults). Each is written here once and
// given to clap, so `--help`, the daemon and the tests cannot drift apart.

/// Rotated audit logs kept by default (the contract's 5).
pub const DEFAULT_AUDIT_LOG_MAX_FILES: u64 = 5;
/// An audit log smaller than a few records would rotate at every write.
const MIN_AUDIT_LOG_SIZE: u64 = 4 << 10;
/// A node's disk, not a bound anyone needs: 1 TiB.
const MAX_AUDIT_LOG_SIZE: u64 = 1 << 40;
/// Rotated files: each is renamed at every rotation, so thousands would make rotation slow.
const MAX_AUDIT_LOG_FILES: u64 = 1000;

/// Cached entries: a node rarely runs more than a few hundred pods.
pub const DEFAULT_MAX_CACHE_SIZE: u64 = 2000;
/// Longest time credentials are served before being fetched again (upstream's default).
pub const DEFAULT_MAX_RETENTION: Duration = Duration::from_secs(3 * 3600);
/// Background refresh budget, calls per second (upstream's default).
pub const DEFAULT_MAX_SERVICE_QPS: f64 = 3.0;
/// Upstream calls in flight at once.
pub const DEFAULT_MAX_UPSTREAM_CONCURRENCY: usize = 32;
/// One SDK retries at most 4 times per fetch; 100/s with a burst of 1000 leaves room for a
/// pod whose hundreds of processes start at once.
pub const DEFAULT_CALLER_RATE_LIMIT: f64 = 100.0;
pub const DEFAULT_CALLER_BURST: f64 = 1000.0;
/// The global bucket bounds the agent's CPU, not any pod.
pub const DEFAULT_GLOBAL_RATE_LIMIT: f64 = 5000.0;
pub const DEFAULT_GLOBAL_BURST: f64 = 5000.0;
/// Open connections per credentials listener. An SDK keeps at most a few per process; 8192
/// covers a node full of pods, and takes 32 sources at their own cap to fill, while bounding
/// the agent's file descriptors and memory (the idle timeout frees slots of clients that went
/// quiet, and a full listener reclaims idle ones for new clients).
pub const DEFAULT_MAX_CONNECTIONS: usize = 8192;
/// A client that has not sent a whole header section this long after connecting, or after
/// its last response, is disconnected (the contract's 30 s).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long each watch of the node's pods runs before the API server ends it and the watcher
/// starts the next (kube's own default, under the API server's minimum request timeout).
pub const DEFAULT_POD_WATCH_TIMEOUT: Duration = Duration::from_secs(290);
/// Connections one source address may hold on a credentials listener: an SDK keeps one or two
/// per process, so this leaves room for a pod that starts a couple of hundred processes at
/// once, while it takes 32 sources to fill [`DEFAULT_MAX_CONNECTIONS`], not a handful
/// (hostNetwork pods share the node's address, and this cap).
pub const DEFAULT_MAX_CONNECTIONS_PER_SOURCE: usize = 256;
/// How long a response may wait for the client to take it: an answer is under 2 KiB, so only
/// a client that stopped reading (pipelining without reading) waits this long.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// The metrics and probe listeners serve Prometheus and the kubelet, a handful of connections;
/// they are reachable from every pod (metrics on 0.0.0.0 in the host network), so they get
/// small limits of their own.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;
pub const ADMIN_MAX_CONNECTIONS_PER_SOURCE: usize = 8;

#[derive(Debug, Parser)]
#[command(
    name = "pod-identity-agent",
    version,
    about = "Node-local AWS credential agent for Kubernetes pods"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log level by the upstream agent's names (panic, fatal, error, warn, info, debug,
    /// trace); overrides --log-level. Accepted before or after the subcommand.
    #[arg(short = 'v', long, global = true, value_enum)]
    pub verbosity: Option<Verbosity>,
}

impl Cli {
    /// Parse `argv` (the program's name first), each flag also read from its environment
    /// variable as [`ENV_PREFIX`] says.
    pub fn try_parse_with_env<I, T>(argv: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Cli::command_with_env().try_get_matches_from(argv)?;
        <Cli as clap::FromArgMatches>::from_arg_matches(&matches)
    }

    /// The command line as clap sees it, every flag given its environment variable.
    pub fn command_with_env() -> clap::Command {
        <Cli as clap::CommandFactory>::command().mut_subcommands(|sub| {
            let name = sub.get_name().to_owned();
            sub.mut_args(|arg| with_env(&name, arg))
        })
    }
}

fn with_env(subcommand: &str, arg: clap::Arg) -> clap::Arg {
    let id = arg.get_id().as_str();
    if arg.get_env().is_some()
        || arg.get_long().is_none()
        || COMMAND_LINE_ONLY.contains(&(subcommand, id))
    {
        return arg;
    }
    let name = format!("{ENV_PREFIX}{}", id.to_ascii_uppercase());
    arg.env(name)
}

/// The upstream agent's `-v/--verbosity` levels (logrus names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Verbosity {
    Panic,
    Fatal,
    Error,
    #[value(alias = "warning")]
    Warn,
    Info,
    Debug,
    Trace,
}

impl Verbosity {
    /// The log filter it stands for: this agent never panics or exits on purpose through a
    /// log call, so `panic` and `fatal` show errors only.
    pub fn filter(self) -> &'static str {
        match self {
            Verbosity::Panic | Verbosity::Fatal | Verbosity::Error => "error",
            Verbosity::Warn => "warn",
            Verbosity::Info => "info",
            Verbosity::Debug => "debug",
            Verbosity::Trace => "trace",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve pod credentials (the daemon).
    Server(Box<ServerArgs>),
    /// Create the link-local link and addresses the server binds to.
    Initialize(InitializeArgs),
    /// Self-contained demo: generated key, token file, in-process EKS Auth stand-in.
    Dev(DevArgs),
    /// Print the version and exit.
    Version,
    /// Keep non-root-readable copies of the node's AWS credential files (hybrid nodes' sidecar).
    CopyCredentials(CopyArgs),
    /// Ask one agent process, through its --probe-socket, whether it is healthy or ready
    /// (exit 0) or not (exit 1): the kubelet's exec probe.
    Probe(ProbeArgs),
    /// Print the audit log's records that match, rotated files included, oldest first: from
    /// an access key ID seen in CloudTrail to the pods that held it.
    Audit(AuditArgs),
}

/// `pod-identity-agent audit PATH [--access-key-id ID] [--pod-uid UID] [--namespace NS]`.
#[derive(Debug, Clone, clap::Args)]
pub struct AuditArgs {
    /// The agent's --audit-log.
    pub path: PathBuf,
    /// Only records of this access key ID.
    #[arg(long)]
    pub access_key_id: Option<String>,
    /// Only records of this pod UID.
    #[arg(long)]
    pub pod_uid: Option<String>,
    /// Only records of this namespace.
    #[arg(long)]
    pub namespace: Option<String>,
}

/// `pod-identity-agent probe SOCKET [PATH]`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProbeArgs {
    /// The agent's --probe-socket.
    pub socket: PathBuf,
    /// What to ask.
    #[arg(default_value = "/readyz", value_parser = ["/readyz", "/healthz"])]
    pub path: String,
}

#[derive(Debug, Clone, clap::Args)]
pub struct CopyArgs {
    /// Directory holding the node's files.
    #[arg(
        long,
        env = "POD_IDENTITY_AGENT_COPY_FROM",
        default_value = "/eks-hybrid/.aws"
    )]
    pub from: PathBuf,
    /// Directory to keep the copies in (a volume shared with the server).
    #[arg(long, env = "POD_IDENTITY_AGENT_COPY_TO")]
    pub to: PathBuf,
    /// Files to copy; comma-separated or repeated.
    #[arg(long, value_delimiter = ',', default_value = "credentials,config")]
    pub file: Vec<String>,
    /// How often the files are checked for changes.
    #[arg(long, default_value = "30s")]
    pub interval: humantime::Duration,
    #[command(flatten)]
    pub log: LogArgs,
}

impl CopyArgs {
    /// The file names and the interval checked: at most an hour, as the server's
    /// `--rotate-credentials-interval`.
    pub fn checked_interval(&self) -> Result<Duration, ConfigError> {
        if self.file.iter().any(|f| f.is_empty() || f.contains('/')) {
            return Err(bad("file", "names of files in --from, without slashes"));
        }
        let interval: Duration = self.interval.into();
        duration_within("interval", interval, MIN_COPY_INTERVAL, MAX_POLL_INTERVAL)?;
        Ok(interval)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CacheScope {
    /// One entry per pod (namespace, service account, pod UID).
    Pod,
    /// One entry per association (namespace, service account), shared by its pods.
    Association,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    EksAuth,
    Sts,
}

/// `--caller-attestation` as written: what a caller must prove besides holding a valid token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum AttestationMode {
    /// Nothing: a token is a bearer credential.
    #[default]
    Off,
    /// The token's pod is a live pod of this node and the connection comes from it.
    Pod,
}

/// Caller attestation as configured. Attesting needs the node whose pods are watched, so the
/// node is part of the one value that turns it on: no other setting can leave it half on,
/// or switch it off by being absent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CallerAttestation {
    /// Nothing: a token is a bearer credential.
    #[default]
    Off,
    /// A token is served only to its own pod, a live pod of `node` calling from its address.
    Pod {
        /// This node (`--node-name`), whose pods are watched.
        node: String,
    },
}

impl CallerAttestation {
    /// Attestation is on.
    pub fn is_on(&self) -> bool {
        matches!(self, CallerAttestation::Pod { .. })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, value_enum, default_value = "json")]
    pub log_format: LogFormat,
    /// Log filter in `RUST_LOG` syntax, e.g. `info` or `info,pod_identity_agent=debug`.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Cluster name sent to EKS Auth (required for the eks-auth backend).
    #[arg(short = 'c', long)]
    pub cluster_name: Option<String>,
    /// Credentials port.
    #[arg(short = 'p', long, default_value_t = 80)]
    pub port: u16,
    /// Addresses to serve credentials on (IPv6 in brackets); comma-separated or repeated.
    #[arg(short = 'b', long, value_delimiter = ',', default_value = DEFAULT_BIND_HOSTS)]
    pub bind_hosts: Vec<String>,
    /// Port of /healthz and /readyz.
    #[arg(long, default_value_t = 2703)]
    pub probe_port: u16,
    /// Address of /healthz and /readyz.
    #[arg(long, default_value = "127.0.0.1")]
    pub probe_address: IpAddr,
    /// Address of the Prometheus /metrics listener.
    #[arg(long, default_value = "0.0.0.0")]
    pub metrics_address: IpAddr,
    /// Port of the Prometheus /metrics listener.
    #[arg(long, default_value_t = 2705)]
    pub metrics_port: u16,
    /// EKS Auth endpoint override (URL).
    #[arg(long)]
    pub endpoint: Option<String>,
    /// AWS region (default: AWS_REGION, the shared config, then instance metadata).
    #[arg(long, env = "AWS_REGION")]
    pub region: Option<String>,
    /// JWKS file for local token verification (re-read when it changes).
    #[arg(long)]
    pub jwks_file: Option<PathBuf>,
    /// JWKS URL for local token verification (polled, and re-fetched on an unknown key id).
    #[arg(long)]
    pub jwks_url: Option<String>,
    /// Expected token issuer; also the key source (OIDC discovery) when no JWKS flag is given.
    #[arg(long)]
    pub issuer: Option<String>,
    /// Accepted token audiences; a token must carry at least one. Comma-separated or repeated.
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_AUDIENCE)]
    pub audience: Vec<String>,
    /// Cache key: per pod, or per association (namespace/service account).
    #[arg(long, value_enum, default_value = "pod")]
    pub cache_scope: CacheScope,
    /// Maximum number of cached entries (0: no caching; concurrent requests still share a call).
    #[arg(long, default_value_t = DEFAULT_MAX_CACHE_SIZE)]
    pub max_cache_size: u64,
    /// Longest time cached credentials are served before they are fetched again (0: no caching).
    #[arg(long, default_value_t = DEFAULT_MAX_RETENTION.into())]
    pub max_credential_retention_before_renewal: humantime::Duration,
    /// Background refresh budget to the upstream, in calls per second (0 or less: the default).
    #[arg(long, default_value_t = DEFAULT_MAX_SERVICE_QPS)]
    pub max_service_qps: f64,
    /// Upstream calls in flight at once (request-path and refresh together).
    #[arg(long, default_value_t = DEFAULT_MAX_UPSTREAM_CONCURRENCY)]
    pub max_upstream_concurrency: usize,
    /// Requests per second allowed from one client IP (0: no per-caller limit).
    #[arg(long, default_value_t = DEFAULT_CALLER_RATE_LIMIT)]
    pub caller_rate_limit: f64,
    /// Burst allowed from one client IP above its rate.
    #[arg(long, default_value_t = DEFAULT_CALLER_BURST)]
    pub caller_burst: f64,
    /// Requests per second allowed from all clients together (0: no global limit).
    #[arg(long, default_value_t = DEFAULT_GLOBAL_RATE_LIMIT)]
    pub global_rate_limit: f64,
    /// Burst allowed from all clients together above the global rate.
    #[arg(long, default_value_t = DEFAULT_GLOBAL_BURST)]
    pub global_burst: f64,
    /// Open connections allowed per credentials listener; above it a new connection gets 503.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// How long a connection may go without sending a complete request header section: a
    /// slow client mid-request, or an idle keep-alive connection between requests. Hidden:
    /// the default suits production; tests shorten it instead of waiting.
    #[arg(long, default_value_t = DEFAULT_IDLE_TIMEOUT.into(), hide = true)]
    pub idle_timeout: humantime::Duration,
    /// Open connections allowed from one source address per credentials listener.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS_PER_SOURCE)]
    pub max_connections_per_source: usize,
    /// How long a response may wait for the client to read it before the connection is closed.
    #[arg(long, default_value_t = DEFAULT_SEND_TIMEOUT.into())]
    pub send_timeout: humantime::Duration,
    /// Credential source.
    #[arg(long, value_enum, default_value = "eks-auth")]
    pub backend: BackendKind,
    /// Associations file (sts backend).
    #[arg(long)]
    pub associations: Option<PathBuf>,
    /// STS endpoint override (sts backend).
    #[arg(long)]
    pub sts_endpoint: Option<String>,
    /// Re-read the agent's own shared credentials file periodically (hybrid nodes).
    #[arg(long)]
    pub rotate_credentials: bool,
    /// This node's name (the DaemonSet sets it from `spec.nodeName`): a token whose
    /// `kubernetes.io.node.name` names another node is refused.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Also refuse tokens without a node claim (clusters before Kubernetes 1.30 issue those).
    #[arg(long)]
    pub require_node_claim: bool,
    /// `pod`: serve a token only to its own pod, a running pod of this node calling from one
    /// of its IPs (the node's pods come from the Kubernetes API; needs --node-name).
    #[arg(long, value_enum, default_value = "off")]
    pub caller_attestation: AttestationMode,
    /// How long each watch of the node's pods runs before it is renewed (tests shorten it to
    /// run an hour of renewals in seconds).
    #[arg(long, default_value_t = DEFAULT_POD_WATCH_TIMEOUT.into(), hide = true)]
    pub pod_watch_timeout: humantime::Duration,
    /// Taint key to remove from this node once the agent is ready (the manifests set
    /// `pod-identity-agent/not-ready`): workload pods wait for the agent instead of failing.
    /// Needs --node-name and a Kubernetes API server.
    #[arg(long)]
    pub startup_taint: Option<String>,
    /// Unix socket for upgrades without a gap (the manifests set
    /// `/run/pod-identity-agent/handoff.sock`): a starting agent takes the running one's
    /// listeners and state through it, then listens on it for the next one.
    #[arg(long)]
    pub handoff_socket: Option<PathBuf>,
    /// Unix socket that answers `/healthz` and `/readyz` for this process alone (the manifests
    /// set one in a per-pod emptyDir, asked by `pod-identity-agent probe`): during a handoff
    /// two agents share the probe port, and a probe of that port could be answered by the
    /// other one.
    #[arg(long)]
    pub probe_socket: Option<PathBuf>,
    /// Append one JSON line to this file for each first delivery of an access key to a pod
    /// (who received which credentials, for an investigation that starts from CloudTrail).
    /// Needs local verification.
    #[arg(long)]
    pub audit_log: Option<PathBuf>,
    /// Size past which the audit log is rotated: bytes, or with `KiB`, `MiB` or `GiB`.
    #[arg(long, default_value = "100MiB")]
    pub audit_log_max_size: String,
    /// Rotated audit logs kept (`PATH.1` newest ... `PATH.N` oldest).
    #[arg(long, default_value_t = DEFAULT_AUDIT_LOG_MAX_FILES)]
    pub audit_log_max_files: u64,
    /// Accept verification keys over plain http from addresses other than loopback (a key
    /// injected on the way forges any pod's identity). Logged at start and exported.
    #[arg(long)]
    pub allow_insecure_key_source: bool,
    /// How often --rotate-credentials re-reads the shared credentials file.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1m")]
    pub rotate_credentials_interval: Duration,
    /// Check the flags and exit: 0 if valid, 64 naming the flag if not. Nothing is bound or read.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct InitializeArgs {
    /// Link to create (a `dummy` link; `lo` is used where the kernel has no dummy driver).
    #[arg(long, default_value = "pod-id-link0")]
    pub link_name: String,
    /// Addresses with prefix length; comma-separated or repeated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "169.254.170.23/32,fd00:ec2::23/128"
    )]
    pub addresses: Vec<String>,
    /// Directories the server needs on the node (the handoff socket's), created if missing
    /// and given to --runtime-dir-owner alone (mode 0700); comma-separated or repeated.
    #[arg(long, value_delimiter = ',')]
    pub runtime_dir: Vec<PathBuf>,
    /// `UID:GID` the --runtime-dir directories belong to: the server's user.
    #[arg(long, value_parser = parse_owner, requires = "runtime_dir")]
    pub runtime_dir_owner: Option<(u32, u32)>,
    #[command(flatten)]
    pub log: LogArgs,
}

/// `UID:GID`, both numeric.
fn parse_owner(value: &str) -> Result<(u32, u32), String> {
    let (uid, gid) = value
        .split_once(':')
        .ok_or_else(|| format!("'{value}' is not UID:GID"))?;
    let id = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| format!("'{s}' in '{value}' is not a numeric id"))
    };
    Ok((id(uid)?, id(gid)?))
}

#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Credentials port for the demo (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    #[command(flatten)]
    pub log: LogArgs,
}

/// Where the verification keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    File(PathBuf),
    Url(Uri),
    /// OIDC discovery from the issuer.
    Discovery(Uri),
    /// The Kubernetes API server the agent's client finds (`KUBECONFIG`, or the pod's
    /// service account): `/.well-known/openid-configuration` and `/openid/v1/jwks`.
    KubernetesApi,
}

/// What validation reads of the process's surroundings besides the flags: taken once, in
/// `main`, and passed in, so that the same flags validate the same way in a test whatever the
/// machine running it has set (a developer's `KUBECONFIG`, say).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Environment {
    /// The environment names a Kubernetes API server, as `kube::Config::infer` looks for
    /// one: `KUBECONFIG`, or the variables and service-account mount of a pod.
    pub kubernetes_api: bool,
}

impl Environment {
    /// The running process's environment and filesystem.
    pub fn of_process() -> Environment {
        let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
        Environment {
            kubernetes_api: set("KUBECONFIG")
                || (set("KUBERNETES_SERVICE_HOST")
                    && Path::new("/var/run/secrets/kubernetes.io/serviceaccount/token").is_file()),
        }
    }
}

/// Static credentials for the agent's own upstream calls, used by `dev` only; the daemon takes
/// its credentials from the AWS SDK's default chain.
#[derive(Clone)]
pub struct StaticUpstreamCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl std::fmt::Debug for StaticUpstreamCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticUpstreamCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"** redacted **")
            .finish()
    }
}

/// Validated server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the credentials come from.
    pub upstream: UpstreamConfig,
    /// Where verification keys come from; `None` sends tokens upstream unverified.
    pub key_source: Option<KeySource>,
    /// Keys may come over plain http from anywhere, not only from loopback.
    pub allow_insecure_key_source: bool,
    /// The issuer a token must name.
    pub issuer: Option<String>,
    /// Refuse tokens that name no node at all.
    pub require_node_claim: bool,
    /// A token must carry at least one of these audiences.
    pub audiences: Vec<String>,
    /// What a caller must prove besides holding a valid token.
    pub caller_attestation: CallerAttestation,
    /// This node's name: tokens bound to another node are refused.
    pub node_name: Option<String>,
    /// How long each watch of the node's pods runs before it is renewed.
    pub pod_watch_timeout: Duration,
    /// `--startup-taint`: the taint key removed from this node once the agent is ready.
    pub startup_taint: Option<String>,
    /// `--handoff-socket`: where listeners and state pass from one agent to the next.
    pub handoff_socket: Option<PathBuf>,
    /// `--probe-socket`: where this process alone answers its probes.
    pub probe_socket: Option<PathBuf>,
    /// `--audit-log`: where first deliveries of credentials to pods are recorded.
    pub audit: Option<AuditConfig>,
    /// Where the agent listens, and what its credentials listeners allow.
    pub listen: ListenConfig,
    /// What a cache entry is kept for: each pod, or each association.
    pub cache_scope: CacheScope,
    /// Cached entries at most (0: no caching).
    pub max_cache_size: u64,
    /// Longest time credentials are served before they are fetched again.
    pub max_retention: Duration,
    /// Background refresh budget, in upstream calls per second.
    pub max_service_qps: f64,
    /// Upstream calls in flight at once.
    pub max_upstream_concurrency: usize,
}

/// The audit log (`--audit-log`): its file and its rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// The file records are appended to.
    pub path: PathBuf,
    /// Past this many bytes the file is rotated.
    pub max_size: u64,
    /// Rotated files kept.
    pub max_files: u32,
}

/// Where the credentials come from, and with which of the agent's own credentials it asks.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Credential source: EKS Auth or STS.
    pub backend: BackendKind,
    /// Associations file (sts backend).
    pub associations: Option<PathBuf>,
    /// STS endpoint override, validated, without a trailing slash.
    pub sts_endpoint: Option<String>,
    /// EKS cluster name (eks-auth backend; empty for sts).
    pub cluster_name: String,
    /// EKS Auth endpoint URL, validated, without a trailing slash.
    pub endpoint: Option<String>,
    /// AWS region; `None` leaves it to the SDK's chain.
    pub region: Option<String>,
    /// The demo's credentials for its own upstream calls; the daemon uses the SDK's chain.
    pub static_upstream_credentials: Option<StaticUpstreamCredentials>,
    /// Re-read the shared credentials file this often (hybrid nodes), instead of the SDK chain.
    pub rotate_credentials: Option<Duration>,
}

/// The listeners, and what a credentials listener allows its clients.
#[derive(Debug, Clone)]
pub struct ListenConfig {
    /// Where pods ask for credentials: every bind host on the credentials port.
    pub credential_listeners: Vec<SocketAddr>,
    /// Where the kubelet asks for /healthz and /readyz.
    pub probe_listener: SocketAddr,
    /// Where Prometheus scrapes /metrics.
    pub metrics_listener: SocketAddr,
    /// Open connections per credentials listener.
    pub max_connections: usize,
    /// Open connections one source address may hold per credentials listener.
    pub max_connections_per_source: usize,
    /// Header read timeout, which is also how long an idle keep-alive connection is kept.
    pub idle_timeout: Duration,
    /// How long an answer may wait for its client to read it.
    pub send_timeout: Duration,
    /// Request rates per caller and for the node.
    pub limits: RequestLimits,
}

/// Request limits of the credentials port (a rate of 0 disables that limit).
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Requests per second from one client address.
    pub caller_rate: f64,
    /// Burst from one client address above its rate.
    pub caller_burst: f64,
    /// Requests per second from all clients together.
    pub global_rate: f64,
    /// Burst from all clients together above the global rate.
    pub global_burst: f64,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            caller_rate: DEFAULT_CALLER_RATE_LIMIT,
            caller_burst: DEFAULT_CALLER_BURST,
            global_rate: DEFAULT_GLOBAL_RATE_LIMIT,
            global_burst: DEFAULT_GLOBAL_BURST,
        }
    }
}

/// A configuration error: the flag and what is wrong with its value.
#[derive(Debug, thiserror::Error)]
#[error("--{flag}: {message}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub message: String,
}

impl ConfigError {
    pub fn new(flag: &'static str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            flag,
            message: message.into(),
        }
    }
}

fn bad(flag: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::new(flag, message)
}

impl ServerArgs {
    /// Every flag checked, group by group, into a [`Config`]; the first bad flag is the error.
    pub fn into_config(self, env: &Environment) -> Result<Config, ConfigError> {
        let upstream = self.upstream(env)?;
        let listen = self.listen()?;
        let (key_source, issuer) = self.keys(env)?;
        let audiences = self.audiences()?;
        let (node_name, pod_watch_timeout) = self.node()?;
        let caller_attestation =
            match (self.caller_attestation, &node_name) {
                (AttestationMode::Off, _) => CallerAttestation::Off,
                (AttestationMode::Pod, Some(node)) => CallerAttestation::Pod { node: node.clone() },
                (AttestationMode::Pod, None) => return Err(bad(
                    "caller-attestation",
                    "pod needs --node-name (env NODE_NAME): the agent watches the pods of its node",
                )),
            };
        let startup_taint = self.startup_taint(env, node_name.is_some())?;
        let handoff_socket = socket_path("handoff-socket", self.handoff_socket.as_deref())?;
        let probe_socket = socket_path("probe-socket", self.probe_socket.as_deref())?;
        if probe_socket.is_some() && probe_socket == handoff_socket {
            return Err(bad("probe-socket", "must not be the --handoff-socket path"));
        }
        let audit = self.audit(key_source.is_some())?;
        let max_service_qps = self.upstream_budget()?;
        let (max_cache_size, max_retention) = self.cache_bounds()?;
        Ok(Config {
            upstream,
            key_source,
            allow_insecure_key_source: self.allow_insecure_key_source,
            issuer,
            require_node_claim: self.require_node_claim,
            audiences,
            caller_attestation,
            node_name,
            pod_watch_timeout,
            startup_taint,
            handoff_socket,
            probe_socket,
            audit,
            listen,
            cache_scope: self.cache_scope,
            max_cache_size,
            max_retention,
            max_service_qps,
            max_upstream_concurrency: self.max_upstream_concurrency,
        })
    }

    /// The backend and what it needs: a cluster name (eks-auth) or an associations file and
    /// local verification (sts), endpoints, region, the agent's own credentials.
    fn upstream(&self, env: &Environment) -> Result<UpstreamConfig, ConfigError> {
        if self.rotate_credentials && self.backend == BackendKind::Sts {
            return Err(bad(
                "rotate-credentials",
                "the sts backend uses no credentials of its own",
            ));
        }
        duration_within(
            "rotate-credentials-interval",
            self.rotate_credentials_interval,
            MIN_POLL_INTERVAL,
            MAX_POLL_INTERVAL,
        )?;
        let (cluster_name, associations, sts_endpoint) = match self.backend {
            BackendKind::EksAuth => {
                if self.associations.is_some() {
                    return Err(bad("associations", "only used with --backend sts"));
                }
                if self.sts_endpoint.is_some() {
                    return Err(bad("sts-endpoint", "only used with --backend sts"));
                }
                let name = self
                    .cluster_name
                    .clone()
                    .ok_or_else(|| bad("cluster-name", "required for the eks-auth backend"))?;
                validate_cluster_name(&name)?;
                (name, None, None)
            }
            BackendKind::Sts => {
                let path = self
                    .associations
                    .clone()
                    .ok_or_else(|| bad("associations", "required for the sts backend"))?;
                if self.jwks_file.is_none()
                    && self.jwks_url.is_none()
                    && self.issuer.is_none()
                    && !env.kubernetes_api
                {
                    return Err(bad(
                        "backend",
                        "the sts backend needs local token verification (--jwks-file, --jwks-url or --issuer)",
                    ));
                }
                let endpoint = endpoint_url("sts-endpoint", self.sts_endpoint.as_deref())?;
                (
                    self.cluster_name.clone().unwrap_or_default(),
                    Some(path),
                    endpoint,
                )
            }
        };
        if let Some(region) = &self.region {
            let valid = !region.is_empty()
                && region.len() <= 64
                && region
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            if !valid {
                return Err(bad("region", format!("'{region}' is not a region name")));
            }
        }
        Ok(UpstreamConfig {
            backend: self.backend,
            associations,
            sts_endpoint,
            cluster_name,
            endpoint: endpoint_url("endpoint", self.endpoint.as_deref())?,
            region: self.region.clone(),
            static_upstream_credentials: None,
            rotate_credentials: self
                .rotate_credentials
                .then_some(self.rotate_credentials_interval),
        })
    }

    /// The listeners, their connection limits and timeouts, and the request rate limits.
    fn listen(&self) -> Result<ListenConfig, ConfigError> {
        let mut credential_listeners = Vec::new();
        for host in self
            .bind_hosts
            .iter()
            .map(|h| h.trim())
            .filter(|h| !h.is_empty())
        {
            let ip = parse_bind_host(host).ok_or_else(|| {
                bad(
                    "bind-hosts",
                    format!("'{host}' is not an IPv4 address or a bracketed IPv6 address"),
                )
            })?;
            let addr = SocketAddr::new(ip, self.port);
            if !credential_listeners.contains(&addr) {
                credential_listeners.push(addr);
            }
        }
        if credential_listeners.is_empty() {
            return Err(bad("bind-hosts", "at least one address is required"));
        }
        count_within(
            "max-connections",
            self.max_connections as u64,
            1,
            MAX_CONNECTIONS_LIMIT as u64,
        )?;
        count_within(
            "max-connections-per-source",
            self.max_connections_per_source as u64,
            1,
            MAX_CONNECTIONS_LIMIT as u64,
        )?;
        let idle_timeout: Duration = self.idle_timeout.into();
        duration_within(
            "idle-timeout",
            idle_timeout,
            MIN_IDLE_TIMEOUT,
            MAX_IDLE_TIMEOUT,
        )?;
        let send_timeout: Duration = self.send_timeout.into();
        duration_within(
            "send-timeout",
            send_timeout,
            MIN_IDLE_TIMEOUT,
            MAX_IDLE_TIMEOUT,
        )?;
        for (rate_flag, rate, burst_flag, burst) in [
            (
                "caller-rate-limit",
                self.caller_rate_limit,
                "caller-burst",
                self.caller_burst,
            ),
            (
                "global-rate-limit",
                self.global_rate_limit,
                "global-burst",
                self.global_burst,
            ),
        ] {
            rate_within(
                rate_flag,
                rate,
                MIN_REQUEST_RATE,
                MAX_REQUEST_RATE,
                "0 (no limit)",
            )?;
            let min_burst = if rate > 0.0 { 1.0 } else { 0.0 };
            if !(burst.is_finite() && (min_burst..=MAX_REQUEST_RATE).contains(&burst)) {
                return Err(bad(
                    burst_flag,
                    format!(
                        "must be between {min_burst} and {MAX_REQUEST_RATE} (at least 1 while --{rate_flag} is on)"
                    ),
                ));
            }
        }
        Ok(ListenConfig {
            credential_listeners,
            probe_listener: SocketAddr::new(self.probe_address, self.probe_port),
            metrics_listener: SocketAddr::new(self.metrics_address, self.metrics_port),
            max_connections: self.max_connections,
            max_connections_per_source: self.max_connections_per_source,
            idle_timeout,
            send_timeout,
            limits: RequestLimits {
                caller_rate: self.caller_rate_limit,
                caller_burst: self.caller_burst,
                global_rate: self.global_rate_limit,
                global_burst: self.global_burst,
            },
        })
    }

    /// Where the verification keys come from, and the issuer a token must name.
    fn keys(&self, env: &Environment) -> Result<(Option<KeySource>, Option<String>), ConfigError> {
        let issuer = match &self.issuer {
            Some(iss) => {
                parse_http_url("issuer", iss)?;
                Some(iss.clone())
            }
            None => None,
        };
        let secure = |flag: &'static str, uri: Uri| -> Result<Uri, ConfigError> {
            if uri.scheme_str() == Some("http")
                && !is_loopback_host(uri.host().unwrap_or_default())
                && !self.allow_insecure_key_source
                && defence::on(Defence::SecureKeySource)
            {
                return Err(bad(
                    flag,
                    "plain http is accepted only for loopback addresses (a key injected on the way would forge any pod's identity); use https, or --allow-insecure-key-source",
                ));
            }
            Ok(uri)
        };
        let key_source = match (&self.jwks_file, &self.jwks_url) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "jwks-url",
                    "give either --jwks-file or --jwks-url, not both",
                ))
            }
            (Some(path), None) => Some(KeySource::File(path.clone())),
            (None, Some(url)) => Some(KeySource::Url(secure(
                "jwks-url",
                parse_http_url("jwks-url", url)?,
            )?)),
            (None, None) => match &issuer {
                Some(iss) => Some(KeySource::Discovery(secure(
                    "issuer",
                    parse_http_url("issuer", iss)?,
                )?)),
                // Caller attestation talks to the API server anyway: its keys come from there.
                None => (self.caller_attestation == AttestationMode::Pod || env.kubernetes_api)
                    .then_some(KeySource::KubernetesApi),
            },
        };
        if matches!(key_source, Some(KeySource::File(_) | KeySource::Url(_)))
            && issuer.is_none()
            && defence::on(Defence::IssuerRequired)
        {
            return Err(bad(
                "issuer",
                "required with --jwks-file and --jwks-url, or a token's iss is not checked at all; give the cluster's service-account issuer (the issuer field of `kubectl get --raw /.well-known/openid-configuration`)",
            ));
        }
        Ok((key_source, issuer))
    }

    /// The audiences a token may carry (at least one).
    fn audiences(&self) -> Result<Vec<String>, ConfigError> {
        let audiences: Vec<String> = self
            .audience
            .iter()
            .map(|a| a.trim().to_owned())
            .filter(|a| !a.is_empty())
            .collect();
        if audiences.is_empty() {
            return Err(bad("audience", "at least one audience is required"));
        }
        Ok(audiences)
    }

    /// This node's name, what it binds tokens to, and how often the node's pod watch renews.
    fn node(&self) -> Result<(Option<String>, Duration), ConfigError> {
        let node_name = self.node_name.clone().filter(|n| !n.is_empty());
        if let Some(name) = &node_name {
            let valid = name.len() <= 253
                && name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                });
            if !valid {
                return Err(bad(
                    "node-name",
                    format!("'{name}' is not a Kubernetes node name"),
                ));
            }
        }
        if self.require_node_claim && node_name.is_none() {
            return Err(bad(
                "require-node-claim",
                "needs --node-name (env NODE_NAME)",
            ));
        }
        let pod_watch_timeout: Duration = self.pod_watch_timeout.into();
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&pod_watch_timeout)
            || pod_watch_timeout.subsec_nanos() != 0
        {
            return Err(bad(
                "pod-watch-timeout",
                "must be whole seconds between 1s and 1h",
            ));
        }
        Ok((node_name, pod_watch_timeout))
    }

    /// `--startup-taint`: a taint key, on a node the agent knows, through an API server it can
    /// reach.
    fn startup_taint(
        &self,
        env: &Environment,
        has_node: bool,
    ) -> Result<Option<String>, ConfigError> {
        let Some(key) = self.startup_taint.as_deref().map(str::trim) else {
            return Ok(None);
        };
        if !is_taint_key(key) {
            return Err(bad(
                "startup-taint",
                format!("'{key}' is not a taint key ([prefix/]name, as a label key)"),
            ));
        }
        if !has_node {
            return Err(bad(
                "startup-taint",
                "needs --node-name (env NODE_NAME): the agent removes the taint from its own node",
            ));
        }
        if !env.kubernetes_api {
            return Err(bad(
                "startup-taint",
                "needs a Kubernetes API server (KUBECONFIG, or the pod's service account)",
            ));
        }
        Ok(Some(key.to_owned()))
    }

    /// `--audit-log` and its rotation: a file in a directory that exists, a size and a count
    /// within bounds. Records name the pod a verified token says asked, so the log needs
    /// local verification: an unverified token's claims are whatever its holder wrote.
    fn audit(&self, verifying: bool) -> Result<Option<AuditConfig>, ConfigError> {
        let max_size = parse_size(&self.audit_log_max_size).ok_or_else(|| {
            bad(
                "audit-log-max-size",
                format!(
                    "'{}' is not a size (bytes, or a number with KiB, MiB or GiB)",
                    self.audit_log_max_size
                ),
            )
        })?;
        count_within(
            "audit-log-max-size",
            max_size,
            MIN_AUDIT_LOG_SIZE,
            MAX_AUDIT_LOG_SIZE,
        )?;
        count_within(
            "audit-log-max-files",
            self.audit_log_max_files,
            1,
            MAX_AUDIT_LOG_FILES,
        )?;
        let Some(path) = &self.audit_log else {
            return Ok(None);
        };
        if path.file_name().is_none() || path.as_os_str().is_empty() {
            return Err(bad(
                "audit-log",
                format!("'{}' is not a file path", path.display()),
            ));
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(bad(
                "audit-log",
                format!("directory {} does not exist", dir.display()),
            ));
        }
        if path.is_dir() {
            return Err(bad(
                "audit-log",
                format!("{} is a directory", path.display()),
            ));
        }
        if !verifying {
            return Err(bad(
                "audit-log",
                "needs local verification (--jwks-file, --jwks-url, --issuer, or keys from the \
                 Kubernetes API): without it the agent does not know which pod asked",
            ));
        }
        Ok(Some(AuditConfig {
            path: path.clone(),
            max_size,
            max_files: self.audit_log_max_files as u32,
        }))
    }

    /// The upstream budget: the refresh rate (upstream's meaning: zero or less is the
    /// default) and the calls in flight at once.
    fn upstream_budget(&self) -> Result<f64, ConfigError> {
        let qps = self.max_service_qps;
        if !qps.is_finite() {
            return Err(bad("max-service-qps", "must be a number"));
        }
        if qps > 0.0 {
            rate_within(
                "max-service-qps",
                qps,
                MIN_SERVICE_QPS,
                MAX_SERVICE_QPS,
                "0 or less (the default)",
            )?;
        }
        count_within(
            "max-upstream-concurrency",
            self.max_upstream_concurrency as u64,
            1,
            MAX_UPSTREAM_CONCURRENCY_LIMIT,
        )?;
        Ok(if qps > 0.0 {
            qps
        } else {
            DEFAULT_MAX_SERVICE_QPS
        })
    }

    /// The cache's size bound and retention (each 0, upstream's "no caching", or in bounds).
    fn cache_bounds(&self) -> Result<(u64, Duration), ConfigError> {
        if self.max_cache_size != 0 {
            count_within(
                "max-cache-size",
                self.max_cache_size,
                1,
                MAX_CACHE_SIZE_LIMIT,
            )?;
        }
        let retention: Duration = self.max_credential_retention_before_renewal.into();
        if !retention.is_zero() {
            duration_within(
                "max-credential-retention-before-renewal",
                retention,
                MIN_RETENTION,
                MAX_RETENTION,
            )?;
        }
        Ok((self.max_cache_size, retention))
    }
}

/// `value` in `min..=max`, or an error naming the flag and its bounds.
/// A size in bytes: a number, or a number with `KiB`, `MiB` or `GiB` (also `K`, `M`, `G`,
/// `KB`...; all binary), without overflow.
fn parse_size(value: &str) -> Option<u64> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, unit) = value.split_at(split);
    let number: u64 = digits.parse().ok()?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return None,
    };
    number.checked_mul(1u64 << shift)
}

/// A Unix socket's path (`--handoff-socket`, `--probe-socket`): absolute, short enough for a
/// socket address, in a directory that exists (the manifests mount it).
fn socket_path(flag: &'static str, path: Option<&Path>) -> Result<Option<PathBuf>, ConfigError> {
    let Some(path) = path else {
        return Ok(None);
    };
    if !path.is_absolute() || path.file_name().is_none() {
        return Err(bad(
            flag,
            format!("'{}' is not an absolute file path", path.display()),
        ));
    }
    // sun_path holds 108 bytes, the terminating NUL included.
    if path.as_os_str().len() > MAX_SOCKET_PATH_BYTES {
        return Err(bad(
            flag,
            format!(
                "is longer than {MAX_SOCKET_PATH_BYTES} bytes, the most a Unix socket path may be"
            ),
        ));
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    if !dir.is_dir() {
        return Err(bad(
            flag,
            format!("directory {} does not exist", dir.display()),
        ));
    }
    Ok(Some(path.to_owned()))
}

fn count_within(flag: &'static str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(bad(
            flag,
            format!("must be between {min} and {max}, not {value}"),
        ))
    }
}

/// `value` in `min..=max`, or an error naming the flag and its bounds in humantime syntax.
fn duration_within(
    flag: &'static str,
    value: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(bad(
            flag,
            format!(
                "must be between {} and {}",
                humantime::format_duration(min),
                humantime::format_duration(max)
            ),
        ))
    }
}

/// A rate that is `0` (what `zero` says it means) or in `min..=max`: tinier positive rates
/// would put a refill of centuries on the clock, and larger ones are no limit at all.
fn rate_within(
    flag: &'static str,
    value: f64,
    min: f64,
    max: f64,
    zero: &str,
) -> Result<(), ConfigError> {
    if value == 0.0 || (value.is_finite() && (min..=max).contains(&value)) {
        Ok(())
    } else {
        Err(bad(
            flag,
            format!("must be {zero}, or between {min} and {max}"),
        ))
    }
}

/// An endpoint override given as `flag`: an http(s) URL, kept without a trailing slash.
fn endpoint_url(flag: &'static str, value: Option<&str>) -> Result<Option<String>, ConfigError> {
    value
        .map(|e| parse_http_url(flag, e).map(|_| e.trim_end_matches('/').to_owned()))
        .transpose()
}

// Bounds of the numeric and duration flags. Each value outside them is refused at start with
// the bounds in the message; inside them, no arithmetic on the clock can overflow.

/// Beyond this the limit is no limit: the process runs out of file descriptors first.
const MAX_CONNECTIONS_LIMIT: usize = 1 << 20;
/// A node runs a few hundred pods (the largest instance types allow 737); a million entries
/// is already gigabytes of credentials, so more is a typo.
const MAX_CACHE_SIZE_LIMIT: u64 = 1_000_000;
/// A Unix socket path's bytes (sun_path is 108, its NUL included).
const MAX_SOCKET_PATH_BYTES: usize = 107;
/// Below a second the cache refetches on every request in practice; use 0 for that.
const MIN_RETENTION: Duration = Duration::from_secs(1);
/// The longest AWS role session lasts 12 h, so a longer retention never takes effect;
/// anything past a day is a mistake (`3d` meant as `3h`) rather than a setting.
const MAX_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// One refresh every 100 s at the least: slower would leave a node's entries to lapse, and a
/// rate near zero would make the budget's next token centuries away.
const MIN_SERVICE_QPS: f64 = 0.01;
/// EKS Auth's and STS's own account quotas are far lower; above this the budget is no budget.
const MAX_SERVICE_QPS: f64 = 1000.0;
/// Upstream calls in flight at once: more than this is no bound on the agent's sockets.
const MAX_UPSTREAM_CONCURRENCY_LIMIT: u64 = 4096;
/// Request rate limits (per caller and global): one request per 100 s is the slowest limit
/// that still answers a pod within an SDK's retries; a million per second is no limit.
const MIN_REQUEST_RATE: f64 = 0.01;
const MAX_REQUEST_RATE: f64 = 1_000_000.0;
/// How often a file (the hybrid nodes' shared credentials) is re-read: more than once a
/// second is busy-polling, less than once an hour misses a rotation.
const MIN_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// The copier only compares two files' times and sizes per round, so it may look more often
/// (the hybrid nodes' credentials can rotate at any moment).
const MIN_COPY_INTERVAL: Duration = Duration::from_millis(100);
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(3600);
/// Shorter would cut off SDKs between two calls of one credential fetch; longer holds
/// connection slots for clients that have gone quiet.
const MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// A taint key is a qualified name, as a label key: an optional DNS-subdomain prefix and `/`,
/// then a name of 1-63 characters, alphanumerics with `-`, `_` or `.` inside.
fn is_taint_key(key: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let name_ok = (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let prefix_ok = prefix.is_none_or(|p| {
        (1..=253).contains(&p.len())
            && p.split('.').all(|label| {
                (1..=63).contains(&label.len())
                    && label.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && label.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && label
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            })
    });
    name_ok && prefix_ok
}

/// EKS cluster names: 1-100 characters, `[0-9A-Za-z][A-Za-z0-9\-_]*` (the EKS Auth model).
fn validate_cluster_name(name: &str) -> Result<(), ConfigError> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if first_ok && rest_ok && name.len() <= 100 {
        Ok(())
    } else {
        Err(bad(
            "cluster-name",
            format!("'{name}' is not a valid EKS cluster name"),
        ))
    }
}

/// `169.254.170.23` or `[fd00:ec2::23]`; a bare IPv6 address is accepted too, since it is
/// unambiguous without a port.
pub fn parse_bind_host(host: &str) -> Option<IpAddr> {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
    }
    host.parse::<IpAddr>().ok()
}

/// A host that can only be this machine: `localhost` or a loopback address literal.
pub fn is_loopback_host(host: &str) -> bool {
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || literal.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn parse_http_url(flag: &'static str, value: &str) -> Result<Uri, ConfigError> {
    let uri: Uri = value
        .parse()
        .map_err(|e| bad(flag, format!("'{value}' is not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("http") | Some("https") if uri.host().is_some() => Ok(uri),
        _ => Err(bad(flag, format!("'{value}' is not an http(s) URL"))),
    }
}

impl Default for Config {
    /// A configuration for tests and the demo: loopback only, ephemeral ports.
    fn default() -> Self {
        Config {
            upstream: UpstreamConfig::default(),
            listen: ListenConfig::default(),
            key_source: None,
            issuer: None,
            audiences: vec![DEFAULT_AUDIENCE.into()],
            allow_insecure_key_source: false,
            node_name: None,
            require_node_claim: false,
            caller_attestation: CallerAttestation::Off,
            pod_watch_timeout: DEFAULT_POD_WATCH_TIMEOUT,
            startup_taint: None,
            handoff_socket: None,
            probe_socket: None,
            audit: None,
            cache_scope: CacheScope::Pod,
            max_cache_size: DEFAULT_MAX_CACHE_SIZE,
            max_retention: DEFAULT_MAX_RETENTION,
            max_service_qps: DEFAULT_MAX_SERVICE_QPS,
            max_upstream_concurrency: DEFAULT_MAX_UPSTREAM_CONCURRENCY,
        }
    }
}

impl Default for UpstreamConfig {
    /// EKS Auth for a cluster called `dev`, the SDK's region and credentials.
    fn default() -> Self {
        UpstreamConfig {
            backend: BackendKind::EksAuth,
            associations: None,
            sts_endpoint: None,
            cluster_name: "dev".into(),
            endpoint: None,
            region: None,
            static_upstream_credentials: None,
            rotate_credentials: None,
        }
    }
}

impl ListenConfig {
    /// The credentials addresses, as text.
    pub fn credential_hosts(&self) -> Vec<String> {
        let hosts = self.credential_listeners.iter();
        hosts.map(|a| a.to_string()).collect()
    }
}

impl Default for ListenConfig {
    /// Loopback only, ephemeral ports, the flags' default limits.
    fn default() -> Self {
        let loopback = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        ListenConfig {
            credential_listeners: vec![loopback],
            probe_listener: loopback,
            metrics_listener: loopback,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_source: DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            send_timeout: DEFAULT_SEND_TIMEOUT,
            limits: RequestLimits::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["pod-identity-agent", "server"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_with_env(argv).map_err(|e| e.to_string())?;
        match cli.command {
            Command::Server(s) => s
                .into_config(&Environment::default())
                .map_err(|e| e.to_string()),
            _ => unreachable!(),
        }
    }

    #[test]
    fn every_flag_but_the_command_line_only_ones_reads_its_environment_variable() {
        let conventional = ["NODE_NAME", "AWS_REGION", "RUST_LOG"];
        let command = Cli::command_with_env();
        let mut checked = 0;
        for sub in command.get_subcommands() {
            for arg in sub.get_arguments().filter(|a| a.get_long().is_some()) {
                let id = arg.get_id().as_str();
                let env = arg.get_env().and_then(|e| e.to_str());
                if COMMAND_LINE_ONLY.contains(&(sub.get_name(), id)) {
                    assert_eq!(env, None, "{} --{id}", sub.get_name());
                    continue;
                }
                let env =
                    env.unwrap_or_else(|| panic!("{} --{id} has no variable", sub.get_name()));
                assert!(
                    env.strip_prefix(ENV_PREFIX).is_some() || conventional.contains(&env),
                    "{} --{id}: {env}",
                    sub.get_name()
                );
                checked += 1;
            }
        }
        assert!(checked > 40, "only {checked} flags");
        let server = command.find_subcommand("server").unwrap();
        let env_of = |id: &str| {
            let arg = server.get_arguments().find(|a| a.get_id() == id).unwrap();
            arg.get_env().unwrap().to_str().unwrap().to_owned()
        };
        assert_eq!(
            env_of("max_credential_retention_before_renewal"),
            "POD_IDENTITY_AGENT_MAX_CREDENTIAL_RETENTION_BEFORE_RENEWAL"
        );
        assert_eq!(env_of("node_name"), "NODE_NAME");
    }

    #[test]
    fn defaults_bind_both_link_local_addresses() {
        let cfg = parse(&["-c", "prod"]).unwrap();
        let hosts = cfg.listen.credential_hosts();
        assert_eq!(hosts, ["169.254.170.23:80", "[fd00:ec2::23]:80"]);
        assert_eq!(cfg.audiences, [DEFAULT_AUDIENCE]);
        assert_eq!(cfg.cache_scope, CacheScope::Pod);
        assert_eq!(cfg.max_retention, Duration::from_secs(3 * 3600));
        assert!(cfg.key_source.is_none());
        // The contract's 30 s for unfinished or idle connections; black-box tests shorten it.
        assert_eq!(cfg.listen.idle_timeout, Duration::from_secs(30));
    }

    #[test]
    fn bind_hosts_repeated_and_comma_separated() {
        let cfg = parse(&[
            "-c",
            "x",
            "-b",
            "127.0.0.1,[::1]",
            "-b",
            "10.0.0.1",
            "-p",
            "8080",
        ])
        .unwrap();
        let hosts = cfg.listen.credential_hosts();
        assert_eq!(hosts, ["127.0.0.1:8080", "[::1]:8080", "10.0.0.1:8080"]);
    }

    #[test]
    fn errors_name_the_flag() {
        for (args, flag) in [
            (vec!["-b", "localhost", "-c", "x"], "--bind-hosts"),
            (vec![], "--cluster-name"),
            (vec!["-c", "-bad"], "--cluster-name"),
            (vec!["-c", "x", "--endpoint", "ftp://x"], "--endpoint"),
            (vec!["-c", "x", "--jwks-url", "not a url"], "--jwks-url"),
            (
                vec!["-c", "x", "--max-cache-size", "lots"],
                "--max-cache-size",
            ),
            (vec!["-c", "x", "--backend", "sts"], "--associations"),
            (
                vec!["--backend", "sts", "--associations", "/a.yaml"],
                "--backend",
            ),
            (
                vec!["-c", "x", "--associations", "/a.yaml"],
                "--associations",
            ),
            (
                vec![
                    "--backend",
                    "sts",
                    "--associations",
                    "/a",
                    "--jwks-file",
                    "/k",
                    "--sts-endpoint",
                    "x",
                ],
                "--sts-endpoint",
            ),
            (vec!["-c", "x", "--audience", ","], "--audience"),
            (vec!["-c", "x", "--region", "US East"], "--region"),
            (
                vec!["-c", "x", "--max-service-qps", "NaN"],
                "--max-service-qps",
            ),
        ] {
            let err = parse(&args).unwrap_err();
            assert!(err.contains(flag), "{args:?}: {err}");
        }
    }

    #[test]
    fn clap_type_errors_name_the_flag() {
        for (args, flag) in [
            (vec!["-c", "x", "--port", "http"], "--port"),
            (vec!["-c", "x", "--cache-scope", "node"], "--cache-scope"),
            (
                vec![
                    "-c",
                    "x",
                    "--max-credential-retention-before-renewal",
                    "soon",
                ],
                "--max-credential-retention-before-renewal",
            ),
        ] {
            let err = parse(&args).unwrap_err();
            let first = err.lines().next().unwrap_or_default();
            assert!(first.contains(flag), "{args:?}: {first}");
        }
    }

    #[test]
    fn issuer_alone_is_discovery() {
        let cfg = parse(&["-c", "x", "--issuer", "https://oidc.example/id/1"]).unwrap();
        assert!(matches!(cfg.key_source, Some(KeySource::Discovery(_))));
        let cfg = parse(&["-c", "x", "--issuer", "https://i", "--jwks-file", "/k.json"]).unwrap();
        assert_eq!(cfg.key_source, Some(KeySource::File("/k.json".into())));
        assert_eq!(cfg.issuer.as_deref(), Some("https://i"));
    }

    #[test]
    fn sts_backend_needs_no_cluster_name() {
        let cfg = parse(&[
            "--backend",
            "sts",
            "--associations",
            "/a.yaml",
            "--jwks-file",
            "/k.json",
            "--issuer",
            "https://i",
        ])
        .unwrap();
        assert_eq!(cfg.upstream.backend, BackendKind::Sts);
        assert_eq!(
            cfg.upstream.associations.as_deref(),
            Some(std::path::Path::new("/a.yaml"))
        );
    }

    #[test]
    fn the_environment_is_an_explicit_snapshot() {
        // Nothing of the machine running the test leaks in: only the snapshot says whether
        // a Kubernetes API server is at hand.
        let cli = |args: &[&str]| {
            let mut argv = vec!["pod-identity-agent", "server"];
            argv.extend_from_slice(args);
            match Cli::try_parse_with_env(argv).unwrap().command {
                Command::Server(s) => s,
                _ => unreachable!(),
            }
        };
        let in_cluster = Environment {
            kubernetes_api: true,
        };
        let cfg = cli(&["-c", "x"]).into_config(&in_cluster).unwrap();
        assert_eq!(cfg.key_source, Some(KeySource::KubernetesApi));
        let cfg = cli(&["-c", "x"])
            .into_config(&Environment::default())
            .unwrap();
        assert_eq!(cfg.key_source, None);
        let sts = ["--backend", "sts", "--associations", "/a.yaml"];
        assert!(cli(&sts).into_config(&in_cluster).is_ok());
        assert!(cli(&sts).into_config(&Environment::default()).is_err());
    }

    #[test]
    fn out_of_bounds_values_name_the_flag_and_its_bounds() {
        for (args, message) in [
            (
                vec!["--max-credential-retention-before-renewal", "300000000000y"],
                "--max-credential-retention-before-renewal: must be between 1s and 1day",
            ),
            (
                vec!["--max-service-qps", "1e-30"],
                "--max-service-qps: must be 0 or less (the default), or between 0.01 and 1000",
            ),
            (
                vec!["--max-cache-size", "18446744073709551615"],
                "--max-cache-size: must be between 1 and 1000000, not 18446744073709551615",
            ),
            (
                vec!["--caller-rate-limit", "1e-19"],
                "--caller-rate-limit: must be 0 (no limit), or between 0.01 and 1000000",
            ),
            (
                vec!["--global-burst", "0.5"],
                "--global-burst: must be between 1 and 1000000",
            ),
            (
                vec!["--rotate-credentials-interval", "2h"],
                "--rotate-credentials-interval: must be between 1s and 1h",
            ),
        ] {
            let mut all = vec!["-c", "x"];
            all.extend(args.iter());
            let err = parse(&all).unwrap_err();
            assert!(err.starts_with(message), "{args:?}: {err}");
        }
        // Zero keeps upstream's meaning: caching off.
        let cfg = parse(&["-c", "x", "--max-credential-retention-before-renewal", "0s"]).unwrap();
        assert!(cfg.max_retention.is_zero());
        let cfg = parse(&["-c", "x", "--max-cache-size", "0"]).unwrap();
        assert_eq!(cfg.max_cache_size, 0);
    }

    /// Attestation is one value with its node: on only with a node to watch, and refused at
    /// start (naming the flag) without one, never quietly off.
    #[test]
    fn caller_attestation_carries_its_node() {
        let on = parse(&[
            "-c",
            "c",
            "--caller-attestation",
            "pod",
            "--node-name",
            "n-1",
        ])
        .unwrap();
        assert_eq!(
            on.caller_attestation,
            CallerAttestation::Pod { node: "n-1".into() }
        );
        assert!(on.caller_attestation.is_on());
        let err = parse(&["-c", "c", "--caller-attestation", "pod"]).unwrap_err();
        assert!(err.contains("--caller-attestation"), "{err}");
        let off = parse(&["-c", "c", "--node-name", "n-1"]).unwrap();
        assert_eq!(off.caller_attestation, CallerAttestation::Off);
    }

    #[test]
    fn startup_taint_needs_a_taint_key_a_node_and_an_api_server() {
        let cli = |args: &[&str]| {
            let mut argv = vec!["pod-identity-agent", "server", "-c", "x"];
            argv.extend_from_slice(args);
            match Cli::try_parse_with_env(argv).unwrap().command {
                Command::Server(s) => s,
                _ => unreachable!(),
            }
        };
        let api = Environment {
            kubernetes_api: true,
        };
        let key = ["--startup-taint", "pod-identity-agent/not-ready"];
        let node = ["--node-name", "node-a"];
        let cfg = cli(&[&key[..], &node[..]].concat())
            .into_config(&api)
            .unwrap();
        assert_eq!(
            cfg.startup_taint.as_deref(),
            Some("pod-identity-agent/not-ready")
        );
        for (args, env) in [
            (key.to_vec(), api),
            ([&key[..], &node[..]].concat(), Environment::default()),
            (vec!["--startup-taint", "a/b/c", "--node-name", "n"], api),
            (vec!["--startup-taint=-x", "--node-name", "n"], api),
            (
                vec!["--startup-taint", "Example.com/x", "--node-name", "n"],
                api,
            ),
        ] {
            let err = cli(&args).into_config(&env).unwrap_err().to_string();
            assert!(err.starts_with("--startup-taint: "), "{args:?}: {err}");
        }
    }

    #[test]
    fn audience_list() {
        let cfg = parse(&["-c", "x", "--audience", "a,b", "--audience", "c"]).unwrap();
        assert_eq!(cfg.audiences, ["a", "b", "c"]);
    }
}
