//! The region table's unsafe code, in tests small enough for Miri: the fast path's lock
//! and release through a raw pointer, the two-tier lookup, writers draining readers that
//! copy through their guards, the per-thread snapshot cache and the retirement of removed
//! regions, guarded memory's lent regions, and copies across regions.
//!
//! They pass as normal tests too. Under Miri (`cargo +nightly miri test -p memory --test
//! miri`, see `scripts/test-all`) the host mapping calls are stubbed (`region.rs`):
//! anonymous regions only, a few pages each, no areas.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use memory::{
    CopyError, Deadline, GuardedMemory, LookupError, RegionGuard, RegionId, RegionSpec,
    RegionTable, TableConfig,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

const PAGE: u64 = 0x1000;

/// Far enough that only a hang reaches it (Miri's clock is virtual, and slow).
fn deadline() -> Deadline {
    Some(Instant::now() + Duration::from_secs(60))
}

/// Yields until `done()`, failing the test at the deadline.
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let end = deadline().unwrap();
    while !done() {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        thread::yield_now();
    }
}

/// Tries the fast path at `addr` until a writer holds its region: a guard the fast path
/// returns meanwhile is dropped at once.
fn wait_until_write_locked(table: &RegionTable, addr: u64) {
    wait_until("a writer holds the region", || {
        matches!(
            table.try_lock_region(GuestAddress(addr)),
            Err(LookupError::WriteLocked { .. })
        )
    });
}

/// Region A: 4 pages at 0; region B: 2 pages right after it (copies cross from A to B).
fn table_a_b(config: TableConfig) -> (RegionTable, RegionId, RegionId) {
    let table = RegionTable::new(std::sync::Arc::new(memory::NoSlots), None, config);
    let a = table
        .insert(RegionSpec::anonymous(GuestAddress(0), 4 * PAGE), deadline())
        .unwrap();
    let b = table
        .insert(
            RegionSpec::anonymous(GuestAddress(4 * PAGE), 2 * PAGE),
            deadline(),
        )
        .unwrap();
    (table, a, b)
}

fn readers(table: &RegionTable, id: RegionId) -> u64 {
    let metrics = table.metrics();
    metrics.regions.iter().find(|r| r.id == id).unwrap().readers
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// Writes `seed`'s pattern through the guard at `offset` and reads it back.
fn copy_through(guard: &RegionGuard<'_>, offset: u64, len: usize, seed: u8) {
    let data = pattern(len, seed);
    guard
        .write_slice(&data, MemoryRegionAddress(offset))
        .unwrap();
    let mut back = vec![0; len];
    guard
        .read_slice(&mut back, MemoryRegionAddress(offset))
        .unwrap();
    assert_eq!(back, data);
}

#[test]
fn fast_path_locks_and_guards_release() {
    let (table, a, b) = table_a_b(TableConfig::default());
    let guard = table.try_lock_region(GuestAddress(PAGE)).unwrap();
    assert_eq!((guard.id(), guard.len()), (a, 4 * PAGE));
    let second = table.try_lock_region(GuestAddress(3 * PAGE)).unwrap();
    assert_eq!(readers(&table, a), 2);
    copy_through(&second, 3 * PAGE - 8, 16, 1);
    drop(second);
    assert_eq!(readers(&table, a), 1);
    drop(guard);
    assert_eq!(readers(&table, a), 0);
    let guard = table.try_lock_region(GuestAddress(5 * PAGE)).unwrap();
    assert_eq!((guard.id(), guard.len()), (b, 2 * PAGE));
    drop(guard);
    assert_eq!(
        table.try_lock_region(GuestAddress(6 * PAGE)).unwrap_err(),
        LookupError::NotMapped { addr: 6 * PAGE }
    );
    assert_eq!(table.metrics().fast_path_hits, 3);

    // A full shard backs out the count it took.
    let (table, a, _) = table_a_b(TableConfig {
        reader_limit: 1,
        ..TableConfig::default()
    });
    let guard = table.try_lock_region(GuestAddress(0)).unwrap();
    assert_eq!(
        table.try_lock_region(GuestAddress(0)).unwrap_err(),
        LookupError::Saturated { region: a }
    );
    assert_eq!(readers(&table, a), 1);
    drop(guard);
    assert_eq!(readers(&table, a), 0);
}

/// The two-tier lookup: the fast path fails while a writer holds the region, so the
/// reader waits on the table lock for the writer to finish and locks what it left.
#[test]
fn two_tier_lookup_waits_for_the_writer() {
    let (table, _, b) = table_a_b(TableConfig::default());
    // Not mapped: the slow path confirms it.
    assert_eq!(
        table
            .lock_region(GuestAddress(8 * PAGE), deadline())
            .unwrap_err(),
        LookupError::NotMapped { addr: 8 * PAGE }
    );
    let guard = table
        .lock_region(GuestAddress(4 * PAGE), deadline())
        .unwrap();
    assert_eq!(guard.id(), b);
    drop(guard);

    let (held_tx, held_rx) = mpsc::channel();
    thread::scope(|s| {
        let table = &table;
        // A reader holds B until the lookup below is in the slow path.
        s.spawn(move || {
            let guard = table
                .lock_region(GuestAddress(5 * PAGE), deadline())
                .unwrap();
            held_tx.send(()).unwrap();
            wait_until("a lookup is in the slow path", || {
                table.metrics().slow_path_readers == 1
            });
            copy_through(&guard, PAGE, 64, 2);
        });
        held_rx.recv().unwrap();
        // The writer shrinks B: it waits for that reader.
        s.spawn(move || table.shrink(b, PAGE, deadline()).unwrap());
        wait_until_write_locked(table, 4 * PAGE);
        let guard = table
            .lock_region(GuestAddress(4 * PAGE), deadline())
            .unwrap();
        assert_eq!((guard.id(), guard.len()), (b, PAGE));
        copy_through(&guard, 0, 64, 3);
    });
    let metrics = table.metrics();
    assert_eq!(metrics.slow_path_lookups, 1);
    assert_eq!(metrics.slow_path_readers, 0);
    assert_eq!(readers(&table, b), 0);
}

/// A writer shrinks, then removes, a region a reader thread holds and copies through:
/// each time it waits for the reader's guard, then frees the memory.
#[test]
fn writers_wait_for_a_reader_copying_through_its_guard() {
    let table = RegionTable::default();
    let a = table
        .insert(RegionSpec::anonymous(GuestAddress(0), 4 * PAGE), deadline())
        .unwrap();
    let (held_tx, held_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel();
    thread::scope(|s| {
        let table = &table;
        s.spawn(move || {
            // Holds the last page while the region is shrunk past it.
            let guard = table
                .lock_region(GuestAddress(3 * PAGE), deadline())
                .unwrap();
            held_tx.send(()).unwrap();
            wait_until_write_locked(table, 0);
            assert_eq!(guard.len(), 4 * PAGE);
            copy_through(&guard, 3 * PAGE, 256, 4);
            drop(guard);

            go_rx.recv().unwrap();
            // Holds the region while it is removed.
            let guard = table.lock_region(GuestAddress(PAGE), deadline()).unwrap();
            held_tx.send(()).unwrap();
            wait_until("the region is unpublished", || {
                table.try_lock_region(GuestAddress(PAGE)).is_err()
            });
            copy_through(&guard, PAGE - 128, 256, 5);
            drop(guard);
            assert_eq!(
                table
                    .lock_region(GuestAddress(PAGE), deadline())
                    .unwrap_err(),
                LookupError::NotMapped { addr: PAGE }
            );
        });

        held_rx.recv().unwrap();
        table.shrink(a, 2 * PAGE, deadline()).unwrap();
        assert_eq!(table.layout(), vec![(a, GuestAddress(0), 2 * PAGE)]);
        // Memory grown back reads as zeros: the shrink freed what the reader wrote.
        table.grow(a, 4 * PAGE, deadline()).unwrap();
        let mut tail = vec![1; 256];
        table
            .read(GuestAddress(3 * PAGE), &mut tail, deadline())
            .unwrap();
        assert!(tail.iter().all(|&b| b == 0));

        go_tx.send(()).unwrap();
        held_rx.recv().unwrap();
        table.remove(a, deadline()).unwrap();
        assert!(table.layout().is_empty());
    });
}

/// The per-thread snapshot cache: a thread's lookups reload it when a writer publishes,
/// and a removed region its cached snapshot references is kept until the thread lets go
/// (by reloading, or by exiting) and then freed by the next writer.
#[test]
fn snapshot_cache_reloads_and_removed_regions_are_freed_after_it_lets_go() {
    let (table, _, b) = table_a_b(TableConfig::default());
    let (to_reader, from_main) = mpsc::channel::<&str>();
    let (to_main, from_reader) = mpsc::channel::<&str>();
    let retired = |table: &RegionTable| table.metrics().retired_regions;
    // The test thread looks nothing up: only the reader's cache references regions.
    thread::scope(|s| {
        let table = &table;
        let reader = s.spawn(move || {
            let lock = |addr| table.try_lock_region(GuestAddress(addr)).map(|g| g.id());
            for _ in 0..3 {
                lock(PAGE).unwrap();
                assert_eq!(lock(5 * PAGE).unwrap(), b);
            }
            to_main.send("cached a snapshot with B").unwrap();
            assert_eq!(from_main.recv().unwrap(), "removed B, inserted C");
            // The cache reloads: B is gone, C is there.
            assert!(lock(5 * PAGE).is_err());
            lock(8 * PAGE).unwrap();
            to_main.send("cached a snapshot with C").unwrap();
            assert_eq!(from_main.recv().unwrap(), "removed C");
            // The thread exits with the snapshot with C in its cache.
        });

        assert_eq!(from_reader.recv().unwrap(), "cached a snapshot with B");
        table.remove(b, deadline()).unwrap();
        assert_eq!(retired(table), 1, "the reader's cached snapshot has B");
        let c = table
            .insert(
                RegionSpec::anonymous(GuestAddress(8 * PAGE), PAGE),
                deadline(),
            )
            .unwrap();
        to_reader.send("removed B, inserted C").unwrap();
        assert_eq!(from_reader.recv().unwrap(), "cached a snapshot with C");
        // The reader's reload let go of B: this writer frees it.
        table.remove(c, deadline()).unwrap();
        assert_eq!(retired(table), 1, "B is freed, the reader's snapshot has C");
        to_reader.send("removed C").unwrap();
        // Joined explicitly: unlike the scope's end, that waits for the thread's
        // thread-local destructors, which drop its cache.
        reader.join().unwrap();
    });
    // The reader exited: its cache let go of C, which the next writer frees.
    assert_eq!(retired(&table), 1);
    let d = table
        .insert(
            RegionSpec::anonymous(GuestAddress(8 * PAGE), PAGE),
            deadline(),
        )
        .unwrap();
    assert_eq!(retired(&table), 0);
    table
        .write(GuestAddress(8 * PAGE), &[9; 8], deadline())
        .unwrap();
    assert_eq!(table.region_at(GuestAddress(8 * PAGE)), Some(d));
}

/// Guarded memory holds regions as accesses reach them, lends them to vm-memory code,
/// runs an access again after a fast-path miss, and releases everything.
#[test]
fn guarded_memory_holds_lazily_retries_and_releases() {
    let (table, a, b) = table_a_b(TableConfig::default());
    let c = table
        .insert(
            RegionSpec::anonymous(GuestAddress(8 * PAGE), PAGE),
            deadline(),
        )
        .unwrap();
    let mut mem = GuardedMemory::new(&table, deadline());
    assert_eq!(mem.held(), 0);
    let data = pattern(32, 6);
    mem.retry(|mem| mem.write_slice(&data, GuestAddress(4 * PAGE - 16)))
        .unwrap()
        .unwrap();
    assert_eq!(mem.held(), 2);
    let mut back = [0; 32];
    mem.read_slice(&mut back, GuestAddress(4 * PAGE - 16))
        .unwrap();
    assert_eq!(back[..], data[..]);
    let starts: Vec<_> = mem.iter().map(|r| r.start_addr().0).collect();
    assert_eq!(starts, [0, 4 * PAGE, 8 * PAGE]);
    assert_eq!(mem.held(), 3);
    assert_eq!(readers(&table, c), 1);
    mem.release();
    assert_eq!(mem.held(), 0);
    assert!([a, b, c].iter().all(|&id| readers(&table, id) == 0));

    // A miss: the access holds A when it reaches B, which a writer holds.
    let (held_tx, held_rx) = mpsc::channel();
    let missed = AtomicBool::new(false);
    thread::scope(|s| {
        let table = &table;
        s.spawn(move || {
            let guard = table
                .lock_region(GuestAddress(4 * PAGE), deadline())
                .unwrap();
            held_tx.send(()).unwrap();
            wait_until("the access waits for the writer", || {
                table.metrics().slow_path_readers == 1
            });
            drop(guard);
        });
        held_rx.recv().unwrap();
        s.spawn(move || table.shrink(b, PAGE, deadline()).unwrap());
        wait_until_write_locked(table, 4 * PAGE);
        let mut runs = 0;
        let mut buf = [0; 32];
        mem.retry(|mem| {
            runs += 1;
            let result = mem.read_slice(&mut buf, GuestAddress(4 * PAGE - 16));
            missed.fetch_or(mem.missed(), Ordering::Relaxed);
            result
        })
        .unwrap()
        .unwrap();
        assert_eq!(runs, 2);
        assert_eq!(buf[..], data[..]);
    });
    assert!(missed.load(Ordering::Relaxed));
    assert_eq!(mem.held(), 2);
    assert_eq!(readers(&table, b), 1);
    drop(mem);
    assert_eq!(readers(&table, b), 0);
}

/// `RegionTable::read`, `write` and `copy` across the boundary of two regions.
#[test]
fn table_copies_across_regions() {
    let (table, _, _) = table_a_b(TableConfig::default());
    let data = pattern(2 * PAGE as usize, 7);
    table
        .write(GuestAddress(3 * PAGE), &data, deadline())
        .unwrap();
    let mut back = vec![0; data.len()];
    table
        .read(GuestAddress(3 * PAGE), &mut back, deadline())
        .unwrap();
    assert_eq!(back, data);
    // From across the boundary into A, and from A across the boundary.
    table
        .copy(
            GuestAddress(3 * PAGE),
            GuestAddress(0),
            2 * PAGE as usize,
            deadline(),
        )
        .unwrap();
    table
        .copy(
            GuestAddress(0),
            GuestAddress(3 * PAGE + 512),
            PAGE as usize,
            deadline(),
        )
        .unwrap();
    let mut back = vec![0; PAGE as usize];
    table
        .read(GuestAddress(3 * PAGE + 512), &mut back, deadline())
        .unwrap();
    assert_eq!(back, data[..PAGE as usize]);
    // Past B's end: the part inside (never written: zeros) is read, the error says how
    // much.
    let mut buf = vec![0xff; 2 * PAGE as usize];
    assert_eq!(
        table
            .read(GuestAddress(5 * PAGE), &mut buf, deadline())
            .unwrap_err(),
        CopyError::Lookup {
            addr: 6 * PAGE,
            copied: PAGE as usize,
            source: LookupError::NotMapped { addr: 6 * PAGE },
        }
    );
    assert!(buf[..PAGE as usize].iter().all(|&b| b == 0));
    assert!(buf[PAGE as usize..].iter().all(|&b| b == 0xff));
    assert!(matches!(
        table.copy(GuestAddress(u64::MAX - 1), GuestAddress(0), 4, deadline()),
        Err(CopyError::Overflow { .. })
    ));
}
