//! The CPUID a vCPU sees: KVM's supported set, adjusted for the VM's topology and for what a
//! guest must not use.

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: more than one logical processor per package.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 7 ECX: 5-level paging. KVM's supported set offers it on hosts that cannot run it.
const LEAF7_ECX_LA57: u32 = 1 << 16;
/// KVM paravirtual features that make hypercalls (PV unhalt, PV send-IPI, PV sched-yield):
/// a guest using them depends on VMCALL/VMMCALL, which some hosts (kvm_pvm) never return from.
const KVM_HYPERCALL_FEATURES: u32 = (1 << 7) | (1 << 11) | (1 << 13);
/// Leaf of KVM's paravirtual feature bits.
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;

/// Bits needed to number `count` items (`ceil(log2(count))`).
fn bits_for(count: u32) -> u32 {
    count.max(1).next_power_of_two().trailing_zeros()
}

/// Adjusts KVM's supported CPUID `entries` for vCPU `apic_id` of `cpu_count`: APIC ids and
/// topology (one package, one thread per core), the hypervisor bit, LA57 masked, no
/// hypercall-based paravirtual features.
pub fn adjust(entries: &mut [kvm_cpuid_entry2], apic_id: u8, cpu_count: u8) {
    let count = u32::from(cpu_count);
    let apic = u32::from(apic_id);
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                // EBX: initial APIC id (31:24), logical processors per package (23:16).
                e.ebx = (e.ebx & 0x0000_ffff) | (apic << 24) | (count << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                // Cores per package - 1 (31:26, six bits); each cache private to its core.
                e.eax = (e.eax & 0x3fff) | (((count - 1) & 0x3f) << 26);
            }
            0x7 if e.index == 0 => e.ecx &= !LEAF7_ECX_LA57,
            0xb | 0x1f => {
                // Extended topology: level 0 = SMT (one thread), level 1 = core.
                let (shift, processors, level_type) = match e.index {
                    0 => (0, 1, 1),
                    1 => (bits_for(count), count, 2),
                    _ => (0, 0, 0),
                };
                e.eax = shift;
                e.ebx = processors;
                e.ecx = (level_type << 8) | (e.index & 0xff);
                e.edx = apic;
            }
            KVM_CPUID_FEATURES => e.eax &= !KVM_HYPERCALL_FEATURES,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0xffff_ffff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    #[test]
    fn topology_and_masks() {
        let mut entries = vec![
            leaf(0x1, 0),
            leaf(0x4, 0),
            leaf(0x7, 0),
            leaf(0xb, 0),
            leaf(0xb, 1),
            leaf(0xb, 2),
            leaf(KVM_CPUID_FEATURES, 0),
        ];
        adjust(&mut entries, 3, 4);
        assert_eq!(entries[0].ebx >> 24, 3);
        assert_eq!((entries[0].ebx >> 16) & 0xff, 4);
        assert_ne!(entries[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!(entries[1].eax >> 26, 3);
        assert_eq!(entries[2].ecx & LEAF7_ECX_LA57, 0);
        assert_eq!(
            (
                entries[3].eax,
                entries[3].ebx,
                entries[3].ecx >> 8,
                entries[3].edx
            ),
            (0, 1, 1, 3)
        );
        assert_eq!(
            (entries[4].eax, entries[4].ebx, entries[4].ecx >> 8),
            (2, 4, 2)
        );
        assert_eq!((entries[5].ebx, entries[5].ecx >> 8), (0, 0));
        assert_eq!(entries[6].eax & KVM_HYPERCALL_FEATURES, 0);
        assert_ne!(entries[6].eax, 0, "other paravirtual features stay");
    }

    #[test]
    fn many_cpus_saturate_the_cache_leaf_field() {
        let mut entries = vec![leaf(0x4, 0)];
        adjust(&mut entries, 0, 254);
        assert_eq!(entries[0].eax >> 26, 253 & 0x3f);
        assert_eq!(entries[0].eax & 0x3fff, 0x3fff, "low bits kept");
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let mut entries = vec![leaf(0x1, 0)];
        adjust(&mut entries, 0, 1);
        assert_eq!(entries[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(3), 2);
    }
}
