//! Unit tests of the region table's operations and errors.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::slots::RecordingSlots;
use common::tables::{grow_spec, table_with, table_with_a_region, MIB};
use memory::{
    Backing, CopyError, GuardedMemory, LookupError, RegionSpec, RegionTable, TableConfig,
    TableError,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryRegion};

#[test]
fn insert_publishes_region_and_maps_slot() {
    let slots = Arc::new(RecordingSlots::default());
    let table = table_with(slots.clone(), TableConfig::default());
    let id = table
        .insert(RegionSpec::anonymous(GuestAddress(0x10_0000), MIB), None)
        .unwrap();
    assert_eq!(table.layout(), vec![(id, GuestAddress(0x10_0000), MIB)]);
    let calls = slots.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].0, "map");
    assert_eq!(calls[0].1.guest_addr, 0x10_0000);
    assert_eq!(calls[0].1.size, MIB);
    assert_ne!(calls[0].1.host_addr, 0);
    assert_eq!(table.region_at(GuestAddress(0x10_0000 + MIB - 1)), Some(id));
    assert_eq!(table.region_at(GuestAddress(0x10_0000 + MIB)), None);
}

#[test]
fn insert_rejects_overlap_misalignment_and_bad_geometry() {
    let table = RegionTable::default();
    let a = table.insert(grow_spec(0, MIB, 4 * MIB), None).unwrap();
    // Overlaps the reserved capacity, not just the current size.
    match table.insert(RegionSpec::anonymous(GuestAddress(2 * MIB), MIB), None) {
        Err(TableError::Overlap { other, .. }) => assert_eq!(other, a),
        other => panic!("expected overlap, got {other:?}"),
    }
    assert!(matches!(
        table.insert(RegionSpec::anonymous(GuestAddress(8 * MIB + 1), MIB), None),
        Err(TableError::Region(memory::RegionError::Mapping(
            memory::MappingError::Unaligned { .. }
        )))
    ));
    assert!(matches!(
        table.insert(RegionSpec::anonymous(GuestAddress(8 * MIB), 0), None),
        Err(TableError::Region(memory::RegionError::Mapping(
            memory::MappingError::BadGeometry { .. }
        )))
    ));
    assert!(matches!(
        table.insert(grow_spec(8 * MIB, 2 * MIB, MIB), None),
        Err(TableError::Region(memory::RegionError::Mapping(
            memory::MappingError::BadGeometry { .. }
        )))
    ));
    assert!(matches!(
        table.insert(
            RegionSpec::anonymous(GuestAddress(u64::MAX - 0xfff), 0x2000),
            None
        ),
        Err(TableError::Region(memory::RegionError::Mapping(
            memory::MappingError::BadGeometry { .. }
        )))
    ));
    // A lazy region without a fault handler.
    let lazy = RegionSpec {
        backing: Backing::Lazy(memory::LazySource::Zero),
        ..RegionSpec::anonymous(GuestAddress(16 * MIB), MIB)
    };
    assert!(matches!(
        table.insert(lazy, None),
        Err(TableError::Lazy(memory::LazyError::NoHandler))
    ));
    assert_eq!(table.layout().len(), 1);
}

#[test]
fn slot_numbers_are_reused_but_region_ids_are_not() {
    let slots = Arc::new(RecordingSlots::default());
    let table = table_with(slots.clone(), TableConfig::default());
    let a = table
        .insert(RegionSpec::anonymous(GuestAddress(0), MIB), None)
        .unwrap();
    table.remove(a, None).unwrap();
    let b = table
        .insert(RegionSpec::anonymous(GuestAddress(0), MIB), None)
        .unwrap();
    assert!(b.0 > a.0, "region ids must never be reused");
    let calls = slots.calls();
    assert_eq!(
        calls.iter().map(|c| c.0).collect::<Vec<_>>(),
        ["map", "unmap", "map"]
    );
    assert_eq!(calls[0].1.slot, calls[2].1.slot);
}

#[test]
fn slot_limit_is_a_typed_error() {
    let table = table_with(
        Arc::default(),
        TableConfig {
            max_slots: 1,
            ..TableConfig::default()
        },
    );
    table
        .insert(RegionSpec::anonymous(GuestAddress(0), MIB), None)
        .unwrap();
    assert!(matches!(
        table.insert(RegionSpec::anonymous(GuestAddress(MIB), MIB), None),
        Err(TableError::NoSlot(1))
    ));
}

#[test]
fn copies_cross_regions_and_report_unmapped_memory() {
    let (table, _) = table_with_a_region();
    table
        .insert(RegionSpec::anonymous(GuestAddress(MIB), MIB), None)
        .unwrap();
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
    table.write(GuestAddress(MIB - 4096), &data, None).unwrap();
    let mut back = vec![0u8; data.len()];
    table
        .read(GuestAddress(MIB - 4096), &mut back, None)
        .unwrap();
    assert_eq!(back, data);

    // Guest-to-guest copy across the boundary.
    table
        .copy(
            GuestAddress(MIB - 4096),
            GuestAddress(0x1000),
            data.len(),
            None,
        )
        .unwrap();
    table.read(GuestAddress(0x1000), &mut back, None).unwrap();
    assert_eq!(back, data);

    // Running off the end: the first part is copied, then a typed error.
    let err = table
        .write(GuestAddress(2 * MIB - 100), &[1u8; 200], None)
        .unwrap_err();
    assert_eq!(
        err,
        CopyError::Lookup {
            addr: 2 * MIB,
            copied: 100,
            source: LookupError::NotMapped { addr: 2 * MIB }
        }
    );
    // A guest-to-guest copy whose source runs off the end part-way through a piece:
    // what was read but not written does not count as copied.
    let err = table
        .copy(GuestAddress(2 * MIB - 100), GuestAddress(0), 200, None)
        .unwrap_err();
    assert_eq!(
        err,
        CopyError::Lookup {
            addr: 2 * MIB,
            copied: 0,
            source: LookupError::NotMapped { addr: 2 * MIB }
        }
    );
    // Its destination running off the end: the written part counts.
    let err = table
        .copy(GuestAddress(0), GuestAddress(2 * MIB - 100), 200, None)
        .unwrap_err();
    assert_eq!(
        err,
        CopyError::Lookup {
            addr: 2 * MIB,
            copied: 100,
            source: LookupError::NotMapped { addr: 2 * MIB }
        }
    );
    assert!(matches!(
        table.read(GuestAddress(u64::MAX - 10), &mut [0u8; 100], None),
        Err(CopyError::Overflow { .. })
    ));
    assert!(table.write(GuestAddress(5 * MIB), &[], None).is_ok());
}

#[test]
fn grow_makes_new_memory_usable_without_draining_readers() {
    let slots = Arc::new(RecordingSlots::default());
    let table = table_with(slots.clone(), TableConfig::default());
    let id = table.insert(grow_spec(0, MIB, 4 * MIB), None).unwrap();
    assert!(table.write(GuestAddress(MIB), &[1], None).is_err());
    // A reader holding the region does not block growth.
    let guard = table.try_lock_region(GuestAddress(0)).unwrap();
    std::thread::scope(|s| s.spawn(|| table.grow(id, 2 * MIB, None)).join().unwrap()).unwrap();
    assert_eq!(guard.len(), MIB, "a guard keeps the size it was taken with");
    drop(guard);
    table.write(GuestAddress(2 * MIB - 1), &[9], None).unwrap();
    assert_eq!(slots.calls().last().unwrap().1.size, 2 * MIB);
    for bad in [MIB, 2 * MIB, 5 * MIB, 3 * MIB + 1] {
        assert!(
            matches!(table.grow(id, bad, None), Err(TableError::BadResize { .. })),
            "{bad:#x}"
        );
    }
    assert!(matches!(
        table.grow(memory::RegionId(999), 3 * MIB, None),
        Err(TableError::NoSuchRegion(_))
    ));
}

#[test]
fn shrink_frees_the_tail_and_copies_into_it_fail() {
    let table = RegionTable::default();
    let id = table.insert(grow_spec(0, 4 * MIB, 4 * MIB), None).unwrap();
    table
        .write(GuestAddress(3 * MIB), &[7u8; 4096], None)
        .unwrap();
    table.shrink(id, MIB, None).unwrap();
    assert!(matches!(
        table.write(GuestAddress(3 * MIB), &[1], None),
        Err(CopyError::Lookup {
            source: LookupError::NotMapped { .. },
            ..
        })
    ));
    // Growing back gives fresh (zeroed) memory, not the discarded contents.
    table.grow(id, 4 * MIB, None).unwrap();
    let mut buf = [0xffu8; 4096];
    table.read(GuestAddress(3 * MIB), &mut buf, None).unwrap();
    assert_eq!(buf, [0u8; 4096]);
    assert!(matches!(
        table.shrink(id, 4 * MIB, None),
        Err(TableError::BadResize { .. })
    ));
    assert!(matches!(
        table.shrink(id, 0, None),
        Err(TableError::BadResize { .. })
    ));
}

#[test]
fn memfd_backed_regions_work_and_shrink() {
    let table = RegionTable::default();
    let id = table
        .insert(
            RegionSpec {
                backing: Backing::Memfd,
                ..grow_spec(0, 2 * MIB, 2 * MIB)
            },
            None,
        )
        .unwrap();
    table.write(GuestAddress(MIB), b"kite", None).unwrap();
    let mut buf = [0u8; 4];
    table.read(GuestAddress(MIB), &mut buf, None).unwrap();
    assert_eq!(&buf, b"kite");
    table.shrink(id, MIB, None).unwrap();
    table.grow(id, 2 * MIB, None).unwrap();
    table.read(GuestAddress(MIB), &mut buf, None).unwrap();
    assert_eq!(buf, [0; 4], "the punched hole reads back as zeroes");
}

#[test]
fn remove_with_reader_times_out_and_changes_nothing() {
    let table = table_with(
        Arc::default(),
        TableConfig {
            drain_timeout: Duration::from_millis(50),
            ..TableConfig::default()
        },
    );
    let id = table
        .insert(RegionSpec::anonymous(GuestAddress(0), MIB), None)
        .unwrap();
    table.write(GuestAddress(0), b"keep", None).unwrap();
    let guard = table.lock_region(GuestAddress(0), None).unwrap();
    let t = std::thread::scope(|s| s.spawn(|| table.remove(id, None)).join().unwrap());
    match t {
        Err(TableError::DrainTimeout {
            region, readers, ..
        }) => {
            assert_eq!(region, id);
            assert_eq!(readers, 1);
        }
        other => panic!("expected a drain timeout, got {other:?}"),
    }
    drop(guard);
    let mut buf = [0u8; 4];
    table.read(GuestAddress(0), &mut buf, None).unwrap();
    assert_eq!(&buf, b"keep");
    table.shrink(id, 4096, None).unwrap();
}

/// Whether some host mapping of this process covers `addr` (from /proc/self/maps).
fn host_mapped(addr: u64) -> bool {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter_map(|line| line.split_whitespace().next()?.split_once('-'))
        .any(|(start, end)| {
            let start = u64::from_str_radix(start, 16).unwrap();
            let end = u64::from_str_radix(end, 16).unwrap();
            (start..end).contains(&addr)
        })
}

/// A thread's cached snapshot may hold the last reference to a removed region
/// besides the table's. When the thread's next lookup drops that snapshot, the region is
/// not unmapped there (a lookup never makes a blocking system call); the table keeps
/// it, and the next writer unmaps it.
#[test]
fn removed_regions_are_unmapped_by_writers_not_by_lookups() {
    let (table, removed) = table_with_a_region();
    let kept = table
        .insert(RegionSpec::anonymous(GuestAddress(MIB), MIB), None)
        .unwrap();
    // On a thread of its own, so no cache of this thread references the region.
    let host = std::thread::scope(|s| {
        s.spawn(|| {
            table
                .try_lock_region(GuestAddress(0))
                .unwrap()
                .region()
                .host_addr()
        })
        .join()
        .unwrap()
    });
    let (cached_tx, cached_rx) = std::sync::mpsc::channel();
    let (remove_tx, remove_rx) = std::sync::mpsc::channel();
    let (reloaded_tx, reloaded_rx) = std::sync::mpsc::channel();
    let (exit_tx, exit_rx) = std::sync::mpsc::channel::<()>();
    let table = &table;
    std::thread::scope(|s| {
        s.spawn(move || {
            // Caches a snapshot holding both regions.
            drop(table.try_lock_region(GuestAddress(0)).unwrap());
            cached_tx.send(()).unwrap();
            remove_rx.recv_timeout(Duration::from_secs(10)).unwrap();
            // A new snapshot: the old one, the other reference to `removed`, goes.
            drop(table.try_lock_region(GuestAddress(MIB)).unwrap());
            reloaded_tx.send(()).unwrap();
            // Keeps the thread (and its cache) alive until the checks are done.
            let _ = exit_rx.recv_timeout(Duration::from_secs(10));
        });
        let wait = Duration::from_secs(10);
        cached_rx.recv_timeout(wait).unwrap();
        table.remove(removed, None).unwrap();
        assert_eq!(table.metrics().retired_regions, 1);
        remove_tx.send(()).unwrap();
        reloaded_rx.recv_timeout(wait).unwrap();
        assert!(host_mapped(host), "the lookup unmapped the removed region");
        // The next writer lets it go.
        table.shrink(kept, MIB / 2, None).unwrap();
        assert_eq!(table.metrics().retired_regions, 0);
        exit_tx.send(()).unwrap();
    });
}

/// A writer's own deadline bounds its wait for readers too, not only its wait for
/// the table lock: with the table's drain timeout far away, shrink and remove give up
/// at the caller's deadline.
#[test]
fn writer_deadline_bounds_the_drain() {
    let table = RegionTable::default();
    assert!(TableConfig::default().drain_timeout >= Duration::from_secs(5));
    let id = table
        .insert(RegionSpec::anonymous(GuestAddress(0), MIB), None)
        .unwrap();
    let guard = table.lock_region(GuestAddress(0), None).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            for (what, op) in [
                (
                    "shrink",
                    &(|d| table.shrink(id, 4096, d)) as &(dyn Fn(_) -> _ + Sync),
                ),
                ("remove", &|d| table.remove(id, d)),
            ] {
                let started = Instant::now();
                let result = op(Some(started + Duration::from_millis(100)));
                assert!(
                    matches!(result, Err(TableError::DrainTimeout { readers: 1, .. })),
                    "{what}: {result:?}"
                );
                assert!(
                    started.elapsed() < Duration::from_secs(3),
                    "{what} waited {:?}, past its deadline",
                    started.elapsed()
                );
            }
        });
    });
    drop(guard);
    assert_eq!(table.layout(), vec![(id, GuestAddress(0), MIB)]);
}

#[test]
fn slot_failure_on_remove_restores_the_region() {
    let slots = Arc::new(RecordingSlots::default());
    let table = table_with(slots.clone(), TableConfig::default());
    let id = table
        .insert(RegionSpec::anonymous(GuestAddress(0), MIB), None)
        .unwrap();
    table.write(GuestAddress(0), b"data", None).unwrap();
    *slots.fail.lock().unwrap() = true;
    assert!(matches!(table.remove(id, None), Err(TableError::Slot(_))));
    assert!(matches!(
        table.shrink(id, 4096, None),
        Err(TableError::Slot(_))
    ));
    *slots.fail.lock().unwrap() = false;
    let mut buf = [0u8; 4];
    table.read(GuestAddress(0), &mut buf, None).unwrap();
    assert_eq!(&buf, b"data");
    assert_eq!(table.layout()[0].2, MIB);
}

#[test]
fn fast_path_fails_while_writer_holds_region_and_two_tier_waits() {
    let table = RegionTable::default();
    let id = table.insert(grow_spec(0, 2 * MIB, 2 * MIB), None).unwrap();
    let reader = table.lock_region(GuestAddress(0), None).unwrap();
    std::thread::scope(|s| {
        let writer = s.spawn(|| table.shrink(id, MIB, None));
        // Wait until the writer has marked the region (a fast-path lookup fails).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match table.try_lock_region(GuestAddress(0)) {
                Err(LookupError::WriteLocked { region }) => {
                    assert_eq!(region, id);
                    break;
                }
                Ok(g) => drop(g),
                Err(e) => panic!("unexpected {e:?}"),
            }
            assert!(Instant::now() < deadline, "writer never marked the region");
            std::thread::yield_now();
        }
        assert_eq!(table.metrics().regions[0].readers, 1);
        drop(reader);
        // The two-tier lookup waits for the writer, then sees the new size.
        let g = s
            .spawn(|| table.lock_region(GuestAddress(0), None).map(|g| g.len()))
            .join()
            .unwrap();
        writer.join().unwrap().unwrap();
        assert_eq!(g.unwrap(), MIB);
    });
    assert!(matches!(
        table.lock_region(GuestAddress(MIB), None),
        Err(LookupError::NotMapped { addr }) if addr == MIB
    ));
    let m = table.metrics();
    assert!(m.fast_path_misses >= 1);
    assert!(m.writer_waits.count >= 1);
}

#[test]
fn two_tier_lookup_times_out_behind_a_stuck_writer() {
    let table = table_with(
        Arc::default(),
        TableConfig {
            drain_timeout: Duration::from_secs(2),
            ..TableConfig::default()
        },
    );
    let id = table
        .insert(RegionSpec::anonymous(GuestAddress(0), MIB), None)
        .unwrap();
    let reader = table.lock_region(GuestAddress(0), None).unwrap();
    std::thread::scope(|s| {
        let writer = s.spawn(|| table.remove(id, None));
        let deadline = Instant::now() + Duration::from_secs(10);
        while table.try_lock_region(GuestAddress(0)).is_ok() {
            assert!(Instant::now() < deadline);
            std::thread::yield_now();
        }
        let r = s
            .spawn(|| {
                table
                    .lock_region(
                        GuestAddress(0),
                        Some(Instant::now() + Duration::from_millis(20)),
                    )
                    .map(|_| ())
            })
            .join()
            .unwrap();
        assert_eq!(r, Err(LookupError::Timeout { addr: 0 }));
        drop(reader);
        writer.join().unwrap().unwrap();
    });
    assert!(matches!(
        table.lock_region(GuestAddress(0), None),
        Err(LookupError::NotMapped { .. })
    ));
}

#[test]
fn reader_saturation_is_a_typed_error() {
    let table = table_with(
        Arc::default(),
        TableConfig {
            reader_limit: 3,
            ..TableConfig::default()
        },
    );
    table
        .insert(RegionSpec::anonymous(GuestAddress(0), MIB), None)
        .unwrap();
    let guards: Vec<_> = (0..3)
        .map(|_| table.try_lock_region(GuestAddress(0)).unwrap())
        .collect();
    assert!(matches!(
        table.try_lock_region(GuestAddress(0)),
        Err(LookupError::Saturated { .. })
    ));
    drop(guards);
    assert!(table.lock_region(GuestAddress(0), None).is_ok());
}

#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "lock order violation: two-tier lookup called while holding [region")]
fn two_tier_lookup_while_holding_a_guard_panics() {
    let (table, _) = table_with_a_region();
    table
        .insert(RegionSpec::anonymous(GuestAddress(MIB), MIB), None)
        .unwrap();
    let _held = table.try_lock_region(GuestAddress(0)).unwrap();
    let _ = table.lock_region(GuestAddress(MIB), None);
}

#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "lock order violation: table lock (write) taken while holding region")]
fn writer_while_holding_a_guard_panics() {
    let (table, id) = table_with_a_region();
    let _held = table.try_lock_region(GuestAddress(0)).unwrap();
    let _ = table.remove(id, None);
}

#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "lock order violation: two-tier lookup called while holding [region")]
fn lookup_that_may_wait_while_holding_guarded_memory_panics() {
    let (table, _) = table_with_a_region();
    let _all = GuardedMemory::lock_all(&table, None).unwrap();
    let _ = table.lock_region(GuestAddress(0), None);
}

/// Guarded memory that holds nothing waits for writers on its first access, which
/// waits for writers that wait for a region the thread holds elsewhere: the checker
/// catches it even when no writer is active (the fast path would succeed).
#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "lock order violation: two-tier lookup called while holding [region")]
fn guarded_memory_while_holding_guarded_memory_panics() {
    let (table, _) = table_with_a_region();
    let _all = GuardedMemory::lock_all(&table, None).unwrap();
    let _ = GuardedMemory::new(&table, None).read_obj::<u8>(GuestAddress(0));
}

/// The same for guarded memory used while holding a region guard.
#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "lock order violation: two-tier lookup called while holding [region")]
fn guarded_memory_while_holding_a_guard_panics() {
    let (table, _) = table_with_a_region();
    let _held = table.try_lock_region(GuestAddress(0)).unwrap();
    let _ = GuardedMemory::lock_all(&table, None);
}

#[test]
fn held_locks_are_recorded_per_thread() {
    let (table, id) = table_with_a_region();
    let g = table.try_lock_region(GuestAddress(0)).unwrap();
    if memory::lockdep::ENABLED {
        assert_eq!(
            memory::lockdep::held_by_current_thread(),
            vec![memory::lockdep::HeldLock::RegionRead(id.0)]
        );
        assert!(memory::lockdep::held_by_all_threads()
            .iter()
            .any(|(_, held)| held.contains(&memory::lockdep::HeldLock::RegionRead(id.0))));
    }
    drop(g);
    assert!(memory::lockdep::held_by_current_thread().is_empty());
}

#[test]
fn metrics_count_paths_and_readers() {
    let (table, _) = table_with_a_region();
    for _ in 0..10 {
        drop(table.try_lock_region(GuestAddress(0)).unwrap());
    }
    // No region there: not mapped, and no slow-path hit.
    assert!(matches!(
        table.lock_region(GuestAddress(5 * MIB), None),
        Err(LookupError::NotMapped { .. })
    ));
    let m = table.metrics();
    assert_eq!(m.fast_path_hits, 10);
    assert_eq!(m.fast_path_misses, 1);
    assert_eq!(m.slow_path_lookups, 0);
    assert_eq!(m.regions.len(), 1);
    assert_eq!(m.regions[0].readers, 0);
    assert_eq!(m.regions[0].size, MIB);
}

#[test]
fn lookups_find_the_right_region_among_many() {
    // More regions than the linear-scan limit, so both search strategies run.
    for count in [3u64, 40] {
        let table = RegionTable::default();
        let ids: Vec<_> = (0..count)
            .map(|i| {
                table
                    .insert(RegionSpec::anonymous(GuestAddress(i * 2 * MIB), MIB), None)
                    .unwrap()
            })
            .collect();
        for (i, id) in ids.iter().enumerate() {
            let start = i as u64 * 2 * MIB;
            for addr in [start, start + MIB - 1] {
                assert_eq!(table.try_lock_region(GuestAddress(addr)).unwrap().id(), *id);
                assert_eq!(table.region_at(GuestAddress(addr)), Some(*id));
            }
            // The hole after each region.
            assert!(matches!(
                table.try_lock_region(GuestAddress(start + MIB)),
                Err(LookupError::NotMapped { .. })
            ));
        }
    }
}

/// Hundreds of regions (the snapshot keeps them in chunks of 64, split as they fill):
/// inserted out of order, some removed and inserted again, every address still finds
/// its own region, and a removed one none.
#[test]
fn lookups_stay_right_as_regions_come_and_go_by_the_hundred() {
    const COUNT: u64 = 300;
    let table = RegionTable::default();
    let start = |i: u64| GuestAddress(i * 2 * 4096);
    let insert = |i: u64| {
        table
            .insert(RegionSpec::anonymous(start(i), 4096), None)
            .unwrap()
    };
    // A fixed permutation of 0..COUNT (7 is prime to 300).
    let mut ids: Vec<_> = (0..COUNT).map(|_| None).collect();
    for k in 0..COUNT {
        let i = k * 7 % COUNT;
        ids[i as usize] = Some(insert(i));
    }
    let check = |ids: &[Option<memory::RegionId>]| {
        for (i, id) in ids.iter().enumerate() {
            let at = start(i as u64);
            match id {
                Some(id) => assert_eq!(table.try_lock_region(at).unwrap().id(), *id, "{at:?}"),
                None => assert!(matches!(
                    table.try_lock_region(at),
                    Err(LookupError::NotMapped { .. })
                )),
            }
            // Between regions: none.
            assert!(table.try_lock_region(GuestAddress(at.0 + 4096)).is_err());
        }
        assert_eq!(table.layout().len(), ids.iter().flatten().count());
    };
    check(&ids);
    for i in (0..COUNT).step_by(3) {
        table.remove(ids[i as usize].take().unwrap(), None).unwrap();
    }
    check(&ids);
    for i in (0..COUNT).step_by(6) {
        ids[i as usize] = Some(insert(i));
    }
    check(&ids);
}

/// The value of line `field` (e.g. `THPeligible:`) of the mapping holding `host_addr` in
/// this process's smaps (the kernel may have merged it with a neighbour).
fn smaps_field(host_addr: u64, field: &str) -> Option<String> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut in_mapping = false;
    for line in smaps.lines() {
        let range = line.split_once(' ').and_then(|(r, _)| r.split_once('-'));
        if let Some((start, end)) = range {
            if let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
            {
                in_mapping = (start..end).contains(&host_addr);
                continue;
            }
        }
        if in_mapping {
            if let Some(v) = line.strip_prefix(field) {
                return Some(v.trim().to_string());
            }
        }
    }
    None
}

fn thp_eligible(host_addr: u64) -> Option<bool> {
    smaps_field(host_addr, "THPeligible:").map(|v| v == "1")
}

/// Guest memory is left out of core dumps (`dd` among the mapping's flags): regions of
/// every backing, and hotplug areas.
#[test]
fn guest_memory_is_left_out_of_core_dumps() {
    let table = RegionTable::default();
    table
        .insert(RegionSpec::anonymous(GuestAddress(0), 2 * MIB), None)
        .unwrap();
    table
        .insert(
            RegionSpec {
                start: GuestAddress(4 * MIB),
                size: 2 * MIB,
                capacity: 2 * MIB,
                backing: Backing::Memfd,
            },
            None,
        )
        .unwrap();
    table
        .reserve_area(GuestAddress(1 << 30), 8 * MIB, None)
        .unwrap();
    let hosts: Vec<u64> = [0, 4 * MIB]
        .iter()
        .map(|a| {
            table
                .lock_region(GuestAddress(*a), None)
                .unwrap()
                .region()
                .host_addr()
        })
        .collect();
    for host in hosts {
        let flags = smaps_field(host, "VmFlags:").expect("the mapping is in smaps");
        assert!(
            flags.split_whitespace().any(|f| f == "dd"),
            "{host:#x}: {flags}"
        );
    }
    let id = table
        .insert(RegionSpec::anonymous(GuestAddress(1 << 30), 2 * MIB), None)
        .unwrap();
    let host = table
        .lock_region(GuestAddress(1 << 30), None)
        .unwrap()
        .region()
        .host_addr();
    let flags = smaps_field(host, "VmFlags:").expect("the area is in smaps");
    assert!(flags.split_whitespace().any(|f| f == "dd"), "area: {flags}");
    table.remove(id, None).unwrap();
}

#[test]
fn anonymous_regions_ask_for_huge_pages() {
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if thp.is_empty() || thp.contains("[never]") {
        eprintln!("SKIPPED: transparent huge pages are off on this host");
        assert!(
            std::env::var_os("KITE_NO_SKIPS").is_none(),
            "KITE_NO_SKIPS: THP is off"
        );
        return;
    }
    let table = RegionTable::default();
    let id = table
        .insert(RegionSpec::anonymous(GuestAddress(0), 8 * MIB), None)
        .unwrap();
    let host = table
        .lock_region(GuestAddress(0), None)
        .unwrap()
        .region()
        .host_addr();
    assert_eq!(table.region_at(GuestAddress(0)), Some(id));
    assert_eq!(
        thp_eligible(host),
        Some(true),
        "anonymous guest RAM is THP-eligible"
    );
}

/// A thread's lookup cache is thread-local and goes away while the thread exits;
/// lookups from later thread-exit code (another thread-local's destructor) still find
/// current regions, lock them and copy through them.
#[test]
fn lookups_work_while_a_thread_exits() {
    type Outcome = Result<Vec<u8>, String>;
    struct CopyOnExit(Arc<RegionTable>, std::sync::mpsc::Sender<Outcome>);
    impl Drop for CopyOnExit {
        fn drop(&mut self) {
            let table = &self.0;
            let mut back = vec![0u8; 4];
            // The fast path alone: a stale snapshot would not have the region.
            let outcome = table
                .try_lock_region(GuestAddress(2 * MIB + 8))
                .map(drop)
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    table
                        .write(GuestAddress(2 * MIB + 8), b"exit", None)
                        .and_then(|()| table.read(GuestAddress(2 * MIB + 8), &mut back, None))
                        .map(|()| back)
                        .map_err(|e| e.to_string())
                });
            let _ = self.1.send(outcome);
        }
    }
    std::thread_local!(static ON_EXIT: std::cell::RefCell<Option<CopyOnExit>> =
        const { std::cell::RefCell::new(None) });

    let table = Arc::new(RegionTable::default());
    table
        .insert(RegionSpec::anonymous(GuestAddress(0), MIB), None)
        .unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let (cached_tx, cached_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let thread_table = table.clone();
    let thread = std::thread::spawn(move || {
        // Registered before the lookup cache, so destroyed after it where destructors
        // run in reverse order of registration (glibc); elsewhere the destructor
        // still runs at exit, with the cache.
        ON_EXIT.with(|slot| *slot.borrow_mut() = Some(CopyOnExit(thread_table.clone(), done_tx)));
        // Fill the lookup cache with a snapshot that has no region at 2 MiB.
        drop(thread_table.try_lock_region(GuestAddress(0)).unwrap());
        cached_tx.send(()).unwrap();
        go_rx.recv().unwrap();
    });
    cached_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    table
        .insert(RegionSpec::anonymous(GuestAddress(2 * MIB), MIB), None)
        .unwrap();
    go_tx.send(()).unwrap();
    let outcome = done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the thread-exit copy reported");
    assert_eq!(outcome, Ok(b"exit".to_vec()));
    thread.join().unwrap();
    assert_eq!(
        table
            .metrics()
            .regions
            .iter()
            .map(|r| r.readers)
            .sum::<u64>(),
        0
    );
}
