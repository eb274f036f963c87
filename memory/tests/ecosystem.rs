//! rust-vmm crates running over guarded memory (guarantee 11): virtio-queue parses and
//! completes descriptor chains, linux-loader writes a kernel command line, and a writer
//! that wants a region in use waits for the guards.

use std::sync::Arc;
use std::time::Duration;

use linux_loader::cmdline::Cmdline;
use memory::{GuardedMemory, RegionSpec, RegionTable, TableConfig, TableError};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;

fn two_region_table() -> RegionTable {
    let table = RegionTable::new(
        Arc::new(memory::NoSlots),
        None,
        TableConfig {
            drain_timeout: Duration::from_millis(50),
            ..TableConfig::default()
        },
    );
    table
        .insert(RegionSpec::anonymous(GuestAddress(0), MIB), None)
        .unwrap();
    table
        .insert(RegionSpec::anonymous(GuestAddress(MIB), MIB), None)
        .unwrap();
    table
}

#[test]
fn virtio_queue_processes_a_chain_over_guarded_memory() {
    let table = two_region_table();
    let id = table.layout()[1].0;
    {
        let mem = GuardedMemory::lock_all(&table, None).unwrap();
        // The driver side: a queue at 0 with a 3-descriptor chain whose buffers sit in
        // the second region, the last one device-writable and crossing nothing.
        let mock = MockSplitQueue::new(&mem, 16);
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(MIB, 16, VRING_DESC_F_NEXT as u16, 1)),
            RawDescriptor::from(SplitDescriptor::new(
                MIB + 0x1000,
                8,
                VRING_DESC_F_NEXT as u16,
                2,
            )),
            RawDescriptor::from(SplitDescriptor::new(
                MIB + 0x2000,
                64,
                VRING_DESC_F_WRITE as u16,
                0,
            )),
        ];
        mock.add_desc_chains(&descs, 0).unwrap();
        mem.write_slice(b"request header!!", GuestAddress(MIB))
            .unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();

        // The device side: virtio-queue walks the chain through vm-memory's traits.
        let mut chain = queue.pop_descriptor_chain(&mem).expect("a chain");
        let head = chain.head_index();
        let first = chain.next().unwrap();
        let mut header = [0u8; 16];
        mem.read_slice(&mut header, first.addr()).unwrap();
        assert_eq!(&header, b"request header!!");
        let second = chain.next().unwrap();
        assert_eq!(second.len(), 8);
        let status = chain.next().unwrap();
        assert!(status.is_write_only());
        mem.write_slice(&[0x42; 64], status.addr()).unwrap();
        assert!(chain.next().is_none());
        queue.add_used(&mem, head, 64).unwrap();

        // While the guards are held, a writer cannot remove a region in use: it
        // waits, times out and changes nothing.
        let blocked = std::thread::scope(|s| s.spawn(|| table.remove(id, None)).join().unwrap());
        assert!(
            matches!(blocked, Err(TableError::DrainTimeout { .. })),
            "{blocked:?}"
        );
    }
    // The device's write is in guest memory.
    let mut out = [0u8; 64];
    table
        .read(GuestAddress(MIB + 0x2000), &mut out, None)
        .unwrap();
    assert_eq!(out, [0x42; 64]);
    // Guards released: now the removal goes through.
    table.remove(id, None).unwrap();
}

#[test]
fn virtio_queue_rejects_a_buffer_outside_guest_memory() {
    let table = two_region_table();
    let mem = GuardedMemory::lock_all(&table, None).unwrap();
    let mock = MockSplitQueue::new(&mem, 16);
    let descs = [RawDescriptor::from(SplitDescriptor::new(
        64 * MIB,
        512,
        VRING_DESC_F_WRITE as u16,
        0,
    ))];
    mock.add_desc_chains(&descs, 0).unwrap();
    let mut queue: Queue = mock.create_queue().unwrap();
    let mut chain = queue.pop_descriptor_chain(&mem).expect("a chain");
    let desc = chain.next().unwrap();
    // The address is the guest's to choose; using it fails cleanly, no panic.
    assert!(mem.write_slice(&[1; 512], desc.addr()).is_err());
}

#[test]
fn linux_loader_writes_the_command_line_into_guarded_memory() {
    let table = two_region_table();
    let mut cmdline = Cmdline::new(256).unwrap();
    cmdline.insert_str("console=ttyS0 panic=-1").unwrap();
    {
        let mem = GuardedMemory::lock_all(&table, None).unwrap();
        linux_loader::loader::load_cmdline(&mem, GuestAddress(0x2_0000), &cmdline).unwrap();
        // Past the end of guest memory: a typed error.
        assert!(
            linux_loader::loader::load_cmdline(&mem, GuestAddress(2 * MIB - 4), &cmdline).is_err()
        );
    }
    let mut buf = [0u8; 23];
    table.read(GuestAddress(0x2_0000), &mut buf, None).unwrap();
    assert_eq!(&buf, b"console=ttyS0 panic=-1\0");
}
