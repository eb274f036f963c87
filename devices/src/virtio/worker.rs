//! Serving a queue: a device's [`QueueHandler`] and the default way of going through the
//! available requests (in rounds, each request holding only the guest memory it
//! touches, within a budget, stopping between two requests when the device thread is asked
//! to stop or pause). The thread itself is [`super::device_thread`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use memory::{GuardedMemory, RegionTable};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Longest a device waits for a writer (memory hotplug) before it gives the batch up.
const MEMORY_DEADLINE: Duration = Duration::from_secs(5);

/// Why a queue could not be served: the device must be reset by the driver.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The rings are not where the driver said (outside guest memory).
    #[error("queue rings: {0}")]
    Rings(#[from] virtio_queue::Error),
    /// Guest memory could not be locked.
    #[error("guest memory: {0}")]
    Memory(#[from] memory::GuardedMemoryError),
    /// The available index announces requests whose ring entries cannot be read (the
    /// ring reaches into memory the guest does not have, e.g. an unplugged block).
    #[error("the available ring announces {announced} requests, but only {read} could be read")]
    Unreadable {
        /// Requests the available index announced.
        announced: usize,
        /// Entries that could be read.
        read: usize,
    },
    /// The queue's rings are not valid in guest memory (checked when the device starts).
    #[error("queue {0} is not valid in guest memory")]
    Invalid(usize),
}

/// The deadline for taking guest memory's read locks from now.
pub fn memory_deadline() -> memory::Deadline {
    Some(Instant::now() + MEMORY_DEADLINE)
}

/// Readies `mem` for the next access of a device: nothing held, and [`MEMORY_DEADLINE`]
/// from now to wait for writers (each access gets its own, however long the batch).
pub fn next_access(mem: &mut GuardedMemory<'_>) {
    mem.release();
    mem.set_deadline(memory_deadline());
}

/// Requests a device serves before it looks at its other events (a reset, another queue):
/// a driver that keeps its queue full cannot hold them off.
const BUDGET: usize = 256;

/// Requests served as one batch at most (see [`QueueHandler::serve_batched`]).
pub const BATCH: usize = 64;

/// Never set: the pause flag of a [`Stopping`] that is never paused.
static NO_PAUSE: AtomicBool = AtomicBool::new(false);

/// Whether the device thread has been asked to stop serving the setup it is serving (a
/// device reset came) or to pause (the VMM quiesces the VM): checked between requests.
#[derive(Clone, Copy, Debug)]
pub struct Stopping<'a> {
    stops: &'a AtomicU64,
    epoch: u64,
    pause: &'a AtomicBool,
}

impl<'a> Stopping<'a> {
    /// Stop once `stops` (stop requests so far) is no longer `epoch` (its value when the
    /// setup being served began). Never paused unless [`Stopping::with_pause`] says.
    pub fn new(stops: &'a AtomicU64, epoch: u64) -> Self {
        Stopping {
            stops,
            epoch,
            pause: &NO_PAUSE,
        }
    }

    /// Also pause while `pause` is set.
    pub fn with_pause(self, pause: &'a AtomicBool) -> Self {
        Stopping { pause, ..self }
    }

    /// Never asked to stop (tests, tools).
    pub fn never() -> Stopping<'static> {
        static NO_STOPS: AtomicU64 = AtomicU64::new(0);
        Stopping::new(&NO_STOPS, 0)
    }

    /// Whether a stop was requested: the request in hand is not reported to the driver.
    pub fn requested(&self) -> bool {
        self.stops.load(Ordering::Acquire) != self.epoch
    }

    /// Whether a pause was requested: the request in hand is finished and reported, and
    /// no other is started.
    pub fn pause_requested(&self) -> bool {
        self.pause.load(Ordering::Acquire)
    }

    /// Whether to start no further request: a stop or a pause was requested.
    pub fn hold(&self) -> bool {
        self.requested() || self.pause_requested()
    }
}

/// Rounds of [`QueueHandler::process`] (reading the available index, serving what it
/// announced, re-checking) before the device thread looks at its other events.
const MAX_ROUNDS: usize = 64;

/// What serving a queue came to.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// The driver must be interrupted (used buffers it asked to hear about).
    pub notify: bool,
    /// The budget ran out with requests perhaps still available: serve the queue again
    /// soon, without waiting for the driver.
    pub more: bool,
}

/// A device's request processing.
pub trait QueueHandler: Send + 'static {
    /// Serves one request of queue `index` (its memory is `chain.memory()`); returns
    /// the bytes it wrote to guest memory (the used length).
    fn serve(&mut self, index: usize, chain: DescriptorChain<&GuardedMemory<'_>>) -> u32;

    /// The next request of queue `index` served in the last run of a batch (since the
    /// last [`QueueHandler::forget_batch`]) is in the used ring: the driver sees that run of it; called once per
    /// request of the run, in order. A request may be served more than once (a run that
    /// meets a writer of guest memory, or a device reset, is undone), and is used at most
    /// once, after its last run: what the driver was served is counted here. Nothing by
    /// default.
    fn used(&mut self, _index: usize) {}

    /// Serves one request of queue `index` as part of a batch: pushes its used length to
    /// `lens` now, or defers it to a later [`QueueHandler::serve_batched`] or
    /// [`QueueHandler::finish_batch`] of the same batch, which then push the deferred
    /// lengths first: `lens` gets one length per request, in their order. A deferred
    /// request may only use memory its own accesses reached here (the batch holds it
    /// until it is finished), and a request whose access failed is not deferred. A
    /// request that reached beyond the batch's memory ([`GuardedMemory::reached_out`])
    /// is undone and begins the next batch: its length, if pushed, is dropped, so it may
    /// also push none. A request served at once ends its batch. By default every request
    /// is served at once ([`QueueHandler::serve`]): a batch of one.
    fn serve_batched(
        &mut self,
        index: usize,
        chain: DescriptorChain<&GuardedMemory<'_>>,
        lens: &mut Vec<u32>,
    ) {
        lens.push(self.serve(index, chain));
    }

    /// Serves the requests of queue `index` deferred in the batch (in `mem`, the memory
    /// they were served with, which still holds what they reached) and pushes their used
    /// lengths to `lens`, in order. Nothing by default.
    fn finish_batch(&mut self, _index: usize, _mem: &GuardedMemory<'_>, _lens: &mut Vec<u32>) {}

    /// A run of a batch of queue `index` is undone, or a new one begins: forget the
    /// requests deferred and served in it. Nothing by default.
    fn forget_batch(&mut self, _index: usize) {}

    /// Serves the available requests of queue `index`. By default in rounds: each round
    /// reads how many requests are available and serves exactly those, with the
    /// driver's notifications suppressed meanwhile and the ring checked again before
    /// they are re-enabled (requests added while the device worked are served without a
    /// notification); at most [`BUDGET`] requests in all, and none once `stopping` asks
    /// to stop or pause ([`Stopping::hold`], checked before each request).
    ///
    /// Each request holds the regions its rings and buffers touch, from the first access
    /// to each until the request is used (see [`GuardedMemory`]): a writer of any other
    /// region never waits for it. Requests are served in batches of up to [`BATCH`]
    /// that all lie in one region (rings, descriptors, buffers), whose I/O the handler
    /// may do together (a batch goes on only while the handler defers its requests);
    /// nothing is held between batches. A batch that finds a region
    /// held by a writer while it holds others is served again from the start once the
    /// writer is done (the driver sees only the last run).
    ///
    /// Fewer readable ring entries than the available index announces is a queue error:
    /// serving on would find the same requests available, and unreadable, forever.
    fn process(
        &mut self,
        index: usize,
        queue: &mut Queue,
        memory: &RegionTable,
        stopping: Stopping<'_>,
    ) -> Result<Served, QueueError>
    where
        Self: Sized,
    {
        let mut mem = GuardedMemory::new(memory, memory_deadline());
        let mut served = 0;
        let mut rounds = 0;
        mem.retry(|mem| queue.disable_notification(mem))??;
        let more = loop {
            // Rounds that found nothing cost no budget: bound them too, so a driver
            // moving its index in step with the device cannot keep it here.
            rounds += 1;
            if rounds > MAX_ROUNDS || stopping.hold() {
                break true;
            }
            next_access(&mut mem);
            let available = mem
                .retry(|mem| queue.avail_idx(mem, Ordering::Acquire))??
                .0
                .wrapping_sub(queue.next_avail());
            if available > 0 {
                let budget = usize::from(available).min(BUDGET - served);
                served += serve_available(self, index, queue, &mut mem, budget, stopping)?;
                if served == BUDGET || stopping.hold() {
                    // Notifications stay off: the worker comes back by itself (after a
                    // pause, or stops).
                    break true;
                }
            }
            next_access(&mut mem);
            if !mem.retry(|mem| queue.enable_notification(mem))?? {
                break false;
            }
            mem.retry(|mem| queue.disable_notification(mem))??;
        };
        next_access(&mut mem);
        let notify = served > 0 && mem.retry(|mem| needs_interrupt(queue, mem))??;
        Ok(Served { notify, more })
    }
}

/// Whether the driver wants an interrupt for the buffers used since the last call: its
/// `used_event` with EVENT_IDX, else the available ring's NO_INTERRUPT flag (which
/// virtio-queue leaves to the device).
fn needs_interrupt(queue: &mut Queue, mem: &GuardedMemory<'_>) -> Result<bool, QueueError> {
    let wanted = queue.needs_notification(mem)?;
    if !wanted || queue.event_idx_enabled() {
        return Ok(wanted);
    }
    let flags: u16 = mem
        .load(GuestAddress(queue.avail_ring()), Ordering::Acquire)
        .map_err(|e| QueueError::Rings(virtio_queue::Error::GuestMemory(e)))?;
    Ok(flags & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0)
}

/// How one run of a batch of requests ended.
enum Run {
    /// This many requests are in the used ring.
    Used(usize),
    /// A region could not be locked: `GuardedMemory::retry` runs it again.
    Void,
    /// A device reset came during the batch: the driver has forgotten its requests, and
    /// its rings may already be set up anew at the same place.
    Stopped,
    /// The available ring announced a request whose entry cannot be read.
    Unreadable,
}

/// Serves `budget` available requests of `queue` (fewer once `stopping` holds), in
/// batches of at most [`BATCH`]; returns how many it served. All `budget` must be
/// readable: the caller read that many from the available index.
///
/// A batch begins with nothing held: its first request locks what it touches, as a
/// request served alone does. If that is a single region, the requests after it are
/// confined to that region ([`GuardedMemory::confine`]): each joins the batch only if
/// its rings, descriptors and buffers all lie there; the first that reaches further is
/// undone and begins the next batch. So a batch's locks are exactly its requests'
/// locks, and its handler may do their I/O together ([`QueueHandler::finish_batch`]):
/// a writer of that region waits for one batch's I/O into it, and a writer of any
/// other region for none of it. A batch whose first request holds more than one region
/// is that request alone, and a batch ends with the first request the handler serves
/// at once rather than deferring it (a handler that never defers serves one request
/// per batch, releasing everything after each).
fn serve_available<H: QueueHandler>(
    handler: &mut H,
    index: usize,
    queue: &mut Queue,
    mem: &mut GuardedMemory<'_>,
    budget: usize,
    stopping: Stopping<'_>,
) -> Result<usize, QueueError> {
    let mut served = 0;
    let mut heads = [0u16; BATCH];
    let mut lens = Vec::with_capacity(BATCH);
    while served < budget {
        // A pause lets the requests in hand finish (below, a stop does not): it is only
        // checked between them.
        if stopping.hold() {
            return Ok(served);
        }
        next_access(mem);
        let (next_avail, next_used) = (queue.next_avail(), queue.next_used());
        let limit = (budget - served).min(BATCH);
        let run = mem.retry(|mem| {
            // A run that missed a region is undone in the queue and done again, unless a
            // device reset came while it waited for the writer.
            queue.set_next_avail(next_avail);
            queue.set_next_used(next_used);
            handler.forget_batch(index);
            lens.clear();
            mem.confine(false);
            if stopping.requested() {
                return Ok::<_, virtio_queue::Error>(Run::Stopped);
            }
            let mut count = 0;
            while count < limit && !(count > 0 && stopping.hold()) {
                let before = queue.next_avail();
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    if count == 0 {
                        return Ok(Run::Unreadable);
                    }
                    // Out of the batch's region, or unreadable: the next batch tells.
                    queue.set_next_avail(before);
                    break;
                };
                heads[count] = chain.head_index();
                handler.serve_batched(index, chain, &mut lens);
                if mem.missed() {
                    return Ok(Run::Void);
                }
                if mem.reached_out() {
                    // It needs another region: undone, it begins the next batch.
                    queue.set_next_avail(before);
                    lens.truncate(count);
                    break;
                }
                count += 1;
                // Only deferred requests wait for the batch: one served at once ends it,
                // so a handler that defers nothing serves a request per batch.
                if lens.len() == count || mem.held() != 1 {
                    break;
                }
                mem.confine(true);
            }
            // A reset while the batch gathered: its I/O is not done (the driver may
            // already reuse the buffers).
            if stopping.requested() {
                handler.forget_batch(index);
                return Ok(Run::Stopped);
            }
            handler.finish_batch(index, mem, &mut lens);
            mem.confine(false);
            if mem.missed() {
                return Ok(Run::Void);
            }
            // The used ring may lie in regions the batch does not hold: locked now, after
            // the I/O (a writer of them never waits for it) and before the first entry,
            // so a miss voids the run before the guest sees any of it (`add_used`
            // publishes the used index with each entry).
            let ring_bytes = 6 + 8 * usize::from(queue.size());
            let _ =
                GuestMemoryBackend::check_range(mem, GuestAddress(queue.used_ring()), ring_bytes);
            if mem.missed() {
                return Ok(Run::Void);
            }
            if stopping.requested() {
                return Ok(Run::Stopped);
            }
            debug_assert_eq!(lens.len(), count, "a used length per request");
            // A handler bug must not publish a stale head or drop a request.
            lens.resize(count, 0);
            for (head, len) in heads.iter().zip(&lens) {
                queue.add_used(mem, *head, *len)?;
                if mem.missed() {
                    return Ok(Run::Void);
                }
            }
            Ok(Run::Used(count))
        })??;
        match run {
            // The last run is final only now: `retry` may have run it again.
            Run::Used(count) => {
                for _ in 0..count {
                    handler.used(index);
                }
                served += count;
            }
            Run::Void => {}
            Run::Stopped => return Ok(served),
            Run::Unreadable => {
                return Err(QueueError::Unreadable {
                    announced: budget,
                    read: served,
                })
            }
        }
    }
    mem.release();
    Ok(budget)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use memory::RegionSpec;
    use std::sync::Arc;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Address;

    const SIZE: u16 = 256;

    /// Counts the requests it is handed (the device-thread tests use it too).
    pub(crate) struct Counter(pub(crate) usize);

    impl QueueHandler for Counter {
        fn serve(&mut self, _index: usize, _chain: DescriptorChain<&GuardedMemory<'_>>) -> u32 {
            self.0 += 1;
            0
        }
    }

    /// Makes `count` more one-descriptor chains available, wrapping around the ring the
    /// way a driver does.
    fn offer(table: &RegionTable, avail: GuestAddress, count: u16) {
        let mem = GuardedMemory::lock_all(table, None).unwrap();
        let idx_addr = avail.unchecked_add(2);
        let idx: u16 = mem.read_obj(idx_addr).unwrap();
        for i in 0..count {
            let slot = idx.wrapping_add(i) % SIZE;
            mem.write_obj(slot, avail.unchecked_add(4 + 2 * u64::from(slot)))
                .unwrap();
        }
        mem.write_obj(idx.wrapping_add(count), idx_addr).unwrap();
    }

    fn used_flags_and_idx(table: &RegionTable, used: GuestAddress) -> (u16, u16) {
        let mem = GuardedMemory::lock_all(table, None).unwrap();
        (
            mem.read_obj(used).unwrap(),
            mem.read_obj(used.unchecked_add(2)).unwrap(),
        )
    }

    #[test]
    fn a_full_ring_is_served_in_budgets_with_notifications_off_meanwhile() {
        let table = RegionTable::default();
        table
            .insert(RegionSpec::anonymous(GuestAddress(0), 1 << 20), None)
            .unwrap();
        let (mut queue, avail, used) = {
            let mem = GuardedMemory::lock_all(&table, None).unwrap();
            let mock = MockSplitQueue::new(&mem, SIZE);
            for i in 0..SIZE {
                let buf = 0x8_0000 + u64::from(i) * 16;
                let desc = Descriptor::new(buf, 16, VRING_DESC_F_WRITE as u16, 0);
                mock.desc_table()
                    .store(i, RawDescriptor::from(desc))
                    .unwrap();
            }
            let queue: Queue = mock.create_queue().unwrap();
            (queue, mock.avail_addr(), mock.used_addr())
        };
        let mut handler = Counter(0);
        assert!(
            BUDGET <= usize::from(SIZE),
            "one ring can exhaust the budget"
        );

        offer(&table, avail, SIZE);
        let served = handler
            .process(0, &mut queue, &table, Stopping::never())
            .unwrap();
        assert_eq!(handler.0, BUDGET);
        assert_eq!(
            served,
            Served {
                notify: true,
                more: true
            }
        );
        let (flags, idx) = used_flags_and_idx(&table, used);
        assert_eq!(usize::from(idx), BUDGET);
        assert_eq!(
            flags, 1,
            "notifications stay off until the device comes back"
        );

        // The driver refills while the device is away; nothing is left behind.
        offer(&table, avail, 10);
        let served = handler
            .process(0, &mut queue, &table, Stopping::never())
            .unwrap();
        assert_eq!(
            served,
            Served {
                notify: true,
                more: false
            }
        );
        assert_eq!(handler.0, usize::from(SIZE) + 10);
        let (flags, idx) = used_flags_and_idx(&table, used);
        assert_eq!(idx, SIZE + 10);
        assert_eq!(flags, 0, "notifications are back on once the ring is empty");

        // A driver that polls asks for no interrupts.
        {
            let mem = GuardedMemory::lock_all(&table, None).unwrap();
            mem.write_obj(VRING_AVAIL_F_NO_INTERRUPT as u16, avail)
                .unwrap();
        }
        offer(&table, avail, 3);
        let served = handler
            .process(0, &mut queue, &table, Stopping::never())
            .unwrap();
        assert_eq!(
            served,
            Served {
                notify: false,
                more: false
            }
        );
        assert_eq!(handler.0, usize::from(SIZE) + 13);

        // Nothing available: nothing to say.
        let served = handler
            .process(0, &mut queue, &table, Stopping::never())
            .unwrap();
        assert_eq!(served, Served::default());
    }

    /// A queue of 16 entries with its rings at `desc`, `avail` and `used`, ready.
    fn queue_at(desc: u64, avail: u64, used: u64) -> Queue {
        let mut queue = Queue::new(16).unwrap();
        queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        queue.set_ready(true);
        queue
    }

    #[test]
    fn unreadable_available_entries_are_a_queue_error_not_a_spin() {
        // The available ring's header at the end of one region, its entries in the next,
        // which goes away; then the driver announces a request.
        const MIB: u64 = 1 << 20;
        let table = Arc::new(RegionTable::default());
        table
            .insert(RegionSpec::anonymous(GuestAddress(0), MIB), None)
            .unwrap();
        let next = table
            .insert(RegionSpec::anonymous(GuestAddress(MIB), MIB), None)
            .unwrap();
        let avail = MIB - 4;
        let mut queue = queue_at(0x1000, avail, 0x2000);
        table.remove(next, None).unwrap();
        GuardedMemory::lock_all(&table, None)
            .unwrap()
            .write_obj(1u16, GuestAddress(avail + 2))
            .unwrap();

        let (done, result) = std::sync::mpsc::channel();
        let served_table = Arc::clone(&table);
        std::thread::spawn(move || {
            let served = Counter(0).process(0, &mut queue, &served_table, Stopping::never());
            let _ = done.send(served.map_err(|e| e.to_string()));
        });
        let result = result
            .recv_timeout(Duration::from_secs(10))
            .expect("serving the queue ends (it spun before the fix)");
        let error = result.expect_err("a queue error");
        assert!(
            error.contains("announces 1 requests, but only 0"),
            "{error}"
        );
    }
}

#[cfg(test)]
mod batch_tests {
    use super::*;
    use memory::RegionSpec;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Address;

    const MIB: u64 = 1 << 20;

    /// Defers every request after touching its buffer; records each batch's size and
    /// the regions held when it is finished.
    #[derive(Default)]
    struct Batches {
        deferred: u32,
        finished: Vec<(u32, usize)>,
    }

    impl QueueHandler for Batches {
        fn serve(&mut self, _: usize, _: DescriptorChain<&GuardedMemory<'_>>) -> u32 {
            unreachable!("served in batches")
        }

        fn serve_batched(
            &mut self,
            _: usize,
            mut chain: DescriptorChain<&GuardedMemory<'_>>,
            _: &mut Vec<u32>,
        ) {
            if let Some(d) = chain.next() {
                if chain.memory().write_obj(1u8, d.addr()).is_ok() {
                    self.deferred += 1;
                }
            }
        }

        fn finish_batch(&mut self, _: usize, mem: &GuardedMemory<'_>, lens: &mut Vec<u32>) {
            self.finished.push((self.deferred, mem.held()));
            lens.extend((0..self.deferred).map(|_| 1));
            self.deferred = 0;
        }

        fn forget_batch(&mut self, _: usize) {
            self.deferred = 0;
        }
    }

    /// A queue of 16 at `start` (`MockSplitQueue`'s layout) offering one-descriptor
    /// requests, a 16-byte buffer each at the addresses `bufs`; and its used ring.
    fn queue_at(table: &RegionTable, start: u64, bufs: &[u64]) -> (Queue, GuestAddress) {
        let mem = GuardedMemory::lock_all(table, None).unwrap();
        let mock = MockSplitQueue::create(&mem, GuestAddress(start), 16);
        let chains: Vec<RawDescriptor> = bufs
            .iter()
            .map(|&buf| RawDescriptor::from(Descriptor::new(buf, 16, VRING_DESC_F_WRITE as u16, 0)))
            .collect();
        mock.add_desc_chains(&chains, 0).unwrap();
        (mock.create_queue::<Queue>().unwrap(), mock.used_addr())
    }

    /// A table of two 1 MiB regions from 0; and the second's id.
    fn two_regions() -> (RegionTable, memory::RegionId) {
        let table = RegionTable::default();
        table
            .insert(RegionSpec::anonymous(GuestAddress(0), MIB), None)
            .unwrap();
        let second = table
            .insert(RegionSpec::anonymous(GuestAddress(MIB), MIB), None)
            .unwrap();
        (table, second)
    }

    /// `count` buffers of 16 bytes from 512 KiB on.
    fn buffers(count: u64) -> Vec<u64> {
        (0..count).map(|i| 0x8_0000 + i * 16).collect()
    }

    /// Requests `0..count` are in the used ring, each once, in order.
    fn assert_used_in_order(table: &RegionTable, used: GuestAddress, count: u16) {
        let mem = GuardedMemory::lock_all(table, None).unwrap();
        let idx: u16 = mem.read_obj(used.unchecked_add(2)).unwrap();
        assert_eq!(idx, count);
        let heads: Vec<u32> = (0..u64::from(count))
            .map(|i| mem.read_obj(used.unchecked_add(4 + 8 * i)).unwrap())
            .collect();
        let expected: Vec<u32> = (0..u32::from(count)).collect();
        assert_eq!(heads, expected, "each request used once, in order");
    }

    /// Region locks taken while a handler that defers nothing serves `n` one-descriptor
    /// requests, all in one region.
    fn locks_serving(n: u16) -> u64 {
        let table = RegionTable::default();
        table
            .insert(RegionSpec::anonymous(GuestAddress(0), MIB), None)
            .unwrap();
        let (mut queue, _) = queue_at(&table, 0, &buffers(u64::from(n)));
        let before = table.metrics().fast_path_hits;
        let mut handler = tests::Counter(0);
        handler
            .process(0, &mut queue, &table, Stopping::never())
            .unwrap();
        assert_eq!(handler.0, usize::from(n));
        table.metrics().fast_path_hits - before
    }

    #[test]
    fn a_handler_that_defers_nothing_holds_nothing_between_requests() {
        // Each request locks afresh what it touches: a writer waits for one request at
        // a time, as it did before batches.
        assert_eq!(locks_serving(4) - locks_serving(1), 3);
    }

    /// The used ring can reach into a region the batch does not hold. If a writer is
    /// changing that region, the run is voided before the guest sees any of its entries
    /// (`add_used` publishes the used index with each one: entries published and then
    /// redone would show the index going back and requests completed twice).
    #[test]
    fn a_used_ring_in_a_region_being_changed_shows_nothing_until_it_is_held() {
        const PATIENCE: Duration = Duration::from_secs(30);
        let (table, second) = two_regions();
        // A queue of 16 ending just past the first region: the used ring's index and
        // first three entries in it, the rest in the second; buffers in the first.
        let (mut queue, used) = queue_at(&table, MIB - 304, &buffers(5));
        assert_eq!(
            used.raw_value(),
            MIB - 28,
            "the used ring straddles the regions"
        );
        let wait_until = |what: &str, done: &dyn Fn() -> bool| {
            let deadline = Instant::now() + PATIENCE;
            while !done() {
                assert!(
                    Instant::now() < deadline,
                    "{what} did not happen in {PATIENCE:?}"
                );
                std::thread::yield_now();
            }
        };
        std::thread::scope(|s| {
            // A reader of the second region, on a thread of its own (the lock checker
            // rightly refuses a thread holding it a two-tier lookup), until told.
            let (taken_tx, taken) = std::sync::mpsc::channel();
            let (release, release_rx) = std::sync::mpsc::channel::<()>();
            let table = &table;
            s.spawn(move || {
                let _reader = table.lock_region(GuestAddress(MIB), None).unwrap();
                taken_tx.send(()).unwrap();
                let _ = release_rx.recv();
            });
            taken.recv_timeout(PATIENCE).unwrap();
            // A writer shrinks the second region (the ring part stays): it waits for
            // the reader meanwhile.
            let writer = s.spawn(move || {
                table
                    .shrink(second, MIB / 2, Some(Instant::now() + PATIENCE))
                    .unwrap()
            });
            wait_until("the writer's drain", &|| {
                table.metrics().writers_draining == 1
            });
            let queue = &mut queue;
            let device = s.spawn(move || {
                let mut handler = Batches::default();
                handler.process(0, queue, table, Stopping::never()).unwrap();
                handler.finished
            });
            // The device missed the second region and waits for the writer.
            wait_until("the device's wait", &|| {
                table.metrics().slow_path_readers == 1
            });
            let mem = GuardedMemory::new(table, None);
            let idx: u16 = mem.read_obj(used.unchecked_add(2)).unwrap();
            assert_eq!(idx, 0, "entries published before the used ring was held");
            drop(mem);
            release.send(()).unwrap();
            writer.join().unwrap();
            // The voided run's I/O was done again: the guest saw none of it.
            device.join().unwrap();
        });
        assert_used_in_order(&table, used, 5);
    }

    /// A device reset while a batch gathers: the batch's deferred I/O is not done (the
    /// driver may already reuse its buffers) and nothing is reported.
    #[test]
    fn a_reset_while_a_batch_gathers_does_none_of_its_io() {
        /// Stop requests of the device (one test uses it).
        static STOPS: AtomicU64 = AtomicU64::new(0);
        struct Resets {
            batch: Batches,
        }
        impl QueueHandler for Resets {
            fn serve(&mut self, _: usize, _: DescriptorChain<&GuardedMemory<'_>>) -> u32 {
                unreachable!("served in batches")
            }
            fn serve_batched(
                &mut self,
                index: usize,
                chain: DescriptorChain<&GuardedMemory<'_>>,
                lens: &mut Vec<u32>,
            ) {
                self.batch.serve_batched(index, chain, lens);
                // The driver resets the device as its second request is read.
                if self.batch.deferred == 2 {
                    STOPS.fetch_add(1, Ordering::Release);
                }
            }
            fn finish_batch(&mut self, index: usize, mem: &GuardedMemory<'_>, lens: &mut Vec<u32>) {
                self.batch.finish_batch(index, mem, lens);
            }
            fn forget_batch(&mut self, index: usize) {
                self.batch.forget_batch(index);
            }
        }
        let table = RegionTable::default();
        table
            .insert(RegionSpec::anonymous(GuestAddress(0), MIB), None)
            .unwrap();
        let (mut queue, used) = queue_at(&table, 0, &buffers(4));
        let mut handler = Resets {
            batch: Batches::default(),
        };
        let epoch = STOPS.load(Ordering::Acquire);
        handler
            .process(0, &mut queue, &table, Stopping::new(&STOPS, epoch))
            .unwrap();
        assert_eq!(
            handler.batch.finished,
            vec![],
            "a batch's I/O done after a reset"
        );
        let mem = GuardedMemory::lock_all(&table, None).unwrap();
        let idx: u16 = mem.read_obj(used.unchecked_add(2)).unwrap();
        assert_eq!(idx, 0, "requests reported after a reset");
    }

    #[test]
    fn a_batch_holds_one_region_and_a_request_beyond_it_begins_the_next() {
        let (table, _) = two_regions();
        // Rings and buffers in the first region, but request 2's buffer in the second.
        let mut bufs = buffers(5);
        bufs[2] = MIB;
        let (mut queue, used) = queue_at(&table, 0, &bufs);
        let mut handler = Batches::default();
        let served = handler
            .process(0, &mut queue, &table, Stopping::never())
            .unwrap();
        assert!(!served.more);
        assert_eq!(
            handler.finished,
            vec![(2, 1), (1, 2), (2, 1)],
            "requests 0-1 in one region; 2 reaches the second, alone; 3-4 back in one"
        );
        assert_used_in_order(&table, used, 5);
    }
}
