//! What a snapshot keeps of devices, and restoring it: a virtio transport and its device
//! go on where the device thread was (no request served twice, none lost), the serial
//! port keeps its registers and unread input, and a hotplug area its plugged blocks.

use std::sync::Arc;
use std::time::Instant;

use devices::legacy::SerialConsole;
use devices::virtio::block::Block;
use devices::virtio::device_thread::ThreadContext;
use devices::virtio::mem::{MemBacking, MemControl, BLOCK_SIZE, REQUEST_LEN};
use devices::virtio::rng::Rng;
use memory::{Backing, GuardedMemory};
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

mod common;
use common::{desc, DEADLINE};

const MIB: u64 = 1 << 20;
const MEMORY: u64 = 16 * MIB;
const BUFFERS: u64 = MIB;
const QUEUE: u16 = 16;

fn rng() -> Box<Rng> {
    Box::new(Rng::new(&ThreadContext::default()).unwrap())
}

/// A 64-byte random-bytes request at descriptor `slot`.
fn request(mock: &MockSplitQueue<'_, GuardedMemory<'_>>, slot: u16) {
    let buffer = desc(BUFFERS + u64::from(slot) * 64, 64, VRING_DESC_F_WRITE, 0);
    mock.add_desc_chains(&[buffer], slot).unwrap();
}

#[test]
fn a_restored_transport_goes_on_where_its_device_was() {
    let mut first = common::rig(rng(), MEMORY);
    let table = Arc::clone(&first.table);
    let mem = GuardedMemory::lock_all(&table, None).unwrap();
    let mock = MockSplitQueue::new(&mem, QUEUE);
    first.set_up(&mock, u32::from(QUEUE));
    for slot in 0..3 {
        request(&mock, slot);
    }
    first.kick_and_wait(&mock, 3);
    assert!(
        first.save_state().is_err(),
        "a device that is not paused has no state to save"
    );
    first.pause();
    assert!(first.wait_paused(Instant::now() + DEADLINE));
    let state = first.save_state().unwrap();
    let active = state.active_queues.as_ref().expect("the device is active");
    assert_eq!((active[0].next_avail, active[0].next_used), (3, 3));
    assert_eq!(state.queues[0].size, QUEUE, "the driver's setup is kept");
    let status = first.read(0x70);
    drop(first);

    // The requests served before the snapshot: their buffers are cleared, and must stay so.
    mem.write_slice(&[0u8; 3 * 64], GuestAddress(BUFFERS))
        .unwrap();
    let mut second = common::rig_on(Arc::clone(&table), rng());
    second.restore_state(&state).unwrap();
    assert_eq!(
        second.read(0x70),
        status,
        "the device status is the driver's"
    );
    request(&mock, 3);
    second.kick_and_wait(&mock, 4);
    let mut buffers = [0xffu8; 4 * 64];
    mem.read_slice(&mut buffers, GuestAddress(BUFFERS)).unwrap();
    assert!(
        buffers[..3 * 64].iter().all(|b| *b == 0),
        "requests served before the snapshot are not served again"
    );
    assert!(
        buffers[3 * 64..].iter().any(|b| *b != 0),
        "the request made after the restore is served"
    );
    assert_eq!(mock.used().idx().load(), 4);
    drop(mem);
}

#[test]
fn a_transport_state_only_restores_onto_the_same_device() {
    let mut first = common::rig(rng(), MEMORY);
    let table = Arc::clone(&first.table);
    first.pause();
    assert!(first.wait_paused(Instant::now() + DEADLINE));
    let state = first.save_state().unwrap();
    assert_eq!(state.active_queues, None, "never set up: nothing active");
    drop(first);
    let disk = tempfile::NamedTempFile::new().unwrap();
    disk.as_file().set_len(MIB).unwrap();
    let block = Block::new(disk.path(), false, "vda", &ThreadContext::default()).unwrap();
    let mut other = common::rig_on(Arc::clone(&table), Box::new(block));
    let e = other.restore_state(&state).unwrap_err();
    assert!(e.contains("type 4"), "{e}");
    assert_eq!(other.read(0x70), 0, "nothing changed");
    // A state with a queue too many is refused too.
    let mut more = state.clone();
    more.queues.push(more.queues[0]);
    let mut same = common::rig_on(table, rng());
    assert!(same.restore_state(&more).is_err());
    assert_eq!(same.read(0x70), 0);
    // Features the device does not offer (a disk given read-only that was writable),
    // or queues of another size, are refused too.
    let mut features = state.clone();
    features.driver_features |= 1 << 40;
    let e = same.restore_state(&features).unwrap_err();
    assert!(e.contains("does not offer"), "{e}");
    let mut sizes = state.clone();
    sizes.queues[0].max_size = 7;
    assert!(same.restore_state(&sizes).is_err());
    assert_eq!(same.read(0x70), 0);
    same.restore_state(&state).unwrap();
}

#[test]
fn the_serial_port_keeps_its_registers_and_unread_input() {
    let irq = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut port = SerialConsole::new(irq(), Box::new(std::io::sink()), irq());
    use vm_device::bus::PioAddress;
    use vm_device::MutDevicePio;
    let base = PioAddress(0x3f8);
    port.pio_write(base, 7, &[0x5a]); // scratch
    port.pio_write(base, 1, &[0x01]); // receive interrupt on
    assert_eq!(port.queue_input(b"abc").unwrap(), 3);
    let mut byte = [0u8];
    port.pio_read(base, 0, &mut byte);
    assert_eq!(byte, *b"a");
    let state = port.state();
    let mut back =
        SerialConsole::restored(&state, irq(), Box::new(std::io::sink()), irq()).unwrap();
    back.pio_read(base, 7, &mut byte);
    assert_eq!(byte, [0x5a]);
    back.pio_read(base, 1, &mut byte);
    assert_eq!(byte, [0x01]);
    for want in *b"bc" {
        back.pio_read(base, 0, &mut byte);
        assert_eq!(byte, [want]);
    }
    let mut full = state;
    full.in_buffer = vec![0; 1 << 20];
    assert!(SerialConsole::restored(&full, irq(), Box::new(std::io::sink()), irq()).is_err());
}

fn plug(control: &MemControl, block: u64) {
    let mut r = [0u8; REQUEST_LEN];
    r[8..16].copy_from_slice(&(control.addr() + block * BLOCK_SIZE).to_le_bytes());
    r[16..18].copy_from_slice(&1u16.to_le_bytes());
    assert_eq!(
        control.handle_request(&r)[..2],
        [0, 0],
        "block {block} plugged"
    );
}

#[test]
fn a_hotplug_area_comes_back_with_its_plugged_blocks() {
    const AREA: u64 = 4 << 30;
    let table = common::guest_memory(MEMORY);
    let control =
        MemControl::new(Arc::clone(&table), AREA, 64 * MIB, MemBacking::Anonymous).unwrap();
    control.request(8 * MIB).unwrap();
    plug(&control, 1);
    plug(&control, 3);
    table
        .write(GuestAddress(AREA + 3 * BLOCK_SIZE), &[7; 8], None)
        .unwrap();
    let state = control.state();
    assert_eq!(state.plugged, vec![1, 3]);
    assert_eq!(state.requested, 8 * MIB);

    let restored_table = common::guest_memory(MEMORY);
    let restored = MemControl::new(
        Arc::clone(&restored_table),
        AREA,
        64 * MIB,
        MemBacking::Anonymous,
    )
    .unwrap();
    restored.restore(&state, |_| Backing::Anonymous).unwrap();
    assert_eq!(restored.plugged(), 2 * BLOCK_SIZE);
    assert_eq!(restored.requested(), 8 * MIB);
    assert_eq!(restored.generation(), control.generation());
    let layout: Vec<u64> = restored_table.layout().iter().map(|r| r.1 .0).collect();
    assert_eq!(
        layout,
        vec![0, AREA + BLOCK_SIZE, AREA + 3 * BLOCK_SIZE],
        "the plugged blocks are regions again"
    );
    // It goes on: the two blocks left of the request can be plugged.
    plug(&restored, 0);
    plug(&restored, 2);

    // Another area, or a block outside it, is refused.
    let other = MemControl::new(
        common::guest_memory(MEMORY),
        AREA,
        128 * MIB,
        MemBacking::Anonymous,
    )
    .unwrap();
    assert!(other.restore(&state, |_| Backing::Anonymous).is_err());
    let mut bad = state.clone();
    bad.plugged.push(1 << 20);
    let fresh = MemControl::new(
        common::guest_memory(MEMORY),
        AREA,
        64 * MIB,
        MemBacking::Anonymous,
    )
    .unwrap();
    assert!(fresh.restore(&bad, |_| Backing::Anonymous).is_err());
}
