//! The Intel MultiProcessor table (MP spec 1.4), how a guest without ACPI finds its CPUs,
//! I/O APIC and interrupt wiring.

use super::layout::{IOAPIC, LAPIC, MPTABLE};

/// Interrupt pins of the I/O APIC.
const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_BUS: u8 = 0;

/// Bytes being laid out as a table, little-endian.
struct Table(Vec<u8>);

impl Table {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// The MP floating pointer followed by the configuration table for `cpus` vCPUs (APIC ids
/// 0..cpus, vCPU 0 the boot processor), to be written at [`MPTABLE`].
pub fn build(cpus: u8) -> Vec<u8> {
    let ioapic_id = cpus;
    let mut entries = Table(Vec::new());
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries
            .u8(0) // processor entry
            .u8(id)
            .u8(APIC_VERSION)
            .u8(flags)
            .u32(0x600) // CPU signature: family 6
            .u32(0x201) // features: FPU, APIC
            .u32(0)
            .u32(0);
    }
    entries.u8(1).u8(ISA_BUS).bytes(b"ISA   ");
    entries
        .u8(2)
        .u8(ioapic_id)
        .u8(IOAPIC_VERSION)
        .u8(1)
        .u32(IOAPIC as u32);
    for pin in 0..IOAPIC_PINS {
        entries
            .u8(3) // I/O interrupt: ISA irq `pin` to I/O APIC pin `pin`
            .u8(INT_TYPE_INT)
            .u16(0)
            .u8(ISA_BUS)
            .u8(pin)
            .u8(ioapic_id)
            .u8(pin);
    }
    for (kind, lint) in [(INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)] {
        entries
            .u8(4) // local interrupt, to every local APIC
            .u8(kind)
            .u16(0)
            .u8(ISA_BUS)
            .u8(0)
            .u8(0xff)
            .u8(lint);
    }
    let count = u16::from(cpus) + 2 + u16::from(IOAPIC_PINS) + 2;

    const FLOATING_LEN: usize = 16;
    const HEADER_LEN: usize = 44;
    let table_len = (HEADER_LEN + entries.0.len()) as u16;
    let mut t = Table(Vec::with_capacity(FLOATING_LEN + usize::from(table_len)));
    t.bytes(b"_MP_")
        .u32((MPTABLE + FLOATING_LEN as u64) as u32)
        .u8(1) // length in 16-byte units
        .u8(4) // spec revision 1.4
        .u8(0) // checksum, below
        .bytes(&[0; 5]); // feature bytes: a configuration table is present
    t.0[10] = checksum(&t.0[..FLOATING_LEN]);
    t.bytes(b"PCMP")
        .u16(table_len)
        .u8(4)
        .u8(0) // checksum, below
        .bytes(b"KITE    ")
        .bytes(b"KITE-VM     ")
        .u32(0)
        .u16(0)
        .u16(count)
        .u32(LAPIC as u32)
        .u32(0)
        .bytes(&entries.0);
    let table_checksum = checksum(&t.0[FLOATING_LEN..]);
    t.0[FLOATING_LEN + 7] = table_checksum;
    t.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_lengths() {
        for cpus in [1u8, 2, 254] {
            let t = build(cpus);
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0);
            assert_eq!(&t[16..20], b"PCMP");
            let len = u16::from_le_bytes([t[20], t[21]]) as usize;
            assert_eq!(len, t.len() - 16);
            assert_eq!(sum(&t[16..]), 0);
            let count = u16::from_le_bytes([t[50], t[51]]);
            assert_eq!(count, u16::from(cpus) + 28);
            assert_eq!(len, 44 + 20 * usize::from(cpus) + 8 * 28);
            assert!(t.len() as u64 <= 0x1_0000, "fits the BIOS area");
        }
    }

    #[test]
    fn cpu_entries_name_the_boot_processor() {
        let t = build(2);
        let first = &t[60..80];
        let second = &t[80..100];
        assert_eq!((first[0], first[1], first[3]), (0, 0, 3));
        assert_eq!((second[0], second[1], second[3]), (0, 1, 1));
    }
}
