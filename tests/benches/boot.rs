//! Boot benchmark: the default guest's kernel and initramfs booted with Kite and with QEMU
//! `-M microvm` (the baseline), alternating, N times each; prints the time to
//! `Run /init as init process` and each VMM's resident memory at that moment, with ratios.
//!
//! `cargo build --release -p vmm && cargo bench -p kite-tests --bench boot`
//! (`KITE_BENCH_BOOTS` sets N, default 3; needs qemu-system-x86: `scripts/install-deps bench`).

use std::process::Command;
use std::time::{Duration, Instant};

use kite_tests::stats::Samples;
use kite_tests::{default_guest_file, kite_binary, kvm_available, qemu_available, Kite};

const INIT_LINE: &str = "Run /init as init process";
const BOOT_DEADLINE: Duration = Duration::from_secs(15 * 60);
const MEMORY_MIB: u32 = 512;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Vmm {
    Kite,
    Qemu,
}

struct Sample {
    seconds: f64,
    rss_mib: f64,
}

/// Resident memory of process `pid`, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn command(vmm: Vmm, kernel: &str, initramfs: &str, cmdline: &str) -> Command {
    match vmm {
        Vmm::Kite => {
            let mut c = Command::new(kite_binary());
            c.args(["run", "--kernel", kernel, "--initramfs", initramfs])
                .args(["--cmdline", cmdline])
                .arg("--memory")
                .arg(format!("size={MEMORY_MIB}M"));
            c
        }
        Vmm::Qemu => {
            let mut c = Command::new("qemu-system-x86_64");
            c.args(["-M", "microvm,x-option-roms=off,rtc=off", "-enable-kvm"])
                // cx16 (cmpxchg16b) cannot be emulated in guest kernel mode on kvm_pvm hosts;
                // their KVM refuses QEMU's IA32_ARCH_CAPABILITIES value (QEMU aborts).
                .args(["-cpu", "host,-cx16,-arch-capabilities", "-smp", "1"])
                .arg("-m")
                .arg(format!("{MEMORY_MIB}M"))
                .args(["-nodefaults", "-no-user-config", "-display", "none"])
                .args(["-serial", "stdio", "-no-reboot"])
                .args(["-kernel", kernel, "-initrd", initramfs, "-append", cmdline]);
            c
        }
    }
}

fn boot_once(vmm: Vmm, kernel: &str, initramfs: &str, cmdline: &str) -> Sample {
    let start = Instant::now();
    let guest = Kite::spawn(command(vmm, kernel, initramfs, cmdline));
    guest.wait_for(INIT_LINE, BOOT_DEADLINE);
    let seconds = start.elapsed().as_secs_f64();
    let rss_mib = rss_mib(guest.pid());
    guest.signal(libc::SIGKILL);
    guest.wait_exit(Duration::from_secs(60));
    Sample { seconds, rss_mib }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !kvm_available() {
        return;
    }
    let (Some(kernel), Some(initramfs)) = (
        default_guest_file("vmlinux"),
        default_guest_file("initramfs.cpio"),
    ) else {
        return;
    };
    if !qemu_available() {
        eprintln!("SKIPPED: qemu-system-x86_64 is missing (scripts/install-deps bench)");
        return;
    }
    let runs: usize = std::env::var("KITE_BENCH_BOOTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let (kernel, initramfs) = (kernel.to_str().unwrap(), initramfs.to_str().unwrap());
    let cmdline = vmm::cli::default_cmdline();
    println!("boot to {INIT_LINE:?}: {runs} runs each, alternating; {MEMORY_MIB} MiB, 1 vCPU");
    println!("kernel {kernel}\ninitramfs {initramfs}\ncmdline {cmdline}\n");
    let mut samples: Vec<(Vmm, Sample)> = Vec::new();
    for round in 0..runs {
        // Alternate which VMM goes first, so drift in the machine's speed hits both.
        let order = if round % 2 == 0 {
            [Vmm::Kite, Vmm::Qemu]
        } else {
            [Vmm::Qemu, Vmm::Kite]
        };
        for vmm in order {
            let s = boot_once(vmm, kernel, initramfs, &cmdline);
            println!(
                "round {round} {vmm:?}: {:.1} s to Run /init, RSS {:.1} MiB",
                s.seconds, s.rss_mib
            );
            samples.push((vmm, s));
        }
    }
    let pick = |vmm: Vmm, f: fn(&Sample) -> f64| {
        Samples(
            samples
                .iter()
                .filter(|(v, _)| *v == vmm)
                .map(|(_, s)| f(s))
                .collect(),
        )
        .median()
    };
    let (kt, qt) = (
        pick(Vmm::Kite, |s| s.seconds),
        pick(Vmm::Qemu, |s| s.seconds),
    );
    let (kr, qr) = (
        pick(Vmm::Kite, |s| s.rss_mib),
        pick(Vmm::Qemu, |s| s.rss_mib),
    );
    println!(
        "\n{:<34}{:>10}{:>14}{:>12}",
        "median", "kite", "qemu microvm", "kite/qemu"
    );
    println!(
        "{:<34}{kt:>10.1}{qt:>14.1}{:>12.2}",
        "time to Run /init (s)",
        kt / qt
    );
    println!(
        "{:<34}{kr:>10.1}{qr:>14.1}{:>12.2}",
        "VMM RSS at Run /init (MiB)",
        kr / qr
    );
    println!("target: kite/qemu <= 1.0");
}
