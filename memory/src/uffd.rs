//! The userfaultfd fault handler: a thread that fills the pages of lazily populated
//! regions on first touch, from zeroes or from a backing file.
//!
//! It finds where a faulting page comes from through [`FaultRegistry::lookup`], which
//! reads an immutably published list and never waits on the table lock or on a region
//! lock. So a copy that faults while holding a region guard is released even while a
//! writer holds the table lock and waits for that very guard (guarantee 7), and the
//! same holds for a vCPU that faults inside `KVM_RUN`.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use userfaultfd::{Event, Uffd, UffdBuilder};
use vmm_sys_util::eventfd::EventFd;

use crate::fault_protocol::{FaultKernel, Faults, FillError, KernelError};
pub use crate::fault_protocol::{FaultStats, FILL_WINDOW};
use crate::lazy::{LazyError, LazyPages, LazyRange};
use crate::region::{LazySource, PAGE_SIZE};

/// The real kernel under the fault protocol: the userfaultfd, and the VMM's `died` hook.
struct UffdKernel {
    uffd: Uffd,
    /// The VMM's `died` hook, until it has been told once.
    died: Mutex<Option<DiedHook>>,
}

struct Shared {
    /// The protocol (registry, change lock, counters) over the userfaultfd.
    faults: Faults<UffdKernel>,
    stop: EventFd,
}

/// The hook told why a thread cannot go on.
type DiedHook = Box<dyn FnOnce(String) + Send>;

/// What the VMM gives a thread it does not start itself (the fault handler; the VMM's
/// own control socket uses it too).
pub struct ThreadHooks {
    /// Run first on the thread (the VMM installs its seccomp filter there); an error ends
    /// the thread, reported through `died`.
    pub confine: Box<dyn FnOnce() -> Result<(), String> + Send>,
    /// Told why, when the thread ends before the handler is dropped (for the fault
    /// handler also when a lazy page's source cannot be read): the VM cannot go on.
    pub died: DiedHook,
}

impl Default for ThreadHooks {
    /// Unconfined; a death is logged.
    fn default() -> Self {
        ThreadHooks {
            confine: Box::new(|| Ok(())),
            died: Box::new(|why| log::error!("{why}")),
        }
    }
}

/// Owns the userfaultfd and the thread that serves it. Stops the thread on drop.
pub struct FaultHandler {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl FaultHandler {
    /// Opens a userfaultfd (kernel-mode faults included, so KVM's accesses from
    /// `KVM_RUN` are served too; that needs root or `CAP_SYS_PTRACE`) and starts the
    /// handler thread.
    pub fn start() -> Result<Arc<FaultHandler>, LazyError> {
        Self::start_with(ThreadHooks::default())
    }

    /// Like [`FaultHandler::start`], with `hooks` run on the handler thread: `confine`
    /// first, and `died` if the thread ends before the handler is dropped (a failed
    /// poll, a failed confinement), after which lazy memory is not filled any more, or
    /// when a page's source cannot be read (the page is poisoned: an access to it fails
    /// with `EFAULT` in the kernel, `SIGBUS` in user space).
    pub fn start_with(hooks: ThreadHooks) -> Result<Arc<FaultHandler>, LazyError> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(|e| {
                LazyError::Start(format!(
                    "userfaultfd: {e} (serving the kernel's faults too, as KVM's accesses \
                     need, takes root, CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1)"
                ))
            })?;
        let stop = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| LazyError::Start(format!("eventfd: {e}")))?;
        let shared = Arc::new(Shared {
            faults: Faults::new(UffdKernel {
                uffd,
                died: Mutex::new(Some(hooks.died)),
            }),
            stop,
        });
        let worker = shared.clone();
        let confine = hooks.confine;
        let thread = std::thread::Builder::new()
            .name("kite-uffd".into())
            .spawn(move || {
                let result = confine().and_then(|()| worker.serve());
                if let Err(why) = result {
                    let why = format!("the userfaultfd fault handler stopped: {why}");
                    worker.faults.kernel().report(why);
                }
            })
            .map_err(|e| LazyError::Start(format!("spawn: {e}")))?;
        Ok(Arc::new(FaultHandler {
            shared,
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// Counters so far.
    pub fn stats(&self) -> FaultStats {
        self.shared.faults.stats()
    }

    /// Ranges registered now.
    pub fn registered_ranges(&self) -> usize {
        self.shared.faults.registry().len()
    }
}

impl Drop for FaultHandler {
    fn drop(&mut self) {
        let _ = self.shared.stop.write(1);
        if let Some(thread) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = thread.join();
        }
    }
}

impl LazyPages for FaultHandler {
    fn register(&self, range: LazyRange) -> Result<(), LazyError> {
        self.shared.faults.register(range)
    }

    fn unregister(&self, host_start: u64, len: u64) -> Result<(), LazyError> {
        self.shared.faults.unregister(host_start, len)
    }
}

/// What a userfaultfd ioctl error says, for the protocol.
fn kernel_error(e: userfaultfd::Error) -> KernelError {
    use nix::errno::Errno;
    match e {
        userfaultfd::Error::CopyFailed(n) | userfaultfd::Error::ZeropageFailed(n)
            if n == Errno::EEXIST =>
        {
            KernelError::Exists
        }
        userfaultfd::Error::CopyFailed(n) | userfaultfd::Error::ZeropageFailed(n)
            if n == Errno::ENOENT =>
        {
            KernelError::NotRegistered
        }
        e => KernelError::Other(e.to_string()),
    }
}

impl Shared {
    /// Serves faults until stopped (`Ok`) or unable to go on.
    fn serve(&self) -> Result<(), String> {
        let uffd = &self.faults.kernel().uffd;
        let mut page = vec![0u8; FILL_WINDOW as usize];
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfd structures for the call's duration.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("poll failed: {e}"));
            }
            if fds[1].revents != 0 {
                return Ok(());
            }
            loop {
                match uffd.read_event() {
                    Ok(Some(Event::Pagefault { addr, .. })) => {
                        self.faults.resolve(addr as u64, &mut page)
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        log::error!("fault handler: reading event failed: {e}");
                        self.faults.counters.errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        }
    }
}

impl FaultKernel for UffdKernel {
    fn register(&self, start: u64, len: u64) -> Result<(), KernelError> {
        self.uffd
            .register(start as *mut libc::c_void, len as usize)
            .map(|_| ())
            .map_err(kernel_error)
    }

    fn unregister(&self, start: u64, len: u64) -> Result<(), KernelError> {
        self.uffd
            .unregister(start as *mut libc::c_void, len as usize)
            .map_err(kernel_error)
    }

    fn copy(
        &self,
        range: &LazyRange,
        start: u64,
        len: u64,
        buf: &mut [u8],
    ) -> Result<(), FillError> {
        let buf = &mut buf[..len as usize];
        buf.fill(0);
        if let LazySource::File { file, .. } = &range.source {
            let offset = range.source_offset + (start - range.host_start);
            let mut filled = 0;
            while filled < buf.len() {
                let at = offset + filled as u64;
                match file.read_at(&mut buf[filled..], at) {
                    Ok(0) => break, // past the end of the file: zeroes
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(FillError::Source(at, e)),
                }
            }
        }
        // SAFETY: `buf` is a live buffer of `len` bytes; `[start, start + len)` lies in a
        // range registered with this userfaultfd (the kernel checks it too).
        unsafe {
            self.uffd.copy(
                buf.as_ptr().cast(),
                start as *mut libc::c_void,
                len as usize,
                true,
            )
        }
        .map(|_| ())
        .map_err(|e| FillError::Copy(kernel_error(e)))
    }

    fn wake(&self, page_addr: u64) {
        let _ = self
            .uffd
            .wake(page_addr as *mut libc::c_void, PAGE_SIZE as usize);
    }

    /// `UFFDIO_POISON` (Linux 6.6) is not in the userfaultfd crate, so the ioctl is
    /// issued here.
    fn poison(&self, page_addr: u64) -> Result<(), KernelError> {
        let mut arg = UffdioPoison {
            start: page_addr,
            len: PAGE_SIZE,
            mode: 0,
            updated: 0,
        };
        // SAFETY: UFFDIO_POISON reads and writes a `struct uffdio_poison`, which `arg`
        // is (layout checked below) and outlives the call; it changes only page tables
        // of a range registered with this userfaultfd, never memory Rust owns.
        let rc = unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_POISON, &mut arg) };
        if rc == 0 {
            return Ok(());
        }
        match nix::errno::Errno::last() {
            nix::errno::Errno::EEXIST => Err(KernelError::Exists),
            nix::errno::Errno::ENOENT => Err(KernelError::NotRegistered),
            e => Err(KernelError::Other(e.to_string())),
        }
    }

    fn report(&self, why: String) {
        let died = self.died.lock().unwrap_or_else(|e| e.into_inner()).take();
        match died {
            Some(died) => died(why),
            None => log::error!("{why}"),
        }
    }
}

/// `struct uffdio_poison` of `<linux/userfaultfd.h>`.
#[repr(C)]
struct UffdioPoison {
    start: u64,
    len: u64,
    mode: u64,
    updated: i64,
}

/// `_IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)`.
const UFFDIO_POISON: libc::c_ulong =
    (3 << 30) | ((std::mem::size_of::<UffdioPoison>() as libc::c_ulong) << 16) | (0xaa << 8) | 0x08;
const _: () = assert!(UFFDIO_POISON == 0xc020_aa08);

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::{Duration, Instant};

    use vm_memory::GuestAddress;

    use super::*;
    use crate::{Backing, NoSlots, RegionSpec, RegionTable, TableConfig};

    const MIB: u64 = 1 << 20;
    const DEADLINE: Duration = Duration::from_secs(10);

    #[test]
    fn kernel_errors_say_present_or_unregistered_by_errno() {
        use nix::errno::Errno;
        let exists = kernel_error(userfaultfd::Error::CopyFailed(Errno::EEXIST));
        assert!(matches!(exists, KernelError::Exists));
        let missing = kernel_error(userfaultfd::Error::ZeropageFailed(Errno::ENOENT));
        assert!(matches!(missing, KernelError::NotRegistered));
        let other = kernel_error(userfaultfd::Error::CopyFailed(Errno::EINVAL));
        assert!(matches!(other, KernelError::Other(_)));
    }

    fn handler() -> Option<Arc<FaultHandler>> {
        match FaultHandler::start() {
            Ok(handler) => Some(handler),
            Err(e) => {
                eprintln!("SKIPPED: no userfaultfd here: {e}");
                assert!(
                    std::env::var_os("KITE_NO_SKIPS").is_none(),
                    "CI must have userfaultfd: {e}"
                );
                None
            }
        }
    }

    /// Anonymous memory of `pages` pages, the first one present (written), never unmapped:
    /// the handler may still fill it.
    fn memory(pages: u64) -> u64 {
        // SAFETY: a fresh anonymous mapping nothing else refers to.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                (pages * PAGE_SIZE) as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        // SAFETY: the first byte of our own fresh mapping.
        unsafe { addr.cast::<u8>().write_volatile(1) };
        addr as u64
    }

    /// Resolves a fault at `addr` in a range the registry knows, registered with the
    /// kernel or not, from `source`; the counters after it.
    fn resolve_in(
        handler: &FaultHandler,
        addr: u64,
        kernel: bool,
        source: LazySource,
    ) -> FaultStats {
        let range = LazyRange {
            host_start: addr,
            len: 4 * PAGE_SIZE,
            source,
            source_offset: 0,
        };
        if kernel {
            handler.register(range).unwrap();
        } else {
            handler.shared.faults.registry().add(range);
        }
        // On a helper thread: a fill stuck for good ends the process, since the
        // handler's drop would hang too.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let shared = handler.shared.clone();
        std::thread::spawn(move || {
            shared
                .faults
                .resolve(addr, &mut vec![0; FILL_WINDOW as usize]);
            let _ = done_tx.send(());
        });
        if done_rx.recv_timeout(DEADLINE).is_err() {
            eprintln!("the fill did not end within {DEADLINE:?}");
            std::process::exit(101);
        }
        handler.stats()
    }

    #[test]
    fn fills_meeting_a_present_or_unregistered_page_are_counted_as_such() {
        let unreadable = || {
            let file = std::fs::File::options()
                .write(true)
                .open("/dev/null")
                .unwrap();
            LazySource::File {
                file: Arc::new(file),
                offset: 0,
            }
        };
        let cases = [
            // A present page: the copy and the poison find it there.
            (true, LazySource::Zero, 1, 0, 0),
            (true, unreadable(), 0, 0, 1),
            // Known to the registry, not to the kernel: nothing to fill.
            (false, LazySource::Zero, 0, 1, 0),
            (false, unreadable(), 0, 0, 1),
        ];
        for (kernel, source, present, unregistered, source_errors) in cases {
            let Some(handler) = handler() else {
                return;
            };
            let stats = resolve_in(&handler, memory(4), kernel, source.clone());
            let expected = FaultStats {
                faults: 1,
                already_present: present,
                unregistered,
                source_errors,
                ..FaultStats::default()
            };
            assert_eq!(stats, expected, "{source:?}, registered: {kernel}");
        }
    }

    fn block(backing: Backing) -> RegionSpec {
        RegionSpec {
            start: GuestAddress(1 << 32),
            size: MIB,
            capacity: MIB,
            backing,
        }
    }

    /// A fill that looked up a block just before a writer removed it and plugged a
    /// zero-backed one in at the same host address (inside an area) never lands in
    /// the new block: the writer waits for the fill, and the old block's bytes are
    /// discarded with it.
    #[test]
    fn a_fill_never_lands_in_memory_plugged_again_meanwhile() {
        let Some(handler) = handler() else {
            return;
        };
        let table = Arc::new(RegionTable::new(
            Arc::new(NoSlots),
            Some(handler.clone() as Arc<dyn LazyPages>),
            TableConfig::default(),
        ));
        table
            .reserve_area(GuestAddress(1 << 32), 2 * MIB, None)
            .unwrap();
        let path = std::env::temp_dir().join(format!("kite-uffd-{}", std::process::id()));
        let mut file = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file.write_all(&[0x5a; FILL_WINDOW as usize]).unwrap();
        let source = LazySource::File {
            file: Arc::new(file),
            offset: 0,
        };
        let old = table.insert(block(Backing::Lazy(source)), None).unwrap();
        let host = table
            .try_lock_region(GuestAddress(1 << 32))
            .unwrap()
            .region()
            .host_addr();

        let (writer_tx, writer_rx) = std::sync::mpsc::channel();
        let writer_table = table.clone();
        *handler.shared.faults.after_lookup.lock().unwrap() = Some(Box::new(move |faults| {
            let table = writer_table.clone();
            let writer = std::thread::spawn(move || {
                table.remove(old, None).unwrap();
                table
                    .insert(block(Backing::Lazy(LazySource::Zero)), None)
                    .unwrap();
            });
            // Until the writer is done, or waits for this fill.
            let deadline = Instant::now() + DEADLINE;
            while !writer.is_finished() && faults.stats().writer_waits == 0 {
                assert!(
                    Instant::now() < deadline,
                    "the writer neither ends nor waits"
                );
                std::thread::yield_now();
            }
            writer_tx.send(writer).unwrap();
        }));
        // The fault the handler would serve, resolved here so the hook runs between
        // lookup and copy. A fill stuck for good ends the process: the drops of the
        // table and the handler would hang too.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let shared = handler.shared.clone();
        std::thread::spawn(move || {
            shared
                .faults
                .resolve(host, &mut vec![0u8; FILL_WINDOW as usize]);
            let _ = done_tx.send(());
        });
        if done_rx.recv_timeout(DEADLINE).is_err() {
            eprintln!("the fill did not end within {DEADLINE:?}");
            std::process::exit(101);
        }
        handler.shared.faults.after_lookup.lock().unwrap().take();
        writer_rx.recv().unwrap().join().unwrap();

        let reader_table = table.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut word = [0xffu8; 4];
            let read = reader_table.read(GuestAddress(1 << 32), &mut word, None);
            let _ = tx.send(read.map(|()| word));
        });
        let word = rx
            .recv_timeout(DEADLINE)
            .expect("the handler serves faults");
        assert_eq!(
            word.unwrap(),
            [0; 4],
            "the new block shows the old one's bytes"
        );
    }
}
