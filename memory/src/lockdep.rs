//! A small lock checker: every thread keeps a record of the region-table locks it
//! holds, and a lock-order violation panics at once, naming the locks.
//!
//! The rules (guarantee 4 of the region-table design):
//! - the table lock is taken before any region lock, never while a region guard is held;
//! - the two-tier lookup, which may wait for a writer, is never called while the
//!   thread holds a region guard or the table lock.
//!
//! Checks run in debug builds (and so in tests). Records are also kept in a global
//! list so a watchdog can print what every thread holds when something stalls.

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

/// One lock a thread holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeldLock {
    /// The table lock, held for reading.
    TableRead,
    /// The table lock, held for writing.
    TableWrite,
    /// A region read lock (a `RegionGuard`), by region id.
    RegionRead(u64),
}

impl fmt::Display for HeldLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeldLock::TableRead => write!(f, "table lock (read)"),
            HeldLock::TableWrite => write!(f, "table lock (write)"),
            HeldLock::RegionRead(id) => write!(f, "region {id} read lock"),
        }
    }
}

struct ThreadRecord {
    name: String,
    held: Mutex<Vec<HeldLock>>,
}

fn registry() -> &'static Mutex<Vec<std::sync::Weak<ThreadRecord>>> {
    static REGISTRY: OnceLock<Mutex<Vec<std::sync::Weak<ThreadRecord>>>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(Vec::new()))
}

thread_local! {
    static RECORD: Arc<ThreadRecord> = {
        let record = Arc::new(ThreadRecord {
            name: std::thread::current()
                .name()
                .map(str::to_owned)
                .unwrap_or_else(|| format!("{:?}", std::thread::current().id())),
            held: Mutex::new(Vec::new()),
        });
        let mut all = registry().lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|weak| weak.strong_count() > 0);
        all.push(Arc::downgrade(&record));
        record
    };
}

/// Whether lock checking is on: debug builds, except under loom, whose model threads
/// share one OS thread and so one thread-local record.
pub const ENABLED: bool = cfg!(debug_assertions) && !cfg!(loom);

/// Runs `f` on the calling thread's record. While the thread exits, code in other
/// thread-locals' destructors may still take locks after the record is gone: that is
/// not checked (`f` does not run; the default comes back).
fn with_held<R: Default>(f: impl FnOnce(&mut Vec<HeldLock>) -> R) -> R {
    RECORD
        .try_with(|record| f(&mut record.held.lock().unwrap_or_else(|e| e.into_inner())))
        .unwrap_or_default()
}

fn describe(held: &[HeldLock]) -> String {
    held.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Panics if the calling thread holds any region-table lock: `what` is about to wait
/// for writers, which could close a cycle with a writer draining a held region.
pub(crate) fn assert_may_wait(what: &str) {
    if !ENABLED {
        return;
    }
    with_held(|held| {
        if !held.is_empty() {
            let names = describe(held);
            // Release the record before panicking so unwinding guards do not
            // find it locked.
            held.clear();
            panic!("lock order violation: {what} called while holding [{names}]");
        }
    });
}

/// Records that the thread is about to take the table lock; panics if it holds a
/// region lock (the order is table lock, then region lock) or the table lock itself
/// (a writer's callback calling into the table would wait for itself).
pub(crate) fn acquire_table(lock: HeldLock) {
    if !ENABLED {
        return;
    }
    with_held(|held| {
        if let Some(table) = held
            .iter()
            .find(|l| matches!(l, HeldLock::TableRead | HeldLock::TableWrite))
            .cloned()
        {
            let names = describe(held);
            held.clear();
            panic!(
                "lock order violation: {lock} taken while holding {table}, a self-deadlock \
                 (held: [{names}])"
            );
        }
        if let Some(region) = held
            .iter()
            .find(|l| matches!(l, HeldLock::RegionRead(_)))
            .cloned()
        {
            let names = describe(held);
            held.clear();
            panic!("lock order violation: {lock} taken while holding {region} (held: [{names}])");
        }
        held.push(lock);
    });
}

/// Records that the thread took a region read lock.
#[inline(always)]
pub(crate) fn acquire_region(id: u64) {
    if ENABLED {
        with_held(|held| held.push(HeldLock::RegionRead(id)));
    }
}

/// Records that the thread released `lock`.
#[inline(always)]
pub(crate) fn release(lock: &HeldLock) {
    if ENABLED {
        with_held(|held| {
            if let Some(pos) = held.iter().rposition(|l| l == lock) {
                held.remove(pos);
            }
        });
    }
}

/// The locks the calling thread holds now.
pub fn held_by_current_thread() -> Vec<HeldLock> {
    with_held(|held| held.clone())
}

/// Every live thread's name and the region-table locks it holds, for a watchdog
/// report. Threads holding nothing are left out.
pub fn held_by_all_threads() -> Vec<(String, Vec<HeldLock>)> {
    let all = registry().lock().unwrap_or_else(|e| e.into_inner());
    all.iter()
        .filter_map(std::sync::Weak::upgrade)
        .filter_map(|record| {
            let held = record
                .held
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            (!held.is_empty()).then(|| (record.name.clone(), held))
        })
        .collect()
}
