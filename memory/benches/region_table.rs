//! Region-table benchmarks, each with its baselines in the same run, and ratios.
//!
//! Criterion groups:
//! - `lookup`: find and pin the region of an address: Kite's fast path vs
//!   `GuestMemoryAtomic::memory()` + `find_region` vs the RwLock map's lookup.
//! - `read_scaling`: lookup + 64-byte read on 1 and 2 threads (each pinned to a CPU), in
//!   two cases: both threads reading the same region (`same`, the case per-region locks
//!   are about) and thread t reading the regions of parity t (`disjoint`); for Kite,
//!   `GuestMemoryAtomic`, the RwLock map, and a control (a copy from a thread-local
//!   buffer, no lookup or lock) showing how far the machine scales at all.
//! - `copy_64k`: a 64 KiB guest read and write: Kite's copy, vm-memory's
//!   `Bytes::read_slice`/`write_slice` through `GuestMemoryAtomic`'s memory, and a
//!   plain memcpy between the same kind of buffers.
//! - `two_tier_churn`: a lookup while a writer resizes region 0 (to half and back)
//!   without pause: Kite's two-tier lookup (writer: `shrink`/`grow`),
//!   `GuestMemoryAtomic` load + `find_region` (writer: `lock()` + `replace` of the map,
//!   as vm-memory hotplug does) and the RwLock map (writer: the write lock). Every
//!   writer does the same host-mapping work.
//! - `guarded_request`: what a device request pays: one 8-byte `read_obj` in one region
//!   through guarded memory kept from request to request (`release` + `retry`, as a
//!   device's worker does), with 8 regions and with 8 + 512 hotplugged 2 MiB regions, vs
//!   `GuestMemoryAtomic::memory()` + the same read over the same regions.
//!
//! Then, outside criterion: each design's writer resize latency (p50, p99) while two
//! readers copy flat out; the summary of ratios of criterion's estimates; and the key
//! ratios again, measured as paired ratios (alternating rounds, median), after a line
//! showing how much of region 0 huge pages back, for the table and for the baselines.
//!
//! Baselines: vm-memory's `GuestMemoryAtomic<GuestMemoryMmap>` (an `ArcSwap` of a
//! region collection) and a `parking_lot::RwLock` over a sorted map of regions (one
//! global lock, the design the table replaces). Both use the same memory as the table:
//! the regions of a second region table ([`HostMemory`]), which maps them as the table
//! maps its own (private anonymous, `MAP_NORESERVE`, `MADV_HUGEPAGE`, `MADV_DONTDUMP`)
//! and pre-touches them, with vm-memory regions built over that memory. Baselines that
//! resize memory resize only their own provider's, never the table's.
//!
//! Run: `cargo bench -p memory --bench region_table` (a short run: add
//! `-- --warm-up-time 0.3 --measurement-time 1` and `KITE_BENCH_WRITER_SECS=1`, the
//! writer-latency duration, 5 s by default). Criterion writes its estimates to
//! `CRITERION_HOME`, else `$CARGO_TARGET_DIR/criterion`, else `<target>/criterion` of
//! the bench executable, and the summary reads them from there (see [`criterion_home`]).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use criterion::{criterion_group, Criterion};
use memory::{GuardedMemory, RegionId, RegionSpec, RegionTable};
use parking_lot::RwLock;
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress, MmapRegion,
};

const MIB: u64 = 1 << 20;
const REGIONS: u64 = 8;
/// Each region is 16 MiB, regions 32 MiB apart (room to grow).
const REGION_SIZE: u64 = 16 * MIB;
const REGION_STRIDE: u64 = 32 * MIB;
/// Hotplugged blocks, each a region (1 GiB of 2 MiB blocks), after the regions.
const HOTPLUG_BLOCKS: u64 = 512;
const BLOCK_SIZE: u64 = 2 * MIB;
/// The mapping flags of the table's anonymous regions (`ANONYMOUS_MAPPING` in
/// memory/src/region.rs, private to the crate).
const ANONYMOUS_MAPPING: i32 = libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_PRIVATE;
const READ_WRITE: i32 = libc::PROT_READ | libc::PROT_WRITE;

type AtomicMemory = GuestMemoryAtomic<GuestMemoryMmap>;

fn region_start(i: u64) -> GuestAddress {
    GuestAddress(i * REGION_STRIDE)
}

/// Address number `i` of a walk over every region, a page apart.
fn addr_of(i: u64) -> GuestAddress {
    GuestAddress(region_start(i % REGIONS).0 + (i * 4096 + 64) % REGION_SIZE)
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

/// Hotplugs 512 blocks of 2 MiB, each a region, after the regions. No benchmark
/// accesses them (nor touches them first): they only make the memory map larger.
fn hotplug(table: &RegionTable) {
    let base = REGIONS * REGION_STRIDE;
    for i in 0..HOTPLUG_BLOCKS {
        let start = GuestAddress(base + i * BLOCK_SIZE);
        table
            .insert(RegionSpec::anonymous(start, BLOCK_SIZE), None)
            .unwrap();
    }
}

/// A region table's resize of region `id`: shrink below the current size, grow above.
fn kite_resize(table: &RegionTable, id: RegionId, to: u64) {
    if to < REGION_SIZE {
        table.shrink(id, to, None).unwrap();
    } else {
        table.grow(id, to, None).unwrap();
    }
}

/// vm-memory region of `size` bytes at guest `start`, over host memory at `host`.
///
/// # Safety
/// `[host, host + size)` lies inside a live mapping of a [`HostMemory`], made with
/// [`ANONYMOUS_MAPPING`], that outlives the region returned.
unsafe fn raw_region(host: *mut u8, start: GuestAddress, size: u64) -> GuestRegionMmap {
    // SAFETY: the caller promises the range lies in a live mapping that outlives the
    // region; prot and flags are the ones the mapping was made with.
    let mmap = unsafe { MmapRegion::build_raw(host, size as usize, READ_WRITE, ANONYMOUS_MAPPING) };
    GuestRegionMmap::new(mmap.unwrap(), start).unwrap()
}

/// The baselines' guest memory, mapped exactly as the table maps its regions: the
/// regions of a second table built by [`kite_table`] (same flags, same huge-page and
/// dump advice, pre-touched), used only as a provider of host memory. Nothing removes
/// or shrinks its regions through this table, so their mappings live as long as it.
struct HostMemory(RegionTable);

impl HostMemory {
    fn new() -> HostMemory {
        HostMemory(kite_table().0)
    }

    /// Host address of the region starting at `start`.
    fn host(&self, start: GuestAddress) -> *mut u8 {
        self.0.try_lock_region(start).unwrap().region().host_addr() as *mut u8
    }

    /// The provider's regions as one vm-memory map, each over its region's memory.
    /// The map must not outlive `self`.
    fn guest_memory(&self) -> GuestMemoryMmap {
        let regions = self.0.layout().into_iter().map(|(_, start, size)| {
            // SAFETY: the provider's region at `start` maps at least `size` bytes and
            // stays mapped while `self` lives, which outlives the map (callers keep it
            // in a `Baselines`, which drops its provider last).
            unsafe { raw_region(self.host(start), start, size) }
        });
        GuestMemoryMmap::from_regions(regions.collect()).unwrap()
    }
}

/// The global-lock baseline: region start -> (host pointer, size) under one RwLock.
struct LockedMap {
    map: RwLock<BTreeMap<u64, (usize, u64)>>,
}

impl LockedMap {
    /// Over the provider's memory, which must outlive it.
    fn new(host: &HostMemory) -> LockedMap {
        let map = host
            .0
            .layout()
            .into_iter()
            .map(|(_, start, size)| (start.0, (host.host(start) as usize, size)))
            .collect();
        LockedMap {
            map: RwLock::new(map),
        }
    }

    /// Looks `addr` up under the read lock and runs `f` on (host pointer, bytes left).
    fn with<R>(&self, addr: u64, f: impl FnOnce(usize, u64) -> R) -> Option<R> {
        let map = self.map.read();
        let (start, (host, size)) = map.range(..=addr).next_back()?;
        let off = addr - start;
        (off < *size).then(|| f(host + off as usize, size - off))
    }

    /// Copies guest memory at `addr` into `buf` under the read lock.
    fn read(&self, addr: u64, buf: &mut [u8]) {
        let copied = self.with(addr, |host, left| {
            assert!(buf.len() as u64 <= left);
            // SAFETY: `buf.len()` bytes from `host` lie inside the live part of a region
            // mapping, which no writer changes while the read lock is held.
            unsafe { std::ptr::copy_nonoverlapping(host as *const u8, buf.as_mut_ptr(), buf.len()) }
        });
        copied.unwrap();
    }

    /// Resizes region 0 under the write lock, with the host-mapping work the table does.
    fn resize(&self, to: u64) {
        let mut map = self.map.write();
        let entry = map.get_mut(&0).unwrap();
        resize_host(entry.0, to, entry.1);
        entry.1 = to;
    }
}

/// Both baselines, over memory of their own (never the table's).
struct Baselines {
    atomic: AtomicMemory,
    locked: LockedMap,
    /// Declared last, so dropped after every vm-memory region built over it.
    host: HostMemory,
}

impl Baselines {
    fn new() -> Baselines {
        let host = HostMemory::new();
        Baselines {
            atomic: GuestMemoryAtomic::new(host.guest_memory()),
            locked: LockedMap::new(&host),
            host,
        }
    }

    /// Hotplugs the same blocks as [`hotplug`] into the baselines' memory, and gives
    /// `GuestMemoryAtomic` the larger map.
    fn hotplug(&self) {
        hotplug(&self.host.0);
        let update = self.atomic.lock().unwrap();
        update.replace(self.host.guest_memory());
    }

    /// Resizes region 0 of `GuestMemoryAtomic`'s map as vm-memory hotplug does: under
    /// the update mutex, a new map with the region replaced, then `replace`. The host
    /// work is the table's: the tail is opened before the larger region is published,
    /// and discarded after the smaller one is (readers of an older map are not waited
    /// for: this design cannot; the benchmarks' readers stay below half of region 0).
    fn atomic_resize(&self, to: u64) {
        let start = region_start(0);
        let update = self.atomic.lock().unwrap();
        let old = self.atomic.memory();
        let region = old.find_region(start).unwrap();
        let (host, from) = (region.as_ptr(), region.len());
        if to > from {
            resize_host(host as usize, to, from);
        }
        let (rest, _) = old.remove_region(start, from).unwrap();
        // SAFETY: the same memory as the region replaced, of the provider's region 0,
        // whose capacity (twice REGION_SIZE) covers `to`; the map lives in `self.atomic`,
        // dropped before the provider.
        let resized = unsafe { raw_region(host, start, to) };
        update.replace(rest.insert_region(Arc::new(resized)).unwrap());
        if to < from {
            resize_host(host as usize, to, from);
        }
    }
}

/// What the table does to a region's host mapping on a resize, for the baselines:
/// protect and discard the tail on shrink, re-open it on grow.
fn resize_host(host: usize, to: u64, from: u64) {
    let ptr = |off: u64| (host + off as usize) as *mut libc::c_void;
    // SAFETY: the ranges lie inside a baseline provider's region mapping (of twice
    // REGION_SIZE), which no reader accesses beyond the current size.
    unsafe {
        if to < from {
            libc::mprotect(ptr(to), (from - to) as usize, libc::PROT_NONE);
            libc::madvise(ptr(to), (from - to) as usize, libc::MADV_DONTNEED);
        } else {
            libc::mprotect(ptr(from), (to - from) as usize, READ_WRITE);
        }
    }
}

/// Guarantee 1: fast path on a hit vs the baselines' lookup.
fn lookup(c: &mut Criterion) {
    let (table, _) = kite_table();
    let base = Baselines::new();
    let mut g = c.benchmark_group("lookup");
    let mut i = 0u64;
    g.bench_function("kite_fast_path", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let guard = table.try_lock_region(black_box(addr_of(i))).unwrap();
            black_box(guard.len());
        })
    });
    g.bench_function("guest_memory_atomic", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let mem = base.atomic.memory();
            black_box(mem.find_region(black_box(addr_of(i))).unwrap().len());
        })
    });
    g.bench_function("rwlock_map", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let left = base.locked.with(black_box(addr_of(i)).0, |_, left| left);
            black_box(left.unwrap());
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

/// Which regions the threads of a scaling run read.
#[derive(Clone, Copy)]
enum Sharing {
    /// Both threads read region 0 (a page apart per op, the same walk).
    Same,
    /// Thread `t` reads the regions of parity `t`.
    Disjoint,
}

impl Sharing {
    fn addr(self, thread: usize, i: u64) -> GuestAddress {
        match self {
            Sharing::Same => GuestAddress(region_start(0).0 + (i * 4096 + 64) % REGION_SIZE),
            Sharing::Disjoint => addr_of(i * 2 + thread as u64),
        }
    }
}

/// Who reads in a scaling run.
#[derive(Clone, Copy, PartialEq)]
enum Design {
    Kite,
    Atomic,
    RwLockMap,
    /// A copy from a thread-local buffer: no lookup, no lock.
    Control,
}

/// The scaling cases (the control reads no guest memory: one case).
const SCALING: [(Design, Sharing); 7] = [
    (Design::Kite, Sharing::Same),
    (Design::Kite, Sharing::Disjoint),
    (Design::Atomic, Sharing::Same),
    (Design::Atomic, Sharing::Disjoint),
    (Design::RwLockMap, Sharing::Same),
    (Design::RwLockMap, Sharing::Disjoint),
    (Design::Control, Sharing::Disjoint),
];

/// A scaling case's benchmark name, summary label and target.
fn scaling_case(design: Design, sharing: Sharing) -> (String, String, &'static str) {
    let (name, label, target) = match design {
        Design::Kite => ("kite", "kite", ">= 1.9"),
        Design::Atomic => ("guest_memory_atomic", "GuestMemoryAtomic", "-"),
        Design::RwLockMap => ("rwlock_map", "RwLock map", "-"),
        Design::Control => {
            let label = "control: no lookup, no lock";
            return ("control".into(), label.into(), "machine ceiling");
        }
    };
    let (case, regions) = match sharing {
        Sharing::Same => ("same", "same region"),
        Sharing::Disjoint => ("disjoint", "disjoint regions"),
    };
    (
        format!("{name}/{case}"),
        format!("{label}, {regions}"),
        target,
    )
}

/// One scaling op of `design`: look address `sharing.addr(thread, i)` up, read 64 bytes
/// there, unlock.
fn read_op<'a>(
    design: Design,
    sharing: Sharing,
    table: &'a RegionTable,
    base: &'a Baselines,
) -> Box<dyn Fn(usize, u64) + Sync + 'a> {
    match design {
        Design::Kite => Box::new(move |t, i| {
            let addr = sharing.addr(t, i);
            let guard = table.try_lock_region(addr).unwrap();
            let mut buf = [0u8; 64];
            let off = MemoryRegionAddress(RegionTable::offset_in(&guard, addr));
            guard.read_slice(&mut buf, off).unwrap();
            black_box(buf);
        }),
        Design::Atomic => Box::new(move |t, i| {
            let addr = sharing.addr(t, i);
            let mem = base.atomic.memory();
            let region = mem.find_region(addr).unwrap();
            let mut buf = [0u8; 64];
            let off = MemoryRegionAddress(addr.0 - region.start_addr().0);
            region.read_slice(&mut buf, off).unwrap();
            black_box(buf);
        }),
        Design::RwLockMap => Box::new(move |t, i| {
            let mut buf = [0u8; 64];
            base.locked.read(sharing.addr(t, i).0, &mut buf);
            black_box(buf);
        }),
        Design::Control => Box::new(|_, i| {
            thread_local!(static OWN: [u8; 4096 + 64] = const { [1; 4096 + 64] });
            let mut buf = [0u8; 64];
            OWN.with(|own| buf.copy_from_slice(&black_box(own)[4096..]));
            black_box((buf, i));
        }),
    }
}

/// Read scaling: lock, read 64 bytes, unlock, on 1 and 2 threads.
fn read_scaling(c: &mut Criterion) {
    let (table, _) = kite_table();
    let base = Baselines::new();
    let mut g = c.benchmark_group("read_scaling");
    for (design, sharing) in SCALING {
        let (name, _, _) = scaling_case(design, sharing);
        let op = read_op(design, sharing, &table, &base);
        for threads in [1usize, 2] {
            g.bench_function(format!("{name}/{threads}"), |b| {
                b.iter_custom(|iters| run_threads(threads, iters, &*op))
            });
        }
    }
    g.finish();
}

/// Bytes each copy benchmark moves.
const COPY_LEN: usize = 64 << 10;
/// Where in guest memory the copies go: 1 MiB into region 0.
const COPY_ADDR: GuestAddress = GuestAddress(MIB);

/// The copy benchmarks' buffers: the baselines' guest memory at [`COPY_ADDR`] (for
/// memcpy, the same host memory `GuestMemoryAtomic` copies to) and a host buffer at page
/// offset 2048. Placed like this the two never 4K-alias (aliasing slows a copy many
/// times over and would distort the comparison); the guest copies use the same host
/// buffer.
struct CopyBuffers<'a> {
    guest: *mut u8,
    host: Vec<u8>,
    host_offset: usize,
    _memory: PhantomData<&'a Baselines>,
}

impl<'a> CopyBuffers<'a> {
    fn new(base: &'a Baselines) -> CopyBuffers<'a> {
        let host = vec![7u8; COPY_LEN + 4096];
        let host_offset = (2048 + 4096 - host.as_ptr() as usize % 4096) % 4096;
        let region0 = base.host.host(region_start(0));
        CopyBuffers {
            guest: region0.wrapping_add(COPY_ADDR.0 as usize),
            host,
            host_offset,
            _memory: PhantomData,
        }
    }

    /// The host buffer's 64 KiB.
    fn host(&mut self) -> &mut [u8] {
        &mut self.host[self.host_offset..self.host_offset + COPY_LEN]
    }

    /// memcpy of the guest's 64 KiB into the host buffer.
    fn memcpy_read(&mut self) {
        let (guest, host) = (self.guest, self.host().as_mut_ptr());
        // SAFETY: `guest` is 64 KiB inside region 0 of the baselines' memory, mapped and
        // readable while the borrowed `Baselines` lives; `host` is the host buffer's 64
        // KiB, borrowed mutably; the two do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(guest, host, COPY_LEN) };
    }

    /// memcpy of the host buffer's 64 KiB into the guest.
    fn memcpy_write(&mut self) {
        let (guest, host) = (self.guest, self.host().as_ptr());
        // SAFETY: as in `memcpy_read`; the region is writable, and no reference to its
        // memory is live (vm-memory copies through raw pointers too).
        unsafe { std::ptr::copy_nonoverlapping(host, guest, COPY_LEN) };
    }
}

/// 64 KiB guest copy: Kite (two-tier lookup + copy), `GuestMemoryAtomic`, and plain
/// memcpy between the same kind of buffers.
fn copy_64k(c: &mut Criterion) {
    let (table, _) = kite_table();
    let base = Baselines::new();
    let mut bufs = CopyBuffers::new(&base);
    let mut g = c.benchmark_group("copy_64k");
    g.throughput(criterion::Throughput::Bytes(COPY_LEN as u64));
    g.bench_function("kite_read", |b| {
        b.iter(|| table.read(black_box(COPY_ADDR), bufs.host(), None).unwrap())
    });
    g.bench_function("guest_memory_atomic_read", |b| {
        b.iter(|| {
            let mem = base.atomic.memory();
            mem.read_slice(bufs.host(), black_box(COPY_ADDR)).unwrap()
        })
    });
    g.bench_function("memcpy_read", |b| b.iter(|| bufs.memcpy_read()));
    g.bench_function("kite_write", |b| {
        b.iter(|| {
            table
                .write(black_box(COPY_ADDR), bufs.host(), None)
                .unwrap()
        })
    });
    g.bench_function("guest_memory_atomic_write", |b| {
        b.iter(|| {
            let mem = base.atomic.memory();
            mem.write_slice(bufs.host(), black_box(COPY_ADDR)).unwrap()
        })
    });
    g.bench_function("memcpy_write", |b| b.iter(|| bufs.memcpy_write()));
    g.finish();
}

/// Runs `bench` while another thread resizes region 0 to half and back with `resize`,
/// without pause.
fn with_churn(resize: &(dyn Fn(u64) + Sync), bench: impl FnOnce()) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                resize(REGION_SIZE / 2);
                resize(REGION_SIZE);
            }
        });
        bench();
        stop.store(true, Ordering::Relaxed);
    });
}

/// Lookups while a writer resizes the same region without pause.
fn two_tier_churn(c: &mut Criterion) {
    let (table, ids) = kite_table();
    let base = Baselines::new();
    let mut g = c.benchmark_group("two_tier_churn");
    with_churn(&|to| kite_resize(&table, ids[0], to), || {
        g.bench_function("kite_two_tier", |b| {
            b.iter(|| {
                let guard = table
                    .lock_region(black_box(GuestAddress(4096)), None)
                    .unwrap();
                black_box(guard.len());
            })
        });
    });
    with_churn(&|to| base.atomic_resize(to), || {
        g.bench_function("guest_memory_atomic", |b| {
            b.iter(|| {
                let mem = base.atomic.memory();
                black_box(
                    mem.find_region(black_box(GuestAddress(4096)))
                        .unwrap()
                        .len(),
                );
            })
        });
    });
    with_churn(&|to| base.locked.resize(to), || {
        g.bench_function("rwlock_map", |b| {
            b.iter(|| black_box(base.locked.with(black_box(4096), |_, left| left).unwrap()))
        });
    });
    g.finish();
}

/// A device request's memory access: guarded memory holding nothing, one 8-byte read
/// (which locks the region it reaches), and the drop that releases it.
/// One request through guarded memory kept from request to request, as a device's
/// worker keeps it: release what the last request held, then read.
fn guarded_request(mem: &mut GuardedMemory<'_>, addr: GuestAddress) -> u64 {
    mem.release();
    mem.retry(|mem| mem.read_obj::<u64>(addr)).unwrap().unwrap()
}

/// What a device request pays for guest memory, with 8 and with 8 + 512 regions, vs
/// vm-memory's `GuestMemoryAtomic::memory()` + the same read. The reads walk the first
/// 8 regions in both cases, so only the size of the memory map changes.
fn guarded_request_group(c: &mut Criterion) {
    let (table, _) = kite_table();
    let base = Baselines::new();
    let mut g = c.benchmark_group("guarded_request");
    let mut i = 0u64;
    for regions in [REGIONS, REGIONS + HOTPLUG_BLOCKS] {
        if regions > REGIONS {
            hotplug(&table);
            base.hotplug();
        }
        g.bench_function(format!("kite_{regions}_regions"), |b| {
            let mut mem = GuardedMemory::new(&table, None);
            b.iter(|| {
                i = i.wrapping_add(1);
                black_box(guarded_request(&mut mem, black_box(addr_of(i))))
            })
        });
        g.bench_function(format!("guest_memory_atomic_{regions}_regions"), |b| {
            b.iter(|| {
                i = i.wrapping_add(1);
                let mem = base.atomic.memory();
                black_box(mem.read_obj::<u64>(black_box(addr_of(i))).unwrap())
            })
        });
    }
    g.finish();
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

/// A reader's copy of guest memory at an address into a buffer.
type ReadFn<'a> = &'a (dyn Fn(GuestAddress, &mut [u8]) + Sync);

/// A writer's latencies: `resize` region 0 to half and back for `duration` while 2
/// threads `read` 4 KiB from random regions flat out (below half of every region, so
/// region 0's shrink never takes what they read). Returns every resize's latency.
fn writer_samples(duration: Duration, read: ReadFn, resize: &dyn Fn(u64)) -> Vec<Duration> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let stop = &stop;
            s.spawn(move || {
                let mut buf = vec![0u8; 4096];
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    i = i.wrapping_add(7);
                    let offset = (i * 4096) % (REGION_SIZE / 2);
                    read(GuestAddress(region_start(i % REGIONS).0 + offset), &mut buf);
                    black_box(&buf);
                }
            });
        }
        let mut samples = Vec::new();
        let end = Instant::now() + duration;
        while Instant::now() < end {
            for to in [REGION_SIZE / 2, REGION_SIZE] {
                let t0 = Instant::now();
                resize(to);
                samples.push(t0.elapsed());
            }
        }
        stop.store(true, Ordering::Relaxed);
        samples
    })
}

/// Writer latency percentiles of Kite, the RwLock map and `GuestMemoryAtomic`, in that
/// order, measured in quarter-second rounds whose order rotates, so the machine's
/// drifts hit all alike.
fn writer_latency(duration: Duration) -> [Latency; 3] {
    let (table, ids) = kite_table();
    let base = Baselines::new();
    let round = Duration::from_millis(250);
    let rounds = (duration.as_millis() / round.as_millis()).max(1) as usize;
    let kite_read = |addr, buf: &mut [u8]| table.read(addr, buf, None).unwrap();
    let locked_read = |addr: GuestAddress, buf: &mut [u8]| base.locked.read(addr.0, buf);
    let atomic_read =
        |addr: GuestAddress, buf: &mut [u8]| base.atomic.memory().read_slice(buf, addr).unwrap();
    let designs: [(ReadFn, &dyn Fn(u64)); 3] = [
        (&kite_read, &|to| kite_resize(&table, ids[0], to)),
        (&locked_read, &|to| base.locked.resize(to)),
        (&atomic_read, &|to| base.atomic_resize(to)),
    ];
    let mut samples: [Vec<Duration>; 3] = Default::default();
    for r in 0..rounds {
        for k in 0..3 {
            let d = (r + k) % 3;
            let (read, resize) = designs[d];
            samples[d].extend(writer_samples(round, read, resize));
        }
    }
    samples.map(percentiles)
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

/// Transparent huge pages backing the mapping (VMA) that contains `addr`, in KiB, from
/// /proc/self/smaps.
fn huge_page_kib(addr: usize) -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split(' ').next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-') {
            if let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                inside = (lo..hi).contains(&addr);
                continue;
            }
        }
        if let Some(kib) = line.strip_prefix("AnonHugePages:").filter(|_| inside) {
            return kib.trim().trim_end_matches("kB").trim().parse().ok();
        }
    }
    None
}

/// The targets again, measured as paired ratios (see `paired`).
fn paired_ratios() {
    const ROUNDS: usize = 31;
    let (table, _) = kite_table();
    let base = Baselines::new();
    println!("\nregion table: paired ratios (median of {ROUNDS} alternating rounds)");
    let kite_region0 = table
        .try_lock_region(region_start(0))
        .unwrap()
        .region()
        .host_addr();
    let kib = |addr| huge_page_kib(addr).map_or("n/a".to_string(), |k| format!("{k} KiB"));
    println!(
        "  huge pages backing region 0's 16 MiB: kite {}, baselines {}",
        kib(kite_region0 as usize),
        kib(base.host.host(region_start(0)) as usize)
    );
    let lookup = paired(
        ROUNDS,
        || {
            timed(200_000, |i| {
                black_box(table.try_lock_region(black_box(addr_of(i))).unwrap().len());
            })
        },
        || {
            timed(200_000, |i| {
                let mem = base.atomic.memory();
                black_box(mem.find_region(black_box(addr_of(i))).unwrap().len());
            })
        },
    );
    ratio(
        "fast path / GuestMemoryAtomic load+find (time)",
        Some(lookup),
        "<= 1.0",
    );

    // Each batch runs long enough (tens of ms) that thread start-up skew is noise.
    for (design, sharing) in SCALING {
        let (_, label, target) = scaling_case(design, sharing);
        let op = read_op(design, sharing, &table, &base);
        let iters = if design == Design::Control {
            20_000_000
        } else {
            1_000_000
        };
        let scaling = 2.0
            * paired(
                ROUNDS,
                || run_threads(1, iters, &*op).as_secs_f64(),
                || run_threads(2, iters, &*op).as_secs_f64(),
            );
        ratio(
            &format!("read throughput 2 threads / 1 thread ({label})"),
            Some(scaling),
            target,
        );
    }

    let bufs = RefCell::new(CopyBuffers::new(&base));
    // Kite's copy, GuestMemoryAtomic's and memcpy, each of the host buffer's 64 KiB.
    let host = || std::cell::RefMut::map(bufs.borrow_mut(), |b| b.host());
    let kite_read = || table.read(COPY_ADDR, &mut host(), None).unwrap();
    let atomic_read = || base.atomic.memory().read_slice(&mut host(), COPY_ADDR);
    let memcpy_read = || bufs.borrow_mut().memcpy_read();
    let kite_write = || table.write(COPY_ADDR, &host(), None).unwrap();
    let atomic_write = || base.atomic.memory().write_slice(&host(), COPY_ADDR);
    let memcpy_write = || bufs.borrow_mut().memcpy_write();
    let batch = |f: &dyn Fn()| timed(2_000, |_| f());
    type CopyFn<'a> = &'a dyn Fn();
    let ops: [(&str, CopyFn, CopyFn, CopyFn); 2] = [
        ("read", &kite_read, &|| atomic_read().unwrap(), &memcpy_read),
        (
            "write",
            &kite_write,
            &|| atomic_write().unwrap(),
            &memcpy_write,
        ),
    ];
    for (op, kite, atomic, memcpy) in ops {
        // Bandwidth ratios: the inverse of the time ratios.
        let time = paired(ROUNDS, || batch(kite), || batch(memcpy));
        ratio(
            &format!("64 KiB guest {op} bandwidth / memcpy"),
            Some(1.0 / time),
            ">= 0.9",
        );
        let time = paired(ROUNDS, || batch(kite), || batch(atomic));
        let what = format!("64 KiB guest {op} bandwidth / GuestMemoryAtomic");
        ratio(&what, Some(1.0 / time), "-");
    }
}

/// Where criterion writes its estimates and [`time_ns`] reads them: `CRITERION_HOME` if
/// set; else `$CARGO_TARGET_DIR/criterion` if that is absolute (cargo runs benches in
/// the package directory, so a relative one cannot be resolved here); else
/// `<target>/criterion` for this executable at `<target>/<profile>/deps/<bench>`.
fn criterion_home() -> &'static Path {
    static HOME: OnceLock<PathBuf> = OnceLock::new();
    HOME.get_or_init(|| {
        if let Some(home) = std::env::var_os("CRITERION_HOME") {
            return home.into();
        }
        let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from);
        if let Some(target) = target.filter(|t| t.is_absolute()) {
            return target.join("criterion");
        }
        let exe = std::env::current_exe().ok();
        let target = exe.as_deref().and_then(|e| e.parent()?.parent()?.parent());
        target.map_or_else(|| "target/criterion".into(), |t| t.join("criterion"))
    })
}

fn criterion_config() -> Criterion {
    Criterion::default().output_directory(criterion_home())
}

criterion_group! {
    name = benches;
    config = criterion_config();
    targets = lookup, read_scaling, copy_64k, two_tier_churn, guarded_request_group
}

/// Time per iteration of a criterion benchmark, from its saved estimates
/// (criterion stores `group/name/1` as `group/name_1`).
fn time_ns(group: &str, bench: &str) -> Option<f64> {
    let path = criterion_home()
        .join(group)
        .join(bench.replace('/', "_"))
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
        Some(v) => println!("  {what:<76} {v:>7.3}   (target {target})"),
        None => println!("  {what:<76}     n/a   (not measured in this run)"),
    }
}

static RUN_STARTED: OnceLock<SystemTime> = OnceLock::new();

/// The ratios of criterion's estimates from this run.
fn summary() {
    let m = time_ns;
    let div = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
    println!(
        "\nregion table: ratios of criterion's estimates (same run, {})",
        criterion_home().display()
    );
    ratio(
        "fast path / GuestMemoryAtomic load+find (time)",
        div(
            m("lookup", "kite_fast_path"),
            m("lookup", "guest_memory_atomic"),
        ),
        "<= 1.0",
    );
    ratio(
        "fast path / RwLock map lookup (time)",
        div(m("lookup", "kite_fast_path"), m("lookup", "rwlock_map")),
        "-",
    );
    let request =
        |design: &str, regions: u64| m("guarded_request", &format!("{design}_{regions}_regions"));
    let all = REGIONS + HOTPLUG_BLOCKS;
    ratio(
        &format!("guarded request, {all} regions / {REGIONS} regions (time)"),
        div(request("kite", all), request("kite", REGIONS)),
        "about 1: must not grow with regions",
    );
    for regions in [REGIONS, all] {
        ratio(
            &format!("guarded request / GuestMemoryAtomic request, {regions} regions (time)"),
            div(
                request("kite", regions),
                request("guest_memory_atomic", regions),
            ),
            "-",
        );
    }
    // Per-op wall time t1 on 1 thread and t2 on 2 threads: throughput ratio 2*t1/t2.
    let scaling = |name: &str| {
        let t1 = m("read_scaling", &format!("{name}/1"))?;
        Some(2.0 * t1 / m("read_scaling", &format!("{name}/2"))?)
    };
    for (design, sharing) in SCALING {
        let (name, label, target) = scaling_case(design, sharing);
        ratio(
            &format!("read throughput 2 threads / 1 thread ({label})"),
            scaling(&name),
            target,
        );
    }
    for op in ["read", "write"] {
        let kite = m("copy_64k", &format!("kite_{op}"));
        ratio(
            &format!("64 KiB guest {op} bandwidth / memcpy"),
            div(m("copy_64k", &format!("memcpy_{op}")), kite),
            ">= 0.9",
        );
        ratio(
            &format!("64 KiB guest {op} bandwidth / GuestMemoryAtomic"),
            div(m("copy_64k", &format!("guest_memory_atomic_{op}")), kite),
            "-",
        );
    }
    let churn = |name| m("two_tier_churn", name);
    ratio(
        "two-tier lookup under writer churn / RwLock lookup (time)",
        div(churn("kite_two_tier"), churn("rwlock_map")),
        "-",
    );
    ratio(
        "two-tier lookup under writer churn / GuestMemoryAtomic load+find (time)",
        div(churn("kite_two_tier"), churn("guest_memory_atomic")),
        "-",
    );
}

fn main() {
    RUN_STARTED.get_or_init(SystemTime::now);
    benches();
    criterion_config().configure_from_args().final_summary();

    // criterion's --list / --test modes run nothing worth summarising.
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let secs = std::env::var("KITE_BENCH_WRITER_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let [kite, locked, atomic] = writer_latency(Duration::from_secs(secs));
    summary();
    println!("  writer resize latency, 2 readers copying flat out ({secs} s):");
    for (name, l) in [
        ("kite", &kite),
        ("RwLock map", &locked),
        ("GuestMemoryAtomic", &atomic),
    ] {
        println!(
            "    {name:<18} p50 {:>10?}  p99 {:>10?}  ({} ops)",
            l.p50, l.p99, l.ops
        );
    }
    let p99 = |l: &Latency| l.p99.as_secs_f64();
    ratio(
        "writer p99 / RwLock writer p99",
        Some(p99(&kite) / p99(&locked)),
        "<= 0.5, and p99 <= 1 ms",
    );
    ratio(
        "writer p99 / GuestMemoryAtomic writer p99 (which never waits for readers)",
        Some(p99(&kite) / p99(&atomic)),
        "-",
    );
    paired_ratios();
}
