//! Guarded memory for rust-vmm code: a set of region guards that implements
//! vm-memory's `GuestMemoryBackend`, so virtio-queue, linux-loader and other crates
//! run over regions whose writers are held off while the set lives.
//!
//! The set is taken one region at a time with the fast path, which never waits. If a
//! writer holds one of the regions, every guard taken so far is released first, and
//! only then does the thread wait for that writer (two-tier lookup, holding nothing)
//! before starting over. So no thread waits while holding a guard, and retries are
//! bounded.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::region::RegionGuard;
use crate::sync::Deadline;
use crate::table::{LookupError, RegionTable};

/// Attempts before giving up on a region set that writers keep changing.
pub const MAX_ATTEMPTS: u32 = 16;

/// Why a guarded view could not be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardedMemoryError {
    /// A region could not be locked.
    #[error("cannot lock guest memory: {0}")]
    Lookup(#[from] LookupError),
    /// Writers changed the regions on every attempt.
    #[error("guest memory kept changing over {0} attempts")]
    TooManyRetries(u32),
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
        for _ in 0..MAX_ATTEMPTS {
            let mut guards = Vec::new();
            let mut blocked = None;
            for (_, start, size) in table.layout() {
                if start.0 >= end || start.0.saturating_add(size) <= addr.0 {
                    continue;
                }
                match table.lock_fast(start) {
                    Ok(guard) => guards.push(guard),
                    // Gone since the layout was read: it is not part of the view.
                    Err(LookupError::NotMapped { .. }) => {}
                    // Being changed, or being removed (which can still be undone):
                    // wait for the writer, then look again.
                    Err(LookupError::WriteLocked { .. } | LookupError::Removed { .. }) => {
                        blocked = Some(start);
                        break;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let Some(start) = blocked else {
                return Ok(GuardedMemory { guards });
            };
            // Wait for the writer holding nothing, then start over.
            drop(guards);
            match table.lock_region(start, deadline) {
                Ok(_) | Err(LookupError::NotMapped { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(GuardedMemoryError::TooManyRetries(MAX_ATTEMPTS))
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
