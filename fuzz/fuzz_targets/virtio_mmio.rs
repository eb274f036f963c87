//! The virtio-mmio transport's state machine: register reads and writes of every width
//! at any offset (config space included), in any order, from the input, against a
//! virtio-rng device over 1 MiB of guest memory (rings and buffers wherever the input
//! puts them; its device thread serves whatever gets activated). No access panics or
//! blocks, and the device goes away cleanly afterwards.
#![no_main]

use std::sync::{Arc, OnceLock};

use devices::virtio::device_thread::ThreadContext;
use devices::virtio::rng::Rng;
use devices::virtio::{Interrupt, MmioTransport};
use libfuzzer_sys::fuzz_target;
use memory::{RegionSpec, RegionTable};
use vm_device::bus::MmioAddress;
use vm_device::MutDeviceMmio;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

/// The registers a driver uses, in the order it uses them, and a few it must not.
const OFFSETS: [u64; 32] = [
    0x000, 0x004, 0x008, 0x00c, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044, 0x050,
    0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0a0, 0x0a4, 0x0fc, 0x100, 0x104, 0x108,
    0x13c, 0x0ff, 0x001, 0x0ac, 0x200, 0xffc,
];

fn table() -> &'static Arc<RegionTable> {
    static TABLE: OnceLock<Arc<RegionTable>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let table = Arc::new(RegionTable::default());
        table
            .insert(RegionSpec::anonymous(GuestAddress(0), 1 << 20), None)
            .unwrap();
        table
    })
}

fuzz_target!(|data: &[u8]| {
    let table = table();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let device = Rng::new(&ThreadContext::default()).unwrap();
    let mut transport = MmioTransport::new(
        Box::new(device),
        Arc::clone(table),
        Arc::new(Interrupt::new(irq)),
    )
    .unwrap();
    for op in data.chunks(6) {
        let [kind, reg, value @ ..] = op else {
            break;
        };
        let offset = OFFSETS[usize::from(*reg) % OFFSETS.len()];
        let width = [4, 1, 2, 8][usize::from(kind >> 1) % 4];
        let mut bytes = [0u8; 8];
        bytes[..value.len()].copy_from_slice(value);
        if kind & 1 == 1 {
            transport.mmio_write(MmioAddress(0), offset, &bytes[..width]);
        } else {
            transport.mmio_read(MmioAddress(0), offset, &mut bytes[..width]);
        }
    }
    drop(transport);
});
