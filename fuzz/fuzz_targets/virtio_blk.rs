//! virtio-blk's request path. The descriptor table, the available ring (index included)
//! and the request buffers all come from the input; the disk's request handler serves the
//! queue as its device thread does. Whatever they hold, serving ends — with used
//! entries or a queue error, never a panic or a hang — and the disk keeps its size.
#![no_main]

use std::fs::File;
use std::sync::{Arc, OnceLock};

use devices::virtio::block::BlockHandler;
use devices::virtio::worker::{QueueHandler, Stopping};
use libfuzzer_sys::fuzz_target;
use memory::{GuardedMemory, RegionSpec, RegionTable};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const MEMORY: u64 = 1 << 20;
const QSIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const BUFFERS: u64 = 0x4000;
const DISK: u64 = 64 * 512;

struct Setup {
    table: RegionTable,
    disk: Arc<File>,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let table = RegionTable::default();
        table
            .insert(RegionSpec::anonymous(GuestAddress(0), MEMORY), None)
            .unwrap();
        // SAFETY: memfd_create with a NUL-terminated name; the fd is owned below.
        let fd = unsafe { libc::memfd_create(c"fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nobody else owns.
        let disk = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        disk.set_len(DISK).unwrap();
        Setup {
            table,
            disk: Arc::new(disk),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let setup = setup();
    {
        let mem = GuardedMemory::lock_all(&setup.table, None).unwrap();
        mem.write_slice(&vec![0u8; MEMORY as usize], GuestAddress(0))
            .unwrap();
        // Descriptors (16 x 16 bytes), then the available ring (flags, idx, 16 entries,
        // used_event), then the buffers.
        let (desc, rest) = data.split_at(data.len().min(16 * usize::from(QSIZE)));
        let (avail, buffers) = rest.split_at(rest.len().min(4 + 2 * usize::from(QSIZE) + 2));
        let buffers = &buffers[..buffers.len().min((MEMORY - BUFFERS) as usize)];
        mem.write_slice(desc, GuestAddress(DESC)).unwrap();
        mem.write_slice(avail, GuestAddress(AVAIL)).unwrap();
        mem.write_slice(buffers, GuestAddress(BUFFERS)).unwrap();
    }
    let mut queue = Queue::new(QSIZE).unwrap();
    queue.set_desc_table_address(Some(DESC as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_ready(true);
    let mut handler = BlockHandler::new(
        Arc::clone(&setup.disk),
        false,
        DISK,
        *b"fuzz-disk\0\0\0\0\0\0\0\0\0\0\0",
    );
    let _ = handler.process(0, &mut queue, &setup.table, Stopping::never());
    assert_eq!(
        setup.disk.metadata().unwrap().len(),
        DISK,
        "the disk keeps its size"
    );
});
