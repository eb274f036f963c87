//! What the region table counts: lookups by path, writer waits, and per-region readers.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crossbeam_utils::CachePadded;

use crate::region::RegionId;
use crate::region_lock::SHARDS;

/// Lookup counters of one shard. Each thread counts in its own shard with plain
/// load-and-store (no locked instruction on the fast path), so counts are exact
/// unless two threads share a shard, and then at worst slightly low.
#[derive(Default)]
struct LookupShard {
    fast_hits: AtomicU64,
    fast_misses: AtomicU64,
    slow_paths: AtomicU64,
}

/// Which lookup counter to bump.
#[derive(Clone, Copy)]
pub(crate) enum Lookup {
    FastHit,
    FastMiss,
    SlowPath,
}

/// How many writer waits are kept for percentiles.
const WAIT_SAMPLES: usize = 16_384;

pub(crate) struct TableStats {
    lookups: Box<[CachePadded<LookupShard>]>,
    writer_waits: Mutex<VecDeque<u64>>,
    writer_wait_total: AtomicU64,
}

impl Default for TableStats {
    fn default() -> Self {
        TableStats {
            lookups: (0..SHARDS).map(|_| CachePadded::default()).collect(),
            writer_waits: Mutex::new(VecDeque::with_capacity(WAIT_SAMPLES)),
            writer_wait_total: AtomicU64::new(0),
        }
    }
}

impl TableStats {
    #[inline(always)]
    pub(crate) fn count(&self, shard: usize, what: Lookup) {
        let s = &self.lookups[shard];
        let c = match what {
            Lookup::FastHit => &s.fast_hits,
            Lookup::FastMiss => &s.fast_misses,
            Lookup::SlowPath => &s.slow_paths,
        };
        c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    pub(crate) fn record_writer_wait(&self, wait: Duration) {
        let ns = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
        self.writer_wait_total.fetch_add(1, Ordering::Relaxed);
        let mut waits = self.writer_waits.lock().unwrap_or_else(|e| e.into_inner());
        if waits.len() == WAIT_SAMPLES {
            waits.pop_front();
        }
        waits.push_back(ns);
    }

    pub(crate) fn snapshot(&self, regions: Vec<RegionMetrics>) -> TableMetrics {
        let sum = |f: fn(&LookupShard) -> &AtomicU64| {
            self.lookups
                .iter()
                .map(|s| f(s).load(Ordering::Relaxed))
                .sum()
        };
        let mut waits: Vec<u64> = self
            .writer_waits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect();
        waits.sort_unstable();
        TableMetrics {
            fast_path_hits: sum(|s| &s.fast_hits),
            fast_path_misses: sum(|s| &s.fast_misses),
            slow_path_lookups: sum(|s| &s.slow_paths),
            writer_waits: WaitStats::from_sorted(
                self.writer_wait_total.load(Ordering::Relaxed),
                &waits,
            ),
            regions,
            retired_regions: 0,
            writers_draining: 0,
            slow_path_readers: 0,
        }
    }
}

/// Percentiles of writer waits (time to get the table lock and drain the region's readers).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WaitStats {
    /// Writer operations recorded since the table was made.
    pub count: u64,
    /// Median wait of the recent operations, in nanoseconds.
    pub p50_ns: u64,
    /// 99th percentile, in nanoseconds.
    pub p99_ns: u64,
    /// Longest recent wait, in nanoseconds.
    pub max_ns: u64,
}

impl WaitStats {
    /// Percentiles over `sorted` (ascending samples).
    pub fn from_sorted(count: u64, sorted: &[u64]) -> WaitStats {
        let pick = |q: f64| {
            if sorted.is_empty() {
                0
            } else {
                sorted[((sorted.len() - 1) as f64 * q).round() as usize]
            }
        };
        WaitStats {
            count,
            p50_ns: pick(0.50),
            p99_ns: pick(0.99),
            max_ns: sorted.last().copied().unwrap_or(0),
        }
    }
}

/// One region as seen by metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionMetrics {
    /// The region.
    pub id: RegionId,
    /// Guest-physical start.
    pub start: u64,
    /// Current size.
    pub size: u64,
    /// Capacity.
    pub capacity: u64,
    /// KVM slot.
    pub slot: u32,
    /// Read locks held now: a reader stuck in a copy shows here.
    pub readers: u64,
}

/// A reading of the table's counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableMetrics {
    /// Lookups served by the fast path.
    pub fast_path_hits: u64,
    /// Fast-path attempts that failed (no region, writer active, removed, saturated).
    pub fast_path_misses: u64,
    /// Lookups served by the two-tier slow path: the fast path failed, the table lock
    /// was taken for read to wait out a writer, and a region was found and locked (a
    /// lookup of an address with no region is not counted here).
    pub slow_path_lookups: u64,
    /// Writer waits.
    pub writer_waits: WaitStats,
    /// Every published region.
    pub regions: Vec<RegionMetrics>,
    /// Removed regions whose (already discarded) host mapping is kept because a
    /// thread's cached snapshot still references them. Each is unmapped by the
    /// first writer after those threads' next lookups.
    pub retired_regions: u64,
    /// Writers waiting for readers to release a region they change or remove, now:
    /// with a region's `readers`, shows who waits for whom.
    pub writers_draining: u64,
    /// Readers in the two-tier slow path now (waiting for a writer to end, or taking a
    /// region lock under the table lock): with `writers_draining`, shows who waits.
    pub slow_path_readers: u64,
}
