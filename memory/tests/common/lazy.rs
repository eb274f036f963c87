//! Touching lazy memory without hanging the test: a touch that no fault handler serves
//! blocks for ever, so it runs on a helper thread and the test fails by a deadline.

use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::Duration;

use memory::{LazyError, LazyPages, LazyRange, RegionTable};
use vm_memory::GuestAddress;

/// Longest a touch of lazy memory may take.
pub const FAULT_DEADLINE: Duration = Duration::from_secs(10);

/// Runs `f` on a helper thread and returns its result. If it takes longer than
/// [`FAULT_DEADLINE`], the test process ends with a failure: a stuck handler would
/// also hang the test's own drops (of its table, of the handler), so unwinding is
/// not enough.
pub fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(what.into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .unwrap();
    match rx.recv_timeout(FAULT_DEADLINE) {
        Ok(value) => {
            thread.join().unwrap();
            value
        }
        Err(RecvTimeoutError::Disconnected) => match thread.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the helper sends before it ends"),
        },
        Err(RecvTimeoutError::Timeout) => {
            eprintln!(
                "{what}: no result within {FAULT_DEADLINE:?} (does the fault handler serve faults?)"
            );
            std::process::exit(101)
        }
    }
}

/// Reads `len` bytes at `addr` through the table, on a helper thread.
pub fn read(table: &Arc<RegionTable>, addr: GuestAddress, len: usize) -> Vec<u8> {
    let table = table.clone();
    within("reading lazy memory", move || {
        let mut buf = vec![0xa5u8; len];
        table.read(addr, &mut buf, None).unwrap();
        buf
    })
}

/// Writes `data` at `addr` through the table, on a helper thread.
pub fn write(table: &Arc<RegionTable>, addr: GuestAddress, data: &[u8]) {
    let (table, data) = (table.clone(), data.to_vec());
    within("writing lazy memory", move || {
        table.write(addr, &data, None).unwrap()
    })
}

/// Copies `len` bytes at host address `host` into a pipe: an access by the kernel,
/// which fails with an errno (instead of a signal) where the memory cannot be read.
pub fn kernel_read(host: u64, len: usize) -> Result<usize, i32> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe() returns.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: write() only reads `[host, host + len)`; a fault there is reported as
    // EFAULT, never as a write to our memory. The pipe holds 64 KiB, so it does not block.
    let n = unsafe { libc::write(fds[1], host as *const libc::c_void, len) };
    let result = if n < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    } else {
        Ok(n as usize)
    };
    // SAFETY: the descriptors are ours and closed once.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    result
}

/// Lazy pages whose unregistration reports a failure after doing it, as a kernel that
/// refused part of it would.
pub struct FailingUnregister(pub Arc<dyn LazyPages>);

impl LazyPages for FailingUnregister {
    fn register(&self, range: LazyRange) -> Result<(), LazyError> {
        self.0.register(range)
    }
    fn unregister(&self, host_start: u64, len: u64) -> Result<(), LazyError> {
        self.0.unregister(host_start, len)?;
        Err(LazyError::Userfaultfd {
            op: "unregister",
            addr: host_start,
            len,
            reason: "refused by the test".into(),
        })
    }
}
