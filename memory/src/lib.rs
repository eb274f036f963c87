//! Kite's guest memory.
//!
//! Guest memory is a [`RegionTable`] of [`Region`]s, kept the way Linux keeps VMAs
//! with per-VMA locks:
//!
//! - readers (vCPU and device threads) find a region and read-lock it, with a fast
//!   path that never blocks ([`RegionTable::try_lock_region`]) and a two-tier lookup that
//!   takes the table lock for read only to wait out a writer ([`RegionTable::lock_region`]);
//! - a [`RegionGuard`] holds the read lock while memory is copied; copies may fault on
//!   lazily populated memory, which a [`FaultHandler`] fills without taking any lock
//!   a writer could hold;
//! - writers add, grow, shrink and remove regions, waiting only for the readers of the
//!   region they change, and tell the hypervisor through [`MemorySlots`].
//!
//! ```
//! use memory::{RegionTable, RegionSpec};
//! use vm_memory::GuestAddress;
//!
//! let table = RegionTable::default();
//! table.insert(RegionSpec::anonymous(GuestAddress(0), 0x10000), None).unwrap();
//! table.write(GuestAddress(0xfffe), &[1, 2], None).unwrap();
//! let mut buf = [0u8; 2];
//! table.read(GuestAddress(0xfffe), &mut buf, None).unwrap();
//! assert_eq!(buf, [1, 2]);
//! assert!(table.read(GuestAddress(0xffff), &mut buf, None).is_err());
//! ```

mod area;
pub mod copy;
mod fault_protocol;
pub mod guarded;
pub mod lazy;
pub mod lockdep;
mod mapping;
pub mod metrics;
pub mod persist;
pub mod region;
mod region_lock;
pub mod slots;
mod snapshot;
mod sync;
pub mod table;
#[cfg(not(loom))]
pub mod uffd;

pub use area::AreaId;
pub use copy::CopyError;
pub use fault_protocol::FaultStats;
/// loom models only: the fault handler's protocol over a kernel of the model's own
/// (see `src/fault_protocol.rs`); normal builds keep it private to the crate.
#[cfg(loom)]
pub use fault_protocol::{FaultKernel, Faults, FillError, KernelError};
pub use guarded::{GuardedMemory, GuardedMemoryError, GuardedRegion};
pub use lazy::{FaultRegistry, LazyError, LazyPages, LazyRange};
pub use mapping::MappingError;
pub use metrics::{RegionMetrics, TableMetrics, WaitStats};
pub use persist::{PersistError, SavedMemory, SavedRange};
pub use region::{
    Backing, LazySource, Region, RegionError, RegionGuard, RegionId, RegionSpec, PAGE_SIZE,
};
pub use slots::{MemorySlots, NoSlots, SlotError, SlotMapping};
/// loom models only: make every deadline of the execution pass (see `src/sync.rs`).
#[cfg(loom)]
pub use sync::parking::pass_deadlines;
pub use sync::Deadline;
pub use table::{LookupError, RegionTable, TableConfig, TableError};
#[cfg(not(loom))]
pub use uffd::{FaultHandler, ThreadHooks};
