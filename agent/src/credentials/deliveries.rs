//! Which pods one fetched access key has been recorded as delivered to (`--audit-log`).
//!
//! The audit log has one record per first delivery of a key to a pod, so every delivery asks
//! "recorded for this pod already?". The answer lives with the key itself (the upstream
//! module's `Credentials` each carry one [`Deliveries`]), so it is dropped with the key and
//! needs no table of its own. Under `--cache-scope pod` a key has one pod, so a hit that was
//! recorded costs one load (is a pod recorded?); under `--cache-scope association` a hit of
//! the first pod costs one string comparison, and the pods after the first are in a short
//! list behind a lock.

use std::sync::{Mutex, OnceLock};

use crate::sync::lock;

/// Pods of one key beyond the first that are remembered. A service account's pods on one
/// node are rarely more than a few dozen; past this bound a delivery is recorded again
/// rather than remembered (a repeated record, never a missing one).
const MAX_PODS_PER_KEY: usize = 1024;

/// The pods a key has been recorded as delivered to.
#[derive(Default)]
pub struct Deliveries {
    /// The first pod whose record was written: the whole answer under pod scope.
    first: OnceLock<Box<str>>,
    /// Pods recorded (or being recorded) besides `first`.
    more: Mutex<Vec<Box<str>>>,
}

/// What the caller of [`Deliveries::claim`] must do.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// Recorded already (or being recorded by a concurrent request of the same pod).
    Recorded,
    /// Write the record, then call [`Deliveries::written`] or [`Deliveries::failed`].
    Write,
    /// Write the record; it is not remembered (the key has too many pods).
    WriteUnremembered,
}

impl Clone for Deliveries {
    /// A copy of a key's credentials is a new delivery history: nothing recorded yet.
    fn clone(&self) -> Deliveries {
        Deliveries::default()
    }
}

impl Deliveries {
    /// Whether `pod`'s delivery must be recorded; a `Write` answer reserves it, so concurrent
    /// requests of one pod write one record. `shared`: the key may reach several pods (the
    /// association scope); otherwise every delivery of the key is to one pod, and a recorded
    /// one is the answer for all.
    pub fn claim(&self, pod: &str, shared: bool) -> Claim {
        match self.first.get() {
            Some(_) if !shared => return Claim::Recorded,
            Some(first) if **first == *pod => return Claim::Recorded,
            _ => {}
        }
        let mut more = lock(&self.more);
        if more.iter().any(|p| &**p == pod) {
            return Claim::Recorded;
        }
        if more.len() >= MAX_PODS_PER_KEY {
            return Claim::WriteUnremembered;
        }
        more.push(pod.into());
        Claim::Write
    }

    /// `pod`'s record is written: later deliveries to it write nothing.
    pub fn written(&self, pod: &str) {
        if self.first.get().is_none() && self.first.set(pod.into()).is_ok() {
            lock(&self.more).retain(|p| &**p != pod);
        }
    }

    /// `pod`'s record could not be written: its next delivery tries again.
    pub fn failed(&self, pod: &str) {
        lock(&self.more).retain(|p| &**p != pod);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Deliveries {
        fn claim_shared(&self, pod: &str) -> Claim {
            self.claim(pod, true)
        }
    }

    #[test]
    fn under_pod_scope_one_recorded_delivery_answers_for_the_key() {
        let d = Deliveries::default();
        assert_eq!(d.claim("pod-a", false), Claim::Write);
        assert_eq!(d.claim("pod-a", false), Claim::Recorded, "being written");
        d.written("pod-a");
        assert_eq!(d.claim("pod-a", false), Claim::Recorded);
    }

    #[test]
    fn one_record_per_pod_and_a_failed_one_is_tried_again() {
        let d = Deliveries::default();
        assert_eq!(d.claim_shared("pod-a"), Claim::Write);
        assert_eq!(d.claim_shared("pod-a"), Claim::Recorded, "being written");
        d.written("pod-a");
        assert_eq!(d.claim_shared("pod-a"), Claim::Recorded);
        assert_eq!(d.claim_shared("pod-b"), Claim::Write);
        d.failed("pod-b");
        assert_eq!(
            d.claim_shared("pod-b"),
            Claim::Write,
            "a failed write is tried again"
        );
        d.written("pod-b");
        assert_eq!(d.claim_shared("pod-b"), Claim::Recorded);
        assert_eq!(d.claim_shared("pod-a"), Claim::Recorded);
        assert_eq!(
            d.clone().claim_shared("pod-a"),
            Claim::Write,
            "a copy starts afresh"
        );
    }

    #[test]
    fn memory_is_bounded_and_nothing_is_ever_left_unrecorded() {
        let d = Deliveries::default();
        for i in 0..MAX_PODS_PER_KEY {
            assert_eq!(d.claim_shared(&format!("pod-{i}")), Claim::Write);
        }
        assert_eq!(d.claim_shared("one-too-many"), Claim::WriteUnremembered);
        assert_eq!(d.claim_shared("one-too-many"), Claim::WriteUnremembered);
        assert_eq!(d.claim_shared("pod-7"), Claim::Recorded);
    }
}
