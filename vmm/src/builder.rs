//! Turns a [`VmSpec`] into a [`Machine`]: KVM VM, guest RAM in the region table (KVM
//! slots follow it), the hotplug area, devices, vCPUs created, and either the kernel
//! loaded ([`Origin::Boot`]) or everything put back as a snapshot kept it
//! ([`Origin::Restore`]: memory from the snapshot's memory file, lazily or eagerly, the
//! plugged blocks, each device's and vCPU's state, the VM's). Nothing runs until
//! [`Machine::start`].

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::legacy::{SerialConsole, SERIAL_IRQ};
use devices::virtio::block::Block;
use devices::virtio::device_thread::ThreadContext;
use devices::virtio::mem::{Mem, MemBacking, MemControl, BLOCK_SIZE};
use devices::virtio::rng::Rng;
use devices::virtio::VirtioDevice;
use memory::{
    Backing, FaultHandler, GuardedMemory, LazyPages, RegionSpec, RegionTable, TableConfig,
    ThreadHooks,
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
use crate::snapshot::{MemoryRestore, Restore, SnapshotError};
use crate::spec::VmSpec;
use crate::vstate::persist::HostFingerprint;
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
    /// What the console is watched for (`kite run --until-console`).
    pub until_console: Option<String>,
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

/// Where a machine's guest state comes from.
#[derive(Clone, Copy)]
pub enum Origin<'a> {
    /// A kernel, booted from its entry point.
    Boot,
    /// A snapshot (checked by [`Restore::open`]), which the VM goes on from.
    Restore(&'a Restore),
}

fn inconsistent(why: String) -> MachineError {
    MachineError::Snapshot(SnapshotError::Inconsistent(why))
}

/// Builds the VM `spec` describes, from `origin`, its console output going to `console`
/// (input comes from the VMM's standard input, unless the serial port is off).
pub fn build(
    spec: &VmSpec,
    context: &BuildContext,
    console: Box<dyn Write + Send>,
    origin: Origin<'_>,
) -> Result<Machine, MachineError> {
    // Interrupt controllers come once the memory slots are in (see `Vm::without_irqchip`).
    let vm = Vm::without_irqchip()?;
    vm.check_vcpu_count(u32::from(spec.cpus))?;
    let restore = match origin {
        Origin::Boot => None,
        Origin::Restore(restore) => {
            let here = HostFingerprint::of(&vm)?;
            let differences = restore.snapshot.host.differences(&here);
            if !differences.is_empty() {
                return Err(SnapshotError::Host(differences).into());
            }
            Some(restore)
        }
    };

    // Guest RAM: the region table is the one description of the layout; KVM slots follow it.
    let lazy_hotplug = spec
        .hotplug
        .is_some_and(|h| h.backing == HotplugBacking::Lazy);
    let lazy_restore = restore.is_some_and(|r| r.mode == MemoryRestore::Lazy);
    let faults = if lazy_hotplug || lazy_restore {
        Some(FaultHandler::start_with(
            context.hooks(ThreadKind::FaultHandler),
        )?)
    } else {
        None
    };
    let table = Arc::new(RegionTable::new(
        vm.memory_slots(),
        faults.clone().map(|f| f as Arc<dyn LazyPages>),
        TableConfig {
            max_slots: vm.max_memslots(),
            huge_pages: spec.config.memory.thp,
            ..TableConfig::default()
        },
    ));
    for (start, size) in layout::ram_ranges(spec.memory) {
        let backing = match restore {
            Some(r) => r.backing(start.0, size)?,
            None => Backing::Anonymous,
        };
        table.insert(
            RegionSpec {
                backing,
                ..RegionSpec::anonymous(start, size)
            },
            None,
        )?;
    }
    let ram: Vec<_> = table
        .layout()
        .into_iter()
        .map(|(_, start, size)| (start, size))
        .collect();
    let hotplug =
        spec.hotplug
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
                match restore {
                    None => control
                        .request(h.requested)
                        .map_err(MachineError::Hotplug)?,
                    Some(r) => {
                        let state = r.snapshot.hotplug.as_ref().ok_or_else(|| {
                            inconsistent("a hotplug area without its state".into())
                        })?;
                        // Every block's range is checked against the map below.
                        control
                            .restore(state, |addr| {
                                r.backing(addr, BLOCK_SIZE).unwrap_or(Backing::Anonymous)
                            })
                            .map_err(|e| inconsistent(e.to_string()))?;
                    }
                }
                Ok(control)
            })
            .transpose()?;
    if let Some(r) = restore {
        // Guest memory is the snapshot's, region for region.
        let layout: Vec<(u64, u64)> = table
            .layout()
            .into_iter()
            .map(|(_, start, size)| (start.0, size))
            .collect();
        let saved: Vec<(u64, u64)> = r
            .snapshot
            .memory
            .ranges
            .iter()
            .map(|m| (m.guest_addr, m.size))
            .collect();
        if layout != saved {
            return Err(inconsistent(format!(
                "its memory map {saved:x?} is not this VM's memory {layout:x?}"
            )));
        }
        if r.mode == MemoryRestore::Eager {
            let read = memory::persist::load(&table, &r.memory, &r.ranges(), None)
                .map_err(SnapshotError::from)?;
            log::info!("restore: {read} bytes of guest memory read");
        }
    }
    let hotplug_area = hotplug.as_ref().map(|h| h.addr()..h.addr() + h.size());
    vm.create_irqchip()?;

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
    let mut output =
        ConsoleOutput::new(console, Arc::clone(&panicked)).stop_with(control.stop_flag());
    let console_seen = match &context.until_console {
        Some(text) => {
            let seen = eventfd()?;
            output = output.watch_for(text, seen.try_clone().map_err(event_error)?);
            Some(seen)
        }
        None => None,
    };
    let output = Box::new(output);
    let drained = input_drained.try_clone().map_err(event_error)?;
    let serial = Arc::new(Mutex::new(match restore {
        None => SerialConsole::new(serial_irq, output, drained),
        Some(r) => SerialConsole::restored(&r.snapshot.serial, serial_irq, output, drained)
            .map_err(inconsistent)?,
    }));
    let legacy = devices.add_legacy(Arc::clone(&serial))?;
    let (io, virtio_devices) = devices.finish();

    let mut vcpus = (0..spec.cpus)
        .map(|id| Vcpu::new(&vm, id, spec.cpus, Arc::clone(&io)))
        .collect::<Result<Vec<_>, _>>()?;
    match restore {
        None => {
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
            if let Some(boot_vcpu) = vcpus.first() {
                boot_vcpu.set_boot_entry(&entry)?;
            }
        }
        Some(r) => {
            // The VM's interrupt controllers and clock, each vCPU, then the devices:
            // an interrupt a device raises as it goes on lands in restored controllers.
            vm.restore_state(&r.snapshot.vm)?;
            for (vcpu, state) in vcpus.iter_mut().zip(&r.snapshot.vcpus) {
                vcpu.restore(state)?;
            }
            // Held until the VM starts: a restored VM that is never resumed does no I/O.
            virtio_devices.pause();
            virtio_devices
                .restore_states(&r.snapshot.virtio)
                .map_err(inconsistent)?;
        }
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
        console_seen,
        seen: false,
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
        console_input: (spec.config.serial == SerialMode::Tty).then(|| {
            Arc::new(Mutex::new(ConsoleInput::new(
                Arc::clone(&serial),
                input_drained,
            )))
        }),
        serial,
        panicked,
        confinement: Arc::clone(&context.confinement),
        state: MachineState::Built,
        devices_held: restore.is_some(),
        paused_clock: None,
        paused_timeout: None,
    })
}
