//! The VMM's control loop, on the main thread: at most one VM at a time, created and
//! booted from the command line (`kite run`) or through the API (`kite serve`), and the
//! process's own events — SIGINT/SIGTERM, a failed VMM thread, API requests.
//!
//! The API thread answers reads (`vm.info`, `vm.counters`) and `vm.resize` itself from
//! the shared [`VmStatus`], so it never waits for this thread or for a writer of the
//! region table; it sends what changes the VM's life here ([`Action`]), with what to do
//! with the outcome ([`Reply`]: answer the connection that asked, which waits for it while
//! the API thread serves the others).
//!
//! Lifecycle, as Cloud Hypervisor's: `vm.create` (state `Created`) → `vm.boot`
//! (`Running`) ⇄ `vm.pause`/`vm.resume` (`Paused`) → `vm.shutdown` (`Shutdown`: the
//! configuration is kept, `vm.boot` starts a new VM from it) → `vm.delete` (no VM).
//! `vm.reboot` is a shutdown and a boot. When the guest ends the VM (power-off, reset,
//! crash), or a signal or a failed VMM thread does, the process exits with that VM's
//! exit code; `vmm.shutdown` ends the process with exit 0.

use std::os::fd::AsRawFd;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{
    EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberId, SubscriberOps,
};
use vmm_sys_util::eventfd::EventFd;

use std::path::{Path, PathBuf};

use crate::builder::{self, BuildContext, Origin};
use crate::config::{DiskConfig, SerialMode, VmConfig};
use crate::console::{self, RawTerminal};
use crate::end::{signal_event, Failures, VmEnd};
use crate::machine::{Machine, MachineError, MachineState, MachineView};
use crate::seccomp::{Confinement, SeccompMode, ThreadKind};
use crate::signals;
use crate::snapshot::{self, MemoryRestore, Restore, SnapshotError};
use crate::spec::{SpecError, VmSpec};
use crate::vstate::vcpu::install_kick_handler;

/// A VM's state, as the API reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum VmState {
    /// Configured, never booted.
    Created,
    /// Running.
    Running,
    /// Paused.
    Paused,
    /// Shut down through the API; can be booted again.
    Shutdown,
}

/// What the API reads of the VM without asking this thread.
#[derive(Clone, Default)]
pub struct VmStatus {
    /// The VM's state and configuration; `None` without a VM.
    pub vm: Option<(VmState, Arc<VmSpec>)>,
    /// The configuration as `vm.info` reports it (Cloud Hypervisor's `VmConfig`, JSON),
    /// made once per change rather than per request.
    pub config_json: Option<Arc<str>>,
    /// The running (or paused) machine's memory and devices.
    pub machine: Option<MachineView>,
}

/// A request that changes the VM's life, carried out on this thread.
#[derive(Debug)]
pub enum Action {
    /// `vm.create`.
    Create(Box<VmConfig>),
    /// `vm.boot`.
    Boot,
    /// `vm.pause`.
    Pause,
    /// `vm.resume`.
    Resume,
    /// `vm.shutdown`.
    Shutdown,
    /// `vm.reboot`.
    Reboot,
    /// `vm.delete`.
    Delete,
    /// `vm.snapshot`: into this directory (which must not exist).
    Snapshot(PathBuf),
    /// `vm.restore`.
    Restore(Box<RestoreRequest>),
    /// `vmm.shutdown`.
    ShutdownVmm,
}

/// A restore: the snapshot, how memory comes back, and the disks if not the snapshot's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreRequest {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// How guest memory comes back.
    pub mode: MemoryRestore,
    /// Disks in place of the snapshot's (as many, of the same sizes), for clones.
    pub disks: Option<Vec<DiskConfig>>,
}

/// Why an [`Action`] was refused.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// No VM has been created.
    #[error("no VM is created (vm.create first)")]
    NotCreated,
    /// The action does not apply in the VM's state.
    #[error("the VM is {state:?}: {action} needs it {wanted}")]
    WrongState {
        /// The VM's state.
        state: VmState,
        /// The action.
        action: &'static str,
        /// The state the action needs.
        wanted: &'static str,
    },
    /// The configuration is wrong.
    #[error(transparent)]
    Config(#[from] SpecError),
    /// The VM could not be built, started or paused.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// The VM ended (the guest, a signal, a failed thread) before the action was carried
    /// out; the VMM is ending.
    #[error("the VM ended before the action was carried out; the VMM is ending")]
    Ended,
}

/// What an action's outcome is given to (on the VMM thread).
pub type Reply = Box<dyn FnOnce(Result<(), ActionError>) + Send>;

/// An action and what its outcome is given to.
pub type Envelope = (Action, Reply);

/// How the VMM ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A VM ended (the guest, a signal, a failed thread, `--timeout`).
    Vm(VmEnd),
    /// `vmm.shutdown`.
    Shutdown,
}

/// The process's events: signals, failed VMM threads, API requests waiting.
struct ProcessEvents {
    signal: &'static EventFd,
    failures: Arc<Failures>,
    inbox: EventFd,
    signalled: Option<i32>,
    failed: Option<String>,
    requests: bool,
}

impl MutEventSubscriber for ProcessEvents {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [self.signal, &self.failures.event, &self.inbox] {
            if let Err(e) = ops.add(Events::new(fd, EventSet::IN)) {
                log::error!("cannot watch a VMM event: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.signal.as_raw_fd() {
            let _ = self.signal.read();
            self.signalled
                .get_or_insert(signals::received().unwrap_or(libc::SIGTERM));
        } else if fd == self.failures.event.as_raw_fd() {
            let _ = self.failures.event.read();
            if self.failed.is_none() {
                self.failed = self.failures.first();
            }
        } else {
            let _ = self.inbox.read();
            self.requests = true;
        }
    }
}

/// Settings of the VMM itself (not of a VM).
pub struct VmmOptions {
    /// What the seccomp filters do.
    pub seccomp: SeccompMode,
    /// How long each VM may run.
    pub timeout: Option<Duration>,
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A machine and its place in the event loop.
struct Live {
    machine: Machine,
    subscribers: Vec<SubscriberId>,
    /// The terminal in raw mode while the guest has the console.
    _terminal: Option<RawTerminal>,
}

/// The VMM: the event loop and at most one VM.
pub struct Vmm {
    events: EventManager<Subscriber>,
    process: Arc<Mutex<ProcessEvents>>,
    inbox: Option<Receiver<Envelope>>,
    status: Arc<Mutex<VmStatus>>,
    spec: Option<(Arc<VmSpec>, VmState)>,
    live: Option<Live>,
    context: BuildContext,
    /// The main thread's filter once a VM runs: `Vmm` when the API can build more VMs,
    /// `Main` when not.
    main_kind: ThreadKind,
    confined: bool,
}

fn event_error<E: std::fmt::Debug>(e: E) -> MachineError {
    MachineError::Events(format!("{e:?}"))
}

impl Vmm {
    /// The process-wide setup (no new privileges, signal handlers, filters compiled) and
    /// an empty VMM. `api` is whether an API may create and boot VMs.
    pub fn new(options: VmmOptions, api: bool) -> Result<Vmm, MachineError> {
        // No process Kite starts may gain privileges (set-user-id files, file
        // capabilities); the seccomp filters need this too.
        // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1) takes no pointers and only ever restricts.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(MachineError::Events(format!(
                "PR_SET_NO_NEW_PRIVS: {}",
                std::io::Error::last_os_error()
            )));
        }
        let signal = signal_event()?;
        install_kick_handler()?;
        let failures = Arc::new(Failures::new().map_err(event_error)?);
        let confinement = Confinement::new(options.seccomp)?;
        let mut events = EventManager::<Subscriber>::new().map_err(event_error)?;
        let process = Arc::new(Mutex::new(ProcessEvents {
            signal,
            failures: Arc::clone(&failures),
            inbox: builder::eventfd()?,
            signalled: None,
            failed: None,
            requests: false,
        }));
        events.add_subscriber(process.clone());
        Ok(Vmm {
            events,
            process,
            inbox: None,
            status: Arc::new(Mutex::new(VmStatus::default())),
            spec: None,
            live: None,
            context: BuildContext {
                confinement,
                failures,
                timeout: options.timeout,
            },
            main_kind: if api {
                ThreadKind::Vmm
            } else {
                ThreadKind::Main
            },
            confined: false,
        })
    }

    /// What the API thread needs: the status it reads, the hooks of its thread, and the
    /// inbox (with the eventfd that wakes this loop) it sends actions to.
    pub fn api_channel(
        &mut self,
    ) -> Result<(Arc<Mutex<VmStatus>>, memory::ThreadHooks, ActionSender), MachineError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.inbox = Some(rx);
        let wake = self.lock_process().inbox.try_clone().map_err(event_error)?;
        Ok((
            Arc::clone(&self.status),
            self.context.hooks(ThreadKind::Api),
            ActionSender { tx, wake },
        ))
    }

    fn lock_process(&self) -> std::sync::MutexGuard<'_, ProcessEvents> {
        self.process.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self) {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let changed = match (&status.vm, &self.spec) {
            (Some((_, old)), Some((new, _))) => !Arc::ptr_eq(old, new),
            (None, None) => false,
            _ => true,
        };
        status.vm = self
            .spec
            .as_ref()
            .map(|(spec, state)| (*state, Arc::clone(spec)));
        if changed {
            status.config_json = self.spec.as_ref().map(|(spec, _)| {
                crate::api::vm_config::to_ch_json(
                    &spec.config,
                    &spec.kernel,
                    spec.initramfs.as_deref(),
                    spec.config.cmdline.as_deref().unwrap_or_default(),
                )
                .to_string()
                .into()
            });
        }
        status.machine = self.live.as_ref().map(|l| l.machine.view());
    }

    fn state(&self) -> Option<VmState> {
        self.spec.as_ref().map(|(_, state)| *state)
    }

    fn set_state(&mut self, state: VmState) {
        if let Some((_, s)) = &mut self.spec {
            *s = state;
        }
    }

    /// `vm.create`: resolves and keeps the configuration.
    pub fn create(&mut self, config: VmConfig) -> Result<(), ActionError> {
        if let Some(state) = self.state() {
            return Err(ActionError::WrongState {
                state,
                action: "vm.create",
                wanted: "deleted first (vm.delete)",
            });
        }
        let spec = VmSpec::resolve(config)?;
        log::info!(
            "VM created: {} ({} vCPUs, {} bytes of memory), cmdline: {}",
            spec.kernel.display(),
            spec.cpus,
            spec.memory,
            spec.cmdline
        );
        self.spec = Some((Arc::new(spec), VmState::Created));
        self.publish();
        Ok(())
    }

    /// `vm.boot`: builds the VM and starts it.
    pub fn boot(&mut self) -> Result<(), ActionError> {
        let (spec, state) = self.spec.clone().ok_or(ActionError::NotCreated)?;
        if !matches!(state, VmState::Created | VmState::Shutdown) {
            return Err(ActionError::WrongState {
                state,
                action: "vm.boot",
                wanted: "Created or Shutdown",
            });
        }
        self.launch(&spec, Origin::Boot)?;
        self.start()
    }

    /// `vm.restore` (and `kite run --restore`): builds the VM a snapshot kept, paused
    /// (not started: `vm.resume` starts it). Only without a VM; on an error there is
    /// still none.
    pub fn restore(&mut self, request: &RestoreRequest) -> Result<(), ActionError> {
        if let Some(state) = self.state() {
            return Err(ActionError::WrongState {
                state,
                action: "vm.restore",
                wanted: "deleted first (vm.delete)",
            });
        }
        let restore = Restore::open(&request.dir, request.mode).map_err(MachineError::from)?;
        let mut config = restore.snapshot.config.clone();
        if let Some(disks) = &request.disks {
            if disks.len() != config.disks.len() {
                return Err(MachineError::from(SnapshotError::Disks(format!(
                    "the snapshot's VM has {} disks, {} given",
                    config.disks.len(),
                    disks.len()
                )))
                .into());
            }
            config.disks = disks.clone();
        }
        let spec = Arc::new(VmSpec::restored(config)?);
        for (disk, saved) in spec.disks.iter().zip(&restore.snapshot.disks) {
            let size = snapshot::disk_size(&disk.path).map_err(MachineError::from)?;
            if size != saved.size {
                return Err(MachineError::from(SnapshotError::Disks(format!(
                    "{} has {size} bytes; the snapshot's disk had {}",
                    disk.path.display(),
                    saved.size
                )))
                .into());
            }
        }
        self.launch(&spec, Origin::Restore(&restore))?;
        log::info!(
            "VM restored from {} ({} memory, {} bytes of data)",
            request.dir.display(),
            match request.mode {
                MemoryRestore::Lazy => "lazy",
                MemoryRestore::Eager => "eager",
            },
            restore.snapshot.memory.data_bytes
        );
        self.spec = Some((spec, VmState::Paused));
        self.publish();
        Ok(())
    }

    /// Builds the machine of `spec` from `origin` and puts it in the event loop; not
    /// started.
    fn launch(&mut self, spec: &VmSpec, origin: Origin<'_>) -> Result<(), ActionError> {
        let console: Box<dyn std::io::Write + Send> = match spec.config.serial {
            SerialMode::Tty => Box::new(std::io::stdout()),
            SerialMode::Off => Box::new(std::io::sink()),
        };
        let machine = builder::build(spec, &self.context, console, origin)?;
        let (end, input) = machine.subscribers();
        let mut subscribers = vec![self.events.add_subscriber(end)];
        let terminal = input.filter(|_| console::stdin_is_ours()).map(|input| {
            subscribers.push(self.events.add_subscriber(input));
            RawTerminal::enter()
        });
        self.live = Some(Live {
            machine,
            subscribers,
            _terminal: terminal,
        });
        Ok(())
    }

    /// Starts the machine built by [`Vmm::launch`], then confines this thread.
    pub fn start(&mut self) -> Result<(), ActionError> {
        let Some(live) = &mut self.live else {
            return Err(ActionError::NotCreated);
        };
        if let Err(e) = live.machine.start() {
            self.stop_machine(VmEnd::VmmFailure(e.to_string()));
            return Err(e.into());
        }
        self.set_state(VmState::Running);
        self.publish();
        // Every thread of the first VM exists now: the main thread confines itself (a
        // thread keeps the filter it was created with).
        if let Err(e) = self.confine() {
            // No VM runs unconfined.
            self.stop_machine(VmEnd::VmmFailure(e.to_string()));
            self.set_state(VmState::Shutdown);
            self.publish();
            return Err(ActionError::Machine(MachineError::Seccomp(e)));
        }
        Ok(())
    }

    /// Confines the main thread with its filter (once): `Vmm` when the API can build VMs,
    /// `Main` when not. `kite serve` does it before any VM exists; `kite run` once its VM
    /// runs.
    pub fn confine(&mut self) -> Result<(), crate::seccomp::SeccompError> {
        if !self.confined {
            self.context.confinement.confine(self.main_kind)?;
            self.confined = true;
        }
        Ok(())
    }

    /// `vm.snapshot`: pauses a running VM (a paused one stays paused), writes the
    /// snapshot into `dir`, and lets it run on as it was.
    pub fn snapshot(&mut self, dir: &Path) -> Result<(), ActionError> {
        let (spec, state) = self.spec.clone().ok_or(ActionError::NotCreated)?;
        let machine = match &mut self.live {
            Some(live)
                if matches!(
                    live.machine.state(),
                    MachineState::Running | MachineState::Paused
                ) =>
            {
                &mut live.machine
            }
            _ => {
                return Err(ActionError::WrongState {
                    state,
                    action: "vm.snapshot",
                    wanted: "Running or Paused",
                })
            }
        };
        let was_running = machine.state() == MachineState::Running;
        if was_running {
            machine.pause()?;
        }
        let started = std::time::Instant::now();
        let written = snapshot::write_dir(dir, |file| machine.snapshot(&spec, file));
        if was_running {
            machine.resume();
        }
        let snapshot = written.map_err(MachineError::from)?;
        log::info!(
            "snapshot {} written in {:?}: {} bytes of guest memory data",
            dir.display(),
            started.elapsed(),
            snapshot.memory.data_bytes
        );
        Ok(())
    }

    /// Tears the running machine down; how it ended.
    fn stop_machine(&mut self, end: VmEnd) -> Option<VmEnd> {
        let live = self.live.take()?;
        // The API stops reporting it first: it never reads a machine being torn down.
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .machine = None;
        for id in live.subscribers {
            let _ = self.events.remove_subscriber(id);
        }
        let end = live.machine.shutdown(end);
        drop(live._terminal);
        self.publish();
        Some(end)
    }

    fn running(
        &mut self,
        action: &'static str,
        wanted: MachineState,
    ) -> Result<&mut Machine, ActionError> {
        let state = self.state().ok_or(ActionError::NotCreated)?;
        match &mut self.live {
            Some(live) if live.machine.state() == wanted => Ok(&mut live.machine),
            _ => Err(ActionError::WrongState {
                state,
                action,
                wanted: match wanted {
                    MachineState::Paused => "Paused",
                    _ => "Running",
                },
            }),
        }
    }

    /// Carries out `action`; `Some` when the VMM must end.
    fn act(&mut self, action: Action) -> (Result<(), ActionError>, Option<Outcome>) {
        let result = match action {
            Action::Create(config) => self.create(*config),
            Action::Boot => self.boot(),
            Action::Pause => self
                .running("vm.pause", MachineState::Running)
                .and_then(|m| Ok(m.pause()?))
                .map(|()| self.set_state(VmState::Paused)),
            // A restored VM is resumed by starting it.
            Action::Resume
                if self
                    .live
                    .as_ref()
                    .is_some_and(|l| l.machine.state() == MachineState::Built) =>
            {
                self.start()
            }
            Action::Resume => self
                .running("vm.resume", MachineState::Paused)
                .map(Machine::resume)
                .map(|()| self.set_state(VmState::Running)),
            Action::Snapshot(dir) => self.snapshot(&dir),
            Action::Restore(request) => self.restore(&request),
            Action::Shutdown => self.shutdown_vm("vm.shutdown"),
            Action::Reboot => self.shutdown_vm("vm.reboot").and_then(|()| self.boot()),
            Action::Delete => {
                self.stop_machine(VmEnd::PowerOff);
                self.spec = None;
                Ok(())
            }
            Action::ShutdownVmm => {
                self.stop_machine(VmEnd::PowerOff);
                self.spec = None;
                self.publish();
                return (Ok(()), Some(Outcome::Shutdown));
            }
        };
        self.publish();
        (result, None)
    }

    fn shutdown_vm(&mut self, action: &'static str) -> Result<(), ActionError> {
        let state = self.state().ok_or(ActionError::NotCreated)?;
        if self.live.is_none() {
            return Err(ActionError::WrongState {
                state,
                action,
                wanted: "Running or Paused",
            });
        }
        // Reported as shut down from now on, not as running while it is torn down.
        self.set_state(VmState::Shutdown);
        self.publish();
        self.stop_machine(VmEnd::PowerOff);
        Ok(())
    }

    /// Runs until the VM ends or the VMM is shut down. Whatever ends it, the machine is
    /// torn down here, and actions still waiting are told the VM ended.
    pub fn run(mut self) -> Result<Outcome, MachineError> {
        let result = self.run_until_end();
        let result = match result {
            Ok(Outcome::Vm(end)) => Ok(Outcome::Vm(self.stop_machine(end.clone()).unwrap_or(end))),
            Ok(Outcome::Shutdown) => Ok(Outcome::Shutdown),
            Err(e) => {
                self.stop_machine(VmEnd::VmmFailure(e.to_string()));
                Err(e)
            }
        };
        if let Some(inbox) = &self.inbox {
            while let Ok((_, reply)) = inbox.try_recv() {
                reply(Err(ActionError::Ended));
            }
        }
        result
    }

    /// The process's or the VM's end, if either came.
    fn end(&self) -> Option<VmEnd> {
        let (signalled, failed) = {
            let mut p = self.lock_process();
            (p.signalled.take(), p.failed.take())
        };
        signalled
            .map(VmEnd::Signal)
            .or(failed.map(VmEnd::VmmFailure))
            .or_else(|| self.live.as_ref().and_then(|l| l.machine.take_end()))
    }

    fn run_until_end(&mut self) -> Result<Outcome, MachineError> {
        loop {
            self.events.run().map_err(event_error)?;
            if let Some(end) = self.end() {
                return Ok(Outcome::Vm(end));
            }
            let requests = std::mem::take(&mut self.lock_process().requests);
            if !requests {
                continue;
            }
            while let Some((action, reply)) =
                self.inbox.as_ref().and_then(|inbox| inbox.try_recv().ok())
            {
                log::info!("API: {action:?}");
                let (result, outcome) = self.act(action);
                if let Err(e) = &result {
                    log::info!("API: refused: {e}");
                }
                reply(result);
                if let Some(outcome) = outcome {
                    return Ok(outcome);
                }
                // An action may take a while (a boot): the VM may have ended meanwhile.
                // Its events are looked at (without waiting) before the next action.
                self.events.run_with_timeout(0).map_err(event_error)?;
                if let Some(end) = self.end() {
                    return Ok(Outcome::Vm(end));
                }
            }
        }
    }
}

/// Sends actions from the API thread to the VMM thread.
pub struct ActionSender {
    tx: std::sync::mpsc::Sender<Envelope>,
    wake: EventFd,
}

impl ActionSender {
    /// Sends on `tx`, waking the VMM thread with `wake` (for a VMM of one's own: tests,
    /// fuzzing).
    pub fn new(tx: std::sync::mpsc::Sender<Envelope>, wake: EventFd) -> Self {
        ActionSender { tx, wake }
    }

    /// Sends `action`; `reply` gets its outcome on the VMM thread. Whether it was sent
    /// (the VMM thread is there).
    pub fn send(&self, action: Action, reply: Reply) -> bool {
        self.tx.send((action, reply)).is_ok() && self.wake.write(1).is_ok()
    }
}
