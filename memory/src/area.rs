//! Areas: guest-physical space reserved up front with one host mapping and one memory
//! slot for all of it. A region inserted inside an area takes its memory from the fixed
//! place in that mapping instead of a mapping and a slot of its own, so adding and
//! removing such regions never changes a memory slot.
//!
//! That matters for memory hotplug: a hypervisor may pay for every slot change with far
//! more than the slot (KVM with shadow paging drops every mapping of the guest when a slot
//! is deleted, and the guest faults all of them back in). With an area, removing a region
//! still takes the memory away from the guest: discarding it and making it inaccessible
//! makes the host kernel drop the hypervisor's mappings of exactly that range, and the
//! guest cannot bring it back.

use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vm_memory::GuestAddress;

use crate::mapping::{
    advise_huge_pages, advise_no_dump, check_geometry, MappingError, ANONYMOUS_MAPPING,
};

/// A stable, never reused area identifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AreaId(pub u64);

impl std::fmt::Display for AreaId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "area {}", self.0)
    }
}

/// A reserved span of guest-physical space: inaccessible host memory (reserved, not
/// committed) and the memory slot that shows all of it to the guest.
pub(crate) struct Area {
    id: AreaId,
    start: GuestAddress,
    size: u64,
    slot: u32,
    mapping: MmapRegion,
    /// Whether its memory is advised transparent huge pages.
    huge_pages: bool,
}

impl std::fmt::Debug for Area {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Area")
            .field("id", &self.id)
            .field("start", &self.start)
            .field("size", &self.size)
            .field("slot", &self.slot)
            .finish()
    }
}

impl Area {
    pub(crate) fn new(
        id: AreaId,
        start: GuestAddress,
        size: u64,
        slot: u32,
        huge_pages: bool,
    ) -> Result<Area, MappingError> {
        let len = check_geometry(start, size, size)?;
        let mapping = MmapRegionBuilder::new(len)
            .with_mmap_prot(libc::PROT_NONE)
            .with_mmap_flags(ANONYMOUS_MAPPING)
            .build()
            .map_err(MappingError::Mmap)?;
        advise_no_dump(mapping.as_ptr(), len, &id);
        if huge_pages {
            advise_huge_pages(mapping.as_ptr(), len, &id);
        }
        Ok(Area {
            id,
            start,
            size,
            slot,
            mapping,
            huge_pages,
        })
    }

    pub(crate) fn id(&self) -> AreaId {
        self.id
    }

    /// Whether its memory is advised transparent huge pages.
    pub(crate) fn huge_pages(&self) -> bool {
        self.huge_pages
    }

    pub(crate) fn slot(&self) -> u32 {
        self.slot
    }

    pub(crate) fn host_addr(&self) -> u64 {
        self.mapping.as_ptr() as u64
    }

    /// Whether `[start, start + len)` lies inside the area.
    pub(crate) fn holds(&self, start: u64, len: u64) -> bool {
        start >= self.start.0
            && start
                .checked_add(len)
                .is_some_and(|end| end <= self.start.0 + self.size)
    }

    /// Whether `[start, start + len)` shares any address with the area.
    pub(crate) fn overlaps(&self, start: u64, len: u64) -> bool {
        start < self.start.0 + self.size && self.start.0 < start.saturating_add(len)
    }

    /// The host address of guest address `addr`, which must lie inside the area.
    pub(crate) fn host_at(&self, addr: GuestAddress) -> *mut u8 {
        debug_assert!(self.holds(addr.0, 0));
        // `wrapping_add` keeps this a plain address computation; callers checked the
        // address against the area.
        self.mapping
            .as_ptr()
            .wrapping_add((addr.0 - self.start.0) as usize)
    }
}
