//! vCPU state at boot: general and segment registers for the boot entry, FPU, MSRs and the
//! local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, Msrs};
use kvm_ioctls::VcpuFd;

use super::gdt;
use super::layout::{BOOT_STACK, GDT_ADDR, IDT_ADDR, PML4};

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, paging off, `%ebx` = the start info.
    Pvh {
        /// The kernel's PVH entry point.
        entry: u64,
        /// Guest address of `hvm_start_info`.
        start_info: u64,
    },
    /// Linux 64-bit boot protocol: long mode on identity-mapped boot page tables,
    /// `%rsi` = the zero page.
    Linux64 {
        /// The kernel's 64-bit entry point.
        entry: u64,
        /// Guest address of `boot_params`.
        zero_page: u64,
    },
}

impl BootEntry {
    /// The boot GDT this entry runs on: null, code, data, TSS.
    pub fn gdt(&self) -> [u64; 4] {
        let code = match self {
            BootEntry::Pvh { .. } => gdt::CODE32,
            BootEntry::Linux64 { .. } => gdt::CODE64,
        };
        [
            0,
            gdt::entry(code, 0, 0xfffff),
            gdt::entry(gdt::DATA, 0, 0xfffff),
            gdt::entry(gdt::TSS, 0, 0x67),
        ]
    }
}

/// Errors setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM vCPU ioctl failed.
    #[error("cannot {what} of vCPU: {source}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// KVM took fewer MSRs than given.
    #[error("KVM set {set} of {wanted} boot MSRs")]
    Msrs {
        /// MSRs set.
        set: usize,
        /// MSRs given.
        wanted: usize,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

const X86_CR0_PE: u64 = 1;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Sets the boot vCPU's registers for `entry`. The GDT, IDT and (for the 64-bit entry) page
/// tables must already be in guest memory (see [`super::boot`]).
pub fn setup_boot_cpu(vcpu: &VcpuFd, entry: &BootEntry) -> Result<(), RegsError> {
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match *entry {
        BootEntry::Pvh { entry, start_info } => {
            regs.rip = entry;
            regs.rbx = start_info;
        }
        BootEntry::Linux64 { entry, zero_page } => {
            regs.rip = entry;
            regs.rsi = zero_page;
            regs.rsp = BOOT_STACK;
            regs.rbp = BOOT_STACK;
        }
    }
    vcpu.set_regs(&regs).map_err(kvm("set the registers"))?;

    let mut sregs = vcpu.get_sregs().map_err(kvm("get the special registers"))?;
    let table = entry.gdt();
    sregs.cs = gdt::segment(table[1], 1);
    let data = gdt::segment(table[2], 2);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = gdt::segment(table[3], 3);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    match entry {
        BootEntry::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootEntry::Linux64 { .. } => {
            sregs.cr3 = PML4;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(kvm("set the special registers"))
}

/// The x87/SSE state at power-on.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("set the FPU"))
}

/// MSRs a booting kernel expects cleared or set: syscall entry points, TSC, fast strings,
/// write-back as the default memory type.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const BOOT_MSRS: [(u32, u64); 11] = [
        (0x174, 0),                // IA32_SYSENTER_CS
        (0x175, 0),                // IA32_SYSENTER_ESP
        (0x176, 0),                // IA32_SYSENTER_EIP
        (0xc000_0081, 0),          // STAR
        (0xc000_0082, 0),          // LSTAR
        (0xc000_0083, 0),          // CSTAR
        (0xc000_0084, 0),          // SYSCALL_MASK
        (0xc000_0102, 0),          // KERNEL_GS_BASE
        (0x10, 0),                 // IA32_TSC
        (0x1a0, 1),                // IA32_MISC_ENABLE: fast strings
        (0x2ff, (1 << 11) | 0x06), // MTRR default type: enabled, write-back
    ];
    let entries: Vec<kvm_msr_entry> = BOOT_MSRS
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).expect("a fixed, small MSR list fits");
    let set = vcpu.set_msrs(&msrs).map_err(kvm("set the MSRs"))?;
    if set != entries.len() {
        return Err(RegsError::Msrs {
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

/// Wires the local APIC's LINT0 to ExtINT (the PIC) and LINT1 to NMI, as firmware does.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const DELIVERY_EXTINT: u32 = 0x7;
    const DELIVERY_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic().map_err(kvm("get the local APIC"))?;
    for (reg, mode) in [(APIC_LVT0, DELIVERY_EXTINT), (APIC_LVT1, DELIVERY_NMI)] {
        let bytes: Vec<u8> = lapic.regs[reg..reg + 4].iter().map(|b| *b as u8).collect();
        let value = u32::from_le_bytes(bytes.try_into().expect("four bytes"));
        let value = (value & !0x700) | (mode << 8);
        for (dst, src) in lapic.regs[reg..reg + 4].iter_mut().zip(value.to_le_bytes()) {
            *dst = src as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("set the local APIC"))
}
