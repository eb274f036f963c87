//! Where devices live: hands out each virtio device's MMIO window and interrupt line (and
//! the kernel command-line fragment that announces them), puts the legacy devices on the
//! port bus, and keeps the transports so the machine can pause and resume devices.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::legacy::{
    ExitPort, SerialConsole, EXIT_PORT, I8042, I8042_PORT_BASE, I8042_PORT_LEN, SERIAL_PORT_BASE,
    SERIAL_PORT_LEN,
};
use devices::virtio::mmio::{MMIO_WINDOW, QUEUE_NOTIFY_OFFSET};
use devices::virtio::persist::TransportState;
use devices::virtio::{Interrupt, MmioTransport, VirtioDevice};
use memory::RegionTable;
use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout;
use crate::vstate::vm::{Vm, VmError};

/// Errors placing a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// KVM refused an irqfd or ioeventfd.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The bus refused the device's range.
    #[error("cannot place {what} on the I/O bus: {source:?}")]
    Bus {
        /// The device.
        what: &'static str,
        /// The bus error.
        source: vm_device::bus::Error,
    },
    /// An eventfd could not be made.
    #[error("cannot make an eventfd for {what}: {source}")]
    EventFd {
        /// The device.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

/// The register window and interrupt line of the `index`th virtio device.
pub fn virtio_slot(index: usize) -> (u64, u32) {
    (
        layout::VIRTIO_MMIO_BASE + index as u64 * MMIO_WINDOW,
        layout::VIRTIO_IRQ_BASE + index as u32,
    )
}

/// The kernel command-line fragment announcing the `index`th virtio device.
pub fn announcement(index: usize) -> String {
    let (base, irq) = virtio_slot(index);
    format!("virtio_mmio.device=4K@{base:#x}:{irq}")
}

/// The legacy devices' event lines, which the machine watches.
pub struct LegacyEvents {
    /// The i8042's reset line.
    pub reset: EventFd,
    /// The test exit port.
    pub exit_port: EventFd,
}

/// The devices of one VM, being placed.
#[derive(Default)]
pub struct DeviceManager {
    io: IoManager,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
}

fn eventfd(what: &'static str) -> Result<EventFd, DeviceError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|source| DeviceError::EventFd { what, source })
}

impl DeviceManager {
    /// Puts `device` in the next virtio slot: its register window on the MMIO bus, its
    /// interrupt line as an irqfd, its queue notifications as ioeventfds (a guest write
    /// signals the device thread without an exit to the VMM).
    pub fn add_virtio(
        &mut self,
        vm: &Vm,
        table: &Arc<RegionTable>,
        device: Box<dyn VirtioDevice>,
    ) -> Result<(), DeviceError> {
        let what = "a virtio device";
        let (base, irq) = virtio_slot(self.transports.len());
        let irqfd = eventfd(what)?;
        vm.register_irqfd(&irqfd, irq)?;
        let interrupt = Arc::new(Interrupt::new(irqfd));
        let transport = MmioTransport::new(device, Arc::clone(table), interrupt)
            .map_err(|source| DeviceError::EventFd { what, source })?;
        for (queue, event) in transport.queue_events().iter().enumerate() {
            vm.register_ioevent(event, base + QUEUE_NOTIFY_OFFSET, queue as u32)?;
        }
        let transport = Arc::new(Mutex::new(transport));
        let bus = |source| DeviceError::Bus { what, source };
        self.io
            .register_mmio(
                MmioRange::new(MmioAddress(base), MMIO_WINDOW).map_err(bus)?,
                transport.clone(),
            )
            .map_err(bus)?;
        self.transports.push(transport);
        Ok(())
    }

    /// Puts the serial console, the i8042 and the test exit port on the port bus.
    pub fn add_legacy(
        &mut self,
        serial: Arc<Mutex<SerialConsole>>,
    ) -> Result<LegacyEvents, DeviceError> {
        let reset = eventfd("the i8042")?;
        let exit_port = eventfd("the exit port")?;
        let dup = |fd: &EventFd, what| {
            fd.try_clone()
                .map_err(|source| DeviceError::EventFd { what, source })
        };
        let i8042 = Arc::new(Mutex::new(I8042::new(dup(&reset, "the i8042")?)));
        let port = Arc::new(Mutex::new(ExitPort::new(dup(&exit_port, "the exit port")?)));
        let bus = |what| move |source| DeviceError::Bus { what, source };
        let io = &mut self.io;
        io.register_pio(
            PioRange::new(PioAddress(SERIAL_PORT_BASE), SERIAL_PORT_LEN).map_err(bus("serial"))?,
            serial,
        )
        .map_err(bus("serial"))?;
        io.register_pio(
            PioRange::new(PioAddress(I8042_PORT_BASE), I8042_PORT_LEN).map_err(bus("i8042"))?,
            i8042,
        )
        .map_err(bus("i8042"))?;
        io.register_pio(
            PioRange::new(PioAddress(EXIT_PORT), 1).map_err(bus("exit port"))?,
            port,
        )
        .map_err(bus("exit port"))?;
        Ok(LegacyEvents { reset, exit_port })
    }

    /// Every device placed: the bus the vCPUs dispatch to, and the virtio devices.
    pub fn finish(self) -> (Arc<IoManager>, VirtioDevices) {
        (
            Arc::new(self.io),
            VirtioDevices {
                transports: self.transports,
            },
        )
    }
}

/// The virtio devices of a built VM.
pub struct VirtioDevices {
    transports: Vec<Arc<Mutex<MmioTransport>>>,
}

impl VirtioDevices {
    fn each(&self, mut f: impl FnMut(&mut MmioTransport)) {
        for transport in &self.transports {
            f(&mut transport.lock().unwrap_or_else(|e| e.into_inner()));
        }
    }

    /// Asks every device to stop serving after its request in hand; does not wait.
    pub fn pause(&self) {
        self.each(|t| t.pause());
    }

    /// Whether every device has paused, waiting until `deadline` at most.
    pub fn wait_paused(&self, deadline: Instant) -> bool {
        // Each wait returns at once for a device already paused: one deadline for all.
        self.transports.iter().all(|t| {
            t.lock()
                .unwrap_or_else(|e| e.into_inner())
                .wait_paused(deadline)
        })
    }

    /// Lets every device serve again.
    pub fn resume(&self) {
        self.each(|t| t.resume());
    }

    /// Every device's state, in slot order; the devices must be paused.
    pub fn save_states(&self) -> Result<Vec<TransportState>, String> {
        self.transports
            .iter()
            .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).save_state())
            .collect()
    }

    /// Puts every (fresh) device in the state a snapshot kept, in slot order, and starts
    /// those that were active.
    pub fn restore_states(&self, states: &[TransportState]) -> Result<(), String> {
        if states.len() != self.transports.len() {
            return Err(format!(
                "{} device states for {} devices",
                states.len(),
                self.transports.len()
            ));
        }
        for (transport, state) in self.transports.iter().zip(states) {
            transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .restore_state(state)?;
        }
        Ok(())
    }
}
