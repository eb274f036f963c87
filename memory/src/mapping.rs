//! Host mappings of guest memory: what regions and areas both use — the mapping flags,
//! the geometry check, advice to the host kernel, and changing or dropping pages.
//!
//! Under Miri, which has no `madvise` or `mprotect`, advice and protection do nothing and
//! dropping pages zeroes them (what `MADV_DONTNEED` does to private anonymous memory,
//! the only kind Miri can create).

use vm_memory::GuestAddress;

/// The guest page size: region and area geometry is in whole pages.
pub const PAGE_SIZE: u64 = 4096;

/// Why a host mapping could not be made or changed.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    /// Addresses and sizes must be multiples of the 4 KiB page size.
    #[error("address {start:#x} size {size:#x} capacity {capacity:#x} is not page aligned")]
    Unaligned {
        /// Guest-physical start.
        start: u64,
        /// Requested size.
        size: u64,
        /// Requested capacity.
        capacity: u64,
    },
    /// The size must be non-zero and at most the capacity, and the range must fit the
    /// address space.
    #[error("invalid geometry: start {start:#x} size {size:#x} capacity {capacity:#x}")]
    BadGeometry {
        /// Guest-physical start.
        start: u64,
        /// Requested size.
        size: u64,
        /// Requested capacity.
        capacity: u64,
    },
    /// Mapping the host memory failed.
    #[error("cannot map guest memory: {0}")]
    Mmap(vm_memory::mmap::MmapRegionError),
    /// A host memory-management call (madvise, mprotect, fallocate) failed.
    #[error("{call} on guest memory failed: {source}")]
    Host {
        /// The call that failed.
        call: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// Flags of private anonymous guest memory, reserved rather than committed. (Under Miri,
/// vm-memory allocates instead of mapping, whatever the flags.)
pub(crate) const ANONYMOUS_MAPPING: i32 =
    libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_PRIVATE;

/// Checks the geometry of a range of guest memory (`size` of it usable now, `capacity`
/// reserved); returns the host length to map.
pub(crate) fn check_geometry(
    start: GuestAddress,
    size: u64,
    capacity: u64,
) -> Result<usize, MappingError> {
    if start.0 % PAGE_SIZE != 0 || size % PAGE_SIZE != 0 || capacity % PAGE_SIZE != 0 {
        return Err(MappingError::Unaligned {
            start: start.0,
            size,
            capacity,
        });
    }
    let bad = || MappingError::BadGeometry {
        start: start.0,
        size,
        capacity,
    };
    if size == 0 || size > capacity || start.0.checked_add(capacity).is_none() {
        return Err(bad());
    }
    usize::try_from(capacity).map_err(|_| bad())
}

/// Asks the host to back `[addr, addr + len)`, a mapping of `owner`'s, with transparent
/// huge pages where it can: fewer page faults when the guest first touches memory, and
/// fewer TLB misses for both the guest and the VMM's own copies. Only advice: a host
/// without THP keeps 4 KiB pages.
pub(crate) fn advise_huge_pages(addr: *mut u8, len: usize, owner: &dyn std::fmt::Display) {
    if cfg!(miri) {
        return;
    }
    // SAFETY: MADV_HUGEPAGE changes how the kernel backs a mapping, never its contents,
    // so no memory Rust relies on can change through it.
    if unsafe { libc::madvise(addr.cast(), len, libc::MADV_HUGEPAGE) } != 0 {
        log::debug!(
            "{owner}: no transparent huge pages: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Keeps guest memory out of core dumps: it is the guest's data (keys, customer data),
/// not the VMM's, and can be gigabytes.
pub(crate) fn advise_no_dump(addr: *mut u8, len: usize, owner: &dyn std::fmt::Display) {
    if cfg!(miri) {
        return;
    }
    // SAFETY: MADV_DONTDUMP only changes what a core dump holds, never the contents.
    if unsafe { libc::madvise(addr.cast(), len, libc::MADV_DONTDUMP) } != 0 {
        log::warn!(
            "{owner}: guest memory may appear in core dumps: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The error of the host call `call` that just failed.
pub(crate) fn host_err(call: &'static str) -> MappingError {
    MappingError::Host {
        call,
        source: std::io::Error::last_os_error(),
    }
}

/// Changes the protection of `[addr, addr + len)`.
///
/// # Safety
/// The range lies inside a mapping of guest memory that no Rust reference points into
/// while it becomes inaccessible.
pub(crate) unsafe fn protect(addr: *mut u8, len: usize, prot: i32) -> Result<(), MappingError> {
    if len == 0 || cfg!(miri) {
        return Ok(());
    }
    // SAFETY: the caller's contract: the range is guest memory of ours, and changing its
    // protection affects no Rust-owned memory.
    if unsafe { libc::mprotect(addr.cast(), len, prot) } != 0 {
        return Err(host_err("mprotect"));
    }
    Ok(())
}

/// Drops the pages of `[addr, addr + len)`: private memory reads as zeros afterwards.
///
/// # Safety
/// The range lies inside a mapping of guest memory that nobody uses now (its readers
/// were drained), so no reference into it is live.
pub(crate) unsafe fn drop_pages(addr: *mut u8, len: usize) -> Result<(), MappingError> {
    if len == 0 {
        return Ok(());
    }
    #[cfg(not(miri))]
    // SAFETY: the caller's contract: nobody uses the range, and dropping its pages is
    // what removal means.
    if unsafe { libc::madvise(addr.cast(), len, libc::MADV_DONTNEED) } != 0 {
        return Err(host_err("madvise"));
    }
    #[cfg(miri)]
    // SAFETY: the caller's contract: nobody uses the range; under Miri it stays
    // writable (`protect` changes nothing there).
    unsafe {
        std::ptr::write_bytes(addr, 0, len)
    };
    Ok(())
}

/// Maps `len` bytes of `file` from `offset` privately at `addr`, inaccessible (the caller
/// opens it with [`protect`]), in place of what was mapped there.
///
/// # Safety
/// `[addr, addr + len)` lies inside a mapping of guest memory of ours that no Rust
/// reference points into.
pub(crate) unsafe fn map_file_fixed(
    addr: *mut u8,
    len: usize,
    file: &std::fs::File,
    offset: u64,
) -> Result<(), MappingError> {
    use std::os::fd::AsRawFd;
    let flags = libc::MAP_PRIVATE | libc::MAP_NORESERVE;
    // SAFETY: the caller's contract.
    unsafe { map_fixed(addr, len, flags, file.as_raw_fd(), offset) }
}

/// Replaces `[addr, addr + len)` with fresh private anonymous memory, inaccessible:
/// what was there (a private file mapping's pages) is gone, and it reads as zeros once
/// opened again.
///
/// # Safety
/// As [`drop_pages`].
pub(crate) unsafe fn map_anonymous_fixed(
    addr: *mut u8,
    len: usize,
    huge_pages: bool,
) -> Result<(), MappingError> {
    // SAFETY: the caller's contract.
    unsafe { map_fixed(addr, len, ANONYMOUS_MAPPING, -1, 0) }?;
    // The area's advice, for the new mapping too.
    if huge_pages {
        advise_huge_pages(addr, len, &"guest memory");
    }
    Ok(())
}

/// `mmap(addr, len, PROT_NONE, flags | MAP_FIXED, fd, offset)`, kept out of core dumps.
///
/// # Safety
/// `[addr, addr + len)` lies inside a mapping of guest memory of ours that no Rust
/// reference points into.
unsafe fn map_fixed(
    addr: *mut u8,
    len: usize,
    flags: i32,
    fd: i32,
    offset: u64,
) -> Result<(), MappingError> {
    if len == 0 || cfg!(miri) {
        return Ok(());
    }
    // SAFETY: the caller's contract: the range is guest memory of ours, which MAP_FIXED
    // replaces exactly; no Rust-owned memory is affected.
    let mapped = unsafe {
        libc::mmap(
            addr.cast(),
            len,
            libc::PROT_NONE,
            flags | libc::MAP_FIXED,
            fd,
            offset as libc::off_t,
        )
    };
    if mapped == libc::MAP_FAILED {
        return Err(host_err("mmap"));
    }
    advise_no_dump(addr, len, &"guest memory");
    Ok(())
}
