//! virtio-mmio devices driven the way a guest driver drives them, over guest memory built in
//! the test: register writes for setup, rings laid out by virtio-queue's mock, requests
//! served on the device thread. Includes a hostile driver: descriptor loops, addresses
//! outside guest memory, huge lengths, bad queue sizes, a corrupt available index.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use devices::virtio::block::Block;
use devices::virtio::device_thread::ThreadContext;
use devices::virtio::mem::{Mem, MemBacking, MemControl};
use devices::virtio::rng::Rng;
use memory::{GuardedMemory, RegionSpec};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

mod common;
use common::{
    desc, header, slow_device, SlowRig, DEADLINE, DRIVER_OK, FEATURES_OK, NEEDS_RESET,
    STATUS_ACK_DRIVER,
};

const MIB: u64 = 1 << 20;
const MEMORY: u64 = 16 * MIB;
/// Where request buffers go (the rings are at 0).
const BUFFERS: u64 = MIB;

fn disk(dir: &Path, sectors: u64) -> std::path::PathBuf {
    let path = dir.join("disk.img");
    std::fs::write(&path, vec![0u8; (sectors * 512) as usize]).unwrap();
    path
}

/// A three-descriptor block request at descriptor `first`: header, data (`len` bytes,
/// device-writable for reads), status. Buffers at BUFFERS + `slot` * 64 KiB.
fn block_request(
    mem: &GuardedMemory<'_>,
    first: u16,
    slot: u64,
    kind: u32,
    sector: u64,
    len: u32,
) -> ([RawDescriptor; 3], u64, u64) {
    let base = BUFFERS + slot * 0x1_0000;
    let (hdr, data, status) = (base, base + 0x100, base + 0x100 + u64::from(len));
    mem.write_slice(&header(kind, sector), GuestAddress(hdr))
        .unwrap();
    mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
    let data_flags = if kind == VIRTIO_BLK_T_OUT {
        VRING_DESC_F_NEXT
    } else {
        VRING_DESC_F_NEXT | VRING_DESC_F_WRITE
    };
    (
        [
            desc(hdr, 16, VRING_DESC_F_NEXT, first + 1),
            desc(data, len, data_flags, first + 2),
            desc(status, 1, VRING_DESC_F_WRITE, 0),
        ],
        data,
        status,
    )
}

fn status_at(mem: &GuardedMemory<'_>, addr: u64) -> u32 {
    u32::from(mem.read_obj::<u8>(GuestAddress(addr)).unwrap())
}

#[test]
fn transport_identifies_the_device_and_refuses_unoffered_features() {
    let dir = tempfile::tempdir().unwrap();
    let device = Block::new(
        &disk(dir.path(), 8),
        false,
        "vda",
        &ThreadContext::default(),
    )
    .unwrap();
    let mut r = common::rig(Box::new(device), MEMORY);
    assert_eq!(r.read(0x0), 0x7472_6976);
    assert_eq!(r.read(0x4), 2);
    assert_eq!(r.read(0x8), 2, "block device id");
    // Config space: capacity in sectors.
    assert_eq!(r.read(0x100), 8);
    r.write(0x70, STATUS_ACK_DRIVER);
    r.write(0x24, 0);
    r.write(0x20, 1 << 3); // a feature the device does not offer
    r.write(0x70, STATUS_ACK_DRIVER | FEATURES_OK);
    assert_eq!(r.read(0x70) & FEATURES_OK, 0);
    // DRIVER_OK without FEATURES_OK does not start the device.
    r.write(0x70, STATUS_ACK_DRIVER | DRIVER_OK);
    assert_eq!(r.read(0x70) & DRIVER_OK, 0);
    // Out-of-range queue selection reads as absent.
    r.write(0x30, 7);
    assert_eq!(r.read(0x34), 0);
}

#[test]
fn block_writes_reads_flushes_and_identifies() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), 64);
    let mut r = common::rig(
        Box::new(Block::new(&path, false, "vda", &ThreadContext::default()).unwrap()),
        MEMORY,
    );
    let table = Arc::clone(&r.table);
    let mem = GuardedMemory::lock_all(&table, None).unwrap();
    let mock = MockSplitQueue::new(&mem, 16);
    r.set_up(&mock, 16);

    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let (descs, data, status) = block_request(&mem, 0, 0, VIRTIO_BLK_T_OUT, 2, 1024);
    mem.write_slice(&pattern, GuestAddress(data)).unwrap();
    mock.add_desc_chains(&descs, 0).unwrap();
    r.kick_and_wait(&mock, 1);
    assert_eq!(status_at(&mem, status), VIRTIO_BLK_S_OK);
    let file = std::fs::read(&path).unwrap();
    assert_eq!(&file[1024..2048], &pattern[..], "the bytes are on the disk");

    let (descs, data, status) = block_request(&mem, 3, 1, VIRTIO_BLK_T_IN, 2, 1024);
    mock.add_desc_chains(&descs, 3).unwrap();
    r.kick_and_wait(&mock, 2);
    assert_eq!(status_at(&mem, status), VIRTIO_BLK_S_OK);
    let mut back = vec![0u8; 1024];
    mem.read_slice(&mut back, GuestAddress(data)).unwrap();
    assert_eq!(back, pattern);

    let (descs, _, status) = block_request(&mem, 6, 2, VIRTIO_BLK_T_FLUSH, 0, 0);
    // A flush has no data descriptor: header, then status.
    mock.add_desc_chains(&[descs[0], desc(status, 1, VRING_DESC_F_WRITE, 0)], 6)
        .unwrap();
    r.kick_and_wait(&mock, 3);
    assert_eq!(status_at(&mem, status), VIRTIO_BLK_S_OK);

    let (descs, data, status) = block_request(&mem, 8, 3, VIRTIO_BLK_T_GET_ID, 0, 20);
    mock.add_desc_chains(&descs, 8).unwrap();
    r.kick_and_wait(&mock, 4);
    assert_eq!(status_at(&mem, status), VIRTIO_BLK_S_OK);
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(data)).unwrap();
    assert_eq!(&id[..3], b"vda");

    let (descs, _, status) = block_request(&mem, 11, 4, 99, 0, 512);
    mock.add_desc_chains(&descs, 11).unwrap();
    r.kick_and_wait(&mock, 5);
    assert_eq!(status_at(&mem, status), VIRTIO_BLK_S_UNSUPP);
}

#[test]
fn read_only_disk_refuses_writes_and_reads_beyond_the_end_fail() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), 8);
    let mut r = common::rig(
        Box::new(Block::new(&path, true, "vdb", &ThreadContext::default()).unwrap()),
        MEMORY,
    );
    assert_ne!(r.read(0x10) & (1 << 5), 0, "VIRTIO_BLK_F_RO offered");
    let table = Arc::clone(&r.table);
    let mem = GuardedMemory::lock_all(&table, None).unwrap();
    let mock = MockSplitQueue::new(&mem, 16);
    r.set_up(&mock, 16);
    let (descs, data, status) = block_request(&mem, 0, 0, VIRTIO_BLK_T_OUT, 0, 512);
    mem.write_slice(&[0xaa; 512], GuestAddress(data)).unwrap();
    mock.add_desc_chains(&descs, 0).unwrap();
    r.kick_and_wait(&mock, 1);
    assert_eq!(status_at(&mem, status), VIRTIO_BLK_S_IOERR);
    assert!(std::fs::read(&path).unwrap().iter().all(|b| *b == 0));

    // Sector 7 + 1024 bytes ends past the 8-sector disk; sector u64::MAX overflows.
    for (i, sector) in [7u64, u64::MAX].into_iter().enumerate() {
        let first = 3 + 3 * i as u16;
        let (descs, _, status) =
            block_request(&mem, first, 1 + i as u64, VIRTIO_BLK_T_IN, sector, 1024);
        mock.add_desc_chains(&descs, first).unwrap();
        r.kick_and_wait(&mock, 2 + i as u16);
        assert_eq!(status_at(&mem, status), VIRTIO_BLK_S_IOERR);
    }
}

/// After each malformed chain the device still serves a valid read.
#[test]
fn hostile_chains_fail_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), 64);
    std::fs::write(&path, vec![0x5a; 64 * 512]).unwrap();
    let mut r = common::rig(
        Box::new(Block::new(&path, false, "vda", &ThreadContext::default()).unwrap()),
        MEMORY,
    );
    let table = Arc::clone(&r.table);
    let mem = GuardedMemory::lock_all(&table, None).unwrap();
    let mock = MockSplitQueue::new(&mem, 64);
    r.set_up(&mock, 64);
    let base = BUFFERS + 0x10_0000;
    mem.write_slice(&header(VIRTIO_BLK_T_IN, 0), GuestAddress(base))
        .unwrap();
    let hostile: Vec<Vec<RawDescriptor>> = vec![
        // A loop: 0 -> 1 -> 0 -> ...
        vec![
            desc(base, 16, VRING_DESC_F_NEXT, 1),
            desc(base + 0x100, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 0),
        ],
        // A data buffer outside guest memory.
        vec![
            desc(base, 16, VRING_DESC_F_NEXT, 1),
            desc(64 << 30, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2),
            desc(base + 0x800, 1, VRING_DESC_F_WRITE, 0),
        ],
        // A 4 GiB length.
        vec![
            desc(base, 16, VRING_DESC_F_NEXT, 1),
            desc(
                base + 0x100,
                u32::MAX,
                VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
                2,
            ),
            desc(base + 0x800, 1, VRING_DESC_F_WRITE, 0),
        ],
        // Wrong directions: a device-writable header, a read-only status.
        vec![
            desc(base, 16, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 1),
            desc(base + 0x800, 1, 0, 0),
        ],
        // A header shorter than a header.
        vec![
            desc(base, 4, VRING_DESC_F_NEXT, 1),
            desc(base + 0x800, 1, VRING_DESC_F_WRITE, 0),
        ],
        // A next index beyond the queue.
        vec![desc(base, 16, VRING_DESC_F_NEXT, 1000)],
    ];
    let mut next_desc = 0u16;
    let mut used = 0u16;
    for (case, chain) in hostile.iter().enumerate() {
        // Descriptors of a chain refer to each other by index: shift them to their slot.
        let shifted: Vec<RawDescriptor> = chain
            .iter()
            .map(|d| {
                let d = Descriptor::from(*d);
                let next = if d.next() < 64 {
                    d.next() + next_desc
                } else {
                    d.next()
                };
                desc(d.addr().0, d.len(), u32::from(d.flags()), next)
            })
            .collect();
        mock.add_desc_chains(&shifted, next_desc).unwrap();
        next_desc += shifted.len() as u16;
        used += 1;
        r.kick_and_wait(&mock, used);
        assert_eq!(
            r.read(0x70) & NEEDS_RESET,
            0,
            "case {case}: no reset needed"
        );

        // A valid read still works.
        let slot = 2 + case as u64;
        let (descs, data, status) = block_request(&mem, next_desc, slot, VIRTIO_BLK_T_IN, 1, 512);
        mock.add_desc_chains(&descs, next_desc).unwrap();
        next_desc += 3;
        used += 1;
        r.kick_and_wait(&mock, used);
        assert_eq!(
            status_at(&mem, status),
            VIRTIO_BLK_S_OK,
            "after case {case}"
        );
        let mut back = [0u8; 512];
        mem.read_slice(&mut back, GuestAddress(data)).unwrap();
        assert!(back.iter().all(|b| *b == 0x5a), "after case {case}");
    }
}

#[test]
fn bad_queue_setup_needs_reset_and_a_reset_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), 8);
    let mut r = common::rig(
        Box::new(Block::new(&path, false, "vda", &ThreadContext::default()).unwrap()),
        MEMORY,
    );
    let table = Arc::clone(&r.table);
    let mem = GuardedMemory::lock_all(&table, None).unwrap();
    let mock = MockSplitQueue::new(&mem, 16);
    // 15 is not a power of two: the queue is not valid, the device needs a reset.
    r.set_up(&mock, 15);
    assert_ne!(r.read(0x70) & NEEDS_RESET, 0);
    // Rings outside guest memory: the same.
    r.write(0x70, 0);
    r.write(0x70, STATUS_ACK_DRIVER);
    r.write(0x24, 0);
    r.write(0x20, 0);
    r.write(0x24, 1);
    r.write(0x20, 1);
    r.write(0x70, STATUS_ACK_DRIVER | FEATURES_OK);
    r.write(0x30, 0);
    r.write(0x38, 16);
    r.write(0x80, 0);
    r.write(0x84, 0x100); // 1 TiB
    r.write(0x44, 1);
    r.write(0x70, STATUS_ACK_DRIVER | FEATURES_OK | DRIVER_OK);
    // The device thread checks the rings (the vCPU does not wait for guest memory).
    let deadline = Instant::now() + DEADLINE;
    while r.read(0x70) & NEEDS_RESET == 0 {
        assert!(
            Instant::now() < deadline,
            "rings outside memory need a reset"
        );
        std::thread::yield_now();
    }
    // A reset and a proper setup: requests work.
    r.set_up(&mock, 16);
    assert_eq!(r.read(0x70) & NEEDS_RESET, 0);
    let (descs, _, status) = block_request(&mem, 0, 0, VIRTIO_BLK_T_IN, 0, 512);
    mock.add_desc_chains(&descs, 0).unwrap();
    r.kick_and_wait(&mock, 1);
    assert_eq!(status_at(&mem, status), VIRTIO_BLK_S_OK);
}

#[test]
fn corrupt_available_index_needs_reset() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), 8);
    let mut r = common::rig(
        Box::new(Block::new(&path, false, "vda", &ThreadContext::default()).unwrap()),
        MEMORY,
    );
    let table = Arc::clone(&r.table);
    let mem = GuardedMemory::lock_all(&table, None).unwrap();
    let mock = MockSplitQueue::new(&mem, 16);
    r.set_up(&mock, 16);
    // 1000 entries available in a 16-entry queue.
    mock.avail().idx().store(1000);
    r.write(0x50, 0);
    // The device sets NEEDS_RESET, then raises a configuration interrupt: wait for both.
    let deadline = Instant::now() + DEADLINE;
    while r.read(0x70) & NEEDS_RESET == 0 || r.read(0x60) & 2 == 0 {
        assert!(
            Instant::now() < deadline,
            "no NEEDS_RESET with a configuration interrupt within {DEADLINE:?}"
        );
        std::thread::yield_now();
    }
}

/// Memory hotplugged while the device works: the driver plugs a region and then makes a
/// request into it available while the device is still busy with an earlier request.
/// The device must serve it with a view of memory that has the region (a view taken
/// before the request was seen would fail it with IOERR).
#[test]
fn requests_into_memory_plugged_while_the_device_works_succeed() {
    const BIG: u32 = 1 << 20;
    const ROUNDS: u64 = 150;
    const PLUG_BASE: u64 = 32 * MIB;
    const BLOCK: u64 = 0x1_0000;
    // Rings of 16 entries laid out by hand, with room (the mock's overlap past 8).
    const SIZE: u16 = 16;
    let (desc_table, avail_ring, used_ring) = (0u64, 0x1000u64, 0x2000u64);
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), 2 * u64::from(BIG) / 512);
    let mut r = common::rig(
        Box::new(Block::new(&path, false, "vda", &ThreadContext::default()).unwrap()),
        MEMORY,
    );
    let table = Arc::clone(&r.table);
    let mem = GuardedMemory::lock_all(&table, None).unwrap();
    r.set_up_at(
        [desc_table, avail_ring, used_ring].map(GuestAddress),
        u32::from(SIZE),
    );
    let mut avail = 0u16;
    let mut publish = |descs: &[RawDescriptor], first: u16| {
        for (i, d) in descs.iter().enumerate() {
            let at = desc_table + 16 * u64::from(first + i as u16);
            mem.write_obj(*d, GuestAddress(at)).unwrap();
        }
        let slot = avail_ring + 4 + 2 * u64::from(avail % SIZE);
        mem.write_obj(first, GuestAddress(slot)).unwrap();
        avail = avail.wrapping_add(1);
        mem.store(
            avail,
            GuestAddress(avail_ring + 2),
            std::sync::atomic::Ordering::Release,
        )
        .unwrap();
    };
    let status_b = BUFFERS + 40 * BLOCK;
    let hdr_b = status_b - 0x100;
    for round in 0..ROUNDS {
        // A long read into base memory keeps the device busy...
        let (descs_a, _, status_a) = block_request(&mem, 0, 0, VIRTIO_BLK_T_IN, 0, BIG);
        publish(&descs_a, 0);
        r.write(0x50, 0);
        // ...while the driver plugs a block and reads into it. (The plug runs on another
        // thread, as in the VMM: a writer must not run where a view is held.)
        let block = PLUG_BASE + round * BLOCK;
        std::thread::scope(|s| {
            s.spawn(|| table.insert(RegionSpec::anonymous(GuestAddress(block), BLOCK), None))
                .join()
                .unwrap()
                .unwrap()
        });
        mem.write_slice(&header(VIRTIO_BLK_T_IN, 0), GuestAddress(hdr_b))
            .unwrap();
        mem.write_obj(0xffu8, GuestAddress(status_b)).unwrap();
        let descs_b = [
            desc(hdr_b, 16, VRING_DESC_F_NEXT, 4),
            desc(block, 4096, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 5),
            desc(status_b, 1, VRING_DESC_F_WRITE, 0),
        ];
        let expected = 2 * (round as u16 + 1);
        // EVENT_IDX is on: ask for an interrupt when the second request is used.
        let used_event = avail_ring + 4 + 2 * u64::from(SIZE);
        mem.write_obj(expected - 1, GuestAddress(used_event))
            .unwrap();
        publish(&descs_b, 3);
        r.write(0x50, 0);
        r.wait_used(expected, || {
            mem.read_obj::<u16>(GuestAddress(used_ring + 2)).unwrap()
        });
        assert_eq!(status_at(&mem, status_a), VIRTIO_BLK_S_OK, "round {round}");
        assert_eq!(
            status_at(&mem, status_b),
            VIRTIO_BLK_S_OK,
            "round {round}: the request into memory plugged before it was made available"
        );
    }
}

#[test]
fn rng_fills_buffers() {
    let mut r = common::rig(
        Box::new(Rng::new(&ThreadContext::default()).unwrap()),
        MEMORY,
    );
    assert_eq!(r.read(0x8), 4, "entropy device id");
    let table = Arc::clone(&r.table);
    let mem = GuardedMemory::lock_all(&table, None).unwrap();
    let mock = MockSplitQueue::new(&mem, 16);
    r.set_up(&mock, 16);
    mem.write_slice(&[0u8; 256], GuestAddress(BUFFERS)).unwrap();
    mock.add_desc_chains(&[desc(BUFFERS, 256, VRING_DESC_F_WRITE, 0)], 0)
        .unwrap();
    r.kick_and_wait(&mock, 1);
    let used = mock.used().ring().ref_at(0).unwrap().load();
    assert_eq!(used.len(), 256);
    let mut got = [0u8; 256];
    mem.read_slice(&mut got, GuestAddress(BUFFERS)).unwrap();
    assert!(got.iter().filter(|b| **b == 0).count() < 32, "random bytes");
}

#[test]
fn with_event_idx_the_device_interrupts_when_used_event_is_passed() {
    let mut r = common::rig(
        Box::new(Rng::new(&ThreadContext::default()).unwrap()),
        MEMORY,
    );
    let table = Arc::clone(&r.table);
    let mem = GuardedMemory::lock_all(&table, None).unwrap();
    let mock = MockSplitQueue::new(&mem, 16);
    r.write(0x14, 0);
    assert_ne!(r.read(0x10) & (1 << 29), 0, "EVENT_IDX offered");
    // The mock lays the used ring over the available ring's `used_event`: put the used
    // ring further on. `set_up_at` accepts every offered feature, EVENT_IDX among them.
    let used = GuestAddress(0x1000);
    r.set_up_at([mock.desc_table_addr(), mock.avail_addr(), used], 16);
    // used_event (after the available ring): interrupt once entry 4 is used.
    let used_event = mock.avail_addr().0 + 4 + 2 * 16;
    mem.write_obj(4u16, GuestAddress(used_event)).unwrap();
    let request = |i: u16| desc(BUFFERS + u64::from(i) * 64, 64, VRING_DESC_F_WRITE, 0);
    let wait_used = |expected: u16| {
        let deadline = Instant::now() + DEADLINE;
        while mem.read_obj::<u16>(GuestAddress(used.0 + 2)).unwrap() < expected {
            assert!(
                Instant::now() < deadline,
                "requests done within {DEADLINE:?}"
            );
            std::thread::yield_now();
        }
    };

    mock.add_desc_chains(&[request(0), request(1), request(2)], 0)
        .unwrap();
    r.write(0x50, 0);
    wait_used(3);
    mock.add_desc_chains(&[request(3), request(4), request(5)], 3)
        .unwrap();
    r.write(0x50, 0);
    wait_used(6);
    // The interrupt for the second batch comes after its used entries: wait for it. One
    // for the first batch would have been raised before the device saw the second.
    assert!(
        r.wait_irq(DEADLINE),
        "an interrupt once used_event was passed"
    );
    assert_eq!(r.irq.read().unwrap(), 1, "one interrupt for six requests");
}

/// A vCPU that resets a device whose thread is in the middle of a slow request does not
/// wait for it; the next setup is served once the thread is done with the old one, and
/// the request the reset cut off is not reported in the rings.
#[test]
fn a_reset_does_not_wait_for_a_busy_device_thread() {
    let SlowRig {
        device,
        started,
        release,
        serving,
        overlapped,
    } = slow_device();
    let mut r = common::rig(Box::new(device), MEMORY);
    let table = Arc::clone(&r.table);
    let mem = GuardedMemory::lock_all(&table, None).unwrap();
    let first = MockSplitQueue::new(&mem, 16);
    r.set_up(&first, 16);
    first
        .add_desc_chains(&[desc(BUFFERS, 64, VRING_DESC_F_WRITE, 0)], 0)
        .unwrap();
    r.write(0x50, 0);
    started.recv_timeout(DEADLINE).expect("the request started");

    // The device thread is stuck in the request. (Before, the reset joined it: the
    // register write never returned and the rig's access timed out.)
    r.write(0x70, 0);
    assert_eq!(
        serving.load(Ordering::SeqCst),
        1,
        "the reset returned while the request was still being served"
    );
    assert_eq!(
        r.read(0x70),
        0,
        "the reset is done as far as the driver sees"
    );

    // The driver sets the device up again, elsewhere, and makes a request.
    let second = MockSplitQueue::create(&mem, GuestAddress(0x10_0000 - 0x8000), 16);
    r.set_up(&second, 16);
    second
        .add_desc_chains(&[desc(BUFFERS + 64, 64, VRING_DESC_F_WRITE, 0)], 0)
        .unwrap();
    r.write(0x50, 0);
    // The old request finishes; only then does the new thread serve.
    release.send(()).unwrap();
    started
        .recv_timeout(DEADLINE)
        .expect("the new request started");
    release.send(()).unwrap();
    r.wait_used(1, || second.used().idx().load());
    assert!(
        !overlapped.load(Ordering::SeqCst),
        "the new setup waited for the old one's request"
    );
    assert_eq!(
        first.used().idx().load(),
        0,
        "the request cut off by the reset is not reported"
    );
}

#[test]
fn virtio_mem_requires_unplugged_inaccessible_and_versions_its_configuration() {
    let table = common::guest_memory(MEMORY);
    let control =
        MemControl::new(Arc::clone(&table), 4 << 30, 1 << 30, MemBacking::Anonymous).unwrap();
    let mut r = common::rig_on(
        table,
        Box::new(Mem::new(Arc::clone(&control), &ThreadContext::default()).unwrap()),
    );
    r.write(0x70, 0);
    r.write(0x70, STATUS_ACK_DRIVER);
    r.write(0x14, 0);
    assert_ne!(r.read(0x10) & 2, 0, "UNPLUGGED_INACCESSIBLE offered");
    // VERSION_1 only: refused.
    r.write(0x24, 0);
    r.write(0x20, 0);
    r.write(0x24, 1);
    r.write(0x20, 1);
    r.write(0x70, STATUS_ACK_DRIVER | FEATURES_OK);
    assert_eq!(r.read(0x70) & FEATURES_OK, 0, "refused without the feature");
    r.write(0x24, 0);
    r.write(0x20, 2);
    r.write(0x70, STATUS_ACK_DRIVER | FEATURES_OK);
    assert_ne!(r.read(0x70) & FEATURES_OK, 0, "accepted with it");

    let generation = r.read(0xfc);
    control.request(3 << 20).unwrap_err(); // not whole blocks: no change
    assert_eq!(r.read(0xfc), generation);
    control.request(64 << 20).unwrap();
    assert_ne!(
        r.read(0xfc),
        generation,
        "a new requested size, a new generation"
    );
    let requested = u64::from(r.read(0x100 + 48)) | u64::from(r.read(0x100 + 52)) << 32;
    assert_eq!(requested, 64 << 20);
}

#[test]
fn a_disk_another_vm_holds_is_refused() {
    use devices::virtio::block::BlockError;
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), 8);
    let context = ThreadContext::default();
    // OFD locks belong to an open file, not a process: a second open here conflicts as
    // another VM's would.
    let writer = Block::new(&path, false, "vda", &context).unwrap();
    for read_only in [false, true] {
        let refused = Block::new(&path, read_only, "vdb", &context).unwrap_err();
        assert!(
            matches!(refused, BlockError::Locked { .. }),
            "read_only={read_only}: {refused}"
        );
        assert!(refused.to_string().contains("in use by another process"));
    }
    drop(writer);
    // Released when its file closes (a child process another test forks meanwhile may
    // hold the open file for a moment, until it executes).
    let deadline = Instant::now() + DEADLINE;
    let reader = loop {
        match Block::new(&path, true, "vda", &context) {
            Ok(reader) => break reader,
            Err(e) => assert!(Instant::now() < deadline, "still locked: {e}"),
        }
        std::thread::yield_now();
    };
    let _another_reader = Block::new(&path, true, "vdb", &context).unwrap();
    assert!(matches!(
        Block::new(&path, false, "vdc", &context),
        Err(BlockError::Locked { .. })
    ));
    assert_eq!(reader.capacity_sectors(), 8);
}

/// A disk on a block device (a loop device over a file) has the device's size; its
/// metadata says 0.
#[test]
fn a_block_device_disk_has_the_device_size() {
    let dir = tempfile::tempdir().unwrap();
    let image = disk(dir.path(), 2048);
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&image)
        .output();
    let device = match out {
        Ok(out) if out.status.success() => String::from_utf8(out.stdout).unwrap(),
        other => {
            // Loop devices need root; CI runs as root.
            eprintln!("SKIPPED: no loop device here: {other:?}");
            assert!(
                std::env::var_os("KITE_NO_SKIPS").is_none(),
                "CI has loop devices"
            );
            return;
        }
    };
    let device = device.trim();
    let block = Block::new(Path::new(device), true, "vda", &ThreadContext::default());
    let detached = std::process::Command::new("losetup")
        .args(["--detach", device])
        .status();
    let block = block.unwrap();
    assert_eq!(block.capacity_sectors(), 2048, "{device}");
    drop(block);
    assert!(detached.unwrap().success());
}

/// Descriptors this process has open.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// A driver that sets a busy device up again and again (resets and setups, or FAILED and
/// DRIVER_OK without a reset) while its thread is stuck in a request: the setups waiting
/// for the thread do not pile up (each would hold duplicated descriptors), and a device
/// that FAILED is not set up again without a reset.
#[test]
fn setups_of_a_busy_device_do_not_pile_up() {
    let SlowRig {
        device,
        started,
        release,
        ..
    } = slow_device();
    let mut r = common::rig(Box::new(device), MEMORY);
    let table = Arc::clone(&r.table);
    let mem = GuardedMemory::lock_all(&table, None).unwrap();
    let mock = MockSplitQueue::new(&mem, 16);
    r.set_up(&mock, 16);
    mock.add_desc_chains(&[desc(BUFFERS, 64, VRING_DESC_F_WRITE, 0)], 0)
        .unwrap();
    r.write(0x50, 0);
    started.recv_timeout(DEADLINE).expect("the request started");

    let before = open_fds();
    for _ in 0..2000 {
        r.set_up(&mock, 16); // a reset, then a full setup
    }
    const FAILED: u32 = 128;
    for _ in 0..2000 {
        r.write(0x70, STATUS_ACK_DRIVER | FEATURES_OK | DRIVER_OK | FAILED);
        r.write(0x70, STATUS_ACK_DRIVER | FEATURES_OK);
        r.write(0x70, STATUS_ACK_DRIVER | FEATURES_OK | DRIVER_OK);
    }
    let grown = open_fds().saturating_sub(before);
    assert!(
        grown < 16,
        "{grown} more descriptors open after 4000 setups"
    );
    assert_ne!(r.read(0x70) & FAILED, 0, "FAILED stays until a reset");
    release.send(()).unwrap();
}

/// A FIFO as a disk (read-only: opening one without a writer would wait for ever) is
/// refused at once, as is a character device.
#[test]
fn a_disk_that_is_not_a_file_or_block_device_is_refused_without_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
    let context = ThreadContext::default();
    for (path, read_only) in [(fifo.as_path(), true), (Path::new("/dev/zero"), true)] {
        let refused = Block::new(path, read_only, "vda", &context).unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("not a regular file or a block device"),
            "{}: {refused}",
            path.display()
        );
    }
}
