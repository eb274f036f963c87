//! One VM from start to end: guest RAM in the region table, the kernel loaded, devices on the
//! bus, vCPU threads, and the event loop that waits for the VM to end.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::legacy::{
    ExitPort, SerialConsole, EXIT_PORT, I8042, I8042_PORT_BASE, I8042_PORT_LEN, SERIAL_IRQ,
    SERIAL_PORT_BASE, SERIAL_PORT_LEN,
};
use devices::virtio::block::{Block, BlockError};
use devices::virtio::device_thread::ThreadContext;
use devices::virtio::mem::{Mem, MemBacking, MemControl};
use devices::virtio::mmio::{MMIO_WINDOW, QUEUE_NOTIFY_OFFSET};
use devices::virtio::rng::Rng;
use devices::virtio::{Interrupt, MmioTransport, VirtioDevice};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use memory::{
    FaultHandler, GuardedMemory, LazyPages, RegionSpec, RegionTable, TableConfig, ThreadHooks,
};
use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::api::{legacy_handler, ApiContext, ApiError, ApiServer};
use crate::arch::x86_64::boot::{self, BootError, BootSpec};
use crate::arch::x86_64::layout;
use crate::config::{DiskConfig, HotplugBacking, MAX_CMDLINE};
use crate::console::{ConsoleInput, ConsoleOutput, RawTerminal};
use crate::end::{signal_event, EndEvents, Failures, GuestMemoryMap, VmEnd};
use crate::seccomp::{Confinement, SeccompError, SeccompMode, ThreadKind};
use crate::vstate::vcpu::{install_kick_handler, Vcpu, VcpuError};
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
    /// A device could not be put on the bus.
    #[error("cannot place {what} on the I/O bus: {source:?}")]
    Bus {
        /// The device.
        what: &'static str,
        /// The bus error.
        source: vm_device::bus::Error,
    },
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
    Device(devices::virtio::ActivateError),
    /// The seccomp filters could not be built or installed.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// The kernel command line with the device announcements is too long.
    #[error(
        "the kernel command line would be {len} bytes with the announcements of {devices} \
         virtio devices appended (at most {MAX_CMDLINE}): shorten --cmdline"
    )]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// Devices announced on it.
        devices: usize,
    },
    /// A VM without vCPUs.
    #[error("a VM needs at least one vCPU")]
    NoVcpus,
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(vmm_sys_util::errno::Error),
}

/// Who is at fault for a [`MachineError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blame {
    /// A setting the host cannot give (e.g. more vCPUs than KVM allows).
    Arguments,
    /// A boot file: kernel or initramfs.
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
            MachineError::Vm(VmError::TooManyVcpus { .. })
            | MachineError::NoVcpus
            | MachineError::Api(_)
            | MachineError::Hotplug(_)
            | MachineError::CmdlineTooLong { .. } => Blame::Arguments,
            _ => Blame::Vmm,
        }
    }
}

/// What to boot, and where its console goes.
pub struct MachineSpec<'a> {
    /// Kernel image.
    pub kernel: &'a Path,
    /// Initramfs, if any.
    pub initramfs: Option<&'a Path>,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// vCPUs.
    pub cpus: u8,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// virtio-blk disks.
    pub disks: &'a [DiskConfig],
    /// Whether to add a virtio-rng device.
    pub rng: bool,
    /// The hotplug area, if any.
    pub hotplug: Option<HotplugSpec>,
    /// Where to serve the control socket, if anywhere.
    pub api_socket: Option<&'a Path>,
    /// What the threads' seccomp filters do.
    pub seccomp: SeccompMode,
    /// How long the VM may run.
    pub timeout: Option<Duration>,
    /// Guest console output.
    pub console: Box<dyn Write + Send>,
}

/// The hotplug area (virtio-mem).
#[derive(Clone, Copy, Debug)]
pub struct HotplugSpec {
    /// Its size in bytes.
    pub size: u64,
    /// How plugged blocks are backed.
    pub backing: HotplugBacking,
    /// Bytes requested from the start.
    pub requested: u64,
}

fn event_error<E: std::fmt::Debug>(e: E) -> MachineError {
    MachineError::Events(format!("{e:?}"))
}

/// A non-blocking eventfd.
pub(crate) fn eventfd() -> Result<EventFd, MachineError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(event_error)
}

/// Puts the virtio devices `spec` asks for on the MMIO bus, each with its register window,
/// interrupt line (irqfd) and queue notifications (ioeventfds), and announces them on the
/// kernel command line.
fn add_virtio_devices(
    vm: &Vm,
    table: &Arc<RegionTable>,
    spec: &MachineSpec<'_>,
    hotplug: Option<Arc<MemControl>>,
    threads: &ThreadContext,
    io: &mut IoManager,
) -> Result<(), MachineError> {
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for (i, disk) in spec.disks.iter().enumerate() {
        let name = format!("vd{}", char::from(b'a' + (i % 26) as u8));
        devices.push(Box::new(Block::new(
            &disk.path,
            disk.readonly,
            &name,
            threads,
        )?));
    }
    if spec.rng {
        devices.push(Box::new(Rng::new(threads).map_err(MachineError::Device)?));
    }
    if let Some(control) = hotplug {
        devices.push(Box::new(
            Mem::new(control, threads).map_err(MachineError::Device)?,
        ));
    }
    for (i, device) in devices.into_iter().enumerate() {
        let (base, irq) = virtio_slot(i);
        let irqfd = eventfd()?;
        vm.register_irqfd(&irqfd, irq)?;
        let interrupt = Arc::new(Interrupt::new(irqfd));
        let transport =
            MmioTransport::new(device, Arc::clone(table), interrupt).map_err(event_error)?;
        for (queue, event) in transport.queue_events().iter().enumerate() {
            vm.register_ioevent(event, base + QUEUE_NOTIFY_OFFSET, queue as u32)?;
        }
        let bus = |source| MachineError::Bus {
            what: "a virtio device",
            source,
        };
        io.register_mmio(
            MmioRange::new(MmioAddress(base), MMIO_WINDOW).map_err(bus)?,
            Arc::new(Mutex::new(transport)),
        )
        .map_err(bus)?;
    }
    Ok(())
}

/// The register window and interrupt line of the `index`th virtio device.
fn virtio_slot(index: usize) -> (u64, u32) {
    (
        layout::VIRTIO_MMIO_BASE + index as u64 * MMIO_WINDOW,
        layout::VIRTIO_IRQ_BASE + index as u32,
    )
}

/// The kernel command line the guest gets: `spec`'s, with each virtio device announced
/// (in the order `add_virtio_devices` places them). All of it must fit.
fn guest_cmdline(spec: &MachineSpec<'_>) -> Result<String, MachineError> {
    let hotplug = spec.hotplug.is_some_and(|h| h.size > 0);
    let devices = spec.disks.len() + usize::from(spec.rng) + usize::from(hotplug);
    let mut cmdline = spec.cmdline.to_string();
    for i in 0..devices {
        let (base, irq) = virtio_slot(i);
        cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{irq}"));
    }
    if cmdline.len() > MAX_CMDLINE {
        return Err(MachineError::CmdlineTooLong {
            len: cmdline.len(),
            devices,
        });
    }
    Ok(cmdline)
}

/// Longest the VMM waits for its vCPU threads to stop when the VM ends; a vCPU stuck in
/// the host past it is left behind (the process exits anyway).
const VCPU_STOP_DEADLINE: Duration = Duration::from_secs(5);

/// Builds the VM `spec` describes, runs it until it ends, and tears it down.
pub fn run(spec: MachineSpec<'_>) -> Result<VmEnd, MachineError> {
    if spec.cpus == 0 {
        return Err(MachineError::NoVcpus);
    }
    let cmdline = guest_cmdline(&spec)?;
    // No process Kite starts may gain privileges (set-user-id files, file capabilities);
    // the seccomp filters need this too.
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1) takes no pointers and only ever restricts.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(MachineError::Events(format!(
            "PR_SET_NO_NEW_PRIVS: {}",
            std::io::Error::last_os_error()
        )));
    }
    let signal = signal_event()?;
    install_kick_handler()?;
    let vm = Vm::new()?;
    vm.check_vcpu_count(u32::from(spec.cpus))?;
    let failures = Arc::new(Failures::new().map_err(event_error)?);
    let confinement = Confinement::new(spec.seccomp)?;
    let threads = ThreadContext {
        confine: {
            let confinement = Arc::clone(&confinement);
            Arc::new(move |device_type| {
                let kind = ThreadKind::of_device(device_type)
                    .ok_or_else(|| format!("no seccomp filter for device type {device_type}"))?;
                confinement.confine(kind).map_err(|e| e.to_string())
            })
        },
        died: {
            let failures = Arc::clone(&failures);
            Arc::new(move |why| failures.report(why))
        },
    };
    // Hooks of a thread of kind `kind` started by another crate.
    let hooks = |kind: ThreadKind| ThreadHooks {
        confine: {
            let confinement = Arc::clone(&confinement);
            Box::new(move || confinement.confine(kind).map_err(|e| e.to_string()))
        },
        died: {
            let failures = Arc::clone(&failures);
            Box::new(move |why| failures.report(why))
        },
    };

    // Guest RAM: the region table is the one description of the layout; KVM slots follow it.
    let faults = match spec.hotplug {
        Some(HotplugSpec {
            backing: HotplugBacking::Lazy,
            ..
        }) => Some(FaultHandler::start_with(hooks(ThreadKind::FaultHandler))?),
        _ => None,
    };
    let table = Arc::new(RegionTable::new(
        vm.memory_slots(),
        faults.clone().map(|f| f as Arc<dyn LazyPages>),
        TableConfig {
            max_slots: vm.max_memslots(),
            ..TableConfig::default()
        },
    ));
    for (start, size) in layout::ram_ranges(spec.memory) {
        table.insert(RegionSpec::anonymous(start, size), None)?;
    }
    let ram: Vec<_> = table
        .layout()
        .into_iter()
        .map(|(_, start, size)| (start, size))
        .collect();
    let hotplug = spec
        .hotplug
        .filter(|h| h.size > 0)
        .map(|h| -> Result<_, MachineError> {
            let backing = match h.backing {
                HotplugBacking::Anon => MemBacking::Anonymous,
                HotplugBacking::Lazy => MemBacking::Lazy,
            };
            let control = MemControl::new(
                Arc::clone(&table),
                layout::hotplug_addr(&ram),
                h.size,
                backing,
            )?;
            control
                .request(h.requested)
                .map_err(MachineError::Hotplug)?;
            Ok(control)
        })
        .transpose()?;
    let hotplug_area = hotplug.as_ref().map(|h| h.addr()..h.addr() + h.size());
    let mut io = IoManager::new();
    add_virtio_devices(&vm, &table, &spec, hotplug.clone(), &threads, &mut io)?;
    let _api = spec
        .api_socket
        .map(|path| {
            ApiServer::start(
                path,
                legacy_handler(ApiContext {
                    table: Arc::clone(&table),
                    boot_memory: spec.memory,
                    hotplug,
                    faults,
                }),
                hooks(ThreadKind::Api),
            )
        })
        .transpose()?;
    let entry = {
        let mem = GuardedMemory::lock_all(&table, None)?;
        boot::load(
            &mem,
            &BootSpec {
                kernel: spec.kernel,
                initramfs: spec.initramfs,
                cmdline: &cmdline,
                cpus: spec.cpus,
                ram: &ram,
            },
        )?
    };

    log::info!("kernel entry: {entry:x?}");

    // Devices.
    let panicked = Arc::new(AtomicBool::new(false));
    // Set when the VM ends: vCPUs leave their loop (and a stalled console write).
    let stop = Arc::new(AtomicBool::new(false));
    let serial_irq = eventfd()?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)?;
    let input_drained = eventfd()?;
    let serial = Arc::new(Mutex::new(SerialConsole::new(
        serial_irq,
        Box::new(
            ConsoleOutput::new(spec.console, Arc::clone(&panicked)).stop_with(Arc::clone(&stop)),
        ),
        input_drained.try_clone().map_err(event_error)?,
    )));
    let reset = eventfd()?;
    let i8042 = Arc::new(Mutex::new(I8042::new(
        reset.try_clone().map_err(event_error)?,
    )));
    let bus = |what| move |source| MachineError::Bus { what, source };
    io.register_pio(
        PioRange::new(PioAddress(SERIAL_PORT_BASE), SERIAL_PORT_LEN).map_err(bus("serial"))?,
        serial.clone(),
    )
    .map_err(bus("serial"))?;
    io.register_pio(
        PioRange::new(PioAddress(I8042_PORT_BASE), I8042_PORT_LEN).map_err(bus("i8042"))?,
        i8042,
    )
    .map_err(bus("i8042"))?;
    let exit_port = eventfd()?;
    io.register_pio(
        PioRange::new(PioAddress(EXIT_PORT), 1).map_err(bus("exit port"))?,
        Arc::new(Mutex::new(ExitPort::new(
            exit_port.try_clone().map_err(event_error)?,
        ))),
    )
    .map_err(bus("exit port"))?;
    let io = Arc::new(io);

    let vcpus = (0..spec.cpus)
        .map(|id| Vcpu::new(&vm, id, spec.cpus, Arc::clone(&io)))
        .collect::<Result<Vec<_>, _>>()?;
    vcpus
        .first()
        .ok_or(MachineError::NoVcpus)?
        .set_boot_entry(&entry)?;

    let mut events =
        EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().map_err(event_error)?;
    let (stops_tx, stops) = channel();
    let vcpu_stopped = eventfd()?;
    let end_events = Arc::new(Mutex::new(EndEvents {
        reset,
        exit_port,
        vcpu_stopped: vcpu_stopped.try_clone().map_err(event_error)?,
        signal,
        stops,
        failures,
        memory: GuestMemoryMap {
            table: Arc::clone(&table),
            hotplug_area: hotplug_area.clone(),
        },
        timeout: spec
            .timeout
            .map(|after| -> Result<_, MachineError> {
                let mut timer = TimerFd::new().map_err(event_error)?;
                timer.reset(after, None).map_err(event_error)?;
                Ok((timer, after))
            })
            .transpose()?,
        end: None,
    }));
    events.add_subscriber(end_events.clone());
    events.add_subscriber(Arc::new(Mutex::new(ConsoleInput::new(
        serial,
        input_drained,
    ))));

    let _terminal = RawTerminal::enter();
    let mut handles = Vec::new();
    let mut started = Ok(());
    for vcpu in vcpus {
        let event = vcpu_stopped.try_clone().map_err(event_error)?;
        match vcpu.start(
            Arc::clone(&stop),
            stops_tx.clone(),
            event,
            Arc::clone(&confinement),
        ) {
            Ok(handle) => handles.push(handle),
            Err(e) => {
                started = Err(e);
                break;
            }
        }
    }
    // Every thread exists now: the main thread confines itself last (a thread keeps the
    // filter it was created with).
    let result = started
        .map_err(MachineError::from)
        .and_then(|()| Ok(confinement.confine(ThreadKind::Main)?))
        .and_then(|()| loop {
            events.run().map_err(event_error)?;
            if let Some(end) = end_events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .end
                .take()
            {
                break Ok(end);
            }
        });
    stop.store(true, Ordering::Release);
    let deadline = Instant::now() + VCPU_STOP_DEADLINE;
    for handle in &handles {
        handle.kick();
    }
    let mut all_stopped = true;
    for handle in handles {
        // Every one, even after one was left behind.
        all_stopped &= handle.stop(deadline);
    }
    // A thread still running may hold the last references to devices and guest memory:
    // it must not tear them down (its filter does not allow that, and the process ends
    // anyway). What it may hold is kept for the rest of the process.
    if all_stopped {
        // The devices go (each thread given a deadline), then guest memory.
        drop(io);
    } else {
        std::mem::forget(io);
    }
    if !all_stopped || devices::thread_exit::threads_left_behind() {
        std::mem::forget(Arc::clone(&table));
    }
    let end = result?;
    Ok(match end {
        VmEnd::Reset | VmEnd::PowerOff if panicked.load(Ordering::Acquire) => VmEnd::GuestPanic,
        other => other,
    })
}
