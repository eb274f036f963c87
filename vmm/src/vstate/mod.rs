//! KVM state: the VM (irqchip, PIT, memory slots) and its vCPUs.

pub mod vcpu;
pub mod vm;
