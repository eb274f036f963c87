//! Guarded memory for rust-vmm code: a view of all guest memory that implements
//! vm-memory's `GuestMemoryBackend`, so virtio-queue, linux-loader and other crates
//! run over regions that no writer can take away while the view lives.
//!
//! A view is one read lock on guest memory as a whole plus the snapshot of regions
//! current when it was taken, so its cost does not grow with the number of regions
//! (hotplug makes hundreds). Writers that take memory away (shrink, remove) wait for
//! views as they wait for a region's readers; growth and insertion do not, so a view
//! may see a region grow, never shrink, and does not see regions inserted after it.
//! Taking a view follows the two-tier lookup: the fast path, else the table lock for
//! read only to wait out the writer (see [`RegionTable`]), so writers, however many
//! run back to back, cannot make it fail or retry.

use vm_memory::bitmap::BS;
use vm_memory::guest_memory::{self, FileOffset};
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestMemoryRegionBytes, GuestUsize,
    MemoryRegionAddress, VolatileSlice,
};

use crate::region::Region;
use crate::snapshot::Snapshot;
use crate::sync::{Arc, Deadline};
use crate::table::{RegionTable, ViewFailure, ViewLock};

/// Why a view of guest memory could not be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardedMemoryError {
    /// The deadline passed while a writer was changing guest memory.
    #[error("timed out waiting for a writer of guest memory")]
    Timeout,
    /// This thread already holds the maximum number of views.
    #[error("too many views of guest memory held")]
    Saturated,
}

impl From<ViewFailure> for GuardedMemoryError {
    fn from(failure: ViewFailure) -> Self {
        match failure {
            ViewFailure::Timeout => GuardedMemoryError::Timeout,
            ViewFailure::Saturated => GuardedMemoryError::Saturated,
        }
    }
}

/// A view of all guest memory, usable as vm-memory guest memory. Not `Send`: the lock
/// is released by the thread that took it.
pub struct GuardedMemory<'t> {
    regions: Arc<Snapshot>,
    _lock: ViewLock<'t>,
}

impl std::fmt::Debug for GuardedMemory<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedMemory")
            .field("regions", &self.regions.regions())
            .finish()
    }
}

impl<'t> GuardedMemory<'t> {
    /// Takes a view of every region of the table. Must not be called while the thread
    /// holds a region guard or the table lock (debug builds panic, naming the locks).
    pub fn lock_all(
        table: &'t RegionTable,
        deadline: Deadline,
    ) -> Result<GuardedMemory<'t>, GuardedMemoryError> {
        let (lock, regions) = table.lock_view(deadline)?;
        Ok(GuardedMemory {
            regions,
            _lock: lock,
        })
    }
}

impl GuestMemoryBackend for GuardedMemory<'_> {
    type R = GuardedRegion;

    #[inline]
    fn num_regions(&self) -> usize {
        self.regions.regions().len()
    }

    #[inline]
    fn find_region(&self, addr: GuestAddress) -> Option<&GuardedRegion> {
        self.regions
            .find(addr)
            .filter(|region| region.contains(addr))
            .map(|region| GuardedRegion::lend(region))
    }

    #[inline]
    fn iter(&self) -> impl Iterator<Item = &GuardedRegion> {
        self.regions
            .regions()
            .iter()
            .map(|region| GuardedRegion::lend(region))
    }
}

/// A region as a [`GuardedMemory`] lends it to rust-vmm code: its memory up to its
/// current size, which cannot shrink while the view lives.
#[repr(transparent)]
pub struct GuardedRegion(Region);

impl GuardedRegion {
    /// Only views lend regions, for as long as they are borrowed.
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
