//! The snapshot readers look regions up in without locks: an immutable, sorted list of
//! regions, published by writers and read through a per-thread cache.
//!
//! Loading an `ArcSwap` costs about as much as the rest of a fast-path lookup, so each
//! thread keeps the snapshot it last used with the publication generation it belongs
//! to, and reloads only when the generation moved: a hit costs one shared load. A
//! cached snapshot may be a moment old, like any lock-free read; the region lock
//! protocol (removed and write marks, range re-check) makes a stale snapshot fail the fast
//! path, never return a wrong region. Holding a cached snapshot keeps removed regions'
//! bookkeeping (not their memory, which removal frees) alive until the thread's next
//! lookup.

use vm_memory::GuestAddress;

use crate::region::Region;
use crate::region_lock::RegionLock;
use crate::sync::{Arc, AtomicU64, Ordering, Published};

/// Up to this many entries, lookups scan the starts instead of bisecting them.
const LINEAR_SEARCH_MAX: usize = 16;

/// Regions per chunk at most: a writer copies one chunk and the list of chunks, so its
/// cost grows with neither the number of regions (hotplug makes thousands) nor the
/// chunk count much.
const CHUNK: usize = 64;

/// Regions sorted by start. The lookup searches flat arrays of starts and region
/// pointers (one search, one pointer per hit, as with a single sorted list); the regions
/// themselves are owned by chunks shared between snapshots. A writer's change copies the
/// one chunk it touches, the chunk list, and the two flat arrays — plain memory copies,
/// no reference count touched per region — so its cost hardly grows with the number of
/// regions.
#[derive(Clone)]
pub(crate) struct Snapshot {
    /// Every region's start, sorted.
    starts: Vec<u64>,
    /// Every region, in the order of `starts`; owned by `chunks`.
    regions: Vec<*const Region>,
    /// The same regions in order, in chunks of at most [`CHUNK`] (never empty).
    chunks: Vec<Arc<Chunk>>,
}

// SAFETY: the region pointers point into regions `chunks` owns (through `Arc`s), which
// are `Send + Sync`; a snapshot only reads through them.
unsafe impl Send for Snapshot {}
// SAFETY: as for `Send`.
unsafe impl Sync for Snapshot {}

type Chunk = Vec<Arc<Region>>;

/// Index of the last of `starts` (sorted) at or below `addr`.
#[inline(always)]
fn last_at_or_below(starts: &[u64], addr: u64) -> Option<usize> {
    // Few entries (the usual case): a branch-free count beats a binary search.
    let idx = if starts.len() <= LINEAR_SEARCH_MAX {
        starts.iter().map(|&s| usize::from(s <= addr)).sum()
    } else {
        starts.partition_point(|&s| s <= addr)
    };
    idx.checked_sub(1)
}

impl Snapshot {
    pub(crate) fn empty() -> Snapshot {
        Snapshot {
            starts: Vec::new(),
            regions: Vec::new(),
            chunks: Vec::new(),
        }
    }

    /// The region starting at or below `addr` (it may not contain `addr`).
    #[inline(always)]
    pub(crate) fn find(&self, addr: GuestAddress) -> Option<&Region> {
        let i = last_at_or_below(&self.starts, addr.0)?;
        // SAFETY: `regions[i]` points into a region one of `self.chunks` owns, alive as
        // long as `self`, which the returned reference borrows.
        Some(unsafe { &*self.regions[i] })
    }

    /// Every region, by start.
    pub(crate) fn regions(&self) -> impl Iterator<Item = &Arc<Region>> {
        self.chunks.iter().flat_map(|chunk| chunk.iter())
    }

    /// Adds `region` (no region of the snapshot starts where it does).
    pub(crate) fn insert(&mut self, region: Arc<Region>) {
        let start = region.start().0;
        let at = self.starts.partition_point(|&s| s < start);
        self.starts.insert(at, start);
        self.regions.insert(at, Arc::as_ptr(&region));
        // The chunk whose range holds `start`; the first one if it starts before all.
        let c = self
            .chunks
            .partition_point(|chunk| chunk[0].start().0 <= start)
            .saturating_sub(1);
        let Some(old) = self.chunks.get(c) else {
            self.chunks.push(Arc::new(vec![region]));
            return;
        };
        let mut chunk = Chunk::clone(old);
        let at = chunk.partition_point(|r| r.start().0 < start);
        debug_assert!(
            chunk.get(at).is_none_or(|r| r.start().0 != start),
            "{start:#x} is taken"
        );
        chunk.insert(at, region);
        if chunk.len() > CHUNK {
            let tail = chunk.split_off(CHUNK / 2);
            self.chunks.insert(c + 1, Arc::new(tail));
        }
        self.chunks[c] = Arc::new(chunk);
    }

    /// Removes the region starting at `start`, if there is one.
    pub(crate) fn remove(&mut self, start: u64) {
        let Ok(flat) = self.starts.binary_search(&start) else {
            return;
        };
        self.starts.remove(flat);
        self.regions.remove(flat);
        let c = self
            .chunks
            .partition_point(|chunk| chunk[0].start().0 <= start)
            - 1;
        let mut chunk = Chunk::clone(&self.chunks[c]);
        chunk.retain(|r| r.start().0 != start);
        if chunk.is_empty() {
            self.chunks.remove(c);
        } else {
            self.chunks[c] = Arc::new(chunk);
        }
    }
}

/// Where writers publish snapshots.
pub(crate) struct SnapshotCell {
    published: Published<Snapshot>,
    /// Which publication is current: a number no other publication of any table in
    /// the process shares, so one comparison tells a thread whether its cached
    /// snapshot is this table's current one (table addresses can be reused).
    generation: AtomicU64,
}

/// Hands out publication generations, unique in the process. Starts at 1: a thread's
/// empty cache holds 0.
fn next_generation() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// What the fast path reads from thread-local storage: plain values with no
/// destructor, so an access is a plain load (no lazy-registration check).
#[cfg(not(loom))]
#[derive(Clone, Copy)]
struct FastCache {
    /// `SnapshotCell::generation` of the cached snapshot; 0 for none.
    generation: u64,
    /// Points into the `Arc` that `OWNER` holds.
    snapshot: *const Snapshot,
    /// `RegionLock::current_shard()`, kept here so a hit needs no second lookup.
    shard: usize,
}

/// Owns the snapshot `FAST` points to. Dropped at thread exit, clearing `FAST` first.
#[cfg(not(loom))]
struct SnapshotOwner(Option<Arc<Snapshot>>);

#[cfg(not(loom))]
impl Drop for SnapshotOwner {
    fn drop(&mut self) {
        let _ = FAST.try_with(|fast| {
            fast.set(FastCache {
                generation: 0,
                snapshot: std::ptr::null(),
                ..fast.get()
            })
        });
    }
}

#[cfg(not(loom))]
std::thread_local! {
    static FAST: std::cell::Cell<FastCache> = const {
        std::cell::Cell::new(FastCache {
            generation: 0,
            snapshot: std::ptr::null(),
            shard: 0,
        })
    };
    static OWNER: std::cell::RefCell<SnapshotOwner> =
        const { std::cell::RefCell::new(SnapshotOwner(None)) };
}

impl SnapshotCell {
    pub(crate) fn new(snapshot: Snapshot) -> SnapshotCell {
        SnapshotCell {
            published: Published::new(snapshot),
            generation: AtomicU64::new(next_generation()),
        }
    }

    /// Publishes `snapshot`: lookups from now on see it. Writers are serialised.
    pub(crate) fn store(&self, snapshot: Snapshot) {
        self.published.store(snapshot);
        self.generation.store(next_generation(), Ordering::SeqCst);
    }

    /// Runs `f` with the current snapshot and the calling thread's reader shard.
    /// `f` must not look anything up in a table itself (it does not: it is the fast
    /// path's lock attempt). `f` is called from one place only, so the compiler can
    /// inline it into the hit path.
    #[cfg(not(loom))]
    #[inline(always)]
    pub(crate) fn with<R>(&self, f: impl FnOnce(&Snapshot, usize) -> R) -> R {
        let generation = self.generation.load(Ordering::Acquire);
        let mut cache = FAST.with(std::cell::Cell::get);
        // Set only while the thread exits and its cache is gone: no caching then.
        let mut uncached = None;
        // Generations start at 1, so an empty cache (0) always reloads.
        if cache.generation != generation {
            match self.reload(generation) {
                Some(fresh) => cache = fresh,
                None => {
                    cache.shard = RegionLock::current_shard();
                    uncached = Some(self.published.load_full());
                }
            }
        }
        let snapshot = match &uncached {
            Some(snapshot) => snapshot,
            // SAFETY: `cache.snapshot` points into the `Arc` that this thread's `OWNER`
            // holds. Only `reload`, on this thread, replaces that `Arc`, and not while
            // `f` runs; `OWNER`'s destructor clears `FAST` before the `Arc` goes.
            None => unsafe { &*cache.snapshot },
        };
        f(snapshot, cache.shard)
    }

    /// Loads the current snapshot into this thread's cache. `generation` was read
    /// before the load: if a publication slips in between, the next lookup sees a
    /// newer generation and reloads again. Out of line, so the hit path stays small.
    #[cfg(not(loom))]
    #[cold]
    #[inline(never)]
    fn reload(&self, generation: u64) -> Option<FastCache> {
        let snapshot = self.published.load_full();
        OWNER
            .try_with(|owner| {
                let pointer = Arc::as_ptr(&snapshot);
                // Drops the previously cached snapshot.
                owner.borrow_mut().0 = Some(snapshot);
                let fresh = FastCache {
                    generation,
                    snapshot: pointer,
                    shard: RegionLock::current_shard(),
                };
                FAST.with(|fast| fast.set(fresh));
                fresh
            })
            .ok()
    }

    /// Under loom: a plain load (the model checks publication order, not caching).
    #[cfg(loom)]
    pub(crate) fn with<R>(&self, f: impl FnOnce(&Snapshot, usize) -> R) -> R {
        let _ = self.generation.load(Ordering::Acquire);
        f(&self.published.load(), RegionLock::current_shard())
    }

    /// The current snapshot, loaded directly (for reports and writers).
    /// Which publication is current (see the field).
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    pub(crate) fn current(&self) -> Arc<Snapshot> {
        self.published.load_full()
    }
}
