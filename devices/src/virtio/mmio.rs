//! The virtio-mmio transport, version 2 (modern): the register window a driver uses to
//! discover, negotiate with, set up and reset a device.
//!
//! Whatever the driver writes, the transport stays consistent: out-of-range queue
//! selections, sizes and widths are ignored, features the device did not offer (or
//! missing ones it requires) keep `FEATURES_OK` from being set, and queues of invalid
//! size at `DRIVER_OK`, or not valid in guest memory (checked by the device thread), set
//! `DEVICE_NEEDS_RESET`. A register access never waits: not for guest memory (a writer
//! may hold it), not for the device thread (which may be in the middle of I/O); what the
//! driver did wrong is logged rate-limited ([`GuestLog`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use memory::RegionTable;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;
use vmm_sys_util::eventfd::EventFd;

use super::persist::{QueueSnapshot, TransportState};
use super::{Activation, Interrupt, VirtioDevice, INT_CONFIG, VIRTIO_RING_F_EVENT_IDX};
use crate::guest_log::GuestLog;

/// Size of one device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4554_494b; // "KITE"

// Register offsets (virtio 1.2, 4.2.2).
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
const REG_QUEUE_USED_LOW: u64 = 0x0a0;
const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const REG_CONFIG: u64 = 0x100;

/// Offset of the queue-notify register, where the VMM places the queues' ioeventfds.
pub const QUEUE_NOTIFY_OFFSET: u64 = REG_QUEUE_NOTIFY;

/// A device behind its virtio-mmio register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    memory: Arc<RegionTable>,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    /// Queues the driver gave an invalid size: they cannot be activated.
    bad_size: Vec<bool>,
    /// Set by the device thread when a queue turns out unusable; a fresh one per reset,
    /// so a stopped thread still finishing cannot mark the device anew.
    needs_reset: Arc<AtomicBool>,
    log: Arc<GuestLog>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    active: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// `device` on guest memory `memory`, interrupting through `interrupt`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        memory: Arc<RegionTable>,
        interrupt: Arc<Interrupt>,
    ) -> std::io::Result<Self> {
        let queues = Self::fresh_queues(device.as_ref());
        let queue_events = (0..queues.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        let log = Arc::new(GuestLog::new(device.name()));
        Ok(MmioTransport {
            log,
            device,
            memory,
            interrupt,
            bad_size: vec![false; queues.len()],
            queues,
            queue_events,
            needs_reset: Arc::new(AtomicBool::new(false)),
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            active: false,
        })
    }

    fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
        device
            .queue_max_sizes()
            .iter()
            .filter_map(|&max| Queue::new(max).ok())
            .collect()
    }

    /// The eventfd of each queue: the VMM registers them as ioeventfds on the notify
    /// register, with the queue index as the value to match.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// Asks the device to pause (see [`VirtioDevice::pause`]); does not wait.
    pub fn pause(&mut self) {
        self.device.pause();
    }

    /// Ends the device's pause; does not wait.
    pub fn resume(&mut self) {
        self.device.resume();
    }

    /// Waits until `deadline` at most for the device to be paused; whether it is.
    pub fn wait_paused(&self, deadline: std::time::Instant) -> bool {
        self.device.wait_paused(deadline)
    }

    /// The driver-visible device status.
    pub fn status(&self) -> u32 {
        let needs_reset = if self.needs_reset.load(Ordering::Acquire) {
            VIRTIO_CONFIG_S_NEEDS_RESET
        } else {
            0
        };
        self.status | needs_reset
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            return None; // no queue changes while the device runs
        }
        self.queues
            .get_mut(self.queue_sel as usize)
            .filter(|q| !q.ready())
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        self.queues = Self::fresh_queues(self.device.as_ref());
        self.bad_size.fill(false);
        for fd in &self.queue_events {
            let _ = fd.read();
        }
        self.needs_reset = Arc::new(AtomicBool::new(false));
        self.interrupt.acknowledge(u32::MAX);
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let newly = value & !self.status;
        // FAILED stays until a reset: a driver that gave up must start over.
        let mut status = value | (self.status & VIRTIO_CONFIG_S_FAILED);
        if newly & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device.features();
            let required = self.device.required_features();
            let driver = self.driver_features;
            if driver & !offered != 0 || driver & required != required {
                self.log.warn("features refused", || {
                    format!(
                        "driver features {driver:#x} refused: offered {offered:#x}, \
                         required {required:#x}"
                    )
                });
                status &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if newly & VIRTIO_CONFIG_S_DRIVER_OK != 0 && !self.active {
            if status & (VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_FAILED)
                != VIRTIO_CONFIG_S_FEATURES_OK
            {
                status &= !VIRTIO_CONFIG_S_DRIVER_OK;
            } else if let Err(why) = self.activate() {
                self.log
                    .warn("activation failed", || format!("cannot activate: {why}"));
                self.needs_reset.store(true, Ordering::Release);
                self.interrupt.raise(INT_CONFIG);
            }
        }
        if status & VIRTIO_CONFIG_S_FAILED != 0 && self.active {
            self.device.reset();
            self.active = false;
        }
        self.status = status;
    }

    /// Hands the queues to the device. Their rings are checked against guest memory by
    /// the device thread: taking guest memory here could wait for a writer.
    fn activate(&mut self) -> Result<(), String> {
        if let Some(i) =
            (0..self.queues.len()).find(|&i| self.queues[i].ready() && self.bad_size[i])
        {
            return Err(format!("queue {i} has an invalid size"));
        }
        // The device gets its own copies; the registers keep showing the driver's setup.
        let queues: Vec<QueueState> = self.queues.iter().map(Queue::state).collect();
        self.start_device(&queues)
    }

    /// Hands the device queues in state `queues` (the driver's setup, or where a
    /// snapshot's device had got to).
    fn start_device(&mut self, queues: &[QueueState]) -> Result<(), String> {
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let queues = queues
            .iter()
            .map(|q| {
                let mut queue = Queue::try_from(*q)?;
                queue.set_event_idx(event_idx);
                Ok(queue)
            })
            .collect::<Result<Vec<_>, virtio_queue::Error>>()
            .map_err(|e| e.to_string())?;
        let queue_events = self
            .queue_events
            .iter()
            .map(EventFd::try_clone)
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| e.to_string())?;
        self.device
            .activate(Activation {
                memory: Arc::clone(&self.memory),
                queues,
                queue_events,
                interrupt: Arc::clone(&self.interrupt),
                features: self.driver_features,
                needs_reset: Arc::clone(&self.needs_reset),
                log: Arc::clone(&self.log),
            })
            .map_err(|e| e.to_string())?;
        self.active = true;
        Ok(())
    }

    /// The transport's and its device's queues' state, for a snapshot: the device must be
    /// paused (its thread idle between requests).
    pub fn save_state(&self) -> Result<TransportState, String> {
        let active_queues = if self.active {
            let queues = self
                .device
                .paused_queues(&self.queues)
                .map_err(|e| format!("{}: {e}", self.device.name()))?
                // Active, but its thread serves no setup: it refused the setup (the
                // device needs a reset). Restored, the device checks it again.
                .unwrap_or_else(|| self.queues.iter().map(Queue::state).collect());
            Some(queues.into_iter().map(QueueSnapshot::from).collect())
        } else {
            None
        };
        Ok(TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            needs_reset: self.needs_reset.load(Ordering::Acquire),
            interrupt_status: self.interrupt.status(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            queues: self
                .queues
                .iter()
                .map(|q| QueueSnapshot::from(q.state()))
                .collect(),
            bad_size: self.bad_size.clone(),
            active_queues,
        })
    }

    /// Puts a fresh transport (never touched by a driver) in the state a snapshot kept,
    /// and starts the device on its queues if it was active. Checked first: the same
    /// device type and number of queues, queues the device can take; on an error nothing
    /// changed.
    pub fn restore_state(&mut self, state: &TransportState) -> Result<(), String> {
        let name = self.device.name();
        if state.device_type != self.device.device_type() {
            return Err(format!(
                "{name}: the snapshot has a device of type {} here",
                state.device_type
            ));
        }
        let count = self.queues.len();
        let counts = [
            state.queues.len(),
            state.bad_size.len(),
            state.active_queues.as_ref().map_or(count, Vec::len),
        ];
        if counts.iter().any(|&n| n != count) || (self.active || self.status != 0) {
            return Err(format!(
                "{name}: the snapshot's transport does not fit this device ({count} queues)"
            ));
        }
        let offered = self.device.features();
        if state.driver_features & !offered != 0 {
            return Err(format!(
                "{name}: the snapshot's driver took features {:#x} this device does not \
                 offer ({offered:#x}; a disk now read-only, say)",
                state.driver_features & !offered
            ));
        }
        let max_sizes = self.device.queue_max_sizes();
        let all_queues = state
            .queues
            .iter()
            .chain(state.active_queues.iter().flatten());
        for q in all_queues.clone() {
            if !max_sizes.contains(&q.max_size) {
                return Err(format!(
                    "{name}: a queue of the snapshot has {} entries at most; this device's \
                     have {max_sizes:?}",
                    q.max_size
                ));
            }
        }
        let queues = state
            .queues
            .iter()
            .map(|q| Queue::try_from(QueueState::from(*q)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{name}: a queue of the snapshot: {e}"))?;
        let needs_reset = Arc::new(AtomicBool::new(state.needs_reset));
        self.queues = queues;
        self.bad_size = state.bad_size.clone();
        self.needs_reset = needs_reset;
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.interrupt.restore_status(state.interrupt_status);
        if let Some(active) = &state.active_queues {
            let active: Vec<QueueState> = active.iter().map(|q| QueueState::from(*q)).collect();
            if let Err(e) = self.start_device(&active) {
                self.reset();
                return Err(format!("{name}: cannot start it: {e}"));
            }
        }
        Ok(())
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status(),
            REG_CONFIG_GENERATION => self.device.config_generation(),
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM => {
                let index = self.queue_sel as usize;
                if let Some(q) = self.selected_queue() {
                    let valid = u16::try_from(value)
                        .ok()
                        .is_some_and(|size| q.try_set_size(size).is_ok());
                    self.bad_size[index] = !valid;
                }
            }
            REG_QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH | REG_QUEUE_AVAIL_LOW
            | REG_QUEUE_AVAIL_HIGH | REG_QUEUE_USED_LOW | REG_QUEUE_USED_HIGH => {
                let high = offset & 4 != 0;
                let (low, high) = if high {
                    (None, Some(value))
                } else {
                    (Some(value), None)
                };
                if let Some(q) = self.selected_queue() {
                    match offset & !4 {
                        REG_QUEUE_DESC_LOW => q.set_desc_table_address(low, high),
                        REG_QUEUE_AVAIL_LOW => q.set_avail_ring_address(low, high),
                        _ => q.set_used_ring_address(low, high),
                    }
                }
            }
            REG_QUEUE_NOTIFY => {
                // Reached only without an ioeventfd for this value.
                if let Some(fd) = self.queue_events.get(value as usize) {
                    let _ = fd.write(1);
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.acknowledge(value),
            REG_STATUS => self.write_status(value),
            _ => log::debug!("virtio-mmio: write of {value:#x} to {offset:#x} ignored"),
        }
    }
}

impl MutDeviceMmio for MmioTransport {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            self.device.read_config(offset - REG_CONFIG, data);
            return;
        }
        data.fill(0);
        if let Ok(word) = <&mut [u8; 4]>::try_from(&mut *data) {
            if offset % 4 == 0 {
                *word = self.read_register(offset).to_le_bytes();
            }
        }
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if offset >= REG_CONFIG {
            self.device.write_config(offset - REG_CONFIG, data);
            return;
        }
        if let (Ok(word), 0) = (<[u8; 4]>::try_from(data), offset % 4) {
            self.write_register(offset, u32::from_le_bytes(word));
        }
    }
}
