//! Knowing when a thread has ended without joining it blind: the thread signals an
//! eventfd as its last act ([`ExitSignal`], even when it unwinds), and its owner waits
//! for that with a deadline ([`wait_readable`]) before it joins, so a thread stuck in a
//! host call cannot hold its owner (VM shutdown) up for ever.
//!
//! ```
//! use devices::thread_exit::{wait_readable, ExitSignal};
//! use std::time::{Duration, Instant};
//! use vmm_sys_util::eventfd::EventFd;
//! let exited = EventFd::new(libc::EFD_NONBLOCK).unwrap();
//! let signal = ExitSignal(exited.try_clone().unwrap());
//! let thread = std::thread::spawn(move || drop(signal));
//! assert!(wait_readable(&exited, Instant::now() + Duration::from_secs(10)));
//! thread.join().unwrap();
//! ```

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

/// Signals its eventfd when dropped: held by a thread, its last act.
#[derive(Debug)]
pub struct ExitSignal(pub EventFd);

impl Drop for ExitSignal {
    fn drop(&mut self) {
        if let Err(e) = self.0.write(1) {
            log::error!("a thread cannot signal its exit: {e}");
        }
    }
}

/// Waits until `fd` is readable or `deadline` passes; whether it became readable.
pub fn wait_readable(fd: &impl AsRawFd, deadline: Instant) -> bool {
    let mut pollfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = i32::try_from(left.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd, its count given.
        let n = unsafe { libc::poll(&mut pollfd, 1, ms) };
        if n > 0 {
            return true;
        }
        if n == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return false;
        }
    }
}

static LEFT_BEHIND: AtomicBool = AtomicBool::new(false);

/// Records that a thread did not exit by its deadline and was left running: whatever it
/// holds must then outlive the process's own teardown.
pub fn note_left_behind() {
    LEFT_BEHIND.store(true, Ordering::SeqCst);
}

/// Whether any thread was left behind.
pub fn threads_left_behind() -> bool {
    LEFT_BEHIND.load(Ordering::SeqCst)
}
