//! vCPUs: set up from KVM's CPUID and the boot state (or restored from a saved state), each
//! run on its own named thread by an explicit run-loop state machine that serves port and
//! MMIO exits from the device bus and stops on a guest event, a fatal exit or the VMM's
//! request. A paused vCPU's thread saves its state when asked
//! ([`VcpuControl::save_states`]): it owns the vCPU's file descriptor.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use devices::thread_exit::{wait_readable, ExitSignal};

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::persist::{PersistError, SaveSpec, VcpuState};
use super::vm::{Vm, VmError};
use crate::arch::x86_64::cpuid;
use crate::arch::x86_64::regs::{self, BootEntry, RegsError};
use crate::seccomp::{Confinement, ThreadKind};

/// Errors creating a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The VM could not create it.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Its registers could not be set.
    #[error(transparent)]
    Regs(#[from] RegsError),
    /// Its CPUID could not be set.
    #[error("cannot set the CPUID of vCPU {id}: {source}")]
    Cpuid {
        /// vCPU id.
        id: u8,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// The thread could not be started.
    #[error("cannot start the thread of vCPU {id}: {source}")]
    Spawn {
        /// vCPU id.
        id: u8,
        /// The error.
        source: std::io::Error,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    KickHandler(vmm_sys_util::errno::Error),
    /// Its state could not be saved or restored.
    #[error(transparent)]
    Persist(#[from] PersistError),
    /// The state of another vCPU given to restore.
    #[error("cannot restore the state of vCPU {state} into vCPU {id}")]
    WrongVcpu {
        /// vCPU id.
        id: u8,
        /// The id in the state.
        state: u8,
    },
    /// Its last exit could not be completed before its state was read.
    #[error("vCPU {id}: cannot complete its last exit before saving its state: {exit}")]
    CompleteExit {
        /// vCPU id.
        id: u8,
        /// What KVM did instead.
        exit: String,
    },
    /// vCPU states were asked while not every vCPU was paused.
    #[error("cannot save the vCPU states: {paused} of {count} vCPUs are paused")]
    NotPaused {
        /// vCPUs parked.
        paused: usize,
        /// vCPUs of the VM.
        count: usize,
    },
    /// vCPU states were asked of a VM whose vCPU threads are not all there.
    #[error("cannot save the vCPU states: {gone} vCPU thread(s) stopped")]
    VcpuGone {
        /// vCPU threads gone.
        gone: usize,
    },
    /// Not every vCPU thread saved its state by the deadline.
    #[error("cannot save the vCPU states: {saved} of {count} vCPUs saved theirs in time")]
    SaveTimeout {
        /// States saved by the deadline.
        saved: usize,
        /// vCPUs of the VM.
        count: usize,
    },
}

/// Why a vCPU stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuStop {
    /// The VMM asked it to.
    Requested,
    /// The guest powered off.
    PowerOff,
    /// The guest reset the machine.
    Reset,
    /// The guest crashed: a triple fault, or a crash it reported.
    Crash {
        /// The exit.
        exit: String,
        /// Guest RIP at the exit, if it could be read.
        rip: Option<u64>,
    },
    /// KVM could not reach the memory behind a guest access (`KVM_RUN` failed with
    /// `EFAULT`; the guest-physical address when KVM tells it).
    NoMemory {
        /// The guest-physical address, if known.
        gpa: Option<u64>,
        /// Guest RIP at the exit, if it could be read.
        rip: Option<u64>,
    },
    /// KVM cannot run the guest on: an internal error, a failed entry, an unexpected exit.
    Fatal {
        /// The exit or error.
        exit: String,
        /// Guest RIP at the exit, if it could be read.
        rip: Option<u64>,
    },
}

/// State of the run loop.
enum RunState {
    /// In or about to enter `KVM_RUN`.
    Running,
    /// Leaving the loop.
    Stopping(VcpuStop),
}

/// What the VMM asks of its vCPUs: run, pause at a safe point (out of `KVM_RUN`, between
/// exits: no device access half done), save their state while paused, or stop. Shared by
/// every vCPU of a VM.
#[derive(Debug, Default)]
pub struct VcpuControl {
    /// Set when the VM ends; the console also watches it (a write to a stalled reader
    /// gives up).
    stop: Arc<AtomicBool>,
    pause: AtomicBool,
    /// vCPUs parked by a pause, or gone (stopped for good).
    parked: Mutex<Parked>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct Parked {
    paused: usize,
    gone: usize,
    /// The save asked of the parked vCPUs, if any: its number (each request has its own,
    /// so a parked vCPU serves each once and a late answer to an old one is dropped).
    save: Option<u64>,
    /// Number of the next save request.
    next_save: u64,
    /// What the parked vCPUs answered to `save`.
    saved: Vec<Result<VcpuState, VcpuError>>,
}

impl VcpuControl {
    /// The flag set when the VM stops.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.stop)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Parked> {
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks every vCPU to stop (also a paused one); kick them so they see it.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _guard = self.lock();
        self.changed.notify_all();
    }

    /// Asks every vCPU to pause; kick them, then [`VcpuControl::wait_paused`].
    pub fn pause(&self) {
        self.pause.store(true, Ordering::Release);
    }

    /// Kicks the vCPUs with `kick` (once: a kick is never lost, see [`kick_handler`]) and
    /// waits until `count` of them are parked (or gone), until `deadline`. Whether they
    /// all parked.
    pub fn wait_paused(&self, count: usize, deadline: Instant, kick: impl Fn()) -> bool {
        kick();
        let mut parked = self.lock();
        loop {
            if parked.paused + parked.gone >= count {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            parked = self
                .changed
                .wait_timeout(parked, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Lets paused vCPUs run on.
    pub fn resume(&self) {
        self.pause.store(false, Ordering::Release);
        let _guard = self.lock();
        self.changed.notify_all();
    }

    /// The states of the `count` vCPUs of a paused VM (after [`VcpuControl::wait_paused`]),
    /// by id: each parked vCPU thread completes its last exit, saves its own state
    /// ([`Vcpu::save_state`]) and hands it over. Fails at once when not every vCPU is
    /// parked (not paused, or a vCPU thread stopped), and when the states are not all
    /// there by `deadline` (a late one is dropped). The vCPUs stay paused. One caller at a
    /// time (the VMM thread, which also pauses and resumes).
    pub fn save_states(
        &self,
        count: usize,
        deadline: Instant,
    ) -> Result<Vec<VcpuState>, VcpuError> {
        let mut parked = self.lock();
        if parked.gone > 0 {
            return Err(VcpuError::VcpuGone { gone: parked.gone });
        }
        if !self.pause.load(Ordering::Acquire) || parked.paused < count {
            let paused = if self.pause.load(Ordering::Acquire) {
                parked.paused
            } else {
                0
            };
            return Err(VcpuError::NotPaused { paused, count });
        }
        let request = parked.next_save;
        parked.next_save += 1;
        parked.save = Some(request);
        parked.saved.clear();
        self.changed.notify_all();
        let outcome = loop {
            if parked.saved.len() >= count {
                break Ok(());
            }
            if parked.gone > 0 {
                break Err(VcpuError::VcpuGone { gone: parked.gone });
            }
            let now = Instant::now();
            if now >= deadline {
                break Err(VcpuError::SaveTimeout {
                    saved: parked.saved.len(),
                    count,
                });
            }
            parked = self
                .changed
                .wait_timeout(parked, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        parked.save = None;
        let saved = std::mem::take(&mut parked.saved);
        drop(parked);
        outcome?;
        let mut states = saved.into_iter().collect::<Result<Vec<_>, _>>()?;
        states.sort_by_key(|state| state.id);
        Ok(states)
    }

    /// On `vcpu`'s thread, between exits: parks while a pause is asked (and no stop),
    /// saving its state for each save request.
    fn park_if_paused(&self, vcpu: &mut Vcpu) {
        if !self.pause.load(Ordering::Acquire) {
            return;
        }
        let mut parked = self.lock();
        parked.paused += 1;
        self.changed.notify_all();
        let mut served = None;
        while self.pause.load(Ordering::Acquire) && !self.stop.load(Ordering::Acquire) {
            match parked.save {
                Some(request) if served != Some(request) => {
                    served = Some(request);
                    // Saved unlocked: the vCPUs save at the same time.
                    drop(parked);
                    let state = vcpu.save_state();
                    parked = self.lock();
                    if parked.save == Some(request) {
                        parked.saved.push(state);
                        self.changed.notify_all();
                    }
                }
                _ => parked = self.changed.wait(parked).unwrap_or_else(|e| e.into_inner()),
            }
        }
        parked.paused -= 1;
    }

    /// On a vCPU thread leaving its loop for good.
    fn gone(&self) {
        self.lock().gone += 1;
        self.changed.notify_all();
    }
}

/// Exits served, at most, to complete the last one before a save (a string port
/// instruction exits once per element).
const MAX_COMPLETION_EXITS: usize = 1 << 16;

/// A configured vCPU, not yet running.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    io: Arc<IoManager>,
    /// What its state is made of on this host.
    spec: SaveSpec,
    /// Restored from a snapshot, and not yet run since: vCPU 0 logs when it first enters
    /// `KVM_RUN` and when it first comes back (info level), with the time since the
    /// process started, for restore benchmarks.
    announce_restore: Option<RestoreRun>,
}

/// What a restored vCPU 0 has logged of its first `KVM_RUN`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RestoreRun {
    NotEntered,
    Entered,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu").field("id", &self.id).finish()
    }
}

impl Vcpu {
    /// Creates vCPU `id` of `count` and sets its CPUID, MSRs, FPU and LINT pins. Port and
    /// MMIO exits go to `io`.
    pub fn new(vm: &Vm, id: u8, count: u8, io: Arc<IoManager>) -> Result<Self, VcpuError> {
        let fd = vm.create_vcpu(id)?;
        let mut cpuid = vm.supported_cpuid()?;
        cpuid::adjust(cpuid.as_mut_slice(), id, count);
        fd.set_cpuid2(&cpuid)
            .map_err(|source| VcpuError::Cpuid { id, source })?;
        regs::setup_msrs(&fd)?;
        regs::setup_fpu(&fd)?;
        regs::setup_lint(&fd)?;
        let spec = SaveSpec::of(vm)?;
        Ok(Vcpu {
            id,
            fd,
            io,
            spec,
            announce_restore: None,
        })
    }

    /// Gives this vCPU, created with [`Vcpu::new`] and not started, the state `state` saved
    /// of the vCPU of the same id (instead of [`Vcpu::set_boot_entry`]). The VM's own state
    /// is restored first (`Vm::restore_state`).
    pub fn restore(&mut self, state: &VcpuState) -> Result<(), VcpuError> {
        if state.id != self.id {
            return Err(VcpuError::WrongVcpu {
                id: self.id,
                state: state.id,
            });
        }
        state.restore(&self.fd)?;
        if self.id == 0 {
            self.announce_restore = Some(RestoreRun::NotEntered);
        }
        Ok(())
    }

    /// Logs vCPU 0's first entry into `KVM_RUN` after a restore, and its first exit.
    #[cold]
    fn announce(&mut self) {
        let (since, start_ns) = crate::logger::since_start();
        let now_ns = crate::logger::monotonic_ns();
        let what = match self.announce_restore {
            Some(RestoreRun::NotEntered) => {
                self.announce_restore = Some(RestoreRun::Entered);
                "enters KVM_RUN"
            }
            _ => {
                self.announce_restore = None;
                "is back from its first KVM_RUN"
            }
        };
        log::info!(
            "restore: vCPU 0 {what} {} us after the process started \
             (monotonic {now_ns} ns, process start {start_ns} ns)",
            since.as_micros()
        );
    }

    /// Saves this vCPU's state; it must not be running (not started, or on its own thread
    /// between exits). Its last exit is completed first: KVM finishes a port or MMIO
    /// access only at the next `KVM_RUN`.
    pub fn save_state(&mut self) -> Result<VcpuState, VcpuError> {
        self.complete_exit()?;
        Ok(VcpuState::save(&self.fd, self.id, &self.spec)?)
    }

    /// Completes the exit last served. KVM finishes a port or MMIO access (an IN's data
    /// into the register, the instruction pointer past it) only at the next `KVM_RUN`: a
    /// state read before would have the guest do the access again once restored.
    /// `KVM_RUN` with `immediate_exit` set finishes it and returns without running the
    /// guest further; an access that takes more exits (a string instruction, an access
    /// split in two) exits again, and is served.
    fn complete_exit(&mut self) -> Result<(), VcpuError> {
        self.fd.set_kvm_immediate_exit(1);
        let mut outcome = Err("it kept exiting".to_string());
        for _ in 0..MAX_COMPLETION_EXITS {
            match self.fd.run() {
                Err(e) if e.errno() == libc::EINTR => {
                    outcome = Ok(());
                    break;
                }
                Ok(exit) => {
                    if let Some(other) = serve_io(&self.io, exit) {
                        outcome = Err(format!("unexpected exit {other:?}"));
                        break;
                    }
                }
                Err(e) => {
                    outcome = Err(format!("KVM_RUN failed: {e}"));
                    break;
                }
            }
        }
        self.fd.set_kvm_immediate_exit(0);
        outcome.map_err(|exit| VcpuError::CompleteExit { id: self.id, exit })
    }

    /// Makes this the boot vCPU, entering the kernel at `entry`. The others wait for the
    /// boot vCPU's start-up IPIs.
    pub fn set_boot_entry(&self, entry: &BootEntry) -> Result<(), VcpuError> {
        Ok(regs::setup_boot_cpu(&self.fd, entry)?)
    }

    /// Starts the vCPU on thread `kite_vcpuN`. When it stops, it sends its id and reason on
    /// `stopped` and signals `stop_event`.
    pub fn start(
        mut self,
        control: Arc<VcpuControl>,
        stopped: Sender<(u8, VcpuStop)>,
        stop_event: EventFd,
        confinement: Arc<Confinement>,
    ) -> Result<VcpuHandle, VcpuError> {
        let id = self.id;
        let spawn_error = |source| VcpuError::Spawn { id, source };
        let exited = EventFd::new(libc::EFD_NONBLOCK).map_err(spawn_error)?;
        let exit_signal = ExitSignal(exited.try_clone().map_err(spawn_error)?);
        let thread = std::thread::Builder::new()
            .name(format!("kite_vcpu{id}"))
            .spawn(move || {
                let _exit_signal = exit_signal;
                // Dropped before `self` (captured, so dropped after the closure's locals).
                let _kicks = KickTarget::set(&mut self.fd);
                let why = match confinement.confine(ThreadKind::Vcpu) {
                    Ok(()) => self.run(&control),
                    Err(e) => VcpuStop::Fatal {
                        exit: e.to_string(),
                        rip: None,
                    },
                };
                control.gone();
                log::debug!("vCPU {id} stopped: {why:?}");
                // The receiver is gone only when the VMM is already shutting down.
                let _ = stopped.send((id, why));
                if let Err(e) = stop_event.write(1) {
                    log::error!("vCPU {id}: cannot signal its stop: {e}");
                }
            })
            .map_err(spawn_error)?;
        Ok(VcpuHandle { id, thread, exited })
    }

    fn run(&mut self, control: &VcpuControl) -> VcpuStop {
        let mut state = RunState::Running;
        loop {
            state = match state {
                RunState::Running if control.stop.load(Ordering::Acquire) => {
                    RunState::Stopping(VcpuStop::Requested)
                }
                RunState::Running => {
                    control.park_if_paused(self);
                    if control.stop.load(Ordering::Acquire) {
                        RunState::Stopping(VcpuStop::Requested)
                    } else if self.announce_restore.is_some() {
                        self.announce();
                        let state = self.run_once();
                        self.announce();
                        state
                    } else {
                        self.run_once()
                    }
                }
                RunState::Stopping(why) => return why,
            }
        }
    }

    fn rip(&self) -> Option<u64> {
        self.fd.get_regs().ok().map(|r| r.rip)
    }

    /// One `KVM_RUN` and the handling of its exit.
    fn run_once(&mut self) -> RunState {
        let exit = match self.fd.run() {
            Ok(exit) => match serve_io(&self.io, exit) {
                None => return RunState::Running,
                Some(other) => Ok(other),
            },
            Err(e) => Err(e),
        };
        let exit = match exit {
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => VcpuStop::PowerOff,
                KVM_SYSTEM_EVENT_RESET => VcpuStop::Reset,
                KVM_SYSTEM_EVENT_CRASH => VcpuStop::Crash {
                    exit: "KVM_SYSTEM_EVENT_CRASH".into(),
                    rip: None,
                },
                other => VcpuStop::Fatal {
                    exit: format!("KVM_EXIT_SYSTEM_EVENT type {other}"),
                    rip: None,
                },
            },
            Ok(VcpuExit::Shutdown) => VcpuStop::Crash {
                exit: "KVM_EXIT_SHUTDOWN (triple fault)".into(),
                rip: None,
            },
            Ok(VcpuExit::InternalError) => {
                // SAFETY: after KVM_EXIT_INTERNAL_ERROR, KVM filled the `internal` member of
                // the kvm_run union.
                let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                VcpuStop::Fatal {
                    exit: format!("KVM_EXIT_INTERNAL_ERROR (suberror {suberror})"),
                    rip: None,
                }
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => VcpuStop::Fatal {
                exit: format!("KVM_EXIT_FAIL_ENTRY (reason {reason:#x}, host cpu {cpu})"),
                rip: None,
            },
            Ok(VcpuExit::Intr) => {
                // As for EINTR below.
                self.fd.set_kvm_immediate_exit(0);
                return RunState::Running;
            }
            // KVM could not reach the memory behind a guest access: the guest touched
            // memory it does not have (an unplugged block, whose slot stays: see
            // `memory::RegionTable::reserve_area`), or the host could not back memory the
            // guest has (out of memory). Who is at fault is decided with the layout.
            Ok(VcpuExit::MemoryFault { gpa, .. }) => VcpuStop::NoMemory {
                gpa: Some(gpa),
                rip: None,
            },
            Err(e) if e.errno() == libc::EFAULT => VcpuStop::NoMemory {
                gpa: None,
                rip: None,
            },
            Ok(other) => VcpuStop::Fatal {
                exit: format!("unexpected exit {other:?}"),
                rip: None,
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked (see `kick_handler`): the caller looks at why before running again.
                self.fd.set_kvm_immediate_exit(0);
                return RunState::Running;
            }
            Err(e) => VcpuStop::Fatal {
                exit: format!("KVM_RUN failed: {e}"),
                rip: None,
            },
        };
        RunState::Stopping(self.with_rip(exit))
    }

    fn with_rip(&self, why: VcpuStop) -> VcpuStop {
        match why {
            VcpuStop::Crash { exit, rip: None } => VcpuStop::Crash {
                exit,
                rip: self.rip(),
            },
            VcpuStop::Fatal { exit, rip: None } => VcpuStop::Fatal {
                exit,
                rip: self.rip(),
            },
            VcpuStop::NoMemory { gpa, rip: None } => VcpuStop::NoMemory {
                gpa,
                rip: self.rip(),
            },
            other => other,
        }
    }
}

/// Serves a port or MMIO exit from the device bus; gives any other exit back.
fn serve_io<'a>(io: &IoManager, exit: VcpuExit<'a>) -> Option<VcpuExit<'a>> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if io.pio_read(PioAddress(port), data).is_err() {
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            // Writes to ports without a device are dropped, as on real hardware.
            let _ = io.pio_write(PioAddress(port), data);
        }
        VcpuExit::MmioRead(addr, data) => {
            if io.mmio_read(MmioAddress(addr), data).is_err() {
                data.fill(0);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            let _ = io.mmio_write(MmioAddress(addr), data);
        }
        other => return Some(other),
    }
    None
}

/// A running vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    id: u8,
    thread: JoinHandle<()>,
    /// Signalled by the thread as it exits.
    exited: EventFd,
}

thread_local! {
    /// The `immediate_exit` byte of the `kvm_run` of the vCPU this thread runs (null:
    /// none), for [`kick_handler`]. A plain pointer in a constant-initialised cell: read in
    /// a signal handler, it must need no lazy set-up.
    static KICK_TARGET: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// Points this thread's [`KICK_TARGET`] at a vCPU's `immediate_exit` while it lives.
struct KickTarget;

impl KickTarget {
    /// Kicks of this thread from now on land in `fd`'s `immediate_exit`; dropping the
    /// result (before `fd` goes) ends that.
    fn set(fd: &mut VcpuFd) -> KickTarget {
        let run = fd.get_kvm_run();
        KICK_TARGET.with(|target| target.set(std::ptr::addr_of_mut!(run.immediate_exit)));
        KickTarget
    }
}

impl Drop for KickTarget {
    fn drop(&mut self) {
        KICK_TARGET.with(|target| target.set(std::ptr::null_mut()));
    }
}

/// The kick signal's handler. Its delivery alone makes a `KVM_RUN` under way return
/// `EINTR`; it also sets the thread's vCPU `immediate_exit`, so a kick that lands just
/// before `KVM_RUN` is not lost either: that `KVM_RUN` returns `EINTR` at once. Whoever
/// kicks has set what the vCPU must see (stop, pause) first, and the vCPU looks at it
/// after each `EINTR`: one kick always suffices.
extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let target = KICK_TARGET.with(Cell::get);
    if !target.is_null() {
        // SAFETY: set by `KickTarget` to the `immediate_exit` byte of the `kvm_run`
        // mapping of the vCPU this thread owns, and cleared before that vCPU (and its
        // mapping) goes; a single volatile byte store, as KVM's API expects from a signal
        // handler.
        unsafe { target.write_volatile(1) };
    }
}

/// Installs the handler of the signal that kicks vCPUs out of `KVM_RUN` (see
/// [`kick_handler`]). Call before starting vCPUs.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(SIGRTMIN(), kick_handler).map_err(VcpuError::KickHandler)
}

impl VcpuHandle {
    /// Kicks the vCPU (once: a kick is never lost, see [`kick_handler`]) so it sees `stop`
    /// (already set) and waits for its thread to exit, until `deadline`; past it the
    /// thread is left behind, with an error logged. Whether it stopped.
    pub fn stop(self, deadline: Instant) -> bool {
        self.kick();
        if !wait_readable(&self.exited, deadline) {
            log::error!("vCPU {} did not stop in time; left behind", self.id);
            return false;
        }
        if self.thread.join().is_err() {
            log::error!("vCPU {} panicked", self.id);
        }
        true
    }

    /// Whether its thread still runs.
    pub fn is_running(&self) -> bool {
        !self.thread.is_finished()
    }

    /// Kicks the vCPU out of `KVM_RUN` (it then sees `stop`, if set).
    pub fn kick(&self) {
        if let Err(e) = self.thread.kill(SIGRTMIN()) {
            log::error!("cannot kick vCPU {}: {e}", self.id);
        }
    }
}

#[cfg(test)]
#[path = "vcpu_tests.rs"]
mod tests;
