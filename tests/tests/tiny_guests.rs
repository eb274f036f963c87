//! Guests of a few instructions (see `tiny_kernel`), for fast checks of how a VM ends: a
//! crash, an exit KVM cannot handle, the i8042 reset, and SIGINT/SIGTERM while vCPUs are
//! busy or halted. Each runs in well under a second of guest time.

use std::time::Duration;

use kite_tests::{kvm_available, tiny_kernel, Ended, Kite, TINY_KERNEL_ENTRY};
use vmm::cli::{exit, on_kvm_pvm_host};

const DEADLINE: Duration = Duration::from_secs(120);

/// `mov dx, 0x3f8; mov al, 'K'; out dx, al`: says "K" on the console.
const SAY_K: [u8; 7] = [0x66, 0xba, 0xf8, 0x03, 0xb0, 0x4b, 0xee];

fn run(code: &[u8], cpus: &str) -> Option<(Kite, tempfile::TempDir)> {
    if !kvm_available() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = tiny_kernel(dir.path(), code);
    let kite = Kite::start(&["run", "--kernel", kernel.to_str().unwrap(), "--cpus", cpus]);
    Some((kite, dir))
}

fn ended(code: &[u8]) -> Option<Ended> {
    let (kite, _dir) = run(code, "boot=1")?;
    let ended = kite.wait_exit(DEADLINE);
    assert!(!ended.stderr.contains("panicked"), "{}", ended.stderr);
    Some(ended)
}

/// `ud2` with no usable IDT: #UD, #GP, double fault, triple fault.
#[test]
fn triple_fault_is_a_guest_crash() {
    let Some(end) = ended(&[0x0f, 0x0b]) else {
        return;
    };
    assert_eq!(end.code, Some(exit::GUEST_CRASH), "{}", end.stderr);
    assert!(
        end.stderr
            .contains("the guest crashed: KVM_EXIT_SHUTDOWN (triple fault) at guest RIP 0x"),
        "{}",
        end.stderr
    );
}

/// `int3` in guest kernel mode: on a kvm_pvm host KVM cannot emulate it and stops with an
/// internal error, reported with its RIP as a VMM-side failure; elsewhere it is a
/// breakpoint with no IDT, so a triple fault.
#[test]
fn internal_error_names_the_exit_and_rip() {
    let Some(end) = ended(&[0xcc, 0xf4, 0xeb, 0xfd]) else {
        return;
    };
    if on_kvm_pvm_host() {
        assert_eq!(end.code, Some(exit::VMM_ERROR), "{}", end.stderr);
        let expected = format!(
            "the VM stopped: KVM_EXIT_INTERNAL_ERROR (suberror 1) at guest RIP {TINY_KERNEL_ENTRY:#x}"
        );
        assert!(end.stderr.contains(&expected), "{}", end.stderr);
    } else {
        assert_eq!(end.code, Some(exit::GUEST_CRASH), "{}", end.stderr);
    }
}

/// The i8042 reset command (`mov al, 0xfe; out 0x64, al`) ends the VM cleanly.
#[test]
fn i8042_reset_is_a_clean_end() {
    let Some(end) = ended(&[0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd]) else {
        return;
    };
    assert_eq!(end.code, Some(exit::GUEST_SHUTDOWN), "{}", end.stderr);
    assert!(end.stderr.is_empty(), "{}", end.stderr);
}

/// Says "K", then spins (`jmp $`) or halts (`hlt; jmp`) until Kite is signalled: the vCPU
/// must be kicked out of `KVM_RUN` either way, and Kite exits with 128 + the signal.
fn signalled(tail: &[u8], signal: i32) {
    let code: Vec<u8> = SAY_K.iter().chain(tail).copied().collect();
    let Some((kite, _dir)) = run(&code, "boot=2") else {
        return;
    };
    kite.wait_for("K", DEADLINE);
    kite.signal(signal);
    let end = kite.wait_exit(DEADLINE);
    assert_eq!(end.code, Some(exit::SIGNAL_BASE + signal), "{}", end.stderr);
    assert_eq!(end.console, "K");
}

#[test]
fn sigint_stops_a_spinning_guest() {
    signalled(&[0xeb, 0xfe], libc::SIGINT);
}

#[test]
fn sigterm_stops_a_halted_guest() {
    signalled(&[0xf4, 0xeb, 0xfd], libc::SIGTERM);
}

/// A test that fails while its guest runs drops its `Kite` while unwinding: the VMM must
/// go with it, not spin on as an orphan.
#[test]
fn a_dropped_kite_does_not_outlive_its_test() {
    let code: Vec<u8> = SAY_K.iter().chain(&[0xeb, 0xfe]).copied().collect();
    let Some((kite, _dir)) = run(&code, "boot=1") else {
        return;
    };
    kite.wait_for("K", DEADLINE);
    let proc = format!("/proc/{}", kite.pid());
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _kite = kite;
        panic!("a failing check");
    }));
    assert!(unwound.is_err());
    // Dropping reaps it: its /proc entry is gone by the time drop returns.
    assert!(
        !std::path::Path::new(&proc).exists(),
        "kite still runs after its test failed"
    );
}
