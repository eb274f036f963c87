//! The test guest (tests/guest/, built by build.rs with gcc and ld) drives Kite's virtio
//! devices from ring 3, where it runs natively even where guest kernel code is emulated:
//! fast, deep checks, each a separate guest selected by `kite.test=` on its command line,
//! reporting pass or fail on Kite's exit port.

use std::path::Path;
use std::time::Duration;

use kite_tests::{kvm_available, Ended, Kite};
use vmm::cli::exit;

const GUEST: &str = env!("KITE_TEST_GUEST");
const DEADLINE: Duration = Duration::from_secs(120);

/// Runs scenario `test` with `extra` arguments; `None` without KVM.
fn run(test: &str, extra: &[&str]) -> Option<Ended> {
    if !kvm_available() {
        return None;
    }
    let cmdline = format!("kite.test={test}");
    let mut args = vec!["run", "--kernel", GUEST, "--cmdline", &cmdline];
    args.extend_from_slice(extra);
    Some(Kite::start(&args).wait_exit(DEADLINE))
}

fn passed(end: &Ended) {
    assert!(
        end.console.contains("kite-test: PASS"),
        "{}\n{}",
        end.console,
        end.stderr
    );
    assert_eq!(end.code, Some(exit::GUEST_SHUTDOWN), "{}", end.stderr);
}

fn image(path: &Path, bytes: usize, fill: impl Fn(usize) -> u8) {
    std::fs::write(path, (0..bytes).map(fill).collect::<Vec<u8>>()).unwrap();
}

/// The guest's pattern for byte `off` of disk `disk` (see guest.c).
fn pattern(disk: u64, off: u64) -> u8 {
    ((off >> 9) * 131 + off * 7 + disk * 61) as u8
}

fn disk_arg(path: &Path, readonly: bool) -> String {
    let ro = if readonly { ",readonly=on" } else { "" };
    format!("path={}{ro}", path.display())
}

#[test]
fn blk_pattern_round_trip_reaches_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("vda.img");
    image(&disk, 8 << 20, |_| 0);
    let Some(end) = run("blk-pattern", &["--disk", &disk_arg(&disk, false)]) else {
        return;
    };
    passed(&end);
    let bytes = std::fs::read(&disk).unwrap();
    for (off, b) in bytes[..4 << 20].iter().enumerate() {
        assert_eq!(*b, pattern(0, off as u64), "byte {off} of the disk file");
    }
    assert!(
        bytes[4 << 20..].iter().all(|b| *b == 0),
        "nothing written beyond"
    );
}

#[test]
fn two_disks_each_get_their_own_pattern() {
    let dir = tempfile::tempdir().unwrap();
    let (vda, vdb) = (dir.path().join("vda.img"), dir.path().join("vdb.img"));
    image(&vda, 2 << 20, |_| 0);
    image(&vdb, 2 << 20, |_| 0);
    let (a, b) = (disk_arg(&vda, false), disk_arg(&vdb, false));
    let Some(end) = run("blk-two", &["--disk", &a, "--disk", &b]) else {
        return;
    };
    passed(&end);
    for (disk, path) in [(0, &vda), (1, &vdb)] {
        let bytes = std::fs::read(path).unwrap();
        for (off, byte) in bytes[..1 << 20].iter().enumerate() {
            assert_eq!(*byte, pattern(disk, off as u64), "disk {disk} byte {off}");
        }
    }
}

#[test]
fn checksum_of_a_host_prepared_image() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("image.img");
    // Not a whole number of 64 KiB chunks, and bytes the guest cannot guess.
    let size = (3 << 20) + 5 * 512;
    image(&disk, size, |i| {
        (i as u64)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(17) as u8
    });
    let expected = std::fs::read(&disk)
        .unwrap()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
        });
    let Some(end) = run("blk-checksum", &["--disk", &disk_arg(&disk, true)]) else {
        return;
    };
    passed(&end);
    assert!(
        end.console
            .contains(&format!("kite-test: checksum={expected:016x}")),
        "{}",
        end.console
    );
}

#[test]
fn read_only_disk_refuses_the_guest_write() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("ro.img");
    image(&disk, 1 << 20, |_| 0x11);
    let Some(end) = run("blk-readonly", &["--disk", &disk_arg(&disk, true)]) else {
        return;
    };
    passed(&end);
    assert!(std::fs::read(&disk).unwrap().iter().all(|b| *b == 0x11));
}

#[test]
fn rng_gives_random_bytes() {
    let Some(end) = run("rng", &["--rng"]) else {
        return;
    };
    passed(&end);
}

/// Every malformed request of guest.c's `hostile`, each followed by a valid read that must
/// see the disk's data; a device that needs a reset is reset and set up again.
#[test]
fn hostile_guest_cannot_break_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("vda.img");
    image(&disk, 1 << 20, |_| 0x5a);
    let Some(end) = run("hostile", &["--disk", &disk_arg(&disk, false)]) else {
        return;
    };
    passed(&end);
    for case in [
        "a descriptor loop",
        "an address outside guest memory",
        "a 4 GiB length",
        "wrong descriptor directions",
        "a next index beyond the queue",
        "a chain longer than the queue",
        "a queue size that is not a power of two",
        "rings outside guest memory",
        "a corrupt available index",
    ] {
        assert!(
            end.console.contains(&format!("kite-test: survived {case}")),
            "{case}:\n{}",
            end.console
        );
    }
    assert!(
        std::fs::read(&disk).unwrap().iter().all(|b| *b == 0x5a),
        "no write landed"
    );
}

#[test]
fn a_failing_guest_check_is_reported_with_its_exit_code() {
    let Some(end) = run("no-such-test", &[]) else {
        return;
    };
    assert!(end.console.contains("kite-test: FAIL"), "{}", end.console);
    assert_eq!(end.code, Some(exit::GUEST_FAILURE), "{}", end.stderr);
    assert!(end
        .stderr
        .contains("the guest reported failure 1 on the exit port"));
}

#[test]
fn a_guest_writing_to_unplugged_memory_is_stopped() {
    let Some(end) = run(
        "touch-unplugged",
        &["--memory", "size=256M,hotplug_size=512M"],
    ) else {
        return;
    };
    assert!(
        end.console
            .contains("kite-test: writing to unplugged memory"),
        "{}\n{}",
        end.console,
        end.stderr
    );
    assert!(!end.console.contains("kite-test: FAIL"), "{}", end.console);
    assert_eq!(end.code, Some(exit::GUEST_CRASH), "{}", end.stderr);
    assert!(
        end.stderr.contains("not guest memory") || end.stderr.contains("does not have"),
        "{}",
        end.stderr
    );
}

/// guest.c's `hostile-hotplug`: virtio-mem requests a driver gets wrong, and virtio-blk
/// and virtio-rng rings and buffers in hotplugged blocks that are then unplugged —
/// among them an available ring whose entries lie in an unplugged block, which made the
/// device thread spin forever (and the VMM unkillable) before.
#[test]
fn hostile_guest_with_hotplugged_memory_cannot_break_the_devices() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("vda.img");
    image(&disk, 1 << 20, |_| 0x5a);
    let Some(end) = run(
        "hostile-hotplug",
        &[
            "--memory",
            "size=256M,hotplug_size=128M,hotplugged_size=4M",
            "--disk",
            &disk_arg(&disk, false),
            "--rng",
        ],
    ) else {
        return;
    };
    passed(&end);
    for line in [
        "survived hostile virtio-mem requests",
        "survived buffers in an unplugged block",
        "survived an available ring reaching into an unplugged block",
        "survived rings and buffers in unplugged memory",
    ] {
        assert!(
            end.console.contains(&format!("kite-test: {line}")),
            "{line}:\n{}",
            end.console
        );
    }
    let data = std::fs::read(&disk).unwrap();
    assert!(
        data.iter().all(|b| *b == 0x5a),
        "no write from unplugged memory landed"
    );
    let warnings = end.stderr.lines().filter(|l| l.contains("WARN")).count();
    assert!(
        warnings <= 10,
        "a few warnings, not a flood:\n{}",
        end.stderr
    );
}

#[test]
fn a_guest_writing_to_memory_it_unplugged_is_stopped() {
    let Some(end) = run(
        "touch-after-unplug",
        &["--memory", "size=256M,hotplug_size=128M,hotplugged_size=2M"],
    ) else {
        return;
    };
    assert!(
        end.console
            .contains("kite-test: writing to memory unplugged after use"),
        "{}\n{}",
        end.console,
        end.stderr
    );
    assert!(!end.console.contains("kite-test: FAIL"), "{}", end.console);
    assert_eq!(end.code, Some(exit::GUEST_CRASH), "{}", end.stderr);
}

/// The gid of the `kvm` group, if `/dev/kvm` is open to it (`scripts/install-deps kvm`).
fn kvm_group() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    let gid = groups.lines().find_map(|l| {
        let mut fields = l.split(':');
        (fields.next() == Some("kvm")).then(|| fields.nth(1)?.parse::<u32>().ok())?
    })?;
    let kvm = std::fs::metadata("/dev/kvm").ok()?;
    (kvm.gid() == gid && kvm.mode() & 0o060 == 0o060).then_some(gid)
}

/// Kite needs no root: a user in the kvm group boots the test guest with a disk, an rng,
/// hotplug memory and the control socket, confined as always. Lazy hotplug memory, whose
/// fault handler must serve KVM's own accesses, is refused with a clear message.
#[test]
fn a_user_in_the_kvm_group_boots_the_test_guest() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    const NOBODY: u32 = 65534;
    if !kvm_available() {
        return;
    }
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let Some(kvm) = kvm_group().filter(|_| root) else {
        eprintln!(
            "SKIPPED: needs root and /dev/kvm open to a kvm group (scripts/install-deps kvm)"
        );
        kite_tests::no_skips_wanted("not root, or no kvm group");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let disk = dir.path().join("vda.img");
    image(&disk, 8 << 20, |_| 0);
    std::os::unix::fs::chown(&disk, Some(NOBODY), Some(kvm)).unwrap();
    let socket = dir.path().join("api.sock");
    let run = |memory: &str| {
        let mut command = std::process::Command::new(kite_tests::kite_binary());
        command
            .args([
                "run",
                "--kernel",
                GUEST,
                "--cmdline",
                "kite.test=blk-pattern",
            ])
            .args([
                "--disk",
                &disk_arg(&disk, false),
                "--rng",
                "--memory",
                memory,
            ])
            .arg("--api-socket")
            .arg(&socket)
            .uid(NOBODY)
            .gid(kvm);
        Kite::spawn(command).wait_exit(DEADLINE)
    };
    let end = run("size=256M,hotplug_size=128M,hotplugged_size=2M");
    passed(&end);
    assert_eq!(std::fs::read(&disk).unwrap()[1], pattern(0, 1));

    let end = run("size=256M,hotplug_size=128M,hotplug_backing=lazy");
    let unprivileged_uffd = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .is_ok_and(|v| v.trim() == "1");
    if unprivileged_uffd {
        passed(&end);
    } else {
        assert_eq!(end.code, Some(exit::VMM_ERROR), "{}", end.stderr);
        assert!(
            end.stderr.contains("vm.unprivileged_userfaultfd"),
            "{}",
            end.stderr
        );
    }
}
