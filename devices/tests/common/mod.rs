//! A device behind its virtio-mmio transport, over guest memory built in the test, with
//! register access as a driver does it.

// Each test binary uses part of this.
#![allow(dead_code)]

use std::sync::Arc;

use devices::virtio::{Interrupt, MmioTransport, VirtioDevice};
use memory::{RegionSpec, RegionTable, TableConfig};
use vm_device::bus::MmioAddress;
use vm_device::MutDeviceMmio;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

/// The status bit a device sets when the driver must reset it.
pub const NEEDS_RESET: u32 = 64;

pub struct Rig {
    pub transport: MmioTransport,
    pub table: Arc<RegionTable>,
    pub irq: EventFd,
}

/// `device` on `memory` bytes of guest RAM at address 0.
pub fn rig(device: Box<dyn VirtioDevice>, memory: u64) -> Rig {
    let table = Arc::new(RegionTable::new(
        Arc::new(memory::NoSlots),
        None,
        TableConfig::default(),
    ));
    table
        .insert(RegionSpec::anonymous(GuestAddress(0), memory), None)
        .unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
    let transport = MmioTransport::new(device, Arc::clone(&table), interrupt).unwrap();
    Rig {
        transport,
        table,
        irq,
    }
}

impl Rig {
    pub fn read(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.transport.mmio_read(MmioAddress(0), offset, &mut data);
        u32::from_le_bytes(data)
    }

    pub fn write(&mut self, offset: u64, value: u32) {
        self.transport
            .mmio_write(MmioAddress(0), offset, &value.to_le_bytes());
    }

    pub fn needs_reset(&mut self) -> bool {
        self.read(0x70) & NEEDS_RESET != 0
    }
}
