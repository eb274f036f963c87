//! seccomp-bpf confinement of every Kite thread, with rust-vmm's `seccompiler`.
//!
//! Each kind of thread ([`ThreadKind`]) has an allow-list of its own ([`filters`]), which
//! the thread installs on itself before it touches guest data: vCPUs before their first
//! `KVM_RUN`, device threads and the fault handler before their first request, the
//! control socket before its first client, the main thread once the VM is built. A thread
//! keeps the filter it had when it was created, so every thread is created before the
//! main thread confines itself.
//!
//! `--seccomp=on` (the default): a call outside the list ends the process at once, with
//! a message naming the thread and the call, and exit code 6 (`SECCOMP_RET_TRAP` and a
//! SIGSYS handler that cannot be undone by the thread: a blocked or ignored SIGSYS is
//! fatal). `--seccomp=log`: such calls are allowed and logged by the kernel (audit log);
//! for finding what a new code path needs. `--seccomp=off`: no filters.

pub mod filters;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use devices::virtio::mem::VIRTIO_ID_MEM;
use devices::virtio::{VIRTIO_ID_BLOCK, VIRTIO_ID_RNG};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use serde::{Deserialize, Serialize};

/// `--seccomp`: what a thread's filter does with a call it does not allow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    /// End the process (exit code 6).
    #[default]
    On,
    /// Allow it, and have the kernel log it.
    Log,
    /// No filters.
    Off,
}

impl FromStr for SeccompMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(SeccompMode::On),
            "log" => Ok(SeccompMode::Log),
            "off" => Ok(SeccompMode::Off),
            _ => Err(format!("--seccomp: '{s}' is not on, log or off")),
        }
    }
}

/// The kinds of Kite threads, each with a filter of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The main thread: the event loop that waits for the VM to end, console input.
    Main,
    /// A vCPU.
    Vcpu,
    /// A virtio-blk device thread.
    Block,
    /// The virtio-rng device thread.
    Rng,
    /// The virtio-mem device thread (plugs and unplugs: a region-table writer).
    Mem,
    /// The userfaultfd fault handler of lazy memory.
    FaultHandler,
    /// The control socket.
    Api,
    /// The main thread of a VMM that builds VMs on request (an API socket): it may do
    /// what building a VM takes, and what every thread it starts does.
    Vmm,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 8] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Block,
        ThreadKind::Rng,
        ThreadKind::Mem,
        ThreadKind::FaultHandler,
        ThreadKind::Api,
        ThreadKind::Vmm,
    ];

    /// The kind's name in messages (and in `KITE_TEST_TRIGGER`).
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Block => "block",
            ThreadKind::Rng => "rng",
            ThreadKind::Mem => "mem",
            ThreadKind::FaultHandler => "fault-handler",
            ThreadKind::Api => "api",
            ThreadKind::Vmm => "vmm",
        }
    }

    /// The kind of the thread of a virtio device of type `device_type` (`VIRTIO_ID_*`).
    pub fn of_device(device_type: u32) -> Option<Self> {
        match device_type {
            VIRTIO_ID_BLOCK => Some(ThreadKind::Block),
            VIRTIO_ID_RNG => Some(ThreadKind::Rng),
            VIRTIO_ID_MEM => Some(ThreadKind::Mem),
            _ => None,
        }
    }
}

/// Errors building or installing filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A filter could not be compiled.
    #[error("cannot compile the seccomp filter of {kind} threads: {reason}")]
    Compile {
        /// The thread kind.
        kind: &'static str,
        /// seccompiler's error.
        reason: String,
    },
    /// A filter could not be installed.
    #[error("cannot install the seccomp filter of a {kind} thread: {reason}")]
    Install {
        /// The thread kind.
        kind: &'static str,
        /// seccompiler's error.
        reason: String,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(vmm_sys_util::errno::Error),
}

/// The compiled filters of one `kite` process.
pub struct Confinement {
    mode: SeccompMode,
    programs: BTreeMap<ThreadKind, BpfProgram>,
}

impl std::fmt::Debug for Confinement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Confinement")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

thread_local! {
    /// What the current thread was confined as: the SIGSYS handler names it.
    static CONFINED_AS: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

impl Confinement {
    /// Compiles every kind's filter for `mode` and, with `on`, installs the SIGSYS
    /// handler. Call on the main thread before any thread is confined.
    pub fn new(mode: SeccompMode) -> Result<Arc<Self>, SeccompError> {
        if mode != SeccompMode::Off && !SINGLE_ARENA.load(Ordering::Relaxed) {
            prime_allocator();
        }
        let mut programs = BTreeMap::new();
        if mode != SeccompMode::Off {
            let mismatch = match mode {
                SeccompMode::Log => SeccompAction::Log,
                _ => SeccompAction::Trap,
            };
            for kind in ThreadKind::ALL {
                let compile_error = |e: seccompiler::BackendError| SeccompError::Compile {
                    kind: kind.name(),
                    reason: e.to_string(),
                };
                let filter = SeccompFilter::new(
                    filters::rules(kind),
                    mismatch.clone(),
                    SeccompAction::Allow,
                    TargetArch::x86_64,
                )
                .map_err(compile_error)?;
                let program: BpfProgram = filter.try_into().map_err(compile_error)?;
                programs.insert(kind, program);
            }
        }
        if mode == SeccompMode::On {
            vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
                .map_err(SeccompError::Handler)?;
        }
        Ok(Arc::new(Confinement { mode, programs }))
    }

    /// The mode.
    pub fn mode(&self) -> SeccompMode {
        self.mode
    }

    /// Installs `kind`'s filter on the calling thread (nothing with `off`).
    pub fn confine(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        if let Some(program) = self.programs.get(&kind) {
            CONFINED_AS.with(|c| c.set(Some(kind)));
            seccompiler::apply_filter(program).map_err(|e| SeccompError::Install {
                kind: kind.name(),
                reason: e.to_string(),
            })?;
        }
        #[cfg(debug_assertions)]
        test_trigger(kind);
        Ok(())
    }
}

/// Set by [`single_arena`].
static SINGLE_ARENA: AtomicBool = AtomicBool::new(false);

/// Has glibc's allocator serve every thread from its main arena. Call first thing in
/// `main`, before any thread starts (a thread keeps the arena it first allocated from).
/// Kite's threads allocate little, and rarely at once; an arena per thread costs host
/// memory (each a heap of its own, partly touched) and, once its thread is confined, a
/// shrinking one makes glibc read `/proc/sys/vm/overcommit_memory` (see
/// `prime_allocator`, then not needed: the main arena shrinks with `brk`).
pub fn single_arena() {
    // SAFETY: mallopt only sets an allocator parameter; M_ARENA_MAX with 1 is valid.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) } == 1 {
        SINGLE_ARENA.store(true, Ordering::Relaxed);
    }
}

/// Has glibc's allocator do, before any thread is confined, what it otherwise does the
/// first time a thread's heap shrinks: open and read `/proc/sys/vm/overcommit_memory`
/// (it caches the answer for the process). A confined thread that frees much memory
/// (virtio-mem unplugging) would otherwise make that `openat`, which no filter allows.
/// Heaps shrink in the arenas of threads other than the main one, when more than the
/// trim threshold (128 KiB) is free at their top: so a short-lived thread fills and
/// frees 1 MiB in pieces below the mmap threshold.
fn prime_allocator() {
    let primed = std::thread::Builder::new()
        .name("kite_prime".into())
        .spawn(|| {
            let pieces: Vec<Vec<u8>> = (0..16).map(|i| vec![i as u8; 64 << 10]).collect();
            drop(std::hint::black_box(pieces));
        })
        .map(|thread| thread.join());
    if !matches!(primed, Ok(Ok(()))) {
        log::debug!("could not prime the allocator before confinement");
    }
}

/// Number of system calls `kind`'s filter allows (with or without argument checks).
pub fn allowed_calls(kind: ThreadKind) -> usize {
    filters::rules(kind).len()
}

/// Test builds only (debug assertions): `KITE_TEST_TRIGGER=KIND:ACTION` makes the first
/// thread of that kind, once confined, make a system call no filter allows (`syscall`)
/// or panic (`panic`), so tests can see what Kite does then.
#[cfg(debug_assertions)]
fn test_trigger(kind: ThreadKind) {
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let Ok(trigger) = std::env::var("KITE_TEST_TRIGGER") else {
        return;
    };
    let Some((who, action)) = trigger.split_once(':') else {
        return;
    };
    if who != kind.name() || FIRED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    match action {
        // SAFETY: getppid has no arguments and no effect; no filter allows it.
        "syscall" => unsafe {
            libc::syscall(FORBIDDEN_CALL);
        },
        "panic" => panic!("KITE_TEST_TRIGGER: a {} thread panics", kind.name()),
        _ => {}
    }
}

/// The call the test trigger makes: harmless, and in no allow-list.
#[cfg(any(debug_assertions, test))]
const FORBIDDEN_CALL: libc::c_long = libc::SYS_getppid;

/// The SIGSYS handler: a confined thread made a call its filter does not allow. Says
/// which, puts the terminal back, and ends the process. Only async-signal-safe calls,
/// all of them in every allow-list (write, ioctl TCSETS, exit_group).
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SIGSYS's siginfo: after signo, errno, code (and padding), the call's address, then
    // the system call number (`si_syscall`, an int at byte 24 on x86_64).
    // SAFETY: the kernel passes a valid siginfo for SIGSYS, at least 28 bytes long.
    let call = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    let kind = CONFINED_AS
        .with(|c| c.get())
        .map_or("unconfined", ThreadKind::name);
    let mut digits = [0u8; 12];
    let mut message = Message::default();
    message.push(b"kite: a thread (");
    message.push(kind.as_bytes());
    message.push(b") made system call ");
    message.push(decimal(call, &mut digits));
    message.push(b", which its seccomp filter does not allow; stopping\n");
    // SAFETY: write(2) of a buffer we own, to stderr; async-signal-safe.
    unsafe {
        libc::write(
            libc::STDERR_FILENO,
            message.buf.as_ptr().cast(),
            message.len,
        )
    };
    crate::console::restore_terminal_now();
    // SAFETY: _exit(2) is async-signal-safe and ends the process at once.
    unsafe { libc::_exit(crate::cli::exit::BAD_SYSCALL) };
}

/// A message built without allocating (in a signal handler).
struct Message {
    buf: [u8; 160],
    len: usize,
}

impl Default for Message {
    fn default() -> Self {
        Message {
            buf: [0; 160],
            len: 0,
        }
    }
}

impl Message {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }
}

/// `n` in decimal, written at the end of `buf` (no allocation).
fn decimal(n: i32, buf: &mut [u8; 12]) -> &[u8] {
    let mut i = buf.len();
    let mut v = i64::from(n).unsigned_abs();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if n < 0 {
        i -= 1;
        buf[i] = b'-';
    }
    &buf[i..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_and_none_allows_the_test_trigger_call() {
        for kind in ThreadKind::ALL {
            let rules = filters::rules(kind);
            assert!(
                !rules.contains_key(&FORBIDDEN_CALL),
                "{} allows the trigger's call",
                kind.name()
            );
            let filter = SeccompFilter::new(
                rules,
                SeccompAction::Trap,
                SeccompAction::Allow,
                TargetArch::x86_64,
            )
            .unwrap();
            let program: BpfProgram = filter.try_into().unwrap();
            assert!(!program.is_empty());
        }
    }

    /// Firecracker allows roughly 30 to 40 calls per thread; so should Kite.
    #[test]
    fn allow_lists_stay_small() {
        for kind in ThreadKind::ALL {
            let n = allowed_calls(kind);
            println!("{}: {n} system calls", kind.name());
            // The VMM thread of an API-driven VMM builds VMs and starts their threads,
            // and writes snapshots.
            let most = if kind == ThreadKind::Vmm { 72 } else { 40 };
            assert!(n <= most, "{}: {n} system calls", kind.name());
        }
    }

    #[test]
    fn decimals_are_written_without_allocating() {
        let mut buf = [0u8; 12];
        assert_eq!(decimal(0, &mut buf), b"0");
        assert_eq!(decimal(110, &mut buf), b"110");
        assert_eq!(decimal(i32::MIN, &mut buf), b"-2147483648");
    }

    #[test]
    fn modes_parse() {
        assert_eq!("on".parse(), Ok(SeccompMode::On));
        assert_eq!("log".parse(), Ok(SeccompMode::Log));
        assert_eq!("off".parse(), Ok(SeccompMode::Off));
        assert!("yes".parse::<SeccompMode>().is_err());
    }
}
