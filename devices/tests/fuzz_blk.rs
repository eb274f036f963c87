//! Fuzzing the virtio-blk request path (a stable-Rust harness in the spirit of cargo-fuzz):
//! random descriptor tables, available rings and request headers, biased towards values
//! near the edges (addresses at and beyond the end of guest memory, lengths around and far
//! above the buffers, every flag combination, next indices in and out of the queue, sectors
//! near and beyond the disk's end, corrupt available indices). After every kick the device
//! must either complete what was made available or flag DEVICE_NEEDS_RESET, within a
//! deadline; the VMM must not panic and the disk file must not grow.
//!
//! `KITE_FUZZ_SECS` bounds the run (default 15 s, as in CI); `KITE_FUZZ_SEED` replays one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::virtio::block::Block;
use devices::virtio::device_thread::ThreadContext;
use memory::GuardedMemory;
use vm_memory::{Bytes, GuestAddress};

mod common;
use common::Rig;

const MEMORY: u64 = 4 << 20;
const QSIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const BUFFERS: u64 = 0x10_0000;
const DISK_SECTORS: u64 = 64;
const KICK_DEADLINE: Duration = Duration::from_secs(5);

/// xorshift64*: small, deterministic per seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<T: Copy, const N: usize>(&mut self, items: [T; N]) -> T {
        items[self.below(N as u64) as usize]
    }
}

impl Rig {
    fn set_up_fuzzed(&mut self, mem: &GuardedMemory<'_>) {
        mem.write_slice(&[0u8; 0x3000], GuestAddress(DESC)).unwrap();
        self.write(0x70, 0);
        self.write(0x70, 3);
        self.write(0x24, 1);
        self.write(0x20, 1);
        self.write(0x70, 11);
        self.write(0x38, u32::from(QSIZE));
        for (reg, addr) in [(0x80, DESC), (0x90, AVAIL), (0xa0, USED)] {
            self.write(reg, addr as u32);
            self.write(reg + 4, 0);
        }
        self.write(0x44, 1);
        self.write(0x70, 15);
        assert!(!self.needs_reset(), "a valid setup works");
    }
}

fn edge_addr(rng: &mut Rng) -> u64 {
    let items = [
        BUFFERS + rng.below(0x1_0000),
        MEMORY - rng.below(0x1000) - 1,
        MEMORY + rng.below(0x1000),
        u64::MAX - rng.below(0x1000),
        rng.next(),
        0,
    ];
    rng.pick(items)
}

fn edge_len(rng: &mut Rng) -> u32 {
    let items = [
        rng.below(32) as u32,
        16,
        1,
        512,
        rng.below(0x1_0000) as u32,
        u32::MAX - rng.below(16) as u32,
        rng.next() as u32,
    ];
    rng.pick(items)
}

#[test]
fn random_requests_never_hang_panic_or_grow_the_disk() {
    let secs: u64 = std::env::var("KITE_FUZZ_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let seed: u64 = std::env::var("KITE_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("fuzz: seed {seed} (KITE_FUZZ_SEED={seed} replays), {secs} s");
    let mut rng = Rng(seed);

    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0x33u8; (DISK_SECTORS * 512) as usize]).unwrap();
    let device = Block::new(&disk, false, "vda", &ThreadContext::default()).unwrap();
    let mut rig = common::rig(Box::new(device), MEMORY);
    let table = Arc::clone(&rig.table);
    let mem = GuardedMemory::lock_all(&table, None).unwrap();

    let deadline = Instant::now() + Duration::from_secs(secs);
    let (mut kicks, mut resets, mut completed) = (0u64, 0u64, 0u64);
    while Instant::now() < deadline {
        rig.set_up_fuzzed(&mem);
        let mut avail_idx = 0u16;
        let mut used_seen = 0u16;
        for _ in 0..8 {
            // Descriptors.
            for i in 0..QSIZE {
                let next = if rng.below(4) == 0 {
                    rng.below(u64::from(u16::MAX)) as u16
                } else {
                    rng.below(u64::from(QSIZE)) as u16
                };
                let mut raw = [0u8; 16];
                raw[..8].copy_from_slice(&edge_addr(&mut rng).to_le_bytes());
                raw[8..12].copy_from_slice(&edge_len(&mut rng).to_le_bytes());
                raw[12..14].copy_from_slice(&(rng.below(8) as u16).to_le_bytes());
                raw[14..].copy_from_slice(&next.to_le_bytes());
                mem.write_slice(&raw, GuestAddress(DESC + 16 * u64::from(i)))
                    .unwrap();
            }
            // Request headers and data in the buffer area.
            for h in 0..16u64 {
                let kinds = [0u32, 1, 4, 8, 11, rng.next() as u32];
                let kind = rng.pick(kinds);
                let sectors = [
                    rng.below(DISK_SECTORS),
                    DISK_SECTORS - 1,
                    DISK_SECTORS,
                    u64::MAX - rng.below(4),
                    rng.next(),
                ];
                let sector = rng.pick(sectors);
                let mut header = [0u8; 16];
                header[..4].copy_from_slice(&kind.to_le_bytes());
                header[8..].copy_from_slice(&sector.to_le_bytes());
                mem.write_slice(&header, GuestAddress(BUFFERS + h * 0x1000))
                    .unwrap();
            }
            // Available entries, sometimes a corrupt index.
            let entries = 1 + rng.below(4) as u16;
            for _ in 0..entries {
                let head = rng.below(u64::from(QSIZE) + 2) as u16;
                let slot = AVAIL + 4 + 2 * u64::from(avail_idx % QSIZE);
                mem.write_obj(head, GuestAddress(slot)).unwrap();
                avail_idx = avail_idx.wrapping_add(1);
            }
            let published = if rng.below(16) == 0 {
                avail_idx.wrapping_add(rng.below(1000) as u16 + QSIZE)
            } else {
                avail_idx
            };
            mem.write_obj(published, GuestAddress(AVAIL + 2)).unwrap();
            rig.write(0x50, 0);
            kicks += 1;
            // Completion of everything made available, or a reset flag.
            let kick_deadline = Instant::now() + KICK_DEADLINE;
            loop {
                let used: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
                if used == avail_idx {
                    completed += u64::from(used.wrapping_sub(used_seen));
                    used_seen = used;
                    break;
                }
                if rig.needs_reset() {
                    break;
                }
                assert!(
                    Instant::now() < kick_deadline,
                    "seed {seed}: the device neither completed nor asked for a reset"
                );
                std::thread::yield_now();
            }
            if rig.needs_reset() {
                resets += 1;
                break;
            }
        }
        assert_eq!(
            std::fs::metadata(&disk).unwrap().len(),
            DISK_SECTORS * 512,
            "seed {seed}: the disk file grew"
        );
    }
    eprintln!("fuzz: {kicks} kicks, {completed} requests completed, {resets} resets");
    assert!(
        completed > 0 && kicks > 100,
        "the harness exercised the device"
    );
}
