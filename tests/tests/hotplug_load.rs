//! Hotplug under load, with the test guest: the host resizes the guest's memory up and down
//! through the control socket while the guest, following each request with its virtio-mem
//! driver, writes and checks patterns across all plugged memory and does virtio-blk round
//! trips. Pass: the guest's checks all pass, every resize completes within its deadline,
//! the control socket always answers within its deadline, host memory (RSS) falls after
//! each unplug. With anonymous and with lazy (userfaultfd) backing.
//!
//! `KITE_HOTPLUG_CYCLES` sets the cycles (default 50; e.g. 1000 for a long run).

use std::path::Path;
use std::time::Duration;

use kite_tests::{api, counters, kvm_available, resize, scratch_disk, wait_plugged, Kite};
use serde_json::json;

const GUEST: &str = env!("KITE_TEST_GUEST");
const BLOCK: u64 = 128 << 20;
const BOOT_MIB: u64 = 512;
/// Plugging writes a pattern over each block; unplugging checks it first.
const RESIZE_DEADLINE: Duration = Duration::from_secs(60);

fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        << 10
}

/// Resizes to `blocks` hotplugged blocks and waits until they are plugged and the guest has
/// settled at that size (its steady line: patterns written, disk round trips going on).
fn resize_to(kite: &Kite, socket: &Path, blocks: u64) {
    let mark = kite.mark();
    resize(socket, (BOOT_MIB << 20) + blocks * BLOCK);
    wait_plugged(socket, blocks * BLOCK, RESIZE_DEADLINE);
    let steady = format!("hotplug steady plugged_mib={} ", blocks * (BLOCK >> 20));
    kite.wait_for_since(mark, &steady, RESIZE_DEADLINE);
}

fn hotplug_under_load(backing: &str) {
    if !kvm_available() {
        return;
    }
    let cycles: u64 = std::env::var("KITE_HOTPLUG_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let dir = tempfile::tempdir().unwrap();
    let (socket, disk) = (
        dir.path().join("api.sock"),
        scratch_disk(dir.path(), 8 << 20),
    );
    let memory = format!("size={BOOT_MIB}M,hotplug_size=512M,hotplug_backing={backing}");
    let disk_arg = format!("path={}", disk.display());
    let kite = Kite::start(&[
        "run",
        "--kernel",
        GUEST,
        "--cmdline",
        "kite.test=hotplug",
        "--memory",
        &memory,
        "--disk",
        &disk_arg,
        "--api-socket",
        socket.to_str().unwrap(),
    ]);
    kite.wait_for("kite-test: hotplug ready", RESIZE_DEADLINE);
    // An oversized request gets an error reply; the VM carries on.
    let huge = json!({"desired_ram": 1, "padding": "x".repeat(vmm::api::MAX_REQUEST as usize)});
    let (status, reply) = api(&socket, "PUT", "vm.resize", Some(huge));
    assert_eq!(status, 413, "{reply}");
    for cycle in 0..cycles {
        // Up by one to three blocks, then all the way down.
        let blocks = 1 + cycle % 3;
        resize_to(&kite, &socket, blocks);
        let full = rss(kite.pid());
        resize_to(&kite, &socket, 0);
        let empty = rss(kite.pid());
        assert!(
            empty + blocks * BLOCK / 2 < full,
            "cycle {cycle}: unplugging {blocks} blocks left RSS at {empty} (plugged: {full})"
        );
    }
    let counters = counters(&socket);
    eprintln!("{backing}: after {cycles} cycles: {counters}");
    assert_eq!(
        counters["mem"]["blocks_plugged"],
        counters["mem"]["blocks_unplugged"]
    );
    kite.signal(libc::SIGTERM);
    let end = kite.wait_exit(RESIZE_DEADLINE);
    assert!(!end.console.contains("FAIL"), "{}", end.console);
    assert!(end.console.contains("round_trips="), "{}", end.console);
    assert_eq!(end.code, Some(128 + libc::SIGTERM), "{}", end.stderr);
}

#[test]
fn anonymous_memory_under_load() {
    hotplug_under_load("anon");
}

#[test]
fn lazy_memory_under_load() {
    hotplug_under_load("lazy");
}
