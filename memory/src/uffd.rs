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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;

use userfaultfd::{Event, Uffd, UffdBuilder};
use vmm_sys_util::eventfd::EventFd;

use crate::lazy::{FaultRegistry, LazyError, LazyPages, LazyRange};
use crate::region::{LazySource, PAGE_SIZE};

/// Fault handler counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Page faults received.
    pub faults: u64,
    /// Fills with zeroes (each of up to [`FILL_WINDOW`] bytes around the fault).
    pub zero_fills: u64,
    /// Fills from a file (each of up to [`FILL_WINDOW`] bytes around the fault).
    pub file_fills: u64,
    /// Faults another thread had already resolved (the page was present).
    pub already_present: u64,
    /// Faults on addresses no longer registered (woken, to retry into what is there now).
    pub unregistered: u64,
    /// Faults that could not be resolved.
    pub errors: u64,
    /// Pages whose source could not be read: poisoned instead of filled, and reported.
    pub source_errors: u64,
    /// Registry changes that waited for the handler to finish a fill.
    pub writer_waits: u64,
}

#[derive(Default)]
struct Counters {
    faults: AtomicU64,
    zero_fills: AtomicU64,
    file_fills: AtomicU64,
    already_present: AtomicU64,
    unregistered: AtomicU64,
    errors: AtomicU64,
    source_errors: AtomicU64,
    writer_waits: AtomicU64,
}

/// Why a fill failed.
#[derive(Debug)]
enum FillError {
    /// The source could not be read (at this source offset).
    Source(u64, std::io::Error),
    /// The copy into place failed.
    Copy(userfaultfd::Error),
}

struct Shared {
    uffd: Uffd,
    registry: FaultRegistry,
    /// Serialises registry changes with their userfaultfd registration, and with each
    /// fill: the handler holds it from lookup to copy (never waiting for anything but
    /// a change's own bounded critical section), so a range unregistered and another
    /// registered at the same address meanwhile never gets the old range's bytes.
    changes: Mutex<()>,
    counters: Counters,
    stop: EventFd,
    /// The VMM's `died` hook, until it has been told once.
    died: Mutex<Option<DiedHook>>,
    /// Test hook: runs between a fill's lookup and its copy.
    #[cfg(test)]
    after_lookup: Mutex<Option<LookupHook>>,
}

/// A test hook run between a fill's lookup and its copy.
#[cfg(test)]
type LookupHook = Box<dyn FnMut(&Shared) + Send>;

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

fn uffd_err(op: &'static str, addr: u64, len: u64, e: impl std::fmt::Display) -> LazyError {
    LazyError::Userfaultfd {
        op,
        addr,
        len,
        reason: e.to_string(),
    }
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
            uffd,
            registry: FaultRegistry::default(),
            changes: Mutex::new(()),
            counters: Counters::default(),
            stop,
            died: Mutex::new(Some(hooks.died)),
            #[cfg(test)]
            after_lookup: Mutex::new(None),
        });
        let worker = shared.clone();
        let confine = hooks.confine;
        let thread = std::thread::Builder::new()
            .name("kite-uffd".into())
            .spawn(move || {
                let result = confine().and_then(|()| worker.serve());
                if let Err(why) = result {
                    worker.report(format!("the userfaultfd fault handler stopped: {why}"));
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
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FaultStats {
            faults: get(&c.faults),
            zero_fills: get(&c.zero_fills),
            file_fills: get(&c.file_fills),
            already_present: get(&c.already_present),
            unregistered: get(&c.unregistered),
            errors: get(&c.errors),
            source_errors: get(&c.source_errors),
            writer_waits: get(&c.writer_waits),
        }
    }

    /// Ranges registered now.
    pub fn registered_ranges(&self) -> usize {
        self.shared.registry.len()
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
        let _serial = self.shared.lock_changes();
        let (start, len) = (range.host_start, range.len);
        // Publish first: a fault can arrive as soon as the kernel has the range.
        self.shared.registry.add(range);
        if let Err(e) = self
            .shared
            .uffd
            .register(start as *mut libc::c_void, len as usize)
        {
            self.shared.registry.remove(start, len);
            return Err(uffd_err("register", start, len, e));
        }
        Ok(())
    }

    fn unregister(&self, host_start: u64, len: u64) -> Result<(), LazyError> {
        let _serial = self.shared.lock_changes();
        // Unregister with the kernel first (it wakes any thread still waiting there),
        // then forget the range: a fault never finds its range missing. Forget it even
        // if the kernel refused, so a later mapping at this address is never filled
        // from this range's source.
        let result = self
            .shared
            .uffd
            .unregister(host_start as *mut libc::c_void, len as usize)
            .map_err(|e| uffd_err("unregister", host_start, len, e));
        self.shared.registry.remove(host_start, len);
        result
    }
}

/// Whether a userfaultfd ioctl error says the page is already there.
fn is_errno(e: &userfaultfd::Error, errno: nix::errno::Errno) -> bool {
    matches!(e, userfaultfd::Error::CopyFailed(n) | userfaultfd::Error::ZeropageFailed(n) if *n == errno)
}

/// Bytes filled per fault: the window around the faulting page, aligned to this size
/// from the start of its registered range (not to host addresses, which depend on where
/// the mapping landed) and clipped to the range. A guest touching memory in order then
/// faults once per window instead of once per page (each fault is a round trip through
/// this thread). The pages are copied in, not mapped to the zero page, so a following
/// write needs no second fault.
pub const FILL_WINDOW: u64 = 64 << 10;

impl Shared {
    /// Serves faults until stopped (`Ok`) or unable to go on.
    fn serve(&self) -> Result<(), String> {
        let mut page = vec![0u8; FILL_WINDOW as usize];
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
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
                match self.uffd.read_event() {
                    Ok(Some(Event::Pagefault { addr, .. })) => self.resolve(addr as u64, &mut page),
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        log::error!("fault handler: reading event failed: {e}");
                        self.counters.errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        }
    }

    fn resolve(&self, addr: u64, buf: &mut [u8]) {
        let c = &self.counters;
        c.faults.fetch_add(1, Ordering::Relaxed);
        let page_addr = addr & !(PAGE_SIZE - 1);
        let dst = page_addr as *mut libc::c_void;
        // Held from lookup to copy (see `Shared::changes`).
        let _serial = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        let Some(range) = self.registry.lookup_range(page_addr) else {
            // Unregistered since the fault was queued. Wake the thread anyway: if the
            // kernel refused the unregistration, nothing else ever will; it retries
            // into whatever the address is now.
            c.unregistered.fetch_add(1, Ordering::Relaxed);
            let _ = self.uffd.wake(dst, PAGE_SIZE as usize);
            return;
        };
        #[cfg(test)]
        if let Some(hook) = self
            .after_lookup
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            hook(self);
        }
        let window_start = range.host_start + ((page_addr - range.host_start) & !(FILL_WINDOW - 1));
        let window_end = (window_start + FILL_WINDOW).min(range.host_start + range.len);
        // The window first. If it fails in any way, the faulting page alone: part of the
        // window may be present already, or no longer registered (a concurrent shrink
        // unregisters a tail, and wakes only the threads waiting there), and the faulting
        // thread must be woken by a fill of its own page or by its own unregistration.
        let mut result = self.fill(&range, window_start, window_end - window_start, buf);
        if window_end - window_start > PAGE_SIZE && result.is_err() {
            result = self.fill(&range, page_addr, PAGE_SIZE, buf);
        }
        match result {
            Ok(counter) => {
                counter.fetch_add(1, Ordering::Relaxed);
            }
            Err(FillError::Copy(e)) if is_errno(&e, nix::errno::Errno::EEXIST) => {
                c.already_present.fetch_add(1, Ordering::Relaxed);
                let _ = self.uffd.wake(dst, PAGE_SIZE as usize);
            }
            Err(FillError::Copy(e)) if is_errno(&e, nix::errno::Errno::ENOENT) => {
                c.unregistered.fetch_add(1, Ordering::Relaxed);
            }
            Err(FillError::Copy(e)) => {
                log::error!("fault handler: cannot fill page {page_addr:#x}: {e}");
                c.errors.fetch_add(1, Ordering::Relaxed);
                // Wake the thread so it retries the access instead of hanging silently.
                let _ = self.uffd.wake(dst, PAGE_SIZE as usize);
            }
            Err(FillError::Source(offset, e)) => {
                // Never fill a page with bytes that are not its content: the VM is told
                // first (the poison may end the process through a vCPU's SIGBUS), then
                // the faulting access fails.
                c.source_errors.fetch_add(1, Ordering::Relaxed);
                self.report(format!(
                    "lazy guest memory at host address {page_addr:#x} cannot be filled: \
                     reading its backing file at offset {offset:#x} failed: {e}"
                ));
                if let Err(e) = self.poison(page_addr) {
                    if e != nix::errno::Errno::EEXIST && e != nix::errno::Errno::ENOENT {
                        log::error!("fault handler: cannot poison page {page_addr:#x}: {e}");
                        c.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = self.uffd.wake(dst, PAGE_SIZE as usize);
                }
            }
        }
    }

    /// Copies `len` bytes of `range`'s source at host address `start` into place (and
    /// wakes the threads waiting there); the counter of the kind of fill.
    fn fill(
        &self,
        range: &LazyRange,
        start: u64,
        len: u64,
        buf: &mut [u8],
    ) -> Result<&AtomicU64, FillError> {
        let buf = &mut buf[..len as usize];
        let counter = match &range.source {
            LazySource::Zero => {
                buf.fill(0);
                &self.counters.zero_fills
            }
            LazySource::File { file, .. } => {
                let offset = range.source_offset + (start - range.host_start);
                buf.fill(0);
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
                &self.counters.file_fills
            }
        };
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
        .map(|_| counter)
        .map_err(FillError::Copy)
    }

    /// Marks the page at `page_addr` poisoned and wakes the threads waiting there: an
    /// access fails (`EFAULT` in the kernel, `SIGBUS` in user space) instead of
    /// seeing bytes that are not the page's. `UFFDIO_POISON` (Linux 6.6) is not in the
    /// userfaultfd crate, so the ioctl is issued here.
    fn poison(&self, page_addr: u64) -> Result<(), nix::errno::Errno> {
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
            Ok(())
        } else {
            Err(nix::errno::Errno::last())
        }
    }

    /// Tells the VMM, once, that lazy memory can no longer be filled as it must.
    fn report(&self, why: String) {
        let died = self.died.lock().unwrap_or_else(|e| e.into_inner()).take();
        match died {
            Some(died) => died(why),
            None => log::error!("{why}"),
        }
    }

    /// Takes the change lock for a registry change, counting a wait for a fill.
    fn lock_changes(&self) -> MutexGuard<'_, ()> {
        match self.changes.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => {
                self.counters.writer_waits.fetch_add(1, Ordering::Relaxed);
                self.changes.lock().unwrap_or_else(|e| e.into_inner())
            }
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
    fn is_errno_matches_only_its_errno() {
        use nix::errno::Errno;
        let exists = userfaultfd::Error::CopyFailed(Errno::EEXIST);
        assert!(is_errno(&exists, Errno::EEXIST));
        assert!(!is_errno(&exists, Errno::ENOENT));
        assert!(is_errno(
            &userfaultfd::Error::ZeropageFailed(Errno::ENOENT),
            Errno::ENOENT
        ));
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
            handler.shared.registry.add(range);
        }
        // On a helper thread: a fill stuck for good ends the process, since the
        // handler's drop would hang too.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let shared = handler.shared.clone();
        std::thread::spawn(move || {
            shared.resolve(addr, &mut vec![0; FILL_WINDOW as usize]);
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
        *handler.shared.after_lookup.lock().unwrap() = Some(Box::new(move |shared| {
            let table = writer_table.clone();
            let writer = std::thread::spawn(move || {
                table.remove(old, None).unwrap();
                table
                    .insert(block(Backing::Lazy(LazySource::Zero)), None)
                    .unwrap();
            });
            // Until the writer is done, or waits for this fill.
            let deadline = Instant::now() + DEADLINE;
            while !writer.is_finished() && shared.counters.writer_waits.load(Ordering::SeqCst) == 0
            {
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
            shared.resolve(host, &mut vec![0u8; FILL_WINDOW as usize]);
            let _ = done_tx.send(());
        });
        if done_rx.recv_timeout(DEADLINE).is_err() {
            eprintln!("the fill did not end within {DEADLINE:?}");
            std::process::exit(101);
        }
        handler.shared.after_lookup.lock().unwrap().take();
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
