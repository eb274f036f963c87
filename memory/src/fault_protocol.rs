//! The fault handler's protocol, apart from the kernel it drives: which range a
//! faulting page belongs to, when a fill may land, and who wakes a faulting thread.
//!
//! [`Faults`] holds the [`FaultRegistry`] and the change lock and implements the three
//! operations of the protocol:
//!
//! - `register` (a writer): under the change lock, publish the range in the registry,
//!   then register it with the kernel (a fault can arrive as soon as the kernel has it);
//! - `unregister` (a writer): under the change lock, unregister with the kernel, which
//!   wakes the threads waiting there, then forget the range, even if the kernel
//!   refused (a later mapping at this address is never filled from this range);
//! - `resolve` (the handler thread): under the change lock from lookup to copy, find
//!   the faulting page's range; on a miss wake the faulting thread (if the kernel
//!   refused the unregistration nothing else ever will), else copy the page's source
//!   bytes into place (which wakes the waiters), or wake them if the page is there.
//!
//! What is specific to the operating system, the userfaultfd ioctls and reading a
//! backing file, is behind [`FaultKernel`]: [`crate::uffd`] drives the real
//! userfaultfd with it, and the loom models (`tests/loom.rs`) a model kernel built of
//! loom primitives, so the protocol itself, not a copy of it, is model checked. It is
//! compiled under `--cfg loom` too, where the crate re-exports it for those models only
//! (`#[cfg(loom)] pub use`); normal builds keep it private to the crate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::TryLockError;

use crate::lazy::{FaultRegistry, LazyError, LazyPages, LazyRange};
use crate::region::{LazySource, PAGE_SIZE};
use crate::sync::{Mutex, MutexGuard};

/// Bytes filled per fault: the window around the faulting page, aligned to this size
/// from the start of its registered range (not to host addresses, which depend on where
/// the mapping landed) and clipped to the range. A guest touching memory in order then
/// faults once per window instead of once per page (each fault is a round trip through
/// the handler thread). The pages are copied in, not mapped to the zero page, so a
/// following write needs no second fault.
pub const FILL_WINDOW: u64 = 64 << 10;

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

/// The counters behind [`FaultStats`]. Plain `std` atomics even under loom: they are
/// statistics, never synchronisation, and keeping them out of loom's model keeps its
/// state space to the protocol.
#[derive(Default)]
pub(crate) struct Counters {
    faults: AtomicU64,
    zero_fills: AtomicU64,
    file_fills: AtomicU64,
    already_present: AtomicU64,
    unregistered: AtomicU64,
    pub(crate) errors: AtomicU64,
    source_errors: AtomicU64,
    writer_waits: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// How a kernel operation on lazy pages failed.
#[derive(Debug)]
pub enum KernelError {
    /// A page is present already (`EEXIST`).
    Exists,
    /// The address is not registered (`ENOENT`).
    NotRegistered,
    /// Any other failure.
    Other(String),
}

impl std::fmt::Display for KernelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelError::Exists => f.write_str("page present already (EEXIST)"),
            KernelError::NotRegistered => f.write_str("not registered (ENOENT)"),
            KernelError::Other(why) => f.write_str(why),
        }
    }
}

/// Why a fill failed.
#[derive(Debug)]
pub enum FillError {
    /// The source could not be read (at this source offset).
    Source(u64, std::io::Error),
    /// The copy into place failed.
    Copy(KernelError),
}

/// What the protocol needs of the kernel (userfaultfd) and of the VMM.
pub trait FaultKernel {
    /// Starts delivering the faults of `[start, start + len)`.
    fn register(&self, start: u64, len: u64) -> Result<(), KernelError>;
    /// Stops delivering the faults of `[start, start + len)` and wakes the threads
    /// waiting there (unless it fails).
    fn unregister(&self, start: u64, len: u64) -> Result<(), KernelError>;
    /// Reads `range`'s source for `[start, start + len)` (inside `range`) into `buf`
    /// (scratch of at least `len` bytes, [`FILL_WINDOW`] at most) and copies it into
    /// place atomically, waking the threads waiting there.
    fn copy(
        &self,
        range: &LazyRange,
        start: u64,
        len: u64,
        buf: &mut [u8],
    ) -> Result<(), FillError>;
    /// Wakes the threads waiting on the page at `page_addr`, to retry their access.
    fn wake(&self, page_addr: u64);
    /// Marks the page at `page_addr` poisoned (an access fails instead of seeing bytes
    /// that are not the page's) and wakes the threads waiting there.
    fn poison(&self, page_addr: u64) -> Result<(), KernelError>;
    /// Tells the VMM, once, that lazy memory can no longer be filled as it must.
    fn report(&self, why: String);
}

/// A test hook run between a fill's lookup and its copy.
#[cfg(test)]
pub(crate) type LookupHook<K> = Box<dyn FnMut(&Faults<K>) + Send>;

/// The registry of lazy ranges and the change lock, over a kernel: the fault handler's
/// protocol (see the module documentation).
pub struct Faults<K> {
    kernel: K,
    registry: FaultRegistry,
    /// Serialises registry changes with their kernel registration, and with each fill:
    /// the handler holds it from lookup to copy (never waiting for anything but a
    /// change's own bounded critical section), so a range unregistered and another
    /// registered at the same address meanwhile never gets the old range's bytes.
    changes: Mutex<()>,
    pub(crate) counters: Counters,
    /// Test hook: runs between a fill's lookup and its copy.
    #[cfg(test)]
    pub(crate) after_lookup: Mutex<Option<LookupHook<K>>>,
}

fn kernel_err(op: &'static str, addr: u64, len: u64, e: impl std::fmt::Display) -> LazyError {
    LazyError::Userfaultfd {
        op,
        addr,
        len,
        reason: e.to_string(),
    }
}

impl<K: FaultKernel> Faults<K> {
    /// No range registered yet, over `kernel`.
    pub fn new(kernel: K) -> Self {
        Faults {
            kernel,
            registry: FaultRegistry::default(),
            changes: Mutex::new(()),
            counters: Counters::default(),
            #[cfg(test)]
            after_lookup: Mutex::new(None),
        }
    }

    /// The kernel.
    pub fn kernel(&self) -> &K {
        &self.kernel
    }

    /// The registered ranges.
    pub fn registry(&self) -> &FaultRegistry {
        &self.registry
    }

    /// Counters so far.
    pub fn stats(&self) -> FaultStats {
        let c = &self.counters;
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

    /// Starts filling faults in `range`.
    pub fn register(&self, range: LazyRange) -> Result<(), LazyError> {
        let _serial = self.lock_changes();
        let (start, len) = (range.host_start, range.len);
        // Publish first: a fault can arrive as soon as the kernel has the range.
        self.registry.add(range);
        if let Err(e) = self.kernel.register(start, len) {
            self.registry.remove(start, len);
            return Err(kernel_err("register", start, len, e));
        }
        Ok(())
    }

    /// Stops filling faults in `[host_start, host_start + len)`.
    pub fn unregister(&self, host_start: u64, len: u64) -> Result<(), LazyError> {
        let _serial = self.lock_changes();
        // Unregister with the kernel first (it wakes any thread still waiting there),
        // then forget the range: a fault never finds its range missing. Forget it even
        // if the kernel refused, so a later mapping at this address is never filled
        // from this range's source.
        let result = self
            .kernel
            .unregister(host_start, len)
            .map_err(|e| kernel_err("unregister", host_start, len, e));
        self.registry.remove(host_start, len);
        result
    }

    /// Resolves a fault at `addr`, with `buf` as scratch of [`FILL_WINDOW`] bytes.
    pub fn resolve(&self, addr: u64, buf: &mut [u8]) {
        let c = &self.counters;
        Counters::add(&c.faults);
        let page_addr = addr & !(PAGE_SIZE - 1);
        // Held from lookup to copy (see `Faults::changes`).
        let _serial = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        let Some(range) = self.registry.lookup_range(page_addr) else {
            // Unregistered since the fault was queued. Wake the thread anyway: if the
            // kernel refused the unregistration, nothing else ever will; it retries
            // into whatever the address is now.
            Counters::add(&c.unregistered);
            self.kernel.wake(page_addr);
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
            Ok(counter) => Counters::add(counter),
            Err(FillError::Copy(KernelError::Exists)) => {
                Counters::add(&c.already_present);
                self.kernel.wake(page_addr);
            }
            Err(FillError::Copy(KernelError::NotRegistered)) => {
                Counters::add(&c.unregistered);
            }
            Err(FillError::Copy(e)) => {
                log::error!("fault handler: cannot fill page {page_addr:#x}: {e}");
                Counters::add(&c.errors);
                // Wake the thread so it retries the access instead of hanging silently.
                self.kernel.wake(page_addr);
            }
            Err(FillError::Source(offset, e)) => {
                // Never fill a page with bytes that are not its content: the VM is told
                // first (the poison may end the process through a vCPU's SIGBUS), then
                // the faulting access fails.
                Counters::add(&c.source_errors);
                self.kernel.report(format!(
                    "lazy guest memory at host address {page_addr:#x} cannot be filled: \
                     reading its backing file at offset {offset:#x} failed: {e}"
                ));
                match self.kernel.poison(page_addr) {
                    Ok(()) => {}
                    // Filled or gone meanwhile: the thread retries into what is there now.
                    Err(KernelError::Exists | KernelError::NotRegistered) => {
                        self.kernel.wake(page_addr)
                    }
                    // No poison (a kernel before 6.6): the thread stays blocked rather
                    // than be woken into a fault that fails again and again; the VM
                    // stops on the report above.
                    Err(e) => {
                        log::error!("fault handler: cannot poison page {page_addr:#x}: {e}");
                        Counters::add(&c.errors);
                    }
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
        self.kernel.copy(range, start, len, buf)?;
        Ok(match range.source {
            LazySource::Zero => &self.counters.zero_fills,
            LazySource::File { .. } => &self.counters.file_fills,
        })
    }

    /// Takes the change lock for a registry change, counting a wait for a fill.
    fn lock_changes(&self) -> MutexGuard<'_, ()> {
        match self.changes.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => {
                Counters::add(&self.counters.writer_waits);
                self.changes.lock().unwrap_or_else(|e| e.into_inner())
            }
        }
    }
}

impl<K: FaultKernel + Send + Sync> LazyPages for Faults<K> {
    fn register(&self, range: LazyRange) -> Result<(), LazyError> {
        Faults::register(self, range)
    }

    fn unregister(&self, host_start: u64, len: u64) -> Result<(), LazyError> {
        Faults::unregister(self, host_start, len)
    }
}
