//! Writers: insert, grow, shrink and remove regions (and reserve areas) under the table
//! lock, in the order the design gives, waiting only for the readers of the region they
//! change.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use vm_memory::GuestAddress;

use super::{RegionTable, TableError};
use crate::area::{Area, AreaId};
use crate::lazy::{LazyError, LazyRange};
use crate::lockdep::{self, HeldLock};
use crate::mapping::MappingError;
use crate::region::{Backing, LazySource, Region, RegionError, RegionId, RegionSpec, PAGE_SIZE};
use crate::slots::SlotMapping;
use crate::snapshot::Snapshot;
use crate::sync::{Arc, Deadline, Ordering, TableWriteGuard};

/// What the table lock protects: the writers' copy of the regions. Every operation a
/// writer does here costs O(log n) or less in the number of regions (hotplug makes
/// thousands), so plugging block after block costs the same for the last as the first.
pub(super) struct Inner {
    pub(super) regions: BTreeMap<u64, Arc<Region>>,
    /// Where each region starts, by id.
    pub(super) starts: HashMap<RegionId, u64>,
    /// What readers look up, kept in step with `regions` and published by copying
    /// only the chunk a change touched (see `Snapshot`).
    pub(super) snapshot: Snapshot,
    /// Reserved areas by start (see [`RegionTable::reserve_area`]).
    pub(super) areas: BTreeMap<u64, std::sync::Arc<Area>>,
    pub(super) free_slots: Vec<u32>,
    pub(super) next_slot: u32,
    /// Removed regions that threads' cached snapshots may still reference. The
    /// table keeps a reference to each until it is the last one, so the region's
    /// memory is unmapped and its file closed by a writer (see `WriteSession`'s drop),
    /// never inside a lookup that drops an old snapshot.
    pub(super) retired: Vec<Arc<Region>>,
}

impl Inner {
    pub(super) fn find(&self, addr: GuestAddress) -> Option<&Arc<Region>> {
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
        self.table.writing.fetch_sub(1, Ordering::SeqCst);
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
    fn write_session(&self, deadline: Deadline) -> Result<WriteSession<'_>, TableError> {
        lockdep::acquire_table(HeldLock::TableWrite);
        let Some(inner) = self.lock.write_until(deadline) else {
            lockdep::release(&HeldLock::TableWrite);
            return Err(TableError::LockTimeout);
        };
        let seq = self.seq.load(Ordering::SeqCst);
        self.writing.fetch_add(1, Ordering::SeqCst);
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

    pub(super) fn unregister_lazy(
        &self,
        region: &Region,
        offset: u64,
        len: u64,
    ) -> Result<(), TableError> {
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
        let area = match Area::new(id, start, size, slot, self.config.huge_pages) {
            Ok(area) => area,
            Err(e) => {
                inner.free_slots.push(slot);
                return Err(RegionError::from(e).into());
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
            return Err(RegionError::from(MappingError::BadGeometry {
                start,
                size: spec.size,
                capacity: spec.capacity,
            })
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
        let region = match Region::new(
            id,
            &spec,
            slot,
            self.config.reader_limit,
            self.config.huge_pages,
            area.clone(),
        ) {
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
}
