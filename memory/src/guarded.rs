//! Guarded memory for rust-vmm code: guest memory that implements vm-memory's
//! `GuestMemoryBackend`, so virtio-queue, linux-loader and other crates run over regions
//! that no writer can take away while they use them.
//!
//! A [`GuardedMemory`] holds nothing at first. The first time an access reaches a region,
//! it read-locks that region and keeps the lock until [`GuardedMemory::release`] or drop:
//! a device request holds exactly the regions its rings and buffers touch, for as long as
//! it touches them (guarantee 12), and a writer of any other region never waits for it.
//!
//! The lock order is the one Linux uses when a fault falls back from
//! `lock_vma_under_rcu`: a thread that holds no region may wait (the two-tier lookup);
//! a thread that holds a region only tries more with the fast path, which never blocks.
//! If that fails (a writer holds the region), the access fails, the memory remembers the
//! miss, and [`GuardedMemory::retry`] drops every lock, waits for the writer with the
//! two-tier lookup and runs the access again. So a reader never waits while it holds a
//! region, and no cycle can close with the writer, who waits for readers while holding
//! the table lock. The lock checker enforces it: the two-tier lookup panics in debug
//! builds when the thread holds any region.
//!
//! ```
//! use memory::{GuardedMemory, RegionSpec, RegionTable};
//! use vm_memory::{Bytes, GuestAddress};
//!
//! let table = RegionTable::default();
//! table.insert(RegionSpec::anonymous(GuestAddress(0), 0x1000), None).unwrap();
//! table.insert(RegionSpec::anonymous(GuestAddress(0x1000), 0x1000), None).unwrap();
//! let mut mem = GuardedMemory::new(&table, None);
//! // One access across both regions: the second is taken with the fast path.
//! mem.retry(|mem| mem.write_slice(&[7; 2], GuestAddress(0xfff))).unwrap().unwrap();
//! assert_eq!(mem.held(), 2);
//! mem.release();
//! assert_eq!(mem.held(), 0);
//! ```

use std::cell::{Cell, RefCell};

use vm_memory::bitmap::BS;
use vm_memory::guest_memory::{self, FileOffset};
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestMemoryRegionBytes, GuestUsize,
    MemoryRegionAddress, VolatileSlice,
};

use crate::region::{Region, RegionGuard};
use crate::sync::Deadline;
use crate::table::{LookupError, RegionTable};

/// Why guarded memory could not be locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GuardedMemoryError {
    /// The deadline passed while a writer was changing guest memory.
    #[error("timed out waiting for a writer of guest memory")]
    Timeout,
    /// A region already counts the maximum number of readers in this thread's shard.
    #[error("too many readers of a guest memory region")]
    Saturated,
    /// Writers changed the regions an access needs [`MAX_ATTEMPTS`] times in a row.
    #[error("guest memory kept changing under an access ({0} attempts)")]
    Contended(usize),
}

/// Runs of one access [`GuardedMemory::retry`] allows. Each rerun starts holding every
/// region the runs before it missed, so it takes an access touching this many regions,
/// each changed by a writer just as the access reached it, to use them up.
pub const MAX_ATTEMPTS: usize = 64;

/// What stopped an access from locking a region it reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trouble {
    /// The fast path failed while other regions were held: wait for the writer of the
    /// region at this address with nothing held, then run the access again.
    Missed(GuestAddress),
    /// Nothing can help now.
    Failed(GuardedMemoryError),
}

/// Guest memory whose regions are read-locked the first time an access reaches them,
/// and stay locked until [`GuardedMemory::release`] or drop. Not `Send`: locks are
/// released by the thread that took them.
pub struct GuardedMemory<'t> {
    table: &'t RegionTable,
    /// The regions locked so far. Only pushed to through `&self`; guards are dropped
    /// only through `&mut self`, so a region lent out stays locked while it is borrowed.
    held: RefCell<Vec<RegionGuard<'t>>>,
    trouble: Cell<Option<Trouble>>,
    /// Addresses the runs of the current `retry` missed (each is waited for once).
    missed: RefCell<Vec<GuestAddress>>,
    /// Whether accesses are confined to the regions held (see [`GuardedMemory::confine`]).
    confined: Cell<bool>,
    /// Whether a confined access reached a region not held.
    reached_out: Cell<bool>,
    deadline: Deadline,
}

impl std::fmt::Debug for GuardedMemory<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held: Vec<_> = self.held.borrow().iter().map(RegionGuard::id).collect();
        f.debug_struct("GuardedMemory")
            .field("held", &held)
            .field("trouble", &self.trouble.get())
            .finish()
    }
}

impl<'t> GuardedMemory<'t> {
    /// Guarded memory of `table` holding no region yet. Waits for writers (with nothing
    /// held) end at `deadline`.
    pub fn new(table: &'t RegionTable, deadline: Deadline) -> GuardedMemory<'t> {
        GuardedMemory {
            table,
            held: RefCell::new(Vec::new()),
            trouble: Cell::new(None),
            missed: RefCell::new(Vec::new()),
            confined: Cell::new(false),
            reached_out: Cell::new(false),
            deadline,
        }
    }

    /// Guarded memory holding every region of the table now (for loaders and tools that
    /// need the whole memory map; devices lock lazily with [`GuardedMemory::new`]). Must
    /// not be called while the thread holds a region guard (debug builds panic, naming
    /// the locks).
    pub fn lock_all(
        table: &'t RegionTable,
        deadline: Deadline,
    ) -> Result<GuardedMemory<'t>, GuardedMemoryError> {
        let mut mem = GuardedMemory::new(table, deadline);
        mem.retry(|mem| mem.iter().count())?;
        Ok(mem)
    }

    /// Runs `access` over this memory until it completes without a fast-path miss: after
    /// a miss, every lock is dropped, the writer waited for with the two-tier lookup (its
    /// region is then held) and `access` run again, at most [`MAX_ATTEMPTS`] times.
    /// Locks taken by the last run stay held. `access` must be safe to run again: a run
    /// that missed may have done part of its work (see [`GuardedMemory::missed`]).
    pub fn retry<R>(
        &mut self,
        mut access: impl FnMut(&Self) -> R,
    ) -> Result<R, GuardedMemoryError> {
        // Every address a run missed: each wait locks all of them at once, so a run never
        // misses the same region twice and the runs end within the regions it touches.
        self.missed.get_mut().clear();
        for attempt in 1..=MAX_ATTEMPTS {
            let result = access(self);
            match self.trouble.take() {
                None => return Ok(result),
                Some(Trouble::Failed(e)) => return Err(e),
                Some(Trouble::Missed(_)) if attempt == MAX_ATTEMPTS => break,
                Some(Trouble::Missed(addr)) => {
                    drop(result);
                    self.missed.get_mut().push(addr);
                    self.release();
                    let missed = self.missed.get_mut().clone();
                    self.wait_for(&missed)?;
                }
            }
        }
        Err(GuardedMemoryError::Contended(MAX_ATTEMPTS))
    }

    /// Whether an access since the last [`GuardedMemory::retry`] run failed to lock a
    /// region it reached: its result is not to be used, and the run will be repeated
    /// (an access that changes guest-visible state checks this before it commits).
    pub fn missed(&self) -> bool {
        self.trouble.get().is_some()
    }

    /// Waits for writers until `deadline` from now on (a device gives each request its
    /// own).
    pub fn set_deadline(&mut self, deadline: Deadline) {
        self.deadline = deadline;
    }

    /// Drops every lock held (and ends a confinement).
    pub fn release(&mut self) {
        self.held.get_mut().clear();
        self.trouble.set(None);
        self.confined.set(false);
        self.reached_out.set(false);
    }

    /// Confines accesses to the regions held now (`true`), or lets them lock more again
    /// (`false`); either way [`GuardedMemory::reached_out`] starts false. While confined,
    /// an access that reaches any other region fails at once, locking and waiting for
    /// nothing, and `reached_out` says so. A device serving a batch of requests under
    /// the locks its first request took confines the others to them: a request that
    /// would need another region is left for the next batch. [`GuardedMemory::release`]
    /// ends a confinement.
    pub fn confine(&self, confined: bool) {
        self.confined.set(confined);
        self.reached_out.set(false);
    }

    /// Whether an access since the last [`GuardedMemory::confine`] was confined and
    /// reached a region not held (it failed; its result is not to be used).
    pub fn reached_out(&self) -> bool {
        self.reached_out.get()
    }

    /// How many regions are held now.
    pub fn held(&self) -> usize {
        self.held.borrow().len()
    }

    /// Waits for the writers of the regions at `addrs` with the two-tier lookup (nothing
    /// is held) and keeps those regions locked. An address no longer mapped is no error:
    /// the next run of the access sees that for itself.
    fn wait_for(&mut self, addrs: &[GuestAddress]) -> Result<(), GuardedMemoryError> {
        match self.table.lock_regions(addrs, self.deadline) {
            Ok(guards) => {
                *self.held.get_mut() = guards;
                Ok(())
            }
            Err(LookupError::Saturated { .. }) => Err(GuardedMemoryError::Saturated),
            Err(_) => Err(GuardedMemoryError::Timeout),
        }
    }

    /// The held region covering `addr`, locking it first if no held region does.
    fn hold(&self, addr: GuestAddress) -> Option<&GuardedRegion> {
        if let Some(region) = self.held_at(addr) {
            return Some(region);
        }
        if self.trouble.get().is_some() {
            return None; // this run is void: do not lock more
        }
        if self.confined.get() {
            self.reached_out.set(true);
            return None;
        }
        let nothing_held = self.held.borrow().is_empty();
        // Read before the lookup, and only when it is the fast path alone (see below).
        let publication = (!nothing_held).then(|| self.table.publication());
        let locked = if nothing_held {
            // Nothing held: waiting for a writer cannot close a cycle.
            self.table.lock_region(addr, self.deadline)
        } else {
            self.table.try_lock_region(addr)
        };
        match locked {
            Ok(guard) => {
                let region = self.lend_held(&guard);
                self.held.borrow_mut().push(guard);
                Some(region)
            }
            // With regions held only the fast path ran, and a removal in progress (which
            // a drain timeout may undo) shows as not mapped until its writer ends: if a
            // writer is active or published meanwhile, wait for it like a miss, once
            // per address.
            Err(LookupError::NotMapped { .. })
                if publication.is_some_and(|before| {
                    self.table.writer_active() || self.table.publication() != before
                }) && !self.missed.borrow().contains(&addr) =>
            {
                self.trouble.set(Some(Trouble::Missed(addr)));
                None
            }
            Err(LookupError::NotMapped { .. }) => None,
            Err(LookupError::WriteLocked { .. } | LookupError::Removed { .. }) => {
                self.trouble.set(Some(Trouble::Missed(addr)));
                None
            }
            Err(LookupError::Saturated { .. }) => {
                self.fail(GuardedMemoryError::Saturated);
                None
            }
            Err(LookupError::Timeout { .. }) => {
                self.fail(GuardedMemoryError::Timeout);
                None
            }
        }
    }

    fn fail(&self, e: GuardedMemoryError) {
        self.trouble.set(Some(Trouble::Failed(e)));
    }

    fn held_at(&self, addr: GuestAddress) -> Option<&GuardedRegion> {
        let held = self.held.borrow();
        let guard = held.iter().find(|g| g.region().contains(addr))?;
        Some(self.lend_held(guard))
    }

    /// Lends the region of `guard`, a guard in `held` (or about to be pushed there), for
    /// as long as `self` is borrowed.
    fn lend_held(&self, guard: &RegionGuard<'t>) -> &GuardedRegion {
        let region = std::ptr::from_ref(guard.region());
        // SAFETY: the guard stays in `held` (which only grows through `&self`) and keeps
        // its region locked, and so allocated, until `held` is cleared, which takes
        // `&mut self`: not while `&self`, and so the reference returned, is borrowed.
        GuardedRegion::lend(unsafe { &*region })
    }
}

impl GuestMemoryBackend for GuardedMemory<'_> {
    type R = GuardedRegion;

    /// The regions [`GuestMemoryBackend::iter`] yields.
    fn num_regions(&self) -> usize {
        self.iter().count()
    }

    #[inline]
    fn find_region(&self, addr: GuestAddress) -> Option<&GuardedRegion> {
        self.hold(addr)
    }

    /// Every region of the table, each locked (or a miss recorded, for
    /// [`GuardedMemory::retry`]), and every region already held (one a writer is
    /// removing stays usable while it is held): the whole memory map, for loaders that
    /// ask for it. In address order.
    fn iter(&self) -> impl Iterator<Item = &GuardedRegion> {
        for start in self.table.published_starts() {
            self.hold(start);
        }
        let mut regions: Vec<&GuardedRegion> = self
            .held
            .borrow()
            .iter()
            .map(|guard| self.lend_held(guard))
            .collect();
        regions.sort_by_key(|region| region.start_addr());
        regions.into_iter()
    }
}

/// A region as [`GuardedMemory`] lends it to rust-vmm code: its memory up to its current
/// size, which cannot shrink while it is lent.
#[repr(transparent)]
pub struct GuardedRegion(Region);

impl GuardedRegion {
    /// Only guarded memory lends regions, for as long as they are borrowed.
    #[inline]
    fn lend(region: &Region) -> &GuardedRegion {
        // SAFETY: `GuardedRegion` is a `repr(transparent)` wrapper of `Region`, so the
        // two have the same layout; the borrow keeps the lifetime of `region`.
        unsafe { &*(region as *const Region).cast::<GuardedRegion>() }
    }

    /// The region lent.
    pub fn region(&self) -> &Region {
        &self.0
    }
}

impl std::fmt::Debug for GuardedRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl GuestMemoryRegion for GuardedRegion {
    type B = ();

    #[inline]
    fn len(&self) -> GuestUsize {
        self.0.size()
    }

    #[inline]
    fn start_addr(&self) -> GuestAddress {
        self.0.start()
    }

    #[inline]
    fn bitmap(&self) -> BS<'_, ()> {}

    #[inline]
    fn get_host_address(&self, addr: MemoryRegionAddress) -> guest_memory::Result<*mut u8> {
        self.0.host_address_within(self.0.size(), addr)
    }

    #[inline]
    fn file_offset(&self) -> Option<&FileOffset> {
        self.0.mapping_file_offset()
    }

    #[inline]
    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> guest_memory::Result<VolatileSlice<'_, BS<'_, ()>>> {
        self.0.slice_within(self.0.size(), offset, count)
    }
}

impl GuestMemoryRegionBytes for GuardedRegion {}
