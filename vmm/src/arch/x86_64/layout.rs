//! Where things are in guest-physical memory.
//!
//! ```text
//! 0x500      GDT, then the IDT            0xa0000     legacy hole (not RAM in the e820 map)
//! 0x6000     PVH start info, module list, 0xf0000     MP table (BIOS area, where Linux scans)
//!            memory map                   0x100000    high memory: kernel, initramfs at the top
//! 0x7000     Linux zero page              3 GiB–4 GiB  MMIO gap: IOAPIC, LAPIC, TSS, identity map
//!                                         4 GiB–      the rest of guest RAM
//! 0x9000     boot page tables (3 pages)
//! 0x20000    kernel command line
//! ```

use vm_memory::GuestAddress;

/// Boot GDT.
pub const GDT_ADDR: u64 = 0x500;
/// Boot IDT (empty), right after the GDT.
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_START_INFO: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const PVH_MODLIST: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP: u64 = 0x6080;
/// Linux boot protocol zero page (`boot_params`).
pub const ZERO_PAGE: u64 = 0x7000;
/// Boot stack top for the 64-bit entry.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Boot page tables: PML4, PDPT, PD (identity map of the first GiB).
pub const PML4: u64 = 0x9000;
/// Kernel command line.
pub const CMDLINE: u64 = 0x20000;
/// Largest command line, with its terminating NUL.
pub const CMDLINE_MAX: usize = crate::config::MAX_CMDLINE + 1;
/// Start of the legacy hole below 1 MiB (video memory and BIOS areas).
pub const LEGACY_HOLE: u64 = 0xa_0000;
/// The MP floating pointer and table, in the BIOS area Linux scans (64 KiB: room for
/// every vCPU).
pub const MPTABLE: u64 = 0xf_0000;
/// Start of memory the kernel is loaded into.
pub const HIMEM_START: u64 = 0x10_0000;
/// The I/O APIC.
pub const IOAPIC: u64 = 0xfec0_0000;
/// The local APICs.
pub const LAPIC: u64 = 0xfee0_0000;
/// First virtio-mmio register window (one page per device, in the MMIO gap).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// I/O APIC line of the first virtio device (0–4 are the legacy devices').
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Three pages KVM needs for the TSS (in the MMIO gap).
pub const KVM_TSS: u64 = 0xfffb_d000;
/// One page KVM needs for its identity map (in the MMIO gap).
pub const KVM_IDENTITY_MAP: u64 = 0xfffb_c000;
/// Start of the gap below 4 GiB where no RAM is.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of that gap.
pub const MMIO_GAP_END: u64 = 1 << 32;

/// Guest RAM ranges for `size` bytes: below the MMIO gap, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if size > low {
        ranges.push((GuestAddress(MMIO_GAP_END), size - low));
    }
    ranges
}

/// Alignment of the hotplug area.
pub const HOTPLUG_ALIGN: u64 = 1 << 30;

/// Where the hotplug area starts: above 4 GiB and above all RAM, 1 GiB aligned.
pub fn hotplug_addr(ram: &[(GuestAddress, u64)]) -> u64 {
    let end = ram
        .iter()
        .map(|(start, size)| start.0 + size)
        .fold(MMIO_GAP_END, u64::max);
    end.div_ceil(HOTPLUG_ALIGN) * HOTPLUG_ALIGN
}

/// The e820 RAM entries for RAM regions `(start, size)`: the regions minus the legacy hole
/// below 1 MiB. Sorted, as the regions are.
pub fn e820_ram(regions: &[(GuestAddress, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(start, size) in regions {
        let (start, end) = (start.0, start.0 + size);
        for (lo, hi) in [(start, end.min(LEGACY_HOLE)), (start.max(HIMEM_START), end)] {
            if lo < hi {
                out.push((lo, hi - lo));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_splits_around_the_mmio_gap() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![
                (GuestAddress(0), MMIO_GAP_START),
                (GuestAddress(MMIO_GAP_END), (4 << 30) - MMIO_GAP_START)
            ]
        );
    }

    #[test]
    fn hotplug_area_is_above_ram_and_the_gap() {
        assert_eq!(hotplug_addr(&ram_ranges(512 << 20)), 4 << 30);
        assert_eq!(hotplug_addr(&ram_ranges((4 << 30) + (1 << 20))), 6 << 30);
    }

    #[test]
    fn e820_leaves_out_the_legacy_hole() {
        let e820 = e820_ram(&ram_ranges(4 << 30));
        assert_eq!(
            e820,
            vec![
                (0, LEGACY_HOLE),
                (HIMEM_START, MMIO_GAP_START - HIMEM_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
    }
}
