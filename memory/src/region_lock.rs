//! The per-region read lock: the counterpart of Linux's per-VMA lock.
//!
//! Readers count themselves in one of several cache-line-sized shards (picked per
//! thread), so readers of one region do not all write the same cache line. A writer
//! marks the region write-locked by storing the table's current write sequence in it
//! (`vma_start_write`), then waits until every shard is zero. The lock is released for
//! all marked regions at once when the writer bumps the table sequence (publish).
//!
//! Reader and writer follow the store-then-load pattern on both sides with
//! sequentially consistent operations: a reader increments its shard, then checks the
//! marks; a writer sets a mark, then sums the shards. One of them always sees the other.
//!
//! A waiting writer also sets a flag bit in every shard word, so a releasing reader
//! learns from its own decrement whether to wake the writer. The decrement is the
//! reader's last access to the region: the writer may free the region the moment it
//! sees the count reach zero, so the wake-up goes by a key the table owns (guards
//! borrow the table, so it outlives them), never by an address inside the region.

use crossbeam_utils::CachePadded;

use crate::sync::{
    parking, store_load_fence, thread_shard_seed, AtomicBool, AtomicU64, Deadline, Ordering,
};

/// How many reader-count shards a region has.
#[cfg(not(loom))]
pub(crate) const SHARDS: usize = 16;
#[cfg(loom)]
pub(crate) const SHARDS: usize = 2;
const _: () = assert!(SHARDS.is_power_of_two());

/// Flag bit in a shard word: a writer waits for this region's readers.
const WRITER_WAITS: u64 = 1 << 63;
/// The reader count in a shard word.
const COUNT: u64 = WRITER_WAITS - 1;

/// Why a read lock was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReadLockFailure {
    /// A writer holds the region (it is being changed or removed).
    WriteLocked,
    /// The region was removed for good.
    Removed,
    /// This shard already counts the maximum number of readers.
    Saturated,
}

pub(crate) struct RegionLock {
    /// Inline, not boxed: the fast path reaches its shard without another load.
    shards: [CachePadded<AtomicU64>; SHARDS],
    /// Equal to the table's sequence while a writer holds this region.
    write_seq: AtomicU64,
    /// Set once the region is removed; it is never readable again.
    removed: AtomicBool,
    reader_limit: u64,
}

impl RegionLock {
    pub(crate) fn new(reader_limit: u64) -> Self {
        RegionLock {
            shards: std::array::from_fn(|_| CachePadded::new(AtomicU64::new(0))),
            write_seq: AtomicU64::new(0),
            removed: AtomicBool::new(false),
            reader_limit,
        }
    }

    /// The shard the calling thread counts itself in.
    #[inline]
    pub(crate) fn current_shard() -> usize {
        thread_shard_seed() % SHARDS
    }

    /// Tries to take a read lock; never blocks. `table_seq` is the table's write
    /// sequence: the region is write-locked while its mark equals it.
    #[inline(always)]
    pub(crate) fn try_read(
        &self,
        table_seq: &AtomicU64,
        shard: usize,
        key: usize,
    ) -> Result<(), ReadLockFailure> {
        let word = self.shard_word(shard);
        let before = word.fetch_add(1, Ordering::SeqCst);
        if before & COUNT >= self.reader_limit {
            return Err(back_out(word, key, ReadLockFailure::Saturated));
        }
        store_load_fence();
        if self.removed.load(Ordering::SeqCst) {
            return Err(back_out(word, key, ReadLockFailure::Removed));
        }
        if self.write_seq.load(Ordering::SeqCst) == table_seq.load(Ordering::SeqCst) {
            return Err(back_out(word, key, ReadLockFailure::WriteLocked));
        }
        Ok(())
    }

    /// The shard word a read lock counted in `shard` lives in.
    #[inline(always)]
    pub(crate) fn shard_word(&self, shard: usize) -> &AtomicU64 {
        debug_assert!(shard < SHARDS);
        // The mask (SHARDS is a power of two) spares the hot path a bounds check.
        &self.shards[shard & (SHARDS - 1)]
    }

    /// Marks the region write-locked for the writer whose sequence is `seq`. New
    /// readers fail from now on; current readers keep their locks until released.
    pub(crate) fn mark_write_locked(&self, seq: u64) {
        self.write_seq.store(seq, Ordering::SeqCst);
    }

    /// Marks the region removed for good.
    pub(crate) fn mark_removed(&self) {
        self.removed.store(true, Ordering::SeqCst);
    }

    /// Takes back a removal mark, for a removal that could not complete.
    pub(crate) fn unmark_removed(&self) {
        self.removed.store(false, Ordering::SeqCst);
    }

    /// Whether the removal mark is set.
    pub(crate) fn is_removed(&self) -> bool {
        self.removed.load(Ordering::SeqCst)
    }

    /// How many read locks are held now.
    pub(crate) fn readers(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.load(Ordering::SeqCst) & COUNT)
            .sum()
    }

    /// Waits until no reader holds the region (after a mark was set). Returns
    /// `false` if `deadline` passed first; the marks stay as they are.
    /// `key` is the table's wake-up key (see [`release`]).
    pub(crate) fn wait_for_readers(&self, key: usize, deadline: Deadline) -> bool {
        store_load_fence();
        if self.readers() == 0 {
            return true;
        }
        for shard in self.shards.iter() {
            shard.fetch_or(WRITER_WAITS, Ordering::SeqCst);
        }
        let drained = parking::park_while(key, deadline, || self.readers() != 0);
        for shard in self.shards.iter() {
            shard.fetch_and(COUNT, Ordering::SeqCst);
        }
        drained
    }
}

/// Releases a read lock that `try_read` counted but may not keep; out of line so the
/// hit path stays small.
#[cold]
#[inline(never)]
fn back_out(word: &AtomicU64, key: usize, why: ReadLockFailure) -> ReadLockFailure {
    // SAFETY: `word` is a live reference (the caller's lookup keeps the region).
    unsafe { release(word, key) };
    why
}

/// Releases a read lock counted in `word` (a region's shard word) and wakes a writer
/// parked on the table's `key` if the word says one waits. The decrement is the only
/// access to the region: it may be freed as soon as the count is seen at zero, so
/// `word` is a raw pointer (a reference would have to stay valid for the whole call)
/// and the caller must hold no other reference into the region across this call.
///
/// # Safety
/// `word` points to a live shard word on which the caller holds a read lock.
#[inline(always)]
pub(crate) unsafe fn release(word: *const AtomicU64, key: usize) {
    // SAFETY: the caller's read lock keeps the word allocated until this decrement,
    // and the reference made for it lives only as long as the decrement.
    let before = unsafe { (*word).fetch_sub(1, Ordering::SeqCst) };
    if before & WRITER_WAITS != 0 {
        parking::unpark_all(key);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// Readers of one region on different threads mostly count in different shards,
    /// so they do not all write one cache line (guarantee 1).
    #[test]
    fn threads_spread_over_shards() {
        let shards: std::collections::BTreeSet<usize> = (0..2 * SHARDS)
            .map(|_| {
                std::thread::spawn(RegionLock::current_shard)
                    .join()
                    .unwrap()
            })
            .collect();
        assert!(shards.len() >= SHARDS / 2, "{shards:?}");
    }

    #[test]
    fn each_shard_has_a_word_of_its_own() {
        let lock = RegionLock::new(1);
        let words: std::collections::BTreeSet<*const AtomicU64> = (0..SHARDS)
            .map(|s| lock.shard_word(s) as *const _)
            .collect();
        assert_eq!(words.len(), SHARDS);
    }
}
