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
    /// The transport's registers, accessed on a thread of their own as a vCPU's exits
    /// are: the test's thread, the driver, may hold views of guest memory meanwhile,
    /// and the transport takes its own (a thread must not hold two).
    vcpu: Option<std::sync::mpsc::Sender<Access>>,
    vcpu_thread: Option<std::thread::JoinHandle<()>>,
    pub table: Arc<RegionTable>,
    pub irq: EventFd,
}

/// A register access, answered on `reply` with the value read (0 for a write).
struct Access {
    offset: u64,
    write: Option<u32>,
    reply: std::sync::mpsc::Sender<u32>,
}

/// Guest memory of `memory` bytes of RAM at address 0.
pub fn guest_memory(memory: u64) -> Arc<RegionTable> {
    let table = Arc::new(RegionTable::new(
        Arc::new(memory::NoSlots),
        None,
        TableConfig::default(),
    ));
    table
        .insert(RegionSpec::anonymous(GuestAddress(0), memory), None)
        .unwrap();
    table
}

/// `device` on `memory` bytes of guest RAM at address 0.
pub fn rig(device: Box<dyn VirtioDevice>, memory: u64) -> Rig {
    rig_on(guest_memory(memory), device)
}

/// `device` on guest memory `table`.
pub fn rig_on(table: Arc<RegionTable>, device: Box<dyn VirtioDevice>) -> Rig {
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
    let mut transport = MmioTransport::new(device, Arc::clone(&table), interrupt).unwrap();
    let (vcpu, accesses) = std::sync::mpsc::channel::<Access>();
    let vcpu_thread = std::thread::Builder::new()
        .name("test-vcpu".into())
        .spawn(move || {
            for access in accesses {
                let mut data = [0u8; 4];
                match access.write {
                    Some(value) => {
                        transport.mmio_write(MmioAddress(0), access.offset, &value.to_le_bytes())
                    }
                    None => transport.mmio_read(MmioAddress(0), access.offset, &mut data),
                }
                let _ = access.reply.send(u32::from_le_bytes(data));
            }
        })
        .unwrap();
    Rig {
        vcpu: Some(vcpu),
        vcpu_thread: Some(vcpu_thread),
        table,
        irq,
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // The thread ends when the channel closes, dropping the transport there.
        drop(self.vcpu.take());
        if let Some(thread) = self.vcpu_thread.take() {
            let _ = thread.join();
        }
    }
}

impl Rig {
    fn access(&mut self, offset: u64, write: Option<u32>) -> u32 {
        let (reply, answer) = std::sync::mpsc::channel();
        let vcpu = self.vcpu.as_ref().expect("the vCPU thread runs");
        vcpu.send(Access {
            offset,
            write,
            reply,
        })
        .expect("the vCPU thread runs");
        answer
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("a register access completes")
    }

    pub fn read(&mut self, offset: u64) -> u32 {
        self.access(offset, None)
    }

    pub fn write(&mut self, offset: u64, value: u32) {
        self.access(offset, Some(value));
    }

    pub fn needs_reset(&mut self) -> bool {
        self.read(0x70) & NEEDS_RESET != 0
    }
}
