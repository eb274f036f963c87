//! The lookup view readers use without locks: an immutable, sorted list of regions,
//! published by writers and read through a per-thread cache.
//!
//! Loading an `ArcSwap` costs about as much as the rest of a fast-path lookup, so each
//! thread keeps the snapshot it last used with the publication generation it belongs
//! to, and reloads only when the generation moved: a hit costs one shared load. A
//! cached snapshot may be a moment old, like any lock-free read; the region lock
//! protocol (removed and write marks, range re-check) makes a stale view fail the fast
//! path, never return a wrong region. Holding a cached snapshot keeps removed regions'
//! bookkeeping (not their memory, which removal frees) alive until the thread's next
//! lookup.

use vm_memory::GuestAddress;

use crate::region::Region;
use crate::sync::{thread_shard_seed, Arc, AtomicU64, Ordering, Published};

/// Up to this many regions, lookups scan the starts instead of bisecting them.
const LINEAR_SEARCH_MAX: usize = 16;

/// Regions sorted by start, with the starts in a flat array so the search does not
/// chase a pointer per comparison.
pub(crate) struct Snapshot {
    starts: Vec<u64>,
    regions: Vec<Arc<Region>>,
}

impl Snapshot {
    pub(crate) fn new(regions: Vec<Arc<Region>>) -> Snapshot {
        debug_assert!(regions.windows(2).all(|w| w[0].start() < w[1].start()));
        Snapshot {
            starts: regions.iter().map(|r| r.start().0).collect(),
            regions,
        }
    }

    /// The region starting at or below `addr` (it may not contain `addr`).
    #[inline(always)]
    pub(crate) fn find(&self, addr: GuestAddress) -> Option<&Arc<Region>> {
        // Few regions (the usual case): a branch-free count beats a binary search.
        let idx = if self.starts.len() <= LINEAR_SEARCH_MAX {
            self.starts.iter().map(|&s| usize::from(s <= addr.0)).sum()
        } else {
            self.starts.partition_point(|&s| s <= addr.0)
        };
        idx.checked_sub(1).map(|i| &self.regions[i])
    }

    pub(crate) fn regions(&self) -> &[Arc<Region>] {
        &self.regions
    }
}

/// Where writers publish snapshots.
pub(crate) struct SnapshotCell {
    published: Published<Snapshot>,
    /// Bumped after every publication.
    generation: AtomicU64,
    /// Tells tables apart in per-thread caches (addresses can be reused).
    #[cfg(not(loom))]
    uid: u64,
}

#[cfg(not(loom))]
struct ReaderCache {
    seed: usize,
    table: u64,
    generation: u64,
    snapshot: Option<Arc<Snapshot>>,
}

#[cfg(not(loom))]
std::thread_local! {
    // Constant-initialised: no lazy-initialisation check on every access.
    static READER: std::cell::RefCell<ReaderCache> = const {
        std::cell::RefCell::new(ReaderCache {
            seed: usize::MAX,
            table: 0,
            generation: 0,
            snapshot: None,
        })
    };
}

impl SnapshotCell {
    pub(crate) fn new(snapshot: Snapshot) -> SnapshotCell {
        #[cfg(not(loom))]
        static NEXT_UID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        SnapshotCell {
            published: Published::new(snapshot),
            generation: AtomicU64::new(0),
            #[cfg(not(loom))]
            uid: NEXT_UID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Publishes `snapshot`: lookups from now on see it.
    pub(crate) fn store(&self, snapshot: Snapshot) {
        self.published.store(snapshot);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Runs `f` with the current snapshot and the calling thread's shard seed.
    #[cfg(not(loom))]
    #[inline(always)]
    pub(crate) fn with<R>(&self, f: impl FnOnce(&Snapshot, usize) -> R) -> R {
        READER.with(|cell| {
            let mut cache = cell.borrow_mut();
            let generation = self.generation.load(Ordering::Acquire);
            // Table uids start at 1, so a fresh cache (table 0) always loads.
            if cache.table != self.uid || cache.generation != generation {
                // Read the generation before the snapshot: if a publication slips in
                // between, the next lookup sees a newer generation and reloads.
                cache.snapshot = Some(self.published.load_full());
                cache.table = self.uid;
                cache.generation = generation;
                if cache.seed == usize::MAX {
                    cache.seed = thread_shard_seed();
                }
            }
            let seed = cache.seed;
            // The borrow ends with this call; `f` does not re-enter the cache.
            let snapshot = cache.snapshot.as_deref().expect("filled above");
            f(snapshot, seed)
        })
    }

    /// Under loom: a plain load (the model checks publication order, not caching).
    #[cfg(loom)]
    pub(crate) fn with<R>(&self, f: impl FnOnce(&Snapshot, usize) -> R) -> R {
        let _ = self.generation.load(Ordering::Acquire);
        f(&self.published.load(), thread_shard_seed())
    }

    /// The current snapshot, loaded directly (for reports and writers).
    pub(crate) fn current(&self) -> Arc<Snapshot> {
        self.published.load_full()
    }
}
