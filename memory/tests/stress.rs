//! Stress: readers write known patterns into regions and check them later, while two
//! writers add, grow, shrink and remove regions (some inside a reserved area, some
//! filled lazily from zeroes or from a file by the fault handler), under a deadlock
//! watchdog.
//!
//! `KITE_STRESS_SECS` sets the duration (default 30 s).
//!
//! Verification tells a lost write from memory legitimately taken away. A write is made
//! under a region guard, which records the region's id and its shrink count (stable
//! while the guard is held). Checked later under another guard:
//! - same region, same shrink count: the region kept all its memory, so the pattern
//!   must read back exactly;
//! - same region, shrunk since: the writers log every shrink (the size, by shrink count)
//!   before they make it, so the lowest cut since the write is known: the pattern must
//!   read back below it and zeros above it (memory plugged again reads as zeros);
//! - another region at the address (removed, inserted again): none of the pattern may
//!   be there — only what a new region holds (zeros, or its file's bytes);
//! - no region: the memory was removed, nothing to check.
//!
//! Device-style requests write and read back across two regions under guarded memory
//! (held for the whole request): the pattern must read back exactly.

mod common;

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Watchdog;
use memory::{
    Backing, FaultHandler, GuardedMemory, LazyPages, LazySource, LookupError, RegionGuard,
    RegionId, RegionSpec, RegionTable, TableConfig,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryRegion, MemoryRegionAddress};

const SLOTS: usize = 8;
const SLOT_SPAN: u64 = 4 << 20;
/// Slots inside one reserved area: regions there reuse the area's pages.
const AREA_SLOTS: std::ops::Range<usize> = 6..8;
const READERS: usize = 3;
const WRITERS: usize = 2;
const STRIPE: u64 = 16 << 10;
/// Writes each reader keeps unchecked, so writers get to act between write and check.
const PENDING: usize = 8;
const PAGE: u64 = 4096;
const STALL: Duration = Duration::from_secs(10);
/// Lookups give up after this (a hang is the watchdog's to report, never the test's).
const LOOKUP_DEADLINE: Duration = Duration::from_secs(60);

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn slot_base(slot: usize) -> u64 {
    slot as u64 * SLOT_SPAN
}

/// The lazy file's byte at `offset`: even and never zero, so neither a pattern byte
/// (odd) nor zero.
fn file_byte(offset: u64) -> u8 {
    2 | ((offset >> 4) as u8 & 0xfc)
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed as u8) ^ ((i as u8).rotate_left(3)) ^ ((seed >> 8) as u8) | 1)
        .collect()
}

/// Shrinks the writers made, per slot: (region, its shrink count after it, new size).
type ShrinkLog = Vec<Mutex<Vec<(RegionId, u64, u64)>>>;

/// The lowest size `region` was shrunk to by shrinks numbered `after + 1 ..= upto`.
fn lowest_cut(log: &ShrinkLog, slot: usize, region: RegionId, after: u64, upto: u64) -> u64 {
    log[slot]
        .lock()
        .unwrap()
        .iter()
        .filter(|&&(id, count, _)| id == region && count > after && count <= upto)
        .map(|&(_, _, size)| size)
        .min()
        .unwrap_or_else(|| panic!("{region}: shrinks {after}..{upto} were not logged"))
}

/// A write made under a guard, to be checked later.
struct Written {
    addr: u64,
    len: usize,
    region: RegionId,
    shrinks: u64,
    seed: u64,
}

#[derive(Default)]
struct Tally {
    exact: AtomicU64,
    after_shrink: AtomicU64,
    replaced: AtomicU64,
    removed: AtomicU64,
    requests: AtomicU64,
    writer_ops: AtomicU64,
}

fn lock(table: &RegionTable, addr: u64) -> Option<RegionGuard<'_>> {
    match table.lock_region(GuestAddress(addr), Some(Instant::now() + LOOKUP_DEADLINE)) {
        Ok(guard) => Some(guard),
        Err(LookupError::NotMapped { .. }) => None,
        Err(e) => panic!("lookup of {addr:#x}: {e}"),
    }
}

/// Writes a pattern at `addr` (as much of `len` as its region holds) under a guard.
fn write(table: &RegionTable, addr: u64, len: usize, seed: u64) -> Option<Written> {
    let guard = lock(table, addr)?;
    let len = len.min(guard.remaining_from(GuestAddress(addr))? as usize);
    let offset = MemoryRegionAddress(RegionTable::offset_in(&guard, GuestAddress(addr)));
    guard
        .get_slice(offset, len)
        .unwrap()
        .copy_from(&pattern(seed, len));
    Some(Written {
        addr,
        len,
        region: guard.id(),
        shrinks: guard.region().shrinks(),
        seed,
    })
}

/// Checks a write made earlier (see the module documentation).
fn check(table: &RegionTable, log: &ShrinkLog, w: &Written, tally: &Tally) {
    let Some(guard) = lock(table, w.addr) else {
        tally.removed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let region = guard.region();
    let slot = (region.start().0 / SLOT_SPAN) as usize;
    let at = RegionTable::offset_in(&guard, GuestAddress(w.addr));
    let len = w
        .len
        .min(guard.remaining_from(GuestAddress(w.addr)).unwrap() as usize);
    let mut back = vec![0u8; len];
    guard
        .get_slice(MemoryRegionAddress(at), len)
        .unwrap()
        .copy_to(&mut back);
    let want = pattern(w.seed, w.len);
    let place = |i: usize| {
        format!(
            "{:#x} ({}, offset {:#x})",
            w.addr + i as u64,
            guard.id(),
            at + i as u64
        )
    };
    if guard.id() != w.region {
        // A new region: what it starts with, never the old one's bytes.
        let file = match region.backing() {
            Backing::Lazy(LazySource::File { offset, .. }) => Some(*offset),
            _ => None,
        };
        for (i, &got) in back.iter().enumerate() {
            let fresh = match file {
                // Its file's byte, or zero where memory was plugged again.
                Some(base) => got == file_byte(base + at + i as u64) || got == 0,
                None => got == 0,
            };
            assert!(
                fresh,
                "stale byte {got:#x} at {} of a region inserted after the write (wrote {:#x} into {})",
                place(i),
                want[i],
                w.region
            );
        }
        tally.replaced.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let shrinks = region.shrinks();
    let cut = if shrinks == w.shrinks {
        u64::MAX
    } else {
        lowest_cut(log, slot, w.region, w.shrinks, shrinks)
    };
    for (i, &got) in back.iter().enumerate() {
        let offset = at + i as u64;
        let expected = if offset < cut { want[i] } else { 0 };
        assert_eq!(
            got,
            expected,
            "{} at {}: {} (shrinks {} then {}, lowest cut {cut:#x})",
            if offset < cut {
                "LOST WRITE"
            } else {
                "re-plugged memory is not zero"
            },
            place(i),
            if offset < cut {
                "the pattern is gone"
            } else {
                "old bytes came back"
            },
            w.shrinks,
            shrinks,
        );
    }
    if cut == u64::MAX {
        tally.exact.fetch_add(1, Ordering::Relaxed);
    } else {
        tally.after_shrink.fetch_add(1, Ordering::Relaxed);
    }
}

/// A device-style request: write and read back across two slots under guarded memory.
fn request(table: &RegionTable, addr: u64, len: usize, seed: u64, tally: &Tally) {
    let want = pattern(seed, len);
    let mut mem = GuardedMemory::new(table, Some(Instant::now() + LOOKUP_DEADLINE));
    let back = mem
        .retry(|mem| {
            mem.write_slice(&want, GuestAddress(addr)).ok()?;
            let mut back = vec![0u8; len];
            mem.read_slice(&mut back, GuestAddress(addr)).ok()?;
            Some(back)
        })
        .unwrap_or_else(|e| panic!("request at {addr:#x}: {e}"));
    if let Some(back) = back {
        assert!(
            back == want,
            "LOST WRITE in a request at {addr:#x}+{len:#x}"
        );
        tally.requests.fetch_add(1, Ordering::Relaxed);
    }
}

fn reader(
    r: usize,
    table: &RegionTable,
    log: &ShrinkLog,
    tally: &Tally,
    stop: &AtomicBool,
    tick: impl Fn(),
) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (r as u64 + 1));
    let mut pending: std::collections::VecDeque<Written> = Default::default();
    let stripes = SLOTS as u64 * SLOT_SPAN / STRIPE - 1;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        // Each reader owns every READERS-th 16 KiB stripe of guest space, so readers
        // never overwrite each other. Stripes start 8 KiB into a slot, so some span two
        // slots (two regions).
        let stripe = rng.below(stripes) / READERS as u64 * READERS as u64 + r as u64;
        let base = STRIPE / 2 + stripe * STRIPE;
        if pending.len() == PENDING
            || pending
                .iter()
                .any(|w| w.addr + w.len as u64 > base && w.addr < base + STRIPE)
        {
            if let Some(w) = pending.pop_front() {
                check(table, log, &w, tally);
            }
            continue;
        }
        let seed = n << 8 | r as u64;
        if rng.below(4) == 0 {
            // Across the stripe's middle, which is a slot boundary for some stripes.
            let len = 1 + rng.below(STRIPE / 2) as usize;
            let addr = base + STRIPE / 2 - rng.below(len as u64).min(STRIPE / 2);
            request(table, addr, len, seed, tally);
        } else {
            let len = 1 + rng.below(3 * PAGE) as usize;
            let addr = base + rng.below(STRIPE - len as u64 + 1);
            // A write that crosses its region's end is cut there.
            if let Some(w) = write(table, addr, len, seed) {
                pending.push_back(w);
            }
        }
        tick();
    }
    for w in pending {
        check(table, log, &w, tally);
    }
}

fn backing(rng: &mut Rng, slot: usize, sources: &Sources) -> Backing {
    let lazy = sources.lazy;
    let in_area = AREA_SLOTS.contains(&slot);
    match rng.below(4) {
        0 => Backing::Anonymous,
        1 if !in_area => Backing::Memfd,
        2 if lazy => Backing::Lazy(LazySource::Zero),
        3 if lazy => Backing::Lazy(LazySource::File {
            file: Arc::clone(&sources.file),
            offset: slot_base(slot),
        }),
        _ => Backing::Anonymous,
    }
}

/// What writers insert: lazy regions (if the fault handler runs), from zeroes or `file`.
struct Sources {
    lazy: bool,
    file: Arc<File>,
}

fn writer(
    w: usize,
    table: &RegionTable,
    log: &ShrinkLog,
    sources: &Sources,
    tally: &Tally,
    stop: &AtomicBool,
    tick: impl Fn(),
) {
    let mut rng = Rng(0x1234_5678_9abc_def1 ^ w as u64);
    // This writer's slots: every WRITERS-th.
    let mine: Vec<usize> = (w..SLOTS).step_by(WRITERS).collect();
    let mut regions: Vec<Option<RegionId>> = vec![None; SLOTS];
    let pages = SLOT_SPAN / PAGE;
    while !stop.load(Ordering::Relaxed) {
        let slot = mine[rng.below(mine.len() as u64) as usize];
        let result = match regions[slot] {
            None => {
                let spec = RegionSpec {
                    start: GuestAddress(slot_base(slot)),
                    size: (1 + rng.below(pages)) * PAGE,
                    capacity: SLOT_SPAN,
                    backing: backing(&mut rng, slot, sources),
                };
                table.insert(spec, None).map(|id| regions[slot] = Some(id))
            }
            Some(id) => {
                let (size, shrinks) = {
                    let guard = lock(table, slot_base(slot)).expect("this writer's region");
                    (guard.region().size(), guard.region().shrinks())
                };
                // Mostly resizes, a removal now and then: regions live long enough
                // for writes to be checked in place, across shrinks and after them.
                match rng.below(16) {
                    0..=5 if size < SLOT_SPAN => table.grow(
                        id,
                        size + (1 + rng.below((SLOT_SPAN - size) / PAGE)) * PAGE,
                        None,
                    ),
                    6..=11 if size > PAGE => {
                        // Half the time a small cut off the end, else anywhere.
                        let pages = size / PAGE - 1;
                        let cut = if rng.below(2) == 0 {
                            1 + rng.below(pages.min(16))
                        } else {
                            1 + rng.below(pages)
                        };
                        let to = size - cut * PAGE;
                        // Logged first: a reader may see the shrink before it returns.
                        log[slot].lock().unwrap().push((id, shrinks + 1, to));
                        table.shrink(id, to, None)
                    }
                    12 => table.remove(id, None).map(|()| {
                        regions[slot] = None;
                    }),
                    _ => Ok(()),
                }
            }
        };
        if let Err(e) = result {
            panic!("writer operation failed: {e}");
        }
        tally.writer_ops.fetch_add(1, Ordering::Relaxed);
        tick();
    }
}

#[test]
fn readers_writers_and_fault_handler_under_watchdog() {
    let secs: u64 = std::env::var("KITE_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let handler = match FaultHandler::start() {
        Ok(h) => Some(h),
        Err(e) => {
            eprintln!("lazy regions SKIPPED: no userfaultfd here: {e}");
            assert!(
                std::env::var_os("KITE_NO_SKIPS").is_none(),
                "CI must have userfaultfd"
            );
            None
        }
    };
    let table = Arc::new(RegionTable::new(
        Arc::new(memory::NoSlots),
        handler.clone().map(|h| h as Arc<dyn LazyPages>),
        TableConfig {
            drain_timeout: Duration::from_secs(30),
            ..TableConfig::default()
        },
    ));
    table
        .reserve_area(
            GuestAddress(slot_base(AREA_SLOTS.start)),
            AREA_SLOTS.len() as u64 * SLOT_SPAN,
            None,
        )
        .unwrap();
    let file = {
        let mut f = common::host::scratch_file("stress");
        let bytes: Vec<u8> = (0..SLOTS as u64 * SLOT_SPAN).map(file_byte).collect();
        std::io::Write::write_all(&mut f, &bytes).unwrap();
        Arc::new(f)
    };
    let log: Arc<ShrinkLog> = Arc::new((0..SLOTS).map(|_| Mutex::default()).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let watchdog = Watchdog::start(STALL, |_| {});

    let mut threads = Vec::new();
    for r in 0..READERS {
        let (table, log, stop, tally) = (table.clone(), log.clone(), stop.clone(), tally.clone());
        let progress = watchdog.worker(&format!("reader-{r}"));
        threads.push(
            std::thread::Builder::new()
                .name(format!("reader-{r}"))
                .spawn(move || {
                    reader(r, &table, &log, &tally, &stop, || progress.tick());
                    progress.finish();
                })
                .unwrap(),
        );
    }
    for w in 0..WRITERS {
        let (table, log, stop, tally) = (table.clone(), log.clone(), stop.clone(), tally.clone());
        let sources = Sources {
            lazy: handler.is_some(),
            file: file.clone(),
        };
        let progress = watchdog.worker(&format!("writer-{w}"));
        threads.push(
            std::thread::Builder::new()
                .name(format!("writer-{w}"))
                .spawn(move || {
                    writer(w, &table, &log, &sources, &tally, &stop, || progress.tick());
                    progress.finish();
                })
                .unwrap(),
        );
    }

    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline && !watchdog.fired() && !threads.iter().any(|t| t.is_finished())
    {
        std::thread::park_timeout(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    // The threads must stop too: one stuck (say, on a fault nobody resolves) fails the test
    // rather than hanging it.
    let stop_deadline = Instant::now() + Duration::from_secs(30);
    while !threads.iter().all(|t| t.is_finished()) {
        assert!(
            Instant::now() < stop_deadline,
            "stress threads did not stop within 30 s of the end: {:?}",
            threads
                .iter()
                .filter(|t| !t.is_finished())
                .map(|t| t.thread().name().unwrap_or("?").to_string())
                .collect::<Vec<_>>()
        );
        std::thread::park_timeout(Duration::from_millis(50));
    }
    let report = watchdog.finish();
    if let Some(report) = report {
        panic!("stress stalled:\n{report}");
    }
    for t in threads {
        t.join().expect("a stress thread failed");
    }
    let m = table.metrics();
    let faults = handler.map(|h| h.stats());
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    eprintln!(
        "stress {secs}s: writes checked exactly {}, after a shrink {}, in a new region {}, \
         removed {}; requests {}; writer ops {}; fast hits {}, fast misses {}, slow paths {}, \
         writer wait p50 {} ns p99 {} ns; faults {:?}",
        get(&tally.exact),
        get(&tally.after_shrink),
        get(&tally.replaced),
        get(&tally.removed),
        get(&tally.requests),
        get(&tally.writer_ops),
        m.fast_path_hits,
        m.fast_path_misses,
        m.slow_path_lookups,
        m.writer_waits.p50_ns,
        m.writer_waits.p99_ns,
        faults,
    );
    assert!(get(&tally.exact) > 100);
    assert!(
        get(&tally.after_shrink) > 0,
        "no write was checked across a shrink"
    );
    assert!(
        get(&tally.replaced) > 0,
        "no write was checked in a new region"
    );
    assert!(get(&tally.requests) > 100);
    assert!(get(&tally.writer_ops) > 100);
    assert!(
        m.slow_path_lookups > 0,
        "writers never pushed a reader to the slow path"
    );
}
