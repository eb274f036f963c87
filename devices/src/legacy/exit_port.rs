//! A test exit port (as QEMU's isa-debug-exit): a guest ends the VM with a status byte,
//! which Kite turns into its exit code. Test guests report pass (0) or fail through it.

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vmm_sys_util::eventfd::EventFd;

/// The port.
pub const EXIT_PORT: u16 = 0xf4;

/// Writing byte `v` to the port adds `v + 1` to the eventfd (so 0 is seen too); the VMM
/// reads `v` back as the counter minus one.
#[derive(Debug)]
pub struct ExitPort {
    event: EventFd,
}

impl ExitPort {
    /// A port signalling `event`.
    pub fn new(event: EventFd) -> Self {
        ExitPort { event }
    }

    /// The status a guest wrote, from the eventfd counter read by the VMM.
    pub fn status_of(counter: u64) -> u8 {
        u8::try_from(counter.saturating_sub(1)).unwrap_or(u8::MAX)
    }
}

impl MutDevicePio for ExitPort {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let ([status], 0) = (data, offset) {
            if let Err(e) = self.event.write(u64::from(*status) + 1) {
                log::error!("exit port: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_through_the_counter() {
        let event = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut port = ExitPort::new(event.try_clone().unwrap());
        port.pio_write(PioAddress(EXIT_PORT), 0, &[0]);
        assert_eq!(ExitPort::status_of(event.read().unwrap()), 0);
        port.pio_write(PioAddress(EXIT_PORT), 0, &[7]);
        assert_eq!(ExitPort::status_of(event.read().unwrap()), 7);
        port.pio_write(PioAddress(EXIT_PORT), 0, &[1, 2]);
        assert!(event.read().is_err(), "wide writes are ignored");
    }
}
