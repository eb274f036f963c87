//! What virtio-blk and virtio-rng count (`vm.counters`): what the driver was served, each
//! request once, when it is used; a failed request as an error, never as bytes; a request
//! run again after it met a writer of guest memory counted once.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use devices::virtio::block::{Block, BlockCounters};
use devices::virtio::device_thread::ThreadContext;
use devices::virtio::rng::Rng;
use memory::{GuardedMemory, RegionSpec, RegionTable, TableConfig};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

mod common;
use common::{desc, header, wait_until, Rig};

const MIB: u64 = 1 << 20;
const MEMORY: u64 = 16 * MIB;
/// Where request buffers go (the rings are at 0).
const BUFFERS: u64 = MIB;

/// A disk of `sectors` zeroed sectors.
fn disk(dir: &Path, sectors: u64) -> PathBuf {
    let path = dir.join("disk.img");
    std::fs::write(&path, vec![0u8; (sectors * 512) as usize]).unwrap();
    path
}

/// A block request at descriptor `first`: header, data of `len` bytes at `data` (none if
/// `len` is 0; device-writable unless it is a write), status; returns where the status
/// goes. Its header and status sit in slot `slot` of the buffers.
fn block_request(
    mem: &GuardedMemory<'_>,
    first: u16,
    slot: u64,
    kind: u32,
    sector: u64,
    (data, len): (u64, u32),
) -> (Vec<RawDescriptor>, u64) {
    let (hdr, status) = (BUFFERS + slot * 0x100, BUFFERS + slot * 0x100 + 0x80);
    mem.write_slice(&header(kind, sector), GuestAddress(hdr))
        .unwrap();
    mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
    let mut descs = vec![desc(hdr, 16, VRING_DESC_F_NEXT, first + 1)];
    if len > 0 {
        let flags = if kind == VIRTIO_BLK_T_OUT {
            VRING_DESC_F_NEXT
        } else {
            VRING_DESC_F_NEXT | VRING_DESC_F_WRITE
        };
        descs.push(desc(data, len, flags, first + 2));
    }
    descs.push(desc(status, 1, VRING_DESC_F_WRITE, 0));
    (descs, status)
}

/// A writable disk of `sectors` sectors behind its transport, on guest RAM; its
/// counters.
fn block_rig(dir: &Path, sectors: u64) -> (Rig, Arc<BlockCounters>) {
    let block = Block::new(&disk(dir, sectors), false, "vda", &ThreadContext::default()).unwrap();
    let counters = block.counters();
    (common::rig(Box::new(block), MEMORY), counters)
}

/// The requests counted so far.
fn counted(c: &BlockCounters) -> u64 {
    c.read_ops() + c.write_ops() + c.flush_ops() + c.errors()
}

/// Every counter: read and write bytes and ops, flushes, errors.
fn all(c: &BlockCounters) -> [u64; 6] {
    [
        c.read_bytes(),
        c.write_bytes(),
        c.read_ops(),
        c.write_ops(),
        c.flush_ops(),
        c.errors(),
    ]
}

/// Makes `descs` available at `first`, notifies, waits until the device has used `used`
/// requests and counted `used` (a request is counted just after it is used).
fn serve(
    r: &mut Rig,
    mock: &MockSplitQueue<'_, GuardedMemory<'_>>,
    counters: &BlockCounters,
    (descs, first): (&[RawDescriptor], u16),
    used: u16,
) {
    mock.add_desc_chains(descs, first).unwrap();
    r.kick_and_wait(mock, used);
    wait_until("the request is counted", || {
        counted(counters) >= u64::from(used)
    });
}

fn status_at(mem: &GuardedMemory<'_>, addr: u64) -> u32 {
    u32::from(mem.read_obj::<u8>(GuestAddress(addr)).unwrap())
}

#[test]
fn reads_writes_and_flushes_move_their_counters_by_what_was_served() {
    let dir = tempfile::tempdir().unwrap();
    let (mut r, c) = block_rig(dir.path(), 64);
    let table = Arc::clone(&r.table);
    let mem = GuardedMemory::lock_all(&table, None).unwrap();
    let mock = MockSplitQueue::new(&mem, 16);
    r.set_up(&mock, 16);
    assert_eq!(all(&c), [0; 6]);

    let data = BUFFERS + 0x1_0000;
    let (write, status) = block_request(&mem, 0, 0, VIRTIO_BLK_T_OUT, 2, (data, 1536));
    serve(&mut r, &mock, &c, (&write, 0), 1);
    assert_eq!(status_at(&mem, status), VIRTIO_BLK_S_OK);
    assert_eq!(
        all(&c),
        [0, 1536, 0, 1, 0, 0],
        "after a write of 1536 bytes"
    );

    let (read, status) = block_request(&mem, 3, 1, VIRTIO_BLK_T_IN, 1, (data, 1024));
    serve(&mut r, &mock, &c, (&read, 3), 2);
    assert_eq!(status_at(&mem, status), VIRTIO_BLK_S_OK);
    assert_eq!(all(&c), [1024, 1536, 1, 1, 0, 0], "after a read of 1024");

    let (flush, status) = block_request(&mem, 6, 2, VIRTIO_BLK_T_FLUSH, 0, (0, 0));
    serve(&mut r, &mock, &c, (&flush, 6), 3);
    assert_eq!(status_at(&mem, status), VIRTIO_BLK_S_OK);
    assert_eq!(all(&c), [1024, 1536, 1, 1, 1, 0], "after a flush");
}

#[test]
fn a_failed_request_is_an_error_not_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut r, c) = block_rig(dir.path(), 8);
    let table = Arc::clone(&r.table);
    let mem = GuardedMemory::lock_all(&table, None).unwrap();
    let mock = MockSplitQueue::new(&mem, 16);
    r.set_up(&mock, 16);
    let data = BUFFERS + 0x1_0000;

    // Sector 7 + 1024 bytes ends past the 8-sector disk: IOERR.
    let (read, status) = block_request(&mem, 0, 0, VIRTIO_BLK_T_IN, 7, (data, 1024));
    serve(&mut r, &mock, &c, (&read, 0), 1);
    assert_eq!(status_at(&mem, status), VIRTIO_BLK_S_IOERR);
    assert_eq!(all(&c), [0, 0, 0, 0, 0, 1], "an out-of-range read");

    let (write, status) = block_request(&mem, 3, 1, VIRTIO_BLK_T_OUT, 8, (data, 512));
    serve(&mut r, &mock, &c, (&write, 3), 2);
    assert_eq!(status_at(&mem, status), VIRTIO_BLK_S_IOERR);
    assert_eq!(all(&c), [0, 0, 0, 0, 0, 2], "an out-of-range write");

    let (unknown, status) = block_request(&mem, 6, 2, 99, 0, (data, 512));
    serve(&mut r, &mock, &c, (&unknown, 6), 3);
    assert_eq!(status_at(&mem, status), VIRTIO_BLK_S_UNSUPP);
    assert_eq!(all(&c), [0, 0, 0, 0, 0, 3], "an unsupported request");

    // The device still serves, and counts, a good one.
    let (read, status) = block_request(&mem, 9, 3, VIRTIO_BLK_T_IN, 6, (data, 1024));
    serve(&mut r, &mock, &c, (&read, 9), 4);
    assert_eq!(status_at(&mem, status), VIRTIO_BLK_S_OK);
    assert_eq!(all(&c), [1024, 0, 1, 0, 0, 3]);
}

/// The request of `request_locking.rs`'s
/// `a_request_that_meets_a_writer_is_served_again_once_it_is_done`: its first run reaches
/// a data block a writer holds and is undone (its read failed there), the second serves
/// it. Only the second counts.
#[test]
fn a_request_served_again_after_meeting_a_writer_is_counted_once() {
    const RINGS: u64 = 0;
    const TARGET: u64 = 8 * MIB;
    const LEN: u32 = 4096;
    let table = Arc::new(RegionTable::new(
        Arc::new(memory::NoSlots),
        None,
        TableConfig::default(),
    ));
    table
        .insert(RegionSpec::anonymous(GuestAddress(RINGS), MIB), None)
        .unwrap();
    let target = table
        .insert(RegionSpec::anonymous(GuestAddress(TARGET), MIB), None)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let block = Block::new(&disk(dir.path(), 8), true, "vda", &ThreadContext::default()).unwrap();
    let c = block.counters();
    let mut r = common::rig_on(Arc::clone(&table), Box::new(block));
    let mem = GuardedMemory::new(&table, None);
    let mock = MockSplitQueue::new(&mem, 16);
    r.set_up(&mock, 16);

    // Another reader holds the data block, and a writer shrinking it waits for that one;
    // the request comes only then.
    let other = table.try_lock_region(GuestAddress(TARGET)).unwrap();
    std::thread::scope(|s| {
        let writer = s.spawn(|| table.shrink(target, MIB / 2, None));
        wait_until("the writer marks the block", || {
            matches!(
                table.try_lock_region(GuestAddress(TARGET)),
                Err(memory::LookupError::WriteLocked { .. })
            )
        });
        let (hdr, status) = (RINGS + 0x8_0000, RINGS + 0x8_1000);
        mem.write_slice(&header(VIRTIO_BLK_T_IN, 0), GuestAddress(hdr))
            .unwrap();
        mock.add_desc_chains(
            &[
                desc(hdr, 16, VRING_DESC_F_NEXT, 1),
                desc(TARGET, LEN, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2),
                desc(status, 1, VRING_DESC_F_WRITE, 0),
            ],
            0,
        )
        .unwrap();
        r.write(0x50, 0);
        wait_until("the request waits for the writer", || {
            table.metrics().slow_path_readers == 1
        });
        assert_eq!(mock.used().idx().load(), 0);
        drop(other);
        writer.join().unwrap().unwrap();
    });
    r.wait_used(1, || mock.used().idx().load());
    wait_until("the request is counted", || counted(&c) >= 1);
    assert_eq!(
        all(&c),
        [u64::from(LEN), 0, 1, 0, 0, 0],
        "one read of {LEN} bytes, no error from the undone run"
    );
}

#[test]
fn rng_read_bytes_are_the_bytes_handed_to_the_guest() {
    let rng = Rng::new(&ThreadContext::default()).unwrap();
    let c = rng.counters();
    let mut r = common::rig(Box::new(rng), MEMORY);
    let table = Arc::clone(&r.table);
    let mem = GuardedMemory::lock_all(&table, None).unwrap();
    let mock = MockSplitQueue::new(&mem, 16);
    r.set_up(&mock, 16);

    // 256 bytes; 100 + 200 in two buffers; 96 KiB, of which the device gives 64 KiB.
    let w = VRING_DESC_F_WRITE;
    mock.add_desc_chains(&[desc(BUFFERS, 256, w, 0)], 0)
        .unwrap();
    mock.add_desc_chains(
        &[
            desc(BUFFERS + 0x1000, 100, w | VRING_DESC_F_NEXT, 2),
            desc(BUFFERS + 0x2000, 200, w, 0),
        ],
        1,
    )
    .unwrap();
    mock.add_desc_chains(&[desc(BUFFERS + 0x1_0000, 96 << 10, w, 0)], 3)
        .unwrap();
    r.kick_and_wait(&mock, 3);
    wait_until("the requests are counted", || c.requests() >= 3);
    let handed: Vec<u32> = (0..3)
        .map(|i| mock.used().ring().ref_at(i).unwrap().load().len())
        .collect();
    assert_eq!(handed, [256, 300, 64 << 10]);
    assert_eq!(c.read_bytes(), 256 + 300 + (64 << 10));
    assert_eq!(c.requests(), 3);
}
