//! How a VM ends: the events that end it ([`EndEvents`], watched by the VMM's event loop),
//! what they come to ([`VmEnd`]), and the failures of VMM threads that end it
//! ([`Failures`]).

use std::os::fd::AsRawFd;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, OnceLock};

use devices::legacy::ExitPort;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::builder::eventfd;
use crate::machine::MachineError;
use crate::signals;
use crate::vstate::vcpu::VcpuStop;

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEnd {
    /// The guest powered off.
    PowerOff,
    /// The guest reset the machine (Kite ends the VM, as Firecracker does).
    Reset,
    /// The guest kernel panicked.
    GuestPanic,
    /// The guest wrote a status to the test exit port: 0 passes, anything else fails.
    GuestStatus(u8),
    /// The guest crashed.
    GuestCrash {
        /// The exit.
        exit: String,
        /// Guest RIP, if known.
        rip: Option<u64>,
    },
    /// KVM could not run the guest on.
    Fatal {
        /// The exit or error.
        exit: String,
        /// Guest RIP, if known.
        rip: Option<u64>,
    },
    /// The VMM was asked to stop by a signal.
    Signal(i32),
    /// The VM ran longer than `--timeout`.
    Timeout(std::time::Duration),
    /// A thread of the VMM other than a vCPU failed (a device thread or the fault
    /// handler died): the VM cannot go on.
    VmmFailure(String),
}

/// What a vCPU that KVM could not give memory ran into: memory the guest does not have
/// (it touched an unplugged block: the guest's fault) or memory it has that the host
/// could not back (the host's: out of memory, or a failed fault handler).
pub struct GuestMemoryMap {
    /// Guest memory.
    pub table: Arc<memory::RegionTable>,
    /// The hotplug area's guest-physical range, if there is one.
    pub hotplug_area: Option<std::ops::Range<u64>>,
}

impl GuestMemoryMap {
    /// How the VM ends when KVM could not reach the memory at `gpa` (if known).
    pub fn memory_fault(&self, gpa: Option<u64>, rip: Option<u64>) -> VmEnd {
        let in_area = |gpa: u64| self.hotplug_area.as_ref().is_some_and(|a| a.contains(&gpa));
        let unplugged = match gpa {
            Some(gpa) => {
                in_area(gpa) && self.table.region_at(vm_memory::GuestAddress(gpa)).is_none()
            }
            // Without the address: the only memory a guest may lack is unplugged memory.
            None => self.hotplug_area.is_some(),
        };
        let at = gpa.map_or_else(String::new, |gpa| format!(" at {gpa:#x}"));
        if unplugged {
            VmEnd::GuestCrash {
                exit: format!(
                    "guest accessed memory it does not have{at} (an unplugged block; it \
                     promised not to, VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE)"
                ),
                rip,
            }
        } else {
            VmEnd::Fatal {
                exit: format!(
                    "the host could not provide guest memory{at} (KVM_RUN failed with EFAULT: \
                     out of memory?)"
                ),
                rip,
            }
        }
    }
}

/// Failures of VMM threads other than vCPUs (a device thread or the fault handler that
/// died): each is reported here, from any thread, and ends the VM.
#[derive(Debug)]
pub struct Failures {
    /// Signalled on each failure.
    pub event: EventFd,
    reasons: Mutex<Vec<String>>,
}

impl Failures {
    /// No failures yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(Failures {
            event: EventFd::new(libc::EFD_NONBLOCK)?,
            reasons: Mutex::new(Vec::new()),
        })
    }

    /// Reports a failure: logged, and the VM ends.
    pub fn report(&self, why: String) {
        log::error!("{why}");
        self.reasons
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(why);
        if let Err(e) = self.event.write(1) {
            log::error!("cannot signal a failure: {e}");
        }
    }

    /// The first failure reported, if any.
    pub fn first(&self) -> Option<String> {
        self.reasons
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first()
            .cloned()
    }
}

/// Events of one VM that end it: the i8042 reset, the exit port, a vCPU stopping, the
/// `--timeout` timer. The first one decides how the VM ended. (The process's own events,
/// SIGINT/SIGTERM and failed VMM threads, are the VMM's: `crate::vmm`.)
pub struct EndEvents {
    /// The i8042's reset line.
    pub reset: EventFd,
    /// The test exit port.
    pub exit_port: EventFd,
    /// Signalled by a vCPU thread that stopped, after it sent why on `stops`.
    pub vcpu_stopped: EventFd,
    /// Why each vCPU stopped.
    pub stops: Receiver<(u8, VcpuStop)>,
    /// Guest memory's layout, to tell who is at fault when KVM cannot reach memory.
    pub memory: GuestMemoryMap,
    /// Fires when the VM has run for `--timeout`, with that duration.
    pub timeout: Option<(TimerFd, std::time::Duration)>,
    /// How the VM ended, once it has.
    pub end: Option<VmEnd>,
    /// Signalled when the console printed what `kite run --until-console` waits for.
    pub console_seen: Option<EventFd>,
    /// Whether it did (taken by the VMM).
    pub seen: bool,
}

impl MutEventSubscriber for EndEvents {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [&self.reset, &self.exit_port, &self.vcpu_stopped] {
            if let Err(e) = ops.add(Events::new(fd, EventSet::IN)) {
                log::error!("cannot watch a VM event: {e:?}");
            }
        }
        if let Some((timer, _)) = &self.timeout {
            if let Err(e) = ops.add(Events::new(timer, EventSet::IN)) {
                log::error!("cannot watch the --timeout timer: {e:?}");
            }
        }
        if let Some(seen) = &self.console_seen {
            if let Err(e) = ops.add(Events::new(seen, EventSet::IN)) {
                log::error!("cannot watch the console: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == std::os::fd::AsRawFd::as_raw_fd(&self.reset) {
            let _ = self.reset.read();
            self.end.get_or_insert(VmEnd::Reset);
        } else if fd == std::os::fd::AsRawFd::as_raw_fd(&self.exit_port) {
            if let Ok(counter) = self.exit_port.read() {
                self.end
                    .get_or_insert(VmEnd::GuestStatus(ExitPort::status_of(counter)));
            }
        } else if let Some(seen) = self.console_seen.as_ref().filter(|s| s.as_raw_fd() == fd) {
            let _ = seen.read();
            self.seen = true;
        } else if let Some((timer, after)) =
            self.timeout.as_mut().filter(|(t, _)| t.as_raw_fd() == fd)
        {
            let _ = timer.wait();
            self.end.get_or_insert(VmEnd::Timeout(*after));
        } else {
            let _ = self.vcpu_stopped.read();
            while let Ok((id, why)) = self.stops.try_recv() {
                log::info!("vCPU {id} stopped: {why:?}");
                let end = match why {
                    VcpuStop::Requested => continue,
                    VcpuStop::PowerOff => VmEnd::PowerOff,
                    VcpuStop::Reset => VmEnd::Reset,
                    VcpuStop::Crash { exit, rip } => VmEnd::GuestCrash { exit, rip },
                    VcpuStop::Fatal { exit, rip } => VmEnd::Fatal { exit, rip },
                    VcpuStop::NoMemory { gpa, rip } => self.memory.memory_fault(gpa, rip),
                };
                self.end.get_or_insert(end);
            }
        }
    }
}

/// The SIGINT/SIGTERM eventfd: one per process, as the handlers are.
pub fn signal_event() -> Result<&'static EventFd, MachineError> {
    static SIGNAL_EVENT: OnceLock<EventFd> = OnceLock::new();
    if let Some(fd) = SIGNAL_EVENT.get() {
        return Ok(fd);
    }
    let fd = eventfd()?;
    let fd = SIGNAL_EVENT.get_or_init(move || fd);
    signals::install(fd).map_err(MachineError::Signals)?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use memory::RegionSpec;
    use vm_memory::GuestAddress;

    const GIB: u64 = 1 << 30;

    #[test]
    fn a_memory_fault_is_the_guests_only_in_unplugged_memory() {
        let table = Arc::new(memory::RegionTable::default());
        table
            .insert(RegionSpec::anonymous(GuestAddress(0), 64 << 20), None)
            .unwrap();
        table
            .reserve_area(GuestAddress(4 * GIB), GIB, None)
            .unwrap();
        table
            .insert(RegionSpec::anonymous(GuestAddress(4 * GIB), 2 << 20), None)
            .unwrap();
        let map = GuestMemoryMap {
            table: Arc::clone(&table),
            hotplug_area: Some(4 * GIB..5 * GIB),
        };
        let guests = |end: &VmEnd| matches!(end, VmEnd::GuestCrash { .. });
        assert!(
            guests(&map.memory_fault(Some(4 * GIB + (4 << 20)), None)),
            "unplugged"
        );
        assert!(
            !guests(&map.memory_fault(Some(4 * GIB), None)),
            "plugged: the host's"
        );
        assert!(
            !guests(&map.memory_fault(Some(4096), None)),
            "RAM: the host's"
        );
        assert!(
            guests(&map.memory_fault(None, None)),
            "unknown, with a hotplug area"
        );
        let no_hotplug = GuestMemoryMap {
            table,
            hotplug_area: None,
        };
        let end = no_hotplug.memory_fault(None, Some(0x1000));
        assert!(
            matches!(&end, VmEnd::Fatal { exit, rip: Some(0x1000) } if exit.contains("out of memory")),
            "{end:?}"
        );
    }
}
