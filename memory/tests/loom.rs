//! loom models of the region-table protocol, 2–4 threads each, and of the fault
//! handler's protocol (`memory::Faults`, over a model of userfaultfd). Most are exhaustive
//! (every interleaving); the four that are not say so and give their preemption bound
//! (every interleaving with at most that many preemptions): unbounded they take many
//! minutes to hours.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p memory --test loom --release`
//! (`LOOM_MAX_PREEMPTIONS` overrides every model's bound, exhaustive ones included).
//! Under `--cfg loom` the table's atomics, table lock, publication and parking are
//! loom's models (see `src/sync.rs`), so these check the table's own code.

#![cfg(loom)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::Arc;
use loom::thread;
use memory::{
    Backing, FaultKernel, Faults, FillError, KernelError, LazyRange, LazySource, LookupError,
    RegionSpec, RegionTable, TableConfig, TableError,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

const PAGE: u64 = 4096;

/// A table whose writers wait for readers without a deadline of their own: a model
/// gives one (and makes it pass, see `memory::pass_deadlines`) where it wants a timeout.
fn table() -> RegionTable {
    RegionTable::new(
        std::sync::Arc::new(memory::NoSlots),
        None,
        TableConfig {
            drain_timeout: std::time::Duration::MAX,
            ..TableConfig::default()
        },
    )
}

/// Inserts a region at guest address 0.
fn insert(t: &RegionTable, size: u64, capacity: u64, backing: Backing) -> memory::RegionId {
    t.insert(
        RegionSpec {
            start: GuestAddress(0),
            size,
            capacity,
            backing,
        },
        None,
    )
    .unwrap()
}

/// Checks `f` in every interleaving.
fn model(f: impl Fn() + Sync + Send + 'static) {
    check(None, f)
}

/// Checks `f` in every interleaving with at most `preemptions` preemptions.
fn model_bounded(preemptions: usize, f: impl Fn() + Sync + Send + 'static) {
    check(Some(preemptions), f)
}

/// Runs `f` under loom. The table's operations (mmap, error formatting) need more
/// stack than loom's default, so every model thread gets a large one.
fn check(preemptions: Option<usize>, f: impl Fn() + Sync + Send + 'static) {
    let f = std::sync::Arc::new(f);
    let mut builder = loom::model::Builder::new();
    if std::env::var_os("LOOM_MAX_PREEMPTIONS").is_none() {
        builder.preemption_bound = preemptions;
    }
    builder.check(move || {
        let f = f.clone();
        spawn(move || f()).join().unwrap();
    });
}

fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> thread::JoinHandle<T> {
    thread::Builder::new().stack_size(1 << 18).spawn(f).unwrap()
}

/// Fast path vs a writer shrinking the region: a reader either holds the region
/// with the old size (and the writer waited for it) or fails, or sees the new size.
/// A write made under the guard is never lost to the shrink of a part it did not touch.
#[test]
fn fast_path_vs_writer() {
    model(|| {
        let t = Arc::new(table());
        let id = insert(&t, 2 * PAGE, 2 * PAGE, Backing::Anonymous);
        let shrunk = Arc::new(AtomicBool::new(false));
        let reader = {
            let (t, shrunk) = (t.clone(), shrunk.clone());
            spawn(move || match t.try_lock_region(GuestAddress(PAGE)) {
                Ok(guard) => {
                    // The writer cannot have shrunk while we hold the region.
                    assert!(!shrunk.load(Ordering::SeqCst));
                    assert_eq!(guard.len(), 2 * PAGE);
                    guard.write_obj(7u8, MemoryRegionAddress(PAGE)).unwrap();
                    assert!(!shrunk.load(Ordering::SeqCst));
                }
                Err(LookupError::WriteLocked { .. } | LookupError::NotMapped { .. }) => {}
                Err(e) => panic!("unexpected {e:?}"),
            })
        };
        t.shrink(id, PAGE, None).unwrap();
        shrunk.store(true, Ordering::SeqCst);
        reader.join().unwrap();
        assert!(t.try_lock_region(GuestAddress(PAGE)).is_err());
        assert_eq!(t.metrics().regions[0].readers, 0);
    });
}

/// Two-tier lookup vs a writer: the lookup always ends with a guard on the region in
/// a consistent state (old or new size), never a stale or write-locked one.
#[test]
fn two_tier_vs_writer() {
    model(|| {
        let t = Arc::new(table());
        let id = insert(&t, PAGE, 2 * PAGE, Backing::Anonymous);
        let reader = {
            let t = t.clone();
            spawn(move || {
                let guard = t.lock_region(GuestAddress(0), None).unwrap();
                let len = guard.len();
                assert!(len == PAGE || len == 2 * PAGE, "{len}");
                guard.write_obj(1u8, MemoryRegionAddress(len - 1)).unwrap();
            })
        };
        t.grow(id, 2 * PAGE, None).unwrap();
        t.shrink(id, PAGE, None).unwrap();
        reader.join().unwrap();
        assert_eq!(t.metrics().regions[0].readers, 0);
    });
}

/// Guarded memory holding every region (what the kernel loader takes) vs a writer:
/// whether its fast attempt meets the writer or not, it gets the region, in a
/// consistent state.
#[test]
fn guarded_memory_vs_writer() {
    model(|| {
        let t = Arc::new(table());
        let id = insert(&t, PAGE, 2 * PAGE, Backing::Anonymous);
        let reader = {
            let t = t.clone();
            spawn(move || {
                let mem = memory::GuardedMemory::lock_all(&t, None).unwrap();
                let region = mem.iter().next().expect("the region is held");
                let len = region.len();
                assert!(len == PAGE || len == 2 * PAGE, "{len}");
                mem.write_obj(1u8, GuestAddress(len - 1)).unwrap();
            })
        };
        t.grow(id, 2 * PAGE, None).unwrap();
        t.shrink(id, PAGE, None).unwrap();
        reader.join().unwrap();
        assert!(t.metrics().regions.iter().all(|r| r.readers == 0));
    });
}

/// Removal vs guarded memory holding every region: it either holds the region intact
/// (its write lands before the removal completes, which waited for it) or does not
/// have the region at all.
#[test]
fn removal_vs_guarded_memory() {
    model(|| {
        let t = Arc::new(table());
        let id = insert(&t, PAGE, PAGE, Backing::Anonymous);
        let removed = Arc::new(AtomicBool::new(false));
        let reader = {
            let (t, removed) = (t.clone(), removed.clone());
            spawn(move || {
                let mem = memory::GuardedMemory::lock_all(&t, None).unwrap();
                match mem.num_regions() {
                    1 => {
                        mem.write_obj(0xaau8, GuestAddress(8)).unwrap();
                        assert!(!removed.load(Ordering::SeqCst));
                    }
                    0 => assert!(mem.write_obj(0xaau8, GuestAddress(8)).is_err()),
                    n => panic!("{n} regions"),
                }
            })
        };
        t.remove(id, None).unwrap();
        removed.store(true, Ordering::SeqCst);
        reader.join().unwrap();
        assert!(t.metrics().regions.iter().all(|r| r.readers == 0));
    });
}

/// Removal vs a reader: the reader either copies before the removal takes effect
/// (and the writer waited for it: its write is still there when the writer drains)
/// or fails with a typed error. Never a write into removed memory.
#[test]
fn removal_vs_reader() {
    model(|| {
        let t = Arc::new(table());
        let id = insert(&t, PAGE, PAGE, Backing::Anonymous);
        let removed = Arc::new(AtomicBool::new(false));
        let reader = {
            let (t, removed) = (t.clone(), removed.clone());
            spawn(move || {
                match t.lock_region(GuestAddress(8), None) {
                    Ok(guard) => {
                        // While the guard is held the removal cannot complete.
                        guard.write_obj(0xaau8, MemoryRegionAddress(8)).unwrap();
                        assert!(!removed.load(Ordering::SeqCst));
                    }
                    Err(LookupError::NotMapped { addr: 8 }) => {}
                    Err(e) => panic!("unexpected {e:?}"),
                }
                // The copy API: done before removal, or a typed error.
                match t.write(GuestAddress(8), &[0xaa], None) {
                    Ok(())
                    | Err(memory::CopyError::Lookup {
                        source: LookupError::NotMapped { addr: 8 },
                        copied: 0,
                        ..
                    }) => {}
                    Err(e) => panic!("unexpected {e:?}"),
                }
            })
        };
        t.remove(id, None).unwrap();
        removed.store(true, Ordering::SeqCst);
        reader.join().unwrap();
        assert!(t.layout().is_empty());
    });
}

/// Two readers on one region and a writer: the writer waits for both, and the
/// readers' shards and the writer's wake-up flag never lose a release. Bounded: 5
/// preemptions (about 40 s; unbounded it runs for hours).
#[test]
fn two_readers_and_a_writer() {
    model_bounded(5, || {
        let t = Arc::new(table());
        let id = insert(&t, 2 * PAGE, 2 * PAGE, Backing::Anonymous);
        let shrunk = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (t, shrunk) = (t.clone(), shrunk.clone());
                spawn(move || {
                    if let Ok(g) = t.try_lock_region(GuestAddress(0)) {
                        if g.len() == 2 * PAGE {
                            // Holding the old size: the shrink must wait for us.
                            assert!(!shrunk.load(Ordering::SeqCst));
                        } else {
                            assert_eq!(g.len(), PAGE);
                        }
                    }
                })
            })
            .collect();
        t.shrink(id, PAGE, None).unwrap();
        shrunk.store(true, Ordering::SeqCst);
        for r in readers {
            r.join().unwrap();
        }
        assert_eq!(t.metrics().regions[0].readers, 0);
    });
}

/// The source of the model's lazy ranges: zeroes, or a file whose page `n` holds the
/// byte `n` (a range with `source_offset` `0xaa * PAGE` fills with `0xaa`). The file
/// itself is never read: the model kernel computes the bytes.
fn file_source() -> LazySource {
    LazySource::File {
        file: std::sync::Arc::new(std::fs::File::open("/dev/null").unwrap()),
        offset: 0,
    }
}

/// A one-page lazy range at `host_start` whose bytes are all `byte`.
fn lazy_page(host_start: u64, byte: u8) -> LazyRange {
    LazyRange {
        host_start,
        len: PAGE,
        source: file_source(),
        source_offset: u64::from(byte) * PAGE,
    }
}

/// What a model kernel knows.
#[derive(Default)]
struct KernelState {
    /// Pages registered for missing-page faults.
    registered: BTreeSet<u64>,
    /// Present pages and the byte they hold.
    present: BTreeMap<u64, u8>,
    /// Wake-ups so far, by page: a waiting thread returns once its page's count moves.
    wakes: BTreeMap<u64, u64>,
    /// Fault events queued for the handler: a page, or `None` for "no fault is coming".
    events: VecDeque<Option<u64>>,
}

/// A model of userfaultfd, built of loom primitives: a thread faulting on a missing
/// page of a registered range queues an event and sleeps until the page is copied in
/// or a wake-up for it (`UFFDIO_WAKE`, or the range's unregistration) comes; a copy
/// fails with `ENOENT` where nothing is registered and with `EEXIST` where a page is
/// present. With `refuse_unregister` every unregistration fails and wakes nobody.
struct ModelKernel {
    state: loom::sync::Mutex<KernelState>,
    changed: loom::sync::Condvar,
    refuse_unregister: bool,
}

impl ModelKernel {
    fn new(refuse_unregister: bool) -> Self {
        ModelKernel {
            state: loom::sync::Mutex::new(KernelState::default()),
            changed: loom::sync::Condvar::new(),
            refuse_unregister,
        }
    }

    fn pages(start: u64, len: u64) -> impl Iterator<Item = u64> {
        (start..start + len).step_by(PAGE as usize)
    }

    /// An access to the page at `page`: its byte, or `None` if it is not there after
    /// the fault (not registered: what a plain mapping there would show; or woken
    /// without a fill: the access would be retried). Queues a `None` event when it did
    /// not fault, so the handler never waits for a fault that is not coming.
    fn access(&self, page: u64) -> Option<u8> {
        let mut s = self.state.lock().unwrap();
        if let Some(&byte) = s.present.get(&page) {
            s.events.push_back(None);
            self.changed.notify_all();
            return Some(byte);
        }
        if !s.registered.contains(&page) {
            s.events.push_back(None);
            self.changed.notify_all();
            return None;
        }
        let woken = s.wakes.get(&page).copied().unwrap_or(0);
        s.events.push_back(Some(page));
        self.changed.notify_all();
        while !s.present.contains_key(&page) && s.wakes.get(&page).copied().unwrap_or(0) == woken {
            s = self.changed.wait(s).unwrap();
        }
        s.present.get(&page).copied()
    }

    /// Tells the handler no fault is coming from this thread.
    fn no_fault(&self) {
        self.state.lock().unwrap().events.push_back(None);
        self.changed.notify_all();
    }

    /// The handler's read of the next fault event.
    fn next_event(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap();
        loop {
            if let Some(event) = s.events.pop_front() {
                return event;
            }
            s = self.changed.wait(s).unwrap();
        }
    }

    /// `MADV_DONTNEED` of a page: its content is gone.
    fn discard(&self, page: u64) {
        self.state.lock().unwrap().present.remove(&page);
    }

    /// The byte the page holds, if present.
    fn content(&self, page: u64) -> Option<u8> {
        self.state.lock().unwrap().present.get(&page).copied()
    }

    fn wake_pages(&self, s: &mut KernelState, start: u64, len: u64) {
        for page in Self::pages(start, len) {
            *s.wakes.entry(page).or_default() += 1;
        }
        self.changed.notify_all();
    }
}

impl FaultKernel for ModelKernel {
    fn register(&self, start: u64, len: u64) -> Result<(), KernelError> {
        let mut s = self.state.lock().unwrap();
        s.registered.extend(Self::pages(start, len));
        Ok(())
    }

    fn unregister(&self, start: u64, len: u64) -> Result<(), KernelError> {
        if self.refuse_unregister {
            return Err(KernelError::Other("refused by the model".into()));
        }
        let mut s = self.state.lock().unwrap();
        for page in Self::pages(start, len) {
            s.registered.remove(&page);
        }
        self.wake_pages(&mut s, start, len);
        Ok(())
    }

    fn copy(
        &self,
        range: &LazyRange,
        start: u64,
        len: u64,
        _buf: &mut [u8],
    ) -> Result<(), FillError> {
        let mut s = self.state.lock().unwrap();
        for page in Self::pages(start, len) {
            if !s.registered.contains(&page) {
                return Err(FillError::Copy(KernelError::NotRegistered));
            }
            if s.present.contains_key(&page) {
                return Err(FillError::Copy(KernelError::Exists));
            }
        }
        for page in Self::pages(start, len) {
            let byte = match range.source {
                LazySource::Zero => 0,
                LazySource::File { .. } => {
                    ((range.source_offset + (page - range.host_start)) / PAGE) as u8
                }
            };
            s.present.insert(page, byte);
        }
        self.wake_pages(&mut s, start, len);
        Ok(())
    }

    fn wake(&self, page_addr: u64) {
        let mut s = self.state.lock().unwrap();
        self.wake_pages(&mut s, page_addr, PAGE);
    }

    fn poison(&self, page_addr: u64) -> Result<(), KernelError> {
        panic!("the models' sources never fail to read (page {page_addr:#x})");
    }

    fn report(&self, why: String) {
        panic!("{why}");
    }
}

/// The handler thread of a model: serves one fault event (if one comes).
fn handle_one(faults: &Faults<ModelKernel>) {
    if let Some(page) = faults.kernel().next_event() {
        faults.resolve(page, &mut []);
    }
}

/// Where the models' lazy page lives (the model kernel needs no memory there).
const HOST: u64 = 0x7f00_0000_0000;

/// Stale fill (guarantee 13): a writer unregisters range A (bytes `0xaa`), discards its
/// page and registers range B at the same address (bytes `0xbb`) while the handler
/// resolves a fault there. The page never holds A's bytes once B is registered: the
/// handler holds the change lock from its lookup to its copy, so it copies A's bytes
/// only before A's unregistration (and the discard drops them) or looks B up. Fails
/// (the page ends with `0xaa`) if `resolve` releases the lock between lookup and copy.
#[test]
fn fault_handler_never_fills_a_stale_range() {
    model(|| {
        let faults = Arc::new(Faults::new(ModelKernel::new(false)));
        faults.register(lazy_page(HOST, 0xaa)).unwrap();
        let handler = {
            let faults = faults.clone();
            spawn(move || faults.resolve(HOST, &mut []))
        };
        faults.unregister(HOST, PAGE).unwrap();
        faults.kernel().discard(HOST);
        faults.register(lazy_page(HOST, 0xbb)).unwrap();
        handler.join().unwrap();
        let content = faults.kernel().content(HOST);
        assert!(matches!(content, None | Some(0xbb)), "{content:x?}");
    });
}

/// Wake on a miss: a thread faults on a page of range A; the writer unregisters A, but
/// the kernel refuses (and wakes nobody) while the range is forgotten all the same; the
/// handler resolves the fault. The faulting thread is always woken (by the fill, if the
/// handler came first, else by the handler's wake-up on a miss). Fails (loom reports a
/// deadlock) without the wake-up on a miss. The same with an unregistration the kernel
/// accepts (it wakes the page's waiters itself; the handler's copy meets `ENOENT`).
#[test]
fn fault_handler_wakes_a_fault_it_misses() {
    for refuse in [true, false] {
        model(move || {
            let faults = Arc::new(Faults::new(ModelKernel::new(refuse)));
            faults.register(lazy_page(HOST, 0xaa)).unwrap();
            let faulter = {
                let faults = faults.clone();
                spawn(move || faults.kernel().access(HOST))
            };
            let handler = {
                let faults = faults.clone();
                spawn(move || handle_one(&faults))
            };
            assert_eq!(faults.unregister(HOST, PAGE).is_err(), refuse);
            assert!(faults.registry().is_empty());
            let byte = faulter.join().unwrap();
            assert!(matches!(byte, None | Some(0xaa)), "{byte:x?}");
            handler.join().unwrap();
        });
    }
}

/// Fault handler vs writer, with the table's own code: a reader holds a guard on a
/// lazy region and faults on it (waits in the model kernel until the handler fills
/// its page); a writer removes the region, waiting for that reader; the handler
/// resolves the fault through `Faults` (registry and change lock), which the writer
/// takes only after the drain, to unregister. Every interleaving ends (no lock cycle),
/// and the reader sees the page's zeroes. A handler that waited on the table lock
/// (say, a lookup through the table) closes the cycle: loom reports the deadlock.
/// Bounded: 6 preemptions (about 17 s; unbounded it takes about 2 minutes).
#[test]
fn fault_handler_vs_writer() {
    model_bounded(6, || {
        let faults = std::sync::Arc::new(Faults::new(ModelKernel::new(false)));
        let t = Arc::new(RegionTable::new(
            std::sync::Arc::new(memory::NoSlots),
            Some(faults.clone()),
            TableConfig::default(),
        ));
        let id = insert(&t, PAGE, PAGE, Backing::Lazy(LazySource::Zero));
        let reader = {
            let (t, faults) = (t.clone(), faults.clone());
            spawn(move || match t.lock_region(GuestAddress(0), None) {
                Ok(guard) => {
                    // The copy faults while the guard is held.
                    let byte = faults.kernel().access(guard.region().host_addr());
                    assert_eq!(byte, Some(0));
                    drop(guard);
                }
                Err(LookupError::NotMapped { .. }) => faults.kernel().no_fault(),
                Err(e) => panic!("unexpected {e:?}"),
            })
        };
        let handler = {
            let faults = faults.clone();
            spawn(move || handle_one(&faults))
        };
        t.remove(id, None).unwrap();
        reader.join().unwrap();
        handler.join().unwrap();
        assert!(faults.registry().is_empty());
    });
}

/// A device request (guarded memory, an access across two regions) vs a writer that
/// removes the second region, then shrinks the first. The request holds the first region
/// when it reaches the second; if it waited there (instead of failing the fast path,
/// dropping what it holds and waiting with nothing held), the shrink queued behind the
/// removal would wait for it while it waits for the table lock: loom reports the
/// deadlock. Either both bytes are written or the second region was gone. Bounded: 6
/// preemptions (about 5 s; the deadlock needs 3; unbounded it runs for hours).
#[test]
fn device_request_vs_writer() {
    model_bounded(6, || {
        let t = Arc::new(table());
        let first = t
            .insert(
                RegionSpec {
                    start: GuestAddress(0),
                    size: 2 * PAGE,
                    capacity: 2 * PAGE,
                    backing: Backing::Anonymous,
                },
                None,
            )
            .unwrap();
        let second = t
            .insert(RegionSpec::anonymous(GuestAddress(2 * PAGE), PAGE), None)
            .unwrap();
        let reader = {
            let t = t.clone();
            spawn(move || {
                let mut mem = memory::GuardedMemory::new(&t, None);
                mem.retry(|mem| mem.write_slice(&[1u8; 2], GuestAddress(2 * PAGE - 1)))
                    .unwrap()
                    .is_ok()
            })
        };
        t.remove(second, None).unwrap();
        t.shrink(first, PAGE, None).unwrap();
        let _wrote_both = reader.join().unwrap();
        assert!(t.metrics().regions.iter().all(|r| r.readers == 0));
    });
}

/// A removal whose drain times out (a reader holds the region when the deadline
/// passes) puts the region back as it was: published, readable, not marked removed;
/// one that drains removes it for good. The reader, which may wait for the writer in
/// the two-tier lookup, ends either way. Bounded: 6 preemptions (about 10 s; four
/// threads, unbounded it runs for many minutes).
#[test]
fn removal_that_times_out_restores_the_region() {
    model_bounded(6, || {
        let t = Arc::new(table());
        let id = insert(&t, PAGE, PAGE, Backing::Anonymous);
        let reader = {
            let t = t.clone();
            spawn(move || match t.lock_region(GuestAddress(8), None) {
                Ok(guard) => guard.write_obj(0xaau8, MemoryRegionAddress(8)).unwrap(),
                Err(LookupError::NotMapped { addr: 8 }) => {}
                Err(e) => panic!("unexpected {e:?}"),
            })
        };
        let clock = spawn(memory::pass_deadlines);
        let far = std::time::Instant::now() + std::time::Duration::from_secs(3600);
        match t.remove(id, Some(far)) {
            Ok(()) => assert!(matches!(
                t.try_lock_region(GuestAddress(8)),
                Err(LookupError::NotMapped { .. })
            )),
            Err(TableError::DrainTimeout { .. }) => {
                reader.join().unwrap();
                let guard = t.try_lock_region(GuestAddress(8)).expect("restored");
                assert_eq!(guard.id(), id);
                assert_eq!(t.layout().len(), 1);
                drop(guard);
                clock.join().unwrap();
                return;
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
        reader.join().unwrap();
        clock.join().unwrap();
        assert!(t.metrics().regions.iter().all(|r| r.readers == 0));
    });
}
