//! The device thread: an event-manager loop that waits on the queue eventfds and hands each
//! notified queue, with guest memory read-locked for the batch, to the device's
//! [`QueueHandler`]. A stop request ends it (device reset or VM shutdown) between two
//! requests; nobody waits for it on a vCPU thread: a device thread that replaces a stopped
//! one (the driver set the device up again) waits for its predecessor itself, before it
//! touches the queues.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use memory::{GuardedMemory, RegionTable};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, Activation, Interrupt, INT_CONFIG, INT_VRING};
use crate::guest_log::GuestLog;

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

/// Requests a device serves under one read lock of guest memory before it lets writers
/// (memory hotplug) in: a driver that keeps its queue full cannot hold them off.
const BUDGET: usize = 256;

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
    /// Serves one request of queue `index`; returns the bytes it wrote to guest memory
    /// (the used length).
    fn serve(
        &mut self,
        index: usize,
        chain: DescriptorChain<&GuardedMemory<'_>>,
        mem: &GuardedMemory<'_>,
    ) -> u32;

    /// Serves the available requests of queue `index`. By default in rounds: each round
    /// reads how many requests are available, then takes a view of guest memory and
    /// serves exactly those under it, with the driver's notifications suppressed
    /// meanwhile and the ring checked again before they are re-enabled (requests added
    /// while the device worked are served without a notification); at most [`BUDGET`]
    /// requests in all, and none once `stopping` is set (checked before each request).
    /// A device whose requests change guest memory itself (a writer) must not hold a
    /// view meanwhile.
    ///
    /// The view is taken after the available index is read: memory the driver had
    /// plugged before it made a request available is in the view that serves it. (A
    /// view taken first would not show memory plugged between it and the request.)
    ///
    /// Fewer readable ring entries than the available index announces is a queue error:
    /// serving on would find the same requests available, and unreadable, forever.
    fn process(
        &mut self,
        index: usize,
        queue: &mut Queue,
        memory: &RegionTable,
        stopping: &AtomicBool,
    ) -> Result<Served, QueueError>
    where
        Self: Sized,
    {
        let mut served = 0;
        let mut mem = GuardedMemory::lock_all(memory, memory_deadline())?;
        queue.disable_notification(&mem)?;
        let more = loop {
            let available = queue
                .avail_idx(&mem, Ordering::Acquire)?
                .0
                .wrapping_sub(queue.next_avail());
            if available > 0 {
                // One view at a time: taking one may wait for a writer, who may be
                // waiting for the view this thread holds.
                drop(mem);
                mem = GuardedMemory::lock_all(memory, memory_deadline())?;
                let budget = usize::from(available).min(BUDGET - served);
                served += serve_available(self, index, queue, &mem, budget, stopping)?;
                if served == BUDGET || stopping.load(Ordering::Acquire) {
                    // Notifications stay off: the worker comes back by itself (or stops).
                    break true;
                }
            }
            if !queue.enable_notification(&mem)? {
                break false;
            }
            queue.disable_notification(&mem)?;
        };
        Ok(Served {
            notify: served > 0 && needs_interrupt(queue, &mem)?,
            more,
        })
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

/// Serves `budget` available requests of `queue` (fewer once `stopping` is set); returns
/// how many it served. All `budget` must be readable: the caller read that many from the
/// available index.
fn serve_available<H: QueueHandler>(
    handler: &mut H,
    index: usize,
    queue: &mut Queue,
    mem: &GuardedMemory<'_>,
    budget: usize,
    stopping: &AtomicBool,
) -> Result<usize, QueueError> {
    let chains: Vec<_> = queue.iter(mem)?.take(budget).collect();
    if chains.len() < budget {
        return Err(QueueError::Unreadable {
            announced: budget,
            read: chains.len(),
        });
    }
    let mut served = 0;
    for chain in chains {
        if stopping.load(Ordering::Acquire) {
            break;
        }
        let head = chain.head_index();
        let len = handler.serve(index, chain, mem);
        // A device reset during the request: the driver has forgotten it, and its rings
        // may already be set up anew (by the next device thread) at the same place.
        if stopping.load(Ordering::Acquire) {
            break;
        }
        queue.add_used(mem, head, len)?;
        served += 1;
    }
    Ok(served)
}

/// The event-loop data of the stop event and of the predecessor's exit.
const STOP_EVENT: u32 = u32::MAX;
const PREDECESSOR_EXIT: u32 = u32::MAX - 1;

struct Worker<H: QueueHandler> {
    handler: H,
    memory: Arc<RegionTable>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    stop: EventFd,
    stopping: Arc<AtomicBool>,
    needs_reset: Arc<AtomicBool>,
    log: Arc<GuestLog>,
    /// The device's previous thread, stopped but perhaps still finishing a request: the
    /// queues are not touched until it is gone.
    predecessor: Option<WorkerHandle>,
    done: bool,
}

impl<H: QueueHandler> Worker<H> {
    fn fail(&mut self, e: &QueueError) {
        self.log
            .warn("queue error", || format!("{e}; the device needs a reset"));
        self.needs_reset.store(true, Ordering::Release);
        self.interrupt.raise(INT_CONFIG);
    }

    /// Checks that every ready queue lies in guest memory, then serves them all (requests
    /// made before the device thread could run).
    fn start_serving(&mut self) {
        let invalid = match GuardedMemory::lock_all(&self.memory, memory_deadline()) {
            Ok(mem) => self
                .queues
                .iter()
                .position(|q| q.ready() && !q.is_valid(&mem))
                .map(QueueError::Invalid),
            Err(e) => Some(QueueError::Memory(e)),
        };
        if let Some(e) = invalid {
            self.fail(&e);
            return;
        }
        for i in 0..self.queues.len() {
            self.serve(i);
        }
    }

    fn serve(&mut self, index: usize) {
        if self.needs_reset.load(Ordering::Acquire)
            || self.predecessor.is_some()
            || self.stopping.load(Ordering::Acquire)
        {
            return;
        }
        // A queue the driver never made ready has no rings to touch.
        if !self.queues[index].ready() {
            return;
        }
        let result =
            self.handler
                .process(index, &mut self.queues[index], &self.memory, &self.stopping);
        match result {
            Ok(served) => {
                if served.notify && !self.stopping.load(Ordering::Acquire) {
                    self.interrupt.raise(INT_VRING);
                }
                if served.more && !self.stopping.load(Ordering::Acquire) {
                    // Come back after the other queues' events (and any writer waiting
                    // for guest memory) had their turn.
                    if let Err(e) = self.queue_events[index].write(1) {
                        log::error!("virtio queue {index}: cannot reschedule: {e}");
                    }
                }
            }
            Err(e) => self.fail(&e),
        }
    }
}

impl<H: QueueHandler> MutEventSubscriber for Worker<H> {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, fd) in self.queue_events.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(fd, i as u32, EventSet::IN)) {
                log::error!("virtio: cannot watch queue {i}: {e:?}");
            }
        }
        if let Err(e) = ops.add(Events::with_data(&self.stop, STOP_EVENT, EventSet::IN)) {
            log::error!("virtio: cannot watch the stop event: {e:?}");
        }
        if let Some(predecessor) = &self.predecessor {
            let exited = Events::with_data(&predecessor.exited, PREDECESSOR_EXIT, EventSet::IN);
            if let Err(e) = ops.add(exited) {
                log::error!("virtio: cannot watch the previous device thread: {e:?}");
                if let Some(predecessor) = self.predecessor.take() {
                    predecessor.join();
                }
            } else {
                return; // served once the predecessor has gone
            }
        }
        self.start_serving();
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            STOP_EVENT => self.done = true,
            PREDECESSOR_EXIT => {
                if let Some(predecessor) = self.predecessor.take() {
                    let _ = ops.remove(Events::with_data(
                        &predecessor.exited,
                        PREDECESSOR_EXIT,
                        EventSet::IN,
                    ));
                    predecessor.join();
                }
                self.start_serving();
            }
            index => {
                let index = index as usize;
                if let Some(fd) = self.queue_events.get(index) {
                    let _ = fd.read();
                    self.serve(index);
                }
            }
        }
    }
}

/// Longest dropping a [`WorkerHandle`] waits for its thread (VM shutdown): a thread stuck
/// in a host I/O call is left behind rather than holding the VMM up.
const DROP_DEADLINE: Duration = Duration::from_secs(2);

/// A running device thread.
#[derive(Debug)]
pub struct WorkerHandle {
    name: String,
    stop: EventFd,
    stopping: Arc<AtomicBool>,
    /// Signalled by the thread as it exits (even by a panic).
    exited: EventFd,
    thread: Option<JoinHandle<()>>,
}

/// Signals its eventfd when dropped: the thread's last act, even when it unwinds.
struct ExitSignal(EventFd);

impl Drop for ExitSignal {
    fn drop(&mut self) {
        if let Err(e) = self.0.write(1) {
            log::error!("virtio: a device thread cannot signal its exit: {e}");
        }
    }
}

impl WorkerHandle {
    /// Asks the thread to stop after the request it is serving, if any. Does not wait.
    pub fn request_stop(&self) {
        self.stopping.store(true, Ordering::Release);
        if let Err(e) = self.stop.write(1) {
            log::error!("virtio: cannot stop device thread {}: {e}", self.name);
        }
    }

    /// Waits for the thread to exit, until `deadline`; whether it did.
    pub fn wait(&mut self, deadline: Instant) -> bool {
        let Some(thread) = self.thread.take() else {
            return true;
        };
        if !wait_readable(&self.exited, deadline) {
            self.thread = Some(thread);
            return false;
        }
        if thread.join().is_err() {
            log::error!("virtio: device thread {} panicked", self.name);
        }
        true
    }

    /// Waits for the thread (which must have been asked to stop) without a deadline.
    fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("virtio: device thread {} panicked", self.name);
            }
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        if self.thread.is_none() {
            return;
        }
        self.request_stop();
        if !self.wait(Instant::now() + DROP_DEADLINE) {
            log::error!(
                "virtio: device thread {} did not stop within {DROP_DEADLINE:?}; left behind",
                self.name
            );
        }
    }
}

/// Waits until `fd` is readable or `deadline` passes; whether it became readable.
fn wait_readable(fd: &EventFd, deadline: Instant) -> bool {
    let mut pollfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = i32::try_from(left.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd, its count given.
        let n = unsafe { libc::poll(&mut pollfd, 1, ms) };
        if n > 0 {
            return true;
        }
        if n == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return false;
        }
    }
}

/// A device's thread across resets: the running one, and the one a reset stopped, which
/// the next activation's thread waits for.
#[derive(Debug, Default)]
pub struct DeviceThread {
    running: Option<WorkerHandle>,
    stopped: Option<WorkerHandle>,
}

impl DeviceThread {
    /// Starts thread `name` serving `activation`'s queues with `handler` (after the
    /// previous thread, if one is still finishing).
    pub fn start<H: QueueHandler>(
        &mut self,
        name: String,
        activation: Activation,
        handler: H,
    ) -> Result<(), ActivateError> {
        if self.running.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        self.running = Some(spawn(name, activation, handler, self.stopped.take())?);
        Ok(())
    }

    /// Asks the running thread to stop; does not wait for it.
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.request_stop();
            // A stopped thread not yet waited for is the running one's predecessor: the
            // running one owns it, so at most one is kept here.
            self.stopped = Some(running);
        }
    }

    /// Whether a thread is serving the queues.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }
}

/// Starts thread `name` serving `activation`'s queues with `handler`, once `predecessor`
/// (stopped) has exited; sets the activation's `needs_reset` if a queue turns out
/// unusable.
fn spawn<H: QueueHandler>(
    name: String,
    activation: Activation,
    handler: H,
    predecessor: Option<WorkerHandle>,
) -> Result<WorkerHandle, ActivateError> {
    let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::EventFd)?;
    let exited = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::EventFd)?;
    let exit_signal = ExitSignal(exited.try_clone().map_err(ActivateError::EventFd)?);
    let stopping = Arc::new(AtomicBool::new(false));
    let worker = Worker {
        handler,
        memory: activation.memory,
        queues: activation.queues,
        queue_events: activation.queue_events,
        interrupt: activation.interrupt,
        stop: stop.try_clone().map_err(ActivateError::EventFd)?,
        stopping: Arc::clone(&stopping),
        needs_reset: activation.needs_reset,
        log: activation.log,
        predecessor,
        done: false,
    };
    let thread = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let _exit_signal = exit_signal;
            run(worker);
        })
        .map_err(ActivateError::Thread)?;
    Ok(WorkerHandle {
        name,
        stop,
        stopping,
        exited,
        thread: Some(thread),
    })
}

fn run<H: QueueHandler>(worker: Worker<H>) {
    let mut events = match EventManager::<Worker<H>>::new() {
        Ok(events) => events,
        Err(e) => {
            log::error!("virtio: cannot start the device's event loop: {e:?}");
            return;
        }
    };
    let id = events.add_subscriber(worker);
    loop {
        if let Err(e) = events.run() {
            log::error!("virtio: device event loop: {e:?}");
            break;
        }
        let done = events.subscriber_mut(id).map(|w| w.done).unwrap_or(true);
        if done {
            break;
        }
    }
    // A predecessor still finishing (this thread was stopped before it had gone) is
    // waited for here, so that a thread's exit means its predecessors' too.
    if let Ok(worker) = events.remove_subscriber(id) {
        if let Some(predecessor) = worker.predecessor {
            predecessor.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memory::RegionSpec;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Address;

    const SIZE: u16 = 256;

    /// Counts the requests it is handed.
    struct Counter(usize);

    impl QueueHandler for Counter {
        fn serve(
            &mut self,
            _index: usize,
            _chain: DescriptorChain<&GuardedMemory<'_>>,
            _mem: &GuardedMemory<'_>,
        ) -> u32 {
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
            .process(0, &mut queue, &table, &AtomicBool::new(false))
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
            .process(0, &mut queue, &table, &AtomicBool::new(false))
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
            .process(0, &mut queue, &table, &AtomicBool::new(false))
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
            .process(0, &mut queue, &table, &AtomicBool::new(false))
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
            let served = Counter(0).process(0, &mut queue, &served_table, &AtomicBool::new(false));
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

    #[test]
    fn queues_never_made_ready_are_left_alone() {
        let table = Arc::new(RegionTable::default());
        table
            .insert(RegionSpec::anonymous(GuestAddress(0), 1 << 20), None)
            .unwrap();
        let rings = GuestAddress(0x1_0000);
        let (ready, used) = {
            let mem = GuardedMemory::lock_all(&table, None).unwrap();
            // What a device writing to a queue with no rings would overwrite.
            mem.write_slice(&[0xaa; 0x1000], GuestAddress(0)).unwrap();
            let mock = MockSplitQueue::create(&mem, rings, SIZE);
            let desc = Descriptor::new(0x8_0000, 16, VRING_DESC_F_WRITE as u16, 0);
            mock.desc_table()
                .store(0, RawDescriptor::from(desc))
                .unwrap();
            let queue: Queue = mock.create_queue().unwrap();
            (queue, mock.used_addr())
        };
        offer(&table, ready_avail(&ready), 1);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut thread = DeviceThread::default();
        thread
            .start(
                "test_device".into(),
                Activation {
                    memory: Arc::clone(&table),
                    // Queue 0 was never set up or made ready.
                    queues: vec![Queue::new(SIZE).unwrap(), ready],
                    queue_events: (0..2)
                        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
                        .collect(),
                    interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
                    features: 0,
                    needs_reset: Arc::new(AtomicBool::new(false)),
                    log: Arc::new(GuestLog::new("test")),
                },
                Counter(0),
            )
            .unwrap();
        // The device serves its queues in order when it starts: once queue 1's request
        // is used, queue 0 had its turn.
        let deadline = Instant::now() + Duration::from_secs(10);
        while used_flags_and_idx(&table, used).1 != 1 {
            assert!(
                wait_readable(&irq, deadline),
                "the ready queue is served in time"
            );
            let _ = irq.read();
        }
        let mut low = [0u8; 0x1000];
        GuardedMemory::lock_all(&table, None)
            .unwrap()
            .read_slice(&mut low, GuestAddress(0))
            .unwrap();
        assert!(
            low.iter().all(|b| *b == 0xaa),
            "nothing was written at guest address 0"
        );
        thread.stop();
    }

    fn ready_avail(queue: &Queue) -> GuestAddress {
        GuestAddress(queue.avail_ring())
    }
}
