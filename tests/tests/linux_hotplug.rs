//! The default Linux kernel driven only through the API, as an orchestrator would: `kite
//! serve`, then `vm.create` (a Cloud Hypervisor `VmConfig`) and `vm.boot`; its virtio_mem
//! driver plugs 512 MiB when asked (`kite remote resize`) and unplugs it again, also after
//! a pause and resume; bad requests get error statuses and the guest carries on;
//! `vm.shutdown` and `vmm.shutdown` end it with exit 0. One boot, with an /init that spins
//! without system calls so the kernel stays up on hosts where guest user space cannot
//! make them.

use std::time::Duration;

use kite_tests::{
    api, api_ok, counters, kite_binary, kvm_available, plugged, spin_guest, wait_plugged, Kite,
    API_DEADLINE as ANSWER_DEADLINE,
};
use serde_json::json;
use vmm::cli::exit;

const BOOT_DEADLINE: Duration = Duration::from_secs(15 * 60);
/// Plugging or unplugging runs guest kernel code: minutes where it is emulated.
const RESIZE_DEADLINE: Duration = Duration::from_secs(15 * 60);
const MIB: u64 = 1 << 20;

/// The "Total pages" of the first zonelist rebuild the guest kernel printed in `console`.
fn total_pages(console: &str) -> u64 {
    console
        .lines()
        .filter_map(|l| l.split("Total pages: ").nth(1))
        .find_map(|n| n.trim().parse().ok())
        .expect("a zonelist line")
}

#[test]
fn linux_created_booted_resized_paused_and_shut_down_through_the_api() {
    if !kvm_available() {
        return;
    }
    let Some((kernel, spin)) = spin_guest() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let socket_arg = format!("path={}", socket.display());
    let mut kite = Kite::start(&["serve", "--api-socket", &socket_arg]);
    kite.wait_for_socket(&socket, ANSWER_DEADLINE);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the API socket is private");

    let ping = api_ok(&socket, "GET", "vmm.ping", None);
    assert_eq!(ping["pid"], kite.pid(), "{ping}");
    let (status, _) = api(&socket, "GET", "vm.info", None);
    assert_eq!(status, 404, "no VM yet");

    // What Cloud Hypervisor's clients send: unused devices as null or empty.
    let config = json!({
        "payload": {
            "kernel": kernel,
            "initramfs": spin,
            "cmdline": vmm::cli::default_cmdline(),
        },
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 512 * MIB, "hotplug_method": "VirtioMem", "hotplug_size": 2048 * MIB},
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off"},
        "net": null,
        "disks": [],
    });
    let (status, reply) = api(
        &socket,
        "PUT",
        "vm.create",
        Some(json!({"memory": {"size": 1}})),
    );
    assert_eq!(status, 400, "{reply}");
    api_ok(&socket, "PUT", "vm.create", Some(config.clone()));
    let (status, reply) = api(&socket, "PUT", "vm.create", Some(config));
    assert_eq!(status, 409, "a second vm.create: {reply}");
    let info = api_ok(&socket, "GET", "vm.info", None);
    assert_eq!(info["state"], "Created", "{info}");
    assert_eq!(info["memory_actual_size"], 512 * MIB, "{info}");
    api_ok(&socket, "PUT", "vm.boot", None);
    let (status, _) = api(&socket, "PUT", "vm.boot", None);
    assert_eq!(status, 409, "boot when running");
    kite.wait_for("Run /init as init process", BOOT_DEADLINE);
    kite.wait_for("virtio_mem virtio0: requested size: 0x0", BOOT_DEADLINE);
    assert_eq!(api_ok(&socket, "GET", "vm.info", None)["state"], "Running");

    // Plug 512 MiB: kite remote, as a user would.
    let status = std::process::Command::new(kite_binary())
        .args([
            "remote",
            "--api-socket",
            &socket_arg,
            "resize",
            "--memory",
            "1G",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let plug_time = wait_plugged(&socket, 512 * MIB, RESIZE_DEADLINE);
    kite.wait_for(
        "virtio_mem virtio0: requested size: 0x20000000",
        ANSWER_DEADLINE,
    );
    let info = api_ok(&socket, "GET", "vm.info", None);
    assert_eq!(info["memory_actual_size"], 1024 * MIB, "{info}");

    // Bad requests: error statuses, nothing changes.
    for (body, message) in [
        (json!({"desired_ram": 100u64 << 30}), "the area holds"),
        (json!({"desired_ram": 1024 * MIB + 4096}), "not a multiple"),
        (json!({"desired_ram": 256 * MIB}), "below the boot memory"),
        (json!({}), "desired_ram is required"),
        (json!({"desired_vcpus": 2}), "no vCPU hotplug"),
        (json!({"desired_ram": "1G"}), "invalid type"),
    ] {
        let (status, reply) = api(&socket, "PUT", "vm.resize", Some(body.clone()));
        assert_eq!(status, 400, "{body}: {reply}");
        let error = reply["error"].as_str().unwrap_or_default();
        assert!(error.contains(message), "{body}: {error}");
    }
    let (status, _) = api(&socket, "PUT", "vm.power-button", None);
    assert_eq!(status, 400, "no ACPI power button");
    let (status, _) = api(&socket, "PUT", "vm.resume", None);
    assert_eq!(status, 405, "resume when running (as Cloud Hypervisor)");
    assert_eq!(plugged(&socket), 512 * MIB, "bad requests changed nothing");

    // Pause: no resize while paused; resume; then unplug it all again (the guest's
    // timers, interrupts and virtio-mem driver work on after the pause).
    api_ok(&socket, "PUT", "vm.pause", None);
    assert_eq!(api_ok(&socket, "GET", "vm.info", None)["state"], "Paused");
    let (status, _) = api(&socket, "PUT", "vm.pause", None);
    assert_eq!(status, 405, "pause when paused (as Cloud Hypervisor)");
    let (status, _) = api(
        &socket,
        "PUT",
        "vm.resize",
        Some(json!({"desired_ram": 512 * MIB})),
    );
    assert_eq!(status, 409, "resize when paused");
    api_ok(&socket, "PUT", "vm.resume", None);
    assert_eq!(api_ok(&socket, "GET", "vm.info", None)["state"], "Running");
    api_ok(
        &socket,
        "PUT",
        "vm.resize",
        Some(json!({"desired_ram": 512 * MIB})),
    );
    let unplug_time = wait_plugged(&socket, 0, RESIZE_DEADLINE);
    let counters = counters(&socket);
    let blocks = 512 * MIB / devices::virtio::mem::BLOCK_SIZE;
    assert_eq!(counters["mem"]["blocks_plugged"], blocks, "{counters}");
    assert_eq!(counters["mem"]["blocks_unplugged"], blocks, "{counters}");
    assert!(
        counters["region_table"]["regions"].as_u64().is_some(),
        "{counters}"
    );
    eprintln!("plugged 512 MiB in {plug_time:?}, unplugged it in {unplug_time:?}");

    api_ok(&socket, "PUT", "vm.shutdown", None);
    assert_eq!(api_ok(&socket, "GET", "vm.info", None)["state"], "Shutdown");
    api_ok(&socket, "PUT", "vmm.shutdown", None);
    let end = kite.wait_exit(ANSWER_DEADLINE * 6);
    assert_eq!(end.code, Some(exit::GUEST_SHUTDOWN), "{}", end.stderr);
    // The guest onlined the memory: its zonelists were rebuilt, with more pages, when the
    // first plugged block came online (in ZONE_MOVABLE; later blocks rebuild nothing).
    let boot_pages = total_pages(&end.console);
    let plugged_pages = end
        .console
        .split("requested size: 0x20000000")
        .nth(1)
        .map(total_pages)
        .expect("a zonelist line after the plug request");
    assert!(
        plugged_pages > boot_pages,
        "{boot_pages} -> {plugged_pages}"
    );
    assert!(!socket.exists(), "the socket is removed when Kite exits");
}
