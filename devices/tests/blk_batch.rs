//! virtio-blk requests served in batches: runs of contiguous reads or writes move with
//! one system call, and still every request gets its own status, used length and count,
//! whatever the others in its batch are (flushes, bad requests, buffers in another region,
//! a disk that ends early).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use devices::virtio::block::BlockHandler;
use devices::virtio::worker::{QueueHandler, Stopping};
use memory::{GuardedMemory, RegionSpec, RegionTable};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress};

mod common;
use common::{desc, header};

const MIB: u64 = 1 << 20;
const SECTORS: u64 = 128;
const SECTOR: u64 = 512;
/// Headers, statuses and buffers, in the rings' region.
const NEAR: u64 = 0x8_0000;
/// A buffer in the other region.
const FAR: u64 = MIB + 0x1000;

/// The disk's byte at `offset`.
fn pattern(offset: u64) -> u8 {
    (offset * 7 + offset / 4096) as u8
}

/// A request: its kind, sector, data buffers (address, length), and where its header and
/// status go.
struct Request {
    kind: u32,
    sector: u64,
    bufs: Vec<(u64, u32)>,
    slot: u64,
}

impl Request {
    fn new(kind: u32, sector: u64, bufs: &[(u64, u32)], slot: u64) -> Self {
        Request {
            kind,
            sector,
            bufs: bufs.to_vec(),
            slot,
        }
    }

    fn header(&self) -> u64 {
        NEAR + self.slot * 0x20
    }

    fn status(&self) -> u64 {
        self.header() + 0x10
    }
}

/// A handler on a disk of `sectors` sectors holding [`pattern`], the disk file, and a
/// table with two regions of a MiB each.
fn rig(dir: &std::path::Path, sectors: u64) -> (BlockHandler, File, RegionTable) {
    let path = dir.join("disk.img");
    let bytes: Vec<u8> = (0..sectors * SECTOR).map(pattern).collect();
    std::fs::write(&path, bytes).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let handler = BlockHandler::new(
        Arc::new(file.try_clone().unwrap()),
        false,
        sectors * SECTOR,
        [0; 20],
    );
    let table = RegionTable::default();
    for start in [0, MIB] {
        table
            .insert(RegionSpec::anonymous(GuestAddress(start), MIB), None)
            .unwrap();
    }
    (handler, file, table)
}

/// Makes `requests` available at once, serves them, and returns each one's status and
/// used length (in the order made available).
fn serve(handler: &mut BlockHandler, table: &RegionTable, requests: &[Request]) -> Vec<(u8, u32)> {
    let (mut queue, used) = {
        let mem = GuardedMemory::lock_all(table, None).unwrap();
        let mock = MockSplitQueue::new(&mem, 64);
        let mut next = 0u16;
        for r in requests {
            mem.write_slice(&header(r.kind, r.sector), GuestAddress(r.header()))
                .unwrap();
            mem.write_obj(0xffu8, GuestAddress(r.status())).unwrap();
            let data_flags = if r.kind == VIRTIO_BLK_T_IN {
                VRING_DESC_F_NEXT | VRING_DESC_F_WRITE
            } else {
                VRING_DESC_F_NEXT
            };
            let at = |k: usize| next + k as u16;
            let mut chain: Vec<RawDescriptor> =
                vec![desc(r.header(), 16, VRING_DESC_F_NEXT, at(1))];
            chain.extend(
                r.bufs
                    .iter()
                    .enumerate()
                    .map(|(k, &(a, l))| desc(a, l, data_flags, at(k + 2))),
            );
            chain.push(desc(r.status(), 1, VRING_DESC_F_WRITE, 0));
            mock.add_desc_chains(&chain, next).unwrap();
            next += chain.len() as u16;
        }
        (mock.create_queue::<Queue>().unwrap(), mock.used_addr())
    };
    let served = handler
        .process(0, &mut queue, table, Stopping::never())
        .unwrap();
    assert!(!served.more);
    let mem = GuardedMemory::lock_all(table, None).unwrap();
    let idx: u16 = mem.read_obj(used.unchecked_add(2)).unwrap();
    assert_eq!(usize::from(idx), requests.len(), "every request used");
    let mut lens = vec![None; requests.len()];
    let mut heads = 0u32;
    for (i, r) in requests.iter().enumerate() {
        let (id, len): (u32, u32) = (
            mem.read_obj(used.unchecked_add(4 + 8 * i as u64)).unwrap(),
            mem.read_obj(used.unchecked_add(8 + 8 * i as u64)).unwrap(),
        );
        assert_eq!(id, heads, "used in the order made available");
        heads += 2 + r.bufs.len() as u32;
        lens[i] = Some(len);
    }
    requests
        .iter()
        .zip(lens)
        .map(|(r, len)| {
            let status: u8 = mem.read_obj(GuestAddress(r.status())).unwrap();
            (status, len.unwrap())
        })
        .collect()
}

/// Read system calls (`read`, `pread`, `preadv`...) this thread made while `f` ran.
fn reads_during<R>(f: impl FnOnce() -> R) -> (R, u64) {
    // One read of the whole file, counted in the next look.
    let syscr = || {
        let mut io = [0u8; 4096];
        let n = File::open("/proc/thread-self/io")
            .unwrap()
            .read(&mut io)
            .unwrap();
        let io = std::str::from_utf8(&io[..n]).unwrap();
        io.lines()
            .find_map(|l| l.strip_prefix("syscr: "))
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let before = syscr();
    let result = f();
    let after = syscr();
    (result, after - before - 1)
}

fn guest_bytes(table: &RegionTable, addr: u64, len: u32) -> Vec<u8> {
    let mut bytes = vec![0u8; len as usize];
    GuardedMemory::lock_all(table, None)
        .unwrap()
        .read_slice(&mut bytes, GuestAddress(addr))
        .unwrap();
    bytes
}

fn disk_pattern(offset: u64, len: u32) -> Vec<u8> {
    (offset..offset + u64::from(len)).map(pattern).collect()
}

#[test]
fn a_batch_of_mixed_requests_answers_each_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let (mut handler, file, table) = rig(dir.path(), SECTORS);
    let counters = handler.counters();
    GuardedMemory::lock_all(&table, None)
        .unwrap()
        .write_slice(&[0x5a; 4096], GuestAddress(NEAR + 0x4_0000))
        .unwrap();
    let buf = |i: u64| NEAR + 0x1_0000 + i * 0x2000;
    let requests = [
        // A run of three reads, the second's buffer in two descriptors.
        Request::new(VIRTIO_BLK_T_IN, 0, &[(buf(0), 4096)], 0),
        Request::new(VIRTIO_BLK_T_IN, 8, &[(buf(1), 1024), (buf(2), 3072)], 1),
        Request::new(VIRTIO_BLK_T_IN, 16, &[(buf(3), 4096)], 2),
        // A write, then a read right after the run, but after the write.
        Request::new(VIRTIO_BLK_T_OUT, 64, &[(NEAR + 0x4_0000, 4096)], 3),
        Request::new(VIRTIO_BLK_T_IN, 24, &[(buf(4), 4096)], 4),
        // A flush, and a read beyond the disk.
        Request::new(VIRTIO_BLK_T_FLUSH, 0, &[], 5),
        Request::new(VIRTIO_BLK_T_IN, SECTORS, &[(buf(5), 512)], 6),
        // A read into the other region (a batch of its own), then back.
        Request::new(VIRTIO_BLK_T_IN, 32, &[(FAR, 4096)], 7),
        Request::new(VIRTIO_BLK_T_IN, 40, &[(buf(6), 4096)], 8),
        // A buffer across the two regions.
        Request::new(VIRTIO_BLK_T_IN, 48, &[(MIB - 1024, 2048)], 9),
    ];
    let ok = VIRTIO_BLK_S_OK as u8;
    let (answers, reads) = reads_during(|| serve(&mut handler, &table, &requests));
    // The run of three reads in one call; the others in one each; the bad read in none.
    assert_eq!(reads, 5, "disk reads");
    assert_eq!(
        answers,
        vec![
            (ok, 4097),
            (ok, 4097),
            (ok, 4097),
            (ok, 1),
            (ok, 4097),
            (ok, 1),
            (VIRTIO_BLK_S_IOERR as u8, 1),
            (ok, 4097),
            (ok, 4097),
            (ok, 2049),
        ]
    );
    for r in requests
        .iter()
        .filter(|r| r.kind == VIRTIO_BLK_T_IN && r.sector < SECTORS)
    {
        let mut offset = r.sector * SECTOR;
        for &(addr, len) in &r.bufs {
            assert_eq!(
                guest_bytes(&table, addr, len),
                disk_pattern(offset, len),
                "request at sector {} read its bytes",
                r.sector
            );
            offset += u64::from(len);
        }
    }
    let mut written = [0u8; 4096];
    file.read_exact_at(&mut written, 64 * SECTOR).unwrap();
    assert!(
        written.iter().all(|b| *b == 0x5a),
        "the write reached the disk"
    );
    assert_eq!(
        [
            counters.read_ops(),
            counters.read_bytes(),
            counters.write_ops(),
            counters.flush_ops(),
            counters.errors()
        ],
        [7, 6 * 4096 + 2048, 1, 1, 1],
        "each request counted once, as it ended"
    );
}

#[test]
fn a_run_that_stops_short_fails_only_the_requests_it_did_not_finish() {
    let dir = tempfile::tempdir().unwrap();
    let (mut handler, file, table) = rig(dir.path(), SECTORS);
    // The disk shrinks under the device: it ends 1 KiB into the third request.
    file.set_len(9 * 1024).unwrap();
    let buf = |i: u64| NEAR + 0x1_0000 + i * 0x2000;
    let requests: Vec<Request> = (0..4)
        .map(|i| Request::new(VIRTIO_BLK_T_IN, i * 8, &[(buf(i), 4096)], i))
        .collect();
    let (ok, err) = (VIRTIO_BLK_S_OK as u8, VIRTIO_BLK_S_IOERR as u8);
    let (answers, reads) = reads_during(|| serve(&mut handler, &table, &requests));
    assert_eq!(answers, vec![(ok, 4097), (ok, 4097), (err, 1), (err, 1)]);
    // The run (9 KiB, then the end), then alone the two it did not finish (1 KiB, then
    // the end; the end): those it did are not read again.
    assert_eq!(reads, 5, "disk reads");
    for i in 0..2 {
        assert_eq!(
            guest_bytes(&table, buf(i), 4096),
            disk_pattern(i * 4096, 4096)
        );
    }
}

#[test]
fn a_batch_defers_at_most_a_mebibyte() {
    let dir = tempfile::tempdir().unwrap();
    let (mut handler, _file, table) = rig(dir.path(), 4096);
    // 20 contiguous reads of 64 KiB (into one buffer: only the calls count here).
    let requests: Vec<Request> = (0..20)
        .map(|i| Request::new(VIRTIO_BLK_T_IN, i * 128, &[(NEAR + 0x1_0000, 65536)], i))
        .collect();
    let (answers, reads) = reads_during(|| serve(&mut handler, &table, &requests));
    assert!(answers.iter().all(|&a| a == (VIRTIO_BLK_S_OK as u8, 65537)));
    // 16 together (1 MiB); the 17th at once, which ends the batch; the last 3 together.
    assert_eq!(reads, 3, "disk reads");
}
