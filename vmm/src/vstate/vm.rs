//! The KVM VM: in-kernel irqchip (a PIT only for a snapshot that had one), the TSS and
//! identity-map pages, and the memory slots the region table asks for.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use memory::{MemorySlots, SlotError, SlotMapping};
use vmm_sys_util::eventfd::EventFd;

use super::persist::VmState;
use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP, KVM_TSS};

/// Errors creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` cannot be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available and accessible?)")]
    OpenKvm(kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("cannot {what}: {source}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// More vCPUs than this host's KVM allows.
    #[error("--cpus: boot={wanted} is more than this host's KVM allows ({max})")]
    TooManyVcpus {
        /// vCPUs asked for.
        wanted: u32,
        /// KVM's limit.
        max: usize,
    },
}

fn failed(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// A KVM VM with an in-kernel irqchip (PIC, IOAPIC, LAPICs). No PIT: Kite's guests keep
/// time with the KVM clock and the LAPIC's TSC-deadline timer (Linux boots the same
/// without one, as under Cloud Hypervisor), and KVM's PIT costs a kernel thread per VM and
/// 4–16 ms of its teardown (SRCU grace periods as its ports and interrupt notifiers go).
/// A snapshot taken with a PIT (older Kite) gets one back ([`Vm::restore_state`]).
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    /// Whether it has an in-kernel PIT.
    pit: AtomicBool,
    /// `KVM_GET_SUPPORTED_CPUID`, asked once: KVM runs the host's CPUID for every leaf,
    /// each an exit to the hypervisor below when the host is itself a VM (about 0.3 ms
    /// here), and the answer never changes.
    supported_cpuid: OnceLock<CpuId>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").finish_non_exhaustive()
    }
}

/// Entries asked of `KVM_GET_SUPPORTED_CPUID`.
const MAX_CPUID_ENTRIES: usize = kvm_bindings::KVM_MAX_CPUID_ENTRIES;

impl Vm {
    /// Opens KVM and creates a VM ready for vCPUs.
    pub fn new() -> Result<Self, VmError> {
        let vm = Self::without_irqchip()?;
        vm.create_irqchip()?;
        Ok(vm)
    }

    /// Opens KVM and creates a VM with no interrupt controllers yet: give it its memory
    /// slots, then [`Vm::create_irqchip`]. In that order KVM's first slot costs ~0.05 ms;
    /// after `KVM_CREATE_IRQCHIP` it waits 4–10 ms here (an SRCU grace period on the VM,
    /// held up for a jiffy or two by the irqchip's setup): most of a small guest's start.
    pub fn without_irqchip() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let fd = kvm.create_vm().map_err(failed("create the VM"))?;
        fd.set_tss_address(KVM_TSS as usize)
            .map_err(failed("set the TSS address"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP)
            .map_err(failed("set the identity map address"))?;
        Ok(Vm {
            kvm,
            fd: Arc::new(fd),
            pit: AtomicBool::new(false),
            supported_cpuid: OnceLock::new(),
        })
    }

    /// Creates the in-kernel irqchip (PIC, IOAPIC, LAPICs): before any vCPU, irqfd or
    /// interrupt controller state.
    pub fn create_irqchip(&self) -> Result<(), VmError> {
        self.fd
            .create_irq_chip()
            .map_err(failed("create the in-kernel irqchip"))
    }

    /// Creates KVM's PIT (with its dummy speaker port), once the irqchip is there.
    pub fn create_pit(&self) -> Result<(), VmError> {
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(failed("create the PIT"))?;
        self.pit.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Checks `count` vCPUs against this host's KVM.
    pub fn check_vcpu_count(&self, count: u32) -> Result<(), VmError> {
        let max = self.kvm.get_max_vcpus();
        if count as usize > max {
            return Err(VmError::TooManyVcpus { wanted: count, max });
        }
        Ok(())
    }

    /// Memory slots this host's KVM offers.
    pub fn max_memslots(&self) -> u32 {
        u32::try_from(self.kvm.get_nr_memslots()).unwrap_or(u32::MAX)
    }

    /// The CPUID KVM can give a guest.
    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        if let Some(cpuid) = self.supported_cpuid.get() {
            return Ok(cpuid.clone());
        }
        let cpuid = self
            .kvm
            .get_supported_cpuid(MAX_CPUID_ENTRIES)
            .map_err(failed("get the supported CPUID"))?;
        Ok(self.supported_cpuid.get_or_init(|| cpuid).clone())
    }

    /// `KVM_GET_API_VERSION`.
    pub fn api_version(&self) -> i32 {
        self.kvm.get_api_version()
    }

    /// `KVM_CHECK_EXTENSION` of `cap` (a `KVM_CAP_*`) on the VM: 0 where KVM lacks it, else
    /// 1 or a value of the capability's own.
    pub fn extension(&self, cap: u32) -> i32 {
        self.fd.check_extension_raw(libc::c_ulong::from(cap))
    }

    /// The MSRs KVM saves and restores for a vCPU (`KVM_GET_MSR_INDEX_LIST`).
    pub fn msr_index_list(&self) -> Result<Vec<u32>, VmError> {
        Ok(self
            .kvm
            .get_msr_index_list()
            .map_err(failed("get the MSR index list"))?
            .as_slice()
            .to_vec())
    }

    /// Reads the state of the in-kernel PICs and IOAPIC, the PIT (if any) and the KVM clock,
    /// for a snapshot. The vCPUs must be out of `KVM_RUN` (paused).
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let chip = |chip_id, what| {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd.get_irqchip(&mut chip).map_err(failed(what))?;
            Ok::<_, VmError>(chip)
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER, "get the master PIC")?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE, "get the slave PIC")?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC, "get the IOAPIC")?,
            pit: match self.pit.load(Ordering::Relaxed) {
                true => Some(self.fd.get_pit2().map_err(failed("get the PIT"))?),
                false => None,
            },
            clock: self.clock()?,
        })
    }

    /// Restores what [`Vm::save_state`] read, before the vCPUs are restored: the PIT (a
    /// saved one is created first, if this VM has none), the KVM clock (as
    /// [`Vm::set_clock`]: the guest's time goes on from the saved value), then the PICs and
    /// the IOAPIC (Firecracker's order).
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        if let Some(pit) = &state.pit {
            if !self.pit.load(Ordering::Relaxed) {
                self.create_pit()?;
            }
            self.fd.set_pit2(pit).map_err(failed("set the PIT"))?;
        }
        self.set_clock(&state.clock)?;
        for (chip, what) in [
            (&state.pic_master, "set the master PIC"),
            (&state.pic_slave, "set the slave PIC"),
            (&state.ioapic, "set the IOAPIC"),
        ] {
            self.fd.set_irqchip(chip).map_err(failed(what))?;
        }
        Ok(())
    }

    /// Routes `event` to interrupt line `gsi`.
    pub fn register_irqfd(&self, event: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(event, gsi)
            .map_err(failed("register an irqfd"))
    }

    /// Makes a guest write of `value` (4 bytes) to MMIO address `addr` signal `event`
    /// without an exit to the VMM.
    pub fn register_ioevent(&self, event: &EventFd, addr: u64, value: u32) -> Result<(), VmError> {
        self.fd
            .register_ioevent(event, &kvm_ioctls::IoEventAddress::Mmio(addr), value)
            .map_err(failed("register an ioeventfd"))
    }

    /// Creates vCPU `id`.
    pub fn create_vcpu(&self, id: u8) -> Result<VcpuFd, VmError> {
        self.fd
            .create_vcpu(u64::from(id))
            .map_err(failed("create a vCPU"))
    }

    /// The guest's KVM clock now (`KVM_GET_CLOCK`).
    pub fn clock(&self) -> Result<kvm_bindings::kvm_clock_data, VmError> {
        self.fd.get_clock().map_err(failed("read the KVM clock"))
    }

    /// Sets the guest's KVM clock (`KVM_SET_CLOCK`) to a value [`Vm::clock`] read: the
    /// guest's time goes on from there, as if no time had passed since.
    pub fn set_clock(&self, clock: &kvm_bindings::kvm_clock_data) -> Result<(), VmError> {
        let clock = kvm_bindings::kvm_clock_data {
            clock: clock.clock,
            // Only the clock value: KVM_CLOCK_REALTIME/HOST_TSC would ask KVM to add
            // the time that passed.
            flags: 0,
            ..Default::default()
        };
        self.fd
            .set_clock(&clock)
            .map_err(failed("set the KVM clock"))
    }

    /// The slot implementation the region table drives.
    pub fn memory_slots(&self) -> Arc<KvmSlots> {
        Arc::new(KvmSlots {
            vm: Arc::clone(&self.fd),
            live: Mutex::new(HashMap::new()),
        })
    }
}

/// KVM user memory slots, kept as the region table asks.
pub struct KvmSlots {
    vm: Arc<VmFd>,
    /// Slots that exist in KVM now, to resize by delete + create (KVM cannot resize in place).
    live: Mutex<HashMap<u32, SlotMapping>>,
}

impl KvmSlots {
    fn set(&self, slot: u32, guest_addr: u64, size: u64, host_addr: u64) -> Result<(), SlotError> {
        self.set_raw(slot, guest_addr, size, host_addr)
            .map_err(|source| SlotError::Update { slot, source })
    }

    fn set_raw(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
    ) -> Result<(), std::io::Error> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr,
        };
        // SAFETY: the region table calls `map` with a mapping of a live region, whose host
        // range stays mapped until the table has called `unmap` for it (it unmaps slots
        // before it discards or unmaps memory), and size 0 deletes the slot.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

impl MemorySlots for KvmSlots {
    fn map(&self, mapping: &SlotMapping) -> Result<(), SlotError> {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let old = live.get(&mapping.slot).copied();
        if let Some(old) = old {
            if old == *mapping {
                return Ok(());
            }
            self.set(old.slot, old.guest_addr, 0, old.host_addr)?;
            live.remove(&mapping.slot);
        }
        let created = self.set_raw(
            mapping.slot,
            mapping.guest_addr,
            mapping.size,
            mapping.host_addr,
        );
        match (created, old) {
            (Ok(()), _) => {
                live.insert(mapping.slot, *mapping);
                Ok(())
            }
            (Err(source), None) => Err(SlotError::Update {
                slot: mapping.slot,
                source,
            }),
            // The table keeps the old form after a failed resize: so must KVM.
            (Err(resize), Some(old)) => {
                match self.set_raw(old.slot, old.guest_addr, old.size, old.host_addr) {
                    Ok(()) => {
                        live.insert(old.slot, old);
                        Err(SlotError::Update {
                            slot: mapping.slot,
                            source: resize,
                        })
                    }
                    Err(restore) => Err(SlotError::Lost {
                        slot: old.slot,
                        resize,
                        restore,
                    }),
                }
            }
        }
    }

    fn unmap(&self, mapping: &SlotMapping) -> Result<(), SlotError> {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if live.remove(&mapping.slot).is_some() {
            self.set(mapping.slot, mapping.guest_addr, 0, mapping.host_addr)?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const PAGE: u64 = 4096;

    /// Anonymous memory for slots and guest RAM, unmapped on drop.
    pub(crate) struct Memory(*mut libc::c_void, usize);

    impl Memory {
        pub(crate) fn new(len: usize) -> Memory {
            // SAFETY: a fresh anonymous mapping; nothing else refers to it.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(addr, libc::MAP_FAILED);
            Memory(addr, len)
        }

        /// Its host address.
        pub(crate) fn addr(&self) -> u64 {
            self.0 as u64
        }

        pub(crate) fn bytes(&mut self) -> &mut [u8] {
            // SAFETY: our own mapping of `self.1` bytes, borrowed only while no vCPU of
            // its VM runs (not started, or paused).
            unsafe { std::slice::from_raw_parts_mut(self.0.cast(), self.1) }
        }
    }

    impl Drop for Memory {
        fn drop(&mut self) {
            // SAFETY: our own mapping, no longer used (its VM and vCPUs are gone first).
            unsafe { libc::munmap(self.0, self.1) };
        }
    }

    pub(crate) fn vm() -> Option<Vm> {
        match Vm::new() {
            Ok(vm) => Some(vm),
            Err(e) => {
                eprintln!("SKIPPED: no KVM here: {e}");
                assert!(
                    std::env::var_os("KITE_NO_SKIPS").is_none(),
                    "CI must have KVM: {e}"
                );
                None
            }
        }
    }

    #[test]
    fn the_vm_state_goes_through_json_into_another_vm() {
        let Some(first) = vm() else {
            return;
        };
        // State to carry over, unlike a new VM's: an IOAPIC pin routed (masked), the
        // master PIC's mask, a KVM clock far from a new VM's.
        let mut state = first.save_state().unwrap();
        // SAFETY: KVM_GET_IRQCHIP filled each chip's member of the union (plain integers,
        // every byte initialized); IOAPIC entry 3 is written whole.
        unsafe {
            state.ioapic.chip.ioapic.redirtbl[3].bits = (1 << 16) | 0x35;
            state.pic_master.chip.pic.imr = 0xfb;
        }
        state.clock.clock = 1000 * 1_000_000_000;
        first.restore_state(&state).unwrap();
        let saved = first.save_state().unwrap();

        let json = serde_json::to_string(&saved).unwrap();
        let back: VmState = serde_json::from_str(&json).unwrap();
        let second = vm().unwrap();
        second.restore_state(&back).unwrap();
        let restored = second.save_state().unwrap();

        let bytes = |chip: &kvm_irqchip| serde_json::to_string(chip).unwrap();
        assert_eq!(bytes(&restored.ioapic), bytes(&saved.ioapic), "IOAPIC");
        assert_ne!(
            bytes(&restored.ioapic),
            bytes(&Vm::new().unwrap().save_state().unwrap().ioapic)
        );
        assert_eq!(
            bytes(&restored.pic_master),
            bytes(&saved.pic_master),
            "master PIC"
        );
        assert_eq!(
            bytes(&restored.pic_slave),
            bytes(&saved.pic_slave),
            "slave PIC"
        );
        assert!(saved.pit.is_none() && restored.pit.is_none(), "a PIT");
        // The guest's time goes on from the saved clock.
        let (then, now) = (saved.clock.clock, restored.clock.clock);
        assert!(
            (then..then + 10_000_000_000).contains(&now),
            "the KVM clock: {then} ns saved, {now} ns restored"
        );
    }

    /// A snapshot of a VM that had a PIT (older Kite) gets it back, as saved, in a VM that
    /// has none; a VM without one saves none.
    #[test]
    fn a_saved_pit_comes_back_in_a_vm_without_one() {
        let Some(first) = vm() else {
            return;
        };
        assert!(first.save_state().unwrap().pit.is_none());
        first.create_pit().unwrap();
        let mut state = first.save_state().unwrap();
        let pit = state.pit.as_mut().expect("the PIT saved");
        (pit.channels[0].count, pit.channels[0].mode) = (0x1234, 2);
        first.restore_state(&state).unwrap();
        let saved = first.save_state().unwrap();

        let json = serde_json::to_string(&saved).unwrap();
        let second = vm().unwrap();
        second
            .restore_state(&serde_json::from_str(&json).unwrap())
            .unwrap();
        let (saved, restored) = (saved.pit.unwrap(), second.save_state().unwrap().pit);
        let restored = restored.expect("a PIT in the restored VM");
        for (a, b) in restored.channels.iter().zip(&saved.channels) {
            assert_eq!((a.count, a.mode, a.gate), (b.count, b.mode, b.gate), "PIT");
        }
        assert_eq!(
            (restored.channels[0].count, restored.channels[0].mode),
            (0x1234, 2)
        );
    }

    #[test]
    fn a_failed_resize_keeps_the_old_slot() {
        let memory = Memory::new(4 * PAGE as usize);
        let Some(vm) = vm() else {
            return;
        };
        let slots = vm.memory_slots();
        let old = SlotMapping {
            slot: 0,
            guest_addr: 0,
            size: 2 * PAGE,
            host_addr: memory.addr(),
        };
        slots.map(&old).unwrap();
        // KVM refuses a host address that is not page aligned.
        let bad = SlotMapping {
            size: 4 * PAGE,
            host_addr: old.host_addr + 1,
            ..old
        };
        assert!(matches!(
            slots.map(&bad),
            Err(SlotError::Update { slot: 0, .. })
        ));
        assert_eq!(slots.live.lock().unwrap().get(&0), Some(&old));
        // KVM still has the old slot: another one over its guest range is refused.
        let other = SlotMapping { slot: 1, ..old };
        assert!(
            slots.map(&other).is_err(),
            "slot 0 was lost: another slot could take its guest range"
        );
        // And the table's idea of it matches KVM's: a real resize still works.
        slots
            .map(&SlotMapping {
                size: 4 * PAGE,
                ..old
            })
            .unwrap();
        drop(slots);
        drop(vm);
    }
}
