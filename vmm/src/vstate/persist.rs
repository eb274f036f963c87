//! KVM state for snapshots: a vCPU's ([`VcpuState`]), the VM's irqchip, PIT and clock
//! ([`VmState`]), and what a host must offer to restore them ([`HostFingerprint`]).
//!
//! The KVM structs are kvm-bindings' own, serialized by its `serde` feature as the bytes
//! KVM gave (so a snapshot holds exactly what KVM returned, with no hand-written copy to
//! keep in step with the kernel's). Only `kvm_fpu`, which kvm-bindings does not serialize,
//! has a copy here ([`Fpu`]), and variable-length arrays are `Vec`s of their entries.

use std::collections::{BTreeMap, BTreeSet};

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, CpuId, Msrs, Xsave, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::vm::{Vm, VmError};
use crate::arch::x86_64::cpuid;

/// Errors saving or restoring a vCPU's state: each names the vCPU and the step.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {id}: cannot {what}: {source}")]
    Kvm {
        /// vCPU id.
        id: u8,
        /// The step: what was being done.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// `KVM_SET_MSRS` stopped before the end of the saved MSRs.
    #[error(
        "vCPU {id}: cannot restore MSR {index:#x} (value {value:#x}): KVM set {set} of the \
         {wanted} MSRs given, and refused this one"
    )]
    MsrNotSet {
        /// vCPU id.
        id: u8,
        /// The first MSR KVM did not set.
        index: u32,
        /// Its saved value.
        value: u64,
        /// MSRs KVM set in that call.
        set: usize,
        /// MSRs given in that call.
        wanted: usize,
    },
    /// The snapshot's guest ran its TSC at another frequency than this host's, and KVM
    /// here cannot scale it (no TSC control): the guest's time would run at the wrong
    /// rate.
    #[error(
        "vCPU {id}: the snapshot's TSC ran at {saved} kHz, this host's at {here} kHz, and \
         KVM here cannot scale it: {source}"
    )]
    TscFrequency {
        /// vCPU id.
        id: u8,
        /// The snapshot's frequency.
        saved: u32,
        /// This host's.
        here: u32,
        /// KVM's refusal.
        source: kvm_ioctls::Error,
    },
    /// A list longer than KVM's structures take.
    #[error("vCPU {id}: cannot {what}: {source}")]
    TooMany {
        /// vCPU id.
        id: u8,
        /// The step.
        what: &'static str,
        /// The error.
        source: vmm_sys_util::fam::Error,
    },
}

/// `IA32_TSC`.
const MSR_IA32_TSC: u32 = 0x10;
/// `IA32_TSC_DEADLINE`.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// The MTRRs (default type, 8 variable ranges as KVM has, the fixed ranges): KVM does not
/// list them in `KVM_GET_MSR_INDEX_LIST`, yet a guest sets them (and Kite's boot MSRs set
/// the default type).
fn mtrr_msrs() -> impl Iterator<Item = u32> {
    std::iter::once(0x2ff)
        .chain(0x200..0x210)
        .chain([0x250, 0x258, 0x259])
        .chain(0x268..0x270)
}

/// What a vCPU's saved state is made of on this host: read from KVM once per VM
/// ([`SaveSpec::of`]) and kept by each vCPU, whose thread saves with it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SaveSpec {
    /// MSRs to save: every MSR KVM lists for saving and restoring
    /// (`KVM_GET_MSR_INDEX_LIST`, which includes the TSC and KVM's own MSRs) and the
    /// MTRRs, which it does not list. A save keeps those `KVM_GET_MSRS` returns.
    pub msr_indices: Vec<u32>,
    /// `KVM_CAP_XSAVE`: the FPU, SSE and AVX state is saved as an XSAVE area (else as
    /// `kvm_fpu`).
    pub xsave: bool,
    /// `KVM_CAP_XSAVE2`: the size of the XSAVE area in bytes (`KVM_GET_XSAVE2`); 0 where
    /// there is only `KVM_GET_XSAVE` and its 4096 bytes.
    pub xsave2_size: usize,
    /// `KVM_CAP_XCRS`: the extended control registers (XCR0) are saved.
    pub xcrs: bool,
}

impl SaveSpec {
    /// What this host's KVM saves for `vm`'s vCPUs.
    pub fn of(vm: &Vm) -> Result<SaveSpec, VmError> {
        let mut msr_indices = vm.msr_index_list()?;
        for index in mtrr_msrs() {
            if !msr_indices.contains(&index) {
                msr_indices.push(index);
            }
        }
        Ok(SaveSpec {
            msr_indices,
            xsave: vm.extension(kvm_bindings::KVM_CAP_XSAVE) > 0,
            xsave2_size: usize::try_from(vm.extension(kvm_bindings::KVM_CAP_XSAVE2)).unwrap_or(0),
            xcrs: vm.extension(kvm_bindings::KVM_CAP_XCRS) > 0,
        })
    }
}

/// `kvm_fpu` (which kvm-bindings does not serialize): the x87 and SSE state, saved on a
/// host without XSAVE.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fpu {
    fpr: [[u8; 16]; 8],
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: [[u8; 16]; 16],
    mxcsr: u32,
}

impl From<&kvm_fpu> for Fpu {
    fn from(f: &kvm_fpu) -> Self {
        Fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&Fpu> for kvm_fpu {
    fn from(f: &Fpu) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// Bytes in a `u32` word of the XSAVE area.
const WORD: usize = std::mem::size_of::<u32>();

/// A bound on the XSAVE area KVM copies in and out of a vCPU (the kernel's
/// `guest_fpu.uabi_size`, which can exceed `KVM_CAP_XSAVE2` where the host has features
/// KVM does not offer): the host CPU's largest XSAVE area, for every feature it has (CPUID
/// leaf 0xd, ECX), and at least `kvm_xsave`'s 4096 bytes.
fn xsave_area_bound() -> usize {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    const XSAVE_LEAF: u32 = 0xd;
    // `__cpuid` is a safe function from Rust 1.94 on, unsafe before (the MSRV is 1.85).
    #[allow(unused_unsafe)]
    // SAFETY: CPUID exists on every x86_64 CPU; it only reads.
    let max_leaf = unsafe { __cpuid(0) }.eax;
    let largest = if max_leaf >= XSAVE_LEAF {
        #[allow(unused_unsafe)]
        // SAFETY: as above, for a leaf the CPU has.
        let leaf = unsafe { __cpuid_count(XSAVE_LEAF, 0) };
        leaf.ecx as usize
    } else {
        0
    };
    largest.max(std::mem::size_of::<kvm_xsave>())
}

/// An `Xsave` of `words` 32-bit words in all (at least `kvm_xsave`'s region).
fn xsave_buffer(words: usize) -> Result<Xsave, vmm_sys_util::fam::Error> {
    let region = std::mem::size_of::<kvm_xsave>() / WORD;
    Xsave::new(words.saturating_sub(region))
}

/// Everything KVM keeps of one vCPU, as [`VcpuState::save`] read it from a vCPU out of
/// `KVM_RUN` (see [`super::vcpu::VcpuControl::save_states`]). Parts that depend on the
/// host's KVM are `Option`s.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU id (its APIC id).
    pub id: u8,
    /// Its CPUID (`KVM_GET_CPUID2`): what the guest was shown.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// MSRs, in the order they are restored (`IA32_TSC_DEADLINE` after `IA32_TSC`).
    pub msrs: Vec<kvm_msr_entry>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base, pending interrupt.
    pub sregs: kvm_sregs,
    /// The XSAVE area as 32-bit words (`KVM_GET_XSAVE2`, or `KVM_GET_XSAVE`'s 4096 bytes),
    /// where the host has `KVM_CAP_XSAVE`: the FPU, SSE, AVX... state.
    pub xsave: Option<Vec<u32>>,
    /// The FPU and SSE state, where the host has no `KVM_CAP_XSAVE`.
    pub fpu: Option<Fpu>,
    /// Extended control registers, where the host has `KVM_CAP_XCRS`.
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Multiprocessing state (runnable, halted, waiting for a start-up IPI...).
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs, SIPIs and the interrupt shadow.
    pub vcpu_events: kvm_vcpu_events,
    /// The guest's TSC frequency in kHz (`KVM_GET_TSC_KHZ`), where KVM tells it.
    #[serde(default)]
    pub tsc_khz: Option<u32>,
}

impl VcpuState {
    /// Reads vCPU `id`'s state from `fd`, which must be out of `KVM_RUN` with its last exit
    /// completed (a port or MMIO access finishes only at the next `KVM_RUN`: see
    /// `Vcpu::complete_exit`).
    ///
    /// The MP state is read first (reading it makes the local APIC take pending INIT and
    /// SIPI events, which changes what is read after), the vCPU events last (the other reads
    /// may change them), as Firecracker and QEMU do. MSRs are those of `spec` that
    /// `KVM_GET_MSRS` returns: one it refuses is skipped. A zero `IA32_TSC_DEADLINE` is
    /// saved as the TSC (Firecracker's workaround): a deadline that expired while the vCPU
    /// was out of `KVM_RUN` has cleared the MSR but its interrupt is only injected at the
    /// next entry, and would be lost, leaving a tickless guest without timer; an early
    /// timer interrupt is harmless.
    pub fn save(fd: &VcpuFd, id: u8, spec: &SaveSpec) -> Result<VcpuState, PersistError> {
        let kvm = |what| move |source| PersistError::Kvm { id, what, source };
        let mp_state = fd.get_mp_state().map_err(kvm("get the MP state"))?;
        let regs = fd.get_regs().map_err(kvm("get the registers"))?;
        let sregs = fd.get_sregs().map_err(kvm("get the special registers"))?;
        let (xsave, fpu) = if spec.xsave {
            (Some(get_xsave(fd, id, spec)?), None)
        } else {
            let fpu = fd.get_fpu().map_err(kvm("get the FPU"))?;
            (None, Some(Fpu::from(&fpu)))
        };
        let xcrs = if spec.xcrs {
            Some(fd.get_xcrs().map_err(kvm("get the XCRs"))?)
        } else {
            None
        };
        let debug_regs = fd
            .get_debug_regs()
            .map_err(kvm("get the debug registers"))?;
        let lapic = fd.get_lapic().map_err(kvm("get the local APIC"))?;
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("get the CPUID"))?
            .as_slice()
            .to_vec();
        let msrs = get_msrs(fd, id, &spec.msr_indices)?;
        let vcpu_events = fd.get_vcpu_events().map_err(kvm("get the vCPU events"))?;
        let tsc_khz = fd.get_tsc_khz().ok();
        Ok(VcpuState {
            id,
            cpuid,
            msrs,
            regs,
            sregs,
            xsave,
            fpu,
            xcrs,
            debug_regs,
            lapic,
            mp_state,
            vcpu_events,
            tsc_khz,
        })
    }

    /// Restores this state into `fd`, a vCPU created for it that has not run.
    ///
    /// The order KVM needs (Firecracker's): CPUID first (other steps check features
    /// against it); MP state; registers; special registers (they hold the APIC base, so
    /// before the local APIC); XSAVE or FPU; XCRs; debug registers; local APIC (before the
    /// MSRs: `IA32_TSC_DEADLINE` is taken only by a local APIC in TSC-deadline mode); MSRs,
    /// every one of which KVM must take; vCPU events last (setting the registers clears a
    /// pending exception, which the events put back). Then KVM is told the guest was
    /// paused (`KVM_KVMCLOCK_CTRL`, for its watchdogs), where the guest uses kvmclock.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), PersistError> {
        let id = self.id;
        let kvm = |what| move |source| PersistError::Kvm { id, what, source };
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|source| PersistError::TooMany {
            id,
            what: "set the CPUID",
            source,
        })?;
        fd.set_cpuid2(&cpuid).map_err(kvm("set the CPUID"))?;
        // The guest's time must run at the rate it ran at: scaled where KVM can,
        // refused where it cannot.
        if let (Some(saved), Ok(here)) = (self.tsc_khz, fd.get_tsc_khz()) {
            if saved != here {
                fd.set_tsc_khz(saved)
                    .map_err(|source| PersistError::TscFrequency {
                        id,
                        saved,
                        here,
                        source,
                    })?;
            }
        }
        fd.set_mp_state(self.mp_state)
            .map_err(kvm("set the MP state"))?;
        fd.set_regs(&self.regs).map_err(kvm("set the registers"))?;
        fd.set_sregs(&self.sregs)
            .map_err(kvm("set the special registers"))?;
        if let Some(words) = &self.xsave {
            set_xsave(fd, id, words)?;
        }
        if let Some(fpu) = &self.fpu {
            fd.set_fpu(&kvm_fpu::from(fpu))
                .map_err(kvm("set the FPU"))?;
        }
        if let Some(xcrs) = &self.xcrs {
            fd.set_xcrs(xcrs).map_err(kvm("set the XCRs"))?;
        }
        fd.set_debug_regs(&self.debug_regs)
            .map_err(kvm("set the debug registers"))?;
        fd.set_lapic(&self.lapic)
            .map_err(kvm("set the local APIC"))?;
        set_msrs(fd, id, &self.msrs)?;
        // KVM_GET_VCPU_EVENTS fills a pending NMI and the SIPI vector without flagging
        // them valid; set, they must be flagged, or KVM ignores them (as QEMU does).
        let mut events = self.vcpu_events;
        events.flags |= kvm_bindings::KVM_VCPUEVENT_VALID_NMI_PENDING
            | kvm_bindings::KVM_VCPUEVENT_VALID_SIPI_VECTOR;
        fd.set_vcpu_events(&events)
            .map_err(kvm("set the vCPU events"))?;
        // EINVAL where the guest has no kvmclock (it has nothing to be told then).
        if let Err(e) = fd.kvmclock_ctrl() {
            log::debug!("vCPU {id}: KVM_KVMCLOCK_CTRL: {e}");
        }
        Ok(())
    }
}

/// The XSAVE area of `fd`, as 32-bit words.
fn get_xsave(fd: &VcpuFd, id: u8, spec: &SaveSpec) -> Result<Vec<u32>, PersistError> {
    if spec.xsave2_size == 0 {
        let xsave = fd.get_xsave().map_err(|source| PersistError::Kvm {
            id,
            what: "get the XSAVE area",
            source,
        })?;
        return Ok(xsave.region.to_vec());
    }
    let words = spec.xsave2_size.max(xsave_area_bound()).div_ceil(WORD);
    let mut xsave = xsave_buffer(words).map_err(|source| PersistError::TooMany {
        id,
        what: "get the XSAVE area",
        source,
    })?;
    // SAFETY: `xsave` holds at least KVM_CAP_XSAVE2's size and the host's largest XSAVE
    // area, more than the `guest_fpu.uabi_size` bytes KVM_GET_XSAVE2 writes.
    unsafe { fd.get_xsave2(&mut xsave) }.map_err(|source| PersistError::Kvm {
        id,
        what: "get the XSAVE area",
        source,
    })?;
    let mut area = xsave.as_fam_struct_ref().xsave.region.to_vec();
    area.extend_from_slice(xsave.as_slice());
    Ok(area)
}

/// Sets `fd`'s XSAVE area to `words`.
fn set_xsave(fd: &VcpuFd, id: u8, words: &[u32]) -> Result<(), PersistError> {
    let mut xsave =
        xsave_buffer(words.len().max(xsave_area_bound().div_ceil(WORD))).map_err(|source| {
            PersistError::TooMany {
                id,
                what: "set the XSAVE area",
                source,
            }
        })?;
    // SAFETY: only the fixed region is written, not the length the wrapper relies on.
    let region = unsafe { &mut xsave.as_mut_fam_struct().xsave.region };
    let (head, tail) = words.split_at(words.len().min(region.len()));
    region[..head.len()].copy_from_slice(head);
    xsave.as_mut_slice()[..tail.len()].copy_from_slice(tail);
    // SAFETY: `xsave` holds at least the host's largest XSAVE area, more than the
    // `guest_fpu.uabi_size` bytes KVM_SET_XSAVE reads; what is past the saved words is
    // zero, and the area's header says which parts hold state.
    unsafe { fd.set_xsave2(&xsave) }.map_err(|source| PersistError::Kvm {
        id,
        what: "set the XSAVE area",
        source,
    })
}

/// The MSRs of `indices` that KVM returns, in restore order.
fn get_msrs(fd: &VcpuFd, id: u8, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, PersistError> {
    let mut saved = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|source| PersistError::TooMany {
            id,
            what: "get the MSRs",
            source,
        })?;
        let read = fd
            .get_msrs(&mut msrs)
            .map_err(|source| PersistError::Kvm {
                id,
                what: "get the MSRs",
                source,
            })?
            .min(chunk.len());
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        // KVM stops at the first MSR it cannot read (one it lists for a feature this vCPU
        // lacks): skip it.
        if let Some(refused) = chunk.get(read) {
            log::debug!("vCPU {id}: KVM does not read MSR {refused:#x}; not saved");
            rest = &rest[read + 1..];
        } else {
            rest = &rest[read..];
        }
    }
    let tsc = saved
        .iter()
        .find(|m| m.index == MSR_IA32_TSC)
        .map(|m| m.data);
    if let Some(tsc) = tsc {
        for msr in saved.iter_mut() {
            if msr.index == MSR_IA32_TSC_DEADLINE && msr.data == 0 {
                msr.data = tsc;
            }
        }
    }
    // Restored in this order: the deadline after the TSC it is compared with (stable sort).
    saved.sort_by_key(|m| m.index == MSR_IA32_TSC_DEADLINE);
    Ok(saved)
}

/// Sets every one of `msrs`, in order.
fn set_msrs(fd: &VcpuFd, id: u8, msrs: &[kvm_msr_entry]) -> Result<(), PersistError> {
    for chunk in msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let list = Msrs::from_entries(chunk).map_err(|source| PersistError::TooMany {
            id,
            what: "set the MSRs",
            source,
        })?;
        let set = fd.set_msrs(&list).map_err(|source| PersistError::Kvm {
            id,
            what: "set the MSRs",
            source,
        })?;
        if let Some(refused) = chunk.get(set) {
            return Err(PersistError::MsrNotSet {
                id,
                index: refused.index,
                value: refused.data,
                set,
                wanted: chunk.len(),
            });
        }
    }
    Ok(())
}

/// The VM's own KVM state: the in-kernel interrupt controllers (both PICs, the IOAPIC),
/// the PIT of a VM that had one and the KVM clock. Saved with `Vm::save_state`, restored with
/// `Vm::restore_state` before the vCPUs are.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// The master PIC (`KVM_GET_IRQCHIP`).
    pub pic_master: kvm_irqchip,
    /// The slave PIC.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The PIT (`KVM_GET_PIT2`), in snapshots of VMs that had one (older Kite).
    #[serde(default)]
    pub pit: Option<kvm_pit_state2>,
    /// The KVM clock (`KVM_GET_CLOCK`).
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // kvm_irqchip (a union) has no Debug.
        f.debug_struct("VmState")
            .field("pit", &self.pit)
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

/// How a KVM capability of the snapshot's host is checked against this host's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CapRule {
    /// Kite's restore uses it where the snapshot's host had it: here too, then.
    Present,
    /// The XSAVE area's size: here at least the snapshot's, when that is more than the
    /// 4096 bytes every host with XSAVE takes.
    XsaveSize,
    /// Recorded, not compared: what matters is the snapshot's vCPU count against this
    /// host's limit, which building the VM checks (`Vm::check_vcpu_count`).
    Recorded,
}

/// The KVM capabilities Kite's restore relies on, by name.
const CAPS: [(u32, &str, CapRule); 10] = [
    (
        kvm_bindings::KVM_CAP_IRQCHIP,
        "KVM_CAP_IRQCHIP",
        CapRule::Present,
    ),
    (
        kvm_bindings::KVM_CAP_MP_STATE,
        "KVM_CAP_MP_STATE",
        CapRule::Present,
    ),
    (
        kvm_bindings::KVM_CAP_VCPU_EVENTS,
        "KVM_CAP_VCPU_EVENTS",
        CapRule::Present,
    ),
    (
        kvm_bindings::KVM_CAP_DEBUGREGS,
        "KVM_CAP_DEBUGREGS",
        CapRule::Present,
    ),
    (
        kvm_bindings::KVM_CAP_XSAVE,
        "KVM_CAP_XSAVE",
        CapRule::Present,
    ),
    (
        kvm_bindings::KVM_CAP_XSAVE2,
        "KVM_CAP_XSAVE2",
        CapRule::XsaveSize,
    ),
    (kvm_bindings::KVM_CAP_XCRS, "KVM_CAP_XCRS", CapRule::Present),
    (
        kvm_bindings::KVM_CAP_PIT_STATE2,
        "KVM_CAP_PIT_STATE2",
        CapRule::Present,
    ),
    (
        kvm_bindings::KVM_CAP_ADJUST_CLOCK,
        "KVM_CAP_ADJUST_CLOCK",
        CapRule::Present,
    ),
    (
        kvm_bindings::KVM_CAP_MAX_VCPUS,
        "KVM_CAP_MAX_VCPUS",
        CapRule::Recorded,
    ),
];

/// CPUID registers of feature flags (leaf, subleaf, registers: 0 = EAX ... 3 = EDX): what
/// a guest may use.
const FEATURE_REGISTERS: [(u32, u32, &[usize]); 13] = [
    (0x1, 0, &[2, 3]),
    (0x6, 0, &[0]),
    (0x7, 0, &[1, 2, 3]),
    (0x7, 1, &[0, 3]),
    (0x7, 2, &[3]),
    (0xd, 0, &[0, 3]),
    (0xd, 1, &[0, 2, 3]),
    (0x4000_0001, 0, &[0]),
    (0x8000_0001, 0, &[2, 3]),
    (0x8000_0007, 0, &[3]),
    (0x8000_0008, 0, &[1]),
    (0x8000_0021, 0, &[0]),
    (0x8000_0021, 1, &[0]),
];

const REGISTER_NAMES: [&str; 4] = ["eax", "ebx", "ecx", "edx"];

fn register(entry: &kvm_cpuid_entry2, reg: usize) -> u32 {
    [entry.eax, entry.ebx, entry.ecx, entry.edx][reg]
}

/// What a snapshot needs from the host it is restored on, read from the host that took
/// it and from the one restoring it: see [`HostFingerprint::differences`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostFingerprint {
    /// `KVM_GET_API_VERSION`.
    pub api_version: i32,
    /// The CPUID KVM can give a guest (`KVM_GET_SUPPORTED_CPUID`).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// `KVM_CHECK_EXTENSION` of each capability Kite's restore relies on, by name
    /// (`KVM_CAP_XSAVE`...).
    pub caps: BTreeMap<String, i32>,
    /// MSRs KVM saves and restores there ([`SaveSpec::msr_indices`]).
    pub msr_indices: Vec<u32>,
}

impl HostFingerprint {
    /// This host's, read through `vm`.
    pub fn of(vm: &Vm) -> Result<HostFingerprint, VmError> {
        Ok(HostFingerprint {
            api_version: vm.api_version(),
            cpuid: vm.supported_cpuid()?.as_slice().to_vec(),
            caps: CAPS
                .iter()
                .map(|&(cap, name, _)| (name.to_string(), vm.extension(cap)))
                .collect(),
            msr_indices: SaveSpec::of(vm)?.msr_indices,
        })
    }

    /// What keeps a snapshot taken on the host `self` describes from being restored on
    /// the host `here` describes, in words; empty when it can be.
    ///
    /// The rule: the guest keeps the CPUID and state it had, so this host must be able to
    /// give it all of that, and Kite's restore must find what it uses.
    /// - The same KVM API version.
    /// - CPUID: the same vendor; every feature flag the snapshot's host offered (leaf 1
    ///   ECX/EDX, leaf 7, the XSAVE features of leaf 0xd, KVM's features, the extended
    ///   leaves...) offered here too, except those Kite never shows a guest (LA57, KVM's
    ///   hypercall features); at least as many physical address bits. Other CPUID values
    ///   (model, caches, brand) may differ: the guest keeps its own.
    /// - KVM capabilities: each one Kite's restore uses that the snapshot's host had,
    ///   here too (`KVM_CAP_XSAVE`, `XCRS`, `VCPU_EVENTS`, `DEBUGREGS`, `MP_STATE`,
    ///   `IRQCHIP`, `PIT_STATE2`, `ADJUST_CLOCK`); an XSAVE area larger than 4096 bytes
    ///   (`KVM_CAP_XSAVE2`) fits here. `KVM_CAP_MAX_VCPUS` is not compared: the vCPU count
    ///   is checked against it when the VM is built.
    /// - Every MSR saved there can be restored here (listed by KVM here too).
    pub fn differences(&self, here: &HostFingerprint) -> Vec<String> {
        let mut found = Vec::new();
        if self.api_version != here.api_version {
            found.push(format!(
                "KVM API version: {} in the snapshot, {} here",
                self.api_version, here.api_version
            ));
        }
        cpuid_differences(&self.cpuid, &here.cpuid, &mut found);
        for (_, name, rule) in CAPS {
            let snapshot = self.caps.get(name).copied().unwrap_or(0);
            let this = here.caps.get(name).copied().unwrap_or(0);
            let differs = match rule {
                CapRule::Present => snapshot > 0 && this <= 0,
                CapRule::XsaveSize => snapshot > 4096 && this < snapshot,
                CapRule::Recorded => false,
            };
            if differs {
                found.push(format!("{name}: {snapshot} in the snapshot, {this} here"));
            }
        }
        let restorable: BTreeSet<u32> = here.msr_indices.iter().copied().collect();
        for index in &self.msr_indices {
            if !restorable.contains(index) {
                found.push(format!(
                    "MSR {index:#x} saved but this host cannot restore it"
                ));
            }
        }
        found
    }
}

/// The CPUID vendor string (leaf 0: EBX, EDX, ECX).
fn vendor(entries: &[kvm_cpuid_entry2]) -> Option<String> {
    let leaf = entries.iter().find(|e| e.function == 0)?;
    let bytes: Vec<u8> = [leaf.ebx, leaf.edx, leaf.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

fn cpuid_differences(
    snapshot: &[kvm_cpuid_entry2],
    here: &[kvm_cpuid_entry2],
    found: &mut Vec<String>,
) {
    // What Kite shows a guest: its masks (LA57, hypercall features) on both sides.
    let shown = |entries: &[kvm_cpuid_entry2]| {
        let mut entries = entries.to_vec();
        cpuid::adjust(&mut entries, 0, 1);
        entries
    };
    let (snapshot, here) = (shown(snapshot), shown(here));
    let leaf = |entries: &[kvm_cpuid_entry2], function: u32, index: u32| {
        entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .copied()
            .unwrap_or_default()
    };
    let (vendor_then, vendor_now) = (vendor(&snapshot), vendor(&here));
    if vendor_then != vendor_now {
        found.push(format!(
            "CPUID vendor: {} in the snapshot, {} here",
            vendor_then.as_deref().unwrap_or("none"),
            vendor_now.as_deref().unwrap_or("none")
        ));
    }
    for (function, index, registers) in FEATURE_REGISTERS {
        let (then, now) = (
            leaf(&snapshot, function, index),
            leaf(&here, function, index),
        );
        for &reg in registers {
            let (a, b) = (register(&then, reg), register(&now, reg));
            let missing = a & !b;
            if missing != 0 {
                found.push(format!(
                    "CPUID leaf {function:#x} subleaf {index}: {} {a:#010x} in the snapshot, \
                     {b:#010x} here (bits {missing:#x} missing here)",
                    REGISTER_NAMES[reg]
                ));
            }
        }
    }
    let phys_bits = |entries: &[kvm_cpuid_entry2]| leaf(entries, 0x8000_0008, 0).eax & 0xff;
    let (then, now) = (phys_bits(&snapshot), phys_bits(&here));
    if then > now {
        found.push(format!(
            "CPUID leaf 0x80000008: {then} physical address bits in the snapshot, {now} here"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    /// A fingerprint like a real host's, without KVM.
    fn fingerprint() -> HostFingerprint {
        // "GenuineIntel": EBX "Genu", EDX "ineI", ECX "ntel".
        let vendor = |s: &[u8]| u32::from_le_bytes(s.try_into().unwrap());
        HostFingerprint {
            api_version: 12,
            cpuid: vec![
                entry(
                    0,
                    0,
                    [0xd, vendor(b"Genu"), vendor(b"ntel"), vendor(b"ineI")],
                ),
                entry(0x1, 0, [0x906ea, 0x800, 0xf7fa_3223, 0x078b_fbff]),
                entry(0x7, 0, [0, 0x029c_6fbf, 0x0040_0004, 0xac00_0400]),
                entry(0xd, 0, [0x7, 0x340, 0x340, 0]),
                entry(0x8000_0008, 0, [0x3027, 0, 0, 0]),
            ],
            caps: CAPS
                .iter()
                .map(|&(_, name, _)| (name.to_string(), 1))
                .collect(),
            msr_indices: vec![0x10, 0x174, 0x6e0, 0x4b56_4d01],
        }
    }

    #[test]
    fn a_fingerprint_has_no_differences_with_itself() {
        let host = fingerprint();
        assert_eq!(host.differences(&host), Vec::<String>::new());
    }

    #[test]
    fn a_feature_missing_here_is_a_difference_and_one_more_here_is_not() {
        let snapshot = fingerprint();
        let mut here = snapshot.clone();
        let leaf7 = here
            .cpuid
            .iter_mut()
            .find(|e| e.function == 0x7)
            .expect("leaf 7");
        leaf7.ebx &= !(1 << 5); // AVX2
        let found = snapshot.differences(&here);
        assert_eq!(
            found,
            vec![
                "CPUID leaf 0x7 subleaf 0: ebx 0x029c6fbf in the snapshot, 0x029c6f9f here \
                 (bits 0x20 missing here)"
                    .to_string()
            ]
        );
        // The other way round: the snapshot's guest saw less than this host offers.
        assert_eq!(here.differences(&snapshot), Vec::<String>::new());
    }

    #[test]
    fn a_leaf_missing_here_and_fewer_address_bits_are_differences() {
        let snapshot = fingerprint();
        let mut here = snapshot.clone();
        here.cpuid.retain(|e| e.function != 0xd);
        here.cpuid
            .iter_mut()
            .find(|e| e.function == 0x8000_0008)
            .unwrap()
            .eax = 0x3024;
        assert_eq!(
            snapshot.differences(&here),
            vec![
                "CPUID leaf 0xd subleaf 0: eax 0x00000007 in the snapshot, 0x00000000 here \
                 (bits 0x7 missing here)",
                "CPUID leaf 0x80000008: 39 physical address bits in the snapshot, 36 here",
            ]
        );
    }

    #[test]
    fn bits_kite_never_shows_a_guest_are_not_differences() {
        let mut snapshot = fingerprint();
        let leaf7 = snapshot
            .cpuid
            .iter_mut()
            .find(|e| e.function == 0x7)
            .unwrap();
        leaf7.ecx |= 1 << 16; // LA57
        snapshot
            .cpuid
            .push(entry(0x4000_0001, 0, [1 << 7, 0, 0, 0])); // PV unhalt
        let here = fingerprint();
        assert_eq!(snapshot.differences(&here), Vec::<String>::new());
    }

    #[test]
    fn a_missing_cap_a_vendor_an_api_and_an_msr_are_differences() {
        let snapshot = fingerprint();
        let mut here = snapshot.clone();
        here.caps.insert("KVM_CAP_XSAVE".into(), 0);
        here.caps.insert("KVM_CAP_MAX_VCPUS".into(), 0);
        here.msr_indices.retain(|&i| i != 0x6e0);
        here.api_version = 13;
        let amd = |s: &[u8]| u32::from_le_bytes(s.try_into().unwrap());
        let leaf0 = here.cpuid.iter_mut().find(|e| e.function == 0).unwrap();
        (leaf0.ebx, leaf0.edx, leaf0.ecx) = (amd(b"Auth"), amd(b"enti"), amd(b"cAMD"));
        assert_eq!(
            snapshot.differences(&here),
            vec![
                "KVM API version: 12 in the snapshot, 13 here",
                "CPUID vendor: GenuineIntel in the snapshot, AuthenticAMD here",
                "KVM_CAP_XSAVE: 1 in the snapshot, 0 here",
                "MSR 0x6e0 saved but this host cannot restore it",
            ]
        );
    }

    #[test]
    fn a_larger_xsave_area_must_fit_here() {
        let mut snapshot = fingerprint();
        snapshot.caps.insert("KVM_CAP_XSAVE2".into(), 4096);
        let mut here = snapshot.clone();
        here.caps.insert("KVM_CAP_XSAVE2".into(), 0);
        assert!(
            snapshot.differences(&here).is_empty(),
            "4096 bytes fit any XSAVE host"
        );
        snapshot.caps.insert("KVM_CAP_XSAVE2".into(), 11008);
        here.caps.insert("KVM_CAP_XSAVE2".into(), 4096);
        assert_eq!(
            snapshot.differences(&here),
            vec!["KVM_CAP_XSAVE2: 11008 in the snapshot, 4096 here"]
        );
    }

    #[test]
    fn this_hosts_fingerprint_has_what_a_restore_relies_on() {
        let vm = match Vm::new() {
            Ok(vm) => vm,
            Err(e) => {
                eprintln!("SKIPPED: no KVM here: {e}");
                assert!(
                    std::env::var_os("KITE_NO_SKIPS").is_none(),
                    "CI must have KVM: {e}"
                );
                return;
            }
        };
        let host = HostFingerprint::of(&vm).unwrap();
        assert_eq!(host.differences(&host), Vec::<String>::new());
        assert_eq!(host.api_version, 12, "KVM's API version since Linux 2.6.22");
        assert_eq!(host.caps.len(), CAPS.len());
        for cap in ["KVM_CAP_IRQCHIP", "KVM_CAP_PIT_STATE2", "KVM_CAP_MP_STATE"] {
            assert!(host.caps[cap] > 0, "{cap}: Kite's VMs have them");
        }
        for msr in [MSR_IA32_TSC, 0x2ff] {
            assert!(host.msr_indices.contains(&msr), "MSR {msr:#x}");
        }
        assert!(host.cpuid.iter().any(|e| e.function == 0x7));
        let json = serde_json::to_string(&host).unwrap();
        let back: HostFingerprint = serde_json::from_str(&json).unwrap();
        assert_eq!(back, host);
        // A host without a feature this one offers cannot take its snapshots.
        let mut poorer = host.clone();
        let leaf1 = poorer.cpuid.iter_mut().find(|e| e.function == 0x1).unwrap();
        let sse2 = 1 << 26;
        assert_ne!(leaf1.edx & sse2, 0);
        leaf1.edx &= !sse2;
        let found = host.differences(&poorer);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("CPUID leaf 0x1 subleaf 0: edx"),
            "{found:?}"
        );
    }

    #[test]
    fn fingerprint_round_trips_through_json() {
        let host = fingerprint();
        let json = serde_json::to_string(&host).unwrap();
        let back: HostFingerprint = serde_json::from_str(&json).unwrap();
        assert_eq!(back, host);
    }

    #[test]
    fn fpu_converts_both_ways() {
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            last_ip: 0x1234,
            xmm: [[7; 16]; 16],
            ..Default::default()
        };
        assert_eq!(kvm_fpu::from(&Fpu::from(&fpu)), fpu);
    }

    #[test]
    fn the_xsave_bound_covers_kvm_xsave() {
        let bound = xsave_area_bound();
        assert!(bound >= 4096, "{bound}");
        assert!(bound < 1 << 20, "{bound}");
    }
}
