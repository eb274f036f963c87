//! Guarded memory for rust-vmm code: a set of region guards that implements
//! vm-memory's `GuestMemoryBackend`, so virtio-queue, linux-loader and other crates
//! run over regions whose writers are held off while the set lives.
//!
//! The set is first taken one region at a time with the fast path, which never waits.
//! If a writer holds one of the regions, every guard taken so far is released, and the
//! set is taken again with the two-tier lookup of the whole range
//! ([`RegionTable::lock_overlapping`]): the table lock for read, only to wait out the
//! writer, while every region is read-locked at once. So no thread waits while holding
//! a guard, and writers, however many run back to back, cannot make it fail or retry.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::region::RegionGuard;
use crate::sync::Deadline;
use crate::table::{LookupError, RegionTable};

/// Why a guarded view could not be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardedMemoryError {
    /// A region could not be locked.
    #[error("cannot lock guest memory: {0}")]
    Lookup(#[from] LookupError),
}

/// Read locks on every region overlapping a guest range, usable as vm-memory guest memory.
#[derive(Debug)]
pub struct GuardedMemory<'t> {
    guards: Vec<RegionGuard<'t>>,
}

impl<'t> GuardedMemory<'t> {
    /// Read-locks every region overlapping `[addr, addr + len)`.
    pub fn lock_range(
        table: &'t RegionTable,
        addr: GuestAddress,
        len: u64,
        deadline: Deadline,
    ) -> Result<GuardedMemory<'t>, GuardedMemoryError> {
        let end = addr.0.saturating_add(len);
        let mut guards = Vec::new();
        for (_, start, size) in table.layout() {
            if start.0 >= end || start.0.saturating_add(size) <= addr.0 {
                continue;
            }
            match table.lock_fast(start) {
                Ok(guard) => guards.push(guard),
                // Gone since the layout was read: it is not part of the view.
                Err(LookupError::NotMapped { .. }) => {}
                // Being changed, or being removed (which can still be undone): let go
                // of everything, then the two-tier lookup waits for the writer.
                Err(LookupError::WriteLocked { .. } | LookupError::Removed { .. }) => {
                    drop(guards);
                    let guards = table.lock_overlapping(addr, len, deadline)?;
                    return Ok(GuardedMemory { guards });
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(GuardedMemory { guards })
    }

    /// Read-locks every region of the table.
    pub fn lock_all(
        table: &'t RegionTable,
        deadline: Deadline,
    ) -> Result<GuardedMemory<'t>, GuardedMemoryError> {
        Self::lock_range(table, GuestAddress(0), u64::MAX, deadline)
    }
}

impl<'t> GuestMemoryBackend for GuardedMemory<'t> {
    type R = RegionGuard<'t>;

    #[inline]
    fn num_regions(&self) -> usize {
        self.guards.len()
    }

    #[inline]
    fn find_region(&self, addr: GuestAddress) -> Option<&RegionGuard<'t>> {
        let idx = self.guards.partition_point(|g| g.start_addr() <= addr);
        let guard = &self.guards[idx.checked_sub(1)?];
        (addr <= guard.last_addr()).then_some(guard)
    }

    #[inline]
    fn iter(&self) -> impl Iterator<Item = &RegionGuard<'t>> {
        self.guards.iter()
    }
}
