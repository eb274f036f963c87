//! Kite's VMM: KVM VM and vCPUs, Linux boot, configuration and the `kite` command line.
//!
//! [`spec::VmSpec`] is a VM's resolved configuration, [`builder::build`] turns it into a
//! [`machine::Machine`], [`control::Vmm`] runs machines and serves the API;
//! [`cli::main`] is the `kite` binary.

pub mod api;
pub mod arch;
pub mod builder;
pub mod cli;
pub mod config;
pub mod console;
pub mod control;
pub mod device_manager;
pub mod end;
pub mod exit;
pub mod logger;
pub mod machine;
pub mod seccomp;
pub mod signals;
pub mod snapshot;
pub mod spec;
pub mod vstate;
