//! A snapshot's state file, as an attacker or a broken disk may hand it to `kite run
//! --restore`: reading it never panics; what reads survives a round trip; the consistency
//! check never panics; and its device states, restored onto fresh devices (a virtio-rng
//! transport over 1 MiB of guest memory, the serial port, a 128 MiB hotplug area), are
//! taken or refused without a panic or a hang.
#![no_main]

use std::sync::Arc;

use devices::legacy::SerialConsole;
use devices::virtio::device_thread::ThreadContext;
use devices::virtio::mem::{MemBacking, MemControl};
use devices::virtio::rng::Rng;
use devices::virtio::{Interrupt, MmioTransport};
use libfuzzer_sys::fuzz_target;
use memory::{Backing, RegionSpec, RegionTable};
use vm_memory::GuestAddress;
use vmm::snapshot::{check_state, format};
use vmm_sys_util::eventfd::EventFd;

fn eventfd() -> EventFd {
    EventFd::new(libc::EFD_NONBLOCK).unwrap()
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let checked = format::from_text(text);
    // Past the checksum too (which a fuzzer can hardly keep right): the state as a
    // restore would read it, had the checksum matched.
    let snapshot = match checked {
        Ok(snapshot) => snapshot,
        Err(_) => match serde_json::from_str::<format::Envelope<format::VmSnapshot>>(text) {
            Ok(envelope) => envelope.state,
            Err(_) => return,
        },
    };
    let written = format::to_text(&snapshot).unwrap();
    let again = format::from_text(&written).unwrap();
    assert_eq!(format::to_text(&again).unwrap(), written);
    if check_state(&snapshot).is_err() {
        return;
    }
    let _ = SerialConsole::restored(
        &snapshot.serial,
        eventfd(),
        Box::new(std::io::sink()),
        eventfd(),
    );
    let table = Arc::new(RegionTable::default());
    table
        .insert(RegionSpec::anonymous(GuestAddress(0), 1 << 20), None)
        .unwrap();
    for state in snapshot.virtio.iter().take(4) {
        let device = Rng::new(&ThreadContext::default()).unwrap();
        let mut transport = MmioTransport::new(
            Box::new(device),
            Arc::clone(&table),
            Arc::new(Interrupt::new(eventfd())),
        )
        .unwrap();
        let _ = transport.restore_state(state);
    }
    if let Some(state) = &snapshot.hotplug {
        let control = MemControl::new(
            Arc::clone(&table),
            4 << 30,
            128 << 20,
            MemBacking::Anonymous,
        )
        .unwrap();
        let _ = control.restore(state, |_| Backing::Anonymous);
    }
});
