//! The guest console on the host terminal: guest output to stdout (watched for a kernel
//! panic), host stdin to the guest, with the terminal in raw mode while the VM runs.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use devices::legacy::SerialConsole;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

/// What the Linux kernel prints when it panics.
const PANIC_MARKER: &[u8] = b"Kernel panic - not syncing";

/// Guest console output: passed to `out`, and watched for a kernel panic. If `out` fails
/// (say, a closed pipe), the output is dropped from then on, with one warning. An
/// interrupted write is retried; output a non-blocking `out` cannot take now is dropped
/// (a vCPU does not wait for a stalled reader) and counted, and output goes on.
pub struct ConsoleOutput {
    out: Box<dyn Write + Send>,
    broken: bool,
    /// Bytes dropped because `out` would have blocked.
    dropped: u64,
    /// Set when the VM is stopping: a write interrupted then (a vCPU kicked out of a
    /// stalled console write) is abandoned, not retried.
    stopping: Option<Arc<AtomicBool>>,
    /// The tail of the output, long enough to find the markers across writes.
    tail: Vec<u8>,
    panicked: Arc<AtomicBool>,
    /// A line the VMM waits for, and the eventfd signalled (once) when the guest
    /// printed it.
    watch: Option<(Vec<u8>, EventFd)>,
}

impl ConsoleOutput {
    /// Output to `out`; `panicked` is set once the guest kernel has panicked.
    pub fn new(out: Box<dyn Write + Send>, panicked: Arc<AtomicBool>) -> Self {
        ConsoleOutput {
            out,
            broken: false,
            dropped: 0,
            stopping: None,
            tail: Vec::with_capacity(2 * PANIC_MARKER.len()),
            panicked,
            watch: None,
        }
    }
}

impl ConsoleOutput {
    /// Abandons a write that `stopping` (the VM's stop flag) interrupts.
    pub fn stop_with(mut self, stopping: Arc<AtomicBool>) -> Self {
        self.stopping = Some(stopping);
        self
    }

    /// Signals `seen` once the guest has printed `text` (`kite run --until-console`).
    pub fn watch_for(mut self, text: &str, seen: EventFd) -> Self {
        self.watch = Some((text.as_bytes().to_vec(), seen));
        self
    }

    /// Finds the markers in what was just written (`tail` holds the end of the output
    /// before it too, so a marker split across writes is found).
    fn find_markers(&mut self) {
        let found = |tail: &[u8], marker: &[u8]| {
            !marker.is_empty() && tail.windows(marker.len()).any(|w| w == marker)
        };
        if found(&self.tail, PANIC_MARKER) {
            self.panicked.store(true, Ordering::Release);
        }
        if let Some((text, seen)) = &self.watch {
            if found(&self.tail, text) {
                if let Err(e) = seen.write(1) {
                    log::error!("cannot signal that the console printed {text:?}: {e}");
                }
                self.watch = None;
            }
        }
        let longest = self
            .watch
            .as_ref()
            .map_or(0, |(text, _)| text.len())
            .max(PANIC_MARKER.len());
        let keep = longest - 1;
        if self.tail.len() > keep {
            self.tail.drain(..self.tail.len() - keep);
        }
    }

    fn is_stopping(&self) -> bool {
        self.stopping
            .as_ref()
            .is_some_and(|s| s.load(Ordering::Acquire))
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = if self.broken {
            buf.len()
        } else {
            loop {
                match self.out.write(buf) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                        if self.is_stopping() {
                            self.dropped += buf.len() as u64;
                            break buf.len();
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if self.dropped == 0 {
                            log::warn!("guest console output is not read fast enough: dropping");
                        }
                        self.dropped += buf.len() as u64;
                        break buf.len();
                    }
                    Err(e) => {
                        self.broken = true;
                        log::warn!("guest console output stopped: {e}");
                        break buf.len();
                    }
                }
            }
        };
        self.tail.extend_from_slice(&buf[..n]);
        self.find_markers();
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.broken {
            return Ok(());
        }
        match self.out.flush() {
            Err(e)
                if e.kind() != std::io::ErrorKind::Interrupted
                    && e.kind() != std::io::ErrorKind::WouldBlock =>
            {
                self.broken = true;
                log::warn!("guest console output stopped: flush failed: {e}");
            }
            _ => {}
        }
        Ok(())
    }
}

impl Drop for ConsoleOutput {
    fn drop(&mut self) {
        if self.dropped > 0 {
            log::warn!(
                "guest console output: {} bytes dropped in all",
                self.dropped
            );
        }
    }
}

/// The terminal settings of stdin before raw mode, while it is in raw mode: what the
/// signal handler puts back when it ends the process at once.
static SAVED_TERMINAL: OnceLock<libc::termios> = OnceLock::new();
static TERMINAL_RAW: AtomicBool = AtomicBool::new(false);

/// Whether the guest may have the VMM's stdin: it is not a terminal (a pipe, a file,
/// `/dev/null`), or it is one and Kite is in its foreground. (Reading a terminal, or
/// changing its mode, from the background stops the whole process: `kite serve &`.)
pub fn stdin_is_ours() -> bool {
    if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        return true;
    }
    // SAFETY: tcgetpgrp and getpgrp take no pointers.
    unsafe { libc::tcgetpgrp(libc::STDIN_FILENO) == libc::getpgrp() }
}

/// Puts stdin in raw mode (when it is a terminal) and back in canonical mode when dropped.
#[derive(Debug)]
pub struct RawTerminal {
    raw: bool,
}

impl RawTerminal {
    /// Raw mode on stdin if it is a terminal; otherwise nothing.
    pub fn enter() -> Self {
        let stdin = std::io::stdin();
        if !std::io::IsTerminal::is_terminal(&stdin) {
            return RawTerminal { raw: false };
        }
        // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: stdin's fd and a valid termios to fill.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return RawTerminal { raw: false };
        }
        let saved = *SAVED_TERMINAL.get_or_init(|| saved);
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the termios it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: stdin's fd and a valid termios.
        let ok = unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } == 0;
        TERMINAL_RAW.store(ok, Ordering::SeqCst);
        RawTerminal { raw: ok }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if self.raw {
            TERMINAL_RAW.store(false, Ordering::SeqCst);
            if let Some(saved) = SAVED_TERMINAL.get() {
                // SAFETY: stdin's fd and the termios it had before.
                if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved) } != 0 {
                    log::warn!(
                        "cannot restore the terminal: {}",
                        std::io::Error::last_os_error()
                    );
                }
            }
        }
    }
}

/// Puts the terminal back as it was before raw mode, if it is in raw mode; for a signal
/// handler or the panic hook about to end the process (tcsetattr is async-signal-safe;
/// the settings were saved before raw mode began).
pub fn restore_terminal_now() {
    if TERMINAL_RAW.load(Ordering::SeqCst) {
        if let Some(saved) = SAVED_TERMINAL.get() {
            // SAFETY: stdin's fd and the termios it had before raw mode.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved) };
        }
    }
}

/// Feeds host stdin to the serial console. When the guest's FIFO is full it stops reading
/// stdin until the guest has drained it, so no input is dropped.
pub struct ConsoleInput {
    serial: Arc<Mutex<SerialConsole>>,
    drained: EventFd,
    pending: Vec<u8>,
    reading: bool,
}

impl ConsoleInput {
    /// Input to `serial`, which signals `drained` when its input FIFO empties.
    pub fn new(serial: Arc<Mutex<SerialConsole>>, drained: EventFd) -> Self {
        ConsoleInput {
            serial,
            drained,
            pending: Vec::new(),
            reading: false,
        }
    }

    fn stdin_events() -> Events {
        Events::new_raw(std::io::stdin().as_raw_fd(), EventSet::IN)
    }

    /// Hands pending bytes to the guest; true when none are left.
    fn flush_pending(&mut self) -> bool {
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        match serial.queue_input(&self.pending) {
            Ok(n) => {
                self.pending.drain(..n);
            }
            Err(e) => log::error!("{e}"),
        }
        self.pending.is_empty()
    }

    fn set_reading(&mut self, ops: &mut EventOps, reading: bool) {
        if reading == self.reading {
            return;
        }
        let result = if reading {
            ops.add(Self::stdin_events())
        } else {
            ops.remove(Self::stdin_events())
        };
        match result {
            Ok(()) => self.reading = reading,
            // Stdin that epoll cannot watch (a regular file): no console input.
            Err(e) => log::debug!("console input off: {e:?}"),
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.drained, EventSet::IN)) {
            log::error!("console input: cannot watch the serial FIFO: {e:?}");
            return;
        }
        self.set_reading(ops, true);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.drained.as_raw_fd() {
            let _ = self.drained.read();
            if self.flush_pending() {
                self.set_reading(ops, true);
            }
            return;
        }
        let mut buf = [0u8; 64];
        match std::io::stdin().lock().read(&mut buf) {
            Ok(0) => self.set_reading(ops, false),
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                if !self.flush_pending() {
                    self.set_reading(ops, false);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::warn!("console input: {e}");
                self.set_reading(ops, false);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Collects what is written (the logger's tests use it too).
    #[derive(Clone, Default)]
    pub(crate) struct Sink(pub(crate) Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn panic_marker_is_found_across_byte_writes() {
        let flag = Arc::new(AtomicBool::new(false));
        let sink = Sink::default();
        let mut out = ConsoleOutput::new(Box::new(sink.clone()), flag.clone());
        for b in b"[ 1.0] Kernel panic - not syncin" {
            out.write_all(&[*b]).unwrap();
        }
        assert!(!flag.load(Ordering::Acquire));
        out.write_all(b"g: VFS\n").unwrap();
        assert!(flag.load(Ordering::Acquire));
        assert_eq!(
            &*sink.0.lock().unwrap(),
            b"[ 1.0] Kernel panic - not syncing: VFS\n"
        );
    }

    struct Closed;

    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
    }

    #[test]
    fn a_closed_output_is_dropped_but_still_watched() {
        let flag = Arc::new(AtomicBool::new(false));
        let mut out = ConsoleOutput::new(Box::new(Closed), flag.clone());
        for _ in 0..3 {
            out.write_all(b"Kernel panic - not syncing\n").unwrap();
            out.flush().unwrap();
        }
        assert!(flag.load(Ordering::Acquire));
    }

    /// Fails each write once with `error`, then takes it.
    struct Flaky {
        error: std::io::ErrorKind,
        failed: bool,
        got: Sink,
    }

    impl Write for Flaky {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.failed = !self.failed;
            if self.failed {
                return Err(self.error.into());
            }
            self.got.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn interrupted_and_full_outputs_do_not_switch_the_console_off() {
        let got = Sink::default();
        let flaky = Flaky {
            error: std::io::ErrorKind::Interrupted,
            failed: false,
            got: got.clone(),
        };
        let mut out = ConsoleOutput::new(Box::new(flaky), Arc::new(AtomicBool::new(false)));
        out.write_all(b"one ").unwrap();
        out.write_all(b"two").unwrap();
        assert_eq!(
            &*got.0.lock().unwrap(),
            b"one two",
            "interrupted writes are retried"
        );

        let got = Sink::default();
        let flaky = Flaky {
            error: std::io::ErrorKind::WouldBlock,
            failed: false,
            got: got.clone(),
        };
        let mut out = ConsoleOutput::new(Box::new(flaky), Arc::new(AtomicBool::new(false)));
        out.write_all(b"lost ").unwrap();
        out.write_all(b"kept").unwrap();
        assert_eq!(
            &*got.0.lock().unwrap(),
            b"kept",
            "what a full output cannot take is dropped, and output goes on"
        );
    }

    /// Always interrupted, as a console whose reader stalls is once the vCPU is kicked.
    struct Stalled;

    impl Write for Stalled {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::Interrupted.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_console_write_is_abandoned_when_the_vm_stops() {
        let stopping = Arc::new(AtomicBool::new(true));
        let mut out = ConsoleOutput::new(Box::new(Stalled), Arc::new(AtomicBool::new(false)))
            .stop_with(stopping);
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            out.write_all(b"output nobody reads").unwrap();
            let _ = done.send(());
        });
        finished
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the write gives up once the VM is stopping");
    }

    #[test]
    fn ordinary_output_is_not_a_panic() {
        let flag = Arc::new(AtomicBool::new(false));
        let mut out = ConsoleOutput::new(Box::new(Sink::default()), flag.clone());
        out.write_all(b"Kernel panic - not syncing is a phrase; Kernel pan")
            .unwrap();
        assert!(flag.load(Ordering::Acquire), "the marker itself counts");
        let flag = Arc::new(AtomicBool::new(false));
        let mut out = ConsoleOutput::new(Box::new(Sink::default()), flag.clone());
        out.write_all(b"Run /init as init process\n").unwrap();
        assert!(!flag.load(Ordering::Acquire));
    }
}
