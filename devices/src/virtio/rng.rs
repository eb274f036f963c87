//! virtio-rng: fills the driver's buffers from the host's getrandom.

use std::io::Write;
use std::sync::Arc;

use memory::GuardedMemory;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::DescriptorChain;

pub use super::counters::RngCounters;
use super::device_thread::{DeviceThread, ThreadContext};
use super::worker::QueueHandler;
use super::{ActivateError, Activation, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

const QUEUE_SIZE: u16 = 256;
/// Most bytes given per request: larger buffers get this much (the driver asks again).
const MAX_REQUEST: usize = 64 << 10;

/// A virtio-rng device.
#[derive(Debug)]
pub struct Rng {
    counters: Arc<RngCounters>,
    thread: DeviceThread,
}

impl Rng {
    /// The device, with its thread `kite_rng`.
    pub fn new(context: &ThreadContext) -> Result<Self, ActivateError> {
        let counters = Arc::new(RngCounters::default());
        let handler = RngHandler {
            buf: vec![0; MAX_REQUEST],
            counters: Arc::clone(&counters),
            handed: Vec::new(),
            counted: 0,
        };
        Ok(Rng {
            counters,
            thread: DeviceThread::spawn("kite_rng", VIRTIO_ID_RNG, handler, context)?,
        })
    }

    /// Its counters, which the device thread updates as requests are used.
    pub fn counters(&self) -> Arc<RngCounters> {
        Arc::clone(&self.counters)
    }
}

struct RngHandler {
    buf: Vec<u8>,
    counters: Arc<RngCounters>,
    /// Bytes the requests of the last run handed to the guest, in order: counted once
    /// they are used.
    handed: Vec<u32>,
    /// Requests of the last run counted so far.
    counted: usize,
}

/// Fills `buf` from getrandom.
fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`, which is valid
        // writable memory for that long.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        done += n as usize;
    }
    Ok(())
}

impl QueueHandler for RngHandler {
    fn serve(&mut self, _index: usize, chain: DescriptorChain<&GuardedMemory<'_>>) -> u32 {
        let handed = self.fill(chain);
        self.handed.push(handed);
        handed
    }

    fn forget_batch(&mut self, _index: usize) {
        self.handed.clear();
        self.counted = 0;
    }

    fn used(&mut self, _index: usize) {
        if let Some(handed) = self.handed.get(self.counted) {
            self.counters.record(u64::from(*handed));
            self.counted += 1;
        }
    }
}

impl RngHandler {
    /// Fills the request's buffers; returns the bytes written to them.
    fn fill(&mut self, chain: DescriptorChain<&GuardedMemory<'_>>) -> u32 {
        let mem = chain.memory();
        let mut writer = match chain.clone().writer(mem) {
            Ok(writer) => writer,
            Err(e) => {
                log::debug!("virtio-rng: unusable buffers: {e}");
                return 0;
            }
        };
        let n = writer.available_bytes().min(MAX_REQUEST);
        let buf = &mut self.buf[..n];
        match fill_random(buf).and_then(|()| writer.write_all(buf)) {
            Ok(()) => n as u32,
            Err(e) => {
                log::debug!("virtio-rng: {e}");
                writer.bytes_written() as u32
            }
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn name(&self) -> String {
        "virtio-rng".into()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
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
