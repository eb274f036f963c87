//! Kite's emulated devices.
//!
//! Legacy PC devices ([`legacy`]) sit on the port-I/O bus of vm-device's `IoManager`; their
//! interrupts go to the VM through eventfds the VMM registers as KVM irqfds.

pub mod guest_log;
pub mod legacy;
pub mod thread_exit;
pub mod virtio;
