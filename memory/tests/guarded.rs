//! Guarded memory: regions locked as accesses reach them, held until released, and
//! the two-tier wait after a fast-path miss (guarantee 12).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;
use common::tables::{grow_spec, table_with, table_with_a_region, MIB};
use memory::{GuardedMemory, LookupError, RegionSpec, RegionTable, TableConfig, TableError};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

#[test]
fn guarded_memory_works_with_vm_memory_bytes() {
    let (table, _) = table_with_a_region();
    table
        .insert(RegionSpec::anonymous(GuestAddress(MIB), MIB), None)
        .unwrap();
    table
        .insert(RegionSpec::anonymous(GuestAddress(8 * MIB), MIB), None)
        .unwrap();
    {
        let mem = GuardedMemory::lock_all(&table, None).unwrap();
        assert_eq!(mem.num_regions(), 3);
        // vm-memory's Bytes over guarded memory, across a region boundary.
        mem.write_obj(0x1122_3344_5566_7788u64, GuestAddress(MIB - 4))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(MIB - 4)).unwrap(),
            0x1122_3344_5566_7788
        );
        assert!(mem.read_obj::<u64>(GuestAddress(2 * MIB)).is_err());
        // Every region is held, each by its own read lock.
        let metrics = table.metrics();
        assert!(metrics.regions.iter().all(|r| r.readers == 1));
        assert_eq!(mem.iter().next().unwrap().start_addr(), GuestAddress(0));
    }
    assert!(table.metrics().regions.iter().all(|r| r.readers == 0));
    let mut buf = [0u8; 8];
    table.read(GuestAddress(MIB - 4), &mut buf, None).unwrap();
    assert_eq!(u64::from_le_bytes(buf), 0x1122_3344_5566_7788);
    // Lazily: an access holds the regions it reaches, and only those.
    let mut mem = GuardedMemory::new(&table, None);
    mem.write_obj(0x99u16, GuestAddress(MIB - 1)).unwrap();
    assert_eq!(mem.held(), 2);
    let readers: Vec<_> = table.metrics().regions.iter().map(|r| r.readers).collect();
    assert_eq!(readers, vec![1, 1, 0]);
    mem.release();
    assert!(table.metrics().regions.iter().all(|r| r.readers == 0));
    drop(mem);
}

/// Guarded memory holds off the writers that take away memory of the regions it has
/// reached, and nobody else: not writers of other regions, not growth.
#[test]
fn guarded_memory_holds_off_writers_of_the_regions_it_reached_only() {
    let table = table_with(
        Arc::default(),
        TableConfig {
            drain_timeout: Duration::from_millis(100),
            ..TableConfig::default()
        },
    );
    let a = table.insert(grow_spec(0, MIB, 2 * MIB), None).unwrap();
    let b = table
        .insert(RegionSpec::anonymous(GuestAddress(4 * MIB), MIB), None)
        .unwrap();
    // Writers run on another thread: one waiting for a region its own thread holds would
    // wait for itself (debug builds panic on that).
    let on_writer = |op: &(dyn Fn() -> Result<(), TableError> + Sync)| {
        std::thread::scope(|s| s.spawn(op).join().unwrap())
    };
    let mem = GuardedMemory::new(&table, None);
    mem.write_obj(0xabu8, GuestAddress(MIB - 1)).unwrap();
    assert!(matches!(
        on_writer(&|| table.shrink(a, MIB / 2, None)),
        Err(TableError::DrainTimeout { readers: 1, .. })
    ));
    // Not reached: removed without waiting.
    let started = Instant::now();
    on_writer(&|| table.remove(b, None)).unwrap();
    assert!(started.elapsed() < Duration::from_millis(100));
    assert!(mem.read_obj::<u8>(GuestAddress(4 * MIB)).is_err());
    // Growth does not wait, and what is held sees it.
    assert_eq!(mem.read_obj::<u8>(GuestAddress(MIB - 1)).unwrap(), 0xab);
    on_writer(&|| table.grow(a, 2 * MIB, None)).unwrap();
    mem.write_obj(2u8, GuestAddress(2 * MIB - 1)).unwrap();
    assert_eq!(mem.held(), 1);
    drop(mem);
    table.shrink(a, MIB, None).unwrap();
    let mem = GuardedMemory::lock_all(&table, None).unwrap();
    assert_eq!(mem.num_regions(), 1);
    assert!(mem.read_obj::<u8>(GuestAddress(MIB)).is_err());
    assert_eq!(mem.read_obj::<u8>(GuestAddress(MIB - 1)).unwrap(), 0xab);
}

#[test]
fn guarded_memory_waits_out_a_writer_then_takes_every_region() {
    let table = RegionTable::default();
    let changing = table.insert(grow_spec(0, 2 * MIB, 2 * MIB), None).unwrap();
    table
        .insert(RegionSpec::anonymous(GuestAddress(4 * MIB), MIB), None)
        .unwrap();
    let reader = table.lock_region(GuestAddress(0), None).unwrap();
    std::thread::scope(|s| {
        // A writer shrinking the first region marks it, then waits for `reader`.
        let writer = s.spawn(|| table.shrink(changing, MIB, None));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !matches!(
            table.try_lock_region(GuestAddress(0)),
            Err(LookupError::WriteLocked { .. })
        ) {
            assert!(Instant::now() < deadline, "writer never marked the region");
            std::thread::yield_now();
        }
        let table = &table;
        let reader_all = s.spawn(move || {
            let mem = GuardedMemory::lock_all(table, Some(deadline)).unwrap();
            let sizes: Vec<_> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
            sizes
        });
        // The new reader waits for the writer (in the table lock), holding nothing.
        while table.metrics().slow_path_readers == 0 {
            assert!(
                Instant::now() < deadline,
                "the reader never took the slow path"
            );
            std::thread::yield_now();
        }
        let readers: Vec<_> = table.metrics().regions.iter().map(|r| r.readers).collect();
        assert_eq!(readers, vec![1, 0], "the waiting reader holds nothing");
        drop(reader);
        writer.join().unwrap().unwrap();
        assert_eq!(reader_all.join().unwrap(), vec![(0, MIB), (4 * MIB, MIB)]);
    });
}

/// Hotplug runs writer operations back to back (hundreds of 2 MiB blocks per resize),
/// and more than one writer can queue for the table: a device taking guarded memory
/// meanwhile must get it, however often a writer holds a region it needs, and never be
/// turned away for "too many retries" (which would leave the device needing a reset).
#[test]
fn guarded_memory_is_taken_while_writers_queue_back_to_back() {
    let table = RegionTable::default();
    let regions: Vec<_> = (0..3u64)
        .map(|i| {
            table
                .insert(grow_spec(i * 8 * MIB, 2 * MIB, 4 * MIB), None)
                .unwrap()
        })
        .collect();
    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (taken, writes) = std::thread::scope(|s| {
        // Two writers, so one is always queued behind whatever holds the table lock;
        // each resizes a region that every access includes, with no pause in between.
        let writers: Vec<_> = regions[..2]
            .iter()
            .map(|&id| {
                let (table, stop) = (&table, &stop);
                s.spawn(move || {
                    let mut writes = 0u64;
                    // The deadline also ends the writers if the reader fails.
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        table.grow(id, 4 * MIB, Some(deadline)).unwrap();
                        table.shrink(id, 2 * MIB, Some(deadline)).unwrap();
                        writes += 2;
                    }
                    writes
                })
            })
            .collect();
        let mut taken = 0u64;
        let mut failure = None;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(3) || taken < 1000 {
            match GuardedMemory::lock_all(&table, Some(deadline)) {
                Ok(mem) if mem.num_regions() == 3 => {}
                Ok(mem) => {
                    failure = Some(format!(
                        "guarded memory of {} regions, not 3",
                        mem.num_regions()
                    ));
                    break;
                }
                Err(e) => {
                    failure = Some(e.to_string());
                    break;
                }
            }
            taken += 1;
        }
        stop.store(true, Ordering::Relaxed);
        if let Some(e) = failure {
            panic!("guarded memory refused after {taken} takes: {e}");
        }
        let writes: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
        (taken, writes)
    });
    println!("{taken} takes, {writes} writer operations");
    assert!(writes > 0, "taken {taken}, writes {writes}");
}

/// An access that holds one region and reaches another a writer holds does not wait
/// while it holds anything: it drops what it holds, waits for the writer with the
/// two-tier lookup, and runs again, starting with the region it missed.
#[test]
fn a_miss_while_holding_drops_everything_waits_and_runs_again() {
    let table = RegionTable::default();
    table
        .insert(RegionSpec::anonymous(GuestAddress(0), MIB), None)
        .unwrap();
    let changing = table
        .insert(grow_spec(MIB, 2 * MIB, 2 * MIB), None)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let readers = |table: &RegionTable| -> Vec<u64> {
        table.metrics().regions.iter().map(|r| r.readers).collect()
    };
    // Another reader holds the second region; a writer shrinking it waits for that one.
    let other = table.lock_region(GuestAddress(MIB), None).unwrap();
    let runs = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let writer = s.spawn(|| table.shrink(changing, MIB, Some(deadline)));
        while !matches!(
            table.try_lock_region(GuestAddress(MIB)),
            Err(LookupError::WriteLocked { .. })
        ) {
            assert!(
                Instant::now() < deadline,
                "the writer never marked the region"
            );
            std::thread::yield_now();
        }
        let access = s.spawn(|| {
            let mut mem = GuardedMemory::new(&table, Some(deadline));
            let written = mem
                .retry(|mem| {
                    let run = runs.fetch_add(1, Ordering::SeqCst);
                    // Across the boundary: the first region, then the one being changed.
                    let written = mem.write_slice(&[0x5a; 8], GuestAddress(MIB - 4));
                    // The first run is void, and says so; the second is not.
                    assert_eq!(mem.missed(), run == 0);
                    written
                })
                .unwrap();
            (written.is_ok(), mem.held())
        });
        // The first run missed and now waits in the slow path, holding nothing.
        while runs.load(Ordering::SeqCst) == 0 || table.metrics().slow_path_readers == 0 {
            assert!(Instant::now() < deadline, "the access never waited");
            std::thread::yield_now();
        }
        assert_eq!(readers(&table), vec![0, 1], "only `other` holds a region");
        drop(other);
        writer.join().unwrap().unwrap();
        assert_eq!(access.join().unwrap(), (true, 2));
    });
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    let mut buf = [0u8; 8];
    table.read(GuestAddress(MIB - 4), &mut buf, None).unwrap();
    assert_eq!(buf, [0x5a; 8]);
}

/// A removal that times out puts its region back; an access that holds another region
/// and finds it unpublished meanwhile (its fast path says "not mapped") waits for the
/// writer instead of failing, and then uses the region restored.
#[test]
fn an_access_waits_out_a_removal_that_is_undone() {
    let table = RegionTable::default();
    table
        .insert(RegionSpec::anonymous(GuestAddress(0), MIB), None)
        .unwrap();
    let second = table
        .insert(RegionSpec::anonymous(GuestAddress(MIB), MIB), None)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (release_tx, release) = std::sync::mpsc::channel::<()>();
    let (held_tx, held) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        // Another reader holds the second region, so the removal can only time out.
        let table = &table;
        let holder = s.spawn(move || {
            let guard = table.lock_region(GuestAddress(MIB), None).unwrap();
            held_tx.send(()).unwrap();
            release.recv_timeout(Duration::from_secs(10)).unwrap();
            drop(guard);
        });
        held.recv_timeout(Duration::from_secs(10)).unwrap();
        let writer = s.spawn(move || {
            let timeout = Some(Instant::now() + Duration::from_millis(300));
            let removed = table.remove(second, timeout);
            release_tx.send(()).unwrap();
            removed
        });
        // Unpublished, being drained.
        while table.region_at(GuestAddress(MIB)).is_some() {
            assert!(Instant::now() < deadline, "the removal never started");
            std::thread::yield_now();
        }
        let mut mem = GuardedMemory::new(table, Some(deadline));
        let mut runs = 0;
        let written = mem
            .retry(|mem| {
                runs += 1;
                mem.write_slice(&[0x77; 8], GuestAddress(MIB - 4))
            })
            .unwrap();
        assert!(written.is_ok(), "the access failed: {written:?}");
        assert_eq!(runs, 2);
        drop(mem);
        assert!(matches!(
            writer.join().unwrap(),
            Err(TableError::DrainTimeout { .. })
        ));
        holder.join().unwrap();
    });
    let mut buf = [0u8; 8];
    table.read(GuestAddress(MIB - 4), &mut buf, None).unwrap();
    assert_eq!(buf, [0x77; 8]);
}

/// Waiting for a writer ends at the deadline given: the access's retry reports it.
#[test]
fn a_wait_for_a_writer_ends_at_the_deadline() {
    let (table, id) = table_with_a_region();
    let (release_tx, release) = std::sync::mpsc::channel::<()>();
    let (held_tx, held) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        let table = &table;
        let holder = s.spawn(move || {
            let guard = table.lock_region(GuestAddress(0), None).unwrap();
            held_tx.send(()).unwrap();
            release.recv_timeout(Duration::from_secs(10)).unwrap();
            drop(guard);
        });
        held.recv_timeout(Duration::from_secs(10)).unwrap();
        // A writer holds the table lock, waiting for `holder`, until it is let go.
        let writer = s.spawn(move || table.shrink(id, MIB / 2, None));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !matches!(
            table.try_lock_region(GuestAddress(0)),
            Err(LookupError::WriteLocked { .. })
        ) {
            assert!(
                Instant::now() < deadline,
                "the writer never marked the region"
            );
            std::thread::yield_now();
        }
        let mut mem = GuardedMemory::new(table, Some(Instant::now() + Duration::from_millis(50)));
        let result = mem.retry(|mem| mem.read_obj::<u8>(GuestAddress(0)).is_ok());
        assert_eq!(result, Err(memory::GuardedMemoryError::Timeout));
        drop(mem);
        release_tx.send(()).unwrap();
        writer.join().unwrap().unwrap();
        holder.join().unwrap();
    });
}

/// Confined guarded memory locks no region it does not hold: an access that reaches one
/// fails, says so, and leaves the region free for its writer.
#[test]
fn confined_memory_locks_nothing_new() {
    let (table, _) = table_with_a_region();
    let second = table
        .insert(RegionSpec::anonymous(GuestAddress(MIB), MIB), None)
        .unwrap();
    let mut mem = GuardedMemory::new(&table, None);
    mem.write_obj(1u8, GuestAddress(0x100)).unwrap();
    mem.confine(true);
    // Held memory still works; the other region is neither read nor locked.
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x100)).unwrap(), 1);
    assert!(!mem.reached_out());
    assert!(mem.read_obj::<u8>(GuestAddress(MIB)).is_err());
    assert!(mem.reached_out());
    assert!(!mem.missed(), "no miss to wait for: nothing was tried");
    assert_eq!(mem.held(), 1);
    let readers: Vec<_> = table.metrics().regions.iter().map(|r| r.readers).collect();
    assert_eq!(readers, vec![1, 0]);
    // Its writer (on a thread of its own, as writers are) goes ahead meanwhile.
    let third = std::thread::scope(|s| {
        s.spawn(|| {
            table.remove(second, None).unwrap();
            table
                .insert(RegionSpec::anonymous(GuestAddress(MIB), MIB), None)
                .unwrap()
        })
        .join()
        .unwrap()
    });
    // Unconfined, the access locks what it reaches again.
    mem.confine(false);
    assert!(!mem.reached_out());
    mem.write_obj(2u8, GuestAddress(MIB)).unwrap();
    assert_eq!(mem.held(), 2);
    // A release ends the confinement.
    mem.confine(true);
    mem.release();
    mem.write_obj(3u8, GuestAddress(MIB + 1)).unwrap();
    assert!(!mem.reached_out());
    drop(mem);
    table.remove(third, None).unwrap();
}
