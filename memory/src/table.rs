//! The region table: the set of guest memory regions, with a lock-free lookup for
//! readers and a table lock that serialises writers.
//!
//! Readers find a region and read-lock it with [`RegionTable::lock_fast`] (never
//! blocks, may fail) or [`RegionTable::lock_region`] (the two-tier lookup: the fast
//! path, else the table lock taken for read only to wait for the writer, look the
//! address up, read-lock the region, and drop the table lock again).
//!
//! Writers insert, grow, shrink and remove regions under the table lock. A writer
//! that changes one region waits only for that region's readers.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use vm_memory::GuestAddress;

use crate::area::{Area, AreaId};
use crate::lazy::{LazyError, LazyPages, LazyRange};
use crate::lockdep::{self, HeldLock};
use crate::metrics::{Lookup, RegionMetrics, TableMetrics, TableStats};
use crate::region::{
    region_offset, Backing, LazySource, Region, RegionError, RegionGuard, RegionId, RegionSpec,
    PAGE_SIZE,
};
use crate::region_lock::{release, ReadLockFailure, RegionLock};
use crate::slots::{MemorySlots, NoSlots, SlotError, SlotMapping};
use crate::snapshot::{Snapshot, SnapshotCell};
use crate::sync::{Arc, AtomicU64, Deadline, Ordering, TableRwLock, TableWriteGuard};

/// Why a lookup did not return a guard.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// No region covers the address.
    #[error("guest address {addr:#x} is not mapped")]
    NotMapped {
        /// The address looked up.
        addr: u64,
    },
    /// A writer holds the region (fast path only: the two-tier lookup waits instead).
    #[error("{region} is being changed by a writer")]
    WriteLocked {
        /// The region.
        region: RegionId,
    },
    /// The region was removed (fast path only: the two-tier lookup reports `NotMapped`).
    #[error("{region} was removed")]
    Removed {
        /// The region.
        region: RegionId,
    },
    /// The region already has the maximum number of readers in this thread's shard.
    #[error("{region} has too many readers")]
    Saturated {
        /// The region.
        region: RegionId,
    },
    /// The deadline passed while waiting for a writer.
    #[error("timed out waiting for a writer while looking up {addr:#x}")]
    Timeout {
        /// The address looked up.
        addr: u64,
    },
}

/// Why a writer operation failed. The table is unchanged after every error except
/// a failure to stop lazy population or free memory of a region already gone from
/// the guest (`Lazy`, `Region` from `shrink` or `remove`), which is reported as is.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// The requested range overlaps an existing region's reserved range.
    #[error("range {start:#x}+{len:#x} overlaps {other}")]
    Overlap {
        /// Requested start.
        start: u64,
        /// Requested reserved length (capacity).
        len: u64,
        /// The region in the way.
        other: RegionId,
    },
    /// The requested range is partly inside a reserved area (or overlaps one, for a new
    /// area).
    #[error("range {start:#x}+{len:#x} straddles {area}")]
    StraddlesArea {
        /// Requested start.
        start: u64,
        /// Requested length.
        len: u64,
        /// The area in the way.
        area: AreaId,
    },
    /// No region has this id.
    #[error("{0} does not exist")]
    NoSuchRegion(RegionId),
    /// A grow or shrink asked for an impossible size.
    #[error("{region}: cannot resize from {from:#x} to {to:#x} (capacity {capacity:#x}, page-aligned sizes only)")]
    BadResize {
        /// The region.
        region: RegionId,
        /// Current size.
        from: u64,
        /// Requested size.
        to: u64,
        /// Capacity.
        capacity: u64,
    },
    /// Readers did not release the region before the deadline; the operation was undone.
    #[error("{region}: {readers} reader(s) still hold it after {waited:?}")]
    DrainTimeout {
        /// The region.
        region: RegionId,
        /// Readers still holding it.
        readers: u64,
        /// How long the writer waited.
        waited: Duration,
    },
    /// The table lock could not be taken before the deadline.
    #[error("timed out waiting for the table lock")]
    LockTimeout,
    /// All memory slot numbers are in use.
    #[error("no free memory slot (limit {0})")]
    NoSlot(u32),
    /// Creating or changing the region's host mapping failed.
    #[error(transparent)]
    Region(#[from] RegionError),
    /// The hypervisor refused a slot change.
    #[error(transparent)]
    Slot(#[from] SlotError),
    /// Lazy page registration failed.
    #[error(transparent)]
    Lazy(#[from] LazyError),
}

/// Tuning of a region table.
#[derive(Clone, Debug)]
pub struct TableConfig {
    /// Readers one thread shard of one region may count before lookups fail with
    /// `Saturated`.
    pub reader_limit: u64,
    /// Longest a writer waits for one region's readers before it gives up and undoes.
    pub drain_timeout: Duration,
    /// Slot numbers the table may hand out (KVM reports its limit).
    pub max_slots: u32,
}

impl Default for TableConfig {
    fn default() -> Self {
        TableConfig {
            reader_limit: 1 << 20,
            drain_timeout: Duration::from_secs(10),
            max_slots: 32_764,
        }
    }
}

/// What the table lock protects: the writers' copy of the regions. Every operation a
/// writer does here costs O(log n) or less in the number of regions (hotplug makes
/// thousands), so plugging block after block costs the same for the last as the first.
struct Inner {
    regions: BTreeMap<u64, Arc<Region>>,
    /// Where each region starts, by id.
    starts: HashMap<RegionId, u64>,
    /// What readers look up, kept in step with `regions` and published by copying
    /// only the chunk a change touched (see `Snapshot`).
    snapshot: Snapshot,
    /// Reserved areas by start (see [`RegionTable::reserve_area`]).
    areas: BTreeMap<u64, std::sync::Arc<Area>>,
    free_slots: Vec<u32>,
    next_slot: u32,
    /// Removed regions that threads' cached snapshots may still reference. The
    /// table keeps a reference to each until it is the last one, so the region's
    /// memory is unmapped and its file closed by a writer (see `WriteSession`'s drop),
    /// never inside a lookup that drops an old snapshot.
    retired: Vec<Arc<Region>>,
}

impl Inner {
    fn find(&self, addr: GuestAddress) -> Option<&Arc<Region>> {
        self.regions
            .range(..=addr.0)
            .next_back()
            .map(|(_, r)| r)
            .filter(|r| r.contains(addr))
    }

    /// The area a range lies in: `Ok(None)` if it touches none, an error if it
    /// straddles an area's edge.
    fn area_for(&self, start: u64, len: u64) -> Result<Option<std::sync::Arc<Area>>, TableError> {
        // Areas do not overlap: only the last one starting below the range's end can
        // touch it.
        let end = start.saturating_add(len);
        match self
            .areas
            .range(..end)
            .next_back()
            .map(|(_, a)| a)
            .filter(|a| a.overlaps(start, len))
        {
            None => Ok(None),
            Some(area) if area.holds(start, len) => Ok(Some(area.clone())),
            Some(area) => Err(TableError::StraddlesArea {
                start,
                len,
                area: area.id(),
            }),
        }
    }

    fn take_slot(&mut self, max_slots: u32) -> Result<u32, TableError> {
        match self.free_slots.pop() {
            Some(slot) => Ok(slot),
            None if self.next_slot < max_slots => {
                self.next_slot += 1;
                Ok(self.next_slot - 1)
            }
            None => Err(TableError::NoSlot(max_slots)),
        }
    }

    /// Refuses `[start, start + len)` if it overlaps a region's reserved range.
    fn check_free(&self, start: u64, len: u64) -> Result<(), TableError> {
        let end = start.saturating_add(len);
        // Reserved ranges do not overlap, so only the last region starting below `end`
        // can reach into the range.
        match self
            .regions
            .range(..end)
            .next_back()
            .map(|(_, r)| r)
            .filter(|r| start < r.start().0 + r.capacity())
        {
            Some(other) => Err(TableError::Overlap {
                start,
                len,
                other: other.id(),
            }),
            None => Ok(()),
        }
    }

    fn by_id(&self, id: RegionId) -> Option<Arc<Region>> {
        self.regions.get(self.starts.get(&id)?).cloned()
    }

    /// Adds `region` to the writers' map and to the next snapshot.
    fn add(&mut self, region: Arc<Region>) {
        let start = region.start().0;
        self.starts.insert(region.id(), start);
        self.snapshot.insert(region.clone());
        self.regions.insert(start, region);
    }

    /// Takes `region` out of both.
    fn take(&mut self, region: &Region) {
        let start = region.start().0;
        self.starts.remove(&region.id());
        self.snapshot.remove(start);
        self.regions.remove(&start);
    }
}

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

/// A writer's hold on the table: the table lock for write. Dropping it publishes:
/// the sequence is bumped, so every region this writer marked is readable again.
struct WriteSession<'t> {
    table: &'t RegionTable,
    inner: TableWriteGuard<'t, Inner>,
    seq: u64,
}

impl Drop for WriteSession<'_> {
    fn drop(&mut self) {
        // A count of one is the table's own: no cached snapshot references the region any more,
        // and nothing can reach it to take a new reference.
        self.inner.retired.retain(|r| Arc::strong_count(r) > 1);
        self.table
            .retired
            .store(self.inner.retired.len() as u64, Ordering::Relaxed);
        // Bump before the table lock is released (the field drops after this body),
        // like `mmap_write_unlock` ends every VMA write lock before `up_write`.
        self.table.seq.fetch_add(1, Ordering::SeqCst);
        lockdep::release(&HeldLock::TableWrite);
    }
}

impl WriteSession<'_> {
    fn region(&self, id: RegionId) -> Result<Arc<Region>, TableError> {
        self.inner.by_id(id).ok_or(TableError::NoSuchRegion(id))
    }

    fn publish_snapshot(&self) {
        self.table.published.store(self.inner.snapshot.clone());
    }

    /// Undoes the first step of a removal that cannot go on: the region is published
    /// again, unchanged.
    fn restore_removed(&mut self, region: &Arc<Region>) {
        region.lock.unmark_removed();
        self.inner.add(region.clone());
        self.publish_snapshot();
    }

    /// Write-locks `region` and waits for its readers: the region is excluded from
    /// lookups until the session ends. On timeout the mark stays and is cleared by
    /// the session's end, so the region is readable again unchanged.
    ///
    /// `started` is when the writer began (before it waited for the table lock), for
    /// the writer-wait metric. The drain ends at the caller's `deadline` or after the
    /// table's drain timeout from now, whichever comes first.
    fn exclude_readers(
        &self,
        region: &Region,
        started: Instant,
        deadline: Deadline,
    ) -> Result<(), TableError> {
        region.lock.mark_write_locked(self.seq);
        let drain_started = Instant::now();
        // A timeout too large to represent means no deadline of the table's own.
        let own = drain_started.checked_add(self.table.config.drain_timeout);
        let deadline = match (deadline, own) {
            (Some(caller), Some(own)) => Some(caller.min(own)),
            (caller, own) => caller.or(own),
        };
        let key = self.table.wake_key();
        self.table.draining.fetch_add(1, Ordering::Relaxed);
        let drained = region.lock.wait_for_readers(key, deadline);
        self.table.draining.fetch_sub(1, Ordering::Relaxed);
        self.table.stats.record_writer_wait(started.elapsed());
        if drained {
            Ok(())
        } else {
            Err(TableError::DrainTimeout {
                region: region.id(),
                readers: region.readers(),
                waited: drain_started.elapsed(),
            })
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
            slow_path_readers: AtomicU64::new(0),
        }
    }

    /// Fast path (`lock_vma_under_rcu`): looks `addr` up without locks and tries to
    /// read-lock its region. Never blocks; fails while a writer holds the region.
    #[inline]
    pub fn lock_fast(&self, addr: GuestAddress) -> Result<RegionGuard<'_>, LookupError> {
        // Inlined into `with`, which calls it from one place: the hit path is one
        // straight line in the caller, with no call or returned-by-memory result.
        self.published.with(
            #[inline(always)]
            |snapshot, shard| {
                let result = match snapshot.find(addr) {
                    Some(region) => self.read_lock(region, addr, shard),
                    None => Err(LookupError::NotMapped { addr: addr.0 }),
                };
                let what = if result.is_ok() {
                    Lookup::FastHit
                } else {
                    Lookup::FastMiss
                };
                self.stats.count(shard, what);
                result
            },
        )
    }

    /// Read-locks `region` and checks that it still covers `addr` (its size may have
    /// changed between lookup and lock).
    #[inline(always)]
    fn read_lock<'t>(
        &'t self,
        region: &Region,
        addr: GuestAddress,
        shard: usize,
    ) -> Result<RegionGuard<'t>, LookupError> {
        region
            .lock
            .try_read(&self.seq, shard, self.wake_key())
            .map_err(|failure| match failure {
                ReadLockFailure::WriteLocked => LookupError::WriteLocked {
                    region: region.id(),
                },
                ReadLockFailure::Removed => LookupError::Removed {
                    region: region.id(),
                },
                ReadLockFailure::Saturated => LookupError::Saturated {
                    region: region.id(),
                },
            })?;
        if !region.contains(addr) {
            // SAFETY: we hold the read lock counted in this word, and the caller's
            // snapshot or table map keeps the region allocated beyond the call.
            unsafe { release(region.lock.shard_word(shard), self.wake_key()) };
            return Err(LookupError::NotMapped { addr: addr.0 });
        }
        // SAFETY: we hold a read lock counted in `shard`. The region stays allocated
        // while it is held: until this call returns, the snapshot or the table map the
        // caller found it in holds it; after that, only `remove` can let it go, and
        // `remove` keeps its own strong reference from before it unpublishes the region
        // until after it has drained the region's readers, which waits for this lock.
        Ok(unsafe { RegionGuard::new(region, shard, self.wake_key()) })
    }

    /// The key writers park on while a region's readers drain: an address the table
    /// owns, so a releasing reader never needs an address inside the region.
    #[inline(always)]
    fn wake_key(&self) -> usize {
        &self.wake_spot as *const u8 as usize
    }

    /// Two-tier lookup (`vma_start_read_unlocked`): the fast path, and if it fails,
    /// the table lock taken for read only temporarily — to wait for the writer, look
    /// the address up again, check the result and read-lock the region — then
    /// released explicitly before returning. The caller never holds the table lock
    /// while it uses the guard.
    ///
    /// Must not be called while the thread holds a region guard or the table lock:
    /// a writer draining that region would wait for us while we wait for it. Debug
    /// builds panic on that, naming the locks.
    pub fn lock_region(
        &self,
        addr: GuestAddress,
        deadline: Deadline,
    ) -> Result<RegionGuard<'_>, LookupError> {
        lockdep::assert_may_wait("two-tier lookup");
        match self.lock_fast(addr) {
            Ok(guard) => return Ok(guard),
            // A full shard does not clear by waiting for writers: report it.
            Err(e @ LookupError::Saturated { .. }) => return Err(e),
            // Not mapped now may be a removal in progress that a drain timeout undoes:
            // only the writer's end tells. Waiting for it is the slow path too.
            Err(_) => {}
        }
        let shard = RegionLock::current_shard();

        // Slow path: the table lock for read, only to wait out the writer.
        self.under_table_read_lock(deadline, |inner| match inner.find(addr) {
            None => Err(LookupError::NotMapped { addr: addr.0 }),
            Some(region) => {
                let locked = self.read_lock(region, addr, shard);
                if locked.is_ok() {
                    // Counted as a slow-path lookup only when it finds a region.
                    self.stats.count(shard, Lookup::SlowPath);
                }
                debug_assert!(
                    !matches!(
                        locked,
                        Err(LookupError::WriteLocked { .. } | LookupError::Removed { .. })
                    ),
                    "a region found under the table read lock cannot be write-locked or removed: {locked:?}"
                );
                locked
            }
        })
        .unwrap_or(Err(LookupError::Timeout { addr: addr.0 }))
    }

    /// The two-tier lookup of several addresses at once (for [`crate::GuardedMemory`]
    /// after a fast-path miss): under one hold of the table lock for read, when no writer
    /// holds any region, every region covering one of `addrs` is read-locked, in the
    /// order given. Addresses no region covers are skipped. Same rules as
    /// [`RegionTable::lock_region`].
    pub(crate) fn lock_regions(
        &self,
        addrs: &[GuestAddress],
        deadline: Deadline,
    ) -> Result<Vec<RegionGuard<'_>>, LookupError> {
        lockdep::assert_may_wait("two-tier lookup");
        let shard = RegionLock::current_shard();
        let first = addrs.first().map_or(0, |a| a.0);
        self.under_table_read_lock(deadline, |inner| {
            let mut guards: Vec<RegionGuard<'_>> = Vec::with_capacity(addrs.len());
            for &addr in addrs {
                if guards.iter().any(|g| g.region().contains(addr)) {
                    continue;
                }
                match inner.find(addr).map(|r| self.read_lock(r, addr, shard)) {
                    Some(Ok(guard)) => guards.push(guard),
                    Some(Err(e @ LookupError::Saturated { .. })) => return Err(e),
                    Some(Err(_)) | None => {}
                }
            }
            if !guards.is_empty() {
                self.stats.count(shard, Lookup::SlowPath);
            }
            Ok(guards)
        })
        .unwrap_or(Err(LookupError::Timeout { addr: first }))
    }

    /// Runs `f` under the table lock taken for read, released before returning (the
    /// slow path of the two-tier lookups); `None` if `deadline` passed first.
    fn under_table_read_lock<R>(
        &self,
        deadline: Deadline,
        f: impl FnOnce(&Inner) -> R,
    ) -> Option<R> {
        lockdep::acquire_table(HeldLock::TableRead);
        self.slow_path_readers.fetch_add(1, Ordering::Relaxed);
        let result = self.lock.read_until(deadline).map(|inner| f(&inner));
        self.slow_path_readers.fetch_sub(1, Ordering::Relaxed);
        lockdep::release(&HeldLock::TableRead);
        result
    }

    fn write_session(&self, deadline: Deadline) -> Result<WriteSession<'_>, TableError> {
        lockdep::acquire_table(HeldLock::TableWrite);
        let Some(inner) = self.lock.write_until(deadline) else {
            lockdep::release(&HeldLock::TableWrite);
            return Err(TableError::LockTimeout);
        };
        let seq = self.seq.load(Ordering::SeqCst);
        Ok(WriteSession {
            table: self,
            inner,
            seq,
        })
    }

    /// Registers `[offset, offset + len)` of `region` for lazy population: from its
    /// source, except past the region's `file_end`, which was unplugged once and
    /// so reads as zeros.
    fn register_lazy(&self, region: &Region, offset: u64, len: u64) -> Result<(), TableError> {
        let Backing::Lazy(source) = region.backing() else {
            return Ok(());
        };
        let lazy = self.lazy.as_ref().ok_or(LazyError::NoHandler)?;
        let end = offset + len;
        let split = match source {
            LazySource::Zero => end,
            LazySource::File { .. } => region.file_end().clamp(offset, end),
        };
        let range = |from: u64, to: u64, source: &LazySource| {
            let (host, len) = region.host_span(from, to - from);
            let source_offset = match source {
                LazySource::Zero => 0,
                LazySource::File { offset: base, .. } => base + from,
            };
            LazyRange {
                host_start: host as u64,
                len: len as u64,
                source: source.clone(),
                source_offset,
            }
        };
        if split > offset {
            lazy.register(range(offset, split, source))?;
        }
        if split < end {
            if let Err(e) = lazy.register(range(split, end, &LazySource::Zero)) {
                if split > offset {
                    let _ = self.unregister_lazy(region, offset, split - offset);
                }
                return Err(e.into());
            }
        }
        Ok(())
    }

    fn unregister_lazy(&self, region: &Region, offset: u64, len: u64) -> Result<(), TableError> {
        if let (Backing::Lazy(_), Some(lazy)) = (region.backing(), &self.lazy) {
            let (host, len) = region.host_span(offset, len);
            lazy.unregister(host as u64, len as u64)?;
        }
        Ok(())
    }

    fn slot_mapping(region: &Region, size: u64) -> SlotMapping {
        SlotMapping {
            slot: region.slot(),
            guest_addr: region.start().0,
            size,
            host_addr: region.host_addr(),
        }
    }

    /// Reserves `[start, start + size)` of guest-physical space as an area: one host
    /// mapping (reserved, inaccessible) and one memory slot for all of it, created now.
    /// Regions later inserted inside it take their memory from it and never change a
    /// memory slot (see the `area` module); regions may not straddle its edges.
    pub fn reserve_area(
        &self,
        start: GuestAddress,
        size: u64,
        deadline: Deadline,
    ) -> Result<AreaId, TableError> {
        let mut session = self.write_session(deadline)?;
        let inner = &mut *session.inner;
        inner.check_free(start.0, size)?;
        if let Some(area) = inner.areas.values().find(|a| a.overlaps(start.0, size)) {
            return Err(TableError::StraddlesArea {
                start: start.0,
                len: size,
                area: area.id(),
            });
        }
        let slot = inner.take_slot(self.config.max_slots)?;
        let id = AreaId(
            self.next_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        );
        let area = match Area::new(id, start, size, slot) {
            Ok(area) => area,
            Err(e) => {
                inner.free_slots.push(slot);
                return Err(e.into());
            }
        };
        let mapping = SlotMapping {
            slot,
            guest_addr: start.0,
            size,
            host_addr: area.host_addr(),
        };
        if let Err(e) = self.slots.map(&mapping) {
            inner.free_slots.push(slot);
            return Err(e.into());
        }
        inner.areas.insert(start.0, std::sync::Arc::new(area));
        Ok(id)
    }

    /// Adds a region: maps its memory, registers lazy population, creates its memory
    /// slot, then publishes it. A region inside a reserved area takes its memory and
    /// slot from the area instead.
    pub fn insert(&self, spec: RegionSpec, deadline: Deadline) -> Result<RegionId, TableError> {
        let mut session = self.write_session(deadline)?;
        let start = spec.start.0;
        if start.checked_add(spec.capacity).is_none() {
            return Err(RegionError::BadGeometry {
                start,
                size: spec.size,
                capacity: spec.capacity,
            }
            .into());
        }
        session.inner.check_free(start, spec.capacity)?;
        if spec.backing.is_lazy() && self.lazy.is_none() {
            return Err(LazyError::NoHandler.into());
        }
        let inner = &mut *session.inner;
        let area = inner.area_for(start, spec.capacity)?;
        // A region inside an area uses the area's slot.
        let slot = match &area {
            Some(area) => area.slot(),
            None => inner.take_slot(self.config.max_slots)?,
        };
        let free_slot = |inner: &mut Inner| {
            if area.is_none() {
                inner.free_slots.push(slot);
            }
        };
        let id = RegionId(
            self.next_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        );
        let region = match Region::new(id, &spec, slot, self.config.reader_limit, area.clone()) {
            Ok(region) => Arc::new(region),
            Err(e) => {
                free_slot(inner);
                return Err(e.into());
            }
        };
        let setup = self.register_lazy(&region, 0, spec.size).and_then(|()| {
            let opened = if region.owns_slot() {
                self.slots
                    .map(&Self::slot_mapping(&region, spec.size))
                    .map_err(TableError::from)
            } else {
                // The area's memory opens only now that lazy population is in place.
                region.reopen(0, spec.size).map_err(TableError::from)
            };
            opened.inspect_err(|_| {
                let _ = self.unregister_lazy(&region, 0, spec.size);
            })
        });
        if let Err(e) = setup {
            if !region.owns_slot() {
                // Close the area's memory again.
                let _ = region.discard(0, spec.size);
            }
            free_slot(inner);
            return Err(e);
        }
        inner.add(region);
        session.publish_snapshot();
        Ok(id)
    }

    fn check_resize(region: &Region, to: u64, grow: bool) -> Result<(), TableError> {
        let from = region.size();
        let ok = to % PAGE_SIZE == 0
            && to > 0
            && to <= region.capacity()
            && if grow { to > from } else { to < from };
        if ok {
            Ok(())
        } else {
            Err(TableError::BadResize {
                region: region.id(),
                from,
                to,
                capacity: region.capacity(),
            })
        }
    }

    /// Grows a region within its capacity. Readers keep their locks: what they hold
    /// stays valid, and the new part becomes visible once it is ready.
    pub fn grow(&self, id: RegionId, new_size: u64, deadline: Deadline) -> Result<(), TableError> {
        let started = Instant::now();
        let session = self.write_session(deadline)?;
        let region = session.region(id)?;
        Self::check_resize(&region, new_size, true)?;
        let old = region.size();
        self.stats.record_writer_wait(started.elapsed());
        // Lazy population first: no access may populate the new part before the
        // fault handler knows it.
        self.register_lazy(&region, old, new_size - old)?;
        let undo = |e: TableError| {
            let _ = region.protect(old, new_size - old, libc::PROT_NONE);
            let _ = self.unregister_lazy(&region, old, new_size - old);
            e
        };
        region
            .reopen(old, new_size - old)
            .map_err(|e| undo(e.into()))?;
        if region.owns_slot() {
            self.slots
                .map(&Self::slot_mapping(&region, new_size))
                .map_err(|e| undo(e.into()))?;
        }
        region.set_size(new_size);
        Ok(())
    }

    /// Shrinks a region, in the safe order: exclude the region from lookups, wait for
    /// its readers, shrink its memory slot, stop lazy population of the tail, free
    /// the tail's host memory. On a drain timeout nothing changes.
    pub fn shrink(
        &self,
        id: RegionId,
        new_size: u64,
        deadline: Deadline,
    ) -> Result<(), TableError> {
        let started = Instant::now();
        let session = self.write_session(deadline)?;
        let region = session.region(id)?;
        Self::check_resize(&region, new_size, false)?;
        let old = region.size();
        session.exclude_readers(&region, started, deadline)?;
        // In an area, the guest loses the tail when it is discarded below.
        if region.owns_slot() {
            self.slots.map(&Self::slot_mapping(&region, new_size))?;
        }
        region.count_shrink();
        region.set_size(new_size);
        region.end_file_at(new_size);
        // The tail is discarded even if unregistering failed: grown again, it must
        // read as zeros.
        let unregistered = self.unregister_lazy(&region, new_size, old - new_size);
        region.discard(new_size, old - new_size)?;
        unregistered
    }

    /// Removes a region, in the safe order: unpublish it from lookups, wait for its
    /// readers (undoing everything on timeout), delete its memory slot, stop lazy
    /// population, free its host memory. A copy racing with removal either finishes
    /// before the memory goes or fails with a typed error.
    pub fn remove(&self, id: RegionId, deadline: Deadline) -> Result<(), TableError> {
        let started = Instant::now();
        let mut session = self.write_session(deadline)?;
        let region = session.region(id)?;
        // 1. Unpublish.
        session.inner.take(&region);
        session.publish_snapshot();
        region.lock.mark_removed();
        // 2. Drain readers; on timeout put everything back.
        if let Err(e) = session.exclude_readers(&region, started, deadline) {
            session.restore_removed(&region);
            return Err(e);
        }
        let size = region.size();
        // 3. The guest loses the memory. If the hypervisor refuses, put the region back.
        //    A region inside an area keeps no slot of its own: the guest loses it at
        //    step 5, when discarding it and closing it makes the host kernel drop every
        //    hypervisor mapping of exactly that range, for good.
        if region.owns_slot() {
            if let Err(e) = self.slots.unmap(&Self::slot_mapping(&region, size)) {
                session.restore_removed(&region);
                return Err(e.into());
            }
            // The slot number is free once KVM has let go of it, whatever happens next.
            session.inner.free_slots.push(region.slot());
        }
        // Whatever happens next, the region is gone for good; threads' cached snapshots
        // may still reference it, so the table keeps it until they let go.
        session.inner.retired.push(region.clone());
        // 4. No more lazy population.
        let unregistered = self.unregister_lazy(&region, 0, size);
        // 5. Free the host memory, even if step 4 failed: a region inserted here later
        //    (inside an area) reuses these pages and must find them empty.
        region.discard(0, size)?;
        unregistered?;
        // Readers may still bump the count for an instant: a fast path that loaded an
        // older snapshot counts itself, sees the removal mark and backs off without
        // touching the memory.
        debug_assert!(region.lock.is_removed());
        Ok(())
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
