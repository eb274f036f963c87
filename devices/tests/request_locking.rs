//! A device request holds only the regions its rings and buffers touch, for as long as
//! it touches them (guarantee 12): a slow virtio-blk read into one block delays a
//! writer of that block, and nobody else.

use std::fs::File;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::virtio::block::{Block, BlockHandler};
use devices::virtio::device_thread::ThreadContext;
use devices::virtio::worker::QueueHandler;
use devices::virtio::VIRTIO_ID_BLOCK;
use memory::{GuardedMemory, RegionSpec, RegionTable, TableConfig};
use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress};

mod common;
use common::{desc, header, wait_until, ThreadDevice, DEADLINE};

const MIB: u64 = 1 << 20;
/// Rings, request headers and status bytes.
const RINGS: u64 = 0;
/// Blocks no request touches, removed while a request is in flight.
const OTHERS: [u64; 3] = [2 * MIB, 4 * MIB, 6 * MIB];
/// The block the request reads into.
const TARGET: u64 = 8 * MIB;
const LEN: u32 = 4096;

/// A virtio-blk device whose reads take as long as the test wants (a slow disk): each
/// request reaches its data buffer, as a read does, tells the test, waits to be let
/// go, reads the disk, and reports what landed in guest memory.
struct SlowDiskHandler {
    disk: BlockHandler,
    started: Sender<()>,
    release: Receiver<()>,
    landed: Sender<Vec<u8>>,
}

impl QueueHandler for SlowDiskHandler {
    fn serve(&mut self, index: usize, chain: DescriptorChain<&GuardedMemory<'_>>) -> u32 {
        let mem = chain.memory();
        let Some(data) = chain.clone().nth(1) else {
            return 0;
        };
        let _ = mem.read_obj::<u8>(data.addr());
        let _ = self.started.send(());
        let _ = self.release.recv_timeout(2 * DEADLINE);
        let used = self.disk.serve(index, chain.clone());
        let mut landed = vec![0u8; data.len() as usize];
        let _ = mem.read_slice(&mut landed, data.addr());
        let _ = self.landed.send(landed);
        used
    }
}

/// Makes available a read of the disk's first `LEN` bytes into the target block (its
/// header and status byte in the rings' block); returns where the status goes.
fn offer_read(mem: &GuardedMemory<'_>, mock: &MockSplitQueue<'_, GuardedMemory<'_>>) -> u64 {
    let (hdr, status) = (RINGS + 0x8_0000, RINGS + 0x8_1000);
    mem.write_slice(&header(VIRTIO_BLK_T_IN, 0), GuestAddress(hdr))
        .unwrap();
    mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
    mock.add_desc_chains(
        &[
            desc(hdr, 16, VRING_DESC_F_NEXT, 1),
            desc(TARGET, LEN, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2),
            desc(status, 1, VRING_DESC_F_WRITE, 0),
        ],
        0,
    )
    .unwrap();
    status
}

#[test]
fn a_slow_read_into_one_block_delays_only_a_writer_of_that_block() {
    let table = Arc::new(RegionTable::new(
        Arc::new(memory::NoSlots),
        None,
        TableConfig::default(),
    ));
    let insert = |start| {
        table
            .insert(RegionSpec::anonymous(GuestAddress(start), MIB), None)
            .unwrap()
    };
    insert(RINGS);
    let others: Vec<_> = OTHERS.iter().map(|&start| insert(start)).collect();
    let target = insert(TARGET);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let pattern: Vec<u8> = (0..LEN).map(|i| (i * 13 % 251) as u8).collect();
    std::fs::write(&path, &pattern).unwrap();
    let (started_tx, started) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel();
    let (landed_tx, landed) = std::sync::mpsc::channel();
    let handler = SlowDiskHandler {
        disk: BlockHandler::new(
            Arc::new(File::open(&path).unwrap()),
            true,
            u64::from(LEN),
            [0; 20],
        ),
        started: started_tx,
        release: release_rx,
        landed: landed_tx,
    };
    let device = ThreadDevice::new("slow-disk", VIRTIO_ID_BLOCK, 16, handler);
    let mut r = common::rig_on(Arc::clone(&table), Box::new(device));

    // The driver (this thread) touches only the first block.
    let mem = GuardedMemory::new(&table, None);
    let mock = MockSplitQueue::new(&mem, 16);
    r.set_up(&mock, 16);
    let status = offer_read(&mem, &mock);
    r.write(0x50, 0);
    started.recv_timeout(DEADLINE).expect("the request started");
    let readers = |start: u64| {
        table
            .metrics()
            .regions
            .iter()
            .find(|r| r.start == start)
            .map_or(0, |r| r.readers)
    };
    assert_eq!(readers(TARGET), 1, "the request holds its data block");

    // Writers of other blocks do not wait for it. (Writers run on threads of their own:
    // this thread holds the rings' block.)
    let mut fastest = Duration::MAX;
    for id in others {
        let started = Instant::now();
        std::thread::scope(|s| s.spawn(|| table.remove(id, None)).join().unwrap())
            .expect("removed while the request is in flight");
        fastest = fastest.min(started.elapsed());
        assert_eq!(readers(TARGET), 1, "removed while the request is in flight");
    }
    assert!(
        fastest <= Duration::from_millis(10),
        "removing a block no request touches took {fastest:?}"
    );

    // A writer of its block waits for it, and the request's data lands before the
    // block goes: the request is used by the time the removal ends.
    let used_idx = mock.used_addr().0 + 2;
    std::thread::scope(|s| {
        let removal = s.spawn(|| {
            table.remove(target, None).unwrap();
            GuardedMemory::new(&table, None)
                .read_obj::<u16>(GuestAddress(used_idx))
                .unwrap()
        });
        wait_until("the removal waits for the request", || {
            table.metrics().writers_draining == 1
        });
        assert!(!removal.is_finished());
        release.send(()).unwrap();
        assert_eq!(removal.join().unwrap(), 1, "used before its block went");
    });
    assert_eq!(landed.recv_timeout(DEADLINE).unwrap(), pattern);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(status)).unwrap(),
        VIRTIO_BLK_S_OK as u8
    );
    assert!(table.region_at(GuestAddress(TARGET)).is_none());
}

/// A request that holds the rings' block and reaches a data block a writer holds gives
/// up what it holds, waits for the writer, and is served again from the start: it is
/// used once, with its data.
#[test]
fn a_request_that_meets_a_writer_is_served_again_once_it_is_done() {
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
    let path = dir.path().join("disk.img");
    let pattern: Vec<u8> = (0..LEN).map(|i| (i * 7 % 253) as u8).collect();
    std::fs::write(&path, &pattern).unwrap();
    let block = Block::new(&path, true, "vda", &ThreadContext::default()).unwrap();
    let mut r = common::rig_on(Arc::clone(&table), Box::new(block));

    let mem = GuardedMemory::new(&table, None);
    let mock = MockSplitQueue::new(&mem, 16);
    r.set_up(&mock, 16);

    // Another reader holds the data block, and a writer shrinking it waits for that one.
    // The request is made only then, so the device meets the writer however soon it
    // looks at the ring.
    let other = table.try_lock_region(GuestAddress(TARGET)).unwrap();
    let status = std::thread::scope(|s| {
        let writer = s.spawn(|| table.shrink(target, MIB / 2, None));
        wait_until("the writer marks the block", || {
            matches!(
                table.try_lock_region(GuestAddress(TARGET)),
                Err(memory::LookupError::WriteLocked { .. })
            )
        });
        let status = offer_read(&mem, &mock);
        r.write(0x50, 0);
        wait_until("the request waits for the writer", || {
            table.metrics().slow_path_readers == 1
        });
        assert_eq!(mock.used().idx().load(), 0);
        drop(other);
        writer.join().unwrap().unwrap();
        status
    });
    r.wait_used(1, || mock.used().idx().load());
    let mut data = vec![0u8; LEN as usize];
    mem.read_slice(&mut data, GuestAddress(TARGET)).unwrap();
    assert_eq!(data, pattern);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(status)).unwrap(),
        VIRTIO_BLK_S_OK as u8
    );
    assert_eq!(r.read(0x70) & common::NEEDS_RESET, 0);
    assert_eq!(mock.used().idx().load(), 1);
}
