//! `pod-identity-agent`: a node-local credential agent for Kubernetes pods.
//!
//! [`Agent::start`] wires the pieces together: key store -> verifier, backend -> cache,
//! credential listeners, admin listeners. `main.rs` only parses flags, sets up logging and
//! waits for a signal; tests and the `dev` demo call [`Agent::start`] directly.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
#![forbid(unsafe_code)]

pub mod admin;
pub mod associations;
pub mod cache;
pub mod config;
pub mod dev;
pub mod http;
pub mod keys;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod netlink;
pub mod shutdown;
pub mod token;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::admin::{AdminState, Readiness};
use crate::associations::AssociationStore;
use crate::cache::{CacheSettings, CredentialCache};
use crate::config::BackendKind;
use crate::config::Config;
use crate::http::{AppState, HostAllowList};
use crate::keys::KeyStore;
use crate::limits::RequestLimiter;
use crate::metrics::Metrics;
use crate::token::Verifier;
use crate::upstream::eks_auth::EksAuth;
use crate::upstream::sts::Sts;
use crate::upstream::Backend;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A configuration problem discovered at start (exit 64).
    #[error("--{flag}: {message}")]
    Config { flag: &'static str, message: String },
    /// A listener could not be opened (exit 1).
    #[error("{0}")]
    Bind(String),
}

impl StartError {
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Config { .. } => config::EXIT_USAGE,
            StartError::Bind(_) => 1,
        }
    }
}

/// A running agent.
pub struct Agent {
    credential_addrs: Vec<SocketAddr>,
    probe_addr: SocketAddr,
    metrics_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Agent {
    pub async fn start(config: Config) -> Result<Agent, StartError> {
        let metrics = Metrics::new();
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();

        // Configuration the upstream needs (region, associations) is checked before anything
        // else runs.
        let backend: Arc<dyn Backend> =
            match (config.backend, &config.associations) {
                (BackendKind::Sts, Some(path)) => {
                    let store = AssociationStore::load(path, metrics.clone()).map_err(|e| {
                        StartError::Config {
                            flag: "associations",
                            message: e.to_string(),
                        }
                    })?;
                    tokio::spawn(store.clone().run(shutdown_rx.clone()));
                    let sts = Sts::new(&config, store)
                        .await
                        .map_err(|e| StartError::Config {
                            flag: e.flag,
                            message: e.message,
                        })?;
                    Arc::new(sts)
                }
                (BackendKind::Sts, None) => {
                    return Err(StartError::Config {
                        flag: "associations",
                        message: "required for the sts backend".into(),
                    })
                }
                (BackendKind::EksAuth, _) => Arc::new(EksAuth::new(&config).await.map_err(
                    |e| StartError::Config {
                        flag: e.flag,
                        message: e.message,
                    },
                )?),
            };
        let keys = match &config.key_source {
            Some(source) => {
                let store = KeyStore::new(source.clone(), metrics.clone()).map_err(|e| {
                    StartError::Config {
                        flag: "jwks-url",
                        message: e.to_string(),
                    }
                })?;
                // Background reload; the first load runs at once.
                tokio::spawn(store.clone().run(shutdown_rx.clone()));
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
        metrics.verification_enabled.set(i64::from(keys.is_some()));

        let cache = CredentialCache::new(
            backend,
            CacheSettings {
                scope: config.cache_scope,
                max_entries: config.max_cache_size,
                max_retention: config.max_retention,
                max_service_qps: config.max_service_qps,
                max_upstream_concurrency: config.max_upstream_concurrency,
            },
            metrics.clone(),
        );

        let listeners = http::bind_all(&config.credential_listeners, "credentials").await;
        if listeners.is_empty() {
            let addrs: Vec<String> = config
                .credential_listeners
                .iter()
                .map(|a| a.to_string())
                .collect();
            return Err(StartError::Bind(format!(
                "could not bind any credentials address ({})",
                addrs.join(", ")
            )));
        }
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
            cache: cache.clone(),
            metrics: metrics.clone(),
            hosts: HostAllowList::new(credential_addrs.clone()),
            limiter: RequestLimiter::new(
                config.limits.caller_rate,
                config.limits.caller_burst,
                config.limits.global_rate,
                config.limits.global_burst,
            ),
        });
        for (listener, addr) in listeners.into_iter().zip(&credential_addrs) {
            tracing::info!(listener = "credentials", address = %addr, "listening");
            let state = state.clone();
            let limits = http::ConnectionLimits {
                max_connections: Some(config.max_connections),
                idle_timeout: config.idle_timeout,
                metrics: Some(state.metrics.clone()),
            };
            tasks.spawn(http::serve_with_limits(
                listener,
                shutdown_rx.clone(),
                limits,
                move |req, peer| http::handle(state.clone(), req, peer),
            ));
        }

        let admin = Arc::new(AdminState {
            readiness: Readiness {
                listeners_bound: AtomicBool::new(false),
                keys,
            },
            metrics,
            cache,
        });
        let probe = bind_one(config.probe_listener, "probe-port").await?;
        let probe_addr = probe
            .local_addr()
            .map_err(|e| StartError::Bind(e.to_string()))?;
        let mut admin_listeners = vec![("probe", probe, probe_addr)];
        let metrics_addr = if config.metrics_listener == config.probe_listener
            && config.probe_listener.port() != 0
        {
            probe_addr
        } else {
            let listener = bind_one(config.metrics_listener, "metrics-port").await?;
            let addr = listener
                .local_addr()
                .map_err(|e| StartError::Bind(e.to_string()))?;
            admin_listeners.push(("metrics", listener, addr));
            addr
        };
        for (name, listener, addr) in admin_listeners {
            tracing::info!(listener = name, address = %addr, "listening");
            let admin = admin.clone();
            tasks.spawn(http::serve(
                listener,
                shutdown_rx.clone(),
                move |req, peer| admin::handle(admin.clone(), req, peer),
            ));
        }
        admin
            .readiness
            .listeners_bound
            .store(true, Ordering::Release);
        Ok(Agent {
            credential_addrs,
            probe_addr,
            metrics_addr,
            shutdown,
            tasks,
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
    }
}

async fn bind_one(addr: SocketAddr, flag: &'static str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| StartError::Bind(format!("--{flag}: cannot listen on {addr}: {e}")))
}
