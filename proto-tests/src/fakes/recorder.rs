//! What the EKS Auth and STS fakes have in common: a server on loopback whose handler sees the
//! settings a test changes and a [`Recorder`] of every call in arrival order, calls per pod,
//! and every credential handed out. Tests read the recorder through the fake (which
//! dereferences to its [`RunningUpstream`], which dereferences to its recorder).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::sync::watch;

use super::{serve_loopback, ServerGuard};
use crate::fakes::eks_auth::IssuedCredentials;

/// A fake upstream's state as its handler sees it: the settings a test changes (latency,
/// faults, lifetimes: `S`) and the recorder.
pub struct Upstream<S, C> {
    settings: Mutex<S>,
    pub recorder: Recorder<C>,
}

impl<S, C> Upstream<S, C> {
    pub(crate) fn lock(&self) -> MutexGuard<'_, S> {
        // A panicking test thread must not poison the fake for the others.
        self.settings.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A fake upstream serving on `127.0.0.1:0`; clones share the server and state, which stop
/// when the last clone is dropped.
pub struct RunningUpstream<S, C> {
    shared: Arc<Upstream<S, C>>,
    addr: SocketAddr,
    _server: Arc<ServerGuard>,
}

impl<S, C> Clone for RunningUpstream<S, C> {
    fn clone(&self) -> Self {
        RunningUpstream {
            shared: self.shared.clone(),
            addr: self.addr,
            _server: self._server.clone(),
        }
    }
}

impl<S, C> RunningUpstream<S, C>
where
    S: Send + 'static,
    C: RecordedCall + Send + 'static,
{
    /// Start serving `handle` with `settings`. Must be called inside a Tokio runtime.
    pub(crate) async fn start<Fut>(
        what: &str,
        settings: S,
        handle: fn(Arc<Upstream<S, C>>, Request<Incoming>) -> Fut,
    ) -> Self
    where
        Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
    {
        let shared = Arc::new(Upstream {
            settings: Mutex::new(settings),
            recorder: Recorder::default(),
        });
        let handler_state = shared.clone();
        let (addr, guard) = serve_loopback(move |req| handle(handler_state.clone(), req))
            .await
            .unwrap_or_else(|e| panic!("bind fake {what} on 127.0.0.1: {e}"));
        RunningUpstream {
            shared,
            addr,
            _server: Arc::new(guard),
        }
    }
}

impl<S, C> RunningUpstream<S, C> {
    /// Base URL for the agent's endpoint flag, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The settings, to change them.
    pub(crate) fn settings(&self) -> MutexGuard<'_, S> {
        self.shared.lock()
    }
}

impl<S, C> std::ops::Deref for RunningUpstream<S, C> {
    type Target = Recorder<C>;

    fn deref(&self) -> &Recorder<C> {
        &self.shared.recorder
    }
}

/// A recorded call that may name the pod it was made for (from the token's claims).
pub trait RecordedCall: Clone {
    fn pod_uid(&self) -> Option<&str>;
}

struct Record<C> {
    calls: Vec<C>,
    calls_per_pod: HashMap<String, u64>,
    issued: Vec<IssuedCredentials>,
}

pub struct Recorder<C> {
    record: Mutex<Record<C>>,
    /// Number of calls received, for `wait_for_calls`.
    received: watch::Sender<u64>,
}

impl<C: RecordedCall> Default for Recorder<C> {
    fn default() -> Self {
        Recorder {
            record: Mutex::new(Record {
                calls: Vec::new(),
                calls_per_pod: HashMap::new(),
                issued: Vec::new(),
            }),
            received: watch::Sender::new(0),
        }
    }
}

impl<C: RecordedCall> Recorder<C> {
    fn lock(&self) -> MutexGuard<'_, Record<C>> {
        // A panicking test thread must not poison the fake for the others.
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record a call; `make` gets its 1-based arrival number. Returns the call.
    pub(crate) fn record(&self, make: impl FnOnce(u64) -> C) -> C {
        let call = {
            let mut record = self.lock();
            let call = make(record.calls.len() as u64 + 1);
            if let Some(uid) = call.pod_uid() {
                *record.calls_per_pod.entry(uid.to_owned()).or_default() += 1;
            }
            record.calls.push(call.clone());
            call
        };
        self.received.send_modify(|n| *n += 1);
        call
    }

    /// Record credentials handed out; `make` gets their 1-based serial number.
    pub(crate) fn issue(&self, make: impl FnOnce(u64) -> IssuedCredentials) -> IssuedCredentials {
        let mut record = self.lock();
        let issued = make(record.issued.len() as u64 + 1);
        record.issued.push(issued.clone());
        issued
    }

    /// Requests received so far (counted on arrival, before latency or faults apply).
    pub fn calls(&self) -> u64 {
        self.lock().calls.len() as u64
    }

    pub fn calls_for_pod(&self, pod_uid: &str) -> u64 {
        self.lock().calls_per_pod.get(pod_uid).copied().unwrap_or(0)
    }

    pub fn call_log(&self) -> Vec<C> {
        self.lock().calls.clone()
    }

    /// The calls made for one pod, in arrival order.
    pub fn calls_for(&self, pod_uid: &str) -> Vec<C> {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.pod_uid() == Some(pod_uid))
            .cloned()
            .collect()
    }

    /// Every credential issued, in order.
    pub fn issued(&self) -> Vec<IssuedCredentials> {
        self.lock().issued.clone()
    }

    pub fn issued_for_pod(&self, pod_uid: &str) -> Vec<IssuedCredentials> {
        self.lock()
            .issued
            .iter()
            .filter(|c| c.pod_uid == pod_uid)
            .cloned()
            .collect()
    }

    /// The issuance an access key id belongs to.
    pub fn find_issued(&self, access_key_id: &str) -> Option<IssuedCredentials> {
        self.lock()
            .issued
            .iter()
            .find(|c| c.access_key_id == access_key_id)
            .cloned()
    }

    /// Wait until at least `n` calls have been received; false on timeout.
    pub async fn wait_for_calls(&self, n: u64, timeout: Duration) -> bool {
        let mut rx = self.received.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|&c| c >= n))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Wait until `done` holds for the calls received so far; false on timeout.
    pub async fn wait_until(&self, timeout: Duration, done: impl Fn(&[C]) -> bool) -> bool {
        let mut rx = self.received.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|_| done(&self.lock().calls)))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Wait until at least `n` credentials have been issued; false on timeout.
    pub async fn wait_for_issued(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if self.lock().issued.len() >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.lock().issued.len() >= n
    }
}

/// A fake's calls carry the pod they were made for, and the fake reads as its [`Recorder`]
/// (`calls()`, `issued()`, `wait_for_calls()`...). An upstream fake, a newtype of its
/// [`RunningUpstream`] (`recorded_fake!(Fake, Settings, Call)`), reads as that, `url()`
/// included, and is a [`CredentialIssuer`](crate::fakes::CredentialIssuer); another fake keeps its recorder in `self.shared.recorder`
/// (`recorded_fake!(Fake, Call)`).
macro_rules! recorded_fake {
    ($fake:ty, $settings:ty, $call:ty) => {
        $crate::fakes::recorder::recorded_fake!(@call $call);

        impl $crate::fakes::CredentialIssuer for $fake {
            fn issued_credentials(&self) -> Vec<$crate::fakes::eks_auth::IssuedCredentials> {
                self.issued()
            }

            fn calls_received(&self) -> u64 {
                self.calls()
            }
        }

        impl std::ops::Deref for $fake {
            type Target = $crate::fakes::recorder::RunningUpstream<$settings, $call>;

            fn deref(&self) -> &Self::Target {
                &self.0
            }
        }
    };
    ($fake:ty, $call:ty) => {
        $crate::fakes::recorder::recorded_fake!(@call $call);

        impl std::ops::Deref for $fake {
            type Target = $crate::fakes::recorder::Recorder<$call>;

            fn deref(&self) -> &Self::Target {
                &self.shared.recorder
            }
        }
    };
    (@call $call:ty) => {
        impl $crate::fakes::recorder::RecordedCall for $call {
            fn pod_uid(&self) -> Option<&str> {
                self.pod_uid.as_deref()
            }
        }
    };
}
pub(crate) use recorded_fake;
