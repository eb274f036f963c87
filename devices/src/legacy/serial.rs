//! The 8250 serial port at 0x3f8 (COM1): the guest console.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::serial::{Error as SerialError, SerialEvents, SerialState};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use super::EventFdTrigger;

/// First port of COM1.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// Ports covered from [`SERIAL_PORT_BASE`].
pub const SERIAL_PORT_LEN: u16 = 8;
/// The ISA interrupt line of COM1.
pub const SERIAL_IRQ: u32 = 4;

/// Errors feeding input to the guest.
#[derive(Debug, thiserror::Error)]
pub enum SerialInputError {
    /// The serial port could not raise its interrupt.
    #[error("serial input: cannot raise the interrupt: {0}")]
    Interrupt(std::io::Error),
}

/// Signals an eventfd when the guest has read every queued input byte, so the VMM can
/// resume reading its input source instead of dropping bytes.
#[derive(Debug)]
struct InputDrained(EventFd);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {
        log::warn!("serial: the console output lost a byte");
    }
    fn in_buffer_empty(&self) {
        if let Err(e) = self.0.write(1) {
            log::error!("serial: cannot signal drained input: {e}");
        }
    }
}

/// The UART's registers and input FIFO, for a snapshot (vm-superio's [`SerialState`],
/// which has no serde support of its own).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Input the guest has not read yet.
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> Self {
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

type Uart = Serial<EventFdTrigger, InputDrained, Box<dyn Write + Send>>;

/// COM1 on the port bus: guest output goes to a writer, host input is queued for the guest.
pub struct SerialConsole {
    uart: Uart,
}

impl std::fmt::Debug for SerialConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialConsole").finish_non_exhaustive()
    }
}

impl SerialConsole {
    /// A console writing guest output to `out`, raising its interrupt through `interrupt` (an
    /// irqfd) and signalling `input_drained` when the guest has consumed all queued input.
    pub fn new(interrupt: EventFd, out: Box<dyn Write + Send>, input_drained: EventFd) -> Self {
        SerialConsole {
            uart: Serial::with_events(
                EventFdTrigger::new(interrupt),
                InputDrained(input_drained),
                out,
            ),
        }
    }

    /// Like [`SerialConsole::new`], in the state a snapshot kept (an error if the state
    /// is impossible: more input than the FIFO holds).
    pub fn restored(
        state: &SerialSnapshot,
        interrupt: EventFd,
        out: Box<dyn Write + Send>,
        input_drained: EventFd,
    ) -> Result<Self, String> {
        let uart = Serial::from_state(
            &SerialState::from(state),
            EventFdTrigger::new(interrupt),
            InputDrained(input_drained),
            out,
        )
        .map_err(|e| format!("the serial port's state: {e:?}"))?;
        Ok(SerialConsole { uart })
    }

    /// Its state, for a snapshot.
    pub fn state(&self) -> SerialSnapshot {
        self.uart.state().into()
    }

    /// Bytes of input the guest-visible FIFO can take now.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues as much of `input` as fits for the guest; returns how many bytes were taken.
    /// The rest must be offered again after the input-drained event.
    pub fn queue_input(&mut self, input: &[u8]) -> Result<usize, SerialInputError> {
        let take = input.len().min(self.input_capacity());
        if take == 0 {
            return Ok(0);
        }
        match self.uart.enqueue_raw_bytes(&input[..take]) {
            Ok(n) => Ok(n),
            Err(SerialError::Trigger(e)) => Err(SerialInputError::Interrupt(e)),
            // Neither can happen with `take` bounded by the capacity; report rather than lose.
            Err(SerialError::FullFifo) => Ok(0),
            Err(SerialError::IOError(e)) => Err(SerialInputError::Interrupt(e)),
        }
    }
}

impl MutDevicePio for SerialConsole {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0xff);
        if let ([byte], Ok(offset)) = (data, u8::try_from(offset)) {
            *byte = self.uart.read(offset);
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let ([value], Ok(offset)) = (data, u8::try_from(offset)) {
            if let Err(e) = self.uart.write(offset, *value) {
                log::error!("serial: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn console() -> (SerialConsole, Captured, EventFd, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let drained = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = Captured::default();
        let dev = SerialConsole::new(
            irq.try_clone().unwrap(),
            Box::new(out.clone()),
            drained.try_clone().unwrap(),
        );
        (dev, out, irq, drained)
    }

    const BASE: PioAddress = PioAddress(SERIAL_PORT_BASE);

    #[test]
    fn guest_output_reaches_the_writer() {
        let (mut dev, out, _irq, _drained) = console();
        for b in b"hi\n" {
            dev.pio_write(BASE, 0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn input_is_queued_up_to_the_fifo_and_drained_is_signalled() {
        let (mut dev, _out, irq, drained) = console();
        // Receive-data interrupt on, so queued input raises the line.
        dev.pio_write(BASE, 1, &[0x01]);
        let big = vec![b'x'; dev.input_capacity() + 10];
        let taken = dev.queue_input(&big).unwrap();
        assert_eq!(taken, big.len() - 10);
        assert_eq!(
            dev.queue_input(b"y").unwrap(),
            0,
            "a full FIFO takes nothing"
        );
        assert!(irq.read().is_ok(), "queued input raises the interrupt");
        let mut byte = [0u8];
        for _ in 0..taken {
            dev.pio_read(BASE, 0, &mut byte);
            assert_eq!(byte[0], b'x');
        }
        assert_eq!(
            drained.read().unwrap(),
            1,
            "reading the last byte signals drained"
        );
        assert_eq!(dev.queue_input(b"y").unwrap(), 1);
    }

    #[test]
    fn wide_accesses_see_an_idle_bus() {
        let (mut dev, out, _irq, _drained) = console();
        dev.pio_write(BASE, 0, b"ab");
        assert!(out.0.lock().unwrap().is_empty());
        let mut wide = [0u8; 4];
        dev.pio_read(BASE, 5, &mut wide);
        assert_eq!(wide, [0xff; 4]);
    }
}
