//! What a snapshot keeps of a virtio device: its transport's registers, its queues (as
//! the driver set them up, and where the device thread had got to in each), and its
//! interrupt status. Device-specific state (virtio-mem's plugged blocks) is the device's.

use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;

/// A queue's state ([`QueueState`], which has no serde support of its own).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Next available-ring entry the device reads.
    pub next_avail: u16,
    /// Next used-ring entry the device writes.
    pub next_used: u16,
    /// Whether `VIRTIO_F_EVENT_IDX` is in use.
    pub event_idx_enabled: bool,
    /// Size the driver chose.
    pub size: u16,
    /// Whether the driver made it ready.
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the available ring.
    pub avail_ring: u64,
    /// Guest address of the used ring.
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// A virtio-mmio transport and its device's queues.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// The device's type (`VIRTIO_ID_*`): restored only onto the same.
    pub device_type: u32,
    /// The device status the driver wrote.
    pub status: u32,
    /// Whether the device needs a reset (it found a queue unusable).
    pub needs_reset: bool,
    /// Interrupt status bits not yet acknowledged.
    pub interrupt_status: u32,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// The queues as the driver set them up (the registers' view).
    pub queues: Vec<QueueSnapshot>,
    /// Queues the driver gave an invalid size.
    pub bad_size: Vec<bool>,
    /// While the device is active: its queues as its thread left them.
    pub active_queues: Option<Vec<QueueSnapshot>>,
}
