//! Exit codes of `kite`, part of its interface, and the one place that decides which
//! code a VM's end or a failure gets.

use crate::control::{ActionError, Outcome};
use crate::end::VmEnd;
use crate::machine::{Blame, MachineError};

/// The guest powered off or rebooted.
pub const GUEST_SHUTDOWN: i32 = 0;
/// The VMM failed (KVM, the host), or KVM could not run the guest on.
pub const VMM_ERROR: i32 = 1;
/// The command line is wrong: unknown flags, unparsable or out-of-range values.
pub const BAD_ARGUMENTS: i32 = 2;
/// A file is wrong: the config file, kernel or initramfs (missing, unreadable, not a
/// kernel, does not fit in guest memory).
pub const BAD_INPUT: i32 = 3;
/// The guest kernel panicked or the guest crashed (triple fault).
pub const GUEST_CRASH: i32 = 4;
/// The guest reported failure on the test exit port (0xf4).
pub const GUEST_FAILURE: i32 = 5;
/// A Kite thread made a system call its seccomp filter does not allow: Kite stopped
/// at once (`--seccomp=on`).
pub const BAD_SYSCALL: i32 = 6;
/// The VM ran longer than `--timeout` and was stopped.
pub const TIMEOUT: i32 = 124;
/// Stopped by signal N (SIGINT, SIGTERM): 128 + N.
pub const SIGNAL_BASE: i32 = 128;

/// The exit code of `outcome`, and what to tell the user (on stderr) or log (info).
pub fn of_outcome(outcome: &Outcome) -> (i32, Report) {
    let rip = |rip: &Option<u64>| rip.map_or_else(|| "unknown".into(), |r| format!("{r:#x}"));
    let end = match outcome {
        Outcome::Shutdown => return (GUEST_SHUTDOWN, Report::Log("the VMM was shut down".into())),
        Outcome::Snapshotted(dir) => {
            return (
                GUEST_SHUTDOWN,
                Report::Log(format!("snapshot written to {}", dir.display())),
            )
        }
        Outcome::Vm(end) => end,
    };
    match end {
        VmEnd::PowerOff => (GUEST_SHUTDOWN, Report::Log("the guest powered off".into())),
        VmEnd::Reset => (GUEST_SHUTDOWN, Report::Log("the guest rebooted".into())),
        VmEnd::GuestStatus(0) => (
            GUEST_SHUTDOWN,
            Report::Log("the guest reported success on the exit port".into()),
        ),
        VmEnd::GuestStatus(status) => (
            GUEST_FAILURE,
            Report::Error(format!(
                "the guest reported failure {status} on the exit port"
            )),
        ),
        VmEnd::GuestPanic => (
            GUEST_CRASH,
            Report::Error("the guest kernel panicked".into()),
        ),
        VmEnd::GuestCrash { exit, rip: at } => (
            GUEST_CRASH,
            Report::Error(format!(
                "the guest crashed: {exit} at guest RIP {}",
                rip(at)
            )),
        ),
        VmEnd::Fatal { exit, rip: at } => (
            VMM_ERROR,
            Report::Error(format!("the VM stopped: {exit} at guest RIP {}", rip(at))),
        ),
        VmEnd::Timeout(after) => (
            TIMEOUT,
            Report::Error(format!(
                "the VM ran longer than --timeout {}; stopped",
                after.as_secs()
            )),
        ),
        VmEnd::VmmFailure(why) => (VMM_ERROR, Report::Error(format!("the VMM failed: {why}"))),
        VmEnd::Signal(num) => (
            SIGNAL_BASE + num,
            Report::Log(format!("stopped by signal {num}")),
        ),
    }
}

/// The exit code of a VM that could not be built or started.
pub fn of_error(e: &MachineError) -> i32 {
    match e.blame() {
        Blame::Arguments => BAD_ARGUMENTS,
        Blame::InputFile => BAD_INPUT,
        Blame::Vmm => VMM_ERROR,
    }
}

/// The exit code of a VM that could not be created or booted (`kite run`).
pub fn of_action_error(e: &ActionError) -> i32 {
    match e {
        ActionError::Config(e) if e.is_bad_file() => BAD_INPUT,
        ActionError::Config(_) => BAD_ARGUMENTS,
        ActionError::Machine(e) => of_error(e),
        _ => VMM_ERROR,
    }
}

/// What to say about an outcome.
#[derive(Debug, PartialEq, Eq)]
pub enum Report {
    /// Logged at info level: an ordinary end.
    Log(String),
    /// Printed on stderr: the user must know.
    Error(String),
}
