//! The one rule for the agent's std locks: a poisoned lock is recovered, not propagated.
//!
//! Every `Mutex` and `RwLock` in the agent guards state whose critical sections leave it valid
//! at every point where they can panic: they insert, remove or replace whole values (a map
//! entry, a heap timer, a counter, a cached list) and never leave a half-written one behind.
//! So a panic in one holder (a bug, caught by tokio as a failed task) says nothing about the
//! data, and the lock is taken over with [`PoisonError::into_inner`]. The alternatives each
//! turn one panic into a permanent outage: propagating it panics every later holder, and
//! mapping it to "empty" or "not loaded" makes the agent refuse every pod from then on.
//!
//! Read-mostly values swapped whole (the verification key set, the associations table) are
//! not behind a lock at all: they are `arc_swap` cells, which cannot poison.
//!
//! A new lock whose critical section can leave its data half-changed must not use these: give
//! it its own recovery, or restructure it so the rule holds.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Lock `mutex`, recovering it if a holder panicked (see the module's rule).
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Read-lock `lock`, recovering it if a writer panicked (see the module's rule).
pub fn read<T: ?Sized>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

/// Write-lock `lock`, recovering it if a holder panicked (see the module's rule).
pub fn write<T: ?Sized>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// Poison `mutex` the way a bug would: a thread panics while holding it.
#[cfg(test)]
pub(crate) fn poison<T: Send>(mutex: &Mutex<T>) {
    std::thread::scope(|s| {
        let _ = s
            .spawn(|| {
                let _guard = mutex.lock();
                panic!("a holder panics (poisoning the lock on purpose)");
            })
            .join();
    });
    assert!(mutex.is_poisoned());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_is_taken_over_with_its_data() {
        let mutex = Mutex::new(vec![1]);
        poison(&mutex);
        lock(&mutex).push(2);
        assert_eq!(*lock(&mutex), [1, 2]);

        let rw = RwLock::new(1);
        std::thread::scope(|s| {
            let _ = s
                .spawn(|| {
                    let _guard = rw.write();
                    panic!("a writer panics");
                })
                .join();
        });
        assert!(rw.is_poisoned());
        *write(&rw) += 1;
        assert_eq!(*read(&rw), 2);
    }
}
