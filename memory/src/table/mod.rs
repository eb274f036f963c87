//! The region table: the set of guest memory regions, with a lock-free lookup for
//! readers and a table lock that serialises writers.
//!
//! Readers find a region and read-lock it with [`RegionTable::try_lock_region`] (never
//! blocks, may fail) or [`RegionTable::lock_region`] (the two-tier lookup: the fast
//! path, else the table lock taken for read only to wait for the writer, look the
//! address up, read-lock the region, and drop the table lock again).
//!
//! Writers insert, grow, shrink and remove regions under the table lock. A writer
//! that changes one region waits only for that region's readers.

mod config;
mod error;
mod lookup;
mod writer;

use std::collections::{BTreeMap, HashMap};

use vm_memory::GuestAddress;

use crate::lazy::LazyPages;
use crate::metrics::{RegionMetrics, TableMetrics, TableStats};
use crate::region::{region_offset, RegionGuard, RegionId};
use crate::slots::{MemorySlots, NoSlots};
use crate::snapshot::{Snapshot, SnapshotCell};
use crate::sync::{AtomicU64, Ordering, TableRwLock};

pub use config::TableConfig;
pub use error::{LookupError, TableError};
use writer::Inner;

/// The set of guest memory regions. See the module documentation.
pub struct RegionTable {
    published: SnapshotCell,
    lock: TableRwLock<Inner>,
    /// Writer sequence: a region is write-locked while its mark equals this. Bumped
    /// when a writer finishes, which releases every region it marked.
    seq: AtomicU64,
    /// Its address is the key writers park on (see `wake_key`).
    wake_spot: u8,
    next_id: std::sync::atomic::AtomicU64,
    slots: std::sync::Arc<dyn MemorySlots>,
    lazy: Option<std::sync::Arc<dyn LazyPages>>,
    config: TableConfig,
    stats: TableStats,
    /// How many removed regions the table keeps for cached snapshots (`Inner::retired`).
    retired: AtomicU64,
    /// Writers waiting for readers now (0 or 1: writers are serialised).
    draining: AtomicU64,
    /// Writers holding the table lock now (0 or 1).
    writing: AtomicU64,
    /// Readers in the slow path now, waiting for the table lock or holding it for read.
    slow_path_readers: AtomicU64,
}

impl std::fmt::Debug for RegionTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionTable")
            .field(
                "regions",
                &self.published.current().regions().collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Default for RegionTable {
    fn default() -> Self {
        RegionTable::new(std::sync::Arc::new(NoSlots), None, TableConfig::default())
    }
}

impl Drop for RegionTable {
    /// No guard outlives the table (guards borrow it), but per-thread snapshot caches
    /// may keep its regions' mappings alive for a while: stop lazy population and free
    /// their memory now, so nothing stale stays registered with the fault handler and
    /// no memory lingers. KVM slots are the owner's to tear down with its VM.
    fn drop(&mut self) {
        let inner = self.lock.write_until(None).expect("no deadline");
        for region in inner.regions.values() {
            let size = region.size();
            region.lock.mark_removed();
            if let Err(e) = self.unregister_lazy(region, 0, size) {
                log::error!("dropping {}: {e}", region.id());
            }
            if let Err(e) = region.discard(0, size) {
                log::error!("dropping {}: {e}", region.id());
            }
        }
    }
}

impl RegionTable {
    /// A table whose slot changes go to `slots` and whose lazy regions are filled by
    /// `lazy` (a [`crate::FaultHandler`] normally).
    pub fn new(
        slots: std::sync::Arc<dyn MemorySlots>,
        lazy: Option<std::sync::Arc<dyn LazyPages>>,
        config: TableConfig,
    ) -> Self {
        RegionTable {
            published: SnapshotCell::new(Snapshot::empty()),
            lock: TableRwLock::new(Inner {
                regions: BTreeMap::new(),
                starts: HashMap::new(),
                snapshot: Snapshot::empty(),
                areas: BTreeMap::new(),
                free_slots: Vec::new(),
                next_slot: 0,
                retired: Vec::new(),
            }),
            seq: AtomicU64::new(1),
            wake_spot: 0,
            next_id: std::sync::atomic::AtomicU64::new(1),
            slots,
            lazy,
            config,
            stats: TableStats::default(),
            retired: AtomicU64::new(0),
            draining: AtomicU64::new(0),
            writing: AtomicU64::new(0),
            slow_path_readers: AtomicU64::new(0),
        }
    }

    /// The region covering `addr`, without locking it (for reports and tests).
    pub fn region_at(&self, addr: GuestAddress) -> Option<RegionId> {
        self.published
            .current()
            .find(addr)
            .filter(|r| r.contains(addr))
            .map(|r| r.id())
    }

    /// Where the published regions start, in order.
    pub(crate) fn published_starts(&self) -> Vec<GuestAddress> {
        self.published
            .current()
            .regions()
            .map(|r| r.start())
            .collect()
    }

    /// The published regions as `(id, start, size)`, sorted by start: the guest's
    /// memory map (for an e820 table, say).
    pub fn layout(&self) -> Vec<(RegionId, GuestAddress, u64)> {
        self.published
            .current()
            .regions()
            .map(|r| (r.id(), r.start(), r.size()))
            .collect()
    }

    /// Counters and per-region reader counts.
    pub fn metrics(&self) -> TableMetrics {
        let regions = self
            .published
            .current()
            .regions()
            .map(|r| RegionMetrics {
                id: r.id(),
                start: r.start().0,
                size: r.size(),
                capacity: r.capacity(),
                slot: r.slot(),
                readers: r.readers(),
            })
            .collect();
        TableMetrics {
            retired_regions: self.retired.load(Ordering::Relaxed),
            writers_draining: self.draining.load(Ordering::Relaxed),
            slow_path_readers: self.slow_path_readers.load(Ordering::Relaxed),
            ..self.stats.snapshot(regions)
        }
    }

    /// Offset of `addr` within the guard's region.
    pub fn offset_in(guard: &RegionGuard<'_>, addr: GuestAddress) -> u64 {
        region_offset(guard.region().start(), addr)
    }
}
