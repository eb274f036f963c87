//! Pausing and resuming device threads, as the VMM does to quiesce a VM (`vm.pause`,
//! snapshots): the request in hand is finished and used before the pause is acknowledged,
//! nothing is served while paused (requests, setups, resets, virtio-mem plugs), what came
//! meanwhile is served after the resume, and waiting for the pause has a deadline.
//!
//! "Nothing happens" is checked over a short window (`QUIET`): long enough for a device
//! that wrongly serves to do so, and the test fails rather than hangs either way.

use std::sync::atomic::Ordering;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::virtio::device_thread::ThreadContext;
use devices::virtio::mem::{Mem, MemBacking, MemControl, BLOCK_SIZE, REQUEST_LEN, RESPONSE_LEN};
use devices::virtio::rng::Rng;
use memory::GuardedMemory;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

mod common;
use common::{desc, slow_device, SlowRig, DEADLINE};

const MIB: u64 = 1 << 20;
const MEMORY: u64 = 16 * MIB;
/// Where request buffers go (the rings are at 0).
const BUFFERS: u64 = MIB;
/// How long a test watches for something that must not happen.
const QUIET: Duration = Duration::from_millis(300);

/// A one-descriptor request of the slow device at descriptor `slot`.
fn slow_request(mock: &MockSplitQueue<'_, GuardedMemory<'_>>, slot: u16) {
    let buffer = desc(BUFFERS + u64::from(slot) * 64, 64, VRING_DESC_F_WRITE, 0);
    mock.add_desc_chains(&[buffer], slot).unwrap();
}

/// A pause asked while a request is in hand waits for it: the request is used, then the
/// pause acknowledged. Requests available or notified meanwhile wait for the resume.
#[test]
fn a_pause_finishes_the_request_in_hand_and_holds_the_rest_until_resume() {
    let SlowRig {
        device,
        started,
        release,
        overlapped,
        ..
    } = slow_device();
    let mut r = common::rig(Box::new(device), MEMORY);
    let table = Arc::clone(&r.table);
    let mem = GuardedMemory::lock_all(&table, None).unwrap();
    let mock = MockSplitQueue::new(&mem, 16);
    r.set_up(&mock, 16);
    slow_request(&mock, 0);
    r.write(0x50, 0);
    started
        .recv_timeout(DEADLINE)
        .expect("the first request started");
    // A second request is available while the first is in hand.
    slow_request(&mock, 1);
    r.write(0x50, 0);

    r.pause();
    assert!(
        !r.wait_paused(Instant::now() + QUIET),
        "not paused while a request is in hand"
    );
    assert_eq!(mock.used().idx().load(), 0);
    release.send(()).unwrap();
    assert!(
        r.wait_paused(Instant::now() + DEADLINE),
        "paused once the request in hand is done"
    );
    assert_eq!(
        mock.used().idx().load(),
        1,
        "the request in hand was used before the pause was acknowledged"
    );

    // A third request, notified while paused.
    slow_request(&mock, 2);
    r.write(0x50, 0);
    assert_eq!(
        started.recv_timeout(QUIET),
        Err(RecvTimeoutError::Timeout),
        "no request starts while paused"
    );
    assert_eq!(mock.used().idx().load(), 1);

    r.resume();
    release.send(()).unwrap();
    release.send(()).unwrap();
    r.wait_used(3, || mock.used().idx().load());
    assert!(!overlapped.load(Ordering::SeqCst));
}

/// A request that never ends keeps the device from pausing: waiting gives up at the
/// deadline, which is one for all devices (a device paused meanwhile still says so
/// after it).
#[test]
fn waiting_for_a_pause_ends_at_the_deadline() {
    let SlowRig {
        device,
        started,
        release,
        ..
    } = slow_device();
    let mut stuck = common::rig(Box::new(device), MEMORY);
    let mut idle = common::rig(
        Box::new(Rng::new(&ThreadContext::default()).unwrap()),
        MEMORY,
    );
    let table = Arc::clone(&stuck.table);
    let mem = GuardedMemory::lock_all(&table, None).unwrap();
    let mock = MockSplitQueue::new(&mem, 16);
    stuck.set_up(&mock, 16);
    slow_request(&mock, 0);
    stuck.write(0x50, 0);
    started.recv_timeout(DEADLINE).expect("the request started");

    stuck.pause();
    idle.pause();
    assert!(
        idle.wait_paused(Instant::now() + DEADLINE),
        "an idle device pauses"
    );
    let deadline = Instant::now() + QUIET;
    assert!(!stuck.wait_paused(deadline), "a stuck device is not paused");
    let late = Instant::now().saturating_duration_since(deadline);
    assert!(late < Duration::from_secs(2), "gave up {late:?} late");
    assert!(
        idle.wait_paused(deadline),
        "a paused device says so even once the deadline has passed"
    );

    release.send(()).unwrap();
    assert!(stuck.wait_paused(Instant::now() + DEADLINE));
}

/// virtio-mem: a resize requested while paused is accepted, but the driver's plug
/// request is not served (nothing plugged) until the resume.
#[test]
fn virtio_mem_plugs_nothing_while_paused() {
    const AREA: u64 = 4 << 30;
    let table = common::guest_memory(MEMORY);
    let control =
        MemControl::new(Arc::clone(&table), AREA, 1 << 30, MemBacking::Anonymous).unwrap();
    let mut r = common::rig_on(
        Arc::clone(&table),
        Box::new(Mem::new(Arc::clone(&control), &ThreadContext::default()).unwrap()),
    );
    // The test's view of guest memory is scoped: it must not be held while a plug (a
    // table writer) runs on another thread and this one waits.
    let mock_at = {
        let mem = GuardedMemory::lock_all(&table, None).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        r.set_up(&mock, 16);
        [mock.desc_table_addr(), mock.avail_addr(), mock.used_addr()]
    };
    let used_idx = || {
        let mem = GuardedMemory::lock_all(&table, None).unwrap();
        mem.read_obj::<u16>(GuestAddress(mock_at[2].0 + 2)).unwrap()
    };

    r.pause();
    assert!(r.wait_paused(Instant::now() + DEADLINE));
    control
        .request(2 * BLOCK_SIZE)
        .expect("a resize is taken while paused");
    assert_eq!(control.requested(), 2 * BLOCK_SIZE);
    let _ = r.irq.read(); // the configuration interrupt

    // The driver asks to plug two blocks.
    let (req, resp) = (BUFFERS, BUFFERS + 0x100);
    {
        let mem = GuardedMemory::lock_all(&table, None).unwrap();
        let mut plug = [0u8; REQUEST_LEN];
        plug[8..16].copy_from_slice(&AREA.to_le_bytes());
        plug[16..18].copy_from_slice(&2u16.to_le_bytes());
        mem.write_slice(&plug, GuestAddress(req)).unwrap();
        mem.write_slice(&[0xff; RESPONSE_LEN], GuestAddress(resp))
            .unwrap();
        let mock = MockSplitQueue::create(&mem, mock_at[0], 16);
        mock.add_desc_chains(
            &[
                desc(req, REQUEST_LEN as u32, VRING_DESC_F_NEXT, 1),
                desc(resp, RESPONSE_LEN as u32, VRING_DESC_F_WRITE, 0),
            ],
            0,
        )
        .unwrap();
    }
    r.write(0x50, 0);
    assert!(!r.wait_irq(QUIET), "no request served while paused");
    assert_eq!(control.plugged(), 0, "nothing plugged while paused");
    assert_eq!(used_idx(), 0);

    r.resume();
    r.wait_used(1, used_idx);
    assert_eq!(
        control.plugged(),
        2 * BLOCK_SIZE,
        "plugged after the resume"
    );
    let mem = GuardedMemory::lock_all(&table, None).unwrap();
    assert_eq!(
        mem.read_obj::<u16>(GuestAddress(resp)).unwrap(),
        0,
        "acknowledged"
    );
}

/// A device the driver has not set up is paused at once. A setup and a reset made while
/// paused wait for the resume (in order: the reset drops the setup before it), and the
/// reset does not keep the vCPU waiting; dropping a paused device ends its thread.
#[test]
fn an_inactive_device_pauses_at_once_and_a_paused_one_can_be_dropped() {
    let SlowRig {
        device,
        started,
        release,
        ..
    } = slow_device();
    let mut r = common::rig(Box::new(device), MEMORY);
    let table = Arc::clone(&r.table);
    let mem = GuardedMemory::lock_all(&table, None).unwrap();

    r.pause();
    assert!(
        r.wait_paused(Instant::now() + DEADLINE),
        "a device never set up is paused"
    );

    // The driver sets the device up with rings outside guest memory (served, the setup
    // would need a reset), then resets it and sets it up again with a request — all
    // while paused.
    let nowhere = [64 * MIB, 64 * MIB + 0x1000, 64 * MIB + 0x2000].map(GuestAddress);
    r.set_up_at(nowhere, 16);
    assert_eq!(
        started.recv_timeout(QUIET),
        Err(RecvTimeoutError::Timeout),
        "(a window for the device to check the setup, if it wrongly does)"
    );
    assert!(!r.needs_reset(), "no setup is served while paused");
    let reset = Instant::now();
    r.write(0x70, 0);
    assert!(
        reset.elapsed() < Duration::from_secs(2),
        "a reset while paused does not wait for the resume"
    );
    let mock = MockSplitQueue::new(&mem, 16);
    r.set_up(&mock, 16);
    slow_request(&mock, 0);
    r.write(0x50, 0);
    assert_eq!(
        started.recv_timeout(QUIET),
        Err(RecvTimeoutError::Timeout),
        "no request served while paused"
    );
    assert!(r.wait_paused(Instant::now() + DEADLINE), "still paused");

    r.resume();
    started
        .recv_timeout(DEADLINE)
        .expect("the request of the setup after the reset started");
    release.send(()).unwrap();
    r.wait_used(1, || mock.used().idx().load());
    assert!(
        !r.needs_reset(),
        "the setup reset while paused was dropped unserved"
    );

    r.pause();
    assert!(r.wait_paused(Instant::now() + DEADLINE));
    let dropped = Instant::now();
    drop(r);
    // The thread owned the handler, whose end of `started` closes with it.
    assert_eq!(
        started.recv_timeout(DEADLINE),
        Err(RecvTimeoutError::Disconnected),
        "the paused thread ended"
    );
    assert!(
        dropped.elapsed() < Duration::from_secs(2),
        "dropping a paused device is prompt: {:?}",
        dropped.elapsed()
    );
}
