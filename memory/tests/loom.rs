//! loom models of the region-table protocol, 2–4 threads each. Most are exhaustive
//! (every interleaving); the three that are not say so and give their preemption bound
//! (every interleaving with at most that many preemptions): unbounded they take many
//! minutes to hours.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p memory --test loom --release`
//! (`LOOM_MAX_PREEMPTIONS` overrides every model's bound, exhaustive ones included).
//! Under `--cfg loom` the table's atomics, table lock, publication and parking are
//! loom's models (see `src/sync.rs`), so these check the table's own code.

#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::Arc;
use loom::thread;
use memory::{
    Backing, FaultRegistry, LazyError, LazyPages, LazyRange, LazySource, LookupError, RegionSpec,
    RegionTable, TableConfig, TableError,
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

/// A stand-in fault handler: a lazily populated page is "filled" by the handler
/// thread, which finds the range through the registry's lookup (no table lock).
struct ModelFaults {
    registry: FaultRegistry,
}

impl LazyPages for ModelFaults {
    fn register(&self, range: LazyRange) -> Result<(), LazyError> {
        self.registry.add(range);
        Ok(())
    }
    fn unregister(&self, host_start: u64, len: u64) -> Result<(), LazyError> {
        self.registry.remove(host_start, len);
        Ok(())
    }
}

/// Fault handler vs writer: a reader holds a guard and "faults" (waits for the handler
/// to fill its page); a writer removes the region and waits for the reader; the
/// handler resolves the fault through the registry without any table lock. Every
/// interleaving ends: no lock cycle.
#[test]
fn fault_handler_vs_writer() {
    model(|| {
        let faults = std::sync::Arc::new(ModelFaults {
            registry: FaultRegistry::default(),
        });
        let t = Arc::new(RegionTable::new(
            std::sync::Arc::new(memory::NoSlots),
            Some(faults.clone()),
            TableConfig::default(),
        ));
        let id = insert(&t, PAGE, PAGE, Backing::Lazy(LazySource::Zero));
        // The reader reports a fault (a host address, or 0 for none) to the handler,
        // and waits for the handler to say the page is filled.
        let (fault_tx, fault_rx) = loom::sync::mpsc::channel::<u64>();
        let (filled_tx, filled_rx) = loom::sync::mpsc::channel::<()>();

        let reader = {
            let t = t.clone();
            spawn(move || match t.lock_region(GuestAddress(0), None) {
                Ok(guard) => {
                    // The copy faults while the guard is held.
                    fault_tx.send(guard.region().host_addr()).unwrap();
                    filled_rx.recv().unwrap();
                    drop(guard);
                }
                Err(LookupError::NotMapped { .. }) => fault_tx.send(0).unwrap(),
                Err(e) => panic!("unexpected {e:?}"),
            })
        };
        let handler = {
            let faults = faults.clone();
            spawn(move || {
                let addr = fault_rx.recv().unwrap();
                if addr != 0 {
                    // The handler's lookup: lock-free, never waits for the writer.
                    let (source, _) = faults.registry.lookup(addr).expect("range registered");
                    assert!(matches!(source, LazySource::Zero));
                    filled_tx.send(()).unwrap();
                }
            })
        };
        t.remove(id, None).unwrap();
        reader.join().unwrap();
        handler.join().unwrap();
        assert!(faults.registry.is_empty());
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
