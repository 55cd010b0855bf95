//! `pod-identity-agent`: a node-local credential agent for Kubernetes pods.
//!
//! [`Agent::start`] wires the pieces together: key store -> verifier, backend -> cache,
//! credential listeners, admin listeners. `main.rs` only parses flags, sets up logging and
//! waits for a signal; tests and the `dev` demo call [`Agent::start`] directly.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
#![forbid(unsafe_code)]

pub mod config;
pub mod credentials;
pub mod defence;
pub mod dev;
pub mod edge;
pub mod identity;
pub mod lifecycle;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod node;
pub(crate) mod sync;
pub mod unix_socket;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{BackendKind, CallerAttestation, Config, ConfigError, KeySource};
use crate::credentials::associations::AssociationStore;
use crate::credentials::cache::{CacheSettings, CredentialCache};
use crate::credentials::upstream::eks_auth::EksAuth;
use crate::credentials::upstream::sts::Sts;
use crate::credentials::upstream::Backend;
use crate::defence::Defence;
use crate::edge::admin::AdminState;
use crate::edge::http::{AppState, HostAllowList};
use crate::edge::{admin, http, probe, server};
use crate::identity::keys::KeyStore;
use crate::identity::kube_api::LastContact;
use crate::identity::pods::NodePods;
use crate::identity::token::Verifier;
use crate::identity::{attest, kube_api};
use crate::lifecycle::handoff::Inherited;
use crate::lifecycle::readiness::Readiness;
use crate::lifecycle::{audit, handoff, startup_taint};
use crate::limits::{LogLimiter, RequestLimiter};
use crate::metrics::{Features, Metrics};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A configuration problem discovered at start (exit 64).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not be opened (exit 1).
    #[error("{0}")]
    Bind(String),
}

impl StartError {
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Config(_) => config::EXIT_USAGE,
            StartError::Bind(_) => 1,
        }
    }
}

/// A running agent.
pub struct Agent {
    credential_addrs: Vec<SocketAddr>,
    probe_addr: SocketAddr,
    metrics_addr: SocketAddr,
    shutdown: Arc<watch::Sender<bool>>,
    /// Stops the probe socket, which the handoff's stop leaves answering.
    probe_stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

/// The admin listeners, bound: the probe port, and the metrics port unless it is the same.
struct AdminListeners {
    probe_addr: SocketAddr,
    metrics_addr: SocketAddr,
    listeners: Vec<(&'static str, TcpListener, SocketAddr)>,
}

/// What the steps of [`Agent::start`] share: the metrics handle, the shutdown signal every
/// background task watches, and the set of server tasks that [`Agent::shutdown`] drains.
struct Startup {
    metrics: Metrics,
    shutdown_rx: watch::Receiver<bool>,
    tasks: JoinSet<()>,
    /// What an earlier agent passed on (`--handoff-socket`); empty without one.
    inherited: Inherited,
    /// Duplicates of every listener, for the next agent (`--handoff-socket`).
    offered: Vec<handoff::Offered>,
    /// Set once this agent has handed over to the next.
    handed_over: Arc<AtomicBool>,
    /// `--handoff-socket` is set.
    handoff: bool,
}

impl Agent {
    /// Start every part in dependency order. Configuration the upstream needs (region,
    /// associations) is checked before anything is bound.
    pub async fn start(config: Config) -> Result<Agent, StartError> {
        let started = tokio::time::Instant::now();
        let (shutdown, shutdown_rx) = watch::channel(false);
        let shutdown = Arc::new(shutdown);
        let mut run = Startup {
            metrics: Metrics::with_features(features(&config)),
            shutdown_rx,
            tasks: JoinSet::new(),
            inherited: Inherited::default(),
            offered: Vec::new(),
            handed_over: Arc::default(),
            handoff: config.handoff_socket.is_some(),
        };
        let backend = run.backend(&config).await?;
        let kube = run.kube_client(&config).await?;
        let client = kube.as_ref().map(|(c, _)| c.clone());
        let keys = run.key_store(&config, client.clone())?;
        let cache = run.cache(&config, backend.clone());
        let pods = run.node_pods(&config, kube, &cache)?;
        // Everything that can refuse the configuration has been built; only now is an
        // earlier agent asked to hand over, so a failure from here on leaves it serving.
        if let Some(path) = &config.handoff_socket {
            run.inherited = handoff::take_over(path).await;
            if let Some(state) = run.inherited.state.take() {
                handoff::install(
                    state,
                    &cache,
                    keys.as_deref(),
                    pods.as_deref(),
                    &run.metrics,
                );
            }
        }
        run.spawn_background(&config, &keys, &pods);
        // Every listener is bound (or taken) before any serves: an agent that cannot open one
        // exits without having accepted a connection it would then drop.
        let credentials = run.bind_credentials(&config).await?;
        let admin = run.bind_admin(&config).await?;
        let probe_socket = match &config.probe_socket {
            Some(path) => Some(probe::bind(path).map_err(|e| {
                StartError::Bind(format!(
                    "--probe-socket: cannot listen on {}: {e}",
                    path.display()
                ))
            })?),
            None => None,
        };
        let credential_addrs = run.serve_credentials(
            &config,
            credentials,
            &keys,
            (&backend, &cache),
            pods.clone(),
        );
        let (probe_addr, metrics_addr) = (admin.probe_addr, admin.metrics_addr);
        let readiness = run.serve_admin(admin, keys.clone(), cache.clone(), pods.clone());
        // The probe socket outlives a handoff (the old agent stays alive, and says it is not
        // ready) and stops with the agent.
        let (probe_stop, probe_stopped) = watch::channel(false);
        if let Some(listener) = probe_socket {
            tokio::spawn(probe::serve(listener, readiness.clone(), probe_stopped));
        }
        run.hand_over_later(&config, shutdown.clone(), cache, keys, pods)
            .await;
        run.remove_startup_taint(&config, client, readiness, started);
        Ok(Agent {
            credential_addrs,
            probe_addr,
            metrics_addr,
            shutdown,
            probe_stop,
            tasks: run.tasks,
        })
    }

    pub fn credential_addrs(&self) -> &[SocketAddr] {
        &self.credential_addrs
    }

    pub fn probe_addr(&self) -> SocketAddr {
        self.probe_addr
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// Stop accepting, drain in-flight requests (bounded), and return when done.
    pub async fn shutdown(mut self, limit: Duration) {
        self.shutdown.send_replace(true);
        let drained = tokio::time::timeout(limit, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("shutdown did not finish in time; exiting anyway");
        }
        self.probe_stop.send_replace(true);
    }
}

/// The optional parts `config` turns on, whose metric families are exported; the families of
/// the parts that are off are not (see `metrics.rs`). Each condition is the one under which
/// [`Startup`] starts that part.
fn features(config: &Config) -> Features {
    let attesting = config.caller_attestation.is_on();
    Features {
        local_verification: config.key_source.is_some(),
        pod_watch: attesting,
        kubernetes_api: attesting
            || config.key_source == Some(KeySource::KubernetesApi)
            || config.startup_taint.is_some(),
        associations: config.upstream.backend == BackendKind::Sts,
        startup_taint: config.startup_taint.is_some(),
        handoff: config.handoff_socket.is_some(),
        audit: config.audit.is_some(),
    }
}

impl Startup {
    /// The upstream: EKS Auth, or STS with its associations file (loaded now, then watched).
    async fn backend(&self, config: &Config) -> Result<Arc<dyn Backend>, StartError> {
        Ok(
            match (config.upstream.backend, &config.upstream.associations) {
                (BackendKind::Sts, Some(path)) => {
                    let store = AssociationStore::load(path, self.metrics.clone())
                        .await
                        .map_err(|e| ConfigError::new("associations", e.to_string()))?;
                    tokio::spawn(store.clone().run(self.shutdown_rx.clone()));
                    Arc::new(Sts::new(&config.upstream, store).await?)
                }
                (BackendKind::Sts, None) => {
                    return Err(
                        ConfigError::new("associations", "required for the sts backend").into(),
                    )
                }
                (BackendKind::EksAuth, _) => Arc::new(EksAuth::new(&config.upstream).await?),
            },
        )
    }

    /// The Kubernetes client, when caller attestation or the key source needs the API server.
    async fn kube_client(
        &self,
        config: &Config,
    ) -> Result<Option<(kube::Client, Arc<LastContact>)>, StartError> {
        let attesting = config.caller_attestation.is_on();
        if !attesting
            && config.key_source != Some(KeySource::KubernetesApi)
            && config.startup_taint.is_none()
        {
            return Ok(None);
        }
        let contact = Arc::new(LastContact::default());
        let client = kube_api::connect(self.metrics.clone(), contact.clone())
            .await
            .map_err(|e| {
                ConfigError::new(
                    if attesting {
                        "caller-attestation"
                    } else {
                        "jwks-url"
                    },
                    e,
                )
            })?;
        Ok(Some((client, contact)))
    }

    /// `--caller-attestation pod`: the node's pod watch (started now; requests get 503 until
    /// its first list), which drops a gone pod's cache entries.
    fn node_pods(
        &self,
        config: &Config,
        kube: Option<(kube::Client, Arc<LastContact>)>,
        cache: &Arc<CredentialCache>,
    ) -> Result<Option<Arc<NodePods>>, StartError> {
        let CallerAttestation::Pod { node } = &config.caller_attestation else {
            return Ok(None);
        };
        // Attesting always builds the client (`kube_client`): without one this is a bug to
        // report, never a reason to serve unattested.
        let Some((client, contact)) = kube else {
            return Err(ConfigError::new(
                "caller-attestation",
                "pod needs a Kubernetes API client, and none was built",
            )
            .into());
        };
        let node = node.clone();
        // Gone pods reach the cache over a channel the cache consumes.
        let (gone, forget) = tokio::sync::mpsc::unbounded_channel();
        let pods = NodePods::new(node, client, contact, self.metrics.clone(), gone);
        tokio::spawn(cache.clone().forget_gone(forget));
        Ok(Some(pods))
    }

    /// The key reload and the pod watch, started once any state taken over is in.
    fn spawn_background(
        &self,
        config: &Config,
        keys: &Option<Arc<KeyStore>>,
        pods: &Option<Arc<NodePods>>,
    ) {
        if let Some(store) = keys {
            tokio::spawn(store.clone().run(self.shutdown_rx.clone()));
        }
        if let Some(pods) = pods {
            tokio::spawn(
                pods.clone()
                    .run(config.pod_watch_timeout, self.shutdown_rx.clone()),
            );
        }
    }

    /// A listener for `addr`: the one an earlier agent passed on, or a new one. Offered to
    /// the next agent when handoff is on.
    async fn listener(&mut self, addr: SocketAddr) -> std::io::Result<TcpListener> {
        let listener = match self.inherited.listener(addr) {
            Some(l) => {
                tracing::info!(address = %addr, "took over the earlier agent's listener");
                l
            }
            None => TcpListener::bind(addr).await?,
        };
        if self.handoff {
            match handoff::Offered::tcp(&listener) {
                Ok(o) => self.offered.push(o),
                Err(e) => {
                    tracing::warn!(address = %addr, error = %e, "this listener cannot be passed to the next agent")
                }
            }
        }
        Ok(listener)
    }

    /// `--handoff-socket`: tell the earlier agent (if any) to stop, then listen for the next.
    async fn hand_over_later(
        &mut self,
        config: &Config,
        stop: Arc<watch::Sender<bool>>,
        cache: Arc<CredentialCache>,
        keys: Option<Arc<KeyStore>>,
        pods: Option<Arc<NodePods>>,
    ) {
        let Some(path) = config.handoff_socket.clone() else {
            return;
        };
        let inherited = std::mem::take(&mut self.inherited);
        let taken_socket = inherited.confirm(&self.metrics).await;
        let listener = match handoff::listen(&path, taken_socket) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(socket = %path.display(), error = %e, "cannot listen for the next agent; its upgrade will not be seamless");
                return;
            }
        };
        let giver = handoff::Giver {
            path,
            offered: std::mem::take(&mut self.offered),
            cache,
            keys,
            pods,
            metrics: self.metrics.clone(),
            stop,
            handed_over: self.handed_over.clone(),
        };
        tokio::spawn(giver.run(listener, self.shutdown_rx.clone()));
    }

    /// The verification keys and their background reload (the first load runs at once), or
    /// none, with a warning, when no key source is configured.
    fn key_store(
        &self,
        config: &Config,
        kube: Option<kube::Client>,
    ) -> Result<Option<Arc<KeyStore>>, StartError> {
        let keys = match &config.key_source {
            Some(source) => {
                let store = KeyStore::with_policy(
                    source.clone(),
                    self.metrics.clone(),
                    config.allow_insecure_key_source,
                    kube,
                )
                .map_err(|e| ConfigError::new("jwks-url", e.to_string()))?;
                Some(store)
            }
            None => {
                tracing::warn!(
                    "no key source (--jwks-file, --jwks-url or --issuer): pod tokens are NOT verified locally; \
                     they go to EKS Auth unverified and the cache keys on token digests"
                );
                None
            }
        };
        self.metrics
            .verification_enabled
            .set(i64::from(keys.is_some()));
        if config.allow_insecure_key_source {
            tracing::warn!(
                "--allow-insecure-key-source: verification keys may come over plain http from beyond loopback; \
                 anyone on that path can forge any pod's identity"
            );
            self.metrics.insecure_key_source.set(1);
        }
        Ok(keys)
    }

    fn cache(&self, config: &Config, backend: Arc<dyn Backend>) -> Arc<CredentialCache> {
        let settings = CacheSettings {
            scope: config.cache_scope,
            max_entries: config.max_cache_size,
            max_retention: config.max_retention,
            max_service_qps: config.max_service_qps,
            max_upstream_concurrency: config.max_upstream_concurrency,
        };
        if !settings.caching() {
            tracing::warn!(
                max_cache_size = config.max_cache_size,
                retention_s = config.max_retention.as_secs(),
                "caching is off: every request is an upstream call (concurrent requests for one pod still share it)"
            );
        } else {
            // A full cache of entries in use is refreshed once per retention: above the budget,
            // refreshes queue and pods start refetching on their own (accepted, but said once).
            let needed = config.max_cache_size as f64 / config.max_retention.as_secs_f64();
            if needed > config.max_service_qps {
                tracing::warn!(
                    max_cache_size = config.max_cache_size,
                    retention_s = config.max_retention.as_secs_f64(),
                    needed_qps = needed,
                    max_service_qps = config.max_service_qps,
                    "a full cache would need more background refreshes per second than --max-service-qps allows; \
                     entries will be refreshed late or by the requests themselves"
                );
            }
        }
        CredentialCache::new(backend, settings, self.metrics.clone())
    }

    /// Bind (or take over) the credentials addresses; those that cannot be bound are skipped,
    /// as long as one binds.
    async fn bind_credentials(&mut self, config: &Config) -> Result<Vec<TcpListener>, StartError> {
        let mut listeners = Vec::new();
        for addr in &config.listen.credential_listeners {
            match self.listener(*addr).await {
                Ok(l) => listeners.push(l),
                Err(e) => {
                    tracing::warn!(listener = "credentials", address = %addr, error = %e, "could not bind; skipping this address")
                }
            }
        }
        if listeners.is_empty() {
            return Err(StartError::Bind(format!(
                "could not bind any credentials address ({})",
                config.listen.credential_hosts().join(", ")
            )));
        }
        Ok(listeners)
    }

    /// Serve the credentials route on each of `listeners`.
    fn serve_credentials(
        &mut self,
        config: &Config,
        listeners: Vec<TcpListener>,
        keys: &Option<Arc<KeyStore>>,
        (backend, cache): (&Arc<dyn Backend>, &Arc<CredentialCache>),
        pods: Option<Arc<NodePods>>,
    ) -> Vec<SocketAddr> {
        let credential_addrs: Vec<SocketAddr> = listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();
        let state = Arc::new(AppState {
            verifier: Verifier::new(
                keys.clone(),
                config.issuer.clone(),
                config.audiences.clone(),
            ),
            backend: backend.clone(),
            cache: cache.clone(),
            metrics: self.metrics.clone(),
            hosts: HostAllowList::new(credential_addrs.clone()),
            limiter: RequestLimiter::new(
                config.listen.limits.caller_rate,
                config.listen.limits.caller_burst,
                config.listen.limits.global_rate,
                config.listen.limits.global_burst,
            ),
            refusal_logs: LogLimiter::default(),
            attest: attest::Attestation {
                node: attest::NodeBinding::new(config.node_name.clone(), config.require_node_claim),
                pods,
            },
            audit: config.audit.as_ref().map(|audit| {
                tracing::info!(file = %audit.path.display(), max_size = audit.max_size, max_files = audit.max_files, "audit log: recording first deliveries of each key to each pod");
                audit::AuditLog::start(
                    audit,
                    config.cache_scope,
                    config.node_name.clone(),
                    self.metrics.clone(),
                )
            }),
        });
        for (listener, addr) in listeners.into_iter().zip(&credential_addrs) {
            tracing::info!(listener = "credentials", address = %addr, "listening");
            let state = state.clone();
            let limits = server::ConnectionLimits {
                max_connections: Some(config.listen.max_connections),
                max_per_source: Some(config.listen.max_connections_per_source),
                idle_timeout: config.listen.idle_timeout,
                send_timeout: config.listen.send_timeout,
                metrics: Some(self.metrics.clone()),
            };
            self.tasks.spawn(server::serve_with_limits(
                listener,
                self.shutdown_rx.clone(),
                limits,
                move |req, peer| http::handle(state.clone(), req, peer),
            ));
        }
        credential_addrs
    }

    /// Bind (or take over) the probe and metrics listeners: one listener when both name the
    /// same address.
    async fn bind_admin(&mut self, config: &Config) -> Result<AdminListeners, StartError> {
        let probe = self
            .bind_one(config.listen.probe_listener, "probe-port")
            .await?;
        let probe_addr = probe
            .local_addr()
            .map_err(|e| StartError::Bind(e.to_string()))?;
        let mut listeners = vec![("probe", probe, probe_addr)];
        let metrics_addr = if config.listen.metrics_listener == config.listen.probe_listener
            && config.listen.probe_listener.port() != 0
        {
            probe_addr
        } else {
            let listener = self
                .bind_one(config.listen.metrics_listener, "metrics-port")
                .await?;
            let addr = listener
                .local_addr()
                .map_err(|e| StartError::Bind(e.to_string()))?;
            listeners.push(("metrics", listener, addr));
            addr
        };
        Ok(AdminListeners {
            probe_addr,
            metrics_addr,
            listeners,
        })
    }

    /// Serve the admin listeners, then readiness: from here on `/readyz` reflects the keys.
    fn serve_admin(
        &mut self,
        bound: AdminListeners,
        keys: Option<Arc<KeyStore>>,
        cache: Arc<CredentialCache>,
        pods: Option<Arc<NodePods>>,
    ) -> Arc<Readiness> {
        let admin = Arc::new(AdminState {
            readiness: Arc::new(Readiness {
                listeners_bound: AtomicBool::new(false),
                keys,
                pods,
                handed_over: self.handed_over.clone(),
            }),
            metrics: self.metrics.clone(),
            cache,
        });
        for (name, listener, addr) in bound.listeners {
            tracing::info!(listener = name, address = %addr, "listening");
            let admin = admin.clone();
            // Small limits of their own: the metrics port is reachable from every pod.
            let limits = if defence::on(Defence::AdminLimits) {
                server::ConnectionLimits {
                    max_connections: Some(config::ADMIN_MAX_CONNECTIONS),
                    max_per_source: Some(config::ADMIN_MAX_CONNECTIONS_PER_SOURCE),
                    ..server::ConnectionLimits::default()
                }
            } else {
                server::ConnectionLimits::default()
            };
            self.tasks.spawn(server::serve_with_limits(
                listener,
                self.shutdown_rx.clone(),
                limits,
                move |req, peer| admin::handle(admin.clone(), req, peer),
            ));
        }
        admin
            .readiness
            .listeners_bound
            .store(true, Ordering::Release);
        admin.readiness.clone()
    }

    /// `--startup-taint`: once `readiness` holds, the taint leaves this node (a task of its
    /// own, retrying until done; serving does not wait for it).
    fn remove_startup_taint(
        &self,
        config: &Config,
        client: Option<kube::Client>,
        readiness: Arc<Readiness>,
        started: tokio::time::Instant,
    ) {
        let (Some(key), Some(node), Some(client)) = (
            config.startup_taint.clone(),
            config.node_name.clone(),
            client,
        ) else {
            return;
        };
        let removal = startup_taint::StartupTaint {
            key,
            node,
            client,
            metrics: self.metrics.clone(),
            started,
        };
        tokio::spawn(removal.run(readiness, self.shutdown_rx.clone()));
    }
}

impl Startup {
    async fn bind_one(
        &mut self,
        addr: SocketAddr,
        flag: &'static str,
    ) -> Result<TcpListener, StartError> {
        self.listener(addr)
            .await
            .map_err(|e| StartError::Bind(format!("--{flag}: cannot listen on {addr}: {e}")))
    }
}
