//! The one background scheduler of the cache. Every entry has at most one live timer: its
//! refresh point, its next retry after a failure, or the instant its credentials stop being
//! servable. The timers sit in one heap served by one task, so an idle entry costs a heap
//! slot, not a sleeping task. A timer carries the entry's generation; a fetch that completes
//! bumps it, which turns older timers into no-ops.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::Notify;
use tokio::time::Instant;

use super::slot::Slot;
use super::{CacheKey, CredentialCache};

struct Timer {
    at: Instant,
    /// Insertion order, so equal instants pop first in, first out.
    seq: u64,
    key: CacheKey,
    slot: Weak<Slot>,
    generation: u64,
}

impl PartialEq for Timer {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Timer {}

impl PartialOrd for Timer {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Timer {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// A timer that came due: which entry, and which generation of it, the timer was set for.
pub(super) struct Due {
    pub key: CacheKey,
    pub slot: Weak<Slot>,
    pub generation: u64,
}

#[derive(Default)]
pub(super) struct Timers {
    heap: Mutex<(BinaryHeap<Reverse<Timer>>, u64)>,
    wake: Notify,
    started: AtomicBool,
}

impl Timers {
    /// Arrange for `cache.on_timer` to run for `slot` at `at`; started lazily, so a cache
    /// built outside a runtime (benches) works until its first fetch.
    pub fn schedule(
        self: &Arc<Self>,
        cache: &Weak<CredentialCache>,
        key: CacheKey,
        slot: &Arc<Slot>,
        at: Instant,
        generation: u64,
    ) {
        let earliest = {
            let mut guard = self.heap.lock().unwrap_or_else(|p| p.into_inner());
            let (heap, seq) = &mut *guard;
            *seq += 1;
            let earlier = heap.peek().is_none_or(|Reverse(t)| at < t.at);
            heap.push(Reverse(Timer {
                at,
                seq: *seq,
                key,
                slot: Arc::downgrade(slot),
                generation,
            }));
            earlier
        };
        if !self.started.swap(true, Ordering::AcqRel) {
            tokio::spawn(run(self.clone(), cache.clone()));
        } else if earliest {
            self.wake.notify_one();
        }
    }

    /// Timers due at `now`, and the instant of the next one.
    fn take_due(&self, now: Instant) -> (Vec<Due>, Option<Instant>) {
        let mut guard = self.heap.lock().unwrap_or_else(|p| p.into_inner());
        let heap = &mut guard.0;
        let mut due = Vec::new();
        while let Some(Reverse(t)) = heap.peek() {
            if t.at > now {
                return (due, Some(t.at));
            }
            if let Some(Reverse(t)) = heap.pop() {
                due.push(Due {
                    key: t.key,
                    slot: t.slot,
                    generation: t.generation,
                });
            }
        }
        (due, None)
    }

    /// Timers waiting, stale ones included (for tests).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.heap.lock().unwrap_or_else(|p| p.into_inner()).0.len()
    }

    /// Wake the scheduler so it notices that its cache is gone.
    pub fn shut_down(&self) {
        self.wake.notify_one();
    }
}

/// The scheduler task: ends when the cache is dropped.
async fn run(timers: Arc<Timers>, cache: Weak<CredentialCache>) {
    loop {
        let notified = timers.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (due, next) = timers.take_due(Instant::now());
        {
            let Some(cache) = cache.upgrade() else {
                return;
            };
            for d in due {
                cache.on_timer(d);
            }
        }
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = &mut notified => {}
                }
            }
            None => notified.await,
        }
    }
}
