//! Segment descriptors for the boot GDT, and the KVM segment registers they load as.

use kvm_bindings::kvm_segment;

/// Access and flag bits (`flags` of [`entry`]): a 64-bit code segment.
pub const CODE64: u16 = 0xa09b;
/// A 32-bit code segment.
pub const CODE32: u16 = 0xc09b;
/// A read/write data segment.
pub const DATA: u16 = 0xc093;
/// A 64-bit TSS.
pub const TSS: u16 = 0x008b;

/// A descriptor with `flags` (access byte in bits 0–7, flags nibble in bits 12–15),
/// `base` and 20-bit `limit`, laid out as the CPU reads it.
pub const fn entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (flags as u64, base as u64, limit as u64);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The segment register state of loading descriptor `index` (holding `entry`).
pub fn segment(entry: u64, index: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let granular = bit(55) == 1;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(bit(47) == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_code64_descriptor() {
        let e = entry(CODE64, 0, 0xfffff);
        assert_eq!(e, 0x00af_9b00_0000_ffff);
        let s = segment(e, 1);
        assert_eq!((s.base, s.limit, s.selector), (0, 0xffff_ffff, 8));
        assert_eq!(
            (s.type_, s.present, s.s, s.l, s.db, s.g),
            (0xb, 1, 1, 1, 0, 1)
        );
    }

    #[test]
    fn data_and_tss_descriptors() {
        let d = segment(entry(DATA, 0, 0xfffff), 2);
        assert_eq!((d.type_, d.db, d.l, d.limit), (3, 1, 0, 0xffff_ffff));
        let t = segment(entry(TSS, 0x1234_5678, 0x67), 3);
        assert_eq!(
            (t.base, t.limit, t.type_, t.s, t.g),
            (0x1234_5678, 0x67, 0xb, 0, 0)
        );
        assert_eq!(segment(0, 0).unusable, 1);
    }
}
