//! One built VM: its KVM VM, guest memory, devices and vCPUs, and what the VMM does with
//! it — start, pause, resume, shut down — each in a documented order.
//!
//! - **start**: the vCPU threads are spawned (each confines itself, then enters the guest).
//! - **pause**: vCPUs first (asked, kicked out of `KVM_RUN`, parked between exits, so no
//!   device access is half done), then devices (each finishes the request in hand and
//!   serves nothing more), then the `--timeout` timer is stopped and the KVM clock read. One deadline for all of it; if it
//!   passes, whatever paused is resumed and the VM runs on.
//! - **resume**: the `--timeout` timer goes on with what was left, the KVM clock is set
//!   back to the value read at the pause (the guest sees no time jump beyond KVM's own),
//!   devices, then vCPUs.
//! - **shut down**: vCPUs are stopped (kicked until their threads exit, 5 s in all), then
//!   devices (each thread given 2 s), then guest memory, then the KVM VM. What a thread
//!   left behind may still use is kept for the rest of the process.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::legacy::SerialConsole;
use devices::virtio::block::{BlockCounters, BlockError};
use devices::virtio::mem::MemControl;
use devices::virtio::rng::RngCounters;
use memory::{FaultHandler, RegionTable};
use vm_device::device_manager::IoManager;
use vmm_sys_util::eventfd::EventFd;

use crate::api::ApiError;
use crate::arch::x86_64::boot::BootError;
use crate::console::ConsoleInput;
use crate::device_manager::{DeviceError, VirtioDevices};
use crate::end::{EndEvents, VmEnd};
use crate::seccomp::{Confinement, SeccompError};
use crate::snapshot::{self, DiskState, MemoryMap, SnapshotError, VmSnapshot};
use crate::spec::VmSpec;
use crate::vstate::persist::HostFingerprint;
use crate::vstate::vcpu::{Vcpu, VcpuControl, VcpuError, VcpuHandle, VcpuStop};
use crate::vstate::vm::{Vm, VmError};

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// KVM VM setup failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// vCPU setup failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The guest could not be loaded.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Guest RAM could not be set up.
    #[error("guest memory: {0}")]
    Memory(#[from] memory::TableError),
    /// Guest RAM could not be locked for loading.
    #[error("guest memory: {0}")]
    Guarded(#[from] memory::GuardedMemoryError),
    /// A device could not be placed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// An eventfd or the event loop failed.
    #[error("event loop: {0}")]
    Events(String),
    /// A disk could not be opened.
    #[error(transparent)]
    Disk(#[from] BlockError),
    /// The control socket could not be started.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The userfaultfd fault handler could not be started.
    #[error("lazy hotplug memory: {0}")]
    Lazy(#[from] memory::LazyError),
    /// The initial hotplug request does not fit the area.
    #[error("--memory: hotplugged_size: {0}")]
    Hotplug(devices::virtio::mem::MemError),
    /// A device thread could not be started.
    #[error("cannot start a device: {0}")]
    Activate(devices::virtio::ActivateError),
    /// The seccomp filters could not be built or installed.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(vmm_sys_util::errno::Error),
    /// A snapshot could not be taken or restored.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The VM did not pause in time (a vCPU or device thread stuck in the host).
    #[error("the VM did not pause within {0:?} ({1} did not stop); it runs on")]
    PauseTimeout(Duration, &'static str),
}

/// Who is at fault for a [`MachineError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blame {
    /// A setting the host cannot give (e.g. more vCPUs than KVM allows).
    Arguments,
    /// A file: kernel, initramfs or disk.
    InputFile,
    /// The VMM or the host.
    Vmm,
}

impl MachineError {
    /// Whether the user's settings, the user's files, or the VMM is at fault.
    pub fn blame(&self) -> Blame {
        match self {
            MachineError::Boot(e) if e.is_bad_input() => Blame::InputFile,
            MachineError::Disk(BlockError::Thread(_)) => Blame::Vmm,
            MachineError::Disk(_) => Blame::InputFile,
            MachineError::Snapshot(e) if e.is_bad_input() => Blame::InputFile,
            MachineError::Vm(VmError::TooManyVcpus { .. })
            | MachineError::Api(_)
            | MachineError::Hotplug(_) => Blame::Arguments,
            _ => Blame::Vmm,
        }
    }
}

/// Longest the VMM waits for its vCPU threads to stop when the VM ends; a vCPU stuck in
/// the host past it is left behind (the process exits anyway).
const VCPU_STOP_DEADLINE: Duration = Duration::from_secs(5);
/// Longest a pause may take: vCPUs out of `KVM_RUN`, devices done with their requests.
pub const PAUSE_DEADLINE: Duration = Duration::from_secs(5);

/// What the control API reads of a VM, without going through the VMM thread.
#[derive(Clone)]
pub struct MachineView {
    /// Guest memory.
    pub table: Arc<RegionTable>,
    /// Boot RAM in bytes.
    pub boot_memory: u64,
    /// The hotplug area, if any.
    pub hotplug: Option<Arc<MemControl>>,
    /// The fault handler of lazy memory, if any.
    pub faults: Option<Arc<FaultHandler>>,
    /// The virtio-blk and virtio-rng devices' counters, by the name the guest knows the
    /// device by (`vda`, `vdb`, ..., `rng`); virtio-mem's are `hotplug`'s.
    pub devices: Vec<(String, DeviceCounters)>,
}

/// A device's counters, as `vm.counters` reports them.
#[derive(Clone, Debug)]
pub enum DeviceCounters {
    /// A virtio-blk device's.
    Block(Arc<BlockCounters>),
    /// The virtio-rng device's.
    Rng(Arc<RngCounters>),
}

impl DeviceCounters {
    /// Every counter, by name.
    pub fn values(&self) -> Vec<(&'static str, u64)> {
        match self {
            DeviceCounters::Block(c) => c.values(),
            DeviceCounters::Rng(c) => c.values(),
        }
    }
}

impl MachineView {
    /// Guest memory now: boot RAM and plugged memory.
    pub fn memory_actual_size(&self) -> u64 {
        self.boot_memory + self.hotplug.as_ref().map_or(0, |h| h.plugged())
    }
}

/// Where a machine is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MachineState {
    /// Built, vCPUs not started.
    Built,
    /// vCPUs running.
    Running,
    /// vCPUs parked, devices idle.
    Paused,
}

/// A built VM. Parts are kept in the order they must be torn down.
pub struct Machine {
    pub(crate) control: Arc<VcpuControl>,
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) handles: Vec<VcpuHandle>,
    pub(crate) stops: Sender<(u8, VcpuStop)>,
    pub(crate) vcpu_stopped: EventFd,
    pub(crate) io: Arc<IoManager>,
    pub(crate) devices: VirtioDevices,
    pub(crate) view: MachineView,
    pub(crate) vm: Vm,
    pub(crate) end: Arc<Mutex<EndEvents>>,
    pub(crate) console_input: Option<Arc<Mutex<ConsoleInput>>>,
    pub(crate) serial: Arc<Mutex<SerialConsole>>,
    pub(crate) panicked: Arc<AtomicBool>,
    pub(crate) confinement: Arc<Confinement>,
    pub(crate) state: MachineState,
    /// The devices are paused until the vCPUs start (a restored VM's).
    pub(crate) devices_held: bool,
    pub(crate) paused_clock: Option<kvm_bindings::kvm_clock_data>,
    /// What was left of `--timeout` at the pause: a paused VM's time does not count.
    pub(crate) paused_timeout: Option<Duration>,
}

/// Stops `timer` (a one-shot timerfd); what was left of it, if it was armed.
fn stop_timer(timer: &mut vmm_sys_util::timerfd::TimerFd) -> Option<Duration> {
    use std::os::fd::AsRawFd;
    // SAFETY: itimerspec is plain data; timerfd_gettime fills it.
    let mut spec: libc::itimerspec = unsafe { std::mem::zeroed() };
    // SAFETY: a timerfd we own and an itimerspec to fill.
    if unsafe { libc::timerfd_gettime(timer.as_raw_fd(), &mut spec) } != 0 {
        log::warn!(
            "pause: cannot read the --timeout timer: {}",
            std::io::Error::last_os_error()
        );
        return None;
    }
    let left = Duration::new(spec.it_value.tv_sec as u64, spec.it_value.tv_nsec as u32);
    if left.is_zero() {
        return None; // fired already: the VM ends
    }
    if let Err(e) = timer.clear() {
        log::warn!("pause: cannot stop the --timeout timer: {e}");
        return None;
    }
    Some(left)
}

impl Machine {
    /// Where it is in its life.
    pub fn state(&self) -> MachineState {
        self.state
    }

    /// What the control API reads of it.
    pub fn view(&self) -> MachineView {
        self.view.clone()
    }

    /// Its end events and console input (unless the serial port is off), for the VMM's
    /// event loop.
    pub fn subscribers(&self) -> (Arc<Mutex<EndEvents>>, Option<Arc<Mutex<ConsoleInput>>>) {
        (Arc::clone(&self.end), self.console_input.clone())
    }

    /// How it ended, once it has (taken: reported once).
    pub fn take_end(&self) -> Option<VmEnd> {
        self.end
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .end
            .take()
    }

    /// Whether the console printed what `kite run --until-console` waits for (taken:
    /// reported once).
    pub fn take_console_seen(&self) -> bool {
        std::mem::take(&mut self.end.lock().unwrap_or_else(|e| e.into_inner()).seen)
    }

    /// Starts the vCPU threads.
    pub fn start(&mut self) -> Result<(), MachineError> {
        for vcpu in self.vcpus.drain(..) {
            let event = self
                .vcpu_stopped
                .try_clone()
                .map_err(|e| MachineError::Events(e.to_string()))?;
            let handle = vcpu.start(
                Arc::clone(&self.control),
                self.stops.clone(),
                event,
                Arc::clone(&self.confinement),
            )?;
            self.handles.push(handle);
        }
        if std::mem::take(&mut self.devices_held) {
            self.devices.resume();
        }
        self.state = MachineState::Running;
        Ok(())
    }

    /// Pauses a running VM (see the module's documentation for the order).
    pub fn pause(&mut self) -> Result<(), MachineError> {
        let deadline = Instant::now() + PAUSE_DEADLINE;
        self.control.pause();
        // Not a vCPU that is gone (it counts as parked): kicking it would only log errors.
        let kick = || {
            self.handles
                .iter()
                .filter(|h| h.is_running())
                .for_each(VcpuHandle::kick)
        };
        if !self.control.wait_paused(self.handles.len(), deadline, kick) {
            self.control.resume();
            return Err(MachineError::PauseTimeout(PAUSE_DEADLINE, "a vCPU"));
        }
        self.devices.pause();
        if !self.devices.wait_paused(deadline) {
            self.devices.resume();
            self.control.resume();
            return Err(MachineError::PauseTimeout(PAUSE_DEADLINE, "a device"));
        }
        let mut end = self.end.lock().unwrap_or_else(|e| e.into_inner());
        self.paused_timeout = end
            .timeout
            .as_mut()
            .and_then(|(timer, _)| stop_timer(timer));
        drop(end);
        self.paused_clock = match self.vm.clock() {
            Ok(clock) => Some(clock),
            Err(e) => {
                // The guest then sees the paused time pass, as without a saved clock.
                log::warn!("pause: {e}");
                None
            }
        };
        self.state = MachineState::Paused;
        Ok(())
    }

    /// The state of this paused VM, its memory written into `memory` (an empty file) as
    /// it goes; `spec` is what it was built from. Refused while a memory resize is under
    /// way (the guest's driver and the device would disagree after a restore).
    pub fn snapshot(
        &self,
        spec: &VmSpec,
        memory: &std::fs::File,
    ) -> Result<VmSnapshot, SnapshotError> {
        if self.state != MachineState::Paused {
            return Err(SnapshotError::NotReady("the VM is not paused".into()));
        }
        if let Some(h) = &self.view.hotplug {
            if h.plugged() != h.requested() {
                return Err(SnapshotError::NotReady(format!(
                    "a memory resize is under way ({} MiB of {} MiB plugged); snapshot once \
                     it is done (vm.info shows it)",
                    h.plugged() >> 20,
                    h.requested() >> 20
                )));
            }
        }
        let state = |what: &'static str| move |why: String| SnapshotError::State { what, why };
        let deadline = Instant::now() + PAUSE_DEADLINE;
        let vcpus = self
            .control
            .save_states(self.handles.len(), deadline)
            .map_err(|e| state("vCPU state")(e.to_string()))?;
        let mut vm = self
            .vm
            .save_state()
            .map_err(|e| state("VM state")(e.to_string()))?;
        if let Some(clock) = self.paused_clock {
            // The clock as the pause stopped it, not as it has run on since.
            vm.clock = clock;
        }
        let host = HostFingerprint::of(&self.vm).map_err(|e| state("host")(e.to_string()))?;
        let serial = self
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state();
        let virtio = self.devices.save_states().map_err(state("device state"))?;
        let disks = spec
            .disks
            .iter()
            .map(|d| snapshot::disk_size(&d.path).map(|size| DiskState { size }))
            .collect::<Result<_, _>>()?;
        let saved = memory::persist::save(&self.view.table, memory, Some(deadline))?;
        Ok(VmSnapshot {
            kite_version: env!("CARGO_PKG_VERSION").into(),
            host,
            config: spec.config.clone(),
            vm,
            vcpus,
            serial,
            virtio,
            disks,
            hotplug: self.view.hotplug.as_ref().map(|h| h.state()),
            memory: MemoryMap {
                file_size: saved.ranges.iter().map(|r| r.file_end()).max().unwrap_or(0),
                data_bytes: saved.data_bytes,
                ranges: saved.ranges.into_iter().map(Into::into).collect(),
            },
        })
    }

    /// Resumes a paused VM.
    pub fn resume(&mut self) {
        if let Some(left) = self.paused_timeout.take() {
            let mut end = self.end.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((timer, _)) = end.timeout.as_mut() {
                if let Err(e) = timer.reset(left, None) {
                    log::warn!("resume: cannot restart the --timeout timer: {e}");
                }
            }
        }
        if let Some(clock) = self.paused_clock.take() {
            if let Err(e) = self.vm.set_clock(&clock) {
                log::warn!("resume: {e}");
            }
        }
        self.devices.resume();
        self.control.resume();
        self.state = MachineState::Running;
    }

    /// Stops and tears down the VM; how it ended (for a guest that panicked, a reset or
    /// power-off becomes [`VmEnd::GuestPanic`]).
    pub fn shutdown(self, end: VmEnd) -> VmEnd {
        let Machine {
            control,
            handles,
            io,
            devices,
            view,
            vm,
            panicked,
            ..
        } = self;
        control.stop();
        let deadline = Instant::now() + VCPU_STOP_DEADLINE;
        for handle in &handles {
            handle.kick();
        }
        let mut all_stopped = true;
        for handle in handles {
            // Every one, even after one was left behind.
            all_stopped &= handle.stop(deadline);
        }
        // A thread still running may hold the last references to devices and guest
        // memory: it must not tear them down (its filter does not allow that, and the
        // process ends anyway). What it may hold is kept for the rest of the process.
        if all_stopped {
            // The devices go (each thread given a deadline), then guest memory.
            drop(devices);
            drop(io);
        } else {
            std::mem::forget(devices);
            std::mem::forget(io);
        }
        if !all_stopped || devices::thread_exit::threads_left_behind() {
            std::mem::forget(Arc::clone(&view.table));
        }
        drop(view);
        drop(vm);
        match end {
            VmEnd::Reset | VmEnd::PowerOff if panicked.load(Ordering::Acquire) => VmEnd::GuestPanic,
            other => other,
        }
    }
}
