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
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
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

    /// Serves the available requests of queue `index`; returns whether the driver must be
    /// notified. By default all of them under one read lock of guest memory; a device whose
    /// requests change guest memory itself (a writer) must not hold the lock meanwhile.
    fn process(
        &mut self,
        index: usize,
        queue: &mut Queue,
        memory: &RegionTable,
    ) -> Result<bool, QueueError>
    where
        Self: Sized,
    {
        let mem = GuardedMemory::lock_all(memory, memory_deadline())?;
        let used = serve_available(self, index, queue, &mem)?;
        Ok(used && queue.needs_notification(&mem)?)
    }
}

/// Serves every available request of `queue`; returns whether any was used.
fn serve_available<H: QueueHandler>(
    handler: &mut H,
    index: usize,
    queue: &mut Queue,
    mem: &GuardedMemory<'_>,
) -> Result<bool, QueueError> {
    let chains: Vec<_> = queue.iter(mem)?.collect();
    let used = !chains.is_empty();
    for chain in chains {
        let head = chain.head_index();
        let len = handler.serve(index, chain, mem);
        queue.add_used(mem, head, len)?;
    }
    Ok(used)
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
            Ok(true) => self.interrupt.raise(INT_VRING),
            Ok(false) => {}
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
