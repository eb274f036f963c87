//! Lazily populated memory: the ranges whose pages are filled on first touch, and the
//! lookup the fault handler uses to find where a faulting page comes from.
//!
//! The lookup reads an immutably published list: it never takes the table lock and
//! never waits for a writer (guarantee 7), so a reader stuck in a fault inside a
//! region that a writer is draining is always released.

use std::collections::BTreeMap;

use crate::region::LazySource;
use crate::sync::Mutex;

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

/// The registered lazy ranges, by host start. Its lock is held only for one map
/// operation (O(log n) in the number of ranges, so the fault handler's lookup costs
/// the same with thousands of hotplugged blocks as with one) and never while waiting
/// for anything else: the fault handler never waits on the table lock or a region
/// lock through it.
pub struct FaultRegistry {
    ranges: Mutex<BTreeMap<u64, LazyRange>>,
}

impl Default for FaultRegistry {
    fn default() -> Self {
        FaultRegistry {
            ranges: Mutex::new(BTreeMap::new()),
        }
    }
}

impl FaultRegistry {
    fn ranges(&self) -> impl std::ops::DerefMut<Target = BTreeMap<u64, LazyRange>> + '_ {
        self.ranges.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `range`, replacing whatever overlapped it (a stale entry must never serve a
    /// new mapping at the same address). Callers serialise changes (they are writers).
    pub fn add(&self, range: LazyRange) {
        let mut ranges = self.ranges();
        Self::cut(&mut ranges, range.host_start, range.len);
        ranges.insert(range.host_start, range);
    }

    /// Removes `[host_start, host_start + len)`, splitting ranges that overlap it.
    pub fn remove(&self, host_start: u64, len: u64) {
        Self::cut(&mut self.ranges(), host_start, len);
    }

    fn cut(ranges: &mut BTreeMap<u64, LazyRange>, host_start: u64, len: u64) {
        let end = host_start.saturating_add(len);
        // Ranges do not overlap, so their ends are in the order of their starts: the
        // ones reaching into the cut are the last few starting below its end.
        let overlapping: Vec<u64> = ranges
            .range(..end)
            .rev()
            .take_while(|(_, r)| r.host_start + r.len > host_start)
            .map(|(&start, _)| start)
            .collect();
        for start in overlapping {
            let Some(r) = ranges.remove(&start) else {
                continue;
            };
            let r_end = r.host_start + r.len;
            if r.host_start < host_start {
                let head = LazyRange {
                    len: host_start - r.host_start,
                    ..r.clone()
                };
                ranges.insert(head.host_start, head);
            }
            if r_end > end {
                let tail = LazyRange {
                    host_start: end,
                    len: r_end - end,
                    source_offset: r.source_offset + (end - r.host_start),
                    source: r.source,
                };
                ranges.insert(tail.host_start, tail);
            }
        }
    }

    /// The range containing `host_addr`, and the source offset of that address.
    pub fn lookup(&self, host_addr: u64) -> Option<(LazySource, u64)> {
        self.lookup_range(host_addr).map(|r| {
            (
                r.source.clone(),
                r.source_offset + (host_addr - r.host_start),
            )
        })
    }

    /// The whole range containing `host_addr`.
    pub fn lookup_range(&self, host_addr: u64) -> Option<LazyRange> {
        self.ranges()
            .range(..=host_addr)
            .next_back()
            .map(|(_, r)| r)
            .filter(|r| r.contains(host_addr))
            .cloned()
    }

    /// How many ranges are registered.
    pub fn len(&self) -> usize {
        self.ranges().len()
    }

    /// Whether no range is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
