//! Linux guests booted with `kite run`, checked on the guest kernel's console.
//!
//! Boots are slow on hosts whose KVM emulates guest kernel code (one to two minutes), so the
//! checks of the default guest share one boot, and every wait has a deadline of minutes.
//! On hosts where a stock kernel cannot run user space (kvm_pvm) the guest's init cannot
//! run: the kernel panics after `Run /init`, and Kite reports that with its exit code.

use std::sync::OnceLock;
use std::time::Duration;

use kite_tests::{default_guest_file, kvm_available, Ended, Kite};
use vmm::cli::{default_cmdline, exit, on_kvm_pvm_host};

/// Longest a boot to `Run /init` may take.
const BOOT_DEADLINE: Duration = Duration::from_secs(15 * 60);
/// Longest Kite may take to exit once asked.
const EXIT_DEADLINE: Duration = Duration::from_secs(60);
const MEMORY_MIB: u64 = 768;

/// Sectors of each test disk (32 MiB).
const DISK_SECTORS: u64 = 65536;

/// A raw disk with an MBR partition table of two Linux partitions.
fn partitioned_disk(path: &std::path::Path) {
    let mut image = vec![0u8; (DISK_SECTORS * 512) as usize];
    for (i, (start, count)) in [(2048u32, 16384u32), (18432, 32768)]
        .into_iter()
        .enumerate()
    {
        let entry = &mut image[446 + 16 * i..462 + 16 * i];
        entry[4] = 0x83; // Linux
        entry[8..12].copy_from_slice(&start.to_le_bytes());
        entry[12..16].copy_from_slice(&count.to_le_bytes());
    }
    image[510..512].copy_from_slice(&[0x55, 0xaa]);
    std::fs::write(path, image).unwrap();
}

/// The shared boot of the default guest: 2 vCPUs, 768 MiB, two disks (the second
/// read-only) and an entropy device. `None` where it cannot boot.
fn default_boot() -> Option<&'static Ended> {
    static BOOT: OnceLock<Option<Ended>> = OnceLock::new();
    BOOT.get_or_init(|| {
        if !kvm_available() {
            return None;
        }
        default_guest_file("vmlinux")?;
        let dir = tempfile::tempdir().unwrap();
        let (vda, vdb) = (dir.path().join("vda.img"), dir.path().join("vdb.img"));
        partitioned_disk(&vda);
        partitioned_disk(&vdb);
        let memory = format!("size={MEMORY_MIB}M");
        let vda = format!("path={}", vda.display());
        let vdb = format!("path={},readonly=on", vdb.display());
        let kite = Kite::start(&[
            "run", "--cpus", "boot=2", "--memory", &memory, "--disk", &vda, "--disk", &vdb, "--rng",
        ]);
        kite.wait_for("Run /init as init process", BOOT_DEADLINE);
        Some(kite.wait_exit(EXIT_DEADLINE))
    })
    .as_ref()
}

fn console_line<'a>(console: &'a str, prefix: &str) -> &'a str {
    console
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line on the console:\n{console}"))
}

#[test]
fn default_guest_gets_the_default_command_line_and_its_devices() {
    let Some(boot) = default_boot() else { return };
    let devices = " virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 \
                   virtio_mmio.device=4K@0xd0002000:7";
    assert_eq!(
        console_line(&boot.console, "Command line: "),
        format!("{}{devices}", default_cmdline())
    );
}

/// The guest kernel's own virtio-blk driver finds each disk with its size and reads its
/// partition table through Kite's virtio-blk; its virtio-rng driver feeds the kernel's
/// random pool.
#[test]
fn default_guest_reads_its_disks_and_entropy() {
    let Some(boot) = default_boot() else { return };
    for disk in ["vda", "vdb"] {
        let size = format!("[{disk}] {DISK_SECTORS} 512-byte logical blocks");
        assert!(boot.console.contains(&size), "{size}:\n{}", boot.console);
        let partitions = format!(" {disk}: {disk}1 {disk}2");
        assert!(
            boot.console.lines().any(|l| l == partitions),
            "{partitions}:\n{}",
            boot.console
        );
    }
    assert!(
        boot.console.contains("random: crng init done"),
        "{}",
        boot.console
    );
}

#[test]
fn default_guest_brings_up_both_cpus() {
    let Some(boot) = default_boot() else { return };
    assert!(
        boot.console.contains("smp: Brought up 1 node, 2 CPUs"),
        "{}",
        boot.console
    );
}

#[test]
fn default_guest_sees_the_configured_memory() {
    let Some(boot) = default_boot() else { return };
    // "Memory: 770024K/785916K available (...)": the second number is the RAM the kernel
    // found, the configured size less the legacy hole below 1 MiB.
    let line = console_line(&boot.console, "Memory: ");
    let total_kib: u64 = line
        .split_once('/')
        .and_then(|(_, rest)| rest.split_once('K'))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected Memory line {line:?}"));
    let configured_kib = MEMORY_MIB << 10;
    assert!(
        (configured_kib - 1024..=configured_kib).contains(&total_kib),
        "the kernel found {total_kib} KiB for --memory size={MEMORY_MIB}M"
    );
}

#[test]
fn default_guest_runs_init_and_kite_reports_how_it_ended() {
    let Some(boot) = default_boot() else { return };
    assert!(boot.console.contains("Run /init as init process"));
    if on_kvm_pvm_host() {
        // The initramfs' /init cannot run here: the kernel panics, Kite says so.
        assert_eq!(boot.code, Some(exit::GUEST_CRASH), "{}", boot.stderr);
        assert!(
            boot.stderr.contains("the guest kernel panicked"),
            "{}",
            boot.stderr
        );
    } else {
        // /init prints its marker and reboots: a clean end.
        assert!(
            boot.console.contains("kite-guest: ready"),
            "{}",
            boot.console
        );
        assert_eq!(boot.code, Some(exit::GUEST_SHUTDOWN), "{}", boot.stderr);
    }
}

/// The same kernel through its 64-bit entry (the Linux boot protocol and zero page): the
/// ELF notes, PVH's among them, are stripped from a copy. No initramfs: the kernel finds no
/// root file system and panics, which Kite reports as a guest crash.
#[test]
fn elf_kernel_without_pvh_boots_through_the_64_bit_entry() {
    if !kvm_available() {
        return;
    }
    let Some(vmlinux) = default_guest_file("vmlinux") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let stripped = dir.path().join("vmlinux-no-pvh");
    let status = std::process::Command::new("objcopy")
        .arg("--remove-section=.notes")
        .arg(&vmlinux)
        .arg(&stripped)
        .status()
        .expect("objcopy (binutils) runs");
    assert!(status.success());
    let cmdline = format!("{} kite.test=elf64", default_cmdline());
    let kite = Kite::start(&[
        "-v",
        "run",
        "--kernel",
        stripped.to_str().unwrap(),
        "--cmdline",
        &cmdline,
        "--memory",
        "size=256M",
    ]);
    kite.wait_for(&format!("Command line: {cmdline}"), BOOT_DEADLINE);
    let ended = kite.wait_exit(BOOT_DEADLINE);
    assert!(
        ended.stderr.contains("kernel entry: Linux64"),
        "{}",
        ended.stderr
    );
    assert!(
        ended
            .console
            .contains("Kernel panic - not syncing: VFS: Unable to mount root fs"),
        "{}",
        ended.console
    );
    assert_eq!(ended.code, Some(exit::GUEST_CRASH), "{}", ended.stderr);
    assert!(ended.stderr.contains("the guest kernel panicked"));
}

/// The bzImage of the same kernel boots (its decompressor runs first), and SIGTERM ends
/// Kite cleanly with 128 + SIGTERM.
#[test]
fn bzimage_boots_and_sigterm_ends_kite() {
    if !kvm_available() {
        return;
    }
    let Some(bzimage) = default_guest_file("bzImage") else {
        return;
    };
    let cmdline = format!("{} kite.test=bzimage", default_cmdline());
    let kite = Kite::start(&[
        "-v",
        "run",
        "--kernel",
        bzimage.to_str().unwrap(),
        "--cmdline",
        &cmdline,
    ]);
    kite.wait_for(&format!("Command line: {cmdline}"), BOOT_DEADLINE);
    kite.signal(libc::SIGTERM);
    let ended = kite.wait_exit(EXIT_DEADLINE);
    assert_eq!(
        ended.code,
        Some(exit::SIGNAL_BASE + libc::SIGTERM),
        "{}",
        ended.stderr
    );
    assert!(
        ended.stderr.contains("kernel entry: Linux64"),
        "{}",
        ended.stderr
    );
}
