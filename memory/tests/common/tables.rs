//! Small tables the unit tests build.

use std::sync::Arc;

use memory::{Backing, RegionSpec, RegionTable, TableConfig};
use vm_memory::GuestAddress;

use super::slots::RecordingSlots;

pub const MIB: u64 = 1 << 20;

/// A table whose slot changes go to `slots`, without lazy memory.
pub fn table_with(slots: Arc<RecordingSlots>, config: TableConfig) -> RegionTable {
    RegionTable::new(slots, None, config)
}

/// A table with one 1 MiB anonymous region at guest address 0.
pub fn table_with_a_region() -> (RegionTable, memory::RegionId) {
    let table = RegionTable::default();
    let id = table
        .insert(RegionSpec::anonymous(GuestAddress(0), MIB), None)
        .unwrap();
    (table, id)
}

/// An anonymous region of `size` bytes at `start` that can grow to `capacity`.
pub fn grow_spec(start: u64, size: u64, capacity: u64) -> RegionSpec {
    RegionSpec {
        start: GuestAddress(start),
        size,
        capacity,
        backing: Backing::Anonymous,
    }
}
