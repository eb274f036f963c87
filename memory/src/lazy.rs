//! Lazily populated memory: the ranges whose pages are filled on first touch, and the
//! lookup the fault handler uses to find where a faulting page comes from.
//!
//! The lookup reads an immutably published list: it never takes the table lock and
//! never waits for a writer (guarantee 7), so a reader stuck in a fault inside a
//! region that a writer is draining is always released.

use crate::region::LazySource;
use crate::sync::Published;

/// A host address range populated on first touch.
#[derive(Clone, Debug)]
pub struct LazyRange {
    /// Host virtual address of the first byte (page aligned).
    pub host_start: u64,
    /// Length in bytes (page aligned).
    pub len: u64,
    /// Where its pages come from.
    pub source: LazySource,
    /// Offset within `source` of `host_start` (for file sources).
    pub source_offset: u64,
}

impl LazyRange {
    fn contains(&self, host_addr: u64) -> bool {
        host_addr
            .checked_sub(self.host_start)
            .is_some_and(|off| off < self.len)
    }
}

/// Errors from registering lazy ranges or resolving faults.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// A lazy region was asked for but the table has no fault handler.
    #[error("lazy backing needs a fault handler, and the table has none")]
    NoHandler,
    /// Registering or unregistering a range with userfaultfd failed.
    #[error("userfaultfd {op} of {len:#x} bytes at {addr:#x} failed: {reason}")]
    Userfaultfd {
        /// The operation.
        op: &'static str,
        /// Host address.
        addr: u64,
        /// Length.
        len: u64,
        /// The error.
        reason: String,
    },
    /// Starting the fault-handler thread failed.
    #[error("cannot start the fault handler: {0}")]
    Start(String),
}

/// What the region table asks of whoever fills lazy pages.
///
/// Writers call `register` before a range becomes reachable by guests or readers and
/// `unregister` after it stopped being reachable (step 4 of removal), so a range is
/// always registered while anything could fault on it.
pub trait LazyPages: Send + Sync {
    /// Starts filling faults in `range`.
    fn register(&self, range: LazyRange) -> Result<(), LazyError>;
    /// Stops filling faults in `[host_start, host_start + len)`.
    fn unregister(&self, host_start: u64, len: u64) -> Result<(), LazyError>;
}

/// The published list of lazy ranges. Writers replace it; the fault handler reads it
/// without locks.
pub struct FaultRegistry {
    ranges: Published<Vec<LazyRange>>,
}

impl Default for FaultRegistry {
    fn default() -> Self {
        FaultRegistry {
            ranges: Published::new(Vec::new()),
        }
    }
}

impl FaultRegistry {
    /// Adds `range`, replacing whatever overlapped it (a stale entry must never serve a
    /// new mapping at the same address). Callers serialise changes (they are writers).
    pub fn add(&self, range: LazyRange) {
        self.remove(range.host_start, range.len);
        let mut ranges: Vec<LazyRange> = self.ranges.load().iter().cloned().collect();
        ranges.push(range);
        self.ranges.store(ranges);
    }

    /// Removes `[host_start, host_start + len)`, splitting ranges that overlap it.
    pub fn remove(&self, host_start: u64, len: u64) {
        let end = host_start + len;
        let mut out = Vec::new();
        for r in self.ranges.load().iter() {
            let r_end = r.host_start + r.len;
            if r_end <= host_start || r.host_start >= end {
                out.push(r.clone());
                continue;
            }
            if r.host_start < host_start {
                out.push(LazyRange {
                    len: host_start - r.host_start,
                    ..r.clone()
                });
            }
            if r_end > end {
                out.push(LazyRange {
                    host_start: end,
                    len: r_end - end,
                    source: r.source.clone(),
                    source_offset: r.source_offset + (end - r.host_start),
                });
            }
        }
        self.ranges.store(out);
    }

    /// The range containing `host_addr`, and the source offset of that address.
    /// Never blocks.
    pub fn lookup(&self, host_addr: u64) -> Option<(LazySource, u64)> {
        self.lookup_range(host_addr).map(|r| {
            (
                r.source.clone(),
                r.source_offset + (host_addr - r.host_start),
            )
        })
    }

    /// The whole range containing `host_addr`. Never blocks.
    pub fn lookup_range(&self, host_addr: u64) -> Option<LazyRange> {
        let ranges = self.ranges.load();
        ranges.iter().find(|r| r.contains(host_addr)).cloned()
    }

    /// How many ranges are registered.
    pub fn len(&self) -> usize {
        self.ranges.load().len()
    }

    /// Whether no range is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
