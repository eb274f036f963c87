//! Kite's VMM: KVM VM and vCPUs, Linux boot, configuration and the `kite` command line.
//!
//! [`machine::run`] builds and runs one VM; [`cli::main`] is the `kite` binary.

pub mod api;
pub mod arch;
pub mod cli;
pub mod config;
pub mod console;
pub mod end;
pub mod logger;
pub mod machine;
pub mod seccomp;
pub mod signals;
pub mod vstate;
