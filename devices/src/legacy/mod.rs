//! Legacy PC devices: the 8250 serial port (the console), the i8042 controller (reset), and
//! a test exit port.
//!
//! The device models come from vm-superio; this module puts them on vm-device's port-I/O bus
//! and connects their events to eventfds.

mod exit_port;
mod i8042;
mod serial;

use vmm_sys_util::eventfd::EventFd;

pub use exit_port::{ExitPort, EXIT_PORT};
pub use i8042::{I8042, I8042_PORT_BASE, I8042_PORT_LEN};
pub use serial::{
    SerialConsole, SerialInputError, SerialSnapshot, SERIAL_IRQ, SERIAL_PORT_BASE, SERIAL_PORT_LEN,
};

/// A vm-superio [`vm_superio::Trigger`] that signals an eventfd: an irqfd (interrupt) or a
/// VMM event (reset).
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Signals through `fd`.
    pub fn new(fd: EventFd) -> Self {
        EventFdTrigger(fd)
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
