//! The device thread: an event-manager loop that waits on the queue eventfds and hands each
//! notified queue, with guest memory read-locked for the batch, to the device's
//! [`QueueHandler`]. A stop eventfd ends it (device reset or VM shutdown).

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
    /// requests in all. A device whose requests change guest memory itself (a writer)
    /// must not hold a view meanwhile.
    ///
    /// The view is taken after the available index is read: memory the driver had
    /// plugged before it made a request available is in the view that serves it. (A
    /// view taken first would not show memory plugged between it and the request.)
    fn process(
        &mut self,
        index: usize,
        queue: &mut Queue,
        memory: &RegionTable,
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
                served += serve_available(self, index, queue, &mem, budget)?;
                if served == BUDGET {
                    // Notifications stay off: the worker comes back by itself.
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

/// Serves up to `budget` available requests of `queue`; returns how many it served.
fn serve_available<H: QueueHandler>(
    handler: &mut H,
    index: usize,
    queue: &mut Queue,
    mem: &GuardedMemory<'_>,
    budget: usize,
) -> Result<usize, QueueError> {
    let chains: Vec<_> = queue.iter(mem)?.take(budget).collect();
    let served = chains.len();
    for chain in chains {
        let head = chain.head_index();
        let len = handler.serve(index, chain, mem);
        queue.add_used(mem, head, len)?;
    }
    Ok(served)
}

struct Worker<H: QueueHandler> {
    handler: H,
    memory: Arc<RegionTable>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    stop: EventFd,
    needs_reset: Arc<AtomicBool>,
    done: bool,
}

impl<H: QueueHandler> Worker<H> {
    fn serve(&mut self, index: usize) {
        if self.needs_reset.load(Ordering::Acquire) {
            return;
        }
        let result = self
            .handler
            .process(index, &mut self.queues[index], &self.memory);
        match result {
            Ok(served) => {
                if served.notify {
                    self.interrupt.raise(INT_VRING);
                }
                if served.more {
                    // Come back after the other queues' events (and any writer waiting
                    // for guest memory) had their turn.
                    if let Err(e) = self.queue_events[index].write(1) {
                        log::error!("virtio queue {index}: cannot reschedule: {e}");
                    }
                }
            }
            Err(e) => {
                log::warn!("virtio queue {index}: {e}; the device needs a reset");
                self.needs_reset.store(true, Ordering::Release);
                self.interrupt.raise(INT_CONFIG);
            }
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
        if let Err(e) = ops.add(Events::with_data(&self.stop, u32::MAX, EventSet::IN)) {
            log::error!("virtio: cannot watch the stop event: {e:?}");
        }
        // Requests made before activation completed: serve them now.
        for i in 0..self.queues.len() {
            self.serve(i);
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.stop.as_raw_fd() {
            self.done = true;
            return;
        }
        let index = events.data() as usize;
        if let Some(fd) = self.queue_events.get(index) {
            let _ = fd.read();
            self.serve(index);
        }
    }
}

/// A running device thread.
#[derive(Debug)]
pub struct WorkerHandle {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(thread) = self.thread.take() {
            if let Err(e) = self.stop.write(1) {
                log::error!("virtio: cannot stop a device thread: {e}");
                return;
            }
            if thread.join().is_err() {
                log::error!("virtio: a device thread panicked");
            }
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Starts thread `name` serving `activation`'s queues with `handler`; sets the activation's
/// `needs_reset` if a queue turns out unusable.
pub fn spawn<H: QueueHandler>(
    name: String,
    activation: Activation,
    handler: H,
) -> Result<WorkerHandle, ActivateError> {
    let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::EventFd)?;
    let worker = Worker {
        handler,
        memory: activation.memory,
        queues: activation.queues,
        queue_events: activation.queue_events,
        interrupt: activation.interrupt,
        stop: stop.try_clone().map_err(ActivateError::EventFd)?,
        needs_reset: activation.needs_reset,
        done: false,
    };
    let thread = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
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
                    return;
                }
                let done = events.subscriber_mut(id).map(|w| w.done).unwrap_or(true);
                if done {
                    return;
                }
            }
        })
        .map_err(ActivateError::Thread)?;
    Ok(WorkerHandle {
        stop,
        thread: Some(thread),
    })
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
        let served = handler.process(0, &mut queue, &table).unwrap();
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
        let served = handler.process(0, &mut queue, &table).unwrap();
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
        let served = handler.process(0, &mut queue, &table).unwrap();
        assert_eq!(
            served,
            Served {
                notify: false,
                more: false
            }
        );
        assert_eq!(handler.0, usize::from(SIZE) + 13);

        // Nothing available: nothing to say.
        let served = handler.process(0, &mut queue, &table).unwrap();
        assert_eq!(served, Served::default());
    }
}
