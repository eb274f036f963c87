//! Region-table benchmarks, each with its baselines in the same run, and ratios.
//!
//! Baselines: vm-memory's `GuestMemoryAtomic<GuestMemoryMmap>` (an `ArcSwap` of a
//! region collection) and a `parking_lot::RwLock` over a sorted map of regions (one
//! global lock, the design the table replaces).
//!
//! Run: `cargo bench -p memory --bench region_table`. Criterion prints each
//! measurement; the summary at the end prints the ratios the design targets.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion};
use memory::{RegionId, RegionSpec, RegionTable};
use parking_lot::RwLock;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};

const MIB: u64 = 1 << 20;
const REGIONS: u64 = 8;
/// Each region is 16 MiB, regions 32 MiB apart (room to grow).
const REGION_SIZE: u64 = 16 * MIB;
const REGION_STRIDE: u64 = 32 * MIB;

fn region_start(i: u64) -> GuestAddress {
    GuestAddress(i * REGION_STRIDE)
}

fn kite_table() -> (RegionTable, Vec<RegionId>) {
    let table = RegionTable::default();
    let ids = (0..REGIONS)
        .map(|i| {
            table
                .insert(
                    RegionSpec {
                        start: region_start(i),
                        size: REGION_SIZE,
                        capacity: 2 * REGION_SIZE,
                        backing: memory::Backing::Anonymous,
                    },
                    None,
                )
                .unwrap()
        })
        .collect();
    // Touch everything so no benchmark measures first-touch page faults.
    for i in 0..REGIONS {
        table
            .write(region_start(i), &vec![1u8; REGION_SIZE as usize], None)
            .unwrap();
    }
    (table, ids)
}

fn atomic_memory() -> GuestMemoryAtomic<GuestMemoryMmap> {
    let ranges: Vec<_> = (0..REGIONS)
        .map(|i| (region_start(i), REGION_SIZE as usize))
        .collect();
    GuestMemoryAtomic::new(GuestMemoryMmap::from_ranges(&ranges).unwrap())
}

/// The global-lock baseline: region start -> (host pointer, size) under one RwLock.
struct LockedMap {
    map: RwLock<BTreeMap<u64, (usize, u64)>>,
    _memory: GuestMemoryMmap,
}

impl LockedMap {
    fn new() -> LockedMap {
        let memory = GuestMemoryMmap::from_ranges(
            &(0..REGIONS)
                .map(|i| (region_start(i), (2 * REGION_SIZE) as usize))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let map = memory
            .iter()
            .map(|r| (r.start_addr().0, (r.as_ptr() as usize, REGION_SIZE)))
            .collect();
        LockedMap {
            map: RwLock::new(map),
            _memory: memory,
        }
    }

    /// Looks `addr` up under the read lock and runs `f` on (host pointer, bytes left).
    fn with<R>(&self, addr: u64, f: impl FnOnce(usize, u64) -> R) -> Option<R> {
        let map = self.map.read();
        let (start, (host, size)) = map.range(..=addr).next_back()?;
        let off = addr - start;
        (off < *size).then(|| f(host + off as usize, size - off))
    }
}

fn addr_of(i: u64) -> GuestAddress {
    GuestAddress(region_start(i % REGIONS).0 + (i * 4096 + 64) % REGION_SIZE)
}

/// Guarantee 1: fast path on a hit vs the baselines' lookup.
fn lookup(c: &mut Criterion) {
    let (table, _) = kite_table();
    let atomic = atomic_memory();
    let locked = LockedMap::new();
    let mut g = c.benchmark_group("lookup");
    let mut i = 0u64;
    g.bench_function("kite_fast_path", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let guard = table.lock_fast(black_box(addr_of(i))).unwrap();
            black_box(guard.len());
        })
    });
    g.bench_function("guest_memory_atomic", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let mem = atomic.memory();
            black_box(mem.find_region(black_box(addr_of(i))).unwrap().len());
        })
    });
    g.bench_function("rwlock_map", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            black_box(
                locked
                    .with(black_box(addr_of(i)).0, |_, left| left)
                    .unwrap(),
            );
        })
    });
    g.finish();
}

/// Pins the calling thread to CPU `cpu`, so 1- and 2-thread runs are not skewed by
/// the scheduler moving threads between cores mid-measurement (on this nested host it
/// otherwise costs 2-thread runs up to ~15%). Best effort: an unpinned run is still a
/// valid, noisier measurement.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: `cpu_set_t` is plain data for which all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes inside `set`, and `cpu` is below CPU_SETSIZE here.
    unsafe { libc::CPU_SET(cpu % libc::CPU_SETSIZE as usize, &mut set) };
    // SAFETY: passes a valid set of the size given, for the calling thread (0).
    unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
}

/// Runs `op(thread, i)` `iters` times on each of `threads` threads, thread `t` pinned
/// to CPU `t`; returns the wall time of the slowest, so per-iteration time is wall time
/// per op per thread.
fn run_threads(threads: usize, iters: u64, op: &(dyn Fn(usize, u64) + Sync)) -> Duration {
    let barrier = Barrier::new(threads);
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                s.spawn(move || {
                    pin_to_cpu(t % cpus);
                    barrier.wait();
                    let start = Instant::now();
                    for i in 0..iters {
                        op(t, i);
                    }
                    start.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .max()
            .unwrap()
    })
}

/// Read scaling: lock, read 64 bytes, unlock, on 1 and 2 threads.
fn read_scaling(c: &mut Criterion) {
    let (table, _) = kite_table();
    let locked = LockedMap::new();
    let mut g = c.benchmark_group("read_scaling");
    for threads in [1usize, 2] {
        g.bench_function(format!("kite/{threads}"), |b| {
            b.iter_custom(|iters| {
                run_threads(threads, iters, &|t, i| {
                    let guard = table.lock_fast(addr_of(i * 2 + t as u64)).unwrap();
                    let mut buf = [0u8; 64];
                    let off = vm_memory::MemoryRegionAddress(4096);
                    vm_memory::Bytes::read_slice(&guard, &mut buf, off).unwrap();
                    black_box(buf);
                })
            })
        });
        // Control: the same 64-byte copy from the thread's own buffer, no lookup or
        // lock, showing how far this machine scales at all.
        g.bench_function(format!("control/{threads}"), |b| {
            b.iter_custom(|iters| {
                run_threads(threads, iters, &|_, i| {
                    thread_local!(static OWN: [u8; 4096 + 64] = const { [1; 4096 + 64] });
                    let mut buf = [0u8; 64];
                    OWN.with(|own| buf.copy_from_slice(&black_box(own)[4096..]));
                    black_box((buf, i));
                })
            })
        });
        g.bench_function(format!("rwlock_map/{threads}"), |b| {
            b.iter_custom(|iters| {
                run_threads(threads, iters, &|t, i| {
                    locked
                        .with(addr_of(i * 2 + t as u64).0, |host, _| {
                            let mut buf = [0u8; 64];
                            // SAFETY: `host` points at least 64 bytes into a live mapping.
                            unsafe {
                                std::ptr::copy_nonoverlapping(
                                    host as *const u8,
                                    buf.as_mut_ptr(),
                                    64,
                                )
                            };
                            black_box(buf);
                        })
                        .unwrap();
                })
            })
        });
    }
    g.finish();
}

/// Bytes each copy benchmark moves.
const COPY_LEN: usize = 64 << 10;

/// The memcpy baseline's buffers: 64 KiB at 1 MiB into a plain page-aligned mapping
/// (standing in for guest memory) and a host buffer at page offset 2048. Placed like
/// this the two never 4K-alias (aliasing slows a copy many times over and would
/// distort the comparison); the guest copies use the same host buffer.
struct CopyBuffers {
    plain: GuestMemoryMmap,
    host: Vec<u8>,
    host_offset: usize,
}

impl CopyBuffers {
    fn new() -> CopyBuffers {
        let host = vec![7u8; COPY_LEN + 4096];
        let host_offset = (2048 + 4096 - host.as_ptr() as usize % 4096) % 4096;
        let mut buffers = CopyBuffers {
            plain: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 * MIB as usize)]).unwrap(),
            host,
            host_offset,
        };
        buffers.split().0.fill(3);
        buffers
    }

    /// (the plain mapping's 64 KiB, the host buffer's 64 KiB)
    fn split(&mut self) -> (&mut [u8], &mut [u8]) {
        let base = self.plain.find_region(GuestAddress(0)).unwrap().as_ptr();
        // SAFETY: `plain` maps 2 MiB, so [1 MiB, 1 MiB + 64 KiB) lies inside; the slice
        // borrows `self` mutably, so nothing else uses the mapping while it lives.
        let plain = unsafe { std::slice::from_raw_parts_mut(base.add(MIB as usize), COPY_LEN) };
        let host_offset = self.host_offset;
        (plain, &mut self.host[host_offset..host_offset + COPY_LEN])
    }
}

/// 64 KiB guest copy (two-tier lookup + copy) vs plain memcpy between the same kind
/// of buffers (page-aligned mapping and host buffer).
fn copy_64k(c: &mut Criterion) {
    let (table, _) = kite_table();
    let mut buffers = CopyBuffers::new();
    let (plain_mem, host) = buffers.split();
    let mut g = c.benchmark_group("copy_64k");
    g.throughput(criterion::Throughput::Bytes(COPY_LEN as u64));
    g.bench_function("kite_read", |b| {
        b.iter(|| {
            table
                .read(black_box(GuestAddress(MIB)), host, None)
                .unwrap()
        })
    });
    g.bench_function("memcpy_read", |b| {
        b.iter(|| host.copy_from_slice(black_box(&*plain_mem)))
    });
    g.bench_function("kite_write", |b| {
        b.iter(|| {
            table
                .write(black_box(GuestAddress(MIB)), host, None)
                .unwrap()
        })
    });
    g.bench_function("memcpy_write", |b| {
        b.iter(|| plain_mem.copy_from_slice(black_box(&*host)))
    });
    g.finish();
}

/// Two-tier lookup while a writer resizes the same region without pause.
fn two_tier_churn(c: &mut Criterion) {
    let (table, ids) = kite_table();
    let locked = LockedMap::new();
    let stop = AtomicBool::new(false);
    let mut g = c.benchmark_group("two_tier_churn");
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                table.shrink(ids[0], REGION_SIZE / 2, None).unwrap();
                table.grow(ids[0], REGION_SIZE, None).unwrap();
            }
        });
        g.bench_function("kite_two_tier", |b| {
            b.iter(|| {
                let guard = table
                    .lock_region(black_box(GuestAddress(4096)), None)
                    .unwrap();
                black_box(guard.len());
            })
        });
        stop.store(true, Ordering::Relaxed);
    });
    stop.store(false, Ordering::Relaxed);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let mut map = locked.map.write();
                let entry = map.get_mut(&0).unwrap();
                resize_host(entry.0, REGION_SIZE / 2, REGION_SIZE);
                entry.1 = REGION_SIZE / 2;
                drop(map);
                let mut map = locked.map.write();
                let entry = map.get_mut(&0).unwrap();
                resize_host(entry.0, REGION_SIZE, REGION_SIZE / 2);
                entry.1 = REGION_SIZE;
            }
        });
        g.bench_function("rwlock_map", |b| {
            b.iter(|| black_box(locked.with(black_box(4096), |_, left| left).unwrap()))
        });
        stop.store(true, Ordering::Relaxed);
    });
    g.finish();
}

/// What a global-lock VMM does to the host mapping on a resize (the same work the
/// table does): discard and protect the tail on shrink, re-open it on grow.
fn resize_host(host: usize, to: u64, from: u64) {
    let ptr = |off: u64| (host + off as usize) as *mut libc::c_void;
    // SAFETY: the ranges lie inside the baseline's own mapping, which no reader
    // accesses beyond the current size.
    unsafe {
        if to < from {
            libc::madvise(ptr(to), (from - to) as usize, libc::MADV_DONTNEED);
            libc::mprotect(ptr(to), (from - to) as usize, libc::PROT_NONE);
        } else {
            libc::mprotect(
                ptr(from),
                (to - from) as usize,
                libc::PROT_READ | libc::PROT_WRITE,
            );
        }
    }
}

struct Latency {
    p50: Duration,
    p99: Duration,
    ops: usize,
}

fn percentiles(mut samples: Vec<Duration>) -> Latency {
    samples.sort_unstable();
    let pick = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    Latency {
        p50: pick(0.5),
        p99: pick(0.99),
        ops: samples.len(),
    }
}

/// Kite's writer: resize one region back and forth for `duration` while 2 threads
/// copy 4 KiB from random regions flat out. Returns every resize's latency.
fn kite_writer_samples(table: &RegionTable, id: RegionId, duration: Duration) -> Vec<Duration> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let stop = &stop;
            s.spawn(move || {
                let mut buf = vec![0u8; 4096];
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    i = i.wrapping_add(7);
                    // Region 0 shrinks to half: stay below that.
                    let addr =
                        GuestAddress(region_start(i % REGIONS).0 + (i * 4096) % (REGION_SIZE / 2));
                    table.read(addr, &mut buf, None).unwrap();
                    black_box(&buf);
                }
            });
        }
        let mut samples = Vec::new();
        let end = Instant::now() + duration;
        while Instant::now() < end {
            let t0 = Instant::now();
            table.shrink(id, REGION_SIZE / 2, None).unwrap();
            samples.push(t0.elapsed());
            let t0 = Instant::now();
            table.grow(id, REGION_SIZE, None).unwrap();
            samples.push(t0.elapsed());
        }
        stop.store(true, Ordering::Relaxed);
        samples
    })
}

/// The same with the global-lock baseline: the writer takes the write lock and does
/// the same host-mapping work.
fn rwlock_writer_samples(locked: &LockedMap, duration: Duration) -> Vec<Duration> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let stop = &stop;
            s.spawn(move || {
                let mut buf = vec![0u8; 4096];
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    i = i.wrapping_add(7);
                    let addr = region_start(i % REGIONS).0 + (i * 4096) % (REGION_SIZE / 2);
                    locked
                        .with(addr, |host, _| {
                            // SAFETY: 4 KiB inside the live part of the mapping.
                            unsafe {
                                std::ptr::copy_nonoverlapping(
                                    host as *const u8,
                                    buf.as_mut_ptr(),
                                    4096,
                                )
                            };
                        })
                        .unwrap();
                    black_box(&buf);
                }
            });
        }
        let mut samples = Vec::new();
        let end = Instant::now() + duration;
        while Instant::now() < end {
            for to in [REGION_SIZE / 2, REGION_SIZE] {
                let from = if to == REGION_SIZE {
                    REGION_SIZE / 2
                } else {
                    REGION_SIZE
                };
                let t0 = Instant::now();
                let mut map = locked.map.write();
                let entry = map.get_mut(&0).unwrap();
                resize_host(entry.0, to, from);
                entry.1 = to;
                drop(map);
                samples.push(t0.elapsed());
            }
        }
        stop.store(true, Ordering::Relaxed);
        samples
    })
}

/// Writer latency percentiles, Kite and the baseline measured in alternating
/// quarter-second rounds so the machine's drifts hit both alike.
fn writer_latency(duration: Duration) -> (Latency, Latency) {
    let (table, ids) = kite_table();
    let locked = LockedMap::new();
    let round = Duration::from_millis(250);
    let rounds = (duration.as_millis() / round.as_millis()).max(1);
    let (mut kite, mut baseline) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        if r % 2 == 0 {
            kite.extend(kite_writer_samples(&table, ids[0], round));
            baseline.extend(rwlock_writer_samples(&locked, round));
        } else {
            baseline.extend(rwlock_writer_samples(&locked, round));
            kite.extend(kite_writer_samples(&table, ids[0], round));
        }
    }
    (percentiles(kite), percentiles(baseline))
}

/// Median over `rounds` of `a() / b()`, where each returns the time of one batch and
/// the two alternate (a first in even rounds, b first in odd ones), so the slow drifts
/// of this shared machine hit both alike.
fn paired(rounds: usize, mut a: impl FnMut() -> f64, mut b: impl FnMut() -> f64) -> f64 {
    let mut ratios: Vec<f64> = (0..rounds)
        .map(|round| {
            if round % 2 == 0 {
                let ta = a();
                ta / b()
            } else {
                let tb = b();
                a() / tb
            }
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    ratios[ratios.len() / 2]
}

fn timed(iters: u64, mut f: impl FnMut(u64)) -> f64 {
    let start = Instant::now();
    for i in 0..iters {
        f(i);
    }
    start.elapsed().as_secs_f64()
}

/// The targets again, measured as paired ratios (see `paired`).
fn paired_ratios() {
    const ROUNDS: usize = 31;
    let (table, _) = kite_table();
    let atomic = atomic_memory();
    println!(
        "
region table: paired ratios (median of {ROUNDS} alternating rounds)"
    );
    let lookup = paired(
        ROUNDS,
        || {
            timed(200_000, |i| {
                black_box(table.lock_fast(black_box(addr_of(i))).unwrap().len());
            })
        },
        || {
            timed(200_000, |i| {
                black_box(
                    atomic
                        .memory()
                        .find_region(black_box(addr_of(i)))
                        .unwrap()
                        .len(),
                );
            })
        },
    );
    ratio(
        "fast path / GuestMemoryAtomic load+find (time)",
        Some(lookup),
        "<= 1.0",
    );

    let read64 = |t: usize, i: u64| {
        let guard = table.lock_fast(addr_of(i * 2 + t as u64)).unwrap();
        let mut buf = [0u8; 64];
        vm_memory::Bytes::read_slice(&guard, &mut buf, vm_memory::MemoryRegionAddress(4096))
            .unwrap();
        black_box(buf);
    };
    // Each batch runs long enough (tens of ms) that thread start-up skew is noise.
    let scaling = |iters: u64, op: &(dyn Fn(usize, u64) + Sync)| {
        2.0 * paired(
            ROUNDS,
            || run_threads(1, iters, op).as_secs_f64(),
            || run_threads(2, iters, op).as_secs_f64(),
        )
    };
    ratio(
        "read throughput 2 threads / 1 thread (kite)",
        Some(scaling(1_000_000, &read64)),
        ">= 1.9",
    );
    let control = |_: usize, i: u64| {
        thread_local!(static OWN: [u8; 4096 + 64] = const { [1; 4096 + 64] });
        let mut buf = [0u8; 64];
        OWN.with(|own| buf.copy_from_slice(&black_box(own)[4096..]));
        black_box((buf, i));
    };
    ratio(
        "read throughput 2 threads / 1 thread (control: no lookup, no lock)",
        Some(scaling(20_000_000, &control)),
        "machine ceiling",
    );

    let mut buffers = CopyBuffers::new();
    let (plain_mem, host) = buffers.split();
    let (plain_mem, host) = (
        std::cell::RefCell::new(plain_mem),
        std::cell::RefCell::new(host),
    );
    let read = paired(
        ROUNDS,
        || {
            timed(2_000, |_| {
                table
                    .read(GuestAddress(MIB), &mut host.borrow_mut(), None)
                    .unwrap()
            })
        },
        || {
            timed(2_000, |_| {
                host.borrow_mut().copy_from_slice(&plain_mem.borrow())
            })
        },
    );
    ratio(
        "64 KiB guest read bandwidth / memcpy",
        Some(1.0 / read),
        ">= 0.9",
    );
    let write = paired(
        ROUNDS,
        || {
            timed(2_000, |_| {
                table
                    .write(GuestAddress(MIB), &host.borrow(), None)
                    .unwrap()
            })
        },
        || {
            timed(2_000, |_| {
                plain_mem.borrow_mut().copy_from_slice(&host.borrow())
            })
        },
    );
    ratio(
        "64 KiB guest write bandwidth / memcpy",
        Some(1.0 / write),
        ">= 0.9",
    );
}

/// Hotplugged blocks, each a region (1 GiB of 2 MiB blocks).
const HOTPLUG_BLOCKS: u64 = 512;

/// What a device takes per batch of requests: a view of all guest memory, with 8 and
/// with 8 + 512 regions (1 GiB hotplugged), vs vm-memory's `GuestMemoryAtomic::memory()`.
fn memory_view(c: &mut Criterion) {
    let (table, _) = kite_table();
    let atomic = atomic_memory();
    let mut g = c.benchmark_group("memory_view");
    g.bench_function("kite_8_regions", |b| {
        b.iter(|| black_box(memory::GuardedMemory::lock_all(&table, None).unwrap()))
    });
    let hotplug_base = REGIONS * REGION_STRIDE;
    for i in 0..HOTPLUG_BLOCKS {
        table
            .insert(
                RegionSpec::anonymous(GuestAddress(hotplug_base + i * 2 * MIB), 2 * MIB),
                None,
            )
            .unwrap();
    }
    g.bench_function("kite_520_regions", |b| {
        b.iter(|| black_box(memory::GuardedMemory::lock_all(&table, None).unwrap()))
    });
    g.bench_function("guest_memory_atomic", |b| {
        b.iter(|| black_box(atomic.memory()))
    });
    g.finish();
}

criterion_group!(
    benches,
    lookup,
    read_scaling,
    copy_64k,
    two_tier_churn,
    memory_view
);

/// Time per iteration of a criterion benchmark, from its saved estimates
/// (criterion stores `group/name/1` as `group/name_1`).
fn time_ns(group: &str, bench: &str) -> Option<f64> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/criterion")
        .join(group)
        .join(bench)
        .join("new/estimates.json");
    // Only estimates this run wrote: a filtered run leaves older files behind.
    let written = std::fs::metadata(&path).ok()?.modified().ok()?;
    if written < *RUN_STARTED.get()? {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    // The slope is what criterion reports as "time" for linear sampling; fall back
    // to the mean for flat sampling.
    json["slope"]["point_estimate"]
        .as_f64()
        .or_else(|| json["mean"]["point_estimate"].as_f64())
}

fn ratio(what: &str, value: Option<f64>, target: &str) {
    match value {
        Some(v) => println!("  {what:<58} {v:>7.3}   (target {target})"),
        None => println!("  {what:<58}     n/a   (not measured in this run)"),
    }
}

static RUN_STARTED: std::sync::OnceLock<std::time::SystemTime> = std::sync::OnceLock::new();

fn main() {
    RUN_STARTED.get_or_init(std::time::SystemTime::now);
    benches();
    Criterion::default().configure_from_args().final_summary();

    // criterion's --list / --test modes run nothing worth summarising.
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let secs = std::env::var("KITE_BENCH_WRITER_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let (kite, baseline) = writer_latency(Duration::from_secs(secs));
    let m = |g: &str, b: &str| time_ns(g, b);
    let div = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
    println!("\nregion table: ratios of criterion's estimates (same run)");
    ratio(
        "fast path / GuestMemoryAtomic load+find (time)",
        div(
            m("lookup", "kite_fast_path"),
            m("lookup", "guest_memory_atomic"),
        ),
        "<= 1.0",
    );
    ratio(
        "memory view, 8 regions / GuestMemoryAtomic::memory (time)",
        div(
            m("memory_view", "kite_8_regions"),
            m("memory_view", "guest_memory_atomic"),
        ),
        "-",
    );
    ratio(
        "memory view, 520 regions / 8 regions (time)",
        div(
            m("memory_view", "kite_520_regions"),
            m("memory_view", "kite_8_regions"),
        ),
        "-",
    );
    ratio(
        "fast path / RwLock map lookup (time)",
        div(m("lookup", "kite_fast_path"), m("lookup", "rwlock_map")),
        "-",
    );
    // Per-op wall time t1 on 1 thread and t2 on 2 threads: throughput ratio 2*t1/t2.
    let scaling = |name: &str| {
        let (t1, t2) = (
            m("read_scaling", &format!("{name}_1"))?,
            m("read_scaling", &format!("{name}_2"))?,
        );
        Some(2.0 * t1 / t2)
    };
    ratio(
        "read throughput 2 threads / 1 thread (kite)",
        scaling("kite"),
        ">= 1.9",
    );
    ratio(
        "read throughput 2 threads / 1 thread (RwLock map)",
        scaling("rwlock_map"),
        "-",
    );
    ratio(
        "read throughput 2 threads / 1 thread (control: no lookup, no lock)",
        scaling("control"),
        "machine ceiling",
    );
    ratio(
        "64 KiB guest read bandwidth / memcpy",
        div(m("copy_64k", "memcpy_read"), m("copy_64k", "kite_read")),
        ">= 0.9",
    );
    ratio(
        "64 KiB guest write bandwidth / memcpy",
        div(m("copy_64k", "memcpy_write"), m("copy_64k", "kite_write")),
        ">= 0.9",
    );
    ratio(
        "two-tier lookup under writer churn / RwLock lookup (time)",
        div(
            m("two_tier_churn", "kite_two_tier"),
            m("two_tier_churn", "rwlock_map"),
        ),
        "-",
    );
    println!(
        "  writer resize latency, 2 readers flat out ({secs} s): kite p50 {:?} p99 {:?} ({} ops); \
         RwLock p50 {:?} p99 {:?} ({} ops)",
        kite.p50, kite.p99, kite.ops, baseline.p50, baseline.p99, baseline.ops
    );
    ratio(
        "writer p99 / RwLock writer p99",
        Some(kite.p99.as_secs_f64() / baseline.p99.as_secs_f64()),
        "<= 0.5, and p99 <= 1 ms",
    );
    paired_ratios();
}
