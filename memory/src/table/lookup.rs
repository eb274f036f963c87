//! Readers' lookups: the fast path (`lock_vma_under_rcu`) and the two-tier lookup
//! (`vma_start_read_unlocked`), which takes the table lock for read only to wait out a
//! writer.

use vm_memory::GuestAddress;

use super::writer::Inner;
use super::{LookupError, RegionTable};
use crate::lockdep::{self, HeldLock};
use crate::metrics::Lookup;
use crate::region::{Region, RegionGuard};
use crate::region_lock::{release, ReadLockFailure, RegionLock};
use crate::sync::{Deadline, Ordering};

impl RegionTable {
    /// Fast path (`lock_vma_under_rcu`): looks `addr` up without locks and tries to
    /// read-lock its region. Never blocks; fails while a writer holds the region.
    #[inline]
    pub fn try_lock_region(&self, addr: GuestAddress) -> Result<RegionGuard<'_>, LookupError> {
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

    /// Which snapshot publication is current: a lookup that found no region under one
    /// publication, with no writer active after it, found the final answer.
    pub(crate) fn publication(&self) -> u64 {
        self.published.generation()
    }

    /// Whether a writer holds the table lock now.
    pub(crate) fn writer_active(&self) -> bool {
        self.writing.load(Ordering::SeqCst) != 0
    }

    /// The key writers park on while a region's readers drain: an address the table
    /// owns, so a releasing reader never needs an address inside the region.
    #[inline(always)]
    pub(super) fn wake_key(&self) -> usize {
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
        match self.try_lock_region(addr) {
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
}
