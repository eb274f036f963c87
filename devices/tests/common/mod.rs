//! A device behind its virtio-mmio transport, over guest memory built in the test, with
//! register access as a driver does it.

// Each test binary uses part of this.
#![allow(dead_code)]

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::virtio::device_thread::{DeviceThread, ThreadContext};
use devices::virtio::persist::TransportState;
use devices::virtio::worker::QueueHandler;
use devices::virtio::{ActivateError, Activation, Interrupt, MmioTransport, VirtioDevice};
use memory::{GuardedMemory, RegionSpec, RegionTable, TableConfig};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::DescriptorChain;
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

/// A register access, answered on `reply` with the value read (0 for a write), or a
/// pause call, answered with 1 for true.
struct Access {
    op: Op,
    reply: std::sync::mpsc::Sender<u32>,
}

/// What the VMM's threads do with a transport.
enum Op {
    Read(u64),
    Write(u64, u32),
    Pause,
    Resume,
    WaitPaused(Instant),
    Save(std::sync::mpsc::Sender<Result<TransportState, String>>),
    Restore(
        Box<TransportState>,
        std::sync::mpsc::Sender<Result<(), String>>,
    ),
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
                match access.op {
                    Op::Write(offset, value) => {
                        transport.mmio_write(MmioAddress(0), offset, &value.to_le_bytes())
                    }
                    Op::Read(offset) => transport.mmio_read(MmioAddress(0), offset, &mut data),
                    Op::Pause => transport.pause(),
                    Op::Resume => transport.resume(),
                    Op::WaitPaused(deadline) => {
                        data[0] = u8::from(transport.wait_paused(deadline));
                    }
                    Op::Save(to) => {
                        let _ = to.send(transport.save_state());
                    }
                    Op::Restore(state, to) => {
                        let _ = to.send(transport.restore_state(&state));
                    }
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
    fn access(&mut self, op: Op) -> u32 {
        let (reply, answer) = std::sync::mpsc::channel();
        let vcpu = self.vcpu.as_ref().expect("the vCPU thread runs");
        vcpu.send(Access { op, reply })
            .expect("the vCPU thread runs");
        answer
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("a register access completes")
    }

    pub fn read(&mut self, offset: u64) -> u32 {
        self.access(Op::Read(offset))
    }

    pub fn write(&mut self, offset: u64, value: u32) {
        self.access(Op::Write(offset, value));
    }

    /// `MmioTransport::pause`, as the VMM calls it.
    pub fn pause(&mut self) {
        self.access(Op::Pause);
    }

    /// `MmioTransport::resume`.
    pub fn resume(&mut self) {
        self.access(Op::Resume);
    }

    /// `MmioTransport::wait_paused`.
    pub fn wait_paused(&mut self, deadline: Instant) -> bool {
        self.access(Op::WaitPaused(deadline)) == 1
    }

    /// `MmioTransport::save_state`.
    pub fn save_state(&mut self) -> Result<TransportState, String> {
        let (to, from) = std::sync::mpsc::channel();
        self.access(Op::Save(to));
        from.recv().expect("an answer")
    }

    /// `MmioTransport::restore_state`.
    pub fn restore_state(&mut self, state: &TransportState) -> Result<(), String> {
        let (to, from) = std::sync::mpsc::channel();
        self.access(Op::Restore(Box::new(state.clone()), to));
        from.recv().expect("an answer")
    }

    pub fn needs_reset(&mut self) -> bool {
        self.read(0x70) & NEEDS_RESET != 0
    }
}

/// How long a test waits for the device.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Waits for `done` to hold, failing the test after [`DEADLINE`].
pub fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {DEADLINE:?}");
        std::thread::yield_now();
    }
}

pub const STATUS_ACK_DRIVER: u32 = 1 | 2;
pub const FEATURES_OK: u32 = 8;
pub const DRIVER_OK: u32 = 4;

impl Rig {
    /// Negotiates every offered feature and sets up queue 0 at the mock's rings, of `size`.
    pub fn set_up(&mut self, mock: &MockSplitQueue<'_, GuardedMemory<'_>>, size: u32) {
        let rings = [mock.desc_table_addr(), mock.avail_addr(), mock.used_addr()];
        self.set_up_at(rings, size);
    }

    /// Negotiates every offered feature and sets up queue 0 with its descriptor table,
    /// available and used rings at `rings`, of `size`.
    pub fn set_up_at(&mut self, rings: [GuestAddress; 3], size: u32) {
        self.write(0x70, 0);
        self.write(0x70, STATUS_ACK_DRIVER);
        for sel in 0..2 {
            self.write(0x14, sel);
            let features = self.read(0x10);
            self.write(0x24, sel);
            self.write(0x20, features);
        }
        self.write(0x70, STATUS_ACK_DRIVER | FEATURES_OK);
        assert_ne!(self.read(0x70) & FEATURES_OK, 0);
        self.write(0x30, 0);
        self.write(0x38, size);
        for (low, addr) in [0x80, 0x90, 0xa0].into_iter().zip(rings) {
            self.write(low, addr.0 as u32);
            self.write(low + 4, (addr.0 >> 32) as u32);
        }
        self.write(0x44, 1);
        self.write(0x70, STATUS_ACK_DRIVER | FEATURES_OK | DRIVER_OK);
    }

    /// Notifies queue 0 and waits until the used index reaches `expected`.
    pub fn kick_and_wait(&mut self, mock: &MockSplitQueue<'_, GuardedMemory<'_>>, expected: u16) {
        self.write(0x50, 0);
        self.wait_used(expected, || mock.used().idx().load());
    }

    /// Waits, woken by the device's interrupts, until `used_idx()` reaches `expected`.
    pub fn wait_used(&self, expected: u16, used_idx: impl Fn() -> u16) {
        let deadline = Instant::now() + DEADLINE;
        while used_idx() < expected {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the device did not complete within {DEADLINE:?}"
            );
            self.wait_irq(left.min(Duration::from_millis(100)));
            let _ = self.irq.read();
        }
    }

    /// Waits up to `timeout` for the interrupt; whether it was raised.
    pub fn wait_irq(&self, timeout: Duration) -> bool {
        let mut fd = libc::pollfd {
            fd: self.irq.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the length given.
        unsafe { libc::poll(&mut fd, 1, timeout.as_millis() as i32) == 1 }
    }
}

pub fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next))
}

pub fn header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

/// A stand-in device: `handler` serves its one queue on a device thread, behind the
/// real transport (a slow disk, a device that never finishes, ...).
pub struct ThreadDevice {
    thread: DeviceThread,
    device_type: u32,
    queue_sizes: [u16; 1],
}

impl ThreadDevice {
    pub fn new<H: QueueHandler>(name: &str, device_type: u32, queue_size: u16, handler: H) -> Self {
        ThreadDevice {
            thread: DeviceThread::spawn(name, device_type, handler, &ThreadContext::default())
                .unwrap(),
            device_type,
            queue_sizes: [queue_size],
        }
    }
}

impl VirtioDevice for ThreadDevice {
    fn device_type(&self) -> u32 {
        self.device_type
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }
    fn features(&self) -> u64 {
        devices::virtio::VIRTIO_F_VERSION_1
    }
    fn read_config(&self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.thread.activate(activation)
    }
    fn reset(&mut self) {
        self.thread.stop();
    }
    fn thread(&self) -> Option<&DeviceThread> {
        Some(&self.thread)
    }

    fn thread_mut(&mut self) -> Option<&mut DeviceThread> {
        Some(&mut self.thread)
    }
}

/// A device whose requests take as long as the test wants (a slow disk): each tells the
/// test it started, then waits to be let go.
pub struct SlowHandler {
    started: Sender<()>,
    release: Receiver<()>,
    serving: Arc<AtomicUsize>,
    overlapped: Arc<AtomicBool>,
}

impl QueueHandler for SlowHandler {
    fn serve(&mut self, _: usize, _: DescriptorChain<&GuardedMemory<'_>>) -> u32 {
        if self.serving.fetch_add(1, Ordering::SeqCst) > 0 {
            self.overlapped.store(true, Ordering::SeqCst);
        }
        let _ = self.started.send(());
        let _ = self.release.recv_timeout(DEADLINE);
        self.serving.fetch_sub(1, Ordering::SeqCst);
        1
    }
}

/// A [`SlowHandler`] device, with the test's ends of its requests: `started` tells a request
/// began, `release` lets it finish; `serving` counts requests in progress; `overlapped`
/// says two ever were.
pub struct SlowRig {
    pub device: ThreadDevice,
    pub started: Receiver<()>,
    pub release: Sender<()>,
    pub serving: Arc<AtomicUsize>,
    pub overlapped: Arc<AtomicBool>,
}

pub fn slow_device() -> SlowRig {
    let (started_tx, started) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel();
    let serving = Arc::new(AtomicUsize::new(0));
    let overlapped = Arc::new(AtomicBool::new(false));
    let handler = SlowHandler {
        started: started_tx,
        release: release_rx,
        serving: Arc::clone(&serving),
        overlapped: Arc::clone(&overlapped),
    };
    let device = ThreadDevice::new("slow", 4, 16, handler);
    SlowRig {
        device,
        started,
        release,
        serving,
        overlapped,
    }
}
