//! virtio-mem: a hotplug area above guest RAM that the guest driver plugs and unplugs in
//! blocks, towards the size the host requests ([`MemControl::request`]).
//!
//! The area is reserved in the region table with one memory slot for all of it; each
//! plugged block is a region inside it: plugging is an insert, unplugging a remove, which
//! drains that block's readers and frees its host memory, which takes it from the guest for
//! good (guarantee 6), without any memory-slot change. Because those are writer operations,
//! requests are served without holding guest-memory read locks: a request is read under
//! the locks, carried out with none held, and answered under the locks again.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use memory::{Backing, GuardedMemory, LazySource, RegionId, RegionSpec, RegionTable, TableError};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::device_thread::{DeviceThread, ThreadContext};
use super::worker::{memory_deadline, next_access, QueueError, QueueHandler, Served, Stopping};
use super::{
    read_config_bytes, ActivateError, Activation, Interrupt, VirtioDevice, INT_CONFIG,
    VIRTIO_F_VERSION_1,
};
use crate::guest_log::GuestLog;

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
/// Bytes of a virtio-mem request.
pub const REQUEST_LEN: usize = 24;
/// Bytes of a virtio-mem response.
pub const RESPONSE_LEN: usize = 10;

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

/// What a snapshot keeps of a hotplug area: where it is, the request, the plugged blocks.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemState {
    /// Guest address of the area.
    pub addr: u64,
    /// Its size.
    pub size: u64,
    /// Bytes the host asked for.
    pub requested: u64,
    /// The plugged blocks, by index in the area.
    pub plugged: Vec<u64>,
    /// The configuration generation.
    pub generation: u32,
}

/// Errors restoring a hotplug area.
#[derive(Debug, thiserror::Error)]
pub enum MemRestoreError {
    /// The snapshot's area is not this one.
    #[error("the snapshot's hotplug area ({0}) is not this VM's ({1})")]
    OtherArea(String, String),
    /// A plugged block is outside the area or plugged twice.
    #[error("the snapshot's plugged block {0} is not in the area, or twice in it")]
    BadBlock(u64),
    /// The request does not fit the area.
    #[error("the snapshot's request: {0}")]
    Request(MemError),
    /// A block could not be plugged.
    #[error("cannot plug block {block}: {source}")]
    Plug {
        /// The block.
        block: u64,
        /// Why.
        source: TableError,
    },
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

/// What the driver reads in the configuration space, and the host's request. Changed under
/// a short lock that is never held across a table change, so a vCPU reading the
/// configuration never waits for a plug or unplug.
struct MemConfig {
    requested: u64,
    plugged_blocks: u64,
    /// Bumped on every change of the above: a driver reads a 64-bit field in two 32-bit
    /// accesses and compares the generation before and after.
    generation: u32,
    last_request: Option<Instant>,
    stats: ResizeStats,
    /// The driver's interrupt, while the device is active.
    interrupt: Option<Arc<Interrupt>>,
}

impl MemConfig {
    /// Records the latency once the plugged size meets the request.
    fn note_progress(&mut self) {
        if self.plugged_blocks * BLOCK_SIZE == self.requested
            && self.stats.last_latency_ns.is_none()
        {
            if let Some(at) = self.last_request {
                self.stats.last_latency_ns = Some(at.elapsed().as_nanos() as u64);
            }
        }
    }
}

/// The host's side of a virtio-mem device: its area, the requested and plugged sizes.
/// Shared between the device thread, the transport (config reads) and the control socket.
pub struct MemControl {
    table: Arc<RegionTable>,
    addr: u64,
    size: u64,
    backing: MemBacking,
    /// The region of each plugged block. Held by the device thread across plugs and
    /// unplugs (table writers), never by a vCPU or the control socket.
    blocks: Mutex<Vec<Option<RegionId>>>,
    config: Mutex<MemConfig>,
    /// Plugs and unplugs the driver asks for that fail, rate-limited.
    log: GuestLog,
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
            blocks: Mutex::new(vec![None; blocks]),
            config: Mutex::new(MemConfig {
                requested: 0,
                plugged_blocks: 0,
                generation: 0,
                last_request: None,
                stats: ResizeStats::default(),
                interrupt: None,
            }),
            log: GuestLog::new("virtio-mem"),
        }))
    }

    fn config_state(&self) -> std::sync::MutexGuard<'_, MemConfig> {
        self.config.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn blocks(&self) -> std::sync::MutexGuard<'_, Vec<Option<RegionId>>> {
        self.blocks.lock().unwrap_or_else(|e| e.into_inner())
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
        self.config_state().requested
    }

    /// Bytes plugged now.
    pub fn plugged(&self) -> u64 {
        self.config_state().plugged_blocks * BLOCK_SIZE
    }

    /// Whether the guest's driver has set the device up (`DRIVER_OK`) and not reset it
    /// since: a size request made before then waits for the driver.
    pub fn driver_ready(&self) -> bool {
        self.config_state().interrupt.is_some()
    }

    /// Plug and timing counters.
    pub fn stats(&self) -> ResizeStats {
        self.config_state().stats
    }

    /// The configuration generation (see [`VirtioDevice::config_generation`]).
    pub fn generation(&self) -> u32 {
        self.config_state().generation
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
        let mut config = self.config_state();
        config.requested = size;
        config.generation = config.generation.wrapping_add(1);
        config.last_request = Some(Instant::now());
        config.stats.requests += 1;
        config.stats.last_latency_ns = None;
        config.note_progress();
        if let Some(interrupt) = &config.interrupt {
            interrupt.raise(INT_CONFIG);
        }
        Ok(())
    }

    /// Its state, for a snapshot (the device paused: no plug or unplug under way).
    pub fn state(&self) -> MemState {
        let plugged = self
            .blocks()
            .iter()
            .enumerate()
            .filter(|(_, id)| id.is_some())
            .map(|(b, _)| b as u64)
            .collect();
        let config = self.config_state();
        MemState {
            addr: self.addr,
            size: self.size,
            requested: config.requested,
            plugged,
            generation: config.generation,
        }
    }

    /// Plugs the blocks `state` had plugged, each backed as `backing` says for its guest
    /// address (its memory as the snapshot kept it), and takes its request and
    /// generation. For a fresh area with nothing plugged; on an error the blocks plugged
    /// so far stay (the VM being restored is dropped).
    pub fn restore(
        &self,
        state: &MemState,
        backing: impl Fn(u64) -> Backing,
    ) -> Result<(), MemRestoreError> {
        let area = |addr: u64, size: u64| format!("{} MiB at {addr:#x}", size >> 20);
        if (state.addr, state.size) != (self.addr, self.size) {
            return Err(MemRestoreError::OtherArea(
                area(state.addr, state.size),
                area(self.addr, self.size),
            ));
        }
        if state.requested > self.size || state.requested % BLOCK_SIZE != 0 {
            return Err(MemRestoreError::Request(MemError::TooLarge {
                requested: state.requested,
                size: self.size,
            }));
        }
        let mut blocks = self.blocks();
        for &block in &state.plugged {
            let b = usize::try_from(block).unwrap_or(usize::MAX);
            if blocks.get(b).is_none_or(Option::is_some) {
                return Err(MemRestoreError::BadBlock(block));
            }
            let mut spec = self.spec(b);
            spec.backing = backing(spec.start.0);
            let id = self
                .table
                .insert(spec, Self::deadline())
                .map_err(|source| MemRestoreError::Plug { block, source })?;
            blocks[b] = Some(id);
        }
        let mut config = self.config_state();
        config.plugged_blocks = state.plugged.len() as u64;
        config.requested = state.requested;
        config.generation = state.generation;
        Ok(())
    }

    /// Adds `plugged` and subtracts `unplugged` blocks from the plugged size.
    fn count_blocks(&self, plugged: u64, unplugged: u64) {
        let mut config = self.config_state();
        config.plugged_blocks = config.plugged_blocks + plugged - unplugged;
        config.generation = config.generation.wrapping_add(1);
        config.stats.plugs += plugged;
        config.stats.unplugs += unplugged;
        config.note_progress();
    }

    fn config(&self) -> [u8; 56] {
        let config = self.config_state();
        let mut c = [0u8; 56];
        c[0..8].copy_from_slice(&BLOCK_SIZE.to_le_bytes());
        c[16..24].copy_from_slice(&self.addr.to_le_bytes());
        c[24..32].copy_from_slice(&self.size.to_le_bytes());
        c[32..40].copy_from_slice(&self.size.to_le_bytes()); // usable region
        c[40..48].copy_from_slice(&(config.plugged_blocks * BLOCK_SIZE).to_le_bytes());
        c[48..56].copy_from_slice(&config.requested.to_le_bytes());
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

    fn plug(&self, blocks: &mut [Option<RegionId>], range: std::ops::Range<usize>) -> u16 {
        if blocks[range.clone()].iter().any(Option::is_some) {
            return RESP_ERROR;
        }
        let fits = {
            let config = self.config_state();
            (config.plugged_blocks + range.len() as u64) * BLOCK_SIZE <= config.requested
        };
        if !fits {
            return RESP_NACK;
        }
        for b in range.clone() {
            match self.table.insert(self.spec(b), Self::deadline()) {
                Ok(id) => blocks[b] = Some(id),
                Err(e) => {
                    self.log
                        .warn("plug failed", || format!("cannot plug block {b}: {e}"));
                    // Undo this request's blocks: all or nothing.
                    for undo in &mut blocks[range.start..b] {
                        if let Some(id) = *undo {
                            if self.table.remove(id, Self::deadline()).is_ok() {
                                *undo = None;
                            } else {
                                // Stays plugged: count it, so sizes stay true.
                                self.count_blocks(1, 0);
                            }
                        }
                    }
                    return RESP_ERROR;
                }
            }
        }
        self.count_blocks(range.len() as u64, 0);
        RESP_ACK
    }

    /// Removes block `b`; false if it stays plugged (a reader held it past the deadline).
    fn unplug_block(&self, blocks: &mut [Option<RegionId>], b: usize) -> bool {
        let Some(id) = blocks[b] else {
            return true;
        };
        match self.table.remove(id, Self::deadline()) {
            Ok(()) => {
                blocks[b] = None;
                self.count_blocks(0, 1);
                true
            }
            // The block left the guest; only stopping lazy population or freeing its
            // memory failed (the table says so): it is unplugged.
            Err(e @ (TableError::Lazy(_) | TableError::Region(_))) => {
                self.log.warn("unplug cleanup failed", || {
                    format!("block {b} unplugged: {e}")
                });
                blocks[b] = None;
                self.count_blocks(0, 1);
                true
            }
            Err(e) => {
                self.log
                    .warn("unplug failed", || format!("cannot unplug block {b}: {e}"));
                false
            }
        }
    }

    fn unplug(&self, blocks: &mut [Option<RegionId>], range: std::ops::Range<usize>) -> u16 {
        if blocks[range.clone()].iter().any(Option::is_none) {
            return RESP_ERROR;
        }
        if range.into_iter().all(|b| self.unplug_block(blocks, b)) {
            RESP_ACK
        } else {
            RESP_BUSY
        }
    }

    /// Carries out one driver request (plug, unplug, unplug all, state), as the device
    /// thread does: the response. No guest-memory locks may be held (plugging and
    /// unplugging are region-table writers).
    pub fn handle_request(&self, request: &[u8; REQUEST_LEN]) -> [u8; RESPONSE_LEN] {
        let kind = le16(request, 0);
        let addr = u64::from_le_bytes(request[8..16].try_into().unwrap_or_default());
        let count = le16(request, 16);
        let mut blocks = self.blocks();
        match kind {
            REQ_PLUG | REQ_UNPLUG | REQ_STATE => match self.block_range(addr, count) {
                None => response(RESP_ERROR, 0),
                Some(range) if kind == REQ_PLUG => response(self.plug(&mut blocks, range), 0),
                Some(range) if kind == REQ_UNPLUG => response(self.unplug(&mut blocks, range), 0),
                Some(range) => {
                    let plugged = blocks[range.clone()].iter().flatten().count();
                    let s = match plugged {
                        0 => STATE_UNPLUGGED,
                        n if n == range.len() => STATE_PLUGGED,
                        _ => STATE_MIXED,
                    };
                    response(RESP_ACK, s)
                }
            },
            REQ_UNPLUG_ALL => {
                let done = (0..blocks.len()).all(|b| self.unplug_block(&mut blocks, b));
                response(if done { RESP_ACK } else { RESP_BUSY }, 0)
            }
            _ => response(RESP_ERROR, 0),
        }
    }
}

/// The virtio-mem device.
#[derive(Debug)]
pub struct Mem {
    control: Arc<MemControl>,
    thread: DeviceThread,
}

impl Mem {
    /// The device of `control`'s area, with its thread `kite_mem`.
    pub fn new(control: Arc<MemControl>, context: &ThreadContext) -> Result<Self, ActivateError> {
        let handler = MemHandler {
            control: Arc::clone(&control),
        };
        Ok(Mem {
            control,
            thread: DeviceThread::spawn("kite_mem", VIRTIO_ID_MEM, handler, context)?,
        })
    }
}

struct MemHandler {
    control: Arc<MemControl>,
}

/// Requests served before the device thread looks at its other events (a stop request):
/// each may plug or unplug many blocks.
const MEM_BUDGET: usize = 16;

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
    fn serve(&mut self, _: usize, _: DescriptorChain<&GuardedMemory<'_>>) -> u32 {
        0
    }

    /// Serves up to [`MEM_BUDGET`] requests, each read holding the guest memory it
    /// touches, carried out with nothing held, and answered holding memory again.
    fn process(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        memory: &RegionTable,
        stopping: Stopping<'_>,
    ) -> Result<Served, QueueError> {
        let mut served = 0;
        let mut mem = GuardedMemory::new(memory, memory_deadline());
        while served < MEM_BUDGET && !stopping.hold() {
            let next_avail = queue.next_avail();
            next_access(&mut mem);
            let request = mem.retry(|mem| {
                queue.set_next_avail(next_avail);
                if stopping.requested() {
                    return Ok(None); // reset while waiting for a writer
                }
                let available = queue
                    .avail_idx(mem, Ordering::Acquire)?
                    .0
                    .wrapping_sub(next_avail);
                if available == 0 {
                    return Ok(None);
                }
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    return Err(QueueError::Unreadable {
                        announced: usize::from(available),
                        read: 0,
                    });
                };
                let head = chain.head_index();
                Ok(Some((head, parse(chain, mem))))
            })??;
            let Some((head, parsed)) = request else {
                break;
            };
            // Nothing held: plugging and unplugging are writer operations.
            mem.release();
            let answer = parsed.map(|(request, at)| (self.control.handle_request(&request), at));
            if stopping.requested() {
                break; // reset meanwhile: the driver has forgotten the request
            }
            let next_used = queue.next_used();
            next_access(&mut mem);
            let used = mem.retry(|mem| {
                queue.set_next_used(next_used);
                if stopping.requested() {
                    return Ok(false);
                }
                let len = match answer {
                    Some((resp, at)) if mem.write_slice(&resp, at).is_ok() => RESPONSE_LEN as u32,
                    _ => 0,
                };
                if mem.missed() {
                    return Ok(false); // void: run again, the ring untouched
                }
                queue.add_used(mem, head, len).map(|()| true)
            })??;
            mem.release();
            if !used {
                break;
            }
            served += 1;
        }
        Ok(Served {
            notify: served > 0,
            more: served == MEM_BUDGET,
        })
    }
}

impl VirtioDevice for Mem {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_MEM
    }

    fn name(&self) -> String {
        "virtio-mem".into()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE
    }

    /// The driver must promise not to touch unplugged memory: it is not backed, and a
    /// vCPU that touches it stops the VM.
    fn required_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE
    }

    fn config_generation(&self) -> u32 {
        self.control.generation()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.control.config(), offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let interrupt = Arc::clone(&activation.interrupt);
        self.thread.activate(activation)?;
        self.control.config_state().interrupt = Some(interrupt);
        Ok(())
    }

    fn reset(&mut self) {
        self.thread.stop();
        self.control.config_state().interrupt = None;
    }

    /// No plug or unplug while paused; size requests are still taken meanwhile.
    fn thread(&self) -> Option<&DeviceThread> {
        Some(&self.thread)
    }

    fn thread_mut(&mut self) -> Option<&mut DeviceThread> {
        Some(&mut self.thread)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memory::TableConfig;
    use vm_memory::Address;

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
        let r = c.handle_request(&request(kind, addr, blocks));
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

    #[test]
    fn every_size_change_bumps_the_generation() {
        let c = control();
        let g0 = c.generation();
        c.request(2 * BLOCK_SIZE).unwrap();
        let g1 = c.generation();
        assert_ne!(g1, g0, "a new requested size");
        assert_eq!(answer(&c, REQ_PLUG, AREA, 2).0, RESP_ACK);
        let g2 = c.generation();
        assert_ne!(g2, g1, "a new plugged size");
        assert_eq!(answer(&c, REQ_STATE, AREA, 2).0, RESP_ACK);
        assert_eq!(c.generation(), g2, "no change, no new generation");
        assert_eq!(answer(&c, REQ_UNPLUG, AREA, 1).0, RESP_ACK);
        assert_ne!(c.generation(), g2, "unplugging changes the plugged size");
    }

    #[test]
    fn configuration_reads_do_not_wait_for_an_unplug() {
        let c = control();
        c.request(BLOCK_SIZE).unwrap();
        assert_eq!(answer(&c, REQ_PLUG, AREA, 1).0, RESP_ACK);
        // A reader of the block (a device request in flight) holds the unplug up.
        let reader = c.table.lock_region(GuestAddress(AREA), None).unwrap();
        let unplug = {
            let c = Arc::clone(&c);
            std::thread::spawn(move || answer(&c, REQ_UNPLUG, AREA, 1).0)
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.table.metrics().writers_draining == 0 {
            assert!(Instant::now() < deadline, "the unplug starts waiting");
            std::thread::yield_now();
        }
        // What a vCPU does on a configuration read, while the unplug waits.
        let (read, config) = std::sync::mpsc::channel();
        {
            let c = Arc::clone(&c);
            std::thread::spawn(move || {
                let _ = read.send((c.generation(), c.config(), c.plugged(), c.driver_ready()));
            });
        }
        let (_, config, plugged, ready) = config
            .recv_timeout(WRITER_DEADLINE / 2)
            .expect("a configuration read does not wait for the unplug");
        assert_eq!(plugged, BLOCK_SIZE);
        assert_eq!(config[40..48], BLOCK_SIZE.to_le_bytes());
        assert!(!ready, "no driver yet");
        drop(reader);
        assert_eq!(unplug.join().unwrap(), RESP_ACK);
        assert_eq!(c.plugged(), 0);
    }

    #[test]
    fn requests_are_served_in_budgets() {
        use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
        use virtio_queue::desc::{split::Descriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;
        const REQUESTS: u16 = 40;
        let c = control();
        c.table
            .insert(RegionSpec::anonymous(GuestAddress(0), 1 << 20), None)
            .unwrap();
        let (mut queue, used) = {
            let mem = GuardedMemory::lock_all(&c.table, None).unwrap();
            let mock = MockSplitQueue::new(&mem, 128);
            let mut descs = Vec::new();
            for i in 0..u64::from(REQUESTS) {
                let at = 0x8_0000 + i * 64;
                mem.write_slice(&request(REQ_STATE, AREA, 1), GuestAddress(at))
                    .unwrap();
                let flags = VRING_DESC_F_NEXT as u16;
                descs.push(RawDescriptor::from(Descriptor::new(at, 24, flags, 0)));
                let flags = VRING_DESC_F_WRITE as u16;
                descs.push(RawDescriptor::from(Descriptor::new(at + 32, 10, flags, 0)));
            }
            mock.add_desc_chains(&descs, 0).unwrap();
            (mock.create_queue::<Queue>().unwrap(), mock.used_addr())
        };
        let used_idx = || {
            let mem = GuardedMemory::lock_all(&c.table, None).unwrap();
            mem.read_obj::<u16>(used.unchecked_add(2)).unwrap()
        };
        let mut handler = MemHandler {
            control: Arc::clone(&c),
        };
        let mut rounds = Vec::new();
        loop {
            let served = handler
                .process(0, &mut queue, &c.table, Stopping::never())
                .unwrap();
            rounds.push((used_idx(), served.more));
            if !served.more {
                break;
            }
        }
        assert_eq!(rounds, [(16, true), (32, true), (40, false)]);
    }
}
