//! The i8042 keyboard controller, as far as a VM needs it: the CPU reset command ends the VM.
//!
//! Reads see an empty bus (0xff), as where no controller is fitted: Linux then finds no PS/2
//! controller at once instead of waiting out command timeouts (about a second of boot where
//! guest kernel code is emulated), and its reboot through port 0x64 still reaches us.
//! Port 0x61 in its range is the PC's system control port B, not the controller's: it
//! reads 0 (no NMI source such as a parity or I/O channel error, speaker and PIT channel 2
//! off; the VM has no PIT), so a guest's NMI handler finds no hardware error there.

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::I8042Device;
use vmm_sys_util::eventfd::EventFd;

use super::EventFdTrigger;

/// First port of the controller (data port 0x60; command/status port 0x64).
pub const I8042_PORT_BASE: u16 = 0x60;
/// Ports covered from [`I8042_PORT_BASE`].
pub const I8042_PORT_LEN: u16 = 5;

/// Offset of port 0x61, system control port B.
const CONTROL_PORT_B: PioAddressOffset = 1;

/// The controller on the port bus. Writing the reset command (0xfe) to port 0x64 signals the
/// reset eventfd; reads return 0xff.
#[derive(Debug)]
pub struct I8042 {
    device: I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// A controller that signals `reset` when the guest resets the CPU through it.
    pub fn new(reset: EventFd) -> Self {
        I8042 {
            device: I8042Device::new(EventFdTrigger::new(reset)),
        }
    }
}

impl MutDevicePio for I8042 {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(if offset == CONTROL_PORT_B { 0 } else { 0xff });
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let ([value], Ok(offset)) = (data, u8::try_from(offset)) {
            if let Err(e) = self.device.write(offset, *value) {
                log::error!("i8042: cannot signal the reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals_the_reset_event() {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(reset.try_clone().unwrap());
        let base = PioAddress(I8042_PORT_BASE);
        // Another command, and the reset command on the data port: no reset.
        dev.pio_write(base, 4, &[0x20]);
        dev.pio_write(base, 0, &[0xfe]);
        assert!(reset.read().is_err(), "no reset expected yet");
        dev.pio_write(base, 4, &[0xfe]);
        assert_eq!(reset.read().unwrap(), 1);
    }

    #[test]
    fn odd_sized_accesses_are_ignored() {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(reset.try_clone().unwrap());
        let base = PioAddress(I8042_PORT_BASE);
        dev.pio_write(base, 4, &[0xfe, 0xfe]);
        assert!(reset.read().is_err());
        let mut wide = [0u8; 2];
        dev.pio_read(base, 4, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        let mut status = [0u8];
        dev.pio_read(base, 4, &mut status);
        assert_eq!(status, [0xff], "no controller to probe");
    }

    #[test]
    fn system_control_port_b_reports_no_nmi_source() {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(reset.try_clone().unwrap());
        let mut port_b = [0xaau8];
        dev.pio_read(PioAddress(I8042_PORT_BASE), 1, &mut port_b);
        assert_eq!(port_b, [0], "port 0x61: no parity or I/O channel error");
        dev.pio_write(PioAddress(I8042_PORT_BASE), 1, &[0x03]);
        assert!(reset.read().is_err(), "a speaker write is no reset");
    }
}
