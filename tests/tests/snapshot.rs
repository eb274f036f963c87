//! Snapshot, restore and clones (issue 15) with the test guest's `snapshot` scenario
//! (guest.c): the guest fills 32 MiB of boot RAM with a seeded pattern, follows the
//! virtio-mem requested size with a pattern in every block it plugs, and does a
//! virtio-blk round trip on every pass; once the whole hotplug area is requested and
//! plugged it checks all of that memory and passes. A snapshot taken while it runs at
//! 4 MiB plugged, restored in a new process that is then asked for 8 MiB and for the whole
//! area, must pass the same way: everything the guest wrote before the snapshot is
//! checked after the restore, next to what it wrote since.
//!
//! The snapshot interface these tests are written against, and the helpers they share
//! with `snapshot_errors.rs`: `kite_tests::snapshot`.

use std::path::{Path, PathBuf};

use kite_tests::snapshot::{
    boot, hash_tree, last_passes, running, snapshot_of, start_restore, steady, take_snapshot,
    Snapshot, Vm, AFTER, AREA, BEFORE, BOOT, DEADLINE, DISK_BYTES, GUEST, MEMORY,
};
use kite_tests::{api_ok, kvm_available, resize, scratch_disk, wait_plugged, Ended, Kite};
use vmm::cli::exit;

/// Asks the guest for [`AFTER`], waits until it has plugged it and settled there, then asks
/// for the whole area and waits for the VM to end: the guest must have checked all its
/// memory and passed. `mark`: where the console was when `vm` was handed over.
fn drive_to_pass(vm: Vm, mark: usize) -> Ended {
    let Vm { kite, socket } = vm;
    resize(&socket, BOOT + AFTER);
    wait_plugged(&socket, AFTER, DEADLINE);
    kite.wait_for_since(mark, &steady(AFTER >> 20), DEADLINE);
    resize(&socket, BOOT + AREA);
    let end = kite.wait_exit(DEADLINE);
    passed(&end);
    end
}

fn passed(end: &Ended) {
    let verified = format!("kite-test: snapshot verified plugged_mib={} ", AREA >> 20);
    assert!(
        end.console.contains(&verified) && end.console.contains("kite-test: PASS"),
        "{}\n{}",
        end.console,
        end.stderr
    );
    assert_eq!(end.code, Some(exit::GUEST_SHUTDOWN), "{}", end.stderr);
}

/// The scenario's own protocol, without a snapshot: boot at 4 MiB plugged, settle, 8 MiB,
/// then the whole area, then PASS. What the snapshot tests do around a snapshot.
#[test]
fn the_snapshot_scenario_passes_without_a_snapshot() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = scratch_disk(dir.path(), DISK_BYTES);
    let vm = boot(dir.path(), &disk, "");
    let end = drive_to_pass(vm, 0);
    assert!(
        last_passes(&end.console) > 64,
        "settled twice at least: {}",
        end.console
    );
}

/// The scenario's checks can fail: a guest that flips one bit of its boot-RAM pattern
/// (`kite.flip=boot-ram`, once the requested size grows), as a restore that lost a write
/// would, fails on the next pass.
#[test]
fn a_changed_word_fails_the_snapshot_scenario() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = scratch_disk(dir.path(), DISK_BYTES);
    let Vm { kite, socket } = boot(dir.path(), &disk, "kite.flip=boot-ram");
    resize(&socket, BOOT + AFTER);
    let end = kite.wait_exit(DEADLINE);
    assert!(
        end.console
            .contains("kite-test: snapshot flipped a boot-RAM bit")
            && end
                .console
                .contains("kite-test: check failed: boot RAM keeps its pattern"),
        "{}\n{}",
        end.console,
        end.stderr
    );
    assert!(!end.console.contains("verified"), "{}", end.console);
    assert_eq!(end.code, Some(exit::GUEST_FAILURE), "{}", end.stderr);
}

/// Drives a restored VM to PASS; checks that the guest went on from the snapshot rather
/// than booting again.
fn restored_passes(vm: Vm, snapshot: &Snapshot) {
    let end = drive_to_pass(vm, 0);
    for line in ["kite-test: guest up", "kite-test: snapshot ready"] {
        assert!(
            !end.console.contains(line),
            "the restored guest booted again:\n{}",
            end.console
        );
    }
    assert!(
        last_passes(&end.console) > snapshot.passes,
        "the restored guest counts on from pass {}:\n{}",
        snapshot.passes,
        end.console
    );
}

/// Boot, settle at 4 MiB, snapshot, shut down; restore in a new process with memory
/// `mode` and its own copy of the disk; 8 MiB, then the whole area: PASS, with every word
/// the guest wrote before the snapshot checked. The snapshot's files are unchanged.
fn snapshot_then_restore(mode: &str) {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snapshot = snapshot_of(dir.path());
    // Clones need their own writable disks.
    let disk = dir.path().join("restored.img");
    std::fs::copy(&snapshot.disk, &disk).unwrap();
    let socket = dir.path().join("restored.sock");
    let vm = running(start_restore(&snapshot.dir, mode, &disk, &socket));
    restored_passes(vm, &snapshot);
    assert_eq!(
        hash_tree(&snapshot.dir),
        snapshot.hashes,
        "the restore changed the snapshot"
    );
}

/// The memory mode of [`three_clones_at_once`]: the clones map the snapshot's memory
/// file privately, so one clone writing to the file would show in the others and in the
/// hashes.
const CLONE_MODE: &str = "private";

/// One snapshot, three restores started at once, each with its own disk and socket, each
/// driven to PASS on its own thread; the snapshot's files are unchanged.
fn three_clones_at_once() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snapshot = snapshot_of(dir.path());
    let disks: Vec<(PathBuf, PathBuf)> = (0..3)
        .map(|i| {
            let disk = dir.path().join(format!("clone{i}.img"));
            std::fs::copy(&snapshot.disk, &disk).unwrap();
            (disk, dir.path().join(format!("clone{i}.sock")))
        })
        .collect();
    // All three started before any is waited for.
    let clones: Vec<Vm> = disks
        .iter()
        .map(|(disk, socket)| start_restore(&snapshot.dir, CLONE_MODE, disk, socket))
        .collect();
    std::thread::scope(|s| {
        for vm in clones {
            let snapshot = &snapshot;
            s.spawn(move || restored_passes(running(vm), snapshot));
        }
    });
    assert_eq!(
        hash_tree(&snapshot.dir),
        snapshot.hashes,
        "the clones changed the snapshot"
    );
}

#[test]
fn restore_with_lazy_memory() {
    snapshot_then_restore("lazy");
}

#[test]
fn restore_with_private_memory() {
    snapshot_then_restore("private");
}

#[test]
fn restore_with_eager_memory() {
    snapshot_then_restore("eager");
}

#[test]
fn three_clones_of_one_snapshot() {
    three_clones_at_once();
}

/// A snapshot of a running VM (`kite remote snapshot`): the VM is paused for it and runs
/// on unharmed — the guest goes on to pass its checks.
#[test]
fn a_running_vm_is_paused_for_its_snapshot_and_runs_on() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = scratch_disk(dir.path(), DISK_BYTES);
    let vm = boot(dir.path(), &disk, "");
    let snapshot = dir.path().join("snapshot");
    let out = std::process::Command::new(kite_tests::kite_binary())
        .args(["remote", "--api-socket", vm.socket.to_str().unwrap()])
        .arg("snapshot")
        .arg(&snapshot)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(snapshot.join("state.json").is_file() && snapshot.join("memory").is_file());
    assert_eq!(
        api_ok(&vm.socket, "GET", "vm.info", None)["state"],
        "Running"
    );
    let mark = vm.kite.mark();
    vm.kite
        .wait_for_since(mark, &steady(BEFORE >> 20), DEADLINE);
    drive_to_pass(vm, mark);
}

/// `kite serve` and `vm.restore` (`kite remote restore`): the VM comes back paused, and
/// runs from where it was on `vm.resume`.
#[test]
fn a_vm_restored_through_the_api_waits_for_resume() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snapshot = snapshot_of(dir.path());
    // The restored VM's disk is the snapshot's path: the disk as it was then goes there.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(snapshot.dir.join("state.json")).unwrap())
            .unwrap();
    let recorded = config["state"]["config"]["disks"][0]["path"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::copy(&snapshot.disk, &recorded).unwrap();
    let socket = dir.path().join("serve.sock");
    let mut kite = Kite::start(&["serve", "--api-socket", socket.to_str().unwrap()]);
    kite.wait_for_socket(&socket, DEADLINE);
    let out = std::process::Command::new(kite_tests::kite_binary())
        .args([
            "remote",
            "--api-socket",
            socket.to_str().unwrap(),
            "restore",
        ])
        .arg(&snapshot.dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(api_ok(&socket, "GET", "vm.info", None)["state"], "Paused");
    api_ok(&socket, "PUT", "vm.resume", None);
    assert_eq!(api_ok(&socket, "GET", "vm.info", None)["state"], "Running");
    restored_passes(Vm { kite, socket }, &snapshot);
}

/// The CI way: `kite run ... --until-console TEXT --snapshot-to DIR` boots, snapshots
/// once the console shows TEXT, and exits 0; a restore goes on from there.
#[test]
fn a_guest_booted_until_its_console_says_ready_is_snapshotted_and_restored() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = scratch_disk(dir.path(), DISK_BYTES);
    let snapshot = dir.path().join("ready");
    let disk_arg = format!("path={}", disk.display());
    let run = |snapshot: &Path| {
        Kite::start(&[
            "run",
            "--kernel",
            GUEST,
            "--cmdline",
            "kite.test=snapshot",
            "--memory",
            MEMORY,
            "--disk",
            &disk_arg,
            "--until-console",
            // Once the memory asked for at boot is plugged: a snapshot is refused while
            // a resize is under way.
            "kite-test: snapshot steady plugged_mib=4",
            "--snapshot-to",
            snapshot.to_str().unwrap(),
        ])
        .wait_exit(DEADLINE)
    };
    let end = run(&snapshot);
    assert_eq!(end.code, Some(exit::GUEST_SHUTDOWN), "{}", end.stderr);
    assert_eq!(
        end.console.matches("steady").count(),
        1,
        "stopped at once: {}",
        end.console
    );
    // A directory that exists is refused before anything boots.
    let again = run(&snapshot);
    assert_eq!(again.code, Some(exit::BAD_ARGUMENTS), "{}", again.stderr);
    assert!(again.stderr.contains("exists already"), "{}", again.stderr);
    assert!(again.console.is_empty(), "{}", again.console);

    let socket = dir.path().join("restored.sock");
    let vm = running(start_restore(&snapshot, "lazy", &disk, &socket));
    let end = drive_to_pass(vm, 0);
    assert!(
        !end.console.contains("snapshot ready"),
        "went on: {}",
        end.console
    );
}

/// Snapshot, restore in a new process, resize, again: `KITE_SNAPSHOT_CYCLES` times (20 by
/// default; 100 for the long run), each restore in the next memory mode, the guest under
/// hotplug and disk load throughout, the plugged size changing between snapshots. At the
/// end the guest checks everything it ever wrote; it booted once.
#[test]
fn snapshot_restore_cycles_under_hotplug_load() {
    if !kvm_available() {
        return;
    }
    let cycles: usize = std::env::var("KITE_SNAPSHOT_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let mut disk = scratch_disk(dir.path(), DISK_BYTES);
    let mut vm = boot(dir.path(), &disk, "");
    let mut consoles = String::new();
    for cycle in 0..cycles {
        let snapshot = dir.path().join(format!("snapshot{cycle}"));
        api_ok(&vm.socket, "PUT", "vm.pause", None);
        take_snapshot(&vm.socket, &snapshot);
        // The disk as it was at the snapshot goes with it (see `snapshot_of`), into the
        // file the VM before this one used.
        let next_disk = dir.path().join(format!("disk{}.img", cycle % 2));
        std::fs::copy(&disk, &next_disk).unwrap();
        api_ok(&vm.socket, "PUT", "vmm.shutdown", None);
        let end = vm.kite.wait_exit(DEADLINE);
        assert_eq!(
            end.code,
            Some(exit::GUEST_SHUTDOWN),
            "cycle {cycle}: {}",
            end.stderr
        );
        assert!(
            !end.console.contains("FAIL"),
            "cycle {cycle}: {}",
            end.console
        );
        consoles.push_str(&end.console);
        disk = next_disk;
        let mode = ["lazy", "private", "eager"][cycle % 3];
        let socket = dir.path().join(format!("cycle{cycle}.sock"));
        vm = running(start_restore(&snapshot, mode, &disk, &socket));
        // Another size each cycle: 8, 12, 16, 20, 16, 12, 8, ... MiB.
        let step = (cycle % 6) as u64;
        let plugged = BEFORE * (2 + if step < 4 { step } else { 6 - step });
        resize(&vm.socket, BOOT + plugged);
        wait_plugged(&vm.socket, plugged, DEADLINE);
        // Two progress lines at that size: the first is complete.
        for _ in 0..2 {
            let mark = vm.kite.mark();
            vm.kite
                .wait_for_since(mark, &steady(plugged >> 20), DEADLINE);
        }
        std::fs::remove_dir_all(&snapshot).unwrap();
    }
    let Vm { kite, socket } = vm;
    resize(&socket, BOOT + AREA);
    let end = kite.wait_exit(DEADLINE);
    passed(&end);
    consoles.push_str(&end.console);
    assert_eq!(
        consoles.matches("kite-test: guest up").count(),
        1,
        "{consoles}"
    );
}

/// `--until-console` with a guest that ends before it prints the text: no snapshot, and
/// an exit a CI job cannot take for one.
#[test]
fn a_guest_that_ends_before_its_console_says_ready_is_no_snapshot() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("never");
    let end = Kite::start(&[
        "run",
        "--kernel",
        GUEST,
        "--cmdline",
        "kite.test=rng",
        "--rng",
        "--until-console",
        "a line the guest never prints",
        "--snapshot-to",
        snapshot.to_str().unwrap(),
    ])
    .wait_exit(DEADLINE);
    assert!(end.console.contains("kite-test: PASS"), "{}", end.console);
    assert_eq!(end.code, Some(exit::VMM_ERROR), "{}", end.stderr);
    assert!(
        end.stderr.contains("no snapshot was written"),
        "{}",
        end.stderr
    );
    assert!(!snapshot.exists());
}

/// `--memory ...,thp=on` advises transparent huge pages for guest memory (throughput);
/// `thp=off`, as the default, keeps it in 4 KiB pages (density). Seen in the kite
/// process's smaps: huge pages back the 32 MiB the guest wrote, or none do.
#[test]
fn huge_pages_for_guest_memory_are_a_choice() {
    if !kvm_available() {
        return;
    }
    let thp_enabled = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|mode| !mode.contains("[never]"));
    let anon_huge_kib = |thp: Option<&str>| {
        let dir = tempfile::tempdir().unwrap();
        let disk = scratch_disk(dir.path(), DISK_BYTES);
        let memory = match thp {
            Some(thp) => format!("{MEMORY},thp={thp}"),
            None => MEMORY.to_string(),
        };
        let vm = kite_tests::snapshot::boot_with(dir.path(), &disk, "", &memory, BEFORE);
        let rollup =
            std::fs::read_to_string(format!("/proc/{}/smaps_rollup", vm.kite.pid())).unwrap();
        api_ok(&vm.socket, "PUT", "vmm.shutdown", None);
        let end = vm.kite.wait_exit(DEADLINE);
        assert_eq!(end.code, Some(exit::GUEST_SHUTDOWN), "{}", end.stderr);
        rollup
            .lines()
            .find_map(|l| l.strip_prefix("AnonHugePages:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("AnonHugePages in smaps_rollup")
    };
    assert_eq!(anon_huge_kib(Some("off")), 0, "thp=off: no huge pages");
    assert_eq!(anon_huge_kib(None), 0, "by default: no huge pages");
    if thp_enabled {
        assert!(
            anon_huge_kib(Some("on")) >= 16 << 10,
            "thp=on: huge pages back the guest's 32 MiB pattern"
        );
    }
}
