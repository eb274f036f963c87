//! KVM state: the VM (irqchip, PIT, memory slots) and its vCPUs, and their state saved
//! for snapshots.

pub mod persist;
pub mod vcpu;
pub mod vm;
