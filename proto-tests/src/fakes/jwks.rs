//! A fake OIDC issuer: `/.well-known/openid-configuration` and a JWKS document,
//! with fetch counters, for the agent's `--jwks-url` and `--issuer` sources.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde_json::{json, Value};

use super::{json_response, serve_loopback, ServerGuard};

/// Where the JWKS document is served; the path the Kubernetes API server uses.
pub const JWKS_PATH: &str = "/openid/v1/jwks";
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

struct Shared {
    jwks: Mutex<Value>,
    /// What the discovery document names as `jwks_uri`, instead of this server's own.
    jwks_uri: Mutex<Option<String>>,
    jwks_fetches: AtomicU64,
    discovery_fetches: AtomicU64,
    /// How long a JWKS request waits before it is answered (`set_jwks_delay`).
    jwks_delay: Mutex<Duration>,
}

/// Handle on a running fake issuer; clones share the server.
#[derive(Clone)]
pub struct FakeJwks {
    shared: Arc<Shared>,
    addr: SocketAddr,
    _server: Arc<ServerGuard>,
}

impl FakeJwks {
    /// Start on `127.0.0.1:0` serving `jwks`.
    pub async fn start(jwks: Value) -> Self {
        let shared = Arc::new(Shared {
            jwks: Mutex::new(jwks),
            jwks_uri: Mutex::new(None),
            jwks_fetches: AtomicU64::new(0),
            discovery_fetches: AtomicU64::new(0),
            jwks_delay: Mutex::new(Duration::ZERO),
        });
        let handler_state = shared.clone();
        // The discovery document names the server's own address, known only
        // after binding: the handler reads it from this cell.
        let own_addr: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let handler_addr = own_addr.clone();
        let (addr, guard) = serve_loopback(move |req| {
            let state = handler_state.clone();
            let addr = *handler_addr.lock().unwrap_or_else(|e| e.into_inner());
            async move {
                let delay = *state.jwks_delay.lock().unwrap_or_else(|e| e.into_inner());
                if req.uri().path() == JWKS_PATH && !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                handle(&state, addr, req)
            }
        })
        .await
        .expect("bind fake issuer on 127.0.0.1");
        *own_addr.lock().unwrap_or_else(|e| e.into_inner()) = Some(addr);
        Self {
            shared,
            addr,
            _server: Arc::new(guard),
        }
    }

    /// The issuer URL (no trailing slash); also the `--issuer` value.
    pub fn issuer(&self) -> String {
        base_url(self.addr)
    }

    pub fn jwks_url(&self) -> String {
        format!("{}{JWKS_PATH}", base_url(self.addr))
    }

    /// Replace the served document (key rotation).
    pub fn set_jwks(&self, jwks: Value) {
        *self.shared.jwks.lock().unwrap_or_else(|e| e.into_inner()) = jwks;
    }

    /// Make the discovery document point somewhere else.
    pub fn set_jwks_uri(&self, uri: impl Into<String>) {
        *self
            .shared
            .jwks_uri
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(uri.into());
    }

    /// JWKS requests from now on are answered only after `delay`: an issuer that hangs.
    pub fn set_jwks_delay(&self, delay: Duration) {
        *self
            .shared
            .jwks_delay
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = delay;
    }

    pub fn jwks_fetches(&self) -> u64 {
        self.shared.jwks_fetches.load(Ordering::SeqCst)
    }

    pub fn discovery_fetches(&self) -> u64 {
        self.shared.discovery_fetches.load(Ordering::SeqCst)
    }
}

fn base_url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

fn handle(
    shared: &Shared,
    addr: Option<SocketAddr>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    match req.uri().path() {
        JWKS_PATH => {
            shared.jwks_fetches.fetch_add(1, Ordering::SeqCst);
            let jwks = shared
                .jwks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            json_response(200, &jwks)
        }
        DISCOVERY_PATH => {
            shared.discovery_fetches.fetch_add(1, Ordering::SeqCst);
            let Some(addr) = addr else {
                return json_response(503, &json!({ "error": "starting" }));
            };
            json_response(
                200,
                &json!({
                    "issuer": base_url(addr),
                    "jwks_uri": shared
                        .jwks_uri
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone()
                        .unwrap_or_else(|| format!("{}{JWKS_PATH}", base_url(addr))),
                    "response_types_supported": ["id_token"],
                    "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["RS256", "ES256"],
                }),
            )
        }
        _ => json_response(404, &json!({ "error": "not found" })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{send, RawRequest};
    use crate::keys::TestKeys;

    #[tokio::test]
    async fn serves_discovery_and_keys() {
        let fake = FakeJwks::start(TestKeys::shared().jwks()).await;
        let host = fake.addr.to_string();
        let d = send(
            fake.addr,
            &RawRequest::get(DISCOVERY_PATH)
                .header("Host", &host)
                .header("Connection", "close"),
        )
        .await
        .unwrap();
        assert_eq!(d.json()["issuer"], fake.issuer());
        assert_eq!(d.json()["jwks_uri"], fake.jwks_url());
        let k = send(
            fake.addr,
            &RawRequest::get(JWKS_PATH)
                .header("Host", &host)
                .header("Connection", "close"),
        )
        .await
        .unwrap();
        assert_eq!(k.json()["keys"].as_array().unwrap().len(), 2);
        assert_eq!((fake.discovery_fetches(), fake.jwks_fetches()), (1, 1));
    }
}
