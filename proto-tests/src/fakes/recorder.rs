//! What a fake upstream remembers, shared by the EKS Auth and STS fakes: every call in
//! arrival order, calls per pod, and every credential handed out. Tests read it through the
//! fake (which dereferences to its [`Recorder`]).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

use crate::fakes::eks_auth::IssuedCredentials;

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
/// (`calls()`, `call_log()`, `issued()`, `wait_for_calls()`...). The fake keeps its recorder
/// in `self.shared.recorder`.
macro_rules! recorded_fake {
    ($fake:ty, $call:ty) => {
        impl $crate::fakes::recorder::RecordedCall for $call {
            fn pod_uid(&self) -> Option<&str> {
                self.pod_uid.as_deref()
            }
        }

        impl std::ops::Deref for $fake {
            type Target = $crate::fakes::recorder::Recorder<$call>;

            fn deref(&self) -> &Self::Target {
                &self.shared.recorder
            }
        }
    };
}
pub(crate) use recorded_fake;
