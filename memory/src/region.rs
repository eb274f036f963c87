//! Regions: guest-physical ranges backed by host mappings, and the guards that
//! hold a region's read lock while its memory is used.

use std::fs::File;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::Arc;

use vm_memory::bitmap::BS;
use vm_memory::guest_memory::{self, FileOffset};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, GuestAddress, GuestMemoryRegion, GuestMemoryRegionBytes, GuestRegionMmap, GuestUsize,
    MemoryRegionAddress, VolatileSlice,
};

use crate::area::{Area, AreaId};
use crate::lockdep;
pub use crate::mapping::PAGE_SIZE;
use crate::mapping::{
    self, advise_huge_pages, advise_no_dump, check_geometry, host_err, MappingError,
    ANONYMOUS_MAPPING,
};
use crate::region_lock::{release as release_lock, RegionLock};
use crate::sync::{AtomicU64, Ordering};

/// Errors from creating or changing a region's host mapping.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// The host mapping could not be made or changed.
    #[error(transparent)]
    Mapping(#[from] MappingError),
    /// The memfd backing could not be created.
    #[error("cannot create memfd backing: {0}")]
    Memfd(std::io::Error),
    /// Memfd memory is a mapping of its own; an area's memory is anonymous.
    #[error("a memfd-backed region cannot be placed inside {0}")]
    MemfdInArea(AreaId),
    /// A region inside an area must lie inside it whole.
    #[error("region at {start:#x} of capacity {capacity:#x} does not fit inside {area}")]
    OutsideArea {
        /// Requested start.
        start: u64,
        /// Requested capacity.
        capacity: u64,
        /// The area.
        area: AreaId,
    },
}

/// Where the pages of a lazily populated region come from on first touch.
#[derive(Clone, Debug)]
pub enum LazySource {
    /// Zero-filled pages.
    Zero,
    /// Pages read from `file`, region offset 0 at file offset `offset`.
    File {
        /// The backing file.
        file: std::sync::Arc<File>,
        /// File offset of the region's first byte.
        offset: u64,
    },
}

/// How a region's host memory is provided.
#[derive(Clone, Debug)]
pub enum Backing {
    /// Private anonymous memory.
    Anonymous,
    /// A memfd, shared mapping (can be handed to other processes).
    Memfd,
    /// Private anonymous memory populated on first touch by the fault handler
    /// through userfaultfd.
    Lazy(LazySource),
    /// A private mapping of `file` from `offset`: the host kernel reads pages from the
    /// file on first touch, and writes stay in this process (copy on write): the file
    /// is never written, so many VMs may map one. Memory taken from such a region (a
    /// shrink, a removal) is replaced with anonymous memory, so it reads as zeros if it
    /// comes back (guarantee 13), never as the file.
    File {
        /// The file.
        file: std::sync::Arc<File>,
        /// File offset of the region's first byte (page aligned).
        offset: u64,
    },
}

impl Backing {
    /// Whether pages arrive through the fault handler.
    pub fn is_lazy(&self) -> bool {
        matches!(self, Backing::Lazy(_))
    }
}

/// What a writer asks for when inserting a region.
#[derive(Clone, Debug)]
pub struct RegionSpec {
    /// Guest-physical start.
    pub start: GuestAddress,
    /// Guest-visible size now.
    pub size: u64,
    /// Size the region may grow to without moving; guest-physical space up to it is reserved.
    pub capacity: u64,
    /// Host memory backing.
    pub backing: Backing,
}

impl RegionSpec {
    /// A fixed-size anonymous region.
    pub fn anonymous(start: GuestAddress, size: u64) -> Self {
        RegionSpec {
            start,
            size,
            capacity: size,
            backing: Backing::Anonymous,
        }
    }
}

/// A stable, never reused region identifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RegionId(pub u64);

impl std::fmt::Display for RegionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "region {}", self.0)
    }
}

/// Where a region's host memory is.
enum Memory {
    /// A mapping of its own.
    Own(GuestRegionMmap),
    /// Its place in an area's mapping, which the region keeps mapped by holding the area;
    /// the area's memory slot shows it to the guest.
    InArea {
        area: Arc<Area>,
        /// The region's first byte in the area's mapping.
        host: *mut u8,
    },
}

// SAFETY: `host` points into the area's mapping, which `area` keeps alive; the memory is
// shared guest memory, used through the region lock protocol from any thread.
unsafe impl Send for Memory {}
// SAFETY: as for `Send`: the pointer is only read, and the memory is accessed volatilely.
unsafe impl Sync for Memory {}

/// A guest-physical range with its host mapping, KVM slot and lock.
pub struct Region {
    id: RegionId,
    start: GuestAddress,
    capacity: u64,
    /// Guest-visible size. Changed only by a writer holding the region write-locked
    /// with its readers drained, and read by readers after they took the read lock.
    size: AtomicU64,
    /// Times the region lost memory (shrinks): a reader holding it sees it stable, so
    /// equal counts under two guards mean no memory was taken between them.
    shrinks: AtomicU64,
    memory: Memory,
    backing: Backing,
    slot: u32,
    pub(crate) lock: RegionLock,
    /// Offset past which a lazy file source no longer applies: the smallest size the
    /// region was ever shrunk to. Memory unplugged and plugged again reads as zeros.
    file_end: AtomicU64,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("id", &self.id)
            .field("start", &self.start)
            .field("size", &self.size())
            .field("capacity", &self.capacity)
            .field("slot", &self.slot)
            .field("area", &self.area_id())
            .finish()
    }
}

impl Region {
    /// A region with a mapping of its own, or, with `area`, one whose memory is its place
    /// in the area's mapping; in memory slot `slot` (the area's, for a region inside one).
    pub(crate) fn new(
        id: RegionId,
        spec: &RegionSpec,
        slot: u32,
        reader_limit: u64,
        huge_pages: bool,
        area: Option<Arc<Area>>,
    ) -> Result<Region, RegionError> {
        let RegionSpec {
            start,
            size,
            capacity,
            ..
        } = *spec;
        let len = check_geometry(start, size, capacity)?;
        let memory = match (&spec.backing, area) {
            (Backing::Memfd, Some(area)) => return Err(RegionError::MemfdInArea(area.id())),
            (_, Some(area)) if !area.holds(start.0, capacity) => {
                return Err(RegionError::OutsideArea {
                    start: start.0,
                    capacity,
                    area: area.id(),
                })
            }
            (Backing::File { file, offset }, Some(area)) => {
                let host = area.host_at(start);
                // SAFETY: `[host, host + len)` lies inside the area's mapping (checked
                // above), which no reference points into while it is inaccessible (the
                // region is not published yet); MAP_FIXED replaces exactly that part.
                unsafe { mapping::map_file_fixed(host, len, file, *offset) }?;
                Memory::InArea { host, area }
            }
            (_, Some(area)) => Memory::InArea {
                host: area.host_at(start),
                area,
            },
            (backing, None) => {
                let builder =
                    MmapRegionBuilder::new(len).with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE);
                let builder = match backing {
                    Backing::Memfd => builder
                        .with_file_offset(FileOffset::new(create_memfd(capacity)?, 0))
                        .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE),
                    Backing::File { file, offset } => builder
                        .with_file_offset(FileOffset::from_arc(Arc::clone(file), *offset))
                        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE),
                    Backing::Anonymous | Backing::Lazy(_) => {
                        builder.with_mmap_flags(ANONYMOUS_MAPPING)
                    }
                };
                let mmap = builder.build().map_err(MappingError::Mmap)?;
                let mapping =
                    GuestRegionMmap::new(mmap, start).ok_or(MappingError::BadGeometry {
                        start: start.0,
                        size,
                        capacity,
                    })?;
                Memory::Own(mapping)
            }
        };
        let region = Region {
            id,
            start,
            capacity,
            size: AtomicU64::new(size),
            shrinks: AtomicU64::new(0),
            memory,
            backing: spec.backing.clone(),
            slot,
            lock: RegionLock::new(reader_limit),
            file_end: AtomicU64::new(capacity),
        };
        // A region in an area leaves its part of the area's memory inaccessible: the
        // table opens it once lazy population is set up (`RegionTable::insert`).
        if region.owns_slot() {
            let (addr, len) = region.host_range(0, capacity);
            advise_no_dump(addr.cast(), len, &id);
            if huge_pages && matches!(region.backing, Backing::Anonymous) {
                advise_huge_pages(addr.cast(), len, &id);
            }
            // Memory beyond the size is reserved but inaccessible until the region grows.
            region.protect(size, capacity - size, libc::PROT_NONE)?;
        }
        Ok(region)
    }

    /// Whether the region has a memory slot of its own (else it uses its area's).
    pub fn owns_slot(&self) -> bool {
        matches!(self.memory, Memory::Own(_))
    }

    /// The region's id.
    #[inline]
    pub fn id(&self) -> RegionId {
        self.id
    }

    /// Guest-physical start.
    #[inline]
    pub fn start(&self) -> GuestAddress {
        self.start
    }

    /// Guest-visible size. Stable only while a guard is held or the table is write-locked.
    #[inline]
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }

    pub(crate) fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::SeqCst);
    }

    /// Times the region lost memory to a shrink. Stable while a guard holds the region
    /// (a shrink waits for its readers): equal counts seen under two guards of the same
    /// region mean it kept all its memory between them.
    pub fn shrinks(&self) -> u64 {
        self.shrinks.load(Ordering::SeqCst)
    }

    /// Counts a shrink (by the writer holding the region, readers drained).
    pub(crate) fn count_shrink(&self) {
        self.shrinks.fetch_add(1, Ordering::SeqCst);
    }

    /// Offset past which a lazy file source no longer applies (see `file_end`).
    pub(crate) fn file_end(&self) -> u64 {
        self.file_end.load(Ordering::SeqCst)
    }

    /// Records that memory from `offset` on was unplugged: it is never again filled
    /// from the file.
    pub(crate) fn end_file_at(&self, offset: u64) {
        self.file_end.fetch_min(offset, Ordering::SeqCst);
    }

    /// Size the region may grow to.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The KVM memory slot number.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// Host virtual address of the region's first byte.
    pub fn host_addr(&self) -> u64 {
        self.host_ptr() as u64
    }

    /// The region's first byte in host memory.
    fn host_ptr(&self) -> *mut u8 {
        match &self.memory {
            Memory::Own(mapping) => mapping.as_ptr(),
            Memory::InArea { host, .. } => *host,
        }
    }

    /// The area whose memory and slot the region uses, if any.
    fn area_id(&self) -> Option<AreaId> {
        match &self.memory {
            Memory::Own(_) => None,
            Memory::InArea { area, .. } => Some(area.id()),
        }
    }

    /// The memfd the region's memory is a mapping of, if any (a private file mapping's
    /// file is not the memory: it is never written).
    fn file_offset(&self) -> Option<&FileOffset> {
        match (&self.memory, &self.backing) {
            (Memory::Own(mapping), Backing::Memfd) => mapping.file_offset(),
            _ => None,
        }
    }

    /// The backing kind.
    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    /// Read locks held on this region now.
    pub fn readers(&self) -> u64 {
        self.lock.readers()
    }

    /// Whether `addr` lies within the region's current size.
    #[inline]
    pub fn contains(&self, addr: GuestAddress) -> bool {
        addr.0
            .checked_sub(self.start.0)
            .is_some_and(|off| off < self.size())
    }

    fn host_range(&self, offset: u64, len: u64) -> (*mut libc::c_void, usize) {
        debug_assert!(offset + len <= self.capacity);
        // `wrapping_add` keeps this a plain address computation; the range was checked
        // against the mapping's length above.
        (
            self.host_ptr().wrapping_add(offset as usize).cast(),
            len as usize,
        )
    }

    /// Changes the protection of `[offset, offset + len)` of the region's memory.
    pub(crate) fn protect(&self, offset: u64, len: u64, prot: i32) -> Result<(), RegionError> {
        let (addr, len) = self.host_range(offset, len);
        // SAFETY: the range lies inside this region's memory (`host_range`); callers make
        // it inaccessible only once its readers are drained, so no reference into it is
        // live then.
        unsafe { mapping::protect(addr.cast(), len, prot) }?;
        Ok(())
    }

    /// Makes `[offset, offset + len)` inaccessible and frees its host memory, in that
    /// order: an access between the two (a vCPU through an area's memory slot, which
    /// still covers the range) would otherwise populate freed memory again, and the
    /// next region opened there would see it.
    ///
    /// Every step is tried even if an earlier one failed, so the pages go whatever
    /// happens (memory plugged here again must read as zeros); the first error is
    /// returned.
    pub(crate) fn discard(&self, offset: u64, len: u64) -> Result<(), RegionError> {
        if len == 0 {
            return Ok(());
        }
        let protected = self.protect(offset, len, libc::PROT_NONE);
        let (addr, host_len) = self.host_range(offset, len);
        let mut punched = Ok(());
        if let Some(file_offset) = self.file_offset() {
            let file_start = file_offset.start() + offset;
            // SAFETY: fallocate on a file descriptor this region owns; punching a hole
            // changes file contents only, no memory of this process is touched directly.
            let rc = unsafe {
                libc::fallocate(
                    file_offset.file().as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    file_start as libc::off_t,
                    len as libc::off_t,
                )
            };
            if rc != 0 {
                punched = Err(host_err("fallocate").into());
            }
        }
        let dropped = if matches!(self.backing, Backing::File { .. }) {
            // Dropped pages of a private file mapping would read as the file again:
            // anonymous memory (inaccessible, as protected above) takes their place,
            // advised as the area is.
            let huge_pages = match &self.memory {
                Memory::InArea { area, .. } => area.huge_pages(),
                Memory::Own(_) => false,
            };
            // SAFETY: as below.
            unsafe { mapping::map_anonymous_fixed(addr.cast(), host_len, huge_pages) }
        } else {
            // SAFETY: the range lies inside this region's memory (`host_range`), and
            // no reader holds it (the caller drained them).
            unsafe { mapping::drop_pages(addr.cast(), host_len) }
        };
        protected
            .and(punched)
            .and(dropped.map_err(RegionError::from))
    }

    /// Makes `[offset, offset + len)` accessible again (a region grows into it).
    pub(crate) fn reopen(&self, offset: u64, len: u64) -> Result<(), RegionError> {
        self.protect(offset, len, libc::PROT_READ | libc::PROT_WRITE)
    }

    /// The host pointer and length of `[offset, offset + len)`, for userfaultfd registration.
    pub(crate) fn host_span(&self, offset: u64, len: u64) -> (*mut libc::c_void, usize) {
        self.host_range(offset, len)
    }
}

fn create_memfd(size: u64) -> Result<File, RegionError> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new
    // descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"kite-guest-memory".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(RegionError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(RegionError::Memfd)?;
    Ok(file)
}

/// A read lock on one region, held while its memory is used. Writers that change or
/// remove the region wait until it is dropped; readers of other regions are unaffected.
///
/// The guard fixes the region's size at the moment it was taken, and accesses through
/// it are bounded by that size. It implements vm-memory's `GuestMemoryRegion` (and so
/// `Bytes<MemoryRegionAddress>`).
///
/// A guard is released by the thread that took it (it is not `Send`), so the debug
/// lock checker's per-thread records stay right.
pub struct RegionGuard<'t> {
    region: NonNull<Region>,
    /// The shard word counting this lock, inside the region.
    word: NonNull<AtomicU64>,
    /// The table's wake-up key for writers waiting on readers.
    key: usize,
    size: u64,
    /// Borrows the table; `*const ()` keeps the guard on its thread.
    _marker: PhantomData<(&'t Region, *const ())>,
}

// SAFETY: other threads get shared access to the `Sync` region only; the lock is still
// released by the owning thread when the guard drops.
unsafe impl Sync for RegionGuard<'_> {}

impl<'t> RegionGuard<'t> {
    /// Wraps a read lock the caller has just taken on `region` in `shard`.
    ///
    /// # Safety
    /// The caller holds a read lock on `region` counted in shard `shard`, and `region`
    /// stays allocated while that lock is held (see `RegionTable::read_lock`). `key` is
    /// the wake-up key of the table the guard borrows.
    #[inline(always)]
    pub(crate) unsafe fn new(region: &Region, shard: usize, key: usize) -> RegionGuard<'t> {
        lockdep::acquire_region(region.id.0);
        RegionGuard {
            region: NonNull::from(region),
            word: NonNull::from(region.lock.shard_word(shard)),
            key,
            size: region.size(),
            _marker: PhantomData,
        }
    }

    /// The locked region.
    pub fn region(&self) -> &Region {
        // SAFETY: the read lock this guard holds keeps the region allocated (see `new`).
        unsafe { self.region.as_ref() }
    }

    /// The region's id.
    pub fn id(&self) -> RegionId {
        self.region().id
    }

    /// Bytes from `addr` to the end of the guarded range, if `addr` is inside it.
    pub fn remaining_from(&self, addr: GuestAddress) -> Option<u64> {
        let off = addr.0.checked_sub(self.region().start.0)?;
        (off < self.size).then(|| self.size - off)
    }
}

impl Drop for RegionGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        let id = self.region().id.0;
        // SAFETY: the shard word lives in the region, which our lock keeps allocated
        // until the decrement inside `release`; that decrement is the last access, and
        // no reference into the region (only this raw pointer) is live across it.
        unsafe { release_lock(self.word.as_ptr(), self.key) };
        lockdep::release(&lockdep::HeldLock::RegionRead(id));
    }
}

impl std::fmt::Debug for RegionGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionGuard")
            .field("region", &self.id())
            .field("size", &self.size)
            .finish()
    }
}

impl GuestMemoryRegion for RegionGuard<'_> {
    type B = ();

    #[inline]
    fn len(&self) -> GuestUsize {
        self.size
    }

    #[inline]
    fn start_addr(&self) -> GuestAddress {
        self.region().start
    }

    #[inline]
    fn bitmap(&self) -> BS<'_, ()> {}

    #[inline]
    fn get_host_address(&self, addr: MemoryRegionAddress) -> guest_memory::Result<*mut u8> {
        self.region().host_address_within(self.size, addr)
    }

    #[inline]
    fn file_offset(&self) -> Option<&FileOffset> {
        self.region().mapping_file_offset()
    }

    #[inline]
    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> guest_memory::Result<VolatileSlice<'_, BS<'_, ()>>> {
        self.region().slice_within(self.size, offset, count)
    }
}

impl GuestMemoryRegionBytes for RegionGuard<'_> {}

/// vm-memory access to a region's first `size` bytes, for the types that lend a locked
/// region to rust-vmm code (`RegionGuard`, `GuardedRegion`).
impl Region {
    #[inline]
    pub(crate) fn host_address_within(
        &self,
        size: u64,
        addr: MemoryRegionAddress,
    ) -> guest_memory::Result<*mut u8> {
        if addr.0 >= size {
            return Err(guest_memory::Error::InvalidBackendAddress);
        }
        // `size` is at most the capacity, all of which is mapped.
        Ok(self.host_ptr().wrapping_add(addr.0 as usize))
    }

    #[inline]
    pub(crate) fn slice_within(
        &self,
        size: u64,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> guest_memory::Result<VolatileSlice<'_, BS<'_, ()>>> {
        let end = offset
            .0
            .checked_add(count as u64)
            .ok_or(guest_memory::Error::InvalidBackendAddress)?;
        if end > size {
            return Err(guest_memory::Error::InvalidBackendAddress);
        }
        match &self.memory {
            Memory::Own(mapping) => mapping.get_slice(offset, count),
            Memory::InArea { host, .. } => {
                let at = host.wrapping_add(offset.0 as usize);
                // SAFETY: `[offset, offset + count)` lies within the region's size
                // (checked above), so inside its place in the area's mapping, which the
                // region keeps alive; the slice borrows the region, and callers hold its
                // read lock, so the memory stays mapped and accessible while it lives.
                Ok(unsafe { VolatileSlice::new(at, count) })
            }
        }
    }

    #[inline]
    pub(crate) fn mapping_file_offset(&self) -> Option<&FileOffset> {
        self.file_offset()
    }
}

/// Offset of `addr` within a region starting at `start`.
pub(crate) fn region_offset(start: GuestAddress, addr: GuestAddress) -> u64 {
    addr.unchecked_offset_from(start)
}
