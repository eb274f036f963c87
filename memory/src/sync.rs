//! Synchronisation primitives the region table is built from.
//!
//! Normal builds use `std` atomics, `parking_lot` for the table lock (it has timed
//! acquisition) and `arc-swap` for the lock-free published snapshot. Under `--cfg loom`
//! the same names resolve to loom's models so the protocol code itself, not a copy
//! of it, is checked exhaustively. The loom stand-in for `ArcSwap` is a mutex held
//! only for a pointer copy: it models the publication order, which is what the
//! protocol relies on, not the lock-freedom, which `arc-swap` provides.

use std::time::Instant;

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::{Arc, Mutex, MutexGuard};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::{Arc, Mutex, MutexGuard};

/// A point in time after which a wait gives up; `None` waits for ever.
pub type Deadline = Option<Instant>;

/// Lock-free publication of an immutable value (the region table's snapshot of regions).
pub(crate) struct Published<T> {
    #[cfg(not(loom))]
    inner: arc_swap::ArcSwap<T>,
    #[cfg(loom)]
    inner: loom::sync::Mutex<Arc<T>>,
}

impl<T> Published<T> {
    pub(crate) fn new(value: T) -> Self {
        Published {
            #[cfg(not(loom))]
            inner: arc_swap::ArcSwap::from_pointee(value),
            #[cfg(loom)]
            inner: loom::sync::Mutex::new(Arc::new(value)),
        }
    }

    /// A read of the current value.
    #[cfg(loom)]
    pub(crate) fn load(&self) -> Arc<T> {
        self.inner.lock().unwrap().clone()
    }

    /// A counted reference to the current value.
    #[cfg(not(loom))]
    pub(crate) fn load_full(&self) -> Arc<T> {
        self.inner.load_full()
    }

    /// A counted reference to the current value.
    #[cfg(loom)]
    pub(crate) fn load_full(&self) -> Arc<T> {
        self.load()
    }

    /// Replaces the value; readers see either the old or the new one.
    pub(crate) fn store(&self, value: T) {
        #[cfg(not(loom))]
        self.inner.store(Arc::new(value));
        #[cfg(loom)]
        {
            *self.inner.lock().unwrap() = Arc::new(value);
        }
    }
}

/// The table lock: a fair reader-writer lock (a waiting writer blocks new readers,
/// like `mmap_lock`) whose acquisitions can be given a deadline.
pub(crate) struct TableRwLock<T> {
    #[cfg(not(loom))]
    inner: parking_lot::RwLock<T>,
    #[cfg(loom)]
    inner: loom::sync::RwLock<T>,
}

#[cfg(not(loom))]
pub(crate) type TableReadGuard<'a, T> = parking_lot::RwLockReadGuard<'a, T>;
#[cfg(not(loom))]
pub(crate) type TableWriteGuard<'a, T> = parking_lot::RwLockWriteGuard<'a, T>;
#[cfg(loom)]
pub(crate) type TableReadGuard<'a, T> = loom::sync::RwLockReadGuard<'a, T>;
#[cfg(loom)]
pub(crate) type TableWriteGuard<'a, T> = loom::sync::RwLockWriteGuard<'a, T>;

impl<T> TableRwLock<T> {
    pub(crate) fn new(value: T) -> Self {
        TableRwLock {
            #[cfg(not(loom))]
            inner: parking_lot::RwLock::new(value),
            #[cfg(loom)]
            inner: loom::sync::RwLock::new(value),
        }
    }

    /// Read-locks, or returns `None` once `deadline` has passed.
    pub(crate) fn read_until(&self, deadline: Deadline) -> Option<TableReadGuard<'_, T>> {
        #[cfg(not(loom))]
        match deadline {
            Some(d) => self.inner.try_read_until(d),
            None => Some(self.inner.read()),
        }
        #[cfg(loom)]
        {
            let _ = deadline;
            Some(self.inner.read().unwrap())
        }
    }

    /// Write-locks, or returns `None` once `deadline` has passed.
    pub(crate) fn write_until(&self, deadline: Deadline) -> Option<TableWriteGuard<'_, T>> {
        #[cfg(not(loom))]
        match deadline {
            Some(d) => self.inner.try_write_until(d),
            None => Some(self.inner.write()),
        }
        #[cfg(loom)]
        {
            let _ = deadline;
            Some(self.inner.write().unwrap())
        }
    }
}

/// Where a writer sleeps while a region's readers drain, keyed by an address.
///
/// Waking is by key only: a releasing reader computes the key while it still holds its
/// lock and, after its last access to the region (the decrement), wakes by key without
/// touching the region again, so the writer may free the region as soon as it sees
/// no readers (the problem RCU solves for Linux's `vma_end_read`).
#[cfg(not(loom))]
pub(crate) mod parking {
    use super::Deadline;

    /// Sleeps on `key` while `still_wait()` holds (checked under the parking
    /// lot's bucket lock, so a wake-up between check and sleep is not lost).
    /// Returns `false` if `deadline` passed.
    pub(crate) fn park_while(
        key: usize,
        deadline: Deadline,
        still_wait: impl Fn() -> bool,
    ) -> bool {
        loop {
            if !still_wait() {
                return true;
            }
            // SAFETY: `key` is an address we own for the wait's duration, the
            // callbacks neither panic nor call into the parking lot.
            let result = unsafe {
                parking_lot_core::park(
                    key,
                    &still_wait,
                    || {},
                    |_, _| {},
                    parking_lot_core::DEFAULT_PARK_TOKEN,
                    deadline,
                )
            };
            if result == parking_lot_core::ParkResult::TimedOut {
                return !still_wait();
            }
        }
    }

    /// Wakes every thread parked on `key`.
    pub(crate) fn unpark_all(key: usize) {
        // SAFETY: waking by key dereferences nothing of the keyed object.
        unsafe { parking_lot_core::unpark_all(key, parking_lot_core::DEFAULT_UNPARK_TOKEN) };
    }
}

/// Loom model of the parking lot: one mutex and condition variable standing in for
/// the bucket lock and queue (loom models never free regions, so keys are not needed).
/// Time does not pass under loom: a wait with a deadline ends early only once a model
/// thread calls [`pass_deadlines`] (at whatever point loom schedules it).
#[cfg(loom)]
pub(crate) mod parking {
    use super::Deadline;
    use loom::sync::atomic::{AtomicBool, Ordering};
    use loom::sync::{Condvar, Mutex};

    loom::lazy_static! {
        static ref LOT: (Mutex<()>, Condvar) = (Mutex::new(()), Condvar::new());
        static ref DEADLINES_PASSED: AtomicBool = AtomicBool::new(false);
    }

    pub(crate) fn park_while(
        _key: usize,
        deadline: Deadline,
        still_wait: impl Fn() -> bool,
    ) -> bool {
        let mut guard = LOT.0.lock().unwrap();
        while still_wait() {
            if deadline.is_some() && DEADLINES_PASSED.load(Ordering::SeqCst) {
                return false;
            }
            guard = LOT.1.wait(guard).unwrap();
        }
        true
    }

    pub(crate) fn unpark_all(_key: usize) {
        drop(LOT.0.lock().unwrap());
        LOT.1.notify_all();
    }

    /// Every deadline of this model execution has passed from now on: waits for
    /// readers that have one give up (the table's drain timeout).
    pub fn pass_deadlines() {
        DEADLINES_PASSED.store(true, Ordering::SeqCst);
        unpark_all(0);
    }
}

/// A small per-thread number, used to spread reader counts over shards.
#[cfg(not(loom))]
#[inline]
pub(crate) fn thread_shard_seed() -> usize {
    use std::cell::Cell;
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    std::thread_local!(static SEED: Cell<usize> = const { Cell::new(usize::MAX) });
    SEED.with(|seed| {
        if seed.get() == usize::MAX {
            seed.set(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        }
        seed.get()
    })
}

/// Under loom the seed must be the same in every execution: derive it from the model
/// thread's id, which loom assigns deterministically.
#[cfg(loom)]
pub(crate) fn thread_shard_seed() -> usize {
    let id = format!("{:?}", loom::thread::current().id());
    id.bytes()
        .filter(u8::is_ascii_digit)
        .fold(0usize, |n, d| n * 10 + usize::from(d - b'0'))
}

/// Orders a preceding store before a following load of another location (the
/// store-then-load pattern of reader and writer).
///
/// With every access `SeqCst`, as here, the C++/Rust memory model already orders them
/// and real builds need nothing more (on x86 the locked read-modify-write is a full
/// barrier). loom treats `SeqCst` accesses as acquire/release only, so under loom an
/// explicit `SeqCst` fence states the ordering in a form it models.
#[inline(always)]
pub(crate) fn store_load_fence() {
    #[cfg(loom)]
    loom::sync::atomic::fence(Ordering::SeqCst);
}
