//! Virtio devices on the virtio-mmio transport (modern, version 2).
//!
//! A device ([`VirtioDevice`]) describes itself (type, queues, features, config space) and,
//! once the driver has set it up, serves its queues on a device thread of its own
//! ([`device_thread`]), never on a vCPU thread, and a vCPU never waits for it: a register
//! access neither does guest I/O nor waits for guest memory. Every guest-memory access
//! goes through the region table's guards ([`memory::GuardedMemory`]), taken per batch of
//! requests; descriptor chains are parsed by virtio-queue.

pub mod block;
pub mod counters;
pub mod device_thread;
pub mod mem;
pub mod mmio;
pub mod persist;
pub mod rng;
pub mod worker;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::guest_log::GuestLog;
use memory::RegionTable;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

pub use mmio::MmioTransport;
/// Device ids of the devices Kite has (virtio-mem's is `mem::VIRTIO_ID_MEM`).
pub use virtio_bindings::virtio_ids::{VIRTIO_ID_BLOCK, VIRTIO_ID_RNG};

/// Feature bit every modern device offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Feature bit: the driver and device tell each other, through the rings, from which
/// index on they want to be notified (fewer notifications and interrupts).
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
/// Interrupt status bit: a queue has used buffers.
pub const INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// Interrupt status bit: the configuration (or device status) changed.
pub const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// The device's interrupt: status bits the driver reads and acknowledges, and the irqfd
/// that raises the line.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    /// An interrupt raised through `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Sets `bits` in the status and raises the line.
    pub fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            log::error!("virtio: cannot raise an interrupt: {e}");
        }
    }

    /// The status bits pending.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears acknowledged `bits`.
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets the status bits a snapshot kept, without raising the line (the interrupt
    /// controller's own state says whether it is pending).
    pub fn restore_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }
}

/// What a device gets when the driver has set it up.
#[derive(Debug)]
pub struct Activation {
    /// Guest memory.
    pub memory: Arc<RegionTable>,
    /// The queues, as the driver configured them.
    pub queues: Vec<Queue>,
    /// One eventfd per queue, signalled when the driver notifies it.
    pub queue_events: Vec<EventFd>,
    /// The device's interrupt.
    pub interrupt: Arc<Interrupt>,
    /// Features the driver accepted.
    pub features: u64,
    /// Set by the device when a queue turns out unusable: the driver must reset it.
    pub needs_reset: Arc<std::sync::atomic::AtomicBool>,
    /// Where the device reports what the driver did wrong, rate-limited.
    pub log: Arc<GuestLog>,
}

/// Errors activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The device thread could not be started.
    #[error("cannot start the device thread: {0}")]
    Thread(std::io::Error),
    /// An eventfd could not be made.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    /// The device was already active.
    #[error("the device is already active")]
    AlreadyActive,
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;
    /// The device as the log names it, e.g. `virtio-blk vda`.
    fn name(&self) -> String {
        format!("virtio device {}", self.device_type())
    }
    /// The largest size of each queue; also the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered.
    fn features(&self) -> u64;
    /// Feature bits the driver must accept for `FEATURES_OK` (a subset of [`features`]).
    ///
    /// [`features`]: VirtioDevice::features
    fn required_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    /// The configuration generation: changes whenever the configuration space does, so a
    /// driver reading a field in several accesses can tell it was not torn.
    fn config_generation(&self) -> u32 {
        0
    }
    /// Reads the configuration space at `offset`; bytes beyond it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the configuration space (ignored by devices with a read-only one).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts serving the queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops serving the queues and forgets them. Must not wait for the device thread
    /// (it runs on a vCPU thread): the thread finishes the request in hand, then takes
    /// the next setup.
    fn reset(&mut self);
    /// The thread that serves the device's queues, if it has one: pausing is that
    /// thread's (see [`pause`]).
    ///
    /// [`pause`]: VirtioDevice::pause
    fn thread(&self) -> Option<&device_thread::DeviceThread> {
        None
    }
    /// [`thread`](VirtioDevice::thread), to command.
    fn thread_mut(&mut self) -> Option<&mut device_thread::DeviceThread> {
        None
    }
    /// Asks the device to pause (the VMM quiesces the VM, its vCPUs already stopped): to
    /// finish the request in hand, then serve nothing — requests, setups, resets — until
    /// [`resume`]. Does not wait. A device without a thread has nothing to do.
    ///
    /// [`resume`]: VirtioDevice::resume
    fn pause(&mut self) {
        if let Some(thread) = self.thread_mut() {
            thread.pause();
        }
    }
    /// Ends the pause; the device serves what came meanwhile. Does not wait.
    fn resume(&mut self) {
        if let Some(thread) = self.thread_mut() {
            thread.resume();
        }
    }
    /// Waits, until `deadline` at most, for the device to be paused: idle between
    /// requests and holding no guest memory; whether it is. A device without a thread
    /// always is.
    fn wait_paused(&self, deadline: Instant) -> bool {
        self.thread()
            .is_none_or(|thread| thread.wait_paused(deadline))
    }
    /// The queues as the paused device left them (see
    /// [`device_thread::DeviceThread::paused_queues`]); `Ok(None)` when it serves none.
    /// A device without a thread has no progress of its own: `queues` (the driver's setup)
    /// is where it is.
    fn paused_queues(
        &self,
        queues: &[Queue],
    ) -> Result<Option<Vec<virtio_queue::QueueState>>, device_thread::NotPaused> {
        match self.thread() {
            Some(thread) => thread.paused_queues(),
            None => Ok(Some(queues.iter().map(Queue::state).collect())),
        }
    }
}

/// Copies the part of `config` at `offset` into `data`; the rest of `data` reads as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}
