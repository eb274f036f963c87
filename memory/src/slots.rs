//! The hypervisor side of guest memory: the region table tells an implementation of
//! [`MemorySlots`] (the `vmm` crate's KVM VM) when a region's memory slot must be
//! created, resized or deleted, at the point of the writer protocol where that is safe.

/// One KVM user memory slot as the table wants it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotMapping {
    /// Slot number (reused after its region is removed).
    pub slot: u32,
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host virtual address backing `guest_addr`.
    pub host_addr: u64,
}

/// Errors a slot implementation reports.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// The hypervisor refused the slot update.
    #[error("memory slot {slot} update failed: {source}")]
    Update {
        /// Slot number.
        slot: u32,
        /// The hypervisor's error.
        source: std::io::Error,
    },
    /// A resize deleted the slot, then neither the new nor the old form could be
    /// created again: the guest lost the slot's memory.
    #[error("memory slot {slot} is lost: resizing it failed ({resize}), and so did restoring it ({restore})")]
    Lost {
        /// Slot number.
        slot: u32,
        /// Why the new form was refused.
        resize: std::io::Error,
        /// Why the old form was refused.
        restore: std::io::Error,
    },
}

/// Applies memory slot changes for the region table.
///
/// `map` is called for a new slot and for a slot whose size changed (an implementation
/// on KVM deletes and re-creates it, since KVM cannot resize a slot in place); `unmap`
/// deletes it. Calls come from writers, serialised by the table lock.
pub trait MemorySlots: Send + Sync {
    /// Creates `mapping`, or changes the slot with the same number to it.
    fn map(&self, mapping: &SlotMapping) -> Result<(), SlotError>;
    /// Deletes the slot of `mapping`.
    fn unmap(&self, mapping: &SlotMapping) -> Result<(), SlotError>;
}

/// For a table not attached to a VM (tools, tests): slot changes do nothing.
#[derive(Debug, Default)]
pub struct NoSlots;

impl MemorySlots for NoSlots {
    fn map(&self, _: &SlotMapping) -> Result<(), SlotError> {
        Ok(())
    }
    fn unmap(&self, _: &SlotMapping) -> Result<(), SlotError> {
        Ok(())
    }
}
