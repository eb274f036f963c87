//! SIGINT and SIGTERM become an event of the VMM's event loop, so the VM shuts down cleanly;
//! a second one ends the process at once (exit code 128 + the signal).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::register_signal_handler;

/// The eventfd the handler signals (-1: none yet).
static EVENT_FD: AtomicI32 = AtomicI32::new(-1);
/// The last signal received (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    if RECEIVED.swap(num, Ordering::SeqCst) != 0 {
        // The second one: the clean shutdown the first asked for is taking too long for
        // whoever sent it. End now.
        crate::console::restore_terminal_now();
        // SAFETY: _exit(2) is async-signal-safe and ends the process at once.
        unsafe { libc::_exit(128 + num) };
    }
    let fd = EVENT_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one = 1u64.to_ne_bytes();
        // SAFETY: write(2) is async-signal-safe; `one` is 8 readable bytes and `fd` is the
        // eventfd `install` was given, which lives for the rest of the process.
        unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
    }
}

/// Makes SIGINT and SIGTERM signal `event` (which must live until the process exits).
pub fn install(event: &'static EventFd) -> Result<(), vmm_sys_util::errno::Error> {
    EVENT_FD.store(event.as_raw_fd(), Ordering::SeqCst);
    register_signal_handler(libc::SIGINT, on_signal)?;
    register_signal_handler(libc::SIGTERM, on_signal)
}

/// The signal received, if any.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        n => Some(n),
    }
}
