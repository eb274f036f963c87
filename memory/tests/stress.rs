//! Stress: readers copy known patterns into and out of regions and verify them while a
//! writer adds, grows, shrinks and removes regions and a fault handler fills lazy
//! ones, under a deadlock watchdog.
//!
//! `KITE_STRESS_SECS` sets the duration (default 30 s).
//!
//! Verification: every slot of guest address space has a generation counter the writer
//! makes odd while it runs a change that can destroy contents (shrink, remove), and
//! even again after, like a sequence lock. A reader that writes a pattern and reads it
//! back with the same even generation before and after must get
//! the pattern exactly; with a change it may get the pattern, zeroes (the memory was
//! unplugged and plugged again) or a typed `NotMapped` error — never a mixture (torn)
//! or anything else (lost).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Watchdog;
use memory::{
    Backing, CopyError, FaultHandler, LazyPages, LazySource, LookupError, RegionId, RegionSpec,
    RegionTable, TableConfig,
};
use vm_memory::GuestAddress;

const SLOTS: usize = 6;
const SLOT_SPAN: u64 = 4 << 20;
const READERS: usize = 3;
const STRIPE: u64 = 16 << 10;
const STALL: Duration = Duration::from_secs(10);

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

/// Runs a contents-destroying writer operation with the slot's generation odd.
fn destructive<T>(generation: &AtomicU64, op: impl FnOnce() -> T) -> T {
    generation.fetch_add(1, Ordering::SeqCst);
    let result = op();
    generation.fetch_add(1, Ordering::SeqCst);
    result
}

#[derive(Default)]
struct Tally {
    verified: AtomicU64,
    verified_after_change: AtomicU64,
    typed_errors: AtomicU64,
    writer_ops: AtomicU64,
}

#[test]
fn readers_writer_and_fault_handler_under_watchdog() {
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
    let generations: Arc<Vec<AtomicU64>> =
        Arc::new((0..SLOTS).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let watchdog = Watchdog::start(STALL, |_| {});

    let mut threads = Vec::new();
    for r in 0..READERS {
        let (table, generations, stop, tally) = (
            table.clone(),
            generations.clone(),
            stop.clone(),
            tally.clone(),
        );
        let progress = watchdog.worker(&format!("reader-{r}"));
        threads.push(
            std::thread::Builder::new()
                .name(format!("reader-{r}"))
                .spawn(move || {
                    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (r as u64 + 1));
                    let mut pattern = vec![0u8; 3 * 4096];
                    let mut back = vec![0u8; pattern.len()];
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        // Each reader owns every READERS-th 16 KiB stripe of guest
                        // space, so readers never overwrite each other. Stripes start
                        // 8 KiB into a slot, so some span two slots (two regions).
                        let stripe = rng.below(SLOTS as u64 * SLOT_SPAN / STRIPE - 1) / READERS as u64
                            * READERS as u64
                            + r as u64;
                        let len = 1 + rng.below(pattern.len() as u64) as usize;
                        let off = rng.below(STRIPE - len as u64 + 1);
                        let addr = GuestAddress(STRIPE / 2 + stripe * STRIPE + off);
                        let slot = ((addr.0 / SLOT_SPAN) as usize).min(SLOTS - 1);
                        let last_slot = (((addr.0 + len as u64 - 1) / SLOT_SPAN) as usize).min(SLOTS - 1);
                        for (i, b) in pattern[..len].iter_mut().enumerate() {
                            *b = (n as u8) ^ (i as u8).rotate_left(3) ^ (r as u8 * 31) | 1;
                        }
                        let gens = |g: &Vec<AtomicU64>| -> Vec<u64> {
                            (slot..=last_slot).map(|s| g[s].load(Ordering::SeqCst)).collect()
                        };
                        let before = gens(&generations);
                        let wrote = table.write(addr, &pattern[..len], None);
                        let read = wrote.clone().and_then(|()| table.read(addr, &mut back[..len], None));
                        let after = gens(&generations);
                        match (wrote, read) {
                            (Ok(()), Ok(())) => {
                                if before == after && before.iter().all(|g| g % 2 == 0) {
                                    if let Some(i) = (0..len).find(|&i| back[i] != pattern[i]) {
                                        panic!(
                                            "lost or torn write at {:#x}+{len}: byte {i} is {:#x}, wrote {:#x}, \
                                             {} of {len} bytes differ, with no region change",
                                            addr.0, back[i], pattern[i],
                                            (0..len).filter(|&j| back[j] != pattern[j]).count()
                                        );
                                    }
                                    tally.verified.fetch_add(1, Ordering::Relaxed);
                                } else {
                                    // Per byte: the pattern or, where memory was unplugged
                                    // and plugged again, zero. Never anything else.
                                    for (i, (&got, &want)) in back[..len].iter().zip(&pattern[..len]).enumerate() {
                                        assert!(
                                            got == want || got == 0,
                                            "foreign byte {got:#x} at {:#x} (wanted {want:#x})",
                                            addr.0 + i as u64
                                        );
                                    }
                                    tally.verified_after_change.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            (Err(e), _) | (_, Err(e)) => {
                                assert!(
                                    matches!(
                                        e,
                                        CopyError::Lookup { source: LookupError::NotMapped { .. }, .. }
                                    ),
                                    "unexpected copy error {e:?}"
                                );
                                tally.typed_errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        progress.tick();
                    }
                    progress.finish();
                })
                .unwrap(),
        );
    }

    {
        let (table, generations, stop, tally) = (
            table.clone(),
            generations.clone(),
            stop.clone(),
            tally.clone(),
        );
        let progress = watchdog.worker("writer");
        let lazy_ok = handler.is_some();
        threads.push(
            std::thread::Builder::new()
                .name("writer".into())
                .spawn(move || {
                    let mut rng = Rng(0x1234_5678_9abc_def1);
                    let mut regions: Vec<Option<RegionId>> = vec![None; SLOTS];
                    let pages = SLOT_SPAN / 4096;
                    while !stop.load(Ordering::Relaxed) {
                        let slot = rng.below(SLOTS as u64) as usize;
                        let size_now = |table: &RegionTable| {
                            table
                                .layout()
                                .into_iter()
                                .find(|l| l.1 .0 == slot_base(slot))
                                .map(|l| l.2)
                        };
                        let result = match regions[slot] {
                            None => {
                                let backing = match std::env::var("KITE_STRESS_BACKING")
                                    .ok()
                                    .and_then(|b| b.parse().ok())
                                    .unwrap_or_else(|| rng.below(3))
                                {
                                    0 => Backing::Anonymous,
                                    1 => Backing::Memfd,
                                    _ if lazy_ok => Backing::Lazy(LazySource::Zero),
                                    _ => Backing::Anonymous,
                                };
                                let size = (1 + rng.below(pages)) * 4096;
                                table
                                    .insert(
                                        RegionSpec {
                                            start: GuestAddress(slot_base(slot)),
                                            size,
                                            capacity: SLOT_SPAN,
                                            backing,
                                        },
                                        None,
                                    )
                                    .map(|id| regions[slot] = Some(id))
                            }
                            Some(id) => {
                                let size = size_now(&table).unwrap();
                                match rng.below(4) {
                                    0 if size < SLOT_SPAN => {
                                        let to = size
                                            + (1 + rng.below((SLOT_SPAN - size) / 4096)) * 4096;
                                        table.grow(id, to, None)
                                    }
                                    1 if size > 4096 => {
                                        let to = (1 + rng.below(size / 4096 - 1)) * 4096;
                                        destructive(&generations[slot], || {
                                            table.shrink(id, to, None)
                                        })
                                    }
                                    2 => destructive(&generations[slot], || table.remove(id, None))
                                        .map(|()| regions[slot] = None),
                                    _ => Ok(()),
                                }
                            }
                        };
                        if let Err(e) = result {
                            panic!("writer operation failed: {e}");
                        }
                        tally.writer_ops.fetch_add(1, Ordering::Relaxed);
                        progress.tick();
                    }
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
    eprintln!(
        "stress {secs}s: verified {} (+{} across changes), typed errors {}, writer ops {}, \
         fast hits {}, fast misses {}, slow paths {}, writer wait p50 {} ns p99 {} ns, faults {:?}",
        tally.verified.load(Ordering::Relaxed),
        tally.verified_after_change.load(Ordering::Relaxed),
        tally.typed_errors.load(Ordering::Relaxed),
        tally.writer_ops.load(Ordering::Relaxed),
        m.fast_path_hits,
        m.fast_path_misses,
        m.slow_path_lookups,
        m.writer_waits.p50_ns,
        m.writer_waits.p99_ns,
        faults,
    );
    assert!(tally.verified.load(Ordering::Relaxed) > 100);
    assert!(tally.writer_ops.load(Ordering::Relaxed) > 100);
    assert!(
        m.slow_path_lookups > 0,
        "writers never pushed a reader to the slow path"
    );
}
