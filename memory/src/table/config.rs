//! Tuning of a region table.

use std::time::Duration;

/// Tuning of a region table.
#[derive(Clone, Debug)]
pub struct TableConfig {
    /// Readers one thread shard of one region may count before lookups fail with
    /// `Saturated`.
    pub reader_limit: u64,
    /// Longest a writer waits for one region's readers before it gives up and undoes.
    pub drain_timeout: Duration,
    /// Slot numbers the table may hand out (KVM reports its limit).
    pub max_slots: u32,
    /// Whether anonymous guest memory (regions of their own, areas) is advised
    /// transparent huge pages: fewer faults and TLB misses (throughput), at the cost of
    /// 2 MiB of host memory for a guest that touched one page there (density).
    pub huge_pages: bool,
}

impl Default for TableConfig {
    fn default() -> Self {
        TableConfig {
            reader_limit: 1 << 20,
            drain_timeout: Duration::from_secs(10),
            max_slots: 32_764,
            huge_pages: true,
        }
    }
}
