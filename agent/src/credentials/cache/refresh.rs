//! The one background scheduler of the cache. Every entry has at most one live timer: its
//! refresh point, its next retry after a failure, or the instant its credentials stop being
//! servable. The timers sit in one heap served by one task, so an idle entry costs a heap
//! slot, not a sleeping task. A timer carries the entry's generation; a fetch that completes
//! bumps it, which turns older timers into no-ops.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::Notify;
use tokio::time::Instant;

use super::slot::Slot;
use super::{CacheKey, CredentialCache};
use crate::sync;

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

/// The heap is compacted whenever it has grown to twice its size after the last compaction,
/// and not below this: compaction is linear in the heap, so doubling keeps it amortised O(1)
/// per timer.
const MIN_COMPACTION_SIZE: usize = 1024;

#[derive(Default)]
struct Heap {
    timers: BinaryHeap<Reverse<Timer>>,
    seq: u64,
    /// Compact when the heap reaches this many timers.
    compact_at: usize,
}

impl Heap {
    /// Drop the timers that can no longer do anything: those of slots that are gone (evicted,
    /// or their pod gone) and those of a slot's older generations. What is left is at most
    /// one generation per live slot, so the heap is bounded by the cache's size, not by the
    /// number of keys ever seen: a node whose pods churn does not grow it.
    fn compact(&mut self) {
        let mut newest: HashMap<*const Slot, u64> = HashMap::new();
        for Reverse(t) in self.timers.iter() {
            if t.slot.strong_count() > 0 {
                let generation = newest.entry(t.slot.as_ptr()).or_insert(t.generation);
                *generation = (*generation).max(t.generation);
            }
        }
        self.timers.retain(|Reverse(t)| {
            t.slot.strong_count() > 0 && newest.get(&t.slot.as_ptr()) == Some(&t.generation)
        });
        self.compact_at = (2 * self.timers.len()).max(MIN_COMPACTION_SIZE);
    }
}

#[derive(Default)]
pub(super) struct Timers {
    heap: Mutex<Heap>,
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
            let mut heap = sync::lock(&self.heap);
            if heap.timers.len() >= heap.compact_at.max(MIN_COMPACTION_SIZE) {
                heap.compact();
            }
            heap.seq += 1;
            let earlier = heap.timers.peek().is_none_or(|Reverse(t)| at < t.at);
            let seq = heap.seq;
            heap.timers.push(Reverse(Timer {
                at,
                seq,
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
        let mut guard = sync::lock(&self.heap);
        let heap = &mut guard.timers;
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
        sync::lock(&self.heap).timers.len()
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
