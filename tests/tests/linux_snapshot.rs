//! The default Linux kernel snapshotted and restored in a new process, which must go on:
//! one boot with the spinning /init (the kernel stays up on hosts where guest user space
//! cannot make system calls), a hotplug area and an API socket; a snapshot through the API
//! once the kernel has reached `Run /init`; that VM shut down; `kite run --restore` (lazy
//! memory) in a new process with its own API socket; then 512 MiB plugged through it. The
//! restored kernel's virtio_mem driver must see the request, plug the memory and online it
//! (its zonelists rebuilt with more pages), then unplug it again (rebuilt with fewer):
//! its timers, interrupts, virtio-mmio transport and virtio-mem device work after the
//! restore. Its console must go on, never showing the boot again, and so must its clock
//! (printk's timestamps): on from where it was at the snapshot, running with the host's.

use std::path::Path;
use std::time::{Duration, Instant};

use kite_tests::{
    api_ok, counters, kvm_available, resize, spin_guest, wait_plugged, Kite,
    API_DEADLINE as ANSWER_DEADLINE,
};
use serde_json::json;
use vmm::cli::exit;

const BOOT_DEADLINE: Duration = Duration::from_secs(15 * 60);
/// Plugging or unplugging runs guest kernel code: minutes where it is emulated.
const RESIZE_DEADLINE: Duration = Duration::from_secs(15 * 60);
/// Taking the snapshot: the VM is paused, its memory written.
const SNAPSHOT_DEADLINE: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;
const BOOT_RAM: u64 = 512 * MIB;
const PLUG: u64 = 512 * MIB;
const BANNER: &str = "Linux version ";
const RUN_INIT: &str = "Run /init as init process";
const PLUG_REQUEST: &str = "virtio_mem virtio0: requested size: 0x20000000";

/// The whole lines of `console` (the guest may be printing one still).
fn lines(console: &str) -> impl Iterator<Item = &str> {
    console
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(str::trim_end)
}

/// The whole lines of `console` with their printk timestamp (`printk.time=1`): the guest
/// kernel's clock in seconds when it printed them.
fn stamped(console: &str) -> Vec<(f64, &str)> {
    lines(console)
        .filter_map(|l| {
            let (stamp, text) = l.strip_prefix('[')?.split_once(']')?;
            Some((stamp.trim().parse().ok()?, text.trim()))
        })
        .collect()
}

/// The "Total pages" of each zonelist rebuild the guest kernel printed in `console`, in
/// order: one at boot, one when the first block of a zone comes online (plugged memory
/// goes to ZONE_MOVABLE), one when the zone's last block goes offline. Only whole lines:
/// the guest may be printing one still.
fn zonelist_pages(console: &str) -> Vec<u64> {
    lines(console)
        .filter_map(|l| l.split("Total pages: ").nth(1))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

fn memory_actual_size(socket: &Path) -> u64 {
    let info = api_ok(socket, "GET", "vm.info", None);
    info["memory_actual_size"]
        .as_u64()
        .unwrap_or_else(|| panic!("vm.info reports memory_actual_size: {info}"))
}

#[test]
fn linux_snapshotted_after_init_restored_in_a_new_process_then_plugged_and_unplugged() {
    if !kvm_available() {
        return;
    }
    let Some((kernel, spin)) = spin_guest() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();

    // The one boot.
    let socket = dir.path().join("booted.sock");
    let memory = format!("size={}M,hotplug_size=2G", BOOT_RAM >> 20);
    let cmdline = format!("{} printk.time=1", vmm::cli::default_cmdline());
    let started = Instant::now();
    let mut booted = Kite::start(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initramfs",
        spin.to_str().unwrap(),
        "--cmdline",
        &cmdline,
        "--memory",
        &memory,
        "--api-socket",
        socket.to_str().unwrap(),
    ]);
    booted.wait_for_socket(&socket, ANSWER_DEADLINE);
    booted.wait_for(RUN_INIT, BOOT_DEADLINE);
    let boot_time = started.elapsed();
    booted.wait_for("virtio_mem virtio0: requested size: 0x0", BOOT_DEADLINE);
    assert_eq!(memory_actual_size(&socket), BOOT_RAM);

    // The snapshot, of the running VM (paused for it and resumed).
    let snapshot = dir.path().join("snapshot");
    let url = format!("file://{}", snapshot.display());
    let taken = Instant::now();
    api_ok(
        &socket,
        "PUT",
        "vm.snapshot",
        Some(json!({ "destination_url": url })),
    );
    let snapshot_time = taken.elapsed();
    // The guest's clock at the snapshot is at most this (it started after Kite did).
    let snapshot_at = started.elapsed();
    assert!(snapshot_time < SNAPSHOT_DEADLINE, "{snapshot_time:?}");
    assert!(
        snapshot.is_dir(),
        "the snapshot is in {}",
        snapshot.display()
    );
    assert_eq!(api_ok(&socket, "GET", "vm.info", None)["state"], "Running");
    api_ok(&socket, "PUT", "vmm.shutdown", None);
    let boot = booted.wait_exit(ANSWER_DEADLINE * 6);
    assert_eq!(boot.code, Some(exit::GUEST_SHUTDOWN), "{}", boot.stderr);
    assert_eq!(boot.console.matches(BANNER).count(), 1, "{}", boot.console);
    let boot_pages = zonelist_pages(&boot.console);
    assert_eq!(
        boot_pages.len(),
        1,
        "one zonelist build at boot: {boot_pages:?}"
    );

    // The restore, in a new process with its own socket.
    let socket = dir.path().join("restored.sock");
    let restore_arg = format!("path={},memory=lazy", snapshot.display());
    let restoring = Instant::now();
    let mut restored = Kite::start(&[
        "run",
        "--restore",
        &restore_arg,
        "--api-socket",
        socket.to_str().unwrap(),
    ]);
    restored.wait_for_socket(&socket, ANSWER_DEADLINE);
    let info = api_ok(&socket, "GET", "vm.info", None);
    assert_eq!(info["state"], "Running", "kite run --restore runs: {info}");
    assert_eq!(info["memory_actual_size"], BOOT_RAM, "{info}");
    resize(&socket, BOOT_RAM + PLUG);
    let resize_answered = restoring.elapsed();
    restored.wait_for(PLUG_REQUEST, RESIZE_DEADLINE);
    let plug_request_seen = restoring.elapsed();
    let plug_time = wait_plugged(&socket, PLUG, RESIZE_DEADLINE);
    restored.wait_until("a zonelist rebuild", RESIZE_DEADLINE, |c| {
        !zonelist_pages(c).is_empty()
    });
    let onlined = restoring.elapsed();
    assert_eq!(memory_actual_size(&socket), BOOT_RAM + PLUG);

    // And unplugged again: the zone emptied, its zonelists rebuilt.
    resize(&socket, BOOT_RAM);
    restored.wait_for("virtio_mem virtio0: requested size: 0x0", RESIZE_DEADLINE);
    let unplug_time = wait_plugged(&socket, 0, RESIZE_DEADLINE);
    restored.wait_until("a second zonelist rebuild", RESIZE_DEADLINE, |c| {
        zonelist_pages(c).len() >= 2
    });
    assert_eq!(memory_actual_size(&socket), BOOT_RAM);
    let counters = counters(&socket);
    let blocks = PLUG / devices::virtio::mem::BLOCK_SIZE;
    assert_eq!(counters["mem"]["blocks_plugged"], blocks, "{counters}");
    assert_eq!(counters["mem"]["blocks_unplugged"], blocks, "{counters}");

    api_ok(&socket, "PUT", "vm.shutdown", None);
    api_ok(&socket, "PUT", "vmm.shutdown", None);
    let end = restored.wait_exit(ANSWER_DEADLINE * 6);
    assert_eq!(end.code, Some(exit::GUEST_SHUTDOWN), "{}", end.stderr);
    // The restored kernel went on: no boot again, only what it printed since.
    for line in [BANNER, RUN_INIT, "Command line: "] {
        assert!(
            !end.console.contains(line),
            "the restored guest booted again ({line:?}):\n{}",
            end.console
        );
    }
    // Onlined: the first plugged block populated ZONE_MOVABLE, more pages than at boot
    // (later blocks rebuild nothing); offlined: the last block emptied it, fewer again
    // (not necessarily the boot's count: the unplug's migrations may have boosted the
    // other zones' watermarks, which the count subtracts).
    let pages = zonelist_pages(&end.console);
    assert_eq!(pages.len(), 2, "{pages:?}\n{}", end.console);
    assert!(
        pages[0] > boot_pages[0] && pages[1] < pages[0],
        "{boot_pages:?} -> {pages:?}\n{}",
        end.console
    );
    eprintln!("the restored guest's console:\n{}", end.console);

    // Its clock went on from the snapshot (the time between snapshot and restore does not
    // count for the guest), never back, and ran with the host's: the unplug took it as
    // long as it took the host, about.
    let boot_stamps = stamped(&boot.console);
    let stamps = stamped(&end.console);
    assert_eq!(stamps.len(), lines(&end.console).count(), "{}", end.console);
    let (&(at_snapshot, _), Some(&(first, _)), Some(&(last, _))) = (
        boot_stamps.last().expect("printk timestamps at boot"),
        stamps.first(),
        stamps.last(),
    ) else {
        panic!("printk timestamps after the restore:\n{}", end.console)
    };
    let plug_request = stamps
        .iter()
        .find(|(_, l)| l.contains(PLUG_REQUEST))
        .map(|&(t, _)| t)
        .expect("the plug request's line");
    let clock = format!(
        "boot's last line at {at_snapshot} s, the restored lines from {first} s to {last} s, \
         the plug request at {plug_request} s:\n{}",
        end.console
    );
    assert!(first >= at_snapshot, "{clock}");
    assert!(stamps.windows(2).all(|w| w[0].0 <= w[1].0), "{clock}");
    let bound = (snapshot_at + plug_request_seen).as_secs_f64() + 2.0;
    assert!(plug_request <= bound, "not after {bound} s: {clock}");
    assert!(
        last - plug_request >= unplug_time.as_secs_f64() / 2.0,
        "the unplug took {unplug_time:?}: {clock}"
    );

    eprintln!(
        "boot to `Run /init`: {boot_time:?}; snapshot: {snapshot_time:?}; restore to resize \
         answered: {resize_answered:?}; restore to 512 MiB onlined: {onlined:?} (plugged \
         {plug_time:?} after the request); unplugged in {unplug_time:?}"
    );
}
