//! x86_64: the guest-physical layout, boot protocols, CPU state and firmware tables.

pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod regs;
