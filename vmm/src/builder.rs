//! Turns a [`VmSpec`] into a [`Machine`]: KVM VM, guest RAM in the region table (KVM
//! slots follow it), the hotplug area, devices, the kernel loaded, vCPUs created. Nothing
//! runs until [`Machine::start`].

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::legacy::{SerialConsole, SERIAL_IRQ};
use devices::virtio::block::Block;
use devices::virtio::device_thread::ThreadContext;
use devices::virtio::mem::{Mem, MemBacking, MemControl};
use devices::virtio::rng::Rng;
use devices::virtio::VirtioDevice;
use memory::{
    FaultHandler, GuardedMemory, LazyPages, RegionSpec, RegionTable, TableConfig, ThreadHooks,
};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::arch::x86_64::boot::{self, BootSpec};
use crate::arch::x86_64::layout;
use crate::config::{HotplugBacking, SerialMode};
use crate::console::{ConsoleInput, ConsoleOutput};
use crate::device_manager::DeviceManager;
use crate::end::{EndEvents, Failures, GuestMemoryMap};
use crate::machine::{DeviceCounters, Machine, MachineError, MachineState, MachineView};
use crate::seccomp::{Confinement, ThreadKind};
use crate::spec::VmSpec;
use crate::vstate::vcpu::{Vcpu, VcpuControl};
use crate::vstate::vm::Vm;

/// What the VMM gives every machine it builds.
pub struct BuildContext {
    /// The threads' seccomp filters.
    pub confinement: Arc<Confinement>,
    /// Where device threads and the fault handler report their death.
    pub failures: Arc<Failures>,
    /// How long the VM may run (`--timeout`).
    pub timeout: Option<Duration>,
}

impl BuildContext {
    /// Hooks of a thread of kind `kind` started by another crate.
    pub fn hooks(&self, kind: ThreadKind) -> ThreadHooks {
        ThreadHooks {
            confine: {
                let confinement = Arc::clone(&self.confinement);
                Box::new(move || confinement.confine(kind).map_err(|e| e.to_string()))
            },
            died: {
                let failures = Arc::clone(&self.failures);
                Box::new(move |why| failures.report(why))
            },
        }
    }

    /// What device threads get: their filter by device type, and the death report.
    fn device_threads(&self) -> ThreadContext {
        let confinement = Arc::clone(&self.confinement);
        let failures = Arc::clone(&self.failures);
        ThreadContext {
            confine: Arc::new(move |device_type| {
                let kind = ThreadKind::of_device(device_type)
                    .ok_or_else(|| format!("no seccomp filter for device type {device_type}"))?;
                confinement.confine(kind).map_err(|e| e.to_string())
            }),
            died: Arc::new(move |why| failures.report(why)),
        }
    }
}

fn event_error<E: std::fmt::Debug>(e: E) -> MachineError {
    MachineError::Events(format!("{e:?}"))
}

/// A non-blocking eventfd.
pub(crate) fn eventfd() -> Result<EventFd, MachineError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(event_error)
}

/// Builds the VM `spec` describes, its console output going to `console` (input comes
/// from the VMM's standard input, unless the serial port is off).
pub fn build(
    spec: &VmSpec,
    context: &BuildContext,
    console: Box<dyn Write + Send>,
) -> Result<Machine, MachineError> {
    let vm = Vm::new()?;
    vm.check_vcpu_count(u32::from(spec.cpus))?;

    // Guest RAM: the region table is the one description of the layout; KVM slots follow it.
    let faults = match spec.hotplug {
        Some(h) if h.backing == HotplugBacking::Lazy => Some(FaultHandler::start_with(
            context.hooks(ThreadKind::FaultHandler),
        )?),
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

    // Devices, in the order the command line announces them (see `VmSpec::resolve`).
    let threads = context.device_threads();
    let mut virtio: Vec<Box<dyn VirtioDevice>> = Vec::new();
    // Their counters, by the names the guest sees (virtio-mem's are the hotplug area's).
    let mut counters = Vec::new();
    for (i, disk) in spec.disks.iter().enumerate() {
        let name = format!("vd{}", char::from(b'a' + (i % 26) as u8));
        let block = Block::new(&disk.path, disk.readonly, &name, &threads)?;
        counters.push((name, DeviceCounters::Block(block.counters())));
        virtio.push(Box::new(block));
    }
    if spec.rng {
        let rng = Rng::new(&threads).map_err(MachineError::Activate)?;
        counters.push(("rng".to_string(), DeviceCounters::Rng(rng.counters())));
        virtio.push(Box::new(rng));
    }
    if let Some(control) = &hotplug {
        virtio.push(Box::new(
            Mem::new(Arc::clone(control), &threads).map_err(MachineError::Activate)?,
        ));
    }
    let mut devices = DeviceManager::default();
    for device in virtio {
        devices.add_virtio(&vm, &table, device)?;
    }
    let control = Arc::new(VcpuControl::default());
    let panicked = Arc::new(AtomicBool::new(false));
    let serial_irq = eventfd()?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)?;
    let input_drained = eventfd()?;
    let serial = Arc::new(Mutex::new(SerialConsole::new(
        serial_irq,
        Box::new(ConsoleOutput::new(console, Arc::clone(&panicked)).stop_with(control.stop_flag())),
        input_drained.try_clone().map_err(event_error)?,
    )));
    let legacy = devices.add_legacy(Arc::clone(&serial))?;
    let (io, virtio_devices) = devices.finish();

    let entry = {
        let mem = GuardedMemory::lock_all(&table, None)?;
        boot::load(
            &mem,
            &BootSpec {
                kernel: &spec.kernel,
                initramfs: spec.initramfs.as_deref(),
                cmdline: &spec.cmdline,
                cpus: spec.cpus,
                ram: &ram,
            },
        )?
    };
    log::info!("kernel entry: {entry:x?}");

    let vcpus = (0..spec.cpus)
        .map(|id| Vcpu::new(&vm, id, spec.cpus, Arc::clone(&io)))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(boot_vcpu) = vcpus.first() {
        boot_vcpu.set_boot_entry(&entry)?;
    }

    let (stops_tx, stops) = channel();
    let vcpu_stopped = eventfd()?;
    let end = Arc::new(Mutex::new(EndEvents {
        reset: legacy.reset,
        exit_port: legacy.exit_port,
        vcpu_stopped: vcpu_stopped.try_clone().map_err(event_error)?,
        stops,
        memory: GuestMemoryMap {
            table: Arc::clone(&table),
            hotplug_area,
        },
        timeout: context
            .timeout
            .map(|after| -> Result<_, MachineError> {
                let mut timer = TimerFd::new().map_err(event_error)?;
                timer.reset(after, None).map_err(event_error)?;
                Ok((timer, after))
            })
            .transpose()?,
        end: None,
    }));
    Ok(Machine {
        control,
        vcpus,
        handles: Vec::new(),
        stops: stops_tx,
        vcpu_stopped,
        io,
        devices: virtio_devices,
        view: MachineView {
            table,
            boot_memory: spec.memory,
            hotplug,
            faults,
            devices: counters,
        },
        vm,
        end,
        console_input: (spec.config.serial == SerialMode::Tty)
            .then(|| Arc::new(Mutex::new(ConsoleInput::new(serial, input_drained)))),
        panicked,
        confinement: Arc::clone(&context.confinement),
        state: MachineState::Built,
        paused_clock: None,
        paused_timeout: None,
    })
}
