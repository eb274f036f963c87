//! Why table operations fail.

use std::time::Duration;

use crate::area::AreaId;
use crate::lazy::LazyError;
use crate::region::{RegionError, RegionId};
use crate::slots::SlotError;

/// Why a lookup did not return a guard.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// No region covers the address.
    #[error("guest address {addr:#x} is not mapped")]
    NotMapped {
        /// The address looked up.
        addr: u64,
    },
    /// A writer holds the region (fast path only: the two-tier lookup waits instead).
    #[error("{region} is being changed by a writer")]
    WriteLocked {
        /// The region.
        region: RegionId,
    },
    /// The region was removed (fast path only: the two-tier lookup reports `NotMapped`).
    #[error("{region} was removed")]
    Removed {
        /// The region.
        region: RegionId,
    },
    /// The region already has the maximum number of readers in this thread's shard.
    #[error("{region} has too many readers")]
    Saturated {
        /// The region.
        region: RegionId,
    },
    /// The deadline passed while waiting for a writer.
    #[error("timed out waiting for a writer while looking up {addr:#x}")]
    Timeout {
        /// The address looked up.
        addr: u64,
    },
}

/// Why a writer operation failed. The table is unchanged after every error except
/// a failure to stop lazy population or free memory of a region already gone from
/// the guest (`Lazy`, `Region` from `shrink` or `remove`), which is reported as is.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// The requested range overlaps an existing region's reserved range.
    #[error("range {start:#x}+{len:#x} overlaps {other}")]
    Overlap {
        /// Requested start.
        start: u64,
        /// Requested reserved length (capacity).
        len: u64,
        /// The region in the way.
        other: RegionId,
    },
    /// The requested range is partly inside a reserved area (or overlaps one, for a new
    /// area).
    #[error("range {start:#x}+{len:#x} straddles {area}")]
    StraddlesArea {
        /// Requested start.
        start: u64,
        /// Requested length.
        len: u64,
        /// The area in the way.
        area: AreaId,
    },
    /// No region has this id.
    #[error("{0} does not exist")]
    NoSuchRegion(RegionId),
    /// A grow or shrink asked for an impossible size.
    #[error("{region}: cannot resize from {from:#x} to {to:#x} (capacity {capacity:#x}, page-aligned sizes only)")]
    BadResize {
        /// The region.
        region: RegionId,
        /// Current size.
        from: u64,
        /// Requested size.
        to: u64,
        /// Capacity.
        capacity: u64,
    },
    /// Readers did not release the region before the deadline; the operation was undone.
    #[error("{region}: {readers} reader(s) still hold it after {waited:?}")]
    DrainTimeout {
        /// The region.
        region: RegionId,
        /// Readers still holding it.
        readers: u64,
        /// How long the writer waited.
        waited: Duration,
    },
    /// The table lock could not be taken before the deadline.
    #[error("timed out waiting for the table lock")]
    LockTimeout,
    /// All memory slot numbers are in use.
    #[error("no free memory slot (limit {0})")]
    NoSlot(u32),
    /// Creating or changing the region's host mapping failed.
    #[error(transparent)]
    Region(#[from] RegionError),
    /// The hypervisor refused a slot change.
    #[error(transparent)]
    Slot(#[from] SlotError),
    /// Lazy page registration failed.
    #[error(transparent)]
    Lazy(#[from] LazyError),
}
