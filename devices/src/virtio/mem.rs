//! virtio-mem: a hotplug area above guest RAM that the guest driver plugs and unplugs in
//! blocks, towards the size the host requests ([`MemControl::request`]).
//!
//! The area is reserved in the region table with one memory slot for all of it; each
//! plugged block is a region inside it: plugging is an insert, unplugging a remove, which
//! drains that block's readers and frees its host memory, which takes it from the guest for
//! good (guarantee 6), without any memory-slot change. Because those are writer operations,
//! requests are served without holding guest-memory read locks: a request is read under
//! the locks, carried out with none held, and answered under the locks again.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use memory::{Backing, GuardedMemory, LazySource, RegionId, RegionSpec, RegionTable};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::worker::{self, memory_deadline, QueueError, QueueHandler, Served, WorkerHandle};
use super::{
    read_config_bytes, ActivateError, Activation, Interrupt, VirtioDevice, INT_CONFIG,
    VIRTIO_F_VERSION_1,
};

/// The virtio device id of virtio-mem.
pub const VIRTIO_ID_MEM: u32 = 24;
/// Plug granularity: a huge page, as QEMU's and Cloud Hypervisor's default. Smaller than
/// Linux's 128 MiB memory block, so its driver works in sub-block mode: it offlines and
/// removes a memory block at once when it unplugs it, where with whole-memory-block device
/// blocks (big-block mode) it first allocates every page of the block ("fake offlining")
/// and then offlines it, which is about 10% slower for the guest.
pub const BLOCK_SIZE: u64 = 2 << 20;
/// Feature: the driver must not touch unplugged memory (it is not backed).
const VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE: u64 = 1 << 1;
const QUEUE_SIZE: u16 = 128;
/// Longest a plug or unplug waits for readers of the blocks it changes.
const WRITER_DEADLINE: Duration = Duration::from_secs(5);

const REQ_PLUG: u16 = 0;
const REQ_UNPLUG: u16 = 1;
const REQ_UNPLUG_ALL: u16 = 2;
const REQ_STATE: u16 = 3;
const RESP_ACK: u16 = 0;
const RESP_NACK: u16 = 1;
const RESP_BUSY: u16 = 2;
const RESP_ERROR: u16 = 3;
const STATE_PLUGGED: u16 = 0;
const STATE_UNPLUGGED: u16 = 1;
const STATE_MIXED: u16 = 2;
const REQUEST_LEN: usize = 24;
const RESPONSE_LEN: usize = 10;

/// How hotplugged memory is backed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemBacking {
    /// Private anonymous memory.
    Anonymous,
    /// Anonymous memory filled on first touch by the userfaultfd fault handler.
    Lazy,
}

/// Errors of a size request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemError {
    /// Beyond the hotplug area.
    #[error("requested {} MiB of hotplug memory, but the area holds {} MiB", .requested >> 20, .size >> 20)]
    TooLarge {
        /// Bytes requested.
        requested: u64,
        /// Size of the hotplug area.
        size: u64,
    },
    /// Not a whole number of blocks.
    #[error(
        "requested {0} bytes of hotplug memory: not a multiple of the {BLOCK_SIZE}-byte block"
    )]
    Unaligned(u64),
}

/// Time of the last size request and how long the guest took to reach it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResizeStats {
    /// Size requests made.
    pub requests: u64,
    /// Blocks plugged and unplugged so far.
    pub plugs: u64,
    /// Blocks unplugged so far.
    pub unplugs: u64,
    /// Time from the last request to plugged == requested, once reached (nanoseconds).
    pub last_latency_ns: Option<u64>,
}

struct MemState {
    requested: u64,
    /// The region of each plugged block.
    blocks: Vec<Option<RegionId>>,
    last_request: Option<Instant>,
    stats: ResizeStats,
    interrupt: Option<Arc<Interrupt>>,
}

/// The host's side of a virtio-mem device: its area, the requested and plugged sizes.
/// Shared between the device thread, the transport (config reads) and the control socket.
pub struct MemControl {
    table: Arc<RegionTable>,
    addr: u64,
    size: u64,
    backing: MemBacking,
    state: Mutex<MemState>,
}

impl std::fmt::Debug for MemControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemControl")
            .field("addr", &self.addr)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// The 16-bit little-endian field at `at` of a request.
fn le16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn response(kind: u16, state: u16) -> [u8; RESPONSE_LEN] {
    let mut r = [0u8; RESPONSE_LEN];
    r[..2].copy_from_slice(&kind.to_le_bytes());
    r[8..].copy_from_slice(&state.to_le_bytes());
    r
}

impl MemControl {
    /// A hotplug area of `size` bytes (whole blocks) at guest address `addr`, reserved in
    /// `table` (one memory slot for the whole area, so plugging and unplugging blocks
    /// never changes a slot: see `memory::RegionTable::reserve_area`).
    pub fn new(
        table: Arc<RegionTable>,
        addr: u64,
        size: u64,
        backing: MemBacking,
    ) -> Result<Arc<Self>, memory::TableError> {
        let blocks = (size / BLOCK_SIZE) as usize;
        let size = blocks as u64 * BLOCK_SIZE;
        table.reserve_area(GuestAddress(addr), size, None)?;
        Ok(Arc::new(MemControl {
            table,
            addr,
            size,
            backing,
            state: Mutex::new(MemState {
                requested: 0,
                blocks: vec![None; blocks],
                last_request: None,
                stats: ResizeStats::default(),
                interrupt: None,
            }),
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Guest address of the area.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Size of the area.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes the host asks the guest to have plugged.
    pub fn requested(&self) -> u64 {
        self.state().requested
    }

    /// Bytes plugged now.
    pub fn plugged(&self) -> u64 {
        self.state().blocks.iter().flatten().count() as u64 * BLOCK_SIZE
    }

    /// Plug and timing counters.
    pub fn stats(&self) -> ResizeStats {
        self.state().stats
    }

    /// Asks the guest to plug or unplug towards `size` bytes; the driver learns it from a
    /// configuration interrupt.
    pub fn request(&self, size: u64) -> Result<(), MemError> {
        if size > self.size {
            return Err(MemError::TooLarge {
                requested: size,
                size: self.size,
            });
        }
        if size % BLOCK_SIZE != 0 {
            return Err(MemError::Unaligned(size));
        }
        let mut state = self.state();
        state.requested = size;
        state.last_request = Some(Instant::now());
        state.stats.requests += 1;
        state.stats.last_latency_ns = None;
        Self::note_progress(&mut state);
        if let Some(interrupt) = &state.interrupt {
            interrupt.raise(INT_CONFIG);
        }
        Ok(())
    }

    /// Records the latency once the plugged size meets the request.
    fn note_progress(state: &mut MemState) {
        let plugged = state.blocks.iter().flatten().count() as u64 * BLOCK_SIZE;
        if plugged == state.requested && state.stats.last_latency_ns.is_none() {
            if let Some(at) = state.last_request {
                state.stats.last_latency_ns = Some(at.elapsed().as_nanos() as u64);
            }
        }
    }

    fn config(&self) -> [u8; 56] {
        let state = self.state();
        let plugged = state.blocks.iter().flatten().count() as u64 * BLOCK_SIZE;
        let mut c = [0u8; 56];
        c[0..8].copy_from_slice(&BLOCK_SIZE.to_le_bytes());
        c[16..24].copy_from_slice(&self.addr.to_le_bytes());
        c[24..32].copy_from_slice(&self.size.to_le_bytes());
        c[32..40].copy_from_slice(&self.size.to_le_bytes()); // usable region
        c[40..48].copy_from_slice(&plugged.to_le_bytes());
        c[48..56].copy_from_slice(&state.requested.to_le_bytes());
        c
    }

    /// The blocks `[first, first + count)` of a request for `addr`, if inside the area.
    fn block_range(&self, addr: u64, count: u16) -> Option<std::ops::Range<usize>> {
        let offset = addr.checked_sub(self.addr)?;
        if count == 0 || offset % BLOCK_SIZE != 0 {
            return None;
        }
        let first = offset / BLOCK_SIZE;
        let end = first.checked_add(u64::from(count))?;
        (end <= self.size / BLOCK_SIZE).then_some(first as usize..end as usize)
    }

    fn spec(&self, block: usize) -> RegionSpec {
        let backing = match self.backing {
            MemBacking::Anonymous => Backing::Anonymous,
            MemBacking::Lazy => Backing::Lazy(LazySource::Zero),
        };
        RegionSpec {
            start: GuestAddress(self.addr + block as u64 * BLOCK_SIZE),
            size: BLOCK_SIZE,
            capacity: BLOCK_SIZE,
            backing,
        }
    }

    fn deadline() -> memory::Deadline {
        Some(Instant::now() + WRITER_DEADLINE)
    }

    fn plug(&self, state: &mut MemState, blocks: std::ops::Range<usize>) -> u16 {
        if blocks.clone().any(|b| state.blocks[b].is_some()) {
            return RESP_ERROR;
        }
        let plugged = state.blocks.iter().flatten().count();
        if ((plugged + blocks.len()) as u64) * BLOCK_SIZE > state.requested {
            return RESP_NACK;
        }
        for b in blocks.clone() {
            match self.table.insert(self.spec(b), Self::deadline()) {
                Ok(id) => state.blocks[b] = Some(id),
                Err(e) => {
                    log::warn!("virtio-mem: cannot plug block {b}: {e}");
                    // Undo this request's blocks: all or nothing.
                    for undo in blocks.start..b {
                        self.unplug_block(state, undo);
                    }
                    return RESP_ERROR;
                }
            }
        }
        state.stats.plugs += blocks.len() as u64;
        RESP_ACK
    }

    /// Removes block `b`; false if it stays plugged (a reader held it past the deadline).
    fn unplug_block(&self, state: &mut MemState, b: usize) -> bool {
        let Some(id) = state.blocks[b] else {
            return true;
        };
        match self.table.remove(id, Self::deadline()) {
            Ok(()) => {
                state.blocks[b] = None;
                state.stats.unplugs += 1;
                true
            }
            Err(e) => {
                log::warn!("virtio-mem: cannot unplug block {b}: {e}");
                false
            }
        }
    }

    fn unplug(&self, state: &mut MemState, blocks: std::ops::Range<usize>) -> u16 {
        if blocks.clone().any(|b| state.blocks[b].is_none()) {
            return RESP_ERROR;
        }
        if blocks.into_iter().all(|b| self.unplug_block(state, b)) {
            RESP_ACK
        } else {
            RESP_BUSY
        }
    }

    /// Carries out one request (no guest-memory locks may be held): the response.
    fn handle(&self, request: &[u8; REQUEST_LEN]) -> [u8; RESPONSE_LEN] {
        let kind = le16(request, 0);
        let addr = u64::from_le_bytes(request[8..16].try_into().unwrap_or_default());
        let count = le16(request, 16);
        let mut state = self.state();
        let result = match kind {
            REQ_PLUG | REQ_UNPLUG | REQ_STATE => match self.block_range(addr, count) {
                None => response(RESP_ERROR, 0),
                Some(blocks) if kind == REQ_PLUG => response(self.plug(&mut state, blocks), 0),
                Some(blocks) if kind == REQ_UNPLUG => response(self.unplug(&mut state, blocks), 0),
                Some(blocks) => {
                    let plugged = blocks
                        .clone()
                        .filter(|b| state.blocks[*b].is_some())
                        .count();
                    let s = match plugged {
                        0 => STATE_UNPLUGGED,
                        n if n == blocks.len() => STATE_PLUGGED,
                        _ => STATE_MIXED,
                    };
                    response(RESP_ACK, s)
                }
            },
            REQ_UNPLUG_ALL => {
                let all = 0..state.blocks.len();
                let done = all.into_iter().all(|b| self.unplug_block(&mut state, b));
                response(if done { RESP_ACK } else { RESP_BUSY }, 0)
            }
            _ => response(RESP_ERROR, 0),
        };
        Self::note_progress(&mut state);
        result
    }
}

/// The virtio-mem device.
#[derive(Debug)]
pub struct Mem {
    control: Arc<MemControl>,
    worker: Option<WorkerHandle>,
}

impl Mem {
    /// The device of `control`'s area.
    pub fn new(control: Arc<MemControl>) -> Self {
        Mem {
            control,
            worker: None,
        }
    }
}

struct MemHandler {
    control: Arc<MemControl>,
}

/// A request and where its response goes, read from `chain`.
fn parse(
    chain: DescriptorChain<&GuardedMemory<'_>>,
    mem: &GuardedMemory<'_>,
) -> Option<([u8; REQUEST_LEN], GuestAddress)> {
    let descs: Vec<_> = chain.collect();
    let req = descs
        .iter()
        .find(|d| !d.is_write_only() && d.len() as usize >= REQUEST_LEN)?;
    let resp = descs
        .iter()
        .find(|d| d.is_write_only() && d.len() as usize >= RESPONSE_LEN)?;
    let mut request = [0u8; REQUEST_LEN];
    mem.read_slice(&mut request, req.addr()).ok()?;
    Some((request, resp.addr()))
}

impl QueueHandler for MemHandler {
    /// Unused: [`MemHandler::process`] serves each request in three steps.
    fn serve(
        &mut self,
        _: usize,
        _: DescriptorChain<&GuardedMemory<'_>>,
        _: &GuardedMemory<'_>,
    ) -> u32 {
        0
    }

    fn process(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        memory: &RegionTable,
    ) -> Result<Served, QueueError> {
        let mut used = false;
        loop {
            let (head, parsed) = {
                let mem = GuardedMemory::lock_all(memory, memory_deadline())?;
                let Some(chain) = queue.iter(&mem)?.next() else {
                    break;
                };
                let head = chain.head_index();
                (head, parse(chain, &mem))
            };
            // No read locks held: plugging and unplugging are writer operations.
            let answer = parsed.map(|(request, at)| (self.control.handle(&request), at));
            let mem = GuardedMemory::lock_all(memory, memory_deadline())?;
            let len = match answer {
                Some((resp, at)) if mem.write_slice(&resp, at).is_ok() => RESPONSE_LEN as u32,
                _ => 0,
            };
            queue.add_used(&mem, head, len)?;
            used = true;
        }
        Ok(Served {
            notify: used,
            more: false,
        })
    }
}

impl VirtioDevice for Mem {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_MEM
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.control.config(), offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        self.control.state().interrupt = Some(Arc::clone(&activation.interrupt));
        let handler = MemHandler {
            control: Arc::clone(&self.control),
        };
        self.worker = Some(worker::spawn("kite_mem".into(), activation, handler)?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
        self.control.state().interrupt = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memory::TableConfig;

    const AREA: u64 = 4 << 30;

    fn control() -> Arc<MemControl> {
        let table = Arc::new(RegionTable::new(
            Arc::new(memory::NoSlots),
            None,
            TableConfig::default(),
        ));
        MemControl::new(table, AREA, 1 << 30, MemBacking::Anonymous).unwrap()
    }

    fn request(kind: u16, addr: u64, blocks: u16) -> [u8; REQUEST_LEN] {
        let mut r = [0u8; REQUEST_LEN];
        r[..2].copy_from_slice(&kind.to_le_bytes());
        r[8..16].copy_from_slice(&addr.to_le_bytes());
        r[16..18].copy_from_slice(&blocks.to_le_bytes());
        r
    }

    fn answer(c: &MemControl, kind: u16, addr: u64, blocks: u16) -> (u16, u16) {
        let r = c.handle(&request(kind, addr, blocks));
        (le16(&r, 0), le16(&r, 8))
    }

    #[test]
    fn plug_and_unplug_follow_the_request() {
        let c = control();
        assert_eq!(c.request(100), Err(MemError::Unaligned(100)));
        assert!(matches!(c.request(2 << 30), Err(MemError::TooLarge { .. })));
        // Nothing requested: plugging is refused.
        assert_eq!(answer(&c, REQ_PLUG, AREA, 1).0, RESP_NACK);
        c.request(2 * BLOCK_SIZE).unwrap();
        assert_eq!(answer(&c, REQ_PLUG, AREA, 2).0, RESP_ACK);
        assert_eq!(c.plugged(), 2 * BLOCK_SIZE);
        assert_eq!(c.table.layout().len(), 2, "a region per block");
        assert_eq!(
            answer(&c, REQ_PLUG, AREA + 2 * BLOCK_SIZE, 1).0,
            RESP_NACK,
            "beyond the request"
        );
        assert_eq!(
            answer(&c, REQ_PLUG, AREA, 1).0,
            RESP_ERROR,
            "already plugged"
        );
        assert_eq!(answer(&c, REQ_STATE, AREA, 2), (RESP_ACK, STATE_PLUGGED));
        assert_eq!(answer(&c, REQ_STATE, AREA, 3), (RESP_ACK, STATE_MIXED));
        assert_eq!(
            answer(&c, REQ_STATE, AREA + 4 * BLOCK_SIZE, 1),
            (RESP_ACK, STATE_UNPLUGGED)
        );
        assert!(c.stats().last_latency_ns.is_some(), "the request was met");
        assert_eq!(answer(&c, REQ_UNPLUG, AREA + BLOCK_SIZE, 1).0, RESP_ACK);
        assert_eq!(
            answer(&c, REQ_UNPLUG, AREA + BLOCK_SIZE, 1).0,
            RESP_ERROR,
            "not plugged"
        );
        assert_eq!(c.plugged(), BLOCK_SIZE);
        assert_eq!(answer(&c, REQ_UNPLUG_ALL, 0, 0).0, RESP_ACK);
        assert_eq!(c.plugged(), 0);
        assert!(c.table.layout().is_empty());
    }

    #[test]
    fn requests_outside_the_area_are_errors() {
        let c = control();
        c.request(1 << 30).unwrap();
        for (addr, blocks) in [
            (AREA - BLOCK_SIZE, 1),
            (AREA + 1, 1),
            (AREA, 0),
            (AREA, 513),
            (AREA + 511 * BLOCK_SIZE, 2),
            (u64::MAX - 10, 1),
            (AREA + 7 * BLOCK_SIZE, u16::MAX),
        ] {
            assert_eq!(
                answer(&c, REQ_PLUG, addr, blocks).0,
                RESP_ERROR,
                "{addr:#x} x{blocks}"
            );
        }
        assert_eq!(answer(&c, 99, AREA, 1).0, RESP_ERROR, "unknown type");
        assert_eq!(c.plugged(), 0);
    }
}
