//! A device's thread. It starts with the device, before the VM runs (so the VMM can
//! confine it with a seccomp filter of its own: [`ThreadContext::confine`]), waits until
//! the driver sets the device up, then serves its queues with the device's
//! [`QueueHandler`], each notified queue in turn (an event-manager loop over the queue
//! eventfds). A device reset sends it back to waiting after the request in hand.
//!
//! Register accesses (on vCPU threads) only send it commands and never wait for it:
//! a reset during a slow disk read returns at once, and a setup that follows is served
//! once the thread is done with the old one, in order, by the same thread.
//!
//! The VMM pauses it ([`DeviceThread::pause`]) to quiesce the VM (pause, snapshot): the
//! thread finishes the request in hand, stops watching its queues (their eventfds keep
//! counting the driver's notifications), says so ([`DeviceThread::wait_paused`]) and then
//! serves nothing, setups and resets included, until [`DeviceThread::resume`]; only an
//! exit (the device dropped) is still taken.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use memory::{GuardedMemory, RegionTable};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::worker::{memory_deadline, QueueError, QueueHandler, Stopping};
use super::{ActivateError, Activation, Interrupt, INT_CONFIG, INT_VRING};
use crate::guest_log::GuestLog;
use crate::thread_exit::{note_left_behind, wait_readable, ExitSignal};

/// What the VMM gives each device thread.
#[derive(Clone)]
pub struct ThreadContext {
    /// Run first on the thread, with the device type (`VIRTIO_ID_*`), before it touches
    /// guest data: the VMM installs the thread's seccomp filter here. An error ends the
    /// thread (and, through [`ThreadContext::died`], the VM).
    pub confine: Arc<dyn Fn(u32) -> Result<(), String> + Send + Sync>,
    /// Told why, when the thread ends other than by being dropped with its device (a
    /// panic, a failed event loop, a failed confinement): the VMM ends the VM.
    pub died: Arc<dyn Fn(String) + Send + Sync>,
}

impl Default for ThreadContext {
    /// Unconfined; a death is logged.
    fn default() -> Self {
        ThreadContext {
            confine: Arc::new(|_| Ok(())),
            died: Arc::new(|why| log::error!("{why}")),
        }
    }
}

impl std::fmt::Debug for ThreadContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadContext").finish_non_exhaustive()
    }
}

/// What the device has told its thread and the thread has not taken yet.
#[derive(Default)]
struct Inbox {
    /// The setup to serve next, and the number of stops requested before it (a setup
    /// stopped before the thread got to it is never served). A setup is sent only after
    /// the one before it was stopped, so one still waiting is stale: keeping just the
    /// newest bounds the mailbox (and the descriptors each setup holds) whatever the
    /// driver does while the thread is busy or paused.
    setup: Option<(Box<Activation>, u64)>,
    /// End the thread (taken even while paused).
    exit: bool,
    /// Whether a pause is asked, until the resume.
    paused: bool,
    /// Pauses asked so far.
    pauses: u64,
    /// The last of them the thread acknowledged (it was idle, holding no guest memory).
    acknowledged: u64,
    /// At the acknowledgement: the queues of the setup being served, as the thread left
    /// them, with the stop requests before that setup began (a snapshot's queue state).
    held: Option<(Vec<QueueState>, u64)>,
}

/// The thread is not paused: what it serves is not a point in time.
#[derive(Debug, thiserror::Error)]
#[error("the device thread is not paused")]
pub struct NotPaused;

/// The thread's inbox and the eventfd that wakes it.
struct Mailbox {
    inbox: Mutex<Inbox>,
    /// Notified when the thread acknowledges a pause.
    pause_acknowledged: Condvar,
    wake: EventFd,
    /// Stop requests so far (device resets).
    stops: AtomicU64,
    /// `Inbox::paused`, for the thread to check between requests without the lock.
    pausing: AtomicBool,
}

impl Mailbox {
    fn wake(&self) {
        if let Err(e) = self.wake.write(1) {
            log::error!("virtio: cannot wake a device thread: {e}");
        }
    }

    fn inbox(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the inbox with `f`, then wakes the thread.
    fn send(&self, f: impl FnOnce(&mut Inbox)) {
        f(&mut self.inbox());
        self.wake();
    }
}

/// Longest dropping a [`DeviceThread`] waits for its thread (VM shutdown): a thread stuck
/// in a host I/O call is left behind rather than holding the VMM up.
const DROP_DEADLINE: Duration = Duration::from_secs(2);
/// The event-loop data of the mailbox's eventfd (queue events carry their index).
const WAKE: u32 = u32::MAX;

/// A device's thread, owned by the device.
pub struct DeviceThread {
    name: String,
    mailbox: Arc<Mailbox>,
    active: bool,
    /// Signalled by the thread as it exits (even by a panic).
    exited: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for DeviceThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceThread")
            .field("name", &self.name)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

impl DeviceThread {
    /// Starts thread `name` for a device of type `device_type` (`VIRTIO_ID_*`), which will
    /// serve the queues of each setup with `handler`.
    pub fn spawn<H: QueueHandler>(
        name: &str,
        device_type: u32,
        handler: H,
        context: &ThreadContext,
    ) -> Result<Self, ActivateError> {
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::EventFd);
        let mailbox = Arc::new(Mailbox {
            inbox: Mutex::new(Inbox::default()),
            pause_acknowledged: Condvar::new(),
            wake: eventfd()?,
            stops: AtomicU64::new(0),
            pausing: AtomicBool::new(false),
        });
        let exited = eventfd()?;
        let exit_signal = ExitSignal(exited.try_clone().map_err(ActivateError::EventFd)?);
        let worker = Worker {
            handler,
            mailbox: Arc::clone(&mailbox),
            active: None,
            watching: false,
            exit: false,
        };
        let context = context.clone();
        let thread_name = name.to_string();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let _exit_signal = exit_signal;
                let _panic_watch = PanicWatch {
                    name: thread_name.clone(),
                    died: Arc::clone(&context.died),
                };
                let result = (context.confine)(device_type).and_then(|()| run(worker));
                if let Err(e) = result {
                    (context.died)(format!("device thread {thread_name}: {e}"));
                }
            })
            .map_err(ActivateError::Thread)?;
        Ok(DeviceThread {
            name: name.to_string(),
            mailbox,
            active: false,
            exited,
            thread: Some(thread),
        })
    }

    /// Hands a setup's queues to the thread. Does not wait.
    pub fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        if self.active {
            return Err(ActivateError::AlreadyActive);
        }
        let epoch = self.mailbox.stops.load(Ordering::Acquire);
        self.mailbox
            .send(|inbox| inbox.setup = Some((Box::new(activation), epoch)));
        self.active = true;
        Ok(())
    }

    /// Asks the thread to stop serving the current setup after the request in hand; does
    /// not wait.
    pub fn stop(&mut self) {
        if self.active {
            self.mailbox.stops.fetch_add(1, Ordering::AcqRel);
            self.mailbox.wake();
            self.active = false;
        }
    }

    /// Asks the thread to pause: to finish the request in hand, then serve nothing
    /// (requests, setups, resets) until [`DeviceThread::resume`]. Does not wait: see
    /// [`DeviceThread::wait_paused`]. Pausing a paused thread changes nothing.
    pub fn pause(&mut self) {
        self.mailbox.send(|inbox| {
            if !inbox.paused {
                inbox.paused = true;
                inbox.pauses += 1;
                self.mailbox.pausing.store(true, Ordering::Release);
            }
        });
    }

    /// Ends the pause: the thread serves, in order, what came meanwhile (a reset, a
    /// setup, the queues' notifications). Does not wait.
    pub fn resume(&mut self) {
        self.mailbox.send(|inbox| {
            inbox.paused = false;
            self.mailbox.pausing.store(false, Ordering::Release);
        });
    }

    /// Waits until the thread has acknowledged the pause asked last — it is idle between
    /// requests and holds no guest memory — or until `deadline`: whether it has. False
    /// at once when no pause is asked; never waits past `deadline` (a thread stuck in a
    /// host I/O call, or dead, never acknowledges), so the VMM can give every device
    /// one deadline.
    pub fn wait_paused(&self, deadline: Instant) -> bool {
        let mut inbox = self.mailbox.inbox();
        loop {
            if !inbox.paused {
                return false;
            }
            if inbox.acknowledged == inbox.pauses {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            inbox = self
                .mailbox
                .pause_acknowledged
                .wait_timeout(inbox, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl DeviceThread {
    /// The queues of the setup the device serves, as a paused thread left them — the
    /// rings' positions a snapshot keeps; `None` when it serves none (never set up, or
    /// reset). A setup sent while paused, not begun yet, counts as served from its start.
    pub fn paused_queues(&self) -> Result<Option<Vec<QueueState>>, NotPaused> {
        let inbox = self.mailbox.inbox();
        if !inbox.paused || inbox.acknowledged != inbox.pauses {
            return Err(NotPaused);
        }
        let stops = self.mailbox.stops.load(Ordering::Acquire);
        if let Some((setup, epoch)) = &inbox.setup {
            if *epoch == stops {
                return Ok(Some(setup.queues.iter().map(Queue::state).collect()));
            }
        }
        Ok(inbox
            .held
            .as_ref()
            .filter(|(_, epoch)| *epoch == stops)
            .map(|(queues, _)| queues.clone()))
    }
}

impl Drop for DeviceThread {
    fn drop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.mailbox.stops.fetch_add(1, Ordering::AcqRel);
        self.mailbox.send(|inbox| inbox.exit = true);
        if !wait_readable(&self.exited, Instant::now() + DROP_DEADLINE) {
            note_left_behind();
            log::error!(
                "virtio: device thread {} did not stop within {DROP_DEADLINE:?}; left behind",
                self.name
            );
            return;
        }
        if thread.join().is_err() {
            log::error!("virtio: device thread {} panicked", self.name);
        }
    }
}

/// Reports a thread that unwinds (a panic).
struct PanicWatch {
    name: String,
    died: Arc<dyn Fn(String) + Send + Sync>,
}

impl Drop for PanicWatch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            (self.died)(format!("device thread {} panicked", self.name));
        }
    }
}

/// The setup being served.
struct Active {
    memory: Arc<RegionTable>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    needs_reset: Arc<std::sync::atomic::AtomicBool>,
    log: Arc<GuestLog>,
    /// Stop requests before it began.
    epoch: u64,
}

struct Worker<H: QueueHandler> {
    handler: H,
    mailbox: Arc<Mailbox>,
    active: Option<Active>,
    /// Whether the event loop watches the active setup's queue eventfds (not while
    /// paused).
    watching: bool,
    exit: bool,
}

impl Active {
    /// The queue is unusable: the driver must reset the device. Not for a setup that
    /// was stopped meanwhile (its errors are about rings the driver has given up).
    fn fail(&self, e: &QueueError, stopping: Stopping<'_>) {
        if stopping.requested() {
            return;
        }
        self.log
            .warn("queue error", || format!("{e}; the device needs a reset"));
        self.needs_reset.store(true, Ordering::Release);
        self.interrupt.raise(INT_CONFIG);
    }
}

impl<H: QueueHandler> Worker<H> {
    fn stopping(&self, active: &Active) -> bool {
        Stopping::new(&self.mailbox.stops, active.epoch).requested()
    }

    /// Starts (`on`) or stops watching the active setup's queue eventfds.
    fn watch(&mut self, ops: &mut EventOps, on: bool) {
        let Some(active) = self.active.as_ref().filter(|_| self.watching != on) else {
            return;
        };
        for (i, fd) in active.queue_events.iter().enumerate() {
            let events = Events::with_data(fd, i as u32, EventSet::IN);
            if on {
                if let Err(e) = ops.add(events) {
                    log::error!("virtio: cannot watch queue {i}: {e:?}");
                }
            } else {
                let _ = ops.remove(events);
            }
        }
        self.watching = on;
    }

    /// Starts serving `activation`: checks that every ready queue lies in guest memory,
    /// watches the queues, and serves requests made before.
    fn begin(&mut self, activation: Activation, epoch: u64, ops: &mut EventOps) {
        let active = Active {
            memory: activation.memory,
            queues: activation.queues,
            queue_events: activation.queue_events,
            interrupt: activation.interrupt,
            needs_reset: activation.needs_reset,
            log: activation.log,
            epoch,
        };
        if self.stopping(&active) {
            return; // reset before the thread got to it
        }
        let invalid = GuardedMemory::new(&active.memory, memory_deadline())
            .retry(|mem| {
                active
                    .queues
                    .iter()
                    .position(|q| q.ready() && !q.is_valid(mem))
            })
            .map_or_else(
                |e| Some(QueueError::Memory(e)),
                |i| i.map(QueueError::Invalid),
            );
        if let Some(e) = invalid {
            active.fail(&e, Stopping::new(&self.mailbox.stops, epoch));
            return;
        }
        let queues = active.queues.len();
        self.active = Some(active);
        self.watch(ops, true);
        for i in 0..queues {
            self.serve(i);
        }
    }

    /// Stops watching the current setup's queues and forgets them.
    fn end(&mut self, ops: &mut EventOps) {
        self.watch(ops, false);
        self.active = None;
    }

    fn serve(&mut self, index: usize) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let stopping =
            Stopping::new(&self.mailbox.stops, active.epoch).with_pause(&self.mailbox.pausing);
        if active.needs_reset.load(Ordering::Acquire) || stopping.requested() {
            return;
        }
        if stopping.pause_requested() {
            // Not now: the notification is kept for after the pause.
            reschedule(active, index);
            return;
        }
        // A queue the driver never made ready has no rings to touch.
        let Some(queue) = active.queues.get_mut(index).filter(|q| q.ready()) else {
            return;
        };
        match self.handler.process(index, queue, &active.memory, stopping) {
            Ok(served) => {
                if stopping.requested() {
                    return;
                }
                if served.notify {
                    active.interrupt.raise(INT_VRING);
                }
                // Come back after the other queues' events (and any writer waiting for
                // guest memory) had their turn, or after a pause that cut the turn short.
                if served.more || stopping.pause_requested() {
                    reschedule(active, index);
                }
            }
            Err(e) => active.fail(&e, stopping),
        }
    }

    /// Reads the mailbox: exits, or pauses, or ends a stopped setup and takes the next.
    fn read_mailbox(&mut self, ops: &mut EventOps) {
        let _ = self.mailbox.wake.read();
        let mailbox = Arc::clone(&self.mailbox);
        loop {
            let mut inbox = mailbox.inbox();
            if inbox.exit {
                drop(inbox);
                self.end(ops);
                self.exit = true;
                return;
            }
            if inbox.paused {
                // Between requests (this runs on the event loop, no request in hand, no
                // guest memory held): watch no queue, so a notification is neither
                // served nor consumed (nor spins the level-triggered loop), and say so.
                self.watch(ops, false);
                inbox.held = self
                    .active
                    .as_ref()
                    .map(|a| (a.queues.iter().map(Queue::state).collect(), a.epoch));
                inbox.acknowledged = inbox.pauses;
                mailbox.pause_acknowledged.notify_all();
                return;
            }
            let setup = inbox.setup.take();
            drop(inbox);
            // A stop (reset) before a setup, as they came; both wait out a pause.
            if self.active.as_ref().is_some_and(|a| self.stopping(a)) {
                self.end(ops);
            }
            // Back from a pause: the eventfds still readable are the notifications that
            // came meanwhile, reported as soon as they are watched again.
            self.watch(ops, true);
            let Some((activation, epoch)) = setup else {
                return;
            };
            self.end(ops);
            self.begin(*activation, epoch, ops);
        }
    }
}

/// Has the worker serve queue `index` again, after what else is waiting.
fn reschedule(active: &Active, index: usize) {
    if let Err(e) = active.queue_events[index].write(1) {
        log::error!("virtio queue {index}: cannot reschedule: {e}");
    }
}

impl<H: QueueHandler> MutEventSubscriber for Worker<H> {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.mailbox.wake, WAKE, EventSet::IN)) {
            log::error!("virtio: a device thread cannot watch its mailbox: {e:?}");
            self.exit = true;
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            WAKE => self.read_mailbox(ops),
            index => {
                let index = index as usize;
                let event = self.active.as_ref().and_then(|a| a.queue_events.get(index));
                if let Some(fd) = event {
                    let _ = fd.read();
                    self.serve(index);
                }
            }
        }
    }
}

/// The thread's event loop, until the device is dropped.
fn run<H: QueueHandler>(worker: Worker<H>) -> Result<(), String> {
    let mut events = EventManager::<Worker<H>>::new()
        .map_err(|e| format!("cannot start the event loop: {e:?}"))?;
    let id = events.add_subscriber(worker);
    loop {
        events
            .run()
            .map_err(|e| format!("event loop failed: {e:?}"))?;
        if events.subscriber_mut(id).map(|w| w.exit).unwrap_or(true) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::worker::tests::Counter;
    use memory::RegionSpec;
    use std::sync::atomic::AtomicBool;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    const SIZE: u16 = 16;

    fn used_idx(table: &RegionTable, used: GuestAddress) -> u16 {
        let mem = GuardedMemory::lock_all(table, None).unwrap();
        mem.read_obj(used.unchecked_add(2)).unwrap()
    }

    #[test]
    fn queues_never_made_ready_are_left_alone() {
        let table = Arc::new(RegionTable::default());
        table
            .insert(RegionSpec::anonymous(GuestAddress(0), 1 << 20), None)
            .unwrap();
        let (ready, used) = {
            let mem = GuardedMemory::lock_all(&table, None).unwrap();
            // What a device writing to a queue with no rings would overwrite.
            mem.write_slice(&[0xaa; 0x1000], GuestAddress(0)).unwrap();
            let mock = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), SIZE);
            let desc = Descriptor::new(0x8_0000, 16, VRING_DESC_F_WRITE as u16, 0);
            mock.add_desc_chains(&[RawDescriptor::from(desc)], 0)
                .unwrap();
            let queue: Queue = mock.create_queue().unwrap();
            (queue, mock.used_addr())
        };
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut thread =
            DeviceThread::spawn("test_device", 4, Counter(0), &ThreadContext::default()).unwrap();
        thread
            .activate(Activation {
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
            })
            .unwrap();
        // The device serves its queues in order when a setup begins: once queue 1's
        // request is used, queue 0 had its turn.
        let deadline = Instant::now() + Duration::from_secs(10);
        while used_idx(&table, used) != 1 {
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
    }

    #[test]
    fn a_thread_that_cannot_be_confined_reports_its_death() {
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = Mutex::new(tx);
        let context = ThreadContext {
            confine: Arc::new(|kind| Err(format!("no filter for device type {kind}"))),
            died: Arc::new(move |why| {
                let _ = tx.lock().unwrap().send(why);
            }),
        };
        let _thread = DeviceThread::spawn("kite_test", 4, Counter(0), &context).unwrap();
        let why = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the death is reported");
        assert!(
            why.contains("kite_test") && why.contains("no filter for device type 4"),
            "{why}"
        );
    }
}
