//! Guest-memory copies of any address and length, also across regions.
//!
//! A copy takes one region guard at a time (the two-tier lookup), copies the part of
//! the range inside that region, releases the guard and goes on (guarantee 8). It may
//! fault on lazily populated memory while holding the guard; the fault handler fills
//! the page without needing any table lock, so that never closes a cycle.

use vm_memory::{GuestAddress, GuestMemoryRegion, MemoryRegionAddress};

use crate::sync::Deadline;
use crate::table::{LookupError, RegionTable};

/// Why a copy stopped. `copied` bytes at the start of the range were transferred.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CopyError {
    /// Part of the range is not guest memory (never was, or was removed), or its region
    /// could not be locked.
    #[error("guest copy stopped at {addr:#x} after {copied} bytes: {source}")]
    Lookup {
        /// The address that could not be used: in the source range if reading failed,
        /// in the destination range if writing did (a guest-to-guest copy does both).
        addr: u64,
        /// Bytes transferred before it.
        copied: usize,
        /// Why the region could not be used.
        source: LookupError,
    },
    /// `addr + len` overflows the guest address space.
    #[error("guest range {addr:#x}+{len:#x} overflows the address space")]
    Overflow {
        /// Start address.
        addr: u64,
        /// Length.
        len: usize,
    },
}

impl CopyError {
    /// The same error for a copy that had already transferred `earlier` bytes.
    fn after(self, earlier: usize) -> CopyError {
        self.with_copied(|copied| copied + earlier)
    }

    /// The same error with its count of copied bytes replaced by `f(count)`.
    fn with_copied(self, f: impl FnOnce(usize) -> usize) -> CopyError {
        match self {
            CopyError::Lookup {
                addr,
                copied,
                source,
            } => CopyError::Lookup {
                addr,
                copied: f(copied),
                source,
            },
            other => other,
        }
    }
}

/// Size of the bounce buffer a guest-to-guest copy goes through.
const BOUNCE: usize = 64 * 1024;

impl RegionTable {
    /// Calls `f(guard_offset_slice, buf_offset)` for each region-sized piece of
    /// `[addr, addr + len)`, holding one region guard at a time.
    fn for_each_piece(
        &self,
        addr: GuestAddress,
        len: usize,
        deadline: Deadline,
        mut f: impl FnMut(vm_memory::VolatileSlice<'_, ()>, usize),
    ) -> Result<(), CopyError> {
        if addr.0.checked_add(len as u64).is_none() {
            return Err(CopyError::Overflow { addr: addr.0, len });
        }
        let mut done = 0usize;
        while done < len {
            let at = GuestAddress(addr.0 + done as u64);
            let lookup_failed = |source| CopyError::Lookup {
                addr: at.0,
                copied: done,
                source,
            };
            let guard = self.lock_region(at, deadline).map_err(lookup_failed)?;
            let in_region = guard
                .remaining_from(at)
                .ok_or(LookupError::NotMapped { addr: at.0 })
                .map_err(lookup_failed)?;
            let n = (len - done).min(usize::try_from(in_region).unwrap_or(usize::MAX));
            let offset = MemoryRegionAddress(RegionTable::offset_in(&guard, at));
            let slice = guard
                .get_slice(offset, n)
                .map_err(|_| lookup_failed(LookupError::NotMapped { addr: at.0 }))?;
            f(slice, done);
            drop(guard);
            done += n;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes of guest memory at `addr` into `buf`.
    pub fn read(
        &self,
        addr: GuestAddress,
        buf: &mut [u8],
        deadline: Deadline,
    ) -> Result<(), CopyError> {
        self.for_each_piece(addr, buf.len(), deadline, |slice, at| {
            slice.copy_to(&mut buf[at..at + slice.len()]);
        })
    }

    /// Writes `buf` to guest memory at `addr`.
    pub fn write(
        &self,
        addr: GuestAddress,
        buf: &[u8],
        deadline: Deadline,
    ) -> Result<(), CopyError> {
        self.for_each_piece(addr, buf.len(), deadline, |slice, at| {
            slice.copy_from(&buf[at..at + slice.len()]);
        })
    }

    /// Copies `len` bytes of guest memory from `src` to `dst` through a bounce
    /// buffer, so only one region guard is held at a time. Overlapping ranges copy as
    /// if through an intermediate buffer only within each 64 KiB piece; callers that
    /// overlap ranges should copy backwards themselves.
    pub fn copy(
        &self,
        src: GuestAddress,
        dst: GuestAddress,
        len: usize,
        deadline: Deadline,
    ) -> Result<(), CopyError> {
        let mut bounce = vec![0u8; BOUNCE.min(len)];
        let mut done = 0usize;
        while done < len {
            let n = (len - done).min(BOUNCE);
            let (s, d) = (
                src.0.checked_add(done as u64),
                dst.0.checked_add(done as u64),
            );
            let (Some(s), Some(d)) = (s, d) else {
                return Err(CopyError::Overflow {
                    addr: src.0.max(dst.0),
                    len,
                });
            };
            // Bytes read but not written yet are not copied.
            self.read(GuestAddress(s), &mut bounce[..n], deadline)
                .map_err(|e| e.with_copied(|_| done))?;
            self.write(GuestAddress(d), &bounce[..n], deadline)
                .map_err(|e| e.after(done))?;
            done += n;
        }
        Ok(())
    }
}
